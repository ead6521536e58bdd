//! What a snapshot reads: an image file or a block device (opened by [`crate::volume`]), or an
//! NBD export ([`nbd`]: a point-in-time view of a VM disk served by QEMU or `qemu-nbd`).
//!
//! Reading is sequential and bounded whatever the source: [`Source::spawn_reader`] sends stripes
//! in order into the caller's bounded channel, with at most [`NBD_STRIPES_AHEAD`] stripes of
//! requests in flight on an NBD connection (a file is read one stripe at a time with positioned
//! reads on the blocking pool). [`Source::read_stripe`] reads one stripe again (a retry that
//! re-encodes a shard for another agent).

pub mod nbd;

use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use sa_core::layout::Layout;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::volume::Volume;
pub use nbd::NbdSource;

/// Stripes whose reads are in flight at once on an NBD connection (a stripe of up to 4 MiB is
/// one request, see [`nbd::MAX_READ_REQUEST`]): a disk behind the export reads scattered stripes
/// about twice as fast with 4 reads waiting as with 1 (`qemu-nbd` on a cold qcow2), and the
/// memory held stays 4 stripes.
pub const NBD_STRIPES_AHEAD: usize = 4;

/// A snapshot source.
pub enum Source {
    /// An image file or a block device.
    File(FileSource),
    /// An NBD export.
    Nbd(NbdSource),
}

/// An open image file or block device.
pub struct FileSource {
    file: Arc<std::fs::File>,
    path: PathBuf,
    size: u64,
}

/// What [`Source::spawn_reader`] sends: a stripe's index and bytes, or the read error that
/// ended the reading.
pub type StripeRead = Result<(u64, Vec<u8>)>;

/// True when `source` is an NBD URI (`nbd://`, `nbd+unix://`, and the TLS schemes that the
/// client refuses by name) rather than a path.
pub fn is_nbd_uri(source: &str) -> bool {
    source
        .split_once("://")
        .is_some_and(|(scheme, _)| scheme.to_ascii_lowercase().starts_with("nbd"))
}

impl Source {
    /// The source over an opened volume.
    pub fn new(vol: Volume) -> Source {
        Source::File(FileSource {
            file: Arc::new(vol.file),
            path: vol.path,
            size: vol.size,
        })
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Source::File(f) => f.size,
            Source::Nbd(n) => n.size(),
        }
    }

    /// Where it is read from: the path, or the URI.
    pub fn name(&self) -> String {
        match self {
            Source::File(f) => f.path.display().to_string(),
            Source::Nbd(n) => n.uri().to_string(),
        }
    }

    /// The NBD export, when it is one.
    pub fn nbd(&self) -> Option<&NbdSource> {
        match self {
            Source::Nbd(n) => Some(n),
            Source::File(_) => None,
        }
    }

    /// Reads stripe `i` of `layout` whole.
    pub async fn read_stripe(self: &Arc<Self>, layout: &Layout, i: u64) -> Result<Vec<u8>> {
        match &**self {
            Source::File(f) => {
                let (f, layout) = (f.clone_handle(), *layout);
                tokio::task::spawn_blocking(move || f.read_stripe_blocking(&layout, i))
                    .await
                    .map_err(|e| Error::failed(format!("read task failed: {e}")))?
            }
            Source::Nbd(n) => n.read_stripe(layout, i).await,
        }
    }

    /// Reads the stripes `to_read` in order into `tx`, stopping at the first error (which is
    /// sent) or when the receiver is gone. The task ends when the reading does, with true when
    /// every stripe was read and sent.
    pub fn spawn_reader(
        self: &Arc<Self>,
        layout: &Layout,
        to_read: Vec<u64>,
        tx: mpsc::Sender<StripeRead>,
    ) -> JoinHandle<bool> {
        let layout = *layout;
        match &**self {
            Source::File(f) => {
                let f = f.clone_handle();
                tokio::task::spawn_blocking(move || {
                    for i in to_read {
                        let r = f.read_stripe_blocking(&layout, i).map(|b| (i, b));
                        let failed = r.is_err();
                        if tx.blocking_send(r).is_err() || failed {
                            return false;
                        }
                    }
                    true
                })
            }
            Source::Nbd(_) => {
                let me = self.clone();
                tokio::spawn(async move { me.read_ahead(layout, to_read, tx).await })
            }
        }
    }

    /// The NBD reader: up to [`NBD_STRIPES_AHEAD`] stripes in flight, delivered in order.
    async fn read_ahead(
        self: Arc<Self>,
        layout: Layout,
        to_read: Vec<u64>,
        tx: mpsc::Sender<StripeRead>,
    ) -> bool {
        let mut next = to_read.into_iter();
        let mut flight: VecDeque<(u64, JoinHandle<Result<Vec<u8>>>)> = VecDeque::new();
        loop {
            while flight.len() < NBD_STRIPES_AHEAD {
                let Some(i) = next.next() else { break };
                let me = self.clone();
                flight.push_back((
                    i,
                    tokio::spawn(async move { me.read_stripe(&layout, i).await }),
                ));
            }
            let Some((i, task)) = flight.pop_front() else {
                return true;
            };
            let r = match task.await {
                Ok(r) => r.map(|b| (i, b)),
                Err(e) => Err(Error::failed(format!("read task failed: {e}"))),
            };
            let failed = r.is_err();
            tracing::trace!("stripe {i} read");
            if tx.send(r).await.is_err() || failed {
                for (_, t) in flight {
                    t.abort();
                }
                return false;
            }
        }
    }
}

impl FileSource {
    fn clone_handle(&self) -> FileSource {
        FileSource {
            file: self.file.clone(),
            path: self.path.clone(),
            size: self.size,
        }
    }

    /// Reads stripe `i` of `layout` whole (blocking; call it off the reactor).
    fn read_stripe_blocking(&self, layout: &Layout, i: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; layout.stripe_len(i)];
        self.file
            .read_exact_at(&mut buf, layout.stripe_offset(i))
            .map_err(|e| {
                Error::io(
                    format!(
                        "cannot read stripe {i} (bytes {}..) of {}",
                        layout.stripe_offset(i),
                        self.path.display()
                    ),
                    e,
                )
            })?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_are_told_from_paths() {
        for uri in [
            "nbd://127.0.0.1:10809/vda",
            "nbd+unix:///vda?socket=/run/nbd.sock",
            "NBD://host",
            "nbds://host",
        ] {
            assert!(is_nbd_uri(uri), "{uri}");
        }
        for path in ["/dev/sda", "disk.img", "./nbd/disk.img", "file:///x"] {
            assert!(!is_nbd_uri(path), "{path}");
        }
    }
}

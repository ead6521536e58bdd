//! What a snapshot reads: an image file or a block device, opened by [`crate::volume`].
//! Stripes are read with positioned reads on the blocking pool, so several readers (the
//! sequential reader, a retry that re-reads one stripe) share the open file.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use sa_core::layout::Layout;

use crate::error::{Error, Result};
use crate::volume::Volume;

/// A snapshot source.
pub struct Source {
    file: Arc<std::fs::File>,
    path: PathBuf,
    size: u64,
}

impl Source {
    /// The source over an opened volume.
    pub fn new(vol: Volume) -> Source {
        Source {
            file: Arc::new(vol.file),
            path: vol.path,
            size: vol.size,
        }
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where it is read from.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Reads stripe `i` of `layout` whole (blocking; call it off the reactor).
    pub fn read_stripe_blocking(&self, layout: &Layout, i: u64) -> Result<Vec<u8>> {
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

    /// Reads stripe `i` of `layout` whole, on the blocking pool.
    pub async fn read_stripe(self: &Arc<Self>, layout: &Layout, i: u64) -> Result<Vec<u8>> {
        let (me, layout) = (self.clone(), *layout);
        tokio::task::spawn_blocking(move || me.read_stripe_blocking(&layout, i))
            .await
            .map_err(|e| Error::failed(format!("read task failed: {e}")))?
    }
}

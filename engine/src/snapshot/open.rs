//! Opening a snapshot's source: a path (file or block device) or an NBD URI, with the bitmap
//! options checked against it and the consistency method decided ([`consistency::plan`]).

use sa_core::manifest::MAX_BITMAP_NAME;

use super::SnapshotOptions;
use crate::consistency::{self, Method};
use crate::error::{Error, Result};
use crate::source::{is_nbd_uri, NbdSource, Source};

/// The opened source and how it will be read consistently.
pub(super) struct Opened {
    pub source: Source,
    pub mounted_rw: Vec<String>,
    pub method: Method,
}

/// Opens the source (a path or an NBD URI) and decides how to read it consistently
/// ([`consistency::plan`]): a source in use without a method is refused here, before anything
/// is stored.
pub(super) async fn open(opts: &SnapshotOptions) -> Result<Opened> {
    let text = opts.source.to_string_lossy();
    for (flag, name) in [
        ("--dirty-bitmap", &opts.dirty_bitmap),
        ("--new-bitmap", &opts.new_bitmap),
    ] {
        if let Some(n) = name {
            if n.is_empty() || n.len() > MAX_BITMAP_NAME || n.chars().any(char::is_control) {
                return Err(Error::invalid(format!(
                    "{flag} {n:?}: a bitmap name is 1 to {MAX_BITMAP_NAME} bytes of printable text"
                )));
            }
            if !is_nbd_uri(&text) {
                return Err(Error::invalid(format!(
                    "{flag} names a dirty bitmap of a QEMU NBD export (nbd://, nbd+unix://); \
                     {text} is a file or device: use --changed-since/--changed-map for those"
                )));
            }
        }
    }
    if opts.dirty_bitmap.is_some() && opts.changed.is_some() {
        return Err(Error::invalid(
            "give either --dirty-bitmap or --changed-since/--changed-map, not both",
        ));
    }
    if is_nbd_uri(&text) {
        let method = consistency::plan(&opts.consistency, &opts.source, true, &[]).await?;
        let nbd = NbdSource::connect(&text, opts.dirty_bitmap.as_deref(), opts.stripe_size).await?;
        return Ok(Opened {
            source: Source::Nbd(nbd),
            mounted_rw: Vec::new(),
            method,
        });
    }
    let vol = crate::volume::open_source(&opts.source)?;
    let method = consistency::plan(&opts.consistency, &opts.source, false, &vol.mounted_rw).await?;
    if let Method::Inconsistent(m) = &method {
        for m in m {
            tracing::warn!(
                "{} is mounted read-write on {m} and is read anyway (--inconsistent-ok): the \
                 image may need fsck, or worse",
                opts.source.display()
            );
        }
    }
    let mounted_rw = vol.mounted_rw.iter().map(ToString::to_string).collect();
    Ok(Opened {
        source: Source::new(vol),
        mounted_rw,
        method,
    })
}

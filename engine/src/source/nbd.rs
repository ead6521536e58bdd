//! An NBD export as a snapshot source: a point-in-time view of a VM disk (QEMU's
//! `block-export-add` of a `blockdev-backup` target or snapshot node, `qemu-nbd` on a snapshot),
//! read with [`nbd_server::client`].
//!
//! Besides the bytes, an export can describe itself through metadata contexts:
//! - `base:allocation`: stripes that read as zeroes are recorded as zero stripes without reading
//!   them ([`NbdSource::zero_stripes`]). Only `NBD_STATE_ZERO` counts: "NBD_STATE_ZERO (bit 1): if
//!   set, the block contents read as all zeroes"; a hole alone (`NBD_STATE_HOLE`, "the block
//!   represents a hole") may read as anything, e.g. data of a backing file.
//! - `qemu:dirty-bitmap:NAME`: the stripes a persistent dirty bitmap marks
//!   ([`NbdSource::dirty_stripes`]); whether that bitmap may be trusted is decided by
//!   [`crate::snapshot`] from the base snapshot's manifest.
//!
//! Both maps are walked one block-status reply at a time into one flag per stripe, so memory
//! follows the number of stripes (like the manifest), not the number of extents.

use std::time::Duration;

pub use nbd_server::client::NbdUri;
use nbd_server::client::{Client, ClientConfig};
use sa_core::layout::{Layout, SECTOR};

use crate::error::{Error, Result};

/// The allocation context.
pub const BASE_ALLOCATION: &str = "base:allocation";

/// The metadata context of QEMU's dirty bitmap `name`.
pub fn bitmap_context(name: &str) -> String {
    format!("qemu:dirty-bitmap:{name}")
}

/// The largest read request a snapshot sends. Against `qemu-nbd` on a cold qcow2, 4 reads of
/// 4 MiB in flight read scattered stripes as fast as 8 to 16 reads of 1 MiB, or faster, and a
/// stripe read in one request needs no copy into its buffer.
pub const MAX_READ_REQUEST: u32 = 4 << 20;

/// An open NBD export.
pub struct NbdSource {
    client: Client,
    uri: NbdUri,
}

impl NbdSource {
    /// Connects to `uri` asking for `base:allocation` and, when given, the dirty bitmap `bitmap`
    /// (contexts the server does not offer are simply not granted), and checks the export is a
    /// whole number of sectors. Reads go out in requests of up to `stripe_size` bytes (at least
    /// 1 MiB, at most [`MAX_READ_REQUEST`], and no more than the server takes): a stripe of 4 MiB
    /// or less is one request, read straight into its buffer.
    pub async fn connect(uri: &str, bitmap: Option<&str>, stripe_size: u32) -> Result<NbdSource> {
        let parsed = NbdUri::parse(uri).map_err(|e| {
            Error::invalid(format!(
                "{uri}: {e}; an NBD source is nbd://HOST[:PORT]/EXPORT or \
                 nbd+unix:///EXPORT?socket=PATH"
            ))
        })?;
        let mut meta_contexts = vec![BASE_ALLOCATION.to_string()];
        meta_contexts.extend(bitmap.map(bitmap_context));
        let config = ClientConfig {
            meta_contexts,
            request_timeout: Duration::from_secs(120),
            max_read_request: stripe_size.clamp(1 << 20, MAX_READ_REQUEST),
            ..ClientConfig::default()
        };
        let client = Client::connect(&parsed, &config)
            .await
            .map_err(|e| Error::nbd(format!("cannot open the NBD export {uri}"), e))?;
        let size = client.size();
        if size == 0 {
            return Err(Error::invalid(format!("the NBD export {uri} is empty")));
        }
        if size % SECTOR != 0 {
            return Err(Error::invalid(format!(
                "the NBD export {uri} is {size} bytes, not a multiple of 512: a disk always is; \
                 is this the right export?"
            )));
        }
        if !client.info().read_only() {
            tracing::info!(
                "{uri} is writable: make sure it is a point-in-time view (a backup target or \
                 snapshot node), not the running disk"
            );
        }
        Ok(NbdSource {
            client,
            uri: parsed,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.client.size()
    }

    /// The URI it was opened with.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// Whether the server granted metadata context `name`.
    pub fn has_context(&self, name: &str) -> bool {
        self.client.context(name).is_some()
    }

    /// Reads stripe `i` of `layout` whole.
    pub async fn read_stripe(&self, layout: &Layout, i: u64) -> Result<Vec<u8>> {
        let offset = layout.stripe_offset(i);
        self.client
            .read_vec(offset, layout.stripe_len(i))
            .await
            .map_err(|e| {
                Error::nbd(
                    format!("cannot read stripe {i} (bytes {offset}..) of {}", self.uri),
                    e,
                )
            })
    }

    /// Per stripe: does `base:allocation` say every byte of it reads as zero? None when the
    /// server did not grant the context.
    pub async fn zero_stripes(&self, layout: &Layout) -> Result<Option<Vec<bool>>> {
        if !self.has_context(BASE_ALLOCATION) {
            return Ok(None);
        }
        // A stripe is zero when no extent without NBD_STATE_ZERO touches it: the walk covers the
        // export contiguously (the client checks it), so the rest of it is covered by zero ones.
        let nonzero = self.mark(BASE_ALLOCATION, layout, |e| !e.is_zero()).await?;
        Ok(Some(nonzero.into_iter().map(|n| !n).collect()))
    }

    /// Per stripe: does the dirty bitmap `name` mark any byte of it? The context must have been
    /// granted.
    pub async fn dirty_stripes(&self, name: &str, layout: &Layout) -> Result<Vec<bool>> {
        self.mark(&bitmap_context(name), layout, |e| e.is_dirty())
            .await
    }

    /// One flag per stripe: set when an extent of `context` for which `pick` holds touches it.
    async fn mark(
        &self,
        context: &str,
        layout: &Layout,
        pick: impl Fn(&nbd_server::client::StatusExtent) -> bool,
    ) -> Result<Vec<bool>> {
        let size = layout.volume_size;
        let mut marks = vec![false; layout.stripe_count() as usize];
        let mut walk = self.client.walk_extents(context, 0, size);
        loop {
            let batch = walk
                .next()
                .await
                .map_err(|e| Error::nbd(format!("cannot read {context} of {}", self.uri), e))?;
            let Some(extents) = batch else { break };
            for e in extents.iter().filter(|e| pick(e) && e.len > 0) {
                let end = e.end().min(size);
                if e.offset >= end {
                    continue;
                }
                for s in layout.stripe_of(e.offset)..=layout.stripe_of(end - 1) {
                    marks[s as usize] = true;
                }
            }
        }
        Ok(marks)
    }
}

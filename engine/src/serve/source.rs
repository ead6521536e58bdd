//! [`ServeSource`]: the [`BlockSource`] that `sa-image serve` exports: the snapshot, and over it
//! a [`WriteLayer`] when the export is writable: the overlay ([`Overlay`]) or, in live restore,
//! the hydrate target ([`super::hydrate::Hydrate`]).
//!
//! - Reads: bytes the layer answers for (blocks written into the overlay; in live restore also
//!   every stripe already copied to the target) come from the layer, the rest from the snapshot;
//!   a read touching none of them goes straight to the snapshot.
//! - Writes (writable only): whole 4 KiB blocks go to the layer. A write that covers a block
//!   only in part first reads that block (from the layer if it answers for it, else from the
//!   snapshot) and merges. Writes are serialised among themselves by one lock (shared with the
//!   live-restore copier, see [`ServeSource::write_lock`]), so two partial writes to one block
//!   cannot both merge against its old contents; reads run alongside.
//! - Flush and FUA: the layer's data and map are synced before the answer.
//! - Write-zeroes writes zero blocks (no faster than writing: `FAST_ZERO` is refused as the spec
//!   asks). Trim does nothing: the contents of a trimmed range are unspecified, the old ones do.
//! - Block status: zero stripes not written over are holes that read as zeroes; the rest is data.
//!
//! The snapshot on the agents is never written: nothing here has a way to.

use std::sync::Arc;

use async_trait::async_trait;
use nbd_server::{BlockSource, Extent, SourceError, ZeroFlags};

use super::overlay::{Overlay, BLOCK};
use super::snapshot::Snapshot;
use super::stats::{add, bump, Stats};

/// Largest piece of a write-zeroes request written at once.
const ZERO_CHUNK: u64 = 4 << 20;

/// Where the writes of a writable export go, and which bytes it then answers for instead of the
/// snapshot. Its unit is the [`BLOCK`]: a block is answered for whole or not at all.
#[async_trait]
pub trait WriteLayer: Send + Sync + 'static {
    /// Whether any block touching `offset..offset + len` is read from the layer.
    fn any(&self, offset: u64, len: u64) -> bool;
    /// Cuts `offset..offset + len` into runs `(offset, len, from_layer)`.
    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)>;
    /// Whether any block touching the range was written through NBD (block status: data).
    fn written_any(&self, offset: u64, len: u64) -> bool {
        self.any(offset, len)
    }
    /// Cuts the range into runs `(offset, len, written through NBD)`.
    fn written_runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        self.runs(offset, len)
    }
    /// Reads `len` bytes at `offset` (only meaningful where the layer answers).
    async fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>>;
    /// Writes whole blocks at a block boundary (the last may end at the end of the volume) and
    /// from then on answers for them.
    async fn write_blocks(&self, offset: u64, data: Vec<u8>) -> std::io::Result<()>;
    /// Makes every write that has returned durable.
    async fn flush(&self) -> std::io::Result<()>;
    /// Told once per NBD read whether the layer alone answered it (for the counters).
    fn note_read(&self, _from_layer_only: bool) {}
}

#[async_trait]
impl WriteLayer for Overlay {
    fn any(&self, offset: u64, len: u64) -> bool {
        Overlay::any(self, offset, len)
    }
    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        Overlay::runs(self, offset, len)
    }
    async fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        Overlay::read(self, offset, len).await
    }
    async fn write_blocks(&self, offset: u64, data: Vec<u8>) -> std::io::Result<()> {
        Overlay::write_blocks(self, offset, data).await
    }
    async fn flush(&self) -> std::io::Result<()> {
        Overlay::flush(self).await
    }
}

/// What `serve` exports.
pub struct ServeSource {
    snapshot: Arc<Snapshot>,
    layer: Option<Arc<dyn WriteLayer>>,
    stats: Arc<Stats>,
    writing: Arc<tokio::sync::RwLock<()>>,
}

impl ServeSource {
    /// The snapshot, read-only, or writable into any [`WriteLayer`].
    pub fn new(
        snapshot: Arc<Snapshot>,
        layer: Option<Arc<dyn WriteLayer>>,
        stats: Arc<Stats>,
    ) -> Self {
        ServeSource {
            snapshot,
            layer,
            stats,
            writing: Arc::new(tokio::sync::RwLock::new(())),
        }
    }

    /// The lock every write holds, exclusively, from its read-modify-write to its return.
    /// Whoever else writes into the layer (the live-restore copier) holds it shared, so a copy
    /// never interleaves with a guest write, while copies of different stripes run side by side.
    pub fn write_lock(&self) -> Arc<tokio::sync::RwLock<()>> {
        self.writing.clone()
    }

    fn layer(&self) -> Result<&Arc<dyn WriteLayer>, SourceError> {
        self.layer.as_ref().ok_or(SourceError::ReadOnly)
    }

    /// Fills `buf` from the layer and the snapshot; true when the layer alone answered.
    async fn read_merged(&self, offset: u64, buf: &mut [u8]) -> Result<bool, SourceError> {
        let Some(ov) = self
            .layer
            .as_ref()
            .filter(|o| o.any(offset, buf.len() as u64))
        else {
            self.snapshot.read(offset, buf).await?;
            return Ok(false);
        };
        let mut only_layer = true;
        for (at, len, from_layer) in ov.runs(offset, buf.len() as u64) {
            let dst = &mut buf[(at - offset) as usize..(at - offset + len) as usize];
            if from_layer {
                dst.copy_from_slice(&ov.read(at, len as usize).await?);
            } else {
                only_layer = false;
                self.snapshot.read(at, dst).await?;
            }
        }
        Ok(only_layer)
    }

    /// Writes `data` at `offset` into the layer, merging partial blocks. Caller holds `writing`.
    async fn write_locked(&self, offset: u64, data: &[u8]) -> Result<(), SourceError> {
        let ov = self.layer()?;
        let size = self.snapshot.size();
        let end = offset + data.len() as u64;
        let start = offset / BLOCK * BLOCK;
        let stop = end.div_ceil(BLOCK).saturating_mul(BLOCK).min(size);
        let mut buf = vec![0u8; (stop - start) as usize];
        // Partial first and last blocks: their old contents first.
        let head_partial = start < offset;
        if head_partial {
            let n = BLOCK.min(stop - start) as usize;
            self.read_merged(start, &mut buf[..n]).await?;
        }
        let last_block = (end - 1) / BLOCK * BLOCK;
        if end < stop && !(head_partial && last_block == start) {
            let from = (last_block - start) as usize;
            self.read_merged(last_block, &mut buf[from..]).await?;
        }
        buf[(offset - start) as usize..(end - start) as usize].copy_from_slice(data);
        ov.write_blocks(start, buf).await?;
        add(&self.stats.bytes_written, data.len() as u64);
        Ok(())
    }

    async fn flush_layer(&self) -> Result<(), SourceError> {
        self.layer()?.flush().await?;
        bump(&self.stats.flushes);
        Ok(())
    }
}

#[async_trait]
impl BlockSource for ServeSource {
    fn size(&self) -> u64 {
        self.snapshot.size()
    }
    fn read_only(&self) -> bool {
        self.layer.is_none()
    }
    fn can_flush(&self) -> bool {
        self.layer.is_some()
    }
    fn can_fua(&self) -> bool {
        self.layer.is_some()
    }
    fn can_trim(&self) -> bool {
        self.layer.is_some()
    }
    fn can_write_zeroes(&self) -> bool {
        self.layer.is_some()
    }
    fn can_multi_conn(&self) -> bool {
        // One snapshot, one layer: every connection sees every write, and a flush on any
        // connection syncs them all.
        true
    }
    fn can_cache(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        bump(&self.stats.reads);
        let only_layer = self.read_merged(offset, buf).await?;
        if let Some(l) = &self.layer {
            l.note_read(only_layer);
        }
        add(&self.stats.bytes_read, buf.len() as u64);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        bump(&self.stats.writes);
        {
            let _one = self.writing.write().await;
            self.write_locked(offset, data).await?;
        }
        if fua {
            self.flush_layer().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        self.flush_layer().await
    }

    async fn trim(&self, _offset: u64, _len: u64, fua: bool) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        self.layer()?;
        if fua {
            self.flush_layer().await?;
        }
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        self.layer()?;
        if flags.fast {
            return Err(SourceError::Unsupported);
        }
        bump(&self.stats.writes);
        let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let mut at = offset;
        let end = offset + len;
        {
            let _one = self.writing.write().await;
            while at < end {
                let n = (end - at).min(ZERO_CHUNK);
                self.write_locked(at, &zeros[..n as usize]).await?;
                at += n;
            }
        }
        if flags.fua {
            self.flush_layer().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, SourceError> {
        bump(&self.stats.requests);
        let base = self.snapshot.extents(offset, len);
        let Some(ov) = self.layer.as_ref() else {
            return Ok(base);
        };
        // Written blocks are data, whatever lies under them.
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        for e in base {
            let runs = if e.hole && ov.written_any(at, e.len) {
                ov.written_runs(at, e.len)
            } else {
                vec![(at, e.len, false)]
            };
            for (_, n, written) in runs {
                let x = if written {
                    Extent::data(n)
                } else {
                    Extent { len: n, ..e }
                };
                match out.last_mut() {
                    Some(l) if l.hole == x.hole && l.zero == x.zero => l.len += n,
                    _ => out.push(x),
                }
            }
            at += e.len;
        }
        Ok(out)
    }

    async fn cache(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        self.snapshot.prefetch(offset, len);
        Ok(())
    }
}

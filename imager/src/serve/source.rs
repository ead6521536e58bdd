//! [`ServeSource`]: the [`BlockSource`] that `sa-image serve` exports: the snapshot, and over it
//! the overlay when there is one.
//!
//! - Reads: bytes of blocks written into the overlay come from the overlay file, the rest from
//!   the snapshot; a read touching no written block goes straight to the snapshot.
//! - Writes (overlay only): whole 4 KiB blocks go to the overlay file. A write that covers a block
//!   only in part first reads that block (from the overlay if written there before, else from the
//!   snapshot) and merges. Writes are serialised among themselves, so two partial writes to one
//!   block cannot both merge against its old contents; reads run alongside.
//! - Flush and FUA: the overlay's data and map are synced before the answer.
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

/// What `serve` exports.
pub struct ServeSource {
    snapshot: Arc<Snapshot>,
    overlay: Option<Arc<Overlay>>,
    stats: Arc<Stats>,
    writing: tokio::sync::Mutex<()>,
}

impl ServeSource {
    /// The snapshot, read-only, or writable into `overlay`.
    pub fn new(snapshot: Arc<Snapshot>, overlay: Option<Arc<Overlay>>, stats: Arc<Stats>) -> Self {
        ServeSource {
            snapshot,
            overlay,
            stats,
            writing: tokio::sync::Mutex::new(()),
        }
    }

    fn overlay(&self) -> Result<&Arc<Overlay>, SourceError> {
        self.overlay.as_ref().ok_or(SourceError::ReadOnly)
    }

    async fn read_merged(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let Some(ov) = self
            .overlay
            .as_ref()
            .filter(|o| o.any(offset, buf.len() as u64))
        else {
            return self.snapshot.read(offset, buf).await;
        };
        for (at, len, written) in ov.runs(offset, buf.len() as u64) {
            let dst = &mut buf[(at - offset) as usize..(at - offset + len) as usize];
            if written {
                dst.copy_from_slice(&ov.read(at, len as usize).await?);
            } else {
                self.snapshot.read(at, dst).await?;
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset` into the overlay, merging partial blocks. Caller holds `writing`.
    async fn write_locked(&self, offset: u64, data: &[u8]) -> Result<(), SourceError> {
        let ov = self.overlay()?;
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

    async fn flush_overlay(&self) -> Result<(), SourceError> {
        self.overlay()?.flush().await?;
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
        self.overlay.is_none()
    }
    fn can_flush(&self) -> bool {
        self.overlay.is_some()
    }
    fn can_fua(&self) -> bool {
        self.overlay.is_some()
    }
    fn can_trim(&self) -> bool {
        self.overlay.is_some()
    }
    fn can_write_zeroes(&self) -> bool {
        self.overlay.is_some()
    }
    fn can_multi_conn(&self) -> bool {
        // One snapshot, one overlay: every connection sees every write, and a flush on any
        // connection syncs them all.
        true
    }
    fn can_cache(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        bump(&self.stats.reads);
        self.read_merged(offset, buf).await?;
        add(&self.stats.bytes_read, buf.len() as u64);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        bump(&self.stats.writes);
        {
            let _one = self.writing.lock().await;
            self.write_locked(offset, data).await?;
        }
        if fua {
            self.flush_overlay().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        self.flush_overlay().await
    }

    async fn trim(&self, _offset: u64, _len: u64, fua: bool) -> Result<(), SourceError> {
        bump(&self.stats.requests);
        self.overlay()?;
        if fua {
            self.flush_overlay().await?;
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
        self.overlay()?;
        if flags.fast {
            return Err(SourceError::Unsupported);
        }
        bump(&self.stats.writes);
        let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let mut at = offset;
        let end = offset + len;
        {
            let _one = self.writing.lock().await;
            while at < end {
                let n = (end - at).min(ZERO_CHUNK);
                self.write_locked(at, &zeros[..n as usize]).await?;
                at += n;
            }
        }
        if flags.fua {
            self.flush_overlay().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, SourceError> {
        bump(&self.stats.requests);
        let base = self.snapshot.extents(offset, len);
        let Some(ov) = self.overlay.as_ref() else {
            return Ok(base);
        };
        // Written blocks are data, whatever lies under them.
        let mut out: Vec<Extent> = Vec::new();
        let mut at = offset;
        for e in base {
            let runs = if e.hole && ov.any(at, e.len) {
                ov.runs(at, e.len)
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

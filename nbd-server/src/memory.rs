//! [`MemorySource`]: a sparse, in-memory, writable source.
//!
//! It is the reference source for tests and examples, not for production:
//! contents live in RAM, split into 4 KiB blocks that are allocated on first
//! write. Unallocated blocks read as zeroes and are reported as holes by block
//! status; trim and write-zeroes (without `NO_HOLE`) free whole blocks again.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use async_trait::async_trait;

use crate::error::SourceError;
use crate::source::{BlockSource, Extent, ZeroFlags};

/// Allocation granularity of [`MemorySource`].
pub const MEMORY_BLOCK: u64 = 4096;

/// A sparse in-memory block source (for tests and examples).
#[derive(Debug)]
pub struct MemorySource {
    size: u64,
    read_only: bool,
    blocks: RwLock<Vec<Option<Box<[u8]>>>>,
}

impl MemorySource {
    /// A writable source of `size` bytes, all holes.
    pub fn new(size: u64) -> MemorySource {
        let n = size.div_ceil(MEMORY_BLOCK);
        let n = usize::try_from(n).expect("MemorySource size fits in memory");
        MemorySource {
            size,
            read_only: false,
            blocks: RwLock::new((0..n).map(|_| None).collect()),
        }
    }

    /// A writable source holding `data`; all-zero blocks stay holes.
    pub fn from_bytes(data: &[u8]) -> MemorySource {
        let src = MemorySource::new(data.len() as u64);
        {
            let mut blocks = src.write_blocks();
            for (i, chunk) in data.chunks(MEMORY_BLOCK as usize).enumerate() {
                if chunk.iter().any(|&b| b != 0) {
                    blocks[i] = Some(chunk.to_vec().into_boxed_slice());
                }
            }
        }
        src
    }

    /// The same source, read-only when `read_only` is true.
    pub fn with_read_only(mut self, read_only: bool) -> MemorySource {
        self.read_only = read_only;
        self
    }

    /// A copy of the whole contents (holes as zeroes).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = vec![0u8; usize::try_from(self.size).unwrap_or(usize::MAX)];
        self.read_into(0, &mut out);
        out
    }

    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> usize {
        self.read_blocks().iter().filter(|b| b.is_some()).count()
    }

    fn read_blocks(&self) -> RwLockReadGuard<'_, Vec<Option<Box<[u8]>>>> {
        // A panic while holding the lock cannot leave blocks half-updated in a
        // way that matters for a test source; keep serving.
        self.blocks.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_blocks(&self) -> RwLockWriteGuard<'_, Vec<Option<Box<[u8]>>>> {
        self.blocks.write().unwrap_or_else(|p| p.into_inner())
    }

    fn block_len(&self, index: usize) -> usize {
        let start = index as u64 * MEMORY_BLOCK;
        (self.size - start).min(MEMORY_BLOCK) as usize
    }

    fn read_into(&self, offset: u64, buf: &mut [u8]) {
        let blocks = self.read_blocks();
        let mut pos = offset;
        let mut done = 0usize;
        while done < buf.len() {
            let index = (pos / MEMORY_BLOCK) as usize;
            let within = (pos % MEMORY_BLOCK) as usize;
            let n = (self.block_len(index) - within).min(buf.len() - done);
            let out = &mut buf[done..done + n];
            match &blocks[index] {
                Some(block) => out.copy_from_slice(&block[within..within + n]),
                None => out.fill(0),
            }
            done += n;
            pos += n as u64;
        }
    }

    /// Applies `f(block, range)` to each block piece of `offset..offset+len`;
    /// `whole` tells whether the piece covers its block entirely.
    fn for_each_piece(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&mut Option<Box<[u8]>>, usize, std::ops::Range<usize>, bool),
    ) {
        let mut blocks = self.write_blocks();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let index = (pos / MEMORY_BLOCK) as usize;
            let block_len = self.block_len(index);
            let within = (pos % MEMORY_BLOCK) as usize;
            let n = ((block_len - within) as u64).min(end - pos) as usize;
            let whole = within == 0 && n == block_len;
            f(&mut blocks[index], block_len, within..within + n, whole);
            pos += n as u64;
        }
    }

    fn check_writable(&self) -> Result<(), SourceError> {
        if self.read_only {
            Err(SourceError::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(SourceError::Invalid("range beyond end of export")),
        }
    }
}

#[async_trait]
impl BlockSource for MemorySource {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn can_flush(&self) -> bool {
        true
    }
    fn can_fua(&self) -> bool {
        true
    }
    fn can_trim(&self) -> bool {
        true
    }
    fn can_write_zeroes(&self) -> bool {
        true
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn can_cache(&self) -> bool {
        true
    }

    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        self.check_range(offset, buf.len() as u64)?;
        self.read_into(offset, buf);
        Ok(())
    }

    async fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), SourceError> {
        self.check_writable()?;
        self.check_range(offset, data.len() as u64)?;
        let mut done = 0usize;
        self.for_each_piece(offset, data.len() as u64, |slot, block_len, range, _| {
            let n = range.len();
            let block = slot.get_or_insert_with(|| vec![0u8; block_len].into_boxed_slice());
            block[range].copy_from_slice(&data[done..done + n]);
            done += n;
        });
        Ok(())
    }

    async fn flush(&self) -> Result<(), SourceError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u64, _fua: bool) -> Result<(), SourceError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        // "A server MAY discard len bytes starting at offset, but is not
        // required to": free whole blocks, leave partial ones alone.
        self.for_each_piece(offset, len, |slot, _, _, whole| {
            if whole {
                *slot = None;
            }
        });
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), SourceError> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        self.for_each_piece(offset, len, |slot, block_len, range, whole| {
            if whole && !flags.no_hole {
                *slot = None;
            } else if let Some(block) = slot {
                block[range].fill(0);
            } else if flags.no_hole {
                *slot = Some(vec![0u8; block_len].into_boxed_slice());
            }
        });
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, SourceError> {
        self.check_range(offset, len)?;
        let blocks = self.read_blocks();
        let mut extents: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let index = (pos / MEMORY_BLOCK) as usize;
            let block_end = ((index as u64 + 1) * MEMORY_BLOCK).min(self.size);
            let n = block_end.min(end) - pos;
            let hole = blocks[index].is_none();
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.len += n,
                _ => extents.push(if hole {
                    Extent::hole(n)
                } else {
                    Extent::data(n)
                }),
            }
            pos += n;
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(f)
    }

    #[test]
    fn writes_read_back_across_blocks_and_short_tail() {
        block_on(async {
            let m = MemorySource::new(3 * MEMORY_BLOCK + 100);
            let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8 + 1).collect();
            m.write(4000, &data, false).await.unwrap();
            let mut back = vec![0u8; 5000];
            m.read(4000, &mut back).await.unwrap();
            assert_eq!(back, data);
            m.write(3 * MEMORY_BLOCK + 90, &[9; 10], false)
                .await
                .unwrap();
            assert!(m
                .write(3 * MEMORY_BLOCK + 91, &[9; 10], false)
                .await
                .is_err());
            assert_eq!(m.to_vec()[(3 * MEMORY_BLOCK + 99) as usize], 9);
        });
    }

    #[test]
    fn holes_trim_and_zeroes_are_tracked() {
        block_on(async {
            let m = MemorySource::new(4 * MEMORY_BLOCK);
            m.write(MEMORY_BLOCK, &[1; 4096], false).await.unwrap();
            let st = m.block_status(0, 4 * MEMORY_BLOCK).await.unwrap();
            assert_eq!(
                st,
                vec![
                    Extent::hole(MEMORY_BLOCK),
                    Extent::data(MEMORY_BLOCK),
                    Extent::hole(2 * MEMORY_BLOCK)
                ]
            );
            m.trim(0, 4 * MEMORY_BLOCK, false).await.unwrap();
            assert_eq!(m.allocated_blocks(), 0);
            let nh = ZeroFlags {
                no_hole: true,
                ..ZeroFlags::default()
            };
            m.write_zeroes(0, MEMORY_BLOCK + 1, nh).await.unwrap();
            assert_eq!(m.allocated_blocks(), 2);
            m.write_zeroes(0, 4 * MEMORY_BLOCK, ZeroFlags::default())
                .await
                .unwrap();
            assert_eq!(m.allocated_blocks(), 0);
            assert!(m.to_vec().iter().all(|&b| b == 0));
        });
    }

    #[test]
    fn read_only_refuses_writes() {
        block_on(async {
            let m = MemorySource::from_bytes(&[1, 2, 3]).with_read_only(true);
            assert!(matches!(
                m.write(0, &[0], false).await,
                Err(SourceError::ReadOnly)
            ));
            let mut b = [0u8; 3];
            m.read(0, &mut b).await.unwrap();
            assert_eq!(b, [1, 2, 3]);
        });
    }
}

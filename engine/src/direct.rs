//! Writing a restore target with direct I/O (`O_DIRECT`): stripes go from our buffers to the
//! disk without passing through the page cache.
//!
//! Measured on this project's machines (`bench/restore.sh`): a buffered restore spends as much
//! CPU copying stripes into fresh page-cache pages (and the VM faulting them in) as on decrypting
//! them, and its final `fsync` then writes everything at once. Direct writes overlap the disk with
//! the fetching and skip that copy. `O_DIRECT` needs the buffer address, the length and the file
//! offset aligned to the device's logical block size; [`ALIGN`] (4 KiB) covers every disk we meet.
//! A write that is not aligned (the short last stripe of a volume whose size is not a multiple of
//! 4 KiB) goes through the ordinary descriptor; the caller's final `fsync` covers both.
//! Where the filesystem refuses `O_DIRECT` (tmpfs, some FUSE), every write is buffered.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use sa_core::pool::BufferPool;

/// Alignment of direct writes: address, length and offset.
pub const ALIGN: usize = 4096;

/// A target written directly where it can be, through the page cache where it cannot.
pub struct TargetWriter {
    buffered: Arc<File>,
    direct: Option<File>,
    /// Aligned bounce buffers for data that arrives at an unaligned address.
    bounce: BufferPool,
}

impl TargetWriter {
    /// Writes to `file` (already open), and directly to `path` when it can be opened with
    /// `O_DIRECT`.
    pub fn new(file: Arc<File>, path: &Path) -> Self {
        let direct = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        if direct.is_none() {
            tracing::debug!(
                "{}: no direct I/O here; writing through the page cache",
                path.display()
            );
        }
        TargetWriter {
            buffered: file,
            direct,
            bounce: BufferPool::new(16),
        }
    }

    /// Whether writes can bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Writes all of `data` at `offset`.
    pub fn write_all_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let aligned_range = offset.is_multiple_of(ALIGN as u64) && data.len().is_multiple_of(ALIGN);
        let Some(direct) = self
            .direct
            .as_ref()
            .filter(|_| aligned_range && !data.is_empty())
        else {
            return self.buffered.write_all_at(data, offset);
        };
        if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
            return direct_write(direct, data, offset);
        }
        let mut buf = self.bounce.take(data.len() + ALIGN);
        let skip = misalignment(&buf);
        buf.resize(skip, 0);
        buf.extend_from_slice(data);
        let r = direct_write(direct, &buf[skip..], offset);
        self.bounce.give(buf);
        r
    }
}

impl TargetWriter {
    /// Makes `len` bytes at `offset` read as zeroes (a zero stripe on a block device):
    /// `fallocate(FALLOC_FL_ZERO_RANGE)` where the target takes it (a disk's WRITE ZEROES, or the
    /// kernel writing zeroes for us; a loop device passes it to its backing file), else by
    /// writing zeroes.
    pub fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        if len == 0 || fallocate(&*self.buffered, FallocateFlags::ZERO_RANGE, offset, len).is_ok() {
            return Ok(());
        }
        self.write_all_at(&vec![0u8; len as usize], offset)
    }
}

/// Bytes from the start of `buf`'s allocation to the first [`ALIGN`]ed address in it.
pub fn misalignment(buf: &[u8]) -> usize {
    (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN
}

fn direct_write(f: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    match f.write_all_at(data, offset) {
        // A filesystem may accept the open and refuse the write (EINVAL): say so clearly.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Err(std::io::Error::new(
            e.kind(),
            format!(
                "direct write of {} bytes at {offset} refused: {e}",
                data.len()
            ),
        )),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_unaligned_and_short_writes_land_where_asked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t");
        let file = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap(),
        );
        file.set_len(5 * ALIGN as u64).unwrap();
        let w = TargetWriter::new(file.clone(), &path);
        // An unaligned address (bounced), an aligned range, and a short tail (buffered).
        let mut src = vec![0u8; 2 * ALIGN + 1];
        for (i, b) in src.iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        w.write_all_at(&src[1..], ALIGN as u64).unwrap();
        w.write_all_at(&[7u8; 100], 4 * ALIGN as u64 + 512).unwrap();
        let mut back = vec![0u8; 5 * ALIGN];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[ALIGN..3 * ALIGN], &src[1..]);
        assert!(back[..ALIGN].iter().all(|&b| b == 0));
        assert_eq!(&back[4 * ALIGN + 512..4 * ALIGN + 612], &[7u8; 100][..]);
    }
}

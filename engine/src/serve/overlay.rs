//! The writable overlay: a sparse file holding the blocks written through NBD, at their own
//! offsets, and a map saying which blocks those are.
//!
//! `FILE` is a sparse file of the volume's size; a written block lands at its own offset.
//! `FILE.map` says which [`BLOCK`]-sized blocks of `FILE` hold data: a [`MAP_HEADER_LEN`]-byte
//! header, then a bitmap (bit `b % 8` of byte `b / 8` is block `b`).
//!
//! Map header (little-endian; frozen, version in the header — PLEASE DO NOT MODIFY, add a version):
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `SA-OVMAP` |
//! | 8..10 | format version (1) |
//! | 10..12 | reserved, 0 |
//! | 12..16 | block size (4096) |
//! | 16..24 | volume size in bytes |
//! | 24..56 | snapshot id, ASCII, zero-padded |
//! | 56..4096 | reserved, 0 |
//!
//! The overlay belongs to one snapshot: opening it for another is refused.
//!
//! Durability: writes go to `FILE` at once and set their bits in memory. A flush (or a FUA write)
//! first `fdatasync`s `FILE`, then writes the changed pages of the bitmap and `fdatasync`s
//! `FILE.map`, and only then answers. So after a crash the map never names a block whose data
//! did not reach the disk: a block written but not flushed reads as it did before (from the
//! snapshot, or its previous flushed contents), which is what NBD promises for unflushed writes.
//! A new map is made under a temporary name and renamed into place.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, IoContext, Result};

/// Bytes per overlay block: the unit of the map.
pub const BLOCK: u64 = 4096;
/// Bytes before the bitmap in the map file.
pub const MAP_HEADER_LEN: u64 = 4096;
/// Magic at the start of a map file.
pub const MAP_MAGIC: [u8; 8] = *b"SA-OVMAP";
/// Current map format version.
pub const MAP_VERSION: u16 = 1;
/// Bytes of bitmap written back as one unit.
const MAP_PAGE: u64 = 4096;
/// Room for the snapshot id in the header.
const ID_LEN: usize = 32;
const HEADER_USED: usize = 24 + ID_LEN;
const _: () = assert!(HEADER_USED as u64 <= MAP_HEADER_LEN);

/// A writable overlay over a volume of fixed size.
pub struct Overlay {
    data: Arc<File>,
    map: Arc<File>,
    path: PathBuf,
    size: u64,
    bits: Vec<AtomicU64>,
    /// Bitmap pages changed since the last flush.
    dirty: Mutex<BTreeSet<u64>>,
    /// One flush at a time.
    flushing: tokio::sync::Mutex<()>,
}

/// `FILE.map` for an overlay `FILE`.
pub fn map_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".map");
    path.with_file_name(name)
}

fn header(size: u64, snapshot: &str) -> Vec<u8> {
    let mut h = vec![0u8; MAP_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&MAP_MAGIC);
    h[8..10].copy_from_slice(&MAP_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..24 + snapshot.len()].copy_from_slice(snapshot.as_bytes());
    h
}

impl Overlay {
    /// Opens the overlay at `path` for snapshot `snapshot` of `size` bytes, or makes a new one.
    pub fn open(path: &Path, size: u64, snapshot: &str) -> Result<Overlay> {
        if snapshot.len() > ID_LEN {
            return Err(Error::invalid(format!(
                "snapshot id {snapshot:?} is too long for an overlay map"
            )));
        }
        let mp = map_path(path);
        let blocks = size.div_ceil(BLOCK);
        let words = blocks.div_ceil(64) as usize;
        let map_bytes = words as u64 * 8;
        if !mp.exists() {
            if path.exists()
                && std::fs::metadata(path)
                    .map(|m| m.len() > 0)
                    .unwrap_or(false)
            {
                return Err(Error::invalid(format!(
                    "{} exists but its map {} does not: it is not an overlay made by `sa-image serve` \
                     (give another --overlay path, or remove the file to start an empty overlay)",
                    path.display(),
                    mp.display()
                )));
            }
            create_map(&mp, &header(size, snapshot), map_bytes)?;
        }
        let map = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mp)
            .ctx(|| format!("cannot open overlay map {}", mp.display()))?;
        let mut head = vec![0u8; MAP_HEADER_LEN as usize];
        map.read_exact_at(&mut head, 0).ctx(|| {
            format!(
                "overlay map {} is too short: not a map, or damaged",
                mp.display()
            )
        })?;
        if head[0..8] != MAP_MAGIC {
            return Err(Error::invalid(format!(
                "{} is not an overlay map (bad magic)",
                mp.display()
            )));
        }
        let version = u16::from_le_bytes([head[8], head[9]]);
        if version != MAP_VERSION {
            return Err(Error::invalid(format!(
                "overlay map {} has format version {version}; this sa-image reads version {MAP_VERSION}",
                mp.display()
            )));
        }
        let block = u32::from_le_bytes([head[12], head[13], head[14], head[15]]) as u64;
        let vsize = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
        let id_end = head[24..24 + ID_LEN]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ID_LEN);
        let id = String::from_utf8_lossy(&head[24..24 + id_end]).into_owned();
        if block != BLOCK || vsize != size {
            return Err(Error::invalid(format!(
                "overlay map {} is for a volume of {vsize} bytes in {block}-byte blocks, not {size} in {BLOCK}",
                mp.display()
            )));
        }
        if id != snapshot {
            return Err(Error::invalid(format!(
                "overlay {} holds writes made over snapshot {id}, not {snapshot}: serve that snapshot, or give another --overlay path",
                path.display()
            )));
        }
        let mut raw = vec![0u8; map_bytes as usize];
        map.read_exact_at(&mut raw, MAP_HEADER_LEN)
            .ctx(|| format!("overlay map {} is truncated", mp.display()))?;
        let bits: Vec<AtomicU64> = raw
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap_or_default())))
            .collect();
        let any = bits.iter().any(|w| w.load(Ordering::Relaxed) != 0);
        if !path.exists() && any {
            return Err(Error::invalid(format!(
                "overlay {} is gone but its map {} names written blocks: the writes are lost; remove the map to start an empty overlay",
                path.display(),
                mp.display()
            )));
        }
        let data = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .ctx(|| format!("cannot open overlay {}", path.display()))?;
        let len = data
            .metadata()
            .ctx(|| format!("cannot read the size of overlay {}", path.display()))?
            .len();
        if len < size {
            data.set_len(size)
                .and_then(|()| data.sync_all())
                .ctx(|| format!("cannot size overlay {}", path.display()))?;
        }
        Ok(Overlay {
            data: Arc::new(data),
            map: Arc::new(map),
            path: path.to_path_buf(),
            size,
            bits,
            dirty: Mutex::new(BTreeSet::new()),
            flushing: tokio::sync::Mutex::new(()),
        })
    }

    /// The overlay file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks written (as the map says, flushed or not).
    pub fn written_blocks(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// Whether block `b` holds written data.
    pub fn has(&self, b: u64) -> bool {
        self.bits
            .get((b / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (b % 64)) != 0)
    }

    /// Whether any block touching `offset..offset + len` holds written data.
    pub fn any(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let (first, last) = (offset / BLOCK, (offset + len - 1) / BLOCK);
        let mut b = first;
        while b <= last {
            let w = self
                .bits
                .get((b / 64) as usize)
                .map_or(0, |w| w.load(Ordering::Relaxed));
            if b % 64 == 0 && b + 63 <= last {
                if w != 0 {
                    return true;
                }
                b += 64;
            } else {
                if w & (1 << (b % 64)) != 0 {
                    return true;
                }
                b += 1;
            }
        }
        false
    }

    /// Cuts `offset..offset + len` into runs `(offset, len, written)`: written runs come from the
    /// overlay, the others from the snapshot.
    pub fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let b = at / BLOCK;
            let n = ((b + 1) * BLOCK).min(end) - at;
            let w = self.has(b);
            match out.last_mut() {
                Some(last) if last.2 == w => last.1 += n,
                _ => out.push((at, n, w)),
            }
            at += n;
        }
        out
    }

    /// Reads `len` bytes of the overlay file at `offset` (only meaningful where written).
    pub async fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let f = self.data.clone();
        blocking(move || {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    /// Writes whole blocks: `data` starts at a block boundary and ends at one (or at the end of
    /// the volume). Marks them written once the data is in the file.
    pub async fn write_blocks(&self, offset: u64, data: Vec<u8>) -> std::io::Result<()> {
        debug_assert_eq!(offset % BLOCK, 0);
        let end = offset + data.len() as u64;
        debug_assert_eq!(
            if end == self.size { 0 } else { end % BLOCK },
            0,
            "write ends inside a block"
        );
        if data.is_empty() {
            return Ok(());
        }
        let f = self.data.clone();
        blocking(move || f.write_all_at(&data, offset)).await?;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let mut pages = BTreeSet::new();
        for b in first..=last {
            if let Some(w) = self.bits.get((b / 64) as usize) {
                w.fetch_or(1 << (b % 64), Ordering::Relaxed);
            }
            pages.insert(b / 8 / MAP_PAGE);
        }
        self.dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(pages);
        Ok(())
    }

    /// Makes every write that has returned durable: the data, then the map.
    pub async fn flush(&self) -> std::io::Result<()> {
        let _one = self.flushing.lock().await;
        let pages: Vec<u64> =
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|p| p.into_inner()))
                .into_iter()
                .collect();
        let mut chunks = Vec::with_capacity(pages.len());
        for &p in &pages {
            let first_word = (p * MAP_PAGE / 8) as usize;
            let last_word = (first_word + (MAP_PAGE / 8) as usize).min(self.bits.len());
            let bytes: Vec<u8> = self.bits[first_word..last_word]
                .iter()
                .flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes())
                .collect();
            chunks.push((MAP_HEADER_LEN + p * MAP_PAGE, bytes));
        }
        let (data, map) = (self.data.clone(), self.map.clone());
        let result = blocking(move || {
            data.sync_data()?;
            if !chunks.is_empty() {
                for (off, bytes) in &chunks {
                    map.write_all_at(bytes, *off)?;
                }
                map.sync_data()?;
            }
            Ok(())
        })
        .await;
        if result.is_err() {
            // Written again by the next flush.
            self.dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(pages);
        }
        result
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e)),
    }
}

/// Writes a fresh map (header + empty bitmap) under a temporary name, syncs it, renames it
/// into place and syncs the directory.
fn create_map(mp: &Path, head: &[u8], map_bytes: u64) -> Result<()> {
    sa_core::durable::create_with(
        mp,
        sa_core::durable::Access::Shared,
        sa_core::durable::Replace::No,
        |f| {
            f.write_all_at(head, 0)?;
            f.set_len(MAP_HEADER_LEN + map_bytes)
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn writes_survive_reopen_only_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ov");
        let size = 10 * BLOCK + 512;
        let o = Overlay::open(&path, size, "abcd").unwrap();
        o.write_blocks(BLOCK, vec![1; 2 * BLOCK as usize])
            .await
            .unwrap();
        assert!(o.has(1) && o.has(2) && !o.has(0) && !o.has(3));
        assert!(o.any(BLOCK * 2 + 100, 1) && !o.any(3 * BLOCK, BLOCK));
        assert_eq!(
            o.runs(0, 4 * BLOCK),
            vec![
                (0, BLOCK, false),
                (BLOCK, 2 * BLOCK, true),
                (3 * BLOCK, BLOCK, false)
            ]
        );
        drop(o);
        // Not flushed: the map on disk does not have them.
        let o = Overlay::open(&path, size, "abcd").unwrap();
        assert_eq!(o.written_blocks(), 0);
        o.write_blocks(BLOCK, vec![1; 2 * BLOCK as usize])
            .await
            .unwrap();
        o.write_blocks(10 * BLOCK, vec![2; 512]).await.unwrap();
        o.flush().await.unwrap();
        drop(o);
        let o = Overlay::open(&path, size, "abcd").unwrap();
        assert_eq!(o.written_blocks(), 3);
        assert_eq!(o.read(10 * BLOCK, 512).await.unwrap(), vec![2; 512]);
        assert!(Overlay::open(&path, size, "other").is_err());
        assert!(Overlay::open(&path, size + 512, "abcd").is_err());
    }

    #[test]
    fn refuses_a_file_without_map() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        std::fs::write(&path, b"precious").unwrap();
        assert!(Overlay::open(&path, 1 << 20, "abcd").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    }
}

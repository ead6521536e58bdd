//! The live-restore state file: which stripes of the target are filled from the snapshot, and
//! which blocks of it were written through NBD. The format and the ordering rules are described
//! in [`super`] (the `hydrate` module header).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, IoContext, Result};

use crate::serve::overlay::BLOCK;

/// Magic at the start of a state file.
pub const STATE_MAGIC: [u8; 8] = *b"SA-HYDRT";
/// Current state format version.
pub const STATE_VERSION: u16 = 1;
/// Bytes before the first bitmap; each bitmap also starts at a multiple of this.
pub const STATE_HEADER_LEN: u64 = 4096;
/// Header flag: the target read as zeroes everywhere when hydration began (a file `serve`
/// created), so zero stripes need no write.
pub const FLAG_TARGET_ZEROED: u16 = 1;
/// Bytes of bitmap written back as one unit (and the alignment of each bitmap).
const PAGE: u64 = 4096;
/// Room for the snapshot id in the header.
const ID_LEN: usize = 32;
const ID_AT: usize = 32;
const _: () = assert!((ID_AT + ID_LEN) as u64 <= STATE_HEADER_LEN);

/// A bitmap held in memory as atomic words, stored at `base` in the state file, with the pages
/// changed since the last flush.
pub struct Bits {
    words: Vec<AtomicU64>,
    base: u64,
    dirty: Mutex<BTreeSet<u64>>,
}

impl Bits {
    fn new(raw: &[u8], base: u64) -> Bits {
        Bits {
            words: raw
                .chunks_exact(8)
                .map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().unwrap_or_default())))
                .collect(),
            base,
            dirty: Mutex::new(BTreeSet::new()),
        }
    }

    /// Whether bit `i` is set.
    pub fn get(&self, i: u64) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (i % 64)) != 0)
    }

    /// Sets bits `first..=last` (in memory; on disk at the next flush).
    pub fn set_range(&self, first: u64, last: u64) {
        let mut pages = BTreeSet::new();
        for i in first..=last {
            if let Some(w) = self.words.get((i / 64) as usize) {
                w.fetch_or(1 << (i % 64), Ordering::Release);
            }
            pages.insert(i / 8 / PAGE);
        }
        lock(&self.dirty).extend(pages);
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
            .sum()
    }

    /// Takes the dirty pages, as `(file offset, bytes)` to write.
    fn take_dirty(&self) -> (Vec<u64>, Vec<(u64, Vec<u8>)>) {
        let pages: Vec<u64> = std::mem::take(&mut *lock(&self.dirty))
            .into_iter()
            .collect();
        let chunks = pages
            .iter()
            .map(|&p| {
                let first = (p * PAGE / 8) as usize;
                let last = (first + (PAGE / 8) as usize).min(self.words.len());
                let bytes: Vec<u8> = self.words[first..last]
                    .iter()
                    .flat_map(|w| w.load(Ordering::Acquire).to_le_bytes())
                    .collect();
                (self.base + p * PAGE, bytes)
            })
            .collect();
        (pages, chunks)
    }

    fn redirty(&self, pages: Vec<u64>) {
        lock(&self.dirty).extend(pages);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a state file's two bitmaps lie: `(stripe bitmap offset, bytes, block bitmap offset,
/// bytes)`.
fn geometry(size: u64, stripe_size: u32) -> (u64, u64, u64, u64) {
    let stripes = size.div_ceil(stripe_size as u64);
    let blocks = size.div_ceil(BLOCK);
    let s_bytes = stripes.div_ceil(64) * 8;
    let b_bytes = blocks.div_ceil(64) * 8;
    let s_at = STATE_HEADER_LEN;
    let b_at = s_at + s_bytes.div_ceil(PAGE) * PAGE;
    (s_at, s_bytes, b_at, b_bytes)
}

fn header(size: u64, stripe_size: u32, snapshot: &str, flags: u16) -> Vec<u8> {
    let mut h = vec![0u8; STATE_HEADER_LEN as usize];
    h[0..8].copy_from_slice(&STATE_MAGIC);
    h[8..10].copy_from_slice(&STATE_VERSION.to_le_bytes());
    h[10..12].copy_from_slice(&flags.to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h[24..28].copy_from_slice(&stripe_size.to_le_bytes());
    h[ID_AT..ID_AT + snapshot.len()].copy_from_slice(snapshot.as_bytes());
    h
}

/// The progress of one live restore, in memory and in its state file.
pub struct State {
    file: Arc<File>,
    path: PathBuf,
    /// Stripes whose unwritten blocks hold the snapshot's bytes on the target.
    pub filled: Bits,
    /// Blocks written through NBD.
    pub written: Bits,
    flags: u16,
    /// One flush at a time.
    flushing: tokio::sync::Mutex<()>,
}

impl State {
    /// Whether a state file exists at `path`.
    pub fn exists(path: &Path) -> bool {
        path.exists()
    }

    /// Makes a fresh state file at `path` (temp file, fsync, rename, fsync directory).
    pub fn create(
        path: &Path,
        size: u64,
        stripe_size: u32,
        snapshot: &str,
        flags: u16,
    ) -> Result<()> {
        if snapshot.len() > ID_LEN {
            return Err(Error::invalid(format!(
                "snapshot id {snapshot:?} is too long for a hydrate state file"
            )));
        }
        let (_, _, b_at, b_bytes) = geometry(size, stripe_size);
        let head = header(size, stripe_size, snapshot, flags);
        sa_core::durable::create_with(
            path,
            sa_core::durable::Access::Shared,
            sa_core::durable::Replace::No,
            |f| {
                f.write_all_at(&head, 0)?;
                f.set_len(b_at + b_bytes)
            },
        )?;
        Ok(())
    }

    /// Opens the state file at `path`, checking it belongs to `snapshot` of `size` bytes in
    /// stripes of `stripe_size`.
    pub fn open(path: &Path, size: u64, stripe_size: u32, snapshot: &str) -> Result<State> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .ctx(|| format!("cannot open hydrate state {}", path.display()))?;
        let mut head = vec![0u8; STATE_HEADER_LEN as usize];
        file.read_exact_at(&mut head, 0).ctx(|| {
            format!(
                "hydrate state {} is too short: not a state file, or damaged",
                path.display()
            )
        })?;
        if head[0..8] != STATE_MAGIC {
            return Err(Error::invalid(format!(
                "{} is not a hydrate state file (bad magic)",
                path.display()
            )));
        }
        let version = u16::from_le_bytes([head[8], head[9]]);
        if version != STATE_VERSION {
            return Err(Error::invalid(format!(
                "hydrate state {} has format version {version}; this sa-image reads version {STATE_VERSION}",
                path.display()
            )));
        }
        let flags = u16::from_le_bytes([head[10], head[11]]);
        let block = u32::from_le_bytes(head[12..16].try_into().unwrap_or_default()) as u64;
        let vsize = u64::from_le_bytes(head[16..24].try_into().unwrap_or_default());
        let ssize = u32::from_le_bytes(head[24..28].try_into().unwrap_or_default());
        let id_end = head[ID_AT..ID_AT + ID_LEN]
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(ID_LEN);
        let id = String::from_utf8_lossy(&head[ID_AT..ID_AT + id_end]).into_owned();
        if block != BLOCK || vsize != size || ssize != stripe_size {
            return Err(Error::invalid(format!(
                "hydrate state {} is for a volume of {vsize} bytes in {ssize}-byte stripes and {block}-byte blocks, \
                 not {size} in {stripe_size} and {BLOCK}",
                path.display()
            )));
        }
        if id != snapshot {
            return Err(Error::invalid(format!(
                "hydrate state {} belongs to a live restore of snapshot {id}, not {snapshot}: serve that snapshot, \
                 or give another target (and state file)",
                path.display()
            )));
        }
        let (s_at, s_bytes, b_at, b_bytes) = geometry(size, stripe_size);
        let mut s_raw = vec![0u8; s_bytes as usize];
        let mut b_raw = vec![0u8; b_bytes as usize];
        file.read_exact_at(&mut s_raw, s_at)
            .and_then(|()| file.read_exact_at(&mut b_raw, b_at))
            .ctx(|| format!("hydrate state {} is truncated", path.display()))?;
        Ok(State {
            file: Arc::new(file),
            path: path.to_path_buf(),
            filled: Bits::new(&s_raw, s_at),
            written: Bits::new(&b_raw, b_at),
            flags,
            flushing: tokio::sync::Mutex::new(()),
        })
    }

    /// The state file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the target read as zeroes when hydration began.
    pub fn target_zeroed(&self) -> bool {
        self.flags & FLAG_TARGET_ZEROED != 0
    }

    /// Makes the target's data durable, then writes the changed bitmap pages and syncs the state
    /// file: a bit on disk never names data that is not on the target's disk.
    pub async fn flush(&self, target: &Arc<File>) -> std::io::Result<()> {
        let _one = self.flushing.lock().await;
        // Taken before the target's sync: every bit read here was set after its data was
        // written, so that sync covers it.
        let (s_pages, mut chunks) = self.filled.take_dirty();
        let (b_pages, b_chunks) = self.written.take_dirty();
        chunks.extend(b_chunks);
        let (data, state) = (target.clone(), self.file.clone());
        let result = match tokio::task::spawn_blocking(move || {
            data.sync_data()?;
            if !chunks.is_empty() {
                for (off, bytes) in &chunks {
                    state.write_all_at(bytes, *off)?;
                }
                state.sync_data()?;
            }
            Ok(())
        })
        .await
        {
            Ok(r) => r,
            Err(e) => Err(std::io::Error::other(e)),
        };
        if result.is_err() {
            // Written again by the next flush.
            self.filled.redirty(s_pages);
            self.written.redirty(b_pages);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bits_survive_reopen_only_after_flush() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.hydrate");
        let target = Arc::new(File::create(dir.path().join("t")).unwrap());
        let size = 100 * (1 << 20) + 4096;
        State::create(&path, size, 4 << 20, "abcd", FLAG_TARGET_ZEROED).unwrap();
        let s = State::open(&path, size, 4 << 20, "abcd").unwrap();
        assert!(s.target_zeroed());
        s.filled.set_range(3, 3);
        s.written.set_range(20_000, 20_010);
        assert!(s.filled.get(3) && !s.filled.get(2) && s.written.get(20_005));
        drop(s);
        let s = State::open(&path, size, 4 << 20, "abcd").unwrap();
        assert_eq!((s.filled.count(), s.written.count()), (0, 0));
        s.filled.set_range(3, 3);
        s.filled.set_range(25, 25);
        s.written.set_range(20_000, 20_010);
        s.flush(&target).await.unwrap();
        drop(s);
        let s = State::open(&path, size, 4 << 20, "abcd").unwrap();
        assert_eq!((s.filled.count(), s.written.count()), (2, 11));
        assert!(s.filled.get(25) && s.written.get(20_010) && !s.written.get(20_011));
        assert!(State::open(&path, size, 4 << 20, "other").is_err());
        assert!(State::open(&path, size + 4096, 4 << 20, "abcd").is_err());
        assert!(State::open(&path, size, 1 << 20, "abcd").is_err());
    }
}

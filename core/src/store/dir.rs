//! A store in a local directory: what `shard-agent` serves, and usable directly (tests, a USB disk).
//!
//! Layout under the root:
//! ```text
//! agent-id          16 random bytes (hex), made on first start: the agent's stable id
//! lock              locked while a process has the store open (empty)
//! shards/VOL/SS/ID.N  shard files (see crate::shard), names made here from the key, never from the wire
//! blobs/NAME        catalog blobs (names checked: [A-Za-z0-9._-], no leading dot)
//! tmp/              files being written; emptied at start
//! quarantine/VOL.ID.N.T  shard files a scrub found bad (T: when, Unix ns); never deleted here
//! ```
//! Crash safety: a file is written under `tmp/`, then renamed into place, so it is visible only
//! whole. Blobs are `fsync`ed before the rename and made durable at once. Shards are made durable
//! in groups (`dir/pending.rs`): at [`DirStore::sync_blocking`] (the agent's `SYNC`) or when a
//! group is full, whichever comes first; a torn shard left by a crash before its group fails its
//! crc32c wherever it is met.
//! Uses only portable `std` (agents run on Windows and macOS desk PCs too); where the OSes
//! differ is in one place, `dir/files.rs`.
//!
//! Limits ([`Limits`], [`space`]): a quota of stored bytes, and a floor of free space on the
//! filesystem ([`MinFree`]) that a shard write never crosses, so an agent cannot fill a desk PC's
//! disk. Catalog blobs count against the quota but not the floor: every agent must hold the
//! catalog (a snapshot's lease and records, kilobytes to a few MiB), or no snapshot could run
//! while one agent sits at its floor.
//! One process per directory: `lock` is held while the store is open (`dir/lock.rs`; a second one gets
//! [`Error::InUse`]).
//!
//! Garbage collection support: a shard file's modification time is its "age" ([`ShardEntry`]).
//! Storing a shard that is already stored byte for byte keeps the file but refreshes its time,
//! so a collector's grace period protects every shard a running snapshot has (re)stored.
//! [`DirStore::sweep_blocking`] deletes only files older than the age it is given, each check
//! and delete under a write lock that every store takes for reading: a shard cannot be
//! refreshed between the check and the delete.
//!
//! Scrub support: [`DirStore::check_stored_blocking`] checks one stored file's crc32c values
//! without any key, and [`DirStore::quarantine_blocking`] moves a bad one out of `shards/` (under
//! the same exclusive lock, after checking again, so a sound copy stored meanwhile by a repair is
//! never moved). A quarantined file no longer counts as a shard nor against the quota; it stays
//! for the PC's owner (or a forensic look) to delete. The agent's scrub task drives these.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::keys::{hex, random_bytes, unhex};
use crate::shard::{check_shard, ShardKey, SHARD_HEADER_LEN};
use crate::store::StoreStat;
use crate::wire::{ShardEntry, SweepStats};

mod files;
mod lock;
mod pending;
mod scrub;
pub mod space;
mod traits;

use files::{
    dir_usage, full_if_no_space, io, read_file, read_or_missing, sync_dir, touch, write_durable,
    write_unsynced,
};
pub use lock::LOCK_FILE;
use pending::Pending;
pub use pending::{GROUP_BYTES, GROUP_FILES};
pub use space::{Limits, MinFree};

/// What a scrub found in one stored shard file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// Sound: header and payload crc32c match, and it is the shard its name says; its length.
    Sound(u64),
    /// No such file (deleted or replaced meanwhile).
    Missing,
    /// Bad, and why.
    Bad(String),
}

/// A shard store in a directory.
#[derive(Clone)]
pub struct DirStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    quota: u64,
    floor: space::Floor,
    agent_id: [u8; 16],
    used: AtomicU64,
    shards: AtomicU64,
    tmp_seq: AtomicU64,
    /// Shard files written since their last group was made durable (`dir/pending.rs`).
    pending: Mutex<Pending>,
    /// Read by every shard store, written by each sweep delete (see the module docs).
    sweep_lock: RwLock<()>,
    /// Held while the store is open (one process per directory).
    _lock: lock::DirLock,
}

/// Checks a blob name from the wire: no separators, no `..`, no hidden files.
pub fn check_blob_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::Invalid(format!("invalid blob name {name:?}")))
    }
}

impl DirStore {
    /// Opens (creating if needed) a store at `root`; `quota` in bytes, 0 for none; no floor.
    pub fn open(root: &Path, quota: u64) -> Result<Self> {
        Self::open_with(root, Limits::quota_only(quota))
    }

    /// Opens (creating if needed) a store at `root` within `limits`; fails with
    /// [`Error::InUse`] while another process has it open.
    pub fn open_with(root: &Path, limits: Limits) -> Result<Self> {
        for sub in ["shards", "blobs", "tmp"] {
            fs::create_dir_all(root.join(sub))
                .map_err(io(format!("cannot create {}", root.join(sub).display())))?;
        }
        let lock = lock::DirLock::take(root)?;
        let floor = space::Floor::new(limits.min_free.resolve(root)?, limits.min_free);
        let id_path = root.join("agent-id");
        let agent_id = match fs::read_to_string(&id_path) {
            Ok(text) => {
                let b = unhex(text.trim())
                    .filter(|b| b.len() == 16)
                    .ok_or_else(|| {
                        Error::malformed(
                            "agent-id file",
                            format!("{} does not hold 32 hex digits", id_path.display()),
                        )
                    })?;
                let mut id = [0u8; 16];
                id.copy_from_slice(&b);
                id
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                let id: [u8; 16] = random_bytes();
                write_durable(
                    root,
                    &root.join("tmp").join("agent-id.new"),
                    &id_path,
                    hex(&id).as_bytes(),
                )?;
                id
            }
            Err(e) => return Err(Error::io(format!("cannot read {}", id_path.display()), e)),
        };
        // Leftovers of writes interrupted by a crash are never visible; remove them.
        if let Ok(entries) = fs::read_dir(root.join("tmp")) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let (used_shards, count) = dir_usage(&root.join("shards"))?;
        let (used_blobs, _) = dir_usage(&root.join("blobs"))?;
        Ok(DirStore {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                quota: limits.quota,
                floor,
                agent_id,
                used: AtomicU64::new(used_shards + used_blobs),
                shards: AtomicU64::new(count),
                tmp_seq: AtomicU64::new(0),
                pending: Mutex::new(Pending::default()),
                sweep_lock: RwLock::new(()),
                _lock: lock,
            }),
        })
    }

    /// The agent's stable id.
    pub fn agent_id(&self) -> [u8; 16] {
        self.inner.agent_id
    }

    /// Free bytes this store leaves on its filesystem (its floor; 0 for none).
    pub fn floor(&self) -> u64 {
        self.inner.floor.bytes
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn shard_path(&self, key: &ShardKey) -> PathBuf {
        self.inner.root.join("shards").join(key.rel_path())
    }

    fn tmp_path(&self) -> PathBuf {
        let n = self.inner.tmp_seq.fetch_add(1, Ordering::Relaxed);
        self.inner
            .root
            .join("tmp")
            .join(format!("w{}-{n}", std::process::id()))
    }

    /// Held by stores of a shard: excludes a sweep's check-and-delete of the same files.
    fn sweep_shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.inner
            .sweep_lock
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Held by a sweep or a quarantine while it checks and removes files.
    fn sweep_exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.inner
            .sweep_lock
            .write()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Records a shard file written or re-stored at `path` for the next durable group, and makes
    /// the group durable now when it is full.
    fn mark_dirty(&self, path: &Path, len: u64) -> Result<()> {
        let full = self.pending().add(path, len);
        if full {
            self.sync_blocking()?;
        }
        Ok(())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.inner.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves `len` bytes of quota, or fails with [`Error::Full`].
    fn reserve(&self, len: u64) -> Result<()> {
        let prev = self.inner.used.fetch_add(len, Ordering::SeqCst);
        if self.inner.quota > 0 && prev + len > self.inner.quota {
            self.inner.used.fetch_sub(len, Ordering::SeqCst);
            return Err(Error::Full(format!(
                "quota of {} bytes reached ({} used): raise the agent's --quota, free space, or add agents",
                self.inner.quota, prev
            )));
        }
        Ok(())
    }

    fn release(&self, len: u64) {
        self.inner.used.fetch_sub(len, Ordering::SeqCst);
    }

    /// Stores a shard file after checking that it is a sound shard for `key`.
    pub fn put_shard_blocking(&self, key: &ShardKey, file: &[u8]) -> Result<()> {
        let h = check_shard(file)?;
        if h.key != *key {
            return Err(Error::Invalid(format!(
                "shard file is {} but was sent as {}",
                h.key.short(),
                key.short()
            )));
        }
        let path = self.shard_path(key);
        let _sweep = self.sweep_shared();
        let old = fs::symlink_metadata(&path).map(|m| m.len()).ok();
        // Encryption is deterministic, so a re-sent shard (a resumed or repeated snapshot) is
        // byte-identical to the stored one: keep the stored, already durable file rather than
        // replacing it, but refresh its time (it is young again for the garbage collector).
        // A stored copy that differs (corrupt) is replaced.
        if old == Some(file.len() as u64) && read_file(&path).is_ok_and(|stored| stored == file) {
            touch(&path)?;
            return self.mark_dirty(&path, 0);
        }
        let (len, old_len) = (file.len() as u64, old.unwrap_or(0));
        // Only growth counts against the quota: re-sending a shard replaces it.
        // The floor of free space: the ticket counts this write as in flight until dropped.
        let _writing = self.inner.floor.admit(&self.inner.root, len)?;
        self.reserve(len.saturating_sub(old_len))?;
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let result = (|| {
            fs::create_dir_all(&dir).map_err(io(format!("cannot create {}", dir.display())))?;
            let tmp = self.tmp_path();
            write_unsynced(&tmp, file)?;
            fs::rename(&tmp, &path).map_err(io(format!("cannot rename into {}", path.display())))
        })();
        match result {
            Ok(()) => {
                self.release(old_len.saturating_sub(len));
                if old.is_none() {
                    self.inner.shards.fetch_add(1, Ordering::Relaxed);
                }
                self.mark_dirty(&path, len)
            }
            Err(e) => {
                self.release(len.saturating_sub(old_len));
                Err(full_if_no_space(e))
            }
        }
    }

    /// Reads a shard file.
    pub fn get_shard_blocking(&self, key: &ShardKey) -> Result<Vec<u8>> {
        read_or_missing(&self.shard_path(key))
    }

    /// Reads bytes `offset..offset + len` of a shard's payload, after checking its header: that
    /// it is sound, names `key`, and that the range lies inside the payload. The payload's crc
    /// is not checked (that would mean reading all of it): the reader checks these bytes itself.
    pub fn get_range_blocking(&self, key: &ShardKey, offset: u32, len: u32) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.shard_path(key);
        let mut f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::ShardMissing),
            Err(e) => return Err(Error::io(format!("cannot open {}", path.display()), e)),
        };
        let read = |f: &mut fs::File, buf: &mut [u8]| {
            f.read_exact(buf).map_err(|e| {
                if e.kind() == ErrorKind::UnexpectedEof {
                    Error::ShardCorrupt(format!("{} is cut short", key.short()))
                } else {
                    Error::io(format!("cannot read {}", path.display()), e)
                }
            })
        };
        let mut header = [0u8; SHARD_HEADER_LEN];
        read(&mut f, &mut header)?;
        let h = crate::shard::parse_header(&header)?;
        if h.key != *key {
            return Err(Error::ShardCorrupt(format!(
                "{} holds shard {}",
                key.short(),
                h.key.short()
            )));
        }
        if offset as u64 + len as u64 > h.payload_len as u64 {
            return Err(Error::Invalid(format!(
                "range {offset}+{len} lies outside the {}-byte payload of shard {}",
                h.payload_len,
                key.short()
            )));
        }
        f.seek(SeekFrom::Start((SHARD_HEADER_LEN + offset as usize) as u64))
            .map_err(|e| Error::io(format!("cannot seek in {}", path.display()), e))?;
        let mut out = crate::pool::frames().take(len as usize);
        out.resize(len as usize, 0);
        read(&mut f, &mut out)?;
        Ok(out)
    }

    /// Keeps a stored shard instead of receiving it again: true when a sound shard file with
    /// exactly `header` is stored for `key` (its time is refreshed and the next sync makes it
    /// durable, as if it had just been written), false when missing or different or corrupt.
    pub fn confirm_shard_blocking(&self, key: &ShardKey, header: &[u8]) -> Result<bool> {
        let path = self.shard_path(key);
        let _sweep = self.sweep_shared();
        let stored = match read_or_missing(&path) {
            Ok(b) => b,
            Err(Error::ShardMissing) => return Ok(false),
            Err(e) => return Err(e),
        };
        let sound = check_shard(&stored).is_ok_and(|h| h.key == *key);
        if !sound || stored.get(..header.len()) != Some(header) {
            return Ok(false);
        }
        touch(&path)?;
        self.mark_dirty(&path, 0)?;
        Ok(true)
    }

    /// Deletes a shard file.
    pub fn delete_shard_blocking(&self, key: &ShardKey) -> Result<()> {
        let path = self.shard_path(key);
        if let Ok(meta) = fs::symlink_metadata(&path) {
            fs::remove_file(&path).map_err(io(format!("cannot delete {}", path.display())))?;
            self.release(meta.len());
            self.inner.shards.fetch_sub(1, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Stores a blob durably (temp, fsync, rename, fsync dir).
    pub fn put_blob_blocking(&self, name: &str, data: &[u8]) -> Result<()> {
        check_blob_name(name)?;
        let path = self.inner.root.join("blobs").join(name);
        let old = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let len = data.len() as u64;
        // No floor for catalog blobs: every agent must hold the catalog, and it is small.
        self.reserve(len.saturating_sub(old))?;
        match write_durable(
            &self.inner.root.join("blobs"),
            &self.tmp_path(),
            &path,
            data,
        ) {
            Ok(()) => {
                self.release(old.saturating_sub(len));
                Ok(())
            }
            Err(e) => {
                self.release(len.saturating_sub(old));
                Err(full_if_no_space(e))
            }
        }
    }

    /// Reads a blob.
    pub fn get_blob_blocking(&self, name: &str) -> Result<Vec<u8>> {
        check_blob_name(name)?;
        read_or_missing(&self.inner.root.join("blobs").join(name))
    }

    /// Lists blob names with a prefix, sorted.
    pub fn list_blobs_blocking(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.inner.root.join("blobs");
        let mut names = Vec::new();
        for e in fs::read_dir(&dir).map_err(io(format!("cannot list {}", dir.display())))? {
            let e = e.map_err(io("cannot list blobs"))?;
            if let Some(name) = e.file_name().to_str() {
                if name.starts_with(prefix) && check_blob_name(name).is_ok() {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Deletes a blob durably.
    pub fn delete_blob_blocking(&self, name: &str) -> Result<()> {
        check_blob_name(name)?;
        let dir = self.inner.root.join("blobs");
        let path = dir.join(name);
        if let Ok(meta) = fs::symlink_metadata(&path) {
            fs::remove_file(&path).map_err(io(format!("cannot delete {}", path.display())))?;
            self.release(meta.len());
            sync_dir(&dir)?;
        }
        Ok(())
    }

    /// Makes every shard stored so far durable (the group waiting, see `dir/pending.rs`).
    pub fn sync_blocking(&self) -> Result<()> {
        let group = std::mem::take(&mut *self.pending());
        if let Err(e) = group.flush(&self.inner.root) {
            // Put back what was not made durable, so a retry covers it.
            self.pending().restore(group);
            return Err(e);
        }
        Ok(())
    }

    /// Volume ids (hex) that have a shard directory, sorted.
    pub fn list_volumes_blocking(&self) -> Result<Vec<String>> {
        let dir = self.inner.root.join("shards");
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io(format!("cannot list {}", dir.display())))? {
            let e = e.map_err(io("cannot list volumes"))?;
            if let Some(name) = e.file_name().to_str() {
                if name.len() == 32
                    && unhex(name).is_some()
                    && e.file_type().is_ok_and(|t| t.is_dir())
                {
                    out.push(name.to_string());
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The shards of `volume` whose stripe id starts with byte `bucket`, with their ages.
    pub fn list_shards_blocking(&self, volume: &[u8; 16], bucket: u8) -> Result<Vec<ShardEntry>> {
        let dir = self
            .inner
            .root
            .join("shards")
            .join(hex(volume))
            .join(hex(&[bucket]));
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("cannot list {}", dir.display()), e)),
        };
        let now = SystemTime::now();
        let mut out = Vec::new();
        for e in entries {
            let e = e.map_err(io(format!("cannot list {}", dir.display())))?;
            let Some(name) = e.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Some((stripe, index)) = name.rsplit_once('.') else {
                continue;
            };
            let (Some(stripe), Ok(index)) = (unhex(stripe), index.parse::<u8>()) else {
                continue;
            };
            if stripe.len() != 32 || stripe[0] != bucket {
                continue;
            }
            let Ok(meta) = e.metadata() else { continue };
            let age = meta
                .modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            let mut id = [0u8; 32];
            id.copy_from_slice(&stripe);
            out.push(ShardEntry {
                stripe: id,
                index,
                age,
            });
        }
        out.sort_by_key(|e| (e.stripe, e.index));
        Ok(out)
    }

    /// Deletes each of `keys` whose file is at least `min_age` seconds old; younger ones stay.
    pub fn sweep_blocking(&self, min_age: u64, keys: &[ShardKey]) -> Result<SweepStats> {
        let mut stats = SweepStats::default();
        for key in keys {
            let path = self.shard_path(key);
            let _excl = self.sweep_exclusive();
            let Ok(meta) = fs::metadata(&path) else {
                continue;
            };
            let age = meta
                .modified()
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            if age < min_age {
                stats.young += 1;
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => {
                    self.release(meta.len());
                    self.inner.shards.fetch_sub(1, Ordering::Relaxed);
                    stats.deleted += 1;
                    stats.bytes += meta.len();
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("cannot delete {}", path.display()), e)),
            }
        }
        Ok(stats)
    }

    /// Usage figures, and the free space above the floor on the filesystem holding the
    /// directory (`statvfs` / `GetDiskFreeSpaceEx` through `fs4`, portable; `None` when the call
    /// fails).
    pub fn stat_blocking(&self) -> StoreStat {
        StoreStat {
            agent_id: self.inner.agent_id,
            used: self.inner.used.load(Ordering::SeqCst),
            quota: self.inner.quota,
            shards: self.inner.shards.load(Ordering::Relaxed),
            fs_free: self.inner.floor.room(&self.inner.root),
            // Known only to the server, which sees the connection (shard-agent's netinfo).
            mac: None,
            broadcast: None,
            keep_awake: None,
        }
    }
}

#[cfg(test)]
mod tests;

//! Scrub support of the directory store: check a stored shard file without any key, move a bad
//! one to `quarantine/`, and list what is there.

use std::fs;
use std::io::ErrorKind;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::files::{io, read_file, read_or_missing, sync_dir};
use super::{Checked, DirStore};
use crate::error::{Error, Result};
use crate::keys::{hex, unhex};
use crate::shard::{check_shard, ShardKey};

impl DirStore {
    /// Checks one stored shard file (header, payload crc32c, and that it is the shard its name
    /// says) without any key: what a scrub does per file.
    pub fn check_stored_blocking(&self, key: &ShardKey) -> Result<Checked> {
        let path = self.shard_path(key);
        let file = match read_file(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Checked::Missing),
            Err(e) => return Err(Error::io(format!("cannot read {}", path.display()), e)),
        };
        Ok(judge(key, &file))
    }

    /// Moves a bad shard file to `quarantine/` after checking it again under the lock that
    /// excludes stores; true when it moved (false: missing, or sound now).
    pub fn quarantine_blocking(&self, key: &ShardKey) -> Result<bool> {
        let path = self.shard_path(key);
        let _excl = self.sweep_exclusive();
        let file = match read_or_missing(&path) {
            Ok(b) => b,
            Err(Error::ShardMissing) => return Ok(false),
            Err(e) => return Err(e),
        };
        if !matches!(judge(key, &file), Checked::Bad(_)) {
            return Ok(false);
        }
        let qdir = self.inner.root.join("quarantine");
        fs::create_dir_all(&qdir).map_err(io(format!("cannot create {}", qdir.display())))?;
        let when = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dest = qdir.join(format!(
            "{}.{}.{}.{when}",
            hex(&key.volume),
            hex(&key.stripe),
            key.index
        ));
        fs::rename(&path, &dest).map_err(io(format!(
            "cannot move {} into quarantine",
            path.display()
        )))?;
        sync_dir(&qdir)?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
        self.release(file.len() as u64);
        self.inner.shards.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    /// The shards in quarantine, oldest first, each with whether a sound copy is stored again.
    pub fn quarantined_blocking(&self) -> Result<Vec<(ShardKey, bool)>> {
        let qdir = self.inner.root.join("quarantine");
        let entries = match fs::read_dir(&qdir) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io(format!("cannot list {}", qdir.display()), e)),
        };
        let mut found: Vec<(u128, ShardKey)> = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let parts: Vec<&str> = name.split('.').collect();
            let [vol, stripe, index, when] = parts[..] else {
                continue;
            };
            let (Some(vol), Some(stripe), Ok(index), Ok(when)) = (
                unhex(vol).filter(|v| v.len() == 16),
                unhex(stripe).filter(|s| s.len() == 32),
                index.parse::<u8>(),
                when.parse::<u128>(),
            ) else {
                continue;
            };
            let mut key = ShardKey {
                volume: [0; 16],
                stripe: [0; 32],
                index,
            };
            key.volume.copy_from_slice(&vol);
            key.stripe.copy_from_slice(&stripe);
            found.push((when, key));
        }
        found.sort();
        let mut out: Vec<(ShardKey, bool)> = Vec::new();
        for (_, key) in found {
            if out.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let restored = matches!(self.check_stored_blocking(&key)?, Checked::Sound(_));
            out.push((key, restored));
        }
        Ok(out)
    }
}

/// A stored file's verdict: sound for `key`, or why not.
fn judge(key: &ShardKey, file: &[u8]) -> Checked {
    match check_shard(file) {
        Ok(h) if h.key == *key => Checked::Sound(file.len() as u64),
        Ok(h) => Checked::Bad(format!("holds shard {} instead", h.key.short())),
        Err(e) => Checked::Bad(e.to_string()),
    }
}

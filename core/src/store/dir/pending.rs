//! Shard writes made durable in groups.
//!
//! A stored shard is written to `tmp/`, renamed into place, and only then made durable, together
//! with the others written since: at the agent's next `SYNC` (a snapshot's commit, the end of a
//! repair) or as soon as [`GROUP_FILES`] files or [`GROUP_BYTES`] bytes wait, whichever comes
//! first (the write that crosses the bound makes the group durable before it answers). One group
//! costs one `syncfs(2)` on Linux (file data, renames and directories of the agent's filesystem
//! in one journal commit) and, on other systems, a data sync of each file followed by an `fsync`
//! of each directory touched. On Linux each file's writeback starts as soon as it is written
//! (`files::start_writeback`), so the disk works while the next shards arrive and a group's
//! sync waits for little more than the journal: a snapshot of 1% of a disk commits in about 5 ms
//! instead of 30 (`bench/incremental-bitmap.sh`). The bounds keep the list small whatever the
//! size of a snapshot and keep the final `SYNC` short.
//!
//! What this changes on a crash, and why it is safe: a shard written after the last group may be
//! at its name with its data not on disk (empty, or torn). Nothing committed refers to it yet:
//! a snapshot commits only after `SYNC` answered from every agent it names. A torn file fails its
//! crc32c ([`crate::shard::check_shard`]) wherever it is met: a later store of the same shard
//! replaces it, a confirm refuses it (so it is sent again), a read counts it as corrupt and a
//! scrub quarantines it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::files::{io, open_no_follow, sync_dir};
use crate::error::Result;

/// Most shard files written and not yet durable.
pub const GROUP_FILES: usize = 64;
/// Most shard bytes written and not yet durable.
pub const GROUP_BYTES: u64 = 64 << 20;

/// Files and directories changed since the last group was made durable.
#[derive(Default)]
pub(super) struct Pending {
    files: Vec<PathBuf>,
    bytes: u64,
    dirs: HashSet<PathBuf>,
}

impl Pending {
    /// Records a file written (or re-stored) at `path`, `len` bytes; true when the group is full.
    pub(super) fn add(&mut self, path: &Path, len: u64) -> bool {
        self.files.push(path.to_path_buf());
        self.bytes += len;
        // The shard's directory and the two above it (shards/VOL/SS) may be new.
        for dir in path.ancestors().skip(1).take(3) {
            self.dirs.insert(dir.to_path_buf());
        }
        self.files.len() >= GROUP_FILES || self.bytes >= GROUP_BYTES
    }

    /// Files waiting.
    #[cfg(test)]
    pub(super) fn files_len(&self) -> usize {
        self.files.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }

    /// Puts back a group whose flush failed, so the next one covers it.
    pub(super) fn restore(&mut self, group: Pending) {
        self.files.extend(group.files);
        self.bytes += group.bytes;
        self.dirs.extend(group.dirs);
    }

    /// Makes the group durable (see the module docs); `root` is the store's directory.
    pub(super) fn flush(&self, root: &Path) -> Result<()> {
        if self.is_empty() {
            return Ok(());
        }
        #[cfg(target_os = "linux")]
        {
            let f =
                std::fs::File::open(root).map_err(io(format!("cannot open {}", root.display())))?;
            rustix::fs::syncfs(&f).map_err(|e| {
                crate::error::Error::io(
                    format!("cannot sync the filesystem of {}", root.display()),
                    std::io::Error::from(e),
                )
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = root;
            self.flush_each()
        }
    }

    /// A data sync of each file, then an `fsync` of each directory (a file deleted meanwhile is
    /// skipped: there is nothing of it to keep).
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    fn flush_each(&self) -> Result<()> {
        for path in &self.files {
            let f = match open_no_follow(std::fs::OpenOptions::new().write(true), path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    return Err(crate::error::Error::io(
                        format!("cannot open {}", path.display()),
                        e,
                    ))
                }
            };
            f.sync_data()
                .map_err(io(format!("cannot sync {}", path.display())))?;
        }
        for dir in &self.dirs {
            sync_dir(dir)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_full_at_either_bound() {
        let mut p = Pending::default();
        for i in 0..GROUP_FILES - 1 {
            assert!(!p.add(Path::new(&format!("/r/shards/v/00/{i}")), 1));
        }
        assert!(p.add(Path::new("/r/shards/v/00/last"), 1), "files bound");
        let mut p = Pending::default();
        assert!(!p.add(Path::new("/r/shards/v/00/a"), GROUP_BYTES - 1));
        assert!(p.add(Path::new("/r/shards/v/01/b"), 1), "bytes bound");
        assert!(p.dirs.contains(Path::new("/r/shards/v/01")));
        assert!(p.dirs.contains(Path::new("/r/shards")));
    }

    #[test]
    fn both_ways_of_flushing_work_on_real_files() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("shards/v/00");
        std::fs::create_dir_all(&sub).unwrap();
        let mut p = Pending::default();
        for i in 0..3 {
            let f = sub.join(format!("s{i}"));
            std::fs::write(&f, b"data").unwrap();
            p.add(&f, 4);
        }
        // A file deleted before its group is flushed is skipped, not an error.
        std::fs::remove_file(sub.join("s1")).unwrap();
        p.flush(dir.path()).unwrap();
        p.flush_each().unwrap();
        let mut back = Pending::default();
        back.restore(p);
        assert_eq!(back.files.len(), 3);
        assert_eq!(back.bytes, 12);
    }
}

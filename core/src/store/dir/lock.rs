//! One process per store directory: a lock file held as long as the store is open.
//!
//! Two agents on one directory would count usage twice, empty each other's `tmp/` at start and
//! sweep each other's files. `DIR/lock` is locked exclusively (`flock` on Unix, `LockFileEx` on
//! Windows, through `fs4`); the OS drops the lock when the process ends, however it ends, so a
//! crashed agent never leaves a stale lock behind. The file itself stays (it holds nothing).

use std::fs::{File, OpenOptions};
use std::path::Path;

use crate::error::{Error, Result};

/// Name of the lock file in a store directory.
pub const LOCK_FILE: &str = "lock";

/// The held lock; released when dropped.
#[derive(Debug)]
pub(super) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock of `root`, or fails with [`Error::InUse`] when another process holds it.
    pub fn take(root: &Path) -> Result<DirLock> {
        let path = root.join(LOCK_FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("cannot open the lock file {}", path.display()), e))?;
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => Ok(DirLock { _file: file }),
            Err(fs4::TryLockError::WouldBlock) => Err(Error::InUse {
                path: root.display().to_string(),
                lock: path.display().to_string(),
            }),
            Err(fs4::TryLockError::Error(e)) => {
                Err(Error::io(format!("cannot lock {}", path.display()), e))
            }
        }
    }
}

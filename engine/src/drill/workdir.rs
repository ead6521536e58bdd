//! The drill's work directory: one drill at a time, and what a killed drill left behind is
//! reaped by the next one.
//!
//! The directory holds `lock` (locked for the drill's lifetime: the OS drops the lock when the
//! process dies, even by SIGKILL), `qemu.pid` (written as soon as the VM runs), the overlay
//! (`overlay.img` and `overlay.img.map`: the guest's writes, never the backup's), the QMP socket
//! and the screenshots. A drill that finds the lock free but `qemu.pid` present knows the drill
//! before it died: it kills that qemu (only when its command line names this directory, so a
//! reused pid is never hit) and removes the files.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};

/// Files a drill creates in its work directory (besides `lock`).
const SCRATCH: [&str; 6] = [
    "qemu.pid",
    "overlay.img",
    "overlay.img.map",
    "qmp.sock",
    "screen.png",
    "screen.ppm",
];

/// A locked work directory.
pub struct WorkDir {
    path: PathBuf,
    _lock: File,
}

impl WorkDir {
    /// Creates (if needed) and locks `path`, then reaps what a killed drill left there. Returns
    /// the directory and what was reaped, in words.
    pub fn open(path: &Path) -> Result<(WorkDir, Vec<String>)> {
        std::fs::create_dir_all(path).map_err(|e| {
            Error::io(
                format!("cannot create the drill directory {}", path.display()),
                e,
            )
        })?;
        let path = path
            .canonicalize()
            .map_err(|e| Error::io(format!("cannot resolve {}", path.display()), e))?;
        let lock_path = path.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("cannot open {}", lock_path.display()), e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(Error::failed(format!(
                    "another drill is running in {} (it holds {}): wait for it to end, or give \
                     another --work-dir",
                    path.display(),
                    lock_path.display()
                )))
            }
            Err(TryLockError::Error(e)) => {
                return Err(Error::io(format!("cannot lock {}", lock_path.display()), e))
            }
        }
        let dir = WorkDir { path, _lock: lock };
        let reaped = dir.reap()?;
        Ok((dir, reaped))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Records the running qemu's pid.
    pub fn set_qemu_pid(&self, pid: u32) -> Result<()> {
        std::fs::write(self.file("qemu.pid"), pid.to_string())
            .map_err(|e| Error::io("cannot write the drill's qemu.pid", e))
    }

    /// Kills a qemu a killed drill left running, and removes the scratch files.
    fn reap(&self) -> Result<Vec<String>> {
        let mut reaped = Vec::new();
        if let Ok(text) = std::fs::read_to_string(self.file("qemu.pid")) {
            if let Ok(pid) = text.trim().parse::<i32>() {
                if self.is_our_qemu(pid) {
                    tracing::warn!("killing qemu (pid {pid}) left running by a drill that died");
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while self.is_our_qemu(pid) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    if self.is_our_qemu(pid) {
                        return Err(Error::failed(format!(
                            "qemu (pid {pid}) left by an earlier drill in {} does not die",
                            self.path.display()
                        )));
                    }
                    reaped.push(format!("qemu (pid {pid})"));
                }
            }
        }
        reaped.extend(self.clean());
        Ok(reaped)
    }

    /// Whether `pid` runs a command that names this directory (a zombie has no command line).
    fn is_our_qemu(&self, pid: i32) -> bool {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        let needle = self.path.as_os_str().as_encoded_bytes();
        cmdline.windows(needle.len()).any(|w| w == needle)
    }

    /// Removes the scratch files; returns the ones that were there.
    pub fn clean(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for name in SCRATCH {
            let p = self.file(name);
            match std::fs::remove_file(&p) {
                Ok(()) => removed.push(p.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove {}: {e}", p.display()),
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_drill_in_the_same_directory_is_refused_and_leftovers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("overlay.img"), b"x").unwrap();
        std::fs::write(dir.path().join("qemu.pid"), b"999999999").unwrap();
        let (wd, reaped) = WorkDir::open(dir.path()).unwrap();
        assert_eq!(reaped.len(), 2, "{reaped:?}");
        assert!(!dir.path().join("overlay.img").exists());
        let err = WorkDir::open(dir.path()).err().expect("locked");
        assert!(err.to_string().contains("another drill"), "{err}");
        drop(wd);
        WorkDir::open(dir.path()).unwrap();
    }
}

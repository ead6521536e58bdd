//! The directory store's file operations, and where each OS differs.
//!
//! | what | Unix (Linux, macOS) | Windows |
//! |---|---|---|
//! | refuse a planted link ([`no_follow`]) | `O_NOFOLLOW` (the open fails) | `FILE_FLAG_OPEN_REPARSE_POINT`, then a link is refused |
//! | make a rename durable ([`sync_dir`]) | `fsync` of the directory | nothing: NTFS journals the rename and a directory cannot be opened for a flush without backup privileges |
//! | disk full ([`full_if_no_space`]) | `ENOSPC`, `EDQUOT` | `ERROR_DISK_FULL`, `ERROR_HANDLE_DISK_FULL`, quota errors (all mapped by std to the same kinds) |
//!
//! Renaming over an existing file works on both (std uses `MoveFileExW` with
//! `MOVEFILE_REPLACE_EXISTING` on Windows), and std opens files with `FILE_SHARE_DELETE` there, so
//! a shard being read may be replaced or deleted as on Unix.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::Path;
use std::time::SystemTime;

use crate::error::{Error, Result};

pub(super) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::io(what, e)
}

/// Sets a file's modification time to now (a re-stored shard is young again).
pub(super) fn touch(path: &Path) -> Result<()> {
    let f = open_no_follow(OpenOptions::new().write(true), path)
        .map_err(io(format!("cannot open {}", path.display())))?;
    f.set_modified(SystemTime::now())
        .map_err(io(format!("cannot touch {}", path.display())))
}

/// Turns "no space left" (disk or filesystem quota, on any OS) into [`Error::Full`].
pub(super) fn full_if_no_space(e: Error) -> Error {
    match &e {
        Error::Io { err, what }
            if matches!(
                err.kind(),
                ErrorKind::StorageFull | ErrorKind::QuotaExceeded
            ) =>
        {
            Error::Full(format!(
                "disk full: {what}; free space or move the agent's directory"
            ))
        }
        _ => e,
    }
}

/// Windows' `FILE_FLAG_OPEN_REPARSE_POINT` (winbase.h): open a reparse point (a symbolic link,
/// a junction) itself instead of what it points to.
#[cfg(windows)]
const FILE_FLAG_OPEN_REPARSE_POINT: u32 = 0x0020_0000;

/// Opens `path` without following a symbolic link as its last component: every path the agent
/// opens is one it built itself under its directory, and a link planted there (by anyone) must
/// not lead a read or a touch outside it. Unix refuses with `O_NOFOLLOW` (ELOOP); Windows opens
/// the link itself, which is then refused here.
pub(super) fn open_no_follow(opts: &mut OpenOptions, path: &Path) -> std::io::Result<File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NOFOLLOW);
    }
    #[cfg(windows)]
    {
        use std::os::windows::fs::OpenOptionsExt;
        opts.custom_flags(FILE_FLAG_OPEN_REPARSE_POINT);
    }
    let f = opts.open(path)?;
    if cfg!(windows) && f.metadata()?.file_type().is_symlink() {
        return Err(std::io::Error::new(
            ErrorKind::InvalidInput,
            format!("{} is a symbolic link; not followed", path.display()),
        ));
    }
    Ok(f)
}

/// `fs::read` that does not follow a symbolic link (see [`open_no_follow`]).
pub(super) fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut f = open_no_follow(OpenOptions::new().read(true), path)?;
    // A recycled buffer for a shard file (see `crate::pool::frames`).
    let len = f.metadata().map(|m| m.len() as usize).unwrap_or(0);
    let mut buf = crate::pool::frames().take(len);
    f.read_to_end(&mut buf)?;
    Ok(buf)
}

pub(super) fn read_or_missing(path: &Path) -> Result<Vec<u8>> {
    match read_file(path) {
        Ok(b) => Ok(b),
        Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::ShardMissing),
        Err(e) => Err(Error::io(format!("cannot read {}", path.display()), e)),
    }
}

/// Writes `data` to a new file at `tmp`, made durable (`fdatasync`) before it returns when
/// `synced`; removes it on failure.
fn write_new(tmp: &Path, data: &[u8], synced: bool) -> Result<()> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(io(format!("cannot create {}", tmp.display())))?;
    let r = f.write_all(data).and_then(|_| {
        if synced {
            f.sync_data()
        } else {
            start_writeback(&f);
            Ok(())
        }
    });
    if let Err(e) = r {
        drop(f);
        let _ = fs::remove_file(tmp);
        return Err(Error::io(format!("cannot write {}", tmp.display()), e));
    }
    Ok(())
}

/// Starts writing `f`'s data to the disk without waiting for it (Linux: `posix_fadvise(DONTNEED)`,
/// which queues the file's dirty pages for writeback at once, and drops only pages already
/// clean). The group's `syncfs` then finds the data on its way or written instead of starting
/// it: the disk works while the next shards arrive, and a snapshot's final `SYNC` (its commit)
/// waits for little more than the journal. A failure is ignored: the group's sync still makes
/// the data durable and reports errors. Elsewhere nothing is done here.
fn start_writeback(f: &File) {
    #[cfg(target_os = "linux")]
    {
        let _ = rustix::fs::fadvise(f, 0, None, rustix::fs::Advice::DontNeed);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = f;
}

/// Writes a new file at `tmp` without waiting for the disk (a shard: made durable with its group;
/// its writeback starts at once, see [`start_writeback`]).
pub(super) fn write_unsynced(tmp: &Path, data: &[u8]) -> Result<()> {
    write_new(tmp, data, false)
}

pub(super) fn write_durable(dir: &Path, tmp: &Path, path: &Path, data: &[u8]) -> Result<()> {
    write_new(tmp, data, true)?;
    fs::rename(tmp, path).map_err(io(format!("cannot rename into {}", path.display())))?;
    sync_dir(dir)
}

/// Makes the renames in `dir` durable: an `fsync` of the directory on Unix; nothing on Windows
/// (see the module docs).
pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    if cfg!(unix) {
        let f = File::open(dir).map_err(io(format!("cannot open {}", dir.display())))?;
        f.sync_all()
            .map_err(io(format!("cannot fsync {}", dir.display())))?;
    }
    Ok(())
}

/// Bytes and regular files under `dir`, recursively (a missing directory holds nothing).
pub(super) fn dir_usage(dir: &Path) -> Result<(u64, u64)> {
    let mut bytes = 0;
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => continue,
            Err(e) => return Err(Error::io(format!("cannot list {}", d.display()), e)),
        };
        for e in entries.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                files += 1;
            }
        }
    }
    Ok((bytes, files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_space_errors_become_full_on_every_os() {
        for kind in [ErrorKind::StorageFull, ErrorKind::QuotaExceeded] {
            let e = full_if_no_space(Error::io("cannot write x", std::io::Error::from(kind)));
            assert!(matches!(e, Error::Full(_)), "{kind:?}: {e}");
        }
        // The OS codes each platform's std maps to StorageFull.
        #[cfg(unix)]
        let raw = libc::ENOSPC;
        #[cfg(windows)]
        let raw = 112; // ERROR_DISK_FULL
        let e = full_if_no_space(Error::io("w", std::io::Error::from_raw_os_error(raw)));
        assert!(matches!(e, Error::Full(_)), "{e}");
        let e = full_if_no_space(Error::io("w", std::io::Error::from(ErrorKind::NotFound)));
        assert!(matches!(e, Error::Io { .. }));
    }
}

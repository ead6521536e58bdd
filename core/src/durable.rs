//! Writing a small file so that a crash leaves either the old file or the whole new one: a
//! temporary file in the same directory, written and fsynced, renamed over the target, and the
//! directory fsynced so the rename itself survives. Every state file sa-image keeps (the manifest
//! cache, the watcher's clock, agent sightings, hydrate progress, overlay maps, key files) goes
//! through [`write`]; shard files have their own path in the agent's store
//! ([`crate::store::DirStore`]), batched per `SYNC`.
//!
//! Errors name the file the caller asked for, never the temporary name.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Who may read the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Mode 0644 on Unix (state anyone on the machine may read).
    Shared,
    /// Mode 0600 on Unix (keys, anything secret).
    Private,
}

/// Whether an existing file may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    /// Replace it (the usual case for state files).
    Yes,
    /// Fail with "already exists" (a new key file must never overwrite an old key).
    No,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary name beside `path`, unique within this process and across processes.
fn temp_beside(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Writes `data` to `path` durably: temp file beside it, fsync, rename, fsync of the directory.
/// Creates the parent directory when missing.
pub fn write(path: &Path, data: &[u8], access: Access, replace: Replace) -> Result<()> {
    create_with(path, access, replace, |f| f.write_all(data))
}

/// Like [`write`], with the temporary file filled by `fill` (positioned writes, `set_len` of a
/// sparse file, ...) before it is synced and renamed.
pub fn create_with(
    path: &Path,
    access: Access,
    replace: Replace,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> Result<()> {
    let what = || format!("cannot write {}", path.display());
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(what(), e))?;
    }
    if replace == Replace::No && std::fs::symlink_metadata(path).is_ok() {
        return Err(Error::io(
            what(),
            std::io::Error::new(std::io::ErrorKind::AlreadyExists, "it already exists"),
        ));
    }
    let tmp = temp_beside(path);
    let result = write_temp(&tmp, access, fill).and_then(|()| {
        if replace == Replace::No {
            // A hard link fails if the target appeared meanwhile: never replace a key file.
            std::fs::hard_link(&tmp, path).and_then(|()| std::fs::remove_file(&tmp))
        } else {
            std::fs::rename(&tmp, path)
        }
    });
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(what(), e));
    }
    sync_parent(path).map_err(|e| Error::io(what(), e))
}

fn write_temp(
    tmp: &Path,
    access: Access,
    fill: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(match access {
            Access::Shared => 0o644,
            Access::Private => 0o600,
        });
    }
    #[cfg(not(unix))]
    let _ = access;
    let mut f = opts.open(tmp)?;
    fill(&mut f)?;
    f.sync_all()
}

/// Fsyncs the directory holding `path`, so a rename into it is durable (Unix; on Windows a
/// directory cannot be opened as a file and renames are journaled by NTFS).
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("state");
        write(&p, b"one", Access::Shared, Replace::Yes).unwrap();
        write(&p, b"two", Access::Shared, Replace::Yes).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state")]);
    }

    #[test]
    fn refuses_to_replace_when_told_and_names_the_users_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("master.key");
        write(&p, b"k1", Access::Private, Replace::No).unwrap();
        let e = write(&p, b"k2", Access::Private, Replace::No).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("master.key") && msg.contains("already exists"),
            "{msg}"
        );
        assert!(
            !msg.contains(".master.key."),
            "names a temporary file: {msg}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"k1");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn a_missing_directory_it_cannot_make_is_named() {
        let e = write(
            Path::new("/proc/no-such-dir/state"),
            b"x",
            Access::Shared,
            Replace::Yes,
        )
        .unwrap_err();
        assert!(e.to_string().contains("/proc/no-such-dir/state"), "{e}");
    }
}

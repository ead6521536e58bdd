//! Opening what we snapshot (a block device or an image file) and what we restore to.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use anyhow::{bail, Context, Result};

/// An opened volume and its size.
pub struct Volume {
    /// The open file or device.
    pub file: File,
    /// Its size in bytes.
    pub size: u64,
    /// True for a block device.
    pub is_device: bool,
    /// Where it is being written (a restore target's temporary name).
    pub path: std::path::PathBuf,
}

/// The size of an open file or block device. For a block device, seeking to its end gives the
/// size the kernel reports (the same number as the BLKGETSIZE64 ioctl), with no unsafe code.
fn size_of(file: &mut File, is_device: bool) -> Result<u64> {
    if is_device {
        let size = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(0))?;
        Ok(size)
    } else {
        Ok(file.metadata()?.len())
    }
}

/// Opens a snapshot source for reading and checks it is a whole number of sectors.
pub fn open_source(path: &Path) -> Result<Volume> {
    let meta = std::fs::metadata(path).with_context(|| {
        format!(
            "cannot open source {}: give an image file or a block device such as /dev/sda",
            path.display()
        )
    })?;
    let ft = meta.file_type();
    let is_device = ft.is_block_device();
    if !is_device && !ft.is_file() {
        bail!(
            "{} is neither a block device nor a regular file",
            path.display()
        );
    }
    let mut file = File::open(path).with_context(|| {
        format!(
            "cannot read source {} (run as root for a device?)",
            path.display()
        )
    })?;
    let size = size_of(&mut file, is_device)?;
    if size == 0 {
        bail!("source {} is empty", path.display());
    }
    if size % sa_core::layout::SECTOR != 0 {
        bail!(
            "source {} is {size} bytes, not a multiple of 512: a disk or disk image always is; \
             is this the right file?",
            path.display()
        );
    }
    Ok(Volume {
        file,
        size,
        is_device,
        path: path.to_path_buf(),
    })
}

/// Opens a restore target: an existing block device (at least `size` bytes), or a regular file
/// (created if missing). A file is written under `partial` when given, and renamed at the end by
/// the caller, so a failed restore never leaves a file that looks complete.
pub fn open_target(path: &Path, partial: Option<&Path>, size: u64) -> Result<Volume> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => {
            let mut file = OpenOptions::new()
                .write(true)
                .read(true)
                .open(path)
                .with_context(|| {
                    format!("cannot open {} for writing (root needed?)", path.display())
                })?;
            let dev_size = size_of(&mut file, true)?;
            if dev_size < size {
                bail!(
                    "{} holds {dev_size} bytes but the snapshot needs {size}: use a larger disk",
                    path.display()
                );
            }
            Ok(Volume {
                file,
                size: dev_size,
                is_device: true,
                path: path.to_path_buf(),
            })
        }
        Ok(meta) if !meta.is_file() => bail!(
            "{} is neither a block device nor a regular file",
            path.display()
        ),
        _ => {
            let path = partial.unwrap_or(path);
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .create(true)
                .truncate(true)
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            file.set_len(size).with_context(|| {
                format!(
                    "cannot size {} to {size} bytes (disk full?)",
                    path.display()
                )
            })?;
            Ok(Volume {
                file,
                size,
                is_device: false,
                path: path.to_path_buf(),
            })
        }
    }
}

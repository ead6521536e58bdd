//! Opening what we snapshot (a block device or an image file) and what we restore to, safely.
//!
//! - A restore target that is an existing regular file holding data is refused unless the
//!   caller says to replace it ([`TargetOptions::force`]): a typo in `--to` must not destroy a
//!   disk image.
//! - A block device target is opened exclusively (`O_EXCL`: Linux then refuses a device that is
//!   mounted or held open by another program), so a restore never writes under a mounted
//!   filesystem; the error says which.
//! - A block device source reports where it, or a device built on it (a partition, an LVM LV),
//!   is mounted read-write ([`Volume::mounted_rw`], from [`in_use`]): stripes read at different
//!   moments of a disk in use do not form one consistent image, so the snapshot refuses it unless
//!   a consistency method is chosen ([`crate::consistency`]).

pub mod in_use;

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};

/// An opened volume and its size.
pub struct Volume {
    /// The open file or device.
    pub file: File,
    /// Its size in bytes.
    pub size: u64,
    /// True for a block device.
    pub is_device: bool,
    /// Where it is being written (a restore target's temporary name) or read.
    pub path: PathBuf,
    /// For a block device source: where it, or a device built on it, is mounted read-write.
    pub mounted_rw: Vec<in_use::RwMount>,
}

/// How to open a restore target.
#[derive(Debug, Clone, Default)]
pub struct TargetOptions {
    /// Replace an existing regular file that holds data.
    pub force: bool,
    /// Write a file target under this name and let the caller rename it when complete.
    pub partial: Option<PathBuf>,
}

/// The size of an open file or block device. For a block device, seeking to its end gives the
/// size the kernel reports (the same number as the BLKGETSIZE64 ioctl), with no unsafe code.
fn size_of(file: &mut File, is_device: bool) -> std::io::Result<u64> {
    if is_device {
        let size = file.seek(SeekFrom::End(0))?;
        file.seek(SeekFrom::Start(0))?;
        Ok(size)
    } else {
        Ok(file.metadata()?.len())
    }
}

/// Linux's major and minor numbers of a device number.
fn major_minor(dev: u64) -> (u64, u64) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major, minor)
}

/// Where the block device `rdev` is mounted, with whether read-write: from
/// `/proc/self/mountinfo` (empty where it cannot be read).
pub fn mounts_of(rdev: u64) -> Vec<(String, bool)> {
    let (major, minor) = major_minor(rdev);
    let want = format!("{major}:{minor}");
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            // ID PARENT MAJOR:MINOR ROOT MOUNTPOINT OPTIONS ...
            if f.len() > 5 && f[2] == want {
                let rw = f[5].split(',').any(|o| o == "rw");
                Some((f[4].to_string(), rw))
            } else {
                None
            }
        })
        .collect()
}

/// Opens a snapshot source for reading and checks it is a whole number of sectors.
pub fn open_source(path: &Path) -> Result<Volume> {
    let meta = std::fs::metadata(path).map_err(|e| {
        Error::io(
            format!(
                "cannot open source {}: give an image file or a block device such as /dev/sda",
                path.display()
            ),
            e,
        )
    })?;
    let ft = meta.file_type();
    let is_device = ft.is_block_device();
    if !is_device && !ft.is_file() {
        return Err(Error::invalid(format!(
            "{} is neither a block device nor a regular file",
            path.display()
        )));
    }
    let mut file = File::open(path).ctx(|| {
        format!(
            "cannot read source {} (run as root for a device?)",
            path.display()
        )
    })?;
    let size = size_of(&mut file, is_device)
        .ctx(|| format!("cannot find the size of {}", path.display()))?;
    if size == 0 {
        return Err(Error::invalid(format!(
            "source {} is empty",
            path.display()
        )));
    }
    if size % sa_core::layout::SECTOR != 0 {
        return Err(Error::invalid(format!(
            "source {} is {size} bytes, not a multiple of 512: a disk or disk image always is; \
             is this the right file?",
            path.display()
        )));
    }
    let mounted_rw = if is_device {
        let (major, minor) = major_minor(meta.rdev());
        in_use::rw_mounts(major, minor)
    } else {
        Vec::new()
    };
    Ok(Volume {
        file,
        size,
        is_device,
        path: path.to_path_buf(),
        mounted_rw,
    })
}

/// Opens a restore target: an existing block device (at least `size` bytes, opened
/// exclusively), or a regular file (created if missing; an existing one holding data only with
/// [`TargetOptions::force`]). A file is written under [`TargetOptions::partial`] when given, and
/// renamed by the caller when complete, so a failed restore never leaves a file that looks whole.
pub fn open_target(path: &Path, size: u64, opts: &TargetOptions) -> Result<Volume> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.file_type().is_block_device() => open_device_target(path, size, &meta),
        Ok(meta) if !meta.is_file() => Err(Error::invalid(format!(
            "{} is neither a block device nor a regular file",
            path.display()
        ))),
        Ok(meta) if meta.len() > 0 && !opts.force => {
            Err(Error::TargetExists(path.display().to_string()))
        }
        _ => {
            let write_path = opts.partial.as_deref().unwrap_or(path);
            let file = OpenOptions::new()
                .write(true)
                .read(true)
                .create(true)
                .truncate(true)
                .open(write_path)
                .ctx(|| format!("cannot create {}", write_path.display()))?;
            file.set_len(size).ctx(|| {
                format!(
                    "cannot size {} to {size} bytes (disk full?)",
                    path.display()
                )
            })?;
            Ok(Volume {
                file,
                size,
                is_device: false,
                path: write_path.to_path_buf(),
                mounted_rw: Vec::new(),
            })
        }
    }
}

fn open_device_target(path: &Path, size: u64, meta: &std::fs::Metadata) -> Result<Volume> {
    let opened = OpenOptions::new()
        .write(true)
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(path);
    let mut file = match opened {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let mounts = mounts_of(meta.rdev());
            let why = if mounts.is_empty() {
                "held open by another program (a mounted partition on it, a loop or device-mapper \
                 user, or another restore)"
                    .to_string()
            } else {
                format!(
                    "mounted on {}",
                    mounts
                        .iter()
                        .map(|(m, _)| m.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(Error::DeviceBusy {
                path: path.display().to_string(),
                why,
                hint: "a restore would write under it; unmount it (and its partitions) or stop \
                       what holds it, then run the restore again"
                    .into(),
            });
        }
        Err(e) => {
            return Err(Error::io(
                format!("cannot open {} for writing (root needed?)", path.display()),
                e,
            ))
        }
    };
    let dev_size =
        size_of(&mut file, true).ctx(|| format!("cannot find the size of {}", path.display()))?;
    if dev_size < size {
        return Err(Error::invalid(format!(
            "{} holds {dev_size} bytes but the snapshot needs {size}: use a larger disk",
            path.display()
        )));
    }
    Ok(Volume {
        file,
        size: dev_size,
        is_device: true,
        path: path.to_path_buf(),
        mounted_rw: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers() {
        // 8:1 (sda1) and 259:65536 (an nvme partition with a large minor).
        assert_eq!(major_minor(0x801), (8, 1));
        let (major, minor) = (259u64, 65536u64);
        let dev = ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12);
        assert_eq!(major_minor(dev), (259, 65536));
    }

    #[test]
    fn an_existing_file_with_data_is_kept_unless_forced() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.img");
        std::fs::write(&p, b"precious").unwrap();
        let e = open_target(&p, 4096, &TargetOptions::default())
            .err()
            .unwrap();
        assert!(matches!(e, Error::TargetExists(_)), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        let forced = TargetOptions {
            force: true,
            partial: None,
        };
        assert_eq!(open_target(&p, 4096, &forced).unwrap().size, 4096);
        // An empty file is no data to lose.
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert!(open_target(&empty, 4096, &TargetOptions::default()).is_ok());
    }
}

//! Loop devices over image files (root only), detached on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Whether this process runs as root (loop devices need it).
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A loop device attached to an image file; detached when dropped.
#[derive(Debug)]
pub struct LoopDevice {
    dev: PathBuf,
}

impl LoopDevice {
    /// `losetup -f --show IMAGE`, read-only if `read_only`.
    pub fn attach(image: &Path, read_only: bool) -> LoopDevice {
        let mut cmd = Command::new("losetup");
        if read_only {
            cmd.arg("-r");
        }
        let out = cmd
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .expect("cannot run losetup");
        assert!(
            out.status.success(),
            "losetup -f --show {} failed: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(dev.starts_with("/dev/"), "losetup printed {dev:?}");
        LoopDevice { dev }
    }

    /// The device path, e.g. `/dev/loop3`.
    pub fn path(&self) -> &Path {
        &self.dev
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

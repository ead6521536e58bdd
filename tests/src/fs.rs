//! Filesystems in use, for the consistency tests (root only): an ext4 on a loop device, mounted,
//! and a writer process that keeps creating files in it.
//!
//! A frozen filesystem blocks every writer, and a blocked writer cannot even be killed until the
//! filesystem is thawed. So both guards thaw it first when dropped (`fsfreeze --unfreeze`,
//! whose failure on a filesystem that is not frozen is ignored): a test that fails while the
//! filesystem is frozen ends instead of hanging.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::image::ImageSpec;
use crate::loopdev::LoopDevice;
use crate::proc::Proc;

/// An ext4 filesystem on a loop device, mounted; unmounted and detached on drop.
#[derive(Debug)]
pub struct MountedExt4 {
    /// The image file under the loop device.
    pub image: PathBuf,
    /// Where it is mounted.
    pub mnt: PathBuf,
    // Dropped after the unmount in `Drop`.
    dev: LoopDevice,
}

impl MountedExt4 {
    /// Makes `dir/NAME.img` of `size` bytes, pseudo-random throughout when `random_seed` is
    /// given (so the whole device costs real work to snapshot: `mkfs` is told not to discard
    /// it), an ext4 on it, and mounts it at `dir/NAME`.
    pub fn create(dir: &Path, name: &str, size: u64, random_seed: Option<u64>) -> MountedExt4 {
        let image = dir.join(format!("{name}.img"));
        match random_seed {
            Some(seed) => {
                ImageSpec::random(size, seed).write(&image);
            }
            None => std::fs::File::create(&image)
                .and_then(|f| f.set_len(size))
                .expect("create the image file"),
        }
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "nodiscard,lazy_itable_init=0", "-L", name])
                .arg(&image),
        );
        let dev = LoopDevice::attach(&image, false);
        let mnt = dir.join(name);
        std::fs::create_dir_all(&mnt).expect("mount point");
        run_ok(Command::new("mount").arg(dev.path()).arg(&mnt));
        MountedExt4 { image, mnt, dev }
    }

    /// The loop device.
    pub fn device(&self) -> &Path {
        self.dev.path()
    }
}

impl Drop for MountedExt4 {
    fn drop(&mut self) {
        thaw(&self.mnt);
        let ok = Command::new("umount")
            .arg(&self.mnt)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
    }
}

/// `fsfreeze --unfreeze MNT`, ignoring a filesystem that is not frozen.
pub fn thaw(mnt: &Path) {
    let _ = Command::new("fsfreeze")
        .arg("--unfreeze")
        .arg(mnt)
        .stderr(Stdio::null())
        .status();
}

/// A shell loop creating 4 KiB files `w/fN` (N = 1, 2, ...) in a mounted filesystem, each
/// written under a temporary name and renamed, and keeping the last 500; it writes the last
/// N renamed to a status file outside that filesystem. Thaws and kills it on drop.
#[derive(Debug)]
pub struct Writer {
    mnt: PathBuf,
    status: PathBuf,
    proc: Proc,
}

impl Writer {
    /// Starts writing into `mnt`; the status file goes to `scratch`.
    pub fn start(mnt: &Path, scratch: &Path) -> Writer {
        let status = scratch.join(format!(
            "writer-{}.status",
            mnt.file_name().unwrap_or_default().to_string_lossy()
        ));
        let script = format!(
            "mkdir -p '{m}/w' || exit 1; i=0; while :; do i=$((i+1)); \
             head -c 4096 /dev/urandom > '{m}/w/f'$i.tmp || exit 1; \
             mv '{m}/w/f'$i.tmp '{m}/w/f'$i || exit 1; rm -f '{m}/w/f'$((i-500)); \
             echo $i > '{s}.new' && mv '{s}.new' '{s}'; done",
            m = mnt.display(),
            s = status.display()
        );
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let w = Writer {
            mnt: mnt.to_path_buf(),
            status,
            proc: Proc::spawn(cmd, "writer"),
        };
        w.wait_beyond(0, Duration::from_secs(20));
        w
    }

    /// The last file number written (0 before the first).
    pub fn count(&self) -> u64 {
        std::fs::read_to_string(&self.status)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until the writer has written past file `n`; returns the count then.
    pub fn wait_beyond(&self, n: u64, timeout: Duration) -> u64 {
        crate::wait::until(
            timeout,
            &format!("the writer to write past file {n}"),
            || {
                let c = self.count();
                (c > n).then_some(c)
            },
        )
    }

    /// Whether the writer process still runs (it exits on a write error).
    pub fn is_running(&mut self) -> bool {
        self.proc.is_running()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        thaw(&self.mnt);
        self.proc.kill();
    }
}

/// `e2fsck -fn IMAGE`: whether it exited 0, and its output.
pub fn e2fsck(image: &Path) -> (bool, String) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("run e2fsck");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The content of `path` in the ext4 filesystem image `image` (`debugfs -R "cat PATH"`), or
/// None when it is not there.
pub fn read_file_in(image: &Path, path: &str) -> Option<Vec<u8>> {
    let exists = Command::new("debugfs")
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(image)
        .output()
        .expect("run debugfs");
    if String::from_utf8_lossy(&exists.stderr).contains("File not found") {
        return None;
    }
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(image)
        .output()
        .expect("run debugfs");
    out.status.success().then_some(out.stdout)
}

fn run_ok(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! `qemu-nbd` serving an image read-only on a Unix socket, and the `qemu-img`/`qemu-io` steps
//! around it. The server is killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::proc::Proc;

/// A running `qemu-nbd --read-only` on a Unix socket; killed on drop.
#[derive(Debug)]
pub struct QemuNbd {
    proc: Proc,
    sock: PathBuf,
}

impl QemuNbd {
    /// Serves `image` (`format`: raw, qcow2) on `dir/NAME.sock`; `extra` adds flags (e.g.
    /// `["--bitmap", "b1"]`). Waits until the socket accepts.
    pub fn start(dir: &Path, name: &str, image: &Path, format: &str, extra: &[&str]) -> QemuNbd {
        let sock = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::File::create(dir.join(format!("{name}.qemu-nbd.log"))).expect("log");
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "--read-only",
            "--persistent",
            "--shared=8",
            "--format",
            format,
        ])
        .arg("--socket")
        .arg(&sock)
        .args(extra)
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
        let mut proc = Proc::spawn(cmd, "qemu-nbd");
        crate::wait::until_true(Duration::from_secs(20), "qemu-nbd to listen", || {
            if let Some(st) = proc.try_wait() {
                let log = std::fs::read_to_string(dir.join(format!("{name}.qemu-nbd.log")));
                panic!("qemu-nbd exited with {st}: {}", log.unwrap_or_default());
            }
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        QemuNbd { proc, sock }
    }

    /// The export's URI (the default export name).
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    /// Stops the server.
    pub fn stop(mut self) {
        self.proc.kill();
    }
}

/// Runs a qemu tool (`qemu-img`, `qemu-io`) and panics with its output when it fails.
pub fn qemu(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (apt-get install qemu-utils): {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img convert -O raw IMAGE OUT`: the image's guest-visible bytes, as a reference.
pub fn to_raw(image: &Path, format: &str, out: &Path) {
    qemu(
        "qemu-img",
        &[
            "convert",
            "-f",
            format,
            "-O",
            "raw",
            &image.display().to_string(),
            &out.display().to_string(),
        ],
    );
}

/// `nbdinfo --map=CONTEXT URI` (libnbd's client): `(offset, length, flags)` per extent.
pub fn nbdinfo_map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(uri)
        .output()
        .expect("run nbdinfo (apt-get install libnbd-bin)");
    assert!(
        out.status.success(),
        "nbdinfo --map={context} {uri} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

/// Stripes of `stripe` bytes that extents with `flag` set touch.
pub fn stripes_with(map: &[(u64, u64, u32)], flag: u32, stripe: u64) -> Vec<u64> {
    let mut out: Vec<u64> = Vec::new();
    for &(off, len, flags) in map {
        if flags & flag != 0 && len > 0 {
            for s in off / stripe..=(off + len - 1) / stripe {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        }
    }
    out.sort();
    out
}

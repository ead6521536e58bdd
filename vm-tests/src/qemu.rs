//! Runs a virtual machine with `qemu-system-x86_64` (TCG, serial console on stdout) from one raw
//! disk, given as a file path or an NBD URL, and watches its console.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::console::{Console, Line};
use crate::error::{describe, Error, Result};
use crate::guest::MARKER_FAIL;

/// How to run the VM. `Default` gives TCG, 512 MiB, a writable drive.
#[derive(Debug, Clone)]
pub struct VmOptions {
    /// The qemu binary.
    pub qemu: PathBuf,
    /// `-accel` value: `tcg` (KVM cannot boot a normal kernel on these nested hosts).
    pub accel: String,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Opens the drive read-only (`readonly=on`): needed for a read-only NBD export.
    pub readonly: bool,
    /// `snapshot=on`: guest writes go to a temporary qemu overlay, never to the drive.
    pub snapshot: bool,
    /// The drive's format: `raw` (the default) or `qcow2` (persistent dirty bitmaps need it).
    pub format: String,
    /// `node-name=` of the drive's format node, for QMP commands that name it.
    pub node_name: Option<String>,
    /// More arguments appended to the qemu command line.
    pub extra_args: Vec<String>,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: "tcg".to_string(),
            memory_mib: 512,
            readonly: false,
            snapshot: false,
            format: "raw".to_string(),
            node_name: None,
            extra_args: Vec::new(),
        }
    }
}

/// The URL qemu takes for an NBD export: `nbd://ADDR[/EXPORT]` (no export: the default name).
pub fn nbd_url(addr: SocketAddr, export: Option<&str>) -> String {
    match export {
        Some(name) if !name.is_empty() => format!("nbd://{addr}/{name}"),
        _ => format!("nbd://{addr}"),
    }
}

/// A running (or finished) VM. Dropping it kills qemu if it still runs, also when a test panics.
pub struct VmRun {
    child: Child,
    // Kept open so qemu's stdio character device never sees end of file on input; lines written
    // to it reach the guest's serial console ([`VmRun::send_line`]).
    stdin: Option<ChildStdin>,
    console: Console,
    command: String,
    status: Option<ExitStatus>,
}

/// Starts `qemu-system-x86_64 -accel tcg -nographic -m 512 -no-reboot
/// -drive file=DRIVE,format=FORMAT,if=virtio` where `drive` is an image path or an NBD URL
/// (see [`nbd_url`]). The guest's serial console (and qemu's stderr, prefixed `[qemu] `) go to
/// the VM's [`Console`].
pub fn run_vm(drive: &str, opts: &VmOptions) -> Result<VmRun> {
    // qemu's option syntax doubles commas inside values.
    let mut drive_arg = format!(
        "file={},format={},if=virtio",
        drive.replace(',', ",,"),
        opts.format
    );
    if let Some(n) = &opts.node_name {
        drive_arg.push_str(&format!(",node-name={n}"));
    }
    if opts.readonly {
        drive_arg.push_str(",readonly=on");
    }
    if opts.snapshot {
        drive_arg.push_str(",snapshot=on");
    }
    let mut cmd = Command::new(&opts.qemu);
    cmd.args(["-accel", &opts.accel, "-nographic", "-no-reboot"])
        .args(["-m", &opts.memory_mib.to_string()])
        .args(["-drive", &drive_arg])
        .args(&opts.extra_args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = describe(&cmd);
    let mut console = Console::new();
    let mut child = cmd.spawn().map_err(|e| {
        Error(format!(
            "could not start `{command}`: {e} (install it: \
             `apt-get install -y -t bookworm-backports qemu-system-x86`)"
        ))
    })?;
    let stdin = child.stdin.take();
    if let Some(out) = child.stdout.take() {
        console.attach(out, "");
    }
    if let Some(err) = child.stderr.take() {
        console.attach(err, "[qemu] ");
    }
    Ok(VmRun {
        child,
        stdin,
        console,
        command,
        status: None,
    })
}

/// True for console lines that mean the guest failed: the guest's `SA-VM-FAIL` marker or a
/// kernel panic.
pub fn is_failure_line(line: &str) -> bool {
    line.contains(MARKER_FAIL.trim_end()) || line.contains("Kernel panic")
}

impl VmRun {
    /// Waits (at most `timeout`) for a console line after the previous match that satisfies
    /// `pred`. Fails early on a failure line ([`is_failure_line`]) or when qemu's output ends;
    /// errors carry the transcript.
    pub fn wait_for_line(
        &mut self,
        timeout: Duration,
        pred: impl FnMut(&str) -> bool,
    ) -> Result<Line> {
        let what = "a matching console line".to_string();
        self.console.wait_for(&what, timeout, pred, is_failure_line)
    }

    /// Waits (at most `timeout`) for a line containing `marker` and returns it with `text` set to
    /// what follows the marker, trimmed (empty for a bare marker). Fails like
    /// [`VmRun::wait_for_line`].
    pub fn wait_for_marker(&mut self, marker: &str, timeout: Duration) -> Result<Line> {
        let what = format!("console marker {marker:?}");
        let line =
            self.console
                .wait_for(&what, timeout, |l| l.contains(marker), is_failure_line)?;
        let rest = line.text.split_once(marker).map(|(_, r)| r).unwrap_or("");
        Ok(Line {
            text: rest.trim().to_string(),
            at: line.at,
        })
    }

    /// Waits (at most `timeout`) for qemu to exit and returns its status (the guest's
    /// `poweroff -f` makes it exit 0). On timeout the VM keeps running (drop it to kill it).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(s)) => {
                    self.status = Some(s);
                    // Let the readers drain what qemu printed last.
                    self.console.wait_closed(Duration::from_secs(5));
                    return Ok(s);
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(None) => {
                    return Err(self.console.error(&format!(
                        "qemu did not exit within {timeout:?}: `{}`",
                        self.command
                    )))
                }
                Err(e) => return Err(Error::io(format!("waiting for `{}`", self.command), e)),
            }
        }
    }

    /// Waits for qemu to exit and fails unless it exited successfully.
    pub fn expect_clean_exit(&mut self, timeout: Duration) -> Result<()> {
        let s = self.wait_exit(timeout)?;
        if s.success() {
            Ok(())
        } else {
            Err(self
                .console
                .error(&format!("qemu exited with {s}: `{}`", self.command)))
        }
    }

    /// Kills qemu (if it still runs) and reaps it.
    pub fn kill(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }

    /// Time since qemu was started (console line stamps count from the same instant).
    pub fn elapsed(&self) -> Duration {
        self.console.started().elapsed()
    }

    /// The console, for custom waits.
    pub fn console(&mut self) -> &mut Console {
        &mut self.console
    }

    /// The whole console transcript so far.
    pub fn transcript(&self) -> String {
        self.console.transcript()
    }

    /// Types `line` and Enter on the guest's serial console.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        use std::io::Write;
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| Error::new("the VM has no console input"))?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .map_err(|e| Error::io(format!("typing {line:?} on the console"), e))
    }

    /// The qemu command line.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// qemu's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for VmRun {
    fn drop(&mut self) {
        self.kill();
    }
}

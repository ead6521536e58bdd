//! Child processes that never outlive their test.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// A running child process; killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    name: String,
}

impl Proc {
    /// Spawns `cmd`, naming it `name` in messages.
    pub fn spawn(mut cmd: Command, name: &str) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({cmd:?}): {e}"));
        Proc {
            child: Some(child),
            name: name.to_string(),
        }
    }

    /// The child, while it has not been killed.
    pub fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .unwrap_or_else(|| panic!("{} was already killed", self.name))
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        let name = self.name.clone();
        self.child()
            .try_wait()
            .unwrap_or_else(|e| panic!("cannot poll {name}: {e}"))
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_wait().is_none()
    }

    /// Waits for it to exit, at most `timeout` (then kills it and panics).
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let name = self.name.clone();
        let status = crate::wait::until(timeout, &format!("{name} to exit"), || self.try_wait());
        self.child = None;
        status
    }

    /// Sends SIGKILL and reaps it. Does nothing if already killed.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs `cmd` to the end with stdout and stderr captured (through files in `scratch`, so a
/// chatty child never blocks on a full pipe); kills it and panics after `timeout`.
pub fn run(cmd: Command, scratch: &Path, timeout: Duration) -> Output {
    match try_run(cmd, scratch, timeout) {
        Ok(out) => out,
        Err(why) => panic!("{why}"),
    }
}

/// [`run`], but a child that does not finish within `timeout` is killed and said (`Err`), not
/// a panic: for a client known to hang now and then (headless Chromium), tried again.
pub fn try_run(mut cmd: Command, scratch: &Path, timeout: Duration) -> Result<Output, String> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out_path = scratch.join(format!("run-{n}.stdout"));
    let err_path = scratch.join(format!("run-{n}.stderr"));
    let out = File::create(&out_path).expect("cannot create stdout file");
    let err = File::create(&err_path).expect("cannot create stderr file");
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let shown = format!("{cmd:?}");
    let started = Instant::now();
    let mut p = Proc::spawn(cmd, &shown);
    let deadline = started + timeout;
    let status = loop {
        if let Some(s) = p.try_wait() {
            break s;
        }
        if Instant::now() >= deadline {
            p.kill();
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            let _ = std::fs::remove_file(&out_path);
            let _ = std::fs::remove_file(&err_path);
            return Err(format!(
                "{shown} did not finish within {timeout:?}; killed it. stderr:\n{stderr}"
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    p.child = None;
    let stdout = std::fs::read(&out_path).unwrap_or_default();
    let stderr = std::fs::read(&err_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    let _ = std::fs::remove_file(&err_path);
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

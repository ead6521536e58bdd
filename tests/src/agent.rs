//! One `shard-agent` daemon, started and stopped by a test.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::bins::bin;
use crate::proc::Proc;

/// How long an agent may take to print `listening on`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A fresh loopback address for one agent: `127.A.B.C`, `A` from the process id (tests in other
/// processes get other ranges), `B.C` from a counter (tests in this process get other hosts).
pub fn fresh_ip() -> Ipv4Addr {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let a = 1 + (std::process::id() % 250) as u8;
    let b = (n / 250 % 256) as u8;
    let c = 2 + (n % 250) as u8;
    Ipv4Addr::new(127, a, b, c)
}

/// How an agent process is started: the native `shard-agent`, or another program that runs it
/// (Wine with the Windows build, see [`crate::wine`]).
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The program to run.
    pub program: PathBuf,
    /// Its arguments before the agent's own.
    pub args: Vec<OsString>,
    /// Extra environment.
    pub env: Vec<(OsString, OsString)>,
    /// Whether the agent wants its directory as a Windows path ([`crate::wine::windows_path`]).
    pub windows_paths: bool,
}

impl Launcher {
    /// The native `shard-agent` binary.
    pub fn native() -> Launcher {
        Launcher {
            program: bin("shard-agent"),
            args: Vec::new(),
            env: Vec::new(),
            windows_paths: false,
        }
    }

    /// The command, without the agent's own arguments.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args).envs(self.env.iter().cloned());
        cmd
    }

    /// A local path as the agent must be given it.
    pub fn path_arg(&self, p: &Path) -> OsString {
        if self.windows_paths {
            crate::wine::windows_path(p).into()
        } else {
            p.as_os_str().to_owned()
        }
    }
}

/// A running (or killed) `shard-agent`; killed when dropped.
#[derive(Debug)]
pub struct Agent {
    name: String,
    addr: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
    owner: String,
    extra: Vec<String>,
    launcher: Launcher,
    proc: Option<Proc>,
}

impl Agent {
    /// Starts an agent named `name` owned by `owner`, with its directory `base/name`, its log
    /// `base/name.log`, on a fresh loopback address and port 0. `extra` flags are passed on
    /// (e.g. `["--quota", "1M"]`).
    pub fn start(base: &Path, name: &str, owner: &str, extra: &[&str]) -> Agent {
        Agent::start_with(base, name, owner, extra, Launcher::native())
    }

    /// [`Agent::start`] with another [`Launcher`] (a Windows agent under Wine).
    pub fn start_with(
        base: &Path,
        name: &str,
        owner: &str,
        extra: &[&str],
        launcher: Launcher,
    ) -> Agent {
        let mut a = Agent {
            name: name.to_string(),
            addr: SocketAddr::from((fresh_ip(), 0)),
            dir: base.join(name),
            log: base.join(format!("{name}.log")),
            owner: owner.to_string(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            launcher,
            proc: None,
        };
        a.launch(START_TIMEOUT);
        a
    }

    /// Starts an agent like [`Agent::start`], but on `addr` (e.g. where another agent was: a
    /// PC reinstalled with a fresh shard directory at a known address).
    pub fn start_on(base: &Path, name: &str, owner: &str, addr: SocketAddr) -> Agent {
        let mut a = Agent {
            name: name.to_string(),
            addr,
            dir: base.join(name),
            log: base.join(format!("{name}.log")),
            owner: owner.to_string(),
            extra: Vec::new(),
            launcher: Launcher::native(),
            proc: None,
        };
        a.launch(START_TIMEOUT);
        a
    }

    /// Address `IP:PORT` it listens on (kept while killed, reused by [`Agent::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// [`Agent::addr`] as text, the way `--agents` takes it.
    pub fn addr_str(&self) -> String {
        self.addr.to_string()
    }

    /// Its shard directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the file collecting its stderr (over restarts).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything it has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::id)
    }

    /// Its resident memory in KiB (`VmRSS`), while it runs (Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Stops it with SIGSTOP (it keeps its connections but answers nothing, like a PC that
    /// hangs) until the guard is dropped.
    pub fn freeze(&self) -> Frozen {
        let pid = self.pid().expect("the agent runs").to_string();
        let stopped = std::process::Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .expect("cannot run kill");
        assert!(stopped.success(), "cannot stop agent {}", self.name);
        Frozen(pid)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.proc.as_mut().is_some_and(Proc::is_running)
    }

    /// Kills it (SIGKILL) and waits for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts it again on the same address and port, over the same directory.
    pub fn restart(&mut self) {
        self.kill();
        self.launch(START_TIMEOUT);
    }

    /// Starts it again on the same address and directory, now owned by `owner`.
    pub fn restart_with_owner(&mut self, owner: &str) {
        self.owner = owner.to_string();
        self.restart();
    }

    fn launch(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.try_launch(deadline) {
                Ok(()) => return,
                // A port just freed may still be busy for a moment: try again until the deadline.
                Err(why) if self.addr.port() != 0 && Instant::now() < deadline => {
                    let _ = why;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(why) => panic!(
                    "agent {} did not start: {why}\nits log:\n{}",
                    self.name,
                    self.log()
                ),
            }
        }
    }

    fn try_launch(&mut self, deadline: Instant) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("cannot open {}: {e}", self.log.display()))?;
        let mut cmd = self.launcher.command();
        cmd.arg("--dir")
            .arg(self.launcher.path_arg(&self.dir))
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--owner")
            .arg(&self.owner)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut p = Proc::spawn(cmd, &format!("shard-agent {}", self.name));
        let stdout = p.child().stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        // Reads the `listening on` line, then drains stdout until the agent exits.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            let mut sent = false;
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.trim().strip_prefix("listening on ") {
                        let _ = tx.send(rest.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let left = deadline.saturating_duration_since(Instant::now());
        let bound = match rx.recv_timeout(left) {
            Ok(a) => a,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err("no `listening on` line before the deadline".into())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = p.wait(Duration::from_secs(5));
                return Err(format!(
                    "it exited ({status}) without printing `listening on`"
                ));
            }
        };
        let addr: SocketAddr = bound
            .parse()
            .map_err(|e| format!("bad `listening on {bound}`: {e}"))?;
        if addr.ip() != self.addr.ip() || (self.addr.port() != 0 && addr.port() != self.addr.port())
        {
            return Err(format!("asked to listen on {}, it says {addr}", self.addr));
        }
        self.addr = addr;
        self.proc = Some(p);
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A stopped agent ([`Agent::freeze`]), continued when dropped.
pub struct Frozen(String);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0])
            .status();
    }
}

//! A client PC that can be cut off the network: a network namespace joined to the test's own
//! by a veth pair, and a `shard-agent` running inside it.
//!
//! Root only (`ip netns`); [`NetNs::create`] says why it cannot, so a test can skip itself with
//! a clear message. Names and addresses are unique per process and namespace (`sa<pid><n>`,
//! `10.<200+n>.<pid%250>.0/30`), so tests run in parallel. Everything is removed on drop: the
//! agent is killed first, then the namespace (which takes its end of the veth pair with it), then
//! the host end if it is still there.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::bins::bin;
use crate::proc::Proc;

/// A network namespace with a veth pair to the host; removed when dropped.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    host_if: String,
    ns_if: String,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl NetNs {
    /// Makes a namespace with a veth pair to the host, both ends up with addresses. Fails (with
    /// why) when not root or when `ip netns` does not work here.
    pub fn create() -> Result<NetNs, String> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Root? The effective uid, from /proc (this crate has no libc).
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("");
        if euid != "0" {
            return Err(format!(
                "not root (euid {euid:?}): network namespaces need root"
            ));
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("{}{n}", pid % 100_000);
        let p = (pid % 250) as u8;
        let net = 200 + (n % 50) as u8;
        let ns = NetNs {
            name: format!("sa-test-{tag}"),
            host_if: format!("sah{tag}"),
            ns_if: format!("san{tag}"),
            host_ip: Ipv4Addr::new(10, net, p, 1),
            ns_ip: Ipv4Addr::new(10, net, p, 2),
        };
        ip(&["netns", "add", &ns.name])?;
        // From here on, drop cleans up whatever was made.
        ns.setup()?;
        Ok(ns)
    }

    fn setup(&self) -> Result<(), String> {
        let host_cidr = format!("{}/30", self.host_ip);
        let ns_cidr = format!("{}/30", self.ns_ip);
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_if,
        ])?;
        ip(&["link", "set", &self.ns_if, "netns", &self.name])?;
        ip(&["addr", "add", &host_cidr, "dev", &self.host_if])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        ip(&["netns", "exec", &self.name, "ip", "link", "set", "lo", "up"])?;
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "addr",
            "add",
            &ns_cidr,
            "dev",
            &self.ns_if,
        ])?;
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.ns_if,
            "up",
        ])?;
        Ok(())
    }

    /// The namespace's address (what an agent inside listens on).
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Cuts the namespace off: the host end of the veth pair goes down (packets in flight are
    /// lost; the agent inside keeps running and sees nothing).
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Joins it again (the host end up; the route comes back with the address).
    pub fn join(&self) {
        ip(&["link", "set", &self.host_if, "up"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// A `shard-agent` inside a [`NetNs`]; killed when dropped (drop it before the namespace).
#[derive(Debug)]
pub struct NsAgent {
    addr: SocketAddr,
    dir: PathBuf,
    log: PathBuf,
    proc: Proc,
}

impl NsAgent {
    /// Starts an agent owned by `owner` in `ns`, on the namespace's address, port 0, with its
    /// directory `base/name` and log `base/name.log`; waits (15 s at most) for `listening on`.
    pub fn start(ns: &NetNs, base: &Path, name: &str, owner: &str, extra: &[&str]) -> NsAgent {
        let dir = base.join(name);
        let log = base.join(format!("{name}.log"));
        let log_file = std::fs::File::create(&log).expect("cannot create the agent log");
        let mut cmd = ns.command(&bin("shard-agent"));
        cmd.arg("--dir")
            .arg(&dir)
            .arg("--listen")
            .arg(format!("{}:0", ns.ns_ip()))
            .arg("--owner")
            .arg(owner)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file);
        let mut proc = Proc::spawn(cmd, &format!("shard-agent {name} in {}", ns.name()));
        let stdout = proc.child().stdout.take().expect("stdout is piped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !sent {
                    if let Some(rest) = line.trim().strip_prefix("listening on ") {
                        let _ = tx.send(rest.trim().to_string());
                        sent = true;
                    }
                }
            }
        });
        let bound = rx
            .recv_timeout(Duration::from_secs(15))
            .unwrap_or_else(|e| {
                panic!(
                    "agent {name} in {} did not say `listening on` ({e}); its log:\n{}",
                    ns.name(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            });
        let addr: SocketAddr = bound
            .parse()
            .unwrap_or_else(|e| panic!("bad `listening on {bound}`: {e}"));
        NsAgent {
            addr,
            dir,
            log,
            proc,
        }
    }

    /// `IP:PORT` it listens on.
    pub fn addr_str(&self) -> String {
        self.addr.to_string()
    }

    /// Its directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Kills it.
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

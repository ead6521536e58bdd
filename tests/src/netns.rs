//! A client PC that can be cut off the network: a network namespace joined to the test's own
//! by a veth pair, and a `shard-agent` running inside it.
//!
//! Root only (`ip netns`); [`NetNs::create`] says why it cannot, so a test can skip itself with
//! a clear message. Names and addresses are unique per process and namespace (`sa<pid><n>`,
//! `10.<200+n>.<pid%250>.0/30`), so tests run in parallel. Everything is removed on drop: the
//! agent is killed first, then the namespace (which takes its end of the veth pair with it), then
//! the host end if it is still there, and the blackhole route that keeps the namespace's traffic
//! on this machine.

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
        let veth = [
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_if,
        ];
        ip(&veth)?;
        ip(&["link", "set", &self.ns_if, "netns", &self.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_ip),
            "dev",
            &self.host_if,
        ])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        self.inside(&["link", "set", "lo", "up"])?;
        self.inside(&[
            "addr",
            "add",
            &format!("{}/30", self.ns_ip),
            "dev",
            &self.ns_if,
        ])?;
        self.inside(&["link", "set", &self.ns_if, "up"])?;
        // Should the connected route ever go (the host end down), traffic for the namespace
        // must die here rather than follow the default route off this machine.
        ip(&["route", "add", "blackhole", &self.net(), "metric", "4000"])?;
        Ok(())
    }

    /// Runs `ip ARGS` inside the namespace.
    fn inside(&self, args: &[&str]) -> Result<(), String> {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// The /30 network of the pair.
    fn net(&self) -> String {
        let o = self.host_ip.octets();
        format!("{}.{}.{}.{}/30", o[0], o[1], o[2], o[3] & !3)
    }

    /// The namespace's address (what an agent inside listens on).
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The MAC of the namespace's end of the veth pair (`3c:52:...`, lower case): what an
    /// agent inside reports for Wake-on-LAN.
    pub fn ns_mac(&self) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "cat"])
            .arg(format!("/sys/class/net/{}/address", self.ns_if))
            .output()
            .expect("cannot run ip netns exec");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Cuts the namespace off: the namespace's end of the veth pair goes down. Packets to it
    /// are dropped silently (the host keeps its route, marked `linkdown`: nothing answers, no
    /// reset, like a PC whose cable was pulled); the agent inside keeps running. The host end
    /// stays up on purpose: with it down the route would go and packets would follow the
    /// default route off the machine (the blackhole route catches that too).
    pub fn cut(&self) {
        self.inside(&["link", "set", &self.ns_if, "down"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// Limits the pair to `rate` (tc syntax, e.g. `40mbit`) both ways with a token bucket, so an
    /// operation through it lasts long enough to be cut in the middle.
    pub fn shape(&self, rate: &str) {
        let tbf = |dev: &str| {
            [
                "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "64kb",
                "latency", "400ms",
            ]
            .map(String::from)
        };
        run_tc(Command::new("tc").args(tbf(&self.host_if)));
        run_tc(
            Command::new("ip")
                .args(["netns", "exec", &self.name, "tc"])
                .args(tbf(&self.ns_if)),
        );
    }

    /// Bytes the host end has sent and received so far.
    pub fn traffic(&self) -> u64 {
        ["rx_bytes", "tx_bytes"]
            .iter()
            .map(|f| {
                let p = format!("/sys/class/net/{}/statistics/{f}", self.host_if);
                std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Joins it again.
    pub fn join(&self) {
        self.inside(&["link", "set", &self.ns_if, "up"])
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

fn run_tc(cmd: &mut Command) {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run tc: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["route", "del", "blackhole", &self.net(), "metric", "4000"]);
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

    /// Waits (up to `timeout`) until the agent accepts a TCP connection: after
    /// [`NetNs::join`] the link takes a moment to carry again (carrier, neighbour entry).
    pub fn wait_reachable(&self, timeout: Duration) {
        crate::wait::until_true(
            timeout,
            "the agent in the namespace to be reachable",
            || std::net::TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok(),
        );
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

//! A real `shard-agent` process answers `STAT` to our client, with the Wake-on-LAN fields of
//! the interface it was reached on: none over loopback (the only network a test may use here;
//! the lookup on a real interface is tested in `netinfo`'s unit tests, without traffic).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use sa_core::keys::MasterKey;
use sa_core::store::{AgentClient, ShardRead};

/// Kills the agent when the test ends, passed or failed.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_real_agent_answers_stat_without_wake_fields_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let keys = MasterKey::generate().unwrap().derive();
    let owner = keys.owner_id().to_string();
    let mut child = Command::new(env!("CARGO_BIN_EXE_shard-agent"))
        .args(["--listen", "127.0.0.1:0", "--owner", &owner, "--dir"])
        .arg(dir.path().join("shards"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _agent = Killed(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the agent did not say where it listens within 15 s");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();

    let client = AgentClient::connect(&addr, Arc::new(keys)).await.unwrap();
    let stat = client.stat().await.unwrap();
    assert_eq!(stat.agent_id, client.agent_id());
    assert!(stat.fs_free.is_some(), "{stat:?}");
    assert_eq!(
        (stat.mac, stat.broadcast),
        (None, None),
        "loopback has no MAC"
    );
}

/// Runs `ip ARGS`, with the reason when it fails.
fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip`: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A network namespace joined to ours by a veth pair on a private /30 that never leaves this
/// machine (a blackhole route catches it should the link go); removed when dropped.
struct Ns {
    name: String,
    host_if: String,
    net: String,
}

impl Ns {
    fn create(tag: &str, net: [u8; 3]) -> Result<Ns, String> {
        let [a, b, c] = net;
        let ns = Ns {
            name: format!("sa-wol-{tag}"),
            host_if: format!("swh{tag}"),
            net: format!("{a}.{b}.{c}.0/30"),
        };
        ip(&["netns", "add", &ns.name])?;
        let ns_if = format!("swn{tag}");
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        ip(&["route", "add", "blackhole", &ns.net, "metric", "4000"])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ])?;
        ip(&["link", "set", &ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{a}.{b}.{c}.1/30"),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        inside(&[
            "addr",
            "add",
            &format!("{a}.{b}.{c}.2/30"),
            "broadcast",
            "+",
            "dev",
            &ns_if,
        ])?;
        inside(&["link", "set", &ns_if, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["route", "del", "blackhole", &self.net, "metric", "4000"]);
    }
}

/// Reached on a real (virtual) Ethernet card, the agent reports that card's MAC, as the kernel
/// inside its namespace shows it, and the subnet's broadcast address. Needs root for the
/// namespace; says so and checks nothing more without it.
#[tokio::test]
async fn an_agent_reached_on_ethernet_reports_its_mac_and_broadcast() {
    let pid = std::process::id();
    let tag = (pid % 100_000).to_string();
    let ns = match Ns::create(&tag, [10, 199, (pid % 250) as u8]) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: cannot make a network namespace here ({why})");
            return;
        }
    };
    let ns_ip = format!("10.199.{}.2", pid % 250);
    let dir = tempfile::tempdir().unwrap();
    let keys = MasterKey::generate().unwrap().derive();
    let owner = keys.owner_id().to_string();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, env!("CARGO_BIN_EXE_shard-agent")])
        .args([
            "--listen",
            &format!("{ns_ip}:0"),
            "--owner",
            &owner,
            "--dir",
        ])
        .arg(dir.path().join("shards"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let agent = Killed(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(15))
        .expect("the agent did not say where it listens within 15 s");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_string();

    let client = AgentClient::connect(&addr, Arc::new(keys)).await.unwrap();
    let stat = client.stat().await.unwrap();
    // The kernel's word for the card's MAC, inside the namespace (`ip netns exec` runs `cat`).
    let sys = ip(&[
        "netns",
        "exec",
        &ns.name,
        "cat",
        &format!("/sys/class/net/swn{tag}/address"),
    ])
    .unwrap();
    let want: Vec<u8> = sys
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    assert_eq!(stat.mac.map(|m| m.to_vec()), Some(want), "{stat:?}");
    assert_eq!(
        stat.broadcast,
        Some(format!("10.199.{}.3", pid % 250).parse().unwrap()),
        "{stat:?}"
    );
    drop(client);
    drop(agent);
    drop(ns);
}

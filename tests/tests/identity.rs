//! Issue 7, transport: agents speak TLS 1.3 only, with their own key pinned in the catalog's
//! agent book; a changed identity is refused until accepted on purpose; `openssl s_client` (a
//! TLS client we did not write) sees the handshake; garbage inside TLS drops only that
//! connection. Issue 6, membership: `agents add` and `agents list`.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use sa_tests::cluster::{expect_fail, expect_ok, json, shown, str_of};
use sa_tests::proc::Proc;
use sa_tests::wait::until;
use sa_tests::{sha256, Cluster, ImageSpec, MIB};
use serde_json::Value;

const K2M1: [&str; 4] = ["--data-shards", "2", "--parity-shards", "1"];

fn agents_list(c: &Cluster, agents: &str) -> Vec<Value> {
    let v = json(
        &c.sa_agents(&["agents", "list", "--json"], agents),
        "agents list",
    );
    v.as_array().cloned().unwrap_or_default()
}

fn row<'a>(rows: &'a [Value], addr: &str) -> &'a Value {
    rows.iter()
        .find(|r| r["addr"] == addr)
        .unwrap_or_else(|| panic!("no row for {addr} in {rows:?}"))
}

#[test]
fn changed_identity_is_refused_until_accepted() {
    let mut c = Cluster::start(3);
    let img = ImageSpec::random(6 * MIB, 0x1d_0001).write(&c.path("disk.img"));
    let mut args = K2M1.to_vec();
    args.extend(["--volume", "pins"]);
    let snap = str_of(&c.snapshot(&img.path, &args), "snapshot").to_string();

    // Every agent was pinned on first contact, and the book is on every agent.
    let a0 = c.agents[0].addr_str();
    let rows = agents_list(&c, &a0);
    assert_eq!(rows.len(), 3, "{rows:?}");
    let pinned = row(&rows, &a0)["identity"].as_str().unwrap().to_string();
    let id = row(&rows, &a0)["id"].as_str().unwrap().to_string();
    assert_eq!(row(&rows, &a0)["pinned_by"], "first-contact");

    // Same address, same agent id, new identity key: what a machine posing as the agent (or a
    // directory restored without its key) looks like.
    c.agents[0].kill();
    std::fs::remove_file(c.agents[0].dir().join("identity.key")).unwrap();
    c.agents[0].restart();

    // Through it, it is refused (its own copy of the book pins the old key), and the book
    // names the other members: list works through them and says what is wrong with it.
    let out = c.sa_agents(&["list"], &a0);
    let text = expect_ok(&out, "list through the changed agent");
    assert!(text.contains(&snap), "{}", shown(&out));
    let msg = shown(&out);
    for want in ["identity", &pinned[..16], "agents accept", &id] {
        assert!(
            msg.contains(want),
            "the refusal must mention {want}:\n{msg}"
        );
    }
    // With no other member answering, it is refused outright.
    c.agents[1].kill();
    c.agents[2].kill();
    let out = c.sa_agents(&["list"], &a0);
    let msg = expect_fail(&out, Some(1), "list with only the changed agent up");
    for want in ["identity", &pinned[..16], "agents accept", &id] {
        assert!(
            msg.contains(want),
            "the refusal must mention {want}:\n{}",
            shown(&out)
        );
    }
    c.agents[1].restart();
    c.agents[2].restart();
    // With the others, it is left out: the restore still comes back whole (m = 1), and verify
    // says the snapshot is degraded.
    let target = c.path("restored.img");
    c.restore(&snap, &target, &c.agents_arg());
    assert_eq!(sha256(&target), img.sha256());
    let out = c.sa(&["verify", &snap]);
    assert_eq!(out.status.code(), Some(2), "{}", shown(&out));
    assert!(shown(&out).contains("identity"), "{}", shown(&out));

    // Accepting on purpose pins the new key; everything is sound again.
    let out = c.sa_agents(&["agents", "accept", &id[..12], "--json"], &a0);
    let v: Value = serde_json::from_str(&expect_ok(&out, "agents accept")).unwrap();
    assert_eq!(v["replaced"], pinned.as_str());
    let out = c.sa(&["verify", &snap]);
    assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    let rows = agents_list(&c, &c.agents[1].addr_str());
    let r = row(&rows, &a0);
    assert_eq!(r["pinned_by"], "deliberate");
    assert_ne!(r["identity"], pinned.as_str());
    assert_eq!(r["reachable"], true);
}

#[test]
fn agents_add_and_list() {
    let mut c = Cluster::start(4);
    let img = ImageSpec::random(4 * MIB, 0x1d_0002).write(&c.path("disk.img"));
    let first3 = sa_tests::cluster::join_addrs(&c.agents[..3]);
    let mut args: Vec<&OsStr> = vec![OsStr::new("snapshot"), img.path.as_os_str()];
    args.extend(K2M1.iter().map(OsStr::new));
    let out = c.sa_agents(&args, &first3);
    expect_ok(&out, "snapshot on three agents");

    let a3 = c.agents[3].addr_str();
    let out = c.sa_agents(&["agents", "add", &a3], &c.agents[0].addr_str());
    let text = expect_ok(&out, "agents add");
    assert!(text.contains("added agent"), "{text}");
    // The book on any one member names all four, each answering.
    let rows = agents_list(&c, &c.agents[2].addr_str());
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().all(|r| r["reachable"] == true), "{rows:?}");
    assert_eq!(row(&rows, &a3)["pinned_by"], "deliberate");
    // One gone: listed as unreachable, with the reason.
    c.agents[3].kill();
    let rows = agents_list(&c, &c.agents[0].addr_str());
    let r = row(&rows, &a3);
    assert_eq!(r["reachable"], false, "{r}");
    assert!(r["error"].as_str().is_some_and(|e| !e.is_empty()), "{r}");
    // Adding an address where nothing answers fails clearly.
    let out = c.sa_agents(&["agents", "add", "127.0.0.1:1"], &c.agents[0].addr_str());
    let msg = expect_fail(&out, Some(1), "agents add of a dead address");
    assert!(msg.contains("cannot add 127.0.0.1:1"), "{}", shown(&out));
}

/// `openssl s_client` with `args`, stdin piped, stdout/stderr to files under the cluster dir.
fn s_client(c: &Cluster, addr: &str, args: &[&str], name: &str) -> (Proc, std::path::PathBuf) {
    let out = c.path(&format!("{name}.out"));
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-connect", addr])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(c.path(&format!("{name}.err"))).unwrap());
    (Proc::spawn(cmd, name), out)
}

fn read_lossy(p: &std::path::Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}

#[test]
fn openssl_sees_tls13_and_the_agents_own_key_and_plain_tcp_gets_nothing() {
    let mut c = Cluster::start(1);
    let addr = c.agents[0].addr_str();
    let rows = agents_list(&c, &addr);
    let identity = row(&rows, &addr)["identity"].as_str().unwrap().to_string();

    // A full TLS 1.3 handshake, Ed25519, the certificate naming the agent's key.
    let (mut p, out) = s_client(&c, &addr, &["-tls1_3", "-showcerts"], "s_client13");
    drop(p.child().stdin.take()); // EOF: s_client ends after the handshake
    let status = p.wait(Duration::from_secs(20));
    let text = read_lossy(&out) + &read_lossy(&c.path("s_client13.err"));
    assert!(status.success(), "s_client failed:\n{text}");
    assert!(text.contains("TLSv1.3"), "{text}");
    assert!(text.to_ascii_lowercase().contains("ed25519"), "{text}");
    assert!(
        text.contains(&format!("sa-agent {}", &identity[..16])),
        "the certificate names the agent's key {identity}:\n{text}"
    );

    // TLS 1.2 is refused.
    let (mut p, out) = s_client(&c, &addr, &["-tls1_2"], "s_client12");
    drop(p.child().stdin.take());
    let status = p.wait(Duration::from_secs(20));
    let text = read_lossy(&out) + &read_lossy(&c.path("s_client12.err"));
    assert!(!status.success(), "TLS 1.2 must be refused:\n{text}");

    // Inside TLS: a hello is answered with a challenge; then an absurd frame length where the
    // authentication should be closes the connection (s_client exits).
    let (mut p, out) = s_client(&c, &addr, &["-tls1_3", "-quiet"], "s_client_garbage");
    let mut stdin = p.child().stdin.take().unwrap();
    let mut hello = vec![11, 0, 0, 0, 1];
    hello.extend_from_slice(b"SA-AGENT");
    hello.extend_from_slice(&2u16.to_le_bytes());
    stdin.write_all(&hello).unwrap();
    stdin.flush().unwrap();
    let challenge = until(Duration::from_secs(10), "a challenge through TLS", || {
        let b = std::fs::read(&out).unwrap_or_default();
        (b.len() >= 5 + 2 + 16 + 32).then_some(b)
    });
    assert_eq!(challenge[4], 2, "challenge frame kind: {challenge:?}");
    stdin.write_all(&[0xff, 0xff, 0xff, 0x7f, 3]).unwrap();
    stdin.flush().unwrap();
    until(
        Duration::from_secs(10),
        "the agent to drop the connection",
        || p.try_wait(),
    );
    drop(stdin);

    // Plain TCP (the old protocol): no challenge, connection dropped.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    // At most a TLS alert (content type 21) comes back, never a frame.
    assert!(
        got.is_empty() || got[0] == 21,
        "a plain TCP client must get nothing but a TLS alert: {got:?}"
    );

    assert!(c.agents[0].is_running(), "{}", c.agents[0].log());
    let out = c.sa(&["agents", "list"]);
    expect_ok(&out, "agents list after garbage");
    let log = c.agents[0].log();
    assert!(log.contains("TLS handshake failed"), "{log}");
}

#[test]
fn floods_of_half_open_and_hostile_connections_leave_the_agent_serving_in_bounded_memory() {
    let c = Cluster::start(1);
    let addr = c.agents[0].addr_str();
    expect_ok(&c.sa(&["agents", "list"]), "agents list before");
    let before = c.agents[0].rss_kib().expect("agent RSS");
    // 150 connections at once: silent ones (half-open handshakes), ones that claim a 2 GiB
    // frame in clear, and ones that send a TLS record header announcing a huge record.
    let mut held = Vec::new();
    for i in 0..150 {
        let mut s = TcpStream::connect(&addr).unwrap();
        match i % 3 {
            0 => {}
            1 => s.write_all(&[0xff, 0xff, 0xff, 0x7f, 1]).unwrap(),
            _ => s
                .write_all(&[22, 3, 1, 0xff, 0xff, 1, 0, 0xff, 0xff])
                .unwrap(),
        }
        held.push(s);
    }
    // While they are all open, the owner is served.
    expect_ok(&c.sa(&["agents", "list"]), "agents list during the flood");
    let during = c.agents[0].rss_kib().expect("agent RSS");
    assert!(
        during < before + 64 * 1024,
        "150 hostile connections grew the agent from {before} KiB to {during} KiB"
    );
    drop(held);
    expect_ok(&c.sa(&["agents", "list"]), "agents list after");
}

#[test]
fn members_join_snapshots_and_a_retired_agent_is_drained() {
    let mut c = Cluster::start(4);
    let img = ImageSpec::random(8 * MIB, 0x1d_0003).write(&c.path("disk.img"));
    let (a0, a1, a3) = (
        c.agents[0].addr_str(),
        c.agents[1].addr_str(),
        c.agents[3].addr_str(),
    );
    let first3 = sa_tests::cluster::join_addrs(&c.agents[..3]);
    let mut args: Vec<&OsStr> = vec![OsStr::new("snapshot"), img.path.as_os_str()];
    args.extend(K2M1.iter().map(OsStr::new));
    args.push(OsStr::new("--json"));
    let first = json(&c.sa_agents(&args, &first3), "snapshot on three agents");
    let first = str_of(&first, "snapshot").to_string();
    expect_ok(
        &c.sa_agents(&["agents", "add", &a3], &a0),
        "agents add the fourth",
    );
    // Given one address, the snapshot uses every member of the book.
    let img2 = ImageSpec::random(8 * MIB, 0x1d_0004).write(&c.path("disk2.img"));
    let mut args2: Vec<&OsStr> = vec![OsStr::new("snapshot"), img2.path.as_os_str()];
    args2.extend(K2M1.iter().map(OsStr::new));
    args2.push(OsStr::new("--json"));
    let second = json(&c.sa_agents(&args2, &a0), "snapshot given one agent");
    let second = str_of(&second, "snapshot").to_string();
    let listed = json(&c.sa_agents(&["list", "--json"], &a0), "list");
    let table = |id: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["snapshot"] == id)
            .map(|r| r["agents"].as_u64().unwrap())
            .unwrap()
    };
    assert_eq!(table(&second), 4, "{listed}");
    assert!(
        !sa_tests::scan::shard_files(c.agents[3].dir()).is_empty(),
        "the added agent holds shards"
    );

    // Retire a0: its shards are rebuilt elsewhere; then it may vanish for good.
    let id0 = row(&agents_list(&c, &a1), &a0)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = c.sa_agents(&["agents", "retire", &id0, "--json"], &a1);
    let v: Value = serde_json::from_str(&expect_ok(&out, "agents retire")).unwrap();
    assert!(v["repair"]["shards_rebuilt"].as_u64().unwrap() > 0, "{v}");
    c.agents[0].kill();
    std::fs::remove_dir_all(c.agents[0].dir()).unwrap();
    let rest = sa_tests::cluster::join_addrs(&c.agents[1..]);
    for snap in [&first, &second] {
        let out = c.sa_agents(&["verify", snap], &rest);
        assert_eq!(out.status.code(), Some(0), "{}", shown(&out));
    }
    let rows = agents_list(&c, &a1);
    assert_eq!(row(&rows, &a0)["state"], "retired", "{rows:?}");
    // Full redundancy again: one more agent may go and both snapshots still come back.
    c.agents[1].kill();
    for (i, (snap, want)) in [(&first, &img), (&second, &img2)].into_iter().enumerate() {
        let target = c.path(&format!("r{i}.img"));
        c.restore(snap, &target, &rest);
        assert_eq!(sha256(&target), want.sha256());
    }
}

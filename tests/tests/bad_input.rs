//! Bad input and hostile conditions: each must fail with a clear message (or, where the design
//! allows, succeed safely), and never leave data half-written or an agent broken.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use sa_tests::cluster::{expect_fail, shown, str_of, u64_of, ClusterOptions};
use sa_tests::proc::Proc;
use sa_tests::{json, scan, sha256, wait, Cluster, Key, MIB};

/// Asserts that no agent of `c` holds any shard file or catalog blob (but the agent book,
/// which pins each agent's identity on first contact, and the availability history, which
/// records who answered, whatever the command).
fn assert_nothing_stored(c: &Cluster, why: &str) {
    for a in &c.agents {
        let shards = scan::shard_files(a.dir());
        assert!(
            shards.is_empty(),
            "{why}: agent {} holds shard files {shards:?}",
            a.name()
        );
        let mut blobs = scan::files(&a.dir().join("blobs"));
        blobs.retain(|b| !b.ends_with("agents") && !b.ends_with("availability"));
        assert!(
            blobs.is_empty(),
            "{why}: agent {} holds catalog blobs {blobs:?}",
            a.name()
        );
    }
}

/// The snapshots `list --json` shows, by id.
fn listed(c: &Cluster) -> Vec<String> {
    let v = json(&c.sa(&["list", "--json"]), "sa-image list");
    let rows = v
        .as_array()
        .unwrap_or_else(|| panic!("list --json is not an array: {v}"));
    rows.iter()
        .map(|r| str_of(r, "snapshot").to_string())
        .collect()
}

fn snapshot_args(source: &Path) -> Vec<&OsStr> {
    vec![OsStr::new("snapshot"), source.as_os_str()]
}

#[test]
fn missing_source_is_named() {
    let c = Cluster::start(6);
    let source = c.path("no-such-disk.img");
    let out = c.sa(&snapshot_args(&source));
    let msg = expect_fail(&out, None, "snapshot of a missing source");
    assert!(
        msg.contains("no-such-disk.img"),
        "the error must name the source:\n{}",
        shown(&out)
    );
    assert!(
        ["no such file", "not found", "does not exist", "cannot open"]
            .iter()
            .any(|w| msg.contains(w)),
        "the error must say the source is missing:\n{}",
        shown(&out)
    );
    assert_nothing_stored(&c, "missing source");
}

#[test]
fn unreadable_source_is_named() {
    let c = Cluster::start(6);
    // Root reads any file whatever its mode: a directory is a source nobody can read as a volume.
    let dir = c.path("a-directory.img");
    std::fs::create_dir(&dir).unwrap();
    let out = c.sa(&snapshot_args(&dir));
    let msg = expect_fail(&out, None, "snapshot of a directory");
    assert!(
        msg.contains("a-directory.img"),
        "the error must name the source:\n{}",
        shown(&out)
    );
    assert!(
        [
            "directory",
            "not a block device",
            "not a regular file",
            "cannot read"
        ]
        .iter()
        .any(|w| msg.contains(w)),
        "the error must say why the source cannot be read:\n{}",
        shown(&out)
    );
    if !sa_tests::loopdev::is_root() {
        use std::os::unix::fs::PermissionsExt;
        let file = c.path("no-permission.img");
        std::fs::write(&file, vec![1u8; MIB as usize]).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o000)).unwrap();
        let out = c.sa(&snapshot_args(&file));
        let msg = expect_fail(&out, None, "snapshot of a file without read permission");
        assert!(
            msg.contains("no-permission.img") && msg.contains("permission"),
            "{}",
            shown(&out)
        );
    }
    assert_nothing_stored(&c, "unreadable source");
}

#[test]
fn source_size_not_a_multiple_of_512_is_refused() {
    let c = Cluster::start(6);
    let img = sa_tests::ImageSpec::random(MIB + 100, 0x5eed_0101).write(&c.path("odd.img"));
    let out = c.sa(&snapshot_args(&img.path));
    let msg = expect_fail(&out, None, "snapshot of an odd-sized source");
    assert!(
        msg.contains("512"),
        "the error must say sizes are multiples of 512:\n{}",
        shown(&out)
    );
    assert_nothing_stored(&c, "odd-sized source");
}

#[test]
fn fewer_agents_than_k_plus_m_is_refused_before_any_data_moves() {
    let c = Cluster::start(5);
    let img = sa_tests::ImageSpec::random(8 * MIB, 0x5eed_0102).write(&c.path("disk.img"));
    let out = c.sa(&snapshot_args(&img.path));
    let msg = expect_fail(&out, None, "snapshot onto 5 agents at k=4 m=2");
    assert!(
        msg.contains("agent")
            && (msg.contains('6') || msg.contains("k+m") || msg.contains("k + m")),
        "the error must say 6 agents are needed:\n{}",
        shown(&out)
    );
    assert_nothing_stored(&c, "too few agents");
}

/// One of seven agents is down: six are left for k + m = 6, so the snapshot places around it,
/// names it, and restores exactly with that agent still down.
#[test]
fn one_of_seven_agents_down_at_snapshot_time() {
    let mut c = Cluster::start(7);
    c.agents[2].kill();
    let img = sa_tests::ImageSpec::random(16 * MIB, 0x5eed_0103)
        .zero_mib(4..8)
        .write(&c.path("disk.img"));
    let mut args = snapshot_args(&img.path);
    args.push(OsStr::new("--json"));
    let out = c.sa(&args);
    let v = json(&out, "snapshot around a down agent");
    let down = c.agents[2].addr_str();
    assert!(
        v["agents_unreachable"].as_array().is_some_and(|a| a
            .iter()
            .any(|x| x.as_str().is_some_and(|x| x.contains(&down)))),
        "the report names the agent that is down ({down}): {v}"
    );
    assert!(
        scan::shard_files(c.agents[2].dir()).is_empty(),
        "shards went to a dead agent?"
    );
    let target = c.path("restored.img");
    let r = c.restore(str_of(&v, "snapshot"), &target, &c.agents_arg());
    assert_eq!(
        sha256(&target),
        img.sha256(),
        "restore of a snapshot placed around a down agent: {r}"
    );
}

#[test]
fn full_agent_is_reported() {
    let c = Cluster::start_with(ClusterOptions {
        agents: 6,
        agent_args: vec![(2, vec!["--quota".into(), "1M".into()])],
        ..Default::default()
    });
    let img = sa_tests::ImageSpec::random(16 * MIB, 0x5eed_0104).write(&c.path("disk.img"));
    let out = c.sa(&snapshot_args(&img.path));
    let msg = expect_fail(&out, None, "snapshot onto a full agent");
    assert!(
        msg.contains("quota") || msg.contains("full"),
        "the error must say an agent is full:\n{}",
        shown(&out)
    );
    assert!(
        listed(&c).is_empty(),
        "a failed snapshot must not be listed"
    );
}

/// The agents accept the key's owner, but the catalog was written under another key: the
/// client must say the key is wrong, not list nothing or print garbage.
#[test]
fn wrong_key_is_reported() {
    let mut c = Cluster::start(6);
    let img = sa_tests::ImageSpec::random(4 * MIB, 0x5eed_0105).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    let other = Key::generate(&c.path("other.key"));
    for a in &mut c.agents {
        a.restart_with_owner(&other.owner);
    }
    let out = c.sa_with(&["list"], &other.path, &c.agents_arg());
    let msg = expect_fail(&out, None, "list with the wrong key");
    assert!(
        msg.contains("key"),
        "the error must be about the key:\n{}",
        shown(&out)
    );
    let target = c.path("restored.img");
    let args = [
        OsStr::new("restore"),
        OsStr::new("latest"),
        OsStr::new("--to"),
        target.as_os_str(),
    ];
    let out = c.sa_with(&args, &other.path, &c.agents_arg());
    let msg = expect_fail(&out, None, "restore with the wrong key");
    assert!(
        msg.contains("key"),
        "the error must be about the key:\n{}",
        shown(&out)
    );
}

/// Agents that belong to someone else refuse us, and say so.
#[test]
fn strangers_agents_refuse() {
    let keys = tempfile::tempdir().unwrap();
    let stranger = Key::generate(&keys.path().join("stranger.key"));
    let c = Cluster::start_with(ClusterOptions {
        agents: 6,
        owner: Some(stranger.owner.clone()),
        ..Default::default()
    });
    let img = sa_tests::ImageSpec::random(4 * MIB, 0x5eed_0106).write(&c.path("disk.img"));
    let out = c.sa(&snapshot_args(&img.path));
    let msg = expect_fail(&out, None, "snapshot onto a stranger's agents");
    assert!(
        msg.contains("owner"),
        "the error must say the agent belongs to another owner:\n{}",
        shown(&out)
    );
    assert_nothing_stored(&c, "stranger's agents");
    let out = c.sa(&["list"]);
    let msg = expect_fail(&out, None, "list on a stranger's agents");
    assert!(
        msg.contains("owner"),
        "the error must say the agent belongs to another owner:\n{}",
        shown(&out)
    );
}

/// Reads from `s` until the peer closes; panics if it keeps the connection open.
fn assert_closed(mut s: TcpStream, what: &str) {
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("the agent kept the connection open after {what}")
            }
            Err(_) => return, // reset: dropped
        }
    }
}

#[test]
fn malformed_frames_drop_the_connection_not_the_agent() {
    let mut c = Cluster::start(6);
    let img = sa_tests::ImageSpec::random(4 * MIB, 0x5eed_0107).write(&c.path("disk.img"));
    let id = str_of(&c.snapshot(&img.path, &[]), "snapshot").to_string();
    let addr = c.agents[0].addr();

    let garbage: [(&str, Vec<u8>); 4] = [
        (
            "an HTTP request",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("an absurd length prefix", vec![0xff, 0xff, 0xff, 0xff, 1]),
        ("an unknown frame kind", vec![1, 0, 0, 0, 0xee]),
        ("an empty frame", vec![0, 0, 0, 0]),
    ];
    for (what, bytes) in &garbage {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        assert_closed(s, what);
    }
    // (Frames inside TLS, after a proper hello, are in tests/identity.rs: `openssl s_client`
    // carries them.)

    assert!(
        c.agents[0].is_running(),
        "the agent died:\n{}",
        c.agents[0].log()
    );
    let v = json(
        &c.sa_agents(&["list", "--json"], &addr.to_string()),
        "list after garbage",
    );
    assert!(
        v.as_array()
            .is_some_and(|r| r.iter().any(|r| r["snapshot"] == *id.as_str())),
        "{v}"
    );
    let log = c.agents[0].log();
    assert!(
        log.contains("dropped"),
        "the agent's log should record the dropped connections:\n{log}"
    );
}

/// Invariant 5: a snapshot killed midway leaves no half snapshot in the catalog; the earlier
/// snapshot still restores; the next run succeeds and does not send again what was stored.
#[test]
fn snapshot_killed_midway_leaves_earlier_snapshots_intact() {
    let c = Cluster::start(6);
    let small = sa_tests::ImageSpec::random(8 * MIB, 0x5eed_0108).write(&c.path("small.img"));
    let id1 = str_of(&c.snapshot(&small.path, &[]), "snapshot").to_string();
    let before: Vec<_> = c.agents.iter().map(|a| scan::stripe_ids(a.dir())).collect();

    let big = sa_tests::ImageSpec::random(256 * MIB, 0x5eed_0109).write(&c.path("big.img"));
    let mut cmd = c.sa_command(&[OsStr::new("snapshot"), big.path.as_os_str()]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut p = Proc::spawn(cmd, "sa-image snapshot (to be killed)");
    // Wait until some new stripe is stored whole (a shard on every agent), then kill -9.
    let complete = || -> usize {
        let sets: Vec<_> = c.agents.iter().map(|a| scan::stripe_ids(a.dir())).collect();
        sets[0]
            .iter()
            .filter(|s| !before[0].contains(*s) && sets.iter().all(|set| set.contains(*s)))
            .count()
    };
    wait::until_true(
        Duration::from_secs(60),
        "a new stripe stored on every agent",
        || {
            if let Some(status) = p.try_wait() {
                panic!(
                    "the snapshot ended ({status}) before it could be killed; use a larger image"
                );
            }
            complete() >= 1
        },
    );
    p.kill();
    let done = complete() as u64;

    assert_eq!(
        listed(&c),
        vec![id1.clone()],
        "the killed snapshot must not be listed"
    );
    let target = c.path("small-restored.img");
    c.restore(&id1, &target, &c.agents_arg());
    assert_eq!(
        sha256(&target),
        small.sha256(),
        "the earlier snapshot must still restore"
    );

    let snap = c.snapshot(&big.path, &[]);
    let new = u64_of(&snap, "new_stripes");
    let id2 = str_of(&snap, "snapshot").to_string();
    let mut ids = listed(&c);
    ids.sort();
    let mut want = vec![id1, id2.clone()];
    want.sort();
    assert_eq!(ids, want);
    let target = c.path("big-restored.img");
    c.restore(&id2, &target, &c.agents_arg());
    assert_eq!(
        sha256(&target),
        big.sha256(),
        "the resumed snapshot must restore exactly"
    );
    // Checked last, so that the checks above report on their own: the design says "the next run
    // resumes", and stripes stored whole (deterministic encryption: same shards) need not be sent.
    assert!(
        new <= 64 - done,
        "{done} stripes were stored whole before the kill, yet the next run sent {new} of 64 again: {snap}"
    );
}

/// A block device smaller than the snapshot cannot take it: a clear error, nothing written.
#[test]
fn restore_target_too_small() {
    if !sa_tests::loopdev::is_root() {
        eprintln!("skipped: loop devices need root");
        return;
    }
    let c = Cluster::start(6);
    let img = sa_tests::ImageSpec::random(12 * MIB, 0x5eed_0110).write(&c.path("disk.img"));
    let id = str_of(&c.snapshot(&img.path, &[]), "snapshot").to_string();
    let small = sa_tests::ImageSpec::random(8 * MIB, 0x5eed_0111).write(&c.path("small-dev.img"));
    let before = small.sha256();
    let dev = sa_tests::loopdev::LoopDevice::attach(&small.path, false);
    let args = [
        OsStr::new("restore"),
        OsStr::new(&id),
        OsStr::new("--to"),
        dev.path().as_os_str(),
    ];
    let out = c.sa(&args);
    let msg = expect_fail(&out, None, "restore onto a device that is too small");
    assert!(
        ["small", "size", "bytes"].iter().any(|w| msg.contains(w)),
        "the error must say the target is too small:\n{}",
        shown(&out)
    );
    drop(dev);
    assert_eq!(
        small.sha256(),
        before,
        "nothing may be written to a target that is too small"
    );
}

/// An existing target file that holds data is refused (naming it, and left as it was); with
/// --force it is replaced and holds exactly the image (trailing old bytes would make a wrong
/// disk).
#[test]
fn restore_over_a_larger_file() {
    let c = Cluster::start(6);
    let img = sa_tests::ImageSpec::random(8 * MIB, 0x5eed_0112).write(&c.path("disk.img"));
    let id = str_of(&c.snapshot(&img.path, &[]), "snapshot").to_string();
    let target =
        sa_tests::ImageSpec::random(12 * MIB, 0x5eed_0113).write(&c.path("big-target.img"));
    let args = [
        OsStr::new("restore"),
        OsStr::new(&id),
        OsStr::new("--to"),
        target.path.as_os_str(),
    ];
    let before = target.sha256();
    let out = c.sa(&args);
    let msg = expect_fail(
        &out,
        Some(1),
        "restore over an existing file without --force",
    );
    assert!(
        msg.contains("big-target.img") && msg.contains("--force"),
        "the error must name the target and the flag:\n{}",
        shown(&out)
    );
    assert_eq!(
        sha256(&target.path),
        before,
        "the existing file is untouched"
    );
    let mut forced = args.to_vec();
    forced.push(OsStr::new("--force"));
    let out = c.sa(&forced);
    assert!(out.status.success(), "restore --force: {}", shown(&out));
    assert_eq!(
        sha256(&target.path),
        img.sha256(),
        "restore into a larger existing file must leave exactly the image (size {} now)",
        std::fs::metadata(&target.path).unwrap().len()
    );
}

/// A snapshot id that names nothing, and no agent reachable at all: clear errors.
#[test]
fn unknown_snapshot_and_no_agent_reachable() {
    let mut c = Cluster::start(6);
    let img = sa_tests::ImageSpec::random(4 * MIB, 0x5eed_0114).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    let target = c.path("restored.img");
    let args = [
        OsStr::new("restore"),
        OsStr::new("feedfacefeedface"),
        OsStr::new("--to"),
        target.as_os_str(),
    ];
    let out = c.sa(&args);
    let msg = expect_fail(&out, None, "restore of an unknown snapshot");
    assert!(
        msg.contains("feedfacefeedface"),
        "the error must name the id asked for:\n{}",
        shown(&out)
    );
    assert!(!target.exists(), "no target file for an unknown snapshot");

    for a in &mut c.agents {
        a.kill();
    }
    let out = c.sa(&["list"]);
    let msg = expect_fail(&out, None, "list with every agent down");
    assert!(
        msg.contains(&c.agents[0].addr_str())
            || msg.contains("unreachable")
            || msg.contains("no agent"),
        "the error must say no agent could be reached:\n{}",
        shown(&out)
    );
}

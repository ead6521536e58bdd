//! Restore targets (dirty files, block devices), other layouts, incremental snapshots, missing
//! shards and a damaged catalog copy.

use std::ffi::OsStr;
use std::process::Output;

use sa_tests::cluster::{expect_ok, parse_json, shown, str_of, u64_of};
use sa_tests::loopdev::{is_root, LoopDevice};
use sa_tests::{json, scan, sha256, Cluster, ImageSpec, MIB, STRIPE};

fn verify(c: &Cluster, snapshot: &str) -> (i32, serde_json::Value) {
    let out: Output = c.sa(&["verify", snapshot, "--json"]);
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("verify died by a signal:\n{}", shown(&out)));
    (
        code,
        parse_json(
            &String::from_utf8_lossy(&out.stdout),
            &format!("verify (exit {code})\n{}", shown(&out)),
        ),
    )
}

/// Zero stripes must be written as zeros: a restore over a target full of junk is exact, for an
/// existing file and for a block device.
#[test]
fn restore_over_junk_writes_the_zero_stripes_too() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(20 * MIB, 0x5eed_0201)
        .zero_mib(0..4)
        .zero_mib(12..16)
        .write(&c.path("disk.img"));
    let snap = c.snapshot(&img.path, &[]);
    let id = str_of(&snap, "snapshot").to_string();
    assert_eq!(u64_of(&snap, "zero_stripes"), 2, "{snap}");

    let junk = ImageSpec::random(20 * MIB, 0x5eed_0202).write(&c.path("junk-file.img"));
    // An existing file that holds data is replaced only on purpose.
    let args = [
        OsStr::new("restore"),
        OsStr::new(&id),
        OsStr::new("--to"),
        junk.path.as_os_str(),
        OsStr::new("--force"),
    ];
    expect_ok(&c.sa(&args), "restore --force over a junk file");
    assert_eq!(
        sha256(&junk.path),
        img.sha256(),
        "restore over an existing file full of junk"
    );

    if is_root() {
        let junk = ImageSpec::random(20 * MIB, 0x5eed_0203).write(&c.path("junk-dev.img"));
        let dev = LoopDevice::attach(&junk.path, false);
        c.restore(&id, dev.path(), &c.agents_arg());
        assert_eq!(
            sha256(dev.path()),
            img.sha256(),
            "restore onto a block device full of junk"
        );
    } else {
        eprintln!("block-device target skipped: loop devices need root");
    }
}

/// Invariant 8: a second snapshot of the same volume with one stripe changed sends one stripe.
#[test]
fn unchanged_stripes_are_not_sent_again() {
    let c = Cluster::start(6);
    let path = c.path("disk.img");
    let spec = ImageSpec::random(32 * MIB, 0x5eed_0204).zero_mib(28..32);
    spec.clone().write(&path);
    let first = c.snapshot(&path, &["--volume", "vol"]);
    assert_eq!(u64_of(&first, "new_stripes"), 7, "{first}");
    let img = spec.marker_at(&[9 * MIB + 3]).write(&path); // stripe 2 changes
    let second = c.snapshot(&path, &["--volume", "vol"]);
    assert_eq!(
        u64_of(&second, "new_stripes"),
        1,
        "only the changed stripe is new: {second}"
    );
    assert!(
        u64_of(&second, "bytes_sent") < 2 * STRIPE,
        "one stripe's worth sent: {second}"
    );
    let target = c.path("restored.img");
    c.restore(str_of(&second, "snapshot"), &target, &c.agents_arg());
    assert_eq!(sha256(&target), img.sha256());
}

/// k=2, m=1, 1 MiB stripes over 4 agents (more agents than shards): any one agent may go.
#[test]
fn other_layout_k2_m1_on_four_agents() {
    let mut c = Cluster::start(4);
    let img = ImageSpec::random(10 * MIB + 512, 0x5eed_0205)
        .zero_mib(3..5)
        .write(&c.path("disk.img"));
    let snap = c.snapshot(
        &img.path,
        &[
            "--data-shards",
            "2",
            "--parity-shards",
            "1",
            "--stripe-size",
            "1MiB",
        ],
    );
    assert_eq!(u64_of(&snap, "stripes"), 11, "{snap}");
    assert_eq!(u64_of(&snap, "zero_stripes"), 2, "{snap}");
    let id = str_of(&snap, "snapshot").to_string();
    let v = json(&c.sa(&["list", "--json"]), "list");
    let row = &v[0];
    assert_eq!((u64_of(row, "k"), u64_of(row, "m")), (2, 1), "{v}");
    let total: usize = c
        .agents
        .iter()
        .map(|a| scan::shard_files(a.dir()).len())
        .sum();
    assert_eq!(total, 9 * 3, "3 shards per non-zero stripe");
    for lost in 0..4 {
        c.agents[lost].kill();
        let target = c.path(&format!("restored-{lost}.img"));
        let live = c.agents[(lost + 1) % 4].addr_str();
        c.restore(&id, &target, &live);
        assert_eq!(
            sha256(&target),
            img.sha256(),
            "restore with agent a{lost} down"
        );
        c.agents[lost].restart();
    }
    let (code, v) = verify(&c, &id);
    assert_eq!(code, 0, "all agents back: {v}");
}

/// A wiped agent (its shard files deleted while it runs) is reported as missing shards, and
/// restarting killed agents brings `verify` back to exit 0.
#[test]
fn wiped_agent_is_missing_shards_and_restarted_agents_are_whole() {
    let mut c = Cluster::start(6);
    let img = ImageSpec::random(16 * MIB, 0x5eed_0206).write(&c.path("disk.img"));
    let id = str_of(&c.snapshot(&img.path, &[]), "snapshot").to_string();
    let (code, v) = verify(&c, &id);
    assert_eq!(code, 0, "fresh snapshot: {v}");
    assert_eq!(
        (u64_of(&v, "shards_missing"), u64_of(&v, "shards_corrupt")),
        (0, 0),
        "{v}"
    );

    c.agents[0].kill();
    let (code, v) = verify(&c, &id);
    assert_eq!(code, 2, "one agent down is recoverable: {v}");
    c.agents[0].restart();
    let (code, v) = verify(&c, &id);
    assert_eq!(code, 0, "agent back on the same address: {v}");

    for f in scan::shard_files(c.agents[5].dir()) {
        std::fs::remove_file(f).unwrap();
    }
    let (code, v) = verify(&c, &id);
    assert_eq!(code, 2, "{v}");
    assert_eq!(u64_of(&v, "shards_missing"), 4, "{v}");
    let e = v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["addr"] == *c.agents[5].addr_str())
        .cloned();
    let e = e.unwrap_or_else(|| panic!("no entry for a5: {v}"));
    assert_eq!(e["reachable"], true, "{e}");
    let agent_id = std::fs::read_to_string(c.agents[5].dir().join("agent-id")).unwrap();
    if let Some(id) = e["id"].as_str() {
        assert_eq!(
            id,
            agent_id.trim(),
            "verify names the agent by its stable id: {e}"
        );
    }
    assert!(
        c.agents[5].log().contains(agent_id.trim()),
        "the agent's log names the agent"
    );
    // `ok` is a flag or a count of sound shards: either way, none here.
    assert!(e["ok"] == false || e["ok"] == 0, "{e}");
    assert_eq!(u64_of(&e, "missing"), 4, "{e}");
    let target = c.path("restored.img");
    c.restore(&id, &target, &c.agents_arg());
    assert_eq!(sha256(&target), img.sha256());
}

/// One agent's copy of the catalog is damaged: the others' copies still list and restore.
#[test]
fn damaged_catalog_copy_on_one_agent() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(8 * MIB, 0x5eed_0207).write(&c.path("disk.img"));
    let id = str_of(&c.snapshot(&img.path, &[]), "snapshot").to_string();
    let blobs = scan::files(&c.agents[0].dir().join("blobs"));
    assert!(!blobs.is_empty(), "a0 holds no catalog blob");
    for b in &blobs {
        let mut bytes = std::fs::read(b).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        std::fs::write(b, bytes).unwrap();
    }
    let v = json(&c.sa(&["list", "--json"]), "list with a0's catalog damaged");
    assert!(
        v.as_array()
            .is_some_and(|r| r.iter().any(|r| r["snapshot"] == *id.as_str())),
        "{v}"
    );
    let target = c.path("restored.img");
    c.restore(&id, &target, &c.agents_arg());
    assert_eq!(sha256(&target), img.sha256());
    // Only the damaged copy to go by: a clear failure, not a wrong restore.
    let target = c.path("only-a0.img");
    let args = [
        OsStr::new("restore"),
        OsStr::new(&id),
        OsStr::new("--to"),
        target.as_os_str(),
    ];
    // Through a0 alone, from a machine that never saw this fleet (an empty cache directory;
    // a0's copy of the agent book is damaged too, so nothing names another member): a clear
    // failure that says what to do, and no target, not a wrong restore.
    let fresh = c.path("fresh-cache");
    let mut args = args.to_vec();
    args.extend([OsStr::new("--cache-dir"), fresh.as_os_str()]);
    let out = c.sa_agents(&args, &c.agents[0].addr_str());
    let msg = sa_tests::cluster::expect_fail(&out, Some(1), "restore through a0 alone");
    assert!(
        msg.contains("damaged") && msg.contains("another agent"),
        "{}",
        shown(&out)
    );
    assert!(!target.exists(), "no target left by a failed restore");
}

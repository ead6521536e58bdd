//! The backbone: a whole disk goes out to six agents and comes back byte for byte, with agents
//! lost, shards damaged, from a real block device, and without an agent ever seeing plaintext.

use std::ffi::OsStr;

use sa_tests::cluster::{expect_fail, expect_ok, parse_json, shown, str_of, u64_of};
use sa_tests::image::MARKER;
use sa_tests::loopdev::{is_root, LoopDevice};
use sa_tests::scan;
use sa_tests::{json, sha256, Cluster, ImageSpec, MIB, STRIPE};

/// Runs `sa-image verify SNAPSHOT --json` and returns its exit code and report.
fn verify(c: &Cluster, snapshot: &str, agents: &str) -> (i32, serde_json::Value) {
    let out = c.sa_agents(&["verify", snapshot, "--json"], agents);
    let code = out
        .status
        .code()
        .unwrap_or_else(|| panic!("verify died by a signal:\n{}", shown(&out)));
    let stdout = String::from_utf8_lossy(&out.stdout);
    (
        code,
        parse_json(
            &stdout,
            &format!(
                "sa-image verify (exit {code}); stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        ),
    )
}

/// The `agents[]` entry of a verify report for `addr`.
fn agent_entry<'a>(report: &'a serde_json::Value, addr: &str) -> &'a serde_json::Value {
    report["agents"]
        .as_array()
        .unwrap_or_else(|| panic!("verify report has no agents array: {report}"))
        .iter()
        .find(|a| a["addr"].as_str() == Some(addr))
        .unwrap_or_else(|| panic!("verify report has no entry for agent {addr}: {report}"))
}

/// Invariants 1, 2, 7: a 66 MiB image with zero stripes and a short last stripe goes to six
/// agents (k=4, m=2); two are killed; a restore given the address of ONE live agent is exact.
#[test]
fn two_agents_lost_restore_from_one_address_is_exact() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(66 * MIB + 4096, 0x5eed_0001)
        .zero_mib(8..16) // stripes 2 and 3
        .zero_mib(40..44) // stripe 10
        .zero_mib(50..51) // part of stripe 12 only: not a zero stripe
        .marker_at(&[MIB + 77, 20 * MIB + 5, 50 * MIB + 100, 66 * MIB])
        .write(&c.path("disk.img"));
    assert_eq!(img.zero_stripes(STRIPE), 3, "test image layout");
    let nonzero = img.stripes(STRIPE) - 3;

    let snap = c.snapshot(&img.path, &[]);
    let id = str_of(&snap, "snapshot").to_string();
    assert!(!id.is_empty(), "empty snapshot id: {snap}");
    assert_eq!(u64_of(&snap, "size"), img.size, "{snap}");
    assert_eq!(u64_of(&snap, "stripes"), 17, "{snap}");
    assert_eq!(
        u64_of(&snap, "zero_stripes"),
        3,
        "zero stripes must be recognised: {snap}"
    );
    assert_eq!(
        u64_of(&snap, "new_stripes"),
        nonzero,
        "a first snapshot sends every non-zero stripe: {snap}"
    );
    let data = img.size - 3 * STRIPE;
    let sent = u64_of(&snap, "bytes_sent");
    assert!(
        sent >= data && sent <= 2 * data,
        "bytes_sent {sent} for {data} bytes of non-zero data at k=4 m=2: {snap}"
    );

    // Default placement: one shard of every non-zero stripe on each of the six agents.
    for a in &c.agents {
        let n = scan::shard_files(a.dir()).len() as u64;
        assert_eq!(
            n,
            nonzero,
            "agent {} holds {n} shard files, expected one per non-zero stripe",
            a.name()
        );
    }

    let mut c = c;
    c.agents[0].kill();
    c.agents[3].kill();
    let target = c.path("restored.img");
    let one = c.agents[1].addr_str();
    let r = c.restore(&id, &target, &one);
    assert_eq!(
        sha256(&target),
        img.sha256(),
        "restored image differs from the original"
    );
    assert_eq!(std::fs::metadata(&target).unwrap().len(), img.size);
    assert_eq!(str_of(&r, "snapshot"), id, "{r}");
    assert_eq!(u64_of(&r, "size"), img.size, "{r}");
    assert_eq!(u64_of(&r, "stripes"), 17, "{r}");
    assert!(
        u64_of(&r, "reconstructed_stripes") > 0,
        "agents 0 and 3 held data shards: some stripes need parity: {r}"
    );
}

/// Invariant 4: flipped bytes and a truncated shard on live agents are detected, reported by
/// `verify` (exit 2) and routed around by `restore`; once a stripe has lost more than m shards,
/// `verify` exits 3 and `restore` fails naming the stripe instead of writing a wrong image.
#[test]
fn damaged_shards_are_reported_and_more_than_m_lost_fails_clearly() {
    let mut c = Cluster::start(6);
    let img = ImageSpec::random(32 * MIB, 0x5eed_0002).write(&c.path("disk.img"));
    let snap = c.snapshot(&img.path, &[]);
    let id = str_of(&snap, "snapshot").to_string();

    let stripes: Vec<String> = scan::stripe_ids(c.agents[0].dir()).into_iter().collect();
    assert_eq!(
        stripes.len(),
        8,
        "agent a0 should hold one shard of each of the 8 stripes"
    );
    let (x, y) = (&stripes[0], &stripes[1]);
    // Two shards of stripe X get flipped bytes (on a0 and a1); one shard of Y is truncated (a2).
    for a in &c.agents[0..2] {
        let f = scan::shard_of(a.dir(), x)
            .unwrap_or_else(|| panic!("{} has no shard of stripe {x}", a.name()));
        let mut bytes = std::fs::read(&f).unwrap();
        for b in &mut bytes[96 + 1000..96 + 1016] {
            *b ^= 0xff;
        }
        std::fs::write(&f, bytes).unwrap();
    }
    let f = scan::shard_of(c.agents[2].dir(), y).expect("a2 has no shard of stripe Y");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let target = c.path("restored.img");
    let r = c.restore(&id, &target, &c.agents_arg());
    assert_eq!(
        sha256(&target),
        img.sha256(),
        "restore around damaged shards must be exact: {r}"
    );

    let (code, v) = verify(&c, &id, &c.agents_arg());
    assert_eq!(code, 2, "verify must exit 2 (damaged but recoverable): {v}");
    assert_eq!(v["recoverable"], true, "{v}");
    assert_eq!(u64_of(&v, "lost_stripes"), 0, "{v}");
    let (corrupt, missing) = (u64_of(&v, "shards_corrupt"), u64_of(&v, "shards_missing"));
    assert!(
        corrupt >= 2 && corrupt + missing >= 3,
        "2 flipped + 1 truncated shard: {v}"
    );
    for i in 0..2 {
        let e = agent_entry(&v, &c.agents[i].addr_str());
        assert!(
            u64_of(e, "corrupt") >= 1,
            "agent a{i} has a flipped shard: {e}"
        );
    }
    let e = agent_entry(&v, &c.agents[2].addr_str());
    assert!(
        u64_of(e, "corrupt") + u64_of(e, "missing") >= 1,
        "agent a2 has a truncated shard: {e}"
    );

    // Stripe X: two shards corrupt, two more agents gone: 4 of 6 bad, more than m = 2.
    c.agents[3].kill();
    c.agents[4].kill();
    let (code, v) = verify(&c, &id, &c.agents_arg());
    assert_eq!(code, 3, "verify must exit 3 (data lost): {v}");
    assert_eq!(v["recoverable"], false, "{v}");
    assert!(u64_of(&v, "lost_stripes") >= 1, "{v}");
    let e = agent_entry(&v, &c.agents[3].addr_str());
    assert_eq!(
        e["reachable"], false,
        "a killed agent is reported unreachable: {e}"
    );

    let lost_target = c.path("lost.img");
    let out = c.sa(&[
        OsStr::new("restore"),
        OsStr::new(&id),
        OsStr::new("--to"),
        lost_target.as_os_str(),
    ]);
    let msg = expect_fail(&out, None, "restore with a stripe lost");
    assert!(
        msg.contains("stripe"),
        "the error must name the lost stripe(s):\n{}",
        shown(&out)
    );
    assert!(
        ["unrecoverable", "lost", "cannot", "too many"]
            .iter()
            .any(|w| msg.contains(w)),
        "the error must say the data cannot be recovered:\n{}",
        shown(&out)
    );
    if lost_target.exists() {
        assert_ne!(
            sha256(&lost_target),
            img.sha256(),
            "a failed restore produced the full image?"
        );
    }
}

/// A real block device as the source: a loop device over an image (needs root).
#[test]
fn snapshot_of_a_loop_device_restores_to_a_file() {
    if !is_root() {
        eprintln!("skipped: loop devices need root");
        return;
    }
    let c = Cluster::start(6);
    let img = ImageSpec::random(24 * MIB, 0x5eed_0003)
        .zero_mib(4..8)
        .write(&c.path("disk.img"));
    let dev = LoopDevice::attach(&img.path, true);
    let snap = c.snapshot(dev.path(), &[]);
    assert_eq!(
        u64_of(&snap, "size"),
        img.size,
        "size of {}: {snap}",
        dev.path().display()
    );
    assert_eq!(u64_of(&snap, "zero_stripes"), 1, "{snap}");
    let target = c.path("restored.img");
    c.restore(str_of(&snap, "snapshot"), &target, &c.agents_arg());
    assert_eq!(
        sha256(&target),
        sha256(dev.path()),
        "restored file differs from the device"
    );
    assert_eq!(sha256(&target), img.sha256());
}

/// Invariant 3: the owner of a client PC who reads the agent's directory sees ciphertext: no
/// planted plaintext, no volume name, no source file name, in any file or file name.
#[test]
fn agents_hold_no_plaintext() {
    let c = Cluster::start(6);
    let source = c.path("secret-source-name-7a1.img");
    let offsets: Vec<u64> = (0..16)
        .map(|i| i * MIB + (i * 997) % 4000)
        .chain([4 * MIB - 10, 8 * MIB - 16])
        .collect();
    let img = ImageSpec::random(16 * MIB, 0x5eed_0004)
        .marker_at(&offsets)
        .write(&source);
    // The scanner itself must see the marker where it is.
    assert_eq!(
        scan::files_containing(c.dir(), MARKER),
        vec![source.clone()],
        "scanner self-check"
    );

    let volume = "SA-TESTS-VOLUME-NAME-payroll-disk";
    c.snapshot(&img.path, &["--volume", volume]);
    c.snapshot(&img.path, &["--volume", volume]); // a second manifest for the same volume
    let listed = expect_ok(&c.sa(&["list"]), "sa-image list");
    assert!(
        listed.contains(volume),
        "list shows the volume name (decrypted on the server):\n{listed}"
    );

    for a in &c.agents {
        assert!(
            !scan::shard_files(a.dir()).is_empty(),
            "{} holds no shards",
            a.name()
        );
        for needle in [MARKER, volume, "secret-source-name-7a1"] {
            let found = scan::files_containing(a.dir(), needle);
            assert!(
                found.is_empty(),
                "agent {} holds plaintext {needle:?} in {found:?}",
                a.name()
            );
        }
    }
}

/// Invariant 2: the catalog is on every agent: `list` works with one agent left, and `latest`
/// and an id prefix name snapshots wherever an id goes.
#[test]
fn list_with_one_agent_left_and_latest_resolves() {
    let mut c = Cluster::start(6);
    let one = ImageSpec::random(8 * MIB, 0x5eed_0005).write(&c.path("one.img"));
    let two = ImageSpec::random(8 * MIB, 0x5eed_0006)
        .zero_mib(0..4)
        .write(&c.path("two.img"));
    let id1 = str_of(&c.snapshot(&one.path, &["--volume", "office"]), "snapshot").to_string();
    let id2 = str_of(&c.snapshot(&two.path, &["--volume", "office"]), "snapshot").to_string();
    assert_ne!(id1, id2);

    let target = c.path("latest.img");
    let r = c.restore("latest", &target, &c.agents_arg());
    assert_eq!(
        str_of(&r, "snapshot"),
        id2,
        "`latest` must be the newest snapshot: {r}"
    );
    assert_eq!(sha256(&target), two.sha256());
    let prefix_len = (6..=id1.len())
        .find(|&n| !id2.starts_with(&id1[..n]))
        .expect("ids differ");
    let target = c.path("prefix.img");
    let r = c.restore(&id1[..prefix_len], &target, &c.agents_arg());
    assert_eq!(
        str_of(&r, "snapshot"),
        id1,
        "a unique prefix names its snapshot: {r}"
    );
    assert_eq!(sha256(&target), one.sha256());

    for a in &mut c.agents[..5] {
        a.kill();
    }
    let last = c.agents[5].addr_str();
    for agents in [c.agents_arg(), last] {
        let v = json(
            &c.sa_agents(&["list", "--json"], &agents),
            "sa-image list with one agent up",
        );
        let rows = v
            .as_array()
            .unwrap_or_else(|| panic!("list --json is not an array: {v}"));
        assert_eq!(rows.len(), 2, "both snapshots listed, given {agents}: {v}");
        for (id, img) in [(&id1, &one), (&id2, &two)] {
            let row = rows
                .iter()
                .find(|r| r["snapshot"].as_str() == Some(id.as_str()))
                .unwrap_or_else(|| panic!("{id} not listed: {v}"));
            assert_eq!(str_of(row, "volume"), "office", "{row}");
            assert_eq!(u64_of(row, "size"), img.size, "{row}");
            assert_eq!(u64_of(row, "stripes"), 2, "{row}");
            assert_eq!((u64_of(row, "k"), u64_of(row, "m")), (4, 2), "{row}");
            assert!(!row["created"].is_null(), "{row}");
        }
    }
    let id2_zero = {
        let v = json(
            &c.sa_agents(&["list", "--json"], &c.agents[5].addr_str()),
            "list",
        );
        let rows = v.as_array().cloned().unwrap_or_default();
        rows.iter()
            .find(|r| r["snapshot"] == *id2.as_str())
            .map(|r| u64_of(r, "zero_stripes"))
    };
    assert_eq!(id2_zero, Some(1), "the second image has one zero stripe");
}

/// Every flag is a config-file key: key and agents from `--config` alone.
#[test]
fn config_file_gives_key_and_agents() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(4 * MIB + 512, 0x5eed_0007).write(&c.path("disk.img"));
    let addrs: Vec<String> = c
        .agents
        .iter()
        .map(|a| format!("{:?}", a.addr_str()))
        .collect();
    let cfg = c.path("sa-image.toml");
    std::fs::write(
        &cfg,
        format!(
            "key = {:?}\nagents = [{}]\ndata_shards = 4\nparity_shards = 2\n",
            c.key.path.display().to_string(),
            addrs.join(", ")
        ),
    )
    .unwrap();
    let snap = json(
        &c.sa_bare(&[
            OsStr::new("snapshot"),
            img.path.as_os_str(),
            OsStr::new("--config"),
            cfg.as_os_str(),
            OsStr::new("--json"),
        ]),
        "snapshot --config",
    );
    let id = str_of(&snap, "snapshot");
    let v = json(
        &c.sa_bare(&[
            OsStr::new("list"),
            OsStr::new("--config"),
            cfg.as_os_str(),
            OsStr::new("--json"),
        ]),
        "list --config",
    );
    assert!(
        v.as_array()
            .is_some_and(|rows| rows.iter().any(|r| r["snapshot"] == *id)),
        "{id} not listed: {v}"
    );
    let target = c.path("restored.img");
    let out = c.sa_bare(&[
        OsStr::new("restore"),
        OsStr::new("latest"),
        OsStr::new("--to"),
        target.as_os_str(),
        OsStr::new("--config"),
        cfg.as_os_str(),
    ]);
    expect_ok(&out, "restore --config");
    assert_eq!(sha256(&target), img.sha256());
}

//! Incremental forever: only changed stripes travel, a changed map skips reading, old snapshots
//! expire by policy, and agents reclaim space safely (concurrent snapshots, agents offline).

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sa_tests::cluster::{expect_fail, expect_ok, str_of, u64_of, ClusterOptions};
use sa_tests::proc::Proc;
use sa_tests::{json, scan, sha256, Cluster, ImageSpec, MIB, STRIPE};

/// Overwrites `len` bytes at `off` with pseudo-random bytes from `seed`.
fn scribble(path: &Path, off: u64, len: usize, seed: u64) {
    let mut x = seed | 1;
    let buf: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&buf, off).unwrap();
}

/// sha256 of each stripe of the image (its content identity).
fn stripe_hashes(c: &Cluster, path: &Path) -> Vec<String> {
    let data = std::fs::read(path).unwrap();
    data.chunks(STRIPE as usize)
        .enumerate()
        .map(|(i, chunk)| {
            let p = c.path(&format!("chunk-{i}"));
            std::fs::write(&p, chunk).unwrap();
            let h = sha256(&p);
            std::fs::remove_file(&p).unwrap();
            h
        })
        .collect()
}

fn total_shards(c: &Cluster) -> usize {
    c.agents
        .iter()
        .map(|a| scan::shard_files(a.dir()).len())
        .sum()
}

fn list_ids(c: &Cluster) -> Vec<String> {
    let v = json(&c.sa(&["list", "--json"]), "sa-image list");
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["snapshot"].as_str().unwrap().to_string())
        .collect()
}

fn restore_matches(c: &Cluster, id: &str, want: &str) {
    let target = c.path(&format!("restored-{id}.img"));
    c.restore(id, &target, &c.agents_arg());
    assert_eq!(
        sha256(&target),
        want,
        "snapshot {id} restores byte-identical"
    );
    std::fs::remove_file(&target).unwrap();
}

fn cache_arg(c: &Cluster) -> PathBuf {
    c.path("cache")
}

/// Invariant 8: a second snapshot sends only the changed stripes, at (k+m)/k of their size;
/// both restore exactly; the base comes from the local cache, and from the agents once the
/// cache is gone.
#[test]
fn second_snapshot_sends_only_changed_stripes() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(64 * MIB, 0x1c_0001)
        .zero_mib(8..12)
        .write(&c.path("disk.img"));
    let cache = cache_arg(&c);
    let cache_s = cache.to_str().unwrap();
    let s1 = c.snapshot(&img.path, &["--cache-dir", cache_s]);
    let h1 = sha256(&img.path);
    assert_eq!(u64_of(&s1, "new_stripes"), 15, "{s1}");
    assert!(s1["base"].is_null(), "no base yet: {s1}");

    // Change three stripes: a few bytes in stripe 0, a 4 KiB block in stripe 5, stripe 13 whole.
    scribble(&img.path, 100, 16, 1);
    scribble(&img.path, 5 * STRIPE + 4096, 4096, 2);
    scribble(&img.path, 13 * STRIPE, STRIPE as usize, 3);
    let h2 = sha256(&img.path);
    let s2 = c.snapshot(&img.path, &["--cache-dir", cache_s]);
    assert_eq!(u64_of(&s2, "new_stripes"), 3, "{s2}");
    assert_eq!(u64_of(&s2, "reused_stripes"), 12, "{s2}");
    assert_eq!(u64_of(&s2, "zero_stripes"), 1, "{s2}");
    assert_eq!(str_of(&s2, "base"), str_of(&s1, "snapshot"));
    assert_eq!(str_of(&s2, "base_manifest_from"), "cache", "{s2}");
    let sent = u64_of(&s2, "bytes_sent");
    let ideal = 3 * STRIPE * 6 / 4;
    assert!(
        sent >= ideal && sent <= ideal + ideal / 100,
        "bytes_sent {sent} vs 3 stripes x (k+m)/k = {ideal}"
    );
    let per_tib = u64_of(&s2, "manifest_bytes") as f64 * (1u64 << 40) as f64 / img.size as f64;
    eprintln!(
        "[figure] manifest {} bytes for {} stripes: {per_tib:.0} bytes per TiB at this ratio",
        u64_of(&s2, "manifest_bytes"),
        u64_of(&s2, "stripes")
    );

    restore_matches(&c, str_of(&s1, "snapshot"), &h1);
    restore_matches(&c, str_of(&s2, "snapshot"), &h2);

    // Without the cache the base manifest comes from the agents, and reuse still works.
    std::fs::remove_dir_all(&cache).unwrap();
    let s3 = c.snapshot(&img.path, &["--cache-dir", cache_s]);
    assert_eq!(str_of(&s3, "base_manifest_from"), "agents", "{s3}");
    assert_eq!(str_of(&s3, "base"), str_of(&s2, "snapshot"));
    assert_eq!(u64_of(&s3, "new_stripes"), 0, "{s3}");
    assert_eq!(u64_of(&s3, "bytes_sent"), 0, "{s3}");

    // list shows new and shared data.
    let rows = json(&c.sa(&["list", "--json"]), "list");
    let rows = rows.as_array().unwrap();
    assert_eq!(u64_of(&rows[0], "new_data"), 15 * STRIPE);
    assert_eq!(u64_of(&rows[1], "new_data"), 3 * STRIPE);
    assert_eq!(u64_of(&rows[2], "new_data"), 0);
    assert_eq!(u64_of(&rows[2], "shared_data"), 15 * STRIPE);
    let text = expect_ok(&c.sa(&["list"]), "list");
    assert!(
        text.contains("new data") && text.contains("shared"),
        "{text}"
    );
}

/// `--changed-since` + `--changed-map`: unchanged stripes are not read; wrong bases are refused.
#[test]
fn changed_map_skips_unchanged_stripes() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(64 * MIB, 0x1c_0002).write(&c.path("disk.img"));
    let cache = cache_arg(&c);
    let cache_s = cache.to_str().unwrap();
    let s1 = c.snapshot(&img.path, &["--cache-dir", cache_s, "--volume", "vm1"]);
    let id1 = str_of(&s1, "snapshot").to_string();

    scribble(&img.path, 2 * STRIPE + 10, 100, 7);
    scribble(&img.path, 9 * STRIPE - 50, 100, 8); // straddles stripes 8 and 9
    let map = c.path("changed.map");
    std::fs::write(
        &map,
        format!(
            "# offset length\n{} 100\n0x{:x} 100\n",
            2 * STRIPE + 10,
            9 * STRIPE - 50
        ),
    )
    .unwrap();
    let map_s = map.to_str().unwrap();
    let s2 = c.snapshot(
        &img.path,
        &[
            "--cache-dir",
            cache_s,
            "--volume",
            "vm1",
            "--changed-since",
            &id1,
            "--changed-map",
            map_s,
        ],
    );
    assert_eq!(u64_of(&s2, "unread_stripes"), 13, "{s2}");
    assert_eq!(u64_of(&s2, "bytes_read"), 3 * STRIPE, "{s2}");
    assert_eq!(u64_of(&s2, "new_stripes"), 3, "{s2}");
    assert_eq!(u64_of(&s2, "reused_stripes"), 13, "{s2}");
    restore_matches(&c, str_of(&s2, "snapshot"), &sha256(&img.path));

    // A base of another volume, or of another size, is refused with a clear message.
    let out = c.sa(&[
        OsStr::new("snapshot"),
        img.path.as_os_str(),
        OsStr::new("--volume"),
        OsStr::new("other"),
        OsStr::new("--changed-since"),
        OsStr::new(&id1),
        OsStr::new("--changed-map"),
        map.as_os_str(),
    ]);
    let msg = expect_fail(&out, None, "changed map against another volume");
    assert!(msg.contains("volume 'vm1'"), "{msg}");
    let small = ImageSpec::random(32 * MIB, 5).write(&c.path("small.img"));
    let out = c.sa(&[
        OsStr::new("snapshot"),
        small.path.as_os_str(),
        OsStr::new("--volume"),
        OsStr::new("vm1"),
        OsStr::new("--changed-since"),
        OsStr::new(&id1),
        OsStr::new("--changed-map"),
        map.as_os_str(),
    ]);
    let msg = expect_fail(&out, None, "changed map against another size");
    assert!(msg.contains("layouts must match"), "{msg}");
    std::fs::write(&map, "12 banana\n").unwrap();
    let out = c.sa(&[
        OsStr::new("snapshot"),
        img.path.as_os_str(),
        OsStr::new("--volume"),
        OsStr::new("vm1"),
        OsStr::new("--changed-since"),
        OsStr::new("latest"),
        OsStr::new("--changed-map"),
        map.as_os_str(),
    ]);
    let msg = expect_fail(&out, None, "malformed changed map");
    assert!(msg.contains("line 1"), "{msg}");
}

/// Ten snapshots with small random changes, pruned to the last three: those restore exactly,
/// the others leave `list`, the agents keep exactly the shards the three need, and all works
/// without the local cache.
#[test]
fn ten_snapshots_pruned_to_policy() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(32 * MIB, 0x1c_0003).write(&c.path("disk.img"));
    let cache = cache_arg(&c);
    let cache_s = cache.to_str().unwrap();
    let mut snaps = Vec::new(); // (id, image sha, stripe hashes)
    let mut x: u64 = 0x9e37_79b9;
    for n in 0..10u64 {
        if n > 0 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let stripe = (x >> 33) % 8;
            scribble(&img.path, stripe * STRIPE + (x >> 50) % 4096, 512, x);
        }
        let s = c.snapshot(&img.path, &["--cache-dir", cache_s]);
        assert!(
            u64_of(&s, "new_stripes") <= if n == 0 { 8 } else { 1 },
            "{s}"
        );
        snaps.push((
            str_of(&s, "snapshot").to_string(),
            sha256(&img.path),
            stripe_hashes(&c, &img.path),
        ));
    }
    let before = total_shards(&c);

    let dry = json(
        &c.sa(&["prune", "--keep-last", "3", "--dry-run", "--json"]),
        "prune --dry-run",
    );
    assert_eq!(dry["removed"].as_array().unwrap().len(), 7, "{dry}");
    assert_eq!(total_shards(&c), before, "a dry run changes nothing");
    assert_eq!(list_ids(&c).len(), 10);

    let out = c.sa(&["prune", "--keep-last", "3", "--gc-grace", "0s"]);
    let text = expect_ok(&out, "prune");
    eprintln!("[prune]\n{text}");
    assert!(text.contains("remove") && text.contains("last 1"), "{text}");
    let kept: Vec<&(String, String, Vec<String>)> = snaps[7..].iter().collect();
    let ids = list_ids(&c);
    assert_eq!(
        ids,
        kept.iter().map(|k| k.0.clone()).collect::<Vec<_>>(),
        "list shows exactly the kept snapshots"
    );
    let unique: BTreeSet<&String> = kept.iter().flat_map(|k| k.2.iter()).collect();
    assert_eq!(
        total_shards(&c),
        unique.len() * 6,
        "agents hold exactly the shards of the kept snapshots (was {before})"
    );

    std::fs::remove_dir_all(&cache).unwrap();
    for (id, sha, _) in &kept {
        restore_matches(&c, id, sha);
    }
    let removed = &snaps[2].0;
    let out = c.sa(&[
        "restore",
        removed,
        "--to",
        c.path("x.img").to_str().unwrap(),
    ]);
    expect_fail(&out, None, "restore of a pruned snapshot");

    // forget one more: list drops it, its unique shards go.
    let f = json(
        &c.sa(&["forget", &kept[0].0, "--gc-grace", "0s", "--json"]),
        "forget",
    );
    assert_eq!(str_of(&f, "snapshot"), kept[0].0);
    assert_eq!(list_ids(&c).len(), 2);
    let unique: BTreeSet<&String> = kept[1..].iter().flat_map(|k| k.2.iter()).collect();
    assert_eq!(total_shards(&c), unique.len() * 6);
    let out = c.sa(&["prune"]);
    let msg = expect_fail(&out, None, "prune without a policy");
    assert!(msg.contains("--keep-last"), "{msg}");
}

/// A prune (forgetting the base) while a snapshot that reuses the base's stripes is running in
/// another process: both succeed, and the new snapshot restores exactly, also after another gc.
#[test]
fn prune_while_snapshot_runs() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(160 * MIB, 0x1c_0004).write(&c.path("disk.img"));
    let cache = cache_arg(&c);
    let s1 = c.snapshot(&img.path, &["--cache-dir", cache.to_str().unwrap()]);
    let id1 = str_of(&s1, "snapshot").to_string();
    // Change every other stripe, so the next snapshot both reuses and sends a lot.
    for i in (0..40).step_by(2) {
        scribble(&img.path, i * STRIPE, 4096, i + 100);
    }
    let want = sha256(&img.path);
    let mut cmd = c.sa_command(&[
        OsStr::new("snapshot"),
        img.path.as_os_str(),
        OsStr::new("--json"),
        OsStr::new("--cache-dir"),
        cache.as_os_str(),
    ]);
    let out_path = c.path("s2.json");
    cmd.stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(c.path("s2.err")).unwrap());
    let mut snap = Proc::spawn(cmd, "sa-image snapshot (concurrent)");
    // Wait until the snapshot holds its lease, freeze it there (SIGSTOP) so the prune surely
    // runs in the middle of it, forget its base and collect, then let it go on.
    let leased = || {
        c.agents.iter().all(|a| {
            std::fs::read_dir(a.dir().join("blobs"))
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().starts_with("lease-"))
                })
                .unwrap_or(false)
        })
    };
    sa_tests::wait::until_true(Duration::from_secs(60), "the snapshot's lease", || {
        leased() || !snap.is_running()
    });
    let pid = snap.id().to_string();
    let signal = |sig: &str| {
        let _ = std::process::Command::new("kill")
            .args([sig, &pid])
            .status();
    };
    signal("-STOP");
    let overlapped = snap.is_running() && leased();
    let f = json(
        &c.sa(&["forget", &id1, "--gc-grace", "0s", "--json"]),
        "forget during a snapshot",
    );
    signal("-CONT");
    eprintln!("[race] prune ran while the snapshot was mid-way: {overlapped}; {f}");
    assert!(
        overlapped,
        "the snapshot finished before the prune could start"
    );
    let status = snap.wait(Duration::from_secs(120));
    let stdout = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        status.success(),
        "snapshot failed: {stdout}\n{}",
        std::fs::read_to_string(c.path("s2.err")).unwrap()
    );
    let s2 = sa_tests::cluster::parse_json(&stdout, "concurrent snapshot");
    let id2 = str_of(&s2, "snapshot").to_string();
    assert_eq!(list_ids(&c), vec![id2.clone()]);
    restore_matches(&c, &id2, &want);
    // No lease is left, and a collection now keeps exactly what the snapshot needs.
    json(&c.sa(&["gc", "--gc-grace", "0s", "--json"]), "gc");
    assert_eq!(total_shards(&c), 40 * 6);
    restore_matches(&c, &id2, &want);
}

/// An agent offline during a forget: the snapshot is hidden at once, and the agent's stale
/// manifest and unreferenced shards are cleaned by the next gc once it is back.
#[test]
fn agent_offline_during_prune_is_cleaned_when_back() {
    let mut c = Cluster::start_with(ClusterOptions {
        agents: 7,
        ..Default::default()
    });
    let img = ImageSpec::random(32 * MIB, 0x1c_0005).write(&c.path("disk.img"));
    let s1 = c.snapshot(&img.path, &[]);
    let id1 = str_of(&s1, "snapshot").to_string();
    for i in 0..8 {
        scribble(&img.path, i * STRIPE, 64, i + 1);
    }
    let want = sha256(&img.path);
    let s2 = c.snapshot(&img.path, &[]);
    let id2 = str_of(&s2, "snapshot").to_string();
    let a6_before = scan::shard_files(c.agents[6].dir()).len();

    c.agents[6].kill();
    let out = c.sa(&["prune", "--keep-last", "1", "--gc-grace", "0s", "--json"]);
    let p = json(&out, "prune with an agent down");
    assert!(p.to_string().contains("unreachable"), "{p}");
    assert_eq!(list_ids(&c), vec![id2.clone()]);
    assert!(c.agents[6].dir().join(format!("blobs/snap-{id1}")).exists());
    assert_eq!(scan::shard_files(c.agents[6].dir()).len(), a6_before);

    c.agents[6].restart();
    // The returning agent's stale copy does not bring the snapshot back.
    assert_eq!(list_ids(&c), vec![id2.clone()]);
    let g = json(
        &c.sa(&["gc", "--gc-grace", "0s", "--json"]),
        "gc after return",
    );
    eprintln!("[gc] {g}");
    assert!(!c.agents[6].dir().join(format!("blobs/snap-{id1}")).exists());
    assert!(scan::shard_files(c.agents[6].dir()).len() < a6_before);
    assert_eq!(
        total_shards(&c),
        8 * 6,
        "only the kept snapshot's shards remain"
    );
    restore_matches(&c, &id2, &want);
}

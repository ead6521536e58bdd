//! Client PCs come and go: `status` reports each snapshot's margin, `scrub` finds bit rot and
//! quarantines it, `repair` rebuilds what is missing onto agents outside the stripe and commits a
//! new manifest revision; afterwards the backup survives m more losses again.

use std::ffi::OsStr;

use sa_tests::cluster::{str_of, u64_of};
use sa_tests::scan;
use sa_tests::{sha256, Cluster, ImageSpec, MIB};
use serde_json::Value;

fn repair(c: &Cluster, agents: &str, dry_run: bool) -> (i32, Value) {
    let cache = c.path("cache");
    let mut args = vec![
        OsStr::new("repair"),
        OsStr::new("--cache-dir"),
        cache.as_os_str(),
    ];
    if dry_run {
        args.push(OsStr::new("--dry-run"));
    }
    let (code, v, _) = c.run_json(&args, agents);
    (code, v)
}

/// The one snapshot of a status report.
fn only_snapshot(status: &Value) -> &Value {
    let s = status["snapshots"].as_array().expect("snapshots array");
    assert_eq!(s.len(), 1, "{status}");
    &s[0]
}

fn agent<'a>(status: &'a Value, addr: &str) -> &'a Value {
    status["agents"]
        .as_array()
        .expect("agents array")
        .iter()
        .find(|a| a["addr"].as_str() == Some(addr))
        .unwrap_or_else(|| panic!("no agent {addr} in {status}"))
}

fn margin(status: &Value) -> i64 {
    only_snapshot(status)["margin"]
        .as_i64()
        .unwrap_or_else(|| panic!("no margin in {status}"))
}

/// An agent lost for good (killed, its directory deleted): `status` and `verify` report the lost
/// margin; `repair` rebuilds its shards onto the agent outside each stripe; then two more agents
/// can go and the restore is still byte for byte.
#[test]
fn lost_agent_is_repaired_and_two_more_may_go() {
    let mut c = Cluster::start(7);
    let img = ImageSpec::random(40 * MIB + 4096, 0x6ea1_0001)
        .zero_mib(8..12)
        .write(&c.path("disk.img"));
    let snap = c.snapshot(&img.path, &[]);
    let id = str_of(&snap, "snapshot").to_string();
    assert_eq!(u64_of(&snap, "agents"), 7, "{snap}");
    let all = c.agents_arg();

    let (code, st) = c.status_json(&all);
    assert_eq!(code, 0, "healthy status exits 0: {st}");
    assert_eq!(margin(&st), 2, "{st}");
    assert_eq!(str_of(only_snapshot(&st), "state"), "ok");
    assert_eq!(st["agents"].as_array().unwrap().len(), 7, "{st}");
    for a in st["agents"].as_array().unwrap() {
        assert_eq!(a["reachable"], true, "{st}");
        assert!(a["last_seen"].as_u64().is_some(), "{st}");
    }
    let total: u64 = c
        .agents
        .iter()
        .map(|a| scan::shard_files(a.dir()).len() as u64)
        .sum();
    assert_eq!(
        st["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["shards"].as_u64().unwrap())
            .sum::<u64>(),
        total,
        "STAT shard counts: {st}"
    );

    // Agent 3 is lost for good.
    let lost_addr = c.agents[3].addr_str();
    let lost_shards = scan::shard_files(c.agents[3].dir()).len() as u64;
    assert!(lost_shards > 0);
    c.agents[3].kill();
    std::fs::remove_dir_all(c.agents[3].dir()).unwrap();

    let (code, st) = c.status_json(&all);
    assert_eq!(code, 2, "below the configured m: exit 2: {st}");
    assert_eq!(margin(&st), 1, "{st}");
    assert_eq!(str_of(only_snapshot(&st), "state"), "degraded");
    assert_eq!(
        u64_of(only_snapshot(&st), "absent_shards"),
        lost_shards,
        "{st}"
    );
    let lost = agent(&st, &lost_addr);
    assert_eq!(lost["reachable"], false, "{st}");
    assert!(
        lost["last_seen"].as_u64().is_some(),
        "seen by the first status: {st}"
    );
    assert_eq!(c.verify_code(&id, &all), 2, "verify agrees");

    // A dry run plans without changing anything.
    let (code, plan) = repair(&c, &all, true);
    assert_eq!(code, 0, "{plan}");
    assert_eq!(
        plan["moves"].as_array().unwrap().len() as u64,
        lost_shards,
        "{plan}"
    );
    assert_eq!(c.status_json(&all).0, 2, "a dry run changes nothing");

    let (code, rep) = repair(&c, &all, false);
    assert_eq!(code, 0, "{rep}");
    assert_eq!(u64_of(&rep, "shards_rebuilt"), lost_shards, "{rep}");
    assert_eq!(u64_of(&rep, "shards_failed"), 0, "{rep}");
    // Each lost shard (one per stripe) was rebuilt from k = 4 shard files of its size.
    assert_eq!(
        u64_of(&rep, "bytes_read"),
        4 * u64_of(&rep, "bytes_rebuilt"),
        "{rep}"
    );
    let s = &rep["snapshots"][0];
    assert_eq!(
        (u64_of(s, "revision_before"), u64_of(s, "revision_after")),
        (0, 1),
        "{rep}"
    );
    assert_eq!(u64_of(s, "slots_moved"), lost_shards, "{rep}");
    for m in rep["moves"].as_array().unwrap() {
        assert_eq!(str_of(m, "from"), lost_addr, "{rep}");
        assert_ne!(str_of(m, "to"), lost_addr, "{rep}");
    }
    // Each stripe still has its k+m shards on k+m distinct agents: one per agent here.
    for a in c.agents.iter().filter(|a| a.addr_str() != lost_addr) {
        let files = scan::shard_files(a.dir());
        let stripes = scan::stripe_ids(a.dir());
        assert_eq!(
            files.len(),
            stripes.len(),
            "two shards of one stripe on {}",
            a.name()
        );
    }

    let (code, st) = c.status_json(&all);
    assert_eq!(code, 0, "full redundancy again: {st}");
    assert_eq!(margin(&st), 2, "{st}");
    assert_eq!(u64_of(only_snapshot(&st), "revision"), 1, "{st}");
    assert_eq!(c.verify_code(&id, &all), 0, "verify is clean after repair");
    let (code, again) = repair(&c, &all, false);
    assert_eq!(
        (code, u64_of(&again, "shards_rebuilt")),
        (0, 0),
        "nothing left: {again}"
    );

    // Two more agents go; one live address is enough; the restore is exact.
    c.agents[0].kill();
    c.agents[5].kill();
    let target = c.path("restored.img");
    let r = c.restore(&id, &target, &c.agents[1].addr_str());
    assert_eq!(
        sha256(&target),
        img.sha256(),
        "restore after repair + 2 losses: {r}"
    );
    let (code, st) = c.status_json(&c.agents[1].addr_str());
    assert_eq!((code, margin(&st)), (2, 0), "{st}");
}

/// Bit rot in one shard file: `status` cannot see it (names only), the agent's scrub finds it
/// and quarantines it (never deletes), `repair` puts the same bytes back in place, `verify` is
/// clean again.
#[test]
fn bit_rot_is_scrubbed_quarantined_and_repaired() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(24 * MIB, 0x6ea1_0002).write(&c.path("disk.img"));
    let snap = c.snapshot(&img.path, &[]);
    let id = str_of(&snap, "snapshot").to_string();
    let all = c.agents_arg();

    let victim = &c.agents[1];
    let file = scan::shard_files(victim.dir())[0].clone();
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    let (stripe, index) = scan::shard_name(&name).unwrap();
    let original = std::fs::read(&file).unwrap();
    let mut rotten = original.clone();
    let at = rotten.len() - 100;
    rotten[at] ^= 0x08;
    std::fs::write(&file, &rotten).unwrap();

    let (code, _) = c.status_json(&all);
    assert_eq!(code, 0, "status goes by presence only");

    let (code, sc, _) = c.run_json(&[OsStr::new("scrub")], &all);
    assert_eq!(code, 2, "bad shards wait for repair: {sc}");
    assert_eq!(u64_of(&sc, "bad_unrestored"), 1, "{sc}");
    let entry = sc["agents"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["addr"].as_str() == Some(&victim.addr_str()))
        .unwrap();
    assert_eq!(str_of(entry, "status"), "done", "{sc}");
    assert_eq!(
        u64_of(entry, "checked"),
        scan::shard_files(victim.dir()).len() as u64 + 1
    );
    let bad = &entry["bad"][0];
    assert_eq!(
        (str_of(bad, "stripe"), u64_of(bad, "index")),
        (stripe.as_str(), index as u64)
    );
    assert!(str_of(bad, "reason").contains("crc32c"), "{sc}");
    assert!(!file.exists(), "the rotten file left shards/");
    let quarantined = scan::files(&victim.dir().join("quarantine"));
    assert_eq!(quarantined.len(), 1, "kept in quarantine, not deleted");
    assert_eq!(std::fs::read(&quarantined[0]).unwrap(), rotten);

    let (code, st) = c.status_json(&all);
    assert_eq!((code, margin(&st)), (2, 1), "now it shows: {st}");

    let (code, rep) = repair(&c, &all, false);
    assert_eq!(code, 0, "{rep}");
    assert_eq!(u64_of(&rep, "shards_rebuilt"), 1, "{rep}");
    assert_eq!(
        u64_of(&rep["snapshots"][0], "slots_moved"),
        0,
        "put back in place: {rep}"
    );
    assert_eq!(u64_of(&rep["snapshots"][0], "revision_after"), 0, "{rep}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        original,
        "deterministic encryption: the rebuilt shard is the original"
    );
    assert_eq!(c.verify_code(&id, &all), 0, "verify is clean after repair");
    let (code, sc, _) = c.run_json(&[OsStr::new("scrub")], &all);
    assert_eq!(code, 0, "{sc}");
    assert_eq!(sc_restored(&sc), 1, "{sc}");
}

fn sc_restored(sc: &Value) -> usize {
    sc["agents"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["bad"].as_array().cloned().unwrap_or_default())
        .filter(|b| b["restored"] == true)
        .count()
}

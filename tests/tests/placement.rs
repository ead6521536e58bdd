//! Client PCs come and go, and they are not equal: placement by free space, agents off or cut
//! off the network during a snapshot, `--allow-degraded` with too few agents and `repair`
//! spreading its doubled shards afterwards, and `repair --watch` waiting `--repair-after` before
//! rebuilding around a missing agent.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sa_tests::cluster::{expect_fail, parse_json, shown, str_of, u64_of, ClusterOptions};
use sa_tests::netns::{NetNs, NsAgent};
use sa_tests::proc::Proc;
use sa_tests::{scan, wait, Agent, Cluster, ImageSpec, MIB};
use serde_json::Value;

fn only_snapshot(status: &Value) -> &Value {
    let s = status["snapshots"].as_array().expect("snapshots array");
    assert_eq!(s.len(), 1, "{status}");
    &s[0]
}

fn margin(status: &Value) -> i64 {
    only_snapshot(status)["margin"]
        .as_i64()
        .unwrap_or_else(|| panic!("no margin in {status}"))
}

fn agent_status<'a>(status: &'a Value, addr: &str) -> &'a Value {
    status["agents"]
        .as_array()
        .expect("agents array")
        .iter()
        .find(|a| a["addr"].as_str() == Some(addr))
        .unwrap_or_else(|| panic!("no agent {addr} in {status}"))
}

fn restore_matches(c: &Cluster, snapshot: &str, agents: &str, want: &str, what: &str) {
    let target = c.path(&format!("restored-{}.img", what.replace(' ', "-")));
    c.restore(snapshot, &target, agents);
    assert_eq!(sa_tests::sha256(&target), want, "{what}: restore differs");
    std::fs::remove_file(&target).ok();
}

/// One of seven agents is off when the snapshot runs: it is placed around, and it verifies and
/// reports full redundancy without that agent.
#[test]
fn one_of_seven_off_is_placed_around() {
    let mut c = Cluster::start(7);
    c.agents[6].kill();
    let img = ImageSpec::random(24 * MIB, 0x91ac_e0001)
        .zero_mib(4..8)
        .write(&c.path("disk.img"));
    let snap = c.snapshot(&img.path, &[]);
    let id = str_of(&snap, "snapshot").to_string();
    assert_eq!(u64_of(&snap, "agents"), 6, "{snap}");
    assert_eq!(
        snap["agents_unreachable"],
        serde_json::json!([c.agents[6].addr_str()]),
        "{snap}"
    );
    assert_eq!(snap["margin"], 2, "{snap}");
    assert!(scan::shard_files(c.agents[6].dir()).is_empty());
    let all = c.agents_arg();
    assert_eq!(c.verify_code(&id, &all), 0, "verify without the off agent");
    let (code, st) = c.status_json(&all);
    assert_eq!(code, 0, "{st}");
    assert_eq!(margin(&st), 2, "{st}");
    restore_matches(&c, &id, &all, &img.sha256(), "around an off agent");
}

/// An agent at its quota gets no shard and one near it gets few; the snapshot still has full
/// redundancy on the others, and no agent goes over its quota.
#[test]
fn agents_at_or_near_quota_get_less() {
    // Shard files are about 1 MiB (4 MiB stripes, k = 4). a3: room for none; a5: for a few.
    let c = Cluster::start_with(ClusterOptions {
        agents: 8,
        agent_args: vec![
            (3, vec!["--quota".into(), "512K".into()]),
            (5, vec!["--quota".into(), "6M".into()]),
        ],
        ..Default::default()
    });
    // 40 MiB: 10 stripes, 60 shards; the 6 roomy agents hold at most 10 each.
    let img = ImageSpec::random(40 * MIB, 0x91ac_e0002).write(&c.path("disk.img"));
    let snap = c.snapshot(&img.path, &[]);
    let id = str_of(&snap, "snapshot").to_string();
    assert_eq!(snap["margin"], 2, "full redundancy: {snap}");
    let planned = |addr: &str| -> u64 {
        snap["placement"]
            .as_array()
            .expect("placement array")
            .iter()
            .find(|p| p["addr"].as_str() == Some(addr))
            .and_then(|p| p["planned_shards"].as_u64())
            .unwrap_or_else(|| panic!("no placement for {addr}: {snap}"))
    };
    let full = &c.agents[3];
    let near = &c.agents[5];
    assert_eq!(planned(&full.addr_str()), 0, "{snap}");
    assert_eq!(
        scan::shard_files(full.dir()).len(),
        0,
        "the agent at its quota got shards"
    );
    let near_shards = scan::shard_files(near.dir()).len();
    let roomy = scan::shard_files(c.agents[0].dir()).len();
    assert!(
        near_shards < roomy && near_shards <= 5,
        "the nearly full agent should get less: {near_shards} vs {roomy}"
    );
    let all = c.agents_arg();
    assert_eq!(c.verify_code(&id, &all), 0, "verify clean");
    let (code, st) = c.status_json(&all);
    assert_eq!((code, margin(&st)), (0, 2), "{st}");
    for a in [full, near] {
        let s = agent_status(&st, &a.addr_str());
        let (used, quota) = (u64_of(s, "used"), u64_of(s, "quota"));
        assert!(
            used <= quota,
            "{}: used {used} > quota {quota}",
            a.addr_str()
        );
    }
    // Room for none and room for few both show in status.
    assert!(
        u64_of(agent_status(&st, &full.addr_str()), "free") < MIB,
        "{st}"
    );
    assert!(
        agent_status(&st, &c.agents[0].addr_str())["fs_free"]
            .as_u64()
            .is_some_and(|f| f > 0),
        "filesystem free space reported: {st}"
    );
    // And with that agent's room still tiny, a restore without two others is exact.
    let without: Vec<&Agent> = c
        .agents
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 0 && *i != 1)
        .map(|(_, a)| a)
        .collect();
    restore_matches(
        &c,
        &id,
        &sa_tests::cluster::join_addrs(without),
        &img.sha256(),
        "quota",
    );
}

/// A fleet too small for the volume is refused before anything is stored, with the figures.
#[test]
fn fleet_too_small_is_refused_up_front() {
    let c = Cluster::start_with(ClusterOptions {
        agents: 6,
        agent_args: (0..6)
            .map(|i| (i, vec!["--quota".into(), "8M".into()]))
            .collect(),
        ..Default::default()
    });
    // 64 MiB of data: 16 stripes, each agent would need about 16 MiB.
    let img = ImageSpec::random(64 * MIB, 0x91ac_e0003).write(&c.path("disk.img"));
    let out = c.sa(&[OsStr::new("snapshot"), img.path.as_os_str()]);
    let msg = expect_fail(&out, Some(1), "snapshot onto a fleet too small");
    assert!(
        msg.contains("cannot hold") && msg.contains("nothing was stored"),
        "the error must say the agents cannot hold it:\n{}",
        shown(&out)
    );
    for a in &c.agents {
        assert!(
            scan::shard_files(a.dir()).is_empty(),
            "{}: shards stored before the refusal",
            a.addr_str()
        );
    }
}

/// Fewer than k + m agents: refused by default (saying what to do), stored with every shard
/// under `--allow-degraded` (status exits 2), then spread by `repair` once more agents are up
/// (status 0), and exact with two agents gone.
#[test]
fn allow_degraded_then_repair_spreads() {
    let mut c = Cluster::start(4);
    let img = ImageSpec::random(32 * MIB, 0x91ac_e0004)
        .zero_mib(8..12)
        .write(&c.path("disk.img"));
    let out = c.sa(&[OsStr::new("snapshot"), img.path.as_os_str()]);
    let msg = expect_fail(&out, Some(1), "snapshot onto 4 agents at k=4 m=2");
    assert!(
        msg.contains("--allow-degraded") && msg.contains('6'),
        "the refusal must say what to do:\n{}",
        shown(&out)
    );
    for a in &c.agents {
        assert!(
            scan::shard_files(a.dir()).is_empty(),
            "stored before refusing"
        );
    }

    let snap = c.snapshot(&img.path, &["--allow-degraded"]);
    let id = str_of(&snap, "snapshot").to_string();
    assert_eq!(snap["degraded"], true, "{snap}");
    assert_eq!(
        snap["margin"], 1,
        "4 agents, 6 shards: one agent loss survivable: {snap}"
    );
    let stored: usize = c
        .agents
        .iter()
        .map(|a| scan::shard_files(a.dir()).len())
        .sum();
    assert_eq!(stored, 6 * 7, "every shard of the 7 data stripes exists");
    let four = c.agents_arg();
    let (code, st) = c.status_json(&four);
    assert_eq!(code, 2, "below m: {st}");
    assert_eq!(str_of(only_snapshot(&st), "state"), "degraded", "{st}");
    assert_eq!(margin(&st), 1, "{st}");
    assert!(u64_of(only_snapshot(&st), "crowded_stripes") > 0, "{st}");
    assert_eq!(u64_of(only_snapshot(&st), "absent_shards"), 0, "{st}");
    // Degraded but whole: exact.
    restore_matches(&c, &id, &four, &img.sha256(), "degraded");

    // Two more PCs: repair moves the doubled shards onto them.
    let owner = c.key.owner.clone();
    for name in ["a4", "a5"] {
        let a = Agent::start(c.dir(), name, &owner, &[]);
        c.agents.push(a);
    }
    let all = c.agents_arg();
    let cache = c.path("cache");
    let (code, rep, _) = c.run_json(
        &[
            OsStr::new("repair"),
            OsStr::new("--cache-dir"),
            cache.as_os_str(),
        ],
        &all,
    );
    assert_eq!(code, 0, "{rep}");
    assert!(u64_of(&rep, "shards_spread") > 0, "{rep}");
    assert_eq!(u64_of(&rep, "shards_failed"), 0, "{rep}");
    assert!(!scan::shard_files(c.agents[4].dir()).is_empty());
    assert!(!scan::shard_files(c.agents[5].dir()).is_empty());
    let (code, st) = c.status_json(&all);
    assert_eq!(code, 0, "full redundancy after the repair: {st}");
    assert_eq!(margin(&st), 2, "{st}");
    assert_eq!(u64_of(only_snapshot(&st), "crowded_stripes"), 0, "{st}");
    assert_eq!(c.verify_code(&id, &all), 0);
    // Any two may go now.
    c.agents[0].kill();
    c.agents[1].kill();
    restore_matches(&c, &id, &all, &img.sha256(), "two gone after repair");
}

/// Sends SIGTERM to a process (no libc here: the `kill` program).
fn sigterm(pid: u32) {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("cannot run kill");
    assert!(st.success(), "kill -TERM {pid} failed");
}

/// Complete JSON lines written so far to `path`.
fn json_lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| parse_json(l, "repair --watch line"))
        .collect()
}

fn report_u64(line: &Value, field: &str) -> u64 {
    line["report"][field].as_u64().unwrap_or(0)
}

/// `repair --watch`: an agent lost for good is rebuilt around only after `--repair-after`;
/// before that its shards are held back; afterwards status is 0. SIGTERM ends it cleanly.
#[test]
fn repair_watch_waits_for_the_threshold() {
    let mut c = Cluster::start(7);
    let img = ImageSpec::random(24 * MIB, 0x91ac_e0005).write(&c.path("disk.img"));
    let id = str_of(&c.snapshot(&img.path, &[]), "snapshot").to_string();
    let all = c.agents_arg();

    let out_path = c.path("watch.jsonl");
    let err_path = c.path("watch.log");
    let cache = c.path("cache");
    let state = c.path("watch-state");
    let mut cmd = c.sa_command(&[
        OsStr::new("repair"),
        OsStr::new("--watch"),
        OsStr::new("--repair-after"),
        OsStr::new("2s"),
        OsStr::new("--interval"),
        OsStr::new("200ms"),
        OsStr::new("--json"),
        OsStr::new("--cache-dir"),
        cache.as_os_str(),
        OsStr::new("--state"),
        state.as_os_str(),
        OsStr::new("-v"),
    ]);
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap());
    let mut watcher = Proc::spawn(cmd, "sa-image repair --watch");
    let log = || std::fs::read_to_string(&err_path).unwrap_or_default();
    wait::until_true(Duration::from_secs(60), "a first watch pass", || {
        assert!(watcher.is_running(), "the watcher exited:\n{}", log());
        !json_lines(&out_path).is_empty()
    });
    let first = json_lines(&out_path);
    assert!(first[0]["report"].is_object(), "{}", first[0]);
    assert_eq!(report_u64(&first[0], "shards_rebuilt"), 0, "{}", first[0]);

    // Agent 2 is lost for good.
    let lost = c.agents[2].addr_str();
    c.agents[2].kill();
    std::fs::remove_dir_all(c.agents[2].dir()).unwrap();
    let killed_at = Instant::now();

    // First it is seen missing and its shards are held back.
    let held = wait::until(Duration::from_secs(60), "a pass holding back", || {
        assert!(watcher.is_running(), "the watcher exited:\n{}", log());
        json_lines(&out_path)
            .into_iter()
            .find(|l| report_u64(l, "shards_held") > 0)
    });
    assert_eq!(report_u64(&held, "shards_rebuilt"), 0, "{held}");
    eprintln!("held back {:?} after the kill", killed_at.elapsed());
    assert_eq!(held["missing"][0]["addr"], lost.as_str(), "{held}");
    assert_eq!(held["missing"][0]["repairing"], false, "{held}");
    let since = held["missing"][0]["since_ms"].as_u64().expect("since_ms");
    // Still degraded while it waits (nothing rebuilt yet).
    let (code, st) = c.status_json(&all);
    let rebuilt_yet = json_lines(&out_path)
        .iter()
        .any(|l| report_u64(l, "shards_rebuilt") > 0);
    if !rebuilt_yet {
        assert_eq!(code, 2, "degraded while the watcher waits: {st}");
    }

    // Then, after the threshold, rebuilt.
    let done = wait::until(Duration::from_secs(90), "a pass rebuilding", || {
        assert!(watcher.is_running(), "the watcher exited:\n{}", log());
        json_lines(&out_path)
            .into_iter()
            .find(|l| report_u64(l, "shards_rebuilt") > 0)
    });
    let at = done["at_ms"].as_u64().expect("at_ms");
    assert!(
        at >= since + 2000,
        "rebuilt {} ms after it was first seen missing, before --repair-after 2s: {done}",
        at - since
    );
    for l in json_lines(&out_path) {
        let at = l["at_ms"].as_u64().unwrap_or(0);
        if at < since + 2000 {
            assert_eq!(
                report_u64(&l, "shards_rebuilt"),
                0,
                "rebuilt too early: {l}"
            );
        }
    }
    assert_eq!(report_u64(&done, "shards_failed"), 0, "{done}");
    let (code, st) = c.status_json(&all);
    assert_eq!(code, 0, "full redundancy after the watcher's repair: {st}");
    assert_eq!(margin(&st), 2, "{st}");

    // The state remembers the lost agent (a restarted watcher keeps the clock).
    let remembered = std::fs::read_to_string(&state).unwrap_or_default();
    assert!(remembered.contains(&lost), "state file: {remembered:?}");

    sigterm(watcher.id());
    let status = watcher.wait(Duration::from_secs(30));
    assert!(status.success(), "watcher on SIGTERM: {status}\n{}", log());
    assert!(c.verify_code(&id, &all) == 0);
}

/// An agent cut off the network (not killed) mid-snapshot: the snapshot fails cleanly or
/// completes; no half-written shard is taken as good; with the link back a run completes, and a
/// restore with the agent cut off again is exact.
#[test]
fn agent_cut_off_mid_snapshot() {
    let ns = match NetNs::create() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIPPED agent_cut_off_mid_snapshot: {why}");
            return;
        }
    };
    let c = Cluster::start(6);
    let mut far = NsAgent::start(&ns, c.dir(), "far", &c.key.owner, &[]);
    let all = format!("{},{}", c.agents_arg(), far.addr_str());
    let cache = c.path("cache");
    // A small snapshot first: the catalog exists, and it must survive whatever happens next.
    let small = ImageSpec::random(8 * MIB, 0x91ac_e0006).write(&c.path("small.img"));
    let (code, first, _) = c.run_json(&[OsStr::new("snapshot"), small.path.as_os_str()], &all);
    assert_eq!(code, 0, "{first}");
    let first_id = str_of(&first, "snapshot").to_string();
    let before = scan::shard_files(far.dir()).len();

    let big = ImageSpec::random(256 * MIB, 0x91ac_e0007).write(&c.path("big.img"));
    let out_path = c.path("cut.json");
    let err_path = c.path("cut.log");
    let mut cmd = Command::new(sa_tests::bins::bin("sa-image"));
    cmd.arg("snapshot")
        .arg(&big.path)
        .arg("--json")
        .args(["--request-timeout", "5s"])
        .arg("--key")
        .arg(&c.key.path)
        .arg("--agents")
        .arg(&all)
        .arg("--cache-dir")
        .arg(&cache)
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap());
    let mut snap = Proc::spawn(cmd, "sa-image snapshot (cut mid-way)");
    wait::until_true(
        Duration::from_secs(60),
        "the far agent to receive shards",
        || {
            if let Some(st) = snap.try_wait() {
                panic!("the snapshot ended ({st}) before the cut; use a larger image");
            }
            scan::shard_files(far.dir()).len() > before + 2
        },
    );
    ns.cut();
    let cut_at = Instant::now();
    // The cut costs about the stall timeout (4 s): the link goes silent and the kernel gives up.
    let st = snap.wait(Duration::from_secs(120));
    eprintln!(
        "[cut snapshot] {st} after {:?}\nstdout: {}\nstderr: {}",
        cut_at.elapsed(),
        std::fs::read_to_string(&out_path).unwrap_or_default(),
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    // Six agents are left for k + m = 6: the far agent's part goes to them and the snapshot
    // completes, with the shards the far agent took before the cut counted as absent.
    assert!(
        st.success(),
        "the snapshot should complete on the agents left: {st}\n{}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    let v = parse_json(
        &std::fs::read_to_string(&out_path).unwrap(),
        "cut snapshot report",
    );
    assert_eq!(v["agents_lost"], serde_json::json!([far.addr_str()]), "{v}");
    let m = v["margin"].as_i64().expect("margin");
    assert!((1..=2).contains(&m), "{v}");
    let big_id = str_of(&v, "snapshot").to_string();
    let (code, st) = c.status_json(&all);
    assert_eq!(
        code, 2,
        "the far agent's shards are absent while it is cut off: {st}"
    );
    // Both snapshots restore with the far agent still cut off.
    restore_matches(
        &c,
        &first_id,
        &all,
        &small.sha256(),
        "first with the far agent cut",
    );
    restore_matches(
        &c,
        &big_id,
        &all,
        &big.sha256(),
        "big with the far agent cut",
    );

    // The link back: the far agent's files are whole shards or nothing.
    ns.join();
    far.wait_reachable(Duration::from_secs(30));
    let shards_dir_files = scan::files(&far.dir().join("shards"));
    let named = scan::shard_files(far.dir());
    assert_eq!(
        shards_dir_files, named,
        "only whole, named shard files in shards/ (temp files stay in tmp/)"
    );
    // Whole files only: the scrub finds nothing bad.
    let (code, scrub, _) = c.run_json(&[OsStr::new("scrub")], &all);
    assert_eq!(code, 0, "scrub: {scrub}");
    let far_scrub = scrub["agents"]
        .as_array()
        .expect("agents array")
        .iter()
        .find(|a| a["addr"].as_str() == Some(far.addr_str().as_str()))
        .unwrap_or_else(|| panic!("far agent not scrubbed: {scrub}"));
    assert!(
        u64_of(far_scrub, "checked") + u64_of(far_scrub, "bad_total") >= named.len() as u64,
        "every shard file of the far agent checked: {far_scrub}"
    );
    let served: Vec<String> = scan::shard_files(far.dir())
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_str()?.to_string()))
        .collect();
    assert_eq!(
        far_scrub["bad"].as_array().map(Vec::len),
        Some(0),
        "a shard cut off mid-write is never in shards/: {far_scrub} (served: {served:?})"
    );

    // A run with the link up completes (resuming what was stored), verifies clean, and restores
    // exactly with the far agent cut off again.
    let (code, again, out) = c.run_json(
        &[
            OsStr::new("snapshot"),
            big.path.as_os_str(),
            OsStr::new("--cache-dir"),
            cache.as_os_str(),
        ],
        &all,
    );
    assert_eq!(code, 0, "{}", shown(&out));
    let id = str_of(&again, "snapshot").to_string();
    assert_eq!(c.verify_code(&id, &all), 0);
    ns.cut();
    restore_matches(
        &c,
        &id,
        &all,
        &big.sha256(),
        "big after the link came back, cut again",
    );
    let (code, st) = c.status_json(&all);
    assert_eq!(
        code, 2,
        "status must report the cut-off agent's shards as absent, every stripe still recoverable: {st}"
    );
    far.kill();
    writeln!(std::io::stderr(), "far agent log:\n{}", far.log()).ok();
}

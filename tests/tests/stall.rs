//! No stall: a client PC cut off the network without a reset (its link goes down in the middle of
//! an operation: nothing answers, nothing is refused) costs a snapshot, a restore and a serving
//! read a few seconds (the stall timeout, 4 s by default), not the 60 s request timeout.
//!
//! Each PC is a network namespace joined to this one by a veth pair ([`NetNs`]) with an agent
//! inside. The PC to be cut has its link limited to a few Mbit/s, so each operation is still
//! busy with it when the cut comes; the cut comes once some MiB went through that link, while
//! requests to it are out. The bound on the time from the cut to the end is one that the
//! request timeout (60 s) could never meet.
//!
//! Root only (namespaces, tc): without root each test says SKIPPED and returns.

use std::ffi::OsStr;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sa_tests::bins::bin;
use sa_tests::cluster::{expect_ok, parse_json, shown, str_of};
use sa_tests::netns::{NetNs, NsAgent};
use sa_tests::proc::Proc;
use sa_tests::serve::Serve;
use sa_tests::{sha256, wait, Cluster, ImageSpec, MIB};
use serde_json::Value;

/// The cut PC's link speed: slow enough that an operation is still using it at the cut.
const SLOW_LINK: &str = "24mbit";
/// The time from the cut to the end that a stall costing the request timeout could not meet.
const AFTER_CUT: Duration = Duration::from_secs(15);

/// A key, `n` PCs in namespaces, each with an agent.
struct Office {
    /// Declared before `nss`: the agents die before their namespaces go.
    agents: Vec<NsAgent>,
    nss: Vec<NetNs>,
    c: Cluster,
}

impl Office {
    /// `None` (and SKIPPED printed) without root.
    fn start(test: &str, n: usize) -> Option<Office> {
        let c = Cluster::start(0);
        let mut nss = Vec::new();
        for _ in 0..n {
            match NetNs::create() {
                Ok(ns) => nss.push(ns),
                Err(why) => {
                    eprintln!("SKIPPED {test}: {why}");
                    return None;
                }
            }
        }
        let agents = nss
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                NsAgent::start(
                    ns,
                    c.dir(),
                    &format!("pc{i}"),
                    &c.key.owner,
                    &["--min-free", "0"],
                )
            })
            .collect();
        Some(Office { agents, nss, c })
    }

    fn all(&self) -> String {
        let a: Vec<String> = self.agents.iter().map(NsAgent::addr_str).collect();
        a.join(",")
    }

    /// `sa-image ARGS --cache-dir DIR/cache --key KEY --agents ALL`, not started.
    fn command(&self, args: &[&OsStr]) -> Command {
        let mut cmd = Command::new(bin("sa-image"));
        cmd.args(args)
            .arg("--cache-dir")
            .arg(self.c.path("cache"))
            .arg("--key")
            .arg(&self.c.key.path)
            .arg("--agents")
            .arg(self.all());
        cmd
    }

    /// A healthy k=4 m=2 snapshot of `image`: its id.
    fn snapshot(&self, image: &std::path::Path) -> String {
        let args = [
            OsStr::new("snapshot"),
            image.as_os_str(),
            OsStr::new("--data-shards"),
            OsStr::new("4"),
            OsStr::new("--parity-shards"),
            OsStr::new("2"),
            OsStr::new("--json"),
        ];
        let out = sa_tests::proc::run(self.command(&args), self.c.dir(), Duration::from_secs(120));
        let v = parse_json(&expect_ok(&out, "healthy snapshot"), &shown(&out));
        str_of(&v, "snapshot").to_string()
    }

    /// PC `i`'s link made slow.
    fn slow(&self, i: usize) {
        self.nss[i].shape(SLOW_LINK);
    }

    /// Waits until `op` has moved `bytes` more over PC `i`'s link (failing if `op` ends first),
    /// then cuts the link; returns when it was cut.
    fn cut_during(&self, i: usize, op: &mut Proc, what: &str, bytes: u64) -> Instant {
        let start = self.nss[i].traffic();
        wait::until_true(
            Duration::from_secs(120),
            &format!("{what} to move {} MiB over pc{i}'s link", bytes / MIB),
            || {
                if let Some(st) = op.try_wait() {
                    panic!(
                        "{what} ended ({st}) before the cut: the link is too fast for this test"
                    );
                }
                self.nss[i].traffic() - start >= bytes
            },
        );
        self.nss[i].cut();
        Instant::now()
    }
}

/// A process whose stdout and stderr go to files under the cluster directory.
fn spawn(o: &Office, args: &[&OsStr], name: &str) -> (Proc, PathBuf, PathBuf) {
    let (out, err) = (
        o.c.path(&format!("{name}.out")),
        o.c.path(&format!("{name}.err")),
    );
    let mut cmd = o.command(args);
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out).expect("stdout file"))
        .stderr(File::create(&err).expect("stderr file"));
    (Proc::spawn(cmd, name), out, err)
}

fn read(p: &PathBuf) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

fn assert_quick(after_cut: Duration, what: &str, log: &str) {
    assert!(
        after_cut < AFTER_CUT,
        "{what} took {after_cut:?} after the cut (bound {AFTER_CUT:?}): the cut PC stalled it; log:\n{log}"
    );
}

/// Runs `sa-image ARGS` as `name`, cuts PC `victim` once 2 MiB crossed its link, waits for the
/// command, and checks that it succeeded within [`AFTER_CUT`] of the cut; its stdout file.
fn run_cut(o: &Office, args: &[&OsStr], name: &str, victim: usize) -> PathBuf {
    let started = Instant::now();
    let (mut op, out, err) = spawn(o, args, name);
    let what = format!("the {name}");
    let cut = o.cut_during(victim, &mut op, &what, 2 * MIB);
    let st = op.wait(Duration::from_secs(180));
    let after_cut = cut.elapsed();
    eprintln!(
        "[stall] {name}: cut after {:?}, ended {after_cut:?} after the cut ({st})",
        cut - started
    );
    assert!(st.success(), "{what} failed: {st}\n{}", read(&err));
    assert_quick(after_cut, &what, &read(&err));
    out
}

/// A snapshot whose PC is cut mid-run (seven PCs for k=4 m=2: the lost PC's part of the run goes
/// to the one outside each stripe) commits, without the lost PC in its manifest's fresh shards,
/// within seconds of the cut; the snapshot restores byte-identical.
#[test]
fn snapshot_with_a_pc_cut_mid_run_commits_within_seconds() {
    let Some(o) = Office::start("snapshot_with_a_pc_cut_mid_run_commits_within_seconds", 7) else {
        return;
    };
    let img = ImageSpec::random(64 * MIB, 0x57a1_0001).write(&o.c.path("disk.img"));
    let victim = 6;
    o.slow(victim);
    let args = [
        OsStr::new("snapshot"),
        img.path.as_os_str(),
        OsStr::new("--data-shards"),
        OsStr::new("4"),
        OsStr::new("--parity-shards"),
        OsStr::new("2"),
        OsStr::new("--json"),
    ];
    let out = run_cut(&o, &args, "snapshot", victim);
    let v = parse_json(&read(&out), "snapshot report");
    assert_eq!(
        v["agents_lost"],
        serde_json::json!([o.agents[victim].addr_str()]),
        "{v}"
    );
    // What was committed restores, byte for byte, without the cut PC.
    let id = str_of(&v, "snapshot").to_string();
    let target = o.c.path("restored.img");
    let args = [
        OsStr::new("restore"),
        OsStr::new(&id),
        OsStr::new("--to"),
        target.as_os_str(),
        OsStr::new("--json"),
        OsStr::new("--wake-wait"),
        OsStr::new("0"),
    ];
    let out = sa_tests::proc::run(o.command(&args), o.c.dir(), Duration::from_secs(120));
    expect_ok(&out, "restore of the snapshot cut mid-run");
    assert_eq!(sha256(&target), img.sha256());
}

/// A restore whose PC is cut mid-run completes byte-identical within seconds of the cut.
#[test]
fn restore_with_a_pc_cut_mid_run_completes_within_seconds() {
    let Some(o) = Office::start("restore_with_a_pc_cut_mid_run_completes_within_seconds", 6) else {
        return;
    };
    let img = ImageSpec::random(64 * MIB, 0x57a1_0002).write(&o.c.path("disk.img"));
    let id = o.snapshot(&img.path);
    let victim = 2;
    o.slow(victim);
    let target = o.c.path("restored.img");
    let args = [
        OsStr::new("restore"),
        OsStr::new(&id),
        OsStr::new("--to"),
        target.as_os_str(),
        OsStr::new("--json"),
    ];
    let out = run_cut(&o, &args, "restore", victim);
    assert_eq!(sha256(&target), img.sha256(), "restored bytes differ");
    let v: Value = parse_json(&read(&out), "restore report");
    assert!(
        v["missing_shards"].as_u64().unwrap_or(0) > 0,
        "the restore should have read around the cut PC: {v}"
    );
}

/// A real NBD client (nbdcopy) reading the whole export from `sa-image serve` while a PC is cut
/// gets every byte right, within seconds of the cut.
#[test]
fn serving_read_with_a_pc_cut_mid_read_completes_within_seconds() {
    let Some(o) = Office::start(
        "serving_read_with_a_pc_cut_mid_read_completes_within_seconds",
        6,
    ) else {
        return;
    };
    let img = ImageSpec::random(128 * MIB, 0x57a1_0003).write(&o.c.path("disk.img"));
    let id = o.snapshot(&img.path);
    let cache = o.c.path("cache");
    let serve = Serve::start(
        &o.c,
        &id,
        &o.all(),
        &["--cache-dir", cache.to_str().unwrap(), "--cache", "8MiB"],
    );
    // No slow link here: a serving read hedges around a slow PC, so it would barely be used.
    let victim = 3;
    let copy = o.c.path("copy.raw");
    let mut cmd = Command::new("nbdcopy");
    cmd.arg(&serve.url)
        .arg(&copy)
        .stdin(Stdio::null())
        .stderr(File::create(o.c.path("nbdcopy.err")).expect("stderr file"));
    let started = Instant::now();
    let mut reader = Proc::spawn(cmd, "nbdcopy");
    let cut = o.cut_during(victim, &mut reader, "nbdcopy", MIB);
    let st = reader.wait(Duration::from_secs(180));
    let after_cut = cut.elapsed();
    eprintln!(
        "[stall] serve read: cut after {:?}, ended {after_cut:?} after the cut ({st})",
        cut - started
    );
    assert!(
        st.success(),
        "nbdcopy failed: {st}\n{}\nserve log:\n{}",
        read(&o.c.path("nbdcopy.err")),
        serve.log()
    );
    assert_quick(after_cut, "nbdcopy", &serve.log());
    assert_eq!(sha256(&copy), img.sha256(), "served bytes differ");
    serve.stop();
}

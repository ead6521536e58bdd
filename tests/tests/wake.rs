//! Wake-on-LAN end to end: six client PCs in network namespaces, three of them asleep.
//!
//! Each PC is a network namespace joined to this one by a veth pair ([`NetNs`]); its agent
//! reports the MAC of its end of the pair and the pair's broadcast address in `STAT`, and a
//! snapshot keeps them in the agent book. A sleeping PC is the harness `tests/wake-harness.py`
//! in its namespace: it listens on UDP ports 9 and 7 and only on a magic packet for its MAC does
//! it wait the boot delay and become the agent (same directory, same address). The tests prove
//! that a restore through one awake agent wakes the sleepers and completes byte-identical,
//! that a restore fails after `--wake-wait` naming the sleepers when they do not wake, that
//! `agents wake` reports per member, that the daemon wakes every PC for its backup, and measure
//! the time from `serve` to the first byte an NBD client (qemu-img) reads with three of six
//! asleep.
//!
//! Root only (namespaces, ports 9 and 7): without root each test says SKIPPED and returns.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sa_tests::bins::bin;
use sa_tests::cluster::{expect_fail, parse_json, shown};
use sa_tests::daemon::{json_lines, Daemon};
use sa_tests::netns::NetNs;
use sa_tests::proc::Proc;
use sa_tests::{wait, Cluster, ImageSpec, MIB};
use serde_json::Value;

/// How long a woken PC takes to "boot" before its agent starts.
const WAKE_DELAY: Duration = Duration::from_secs(2);
/// Every agent's port inside its namespace (fixed, so a woken agent is where the book says).
const PORT: u16 = 7710;
const HARNESS: &str = include_str!("../wake-harness.py");

/// One client PC: its namespace, its agent or the harness standing in for it asleep.
struct Pc {
    name: String,
    dir: PathBuf,
    log: PathBuf,
    /// Declared before `ns`: the process dies before its namespace goes.
    proc: Option<Proc>,
    ns: NetNs,
}

impl Pc {
    fn addr(&self) -> String {
        format!("{}:{PORT}", self.ns.ns_ip())
    }

    fn agent_args(&self, owner: &str) -> Vec<String> {
        vec![
            bin("shard-agent").display().to_string(),
            "--dir".into(),
            self.dir.display().to_string(),
            "--listen".into(),
            self.addr(),
            "--owner".into(),
            owner.into(),
            // The test's few MiB fit whatever the disk's fill (the default floor is 10%).
            "--min-free".into(),
            "0".into(),
        ]
    }

    /// Starts its agent (awake) and waits until it accepts connections.
    fn wake_now(&mut self, owner: &str) {
        let args = self.agent_args(owner);
        self.spawn(Path::new(&args[0]), &args[1..], "agent");
        self.wait_listening();
    }

    /// Puts it to sleep: the agent stops and the harness listens for its magic packet (`deaf`:
    /// it never wakes). Waits until the harness has bound its ports.
    fn sleep(&mut self, owner: &str, base: &Path, deaf: bool) {
        self.proc = None;
        let harness = base.join("wake-harness.py");
        std::fs::write(&harness, HARNESS).expect("cannot write the harness");
        let ready = base.join(format!("{}.ready", self.name));
        let _ = std::fs::remove_file(&ready);
        let mac = if deaf {
            "deaf".into()
        } else {
            self.ns.ns_mac()
        };
        let mut args = vec![
            harness.display().to_string(),
            mac,
            format!("{}", WAKE_DELAY.as_secs_f64()),
            ready.display().to_string(),
            "--".into(),
        ];
        args.extend(self.agent_args(owner));
        self.spawn(Path::new("python3"), &args, "harness");
        wait::until_true(Duration::from_secs(15), "the harness to listen", || {
            ready.exists()
        });
    }

    fn spawn(&mut self, program: &Path, args: &[String], what: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("cannot open the PC's log");
        let mut cmd = self.ns.command(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.proc = Some(Proc::spawn(cmd, &format!("{what} of {}", self.name)));
    }

    fn wait_listening(&self) {
        let addr = self.addr().parse().expect("address");
        wait::until_true(
            Duration::from_secs(15),
            &format!("{} to accept connections", self.name),
            || std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok(),
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A key, six PCs (all awake), a 24 MiB image and its snapshot (k=4, m=2) stored on them.
struct Office {
    pcs: Vec<Pc>,
    c: Cluster,
    image: PathBuf,
    sha: String,
}

impl Office {
    /// `None` (and SKIPPED printed) without root.
    fn start(test: &str) -> Option<Office> {
        let c = Cluster::start(0);
        let mut pcs = Vec::new();
        for i in 0..6 {
            let ns = match NetNs::create() {
                Ok(ns) => ns,
                Err(why) => {
                    eprintln!("SKIPPED {test}: {why}");
                    return None;
                }
            };
            let name = format!("pc{i}");
            let mut pc = Pc {
                dir: c.path(&name),
                log: c.path(&format!("{name}.log")),
                name,
                proc: None,
                ns,
            };
            pc.wake_now(&c.key.owner);
            pcs.push(pc);
        }
        let img = ImageSpec::random(24 * MIB, 0x3a4e_0001)
            .zero_mib(8..12)
            .write(&c.path("disk.img"));
        let o = Office {
            pcs,
            image: img.path.clone(),
            sha: img.sha256(),
            c,
        };
        let all = o.all();
        let out = o.sa(
            &[
                "snapshot",
                o.image.to_str().unwrap(),
                "--data-shards",
                "4",
                "--parity-shards",
                "2",
                "--json",
            ],
            &all,
            "snapshot-cache",
        );
        let snap = parse_json(&String::from_utf8_lossy(&out.stdout), &shown(&out));
        assert_eq!(snap["agents"], 6, "{snap}");
        Some(o)
    }

    fn all(&self) -> String {
        self.pcs.iter().map(Pc::addr).collect::<Vec<_>>().join(",")
    }

    /// `sa-image ARGS --key KEY --agents AGENTS --cache-dir DIR/CACHE`, its output.
    fn sa(&self, args: &[&str], agents: &str, cache: &str) -> Output {
        let cache = self.c.path(cache);
        let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        all.extend([OsStr::new("--cache-dir"), cache.as_os_str()]);
        self.c.sa_agents(&all, agents)
    }

    /// PCs 3, 4 and 5 go to sleep (`deaf`: they will not wake).
    fn sleepers(&mut self, deaf: bool) {
        let (owner, base) = (self.c.key.owner.clone(), self.c.dir().to_path_buf());
        for pc in &mut self.pcs[3..] {
            pc.sleep(&owner, &base, deaf);
        }
    }
}

fn sleeper_names(o: &Office) -> Vec<String> {
    o.pcs[3..].iter().map(Pc::addr).collect()
}

/// Three of six PCs asleep and k = 4: a restore through one awake agent (and a fresh cache, so
/// the MACs come from the agent book on the agents) wakes them, waits for them, and restores
/// the image byte-identical; each sleeper got its magic packet. Then all six asleep and only a
/// sleeper's address given: the restore wakes them from this machine's copy of the book.
#[test]
fn restore_wakes_three_sleepers() {
    let Some(mut o) = Office::start("restore_wakes_three_sleepers") else {
        return;
    };
    o.sleepers(false);
    let target = o.c.path("restored.img");
    let started = Instant::now();
    let out = o.sa(
        &[
            "restore",
            "latest",
            "--to",
            target.to_str().unwrap(),
            "--wake-wait",
            "60s",
            "--json",
        ],
        &o.pcs[0].addr(),
        "fresh-cache",
    );
    let took = started.elapsed();
    assert!(out.status.success(), "restore failed:\n{}", shown(&out));
    let report = parse_json(&String::from_utf8_lossy(&out.stdout), &shown(&out));
    assert_eq!(sa_tests::sha256(&target), o.sha, "restored image differs");
    let woken: Vec<&str> = report["wake"]["woken"]
        .as_array()
        .expect("wake.woken")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for name in sleeper_names(&o) {
        assert!(
            woken.iter().any(|w| w.starts_with(&name)),
            "{name} not woken: {report}"
        );
    }
    // k = 4 needed one sleeper at least; the restore started as soon as it had them.
    let answered = report["wake"]["answered"].as_array().expect("answered");
    assert!(!answered.is_empty(), "{report}");
    for pc in &o.pcs[3..] {
        let log = pc.log();
        assert!(
            log.contains(&format!("magic packet for {}", pc.ns.ns_mac())),
            "{}: no magic packet: {log}",
            pc.name
        );
    }
    eprintln!(
        "restore with 3 of 6 asleep took {:.2}s (wake delay {:?})",
        took.as_secs_f64(),
        WAKE_DELAY
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("waiting for 3 agent(s) to wake"),
        "no progress line naming the sleepers: {stderr}"
    );
    // The wakes that answered are counted in the history: their wake success is measured now,
    // (1 + 4) / (1 + 5) with the prior worth five wakes at 80%.
    let out = o.sa(
        &["status", "--durability", "--json"],
        &o.all(),
        "fresh-cache",
    );
    assert!(out.status.success(), "{}", shown(&out));
    let d = parse_json(&String::from_utf8_lossy(&out.stdout), &shown(&out));
    for name in answered.iter().filter_map(Value::as_str) {
        let a = d["measured"]["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .find(|a| name.starts_with(a["addr"].as_str().unwrap_or("-")))
            .unwrap_or_else(|| panic!("{name} not in {d}"));
        assert_eq!(a["wake_measured"], true, "{a}");
        let w = a["wake"].as_f64().expect("wake");
        assert!((w - 5.0 / 6.0).abs() < 1e-9, "{a}");
    }

    // Every PC asleep, and the one address given is a sleeper's: the catalog itself is read
    // only after waking, from this machine's copy of the agent book (the snapshot's cache).
    let (owner, base) = (o.c.key.owner.clone(), o.c.dir().to_path_buf());
    for pc in &mut o.pcs {
        pc.sleep(&owner, &base, false);
    }
    let again = o.c.path("restored-again.img");
    let out = o.sa(
        &[
            "restore",
            "latest",
            "--to",
            again.to_str().unwrap(),
            "--wake-wait",
            "60s",
        ],
        &o.pcs[5].addr(),
        "snapshot-cache",
    );
    assert!(
        out.status.success(),
        "restore with all asleep: {}",
        shown(&out)
    );
    assert_eq!(sa_tests::sha256(&again), o.sha, "restored image differs");
}

/// Sleepers whose Wake-on-LAN is off: the restore fails after a short `--wake-wait`, naming
/// every sleeper, and leaves no target behind; `agents wake --all` reports them asleep (exit
/// 1); once they listen again, `agents wake --all` wakes them and says so per member, and
/// `agents wake` without an id or --all is a usage error.
#[test]
fn sleepers_that_do_not_wake_are_named() {
    let Some(mut o) = Office::start("sleepers_that_do_not_wake_are_named") else {
        return;
    };
    o.sleepers(true);
    // A cache that never saw anything: what it shows of the sleepers' past comes from the
    // history the snapshot stored on the agents (up), merged with what it sees now (down).
    let out = o.sa(&["agents", "list", "--json"], &o.all(), "list-cache");
    assert!(out.status.success(), "{}", shown(&out));
    let rows = parse_json(&String::from_utf8_lossy(&out.stdout), &shown(&out));
    for (i, pc) in o.pcs.iter().enumerate() {
        let row = rows
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["addr"].as_str() == Some(&pc.addr()))
            .unwrap_or_else(|| panic!("{} not listed: {rows}", pc.addr()));
        let up = row["availability"]["fraction"].as_f64().expect("fraction");
        if i < 3 {
            assert_eq!(up, 1.0, "{row}");
        } else {
            assert!(up > 0.0 && up < 1.0, "a sleeper seen up then down: {row}");
        }
        assert!(
            row["availability"]["observed_hours"].as_u64() >= Some(1),
            "{row}"
        );
        assert_eq!(row["availability"]["span_hours"], 720, "{row}");
        assert_eq!(row["mac"].as_str(), Some(pc.ns.ns_mac().as_str()), "{row}");
        let usual = row["usual_hours"].as_str().unwrap_or_default();
        assert!(usual.starts_with("too little history yet"), "{row}");
    }
    let text = o.sa(&["agents", "list"], &o.all(), "list-cache");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("up 100% of the last 30 days"), "{text}");
    assert!(
        text.contains(&format!("woken at MAC {}", o.pcs[3].ns.ns_mac())),
        "{text}"
    );

    // The model: six agents observed for under a day are assumed up 80%, and woken 80% of the
    // times they sleep (no wake recorded yet): P(4 of 6 up) without and with waking.
    let out = o.sa(
        &["status", "--durability", "--json"],
        &o.all(),
        "list-cache",
    );
    assert!(out.status.success(), "{}", shown(&out));
    let d = parse_json(&String::from_utf8_lossy(&out.stdout), &shown(&out));
    let close = |v: &Value, want: f64| {
        let got = v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"));
        assert!((got - want).abs() < 1e-9, "{got} != {want}: {d}");
    };
    close(
        &d["report"]["awake"]["snapshot"],
        sa_tests::binomial_at_least(6, 4, 0.8),
    );
    close(
        &d["report"]["woken"]["snapshot"],
        sa_tests::binomial_at_least(6, 4, 0.8 + 0.2 * 0.8),
    );
    assert_eq!(d["report"]["wakeable"], 6, "{d}");
    let target = o.c.path("restored.img");
    let started = Instant::now();
    let out = o.sa(
        &[
            "restore",
            "latest",
            "--to",
            target.to_str().unwrap(),
            "--wake-wait",
            "3s",
        ],
        &o.pcs[0].addr(),
        "fresh-cache",
    );
    let took = started.elapsed();
    let err = expect_fail(&out, Some(1), "restore with sleepers that do not wake");
    assert!(err.contains("did not wake within 3 seconds"), "{err}");
    for name in sleeper_names(&o) {
        assert!(err.contains(&name), "{name} not named: {err}");
    }
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "failed after {took:?}"
    );
    assert!(!target.exists(), "a failed restore left its target");

    let out = o.sa(
        &["agents", "wake", "--all", "--wake-wait", "2s", "--json"],
        &o.pcs[0].addr(),
        "snapshot-cache",
    );
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let r = parse_json(&String::from_utf8_lossy(&out.stdout), &shown(&out));
    let state = |r: &Value, pc: &Pc| -> String {
        r["agents"]
            .as_array()
            .expect("agents")
            .iter()
            .find(|a| a["addr"].as_str() == Some(&pc.addr()))
            .unwrap_or_else(|| panic!("{} missing: {r}", pc.addr()))["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    for pc in &o.pcs[..3] {
        assert_eq!(state(&r, pc), "up", "{r}");
    }
    for pc in &o.pcs[3..] {
        assert_eq!(state(&r, pc), "asleep", "{r}");
    }

    o.sleepers(false);
    let out = o.sa(
        &["agents", "wake", "--all", "--wake-wait", "30s", "--json"],
        &o.pcs[0].addr(),
        "snapshot-cache",
    );
    assert!(out.status.success(), "{}", shown(&out));
    let r = parse_json(&String::from_utf8_lossy(&out.stdout), &shown(&out));
    for pc in &o.pcs[3..] {
        assert_eq!(state(&r, pc), "woke", "{r}");
        let row = r["agents"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["addr"].as_str() == Some(&pc.addr()))
            .unwrap();
        assert_eq!(row["mac"].as_str(), Some(pc.ns.ns_mac().as_str()), "{r}");
    }
    let out = o.sa(&["agents", "wake"], &o.pcs[0].addr(), "snapshot-cache");
    let err = expect_fail(&out, Some(64), "agents wake without an id");
    assert!(err.contains("--all"), "{err}");
}

/// The figure: from starting `sa-image serve` with three of six PCs asleep to the first block
/// a real NBD client (qemu-img dd) reads: within the wake delay plus 2 s. The block is the
/// image's first 64 KiB.
#[test]
fn serve_first_byte_within_wake_delay() {
    let Some(mut o) = Office::start("serve_first_byte_within_wake_delay") else {
        return;
    };
    o.sleepers(false);
    let first = first_byte_seconds(&o);
    eprintln!(
        "FIGURE wake: first byte served after {first:.2}s with 3 of 6 agents asleep (wake delay {:.1}s, bound {:.1}s)",
        WAKE_DELAY.as_secs_f64(),
        WAKE_DELAY.as_secs_f64() + 2.0
    );
    assert!(
        first <= WAKE_DELAY.as_secs_f64() + 2.0,
        "first byte after {first:.2}s, more than the wake delay + 2 s"
    );
}

/// Starts `serve` through the first PC, reads the first 64 KiB with qemu-img once it
/// listens, checks them against the image, and returns the seconds from the start.
fn first_byte_seconds(o: &Office) -> f64 {
    let log = o.c.path("serve.log");
    let cache = o.c.path("serve-cache");
    let started = Instant::now();
    let mut cmd = Command::new(bin("sa-image"));
    cmd.args([
        "serve",
        "latest",
        "--listen",
        "127.0.0.1:0",
        "--wake-wait",
        "60s",
    ])
    .arg("--key")
    .arg(&o.c.key.path)
    .arg("--agents")
    .arg(o.pcs[0].addr())
    .arg("--cache-dir")
    .arg(&cache)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&log).expect("serve log"));
    let mut serve = Proc::spawn(cmd, "sa-image serve");
    let stdout = serve.child().stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|e| {
            panic!(
                "serve printed nothing ({e}): {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"))
        .to_string();
    let out_file = o.c.path("first-block");
    let out = Command::new("qemu-img")
        .args(["dd", "-f", "raw", "-O", "raw", "bs=65536", "count=1"])
        .arg(format!("if={url}"))
        .arg(format!("of={}", out_file.display()))
        .output()
        .expect("cannot run qemu-img");
    let secs = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "qemu-img dd failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(&out_file).expect("first block");
    let want = std::fs::read(&o.image).expect("image");
    assert_eq!(got, want[..65536], "first block differs");
    drop(serve);
    secs
}

/// The daemon's backup at a time every PC sleeps, the daemon given only a sleeper's address:
/// its job wakes every member from this machine's copy of the agent book (the cache directory
/// the first snapshot filled, which the daemon shares) and the snapshot, which needs all six,
/// commits.
#[test]
fn the_daemon_wakes_every_sleeper_for_its_backup() {
    let Some(mut o) = Office::start("the_daemon_wakes_every_sleeper_for_its_backup") else {
        return;
    };
    let (owner, base) = (o.c.key.owner.clone(), o.c.dir().to_path_buf());
    for pc in &mut o.pcs {
        pc.sleep(&owner, &base, false);
    }
    let state = o.c.path("daemon-state");
    let config = o.c.path("daemon.toml");
    std::fs::write(
        &config,
        format!(
            "key = \"{key}\"\nagents = [\"{addr}\"]\ncache_dir = \"{cache}\"\nwake_wait = \"60s\"\n\
             [daemon]\nstate_dir = \"{state}\"\nrepair = false\nscrub = \"never\"\n\
             [web]\nlisten = \"127.0.0.1:0\"\n\
             [volume.office]\nsource = \"{img}\"\nschedule = \"*:*:0/5\"\n\
             data_shards = 4\nparity_shards = 2\n",
            key = o.c.key.path.display(),
            addr = o.pcs[5].addr(),
            cache = o.c.path("snapshot-cache").display(),
            state = state.display(),
            img = o.image.display(),
        ),
    )
    .expect("write the daemon's config");
    let mut d = Daemon::start(&config, &o.c.path("daemon.log"), &[]);
    // The first backup job's end, by the journal.
    let ended = || -> Option<Value> {
        let lines = json_lines(&state.join("jobs.jsonl"));
        let id = lines
            .iter()
            .find(|l| l["start"]["kind"] == "snapshot")
            .map(|l| l["start"]["id"].clone())?;
        lines.into_iter().find(|l| l["end"]["id"] == id)
    };
    wait::until_true(
        Duration::from_secs(150),
        "the daemon's first backup to end",
        || {
            assert!(d.is_running(), "the daemon exited:\n{}", d.log());
            ended().is_some()
        },
    );
    let end = ended().expect("ended");
    assert_eq!(end["end"]["outcome"], "ok", "{end}\n{}", d.log());
    for pc in &o.pcs {
        let log = pc.log();
        assert!(
            log.contains(&format!("magic packet for {}", pc.ns.ns_mac())),
            "{}: no magic packet: {log}",
            pc.name
        );
    }
    let out = o.sa(&["list", "--json"], &o.all(), "fresh-cache");
    assert!(out.status.success(), "{}", shown(&out));
    let listed = parse_json(&String::from_utf8_lossy(&out.stdout), &shown(&out));
    assert!(
        listed
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["volume"] == "office")),
        "no snapshot of volume office: {listed}"
    );
}

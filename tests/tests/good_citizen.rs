//! An agent is a good citizen on a desk PC: low CPU and I/O priority by default (`--priority
//! normal` to opt out), its shard traffic held to `--max-rate`, and a floor of free space on its
//! disk (`--min-free`) that it never crosses: servers place less on it as it nears the floor,
//! it refuses shards with its "full" error once there, and snapshots place around it.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sa_tests::cluster::{parse_json, str_of, u64_of, ClusterOptions};
use sa_tests::loopdev::is_root;
use sa_tests::proc::Proc;
use sa_tests::{scan, wait, Agent, Cluster, ImageSpec, MIB};
use serde_json::Value;

const OWNER: &str = "abababababababababababababababababababababababababababababababab";

/// The nice value of a thread (`/proc/PID/task/TID/stat`, field 19).
fn nice_of(stat_path: &Path) -> i32 {
    let stat = std::fs::read_to_string(stat_path).unwrap();
    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
    // Fields from the 3rd on; nice is the 19th field overall.
    after_comm.split(' ').nth(16).unwrap().parse().unwrap()
}

/// `ionice -p TID`: e.g. "idle" or "none: prio 4".
fn io_class(tid: &str) -> String {
    let out = Command::new("ionice").args(["-p", tid]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Every thread of `pid` with its nice value and I/O class.
fn threads(pid: u32) -> Vec<(String, i32, String)> {
    let dir = PathBuf::from(format!("/proc/{pid}/task"));
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let tid = e.file_name().to_string_lossy().into_owned();
            (tid.clone(), nice_of(&e.path().join("stat")), io_class(&tid))
        })
        .collect()
}

/// By default every thread of the agent runs at nice 10 (or nicer, when it was started nicer)
/// in the idle I/O class; `--priority normal` leaves both as they were.
#[test]
fn agents_yield_cpu_and_disk_unless_told_otherwise() {
    let base = tempfile::tempdir().unwrap();
    let ours = nice_of(Path::new("/proc/thread-self/stat"));
    let low = Agent::start(base.path(), "low", OWNER, &[]);
    let normal = Agent::start(base.path(), "normal", OWNER, &["--priority", "normal"]);
    let low_threads = threads(low.pid().unwrap());
    assert!(low_threads.len() > 1, "{low_threads:?}");
    for (tid, nice, class) in &low_threads {
        assert_eq!(*nice, ours.max(10), "thread {tid}: {low_threads:?}");
        assert_eq!(class, "idle", "thread {tid}: {low_threads:?}");
    }
    for (tid, nice, class) in threads(normal.pid().unwrap()) {
        assert_eq!(nice, ours, "thread {tid}");
        assert_ne!(class, "idle", "thread {tid}");
    }
}

/// One agent of six with `--max-rate 1MiB`: the snapshot cannot finish before that agent has
/// taken in its shards at 1 MiB/s (less the bucket's burst of a tenth of a second), while the
/// same snapshot takes a fraction of that without the limit.
#[test]
fn max_rate_holds_an_agents_shard_traffic() {
    let c = Cluster::start_with(ClusterOptions {
        agents: 6,
        agent_args: vec![(5, vec!["--max-rate".into(), "1MiB".into()])],
        ..Default::default()
    });
    // 6 stripes of 6 shards on 6 agents: each agent takes one shard of each, about 6 MiB.
    let img = ImageSpec::random(24 * MIB, 0x7a7e_0001).write(&c.path("disk.img"));
    let started = Instant::now();
    let snap = c.snapshot(&img.path, &[]);
    let took = started.elapsed().as_secs_f64();
    assert_eq!(snap["margin"], 2, "{snap}");
    let got: u64 = scan::shard_files(c.agents[5].dir())
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(got >= 5 * MIB, "the limited agent took only {got} bytes");
    let least = (got as f64 - 0.1 * MIB as f64) / MIB as f64;
    eprintln!("snapshot took {took:.2} s; the limited agent took {got} bytes (>= {least:.2} s)");
    assert!(
        took >= least,
        "the snapshot took {took:.2} s, but {got} bytes at 1 MiB/s take {least:.2} s"
    );
}

/// A size-limited tmpfs, unmounted (lazily) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes free for an unprivileged user (`df --output=avail`, KiB).
    fn avail(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// Grows (or makes) the filler file so that `free` bytes stay free.
    fn fill_to(&self, free: u64) {
        let filler = self.path().join("user-files");
        let have = std::fs::metadata(&filler).map(|m| m.len()).unwrap_or(0);
        let target = (have + self.avail()).saturating_sub(free);
        std::fs::write(&filler, vec![7u8; target as usize]).unwrap();
    }

    fn unfill(&self) {
        std::fs::remove_file(self.path().join("user-files")).unwrap();
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

fn agent_of<'a>(v: &'a Value, list: &str, addr: &str) -> &'a Value {
    v[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {v}"))
        .iter()
        .find(|a| a["addr"].as_str() == Some(addr))
        .unwrap_or_else(|| panic!("no {addr} in {list} of {v}"))
}

/// An agent on a 64 MiB disk that must keep 16 MiB free: with little room above the floor it
/// is given little; when the PC's user fills the disk during a snapshot it refuses the rest with
/// its "full" error and the snapshot puts those shards elsewhere; at the floor, status shows no
/// room and the next snapshot places around it. The disk never goes below the floor through the
/// agent, and everything restores byte for byte.
#[test]
fn the_floor_keeps_the_pcs_disk_from_filling() {
    if !is_root() {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let disk = Tmpfs::mount("64m");
    let mut c = Cluster::start_with(ClusterOptions {
        agents: 6,
        // Room comparable with the small agent's, so that its share is visible.
        agent_args: (0..6)
            .map(|i| (i, vec!["--quota".into(), "64M".into()]))
            .collect(),
        ..Default::default()
    });
    let floor = 16 * MIB;
    let small = Agent::start(
        disk.path(),
        "small",
        &c.key.owner,
        &["--min-free", "16M", "--max-rate", "2MiB"],
    );
    let addr = small.addr_str();
    c.agents.push(small);
    let small = 6;
    let all = c.agents_arg();

    // 1. Little room above the floor (about 4 MiB): status shows it, the snapshot gives little.
    disk.fill_to(floor + 4 * MIB);
    let (code, st) = c.status_json(&all);
    assert_eq!(code, 0, "{st}");
    let room = u64_of(agent_of(&st, "agents", &addr), "free");
    assert!(
        room <= 4 * MIB && room + MIB >= 4 * MIB,
        "room above the floor: {room} {st}"
    );
    let img1 = ImageSpec::random(32 * MIB, 0xf100_0001).write(&c.path("one.img"));
    let snap1 = c.snapshot(&img1.path, &[]);
    assert_eq!(snap1["margin"], 2, "{snap1}");
    let planned = u64_of(agent_of(&snap1, "placement", &addr), "planned_shards");
    let held1 = scan::shard_files(c.agents[small].dir()).len() as u64;
    assert!(
        planned <= 3 && held1 <= 3,
        "planned {planned}, holds {held1}"
    );
    assert!(disk.avail() >= floor, "below the floor: {}", disk.avail());

    // 2. Room again, a snapshot starts, and the user fills the disk past the floor meanwhile.
    disk.unfill();
    let img2 = ImageSpec::random(48 * MIB, 0xf100_0002).write(&c.path("two.img"));
    let out = c.path("two.json");
    let mut cmd = c.sa_command(&[
        OsStr::new("snapshot"),
        img2.path.as_os_str(),
        OsStr::new("--json"),
    ]);
    cmd.stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(c.path("two.err")).unwrap())
        .stdin(Stdio::null());
    let mut run = Proc::spawn(cmd, "sa-image snapshot");
    let small_dir = c.agents[small].dir().to_path_buf();
    wait::until(
        Duration::from_secs(60),
        "a new shard on the small agent",
        || (scan::shard_files(&small_dir).len() as u64 > held1).then_some(()),
    );
    disk.fill_to(floor - MIB);
    let at_fill = scan::shard_files(&small_dir).len() as u64;
    let status = run.wait(Duration::from_secs(180));
    let err = std::fs::read_to_string(c.path("two.err")).unwrap();
    assert!(status.success(), "snapshot two failed: {status}\n{err}");
    let snap2 = parse_json(&std::fs::read_to_string(&out).unwrap(), "snapshot two");
    assert_eq!(snap2["margin"], 2, "{snap2}");
    assert!(
        err.contains(&format!("agent {addr} is full")) && err.contains("free for the PC's user"),
        "the snapshot must report the agent full at its floor:\n{err}"
    );
    assert!(
        c.agents[small].log().contains("free for the PC's user"),
        "the agent logs its refusals:\n{}",
        c.agents[small].log()
    );
    let held2 = scan::shard_files(&small_dir).len() as u64;
    // At most the one shard being written when the disk filled lands after it.
    assert!(
        held2 <= at_fill + 1,
        "{held2} shards now, {at_fill} at the fill"
    );
    assert!(
        disk.avail() + 2 * MIB >= floor - MIB,
        "the agent ate into the user's space: {} free",
        disk.avail()
    );

    // 3. At the floor: no room in status, the next snapshot places nothing on it.
    let (_, st) = c.status_json(&all);
    assert_eq!(u64_of(agent_of(&st, "agents", &addr), "free"), 0, "{st}");
    let img3 = ImageSpec::random(16 * MIB, 0xf100_0003).write(&c.path("three.img"));
    let snap3 = c.snapshot(&img3.path, &[]);
    assert_eq!(snap3["margin"], 2, "{snap3}");
    assert_eq!(
        u64_of(agent_of(&snap3, "placement", &addr), "planned_shards"),
        0,
        "{snap3}"
    );
    assert_eq!(scan::shard_files(&small_dir).len() as u64, held2);

    // Everything comes back with two roomy agents gone.
    c.agents[0].kill();
    c.agents[1].kill();
    for (snap, img) in [(&snap1, &img1), (&snap2, &img2), (&snap3, &img3)] {
        let target = c.path("restored.img");
        c.restore(str_of(snap, "snapshot"), &target, &all);
        assert_eq!(
            sa_tests::sha256(&target),
            img.sha256(),
            "{}",
            shown_id(snap)
        );
        std::fs::remove_file(&target).unwrap();
    }
}

fn shown_id(snap: &Value) -> String {
    format!("restore of {} differs", str_of(snap, "snapshot"))
}

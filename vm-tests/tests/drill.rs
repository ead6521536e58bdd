//! `sa-image drill` (issue 19) against real agents and a real qemu, one snapshot set shared by
//! every case (each boot costs seconds): the vm-tests image (the writer guest, which keeps
//! running and prints `SA-VM-FILE` lines) and a copy whose MBR is zeroed, both snapshotted onto
//! 6 agents (k=4, m=2).
//!
//! 1. The drill passes with 2 agents withheld and stripes rebuilt from parity; `list --json`
//!    shows the record; the screenshot is a real PNG.
//! 2. A drill killed with SIGKILL while its qemu runs leaves that qemu behind (sa-image cannot
//!    clean up after SIGKILL); the next drill in the same work directory kills it and removes
//!    the overlay before booting its own.
//! 3. That next drill boots the damaged image: it fails within its deadline with the reason.
//! 4. `sa-image daemon` with `[volume.broken.drill]` drills it by itself: the failed drill is a
//!    failed job, its alert reaches a real webhook receiver, and the status page shows the
//!    drill and serves its screenshot.
//!
//! The accelerator is TCG: KVM on these nested hosts cannot boot a kernel (see
//! /work/shared/test-stack.md). Needs root, qemu and the image tools (see the crate docs), and
//! the release binaries (`cargo build --release`).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use sa_tests::cluster::{parse_json, shown, ClusterOptions};
use sa_tests::daemon::{json_lines, Daemon, PyServer};
use sa_tests::proc::Proc;
use sa_tests::Cluster;
use sa_vm_tests::*;

/// The damaged image's deadline: the drill must give up within it (plus start and stop).
const BROKEN_DEADLINE_S: u64 = 20;

/// Kills every process whose command line names `dir` (a qemu left by a failing test).
struct KillNaming(PathBuf);

impl Drop for KillNaming {
    fn drop(&mut self) {
        for pid in pids_naming(&self.0) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// Processes (not zombies) whose command line contains `dir`.
fn pids_naming(dir: &Path) -> Vec<u32> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            if c.windows(needle.len()).any(|w| w == needle) {
                pids.push(pid);
            }
        }
    }
    pids
}

fn alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| !c.is_empty())
}

fn drill_args(volume: &str, work: &Path, extra: &[&OsStr]) -> Vec<OsString> {
    let mut a: Vec<OsString> = ["drill", "latest", "--volume", volume, "--accel", "tcg"]
        .iter()
        .map(OsString::from)
        .collect();
    a.extend([OsString::from("--work-dir"), work.as_os_str().to_owned()]);
    a.extend(["--memory", "512MiB", "--console", "^SA-VM-FILE "].map(OsString::from));
    a.extend(extra.iter().map(|x| x.to_os_string()));
    a
}

#[test]
fn drills_pass_with_two_agents_withheld_fail_on_a_damaged_image_and_clean_up_after_sigkill() {
    if let Err(e) = require_root() {
        panic!("{e}");
    }
    let cluster = Cluster::start_with(ClusterOptions {
        agents: 6,
        // This machine's disk may be more than 90% full: no free-space floor for test agents.
        agent_args: (0..6)
            .map(|i| (i, vec!["--min-free".to_string(), "0".to_string()]))
            .collect(),
        ..Default::default()
    });
    let good = build_boot_image_with(
        &cluster.path("good"),
        &ImageOptions {
            program: GuestProgram::Writer,
            ..ImageOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("building the boot image: {e}"));
    let broken = build_boot_image_with(
        &cluster.path("broken"),
        &ImageOptions {
            program: GuestProgram::Writer,
            ..ImageOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("building the boot image: {e}"));
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&broken.path)
            .expect("open the image to damage");
        f.write_all(&[0u8; 512]).expect("zero the MBR");
    }
    let good_sum = sha256_file(&good.path).unwrap_or_else(|e| panic!("{e}"));
    let snap = cluster.snapshot(&good.path, &["--volume", "appliance"]);
    let good_id = snap["snapshot"].as_str().expect("snapshot id").to_string();
    cluster.snapshot(&broken.path, &["--volume", "broken"]);
    let work = cluster.path("drill-work");
    let _reaper = KillNaming(work.clone());
    let shot = cluster.path("shot.png");

    // 0. Bad input: each mistake named, nothing booted.
    let bad: &[(&[&str], i32, &str)] = &[
        (
            &["drill", "--volume", "appliance"],
            64,
            "needs something to wait for",
        ),
        (
            &["drill", "--volume", "appliance", "--console", "("],
            64,
            "not a regular expression",
        ),
        (
            &[
                "drill",
                "--volume",
                "appliance",
                "--console",
                "x",
                "--firmware",
                "efi",
            ],
            64,
            "give bios or uefi",
        ),
        (
            &[
                "drill",
                "--volume",
                "appliance",
                "--console",
                "x",
                "--disk-bus",
                "nvme",
            ],
            64,
            "give virtio, ide, sata or scsi",
        ),
        (
            &[
                "drill",
                "--volume",
                "appliance",
                "--console",
                "x",
                "--accel",
                "hvf",
            ],
            64,
            "give auto, kvm or tcg",
        ),
        (
            &[
                "drill",
                "--volume",
                "appliance",
                "--screenshot-after",
                "2m",
                "--deadline",
                "1m",
            ],
            64,
            "shorter than --deadline",
        ),
        (
            &[
                "drill",
                "--volume",
                "appliance",
                "--console",
                "x",
                "--withhold",
                "3",
            ],
            1,
            "lose at most 2 agents",
        ),
        (
            &[
                "drill",
                "--volume",
                "appliance",
                "--console",
                "x",
                "--qemu",
                "/nonexistent/qemu",
            ],
            1,
            "cannot start /nonexistent/qemu",
        ),
    ];
    for (args, code, words) in bad {
        let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
        a.extend([OsStr::new("--work-dir"), work.as_os_str()]);
        let out = cluster.sa(&a);
        assert_eq!(out.status.code(), Some(*code), "{args:?}:\n{}", shown(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(words), "{args:?}: no {words:?} in:\n{err}");
    }
    assert!(
        !work.join("overlay.img").exists(),
        "a refused drill left its overlay"
    );

    // 1. A passing drill, two agents withheld.
    let t = Instant::now();
    let extra = [
        "--withhold",
        "2",
        "--deadline",
        "120s",
        "--json",
        "--screenshot",
    ]
    .map(OsStr::new);
    let mut extra = extra.to_vec();
    extra.push(shot.as_os_str());
    let out = cluster.sa(&drill_args("appliance", &work, &extra));
    eprintln!("passing drill: {:.1?}", t.elapsed());
    assert!(out.status.success(), "the drill failed:\n{}", shown(&out));
    let r = parse_json(&String::from_utf8_lossy(&out.stdout), "drill --json");
    assert_eq!(r["passed"], true, "{r}");
    assert_eq!(r["accel"], "tcg");
    let withheld = r["withheld"].as_array().expect("withheld").clone();
    assert_eq!(withheld.len(), 2, "{r}");
    assert!(
        r["stripes_rebuilt"].as_u64().unwrap_or(0) > 0,
        "with 2 of 6 agents withheld some stripes must come from parity: {r}"
    );
    assert_eq!(r["stripes_lost"], 0);
    assert!(
        r["reason"].as_str().unwrap_or("").contains("SA-VM-FILE"),
        "{r}"
    );
    assert_eq!(r["record_stored_on"], 6, "{r}");
    let png = std::fs::read(&shot).expect("the screenshot file");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert!(
        png.len() > 1000,
        "a PNG of a console screen: {} bytes",
        png.len()
    );
    assert_eq!(r["screenshot_bytes"].as_u64(), Some(png.len() as u64));
    // The PNG's IHDR: 720x400 is the VGA text console.
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert!(w >= 320 && h >= 200, "screenshot {w}x{h}");

    let list = cluster.sa(&["list", "--json"]);
    let rows = parse_json(&String::from_utf8_lossy(&list.stdout), "list --json");
    let row = |vol: &str| {
        rows.as_array()
            .expect("rows")
            .iter()
            .find(|x| x["volume"] == vol)
            .unwrap_or_else(|| panic!("no {vol} in {rows}"))
            .clone()
    };
    let d = &row("appliance")["last_drill"];
    assert_eq!(d["passed"], true, "{rows}");
    assert_eq!(d["withheld"].as_array(), Some(&withheld));
    assert_eq!(d["screenshot_bytes"].as_u64(), Some(png.len() as u64));
    assert_eq!(d["stripes_rebuilt"], r["stripes_rebuilt"]);
    assert!(d["boot_seconds"].as_f64().unwrap_or(0.0) > 0.0, "{d}");
    assert!(row("broken")["last_drill"].is_null(), "{rows}");
    let (_, st) = cluster.status_json(&cluster.agents_arg());
    let sd = st["snapshots"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["volume"] == "appliance"))
        .map(|x| x["last_drill"].clone())
        .unwrap_or_default();
    assert_eq!(sd["passed"], true, "status --json: {st}");
    assert_eq!(sd["withheld"].as_array(), Some(&withheld));
    let text = String::from_utf8_lossy(&cluster.sa(&["list"]).stdout).into_owned();
    assert!(
        text.contains("passed") && text.contains("(2 withheld)"),
        "{text}"
    );

    // 2. A drill killed with SIGKILL while its qemu runs.
    let mut cmd = cluster.sa_command(&drill_args(
        "appliance",
        &work,
        &["--deadline", "120s"].map(OsStr::new),
    ));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut killed = Proc::spawn(cmd, "the drill to kill");
    let qemu_pid = sa_tests::wait::until(Duration::from_secs(60), "the drill's qemu", || {
        std::fs::read_to_string(work.join("qemu.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .filter(|&p| alive(p))
    });
    let drill_pid = killed.id();
    killed.kill();
    assert!(!alive(drill_pid), "the killed drill still runs");
    assert!(
        alive(qemu_pid),
        "qemu outlived a SIGKILLed drill here; the next drill is what reaps it"
    );
    assert!(work.join("overlay.img").exists());

    // 3. The next drill (the damaged image) reaps it, then fails within its deadline.
    let t = Instant::now();
    let deadline = format!("{BROKEN_DEADLINE_S}s");
    let out = cluster.sa(&drill_args(
        "broken",
        &work,
        &["--deadline", &deadline, "--json"].map(OsStr::new),
    ));
    let took = t.elapsed();
    eprintln!("failing drill: {took:.1?}");
    assert_eq!(out.status.code(), Some(1), "{}", shown(&out));
    let r = parse_json(
        &String::from_utf8_lossy(&out.stdout),
        "drill --json (broken)",
    );
    assert_eq!(r["passed"], false, "{r}");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("no console line matching") && reason.contains(&deadline),
        "{reason}"
    );
    assert!(r["boot_seconds"].is_null());
    assert!(
        took < Duration::from_secs(BROKEN_DEADLINE_S + 30),
        "the failing drill took {took:?}"
    );
    let reaped: Vec<&str> = r["reaped"]
        .as_array()
        .expect("reaped")
        .iter()
        .filter_map(|x| x.as_str())
        .collect();
    assert!(
        reaped
            .iter()
            .any(|x| x.contains(&format!("pid {qemu_pid}"))),
        "{reaped:?}"
    );
    assert!(
        reaped.iter().any(|x| x.ends_with("overlay.img")),
        "{reaped:?}"
    );
    assert!(!alive(qemu_pid), "the old qemu (pid {qemu_pid}) still runs");
    assert_eq!(pids_naming(&work), Vec::<u32>::new(), "processes left");
    let left: Vec<String> = std::fs::read_dir(&work)
        .expect("work dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["lock".to_string()], "files left in the work dir");
    let list = cluster.sa(&["list", "--json"]);
    let rows = parse_json(&String::from_utf8_lossy(&list.stdout), "list --json");
    let d = &rows
        .as_array()
        .expect("rows")
        .iter()
        .find(|x| x["volume"] == "broken")
        .expect("broken")["last_drill"];
    assert_eq!(d["passed"], false, "{rows}");

    // 4. The daemon drills the damaged volume on its schedule; the failure alerts through its
    //    webhook, and the status page shows the drill and its screenshot.
    daemon_drill_alerts(&cluster, &broken.path);

    // Forgetting a snapshot removes its drill record from the agents.
    let broken_id = rows
        .as_array()
        .and_then(|a| a.iter().find(|x| x["volume"] == "broken"))
        .and_then(|x| x["snapshot"].as_str())
        .expect("the broken snapshot's id")
        .to_string();
    let record = format!("drill-{broken_id}");
    let holders = |c: &Cluster| {
        c.agents
            .iter()
            .filter(|a| a.dir().join("blobs").join(&record).exists())
            .count()
    };
    assert_eq!(holders(&cluster), 6, "the record is on every agent");
    let out = cluster.sa(&["forget", &broken_id, "--json"]);
    assert!(out.status.success(), "{}", shown(&out));
    assert_eq!(holders(&cluster), 0, "forget left the drill record");

    // No drill wrote to the backup: it still restores to the image snapshotted.
    let restored = cluster.path("restored.img");
    cluster.restore(&good_id, &restored, &cluster.agents_arg());
    assert_eq!(
        sha256_file(&restored).unwrap_or_else(|e| panic!("{e}")),
        good_sum,
        "the drills changed the backup"
    );
}

fn daemon_drill_alerts(c: &Cluster, source: &Path) {
    let hooks_file = c.path("hooks.jsonl");
    let hooks = PyServer::start("webhook_receiver.py", &[&hooks_file]);
    let agents: Vec<String> = c
        .agents
        .iter()
        .map(|a| format!("\"{}\"", a.addr_str()))
        .collect();
    let text = format!(
        "key = \"{key}\"\nagents = [{agents}]\ncache_dir = \"{cache}\"\n\
         [daemon]\nstate_dir = \"{state}\"\ncheck_interval = \"1s\"\nrepair = false\n\
         scrub = \"never\"\n[web]\nlisten = \"127.0.0.1:0\"\n\
         [alerts]\nwebhook = [\"http://127.0.0.1:{hp}/alert\"]\n\
         [volume.broken]\nsource = \"{src}\"\nschedule = \"never\"\n\
         [volume.broken.drill]\nevery = \"every 2s\"\nconsole = \"^SA-VM-FILE \"\n\
         deadline = \"10s\"\naccel = \"tcg\"\nmemory = \"512MiB\"\n",
        key = c.key.path.display(),
        agents = agents.join(", "),
        cache = c.path("cache").display(),
        state = c.path("state").display(),
        hp = hooks.port,
        src = source.display(),
    );
    let config = c.path("daemon.toml");
    std::fs::write(&config, text).expect("write the daemon config");
    let _reaper = KillNaming(c.path("state").join("drill-work"));
    let mut d = Daemon::start(&config, &c.path("daemon.log"), &[]);
    let alert = sa_tests::wait::until(Duration::from_secs(120), "the drill's alert", || {
        assert!(d.is_running(), "the daemon exited:\n{}", d.log());
        json_lines(&hooks_file).into_iter().find_map(|l| {
            let body: serde_json::Value = serde_json::from_str(l["body"].as_str()?).ok()?;
            (body["key"] == "job_failed/drill/broken" && body["event"] == "alert").then_some(body)
        })
    });
    let message = alert["message"].as_str().unwrap_or("");
    assert!(
        message.contains("no console line matching") && message.contains("10s"),
        "{alert}"
    );
    let (code, page) = d.get("/", &[]);
    assert_eq!(code, 200);
    assert!(page.contains("Last recovery drill FAILED"), "{page}");
    let hex: String = "broken".bytes().map(|b| format!("{b:02x}")).collect();
    let src = format!("/drill/{hex}.png");
    assert!(page.contains(&src), "no screenshot on the page: {page}");
    let png = std::fs::read(c.path("state").join("drill").join(format!("{hex}.png")))
        .expect("the kept screenshot");
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let (code, body) = d.get(&src, &[]);
    assert_eq!(code, 200, "{src}");
    assert!(
        body.contains("PNG") && body.contains("IHDR"),
        "{src} is not the PNG"
    );
    d.signal("TERM");
    d.wait(Duration::from_secs(60));
}

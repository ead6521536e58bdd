//! The agent keeps its PC awake while sa-image works with it (`--keep-awake`, issue 16): a real
//! systemd-logind on a private system bus (dbus-daemon), whose inhibitor list
//! (`systemd-inhibit --list`) shows the agent's lock from a client's request until the hold
//! after it runs out, and never after the agent is killed; a snapshot keeps the locks held
//! through a long quiet pre-hook (the engine's keepalive). Without logind the agent says why in
//! its log and serves as usual.
//!
//! Needs root on Linux with dbus-daemon, systemd-logind and systemd-inhibit (Debian: `dbus`,
//! `systemd`); skipped, saying why, elsewhere.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sa_tests::cluster::{Cluster, ClusterOptions};
use sa_tests::proc::Proc;
use sa_tests::wait::until_true;
use sa_tests::{ImageSpec, MIB};

const LOGIND: &str = "/lib/systemd/systemd-logind";
const BUS_ENV: &str = "DBUS_SYSTEM_BUS_ADDRESS";

/// Why this test cannot run here, if it cannot.
fn missing() -> Option<String> {
    if !cfg!(target_os = "linux") || !is_root() {
        return Some("needs root on Linux (a system bus and systemd-logind of its own)".into());
    }
    if !Path::new(LOGIND).exists() || !on_path("dbus-daemon") || !on_path("systemd-inhibit") {
        return Some(
            "needs systemd-logind, dbus-daemon and systemd-inhibit (Debian: systemd, dbus)".into(),
        );
    }
    None
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn on_path(name: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).exists()))
}

/// A private system bus at `dir/bus`, with a permissive policy (everything here is root) and
/// the system's service policies (logind's among them).
fn start_bus(dir: &Path) -> (Proc, String) {
    let sock = dir.join("bus");
    let conf = dir.join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="signal"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
  </policy>
</busconfig>
"#,
            sock.display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("dbus-daemon");
    cmd.arg(format!("--config-file={}", conf.display()))
        .args(["--nofork", "--nopidfile"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("dbus.log")).unwrap());
    let bus = Proc::spawn(cmd, "dbus-daemon");
    until_true(Duration::from_secs(10), "the private system bus", || {
        sock.exists()
    });
    (bus, format!("unix:path={}", sock.display()))
}

/// `systemd-inhibit --list` on the bus at `addr`: None while logind does not answer.
fn inhibitors(addr: &str) -> Option<String> {
    let out = Command::new("systemd-inhibit")
        .args(["--list", "--no-pager"])
        .env(BUS_ENV, addr)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn held_by_agent(list: &str) -> bool {
    list.lines()
        .any(|l| l.contains("shard-agent") && l.contains("sa-image is backing up to or restoring"))
}

/// A client request to every agent of `c` (`sa-image list`), which must succeed.
fn request(c: &Cluster) {
    let out = c.sa(&["list"]);
    assert!(
        out.status.success(),
        "sa-image list failed: {}",
        sa_tests::cluster::shown(&out)
    );
}

#[test]
fn the_agent_keeps_its_pc_awake_while_clients_work_and_lets_go_after() {
    if let Some(why) = missing() {
        eprintln!(
            "SKIPPED the_agent_keeps_its_pc_awake_while_clients_work_and_lets_go_after: {why}"
        );
        return;
    }
    let scratch = tempfile::Builder::new()
        .prefix("sa-keep-awake-")
        .tempdir()
        .unwrap();

    // No logind on the bus the agent is told of: it says why, and serves as usual.
    std::env::set_var(BUS_ENV, "unix:path=/nonexistent/sa-image-test-bus");
    let lonely = Cluster::start_with(ClusterOptions {
        agents: 1,
        agent_args: vec![(0, vec!["--keep-awake".into(), "3s".into()])],
        ..Default::default()
    });
    request(&lonely);
    until_true(
        Duration::from_secs(20),
        "the agent's log to say it cannot keep the PC awake",
        || lonely.agents[0].log().contains("cannot keep this PC awake"),
    );
    drop(lonely);

    // A real logind on a private system bus.
    let (_bus, addr) = start_bus(scratch.path());
    let mut cmd = Command::new(LOGIND);
    cmd.env(BUS_ENV, &addr)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(scratch.path().join("logind.log")).unwrap());
    let _logind = Proc::spawn(cmd, "systemd-logind");
    until_true(
        Duration::from_secs(20),
        "logind to answer on the bus",
        || inhibitors(&addr).is_some(),
    );
    std::env::set_var(BUS_ENV, &addr);
    let mut c = Cluster::start_with(ClusterOptions {
        agents: 1,
        agent_args: vec![(0, vec!["--keep-awake".into(), "3s".into()])],
        ..Default::default()
    });
    let list = inhibitors(&addr).expect("logind answers");
    assert!(
        !held_by_agent(&list),
        "an agent no client has asked anything holds a lock:\n{list}"
    );

    // A request: the lock is taken, and let go 3 s after the last request.
    request(&c);
    until_true(
        Duration::from_secs(10),
        "the agent's inhibitor lock",
        || inhibitors(&addr).is_some_and(|l| held_by_agent(&l)),
    );
    assert!(
        c.agents[0].log().contains("keeping this PC awake"),
        "{}",
        c.agents[0].log()
    );
    until_true(
        Duration::from_secs(20),
        "the lock to be let go after the hold",
        || inhibitors(&addr).is_some_and(|l| !held_by_agent(&l)),
    );
    until_true(Duration::from_secs(5), "the agent to log it", || {
        c.agents[0].log().contains("this PC may sleep again")
    });

    // Taken again by the next request; an agent killed while it holds the lock does not keep
    // it (the pipe to the locked command closes with the agent).
    request(&c);
    until_true(Duration::from_secs(10), "the lock taken again", || {
        inhibitors(&addr).is_some_and(|l| held_by_agent(&l))
    });
    c.agents[0].kill();
    until_true(
        Duration::from_secs(10),
        "the lock of a killed agent to go away",
        || inhibitors(&addr).is_some_and(|l| !held_by_agent(&l)),
    );
    drop(c);

    // A job keeps the PCs awake through its quiet phases: a snapshot whose pre-hook takes 8 s
    // (no request to any agent meanwhile) asks each agent, which reports its 3 s hold, for its
    // STAT every second, so the lock stays held the whole time; it is let go after the job.
    let c = Cluster::start_with(ClusterOptions {
        agents: 3,
        agent_args: (0..3)
            .map(|i| (i, vec!["--keep-awake".into(), "3s".into()]))
            .collect(),
        ..Default::default()
    });
    let img = ImageSpec::random(8 * MIB, 0x1600_0016).write(&c.path("disk.img"));
    let started = c.path("hook-started");
    let hook = format!("touch '{}' && sleep 8", started.display());
    std::thread::scope(|s| {
        let snap = s.spawn(|| {
            c.snapshot(
                &img.path,
                &[
                    "--data-shards",
                    "2",
                    "--parity-shards",
                    "1",
                    "--inconsistent-ok",
                    "--pre-hook",
                    &hook,
                ],
            )
        });
        until_true(Duration::from_secs(60), "the pre-hook to start", || {
            started.exists()
        });
        let quiet = std::time::Instant::now();
        while quiet.elapsed() < Duration::from_secs(7) {
            let list = inhibitors(&addr).expect("logind answers");
            assert!(
                held_by_agent(&list),
                "{:.1} s into the pre-hook (the agents' hold is 3 s), no agent holds its lock:\n{list}",
                quiet.elapsed().as_secs_f64()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        let report = snap.join().expect("the snapshot thread");
        assert_eq!(report["new_stripes"], 2, "{report}");
    });
    until_true(
        Duration::from_secs(20),
        "the locks to be let go after the snapshot",
        || inhibitors(&addr).is_some_and(|l| !held_by_agent(&l)),
    );
    std::env::remove_var(BUS_ENV);
}

//! Windows agents: `shard-agent` built for `x86_64-pc-windows-gnu` and run by Wine, next to
//! Linux agents, serving a real snapshot and restore; their directory lock; and the Windows
//! service (`service install`, `uninstall`) under Wine's service manager.
//!
//! Skipped, with the reason printed, when Wine, the mingw linker or the Windows target of rustc
//! is missing; under CI (`$CI` set), where `.ci/run` installs them, they fail instead.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use sa_tests::agent::fresh_ip;
use sa_tests::cluster::{expect_fail, expect_ok, str_of, u64_of};
use sa_tests::image::MARKER;
use sa_tests::proc::run;
use sa_tests::wine::{skip_reason, windows_path, Wine};
use sa_tests::{scan, wait, Agent, Cluster, ImageSpec, MIB};

/// Six agents, two of them Windows builds under Wine: a snapshot spreads shards onto the
/// Windows agents too (and no plaintext), and with two Linux agents killed the restore, which
/// then needs both Windows agents, is byte-identical.
#[test]
fn windows_agents_serve_snapshot_and_restore_with_two_linux_agents_gone() {
    if skip_reason("windows_agents_serve_snapshot_and_restore").is_some() {
        return;
    }
    let wine = Wine::start();
    let mut c = Cluster::start(4);
    for i in 0..2 {
        // win0 is asked to keep its PC awake: Wine's powershell.exe is a stub that prints
        // nothing, so the agent reports it cannot and serves as usual.
        let args: &[&str] = if i == 0 { &["--keep-awake", "3s"] } else { &[] };
        let a = Agent::start_with(
            c.dir(),
            &format!("win{i}"),
            &c.key.owner,
            args,
            wine.launcher(),
        );
        c.agents.push(a);
    }
    let img = ImageSpec::random(40 * MIB, 0x3100_0001)
        .zero_mib(8..12)
        .marker_at(&[MIB + 7, 30 * MIB + 3])
        .write(&c.path("disk.img"));
    let snap = c.snapshot(&img.path, &[]);
    let id = str_of(&snap, "snapshot").to_string();
    assert_eq!(u64_of(&snap, "agents"), 6, "{snap}");
    assert_eq!(snap["margin"], 2, "{snap}");
    for w in &c.agents[4..] {
        let n = scan::shard_files(w.dir()).len();
        assert!(n >= 4, "Windows agent {} holds {n} shards", w.name());
        assert!(
            w.dir().join("lock").is_file() && w.dir().join("identity.key").is_file(),
            "the Windows agent's directory lacks its lock or identity"
        );
    }
    assert!(
        scan::files_containing(c.dir(), MARKER)
            .iter()
            .all(|p| !p.starts_with(c.agents[4].dir()) && !p.starts_with(c.agents[5].dir())),
        "plaintext on a Windows agent"
    );
    c.agents[0].kill();
    c.agents[1].kill();
    let target = c.path("restored.img");
    let r = c.restore(&id, &target, &c.agents_arg());
    assert_eq!(
        sa_tests::sha256(&target),
        img.sha256(),
        "restore differs: {r}"
    );
    for w in &mut c.agents[4..] {
        assert!(w.is_running(), "{} died:\n{}", w.name(), w.log());
    }
    // The Windows agent ran PowerShell to keep its PC awake (Wine's stub ends without taking
    // anything), said so, and served all the same.
    let log = c.agents[4].log();
    assert!(
        log.contains("cannot keep this PC awake")
            && log.contains("(powershell.exe ended without taking the lock)"),
        "{log}"
    );
}

/// A second Windows agent on a directory in use is refused (the lock works through Wine's
/// `LockFileEx`), with sa-image's error form and exit 1.
#[test]
fn windows_agent_refuses_a_directory_in_use() {
    if skip_reason("windows_agent_refuses_a_directory_in_use").is_some() {
        return;
    }
    let wine = Wine::start();
    let base = tempfile::tempdir().unwrap();
    let owner = "ab".repeat(32);
    let first = Agent::start_with(base.path(), "w", &owner, &[], wine.launcher());
    let mut second = wine.agent_command();
    second
        .arg("--dir")
        .arg(windows_path(first.dir()))
        .arg("--listen")
        .arg(format!("{}:0", fresh_ip()))
        .arg("--owner")
        .arg(&owner);
    let out = run(second, base.path(), Duration::from_secs(60));
    let text = expect_fail(&out, Some(1), "a second Windows agent on one directory");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.lines().any(|l| l.starts_with("error: ")) && text.contains("in use by another"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "it must not say it listens");
}

/// A port nobody listens on, on a fresh loopback address.
fn free_addr() -> SocketAddr {
    let l = TcpListener::bind((fresh_ip(), 0)).unwrap();
    l.local_addr().unwrap()
}

/// `service install` under Wine registers and starts the agent as a service: Wine's `sc`
/// shows it running, it answers sa-image's TLS and owner handshake, its shards go to
/// `%ProgramData%\sa-image\shards` and its log beside them; `service uninstall` stops and
/// removes it, and a second uninstall says there is none (exit 1).
#[test]
fn windows_service_install_runs_the_agent_and_uninstall_removes_it() {
    if skip_reason("windows_service_install").is_some() {
        return;
    }
    let wine = Wine::start();
    let c = Cluster::start(0);
    let addr = free_addr();
    // No --dir: the default, %ProgramData%\sa-image\shards.
    let dir = wine.drive_c().join("ProgramData/sa-image/shards");
    let mut install = wine.agent_command();
    install
        .args(["service", "install", "--owner", &c.key.owner, "--listen"])
        .arg(addr.to_string())
        .args(["--quota", "1G"]);
    let out = run(install, c.dir(), Duration::from_secs(120));
    let said = expect_ok(&out, "service install");
    assert!(said.contains("installed and started"), "{said}");
    let mut query = wine.command("sc".as_ref());
    query.args(["query", "sa-shard-agent"]);
    let q = expect_ok(&run(query, c.dir(), Duration::from_secs(60)), "sc query");
    assert!(q.contains("RUNNING"), "{q}");
    wait::until(Duration::from_secs(60), "the service to listen", || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()
    });
    // A real client: sa-image's status sees the agent with its quota.
    let (code, st) = c.status_json(&addr.to_string());
    assert_eq!(code, 0, "{st}");
    let agent = &st["agents"][0];
    assert_eq!(u64_of(agent, "quota"), 1 << 30, "{st}");
    assert!(dir.join("identity.key").is_file() && dir.join("lock").is_file());
    let log = wine.drive_c().join("ProgramData/sa-image/shard-agent.log");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("shard-agent ready"),
        "{}: {logged}",
        log.display()
    );

    let mut uninstall = wine.agent_command();
    uninstall.args(["service", "uninstall"]);
    let out = run(uninstall, c.dir(), Duration::from_secs(120));
    let said = expect_ok(&out, "service uninstall");
    assert!(said.contains("removed the service"), "{said}");
    assert!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "the agent still listens after uninstall"
    );
    let mut again = wine.agent_command();
    again.args(["service", "uninstall"]);
    let out = run(again, c.dir(), Duration::from_secs(120));
    let text = expect_fail(&out, Some(1), "uninstall with no service");
    assert!(text.contains("no service sa-shard-agent"), "{text}");
}

//! The agent's command line: `--listen` with a bare host means port 7710; a second agent on a
//! directory in use is refused while the first runs (and not after it died); errors read like
//! sa-image's (`error: ...` on stderr, exit 1) and usage errors exit 64 (EX_USAGE).

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sa_tests::agent::fresh_ip;
use sa_tests::bins::bin;
use sa_tests::cluster::{expect_fail, shown};
use sa_tests::proc::{run, Proc};
use sa_tests::Agent;

const OWNER: &str = "abababababababababababababababababababababababababababababababab";

fn agent_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("shard-agent"));
    cmd.arg("--dir").arg(dir).args(args);
    cmd
}

/// Runs the agent to its end (it must fail fast here).
fn agent_run(scratch: &Path, cmd: Command) -> Output {
    run(cmd, scratch, Duration::from_secs(30))
}

/// Starts an agent and returns it with the address of its `listening on` line.
fn agent_start(cmd: Command) -> (Proc, String) {
    let mut cmd = cmd;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut p = Proc::spawn(cmd, "shard-agent");
    let out = p.child().stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        if let Some(Ok(line)) = BufReader::new(out).lines().next() {
            let _ = tx.send(line);
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("no `listening on` line");
    let addr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {line}"))
        .to_string();
    (p, addr)
}

/// `--listen HOST` (no port) listens on port 7710 of that host, `--listen 0.0.0.0` on port 7710
/// of every address, and a host name works too.
#[test]
fn listen_without_a_port_means_7710() {
    let dir = tempfile::tempdir().unwrap();
    let ip = fresh_ip();
    let (p, addr) = agent_start(agent_cmd(
        &dir.path().join("a"),
        &["--owner", OWNER, "--listen", &ip.to_string()],
    ));
    assert_eq!(addr, format!("{ip}:7710"));
    TcpStream::connect(&addr).expect("it accepts on 7710");
    drop(p);
    // Every address (the default form a desk PC uses), port 7710: reached through loopback.
    let (p, addr) = agent_start(agent_cmd(
        &dir.path().join("b"),
        &["--owner", OWNER, "--listen", "0.0.0.0"],
    ));
    assert_eq!(addr, "0.0.0.0:7710");
    TcpStream::connect("127.0.0.1:7710").expect("it accepts on 127.0.0.1:7710");
    drop(p);
    // A host name, resolved; in a config file too.
    let cfg = dir.path().join("agent.toml");
    std::fs::write(&cfg, format!("owner = '{OWNER}'\nlisten = 'localhost'\n")).unwrap();
    let (p, addr) = agent_start(agent_cmd(
        &dir.path().join("c"),
        &["--config", cfg.to_str().unwrap()],
    ));
    assert!(addr.ends_with(":7710"), "{addr}");
    drop(p);
}

/// A second agent on a directory in use exits 1 with a clear error and never listens; once the
/// first is killed (SIGKILL: the OS drops its lock), the directory can be used again.
#[test]
fn a_second_agent_on_a_directory_in_use_is_refused() {
    let base = tempfile::tempdir().unwrap();
    let mut first = Agent::start(base.path(), "a", OWNER, &[]);
    let listen = format!("{}:0", fresh_ip());
    let second = || agent_cmd(first.dir(), &["--owner", OWNER, "--listen", &listen]);
    let out = agent_run(base.path(), second());
    let text = expect_fail(&out, Some(1), "second agent on one directory");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: ") && text.contains("in use by another process"),
        "{}",
        shown(&out)
    );
    assert!(
        text.contains(&first.dir().display().to_string().to_lowercase()),
        "the error names the directory: {text}"
    );
    assert!(out.stdout.is_empty(), "it must not say it listens");
    assert!(first.is_running(), "the first agent was disturbed");
    let dir = first.dir().to_path_buf();
    first.kill();
    let (p, _) = agent_start(agent_cmd(&dir, &["--owner", OWNER, "--listen", &listen]));
    drop(p);
}

/// Bad command lines and config files exit 64 with `error: ...`; a failure to run (the address
/// is not this machine's) exits 1 the same way; help and version exit 0.
#[test]
fn errors_read_like_sa_image_and_usage_errors_exit_64() {
    let base = tempfile::tempdir().unwrap();
    let d = base.path().join("d");
    let bad_toml = base.path().join("bad.toml");
    std::fs::write(&bad_toml, "owner = 'x'\ncolour = 'blue'\n").unwrap();
    let bad_toml = bad_toml.to_str().unwrap().to_string();
    let cases: &[(&[&str], &str)] = &[
        (&["--owner", OWNER, "--bogus"], "unexpected argument"),
        (&["--owner", OWNER, "--listen", "127.0.0.1:x"], "--listen"),
        (&["--owner", OWNER, "--min-free", "150%"], "--min-free"),
        (&["--owner", OWNER, "--max-rate", "fast"], "--max-rate"),
        (&["--owner", OWNER, "--max-rate", "100K"], "too low"),
        (&["--owner", OWNER, "--priority", "high"], "--priority"),
        (&["--owner", OWNER, "--quota", "lots"], "--quota"),
        (&["--owner", "not-an-owner-id"], "--owner"),
        (&[], "no owner"),
        (&["--config", &bad_toml], "is not valid"),
        (&["service", "install", "--owner", OWNER], "windows"),
    ];
    for (args, says) in cases {
        let mut cmd = agent_cmd(&d, &[]);
        if args.first() == Some(&"service") {
            cmd = Command::new(bin("shard-agent"));
        }
        cmd.args(*args);
        let out = agent_run(base.path(), cmd);
        let text = expect_fail(&out, Some(64), &format!("shard-agent {args:?}"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(
            text.contains(&says.to_lowercase()),
            "{args:?}: no {says:?} in {stderr}"
        );
    }
    // No directory at all (Linux has no default one).
    let mut no_dir = Command::new(bin("shard-agent"));
    no_dir.args(["--owner", OWNER]);
    let out = agent_run(base.path(), no_dir);
    let text = expect_fail(&out, Some(64), "no --dir");
    assert!(text.contains("error: no shard directory"), "{text}");
    // A run that cannot start: 192.0.2.1 (TEST-NET-1) is no address of this machine.
    let out = agent_run(
        base.path(),
        agent_cmd(&d, &["--owner", OWNER, "--listen", "192.0.2.1:0"]),
    );
    let text = expect_fail(&out, Some(1), "listen on a foreign address");
    assert!(
        text.contains("error: cannot listen on 192.0.2.1:0"),
        "{text}"
    );
    for flag in ["--help", "--version"] {
        let out = agent_run(base.path(), agent_cmd(&d, &[flag]));
        assert!(out.status.success(), "{flag}: {}", shown(&out));
    }
}

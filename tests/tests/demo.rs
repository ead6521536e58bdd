//! The README's first command, `sa-image demo`, runs to the end on local defaults: agents, a
//! snapshot, two agents lost, a restore from one address and a copy through NBD, both verified.

use std::time::Duration;

use sa_tests::bins::bin;
use sa_tests::proc::run;

#[test]
fn demo_runs_and_verifies() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let mut cmd = std::process::Command::new(bin("sa-image"));
    cmd.args(["demo", "--size", "64MiB"]);
    let out = run(cmd, scratch.path(), Duration::from_secs(300));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["byte-identical", "copied the export", "demo passed"] {
        assert!(
            stdout.contains(want),
            "no {want:?} in the demo's output:\n{stdout}"
        );
    }
    // It cleans up after itself: its directory is gone and no agent runs from it.
    let dir = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sa-image demo in "))
        .expect("the demo names its directory")
        .trim()
        .to_string();
    assert!(!std::path::Path::new(&dir).exists(), "{dir} left behind");
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &dir])
        .output()
        .expect("pgrep");
    assert!(
        ps.stdout.is_empty(),
        "demo left processes: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

/// Ctrl-C in the middle of the demo stops its agents and removes its directory.
#[test]
fn demo_cleans_up_on_ctrl_c() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let mut cmd = std::process::Command::new(bin("sa-image"));
    cmd.args(["demo", "--size", "1GiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut demo = sa_tests::proc::Proc::spawn(cmd, "sa-image demo");
    let stdout = demo.child().stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut dir = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .expect("the demo did not start its agents within 120s");
        if let Some(d) = line.strip_prefix("sa-image demo in ") {
            dir = Some(std::path::PathBuf::from(d.trim()));
        }
        if line.contains("started 6 shard-agents") {
            break;
        }
    }
    let dir = dir.expect("the demo names its directory");
    assert!(dir.exists());
    let st = std::process::Command::new("kill")
        .args(["-INT", &demo.id().to_string()])
        .status()
        .expect("kill");
    assert!(st.success());
    let status = demo.wait(Duration::from_secs(60));
    assert!(!status.success(), "an interrupted demo reports failure");
    assert!(!dir.exists(), "{} left behind", dir.display());
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        ps.stdout.is_empty(),
        "agents left running: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

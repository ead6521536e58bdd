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
    // It cleans up after itself: no agent is left running from its directory.
    let ps = std::process::Command::new("pgrep")
        .args(["-f", "sa-image-demo-"])
        .output()
        .expect("pgrep");
    assert!(
        ps.stdout.is_empty(),
        "demo left processes: {}",
        String::from_utf8_lossy(&ps.stdout)
    );
}

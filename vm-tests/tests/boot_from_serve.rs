//! Boots a VM from a disk that `sa-image serve` assembles live from shard agents, with 2 of 6
//! agents down (issue 4): with an overlay (the guest's writes survive a reboot and a restart of
//! `serve`, the snapshot itself stays as it was). Needs root, qemu and the image tools (see the
//! crate docs), and the release binaries (`cargo build --release`).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sa_tests::proc::Proc;
use sa_tests::{bins::bin, Cluster};
use sa_vm_tests::*;

/// A running `sa-image serve`, killed when dropped.
struct Serve {
    /// Killed on drop.
    _proc: Proc,
    url: String,
}

impl Serve {
    fn start(cluster: &Cluster, agent: &str, extra: &[&str]) -> Serve {
        let mut cmd = Command::new(bin("sa-image"));
        cmd.args(["serve", "latest", "--listen", "127.0.0.1:0"])
            .arg("--key")
            .arg(&cluster.key.path)
            .args(["--agents", agent])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut proc = Proc::spawn(cmd, "sa-image serve");
        let stdout = proc.child().stdout.take().expect("serve stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                if let Some(at) = line.find("nbd://") {
                    let _ = tx.send(
                        line[at..]
                            .split_whitespace()
                            .next()
                            .unwrap_or_default()
                            .to_string(),
                    );
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!("sa-image serve did not print its nbd:// address within 60s")
            });
        Serve { _proc: proc, url }
    }
}

fn build(dir: &Path) -> BootImage {
    if let Err(e) = require_root() {
        panic!("{e}");
    }
    build_boot_image(dir, 96).unwrap_or_else(|e| panic!("building the boot image: {e}"))
}

#[test]
fn boots_from_agents_with_two_down_and_the_overlay_keeps_the_guests_writes() {
    let mut cluster = Cluster::start(6);
    let img = build(cluster.dir());
    let original = sha256_file(&img.path).unwrap_or_else(|e| panic!("{e}"));
    cluster.snapshot(&img.path, &["--volume", "appliance"]);
    cluster.agents[1].kill();
    cluster.agents[4].kill();
    let live = cluster.agents[0].addr_str();
    let overlay = cluster.path("overlay.img");
    let overlay_arg = overlay.to_str().expect("utf-8 path");

    let serve = Serve::start(&cluster, &live, &["--overlay", overlay_arg]);
    let first = boot_and_check("serve boot 1", &serve.url, &img, &VmOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        first.found, None,
        "a fresh snapshot has no file from an earlier boot"
    );
    assert_eq!(first.wrote.as_deref(), Some("boot-1"));
    let second = boot_and_check("serve boot 2", &serve.url, &img, &VmOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        second.found.as_deref(),
        Some("boot-1"),
        "the reboot must see the first boot's write"
    );

    // A restart of serve keeps the overlay's writes.
    drop(serve);
    let serve = Serve::start(&cluster, &live, &["--overlay", overlay_arg]);
    let third = boot_and_check("serve boot 3", &serve.url, &img, &VmOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        third.found.as_deref(),
        Some("boot-2"),
        "writes must survive a restart of serve"
    );
    drop(serve);

    // The backup itself was never written: it still restores to the original image.
    let restored = cluster.path("restored.img");
    cluster.restore("latest", &restored, &live);
    assert_eq!(
        sha256_file(&restored).unwrap_or_else(|e| panic!("{e}")),
        original
    );
}

//! Boot-time benchmark (issue 4): the same BIOS-bootable image booted under qemu TCG from
//! `qemu-nbd` serving the raw file (the baseline) and from `sa-image serve` assembling it from 6
//! agents with 2 of them down, alternating, N rounds each; prints the median time to the guest's
//! marker and their ratio. Run as root after `cargo build --release`:
//!
//! ```text
//! cargo run --release -p sa-vm-tests --example boot_bench -- [ROUNDS]
//! ```

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use sa_tests::proc::Proc;
use sa_tests::{bins::bin, Cluster};
use sa_vm_tests::*;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// Starts `sa-image serve` (cold: a new process, empty cache) and returns it with its URL.
fn start_serve(cluster: &Cluster, live: &str) -> (Proc, String) {
    let mut cmd = Command::new(bin("sa-image"));
    cmd.args(["serve", "latest", "--listen", "127.0.0.1:0", "--overlay"])
        .arg(cluster.path("overlay.img"))
        .arg("--key")
        .arg(&cluster.key.path)
        .args(["--agents", live])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut serve = Proc::spawn(cmd, "sa-image serve");
    let stdout = serve.child().stdout.take().expect("stdout");
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
        .expect("serve address");
    (serve, url)
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(3);
    require_root().unwrap_or_else(|e| panic!("{e}"));
    let mut cluster = Cluster::start(6);
    let img = build_boot_image(cluster.dir(), 96).unwrap_or_else(|e| panic!("{e}"));
    cluster.snapshot(&img.path, &["--volume", "bench-vm"]);
    cluster.agents[1].kill();
    cluster.agents[4].kill();
    let live = cluster.agents[0].addr_str();

    let qemu_nbd =
        QemuNbd::start(&img.path, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    // qemu-nbd gets a throwaway qemu overlay (snapshot=on) so both see the same disk every boot.
    let baseline_opts = VmOptions {
        snapshot: true,
        ..VmOptions::default()
    };
    let (mut base, mut ours) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        let b = boot_and_check(
            &format!("qemu-nbd {r}"),
            &qemu_nbd.url(),
            &img,
            &baseline_opts,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        base.push(b.to_marker);
        let (serve, url) = start_serve(&cluster, &live);
        let o = boot_and_check(
            &format!("sa-image serve {r}"),
            &url,
            &img,
            &VmOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        ours.push(o.to_marker);
        drop(serve);
    }
    let (b, o) = (median(base), median(ours));
    println!("boot to marker, median of {rounds} cold boots: qemu-nbd (raw file) {b:.2?}, sa-image serve (6 agents, 2 down, new process each boot) {o:.2?}");
    println!(
        "ratio serve/qemu-nbd: {:.2} (target <= 1.5)",
        o.as_secs_f64() / b.as_secs_f64()
    );
}

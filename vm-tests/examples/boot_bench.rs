//! Boot-time benchmark (issue 4): the same BIOS-bootable image booted under qemu TCG from
//! `qemu-nbd` serving the raw file (the baseline) and from `sa-image serve` assembling it from 6
//! agents with 2 of them down, alternating, N rounds each; prints the median time to the guest's
//! marker and their ratio. Run as root after `cargo build --release`:
//!
//! ```text
//! cargo run --release -p sa-vm-tests --example boot_bench -- [ROUNDS]
//! ```

use std::time::Duration;

use sa_tests::{Cluster, Serve};
use sa_vm_tests::*;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
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
        // A new serve process for every boot: a cold cache, as after a real disaster.
        let overlay = cluster.path("overlay.img");
        let serve = Serve::start(
            &cluster,
            "latest",
            &live,
            &["--overlay", overlay.to_str().expect("utf-8")],
        );
        let o = boot_and_check(
            &format!("sa-image serve {r}"),
            &serve.url,
            &img,
            &VmOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        ours.push(o.to_marker);
        drop(serve);
    }
    // After a live restore: hydrate a target fully, restart serve on it, boot once, and count
    // where the boot's reads were served from.
    let target = cluster.path("hydrated.img");
    let target_arg = target.to_str().expect("utf-8");
    let hydrate = ["--hydrate", target_arg, "--hydrate-rate", "unlimited"];
    let serve = Serve::start(&cluster, "latest", &live, &hydrate);
    let t = std::time::Instant::now();
    while !serve
        .lines
        .recv_timeout(Duration::from_secs(120))
        .expect("hydration")
        .contains("hydration complete")
    {}
    let hydrate_secs = t.elapsed().as_secs_f64();
    drop(serve);
    let serve = Serve::start(&cluster, "latest", &live, &hydrate);
    boot_and_check(
        "boot after hydration",
        &serve.url,
        &img,
        &VmOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let stats = serve.stop();
    println!(
        "boot after hydration: {} reads from the target, {} from the agents (hydrating {} MiB took {hydrate_secs:.2}s)",
        stats["reads_from_target"], stats["reads_from_agents"], img.size >> 20
    );

    let (b, o) = (median(base), median(ours));
    println!("boot to marker, median of {rounds} cold boots: qemu-nbd (raw file) {b:.2?}, sa-image serve (6 agents, 2 down, new process each boot) {o:.2?}");
    println!(
        "ratio serve/qemu-nbd: {:.2} (target <= 1.5)",
        o.as_secs_f64() / b.as_secs_f64()
    );
}

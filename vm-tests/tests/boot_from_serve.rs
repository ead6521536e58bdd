//! Boots a VM from a disk that `sa-image serve` assembles live from shard agents, with 2 of 6
//! agents down (issue 4): with an overlay (the guest's writes survive a reboot and a restart of
//! `serve`, the snapshot itself stays as it was). Needs root, qemu and the image tools (see the
//! crate docs), and the release binaries (`cargo build --release`).

use sa_tests::{Cluster, Serve};
use sa_vm_tests::*;

/// A boot image snapshotted onto 6 agents, 2 of them then killed: the cluster, the image, its
/// sha256, and the address of a live agent.
fn appliance_with_two_agents_down() -> (Cluster, BootImage, String, String) {
    if let Err(e) = require_root() {
        panic!("{e}");
    }
    let mut cluster = Cluster::start(6);
    let img = build_boot_image(cluster.dir(), 96)
        .unwrap_or_else(|e| panic!("building the boot image: {e}"));
    let original = sha256_file(&img.path).unwrap_or_else(|e| panic!("{e}"));
    cluster.snapshot(&img.path, &["--volume", "appliance"]);
    cluster.agents[1].kill();
    cluster.agents[4].kill();
    let live = cluster.agents[0].addr_str();
    (cluster, img, original, live)
}

#[test]
fn boots_from_agents_with_two_down_and_the_overlay_keeps_the_guests_writes() {
    let (cluster, img, original, live) = appliance_with_two_agents_down();
    let overlay = cluster.path("overlay.img");
    let overlay_arg = overlay.to_str().expect("utf-8 path");

    let serve = Serve::start(&cluster, "latest", &live, &["--overlay", overlay_arg]);
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
    let serve = Serve::start(&cluster, "latest", &live, &["--overlay", overlay_arg]);
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

/// Live restore: the guest boots from `serve --hydrate` while the disk streams onto a local
/// target; once hydration completes, the target alone boots, with the snapshot's data and the
/// file the guest wrote during the first boot.
#[test]
fn live_restore_hydrates_a_target_that_then_boots_on_its_own() {
    let (cluster, img, original, live) = appliance_with_two_agents_down();
    let target = cluster.path("new-disk.img");
    let target_arg = target.to_str().expect("utf-8 path");

    // A modest rate keeps the copy running while the guest boots and writes.
    let serve = Serve::start(
        &cluster,
        "latest",
        &live,
        &["--hydrate", target_arg, "--hydrate-rate", "32MiB"],
    );
    let first = boot_and_check("hydrating boot", &serve.url, &img, &VmOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(first.wrote.as_deref(), Some("boot-1"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match serve.lines.recv_timeout(left) {
            Ok(line) if line.contains("hydration complete") => break,
            Ok(_) => {}
            Err(e) => panic!(
                "no `hydration complete` line within 120s ({e}); log:\n{}",
                serve.log()
            ),
        }
    }
    let stats = serve.stop();
    assert_eq!(
        stats["hydrate_complete"],
        serde_json::Value::Bool(true),
        "{stats}"
    );

    // Everything stopped: the target boots alone and has both the old data and the new file.
    let own = boot_and_check(
        "boot from the hydrated target",
        target_arg,
        &img,
        &VmOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        own.found.as_deref(),
        Some("boot-1"),
        "the write made during live restore is on the target"
    );

    // The snapshot on the agents is untouched.
    let restored = cluster.path("restored.img");
    cluster.restore("latest", &restored, &live);
    assert_eq!(
        sha256_file(&restored).unwrap_or_else(|e| panic!("{e}")),
        original
    );
}

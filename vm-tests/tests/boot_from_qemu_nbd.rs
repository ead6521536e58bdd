//! Boots the test image with qemu from a `qemu-nbd` export (twice: the second boot must find what
//! the first wrote) and from the raw file. A baseline for the tests that boot from `sa-image serve`.
//!
//! Needs root and qemu-system-x86, qemu-utils, extlinux, syslinux-common, busybox-static,
//! e2fsprogs and a kernel in /boot. Run with `--nocapture` to see timings.

use std::time::{Duration, Instant};

use sa_vm_tests::*;

fn build(dir: &std::path::Path) -> BootImage {
    if let Err(e) = require_root() {
        panic!("{e}");
    }
    let t = Instant::now();
    let img = build_boot_image(dir, 96).unwrap_or_else(|e| panic!("building the boot image: {e}"));
    eprintln!(
        "built {} ({} MiB, kernel {}) in {:.2?}",
        img.path.display(),
        img.size >> 20,
        img.kernel.release,
        t.elapsed()
    );
    img
}

/// Boots from `drive`, checks the markers in order and a clean power-off.
fn boot(label: &str, drive: &str, img: &BootImage) -> Result<Boot> {
    boot_and_check(label, drive, img, &VmOptions::default())
}

fn boot_with(label: &str, drive: &str, img: &BootImage, opts: &VmOptions) -> Result<Boot> {
    boot_and_check(label, drive, img, opts)
}

#[test]
fn boots_twice_from_qemu_nbd_and_keeps_what_the_guest_wrote() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = build(dir.path());
    let server =
        QemuNbd::start(&img.path, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();

    let first = boot("nbd boot 1", &url, &img).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        first.found, None,
        "a fresh image has no file from an earlier boot"
    );
    assert_eq!(first.wrote.as_deref(), Some("boot-1"));

    let second = boot("nbd boot 2", &url, &img).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        second.found.as_deref(),
        Some("boot-1"),
        "the second boot must see what the first wrote through NBD"
    );
    assert_eq!(second.wrote.as_deref(), Some("boot-2"));
}

#[test]
fn boots_from_the_raw_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = build(dir.path());
    let path = img.path.to_str().expect("utf-8 path");
    let b = boot("file boot", path, &img).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.found, None);
    assert_eq!(b.wrote.as_deref(), Some("boot-1"));
}

/// `snapshot=on` sends the guest's writes to a qemu overlay and `readonly=on` refuses them: either
/// way the image is unchanged (what a boot from a backup must guarantee, invariant 6).
#[test]
fn snapshot_and_read_only_boots_leave_the_image_unchanged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = build(dir.path());
    let before = sha256_file(&img.path).unwrap_or_else(|e| panic!("{e}"));
    let server =
        QemuNbd::start(&img.path, Duration::from_secs(20)).unwrap_or_else(|e| panic!("{e}"));
    let url = server.url();

    let overlay = VmOptions {
        snapshot: true,
        ..VmOptions::default()
    };
    for label in ["snapshot boot 1", "snapshot boot 2"] {
        let b = boot_with(label, &url, &img, &overlay).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            b.found, None,
            "{label}: a write of an earlier snapshot boot leaked"
        );
        assert_eq!(b.wrote.as_deref(), Some("boot-1"));
    }

    let read_only = VmOptions {
        readonly: true,
        ..VmOptions::default()
    };
    let b = boot_with("read-only boot", &url, &img, &read_only).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(b.found, None);
    assert_eq!(
        b.wrote, None,
        "the guest must have found its disk read-only"
    );

    drop(server);
    let after = sha256_file(&img.path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(before, after, "the image changed");
}

/// A qemu that cannot open its drive fails the wait at once, and the error shows qemu's stderr.
#[test]
fn a_missing_drive_fails_fast_with_qemu_stderr() {
    let t = Instant::now();
    let mut vm = run_vm("/nonexistent/sa-vm-disk.img", &VmOptions::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let err = vm
        .wait_for_marker(MARKER_BOOTED, BOOT_TIMEOUT)
        .expect_err("no disk, no boot");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "took {:?}",
        t.elapsed()
    );
    assert!(err.0.contains("output ended"), "{err}");
    assert!(err.0.contains("[qemu] "), "{err}");
    assert!(err.0.contains("sa-vm-disk.img"), "{err}");
    let status = vm.wait_exit(STEP_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    assert!(!status.success());
}

/// The guard kills and reaps qemu when a test panics while the VM runs.
#[test]
fn a_panicking_test_still_kills_qemu() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("blank.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(1 << 20))
        .expect("blank disk");
    let pid = std::sync::atomic::AtomicU32::new(0);
    let result = std::panic::catch_unwind(|| {
        let vm = run_vm(disk.to_str().expect("utf-8"), &VmOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        pid.store(vm.pid(), std::sync::atomic::Ordering::SeqCst);
        assert!(std::path::Path::new(&format!("/proc/{}", vm.pid())).exists());
        panic!("the test fails while its VM runs");
    });
    assert!(result.is_err());
    let pid = pid.load(std::sync::atomic::Ordering::SeqCst);
    assert_ne!(pid, 0);
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "qemu (pid {pid}) still exists after the panic"
    );
}

//! Boot a virtual machine from a disk that sa-image serves, and check what it saw.
//!
//! # Tour
//!
//! A test goes through three steps, each in its own module:
//!
//! 1. [`image`] builds a small BIOS-bootable raw disk at test time from the host's own parts
//!    (`/boot/vmlinuz-*`, its virtio modules, static busybox, syslinux's `mbr.bin` and
//!    `extlinux`): [`build_boot_image`] returns a [`BootImage`] with the path, the size and the
//!    sha256 of a known file (`/data/known.bin`) on it. Building needs root (one loop device and
//!    a mount, for `extlinux --install`) and takes about a second.
//! 2. Something serves that image over NBD: [`QemuNbd`] (a baseline, `qemu-nbd`), or, in the
//!    lead's tests, `sa-image serve` after a snapshot of the image onto agents.
//! 3. [`run_vm`] boots `qemu-system-x86_64 -accel tcg` from an NBD URL ([`nbd_url`]) or from the
//!    raw file. The guest's `/init` ([`guest`]) mounts `/dev/vda1` read-write and prints markers
//!    on the serial console:
//!
//!    ```text
//!    SA-VM-BOOTED                   the disk's filesystem is mounted
//!    SA-VM-SHA256 <hex>             sha256 of /data/known.bin as the guest read it
//!    SA-VM-FOUND <text>             /data/written-by-guest.txt left by an earlier boot
//!      or SA-VM-NOT-FOUND
//!    SA-VM-WROTE <text>             what this boot wrote there (boot-N, synced)
//!    SA-VM-DONE                     unmounted; then `poweroff -f` ends qemu with status 0
//!    SA-VM-FAIL <why>               instead, when something failed in the guest
//!    ```
//!
//!    [`VmRun::wait_for_marker`] waits for one with a deadline (a failure line or qemu's exit
//!    ends the wait early) and every error carries the whole console transcript. Dropping a
//!    [`VmRun`] or a [`QemuNbd`] kills the process, also when a test panics.
//!
//! [`console`] is the transcript and the waiting underneath; [`cpio`] writes the initramfs.
//!
//! For backups of a running guest: [`GuestProgram::Writer`] makes a guest that keeps writing
//! files and freezes its filesystem when told on the console ([`VmRun::send_line`]), and
//! [`qmp`] drives the running qemu over its QMP socket (dirty bitmaps, `blockdev-backup`,
//! `block-export-add`).
//!
//! Host packages (Debian 12): `qemu-system-x86` and `qemu-utils` (both from
//! `bookworm-backports`: `apt-get install -y -t bookworm-backports qemu-system-x86`, never
//! without `-t`), `extlinux`, `syslinux-common`, `busybox-static`, `e2fsprogs`, `kmod`,
//! `linux-image-cloud-amd64`. `$SA_VM_KERNEL` picks another `vmlinuz-<release>`.
//!
//! ```no_run
//! use std::time::Duration;
//! use sa_vm_tests::*;
//!
//! let dir = tempfile::tempdir()?;
//! let img = build_boot_image(dir.path(), 96)?;
//! let server = QemuNbd::start(&img.path, Duration::from_secs(10))?;
//! let mut vm = run_vm(&server.url(), &VmOptions::default())?;
//! let sha = vm.wait_for_marker(MARKER_SHA256, Duration::from_secs(120))?;
//! assert_eq!(sha.text, img.known_sha256);
//! vm.expect_clean_exit(Duration::from_secs(60))?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod boot;
pub mod console;
pub mod cpio;
pub mod error;
pub mod guest;
pub mod image;
pub mod nbd;
pub mod qemu;
pub mod qmp;

pub use boot::{boot_and_check, Boot, BOOT_TIMEOUT, STEP_TIMEOUT};
pub use console::{Console, Line};
pub use error::{require_root, Error, Result};
pub use guest::{
    GuestProgram, Kernel, MARKER_BOOTED, MARKER_DONE, MARKER_FAIL, MARKER_FILE, MARKER_FOUND,
    MARKER_FROZEN, MARKER_NOT_FOUND, MARKER_READ_ONLY, MARKER_SHA256, MARKER_THAWED, MARKER_WROTE,
};
pub use image::{
    build_boot_image, build_boot_image_with, known_data, sha256_file, BootImage, ImageOptions,
};
pub use nbd::{free_port, wait_for_port, QemuNbd};
pub use qemu::{is_failure_line, nbd_url, run_vm, VmOptions, VmRun};
pub use qmp::Qmp;

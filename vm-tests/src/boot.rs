//! One whole boot, checked: the guest must read the known file exactly, report what an earlier
//! boot left, write its own file, and power off cleanly.

use std::time::Duration;

use crate::{
    run_vm, BootImage, Result, VmOptions, MARKER_BOOTED, MARKER_DONE, MARKER_FOUND,
    MARKER_NOT_FOUND, MARKER_READ_ONLY, MARKER_SHA256, MARKER_WROTE,
};

/// Generous: TCG on a busy 2-core machine; a boot takes a few seconds when idle.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Each later step of a boot.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// What one boot reported.
#[derive(Debug, Clone)]
pub struct Boot {
    /// The text an earlier boot left, if any.
    pub found: Option<String>,
    /// What this boot wrote; `None` when the guest found the disk read-only.
    pub wrote: Option<String>,
    /// Time from qemu's start to the `SA-VM-BOOTED` marker.
    pub to_marker: Duration,
}

/// Boots from `drive` (a file path or an NBD URL), checks the markers in order, the sha256 of the
/// known file, and a clean power-off.
pub fn boot_and_check(label: &str, drive: &str, img: &BootImage, opts: &VmOptions) -> Result<Boot> {
    let mut vm = run_vm(drive, opts)?;
    let booted = vm.wait_for_marker(MARKER_BOOTED, BOOT_TIMEOUT)?;
    let sha = vm.wait_for_marker(MARKER_SHA256, STEP_TIMEOUT)?;
    if sha.text != img.known_sha256 {
        return Err(vm.console().error(&format!(
            "{label}: guest read /data/known.bin with sha256 {}, expected {}",
            sha.text, img.known_sha256
        )));
    }
    let found = vm.wait_for_line(STEP_TIMEOUT, |l| {
        l.contains(MARKER_FOUND) || l.contains(MARKER_NOT_FOUND)
    })?;
    let found = found
        .text
        .split_once(MARKER_FOUND)
        .map(|(_, rest)| rest.trim().to_string());
    let wrote = vm.wait_for_line(STEP_TIMEOUT, |l| {
        l.contains(MARKER_WROTE) || l.contains(MARKER_READ_ONLY)
    })?;
    let wrote = wrote
        .text
        .split_once(MARKER_WROTE)
        .map(|(_, rest)| rest.trim().to_string());
    vm.wait_for_marker(MARKER_DONE, STEP_TIMEOUT)?;
    vm.expect_clean_exit(STEP_TIMEOUT)?;
    eprintln!(
        "{label}: {MARKER_BOOTED} after {:.2?}, powered off after {:.2?}; found {found:?}, wrote {wrote:?}",
        booted.at,
        vm.elapsed(),
    );
    Ok(Boot {
        found,
        wrote,
        to_marker: booted.at,
    })
}

//! `--lvm-snapshot`: the source is an LVM logical volume; a snapshot LV of it is created (by a
//! [`super::guard`], which removes it however the run ends), read, and removed.
//!
//! Creating the snapshot suspends the origin in device-mapper, which freezes a filesystem
//! mounted on it: the snapshot holds a clean filesystem, and the origin is frozen only for the
//! moment `lvcreate` takes, not for the whole read. A thick LV's snapshot needs room for the
//! writes made during the read (`--lvm-snapshot-size`, default `10%ORIGIN` of free extents in the
//! VG); a thin LV's snapshot takes none.
//!
//! The snapshot is named `<LV>-sa-image`. If that LV already exists, the run is refused: it is
//! either another snapshot of the same LV running now or one whose guard could not remove it
//! (the guard itself was killed); the message says how to remove it.

use std::path::Path;

use tokio::process::Command;

use crate::error::{Error, Result};

/// Default room of a thick LV's snapshot.
pub const DEFAULT_SNAPSHOT_SIZE: &str = "10%ORIGIN";

/// The device-mapper control node LVM needs.
pub const DM_CONTROL: &str = "/dev/mapper/control";

/// An LV to snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Volume group.
    pub vg: String,
    /// Logical volume.
    pub lv: String,
    /// A thin LV (its snapshot needs no size).
    pub thin: bool,
}

impl Origin {
    /// `VG/LV`.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.vg, self.lv)
    }

    /// The snapshot LV's name.
    pub fn snapshot_name(&self) -> String {
        format!("{}-sa-image", self.lv)
    }

    /// The snapshot LV's device.
    pub fn snapshot_device(&self) -> String {
        format!("/dev/{}/{}", self.vg, self.snapshot_name())
    }
}

/// Whether this machine has device-mapper at all.
pub fn device_mapper_present() -> bool {
    Path::new(DM_CONTROL).exists()
}

/// Finds the LV behind `source` and checks no stale snapshot of it is in the way.
pub async fn resolve(source: &Path) -> Result<Origin> {
    if !device_mapper_present() {
        return Err(Error::Consistency(format!(
            "--lvm-snapshot needs device-mapper, and {DM_CONTROL} does not exist on this machine \
             (no dm_mod kernel module?): use --freeze MOUNTPOINT instead, or load dm_mod"
        )));
    }
    let out = lvs(&[
        "--noheadings",
        "--separator",
        "|",
        "-o",
        "vg_name,lv_name,segtype",
        &source.display().to_string(),
    ])
    .await?;
    if !out.status.success() {
        return Err(Error::invalid(format!(
            "--lvm-snapshot: {} is not an LVM logical volume ({}); give the LV's device \
             (/dev/VG/LV, see `lvs`) or use --freeze MOUNTPOINT",
            source.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let origin = parse_lvs(&String::from_utf8_lossy(&out.stdout)).ok_or_else(|| {
        Error::Consistency(format!(
            "cannot read `lvs` output for {}: {:?}",
            source.display(),
            String::from_utf8_lossy(&out.stdout)
        ))
    })?;
    let existing = lvs(&[
        "--noheadings",
        "-o",
        "lv_name",
        &format!("{}/{}", origin.vg, origin.snapshot_name()),
    ])
    .await?;
    if existing.status.success() {
        return Err(Error::Consistency(format!(
            "the LVM snapshot {}/{} already exists: another snapshot of {} is running, or an \
             earlier run could not remove it; when no sa-image runs, remove it with \
             `lvremove {}/{}`",
            origin.vg,
            origin.snapshot_name(),
            origin.full_name(),
            origin.vg,
            origin.snapshot_name()
        )));
    }
    Ok(origin)
}

async fn lvs(args: &[&str]) -> Result<std::process::Output> {
    Command::new("lvs")
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| {
            Error::Consistency(format!(
                "--lvm-snapshot needs LVM's tools and `lvs` cannot run ({e}): apt-get install lvm2"
            ))
        })
}

/// Parses one line of `lvs --noheadings --separator '|' -o vg_name,lv_name,segtype`.
fn parse_lvs(text: &str) -> Option<Origin> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    let f: Vec<&str> = line.split('|').map(str::trim).collect();
    match f.as_slice() {
        [vg, lv, seg] if !vg.is_empty() && !lv.is_empty() => Some(Origin {
            vg: vg.to_string(),
            lv: lv.to_string(),
            thin: *seg == "thin",
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvs_lines_are_read() {
        let o = parse_lvs("  vg0|root|linear\n").unwrap();
        assert_eq!(o.full_name(), "vg0/root");
        assert!(!o.thin);
        assert_eq!(o.snapshot_device(), "/dev/vg0/root-sa-image");
        assert!(parse_lvs("  data|vm-100-disk-0|thin").unwrap().thin);
        assert_eq!(parse_lvs(""), None);
        assert_eq!(parse_lvs("vg0|"), None);
    }
}

//! Is a block device in use by a filesystem mounted read-write? Not only the device itself: a
//! whole disk is in use when one of its partitions is mounted, or a device-mapper or md device
//! built on it (an LVM LV, a LUKS volume) is. The devices built on a device come from sysfs
//! (`/sys/dev/block/MAJ:MIN`: its partitions, and its `holders`, recursively); the mounts from
//! `/proc/self/mountinfo`, matched by device number or, for filesystems that report another
//! number (btrfs), by the mount's source device.

use std::path::{Path, PathBuf};

/// A read-write mount of the device or of one built on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RwMount {
    /// Where it is mounted.
    pub mountpoint: PathBuf,
    /// The kernel's name of the mounted device (`sda1`, `dm-0`, `loop3`).
    pub device: String,
}

impl std::fmt::Display for RwMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.mountpoint.display(), self.device)
    }
}

/// One block device: its kernel name and `MAJ:MIN`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Dev {
    name: String,
    number: String,
}

/// The read-write mounts of the block device `major:minor` and of every device built on it.
pub fn rw_mounts(major: u64, minor: u64) -> Vec<RwMount> {
    let devs = family(&format!("{major}:{minor}"));
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    match_mounts(&text, &devs, |p| {
        std::fs::canonicalize(p)
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
    })
}

/// The device `number` and everything built on it (partitions, holders), from sysfs.
fn family(number: &str) -> Vec<Dev> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::canonicalize(format!("/sys/dev/block/{number}")) else {
        return out;
    };
    collect(&dir, &mut out, 0);
    out
}

fn collect(sysdir: &Path, out: &mut Vec<Dev>, depth: usize) {
    let Some(name) = sysdir.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    let Ok(number) = std::fs::read_to_string(sysdir.join("dev")) else {
        return;
    };
    if depth > 8 || out.iter().any(|d| d.name == name) {
        return;
    }
    out.push(Dev {
        name,
        number: number.trim().to_string(),
    });
    let entries: Vec<PathBuf> = std::fs::read_dir(sysdir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    for p in entries {
        if p.join("partition").is_file() {
            collect(&p, out, depth + 1);
        }
    }
    let holders: Vec<String> = std::fs::read_dir(sysdir.join("holders"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for h in holders {
        if let Ok(d) = std::fs::canonicalize(format!("/sys/class/block/{h}")) {
            collect(&d, out, depth + 1);
        }
    }
}

/// The read-write mounts in `mountinfo` of any of `devs`; `device_name` gives the kernel name of
/// a mount's source path (`/dev/mapper/vg-root` -> `dm-0`).
fn match_mounts(
    mountinfo: &str,
    devs: &[Dev],
    device_name: impl Fn(&str) -> Option<String>,
) -> Vec<RwMount> {
    let mut out = Vec::new();
    for line in mountinfo.lines() {
        // ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER-OPTIONS
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let f: Vec<&str> = left.split(' ').collect();
        if f.len() < 6 || !f[5].split(',').any(|o| o == "rw") {
            continue;
        }
        let source = right.split(' ').nth(1).unwrap_or("");
        let by_number = devs.iter().find(|d| d.number == f[2]);
        let dev = by_number.or_else(|| {
            if !source.starts_with('/') {
                return None;
            }
            let name = device_name(source)?;
            devs.iter().find(|d| d.name == name)
        });
        if let Some(d) = dev {
            out.push(RwMount {
                mountpoint: PathBuf::from(unescape(f[4])),
                device: d.name.clone(),
            });
        }
    }
    out
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 8:2 / /boot ro,relatime shared:2 - ext4 /dev/sda2 ro
24 22 0:45 / /srv/big\\040data rw,relatime shared:3 - btrfs /dev/mapper/vg-data rw
25 22 7:0 / /mnt/other rw - ext4 /dev/loop0 rw
26 22 0:5 / /dev rw - devtmpfs udev rw
";

    #[test]
    fn partitions_and_holders_count_and_read_only_mounts_do_not() {
        let devs = vec![
            Dev {
                name: "sda".into(),
                number: "8:0".into(),
            },
            Dev {
                name: "sda1".into(),
                number: "8:1".into(),
            },
            Dev {
                name: "sda2".into(),
                number: "8:2".into(),
            },
            Dev {
                name: "sda3".into(),
                number: "8:3".into(),
            },
            Dev {
                name: "dm-0".into(),
                number: "254:0".into(),
            },
        ];
        let names = |p: &str| match p {
            "/dev/mapper/vg-data" => Some("dm-0".to_string()),
            "/dev/sda1" => Some("sda1".to_string()),
            _ => None,
        };
        let got = match_mounts(MOUNTINFO, &devs, names);
        assert_eq!(
            got,
            vec![
                RwMount {
                    mountpoint: "/".into(),
                    device: "sda1".into()
                },
                RwMount {
                    mountpoint: "/srv/big data".into(),
                    device: "dm-0".into()
                },
            ]
        );
        assert_eq!(got[1].to_string(), "/srv/big data (dm-0)");
        let loop0 = [Dev {
            name: "loop0".into(),
            number: "7:0".into(),
        }];
        assert_eq!(match_mounts(MOUNTINFO, &loop0, |_| None).len(), 1);
        assert!(match_mounts(MOUNTINFO, &loop0[..0], |_| None).is_empty());
    }

    #[test]
    fn octal_escapes() {
        assert_eq!(unescape("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape("/trailing\\04"), "/trailing\\04");
    }
}

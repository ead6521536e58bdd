//! What runs inside the guest: the kernel and its modules from the host's `/boot`, busybox, and
//! the `/init` script that prints the markers the tests wait for.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::CpioWriter;
use crate::error::{run, Error, Result};

/// Printed once the data partition is mounted: the guest booted from the disk.
pub const MARKER_BOOTED: &str = "SA-VM-BOOTED";
/// Followed by the hex sha256 of `/data/known.bin` as the guest read it.
pub const MARKER_SHA256: &str = "SA-VM-SHA256 ";
/// Followed by the content of `/data/written-by-guest.txt` that an earlier boot left, if any.
pub const MARKER_FOUND: &str = "SA-VM-FOUND ";
/// Printed when there was no `/data/written-by-guest.txt` at boot.
pub const MARKER_NOT_FOUND: &str = "SA-VM-NOT-FOUND";
/// Printed instead of [`MARKER_WROTE`] when the disk could only be mounted read-only (a
/// read-only drive or export): the guest writes nothing and goes on to [`MARKER_DONE`].
pub const MARKER_READ_ONLY: &str = "SA-VM-READ-ONLY";
/// Followed by what this boot wrote to `/data/written-by-guest.txt` (and synced).
pub const MARKER_WROTE: &str = "SA-VM-WROTE ";
/// Printed after the data partition is unmounted, just before `poweroff -f`.
pub const MARKER_DONE: &str = "SA-VM-DONE";
/// Followed by what went wrong inside the guest; the guest then powers off.
pub const MARKER_FAIL: &str = "SA-VM-FAIL ";
/// Writer guests: followed by `N HEX`: file `/data/w/fN` was written and synced, HEX its sha256.
pub const MARKER_FILE: &str = "SA-VM-FILE ";
/// Writer guests: the filesystem is frozen (`fsfreeze --freeze`), answering the line `freeze`.
pub const MARKER_FROZEN: &str = "SA-VM-FROZEN";
/// Writer guests: the filesystem is thawed, answering the line `thaw`.
pub const MARKER_THAWED: &str = "SA-VM-THAWED";

/// What the guest's `/init` does once the disk's filesystem is mounted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestProgram {
    /// Check the known file, report and write `written-by-guest.txt`, power off (see the crate
    /// docs for the markers).
    #[default]
    BootCheck,
    /// Keep writing: 64 KiB random files `/data/w/f1`, `f2`, ... (the last 200 kept), each
    /// synced and announced with [`MARKER_FILE`]; meanwhile answer lines on the console:
    /// `freeze` (`fsfreeze --freeze`, [`MARKER_FROZEN`]) and `thaw` ([`MARKER_THAWED`]), as a guest
    /// agent quiesces a guest for a backup. It runs until qemu is killed.
    Writer,
}

/// The modules `/init` loads (with their dependencies, in `modprobe --show-depends` order).
/// Those built into the kernel are skipped.
const MODULES: &[&str] = &["virtio_pci", "virtio_blk", "ext4"];

/// A kernel from the host and the module tree that belongs to it.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The `vmlinuz-*` file.
    pub image: PathBuf,
    /// Its release string, e.g. `6.1.0-56-cloud-amd64` (names `/lib/modules/<release>`).
    pub release: String,
}

impl Kernel {
    /// The kernel to boot: `$SA_VM_KERNEL` if set (a `vmlinuz-<release>` path), else the newest
    /// `/boot/vmlinuz-*-cloud-amd64`, else the newest `/boot/vmlinuz-*`, among those whose
    /// `/lib/modules/<release>` exists.
    pub fn find() -> Result<Kernel> {
        if let Some(p) = std::env::var_os("SA_VM_KERNEL") {
            return Self::from_path(Path::new(&p))
                .ok_or_else(|| Error(format!("SA_VM_KERNEL={p:?}: not a vmlinuz-<release> file with a /lib/modules/<release> tree")));
        }
        let mut found: Vec<Kernel> = std::fs::read_dir("/boot")
            .map_err(|e| Error::io("listing /boot", e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| Self::from_path(&e.path()))
            .collect();
        // Prefer the cloud flavour (small, virtio drivers as modules), then the newest.
        found.sort_by_key(|k| (k.release.ends_with("-cloud-amd64"), version_key(&k.release)));
        found.pop().ok_or_else(|| {
            Error::new(
                "no kernel in /boot with modules in /lib/modules: \
                 install one, e.g. `apt-get install -y linux-image-cloud-amd64`",
            )
        })
    }

    fn from_path(p: &Path) -> Option<Kernel> {
        let name = p.file_name()?.to_str()?;
        let release = name.strip_prefix("vmlinuz-")?.to_string();
        if !p.is_file() || !Path::new("/lib/modules").join(&release).is_dir() {
            return None;
        }
        Some(Kernel {
            image: p.to_path_buf(),
            release,
        })
    }

    /// The module files to load, in order (dependencies first, each once), resolved with
    /// `modprobe -S <release> --show-depends`.
    pub fn module_files(&self) -> Result<Vec<PathBuf>> {
        let out = run(Command::new("modprobe")
            .args(["-S", &self.release, "--show-depends", "-a"])
            .args(MODULES))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            // "insmod /lib/modules/.../x.ko[.xz|.zst] [params]" or "builtin x".
            if let Some(rest) = line.strip_prefix("insmod ") {
                let path = PathBuf::from(rest.split_whitespace().next().unwrap_or(rest));
                if !files.contains(&path) {
                    files.push(path);
                }
            }
        }
        Ok(files)
    }
}

/// Sorts release strings like `6.1.0-56-cloud-amd64` by their numbers.
fn version_key(release: &str) -> Vec<u64> {
    release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect()
}

/// Reads a module file, decompressing `.ko.xz` / `.ko.zst` / `.ko.gz` with the host's tools
/// (the guest's busybox `insmod` takes plain `.ko` only).
fn read_module(path: &Path) -> Result<Vec<u8>> {
    let s = path.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        Some("xz")
    } else if s.ends_with(".zst") {
        Some("zstd")
    } else if s.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        Some(t) => Ok(run(Command::new(t).arg("-dc").arg(path))?.stdout),
        None => {
            std::fs::read(path).map_err(|e| Error::io(format!("reading {}", path.display()), e))
        }
    }
}

/// The guest's `/init` for `program`. It never returns to the kernel: every path of the boot
/// check ends in `poweroff -f`; the writer runs until qemu is killed.
fn init_script(program: GuestProgram) -> String {
    match program {
        GuestProgram::BootCheck => boot_check_script(),
        GuestProgram::Writer => writer_script(),
    }
}

/// Loads the modules, waits for `/dev/vda1` (shared by every program).
fn preamble() -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
fail() {{ echo "{fail}$*"; sync; poweroff -f; }}
mount -t proc proc /proc || fail "mount /proc"
mount -t sysfs sysfs /sys || fail "mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "mount /dev"
for m in /modules/*.ko; do
    insmod "$m" || fail "insmod $m"
done
# Keep kernel messages from splitting our marker lines on the shared console.
echo 1 > /proc/sys/kernel/printk
i=0
while [ ! -b /dev/vda1 ]; do
    i=$((i+1))
    [ $i -gt 300 ] && fail "no /dev/vda1 after 30 s: $(ls /dev | tr '\n' ' ')"
    sleep 0.1
done
"#,
        fail = MARKER_FAIL,
    )
}

/// The writer (see [`GuestProgram::Writer`]).
fn writer_script() -> String {
    format!(
        r#"{preamble}mount -t ext4 -o rw /dev/vda1 /mnt || fail "mount /dev/vda1"
echo "{booted}"
mkdir -p /mnt/data/w || fail "mkdir /mnt/data/w"
# The console would echo the commands typed to us into the middle of the writer's lines.
stty -echo 2>/dev/null
(
    i=0
    while :; do
        i=$((i+1))
        dd if=/dev/urandom of=/mnt/data/w/f$i bs=4096 count=16 2>/dev/null || fail "write f$i"
        sync
        rm -f /mnt/data/w/f$((i-200))
        sum=$(sha256sum /mnt/data/w/f$i)
        echo "{file}$i ${{sum%% *}}"
    done
) &
while read -r cmd; do
    case "$cmd" in
        freeze) fsfreeze --freeze /mnt && echo "{frozen}" || echo "{fail}fsfreeze --freeze" ;;
        thaw) fsfreeze --unfreeze /mnt && echo "{thawed}" || echo "{fail}fsfreeze --unfreeze" ;;
    esac
done
sleep 100000
"#,
        preamble = preamble(),
        fail = MARKER_FAIL,
        booted = MARKER_BOOTED,
        file = MARKER_FILE,
        frozen = MARKER_FROZEN,
        thawed = MARKER_THAWED,
    )
}

/// The boot check (see [`GuestProgram::BootCheck`]).
fn boot_check_script() -> String {
    format!(
        r#"{preamble}mount -t ext4 -o rw /dev/vda1 /mnt 2>/dev/null || mount -t ext4 -o ro /dev/vda1 /mnt || fail "mount /dev/vda1"
echo "{booted}"
ro=""
grep -qE '^/dev/vda1 /mnt ext4 ro(,| )' /proc/mounts && ro=1
sum=$(sha256sum /mnt/data/known.bin) || fail "sha256sum /mnt/data/known.bin"
echo "{sha}${{sum%% *}}"
prev=""
if [ -f /mnt/data/written-by-guest.txt ]; then
    prev=$(cat /mnt/data/written-by-guest.txt)
    echo "{found}$prev"
else
    echo "{not_found}"
fi
text=""
for w in $(cat /proc/cmdline); do
    case "$w" in sa_write=*) text="${{w#sa_write=}}" ;; esac
done
if [ -n "$ro" ]; then
    echo "{read_only}"
    umount /mnt || fail "umount /mnt"
    echo "{done}"
    poweroff -f
fi
if [ -z "$text" ]; then
    n="${{prev#boot-}}"
    case "$n" in ''|*[!0-9]*) n=0 ;; esac
    text="boot-$((n+1))"
fi
echo "$text" > /mnt/data/written-by-guest.txt || fail "write /mnt/data/written-by-guest.txt"
sync
echo "{wrote}$text"
umount /mnt || fail "umount /mnt"
echo "{done}"
poweroff -f
"#,
        preamble = preamble(),
        booted = MARKER_BOOTED,
        sha = MARKER_SHA256,
        found = MARKER_FOUND,
        not_found = MARKER_NOT_FOUND,
        read_only = MARKER_READ_ONLY,
        wrote = MARKER_WROTE,
        done = MARKER_DONE,
    )
}

/// Writes an (uncompressed) newc initramfs to `out`: static busybox as `/bin/busybox`, the
/// modules as `/modules/NN-name.ko` in load order, and `/init` running `program`.
pub fn write_initramfs(kernel: &Kernel, out: &Path, program: GuestProgram) -> Result<()> {
    let busybox_path = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .ok_or_else(|| Error::new("no busybox: `apt-get install -y busybox-static`"))?;
    let busybox = std::fs::read(busybox_path)
        .map_err(|e| Error::io(format!("reading {}", busybox_path.display()), e))?;
    // A dynamically linked busybox would not run in an initramfs without its libraries.
    if !is_static_elf(&busybox) {
        return Err(Error(format!(
            "{} is not statically linked: `apt-get install -y busybox-static`",
            busybox_path.display()
        )));
    }

    let mut cpio = CpioWriter::new();
    for d in ["bin", "dev", "proc", "sys", "mnt", "modules"] {
        cpio.dir(d);
    }
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.symlink("bin/sh", "busybox");
    for (i, path) in kernel.module_files()?.iter().enumerate() {
        let base = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split(".ko").next())
            .unwrap_or("module");
        cpio.file(
            &format!("modules/{i:02}-{base}.ko"),
            0o644,
            &read_module(path)?,
        );
    }
    cpio.file("init", 0o755, init_script(program).as_bytes());

    let mut f = std::fs::File::create(out)
        .map_err(|e| Error::io(format!("creating {}", out.display()), e))?;
    cpio.finish(&mut f)
        .map_err(|e| Error::io(format!("writing {}", out.display()), e))
}

/// True for an ELF file without a `PT_INTERP` program header (no dynamic loader needed).
fn is_static_elf(b: &[u8]) -> bool {
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false; // not a 64-bit ELF: do not guess
    }
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8])) as usize;
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let (phoff, phentsize, phnum) = (u64_at(0x20), u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 > b.len() || u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) != 3
    })
}

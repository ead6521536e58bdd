//! Builds a small BIOS-bootable raw disk image at test time, from the host's kernel, busybox and
//! syslinux: nothing binary is committed.
//!
//! Layout: an MBR (syslinux `mbr.bin` boot code) with one bootable Linux partition from 1 MiB to
//! the end, holding an ext4 filesystem (4 KiB blocks, no `64bit`, no `metadata_csum`: extlinux
//! cannot read the kernel otherwise) with
//!
//! ```text
//! /boot/vmlinuz              the host's kernel
//! /boot/initrd.img           busybox + virtio modules + /init (see guest.rs)
//! /boot/extlinux/            extlinux.conf, ldlinux.sys, ldlinux.c32 (boots at once, no prompt)
//! /data/known.bin            deterministic pseudo-random bytes; their sha256 is in BootImage
//! ```
//!
//! The filesystem is made with `mkfs.ext4 -d` in a separate file; only `extlinux --install`
//! needs it mounted (a loop device, root only). Loop device and mount are undone by guards, also
//! on failure. The partition is then copied into the image, skipping zero blocks, so the image
//! stays sparse.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{describe, require_root, run, Error, Result};
use crate::guest::{write_initramfs, GuestProgram, Kernel};

/// Where the partition starts: LBA 2048, the usual 1 MiB alignment.
pub const PARTITION_OFFSET: u64 = 1 << 20;

/// What to build. `Default` gives a 96 MiB image with 4 MiB of known data.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// Size of the whole image in MiB (at least 32).
    pub size_mib: u64,
    /// Size of `/data/known.bin` in bytes.
    pub known_len: u64,
    /// Seed of the pseudo-random content of `/data/known.bin`.
    pub known_seed: u64,
    /// If set, every boot writes this text (no spaces) to `/data/written-by-guest.txt`, passed
    /// as `sa_write=` on the kernel command line; if not, a boot writes `boot-N`, N being one
    /// more than the number an earlier boot left there (so the first boot writes `boot-1`).
    pub guest_write: Option<String>,
    /// What the guest does once booted: the boot check (the default) or the writer.
    pub program: GuestProgram,
}

impl Default for ImageOptions {
    fn default() -> Self {
        ImageOptions {
            size_mib: 96,
            known_len: 4 << 20,
            known_seed: 0x5a_1a_6e_00_b0_07,
            guest_write: None,
            program: GuestProgram::BootCheck,
        }
    }
}

/// A built image and what a test needs to know about it.
#[derive(Debug, Clone)]
pub struct BootImage {
    /// The raw disk image (sparse file).
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// Byte offset of the ext4 partition in the image.
    pub partition_offset: u64,
    /// Lower-case hex sha256 of `/data/known.bin`, as the guest prints it after `SA-VM-SHA256 `.
    pub known_sha256: String,
    /// Length of `/data/known.bin` in bytes.
    pub known_len: u64,
    /// The kernel in the image.
    pub kernel: Kernel,
}

/// Builds a bootable image of `size_mib` MiB as `dir/boot.img`, with default options otherwise.
/// Needs root. See [`build_boot_image_with`].
pub fn build_boot_image(dir: &Path, size_mib: u64) -> Result<BootImage> {
    build_boot_image_with(
        dir,
        &ImageOptions {
            size_mib,
            ..ImageOptions::default()
        },
    )
}

/// Builds a bootable image as `dir/boot.img` (`dir` is created if missing; scratch files go to a temporary directory inside
/// `dir` and are removed). Needs root, `mkfs.ext4`, `losetup`, `mount`, `extlinux`, `modprobe`,
/// `sha256sum`, static busybox, syslinux's `mbr.bin` and a kernel in `/boot`.
pub fn build_boot_image_with(dir: &Path, opts: &ImageOptions) -> Result<BootImage> {
    require_root()?;
    if opts.size_mib < 32 {
        return Err(Error(format!(
            "image size {} MiB is too small (>= 32)",
            opts.size_mib
        )));
    }
    if let Some(t) = &opts.guest_write {
        if t.is_empty()
            || t.chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\\')
        {
            return Err(Error(format!(
                "guest_write {t:?} must be one word without quotes"
            )));
        }
    }
    let size = opts.size_mib << 20;
    let part_size = size - PARTITION_OFFSET;
    let kernel = Kernel::find()?;
    let mbr = find_mbr_bin()?;

    mkdir(dir)?;
    let scratch = tempfile::Builder::new()
        .prefix("sa-vm-build-")
        .tempdir_in(dir)
        .map_err(|e| {
            Error::io(
                format!("creating a scratch directory in {}", dir.display()),
                e,
            )
        })?;
    let root = scratch.path().join("root");
    for d in ["boot/extlinux", "data"] {
        mkdir(&root.join(d))?;
    }

    // Files of the filesystem.
    std::fs::copy(&kernel.image, root.join("boot/vmlinuz"))
        .map_err(|e| Error::io(format!("copying {}", kernel.image.display()), e))?;
    write_initramfs(&kernel, &root.join("boot/initrd.img"), opts.program)?;
    let append = match &opts.guest_write {
        Some(t) => format!("console=ttyS0 panic=-1 sa_write={t}"),
        None => "console=ttyS0 panic=-1".to_string(),
    };
    write_file(
        &root.join("boot/extlinux/extlinux.conf"),
        format!(
            "DEFAULT sa\nPROMPT 0\nTIMEOUT 0\nLABEL sa\n  LINUX /boot/vmlinuz\n  \
             INITRD /boot/initrd.img\n  APPEND {append}\n"
        )
        .as_bytes(),
    )?;
    let known = known_data(opts.known_len, opts.known_seed);
    let known_path = root.join("data/known.bin");
    write_file(&known_path, &known)?;
    let known_sha256 = sha256_file(&known_path)?;
    drop(known);

    // The filesystem, in its own file.
    let part = scratch.path().join("partition.ext4");
    File::create(&part)
        .and_then(|f| f.set_len(part_size))
        .map_err(|e| Error::io(format!("creating {}", part.display()), e))?;
    run(Command::new("mkfs.ext4")
        .args([
            "-F",
            "-q",
            "-b",
            "4096",
            "-O",
            "^64bit,^metadata_csum",
            "-L",
            "sa-vm",
            "-d",
        ])
        .arg(&root)
        .arg(&part))?;

    // extlinux needs the filesystem mounted.
    {
        let mnt = scratch.path().join("mnt");
        mkdir(&mnt)?;
        let lo = LoopDevice::attach(&part)?;
        let mounted = Mount::new(&lo.dev, &mnt)?;
        run(Command::new("extlinux")
            .arg("--install")
            .arg(mnt.join("boot/extlinux")))?;
        mounted.unmount()?;
        lo.detach()?;
    }

    // The disk: MBR + partition.
    let path = dir.join("boot.img");
    let mut img =
        File::create(&path).map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    img.set_len(size)
        .map_err(|e| Error::io(format!("sizing {}", path.display()), e))?;
    let sector0 = mbr_sector(&mbr, PARTITION_OFFSET / 512, part_size / 512)?;
    img.write_all(&sector0)
        .map_err(|e| Error::io(format!("writing the MBR of {}", path.display()), e))?;
    copy_sparse(&part, &mut img, PARTITION_OFFSET)?;
    img.sync_all()
        .map_err(|e| Error::io(format!("syncing {}", path.display()), e))?;

    Ok(BootImage {
        path,
        size,
        partition_offset: PARTITION_OFFSET,
        known_sha256,
        known_len: opts.known_len,
        kernel,
    })
}

/// The content of `/data/known.bin`: `len` bytes from xorshift64* seeded with `seed`.
pub fn known_data(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len as usize + 8);
    while (out.len() as u64) < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len as usize);
    out
}

/// Lower-case hex sha256 of a file, by `sha256sum`.
pub fn sha256_file(path: &Path) -> Result<String> {
    let out = run(Command::new("sha256sum").arg("-b").arg(path))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let hex = text.split_whitespace().next().unwrap_or("");
    if hex.len() != 64 {
        return Err(Error(format!("unexpected sha256sum output: {text:?}")));
    }
    Ok(hex.to_string())
}

fn find_mbr_bin() -> Result<Vec<u8>> {
    for p in [
        "/usr/lib/syslinux/mbr/mbr.bin",
        "/usr/lib/EXTLINUX/mbr.bin",
        "/usr/share/syslinux/mbr.bin",
    ] {
        if let Ok(b) = std::fs::read(p) {
            if b.len() <= 440 {
                return Ok(b);
            }
        }
    }
    Err(Error::new(
        "no syslinux mbr.bin (looked in /usr/lib/syslinux/mbr, /usr/lib/EXTLINUX): \
         `apt-get install -y syslinux-common extlinux`",
    ))
}

/// Sector 0: boot code, a disk signature, one bootable type-0x83 partition, 0x55AA.
fn mbr_sector(code: &[u8], start_lba: u64, sectors: u64) -> Result<[u8; 512]> {
    let (start, count) = match (u32::try_from(start_lba), u32::try_from(sectors)) {
        (Ok(s), Ok(c)) => (s, c),
        _ => return Err(Error::new("image too large for an MBR partition table")),
    };
    let mut s = [0u8; 512];
    s[..code.len()].copy_from_slice(code);
    s[440..444].copy_from_slice(&0x5a1a_0001u32.to_le_bytes()); // disk signature
    let e = &mut s[446..462];
    e[0] = 0x80; // bootable
    e[1..4].copy_from_slice(&chs(start));
    e[4] = 0x83; // Linux
    e[5..8].copy_from_slice(&chs(start + count - 1));
    e[8..12].copy_from_slice(&start.to_le_bytes());
    e[12..16].copy_from_slice(&count.to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xaa;
    Ok(s)
}

/// CHS address bytes for an LBA (255 heads, 63 sectors per track; saturates past 1023 cylinders).
fn chs(lba: u32) -> [u8; 3] {
    let c = lba / (255 * 63);
    if c > 1023 {
        return [0xfe, 0xff, 0xff];
    }
    let h = (lba / 63) % 255;
    let s = lba % 63 + 1;
    [h as u8, (s as u8) | (((c >> 8) as u8) << 6), c as u8]
}

/// Copies `src` into `dst` at `offset`, seeking over all-zero blocks (the destination is
/// pre-sized and reads as zero there).
fn copy_sparse(src: &Path, dst: &mut File, offset: u64) -> Result<()> {
    let mut f = File::open(src).map_err(|e| Error::io(format!("opening {}", src.display()), e))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut pos = offset;
    loop {
        let n = read_full(&mut f, &mut buf)
            .map_err(|e| Error::io(format!("reading {}", src.display()), e))?;
        if n == 0 {
            return Ok(());
        }
        if buf[..n].iter().any(|&b| b != 0) {
            dst.seek(SeekFrom::Start(pos))
                .and_then(|_| dst.write_all(&buf[..n]))
                .map_err(|e| Error::io(format!("writing the partition at byte {pos}"), e))?;
        }
        pos += n as u64;
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

fn mkdir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| Error::io(format!("creating {}", p.display()), e))
}

fn write_file(p: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(p, data).map_err(|e| Error::io(format!("writing {}", p.display()), e))
}

/// A loop device over a file; detached on drop.
struct LoopDevice {
    dev: String,
    attached: bool,
}

impl LoopDevice {
    fn attach(file: &Path) -> Result<LoopDevice> {
        let out = run(Command::new("losetup").args(["-f", "--show"]).arg(file))?;
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !dev.starts_with("/dev/") {
            return Err(Error(format!("losetup printed {dev:?}, not a device")));
        }
        Ok(LoopDevice {
            dev,
            attached: true,
        })
    }

    fn detach(mut self) -> Result<()> {
        self.attached = false;
        run(Command::new("losetup").arg("-d").arg(&self.dev)).map(|_| ())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        if self.attached {
            if let Err(e) = run(Command::new("losetup").arg("-d").arg(&self.dev)) {
                eprintln!("sa-vm-tests: cleanup: {e}");
            }
        }
    }
}

/// A mounted filesystem; unmounted on drop.
struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    fn new(dev: &str, dir: &Path) -> Result<Mount> {
        run(Command::new("mount").args(["-t", "ext4", dev]).arg(dir))?;
        Ok(Mount {
            dir: dir.to_path_buf(),
            mounted: true,
        })
    }

    fn unmount(mut self) -> Result<()> {
        self.mounted = false;
        run(Command::new("umount").arg(&self.dir)).map(|_| ())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            let mut cmd = Command::new("umount");
            cmd.arg(&self.dir);
            if let Err(e) = run(&mut cmd) {
                // A lazy unmount at least frees the loop device once nothing uses it.
                eprintln!("sa-vm-tests: cleanup: {e}; trying `{} -l`", describe(&cmd));
                let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
            }
        }
    }
}

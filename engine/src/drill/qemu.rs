//! The drill's virtual machine: `qemu-system-x86_64` booting the served snapshot, its serial
//! console as lines, and screenshots through QMP (JSON lines over a Unix socket).
//!
//! The machine has no route out: without a port to check it has no network card at all
//! (`-nic none`, also replacing qemu's default user network); with one it has QEMU's user
//! network in `restrict=on` mode (the guest reaches neither the host nor the LAN) and only the
//! checked port forwarded from 127.0.0.1. The command line names the drill's work directory (its
//! QMP socket), which is how the next drill recognizes a qemu a killed drill left running
//! ([`super::workdir`]).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::error::{Error, Result};

/// Firmware files tried for `uefi`, first found wins (Debian's `ovmf` package).
const OVMF: [&str; 3] = [
    "/usr/share/ovmf/OVMF.fd",
    "/usr/share/OVMF/OVMF.fd",
    "/usr/share/qemu/OVMF.fd",
];
/// Bytes of qemu's stderr kept for messages.
const STDERR_KEEP: usize = 4096;

/// Which accelerator runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM when `/dev/kvm` opens read-write, else TCG.
    Auto,
    /// KVM.
    Kvm,
    /// TCG (emulation).
    Tcg,
}

/// The machine's firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS (qemu's default).
    Bios,
    /// OVMF.
    Uefi,
}

/// How the disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// virtio-blk.
    Virtio,
    /// IDE.
    Ide,
    /// SATA (AHCI).
    Sata,
    /// SCSI (virtio-scsi).
    Scsi,
}

impl std::str::FromStr for Accel {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(Error::invalid(format!(
                "unknown accelerator {s:?}: give auto, kvm or tcg"
            ))),
        }
    }
}

impl std::str::FromStr for Firmware {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "bios" => Ok(Firmware::Bios),
            "uefi" => Ok(Firmware::Uefi),
            _ => Err(Error::invalid(format!(
                "unknown firmware {s:?}: give bios or uefi"
            ))),
        }
    }
}

impl std::str::FromStr for DiskBus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "virtio" => Ok(DiskBus::Virtio),
            "ide" => Ok(DiskBus::Ide),
            "sata" => Ok(DiskBus::Sata),
            "scsi" => Ok(DiskBus::Scsi),
            _ => Err(Error::invalid(format!(
                "unknown disk bus {s:?}: give virtio, ide, sata or scsi"
            ))),
        }
    }
}

/// The virtual machine's shape.
#[derive(Debug, Clone)]
pub struct Machine {
    /// The qemu binary.
    pub qemu: PathBuf,
    /// Accelerator.
    pub accel: Accel,
    /// Memory, MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Firmware.
    pub firmware: Firmware,
    /// Disk bus.
    pub disk_bus: DiskBus,
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Auto,
            memory_mib: 1024,
            cpus: 1,
            firmware: Firmware::Bios,
            disk_bus: DiskBus::Virtio,
        }
    }
}

/// Whether KVM can be used here.
pub fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A running drill VM. Dropping it kills qemu.
pub struct Vm {
    child: Child,
    /// Console lines as the guest prints them.
    pub console: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    qmp: PathBuf,
    /// `kvm` or `tcg`.
    pub accel: &'static str,
    /// When qemu was started.
    pub started: Instant,
}

/// The qemu arguments for `m` booting `drive` (an NBD URL), with `fwd` = (host port, guest
/// port) forwarded, and QMP at `qmp`.
pub fn args(
    m: &Machine,
    accel: &str,
    drive: &str,
    fwd: Option<(u16, u16)>,
    qmp: &Path,
) -> Result<Vec<String>> {
    let mut a: Vec<String> = vec![
        "-accel".into(),
        accel.into(),
        "-m".into(),
        m.memory_mib.to_string(),
        "-smp".into(),
        m.cpus.to_string(),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
        "-serial".into(),
        "stdio".into(),
        "-monitor".into(),
        "none".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", qmp.display()),
    ];
    match fwd {
        None => a.extend(["-nic".into(), "none".into()]),
        Some((host, guest)) => a.extend([
            "-nic".into(),
            format!("user,restrict=on,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{host}-:{guest}"),
        ]),
    }
    if m.firmware == Firmware::Uefi {
        let fw = OVMF.iter().find(|p| Path::new(p).exists()).ok_or_else(|| {
            Error::invalid(format!(
                "firmware uefi needs OVMF, found none of {}: install it (`apt-get install ovmf`) \
                 or use firmware bios",
                OVMF.join(", ")
            ))
        })?;
        a.extend(["-bios".into(), fw.to_string()]);
    }
    let file = format!("file={},format=raw", drive.replace(',', ",,"));
    match m.disk_bus {
        DiskBus::Virtio => a.extend(["-drive".into(), format!("{file},if=virtio")]),
        DiskBus::Ide => a.extend(["-drive".into(), format!("{file},if=ide")]),
        DiskBus::Sata => a.extend([
            "-drive".into(),
            format!("{file},if=none,id=disk0"),
            "-device".into(),
            "ahci,id=ahci".into(),
            "-device".into(),
            "ide-hd,drive=disk0,bus=ahci.0".into(),
        ]),
        DiskBus::Scsi => a.extend([
            "-drive".into(),
            format!("{file},if=none,id=disk0"),
            "-device".into(),
            "virtio-scsi-pci,id=scsi".into(),
            "-device".into(),
            "scsi-hd,drive=disk0".into(),
        ]),
    }
    Ok(a)
}

impl Vm {
    /// Starts qemu (see the module docs); `qmp` is the QMP socket's path.
    pub fn start(m: &Machine, drive: &str, fwd: Option<(u16, u16)>, qmp: &Path) -> Result<Vm> {
        let accel = match m.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto if kvm_usable() => "kvm",
            Accel::Auto => "tcg",
        };
        let _ = std::fs::remove_file(qmp);
        let mut cmd = Command::new(&m.qemu);
        cmd.args(args(m, accel, drive, fwd, qmp)?)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().map_err(|e| {
            Error::invalid(format!(
                "cannot start {}: {e} (install qemu-system-x86, or give the binary with --qemu)",
                m.qemu.display()
            ))
        })?;
        let (tx, console) = mpsc::channel(256);
        if let Some(out) = child.stdout.take() {
            tokio::spawn(read_console(out, tx));
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let keep = stderr.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = err.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut k = keep.lock().unwrap_or_else(|e| e.into_inner());
                    k.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if k.len() > STDERR_KEEP {
                        let cut = k.len() - STDERR_KEEP;
                        let cut = (cut..k.len()).find(|&i| k.is_char_boundary(i)).unwrap_or(0);
                        k.drain(..cut);
                    }
                }
            });
        }
        Ok(Vm {
            child,
            console,
            stderr,
            qmp: qmp.to_path_buf(),
            accel,
            started: Instant::now(),
        })
    }

    /// qemu's pid (None once reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// What qemu printed on stderr (the last few KiB), trimmed.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trim()
            .to_string()
    }

    /// `Some(status)` once qemu has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Saves the screen to `path` through QMP `screendump` (`format`: `png` or `ppm`).
    pub async fn screendump(&self, path: &Path, format: &str) -> Result<()> {
        let args = json!({ "filename": path.display().to_string(), "format": format });
        tokio::time::timeout(Duration::from_secs(20), qmp(&self.qmp, "screendump", args))
            .await
            .map_err(|_| Error::failed("qemu did not answer the QMP screendump within 20 s"))?
            .map(|_| ())
    }

    /// Kills qemu and reaps it.
    pub async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
    }
}

async fn read_console(out: tokio::process::ChildStdout, tx: mpsc::Sender<String>) {
    let mut r = BufReader::new(out);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches(['\n', '\r']).replace('\r', "");
                if tx.send(line).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Runs one QMP command on a fresh connection to `path`; returns its `return` value.
pub async fn qmp(path: &Path, command: &str, arguments: Value) -> Result<Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let stream = loop {
        match UnixStream::connect(path).await {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::io(
                    format!("cannot reach qemu's QMP socket {}", path.display()),
                    e,
                ))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let mut next = async || -> Result<Value> {
        let line = lines
            .next_line()
            .await
            .map_err(|e| Error::io("cannot read from QMP", e))?
            .ok_or_else(|| Error::failed("qemu closed the QMP connection"))?;
        serde_json::from_str(&line)
            .map_err(|e| Error::failed(format!("bad QMP line {line:?}: {e}")))
    };
    let greeting = next().await?;
    if greeting.get("QMP").is_none() {
        return Err(Error::failed(format!("not a QMP greeting: {greeting}")));
    }
    for (cmd, args) in [("qmp_capabilities", json!({})), (command, arguments)] {
        let msg = json!({ "execute": cmd, "arguments": args });
        w.write_all(format!("{msg}\n").as_bytes())
            .await
            .map_err(|e| Error::io(format!("cannot send QMP {cmd}"), e))?;
        loop {
            let v = next().await?;
            if let Some(r) = v.get("return") {
                if cmd == command {
                    return Ok(r.clone());
                }
                break;
            }
            if let Some(e) = v.get("error") {
                return Err(Error::failed(format!(
                    "QMP {cmd}: {}",
                    e.get("desc").and_then(Value::as_str).unwrap_or("error")
                )));
            }
        }
    }
    Err(Error::failed("QMP: no answer"))
}

/// Whether a binary PPM (P6) screen shows more than one colour: a screen with anything on it.
/// `None` when `ppm` is not a P6 image.
pub fn ppm_has_content(ppm: &[u8]) -> Option<bool> {
    let mut fields = Vec::new();
    let mut i = 0;
    while fields.len() < 4 {
        while i < ppm.len() && ppm[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < ppm.len() && !ppm[i].is_ascii_whitespace() {
            i += 1;
        }
        if start == i {
            return None;
        }
        fields.push(std::str::from_utf8(&ppm[start..i]).ok()?);
    }
    if fields[0] != "P6" || fields[3] != "255" {
        return None;
    }
    let (w, h): (usize, usize) = (fields[1].parse().ok()?, fields[2].parse().ok()?);
    let pixels = ppm.get(i + 1..)?;
    if pixels.len() < w * h * 3 || w * h == 0 {
        return None;
    }
    let first = &pixels[..3];
    Some(pixels[..w * h * 3].chunks_exact(3).any(|p| p != first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ppm_with_two_colours_has_content_and_a_blank_one_has_not() {
        let mut blank = b"P6\n2 1\n255\n".to_vec();
        blank.extend([0, 0, 0, 0, 0, 0]);
        assert_eq!(ppm_has_content(&blank), Some(false));
        let mut text = b"P6 2 1 255\n".to_vec();
        text.extend([0, 0, 0, 170, 170, 170]);
        assert_eq!(ppm_has_content(&text), Some(true));
        assert_eq!(ppm_has_content(b"P5\n2 1\n255\n\0\0"), None);
        assert_eq!(ppm_has_content(b"P6\n2 1\n255\n\0"), None);
    }

    #[test]
    fn without_a_port_the_machine_has_no_network_and_with_one_a_restricted_one() {
        let m = Machine::default();
        let a = args(&m, "tcg", "nbd://127.0.0.1:1", None, Path::new("/d/q")).unwrap();
        let nic = a.iter().position(|x| x == "-nic").unwrap();
        assert_eq!(a[nic + 1], "none");
        let a = args(
            &m,
            "tcg",
            "nbd://127.0.0.1:1",
            Some((5000, 22)),
            Path::new("/d/q"),
        )
        .unwrap();
        let nic = a.iter().position(|x| x == "-nic").unwrap();
        assert!(a[nic + 1].contains("restrict=on"), "{}", a[nic + 1]);
        assert!(a[nic + 1].contains("hostfwd=tcp:127.0.0.1:5000-:22"));
        assert_eq!(a.iter().filter(|x| *x == "-nic").count(), 1);
    }
}

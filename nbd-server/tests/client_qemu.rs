//! The NBD client against real `qemu-nbd` exports (raw, qcow2, a persistent
//! dirty bitmap), checked against the image files, `qemu-img` and `nbdinfo`.
//! Each qemu-nbd is started by the test and killed by a guard, and readiness
//! is awaited with a deadline.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{require, run_ok, ChildGuard, Rng, DEADLINE};
use nbd_server::client::{merge_extents, Client, ClientConfig, ClientError, NbdUri, StatusExtent};
use tempfile::TempDir;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BITMAP_GRANULARITY: u64 = 64 * KIB;

/// A running qemu-nbd, killed on drop.
struct QemuNbd {
    _child: ChildGuard,
    uri: NbdUri,
}

impl QemuNbd {
    /// Serves `image` read-only on a Unix socket in `dir`; `extra` adds flags.
    fn unix(dir: &Path, image: &Path, format: &str, extra: &[&str]) -> QemuNbd {
        let sock = dir.join(format!("nbd-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let mut args = vec!["--socket".to_owned(), sock.display().to_string()];
        args.extend(common_args(format, extra));
        args.push(image.display().to_string());
        let child = spawn(&args, dir);
        let ready = || std::os::unix::net::UnixStream::connect(&sock).is_ok();
        let child = wait_ready(child, ready, dir);
        QemuNbd {
            _child: child,
            uri: NbdUri::unix(sock, ""),
        }
    }

    /// Serves `image` read-only on 127.0.0.1 at a free port.
    fn tcp(dir: &Path, image: &Path, format: &str) -> QemuNbd {
        // qemu-nbd cannot report a port it picked: take a free one and retry
        // if another process grabs it first (qemu-nbd then exits at once).
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut args: Vec<String> = ["--bind", "127.0.0.1", "--port", &port.to_string()]
                .map(str::to_owned)
                .to_vec();
            args.extend(common_args(format, &[]));
            args.push(image.display().to_string());
            let mut child = spawn(&args, dir);
            let deadline = Instant::now() + DEADLINE;
            while Instant::now() < deadline {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return QemuNbd {
                        _child: child,
                        uri: NbdUri::tcp("127.0.0.1", port, ""),
                    };
                }
                if child
                    .0
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten())
                    .is_some()
                {
                    break; // lost the port race: try another
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!(
            "qemu-nbd did not start on TCP; see {}",
            dir.join("qemu-nbd.log").display()
        );
    }

    fn uri_string(&self) -> String {
        self.uri.to_string()
    }
}

fn common_args(format: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--read-only",
        "--persistent",
        "--shared=8",
        "--format",
        format,
    ]
    .map(str::to_owned)
    .to_vec();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn spawn(args: &[String], dir: &Path) -> ChildGuard {
    let log = std::fs::File::create(dir.join("qemu-nbd.log")).expect("log file");
    let child = Command::new(require("qemu-nbd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start qemu-nbd");
    ChildGuard(Some(child))
}

/// Polls `ready` until it holds, failing if qemu-nbd exits or the deadline passes.
fn wait_ready(mut child: ChildGuard, ready: impl Fn() -> bool, dir: &Path) -> ChildGuard {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if ready() {
            return child;
        }
        let log = || std::fs::read_to_string(dir.join("qemu-nbd.log")).unwrap_or_default();
        if let Some(st) = child.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("qemu-nbd exited with {st}: {}", log());
        }
        assert!(
            Instant::now() < deadline,
            "qemu-nbd not ready within {DEADLINE:?}: {}",
            log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A sparse raw file of `size` (at least 10 MiB): random data at a few
/// places, holes elsewhere.
fn sparse_raw(dir: &Path, size: u64) -> (PathBuf, Vec<u8>) {
    assert!(size >= 10 * MIB);
    use std::os::unix::fs::FileExt;
    let path = dir.join("disk.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    let mut image = vec![0u8; size as usize];
    let mut rng = Rng(11);
    for (off, len) in [
        (0, 64 * KIB),
        (MIB, 3 * MIB),
        (9 * MIB + 4 * KIB, 100 * KIB),
        (size - 4 * KIB, 4 * KIB),
    ] {
        let (o, l) = (off as usize, len as usize);
        rng.fill(&mut image[o..o + l]);
        f.write_all_at(&image[o..o + l], off).unwrap();
    }
    (path, image)
}

async fn connect(uri: &NbdUri, contexts: &[&str]) -> Client {
    let cfg = ClientConfig {
        meta_contexts: contexts.iter().map(|s| s.to_string()).collect(),
        ..ClientConfig::default()
    };
    Client::connect(uri, &cfg)
        .await
        .expect("connect to qemu-nbd")
}

/// `nbdinfo --map[=CONTEXT] URI` as extents, neighbours with equal flags merged.
fn nbdinfo_map(uri: &str, context: &str) -> Vec<StatusExtent> {
    let o = run_ok("nbdinfo", &[&format!("--map={context}"), uri]);
    let mut v: Vec<StatusExtent> = o
        .stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            StatusExtent {
                offset: f[0].parse().unwrap(),
                len: f[1].parse().unwrap(),
                flags: f[2].parse().unwrap(),
            }
        })
        .collect();
    merge_extents(&mut v);
    assert!(!v.is_empty(), "nbdinfo printed no map: {o:?}");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_file_over_tcp_reads_byte_exact() {
    let dir = TempDir::new().unwrap();
    let size = 40 * MIB;
    let (path, image) = sparse_raw(dir.path(), size);
    let q = QemuNbd::tcp(dir.path(), &path, "raw");
    let cfg = ClientConfig {
        max_read_request: u32::MAX,
        ..ClientConfig::default()
    };
    let c = Client::connect(&q.uri, &cfg).await.unwrap();
    assert_eq!(c.size(), size);
    assert!(c.info().read_only());
    assert!(c.info().structured_replies);
    // 40 MiB in one call: split at qemu-nbd's advertised 32 MiB maximum payload.
    assert!(c.info().block_size_advertised);
    assert_eq!(c.max_read(), 32 * MIB as u32);
    let mut all = vec![0u8; size as usize];
    c.read(0, &mut all).await.unwrap();
    assert!(all == image, "whole raw export differs from the file");
    let mut rng = Rng(12);
    for _ in 0..30 {
        let off = rng.below(size);
        let len = rng.below((size - off).min(5 * MIB)) + 1;
        let mut buf = vec![0u8; len as usize];
        c.read(off, &mut buf).await.unwrap();
        assert!(
            buf[..] == image[off as usize..(off + len) as usize],
            "{off}+{len}"
        );
    }
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qcow2_over_a_unix_socket_reads_byte_exact() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("disk.qcow2");
    let img_s = img.display().to_string();
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &img_s, "48M"]);
    let writes = [
        "write -P 0x11 0 64k",
        "write -P 0x22 1M 3M",
        "write -P 0x33 10000000 12345",
        "write -P 0x44 33554000 1000",
        "write -z 2M 64k",
        "write -P 0x55 47M 1M",
    ];
    let mut args = vec!["-f", "qcow2"];
    for w in &writes {
        args.extend(["-c", w]);
    }
    args.push(&img_s);
    run_ok("qemu-io", &args);
    // The reference: qemu-img's own conversion of the image to raw.
    let raw = dir.path().join("expected.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            &img_s,
            &raw.display().to_string(),
        ],
    );
    let expected = std::fs::read(&raw).unwrap();

    let q = QemuNbd::unix(dir.path(), &img, "qcow2", &[]);
    // Through the URI text, as a user would give it.
    let uri = NbdUri::parse(&q.uri_string()).unwrap();
    assert!(q.uri_string().starts_with("nbd+unix:///?socket="));
    let c = connect(&uri, &["base:allocation"]).await;
    assert_eq!(c.size(), 48 * MIB);
    let mut all = vec![0xffu8; expected.len()];
    c.read(0, &mut all).await.unwrap();
    assert!(
        all == expected,
        "qcow2 export differs from qemu-img convert"
    );
    // An unallocated range reads as zeroes even into a buffer full of junk:
    // qemu-nbd sends it as NBD_REPLY_TYPE_OFFSET_HOLE chunks, which the
    // client must turn into zeroes itself.
    let buf = c
        .start_read(20 * MIB, vec![0xff; MIB as usize])
        .await
        .unwrap();
    let buf = buf.finish().await.unwrap();
    assert!(buf.iter().all(|&b| b == 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn base_allocation_agrees_with_nbdinfo() {
    let dir = TempDir::new().unwrap();
    let (path, _) = sparse_raw(dir.path(), 16 * MIB);
    let q = QemuNbd::unix(dir.path(), &path, "raw", &[]);
    let c = connect(&q.uri, &["base:allocation"]).await;
    let ours = c
        .collect_extents("base:allocation", 0, c.size())
        .await
        .unwrap();
    let theirs = nbdinfo_map(&q.uri_string(), "base:allocation");
    assert_eq!(ours, theirs);
    // The map is not trivial: holes and data both appear, and they cover the export.
    assert!(ours.iter().any(|e| e.is_hole()) && ours.iter().any(|e| !e.is_hole()));
    assert_eq!(ours.iter().map(|e| e.len).sum::<u64>(), c.size());
    // Data extents hold every written byte.
    let data: Vec<_> = ours.iter().filter(|e| !e.is_hole()).collect();
    for (off, len) in [
        (0, 64 * KIB),
        (MIB, 3 * MIB),
        (9 * MIB + 4 * KIB, 100 * KIB),
    ] {
        assert!(
            data.iter().any(|e| e.offset <= off && off + len <= e.end()),
            "{off}+{len} not inside a data extent: {ours:?}"
        );
    }
}

/// Rounds written ranges out to the bitmap granularity and merges them.
fn dirty_clusters(writes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let g = BITMAP_GRANULARITY;
    let mut spans: Vec<(u64, u64)> = writes
        .iter()
        .map(|&(o, l)| (o / g * g, (o + l).div_ceil(g) * g))
        .collect();
    spans.sort();
    for (s, e) in spans {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dirty_bitmap_marks_exactly_the_written_clusters() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("vm.qcow2");
    let img_s = img.display().to_string();
    let size = 64 * MIB;
    run_ok("qemu-img", &["create", "-q", "-f", "qcow2", &img_s, "64M"]);
    // Data written before the bitmap exists is allocated but clean.
    run_ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x11 0 8M", &img_s],
    );
    run_ok("qemu-img", &["bitmap", "--add", "--enable", &img_s, "b0"]);
    let writes = [
        (MIB, 64 * KIB),
        (10 * MIB + 100, 100 * KIB),
        (5 * MIB - 1, 2),
        (30 * MIB, 3 * MIB + 7),
        (size - 512, 512),
    ];
    let cmds: Vec<String> = writes
        .iter()
        .map(|(o, l)| format!("write -P 0x55 {o} {l}"))
        .collect();
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(&img_s);
    run_ok("qemu-io", &args);

    let q = QemuNbd::unix(dir.path(), &img, "qcow2", &["--bitmap", "b0"]);
    let ctx = "qemu:dirty-bitmap:b0";
    let c = connect(
        &q.uri,
        &["base:allocation", ctx, "qemu:dirty-bitmap:nosuch"],
    )
    .await;
    let mut granted: Vec<_> = c.contexts().iter().map(|c| c.name.as_str()).collect();
    granted.sort();
    assert_eq!(
        granted,
        ["base:allocation", ctx],
        "a bitmap that does not exist is not granted"
    );
    let e = c
        .block_status("qemu:dirty-bitmap:nosuch", 0, 4096)
        .await
        .unwrap_err();
    assert!(matches!(e, ClientError::ContextNotGranted { .. }), "{e}");

    let map = c.collect_extents(ctx, 0, size).await.unwrap();
    assert_eq!(
        map.iter().map(|e| e.len).sum::<u64>(),
        size,
        "the map covers the export"
    );
    let dirty: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.is_dirty())
        .map(|e| (e.offset, e.end()))
        .collect();
    assert_eq!(dirty, dirty_clusters(&writes));
    // The same map through nbdinfo.
    assert_eq!(map, nbdinfo_map(&q.uri_string(), ctx));

    // Reading the dirty extents gives the new bytes where written.
    let mut image = vec![0u8; size as usize];
    image[..8 * MIB as usize].fill(0x11);
    for (o, l) in writes {
        image[o as usize..(o + l) as usize].fill(0x55);
    }
    for (s, e) in dirty {
        let mut buf = vec![0u8; (e - s) as usize];
        c.read(s, &mut buf).await.unwrap();
        assert!(
            buf[..] == image[s as usize..e as usize],
            "dirty extent {s}..{e}"
        );
    }
    c.disconnect().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_connections_to_qemu_nbd_read_in_parallel() {
    let dir = TempDir::new().unwrap();
    let (path, image) = sparse_raw(dir.path(), 12 * MIB);
    let q = QemuNbd::unix(dir.path(), &path, "raw", &[]);
    let clients = Client::connect_many(&q.uri, &ClientConfig::default(), 3)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 4 * MIB as usize];
            c.read(i as u64 * 4 * MIB, &mut buf).await.unwrap();
            buf
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let buf = t.await.unwrap();
        let at = i * 4 * MIB as usize;
        assert!(buf[..] == image[at..at + buf.len()], "connection {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_nbd_names_an_unknown_export() {
    let dir = TempDir::new().unwrap();
    let (path, _) = sparse_raw(dir.path(), 16 * MIB);
    let q = QemuNbd::unix(dir.path(), &path, "raw", &["--export-name", "vda"]);
    let mut uri = q.uri.clone();
    uri.export = "nosuch".into();
    let e = Client::connect(&uri, &ClientConfig::default())
        .await
        .unwrap_err();
    assert!(
        matches!(e, ClientError::ExportNotFound { ref export, .. } if export == "nosuch"),
        "{e}"
    );
    uri.export = "vda".into();
    let c = Client::connect(&uri, &ClientConfig::default())
        .await
        .unwrap();
    assert_eq!(c.size(), 16 * MIB);
}

//! `sa-image serve`: a snapshot as a live NBD export, read by NBD clients we did not write
//! (nbdinfo, nbdcopy, qemu-img, nbdfuse + a loop device + the kernel's ext4, nbdsh), with agents
//! lost before and during the reads, a corrupt shard, and a writable overlay.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sa_tests::cluster::{shown, str_of, u64_of};
use sa_tests::loopdev::{is_root, LoopDevice};
use sa_tests::nbd_client::{client, client_ok, model_run, CLIENT_TIMEOUT};
use sa_tests::proc::Proc;
use sa_tests::{scan, sha256, wait, Cluster, ImageSpec, Serve, MIB, STRIPE};

/// Addresses of the cluster's agents, comma-separated, killed ones included.
fn all(c: &Cluster) -> String {
    c.agents_arg()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// 2 of 6 agents killed before serving: nbdinfo sees the size and the read-only flag, `--map`
/// shows the zero stripes as holes, and nbdcopy and qemu-img copy the disk byte for byte.
#[test]
fn two_agents_down_clients_read_the_exact_disk() {
    let mut c = Cluster::start(6);
    let img = ImageSpec::random(40 * MIB + 8192, 0x5e7e_0001)
        .zero_mib(8..16) // stripes 2 and 3
        .zero_mib(24..28) // stripe 6
        .zero_mib(33..34) // part of stripe 8 only
        .write(&c.path("disk.img"));
    assert_eq!(img.zero_stripes(STRIPE), 3);
    let snap = c.snapshot(&img.path, &[]);
    let id = str_of(&snap, "snapshot").to_string();
    c.agents[1].kill();
    c.agents[4].kill();
    let s = Serve::start(&c, "latest", &all(&c), &[]);
    assert_eq!(s.id, id);

    let size = client_ok(&c, "nbdinfo", &["--size", &s.url]);
    assert_eq!(size.trim(), img.size.to_string());
    let ro = client(&c, "nbdinfo", &["--is", "read-only", &s.url]);
    assert_eq!(
        ro.status.code(),
        Some(0),
        "export is not read-only:\n{}",
        shown(&ro)
    );
    // The export also answers to the snapshot id.
    let named = client_ok(&c, "nbdinfo", &["--size", &format!("{}/{id}", s.url)]);
    assert_eq!(named.trim(), img.size.to_string());

    let map = client_ok(&c, "nbdinfo", &["--map", &s.url]);
    let mut holes = Vec::new();
    let mut covered = 0u64;
    for line in map.lines().filter(|l| !l.trim().is_empty()) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (off, len): (u64, u64) = (f[0].parse().unwrap(), f[1].parse().unwrap());
        assert_eq!(off, covered, "map is not contiguous:\n{map}");
        covered += len;
        match f[3] {
            "data" => {}
            "hole,zero" => holes.push((off, len)),
            other => panic!("unexpected extent type {other:?} in\n{map}"),
        }
    }
    assert_eq!(covered, img.size, "{map}");
    assert_eq!(
        holes,
        vec![(8 * MIB, 8 * MIB), (24 * MIB, 4 * MIB)],
        "{map}"
    );

    let out1 = c.path("nbdcopy.raw");
    client_ok(&c, "nbdcopy", &[&s.url, path_str(&out1)]);
    assert_eq!(sha256(&out1), img.sha256(), "nbdcopy copy differs");
    let out2 = c.path("qemu-img.raw");
    client_ok(
        &c,
        "qemu-img",
        &["convert", "-f", "raw", "-O", "raw", &s.url, path_str(&out2)],
    );
    assert_eq!(sha256(&out2), img.sha256(), "qemu-img copy differs");

    let log = s.log();
    let report = s.stop();
    assert!(u64_of(&report, "stripes_reconstructed") > 0, "{report}");
    assert_eq!(u64_of(&report, "stripes_lost"), 0, "{report}");
    assert!(
        u64_of(&report, "bytes_read") >= 2 * (img.size - 12 * MIB),
        "{report}"
    );
    assert_eq!(
        report["agents_down"].as_array().map(Vec::len),
        Some(2),
        "{report}"
    );
    for a in [&c.agents[1], &c.agents[4]] {
        assert!(
            log.contains(&a.addr_str()),
            "serve's log does not name down agent {}:\n{log}",
            a.addr_str()
        );
    }
}

/// An agent killed while nbdcopy reads: the copy still completes, byte for byte.
#[test]
fn agent_killed_during_copy() {
    let mut c = Cluster::start(6);
    let img = ImageSpec::random(96 * MIB, 0x5e7e_0002).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    let s = Serve::start(&c, "latest", &all(&c), &["--cache", "16MiB"]);
    // nbdcopy writes to a pipe that this test drains: once 10 MiB have come through, the agent
    // is killed while nbdcopy is held up by the pipe, so the kill lands mid-copy for sure.
    let out = c.path("copy.raw");
    let mut cmd = Command::new("nbdcopy");
    cmd.args([s.url.as_str(), "-"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut copy = Proc::spawn(cmd, "nbdcopy");
    let mut pipe = copy.child().stdout.take().expect("stdout is piped");
    let mut file = std::fs::File::create(&out).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    let mut killed = false;
    loop {
        let n = std::io::Read::read(&mut pipe, &mut buf).expect("cannot read nbdcopy's output");
        if n == 0 {
            break;
        }
        std::io::Write::write_all(&mut file, &buf[..n]).unwrap();
        total += n as u64;
        if !killed && total >= 10 * MIB {
            assert!(copy.is_running());
            c.agents[2].kill();
            killed = true;
        }
    }
    let status = copy.wait(CLIENT_TIMEOUT);
    assert!(
        status.success(),
        "nbdcopy failed after an agent was killed; serve log:\n{}",
        s.log()
    );
    assert!(
        killed && total == img.size,
        "copied {total} of {} bytes",
        img.size
    );
    assert_eq!(sha256(&out), img.sha256(), "copy differs");
    let report = s.stop();
    assert!(u64_of(&report, "stripes_reconstructed") > 0, "{report}");
}

/// One agent frozen (it still accepts connections but never answers, like a PC that hangs):
/// the reads do not wait for it; parity is fetched after the hedge delay and the copy is exact.
#[test]
fn frozen_agent_is_hedged_around() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(32 * MIB, 0x5e7e_0005).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    let s = Serve::start(&c, "latest", &all(&c), &[]);
    let frozen = c.agents[1].freeze();
    let started = std::time::Instant::now();
    let out = c.path("copy.raw");
    client_ok(&c, "nbdcopy", &[&s.url, path_str(&out)]);
    let took = started.elapsed();
    drop(frozen);
    assert_eq!(sha256(&out), img.sha256(), "copy differs");
    // Without hedging every stripe with a shard there would wait for the 60 s request timeout.
    assert!(
        took < Duration::from_secs(20),
        "copy took {took:?} with one agent frozen"
    );
    let report = s.stop();
    assert!(u64_of(&report, "hedged_shards") > 0, "{report}");
}

/// A shard corrupted on an agent's disk: the read is still exact, and serve's log names the
/// agent.
#[test]
fn corrupt_shard_is_rebuilt_and_named() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(24 * MIB, 0x5e7e_0003).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    // A data shard (index < k = 4): a healthy read fetches it.
    let victim = &c.agents[3];
    let shard = scan::shard_files(victim.dir())
        .into_iter()
        .find(|p| {
            scan::shard_name(p.file_name().unwrap().to_str().unwrap()).is_some_and(|(_, i)| i < 4)
        })
        .expect("agent 3 holds a data shard");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() - 100;
    bytes[at] ^= 0x5a;
    std::fs::write(&shard, &bytes).unwrap();

    let s = Serve::start(&c, "latest", &all(&c), &[]);
    let out = c.path("copy.raw");
    client_ok(&c, "nbdcopy", &[&s.url, path_str(&out)]);
    assert_eq!(sha256(&out), img.sha256(), "copy differs");
    let log = s.log();
    let report = s.stop();
    assert!(
        log.contains("corrupt") && log.contains(&victim.addr_str()),
        "log does not name {}:\n{log}",
        victim.addr_str()
    );
    let problems = &report["shard_problems"];
    let entry = problems
        .as_object()
        .and_then(|m| m.iter().find(|(k, _)| k.contains(&victim.addr_str())))
        .unwrap_or_else(|| {
            panic!(
                "no shard_problems entry for {}: {report}",
                victim.addr_str()
            )
        });
    assert_eq!(entry.1["corrupt"].as_u64(), Some(1), "{report}");
}

/// Tears down an nbdfuse mount, loop device and filesystem mount in reverse order.
struct FuseMount {
    fuse: Option<Proc>,
    dir: PathBuf,
    loopdev: Option<LoopDevice>,
    mnt: Option<PathBuf>,
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        if let Some(m) = self.mnt.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        drop(self.loopdev.take());
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(&self.dir)
            .status();
        if let Some(mut p) = self.fuse.take() {
            if wait_exit(&mut p, Duration::from_secs(10)).is_none() {
                p.kill();
            }
        }
    }
}

fn wait_exit(p: &mut Proc, timeout: Duration) -> Option<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if !p.is_running() {
            return Some(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// An ext4 filesystem snapshotted and served: nbdfuse + losetup + mount show its files intact.
#[test]
fn ext4_served_mounts_with_files_intact() {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices, mount)");
        return;
    }
    let c = Cluster::start(6);
    let tree = c.path("tree");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    let files: Vec<(String, Vec<u8>)> = vec![
        ("hello.txt".into(), b"served from six desk PCs\n".to_vec()),
        (
            "etc/config".into(),
            (0..100_000u32).map(|i| (i % 251) as u8).collect(),
        ),
        (
            "big.bin".into(),
            (0..(3 * MIB as u32))
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect(),
        ),
    ];
    for (name, data) in &files {
        std::fs::write(tree.join(name), data).unwrap();
    }
    let img = c.path("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    client_ok(
        &c,
        "mkfs.ext4",
        &["-q", "-F", "-d", path_str(&tree), path_str(&img)],
    );
    c.snapshot(&img, &[]);
    let s = Serve::start(&c, "latest", &all(&c), &[]);

    let dir = c.path("fuse");
    std::fs::create_dir_all(&dir).unwrap();
    let pidfile = c.path("nbdfuse.pid");
    let mut cmd = Command::new("nbdfuse");
    cmd.arg("-P")
        .arg(&pidfile)
        .arg(&dir)
        .arg(&s.url)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut m = FuseMount {
        fuse: Some(Proc::spawn(cmd, "nbdfuse")),
        dir: dir.clone(),
        loopdev: None,
        mnt: None,
    };
    wait::until_true(Duration::from_secs(30), "nbdfuse to be ready", || {
        pidfile.exists() && dir.join("nbd").exists()
    });
    m.loopdev = Some(LoopDevice::attach(&dir.join("nbd"), true));
    let mnt = c.path("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let dev = m.loopdev.as_ref().unwrap().path().to_path_buf();
    client_ok(&c, "mount", &["-o", "ro", path_str(&dev), path_str(&mnt)]);
    m.mnt = Some(mnt.clone());
    for (name, data) in &files {
        let got =
            std::fs::read(mnt.join(name)).unwrap_or_else(|e| panic!("cannot read {name}: {e}"));
        assert!(got == *data, "{name} differs");
    }
    drop(m);
    let report = s.stop();
    assert!(u64_of(&report, "reads") > 0, "{report}");
}

/// With `--overlay`: random reads and writes match an in-memory model; after a restart of
/// serve the writes are still there; the snapshot itself still restores to the original.
#[test]
fn overlay_reads_writes_survive_restart_and_snapshot_is_untouched() {
    let mut c = Cluster::start(6);
    let img = ImageSpec::random(20 * MIB + 4096, 0x5e7e_0004)
        .zero_mib(4..8)
        .write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    c.agents[0].kill();
    let overlay = c.path("overlay.img");
    let ov = path_str(&overlay).to_string();
    let model = c.path("model.raw");
    std::fs::copy(&img.path, &model).unwrap();

    let s = Serve::start(&c, "latest", &all(&c), &["--overlay", &ov]);
    let ro = client(&c, "nbdinfo", &["--is", "read-only", &s.url]);
    assert_eq!(
        ro.status.code(),
        Some(2),
        "export with --overlay is read-only:\n{}",
        shown(&ro)
    );
    model_run(&c, &s.url, &model, 1, 400);
    let report = s.stop();
    assert!(
        u64_of(&report, "writes") > 0 && u64_of(&report, "flushes") > 0,
        "{report}"
    );
    assert!(u64_of(&report, "overlay_blocks") > 0, "{report}");

    // Restart: the writes are still there, and more random I/O still matches.
    let s = Serve::start(&c, "latest", &all(&c), &["--overlay", &ov]);
    let copy = c.path("after-restart.raw");
    client_ok(&c, "nbdcopy", &[&s.url, path_str(&copy)]);
    assert_eq!(
        sha256(&copy),
        sha256(&model),
        "overlay writes lost across a restart"
    );
    model_run(&c, &s.url, &model, 2, 200);
    s.stop();

    // The snapshot itself was never written.
    let restored = c.path("restored.raw");
    let r = c.restore("latest", &restored, &c.agents_arg());
    assert_eq!(u64_of(&r, "size"), img.size);
    assert_eq!(sha256(&restored), img.sha256(), "the snapshot changed");
    c.agents[0].restart();
}

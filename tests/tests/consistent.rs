//! Snapshots of disks in use (issue 15): a source mounted read-write is refused unless a way to
//! read it consistently is chosen; `--freeze` under a writer gives an image `e2fsck -fn` passes,
//! and the filesystem is thawed however the snapshot ends (done, killed with SIGKILL, past
//! `--freeze-timeout`); hooks run around the point in time and fail the snapshot when they
//! fail; an NBD export's dirty bitmap makes an incremental read exactly the changed stripes, and
//! only when the bitmap belongs to the previous snapshot; `--lvm-snapshot` where device-mapper
//! exists. Filesystem tests need root (loop devices) and skip themselves otherwise.

use std::ffi::OsStr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sa_tests::cluster::{expect_fail, str_of, u64_of};
use sa_tests::fs::{e2fsck, read_file_in, MountedExt4, Writer};
use sa_tests::loopdev::is_root;
use sa_tests::proc::Proc;
use sa_tests::qemu_nbd::{nbdinfo_map, qemu, stripes_with, to_raw, QemuNbd};
use sa_tests::{sha256, Cluster, ImageSpec, MIB, STRIPE};

fn skip_unless_root(test: &str) -> bool {
    if is_root() {
        return false;
    }
    eprintln!("SKIPPED {test}: needs root (loop devices, mount, fsfreeze)");
    true
}

/// The report's snapshot id.
fn id(report: &serde_json::Value) -> String {
    str_of(report, "snapshot").to_string()
}

/// Restores `snapshot` to a new file `name` in the cluster's directory.
fn restore(c: &Cluster, snapshot: &str, name: &str) -> std::path::PathBuf {
    let to = c.path(name);
    c.restore(snapshot, &to, &c.agents_arg());
    to
}

/// The number of snapshots in the catalog.
fn snapshot_count(c: &Cluster) -> usize {
    let v = sa_tests::json(&c.sa(&["list", "--json"]), "sa-image list");
    v["snapshots"]
        .as_array()
        .or_else(|| v.as_array())
        .unwrap_or_else(|| panic!("list --json has no snapshot array: {v}"))
        .len()
}

/// `sa-image snapshot ARGS --json -v` started in the background, its stdout and stderr in files.
struct Running {
    proc: Proc,
    stdout: std::path::PathBuf,
    stderr: std::path::PathBuf,
}

impl Running {
    fn start(c: &Cluster, args: &[&OsStr], name: &str) -> Running {
        let (stdout, stderr) = (
            c.path(&format!("{name}.out")),
            c.path(&format!("{name}.err")),
        );
        let mut all: Vec<&OsStr> = vec![OsStr::new("snapshot")];
        all.extend_from_slice(args);
        all.extend([OsStr::new("--json"), OsStr::new("-v")]);
        let mut cmd = c.sa_command(&all);
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        Running {
            proc: Proc::spawn(cmd, name),
            stdout,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until it logs that it froze the filesystem.
    fn wait_frozen(&mut self) {
        sa_tests::wait::until_true(Duration::from_secs(120), "the snapshot to freeze", || {
            if let Some(st) = self.proc.try_wait() {
                panic!(
                    "the snapshot ended ({st}) before freezing:\n{}",
                    self.stderr()
                );
            }
            self.stderr().contains("froze ")
        });
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.proc.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {}", self.proc.id());
    }
}

/// `fsfreeze --freeze MNT` fails with "busy" when the filesystem is already frozen; if it
/// succeeds, it was not: thaw it again and say so.
fn is_frozen(mnt: &Path) -> bool {
    let out = Command::new("fsfreeze")
        .arg("--freeze")
        .arg(mnt)
        .output()
        .expect("run fsfreeze");
    if out.status.success() {
        sa_tests::fs::thaw(mnt);
        return false;
    }
    String::from_utf8_lossy(&out.stderr)
        .to_lowercase()
        .contains("busy")
}

#[test]
fn a_source_mounted_read_write_is_refused_with_the_ways_to_read_it() {
    if skip_unless_root("a_source_mounted_read_write_is_refused_with_the_ways_to_read_it") {
        return;
    }
    let c = Cluster::start(6);
    let fs = MountedExt4::create(c.dir(), "busy", 64 * MIB, None);
    let dev = fs.device().as_os_str();
    let mnt = fs.mnt.display().to_string().to_lowercase();

    let out = c.sa(&[OsStr::new("snapshot"), dev]);
    let text = expect_fail(&out, Some(1), "snapshot of a mounted device");
    for word in [
        "mounted read-write",
        &mnt,
        "--freeze",
        "--lvm-snapshot",
        "nbd://",
        "--inconsistent-ok",
    ] {
        assert!(
            text.contains(&word.to_lowercase()),
            "{word:?} missing: {text}"
        );
    }
    // --freeze of a filesystem that is not the source's.
    let other = c.dir().as_os_str();
    let out = c.sa(&[OsStr::new("snapshot"), dev, OsStr::new("--freeze"), other]);
    let text = expect_fail(&out, Some(1), "--freeze of another filesystem");
    assert!(
        text.contains("no filesystem of") && text.contains(&mnt),
        "{text}"
    );
    let out = c.sa(&[
        OsStr::new("snapshot"),
        dev,
        OsStr::new("--freeze"),
        fs.mnt.as_os_str(),
        OsStr::new("--lvm-snapshot"),
    ]);
    let text = expect_fail(&out, Some(1), "--freeze with --lvm-snapshot");
    assert!(text.contains("choose one"), "{text}");
    let out = c.sa(&[
        OsStr::new("snapshot"),
        dev,
        OsStr::new("--dirty-bitmap"),
        OsStr::new("b1"),
    ]);
    let text = expect_fail(&out, Some(1), "--dirty-bitmap on a device");
    assert!(text.contains("nbd export"), "{text}");
    if !Path::new("/dev/mapper/control").exists() {
        let out = c.sa(&[OsStr::new("snapshot"), dev, OsStr::new("--lvm-snapshot")]);
        let text = expect_fail(&out, Some(1), "--lvm-snapshot without device-mapper");
        assert!(
            text.contains("/dev/mapper/control") && text.contains("--freeze"),
            "{text}"
        );
    }

    // Accepted when asked for, from a flag or a config key, and reported as inconsistent.
    let r = c.snapshot(fs.device(), &["--inconsistent-ok"]);
    assert!(str_of(&r, "consistency").starts_with("INCONSISTENT"), "{r}");
    assert!(
        r["base"].is_null(),
        "a refused run committed something: {r}"
    );
    assert!(
        r["source_mounted_rw"]
            .to_string()
            .to_lowercase()
            .contains(&mnt),
        "{r}"
    );
    let cfg = c.path("inconsistent.toml");
    std::fs::write(&cfg, "inconsistent_ok = true\n").unwrap();
    let r = c.snapshot(fs.device(), &["--config", &cfg.display().to_string()]);
    assert!(str_of(&r, "consistency").starts_with("INCONSISTENT"), "{r}");
    assert_eq!(snapshot_count(&c), 2);
}

#[test]
fn freeze_under_a_writer_gives_a_clean_image_and_the_writer_goes_on() {
    if skip_unless_root("freeze_under_a_writer_gives_a_clean_image_and_the_writer_goes_on") {
        return;
    }
    let c = Cluster::start(6);
    let fs = MountedExt4::create(c.dir(), "live", 128 * MIB, None);
    let writer = Writer::start(&fs.mnt, c.dir());
    let log = c.path("hooks.log");
    // The pre-hook writes into the filesystem before it is frozen; the post-hook after the thaw
    // (it would block, and time out, if the filesystem were still frozen).
    let pre = format!(
        "echo \"$SA_IMAGE_HOOK $SA_IMAGE_VOLUME\" >> {}; echo before > {}/hook-pre",
        log.display(),
        fs.mnt.display()
    );
    let post = format!(
        "echo \"$SA_IMAGE_HOOK $SA_IMAGE_RESULT\" >> {}; echo after > {}/hook-post",
        log.display(),
        fs.mnt.display()
    );
    let before = writer.count();
    let mnt = fs.mnt.display().to_string();
    let r = c.snapshot(
        fs.device(),
        &[
            "--volume",
            "live",
            "--freeze",
            &mnt,
            "--pre-hook",
            &pre,
            "--post-hook",
            &post,
            "--hook-timeout",
            "20s",
        ],
    );
    assert_eq!(
        str_of(&r, "consistency"),
        format!(
            "frozen during the read: {}",
            std::fs::canonicalize(&fs.mnt).unwrap().display()
        ),
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "pre live\npost ok\n"
    );
    // The writer goes on after the thaw.
    let after = writer.count();
    writer.wait_beyond(after, Duration::from_secs(20));

    let img = restore(&c, &id(&r), "live-restored.img");
    let (clean, report) = e2fsck(&img);
    assert!(clean, "e2fsck -fn of the frozen snapshot failed:\n{report}");
    // Files renamed into place before the snapshot started are in it whole.
    let f = read_file_in(&img, &format!("/w/f{before}"))
        .unwrap_or_else(|| panic!("/w/f{before}, written before the point in time, is missing"));
    assert_eq!(f.len(), 4096);
    assert_eq!(
        read_file_in(&img, "/hook-pre").as_deref(),
        Some(&b"before\n"[..])
    );
    assert_eq!(
        read_file_in(&img, "/hook-post"),
        None,
        "written after the point in time"
    );
}

#[test]
fn sigkill_of_a_snapshot_while_frozen_leaves_the_filesystem_thawed() {
    if skip_unless_root("sigkill_of_a_snapshot_while_frozen_leaves_the_filesystem_thawed") {
        return;
    }
    let c = Cluster::start(6);
    // Random throughout: every stripe costs real work, so the read is still going when stopped.
    let fs = MountedExt4::create(c.dir(), "kill", 384 * MIB, Some(0x5eed_f002));
    let writer = Writer::start(&fs.mnt, c.dir());
    let mut run = Running::start(
        &c,
        &[
            fs.device().as_os_str(),
            OsStr::new("--freeze"),
            fs.mnt.as_os_str(),
        ],
        "killed",
    );
    run.wait_frozen();
    // Hold the snapshot mid-read, see the filesystem frozen, then SIGKILL it.
    run.signal("-STOP");
    assert!(
        is_frozen(&fs.mnt),
        "the filesystem is not frozen while the snapshot reads"
    );
    let held = writer.count();
    assert!(
        run.proc.try_wait().is_none(),
        "the snapshot ended before it was killed"
    );
    run.proc.kill();
    let killed = Instant::now();
    writer.wait_beyond(held, Duration::from_secs(30));
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "thawed only {took:?} after the SIGKILL"
    );
    assert!(!is_frozen(&fs.mnt));
    assert!(
        std::fs::read_to_string(&run.stdout)
            .unwrap_or_default()
            .trim()
            .is_empty(),
        "a killed snapshot printed a report"
    );
    assert_eq!(snapshot_count(&c), 0, "a killed snapshot committed");
}

#[test]
fn a_freeze_past_its_timeout_is_thawed_and_the_snapshot_fails() {
    if skip_unless_root("a_freeze_past_its_timeout_is_thawed_and_the_snapshot_fails") {
        return;
    }
    let c = Cluster::start(6);
    let fs = MountedExt4::create(c.dir(), "slow", 192 * MIB, Some(0x5eed_f003));
    let writer = Writer::start(&fs.mnt, c.dir());
    let mut run = Running::start(
        &c,
        &[
            fs.device().as_os_str(),
            OsStr::new("--freeze"),
            fs.mnt.as_os_str(),
            OsStr::new("--freeze-timeout"),
            OsStr::new("1s"),
        ],
        "expired",
    );
    run.wait_frozen();
    run.signal("-STOP");
    let held = writer.count();
    // The guard thaws by itself while the snapshot is stopped.
    writer.wait_beyond(held, Duration::from_secs(30));
    run.signal("-CONT");
    let status = run.proc.wait(Duration::from_secs(120));
    let err = run.stderr();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("maximum time")
            && err.contains("--freeze-timeout")
            && err.contains("nothing was committed"),
        "{err}"
    );
    assert_eq!(snapshot_count(&c), 0);
}

#[test]
fn failing_hooks_fail_the_snapshot_and_commit_nothing() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(12 * MIB, 0x5eed_f004).write(&c.path("disk.img"));
    let src = img.path.as_os_str();
    let snap = |extra: &[&str]| {
        let mut a: Vec<&OsStr> = vec![OsStr::new("snapshot"), src];
        a.extend(extra.iter().map(OsStr::new));
        c.sa(&a)
    };
    let out = snap(&["--pre-hook", "echo 'cannot lock the tables' >&2; exit 3"]);
    let text = expect_fail(&out, Some(1), "failing pre-hook");
    for w in [
        "pre-hook",
        "exit status: 3",
        "cannot lock the tables",
        "nothing was committed",
    ] {
        assert!(text.contains(w), "{w:?}: {text}");
    }
    let ran = c.path("post-ran");
    let post = format!("touch {}; exit 5", ran.display());
    let out = snap(&["--pre-hook", "true", "--post-hook", &post]);
    let text = expect_fail(&out, Some(1), "failing post-hook");
    assert!(
        text.contains("post-hook") && text.contains("exit status: 5"),
        "{text}"
    );
    assert!(ran.exists());
    let out = snap(&["--pre-hook", "sleep 30", "--hook-timeout", "1s"]);
    let text = expect_fail(&out, Some(1), "pre-hook past its timeout");
    assert!(text.contains("did not finish within"), "{text}");
    let out = snap(&["--hook-timeout", "soon"]);
    expect_fail(&out, Some(64), "a hook timeout that is not a duration");
    assert_eq!(snapshot_count(&c), 0);

    // From the config file, and passing.
    let cfg = c.path("hooks.toml");
    let marker = c.path("hook-marker");
    std::fs::write(
        &cfg,
        format!(
            "pre_hook = \"echo $SA_IMAGE_HOOK > {}\"\nhook_timeout = \"10s\"\n",
            marker.display()
        ),
    )
    .unwrap();
    let r = c.snapshot(&img.path, &["--config", &cfg.display().to_string()]);
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), "pre\n");
    assert_eq!(str_of(&r, "consistency"), "not mounted read-write");
    assert_eq!(snapshot_count(&c), 1);
}

/// Writes `writes` (offset, length) into the qcow2 `img` with `qemu-io`, each with its own byte.
fn qemu_io_writes(img: &Path, writes: &[(u64, u64)], first_pattern: u8) {
    let cmds: Vec<String> = writes
        .iter()
        .enumerate()
        .map(|(i, (o, l))| format!("write -P {} {o} {l}", first_pattern as usize + i))
        .collect();
    let img = img.display().to_string();
    let mut args = vec!["-f", "qcow2"];
    for c in &cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(&img);
    qemu("qemu-io", &args);
}

#[test]
fn a_dirty_bitmap_of_the_previous_snapshot_makes_an_incremental_read_only_changed_stripes() {
    let c = Cluster::start(6);
    let img = c.path("vm.qcow2");
    let img_s = img.display().to_string();
    qemu("qemu-img", &["create", "-q", "-f", "qcow2", &img_s, "96M"]);
    // Data in stripes 0-4, 10-11 and 20; the other 16 of 24 are unallocated.
    qemu_io_writes(
        &img,
        &[(0, 20 * MIB), (40 * MIB, 8 * MIB), (80 * MIB, MIB)],
        0x11,
    );
    qemu("qemu-img", &["bitmap", "--add", "--enable", &img_s, "b1"]);
    to_raw(&img, "qcow2", &c.path("point1.raw"));

    let q = QemuNbd::start(c.dir(), "p1", &img, "qcow2", &[]);
    let uri = q.uri();
    let s1 = c.snapshot(Path::new(&uri), &["--volume", "vm", "--new-bitmap", "b1"]);
    assert_eq!(
        str_of(&s1, "consistency"),
        "point-in-time NBD export",
        "{s1}"
    );
    assert_eq!(
        u64_of(&s1, "stripes_read"),
        8,
        "only allocated stripes are read: {s1}"
    );
    assert_eq!(u64_of(&s1, "zero_stripes_unread"), 16, "{s1}");
    assert_eq!(str_of(&s1, "tracking_bitmap"), "b1");
    q.stop();

    // Changes: stripe 0, across the 10/11 boundary, stripe 15 (unallocated before), stripe 23.
    let writes = [
        (MIB + 5, 100),
        (44 * MIB - 10, 20),
        (60 * MIB, 64 * 1024),
        (95 * MIB, 4096),
    ];
    qemu_io_writes(&img, &writes, 0x51);
    to_raw(&img, "qcow2", &c.path("point2.raw"));
    let q = QemuNbd::start(c.dir(), "p2", &img, "qcow2", &["--bitmap", "b1"]);
    let uri = q.uri();
    // libnbd's view of the bitmap agrees with the writes.
    let dirty = stripes_with(&nbdinfo_map(&uri, "qemu:dirty-bitmap:b1"), 1, STRIPE);
    assert_eq!(dirty, vec![0, 10, 11, 15, 23]);
    let s2 = c.snapshot(
        Path::new(&uri),
        &[
            "--volume",
            "vm",
            "--dirty-bitmap",
            "b1",
            "--new-bitmap",
            "b2",
        ],
    );
    assert_eq!(str_of(&s2, "changes_from"), "dirty bitmap b1", "{s2}");
    assert_eq!(str_of(&s2, "base"), id(&s1));
    assert_eq!(u64_of(&s2, "stripes_read"), 5, "{s2}");
    assert_eq!(u64_of(&s2, "bytes_read"), 5 * STRIPE, "{s2}");
    assert_eq!(u64_of(&s2, "new_stripes"), 5, "{s2}");
    assert_eq!(u64_of(&s2, "unread_stripes"), 19, "{s2}");
    assert!(s2["warnings"].as_array().unwrap().is_empty(), "{s2}");

    // Both restore to the image as it was at each point.
    for (snap, raw) in [(&s1, "point1.raw"), (&s2, "point2.raw")] {
        let back = restore(&c, &id(snap), &format!("{raw}.restored"));
        assert_eq!(sha256(&back), sha256(&c.path(raw)), "{raw}");
    }

    // A bitmap that does not belong to the previous snapshot is never trusted.
    let full = |r: &serde_json::Value, why: &str| {
        assert!(r["changes_from"].is_null(), "{r}");
        assert_eq!(
            u64_of(r, "stripes_read"),
            10,
            "a full read of the 10 data stripes: {r}"
        );
        let w = r["warnings"].to_string();
        assert!(w.contains("b") && w.contains(why), "{why:?} not in {w}");
    };
    // Named b1 again, while s2 started b2.
    let s3 = c.snapshot(
        Path::new(&uri),
        &[
            "--volume",
            "vm",
            "--dirty-bitmap",
            "b1",
            "--new-bitmap",
            "b3",
        ],
    );
    full(&s3, "--new-bitmap b2");
    // The right name, but the export does not offer it.
    let s4 = c.snapshot(Path::new(&uri), &["--volume", "vm", "--dirty-bitmap", "b3"]);
    full(&s4, "does not offer");
    // After a snapshot taken without --new-bitmap.
    let s5 = c.snapshot(Path::new(&uri), &["--volume", "vm", "--dirty-bitmap", "b1"]);
    full(&s5, "without --new-bitmap");
    // Nothing changed meanwhile: the full reads stored nothing new.
    for r in [&s3, &s4, &s5] {
        assert_eq!(u64_of(r, "new_stripes"), 0, "{r}");
    }

    // An export without a name needs --volume.
    let out = c.sa(&["snapshot", &uri]);
    let text = expect_fail(&out, Some(64), "NBD source without --volume");
    assert!(text.contains("--volume"), "{text}");
}

#[test]
fn lvm_snapshot_of_a_mounted_lv_is_clean_and_removed() {
    let why = if !is_root() {
        Some("needs root")
    } else if !Path::new("/dev/mapper/control").exists() {
        Some("/dev/mapper/control does not exist here (no device-mapper in this kernel)")
    } else if Command::new("lvcreate").arg("--version").output().is_err() {
        Some("LVM's tools are not installed (apt-get install lvm2)")
    } else {
        None
    };
    if let Some(why) = why {
        eprintln!("SKIPPED lvm_snapshot_of_a_mounted_lv_is_clean_and_removed: {why}");
        return;
    }
    lvm::run();
}

/// The LVM test proper, where device-mapper and lvm2 exist.
mod lvm {
    use super::*;
    use sa_tests::loopdev::LoopDevice;

    /// A volume group on a loop device; removed on drop.
    struct Vg {
        name: String,
        _pv: LoopDevice,
        mnt: std::path::PathBuf,
    }

    impl Drop for Vg {
        fn drop(&mut self) {
            sa_tests::fs::thaw(&self.mnt);
            let _ = Command::new("umount").arg(&self.mnt).status();
            let _ = Command::new("vgremove")
                .args(["--yes", "--force", &self.name])
                .status();
        }
    }

    fn sh(cmd: &str) -> String {
        let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn run() {
        let c = Cluster::start(6);
        let pv_img = c.path("pv.img");
        std::fs::File::create(&pv_img)
            .unwrap()
            .set_len(256 * MIB)
            .unwrap();
        let pv = LoopDevice::attach(&pv_img, false);
        let name = format!("satest{}", std::process::id());
        let mnt = c.path("lvmnt");
        std::fs::create_dir_all(&mnt).unwrap();
        sh(&format!("vgcreate -q {name} {}", pv.path().display()));
        let vg = Vg {
            name: name.clone(),
            _pv: pv,
            mnt: mnt.clone(),
        };
        sh(&format!("lvcreate -q -L 96M -n data {name}"));
        let lv = format!("/dev/{name}/data");
        sh(&format!(
            "mkfs.ext4 -q {lv} && mount {lv} {}",
            mnt.display()
        ));
        let writer = Writer::start(&mnt, c.dir());
        let before = writer.count();
        let r = c.snapshot(
            Path::new(&lv),
            &["--lvm-snapshot", "--lvm-snapshot-size", "32M"],
        );
        assert!(str_of(&r, "consistency").contains("LVM snapshot"), "{r}");
        writer.wait_beyond(writer.count(), Duration::from_secs(20));
        let lvs = sh(&format!("lvs --noheadings -o lv_name {name}"));
        assert!(!lvs.contains("sa-image"), "the snapshot LV was left: {lvs}");
        let img = restore(&c, &id(&r), "lv.img");
        let (clean, report) = e2fsck(&img);
        assert!(clean, "{report}");
        assert!(read_file_in(&img, &format!("/w/f{before}")).is_some());
        // A snapshot LV that cannot be made fails clearly and leaves nothing behind.
        let out = c.sa(&[
            "snapshot",
            &lv,
            "--lvm-snapshot",
            "--lvm-snapshot-size",
            "100T",
        ]);
        expect_fail(&out, Some(1), "an LVM snapshot larger than the VG");
        let lvs = sh(&format!("lvs --noheadings -o lv_name {name}"));
        assert!(!lvs.contains("sa-image"), "{lvs}");
        drop(writer);
        drop(vg);
    }
}

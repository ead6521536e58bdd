//! Backups of a running VM (issue 15): a QEMU guest (TCG) keeps writing files to its qcow2 disk;
//! at two points in time the test quiesces it (the guest freezes its filesystem, as a guest
//! agent would), and over QMP atomically starts a persistent dirty bitmap and a point-in-time
//! view of the disk (`blockdev-backup sync=none` into a fleecing overlay), thaws the guest, and
//! exports the view over NBD (`block-export-add`, the second time with the bitmap of the first
//! point). `sa-image snapshot` reads the first export whole and the second through the bitmap:
//! it reads exactly the stripes the bitmap marks (libnbd's `nbdinfo` counts them), and both
//! restored disks pass `e2fsck -fn` and hold every file the guest had announced before each
//! point, byte for byte.
//!
//! Needs root and the packages of the crate docs, plus `libnbd-bin`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sa_tests::cluster::{str_of, u64_of};
use sa_tests::fs::{e2fsck, read_file_in};
use sa_tests::qemu_nbd::{nbdinfo_map, qemu};
use sa_tests::{sha256, Cluster, STRIPE};
use sa_vm_tests::*;
use serde_json::json;

const STEP: Duration = Duration::from_secs(120);

/// `(N, sha256)` of every file the guest announced before its `nth` (1-based) freeze.
fn files_before_freeze(vm: &VmRun, nth: usize) -> Vec<(u64, String)> {
    let mut files = Vec::new();
    let mut freezes = 0;
    for line in vm.transcript().lines() {
        if line.contains(MARKER_FROZEN) {
            freezes += 1;
            if freezes == nth {
                return files;
            }
        } else if let Some(rest) = line.split_once(MARKER_FILE).map(|(_, r)| r) {
            let mut f = rest.split_whitespace();
            // A line another console write ran into (an echoed command) is not a whole
            // announcement: only a 64-digit hex sum counts.
            let whole = |s: &&str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
            if let (Some(n), Some(sum)) = (
                f.next().and_then(|n| n.parse().ok()),
                f.next().filter(whole),
            ) {
                files.push((n, sum.to_string()));
            }
        }
    }
    panic!(
        "fewer than {nth} freezes in the transcript:\n{}",
        vm.transcript()
    );
}

/// The running guest with a QMP connection, and where its fleecing images and NBD socket go.
struct Guest {
    vm: VmRun,
    qmp: Qmp,
    dir: PathBuf,
    size: u64,
    sock: PathBuf,
}

impl Guest {
    /// Waits for file `n` to be announced.
    fn wait_file(&mut self, n: u64) {
        self.vm
            .wait_for_marker(&format!("{MARKER_FILE}{n} "), STEP)
            .unwrap_or_else(|e| panic!("{e}"));
    }

    /// A point in time: freeze the guest, atomically start bitmap `new` (disabling `old`) and a
    /// fleecing view, thaw, export the view as `vda` with `old` if given. Returns the URI.
    fn point(&mut self, n: usize, new: &str, old: Option<&str>) -> String {
        self.vm.send_line("freeze").unwrap();
        self.vm
            .wait_for_marker(MARKER_FROZEN, STEP)
            .unwrap_or_else(|e| panic!("{e}"));
        let fleece = self.dir.join(format!("fleece{n}.qcow2"));
        qemu(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                &fleece.display().to_string(),
                &self.size.to_string(),
            ],
        );
        let node = format!("fleece{n}");
        self.qmp
            .execute(
                "blockdev-add",
                json!({"driver": "qcow2", "node-name": node, "backing": "disk0",
                       "file": {"driver": "file", "filename": fleece}}),
            )
            .unwrap();
        let mut actions = vec![json!({"type": "block-dirty-bitmap-add",
            "data": {"node": "disk0", "name": new, "persistent": true}})];
        if let Some(old) = old {
            actions.push(json!({"type": "block-dirty-bitmap-disable",
                "data": {"node": "disk0", "name": old}}));
        }
        actions.push(json!({"type": "blockdev-backup",
            "data": {"device": "disk0", "target": node, "sync": "none", "job-id": node}}));
        self.qmp
            .execute("transaction", json!({ "actions": actions }))
            .unwrap();
        self.vm.send_line("thaw").unwrap();
        self.vm
            .wait_for_marker(MARKER_THAWED, STEP)
            .unwrap_or_else(|e| panic!("{e}"));
        let mut export = json!({"type": "nbd", "id": format!("exp{n}"), "node-name": node,
                                "name": "vda", "writable": false});
        if let Some(old) = old {
            export["bitmaps"] = json!([old]);
        }
        self.qmp.execute("block-export-add", export).unwrap();
        format!("nbd+unix:///vda?socket={}", self.sock.display())
    }

    /// Ends point `n`: the export, the backup job, the fleecing node.
    fn release(&mut self, n: usize) {
        let (exp, node) = (format!("exp{n}"), format!("fleece{n}"));
        self.qmp
            .execute("block-export-del", json!({"id": exp}))
            .unwrap();
        self.qmp
            .wait_event("BLOCK_EXPORT_DELETED", STEP, |d| d["id"] == exp.as_str())
            .unwrap();
        self.qmp
            .execute("block-job-cancel", json!({"device": node}))
            .unwrap();
        self.qmp
            .wait_event("BLOCK_JOB_CANCELLED", STEP, |d| {
                d["device"] == node.as_str()
            })
            .unwrap();
        self.qmp
            .execute("blockdev-del", json!({"node-name": node}))
            .unwrap();
    }
}

/// Copies the partition of a restored disk (from the 1 MiB offset) into its own file.
fn partition_of(disk: &Path) -> PathBuf {
    let out = disk.with_extension("part");
    let mut src = std::fs::File::open(disk).unwrap();
    src.seek(SeekFrom::Start(image::PARTITION_OFFSET)).unwrap();
    let mut dst = std::fs::File::create(&out).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        dst.write_all(&buf[..n]).unwrap();
    }
    out
}

/// Restores `snapshot` and checks the filesystem and the last files announced before the point.
fn check_restored(c: &Cluster, snapshot: &str, name: &str, files: &[(u64, String)]) {
    let disk = c.path(name);
    c.restore(snapshot, &disk, &c.agents_arg());
    let part = partition_of(&disk);
    let (clean, report) = e2fsck(&part);
    assert!(clean, "e2fsck -fn of {name} failed:\n{report}");
    assert!(files.len() >= 5, "the guest wrote too little: {files:?}");
    for (n, sum) in files.iter().rev().take(20) {
        let data = read_file_in(&part, &format!("/data/w/f{n}")).unwrap_or_else(|| {
            panic!("{name}: /data/w/f{n}, written before the point, is missing")
        });
        let tmp = c.path(&format!("{name}.f{n}"));
        std::fs::write(&tmp, &data).unwrap();
        assert_eq!(&sha256(&tmp), sum, "{name}: /data/w/f{n} differs");
    }
}

/// Stripes an NBD map marks with `flag` (`want` true) or touches without it (`want` false).
fn stripes(map: &[(u64, u64, u32)], flag: u32, want: bool) -> Vec<u64> {
    let mut v: Vec<u64> = map
        .iter()
        .filter(|e| (e.2 & flag != 0) == want && e.1 > 0)
        .flat_map(|e| e.0 / STRIPE..=(e.0 + e.1 - 1) / STRIPE)
        .collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn a_running_guest_is_backed_up_through_qemu_exports_and_a_dirty_bitmap() {
    require_root().unwrap_or_else(|e| panic!("{e}"));
    let dir = tempfile::tempdir().unwrap();
    let img = build_boot_image_with(
        dir.path(),
        &ImageOptions {
            size_mib: 128,
            program: GuestProgram::Writer,
            ..ImageOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let disk = dir.path().join("disk.qcow2");
    qemu(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &img.path.display().to_string(),
            &disk.display().to_string(),
        ],
    );
    let qmp_sock = dir.path().join("qmp.sock");
    let opts = VmOptions {
        format: "qcow2".into(),
        node_name: Some("disk0".into()),
        extra_args: vec![
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_sock.display()),
        ],
        ..VmOptions::default()
    };
    let mut vm = run_vm(&disk.display().to_string(), &opts).unwrap_or_else(|e| panic!("{e}"));
    let qmp = Qmp::connect(&qmp_sock, STEP).unwrap();
    vm.wait_for_marker(MARKER_BOOTED, STEP)
        .unwrap_or_else(|e| panic!("{e}"));
    let sock = dir.path().join("nbd.sock");
    let mut g = Guest {
        vm,
        qmp,
        dir: dir.path().to_path_buf(),
        size: img.size,
        sock: sock.clone(),
    };
    g.qmp
        .execute(
            "nbd-server-start",
            json!({"addr": {"type": "unix", "data": {"path": sock}}}),
        )
        .unwrap();
    let c = Cluster::start(6);
    let snapshot = |uri: &str, extra: &[&str]| {
        let mut a = vec!["--volume", "vm"];
        a.extend_from_slice(extra);
        c.snapshot(Path::new(uri), &a)
    };

    // Point 1: a full snapshot, starting bitmap b1.
    g.wait_file(8);
    let uri = g.point(1, "b1", None);
    let files1 = files_before_freeze(&g.vm, 1);
    let s1 = snapshot(&uri, &["--new-bitmap", "b1"]);
    assert_eq!(
        str_of(&s1, "consistency"),
        "point-in-time NBD export",
        "{s1}"
    );
    assert!(
        u64_of(&s1, "zero_stripes_unread") > 0,
        "holes were read: {s1}"
    );
    g.release(1);

    // The guest goes on writing; point 2: an incremental through b1, starting b2.
    let last1 = files1.last().map(|f| f.0).unwrap_or(0);
    g.wait_file(last1 + 10);
    let uri = g.point(2, "b2", Some("b1"));
    let files2 = files_before_freeze(&g.vm, 2);
    let dirty = stripes(&nbdinfo_map(&uri, "qemu:dirty-bitmap:b1"), 1, true);
    let data = stripes(&nbdinfo_map(&uri, "base:allocation"), 2, false);
    let expect: Vec<u64> = dirty.iter().copied().filter(|s| data.contains(s)).collect();
    assert!(!expect.is_empty(), "the bitmap marks nothing");
    let s2 = snapshot(&uri, &["--dirty-bitmap", "b1", "--new-bitmap", "b2"]);
    assert_eq!(str_of(&s2, "changes_from"), "dirty bitmap b1", "{s2}");
    assert_eq!(str_of(&s2, "base"), str_of(&s1, "snapshot"));
    assert_eq!(
        u64_of(&s2, "stripes_read"),
        expect.len() as u64,
        "read {} stripes, the bitmap marks {expect:?}: {s2}",
        u64_of(&s2, "stripes_read")
    );
    assert!(
        u64_of(&s2, "stripes_read") < u64_of(&s1, "stripes_read"),
        "{s1}\n{s2}"
    );
    g.release(2);

    // The guest still writes after the second thaw.
    let last2 = files2.last().map(|f| f.0).unwrap_or(0);
    g.wait_file(last2 + 3);

    check_restored(&c, str_of(&s1, "snapshot"), "point1.img", &files1);
    check_restored(&c, str_of(&s2, "snapshot"), "point2.img", &files2);
}

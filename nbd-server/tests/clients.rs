//! Real NBD clients (nbdinfo, nbdcopy, nbdsh, qemu-img) against the in-process server.

mod common;

use std::sync::Arc;

use async_trait::async_trait;
use common::*;
use nbd_server::{BlockSource, Export, Exports, MemorySource, SourceError};

const MIB: u64 = 1 << 20;

/// A source that implements only the required operations.
struct ReadOnlyMinimal(Vec<u8>);

#[async_trait]
impl BlockSource for ReadOnlyMinimal {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let o = offset as usize;
        buf.copy_from_slice(&self.0[o..o + buf.len()]);
        Ok(())
    }
}

/// 8 MiB: data in the first MiB and at 4 MiB..4.5 MiB, holes elsewhere.
fn patterned() -> Vec<u8> {
    let mut v = vec![0u8; 8 * MIB as usize];
    let mut rng = Rng(7);
    rng.fill(&mut v[..MIB as usize]);
    rng.fill(&mut v[4 * MIB as usize..4 * MIB as usize + 512 * 1024]);
    v
}

#[test]
fn nbdinfo_reports_size_and_read_only() {
    let ro = TestServer::single(
        "ro",
        Arc::new(MemorySource::new(3 * MIB).with_read_only(true)),
    );
    let o = run_ok("nbdinfo", &["--size", &ro.uri()]);
    assert_eq!(o.stdout.trim(), (3 * MIB).to_string());
    assert_eq!(
        run("nbdinfo", &["--is", "read-only", &ro.uri()]).code,
        Some(0)
    );
    let rw = TestServer::single("rw", Arc::new(MemorySource::new(MIB)));
    assert_eq!(
        run("nbdinfo", &["--is", "read-only", &rw.uri()]).code,
        Some(2)
    );
    let o = run_ok("nbdinfo", &[&rw.uri()]);
    assert!(
        o.stdout.contains("block_size_maximum: 33554432"),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("base:allocation"), "{}", o.stdout);
}

#[test]
fn nbdinfo_can_flags_follow_source_capabilities() {
    let rw = TestServer::single("rw", Arc::new(MemorySource::new(MIB)));
    for cap in [
        "flush",
        "trim",
        "multi-conn",
        "zero",
        "fast-zero",
        "fua",
        "cache",
        "df",
    ] {
        let o = run("nbdinfo", &["--can", cap, &rw.uri()]);
        assert_eq!(
            o.code,
            Some(0),
            "writable MemorySource should have {cap}: {o:?}"
        );
    }
    let min = TestServer::single("min", Arc::new(ReadOnlyMinimal(vec![1; 4096])));
    for cap in [
        "flush",
        "trim",
        "multi-conn",
        "zero",
        "fast-zero",
        "fua",
        "cache",
    ] {
        let o = run("nbdinfo", &["--can", cap, &min.uri()]);
        assert_eq!(o.code, Some(2), "minimal source must not have {cap}: {o:?}");
    }
    assert_eq!(
        run("nbdinfo", &["--is", "read-only", &min.uri()]).code,
        Some(0)
    );
}

#[test]
fn nbdinfo_map_shows_holes_and_data() {
    let srv = TestServer::single("m", Arc::new(MemorySource::from_bytes(&patterned())));
    let o = run_ok("nbdinfo", &["--map", &srv.uri()]);
    let rows: Vec<Vec<String>> = o
        .stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_owned).collect())
        .collect();
    let want = [
        (0, MIB, 0),
        (MIB, 3 * MIB, 3),
        (4 * MIB, 512 * 1024, 0),
        (4 * MIB + 512 * 1024, 3 * MIB + 512 * 1024, 3),
    ];
    assert_eq!(rows.len(), want.len(), "{}", o.stdout);
    for (row, (off, len, ty)) in rows.iter().zip(want) {
        assert_eq!(row[0], off.to_string(), "{}", o.stdout);
        assert_eq!(row[1], len.to_string(), "{}", o.stdout);
        assert_eq!(row[2], ty.to_string(), "{}", o.stdout);
    }
}

#[test]
fn nbdinfo_list_shows_every_name_and_unknown_export_fails() {
    let srv = TestServer::single("snap-1", Arc::new(MemorySource::new(MIB)));
    let o = run_ok("nbdinfo", &["--list", &srv.uri()]);
    // Both names are listed; nbdinfo shows the canonical name (NBD_INFO_NAME)
    // for each and the name it connected with in the URI.
    assert_eq!(
        o.stdout.matches("export=\"snap-1\"").count(),
        2,
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains(&format!("uri: {}/snap-1\n", srv.uri())),
        "{}",
        o.stdout
    );
    assert!(
        o.stdout.contains(&format!("uri: {}/\n", srv.uri())),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("test export"), "{}", o.stdout);
    let bad = run("nbdinfo", &[&format!("{}/nope", srv.uri())]);
    assert_eq!(bad.code, Some(1), "{bad:?}");
    // The alias and the default name both still work afterwards.
    run_ok("nbdinfo", &["--size", &format!("{}/snap-1", srv.uri())]);
    run_ok("nbdinfo", &["--size", &srv.uri()]);
}

#[test]
fn nbdcopy_copies_byte_identical_under_both_names() {
    let data = patterned();
    let srv = TestServer::single(
        "snap-1",
        Arc::new(MemorySource::from_bytes(&data).with_read_only(true)),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, uri) in [srv.uri(), format!("{}/snap-1", srv.uri())]
        .iter()
        .enumerate()
    {
        let out = dir.path().join(format!("out{i}.raw"));
        run_ok("nbdcopy", &[uri, out.to_str().unwrap()]);
        assert!(
            std::fs::read(&out).unwrap() == data,
            "nbdcopy output differs via {uri}"
        );
    }
}

#[test]
fn qemu_img_convert_is_byte_identical() {
    let data = patterned();
    let srv = TestServer::single(
        "q",
        Arc::new(MemorySource::from_bytes(&data).with_read_only(true)),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.raw");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &srv.uri(),
            out.to_str().unwrap(),
        ],
    );
    assert!(
        std::fs::read(&out).unwrap() == data,
        "qemu-img output differs"
    );
}

#[test]
fn nbdcopy_writes_into_a_writable_export() {
    let data = patterned();
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in.raw");
    std::fs::write(&input, &data).unwrap();
    let mem = Arc::new(MemorySource::new(data.len() as u64));
    let srv = TestServer::single("w", mem.clone());
    run_ok("nbdcopy", &[input.to_str().unwrap(), &srv.uri()]);
    assert!(mem.to_vec() == data, "written contents differ");
}

#[test]
fn nbdsh_writes_reads_zeroes_trims_and_queries_block_status() {
    let srv = TestServer::single("sh", Arc::new(MemorySource::new(MIB)));
    let script = r#"
import nbd
assert h.get_size() == 1048576
h.pwrite(b"x" * 4096, 0)
assert h.pread(4096, 0) == b"x" * 4096
h.pwrite(b"y" * 100, 5000, nbd.CMD_FLAG_FUA)
assert h.pread(200, 4950) == bytes(50) + b"y" * 100 + bytes(50)
h.flush()
entries = []
def cb(metacontext, offset, e, err):
    entries.extend(e)
h.block_status(65536, 0, cb)
assert entries[0] == 8192 and entries[1] == 0, entries
assert entries[2] == 65536 - 8192 and entries[3] == 3, entries
entries.clear()
h.block_status(65536, 0, cb, nbd.CMD_FLAG_REQ_ONE)
assert len(entries) == 2 and entries == [8192, 0], entries
h.zero(4096, 0)
assert h.pread(4096, 0) == bytes(4096)
h.zero(4096, 4096, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(8192, 0) == bytes(8192)
h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)
h.pwrite(b"z" * 8192, 131072)
h.trim(8192, 131072)
h.cache(4096, 0)
try:
    h.pread(4096, 1048576 - 100)
    raise Exception("read past end must fail")
except nbd.Error as ex:
    assert ex.errno == "EINVAL", ex
try:
    h.pwrite(b"a" * 10, 1048576 - 5)
    raise Exception("write past end must fail")
except nbd.Error as ex:
    assert ex.errno == "ENOSPC", ex
print("ok")
"#;
    let o = run_ok(
        "nbdsh",
        &["--base-allocation", "-u", &srv.uri(), "-c", script],
    );
    assert_eq!(o.stdout.trim(), "ok", "{o:?}");
}

#[test]
fn nbdsh_write_on_read_only_gets_eperm() {
    let srv = TestServer::single("ro", Arc::new(MemorySource::new(MIB).with_read_only(true)));
    let script = r#"
import nbd
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * 512, 0)
    raise Exception("write must fail")
except nbd.Error as ex:
    assert ex.errno == "EPERM", ex
assert h.pread(512, 0) == bytes(512)
print("ok")
"#;
    let o = run_ok("nbdsh", &["-u", &srv.uri(), "-c", script]);
    assert_eq!(o.stdout.trim(), "ok", "{o:?}");
}

#[test]
fn exports_table_serves_two_sources() {
    let mut t = Exports::new();
    t.add(Export::new("a", "first", Arc::new(MemorySource::new(MIB))))
        .unwrap();
    t.add(Export::new(
        "b",
        "second",
        Arc::new(MemorySource::new(2 * MIB)),
    ))
    .unwrap();
    t.alias("", "b").unwrap();
    let srv = TestServer::start(t);
    let size = |name: &str| {
        run_ok("nbdinfo", &["--size", &format!("{}/{name}", srv.uri())])
            .stdout
            .trim()
            .to_owned()
    };
    assert_eq!(size("a"), MIB.to_string());
    assert_eq!(size("b"), (2 * MIB).to_string());
    assert_eq!(size(""), (2 * MIB).to_string());
}

//! Live restore: `sa-image serve SNAPSHOT --hydrate TARGET`. The export is writable at once
//! while the stripes move onto TARGET in the background; writes made meanwhile (through nbdsh,
//! partial blocks included) land on TARGET and are never overwritten by the copy; a serve killed
//! midway resumes; at the end TARGET equals the original image with the writes applied, and the
//! snapshot on the agents still restores to the original.

use std::path::Path;
use std::time::{Duration, Instant};

use sa_tests::cluster::{expect_fail, expect_ok, u64_of};
use sa_tests::loopdev::{is_root, LoopDevice};
use sa_tests::nbd_client::{client, model_run};
use sa_tests::{sha256, wait, Cluster, ImageSpec, Serve, MIB, STRIPE};

/// Longest a hydration may take in these tests.
const HYDRATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts `sa-image serve latest -v --hydrate ... EXTRA` on all the cluster's agents.
fn serve(c: &Cluster, extra: &[&str]) -> Serve {
    let mut args = vec!["-v"];
    args.extend_from_slice(extra);
    Serve::start(c, "latest", &c.agents_arg(), &args)
}

/// Whether serve has printed its `hydration complete: N stripes in S s` line (consuming the
/// stdout lines before it, so that only the JSON report is left for [`Serve::stop`]).
fn hydrated(s: &Serve) -> bool {
    while let Ok(l) = s.lines.try_recv() {
        if l.starts_with("hydration complete: ") {
            return true;
        }
        assert!(!l.starts_with('{'), "serve stopped early: {l}");
    }
    false
}

/// Waits, with a deadline, for the `hydration complete` line.
fn wait_hydrated(s: &mut Serve) {
    let deadline = Instant::now() + HYDRATE_TIMEOUT;
    loop {
        match s.lines.recv_timeout(Duration::from_millis(200)) {
            Ok(l) if l.starts_with("hydration complete: ") => return,
            Ok(l) => panic!("unexpected line from serve: {l}"),
            Err(_) => assert!(
                Instant::now() < deadline && s.proc().is_running(),
                "no `hydration complete` line; serve's log:\n{}",
                s.log()
            ),
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Stripes marked filled in a hydrate state file (format: `imager/src/serve/hydrate.rs`).
fn filled_in_state(state: &Path, stripes: u64) -> u64 {
    let bytes = std::fs::read(state).unwrap_or_default();
    assert!(
        bytes.len() >= 4096,
        "state file {} too short",
        state.display()
    );
    assert_eq!(&bytes[0..8], b"SA-HYDRT", "state file magic");
    let words = stripes.div_ceil(64) as usize;
    bytes[4096..4096 + words * 8]
        .iter()
        .map(|b| b.count_ones() as u64)
        .sum()
}

fn image(c: &Cluster, size: u64, seed: u64) -> sa_tests::image::Image {
    ImageSpec::random(size, seed)
        .zero_mib(8..12) // stripe 2
        .zero_mib(20..22) // half of stripe 5
        .write(&c.path("disk.img"))
}

/// Hydration onto a missing file while nbdsh writes (before and after it completes): TARGET ends
/// up equal to the image with the writes applied; `--overlay` with `--hydrate` is refused; the
/// snapshot still restores to the original.
#[test]
fn hydrate_to_file_with_writes_during_copy() {
    let c = Cluster::start(6);
    let img = image(&c, 40 * MIB + 8192, 0x4d7a_0001);
    let stripes = img.stripes(STRIPE);
    c.snapshot(&img.path, &[]);
    let target = c.path("target.img");
    let state = c.path("target.img.hydrate");
    let model = c.path("model.raw");
    std::fs::copy(&img.path, &model).unwrap();

    let both = c.sa(&[
        "serve",
        "latest",
        "--overlay",
        path_str(&c.path("ov")),
        "--hydrate",
        path_str(&target),
    ]);
    let err = expect_fail(&both, None, "serve --overlay --hydrate");
    assert!(err.contains("overlay") && err.contains("hydrate"), "{err}");

    // 4 MiB/s: the data stripes take about ten seconds, so the first writes land in stripes
    // that are not on the target yet.
    let mut s = serve(
        &c,
        &["--hydrate", path_str(&target), "--hydrate-rate", "4MiB"],
    );
    model_run(&c, &s.url, &model, 1, 300);
    let filled = filled_in_state(&state, stripes);
    assert!(
        !hydrated(&s) && filled < stripes,
        "hydration finished before the first writes ({filled} of {stripes} stripes)"
    );
    model_run(&c, &s.url, &model, 2, 200);
    wait_hydrated(&mut s);
    // After hydration: reads come from the target; writes still go to it.
    model_run(&c, &s.url, &model, 3, 200);
    let report = s.stop();
    assert_eq!(u64_of(&report, "hydrated_stripes"), stripes, "{report}");
    assert_eq!(report["hydrate_complete"], true, "{report}");
    assert!(u64_of(&report, "reads_from_target") > 0, "{report}");
    assert!(u64_of(&report, "reads_from_agents") > 0, "{report}");
    assert!(u64_of(&report, "written_blocks") > 0, "{report}");
    // The zero stripe on a fresh file costs nothing.
    assert!(
        u64_of(&report, "hydrate_bytes") <= img.size - 4 * MIB,
        "{report}"
    );
    assert_eq!(filled_in_state(&state, stripes), stripes);
    assert_eq!(
        std::fs::metadata(&target).unwrap().len(),
        img.size,
        "target size"
    );
    assert_eq!(
        sha256(&target),
        sha256(&model),
        "target differs from the image with the writes applied"
    );

    // Served again: already complete; every read comes from the target.
    let mut s = serve(&c, &["--hydrate", path_str(&target)]);
    wait_hydrated(&mut s);
    let copy = c.path("copy.raw");
    expect_ok(
        &client(&c, "nbdcopy", &[&s.url, path_str(&copy)]),
        "nbdcopy",
    );
    let report = s.stop();
    assert_eq!(sha256(&copy), sha256(&model), "served copy differs");
    assert_eq!(u64_of(&report, "reads_from_agents"), 0, "{report}");
    assert_eq!(u64_of(&report, "stripes_fetched"), 0, "{report}");

    let restored = c.path("restored.raw");
    c.restore("latest", &restored, &c.agents_arg());
    assert_eq!(sha256(&restored), img.sha256(), "the snapshot changed");
}

/// serve killed (SIGKILL) midway through hydration: the restart resumes from the persisted
/// state (copies only what was missing), flushed writes made before the kill are kept, and the
/// result is exact.
#[test]
fn hydrate_resumes_after_kill() {
    let c = Cluster::start(6);
    let img = image(&c, 48 * MIB, 0x4d7a_0002);
    let stripes = img.stripes(STRIPE);
    c.snapshot(&img.path, &[]);
    let target = c.path("target.img");
    let state = c.path("target.img.hydrate");
    let model = c.path("model.raw");
    std::fs::copy(&img.path, &model).unwrap();

    let mut s = serve(
        &c,
        &["--hydrate", path_str(&target), "--hydrate-rate", "4MiB"],
    );
    model_run(&c, &s.url, &model, 11, 200);
    wait::until_true(Duration::from_secs(60), "3 stripes hydrated", || {
        filled_in_state(&state, stripes) >= 3
    });
    assert!(!hydrated(&s), "hydration finished before the kill");
    s.proc().kill();
    let before = filled_in_state(&state, stripes);
    assert!(before >= 3 && before < stripes, "{before} of {stripes}");

    let mut s = serve(
        &c,
        &[
            "--hydrate",
            path_str(&target),
            "--hydrate-rate",
            "unlimited",
        ],
    );
    // The writes flushed before the kill are there (the script reads against the model).
    model_run(&c, &s.url, &model, 12, 200);
    wait_hydrated(&mut s);
    let log = s.log();
    let report = s.stop();
    assert!(log.contains("already there from an earlier run"), "{log}");
    assert_eq!(
        u64_of(&report, "hydrated_stripes"),
        stripes - before,
        "{report}"
    );
    assert_eq!(
        sha256(&target),
        sha256(&model),
        "target differs after resume"
    );

    let restored = c.path("restored.raw");
    c.restore("latest", &restored, &c.agents_arg());
    assert_eq!(sha256(&restored), img.sha256(), "the snapshot changed");
}

/// A block device target (a loop device full of junk) needs `--hydrate-state`; its zero stripes
/// are written as zeroes, so it ends up exact.
#[test]
fn hydrate_to_block_device() {
    if !is_root() {
        eprintln!("skipped: needs root (loop devices)");
        return;
    }
    let c = Cluster::start(6);
    let img = image(&c, 24 * MIB, 0x4d7a_0003);
    c.snapshot(&img.path, &[]);
    let backing = c.path("device.raw");
    std::fs::write(&backing, vec![0xa5u8; (32 * MIB) as usize]).unwrap();
    let dev = LoopDevice::attach(&backing, false);
    let devpath = path_str(dev.path()).to_string();

    let out = c.sa(&["serve", "latest", "--hydrate", &devpath]);
    let err = expect_fail(&out, None, "serve --hydrate DEVICE without a state file");
    assert!(err.contains("--hydrate-state"), "{err}");

    let state = c.path("dev.hydrate");
    let model = c.path("model.raw");
    std::fs::copy(&img.path, &model).unwrap();
    let mut s = serve(
        &c,
        &["--hydrate", &devpath, "--hydrate-state", path_str(&state)],
    );
    model_run(&c, &s.url, &model, 21, 150);
    wait_hydrated(&mut s);
    s.stop();
    drop(dev);
    let mut got = std::fs::read(&backing).unwrap();
    assert!(
        got[img.size as usize..].iter().all(|&b| b == 0xa5),
        "wrote past the volume"
    );
    got.truncate(img.size as usize);
    assert!(
        got == std::fs::read(&model).unwrap(),
        "device differs from the model"
    );
}

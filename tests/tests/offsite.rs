//! The offsite tier against a real three-node Garage cluster (replication 3): a snapshot copied
//! to the bucket restores byte-identical from the key and the bucket alone, with every agent
//! deleted and then one Garage node killed; a wrong secret or an endpoint that does not answer
//! leaves the local snapshot committed and the next push catches up (around a dead agent);
//! `offsite gc` removes what no kept snapshot uses, and a gc racing a push loses nothing.
//!
//! Needs `garage` (`cargo install garage`, see `.ci/run`) and the AWS CLI (`pip install awscli`)
//! to look into the bucket with a client that is not ours.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use sa_tests::cluster::{expect_fail, expect_ok, json, u64_of};
use sa_tests::garage::{Garage, BUCKET, REGION};
use sa_tests::image::MARKER;
use sa_tests::proc::Proc;
use sa_tests::{sha256, Cluster, ImageSpec, MIB, STRIPE};

const PREFIX: &str = "office1";

/// The `--offsite*` flags for node `node` with the credentials in `cred`.
fn flags(g: &Garage, node: usize, cred: &Path) -> Vec<String> {
    vec![
        "--offsite".into(),
        format!("s3://{BUCKET}/{PREFIX}"),
        "--offsite-endpoint".into(),
        g.endpoint(node),
        "--offsite-region".into(),
        REGION.into(),
        "--offsite-credentials".into(),
        cred.display().to_string(),
    ]
}

fn with<'a>(args: &[&'a str], more: &'a [String]) -> Vec<&'a OsStr> {
    args.iter()
        .map(|a| OsStr::new(*a))
        .chain(more.iter().map(OsStr::new))
        .collect()
}

/// `sa-image ARGS --key KEY` and nothing else: no agent address at all.
fn sa_key_only(c: &Cluster, args: &[&OsStr]) -> std::process::Output {
    let mut all = args.to_vec();
    all.extend([OsStr::new("--key"), c.key.path.as_os_str()]);
    c.sa_bare(&all)
}

/// Restores `snapshot` from the bucket alone (through node `node`) and returns its sha256.
fn restore_offsite_only(
    c: &Cluster,
    g: &Garage,
    node: usize,
    cred: &Path,
    snapshot: &str,
) -> String {
    let target = c.path(&format!("offsite-restore-{node}.img"));
    let _ = std::fs::remove_file(&target);
    let f = flags(g, node, cred);
    let mut args = with(&["restore", snapshot, "--offsite-only", "--json"], &f);
    args.extend([OsStr::new("--to"), target.as_os_str()]);
    let r = json(&sa_key_only(c, &args), "restore --offsite-only");
    assert_eq!(r["missing_shards"], 0, "{r}");
    sha256(&target)
}

#[test]
fn a_snapshot_comes_back_from_the_bucket_alone_even_with_a_garage_node_down() {
    let mut c = Cluster::start(6);
    let mut g = Garage::start(c.dir());
    let cred = c.path("s3.cred");
    g.credentials_file(&cred);
    let f = flags(&g, 0, &cred);
    // 10 stripes, two of them zero, a marker in plain text at three places.
    let spec = ImageSpec::random(10 * STRIPE, 17)
        .zero_mib(8..16)
        .marker_at(&[MIB + 3, 20 * MIB, 37 * MIB + 11]);
    let img = spec.write(&c.path("disk.img"));
    let mut args = vec!["snapshot", img.path.to_str().unwrap(), "--volume", "srv"];
    args.extend(f.iter().map(String::as_str));
    let s1 = c.snapshot(&img.path, &args[2..]);
    let off = &s1["offsite"];
    assert_eq!(u64_of(off, "stripes"), 8, "{s1}");
    assert_eq!(
        u64_of(off, "shards_uploaded"),
        8 * 4,
        "data shards only: {s1}"
    );
    assert_eq!(u64_of(off, "manifests_uploaded"), 1, "{s1}");
    // What the bucket holds, listed by the AWS CLI: 8 objects (one per stripe: its 4 data shards), one manifest, nothing else.
    let shards = g.list(1, &format!("{PREFIX}/shards/"));
    assert_eq!(shards.len(), 8, "{shards:?}");
    let catalog = g.list(1, &format!("{PREFIX}/catalog/"));
    assert_eq!(catalog.len(), 1, "{catalog:?}");
    assert!(catalog[0].ends_with(&format!("snap-{}", s1["snapshot"].as_str().unwrap())));
    // The store sees ciphertext only: every object downloaded and searched for the marker.
    let copy = c.path("bucket-copy");
    let out = g.aws(
        2,
        &[
            "s3",
            "cp",
            "--recursive",
            &format!("s3://{BUCKET}/{PREFIX}"),
            copy.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sa_tests::scan::files(&copy).len(), 9);
    assert!(sa_tests::scan::files_containing(&copy, MARKER).is_empty());
    assert!(!sa_tests::scan::files_containing(&img.path, MARKER).is_empty());

    // One stripe changes: the next snapshot sends its 4 shards only.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut fh = std::fs::OpenOptions::new()
            .write(true)
            .open(&img.path)
            .unwrap();
        fh.seek(SeekFrom::Start(5 * STRIPE + 100)).unwrap();
        fh.write_all(&[0xa5; 4096]).unwrap();
    }
    let s2 = c.snapshot(&img.path, &args[2..]);
    let off = &s2["offsite"];
    assert_eq!(u64_of(off, "shards_uploaded"), 4, "{s2}");
    assert_eq!(u64_of(off, "shards_present"), 7 * 4, "{s2}");
    let want = sha256(&img.path);
    let id2 = s2["snapshot"].as_str().unwrap().to_string();

    // The office burns: every agent killed and its directory deleted.
    for a in &mut c.agents {
        a.kill();
        std::fs::remove_dir_all(a.dir()).unwrap();
    }
    let listed = json(
        &sa_key_only(&c, &with(&["list", "--offsite-only", "--json"], &f)),
        "list --offsite-only",
    );
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    assert_eq!(restore_offsite_only(&c, &g, 0, &cred, &id2), want);
    assert_eq!(restore_offsite_only(&c, &g, 0, &cred, "latest"), want);
    // Without --offsite-only, given only dead agents: no agent answers, so the catalog comes
    // from the bucket too (with a warning), and so does every shard.
    let target = c.path("fallback.img");
    let mut args = with(
        &["restore", "latest", "--json", "--wake-wait", "0s", "--to"],
        &[],
    );
    args.push(target.as_os_str());
    args.extend(f.iter().map(OsStr::new));
    let out = c.sa(&args);
    let r = json(&out, "restore --offsite with every agent dead");
    assert!(u64_of(&r, "offsite_shards") >= 8 * 4, "{r}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("reading the catalog from the offsite copy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&target), want);

    // One Garage node dies too: the other two still hold every object (replication 3).
    g.kill(0);
    let started = Instant::now();
    assert_eq!(restore_offsite_only(&c, &g, 1, &cred, &id2), want);
    eprintln!("restore with a garage node down: {:?}", started.elapsed());

    // Booted from the bucket: serve with --offsite-only (the agents it is given are all dead and
    // never asked), read whole by nbdcopy.
    let f1 = flags(&g, 1, &cred);
    let mut extra: Vec<&str> = vec!["--offsite-only"];
    extra.extend(f1.iter().map(String::as_str));
    let serve = sa_tests::Serve::start(&c, "latest", &c.agents_arg(), &extra);
    let copy_img = c.path("served.img");
    sa_tests::nbd_client::client_ok(&c, "nbdcopy", &[&serve.url, copy_img.to_str().unwrap()]);
    let report = serve.stop();
    assert_eq!(sha256(&copy_img), want);
    assert!(u64_of(&report, "offsite_shards") >= 8 * 4, "{report}");

    // The wrong key: a clear refusal, nothing written.
    let other = sa_tests::Key::generate(&c.path("other.key"));
    let target = c.path("wrong-key.img");
    let f1 = flags(&g, 1, &cred);
    let mut a = with(&["restore", "latest", "--offsite-only", "--to"], &[]);
    a.push(target.as_os_str());
    a.extend(f1.iter().map(OsStr::new));
    a.extend([OsStr::new("--key"), other.path.as_os_str()]);
    let text = expect_fail(&c.sa_bare(&a), Some(1), "restore with another key");
    assert!(text.contains("none opens with this key"), "{text}");
    assert!(!target.exists());
}

#[test]
fn a_failed_upload_leaves_the_snapshot_and_the_next_push_catches_up() {
    let mut c = Cluster::start(6);
    let g = Garage::start(c.dir());
    let cred = c.path("s3.cred");
    g.credentials_file(&cred);
    let img = ImageSpec::random(6 * STRIPE, 5).write(&c.path("disk.img"));
    let want = img.sha256();
    let src = img.path.to_str().unwrap();

    // A wrong secret: the snapshot commits on the agents, the offsite copy fails and says so.
    let bad = c.path("bad.cred");
    std::fs::write(
        &bad,
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = wrong\n",
            g.key_id
        ),
    )
    .unwrap();
    let f = flags(&g, 0, &bad);
    let out = c.sa(&with(&["snapshot", src, "--volume", "srv"], &f));
    let text = expect_fail(&out, Some(1), "snapshot with a wrong S3 secret");
    assert!(text.contains("committed on the agents"), "{text}");
    assert!(
        text.contains("offsite copy to s3://sa-offsite/office1"),
        "{text}"
    );
    assert!(
        text.contains("signature") || text.contains("403") || text.contains("forbidden"),
        "{text}"
    );
    let listed = json(&c.sa(&["list", "--json"]), "list");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert!(g.list(0, &format!("{PREFIX}/catalog/")).is_empty());

    // An endpoint where nothing answers: the same, within the retry budget, not minutes.
    let dead = format!("http://{}:3900", sa_tests::agent::fresh_ip());
    let mut f = flags(&g, 0, &cred);
    f[3] = dead;
    let started = Instant::now();
    let out = c.sa(&with(&["snapshot", src, "--volume", "srv"], &f));
    let text = expect_fail(&out, Some(1), "snapshot with an unreachable S3 endpoint");
    assert!(text.contains("committed on the agents"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(g.list(0, &format!("{PREFIX}/catalog/")).is_empty());

    // The next push, with the agent holding a data shard (index 0) dead: its shards are rebuilt
    // from parity on the way.
    let holder = c
        .agents
        .iter()
        .position(|a| {
            sa_tests::scan::shard_files(a.dir()).iter().any(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(sa_tests::scan::shard_name)
                    .is_some_and(|(_, i)| i == 0)
            })
        })
        .expect("some agent holds a shard 0");
    c.agents[holder].kill();
    let f = flags(&g, 0, &cred);
    let p = json(
        &c.sa(&with(&["offsite", "push", "--json"], &f)),
        "offsite push",
    );
    assert_eq!(u64_of(&p, "manifests_uploaded"), 2, "{p}");
    assert_eq!(u64_of(&p, "shards_uploaded"), 6 * 4, "{p}");
    assert!(u64_of(&p, "stripes_rebuilt") > 0, "{p}");
    // Nothing left to send.
    let p = json(
        &c.sa(&with(&["offsite", "push", "--json"], &f)),
        "offsite push again",
    );
    assert_eq!(
        u64_of(&p, "shards_uploaded") + u64_of(&p, "manifests_uploaded"),
        0,
        "{p}"
    );
    assert_eq!(restore_offsite_only(&c, &g, 2, &cred, "latest"), want);

    // Three of six agents gone (one more than m): a plain restore takes what they lack from the
    // bucket.
    let mut down = 1;
    for a in c.agents.iter_mut() {
        if down < 3 && a.is_running() {
            a.kill();
            down += 1;
        }
    }
    let target = c.path("mixed.img");
    let mut args = with(
        &["restore", "latest", "--json", "--wake-wait", "0s", "--to"],
        &[],
    );
    args.push(target.as_os_str());
    args.extend(f.iter().map(OsStr::new));
    let r = json(&c.sa(&args), "restore with 3 agents down and --offsite");
    assert!(u64_of(&r, "offsite_shards") > 0, "{r}");
    assert_eq!(sha256(&target), want);
    // Without the bucket the same restore fails: the bucket did the work.
    let target = c.path("no-offsite.img");
    let out = c.sa(&[
        OsStr::new("restore"),
        OsStr::new("latest"),
        OsStr::new("--wake-wait"),
        OsStr::new("0s"),
        OsStr::new("--to"),
        target.as_os_str(),
    ]);
    expect_fail(&out, Some(3), "restore with 3 agents down and no bucket");
}

#[test]
fn offsite_gc_collects_what_no_kept_snapshot_uses_and_never_races_a_push() {
    let c = Cluster::start(6);
    let g = Garage::start(c.dir());
    let cred = c.path("s3.cred");
    g.credentials_file(&cred);
    let f = flags(&g, 0, &cred);
    let a = ImageSpec::random(4 * STRIPE, 1).write(&c.path("a.img"));
    let b = ImageSpec::random(4 * STRIPE, 2).write(&c.path("b.img"));
    let sa_ = c.snapshot(&a.path, &with_strs(&["--volume", "a"], &f));
    let sb = c.snapshot(&b.path, &with_strs(&["--volume", "b"], &f));
    assert_eq!(g.list(0, &format!("{PREFIX}/shards/")).len(), 8);
    let id_a = sa_["snapshot"].as_str().unwrap();
    let id_b = sb["snapshot"].as_str().unwrap().to_string();
    expect_ok(&c.sa(&["forget", id_a]), "forget a");
    let r = json(
        &c.sa(&with(&["offsite", "gc", "--gc-grace", "0s", "--json"], &f)),
        "offsite gc",
    );
    assert_eq!(u64_of(&r, "shards_deleted"), 16, "{r}");
    assert_eq!(u64_of(&r, "manifests_deleted"), 1, "{r}");
    assert_eq!(u64_of(&r, "tombstones_uploaded"), 1, "{r}");
    assert_eq!(g.list(0, &format!("{PREFIX}/shards/")).len(), 4);
    let listed = json(
        &sa_key_only(&c, &with(&["list", "--offsite-only", "--json"], &f)),
        "list --offsite-only",
    );
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(restore_offsite_only(&c, &g, 1, &cred, &id_b), b.sha256());

    // A push in flight (slowed to 1 MiB/s: a stripe's 4 MiB of shards every 4 s) while gc runs
    // with no grace: the snapshot is live on the agents, so its shards already in the bucket are
    // kept.
    let d = ImageSpec::random(4 * STRIPE, 3).write(&c.path("d.img"));
    let sd = c.snapshot(&d.path, &["--volume", "d"]);
    let mut cmd = c.sa_command(&with_strs(
        &["offsite", "push", "--offsite-rate", "1MiB/s"],
        &f,
    ));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let mut push = Proc::spawn(cmd, "slow offsite push");
    let before = sa_tests::wait::until(
        Duration::from_secs(60),
        "some shards of d in the bucket",
        || {
            let n = g.list(0, &format!("{PREFIX}/shards/")).len();
            (n > 4).then_some(n)
        },
    );
    let r = json(
        &c.sa(&with(&["offsite", "gc", "--gc-grace", "0s", "--json"], &f)),
        "offsite gc during a push",
    );
    assert_eq!(u64_of(&r, "shards_deleted"), 0, "{r}");
    assert!(g.list(0, &format!("{PREFIX}/shards/")).len() >= before);
    assert!(push.wait(Duration::from_secs(120)).success());
    let id_d = sd["snapshot"].as_str().unwrap();
    assert_eq!(restore_offsite_only(&c, &g, 2, &cred, id_d), d.sha256());
    assert_eq!(g.list(0, &format!("{PREFIX}/shards/")).len(), 8);

    // prune with the offsite flags: the bucket follows the agents. One stripe of b changes; the
    // new snapshot goes offsite, the old one is pruned, and with it the stripe only it used.
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut fh = std::fs::OpenOptions::new()
            .write(true)
            .open(&b.path)
            .unwrap();
        fh.seek(SeekFrom::Start(STRIPE + 7)).unwrap();
        fh.write_all(b"changed").unwrap();
    }
    let sb2 = c.snapshot(&b.path, &with_strs(&["--volume", "b"], &f));
    assert_eq!(g.list(0, &format!("{PREFIX}/shards/")).len(), 9);
    let r = json(
        &c.sa(&with(
            &[
                "prune",
                "--keep-last",
                "1",
                "--volume",
                "b",
                "--gc-grace",
                "0s",
                "--json",
            ],
            &f,
        )),
        "prune with --offsite",
    );
    assert_eq!(r["offsite"]["manifests_deleted"], 1, "{r}");
    assert_eq!(r["offsite"]["shards_deleted"], 4, "{r}");
    assert_eq!(g.list(0, &format!("{PREFIX}/shards/")).len(), 8);
    let id_b2 = sb2["snapshot"].as_str().unwrap();
    assert_eq!(restore_offsite_only(&c, &g, 0, &cred, id_b2), b.sha256());

    // A push killed part way resumes where it stopped: the next one sends only the stripes the
    // bucket still lacks, then the manifest.
    let e = ImageSpec::random(4 * STRIPE, 6).write(&c.path("e.img"));
    let se = c.snapshot(&e.path, &["--volume", "e"]);
    let mut cmd = c.sa_command(&with_strs(
        &["offsite", "push", "--offsite-rate", "256KiB/s"],
        &f,
    ));
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    // At 256 KiB/s a stripe's 4 MiB pack starts every 16 s: the kill lands between two.
    let mut push = Proc::spawn(cmd, "slow offsite push, to be killed");
    sa_tests::wait::until_true(
        Duration::from_secs(60),
        "a first stripe of e in the bucket",
        || g.list(0, &format!("{PREFIX}/shards/")).len() > 8,
    );
    push.kill();
    let sent = g.list(0, &format!("{PREFIX}/shards/")).len() - 8;
    assert!(
        (1..4).contains(&sent),
        "{sent} of e's 4 stripes sent before the kill"
    );
    let id_e = se["snapshot"].as_str().unwrap();
    let catalog = g.list(0, &format!("{PREFIX}/catalog/"));
    assert!(
        !catalog.iter().any(|k| k.ends_with(id_e)),
        "no manifest before its shards: {catalog:?}"
    );
    let p = json(
        &c.sa(&with(&["offsite", "push", "--json"], &f)),
        "offsite push after a killed one",
    );
    assert_eq!(u64_of(&p, "shards_uploaded"), (4 - sent as u64) * 4, "{p}");
    assert_eq!(u64_of(&p, "manifests_uploaded"), 1, "{p}");
    assert_eq!(restore_offsite_only(&c, &g, 1, &cred, id_e), e.sha256());
}

fn with_strs<'a>(args: &[&'a str], more: &'a [String]) -> Vec<&'a str> {
    args.iter()
        .copied()
        .chain(more.iter().map(String::as_str))
        .collect()
}

/// `[volume.NAME] offsite = { ... }` in the daemon: each snapshot is followed by an `offsite`
/// job, each prune collects the bucket too.
#[test]
fn the_daemon_pushes_after_each_snapshot_and_prunes_the_bucket() {
    let c = Cluster::start(6);
    let g = Garage::start(c.dir());
    let cred = c.path("s3.cred");
    g.credentials_file(&cred);
    let img = ImageSpec::random(2 * STRIPE, 9).write(&c.path("disk.img"));
    let state = c.path("state");
    let table = offsite_table(&g, &cred, "");
    let config = daemon_config(
        &c,
        &state,
        "",
        &format!(
            "source = \"{}\"\nschedule = \"*:*:0/10\"\nkeep_last = 1\ngc_grace = \"0s\"\n{table}",
            img.path.display()
        ),
    );
    let mut d = sa_tests::daemon::Daemon::start(&config, &c.path("daemon.log"), &[]);
    let ended = |kind: &str| {
        ended_jobs(&state, kind)
            .into_iter()
            .map(|(_, e)| e)
            .collect::<Vec<_>>()
    };
    sa_tests::wait::until_true(
        Duration::from_secs(120),
        "two snapshots, each pushed offsite, and a prune that removed one",
        || {
            assert!(d.is_running(), "the daemon exited:\n{}", d.log());
            let pushes = ended("offsite");
            let prunes = ended("prune");
            pushes.iter().filter(|e| e["outcome"] == "ok").count() >= 2
                && prunes.iter().any(|e| e["figures"]["removed"] == 1)
        },
    );
    d.signal("TERM");
    assert!(d.wait(Duration::from_secs(30)).success());
    let pushes = ended("offsite");
    assert!(pushes.iter().all(|e| e["outcome"] == "ok"), "{pushes:?}");
    assert_eq!(pushes[0]["figures"]["shards_uploaded"], 8, "{pushes:?}");
    // The bucket after the prune: the kept snapshot's manifest and the removed one's tombstone,
    // and the 2 stripes (8 shards) they share.
    let listed = json(&c.sa(&["list", "--json"]), "list");
    let kept = listed[0]["snapshot"].as_str().unwrap().to_string();
    let catalog = g.list(1, &format!("{PREFIX}/catalog/"));
    assert!(
        catalog.iter().any(|k| k.ends_with(&format!("snap-{kept}"))),
        "{catalog:?}"
    );
    assert!(
        catalog
            .iter()
            .all(|k| k.contains("/snap-") || k.contains("/forgotten-")),
        "{catalog:?}"
    );
    assert_eq!(
        catalog.iter().filter(|k| k.contains("/snap-")).count(),
        1,
        "{catalog:?}"
    );
    assert_eq!(g.list(1, &format!("{PREFIX}/shards/")).len(), 2);
    assert_eq!(
        restore_offsite_only(&c, &g, 2, &cred, "latest"),
        img.sha256()
    );
}

/// More than m agents lost for good: `verify` without the bucket says data is lost, with
/// `--offsite` degraded (the bucket completes the stripes), `--offsite-only` checks the bucket's
/// copy alone, and `repair --offsite` rebuilds every shard onto the agents left, after which the
/// agents alone verify clean and restore byte-identical.
#[test]
fn verify_and_repair_take_what_the_agents_lost_from_the_bucket() {
    let mut c = Cluster::start(9);
    let g = Garage::start(c.dir());
    let cred = c.path("s3.cred");
    g.credentials_file(&cred);
    let f = flags(&g, 0, &cred);
    let img = ImageSpec::random(8 * STRIPE, 21).write(&c.path("disk.img"));
    let s = c.snapshot(&img.path, &with_strs(&["--volume", "srv"], &f));
    let id = s["snapshot"].as_str().unwrap().to_string();
    assert_eq!(u64_of(&s["offsite"], "shards_uploaded"), 32, "{s}");
    // Three agents that hold shards of one same stripe are lost for good.
    let stripe = sa_tests::scan::stripe_ids(c.agents[0].dir())
        .into_iter()
        .next()
        .expect("agent 0 holds a stripe");
    let holders: Vec<usize> = (0..c.agents.len())
        .filter(|&i| sa_tests::scan::shard_of(c.agents[i].dir(), &stripe).is_some())
        .take(3)
        .collect();
    assert_eq!(holders.len(), 3);
    for &i in &holders {
        c.agents[i].kill();
        std::fs::remove_dir_all(c.agents[i].dir()).unwrap();
    }
    let left = sa_tests::cluster::join_addrs(
        c.agents
            .iter()
            .enumerate()
            .filter(|(i, _)| !holders.contains(i))
            .map(|(_, a)| a),
    );
    assert_eq!(
        c.verify_code(&id, &left),
        3,
        "the agents alone lost a stripe"
    );
    let run = |extra: &[&str]| {
        let mut args: Vec<&str> = vec!["verify", &id, "--json", "--wake-wait", "0s"];
        args.extend_from_slice(extra);
        let out = c.sa_agents(&with(&args, &f), &left);
        let v = sa_tests::cluster::parse_json(&String::from_utf8_lossy(&out.stdout), "verify");
        (out.status.code(), v)
    };
    let (code, v) = run(&[]);
    assert_eq!(code, Some(2), "{v}");
    assert_eq!(u64_of(&v, "lost_stripes"), 0, "{v}");
    assert!(u64_of(&v, "offsite_stripes") >= 1, "{v}");
    let (code, v) = run(&["--offsite-only"]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(u64_of(&v, "offsite_stripes"), 8, "{v}");
    assert_eq!(u64_of(&v, "healthy_stripes"), 8, "{v}");

    let cache = c.path("cache");
    let mut args = with(&["repair", "--json", "--wake-wait", "0s"], &f);
    args.extend([OsStr::new("--cache-dir"), cache.as_os_str()]);
    let r = json(&c.sa_agents(&args, &left), "repair --offsite");
    assert_eq!(u64_of(&r, "stripes_lost"), 0, "{r}");
    assert_eq!(u64_of(&r, "shards_failed"), 0, "{r}");
    assert!(u64_of(&r, "shards_rebuilt") >= 3, "{r}");
    assert_eq!(
        c.verify_code(&id, &left),
        0,
        "the agents alone are whole again"
    );
    let target = c.path("after-repair.img");
    c.restore(&id, &target, &left);
    assert_eq!(sha256(&target), img.sha256());
}

/// Offsite settings that cannot work are refused before the disk is read, with what to do.
#[test]
fn bad_offsite_settings_are_refused_up_front() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(STRIPE, 4).write(&c.path("disk.img"));
    let src = img.path.to_str().unwrap();
    let run = |args: &[&str]| {
        let mut cmd = c.sa_command(args);
        cmd.env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY");
        sa_tests::proc::run(cmd, c.dir(), Duration::from_secs(60))
    };
    let text = expect_fail(
        &run(&["snapshot", src, "--offsite", "s3://Bad_Bucket/x"]),
        Some(64),
        "a bucket name S3 refuses",
    );
    assert!(text.contains("not a valid bucket name"), "{text}");
    let text = expect_fail(
        &run(&["snapshot", src, "--offsite", "https://example.com/x"]),
        Some(64),
        "not an s3 url",
    );
    assert!(text.contains("s3://bucket"), "{text}");
    let text = expect_fail(
        &run(&["restore", "latest", "--to", "/dev/null", "--offsite-only"]),
        Some(64),
        "--offsite-only without a bucket",
    );
    assert!(text.contains("--offsite-only needs the bucket"), "{text}");
    let text = expect_fail(
        &run(&["snapshot", src, "--offsite", "s3://sa-offsite/x"]),
        Some(1),
        "no credentials",
    );
    assert!(text.contains("no credentials for offsite"), "{text}");
    let missing = c.path("no-such.cred");
    let text = expect_fail(
        &run(&[
            "snapshot",
            src,
            "--offsite",
            "s3://sa-offsite/x",
            "--offsite-credentials",
            missing.to_str().unwrap(),
        ]),
        Some(1),
        "a credentials file that is not there",
    );
    assert!(text.contains("cannot read offsite credentials"), "{text}");
    // Nothing was read or stored by any of them.
    let listed = json(&c.sa(&["list", "--json"]), "list");
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
}

/// The daemon's journal: the (start, end) lines of every finished job of `kind`.
fn ended_jobs(state: &Path, kind: &str) -> Vec<(serde_json::Value, serde_json::Value)> {
    let lines = sa_tests::daemon::json_lines(&state.join("jobs.jsonl"));
    let starts: Vec<&serde_json::Value> = lines
        .iter()
        .filter_map(|l| l.get("start"))
        .filter(|s| s["kind"] == kind)
        .collect();
    lines
        .iter()
        .filter_map(|l| l.get("end"))
        .filter_map(|e| {
            let s = starts.iter().find(|s| s["id"] == e["id"])?;
            Some(((*s).clone(), e.clone()))
        })
        .collect()
}

/// A top-level `offsite` table with a schedule of its own: the daemon pushes on that schedule
/// (here every 5 s), not after snapshots, for every volume without a table of its own.
#[test]
fn the_daemon_pushes_on_the_offsite_schedule() {
    let c = Cluster::start(6);
    let g = Garage::start(c.dir());
    let cred = c.path("s3.cred");
    g.credentials_file(&cred);
    let img = ImageSpec::random(2 * STRIPE, 10).write(&c.path("disk.img"));
    // A snapshot taken by hand; the daemon's own schedule is far away.
    let s = c.snapshot(&img.path, &["--volume", "vm"]);
    let state = c.path("state");
    let table = offsite_table(&g, &cred, ", schedule = \"*:*:0/5\"");
    let config = daemon_config(
        &c,
        &state,
        &table,
        &format!(
            "source = \"{}\"\nschedule = \"daily 02:00\"\n",
            img.path.display()
        ),
    );
    let mut d = sa_tests::daemon::Daemon::start(&config, &c.path("daemon.log"), &[]);
    let pushed = sa_tests::wait::until(Duration::from_secs(60), "a scheduled offsite job", || {
        assert!(d.is_running(), "the daemon exited:\n{}", d.log());
        ended_jobs(&state, "offsite").into_iter().next()
    });
    d.signal("TERM");
    assert!(d.wait(Duration::from_secs(30)).success());
    let (start, end) = pushed;
    assert_eq!(start["trigger"], "schedule", "{start}");
    assert_eq!(end["outcome"], "ok", "{end}");
    assert_eq!(end["figures"]["shards_uploaded"], 8, "{end}");
    assert!(ended_jobs(&state, "snapshot").is_empty());
    let id = s["snapshot"].as_str().unwrap();
    assert_eq!(restore_offsite_only(&c, &g, 1, &cred, id), img.sha256());
}

/// `offsite = { ... }` for this cluster's bucket, with `extra` keys (`, schedule = "..."`).
fn offsite_table(g: &Garage, cred: &Path, extra: &str) -> String {
    format!(
        "offsite = {{ url = \"s3://{BUCKET}/{PREFIX}\", endpoint = \"{}\", region = \"{REGION}\", \
         credentials = \"{}\"{extra} }}\n",
        g.endpoint(0),
        cred.display()
    )
}

/// Writes a daemon config for the cluster: `top` at the top level, `volume` as `[volume.vm]`.
fn daemon_config(c: &Cluster, state: &Path, top: &str, volume: &str) -> std::path::PathBuf {
    let agents: Vec<String> = c
        .agents
        .iter()
        .map(|a| format!("\"{}\"", a.addr_str()))
        .collect();
    let config = c.path("config.toml");
    std::fs::write(
        &config,
        format!(
            "key = \"{key}\"\nagents = [{agents}]\ncache_dir = \"{cache}\"\n{top}\
             [daemon]\nstate_dir = \"{state}\"\ncheck_interval = \"1s\"\nscrub = \"never\"\n\
             [web]\nlisten = \"127.0.0.1:0\"\n[volume.vm]\n{volume}",
            key = c.key.path.display(),
            agents = agents.join(", "),
            cache = c.path("cache").display(),
            state = state.display(),
        ),
    )
    .expect("cannot write the daemon config");
    config
}

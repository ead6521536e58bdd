//! Reads smaller than a stripe (seal format 2, issue 18): `serve` answers small random reads from
//! the sealed chunks they need, healthy, with agents down (the chunk rebuilt from the same bytes
//! of other shards), with an agent frozen (the chunk rebuilt after a short hedge), and with a
//! corrupt shard (the whole stripe is read instead); snapshots in
//! the old format 1 are still read, and a format-2 snapshot on a format-1 base reuses nothing
//! from it. Reads go through nbdsh (libnbd), checked against the image.

use std::path::Path;

use sa_tests::cluster::{str_of, u64_of};
use sa_tests::nbd_client::client_ok;
use sa_tests::{scan, sha256, Cluster, ImageSpec, Serve, MIB, STRIPE};

/// Reads through nbdsh, each checked against the image file: `random` = that many reads of
/// assorted sizes at random offsets from `seed`; else the first 4 KiB of every stripe.
const READS: &str = r#"
import random, sys
url, image, seed, random_reads, stripe = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
h.connect_uri(url)
disk = open(image, 'rb').read()
size = h.get_size()
assert size == len(disk), (size, len(disk))
rnd = random.Random(seed)
if random_reads:
    reads = []
    for _ in range(random_reads):
        ln = rnd.choice([1, 512, 4096, 4096, 4096, 4097, 65536, 200000])
        reads.append((rnd.randrange(size - ln), ln))
    # Across a stripe boundary too.
    reads.append((stripe - 1000, 4096))
else:
    reads = [(s, 4096) for s in range(0, size, stripe)]
for off, ln in reads:
    got = h.pread(ln, off)
    if got != disk[off:off + ln]:
        sys.exit("read of %d at %d differs" % (ln, off))
print(len(reads))
"#;

/// Runs [`READS`]; returns how many reads it made.
fn reads(c: &Cluster, url: &str, image: &Path, seed: u64, random_reads: u32) -> u64 {
    let script = c.path("reads.py");
    std::fs::write(&script, READS).expect("cannot write the nbdsh script");
    let code = format!(
        "import sys; sys.argv = ['reads', '{url}', '{}', '{seed}', '{random_reads}', '{STRIPE}']; exec(open('{}').read())",
        image.display(),
        script.display()
    );
    client_ok(c, "nbdsh", &["-c", &code])
        .trim()
        .parse()
        .expect("nbdsh printed the number of reads")
}

/// A generous hedge delay: on a loaded machine a ranged read must not give up for slowness, or
/// the counts below would vary.
const SERVE_ARGS: &[&str] = &["--hedge-after", "10s"];

#[test]
fn small_reads_fetch_only_their_chunks_healthy_and_with_two_agents_down() {
    let mut c = Cluster::start(6);
    let img = ImageSpec::random(40 * MIB, 0x5a9e_0001)
        .zero_mib(8..12)
        .write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);

    let s = Serve::start(&c, "latest", &c.agents_arg(), SERVE_ARGS);
    let n = reads(&c, &s.url, &img.path, 1, 300);
    let report = s.stop();
    assert!(u64_of(&report, "ranged_reads") >= n / 2, "{report}");
    assert_eq!(u64_of(&report, "ranged_fallbacks"), 0, "{report}");
    // Not one whole stripe was fetched for reads of at most 200 KB at random places.
    assert_eq!(u64_of(&report, "stripes_fetched"), 0, "{report}");

    // Two of six agents gone: a chunk on one of them is rebuilt from the same bytes of four
    // other shards, still without fetching a stripe.
    c.agents[0].kill();
    c.agents[3].kill();
    let s = Serve::start(&c, "latest", &c.agents_arg(), SERVE_ARGS);
    let n = reads(&c, &s.url, &img.path, 2, 300);
    let report = s.stop();
    assert!(u64_of(&report, "ranged_reads") >= n / 2, "{report}");
    assert_eq!(u64_of(&report, "ranged_fallbacks"), 0, "{report}");
    assert_eq!(u64_of(&report, "stripes_fetched"), 0, "{report}");
}

/// One agent frozen after serve connected (it keeps its connection but answers nothing): a
/// ranged read of one of its chunks is rebuilt from four other shards after the short range
/// hedge (about 10 ms), and the agent is then left alone for the cool-down. Without that hedge
/// each such read would wait the 300 ms hedge delay and then fetch the whole stripe: a fallback.
#[test]
fn a_frozen_agent_costs_ranged_reads_one_short_hedge_not_a_fallback() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(40 * MIB, 0x5a9e_0004).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    // The default hedge delay (300 ms), so that only the range hedge can avoid the fallbacks.
    let s = Serve::start(&c, "latest", &c.agents_arg(), &[]);
    let frozen = c.agents[1].freeze();
    let n = reads(&c, &s.url, &img.path, 4, 300);
    drop(frozen);
    // Thawed, within the cool-down of the last hedge: whole-stripe reads (a sequential copy)
    // still ask it for its data shards; only ranged reads leave it alone for a while.
    let out = c.path("copy.raw");
    client_ok(
        &c,
        "nbdcopy",
        &[&s.url, out.to_str().expect("a UTF-8 path")],
    );
    assert_eq!(sha256(&out), img.sha256(), "copy differs");
    let report = s.stop();
    assert!(u64_of(&report, "ranged_reads") >= n / 2, "{report}");
    assert!(u64_of(&report, "ranged_hedges") >= 1, "{report}");
    assert_eq!(u64_of(&report, "ranged_fallbacks"), 0, "{report}");
    assert!(u64_of(&report, "stripes_fetched") > 0, "{report}");
    assert_eq!(u64_of(&report, "stripes_reconstructed"), 0, "{report}");
}

#[test]
fn a_corrupt_chunk_makes_the_read_fetch_the_whole_stripe_and_the_bytes_are_exact() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(24 * MIB, 0x5a9e_0002).write(&c.path("disk.img"));
    c.snapshot(&img.path, &[]);
    // Every first data shard (index 0) on agent 2 gets a flipped byte in its first chunk, which
    // holds the first 4 KiB of its stripe.
    let victim = &c.agents[2];
    let mut flipped = 0;
    for shard in scan::shard_files(victim.dir()) {
        let name = shard.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if scan::shard_name(name).is_some_and(|(_, i)| i == 0) {
            let mut bytes = std::fs::read(&shard).unwrap();
            bytes[96 + 100] ^= 0x5a;
            std::fs::write(&shard, &bytes).unwrap();
            flipped += 1;
        }
    }
    assert!(flipped > 0, "agent 2 holds no first data shard");

    let s = Serve::start(&c, "latest", &c.agents_arg(), SERVE_ARGS);
    reads(&c, &s.url, &img.path, 0, 0);
    let log = s.log();
    let report = s.stop();
    assert_eq!(u64_of(&report, "ranged_fallbacks"), flipped, "{report}");
    assert_eq!(u64_of(&report, "stripes_fetched"), flipped, "{report}");
    assert!(
        log.contains("corrupt") && log.contains(&victim.addr_str()),
        "the log does not name the agent with the corrupt shards:\n{log}"
    );
}

#[test]
fn format_1_snapshots_are_still_read_and_format_2_reuses_nothing_from_them() {
    let c = Cluster::start(6);
    let img = ImageSpec::random(20 * MIB, 0x5a9e_0003).write(&c.path("disk.img"));
    let old = c.snapshot(&img.path, &["--seal-format", "1"]);
    let old_id = str_of(&old, "snapshot").to_string();

    let s = Serve::start(&c, &old_id, &c.agents_arg(), SERVE_ARGS);
    reads(&c, &s.url, &img.path, 3, 100);
    let report = s.stop();
    assert_eq!(u64_of(&report, "ranged_reads"), 0, "{report}");
    assert!(u64_of(&report, "stripes_fetched") > 0, "{report}");

    // The next snapshot (format 2) reads everything again: its stripes have other ids.
    let new = c.snapshot(&img.path, &[]);
    assert_eq!(u64_of(&new, "new_stripes"), 5, "{new}");
    assert_eq!(u64_of(&new, "reused_stripes"), 0, "{new}");
    for (id, name) in [
        (old_id.as_str(), "old.raw"),
        (str_of(&new, "snapshot"), "new.raw"),
    ] {
        let out = c.path(name);
        c.restore(id, &out, &c.agents_arg());
        assert_eq!(sha256(&out), img.sha256(), "restore of {id} differs");
    }
    // An unknown format is refused before anything is read.
    let bad = c.sa(&["snapshot", img.path.to_str().unwrap(), "--seal-format", "3"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("seal-format"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
}

//! Fuzz targets for every decoder that reads bytes an agent or a network peer controls.
//!
//! `cargo fuzz` needs a nightly toolchain, so these are proptest-driven: each target gets random
//! byte strings and mutations (bit flips, boundary values in length fields, truncations,
//! insertions) of valid encodings, and must return an error rather than panic. Where a decoder
//! accepts its input, re-encoding it must give the same bytes back (or the same value).
//!
//! * `agent_frames`: [`wire::read_frame`] over a byte stream, then [`wire::Request::parse`],
//!   [`wire::Response::parse`] and [`wire::Handshake::parse`] on every frame.
//! * `shard_files`: [`shard::parse_header`], [`shard::check_shard`], [`shard::open_shard`].
//! * `manifest_bodies`: [`Manifest::from_bytes`].
//! * `sealed_manifests`: [`Manifest::open`] on random blobs, and on bodies sealed with the right
//!   key (so the fuzzer gets past the AEAD into decompression and parsing).
//!
//! Runs: `cargo test -p sa-core --lib fuzz` runs [`DEFAULT_CASES`] cases per target and replays the
//! corpus in `core/tests/fuzz_corpus/TARGET/`; `SA_FUZZ_CASES=200000 cargo test --release -p
//! sa-core --lib fuzz -- --nocapture` runs longer and prints executions per second. A failing
//! input is written to `$TMPDIR/fuzz-crash-TARGET.bin`: add it to the corpus with the fix.

use std::path::PathBuf;
use std::time::Instant;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::keys::{Keys, MasterKey};
use crate::manifest::{seal_compressed, tests::sample, Manifest};
use crate::shard::{self, ShardKey};
use crate::wire::{self, ErrorCode, Handshake, Request, Response, ShardEntry, StoreStat};

/// Cases per target in a plain `cargo test`.
const DEFAULT_CASES: u32 = 2000;

fn cases() -> u32 {
    std::env::var("SA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target)
}

/// Every file of a target's corpus.
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(corpus_dir(target)) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "bin") {
                let bytes = std::fs::read(&p).expect("cannot read a corpus file");
                out.push((p.display().to_string(), bytes));
            }
        }
    }
    out.sort();
    out
}

/// One edit of a seed: (operation, position, value).
type Edit = (u8, u32, u32);

/// Applies `edits` to `seed`; positions wrap, so every edit applies somewhere.
pub(crate) fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    const BOUNDARY: [u32; 8] = [0, 1, 0x7f, 0x80, 0xff, 0xffff, 0x7fff_ffff, u32::MAX];
    let mut b = seed.to_vec();
    for &(op, pos, val) in edits {
        let at = pos as usize % (b.len() + 1);
        match op % 7 {
            0 if at < b.len() => b[at] ^= 1 << (val % 8),
            1 if at < b.len() => b[at] = val as u8,
            2 | 3 if at + 4 <= b.len() => {
                let v = if val % 3 == 0 {
                    val
                } else {
                    BOUNDARY[(val % 8) as usize]
                };
                let bytes = if op % 7 == 2 {
                    v.to_le_bytes()
                } else {
                    v.to_be_bytes()
                };
                b[at..at + 4].copy_from_slice(&bytes);
            }
            4 => b.truncate(at),
            5 => {
                let n = (val % 16) as usize;
                let fill: Vec<u8> = (0..n).map(|i| (val >> (i % 4)) as u8).collect();
                b.splice(at..at, fill);
            }
            6 if at < b.len() => {
                let end = (at + (val % 64) as usize).min(b.len());
                let chunk = b[at..end].to_vec();
                b.splice(at..at, chunk);
            }
            _ => {}
        }
    }
    b
}

/// Random bytes (1 part) or mutated seeds (3 parts).
fn inputs(seeds: Vec<Vec<u8>>, max_random: usize) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        1 => vec(any::<u8>(), 0..max_random),
        3 => (0..n, vec((any::<u8>(), any::<u32>(), any::<u32>()), 1..6))
            .prop_map(move |(i, edits)| mutate(&seeds[i], &edits)),
    ]
}

/// Runs `check` on the corpus, then on generated inputs; panics with the saved input on failure.
fn run_target(
    target: &str,
    strategy: impl Strategy<Value = Vec<u8>>,
    check: impl Fn(&[u8]) -> Result<(), TestCaseError>,
) {
    for (name, bytes) in corpus(target) {
        if let Err(e) = check(&bytes) {
            panic!("{target}: corpus file {name} fails: {e}");
        }
    }
    let cases = cases();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let started = Instant::now();
    let result = runner.run(&strategy, |input| check(&input));
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(()) => eprintln!(
            "fuzz {target}: {cases} executions in {secs:.2} s ({:.0}/s)",
            cases as f64 / secs.max(1e-9)
        ),
        Err(TestError::Fail(why, input)) => {
            let path = std::env::temp_dir().join(format!("fuzz-crash-{target}.bin"));
            let _ = std::fs::write(&path, &input);
            panic!(
                "{target}: {why}; minimal input ({} bytes) saved to {}",
                input.len(),
                path.display()
            );
        }
        Err(e) => panic!("{target}: {e}"),
    }
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(f))
}

fn key() -> ShardKey {
    ShardKey {
        volume: [1; 16],
        stripe: [2; 32],
        index: 3,
    }
}

fn frame_bytes<'a>(frames: impl IntoIterator<Item = wire::Frame<'a>>) -> Vec<u8> {
    block_on(async {
        let mut out = Vec::new();
        for f in frames {
            wire::write_frame(&mut out, &f)
                .await
                .expect("write to a Vec");
        }
        out
    })
}

fn frame_seeds() -> Vec<Vec<u8>> {
    let reqs = vec![
        Request::PutShard {
            key: key(),
            data: shard::encode_shard(&key(), 4, 2, b"payload"),
        },
        Request::GetShard { key: key() },
        Request::GetRange {
            key: key(),
            offset: 96,
            len: 4112,
        },
        Request::ConfirmShard {
            key: key(),
            header: vec![7; shard::SHARD_HEADER_LEN],
        },
        Request::DeleteShard { key: key() },
        Request::PutBlob {
            name: "snap-0123".into(),
            data: vec![1, 2, 3],
        },
        Request::GetBlob {
            name: "snap-0123".into(),
        },
        Request::ListBlobs {
            prefix: "snap-".into(),
        },
        Request::DeleteBlob {
            name: "lease-1".into(),
        },
        Request::Sync,
        Request::Stat,
        Request::ListVolumes,
        Request::ListShards {
            volume: [4; 16],
            bucket: 9,
        },
        Request::SweepShards {
            min_age: 60,
            keys: vec![key(), key()],
        },
        Request::Scrub { start: true },
    ];
    let resps = [
        Response::Ok,
        Response::Data(vec![5; 40]),
        Response::Names(vec!["a".into(), "snap-b".into()]),
        Response::Stat(StoreStat {
            agent_id: [1; 16],
            used: 5,
            quota: 9,
            shards: 1,
            fs_free: Some(3),
            mac: Some([2, 0, 0, 0, 0, 1]),
            broadcast: Some(std::net::Ipv4Addr::new(10, 0, 0, 255)),
            keep_awake: Some(std::time::Duration::from_secs(90)),
        }),
        Response::Shards(vec![ShardEntry {
            stripe: [3; 32],
            index: 1,
            age: 7,
        }]),
        Response::Swept(Default::default()),
        Response::Scrubbed(wire::ScrubStatus {
            rate: 1 << 20,
            running: true,
            bad_total: 1,
            bad: vec![wire::ScrubFinding {
                key: key(),
                restored: false,
                reason: "payload crc32c mismatch".into(),
            }],
            ..Default::default()
        }),
        Response::Error {
            code: ErrorCode::Full,
            message: "full".into(),
        },
    ];
    let hs = [
        Handshake::Hello { version: 1 },
        Handshake::Challenge {
            version: 1,
            agent_id: [8; 16],
            nonce: [9; 32],
        },
        Handshake::Auth {
            owner: [1; 32],
            signature: [2; 64],
        },
    ];
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    seeds.extend(reqs.iter().map(|r| frame_bytes([r.frame()])));
    seeds.extend(resps.iter().map(|r| frame_bytes([r.frame()])));
    seeds.extend(hs.iter().map(|h| frame_bytes([h.frame()])));
    // A whole conversation in one stream.
    let mut all = frame_bytes(hs.iter().map(Handshake::frame));
    all.extend(frame_bytes(reqs.iter().map(Request::frame)));
    seeds.push(all);
    seeds
}

/// Parses every frame of `stream` every way; what parses must re-encode to the same message.
fn check_frames(stream: &[u8]) -> Result<(), TestCaseError> {
    let frames = block_on(async {
        let mut r = stream;
        let mut frames = Vec::new();
        // A frame error ends the stream, as it ends a connection.
        while let Ok(Some(f)) = wire::read_frame(&mut r).await {
            frames.push(f);
        }
        frames
    });
    for (kind, body) in frames {
        prop_assert!(body.len() < wire::MAX_FRAME);
        if let Ok(h) = Handshake::parse(kind, &body) {
            let again = frame_bytes([h.frame()]);
            prop_assert_eq!(Handshake::parse(again[4], &again[5..]).ok(), Some(h));
        }
        if let Ok(req) = Request::parse(kind, body.clone()) {
            let again = frame_bytes([req.frame()]);
            prop_assert_eq!(
                Request::parse(again[4], again[5..].to_vec()).ok(),
                Some(req)
            );
        }
        if let Ok(resp) = Response::parse(kind, body) {
            let again = frame_bytes([resp.frame()]);
            prop_assert_eq!(
                Response::parse(again[4], again[5..].to_vec()).ok(),
                Some(resp)
            );
        }
    }
    Ok(())
}

#[test]
fn agent_frames() {
    run_target("agent_frames", inputs(frame_seeds(), 600), check_frames);
}

fn check_shard_file(file: &[u8]) -> Result<(), TestCaseError> {
    let header = shard::parse_header(file);
    let checked = shard::check_shard(file);
    if let Ok(h) = &checked {
        prop_assert_eq!(header.as_ref().ok(), Some(h));
        prop_assert_eq!(file.len(), shard::SHARD_HEADER_LEN + h.payload_len as usize);
        let payload = shard::open_shard(file, &h.key, h.k, h.m);
        prop_assert!(payload.is_ok());
        // Re-encoding gives the same bytes, except for the reserved field a reader ignores.
        let again = shard::encode_shard(&h.key, h.k, h.m, &file[shard::SHARD_HEADER_LEN..]);
        prop_assert_eq!(&again[..72], &file[..72]);
    }
    let _ = shard::open_shard(file, &key(), 4, 2);
    Ok(())
}

#[test]
fn shard_files() {
    let seeds = vec![
        shard::encode_shard(&key(), 4, 2, b""),
        shard::encode_shard(&key(), 4, 2, b"some payload bytes"),
        shard::encode_shard(&key(), 1, 1, &[0xaa; 300]),
    ];
    run_target("shard_files", inputs(seeds, 200), check_shard_file);
}

fn check_manifest_body(body: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(m) = Manifest::from_bytes(body) {
        prop_assert_eq!(m.to_bytes(), body);
    }
    Ok(())
}

fn manifest_seeds() -> Vec<Vec<u8>> {
    let mut small = sample();
    small.stripes.truncate(1);
    small.layout = crate::layout::Layout::new(4 << 20, 4 << 20, 4, 2).expect("layout");
    let mut revised = sample();
    revised.revision = 3;
    vec![sample().to_bytes(), small.to_bytes(), revised.to_bytes()]
}

#[test]
fn manifest_bodies() {
    run_target(
        "manifest_bodies",
        inputs(manifest_seeds(), 400),
        check_manifest_body,
    );
}

fn fuzz_keys() -> Keys {
    MasterKey::from_bytes([9; 32]).derive()
}

/// The input's first byte picks the path: 0 opens the bytes as a sealed blob; 1 seals them as
/// the compressed body; 2 compresses then seals them. Then `Manifest::open` must not panic.
fn check_sealed(input: &[u8], keys: &Keys) -> Result<(), TestCaseError> {
    let Some((&how, rest)) = input.split_first() else {
        return Ok(());
    };
    let name = format!("snap-{}", sample().snapshot);
    let sealed = match how % 3 {
        0 => rest.to_vec(),
        1 => seal_compressed(keys, rest.to_vec()).expect("seal"),
        _ => seal_compressed(keys, zstd::bulk::compress(rest, 1).expect("compress")).expect("seal"),
    };
    if let Ok(m) = Manifest::open(keys, &name, &sealed) {
        prop_assert_eq!(m.blob_name(), name);
    }
    Ok(())
}

#[test]
fn sealed_manifests() {
    let keys = fuzz_keys();
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    for body in manifest_seeds() {
        seeds.push([&[2u8][..], &body].concat());
        let compressed = zstd::bulk::compress(&body, 3).expect("compress");
        seeds.push([&[1u8][..], &compressed].concat());
        let sealed = sample().seal(&keys).expect("seal");
        seeds.push([&[0u8][..], &sealed].concat());
    }
    run_target("sealed_manifests", inputs(seeds, 400), |i| {
        check_sealed(i, &keys)
    });
}

#[test]
fn mutations_stay_in_bounds() {
    let seed = [1u8, 2, 3, 4, 5, 6];
    for op in 0..14u8 {
        for pos in [0, 3, 5, 6, 7, u32::MAX] {
            let _ = mutate(&seed, &[(op, pos, u32::MAX), (op, pos, 0)]);
            let _ = mutate(&[], &[(op, pos, 17)]);
        }
    }
}

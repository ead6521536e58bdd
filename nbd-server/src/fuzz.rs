//! Fuzz targets for what an NBD client sends: whole sessions (handshake, option haggling and
//! transmission), option data, and request headers.
//!
//! `cargo fuzz` needs a nightly toolchain, so these are proptest-driven: random bytes and
//! mutations (bit flips, boundary values in length fields, truncations, insertions) of valid
//! client conversations. A session must end (error or clean close) within a deadline and never
//! panic. Failing inputs are saved to `$TMPDIR/fuzz-crash-TARGET.bin`; the corpus in
//! `nbd-server/tests/fuzz_corpus/TARGET/*.bin` is replayed first.
//!
//! `cargo test -p nbd-server --lib fuzz` runs [`DEFAULT_CASES`] cases per target;
//! `SA_FUZZ_CASES=200000 cargo test --release -p nbd-server --lib fuzz -- --nocapture` runs
//! longer and prints executions per second.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::handshake::{greet, haggle, parse_info_request, parse_meta_request, Step};
use crate::proto::*;
use crate::transmission::{transmit, Limits};
use crate::{Export, Exports, MemorySource};

const DEFAULT_CASES: u32 = 2000;
/// Size of the fuzzed export: small, so random offsets mostly fall outside it and reads are cheap.
const EXPORT_SIZE: u64 = 1 << 20;

fn cases() -> u32 {
    std::env::var("SA_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_corpus")
        .join(target);
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
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
fn mutate(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
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
                    v.to_be_bytes()
                } else {
                    v.to_le_bytes()
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

fn inputs(seeds: Vec<Vec<u8>>, max_random: usize) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        1 => vec(any::<u8>(), 0..max_random),
        3 => (0..n, vec((any::<u8>(), any::<u32>(), any::<u32>()), 1..6))
            .prop_map(move |(i, edits)| mutate(&seeds[i], &edits)),
    ]
}

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

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&code.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn name_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d
}

fn info_data(name: &str, items: &[u16]) -> Vec<u8> {
    let mut d = name_data(name);
    d.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for i in items {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = name_data(name);
    d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend_from_slice(&name_data(q));
    }
    d
}

fn request(kind: u16, flags: u16, offset: u64, len: u32) -> Vec<u8> {
    Request {
        flags,
        kind,
        handle: 0x1234,
        offset,
        len,
    }
    .encode()
    .to_vec()
}

fn requests() -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(request(NBD_CMD_READ, 0, 0, 4096));
    b.extend(request(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 4096, 512));
    b.extend([0xab; 512]);
    b.extend(request(NBD_CMD_BLOCK_STATUS, 0, 0, EXPORT_SIZE as u32));
    b.extend(request(
        NBD_CMD_BLOCK_STATUS,
        NBD_CMD_FLAG_REQ_ONE,
        512,
        4096,
    ));
    b.extend(request(NBD_CMD_TRIM, 0, 8192, 4096));
    b.extend(request(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, 1024));
    b.extend(request(NBD_CMD_CACHE, 0, 0, 65536));
    b.extend(request(
        NBD_CMD_READ,
        NBD_CMD_FLAG_DF,
        EXPORT_SIZE - 512,
        512,
    ));
    b.extend(request(NBD_CMD_FLUSH, 0, 0, 0));
    b.extend(request(NBD_CMD_DISC, 0, 0, 0));
    b
}

fn session_seeds() -> Vec<Vec<u8>> {
    let flags = (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES).to_be_bytes();
    let mut go = flags.to_vec();
    go.extend(option(NBD_OPT_STRUCTURED_REPLY, &[]));
    go.extend(option(
        NBD_OPT_LIST_META_CONTEXT,
        &meta_data("", &["base:"]),
    ));
    go.extend(option(
        NBD_OPT_SET_META_CONTEXT,
        &meta_data("", &[BASE_ALLOCATION]),
    ));
    go.extend(option(NBD_OPT_LIST, &[]));
    go.extend(option(NBD_OPT_STARTTLS, &[]));
    go.extend(option(NBD_OPT_INFO, &info_data("disk", &[0, 1, 2, 3])));
    go.extend(option(NBD_OPT_GO, &info_data("", &[NBD_INFO_BLOCK_SIZE])));
    go.extend(requests());

    let mut old = NBD_FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    old.extend(option(NBD_OPT_EXPORT_NAME, b"disk"));
    old.extend(requests());

    let mut abort = flags.to_vec();
    abort.extend(option(NBD_OPT_INFO, &info_data("nope", &[])));
    abort.extend(option(99, b"unknown option"));
    abort.extend(option(NBD_OPT_ABORT, &[]));
    vec![go, old, abort]
}

fn exports() -> Exports {
    let disk = Arc::new(MemorySource::new(EXPORT_SIZE));
    // A single export also answers to the default name "".
    Exports::single(Export::new("disk", "fuzzed disk", disk)).expect("one export")
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
}

/// Sessions that got through the handshake into transmission (to show the fuzzer gets there).
static TRANSMITTED: AtomicU64 = AtomicU64::new(0);

/// Plays `input` as everything a client sends; the session must end within the deadline.
fn check_session(input: &[u8]) -> Result<(), TestCaseError> {
    let exports = exports();
    let ended = RUNTIME.with(|rt| {
        // The timer must be made inside the runtime: hence the outer async block.
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), async {
                let mut io = tokio::io::join(input, tokio::io::sink());
                let Ok(mut session) = greet(&mut io, false).await else {
                    return;
                };
                let Ok(Step::Transmit(neg)) = haggle(&mut io, &exports, &mut session).await else {
                    return;
                };
                let (r, _) = io.into_inner();
                TRANSMITTED.fetch_add(1, Ordering::Relaxed);
                let rest = std::io::Cursor::new(r.to_vec());
                let (_stop, shutdown) = tokio::sync::watch::channel(false);
                let limits = Limits {
                    max_in_flight: 8,
                    max_buffered_bytes: MAX_PAYLOAD as usize,
                    idle_timeout: Some(Duration::from_secs(5)),
                    reply_timeout: Duration::from_secs(5),
                };
                let _ = transmit(rest, tokio::io::sink(), neg, limits, shutdown).await;
            })
            .await
        })
    });
    prop_assert!(ended.is_ok(), "the session did not end within 10 s");
    Ok(())
}

#[test]
fn nbd_sessions() {
    run_target("nbd_sessions", inputs(session_seeds(), 400), check_session);
    eprintln!(
        "fuzz nbd_sessions: {} sessions reached transmission",
        TRANSMITTED.load(Ordering::Relaxed)
    );
}

fn check_option_data(data: &[u8]) -> Result<(), TestCaseError> {
    if let Some((name, items)) = parse_info_request(data) {
        prop_assert!(name.len() <= MAX_STRING);
        prop_assert_eq!(info_data(&name, &items), data);
    }
    if let Some((name, queries)) = parse_meta_request(data) {
        prop_assert!(name.len() <= MAX_STRING);
        let q: Vec<&str> = queries.iter().map(String::as_str).collect();
        prop_assert_eq!(meta_data(&name, &q), data);
    }
    Ok(())
}

#[test]
fn nbd_option_data() {
    let seeds = vec![
        info_data("", &[]),
        info_data("disk", &[0, 1, 2, 3]),
        meta_data("", &[BASE_ALLOCATION]),
        meta_data("disk", &["base:", "qemu:dirty-bitmap:x"]),
    ];
    run_target("nbd_option_data", inputs(seeds, 200), check_option_data);
}

fn check_request_header(b: &[u8]) -> Result<(), TestCaseError> {
    let mut head = [0u8; REQUEST_HEADER_LEN];
    let n = b.len().min(REQUEST_HEADER_LEN);
    head[..n].copy_from_slice(&b[..n]);
    if let Some(req) = Request::parse(&head) {
        prop_assert_eq!(req.encode(), head);
    }
    Ok(())
}

#[test]
fn nbd_request_headers() {
    let seeds = vec![
        request(NBD_CMD_READ, 0, 0, 4096),
        request(NBD_CMD_WRITE, 1, u64::MAX, u32::MAX),
        request(NBD_CMD_BLOCK_STATUS, 8, 512, 0),
    ];
    run_target(
        "nbd_request_headers",
        inputs(seeds, 40),
        check_request_header,
    );
}

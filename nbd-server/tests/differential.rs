//! Differential test: a random, pipelined script of reads, writes, trims,
//! write-zeroes and block-status queries, sent by a raw client to a
//! MemorySource and applied to a plain in-memory model; every read and every
//! zero claim of block status must agree with the model.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use nbd_server::proto::*;
use nbd_server::MemorySource;

/// Not a multiple of 4096, to exercise the short last block.
const SIZE: u64 = 256 * 1024 + 123;

struct Model {
    bytes: Vec<u8>,
    /// False where a trim left the contents unspecified.
    known: Vec<bool>,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Read,
    Write,
    Trim,
    Zero { no_hole: bool },
    Status { req_one: bool },
}

fn run_script(seed: u64, structured: bool, batches: usize) {
    let mem = Arc::new(MemorySource::new(SIZE));
    let srv = TestServer::single("disk", mem.clone());
    let mut c = RawClient::connect(srv.port);
    let (size, _) = c.go("disk", structured);
    assert_eq!(size, SIZE);
    let mut model = Model {
        bytes: vec![0; SIZE as usize],
        known: vec![true; SIZE as usize],
    };
    let mut rng = Rng(seed);
    let mut handle = 0u64;
    for batch in 0..batches {
        // Ops in one batch touch disjoint ranges, so any execution and reply
        // order the server picks gives the same result.
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut pending: HashMap<u64, (Op, u64, u32, Vec<u8>)> = HashMap::new();
        for _ in 0..1 + rng.below(12) {
            let op = match rng.below(10) {
                0..=3 => Op::Read,
                4..=6 => Op::Write,
                7 => Op::Trim,
                8 => Op::Zero {
                    no_hole: rng.below(2) == 0,
                },
                _ if structured => Op::Status {
                    req_one: rng.below(3) == 0,
                },
                _ => Op::Read,
            };
            let len = match rng.below(4) {
                0 => 1 + rng.below(600),
                1 => 4096 * (1 + rng.below(4)),
                _ => 1 + rng.below(40_000),
            }
            .min(SIZE);
            let offset = if rng.below(4) == 0 {
                4096 * rng.below(SIZE / 4096)
            } else {
                rng.below(SIZE - len + 1)
            };
            let len = len.min(SIZE - offset);
            if taken
                .iter()
                .any(|&(o, l)| offset < o + l && o < offset + len)
            {
                continue;
            }
            taken.push((offset, len));
            handle += 1;
            let mut payload = Vec::new();
            let (kind, flags) = match op {
                Op::Read => (NBD_CMD_READ, 0),
                Op::Write => {
                    payload = vec![0u8; len as usize];
                    rng.fill(&mut payload);
                    (
                        NBD_CMD_WRITE,
                        if rng.below(4) == 0 {
                            NBD_CMD_FLAG_FUA
                        } else {
                            0
                        },
                    )
                }
                Op::Trim => (NBD_CMD_TRIM, 0),
                Op::Zero { no_hole } => (
                    NBD_CMD_WRITE_ZEROES,
                    if no_hole { NBD_CMD_FLAG_NO_HOLE } else { 0 },
                ),
                Op::Status { req_one } => (
                    NBD_CMD_BLOCK_STATUS,
                    if req_one { NBD_CMD_FLAG_REQ_ONE } else { 0 },
                ),
            };
            c.request(kind, flags, handle, offset, len as u32, &payload);
            pending.insert(handle, (op, offset, len as u32, payload));
        }
        let lens: HashMap<u64, (u64, u32)> = pending
            .iter()
            .map(|(h, (op, o, l, _))| (*h, (*o, if matches!(op, Op::Read) { *l } else { 0 })))
            .collect();
        for _ in 0..pending.len() {
            let r = c.reply(&|h| lens.get(&h).copied().unwrap_or((0, 0)));
            let (op, offset, len, payload) = pending
                .remove(&r.handle)
                .expect("reply to an unknown handle");
            assert_eq!(r.error, 0, "batch {batch}: {op:?} at {offset}+{len} failed");
            let range = offset as usize..(offset + len as u64) as usize;
            match op {
                Op::Read => {
                    assert_eq!(r.data.len(), len as usize);
                    for (i, pos) in range.enumerate() {
                        if model.known[pos] {
                            assert_eq!(
                                r.data[i], model.bytes[pos],
                                "seed {seed} batch {batch}: byte {pos} differs"
                            );
                        }
                    }
                }
                Op::Write => {
                    model.bytes[range.clone()].copy_from_slice(&payload);
                    model.known[range].fill(true);
                }
                Op::Trim => model.known[range].fill(false),
                Op::Zero { .. } => {
                    model.bytes[range.clone()].fill(0);
                    model.known[range].fill(true);
                }
                Op::Status { req_one } => {
                    assert!(!r.extents.is_empty());
                    if req_one {
                        assert_eq!(r.extents.len(), 1);
                    }
                    let mut pos = offset;
                    for &(l, flags) in &r.extents {
                        assert!(l > 0);
                        if flags & NBD_STATE_ZERO != 0 {
                            for p in pos..pos + l as u64 {
                                let p = p as usize;
                                assert!(
                                    !model.known[p] || model.bytes[p] == 0,
                                    "seed {seed}: zero extent at {p} holds data"
                                );
                            }
                        }
                        pos += l as u64;
                    }
                    assert!(pos <= offset + len as u64, "extents exceed the request");
                }
            }
        }
    }
    // Final full comparison through the source itself.
    let actual = mem.to_vec();
    for (pos, (&a, &m)) in actual.iter().zip(&model.bytes).enumerate() {
        if model.known[pos] {
            assert_eq!(a, m, "seed {seed}: final byte {pos} differs");
        }
    }
    c.request(NBD_CMD_DISC, 0, 0, 0, 0, &[]);
    assert!(c.is_closed());
}

#[test]
fn random_scripts_match_the_model_with_structured_replies() {
    for seed in [1, 2, 3, 0xdead_beef] {
        run_script(seed, true, 300);
    }
}

#[test]
fn random_scripts_match_the_model_with_simple_replies() {
    for seed in [11, 12] {
        run_script(seed, false, 300);
    }
}

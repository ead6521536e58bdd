//! Throughput of each stage of a stripe's way to shards, and the codec choice.
//!
//! `cargo bench -p sa-core --bench pipeline` — compares, in one run, the Reed-Solomon crate we use
//! (reed-solomon-simd, through `sa_core::codec::Codec`) against reed-solomon-erasure for k=4 m=2
//! with 1 MiB shards: encode, and decode with two data shards lost (what a restore with two agents
//! down does).

// criterion_group! generates an undocumented pub fn.
#![allow(missing_docs)]

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use sa_core::codec::Codec;
use sa_core::keys::MasterKey;
use sa_core::layout::Layout;
use sa_core::seal::SEAL_CHUNKED;
use sa_core::stripe::StripeCodec;

const SHARD: usize = 1 << 20;
const K: usize = 4;
const M: usize = 2;

fn data() -> Vec<Vec<u8>> {
    let mut x = blake3::Hasher::new().update(b"bench").finalize_xof();
    (0..K)
        .map(|_| {
            let mut v = vec![0u8; SHARD];
            x.fill(&mut v);
            v
        })
        .collect()
}

fn codecs(c: &mut Criterion) {
    let data = data();
    let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
    let mut g = c.benchmark_group("rs_k4m2_1MiB");
    g.throughput(Throughput::Bytes((K * SHARD) as u64));
    g.sample_size(20);

    // Both decoders get the same work: clone the surviving shards, rebuild two data shards.
    let ours = Codec::new(K, M).unwrap();
    g.bench_function("simd_encode", |b| b.iter(|| black_box(ours.encode(&refs))));
    let parity = ours.encode(&refs);
    g.bench_function("simd_decode_2_lost", |b| {
        b.iter(|| {
            let mut shards: Vec<Option<Vec<u8>>> = data
                .iter()
                .chain(parity.iter())
                .cloned()
                .map(Some)
                .collect();
            shards[0] = None;
            shards[2] = None;
            ours.reconstruct_data(&mut shards).unwrap();
            black_box(shards)
        })
    });

    let rse = reed_solomon_erasure::galois_8::ReedSolomon::new(K, M).unwrap();
    g.bench_function("erasure_encode", |b| {
        b.iter(|| {
            let mut p = vec![vec![0u8; SHARD]; M];
            rse.encode_sep(&refs, &mut p).unwrap();
            black_box(p)
        })
    });
    let mut rse_parity = vec![vec![0u8; SHARD]; M];
    rse.encode_sep(&refs, &mut rse_parity).unwrap();
    g.bench_function("erasure_decode_2_lost", |b| {
        b.iter(|| {
            let mut shards: Vec<Option<Vec<u8>>> = data
                .iter()
                .chain(rse_parity.iter())
                .cloned()
                .map(Some)
                .collect();
            shards[0] = None;
            shards[2] = None;
            rse.reconstruct_data(&mut shards).unwrap();
            black_box(shards)
        })
    });
    g.finish();
}

fn stages(c: &mut Criterion) {
    let stripe: Vec<u8> = data().concat();
    let keys = Arc::new(MasterKey::from_bytes([1; 32]).derive());
    let layout = Layout::new(4 << 20, 4 << 20, 4, 2).unwrap();
    let sc = StripeCodec::new(keys.clone(), layout, [0; 16]).unwrap();
    let mut g = c.benchmark_group("stripe_4MiB");
    g.throughput(Throughput::Bytes(stripe.len() as u64));
    g.sample_size(20);
    g.bench_function("blake3_keyed_id", |b| {
        b.iter(|| black_box(keys.stripe_id(&stripe)))
    });
    let id = keys.stripe_id(&stripe);
    g.bench_function("aes256gcm_seal", |b| {
        b.iter(|| {
            let mut v = stripe.clone();
            keys.seal_stripe(&id, &mut v);
            black_box(v)
        })
    });
    g.bench_function("crc32c", |b| b.iter(|| black_box(crc32c::crc32c(&stripe))));
    g.bench_function("memcpy_baseline", |b| b.iter(|| black_box(stripe.clone())));
    g.bench_function("encode_whole_stripe", |b| {
        b.iter(|| black_box(sc.encode(id, stripe.clone())))
    });
    // Seal format 2 (chunks of 4 KiB, each with its tag): what snapshots write by default.
    let chunked = StripeCodec::new(
        keys.clone(),
        layout.with_seal(SEAL_CHUNKED).unwrap(),
        [0; 16],
    )
    .unwrap();
    let cid = chunked.stripe_id(&stripe);
    g.bench_function("encode_whole_stripe_chunked", |b| {
        b.iter(|| black_box(chunked.encode(cid, stripe.clone())))
    });
    g.finish();
}

criterion_group!(benches, codecs, stages);
criterion_main!(benches);

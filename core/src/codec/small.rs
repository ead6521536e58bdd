//! Rebuilding a small range of one data shard without running the Reed-Solomon decoder.
//!
//! `reed-solomon-simd` pays a fixed cost per decode whatever the shard length: it evaluates the
//! erasure locator polynomial over the whole field (GF(2¹⁶)), about 140 µs on this project's
//! machines. For a whole 1 MiB shard that is noise; for the 4 KiB ranges a degraded random read
//! rebuilds (issue 18) it was a fifth of all the CPU the machine spent.
//!
//! The code is linear, and it works symbol by symbol: each 16-bit symbol of the rebuilt shard
//! depends only on the symbols at the same position in the `k` shards it is rebuilt from, through
//! the same map at every position. Multiplication by a field constant is linear over GF(2), so
//! each helper's contribution is a 16×16 bit matrix, applied here as two 256-entry tables (the
//! symbol's low byte and its high byte). The matrices are not computed from field arithmetic of
//! our own: they are read off the real decoder, by decoding one 64-byte block in which a helper's
//! symbol `t` is the bit `1 << t` and every other helper is zero. So they are the decoder's own
//! map by construction, and the tests check them against it on random data.
//!
//! Symbol layout (the crate's): shards are processed in 64-byte blocks; in each, bytes `0..32`
//! are the low bytes and bytes `32..64` the high bytes of 32 symbols.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use reed_solomon_simd::ReedSolomonDecoder;

use crate::error::{Error, Result};

/// Shard lengths up to this are rebuilt with tables; longer ones go through the decoder, whose
/// SIMD kernels win once the fixed cost is spread over enough bytes.
pub const SMALL_MAX: usize = 64 * 1024;

/// Erasure patterns kept per codec (a `k = 4, m = 2` codec has at most 60).
const KEPT_PATTERNS: usize = 1024;

/// The map that rebuilds data shard `want` from the shards `helpers`.
pub struct Pattern {
    helpers: Vec<usize>,
    /// Per helper: contribution of each value of its symbol's low byte, then of its high byte.
    tables: Vec<([u16; 256], [u16; 256])>,
}

/// A pattern's key: the shard rebuilt, and the shards it is rebuilt from.
type PatternKey = (usize, Vec<usize>);

/// Patterns already read off the decoder, by `(want, helpers)`.
#[derive(Default)]
pub struct Patterns {
    kept: Mutex<HashMap<PatternKey, Arc<Pattern>>>,
}

impl Patterns {
    /// The map for rebuilding `want` from `helpers` (`k` shard indices of a `k + m` code, in
    /// increasing order), read off the decoder the first time.
    pub fn get(&self, k: usize, m: usize, want: usize, helpers: &[usize]) -> Result<Arc<Pattern>> {
        let key = (want, helpers.to_vec());
        if let Some(p) = self
            .kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return Ok(p.clone());
        }
        let p = Arc::new(Pattern::read_off(k, m, want, helpers)?);
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() >= KEPT_PATTERNS {
            kept.clear();
        }
        kept.insert(key, p.clone());
        Ok(p)
    }
}

/// A 64-byte block whose symbol `t` (0..16) is `1 << t`, the other 16 symbols zero.
fn unit_block() -> [u8; 64] {
    let mut b = [0u8; 64];
    for t in 0..8 {
        b[t] = 1 << t;
        b[32 + 8 + t] = 1 << t;
    }
    b
}

impl Pattern {
    /// Decodes, once per helper, a block where that helper holds [`unit_block`] and the others
    /// zero: symbol `t` of the rebuilt block is the helper's matrix applied to bit `t`.
    fn read_off(k: usize, m: usize, want: usize, helpers: &[usize]) -> Result<Pattern> {
        let failed = |e: reed_solomon_simd::Error| {
            Error::ShardCorrupt(format!("reading off the rebuild of shard {want}: {e}"))
        };
        let zero = [0u8; 64];
        let unit = unit_block();
        let mut dec = ReedSolomonDecoder::new(k, m, 64).map_err(failed)?;
        let mut tables = Vec::with_capacity(helpers.len());
        for &probe in helpers {
            dec.reset(k, m, 64).map_err(failed)?;
            for &h in helpers {
                let block: &[u8] = if h == probe { &unit } else { &zero };
                if h < k {
                    dec.add_original_shard(h, block).map_err(failed)?;
                } else {
                    dec.add_recovery_shard(h - k, block).map_err(failed)?;
                }
            }
            let out = dec.decode().map_err(failed)?;
            let block = out
                .restored_original(want)
                .ok_or_else(|| Error::ShardCorrupt(format!("shard {want} was not rebuilt")))?;
            let column = |t: usize| u16::from(block[t]) | u16::from(block[32 + t]) << 8;
            let mut lo = [0u16; 256];
            let mut hi = [0u16; 256];
            for v in 1..256usize {
                let bit = v.trailing_zeros() as usize;
                let rest = v & (v - 1);
                lo[v] = lo[rest] ^ column(bit);
                hi[v] = hi[rest] ^ column(8 + bit);
            }
            tables.push((lo, hi));
        }
        Ok(Pattern {
            helpers: helpers.to_vec(),
            tables,
        })
    }

    /// Rebuilds the shard from `shards` (`k + m` entries; every helper present, all of one
    /// length, a multiple of 64).
    pub fn apply(&self, shards: &[Option<&[u8]>]) -> Result<Vec<u8>> {
        let parts: Vec<&[u8]> = self
            .helpers
            .iter()
            .map(|&h| shards.get(h).copied().flatten())
            .collect::<Option<_>>()
            .ok_or_else(|| Error::Invalid("a helper shard is missing".into()))?;
        let len = parts.first().map_or(0, |p| p.len());
        if !len.is_multiple_of(64) || parts.iter().any(|p| p.len() != len) {
            return Err(Error::ShardCorrupt(
                "shard ranges must be of one length, a multiple of 64 bytes".into(),
            ));
        }
        let mut out = vec![0u8; len];
        for (at, block) in out.chunks_exact_mut(64).enumerate() {
            let base = at * 64;
            let mut acc = [0u16; 32];
            for (p, (lo, hi)) in parts.iter().zip(&self.tables) {
                let src = &p[base..base + 64];
                for t in 0..32 {
                    acc[t] ^= lo[src[t] as usize] ^ hi[src[32 + t] as usize];
                }
            }
            for t in 0..32 {
                block[t] = acc[t] as u8;
                block[32 + t] = (acc[t] >> 8) as u8;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every data shard, rebuilt from every set of k others, equals what the decoder rebuilds,
    /// on random bytes (and equals the original).
    #[test]
    fn tables_rebuild_what_the_decoder_rebuilds() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        };
        for (k, m) in [(4, 2), (3, 3), (6, 2), (2, 2)] {
            let n = k + m;
            let len = 64 * 9;
            let data: Vec<Vec<u8>> = (0..k).map(|_| (0..len).map(|_| rnd()).collect()).collect();
            let refs: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
            let parity = reed_solomon_simd::encode(k, m, &refs).unwrap();
            let all: Vec<&[u8]> = refs
                .iter()
                .copied()
                .chain(parity.iter().map(Vec::as_slice))
                .collect();
            let patterns = Patterns::default();
            for mask in 0u32..(1 << n) {
                if mask.count_ones() as usize != k {
                    continue;
                }
                let helpers: Vec<usize> = (0..n).filter(|i| mask & (1 << i) != 0).collect();
                for want in (0..k).filter(|w| !helpers.contains(w)) {
                    let shards: Vec<Option<&[u8]>> = (0..n)
                        .map(|i| helpers.contains(&i).then_some(all[i]))
                        .collect();
                    let p = patterns.get(k, m, want, &helpers).unwrap();
                    let got = p.apply(&shards).unwrap();
                    assert_eq!(
                        got, data[want],
                        "k={k} m={m} helpers={helpers:?} want={want}"
                    );
                }
            }
        }
    }

    #[test]
    fn ragged_ranges_are_refused() {
        let patterns = Patterns::default();
        let p = patterns.get(4, 2, 0, &[1, 2, 3, 4]).unwrap();
        let a = [0u8; 64];
        let b = [0u8; 128];
        let shards = [
            None,
            Some(&a[..]),
            Some(&a[..]),
            Some(&b[..]),
            Some(&a[..]),
            None,
        ];
        assert!(p.apply(&shards).is_err());
        let shards = [None, Some(&a[..]), None, Some(&a[..]), Some(&a[..]), None];
        assert!(p.apply(&shards).is_err());
    }
}

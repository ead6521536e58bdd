//! Stripe layout: how a volume is cut into stripes and each stripe into `k + m` shards,
//! and (by equal rotation, see [`crate::placement`] for placement by room) where the shards of a
//! stripe go.

use crate::error::{Error, Result};
use crate::seal::{sealed_len, CHUNK_LEN, SEALED_CHUNK_LEN, SEAL_CHUNKED, SEAL_WHOLE};

/// Sector size: volumes and stripes are whole multiples of it.
pub const SECTOR: u64 = 512;
/// Largest number of shards per stripe (k + m).
pub const MAX_SHARDS: usize = 64;

/// How a volume is cut up. Stored in every manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Bytes in the volume.
    pub volume_size: u64,
    /// Bytes per stripe (the last stripe may be shorter).
    pub stripe_size: u32,
    /// Data shards per stripe.
    pub k: u8,
    /// Parity shards per stripe.
    pub m: u8,
    /// How stripes are sealed ([`crate::seal`]: [`SEAL_WHOLE`] or [`SEAL_CHUNKED`]).
    pub seal: u8,
}

/// Where a byte range of a stripe lies in its data shards (seal format 2): the sealed chunks
/// that cover it, and the pieces of data shards that hold them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangePlan {
    /// First chunk covered.
    pub first_chunk: usize,
    /// Chunks in the stripe.
    pub chunks: usize,
    /// Offset of the range's first byte in the plaintext of the covered chunks.
    pub skip: usize,
    /// `(data shard index, offset in its payload, length)`, in stripe order; their bytes back to
    /// back are the covered sealed chunks.
    pub pieces: Vec<(usize, usize, usize)>,
}

impl Layout {
    /// Checks the parameters and builds a layout, sealed in the current format
    /// ([`SEAL_CHUNKED`]; [`Layout::with_seal`] picks another).
    pub fn new(volume_size: u64, stripe_size: u32, k: u8, m: u8) -> Result<Self> {
        if k == 0 {
            return Err(Error::Invalid("data shards (k) must be at least 1".into()));
        }
        if m == 0 {
            return Err(Error::Invalid(
                "parity shards (m) must be at least 1, or losing one agent loses data".into(),
            ));
        }
        if k as usize + m as usize > MAX_SHARDS {
            return Err(Error::Invalid(format!(
                "k + m must be at most {MAX_SHARDS}"
            )));
        }
        if !(64 * 1024..=64 << 20).contains(&stripe_size)
            || !(stripe_size as u64).is_multiple_of(SECTOR)
        {
            return Err(Error::Invalid(format!(
                "stripe size {stripe_size} must be a multiple of 512 between 64 KiB and 64 MiB"
            )));
        }
        if !volume_size.is_multiple_of(SECTOR) {
            return Err(Error::Invalid(format!(
                "volume size {volume_size} is not a multiple of {SECTOR} bytes: not a disk image?"
            )));
        }
        Ok(Layout {
            volume_size,
            stripe_size,
            k,
            m,
            seal: SEAL_CHUNKED,
        })
    }

    /// The same layout with seal format `seal` (1 or 2).
    pub fn with_seal(self, seal: u8) -> Result<Self> {
        if seal != SEAL_WHOLE && seal != SEAL_CHUNKED {
            return Err(Error::Invalid(format!(
                "stripe seal format {seal} is unknown (this build knows {SEAL_WHOLE} and {SEAL_CHUNKED})"
            )));
        }
        Ok(Layout { seal, ..self })
    }

    /// Where plaintext bytes `from..to` of a stripe of `plain_len` bytes lie in its data shards
    /// (seal format 2 only: None for format 1, whose stripes are read whole).
    pub fn range_plan(&self, plain_len: usize, from: usize, to: usize) -> Option<RangePlan> {
        if self.seal != SEAL_CHUNKED || from >= to || to > plain_len {
            return None;
        }
        let chunks = plain_len.div_ceil(CHUNK_LEN);
        let first_chunk = from / CHUNK_LEN;
        let last_chunk = (to - 1) / CHUNK_LEN;
        let start = first_chunk * SEALED_CHUNK_LEN;
        let end = ((last_chunk + 1) * SEALED_CHUNK_LEN).min(sealed_len(self.seal, plain_len));
        let shard = self.shard_len(plain_len);
        let mut pieces = Vec::new();
        let mut at = start;
        while at < end {
            let (idx, off) = (at / shard, at % shard);
            let len = (shard - off).min(end - at);
            pieces.push((idx, off, len));
            at += len;
        }
        Some(RangePlan {
            first_chunk,
            chunks,
            skip: from - first_chunk * CHUNK_LEN,
            pieces,
        })
    }

    /// Total shards per stripe.
    pub fn shards(&self) -> usize {
        self.k as usize + self.m as usize
    }

    /// Number of stripes (the last may be short).
    pub fn stripe_count(&self) -> u64 {
        self.volume_size.div_ceil(self.stripe_size as u64)
    }

    /// Byte offset of stripe `i` in the volume.
    pub fn stripe_offset(&self, i: u64) -> u64 {
        i * self.stripe_size as u64
    }

    /// Plaintext length of stripe `i`.
    pub fn stripe_len(&self, i: u64) -> usize {
        let start = self.stripe_offset(i);
        (self.volume_size - start).min(self.stripe_size as u64) as usize
    }

    /// Length of each shard of a stripe whose plaintext is `plain_len` bytes: the sealed
    /// stripe (plaintext + AEAD tags, [`sealed_len`]) split in `k` equal parts, rounded up to a
    /// multiple of 64 bytes (the codec needs even lengths and runs fastest on 64-byte
    /// multiples), the tail zero-padded.
    pub fn shard_len(&self, plain_len: usize) -> usize {
        sealed_len(self.seal, plain_len)
            .div_ceil(self.k as usize)
            .next_multiple_of(64)
    }

    /// The stripe that holds byte `offset`.
    pub fn stripe_of(&self, offset: u64) -> u64 {
        offset / self.stripe_size as u64
    }
}

/// Equal-share rotation: the `k + m` shards of stripe `i` go to `k + m` distinct agents out of
/// `agents`, rotating the start so every agent gets an equal share (within one shard per
/// stripe) of data and parity shards alike. Returns the agent slot per shard index.
///
/// Snapshots place by room instead ([`crate::placement::Placement`], which gives this same
/// balance when every agent has the same room); this stays as the reference it is tested
/// against.
pub fn rotate_placement(stripe: u64, shards: usize, agents: usize) -> Vec<u16> {
    debug_assert!(shards <= agents);
    let start = ((stripe * shards as u64) % agents as u64) as usize;
    (0..shards).map(|j| ((start + j) % agents) as u16).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_cover_volume() {
        let l = Layout::new(10 * 1024 * 1024 + 512, 4 << 20, 4, 2)
            .unwrap()
            .with_seal(SEAL_WHOLE)
            .unwrap();
        assert_eq!(l.stripe_count(), 3);
        assert_eq!(l.stripe_len(2), 2 * 1024 * 1024 + 512);
        assert_eq!(l.shard_len(4 << 20), (4 << 20) / 4 + 64);
        assert_eq!(l.stripe_of(8 << 20), 2);
        let c = l.with_seal(SEAL_CHUNKED).unwrap();
        // 1024 tags of 16 bytes over 4 data shards.
        assert_eq!(c.shard_len(4 << 20), (4 << 20) / 4 + 4096);
        assert!(l.with_seal(3).is_err());
    }

    #[test]
    fn range_plans_cover_the_sealed_chunks() {
        let l = Layout::new(16 << 20, 4 << 20, 4, 2).unwrap();
        let plain = 4 << 20;
        let shard = l.shard_len(plain);
        assert!(Layout::new(16 << 20, 4 << 20, 4, 2)
            .unwrap()
            .with_seal(SEAL_WHOLE)
            .unwrap()
            .range_plan(plain, 0, 4096)
            .is_none());
        // One 4 KiB block at a chunk boundary: one sealed chunk from one shard.
        let p = l.range_plan(plain, 8192, 12288).unwrap();
        assert_eq!((p.first_chunk, p.chunks, p.skip), (2, 1024, 0));
        assert_eq!(p.pieces, vec![(0, 2 * SEALED_CHUNK_LEN, SEALED_CHUNK_LEN)]);
        // Unaligned: two chunks.
        let p = l.range_plan(plain, 4000, 4200).unwrap();
        assert_eq!(p.skip, 4000);
        assert_eq!(p.pieces, vec![(0, 0, 2 * SEALED_CHUNK_LEN)]);
        // With k = 4 the chunks fit the shards exactly; with k = 3 one lies astride two.
        assert_eq!(shard % SEALED_CHUNK_LEN, 0);
        let l3 = Layout::new(16 << 20, 4 << 20, 3, 2).unwrap();
        let shard3 = l3.shard_len(plain);
        let j = shard3 / SEALED_CHUNK_LEN;
        let p = l3
            .range_plan(plain, j * CHUNK_LEN, j * CHUNK_LEN + 10)
            .unwrap();
        let before = shard3 - j * SEALED_CHUNK_LEN;
        assert!(before > 0);
        assert_eq!(
            p.pieces,
            vec![
                (0, j * SEALED_CHUNK_LEN, before),
                (1, 0, SEALED_CHUNK_LEN - before)
            ]
        );
        // The last chunk of a short stripe.
        let p = l.range_plan(6144, 5000, 6144).unwrap();
        assert_eq!((p.first_chunk, p.chunks), (1, 2));
        let total: usize = p.pieces.iter().map(|x| x.2).sum();
        assert_eq!(total, 2048 + crate::seal::TAG_LEN);
        assert!(l.range_plan(plain, 10, 10).is_none());
        assert!(l.range_plan(plain, 0, plain + 1).is_none());
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(Layout::new(1000, 4 << 20, 4, 2).is_err());
        assert!(Layout::new(4096, 4 << 20, 0, 2).is_err());
        assert!(Layout::new(4096, 4 << 20, 4, 0).is_err());
        assert!(Layout::new(4096, 1000, 4, 2).is_err());
    }

    #[test]
    fn placement_is_distinct_and_fair() {
        for agents in 6..10 {
            let mut count = vec![0usize; agents];
            for s in 0..(agents as u64 * 10) {
                let p = rotate_placement(s, 6, agents);
                let mut sorted = p.clone();
                sorted.sort();
                sorted.dedup();
                assert_eq!(sorted.len(), 6, "distinct agents");
                for a in p {
                    count[a as usize] += 1;
                }
            }
            let (min, max) = (count.iter().min().unwrap(), count.iter().max().unwrap());
            assert!(max - min <= 1, "fair share {count:?}");
        }
    }
}

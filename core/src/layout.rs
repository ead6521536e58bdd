//! Stripe layout: how a volume is cut into stripes and each stripe into `k + m` shards,
//! and (by equal rotation, see [`crate::placement`] for placement by room) where the shards of a
//! stripe go.

use crate::error::{Error, Result};
use crate::seal::TAG_LEN;

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
}

impl Layout {
    /// Checks the parameters and builds a layout.
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

    /// Length of each shard of a stripe whose plaintext is `plain_len` bytes: the
    /// ciphertext (plaintext + AEAD tag) split in `k` equal parts, rounded up to a multiple of
    /// 64 bytes (the codec needs even lengths and runs fastest on 64-byte multiples), the tail
    /// zero-padded.
    pub fn shard_len(&self, plain_len: usize) -> usize {
        (plain_len + TAG_LEN)
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
        let l = Layout::new(10 * 1024 * 1024 + 512, 4 << 20, 4, 2).unwrap();
        assert_eq!(l.stripe_count(), 3);
        assert_eq!(l.stripe_len(2), 2 * 1024 * 1024 + 512);
        assert_eq!(l.shard_len(4 << 20), (4 << 20) / 4 + 64);
        assert_eq!(l.stripe_of(8 << 20), 2);
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

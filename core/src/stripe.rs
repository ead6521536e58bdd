//! A stripe's way to shards and back: hash, encrypt, split, add parity, frame — and the reverse.
//!
//! This is the CPU-heavy part of every command; callers run it off the async reactor
//! (`spawn_blocking` or a thread pool).

use std::sync::Arc;

use crate::codec::Codec;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::layout::Layout;
use crate::layout::RangePlan;
use crate::seal::{sealed_len, StripeId, SEAL_CHUNKED, TAG_LEN};
use crate::shard::{encode_shard, open_shard, ShardKey, VolumeId, SHARD_HEADER_LEN};

/// Encodes and decodes the stripes of one volume under one key and layout.
pub struct StripeCodec {
    keys: Arc<Keys>,
    layout: Layout,
    volume: VolumeId,
    codec: Codec,
}

/// A checked shard file; its payload follows the header (kept in place: no copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payload(Vec<u8>);

impl Payload {
    /// The payload bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0[SHARD_HEADER_LEN..]
    }

    /// Bytes of the whole shard file, header and payload.
    pub fn file_len(&self) -> usize {
        self.0.len()
    }

    /// The whole checked shard file, header and payload (to store it elsewhere as it is).
    pub fn into_file(self) -> Vec<u8> {
        self.0
    }
}

/// A stripe ready to upload: its id and one framed shard file per shard index.
pub struct EncodedStripe {
    /// The stripe's id.
    pub id: StripeId,
    /// Framed shard files, index `0..k+m`.
    pub shards: Vec<Vec<u8>>,
}

impl StripeCodec {
    /// A codec for a volume.
    pub fn new(keys: Arc<Keys>, layout: Layout, volume: VolumeId) -> Result<Self> {
        let codec = Codec::new(layout.k as usize, layout.m as usize)?;
        Ok(StripeCodec {
            keys,
            layout,
            volume,
            codec,
        })
    }

    /// The layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The key of shard `index` of stripe `id`.
    pub fn key(&self, id: &StripeId, index: usize) -> ShardKey {
        ShardKey {
            volume: self.volume,
            stripe: *id,
            index: index as u8,
        }
    }

    /// The id a plaintext stripe will have (in this layout's seal format).
    pub fn stripe_id(&self, plain: &[u8]) -> StripeId {
        self.keys.stripe_id_for(self.layout.seal, plain)
    }

    /// Encrypts a stripe (given its id), splits it into `k` data shards, adds `m` parity shards
    /// and frames each.
    pub fn encode(&self, id: StripeId, mut buf: Vec<u8>) -> EncodedStripe {
        let shard_len = self.layout.shard_len(buf.len());
        let k = self.layout.k as usize;
        if self.layout.seal == SEAL_CHUNKED {
            let mut sealed = vec![0u8; shard_len * k];
            self.keys.seal_chunks(&id, &buf, &mut sealed);
            buf = sealed;
        } else {
            self.keys.seal_stripe(&id, &mut buf);
            buf.resize(shard_len * k, 0);
        }
        let data: Vec<&[u8]> = buf.chunks(shard_len).collect();
        let parity = self.codec.encode(&data);
        let (k8, m8) = (self.layout.k, self.layout.m);
        let shards = data
            .iter()
            .copied()
            .chain(parity.iter().map(|p| p.as_slice()))
            .enumerate()
            .map(|(i, payload)| encode_shard(&self.key(&id, i), k8, m8, payload))
            .collect();
        EncodedStripe { id, shards }
    }

    /// Checks a fetched shard file for shard `index` of stripe `id`.
    /// A failure means: treat this shard as missing.
    pub fn check(
        &self,
        id: &StripeId,
        index: usize,
        plain_len: usize,
        file: Vec<u8>,
    ) -> Result<Payload> {
        let key = self.key(id, index);
        let payload_len = open_shard(&file, &key, self.layout.k, self.layout.m)?.len();
        if payload_len != self.layout.shard_len(plain_len) {
            return Err(Error::ShardCorrupt(format!(
                "shard {} is {payload_len} bytes, expected {}",
                key.short(),
                self.layout.shard_len(plain_len)
            )));
        }
        Ok(Payload(file))
    }

    /// Rebuilds a stripe's plaintext from checked shard payloads (`k + m` entries, `None` for
    /// missing; any `k` present suffice), then decrypts and verifies it against its id.
    /// With every data shard present, the payloads are only copied once, into the plaintext.
    pub fn decode(
        &self,
        id: &StripeId,
        plain_len: usize,
        payloads: Vec<Option<Payload>>,
    ) -> Result<Vec<u8>> {
        self.decode_into(id, plain_len, payloads, Vec::new())
    }

    /// [`StripeCodec::decode`] into `buf` (cleared first; a recycled buffer saves an allocation
    /// and the page faults of fresh memory).
    pub fn decode_into(
        &self,
        id: &StripeId,
        plain_len: usize,
        payloads: Vec<Option<Payload>>,
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let k = self.layout.k as usize;
        buf.clear();
        buf.reserve(self.layout.shard_len(plain_len) * k);
        let pool = crate::pool::frames();
        if payloads.iter().take(k).all(Option::is_some) {
            for p in payloads.iter().take(k).flatten() {
                buf.extend_from_slice(p.as_slice());
            }
            payloads.into_iter().flatten().for_each(|p| pool.give(p.0));
        } else {
            // Present payloads are read in place, missing ones rebuilt straight into `buf`.
            let len = self.layout.shard_len(plain_len);
            buf.resize(len * k, 0);
            let refs: Vec<Option<&[u8]>> = payloads
                .iter()
                .map(|p| p.as_ref().map(Payload::as_slice))
                .collect();
            for (i, p) in refs.iter().take(k).enumerate() {
                if let Some(p) = p {
                    buf[i * len..(i + 1) * len].copy_from_slice(p);
                }
            }
            self.codec.reconstruct_with(&refs, |i, shard| {
                buf[i * len..(i + 1) * len].copy_from_slice(shard);
            })?;
            payloads.into_iter().flatten().for_each(|p| pool.give(p.0));
        }
        if self.layout.seal == SEAL_CHUNKED {
            buf.truncate(sealed_len(SEAL_CHUNKED, plain_len));
            self.keys.open_stripe_chunked(id, &mut buf)?;
        } else {
            buf.truncate(plain_len + TAG_LEN);
            self.keys.open_stripe(id, &mut buf)?;
        }
        Ok(buf)
    }

    /// Opens the sealed chunks a ranged read fetched (`sealed`: the bytes of `plan`'s pieces
    /// back to back) and returns plaintext bytes `from..to` of the stripe, the range the plan
    /// was made for. Every chunk's tag is checked; the stripe's whole-plaintext hash is not (it
    /// needs the whole stripe), so a tag is what vouches for each byte.
    pub fn open_range(
        &self,
        id: &StripeId,
        plan: &RangePlan,
        len: usize,
        mut sealed: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let plain = self
            .keys
            .open_chunks(id, plan.first_chunk, plan.chunks, &mut sealed)?;
        if plan.skip + len > plain {
            return Err(Error::AuthFailed(format!(
                "stripe {}: the chunks fetched hold {plain} bytes, {} wanted",
                crate::keys::hex(&id[..8]),
                plan.skip + len
            )));
        }
        sealed.truncate(plan.skip + len);
        sealed.drain(..plan.skip);
        Ok(sealed)
    }

    /// Rebuilds the same byte range of data shard `want` from that range of `k` other shards
    /// (`k + m` entries, `None` for absent; ranges of equal length, starting and ending on
    /// 64-byte boundaries of the shards: the codec works on 64-byte blocks).
    pub fn rebuild_shard_range(&self, parts: &[Option<&[u8]>], want: usize) -> Result<Vec<u8>> {
        if let Some(Some(p)) = parts.get(want) {
            return Ok(p.to_vec());
        }
        self.codec.rebuild_one(parts, want)
    }

    /// Recomputes the parity of complete data payloads (for `verify`).
    pub fn parity_of(&self, data: &[&[u8]]) -> Vec<Vec<u8>> {
        self.codec.encode(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;

    #[test]
    fn encode_decode_with_losses() {
        for seal in [crate::seal::SEAL_WHOLE, SEAL_CHUNKED] {
            encode_decode_with_losses_in(seal);
        }
    }

    #[test]
    fn ranges_of_a_chunked_stripe_read_from_the_data_shards() {
        let keys = Arc::new(MasterKey::from_bytes([1; 32]).derive());
        let layout = Layout::new(1 << 20, 256 * 1024, 3, 2).unwrap();
        let sc = StripeCodec::new(keys, layout, [7; 16]).unwrap();
        let plain: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7919 % 251) as u8).collect();
        let id = sc.stripe_id(&plain);
        let enc = sc.encode(id, plain.clone());
        let payload = |i: usize| &enc.shards[i][SHARD_HEADER_LEN..];
        for (from, to) in [
            (0, 4096),
            (4095, 4097),
            (100_000, 180_000),
            (250_000, 262_144),
        ] {
            let plan = layout.range_plan(plain.len(), from, to).unwrap();
            let mut sealed = Vec::new();
            for &(idx, off, len) in &plan.pieces {
                assert!(idx < 3, "data shards only");
                sealed.extend_from_slice(&payload(idx)[off..off + len]);
            }
            let got = sc
                .open_range(&id, &plan, to - from, sealed.clone())
                .unwrap();
            assert_eq!(got, &plain[from..to], "{from}..{to}");
            // Each piece rebuilt from the 64-byte-aligned same range of other shards, its own
            // and another data shard lost.
            for &(idx, off, len) in &plan.pieces {
                let (a, b) = (off / 64 * 64, (off + len).next_multiple_of(64));
                let parts: Vec<Option<&[u8]>> = (0..5)
                    .map(|j| (j != idx && j != (idx + 1) % 3).then(|| &payload(j)[a..b]))
                    .collect();
                let rebuilt = sc.rebuild_shard_range(&parts, idx).unwrap();
                assert_eq!(
                    &rebuilt[off - a..off - a + len],
                    &payload(idx)[off..off + len]
                );
            }
            let mut bad = sealed;
            bad[5] ^= 1;
            assert!(sc.open_range(&id, &plan, to - from, bad).is_err());
        }
    }

    fn encode_decode_with_losses_in(seal: u8) {
        let keys = Arc::new(MasterKey::from_bytes([1; 32]).derive());
        let layout = Layout::new(1 << 20, 256 * 1024, 4, 2)
            .unwrap()
            .with_seal(seal)
            .unwrap();
        let sc = StripeCodec::new(keys, layout, [7; 16]).unwrap();
        let plain: Vec<u8> = (0..200_000u32).map(|i| (i * 7919 % 251) as u8).collect();
        let id = sc.stripe_id(&plain);
        let enc = sc.encode(id, plain.clone());
        assert_eq!(enc.shards.len(), 6);
        let check = |i: usize, f: &Vec<u8>| sc.check(&id, i, plain.len(), f.clone()).unwrap();
        let whole: Vec<Option<Payload>> = enc
            .shards
            .iter()
            .enumerate()
            .map(|(i, f)| Some(check(i, f)))
            .collect();
        assert_eq!(
            sc.decode(&id, plain.len(), whole).unwrap(),
            plain,
            "no shard lost"
        );
        // Lose shards 0 and 3; corrupt none.
        let payloads: Vec<Option<Payload>> = enc
            .shards
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if i == 0 || i == 3 {
                    None
                } else {
                    Some(check(i, f))
                }
            })
            .collect();
        assert_eq!(sc.decode(&id, plain.len(), payloads).unwrap(), plain);
        // A flipped payload byte is caught by the check.
        let mut bad = enc.shards[1].clone();
        bad[SHARD_HEADER_LEN + 10] ^= 1;
        assert!(sc.check(&id, 1, plain.len(), bad).is_err());
        // Shard 2 offered as shard 1 is caught.
        assert!(sc
            .check(&id, 1, plain.len(), enc.shards[2].clone())
            .is_err());
    }
}

//! The shard file format: a fixed 96-byte header followed by the payload.
//!
//! ```text
//! offset size field
//!      0    8 magic "SA-SHARD"        (PLEASE DO NOT MODIFY: stored on agents)
//!      8    2 format version (1)
//!     10    2 header length (96)
//!     12    1 k
//!     13    1 m
//!     14    1 shard index (0..k data, k..k+m parity)
//!     15    1 flags (0)
//!     16   16 volume id
//!     32   32 stripe id
//!     64    4 payload length
//!     68    4 crc32c of payload
//!     72   20 reserved (zero)
//!     92    4 crc32c of bytes 0..92
//! ```
//! An agent checks both crc32c values without any key (scrub); a reader also checks that the
//! header names the shard it asked for.

use crate::error::{Error, Result};
use crate::keys::hex;
use crate::seal::StripeId;

/// Magic at the start of every shard file.
pub const SHARD_MAGIC: [u8; 8] = *b"SA-SHARD";
/// Current shard format version.
pub const SHARD_VERSION: u16 = 1;
/// Bytes in a shard header.
pub const SHARD_HEADER_LEN: usize = 96;
const _: () = assert!(SHARD_HEADER_LEN == 8 + 2 + 2 + 4 + 16 + 32 + 4 + 4 + 20 + 4);

/// A volume's id (keyed hash of its name).
pub type VolumeId = [u8; 16];

/// Where a shard belongs: volume, stripe, index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardKey {
    /// Volume id.
    pub volume: VolumeId,
    /// Stripe id.
    pub stripe: StripeId,
    /// Shard index within the stripe.
    pub index: u8,
}

impl ShardKey {
    /// The agent's file name for this shard, relative to its shard root:
    /// `VOLUME/SS/STRIPE.INDEX` (hex; `SS` = first stripe byte, to keep directories small).
    pub fn rel_path(&self) -> String {
        let s = hex(&self.stripe);
        format!("{}/{}/{}.{}", hex(&self.volume), &s[..2], s, self.index)
    }

    /// Short text for logs.
    pub fn short(&self) -> String {
        format!("{}.{}", hex(&self.stripe[..6]), self.index)
    }
}

/// A parsed shard header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardHeader {
    /// Data shards of the stripe.
    pub k: u8,
    /// Parity shards of the stripe.
    pub m: u8,
    /// Which shard this is.
    pub key: ShardKey,
    /// Payload bytes.
    pub payload_len: u32,
    /// crc32c of the payload.
    pub payload_crc: u32,
}

/// Builds a whole shard file: header + payload.
pub fn encode_shard(key: &ShardKey, k: u8, m: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = crate::pool::frames().take(SHARD_HEADER_LEN + payload.len());
    out.extend_from_slice(&SHARD_MAGIC);
    out.extend_from_slice(&SHARD_VERSION.to_le_bytes());
    out.extend_from_slice(&(SHARD_HEADER_LEN as u16).to_le_bytes());
    out.extend_from_slice(&[k, m, key.index, 0]);
    out.extend_from_slice(&key.volume);
    out.extend_from_slice(&key.stripe);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(payload).to_le_bytes());
    out.extend_from_slice(&[0u8; 20]);
    let hcrc = crc32c::crc32c(&out[..92]);
    out.extend_from_slice(&hcrc.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Parses and checks a shard header (magic, version, header crc). Does not read the payload.
pub fn parse_header(file: &[u8]) -> Result<ShardHeader> {
    if file.len() < SHARD_HEADER_LEN {
        return Err(Error::ShardCorrupt(format!(
            "{} bytes, shorter than a shard header",
            file.len()
        )));
    }
    if file[..8] != SHARD_MAGIC {
        return Err(Error::ShardCorrupt("bad magic: not a shard file".into()));
    }
    let version = u16::from_le_bytes([file[8], file[9]]);
    if version != SHARD_VERSION {
        return Err(Error::UnsupportedVersion {
            what: "shard",
            found: version,
            supported: SHARD_VERSION,
        });
    }
    let hcrc = u32::from_le_bytes([file[92], file[93], file[94], file[95]]);
    if hcrc != crc32c::crc32c(&file[..92]) {
        return Err(Error::ShardCorrupt("header checksum mismatch".into()));
    }
    let mut volume = [0u8; 16];
    volume.copy_from_slice(&file[16..32]);
    let mut stripe = [0u8; 32];
    stripe.copy_from_slice(&file[32..64]);
    Ok(ShardHeader {
        k: file[12],
        m: file[13],
        key: ShardKey {
            volume,
            stripe,
            index: file[14],
        },
        payload_len: u32::from_le_bytes([file[64], file[65], file[66], file[67]]),
        payload_crc: u32::from_le_bytes([file[68], file[69], file[70], file[71]]),
    })
}

/// Checks a whole shard file (header and payload crc32c) and returns its header.
/// Needs no key: this is what an agent's scrub runs.
pub fn check_shard(file: &[u8]) -> Result<ShardHeader> {
    let h = parse_header(file)?;
    let payload = &file[SHARD_HEADER_LEN..];
    if payload.len() != h.payload_len as usize {
        return Err(Error::ShardCorrupt(format!(
            "payload is {} bytes, header says {} (truncated?)",
            payload.len(),
            h.payload_len
        )));
    }
    if crc32c::crc32c(payload) != h.payload_crc {
        return Err(Error::ShardCorrupt("payload crc32c mismatch".into()));
    }
    Ok(h)
}

/// Checks a shard file fetched for `want` and returns its payload.
pub fn open_shard<'a>(file: &'a [u8], want: &ShardKey, k: u8, m: u8) -> Result<&'a [u8]> {
    let h = check_shard(file)?;
    if h.key != *want || h.k != k || h.m != m {
        return Err(Error::ShardCorrupt(format!(
            "holds shard {} instead of {}",
            h.key.short(),
            want.short()
        )));
    }
    Ok(&file[SHARD_HEADER_LEN..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ShardKey {
        ShardKey {
            volume: [1; 16],
            stripe: [2; 32],
            index: 3,
        }
    }

    #[test]
    fn round_trip() {
        let f = encode_shard(&key(), 4, 2, b"payload bytes");
        assert_eq!(f.len(), SHARD_HEADER_LEN + 13);
        let h = check_shard(&f).unwrap();
        assert_eq!(h.key, key());
        assert_eq!((h.k, h.m), (4, 2));
        assert_eq!(open_shard(&f, &key(), 4, 2).unwrap(), b"payload bytes");
    }

    #[test]
    fn every_corruption_is_caught() {
        let f = encode_shard(&key(), 4, 2, &[9u8; 1000]);
        for pos in 0..f.len() {
            let mut g = f.clone();
            g[pos] ^= 0x10;
            assert!(
                open_shard(&g, &key(), 4, 2).is_err(),
                "flip at {pos} undetected"
            );
        }
        assert!(check_shard(&f[..f.len() - 1]).is_err(), "truncation");
        assert!(check_shard(&f[..50]).is_err(), "short header");
        let mut other = key();
        other.index = 4;
        assert!(open_shard(&f, &other, 4, 2).is_err(), "wrong shard");
    }

    #[test]
    fn newer_version_is_refused() {
        let mut f = encode_shard(&key(), 4, 2, b"x");
        f[8] = 2;
        let hcrc = crc32c::crc32c(&f[..92]);
        f[92..96].copy_from_slice(&hcrc.to_le_bytes());
        assert!(matches!(
            parse_header(&f),
            Err(Error::UnsupportedVersion { found: 2, .. })
        ));
    }
}

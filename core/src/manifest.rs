//! Snapshot manifests: what a snapshot is made of, and where its shards live.
//!
//! A manifest is the whole truth about one snapshot: layout, the agent table (stable agent ids
//! and last known addresses), and per stripe either `Zero` or its id plus the agent slot of each
//! shard. It is serialised in a versioned binary form, compressed with zstd, encrypted with the
//! catalog key (AES-256-GCM, random nonce: manifests are never re-encrypted deterministically),
//! and stored as a catalog blob `snap-<ID>` on every agent. The snapshot id is inside the
//! authenticated body and must match the blob's name, so an agent cannot pass one snapshot off as
//! another.
//!
//! Sealed blob layout: magic `SA-MANIF` (8), version u16, reserved u16, nonce (12), ciphertext+tag.

use ring::aead::{Aad, Nonce, NONCE_LEN};

use crate::enc::{Reader, Writer};
use crate::error::{Error, Result};
use crate::keys::{random_bytes, Keys};
use crate::layout::Layout;
use crate::seal::{StripeId, TAG_LEN};
use crate::shard::VolumeId;

/// Magic at the start of a sealed manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"SA-MANIF";
/// Current manifest format version.
pub const MANIFEST_VERSION: u16 = 1;
/// Prefix of catalog blob names that hold manifests.
pub const SNAPSHOT_BLOB_PREFIX: &str = "snap-";
/// Largest manifest accepted (decompressed), against decompression bombs: 1 GiB covers
/// about 20 PiB of 4 MiB stripes.
const MAX_MANIFEST_BODY: usize = 1 << 30;

/// One agent of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEntry {
    /// Stable id the agent reports (kept across restarts and address changes).
    pub id: [u8; 16],
    /// Last known address, `host:port`.
    pub addr: String,
}

/// One stripe of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StripeRef {
    /// All zero: no shards stored.
    Zero,
    /// Stored: its id and, per shard index, the agent-table slot that holds it.
    Data {
        /// Stripe id (keyed hash of its plaintext).
        id: StripeId,
        /// Agent slot per shard index (`k + m` entries).
        slots: Vec<u16>,
    },
}

/// A snapshot manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// Snapshot id (16 hex digits).
    pub snapshot: String,
    /// Volume name given at snapshot time.
    pub volume_name: String,
    /// Volume id (keyed hash of the name).
    pub volume: VolumeId,
    /// Creation time, seconds since the Unix epoch (UTC).
    pub created: u64,
    /// Sub-second part of the creation time, in nanoseconds: orders snapshots taken within
    /// one second, so `latest` is never ambiguous.
    pub created_nanos: u32,
    /// Stripe layout.
    pub layout: Layout,
    /// Agent table.
    pub agents: Vec<AgentEntry>,
    /// One entry per stripe.
    pub stripes: Vec<StripeRef>,
}

impl Manifest {
    /// The catalog blob name of this snapshot.
    pub fn blob_name(&self) -> String {
        format!("{SNAPSHOT_BLOB_PREFIX}{}", self.snapshot)
    }

    /// Number of all-zero stripes.
    pub fn zero_stripes(&self) -> u64 {
        self.stripes
            .iter()
            .filter(|s| matches!(s, StripeRef::Zero))
            .count() as u64
    }

    /// Serialises the manifest body (before compression and encryption).
    pub fn to_bytes(&self) -> Vec<u8> {
        let shards = self.layout.shards();
        let mut w = Writer::with_capacity(256 + self.stripes.len() * (33 + 2 * shards));
        w.u16(MANIFEST_VERSION)
            .str(&self.snapshot)
            .str(&self.volume_name)
            .bytes(&self.volume)
            .u64(self.created)
            .u32(self.created_nanos)
            .u64(self.layout.volume_size)
            .u32(self.layout.stripe_size)
            .u8(self.layout.k)
            .u8(self.layout.m)
            .u16(self.agents.len() as u16);
        for a in &self.agents {
            w.bytes(&a.id).str(&a.addr);
        }
        w.u64(self.stripes.len() as u64);
        for s in &self.stripes {
            match s {
                StripeRef::Zero => {
                    w.u8(0);
                }
                StripeRef::Data { id, slots } => {
                    w.u8(1).bytes(id);
                    for slot in slots {
                        w.u16(*slot);
                    }
                }
            }
        }
        w.buf
    }

    /// Parses a manifest body and checks it is consistent.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b, "manifest");
        let version = r.u16()?;
        if version != MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "manifest",
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        let snapshot = r.str()?;
        let volume_name = r.str()?;
        let volume = r.array()?;
        let created = r.u64()?;
        let created_nanos = r.u32()?;
        let volume_size = r.u64()?;
        let stripe_size = r.u32()?;
        let k = r.u8()?;
        let m = r.u8()?;
        let layout = Layout::new(volume_size, stripe_size, k, m)
            .map_err(|e| Error::malformed("manifest", format!("bad layout: {e}")))?;
        let n_agents = r.u16()? as usize;
        let mut agents = Vec::with_capacity(n_agents);
        for _ in 0..n_agents {
            agents.push(AgentEntry {
                id: r.array()?,
                addr: r.str()?,
            });
        }
        let n = r.u64()?;
        if n != layout.stripe_count() {
            return Err(Error::malformed(
                "manifest",
                format!("{n} stripes, layout has {}", layout.stripe_count()),
            ));
        }
        let shards = layout.shards();
        let mut stripes = Vec::with_capacity(n.min(r.remaining() as u64) as usize);
        for _ in 0..n {
            match r.u8()? {
                0 => stripes.push(StripeRef::Zero),
                1 => {
                    let id = r.array()?;
                    let mut slots = Vec::with_capacity(shards);
                    for _ in 0..shards {
                        let slot = r.u16()?;
                        if slot as usize >= agents.len() {
                            return Err(Error::malformed(
                                "manifest",
                                "shard slot outside the agent table",
                            ));
                        }
                        slots.push(slot);
                    }
                    stripes.push(StripeRef::Data { id, slots });
                }
                t => {
                    return Err(Error::malformed(
                        "manifest",
                        format!("unknown stripe tag {t}"),
                    ))
                }
            }
        }
        r.finish()?;
        Ok(Manifest {
            snapshot,
            volume_name,
            volume,
            created,
            created_nanos,
            layout,
            agents,
            stripes,
        })
    }

    /// Compresses and encrypts the manifest for the catalog.
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>> {
        let body = zstd::bulk::compress(&self.to_bytes(), 3)
            .map_err(|e| Error::io("compress manifest", e))?;
        let nonce: [u8; NONCE_LEN] = random_bytes();
        let mut out = Vec::with_capacity(24 + body.len() + TAG_LEN);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&nonce);
        let header_len = out.len();
        let mut ct = body;
        let aad = out.clone();
        let tag = keys
            .catalog
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut ct,
            )
            .map_err(|_| Error::Invalid("manifest too large to encrypt".into()))?;
        out.reserve(ct.len() + TAG_LEN);
        out.extend_from_slice(&ct);
        out.extend_from_slice(tag.as_ref());
        debug_assert_eq!(header_len, 24);
        Ok(out)
    }

    /// Decrypts, decompresses and parses a sealed manifest read from blob `blob_name`.
    pub fn open(keys: &Keys, blob_name: &str, sealed: &[u8]) -> Result<Self> {
        if sealed.len() < 24 + TAG_LEN || sealed[..8] != MANIFEST_MAGIC {
            return Err(Error::malformed(
                "manifest",
                format!("{blob_name} is not a sealed manifest"),
            ));
        }
        let version = u16::from_le_bytes([sealed[8], sealed[9]]);
        if version != MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion {
                what: "manifest",
                found: version,
                supported: MANIFEST_VERSION,
            });
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[12..24]);
        let mut ct = sealed[24..].to_vec();
        let body = keys
            .catalog
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&sealed[..24]),
                &mut ct,
            )
            .map_err(|_| Error::AuthFailed(format!("catalog entry {blob_name}")))?;
        let plain = zstd::bulk::decompress(body, MAX_MANIFEST_BODY)
            .map_err(|e| Error::malformed("manifest", format!("decompression failed: {e}")))?;
        let m = Manifest::from_bytes(&plain)?;
        if m.blob_name() != blob_name {
            return Err(Error::malformed(
                "manifest",
                format!("{blob_name} holds snapshot {}", m.snapshot),
            ));
        }
        Ok(m)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::MasterKey;

    pub(crate) fn sample() -> Manifest {
        let layout = Layout::new(3 * (4 << 20), 4 << 20, 4, 2).unwrap();
        Manifest {
            snapshot: "0123456789abcdef".into(),
            volume_name: "sda".into(),
            volume: [5; 16],
            created: 1_700_000_000,
            created_nanos: 5,
            layout,
            agents: (0..6)
                .map(|i| AgentEntry {
                    id: [i; 16],
                    addr: format!("127.0.0.{}:7710", i + 1),
                })
                .collect(),
            stripes: vec![
                StripeRef::Data {
                    id: [1; 32],
                    slots: vec![0, 1, 2, 3, 4, 5],
                },
                StripeRef::Zero,
                StripeRef::Data {
                    id: [2; 32],
                    slots: vec![5, 0, 1, 2, 3, 4],
                },
            ],
        }
    }

    #[test]
    fn round_trip_sealed() {
        let keys = MasterKey::from_bytes([9; 32]).derive();
        let m = sample();
        let sealed = m.seal(&keys).unwrap();
        assert!(
            !sealed.windows(3).any(|w| w == b"sda"),
            "volume name is encrypted"
        );
        let back = Manifest::open(&keys, &m.blob_name(), &sealed).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.zero_stripes(), 1);
    }

    #[test]
    fn wrong_key_tamper_and_swap_are_refused() {
        let keys = MasterKey::from_bytes([9; 32]).derive();
        let m = sample();
        let sealed = m.seal(&keys).unwrap();
        let other = MasterKey::from_bytes([10; 32]).derive();
        assert!(matches!(
            Manifest::open(&other, &m.blob_name(), &sealed),
            Err(Error::AuthFailed(_))
        ));
        let mut t = sealed.clone();
        let last = t.len() - 1;
        t[last] ^= 1;
        assert!(Manifest::open(&keys, &m.blob_name(), &t).is_err());
        assert!(
            Manifest::open(&keys, "snap-other", &sealed).is_err(),
            "renamed blob"
        );
        let mut v = sealed.clone();
        v[8] = 9;
        assert!(matches!(
            Manifest::open(&keys, &m.blob_name(), &v),
            Err(Error::UnsupportedVersion { .. })
        ));
    }

    #[test]
    fn malformed_bodies_error_not_panic() {
        let body = sample().to_bytes();
        for cut in 0..body.len() {
            assert!(Manifest::from_bytes(&body[..cut]).is_err());
        }
        let mut bad_slot = body.clone();
        let n = bad_slot.len();
        bad_slot[n - 2] = 99;
        assert!(Manifest::from_bytes(&bad_slot).is_err());
    }
}

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
//!
//! **Revisions.** `repair` moves shards, so it writes a new *revision* of a snapshot's manifest
//! (same snapshot id, same stripes, new slots and perhaps a longer agent table). Revision 0 is
//! what `snapshot` writes, as blob `snap-<ID>` with body version 1; revision `N > 0` is blob
//! `snap-<ID>.r<N>` with body version 2 (version 1 plus the revision, after the creation time).
//! Readers take the highest revision any agent holds ([`group_revisions`]), so an agent that was
//! offline during a repair and still holds an older revision cannot bring back the old slots.
//! The revision is inside the authenticated body and must match the blob's name, like the id.
//!
//! **Change tracking** (body version 3). A snapshot taken from a point-in-time export may name
//! the dirty bitmap that started recording writes at its point in time
//! ([`Manifest::tracking_bitmap`], `snapshot --new-bitmap`); the next snapshot reads only what
//! that bitmap marks, and only when the export's bitmap has that name. Such a manifest is written
//! as version 3: version 2's fields with the revision always present (0 included), then, after
//! the stripes, a `u8` tag (1: a bitmap name follows as a string; 0: none). A manifest without a
//! bitmap is still written as version 1 or 2, byte for byte as before, so older readers read it;
//! all three versions are read.
//!
//! **Seal format** (body version 4). A snapshot whose stripes are sealed in chunks
//! ([`crate::seal::SEAL_CHUNKED`], the default since) is written as version 4: version 3 (the
//! revision always present, the bitmap tag after the stripes) plus a `u8` seal format right after
//! `k` and `m`. Versions 1 to 3 are whole-stripe sealed ([`crate::seal::SEAL_WHOLE`]), and a
//! manifest of that format is still written in them, byte for byte as before. Readers built
//! before version 4 refuse a version-4 manifest with "unsupported version": upgrade `sa-image`.

use crate::enc::{Reader, Writer};
use crate::envelope;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::layout::Layout;
use crate::seal::StripeId;
use crate::shard::VolumeId;

/// Magic at the start of a sealed manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"SA-MANIF";
/// Current manifest format version (the sealed envelope, and the body of revision 0).
pub const MANIFEST_VERSION: u16 = 1;
/// Body version of a manifest revision above 0 (version 1 plus a `u32` revision).
pub const MANIFEST_REVISED_VERSION: u16 = 2;
/// Body version of a manifest that names its tracking bitmap (version 2, any revision, plus
/// the bitmap after the stripes).
pub const MANIFEST_TRACKED_VERSION: u16 = 3;
/// Body version of a manifest whose stripes are sealed in chunks (version 3 plus the seal
/// format after `k` and `m`).
pub const MANIFEST_SEALED_VERSION: u16 = 4;
/// Longest dirty bitmap name recorded (QEMU limits bitmap names to 1023 bytes).
pub const MAX_BITMAP_NAME: usize = 1023;
/// Prefix of catalog blob names that hold manifests.
pub const SNAPSHOT_BLOB_PREFIX: &str = "snap-";
/// Largest manifest accepted (decompressed), against decompression bombs: 1 GiB covers
/// about 20 PiB of 4 MiB stripes.
const MAX_MANIFEST_BODY: usize = 1 << 30;
/// The sealed envelope of manifests (its version is that of the envelope, not of the body).
const ENVELOPE: envelope::Kind = envelope::Kind {
    magic: MANIFEST_MAGIC,
    version: MANIFEST_VERSION,
    what: "manifest",
};

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
    /// Revision: 0 as the snapshot wrote it, one more per `repair` that moved shards.
    pub revision: u32,
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
    /// The dirty bitmap that records writes made after this snapshot's point in time
    /// (`snapshot --new-bitmap NAME`): the next snapshot of the volume may read only what it
    /// marks. None when no bitmap was named.
    pub tracking_bitmap: Option<String>,
}

impl Manifest {
    /// The catalog blob name of this snapshot.
    pub fn blob_name(&self) -> String {
        blob_name_of(&self.snapshot, self.revision)
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
        let version = if self.layout.seal != crate::seal::SEAL_WHOLE {
            MANIFEST_SEALED_VERSION
        } else if self.tracking_bitmap.is_some() {
            MANIFEST_TRACKED_VERSION
        } else if self.revision == 0 {
            MANIFEST_VERSION
        } else {
            MANIFEST_REVISED_VERSION
        };
        w.u16(version)
            .str(&self.snapshot)
            .str(&self.volume_name)
            .bytes(&self.volume)
            .u64(self.created)
            .u32(self.created_nanos);
        if version != MANIFEST_VERSION {
            w.u32(self.revision);
        }
        w.u64(self.layout.volume_size)
            .u32(self.layout.stripe_size)
            .u8(self.layout.k)
            .u8(self.layout.m);
        if version == MANIFEST_SEALED_VERSION {
            w.u8(self.layout.seal);
        }
        w.u16(self.agents.len() as u16);
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
        match &self.tracking_bitmap {
            Some(b) => {
                w.u8(1).str(b);
            }
            None if version == MANIFEST_SEALED_VERSION => {
                w.u8(0);
            }
            None => {}
        }
        w.buf
    }

    /// Parses a manifest body and checks it is consistent.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let mut r = Reader::new(b, "manifest");
        let version = r.version(MANIFEST_VERSION..=MANIFEST_SEALED_VERSION)?;
        let snapshot = r.str()?;
        let volume_name = r.str()?;
        let volume = r.array()?;
        let created = r.u64()?;
        let created_nanos = r.u32()?;
        let revision = match version {
            MANIFEST_VERSION => 0,
            MANIFEST_REVISED_VERSION => match r.u32()? {
                0 => return Err(Error::malformed("manifest", "version 2 with revision 0")),
                rev => rev,
            },
            _ => r.u32()?,
        };
        let volume_size = r.u64()?;
        let stripe_size = r.u32()?;
        let k = r.u8()?;
        let m = r.u8()?;
        let seal = if version == MANIFEST_SEALED_VERSION {
            r.u8()?
        } else {
            crate::seal::SEAL_WHOLE
        };
        let layout = Layout::new(volume_size, stripe_size, k, m)
            .and_then(|l| l.with_seal(seal))
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
        let tracking_bitmap = if version >= MANIFEST_TRACKED_VERSION {
            match r.u8()? {
                0 => None,
                1 => {
                    let name = r.str()?;
                    if name.is_empty() || name.len() > MAX_BITMAP_NAME {
                        return Err(Error::malformed(
                            "manifest",
                            format!("tracking bitmap name of {} bytes", name.len()),
                        ));
                    }
                    Some(name)
                }
                t => {
                    return Err(Error::malformed(
                        "manifest",
                        format!("unknown tracking tag {t}"),
                    ))
                }
            }
        } else {
            None
        };
        r.finish()?;
        Ok(Manifest {
            snapshot,
            volume_name,
            volume,
            revision,
            created,
            created_nanos,
            layout,
            agents,
            stripes,
            tracking_bitmap,
        })
    }

    /// Compresses and encrypts the manifest for the catalog.
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>> {
        let body = zstd::bulk::compress(&self.to_bytes(), 3)
            .map_err(|e| Error::io("compress manifest", e))?;
        seal_compressed(keys, body)
    }

    /// Decrypts, decompresses and parses a sealed manifest read from blob `blob_name`.
    pub fn open(keys: &Keys, blob_name: &str, sealed: &[u8]) -> Result<Self> {
        let body = envelope::open(keys, &ENVELOPE, blob_name, &[], sealed)?;
        let plain = decompress_bounded(&body)?;
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

/// The blob name of revision `revision` of snapshot `snapshot`: `snap-<ID>` for 0, else
/// `snap-<ID>.r<N>`.
pub fn blob_name_of(snapshot: &str, revision: u32) -> String {
    if revision == 0 {
        format!("{SNAPSHOT_BLOB_PREFIX}{snapshot}")
    } else {
        format!("{SNAPSHOT_BLOB_PREFIX}{snapshot}.r{revision}")
    }
}

/// Splits a manifest blob name into snapshot id and revision; `None` for other names.
pub fn parse_blob_name(name: &str) -> Option<(&str, u32)> {
    let rest = name.strip_prefix(SNAPSHOT_BLOB_PREFIX)?;
    match rest.split_once(".r") {
        None => Some((rest, 0)),
        Some((id, rev)) => match rev.parse::<u32>() {
            Ok(r) if r > 0 && !id.is_empty() && rev == r.to_string() => Some((id, r)),
            _ => None,
        },
    }
}

/// Groups manifest blob names by snapshot id, each id's names newest revision first.
pub fn group_revisions<'a>(
    names: impl IntoIterator<Item = &'a str>,
) -> std::collections::BTreeMap<String, Vec<(u32, String)>> {
    let mut out: std::collections::BTreeMap<String, Vec<(u32, String)>> = Default::default();
    for n in names {
        if let Some((id, rev)) = parse_blob_name(n) {
            let e = out.entry(id.to_string()).or_default();
            if !e.iter().any(|(r, _)| *r == rev) {
                e.push((rev, n.to_string()));
            }
        }
    }
    for v in out.values_mut() {
        v.sort_by_key(|r| std::cmp::Reverse(r.0));
    }
    out
}

/// Encrypts a compressed manifest body (see the module docs for the layout).
pub(crate) fn seal_compressed(keys: &Keys, body: Vec<u8>) -> Result<Vec<u8>> {
    envelope::seal(keys, &ENVELOPE, &[], body)
}

/// Decompresses a manifest body, refusing one larger than [`MAX_MANIFEST_BODY`]. Streams, so
/// memory follows the real size: a one-shot decompress would reserve the whole limit up front.
fn decompress_bounded(body: &[u8]) -> Result<Vec<u8>> {
    use std::io::Read;
    let bad =
        |e: std::io::Error| Error::malformed("manifest", format!("decompression failed: {e}"));
    let mut out = Vec::new();
    zstd::stream::read::Decoder::with_buffer(body)
        .map_err(bad)?
        .take(MAX_MANIFEST_BODY as u64 + 1)
        .read_to_end(&mut out)
        .map_err(bad)?;
    if out.len() > MAX_MANIFEST_BODY {
        return Err(Error::malformed(
            "manifest",
            format!("decompresses to more than {MAX_MANIFEST_BODY} bytes"),
        ));
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::keys::MasterKey;

    pub(crate) fn sample() -> Manifest {
        // Whole-stripe sealed, as every manifest was before version 4.
        let layout = Layout::new(3 * (4 << 20), 4 << 20, 4, 2)
            .unwrap()
            .with_seal(crate::seal::SEAL_WHOLE)
            .unwrap();
        Manifest {
            snapshot: "0123456789abcdef".into(),
            volume_name: "sda".into(),
            volume: [5; 16],
            revision: 0,
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
            tracking_bitmap: None,
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
    fn revisions_round_trip_and_are_bound_to_their_name() {
        let keys = MasterKey::from_bytes([9; 32]).derive();
        let mut m = sample();
        assert_eq!(m.blob_name(), "snap-0123456789abcdef");
        let v1 = m.to_bytes();
        m.revision = 3;
        assert_eq!(m.blob_name(), "snap-0123456789abcdef.r3");
        let v2 = m.to_bytes();
        assert_eq!(v2.len(), v1.len() + 4);
        assert_eq!(u16::from_le_bytes([v2[0], v2[1]]), MANIFEST_REVISED_VERSION);
        let sealed = m.seal(&keys).unwrap();
        assert_eq!(Manifest::open(&keys, &m.blob_name(), &sealed).unwrap(), m);
        // A revision renamed to pass for another (or for revision 0) is refused.
        assert!(Manifest::open(&keys, "snap-0123456789abcdef", &sealed).is_err());
        assert!(Manifest::open(&keys, "snap-0123456789abcdef.r4", &sealed).is_err());
        assert_eq!(parse_blob_name("snap-ab"), Some(("ab", 0)));
        assert_eq!(parse_blob_name("snap-ab.r12"), Some(("ab", 12)));
        for bad in [
            "snap-ab.r0",
            "snap-ab.r",
            "snap-ab.r01",
            "snap-.r1",
            "lease-ab",
        ] {
            assert_eq!(parse_blob_name(bad), None, "{bad}");
        }
        let g = group_revisions(["snap-ab", "snap-ab.r2", "snap-cd", "snap-ab.r1", "x"]);
        assert_eq!(
            g["ab"].iter().map(|r| r.0).collect::<Vec<_>>(),
            vec![2, 1, 0]
        );
        assert_eq!(g["cd"], vec![(0, "snap-cd".to_string())]);
    }

    #[test]
    fn a_tracking_bitmap_is_version_3_and_others_stay_as_they_were() {
        let keys = MasterKey::from_bytes([9; 32]).derive();
        let plain = sample();
        // Without a bitmap: version 1 (revision 0) or 2, as before this field existed.
        let v1 = plain.to_bytes();
        assert_eq!(u16::from_le_bytes([v1[0], v1[1]]), MANIFEST_VERSION);
        let mut m = sample();
        m.tracking_bitmap = Some("sa-2024-05-01".into());
        let v3 = m.to_bytes();
        assert_eq!(u16::from_le_bytes([v3[0], v3[1]]), MANIFEST_TRACKED_VERSION);
        // Version 1 plus the revision (4), the tag (1) and the string (2 + its 13 bytes).
        assert_eq!(v3.len(), v1.len() + 4 + 1 + 2 + 13);
        let sealed = m.seal(&keys).unwrap();
        assert_eq!(Manifest::open(&keys, &m.blob_name(), &sealed).unwrap(), m);
        // A revision keeps the bitmap.
        m.revision = 2;
        let sealed = m.seal(&keys).unwrap();
        let back = Manifest::open(&keys, &m.blob_name(), &sealed).unwrap();
        assert_eq!(back.tracking_bitmap.as_deref(), Some("sa-2024-05-01"));
        assert_eq!(back.revision, 2);
        // An unknown tag and an empty name are refused, not guessed at.
        let mut bad = v3.clone();
        let tag_at = v1.len() + 4;
        bad[tag_at] = 7;
        assert!(Manifest::from_bytes(&bad).is_err());
        let mut empty = sample();
        empty.tracking_bitmap = Some(String::new());
        assert!(Manifest::from_bytes(&empty.to_bytes()).is_err());
        for cut in 0..v3.len() {
            assert!(Manifest::from_bytes(&v3[..cut]).is_err());
        }
    }

    #[test]
    fn chunked_stripes_are_version_4_with_the_seal_format() {
        let keys = MasterKey::from_bytes([9; 32]).derive();
        let v1 = sample().to_bytes();
        let mut m = sample();
        m.layout = m.layout.with_seal(crate::seal::SEAL_CHUNKED).unwrap();
        let v4 = m.to_bytes();
        assert_eq!(u16::from_le_bytes([v4[0], v4[1]]), MANIFEST_SEALED_VERSION);
        // Version 1 plus the revision (4), the seal format (1) and the "no bitmap" tag (1).
        assert_eq!(v4.len(), v1.len() + 4 + 1 + 1);
        let sealed = m.seal(&keys).unwrap();
        assert_eq!(Manifest::open(&keys, &m.blob_name(), &sealed).unwrap(), m);
        m.tracking_bitmap = Some("b1".into());
        m.revision = 3;
        let back = Manifest::from_bytes(&m.to_bytes()).unwrap();
        assert_eq!(back, m);
        // An unknown seal format is refused. It sits after the fixed fields and the revision.
        let seal_at = 2 + (2 + 16) + (2 + 3) + 16 + 8 + 4 + 4 + 8 + 4 + 1 + 1;
        assert_eq!(v4[seal_at], crate::seal::SEAL_CHUNKED);
        let mut bad = v4.clone();
        bad[seal_at] = 9;
        assert!(Manifest::from_bytes(&bad).is_err());
        for cut in 0..v4.len() {
            assert!(Manifest::from_bytes(&v4[..cut]).is_err());
        }
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

//! The catalog: every snapshot's sealed manifest, replicated as blob `snap-<ID>` on every agent.
//! Any one reachable agent is enough to list and open it.
//!
//! Two more kinds of small catalog blobs serve retention and garbage collection (see the
//! imager's `gc` module for the protocol):
//!
//! * `forgotten-<ID>`: a **tombstone**. `forget`/`prune` write it on every agent before deleting
//!   `snap-<ID>`, so an agent that was offline and still holds a stale `snap-<ID>` cannot bring the
//!   snapshot back: [`load_catalog`] hides every snapshot that has an authentic tombstone.
//! * `lease-<ID>`: a running snapshot's **lease**, naming the snapshot whose stripes it reuses
//!   (its base) and when it started; deleted after the snapshot commits.
//!
//! Both are sealed records ([`seal_record`]): AES-256-GCM under the catalog key with a random
//! nonce and the blob name as associated data, so an agent can neither forge a tombstone (which
//! would let one agent make every other one delete a snapshot's shards) nor move one to another
//! name. Layout: magic `SA-RECRD` (8), version u16, reserved u16, nonce (12), ciphertext + tag.

use crate::enc::{Reader, Writer};
use crate::envelope;
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::manifest::{group_revisions, Manifest, SNAPSHOT_BLOB_PREFIX};
use crate::store::ShardRead;

/// Prefix of tombstone blobs.
pub const FORGOTTEN_BLOB_PREFIX: &str = "forgotten-";
/// Prefix of lease blobs.
pub const LEASE_BLOB_PREFIX: &str = "lease-";
/// Magic of a sealed record.
pub const RECORD_MAGIC: [u8; 8] = *b"SA-RECRD";
/// Record format version.
pub const RECORD_VERSION: u16 = 1;

const RECORD: envelope::Kind = envelope::Kind {
    magic: RECORD_MAGIC,
    version: RECORD_VERSION,
    what: "catalog record",
};

/// Seals a small record stored as catalog blob `name` (the name is authenticated).
pub fn seal_record(keys: &Keys, name: &str, body: &[u8]) -> Result<Vec<u8>> {
    envelope::seal(keys, &RECORD, name.as_bytes(), body.to_vec())
}

/// Opens a record read from catalog blob `name`.
pub fn open_record(keys: &Keys, name: &str, sealed: &[u8]) -> Result<Vec<u8>> {
    envelope::open(keys, &RECORD, name, name.as_bytes(), sealed)
}

/// A tombstone: snapshot `snapshot` was forgotten at `forgotten_at` (Unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tombstone {
    /// The forgotten snapshot's id.
    pub snapshot: String,
    /// When it was forgotten.
    pub forgotten_at: u64,
}

impl Tombstone {
    /// The blob name of the tombstone of `snapshot`.
    pub fn blob_name_of(snapshot: &str) -> String {
        format!("{FORGOTTEN_BLOB_PREFIX}{snapshot}")
    }

    /// Sealed blob contents.
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>> {
        let mut w = Writer::default();
        w.str(&self.snapshot).u64(self.forgotten_at);
        seal_record(keys, &Self::blob_name_of(&self.snapshot), &w.buf)
    }

    /// Opens a tombstone read from blob `name`; the id inside must match the name.
    pub fn open(keys: &Keys, name: &str, sealed: &[u8]) -> Result<Self> {
        let body = open_record(keys, name, sealed)?;
        let mut r = Reader::new(&body, "tombstone");
        let t = Tombstone {
            snapshot: r.str()?,
            forgotten_at: r.u64()?,
        };
        r.finish()?;
        if Self::blob_name_of(&t.snapshot) != name {
            return Err(Error::malformed(
                "tombstone",
                format!("{name} names snapshot {}", t.snapshot),
            ));
        }
        Ok(t)
    }
}

/// A running snapshot's lease: while it exists (and is younger than the collector's lease
/// lifetime), the snapshot `base` and every shard stored since `started` are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Lease id (the id the snapshot will get).
    pub id: String,
    /// The snapshot whose stripes the running one reuses, if any.
    pub base: Option<String>,
    /// When the snapshot started, Unix seconds (the writer's clock).
    pub started: u64,
}

impl Lease {
    /// Blob name.
    pub fn blob_name(&self) -> String {
        format!("{LEASE_BLOB_PREFIX}{}", self.id)
    }

    /// Sealed blob contents.
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>> {
        let mut w = Writer::default();
        w.str(&self.id)
            .str(self.base.as_deref().unwrap_or(""))
            .u64(self.started);
        seal_record(keys, &self.blob_name(), &w.buf)
    }

    /// Opens a lease read from blob `name`.
    pub fn open(keys: &Keys, name: &str, sealed: &[u8]) -> Result<Self> {
        let body = open_record(keys, name, sealed)?;
        let mut r = Reader::new(&body, "lease");
        let id = r.str()?;
        let base = Some(r.str()?).filter(|b| !b.is_empty());
        let l = Lease {
            id,
            base,
            started: r.u64()?,
        };
        r.finish()?;
        if l.blob_name() != name {
            return Err(Error::malformed(
                "lease",
                format!("{name} holds lease {}", l.id),
            ));
        }
        Ok(l)
    }
}

/// The authentic tombstones a store holds, by snapshot id. With `only`, reads just the
/// tombstones of those snapshot ids (the ones whose `snap-` blob is still there).
pub async fn load_tombstones(
    store: &dyn ShardRead,
    keys: &Keys,
    only: Option<&[String]>,
) -> Result<Vec<Tombstone>> {
    let mut out = Vec::new();
    for name in store.list_blobs(FORGOTTEN_BLOB_PREFIX).await? {
        let id = &name[FORGOTTEN_BLOB_PREFIX.len()..];
        if only.is_some_and(|o| !o.iter().any(|s| s == id)) {
            continue;
        }
        match store
            .get_blob(&name)
            .await
            .and_then(|b| Tombstone::open(keys, &name, &b))
        {
            Ok(t) => out.push(t),
            Err(Error::ShardMissing) => {}
            Err(e) => tracing::warn!("ignoring catalog entry {name}: {e}"),
        }
    }
    Ok(out)
}

/// Loads every manifest a store holds, oldest first, except snapshots with an authentic
/// tombstone (forgotten). Entries that fail to open are returned separately (name, error) so the
/// caller can report them; a wrong key fails them all.
pub async fn load_catalog(
    store: &dyn ShardRead,
    keys: &Keys,
) -> Result<(Vec<Manifest>, Vec<(String, Error)>)> {
    let names = store.list_blobs(SNAPSHOT_BLOB_PREFIX).await?;
    let revisions = group_revisions(names.iter().map(String::as_str));
    let ids: Vec<String> = revisions.keys().cloned().collect();
    let forgotten = load_tombstones(store, keys, Some(&ids)).await?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for (id, revs) in revisions {
        if forgotten.iter().any(|t| t.snapshot == id) {
            continue;
        }
        // The newest revision that opens; an older one only when every newer one fails.
        let mut errors = Vec::new();
        for (_, name) in revs {
            match store
                .get_blob(&name)
                .await
                .and_then(|b| Manifest::open(keys, &name, &b))
            {
                Ok(m) => {
                    ok.push(m);
                    errors.clear();
                    break;
                }
                // Deleted between list and get (a concurrent forget or repair): not an error.
                Err(Error::ShardMissing) => {}
                Err(e) => errors.push((name, e)),
            }
        }
        bad.extend(errors);
    }
    sort_by_creation(&mut ok);
    Ok((ok, bad))
}

/// Sorts manifests oldest first (creation time to the nanosecond, then id).
pub fn sort_by_creation(manifests: &mut [Manifest]) {
    manifests.sort_by(|a, b| {
        (a.created, a.created_nanos, &a.snapshot).cmp(&(b.created, b.created_nanos, &b.snapshot))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;
    use crate::store::{DirStore, ShardWrite};

    #[test]
    fn records_are_authenticated_and_bound_to_their_name() {
        let keys = MasterKey::from_bytes([3; 32]).derive();
        let t = Tombstone {
            snapshot: "00ff".into(),
            forgotten_at: 42,
        };
        let sealed = t.seal(&keys).unwrap();
        assert_eq!(
            Tombstone::open(&keys, "forgotten-00ff", &sealed).unwrap(),
            t
        );
        assert!(
            Tombstone::open(&keys, "forgotten-00fe", &sealed).is_err(),
            "moved"
        );
        let other = MasterKey::from_bytes([4; 32]).derive();
        assert!(
            Tombstone::open(&other, "forgotten-00ff", &sealed).is_err(),
            "forged"
        );
        let l = Lease {
            id: "ab".into(),
            base: Some("cd".into()),
            started: 7,
        };
        assert_eq!(
            Lease::open(&keys, &l.blob_name(), &l.seal(&keys).unwrap()).unwrap(),
            l
        );
        let l = Lease { base: None, ..l };
        assert_eq!(
            Lease::open(&keys, &l.blob_name(), &l.seal(&keys).unwrap()).unwrap(),
            l
        );
    }

    #[tokio::test]
    async fn tombstones_hide_stale_manifests_but_forged_ones_do_not() {
        let keys = MasterKey::from_bytes([3; 32]).derive();
        let dir = tempfile::tempdir().unwrap();
        let s = DirStore::open(dir.path(), 0).unwrap();
        let mut m = crate::manifest::tests::sample();
        for id in ["aaaa", "bbbb"] {
            m.snapshot = id.into();
            s.put_blob(&m.blob_name(), m.seal(&keys).unwrap())
                .await
                .unwrap();
        }
        let t = Tombstone {
            snapshot: "aaaa".into(),
            forgotten_at: 1,
        };
        s.put_blob(&Tombstone::blob_name_of("aaaa"), t.seal(&keys).unwrap())
            .await
            .unwrap();
        s.put_blob("forgotten-bbbb", b"not sealed".to_vec())
            .await
            .unwrap();
        let (ms, bad) = load_catalog(&s, &keys).await.unwrap();
        assert!(bad.is_empty());
        assert_eq!(
            ms.iter().map(|m| m.snapshot.as_str()).collect::<Vec<_>>(),
            vec!["bbbb"]
        );
        // A repaired revision wins over the snapshot's own, whichever the agent lists first.
        m.revision = 2;
        m.agents[0].addr = "moved:1".into();
        s.put_blob(&m.blob_name(), m.seal(&keys).unwrap())
            .await
            .unwrap();
        let (ms, _) = load_catalog(&s, &keys).await.unwrap();
        assert_eq!(ms.len(), 1);
        assert_eq!(
            (ms[0].revision, ms[0].agents[0].addr.as_str()),
            (2, "moved:1")
        );
    }
}

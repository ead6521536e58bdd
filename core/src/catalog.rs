//! The catalog: every snapshot's sealed manifest, replicated as blob `snap-<ID>` on every agent.
//! Any one reachable agent is enough to list and open it.

use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::manifest::{Manifest, SNAPSHOT_BLOB_PREFIX};
use crate::store::ShardRead;

/// Loads every manifest a store holds, oldest first. Entries that fail to open are returned
/// separately (name, error) so the caller can report them; a wrong key fails them all.
pub async fn load_catalog(store: &dyn ShardRead, keys: &Keys) -> Result<(Vec<Manifest>, Vec<(String, Error)>)> {
    let names = store.list_blobs(SNAPSHOT_BLOB_PREFIX).await?;
    let mut ok = Vec::new();
    let mut bad = Vec::new();
    for name in names {
        match store.get_blob(&name).await.and_then(|b| Manifest::open(keys, &name, &b)) {
            Ok(m) => ok.push(m),
            Err(e) => bad.push((name, e)),
        }
    }
    ok.sort_by(|a, b| (a.created, &a.snapshot).cmp(&(b.created, &b.snapshot)));
    Ok((ok, bad))
}

/// Finds a snapshot by id, unique id prefix, or `latest` (newest of all, or of `volume` if given).
pub fn resolve<'a>(manifests: &'a [Manifest], wanted: &str, volume: Option<&str>) -> Result<&'a Manifest> {
    let pool: Vec<&Manifest> =
        manifests.iter().filter(|m| volume.is_none_or(|v| m.volume_name == v)).collect();
    if wanted == "latest" {
        return pool
            .last()
            .copied()
            .ok_or_else(|| Error::Invalid("the catalog holds no snapshot yet: run `sa-image snapshot` first".into()));
    }
    let hits: Vec<&Manifest> = pool.iter().copied().filter(|m| m.snapshot.starts_with(wanted)).collect();
    match hits.len() {
        1 => Ok(hits[0]),
        0 => Err(Error::Invalid(format!("no snapshot '{wanted}' in the catalog (see `sa-image list`)"))),
        n => Err(Error::Invalid(format!("'{wanted}' matches {n} snapshots: give more of the id"))),
    }
}

//! Finding the snapshot a new one builds on: the agents' `snap-` names are listed (one request
//! per agent), those with a tombstone dropped, only the names the local index has not seen are
//! fetched and indexed, the base is picked from the index, and opened from the cache (or fetched
//! when the cache lacks it or is gone).

use std::collections::{BTreeMap, HashMap};

use sa_core::catalog::load_tombstones;
use sa_core::keys::{hex, Keys};
use sa_core::manifest::{group_revisions, Manifest, SNAPSHOT_BLOB_PREFIX};
use sa_core::store::{AgentClient, ShardRead};

use super::cache::{entry, Entry, ManifestCache};
use crate::error::{Error, Result};

/// Which snapshot to build on.
pub enum Pick<'a> {
    /// The newest snapshot of this volume id with this k, m and stripe size.
    Latest {
        /// Volume id.
        volume: [u8; 16],
        /// k.
        k: u8,
        /// m.
        m: u8,
        /// Stripe size.
        stripe_size: u32,
    },
    /// A snapshot id, unique prefix, or `latest` (of `volume`).
    Named(&'a str, [u8; 16]),
}

/// The base found, and where its manifest came from (`cache` or `agents`).
pub struct Base {
    /// The manifest.
    pub manifest: Manifest,
    /// `cache` or `agents`.
    pub from: &'static str,
}

/// Finds the base snapshot among the live (not forgotten) snapshots on `clients`.
pub async fn find_base(
    clients: &[AgentClient],
    keys: &Keys,
    cache: Option<&ManifestCache>,
    pick: Pick<'_>,
) -> Result<Option<Base>> {
    let mut by_name: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in clients.iter().enumerate() {
        match c.list_blobs(SNAPSHOT_BLOB_PREFIX).await {
            Ok(names) => {
                for n in names {
                    by_name.entry(n).or_default().push(i);
                }
            }
            Err(e) => tracing::warn!("{}: cannot list the catalog: {e}", c.addr()),
        }
    }
    // Per snapshot id, its revisions newest first (a repair writes `snap-<ID>.r<N>`).
    let mut holders = group_revisions(by_name.keys().map(String::as_str));
    let ids: Vec<String> = holders.keys().cloned().collect();
    for c in clients {
        if let Ok(ts) = load_tombstones(c, keys, Some(&ids)).await {
            for t in ts {
                holders.remove(&t.snapshot);
            }
        }
    }
    let fetch = |id: &str| {
        let revs = holders.get(id).cloned().unwrap_or_default();
        let by_name = &by_name;
        async move {
            for (_, name) in revs {
                for &i in by_name.get(&name).map(Vec::as_slice).unwrap_or_default() {
                    match clients[i]
                        .get_blob(&name)
                        .await
                        .and_then(|b| Manifest::open(keys, &name, &b).map(|m| (m, b)))
                    {
                        Ok(mb) => return Some(mb),
                        Err(e) => tracing::warn!(
                            "{}: catalog copy {name} unusable: {e}",
                            clients[i].addr()
                        ),
                    }
                }
            }
            None
        }
    };
    let mut index = cache.map(ManifestCache::index).unwrap_or_default();
    let mut fetched: HashMap<String, Manifest> = HashMap::new();
    let mut grew = false;
    for id in holders.keys() {
        if !index.contains_key(id) {
            if let Some((m, _)) = fetch(id).await {
                index.insert(id.clone(), entry(&m));
                fetched.insert(id.clone(), m);
                grew = true;
            }
        }
    }
    if let (Some(c), true) = (cache, grew) {
        c.save_index(&index);
    }
    let live: Vec<(&String, &Entry)> = index
        .iter()
        .filter(|(id, _)| holders.contains_key(*id))
        .collect();
    let Some(id) = choose(&live, pick)? else {
        return Ok(None);
    };
    if let Some(m) = fetched.remove(&id) {
        return Ok(Some(Base {
            manifest: m,
            from: "agents",
        }));
    }
    // The cached copy only if it is the newest revision the agents hold.
    let newest_name = holders
        .get(&id)
        .and_then(|r| r.first())
        .map(|(_, n)| n.clone())
        .unwrap_or_else(|| format!("{SNAPSHOT_BLOB_PREFIX}{id}"));
    if let Some(m) = cache.and_then(|c| c.load(keys, &newest_name)) {
        return Ok(Some(Base {
            manifest: m,
            from: "cache",
        }));
    }
    match fetch(&id).await {
        Some((m, _)) => Ok(Some(Base {
            manifest: m,
            from: "agents",
        })),
        None => Err(Error::failed(format!(
            "snapshot {id} is listed but no agent's copy of it opens"
        ))),
    }
}

/// The snapshot `pick` names among the live index entries (None: no base for this run).
fn choose(live: &[(&String, &Entry)], pick: Pick<'_>) -> Result<Option<String>> {
    let newest = |vol: &str, extra: &dyn Fn(&Entry) -> bool| {
        live.iter()
            .filter(|(_, e)| e.volume == vol && extra(e))
            .max_by_key(|(id, e)| (e.created, (*id).clone()))
            .map(|(id, _)| (*id).clone())
    };
    match pick {
        Pick::Latest {
            volume,
            k,
            m,
            stripe_size,
        } => Ok(newest(&hex(&volume), &|e: &Entry| {
            e.k == k && e.m == m && e.stripe_size == stripe_size
        })),
        Pick::Named("latest", volume) => match newest(&hex(&volume), &|_| true) {
            Some(id) => Ok(Some(id)),
            None => Err(Error::invalid(
                "--changed-since latest: the catalog holds no snapshot of this volume yet",
            )),
        },
        Pick::Named(prefix, _) => {
            let hits: Vec<&String> = live
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| id.starts_with(prefix))
                .collect();
            match hits.len() {
                1 => Ok(Some(hits[0].clone())),
                0 => Err(Error::NoSuchSnapshot(prefix.to_string())),
                count => Err(Error::AmbiguousSnapshot {
                    prefix: prefix.to_string(),
                    count,
                }),
            }
        }
    }
}

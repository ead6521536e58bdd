//! The local manifest cache, and finding the snapshot a new one builds on.
//!
//! Layout under the cache root (`--cache-dir`, default `$XDG_CACHE_HOME/sa-image` or
//! `~/.cache/sa-image`), one directory per owner (first 16 hex digits of the owner id):
//! ```text
//! OWNER/index          one line per snapshot seen: ID VOLUME-ID-HEX CREATED NANOS K M STRIPE SIZE
//! OWNER/snap-ID        the sealed manifest (exactly as on the agents) of the newest snapshot
//!                      of each volume this machine knows
//! ```
//! The index holds no volume names (only keyed volume ids) and the manifests stay sealed, so the
//! cache tells nothing without the key. It is only a cache: the catalog on the agents is the
//! truth. A snapshot lists the agents' `snap-` names (one request per agent), drops those with a
//! tombstone, fetches and indexes only the names it has not seen, picks its base from the index,
//! and opens the base from the cache, or fetches it when the cache lacks it or is gone. Every
//! cache failure is a warning, never an error.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use sa_core::catalog::load_tombstones;
use sa_core::keys::{hex, Keys};
use sa_core::manifest::{group_revisions, parse_blob_name, Manifest, SNAPSHOT_BLOB_PREFIX};
use sa_core::store::{AgentClient, ShardRead};

/// One index line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    volume: String,
    created: (u64, u32),
    k: u8,
    m: u8,
    stripe_size: u32,
    size: u64,
}

/// The cache of one owner.
pub struct ManifestCache {
    dir: PathBuf,
}

/// The default cache root.
pub fn default_root() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|p| p.join("sa-image"))
}

impl ManifestCache {
    /// Opens (creating) the cache of `keys`' owner under `root`.
    pub fn open(root: &Path, keys: &Keys) -> Option<Self> {
        let dir = root.join(&hex(&keys.owner_id().0)[..16]);
        match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(ManifestCache { dir }),
            Err(e) => {
                tracing::warn!(
                    "manifest cache {} unusable, reading the catalog from agents: {e}",
                    dir.display()
                );
                None
            }
        }
    }

    fn index(&self) -> HashMap<String, Entry> {
        let text = std::fs::read_to_string(self.dir.join("index")).unwrap_or_default();
        let mut out = HashMap::new();
        for line in text.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() != 8 {
                continue;
            }
            let parsed = (|| {
                Some(Entry {
                    volume: f[1].to_string(),
                    created: (f[2].parse().ok()?, f[3].parse().ok()?),
                    k: f[4].parse().ok()?,
                    m: f[5].parse().ok()?,
                    stripe_size: f[6].parse().ok()?,
                    size: f[7].parse().ok()?,
                })
            })();
            if let Some(e) = parsed {
                out.insert(f[0].to_string(), e);
            }
        }
        out
    }

    fn write_atomic(&self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{name}.{}", std::process::id()));
        std::fs::write(&tmp, data)?;
        std::fs::rename(&tmp, self.dir.join(name))
    }

    fn save_index(&self, index: &HashMap<String, Entry>) {
        let mut lines: Vec<String> = index
            .iter()
            .map(|(id, e)| {
                format!(
                    "{id} {} {} {} {} {} {} {}\n",
                    e.volume, e.created.0, e.created.1, e.k, e.m, e.stripe_size, e.size
                )
            })
            .collect();
        lines.sort();
        if let Err(e) = self.write_atomic("index", lines.concat().as_bytes()) {
            tracing::warn!("cannot write the manifest cache index: {e}");
        }
    }

    /// Keeps `sealed` (the manifest `m`) as the cached manifest of its volume.
    pub fn store(&self, m: &Manifest, sealed: &[u8]) {
        let mut index = self.index();
        let vol = hex(&m.volume);
        index.insert(m.snapshot.clone(), entry(m));
        if let Err(e) = self.write_atomic(&m.blob_name(), sealed) {
            tracing::warn!("cannot cache manifest {}: {e}", m.snapshot);
            return;
        }
        // One cached manifest per volume (its newest revision): drop the others.
        let keep = m.blob_name();
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some((id, _)) = parse_blob_name(&name) else {
                    continue;
                };
                let same_volume =
                    id == m.snapshot || index.get(id).is_some_and(|e| e.volume == vol);
                if same_volume && name != keep {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.save_index(&index);
    }

    /// The cached manifest stored as blob `name` (a given revision of a snapshot).
    fn load(&self, keys: &Keys, name: &str) -> Option<Manifest> {
        let sealed = std::fs::read(self.dir.join(name)).ok()?;
        match Manifest::open(keys, name, &sealed) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!("cached manifest {name} unusable, fetching it again: {e}");
                None
            }
        }
    }
}

fn entry(m: &Manifest) -> Entry {
    Entry {
        volume: hex(&m.volume),
        created: (m.created, m.created_nanos),
        k: m.layout.k,
        m: m.layout.m,
        stripe_size: m.layout.stripe_size,
        size: m.layout.volume_size,
    }
}

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
    let newest = |vol: &str, extra: &dyn Fn(&Entry) -> bool| {
        live.iter()
            .filter(|(_, e)| e.volume == vol && extra(e))
            .max_by_key(|(id, e)| (e.created, (*id).clone()))
            .map(|(id, _)| (*id).clone())
    };
    let chosen = match pick {
        Pick::Latest {
            volume,
            k,
            m,
            stripe_size,
        } => newest(&hex(&volume), &|e: &Entry| {
            e.k == k && e.m == m && e.stripe_size == stripe_size
        }),
        Pick::Named("latest", volume) => match newest(&hex(&volume), &|_| true) {
            Some(id) => Some(id),
            None => {
                bail!("--changed-since latest: the catalog holds no snapshot of this volume yet")
            }
        },
        Pick::Named(prefix, _) => {
            let hits: Vec<&String> = live
                .iter()
                .map(|(id, _)| *id)
                .filter(|id| id.starts_with(prefix))
                .collect();
            match hits.len() {
                1 => Some(hits[0].clone()),
                0 => bail!("no snapshot '{prefix}' in the catalog (see `sa-image list`)"),
                n => bail!("'{prefix}' matches {n} snapshots: give more of the id"),
            }
        }
    };
    let Some(id) = chosen else { return Ok(None) };
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
        None => bail!("snapshot {id} is listed but no agent's copy of it opens"),
    }
}

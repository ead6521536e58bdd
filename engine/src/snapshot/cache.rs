//! The local manifest cache.
//!
//! Layout under the cache root ([`crate::cache_dir`]), one directory per owner (first 16 hex
//! digits of the owner id):
//! ```text
//! OWNER/index          one line per snapshot seen: ID VOLUME-ID-HEX CREATED NANOS K M STRIPE SIZE
//! OWNER/snap-ID        the sealed manifest (exactly as on the agents) of the newest snapshot
//!                      of each volume this machine knows
//! ```
//! The index holds no volume names (only keyed volume ids) and the manifests stay sealed, so the
//! cache tells nothing without the key. It is only a cache: the catalog on the agents is the
//! truth ([`super::base`] finds a snapshot's base through it). Every cache failure is a warning,
//! never an error.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use sa_core::keys::{hex, Keys};
use sa_core::manifest::{parse_blob_name, Manifest};

/// One index line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) volume: String,
    pub(super) created: (u64, u32),
    pub(super) k: u8,
    pub(super) m: u8,
    pub(super) stripe_size: u32,
    pub(super) size: u64,
}

/// The cache of one owner.
pub struct ManifestCache {
    dir: PathBuf,
}

impl ManifestCache {
    /// Opens (creating) the cache of `keys`' owner under `root` (None: the default root).
    pub fn open(root: Option<&Path>, keys: &Keys) -> Option<Self> {
        let dir = crate::cache_dir::owner_dir(root, keys)?;
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

    pub(super) fn index(&self) -> HashMap<String, Entry> {
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

    fn write_atomic(&self, name: &str, data: &[u8]) -> sa_core::Result<()> {
        sa_core::durable::write(
            &self.dir.join(name),
            data,
            sa_core::durable::Access::Shared,
            sa_core::durable::Replace::Yes,
        )
    }

    pub(super) fn save_index(&self, index: &HashMap<String, Entry>) {
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
    pub(super) fn load(&self, keys: &Keys, name: &str) -> Option<Manifest> {
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

pub(super) fn entry(m: &Manifest) -> Entry {
    Entry {
        volume: hex(&m.volume),
        created: (m.created, m.created_nanos),
        k: m.layout.k,
        m: m.layout.m,
        stripe_size: m.layout.stripe_size,
        size: m.layout.volume_size,
    }
}

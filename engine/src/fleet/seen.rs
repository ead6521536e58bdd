//! When each agent last answered, as this machine saw it: a small text file in this owner's
//! cache directory (one line `AGENT-ID-HEX UNIX-SECONDS ADDRESS` each), written durably. A lost
//! file only loses history.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sa_core::keys::{hex, Keys};

use super::census::Census;

/// When each agent last answered, by id (hex): a small file in this machine's cache directory.
pub struct SeenBook {
    path: Option<PathBuf>,
    /// Agent id (hex) → (Unix seconds, address).
    pub seen: BTreeMap<String, (u64, String)>,
}

impl SeenBook {
    /// Opens the book of `keys`' owner under the cache root `root` (None: the default root).
    pub fn open(root: Option<&Path>, keys: &Keys) -> SeenBook {
        let path = crate::cache_dir::owner_dir(root, keys).map(|d| d.join("agents-seen"));
        let mut seen = BTreeMap::new();
        if let Some(text) = path.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if let [id, t, addr] = f[..] {
                    if let Ok(t) = t.parse() {
                        seen.insert(id.to_string(), (t, addr.to_string()));
                    }
                }
            }
        }
        SeenBook { path, seen }
    }

    /// Records the reachable members of `census` as seen `now`, and saves (failures are
    /// warnings).
    pub fn record(&mut self, census: &Census, now: u64) {
        for m in census.reachable() {
            self.seen.insert(hex(&m.id), (now, m.addr.clone()));
        }
        let Some(path) = &self.path else { return };
        let text: String = self
            .seen
            .iter()
            .map(|(id, (t, a))| format!("{id} {t} {a}\n"))
            .collect();
        let r = sa_core::durable::write(
            path,
            text.as_bytes(),
            sa_core::durable::Access::Shared,
            sa_core::durable::Replace::Yes,
        );
        if let Err(e) = r {
            tracing::warn!("cannot record when agents were seen: {e}");
        }
    }

    /// When agent `id` last answered (Unix seconds).
    pub fn last_seen(&self, id: &[u8; 16]) -> Option<u64> {
        self.seen.get(&hex(id)).map(|(t, _)| *t)
    }
}

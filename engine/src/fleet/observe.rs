//! Recording each member's availability ([`crate::availability::History`]) as commands reach
//! the fleet.
//!
//! Every [`Fleet::reach`] is an observation: each agent that answered is up now, each member
//! in service that did not is down. The history lives in this machine's cache directory (a
//! sealed copy, [`Fleet::with_history_cache`]) and, like the agent book, on the agents (blob
//! [`AVAILABILITY_BLOB`]), so a replacement server starts with it.
//!
//! **Cheap writes.** A slot is an hour: an observation changes the history only when it sets a
//! bit not yet set (the first observation of a state in an hour), so the local copy is
//! rewritten at most a few times an hour however often commands run. Copies on the agents are
//! read, merged and rewritten only by commands that may write ([`Access::Write`]: snapshot,
//! repair, retention, the daemon's jobs), and only on the agents whose copy differs from the
//! merged history; a read-only command (restore, serve, status, list, ...) changes nothing on
//! the agents.

use std::collections::HashMap;
use std::path::PathBuf;

use sa_core::store::{AgentClient, ShardRead, ShardWrite};
use tokio::task::JoinSet;

use super::{live, Access, Fleet, Reach};
use crate::availability::{History, AVAILABILITY_BLOB};

/// This machine's copy of the history: where, and the history as last read or written there.
pub(super) struct HistoryCache {
    path: Option<PathBuf>,
    history: Option<History>,
}

impl HistoryCache {
    pub(super) fn new(path: Option<PathBuf>) -> Self {
        HistoryCache {
            path,
            history: None,
        }
    }
}

impl Fleet {
    /// Keeps the availability history at `path` (this machine's cache) besides the agents.
    pub fn with_history_cache(self, path: Option<PathBuf>) -> Fleet {
        *self.history.lock().unwrap_or_else(|p| p.into_inner()) = HistoryCache::new(path);
        self
    }

    /// The history as this machine knows it (its cache, with what this run observed).
    fn local_history(&self, cache: &mut HistoryCache) -> History {
        if let Some(h) = &cache.history {
            return h.clone();
        }
        let h = cache
            .path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|sealed| match History::open(&self.keys, &sealed) {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!("the cached availability history is unusable: {e}");
                    None
                }
            })
            .unwrap_or_default();
        cache.history = Some(h.clone());
        h
    }

    /// Changes the local history with `f` and saves it when it changed.
    pub(super) fn update_history(&self, f: impl FnOnce(&mut History)) {
        let mut cache = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.local_history(&mut cache);
        let mut h = before.clone();
        f(&mut h);
        if h == before {
            return;
        }
        if let Some(path) = &cache.path {
            let written = h.seal(&self.keys).and_then(|sealed| {
                sa_core::durable::write(
                    path,
                    &sealed,
                    sa_core::durable::Access::Private,
                    sa_core::durable::Replace::Yes,
                )
            });
            if let Err(e) = written {
                tracing::warn!("cannot keep the availability history in this machine's cache: {e}");
            }
        }
        cache.history = Some(h);
    }

    /// Records what `reach` observed (see the module docs); with [`Access::Write`], merges the
    /// agents' copies in and writes the merged history where a copy differs.
    pub(super) async fn observe(&self, reach: &Reach, access: Access) {
        let now = self.clock.now_secs();
        let clients = live(&reach.attempts);
        let copies = if access == Access::Write {
            self.read_histories(&clients).await
        } else {
            HashMap::new()
        };
        let book = self.book();
        self.update_history(|h| {
            for copy in copies.values().flatten() {
                h.merge(copy);
            }
            for c in &clients {
                h.observe(c.agent_id(), now, true);
            }
            for d in &reach.down {
                h.observe(d.id, now, false);
            }
            for m in book.active() {
                if let Some(w) = m.wake {
                    let known = h.get(&m.id).and_then(|a| a.wake);
                    if known.is_none_or(|k| k.mac != Some(w.mac) || k.broadcast != w.broadcast) {
                        h.set_wake(m.id, Some(w.mac), w.broadcast, w.seen / 1_000_000_000);
                    }
                }
            }
            for m in book.members().filter(|m| m.retired) {
                h.remove(&m.id);
            }
        });
        if access == Access::Write {
            let merged = self.history();
            let stale: Vec<AgentClient> = clients
                .into_iter()
                .filter(|c| {
                    copies
                        .get(&c.agent_id())
                        .is_none_or(|h| h.as_ref() != Some(&merged))
                })
                .collect();
            self.store_history(&stale, &merged).await;
        }
    }

    /// The history as this machine knows it.
    pub fn history(&self) -> History {
        let mut cache = self.history.lock().unwrap_or_else(|p| p.into_inner());
        self.local_history(&mut cache)
    }

    /// The local history merged with every copy `clients` hold (nothing is written anywhere):
    /// what `agents list` and `status --durability` show.
    pub async fn fleet_history(&self, clients: &[AgentClient]) -> History {
        let mut h = self.history();
        for copy in self.read_histories(clients).await.values().flatten() {
            h.merge(copy);
        }
        h
    }

    /// Each client's copy (None: none, or unusable).
    async fn read_histories(&self, clients: &[AgentClient]) -> HashMap<[u8; 16], Option<History>> {
        let mut set = JoinSet::new();
        for c in clients {
            let c = c.clone();
            set.spawn(async move {
                (
                    c.agent_id(),
                    c.addr().to_string(),
                    c.get_blob(AVAILABILITY_BLOB).await,
                )
            });
        }
        let mut out = HashMap::new();
        while let Some(Ok((id, addr, got))) = set.join_next().await {
            let copy = match got.and_then(|b| History::open(&self.keys, &b)) {
                Ok(h) => Some(h),
                Err(sa_core::Error::Remote(_)) | Err(sa_core::Error::ShardMissing) => None,
                Err(e) => {
                    tracing::warn!("{addr}: availability history unusable: {e}");
                    None
                }
            };
            out.insert(id, copy);
        }
        out
    }

    async fn store_history(&self, clients: &[AgentClient], h: &History) {
        if clients.is_empty() {
            return;
        }
        let sealed = match h.seal(&self.keys) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot seal the availability history: {e}");
                return;
            }
        };
        let mut set = JoinSet::new();
        for c in clients {
            let (c, sealed) = (c.clone(), sealed.clone());
            set.spawn(async move {
                (
                    c.addr().to_string(),
                    c.put_blob(AVAILABILITY_BLOB, sealed).await,
                )
            });
        }
        while let Some(Ok((addr, r))) = set.join_next().await {
            if let Err(e) = r {
                tracing::warn!("{addr}: cannot store the availability history: {e}");
            }
        }
    }
}

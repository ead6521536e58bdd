//! Repair, watching: keep the backup at full redundancy while client PCs come and go.
//!
//! Every interval (default 5m) it runs one [`repair_pass`]:
//!
//! * shards that are **bad or quarantined** on an agent that answers, and shards **crowded** on
//!   one agent (a snapshot stored with `--allow-degraded`), are rebuilt at once;
//! * shards on an agent that **does not answer** are held back until that agent has been
//!   missing for longer than the repair delay (default 24h): a PC that is off for the night or
//!   the weekend should not make the office's network copy its whole share elsewhere. After
//!   that they are rebuilt onto other agents and the catalog gets a new revision, as
//!   `sa-image repair` does.
//!
//! Since when each agent has been missing is kept in a small text file (default `repair-watch`
//! in this owner's cache directory, beside the manifest cache and `agents-seen`): one line
//! `AGENT-ID-HEX SINCE-UNIX-MS ADDRESS` per missing agent, written durably, so a restarted
//! watcher keeps the clock instead of starting it over. An agent that answers again leaves the file. The clock starts when the watcher first
//! sees the agent missing (not when someone last saw it answering: a watcher started after a
//! long pause must not rebuild around an agent that was only just switched off).
//!
//! Logging goes through `tracing` (each pass at debug; rebuilds and held-back agents at info,
//! failures at warn); each pass is also handed to the caller as a [`PassLine`]. The caller's
//! [`Shutdown`] stops it at once, also mid-pass: a pass interrupted anywhere leaves a readable
//! catalog and no shard collected too early (see [`crate::repair`]); the next start repeats what
//! was left. Time comes from the fleet's clock; the waits between passes are tokio sleeps.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sa_core::keys::{hex, Keys};
use serde::Serialize;

use super::{repair_pass, PassOptions, RepairReport};
use crate::error::{Error, Result};
use crate::fleet::census::Census;
use crate::fleet::Fleet;
use crate::shutdown::Shutdown;

/// Default repair delay: how long an agent may be missing before its shards are rebuilt.
pub const DEFAULT_REPAIR_AFTER: Duration = Duration::from_secs(24 * 3600);
/// Default time between passes.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(300);

/// How to watch.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Each pass's settings.
    pub pass: PassOptions,
    /// How long an agent may be missing before its shards are rebuilt elsewhere.
    pub repair_after: Duration,
    /// Time between passes.
    pub interval: Duration,
    /// The state file (None: `repair-watch` in the owner's cache directory).
    pub state: Option<PathBuf>,
}

/// Since when each agent has been missing, kept in a file.
#[derive(Debug)]
pub struct WatchState {
    path: PathBuf,
    /// Agent id (hex) → (Unix ms it was first seen missing, address).
    missing: BTreeMap<String, (u64, String)>,
}

impl WatchState {
    /// Reads the state file (a missing file is an empty state; an unreadable line is skipped
    /// with a warning: the worst case is a clock that starts again).
    pub fn load(path: &Path) -> WatchState {
        let mut missing = BTreeMap::new();
        if let Ok(text) = std::fs::read_to_string(path) {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let f: Vec<&str> = line.split_whitespace().collect();
                match f[..] {
                    [id, since, addr] if since.parse::<u64>().is_ok() => {
                        missing.insert(
                            id.to_string(),
                            (since.parse().unwrap_or(0), addr.to_string()),
                        );
                    }
                    _ => tracing::warn!("{}: ignoring line {line:?}", path.display()),
                }
            }
        }
        WatchState {
            path: path.to_path_buf(),
            missing,
        }
    }

    /// Writes the file durably; a failure is a warning (the clock may restart).
    pub fn save(&self) {
        let text: String = self
            .missing
            .iter()
            .map(|(id, (t, a))| format!("{id} {t} {a}\n"))
            .collect();
        let r = sa_core::durable::write(
            &self.path,
            text.as_bytes(),
            sa_core::durable::Access::Shared,
            sa_core::durable::Replace::Yes,
        );
        if let Err(e) = r {
            tracing::warn!("cannot save the watcher's state: {e}");
        }
    }

    /// Notes who answers and who does not at `now` (Unix ms); returns the missing agents whose
    /// shards wait (missing for less than `after`).
    pub fn observe(&mut self, census: &Census, now: u64, after: Duration) -> HashSet<[u8; 16]> {
        let mut hold = HashSet::new();
        for m in &census.members {
            if m.id == [0; 16] {
                continue; // an address that never answered: it holds nothing of ours
            }
            let id = hex(&m.id);
            if m.client.is_some() {
                if self.missing.remove(&id).is_some() {
                    tracing::info!("agent {} ({}) answers again", m.addr, &id[..8]);
                }
                continue;
            }
            let since = self
                .missing
                .entry(id.clone())
                .or_insert_with(|| {
                    tracing::warn!(
                        "agent {} ({}) is missing: {}",
                        m.addr,
                        &id[..8],
                        m.error.as_deref().unwrap_or("unreachable")
                    );
                    (now, m.addr.clone())
                })
                .0;
            if now.saturating_sub(since) < after.as_millis() as u64 {
                hold.insert(m.id);
            }
        }
        hold
    }

    /// Missing agents: (id hex, since Unix ms, address).
    pub fn missing(&self) -> impl Iterator<Item = (&String, u64, &String)> {
        self.missing.iter().map(|(id, (t, a))| (id, *t, a))
    }
}

/// One missing agent in a pass line.
#[derive(Serialize, Debug, Clone)]
pub struct MissingAgent {
    /// Agent id (hex).
    pub id: String,
    /// Address.
    pub addr: String,
    /// When the watcher first saw it missing (Unix ms).
    pub since_ms: u64,
    /// Whether its shards are rebuilt elsewhere now (missing longer than `--repair-after`).
    pub repairing: bool,
}

/// What `repair --watch --json` prints after each pass, one line each.
#[derive(Serialize, Debug)]
pub struct PassLine {
    /// Pass number, from 1.
    pub pass: u64,
    /// When the pass started (Unix ms).
    pub at_ms: u64,
    /// Agents missing now.
    pub missing: Vec<MissingAgent>,
    /// The pass's report (None when it failed).
    pub report: Option<RepairReport>,
    /// Why the pass failed.
    pub error: Option<String>,
}

/// The default state file of `keys`' owner under the cache root `root`.
pub fn default_state(root: Option<&Path>, keys: &Keys) -> Option<PathBuf> {
    crate::cache_dir::owner_dir(root, keys).map(|d| d.join("repair-watch"))
}

/// Runs repair passes until `shutdown` fires (see the module docs); `on_pass` gets each pass.
pub async fn watch(
    fleet: &Fleet,
    opts: &WatchOptions,
    shutdown: &Shutdown,
    on_pass: &mut (dyn FnMut(&PassLine) + Send),
) -> Result<()> {
    if opts.interval.is_zero() {
        return Err(Error::invalid(
            "the interval between passes must be more than 0",
        ));
    }
    let path = match &opts.state {
        Some(p) => p.clone(),
        None => default_state(opts.pass.cache_dir.as_deref(), fleet.keys()).ok_or_else(|| {
            Error::invalid(
                "no place for the watcher's state: give --state FILE (or --cache-dir, or set HOME)",
            )
        })?,
    };
    let mut state = WatchState::load(&path);
    tracing::info!(
        "watching: looking every {:?}, rebuilding around a missing agent after {:?}; state in {}",
        opts.interval,
        opts.repair_after,
        path.display()
    );
    let after = opts.repair_after;
    let mut pass = 0u64;
    loop {
        pass += 1;
        let at = fleet.clock().now_ms();
        let mut hold = |census: &Census| {
            let hold = state.observe(census, at, after);
            state.save();
            hold
        };
        let result = tokio::select! {
            r = repair_pass(fleet, &opts.pass, &mut hold) => r,
            () = shutdown.cancelled() => {
                tracing::info!("stopping (mid-pass; the next start repeats what was left)");
                return Ok(());
            }
        };
        let missing: Vec<MissingAgent> = state
            .missing()
            .map(|(id, since, addr)| MissingAgent {
                id: id.clone(),
                addr: addr.clone(),
                since_ms: since,
                repairing: at.saturating_sub(since) >= after.as_millis() as u64,
            })
            .collect();
        let line = match result {
            Ok(report) => {
                log_pass(pass, fleet.clock().now_ms(), &report, &missing, after);
                PassLine {
                    pass,
                    at_ms: at,
                    missing,
                    report: Some(report),
                    error: None,
                }
            }
            Err(e) => {
                tracing::warn!(
                    "pass {pass} failed: {e}; trying again in {:?}",
                    opts.interval
                );
                PassLine {
                    pass,
                    at_ms: at,
                    missing,
                    report: None,
                    error: Some(e.to_string()),
                }
            }
        };
        on_pass(&line);
        tokio::select! {
            () = tokio::time::sleep(opts.interval) => {}
            () = shutdown.cancelled() => {
                tracing::info!("stopping");
                return Ok(());
            }
        }
    }
}

fn log_pass(pass: u64, now: u64, r: &RepairReport, missing: &[MissingAgent], after: Duration) {
    for m in missing.iter().filter(|m| !m.repairing) {
        let left = after.saturating_sub(Duration::from_millis(now.saturating_sub(m.since_ms)));
        tracing::info!(
            "agent {} missing; its shards are rebuilt elsewhere if it is still missing in {}s",
            m.addr,
            left.as_secs()
        );
    }
    if r.shards_rebuilt > 0 || r.shards_failed > 0 || r.stripes_lost > 0 {
        tracing::info!(
            "pass {pass}: rebuilt {} shard(s) ({} spread off crowded agents), {} not placed, {} stripe(s) lost, {} held back",
            r.shards_rebuilt,
            r.shards_spread,
            r.shards_failed,
            r.stripes_lost,
            r.shards_held
        );
        if r.shards_failed > 0 || r.stripes_lost > 0 {
            tracing::warn!(
                "pass {pass}: {} shard(s) could not be placed, {} stripe(s) lost: start more agents or bring back the missing ones",
                r.shards_failed,
                r.stripes_lost
            );
        }
    } else {
        tracing::debug!(
            "pass {pass}: nothing to rebuild ({} held back)",
            r.shards_held
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: u8, up: bool) -> crate::fleet::census::Member {
        crate::fleet::census::Member {
            id: [id; 16],
            addr: format!("10.0.0.{id}:7710"),
            client: None,
            stat: None,
            error: (!up).then(|| "connection refused".into()),
        }
    }

    #[test]
    fn the_clock_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repair-watch");
        // Members without a client are missing (a test cannot make a live AgentClient here).
        let fleet = Census {
            members: vec![member(1, false), member(2, false)],
        };
        let after = Duration::from_secs(10);
        let mut s = WatchState::load(&path);
        let hold = s.observe(&fleet, 1_000_000, after);
        assert_eq!(hold.len(), 2, "just missing: held back");
        s.save();
        // A restarted watcher, 11 s later: the clock kept running, both are due now.
        let mut s = WatchState::load(&path);
        assert!(s.observe(&fleet, 1_011_000, after).is_empty());
        assert_eq!(s.missing().count(), 2);
        // 5 s after the first sighting: still held.
        let mut s = WatchState::load(&path);
        assert_eq!(s.observe(&fleet, 1_005_000, after).len(), 2);
    }
}

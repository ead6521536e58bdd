//! `sa-image repair --watch`: keep the backup at full redundancy while client PCs come and go.
//!
//! Every `--interval` (default 5m) it runs one [`repair_pass`]:
//!
//! * shards that are **bad or quarantined** on an agent that answers, and shards **crowded** on
//!   one agent (a snapshot stored with `--allow-degraded`), are rebuilt at once;
//! * shards on an agent that **does not answer** are held back until that agent has been
//!   missing for longer than `--repair-after` (default 24h): a PC that is off for the night or
//!   the weekend should not make the office's network copy its whole share elsewhere. After
//!   that they are rebuilt onto other agents and the catalog gets a new revision, as
//!   `sa-image repair` does.
//!
//! Since when each agent has been missing is kept in a small text file (`--state`, default
//! `repair-watch` in this owner's cache directory, beside the manifest cache and
//! `agents-seen`): one line `AGENT-ID-HEX SINCE-UNIX-MS ADDRESS` per missing agent, written to a
//! temporary file and renamed, so a restarted watcher keeps the clock instead of starting it
//! over. An agent that answers again leaves the file. The clock starts when the watcher first
//! sees the agent missing (not when someone last saw it answering: a watcher started after a
//! long pause must not rebuild around an agent that was only just switched off).
//!
//! Logging goes through `tracing` (`-v` for each pass; rebuilds and held-back agents are logged
//! at info, failures at warn). With `--json`, one JSON object per pass on its own stdout line.
//! SIGINT or SIGTERM stop it at once, also mid-pass: a pass interrupted anywhere leaves a
//! readable catalog and no shard collected too early (see [`crate::cmd::repair`]); the next
//! start repeats what was left.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sa_core::keys::{hex, Keys};
use serde::Serialize;

use crate::cmd::repair::{repair_pass, PassOptions, RepairArgs, RepairReport};
use crate::health::Fleet;

/// Default `--repair-after`.
pub const DEFAULT_REPAIR_AFTER: &str = "24h";
/// Default `--interval`.
pub const DEFAULT_INTERVAL: &str = "5m";

/// Parses a duration: a number followed by `ms`, `s`, `m`, `h` or `d` (`90s`, `30m`, `24h`,
/// `7d`, `200ms`); a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .with_context(|| format!("'{text}' is not a duration: use e.g. 90s, 30m, 24h, 7d"))?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        "d" => n * 86400.0,
        u => bail!("'{text}': unknown unit '{u}' (use ms, s, m, h or d)"),
    };
    if !secs.is_finite() || !(0.0..=100.0 * 365.0 * 86400.0).contains(&secs) {
        bail!("'{text}' is out of range");
    }
    Ok(Duration::from_secs_f64(secs))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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

    /// Writes the file (temp + rename); a failure is a warning (the clock may restart).
    pub fn save(&self) {
        let text: String = self
            .missing
            .iter()
            .map(|(id, (t, a))| format!("{id} {t} {a}\n"))
            .collect();
        let tmp = self.path.with_extension("new");
        let r = self
            .path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = r {
            tracing::warn!(
                "cannot save the watcher's state in {}: {e}",
                self.path.display()
            );
        }
    }

    /// Notes who answers and who does not at `now` (Unix ms); returns the missing agents whose
    /// shards wait (missing for less than `after`).
    pub fn observe(&mut self, fleet: &Fleet, now: u64, after: Duration) -> HashSet<[u8; 16]> {
        let mut hold = HashSet::new();
        for m in &fleet.members {
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
#[derive(Serialize, Debug)]
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
fn default_state(root: Option<&Path>, keys: &Keys) -> Option<PathBuf> {
    root.map(Path::to_path_buf)
        .or_else(crate::cmd::snapshot::cache::default_root)
        .map(|r| r.join(&hex(&keys.owner_id().0)[..16]).join("repair-watch"))
}

/// `sa-image repair --watch`.
pub async fn run(args: &RepairArgs, keys: Arc<Keys>, agents: Vec<String>) -> Result<u8> {
    let after = parse_duration(args.repair_after.as_deref().unwrap_or(DEFAULT_REPAIR_AFTER))
        .context("--repair-after")?;
    let interval = parse_duration(args.interval.as_deref().unwrap_or(DEFAULT_INTERVAL))
        .context("--interval")?;
    if interval.is_zero() {
        bail!("--interval must be more than 0");
    }
    let path = match &args.state {
        Some(p) => p.clone(),
        None => default_state(args.cache_dir.as_deref(), &keys).context(
            "no place for the watcher's state: give --state FILE (or --cache-dir, or set HOME)",
        )?,
    };
    let mut state = WatchState::load(&path);
    let opts = PassOptions {
        dry_run: args.dry_run,
        cache_dir: args.cache_dir.clone(),
    };
    tracing::info!(
        "watching {} agent address(es): looking every {interval:?}, rebuilding around a missing agent after {after:?}; state in {}",
        agents.len(),
        path.display()
    );
    let mut stop = Box::pin(stop_signal());
    let mut pass = 0u64;
    loop {
        pass += 1;
        let at = now_ms();
        let mut hold = |fleet: &Fleet| {
            let hold = state.observe(fleet, at, after);
            state.save();
            hold
        };
        let run = repair_pass(&agents, &keys, &opts, &mut hold);
        let result = tokio::select! {
            r = run => r,
            sig = &mut stop => {
                tracing::info!("{sig}: stopping (mid-pass; the next start repeats what was left)");
                return Ok(0);
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
                log_pass(pass, &report, &missing, after);
                PassLine {
                    pass,
                    at_ms: at,
                    missing,
                    report: Some(report),
                    error: None,
                }
            }
            Err(e) => {
                tracing::warn!("pass {pass} failed: {e:#}; trying again in {interval:?}");
                PassLine {
                    pass,
                    at_ms: at,
                    missing,
                    report: None,
                    error: Some(format!("{e:#}")),
                }
            }
        };
        if args.json {
            println!("{}", serde_json::to_string(&line)?);
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            sig = &mut stop => {
                tracing::info!("{sig}: stopping");
                return Ok(0);
            }
        }
    }
}

fn log_pass(pass: u64, r: &RepairReport, missing: &[MissingAgent], after: Duration) {
    for m in missing.iter().filter(|m| !m.repairing) {
        let left = after.saturating_sub(Duration::from_millis(now_ms().saturating_sub(m.since_ms)));
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

/// Resolves with the name of the first SIGINT or SIGTERM.
async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // No signal handling: ctrl-c still ends the process the default way.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("200ms").unwrap(), Duration::from_millis(200));
        assert_eq!(parse_duration("15").unwrap(), Duration::from_secs(15));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        for bad in ["", "h", "5x", "-1s", "1e999s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    fn member(id: u8, up: bool) -> crate::health::Member {
        crate::health::Member {
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
        let fleet = Fleet {
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

//! `sa-image status`: each agent (reachable, last seen, used/quota, shard count) and each
//! snapshot's worst-case margin: how many more agents it survives losing, by shard presence
//! (`LIST_SHARDS` on every agent, no shard read; see [`crate::health`]).
//!
//! Agents are counted, not shards: a stripe stored with `snapshot --allow-degraded` (two shards
//! on one agent) has a margin below m although every shard is present.
//!
//! Exit 0: every snapshot has its full redundancy (margin = m). Exit 2: some snapshot is below
//! it (margin < m; `sa-image repair` restores it). Exit 3: some stripe has fewer than k shards
//! left (data lost unless the agents that hold the rest come back).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use sa_core::keys::hex;
use sa_core::size::format_size;
use serde::{Deserialize, Serialize};

use crate::agents::open_catalog;
use crate::cmd::list::rfc3339;
use crate::config::{self, require_agents, KeyArgs};
use crate::gc::now_secs;
use crate::health::{snapshot_margin, Fleet, Margin, Presence, SeenBook};
use crate::merge;

/// Flags of `status`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct StatusArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Agents to ask, HOST:PORT, comma-separated: the catalog names the rest.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Where this machine keeps its manifest cache and agent sightings (default:
    /// $XDG_CACHE_HOME/sa-image or ~/.cache/sa-image).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

/// One agent in `status --json`.
#[derive(Serialize, Debug)]
pub struct AgentStatus {
    /// Stable id (hex; empty when it never answered).
    pub id: String,
    /// Address.
    pub addr: String,
    /// Whether it answered now.
    pub reachable: bool,
    /// When it last answered (Unix seconds), as this machine saw it.
    pub last_seen: Option<u64>,
    /// Bytes stored.
    pub used: Option<u64>,
    /// Quota, bytes (0: none).
    pub quota: Option<u64>,
    /// Bytes it can still take: quota minus used, else (no quota) its filesystem's free space;
    /// None when unknown (an agent too old to report its filesystem).
    pub free: Option<u64>,
    /// Free bytes on the agent's filesystem.
    pub fs_free: Option<u64>,
    /// Shard files held.
    pub shards: Option<u64>,
    /// Why it is unreachable.
    pub error: Option<String>,
}

/// One snapshot in `status --json`.
#[derive(Serialize, Debug)]
pub struct SnapshotStatus {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume name.
    pub volume: String,
    /// Creation time, RFC 3339.
    pub created: String,
    /// Manifest revision (repairs).
    pub revision: u32,
    /// Data shards.
    pub k: u8,
    /// Configured parity shards (the redundancy it should have).
    pub m: u8,
    /// `ok` (margin = m), `degraded` (0 <= margin < m) or `lost` (margin < 0).
    pub state: String,
    /// Presence figures, including the worst-case margin.
    #[serde(flatten)]
    pub health: Margin,
}

/// What `status --json` prints.
#[derive(Serialize, Debug)]
pub struct StatusReport {
    /// Every agent of the catalog and of `--agents`.
    pub agents: Vec<AgentStatus>,
    /// Every live snapshot.
    pub snapshots: Vec<SnapshotStatus>,
    /// Agents whose shard listing failed (their shards count as absent).
    pub listing_failed: Vec<String>,
    /// The exit code: 0 ok, 2 below redundancy, 3 data lost.
    pub exit: u8,
}

/// `sa-image status`.
pub async fn run(mut args: StatusArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: StatusArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; agents, cache_dir; bools json);
    let keys = Arc::new(args.keyfile.load()?.derive());
    let (manifests, attempts) = open_catalog(&require_agents(&args.agents)?, &keys).await?;
    let fleet = Fleet::gather(&attempts, &manifests, &keys).await;
    let mut volumes: Vec<_> = manifests.iter().map(|m| m.volume).collect();
    volumes.sort();
    volumes.dedup();
    let presence = Presence::gather(&fleet, &volumes).await;
    let mut book = SeenBook::open(args.cache_dir.as_deref(), &keys);
    book.record(&fleet, now_secs());

    let agents = fleet
        .members
        .iter()
        .map(|m| AgentStatus {
            id: if m.id == [0; 16] {
                String::new()
            } else {
                hex(&m.id)
            },
            addr: m.addr.clone(),
            reachable: m.client.is_some(),
            last_seen: book.last_seen(&m.id),
            used: m.stat.as_ref().map(|s| s.used),
            quota: m.stat.as_ref().map(|s| s.quota),
            free: m.stat.as_ref().and_then(|s| s.room()),
            fs_free: m.stat.as_ref().and_then(|s| s.fs_free),
            shards: m.stat.as_ref().map(|s| s.shards),
            error: m.error.clone(),
        })
        .collect();
    let mut exit = 0;
    let snapshots = manifests
        .iter()
        .map(|m| {
            let health = snapshot_margin(m, &presence);
            let state = if health.margin < 0 {
                exit = 3;
                "lost"
            } else if health.margin < m.layout.m as i64 {
                exit = exit.max(2);
                "degraded"
            } else {
                "ok"
            };
            SnapshotStatus {
                snapshot: m.snapshot.clone(),
                volume: m.volume_name.clone(),
                created: rfc3339(m.created),
                revision: m.revision,
                k: m.layout.k,
                m: m.layout.m,
                state: state.into(),
                health,
            }
        })
        .collect();
    let report = StatusReport {
        agents,
        snapshots,
        listing_failed: presence
            .failed
            .iter()
            .map(|(a, e)| format!("{a}: {e}"))
            .collect(),
        exit,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(report.exit)
}

fn print_text(r: &StatusReport) {
    let now = now_secs();
    println!(
        "{:<24} {:<10} {:>9} {:>10} {:>10} {:>8}  last seen",
        "agent", "id", "reachable", "used", "quota", "shards"
    );
    for a in &r.agents {
        let opt =
            |v: Option<u64>, f: &dyn Fn(u64) -> String| v.map(f).unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:<10} {:>9} {:>10} {:>10} {:>8}  {}",
            a.addr,
            a.id.get(..8).unwrap_or(""),
            if a.reachable { "yes" } else { "NO" },
            opt(a.used, &format_size),
            opt(a.quota, &|q| if q == 0 {
                "none".into()
            } else {
                format_size(q)
            }),
            opt(a.shards, &|s| s.to_string()),
            match a.last_seen {
                Some(_) if a.reachable => "now".to_string(),
                Some(t) => format!("{}s ago ({})", now.saturating_sub(t), rfc3339(t)),
                None => "never (by this machine)".into(),
            }
        );
        if let Some(e) = &a.error {
            println!("    {e}");
        }
    }
    for f in &r.listing_failed {
        println!("warning: shard listing failed on {f}; its shards count as absent");
    }
    println!();
    for s in &r.snapshots {
        let h = &s.health;
        println!(
            "snapshot {} of '{}' ({}, k={} m={}): margin {} of {}: {}",
            s.snapshot,
            s.volume,
            s.created,
            s.k,
            s.m,
            h.margin,
            s.m,
            match s.state.as_str() {
                "ok" => "full redundancy".to_string(),
                "degraded" => format!(
                    "DEGRADED: {} of {} stripes miss shards ({} shards absent){}; survives {} more agent loss(es); run `sa-image repair`",
                    h.degraded_stripes,
                    h.data_stripes,
                    h.absent_shards,
                    if h.crowded_stripes > 0 {
                        format!(
                            ", {} stripes hold two or more shards on one agent (stored with --allow-degraded)",
                            h.crowded_stripes
                        )
                    } else {
                        String::new()
                    },
                    h.margin
                ),
                _ => format!(
                    "LOST: {} stripes have fewer than k={} shards; bring back the agents that are down",
                    h.lost_stripes, s.k
                ),
            }
        );
    }
}

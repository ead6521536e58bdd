//! Status: each agent (reachable, last seen, used/quota, shard count) and each snapshot's
//! worst-case margin: how many more agent losses it survives, by shard presence (`LIST_SHARDS` on
//! every agent, no shard read; see [`crate::fleet::census`]).
//!
//! Agents are counted, not shards: a stripe stored degraded (two shards on one agent) has a
//! margin below m although every shard is present.
//!
//! [`StatusReport::exit`]: 0 every snapshot has its full redundancy (margin = m); 2 some snapshot
//! is below it (`repair` restores it); 3 some stripe has fewer than k shards left.
//!
//! Status only reads: it never writes the agent book or the catalog (it records when agents
//! were seen in this machine's cache directory).

use std::path::PathBuf;

use sa_core::keys::hex;
use serde::Serialize;

use crate::catalog;
use crate::error::Result;
use crate::fleet::census::{snapshot_margin, Census, Margin, Presence};
use crate::fleet::seen::SeenBook;
use crate::fleet::{Access, Fleet};
use crate::time::rfc3339;

/// What to look at.
#[derive(Debug, Clone, Default)]
pub struct StatusOptions {
    /// Agent addresses (the catalog and the book name the rest).
    pub agents: Vec<String>,
    /// This machine's cache root (agent sightings).
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
    /// Creation time, Unix seconds.
    pub created_unix: u64,
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
    /// Its last recovery drill, if any ([`crate::drill`]).
    pub last_drill: Option<crate::drill::record::DrillSummary>,
}

/// What `status --json` prints.
#[derive(Serialize, Debug)]
pub struct StatusReport {
    /// Every agent of the catalog, of the agent book (in service) and of the addresses given.
    pub agents: Vec<AgentStatus>,
    /// Every live snapshot.
    pub snapshots: Vec<SnapshotStatus>,
    /// Agents whose shard listing failed (their shards count as absent).
    pub listing_failed: Vec<String>,
    /// When the report was made, Unix seconds.
    pub now: u64,
    /// The exit code: 0 ok, 2 below redundancy, 3 data lost.
    pub exit: u8,
}

/// Gathers the status (see the module docs).
pub async fn status(fleet: &Fleet, opts: &StatusOptions) -> Result<StatusReport> {
    let cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
    let manifests = cat.manifests;
    let census = Census::gather(fleet, &cat.reach, &manifests).await;
    let mut volumes: Vec<_> = manifests.iter().map(|m| m.volume).collect();
    volumes.sort();
    volumes.dedup();
    let presence = Presence::gather(&census, &volumes).await;
    let mut book = SeenBook::open(opts.cache_dir.as_deref(), fleet.keys());
    book.record(&census, fleet.clock().now_secs());
    let agents = census
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
    let ids: Vec<String> = manifests.iter().map(|m| m.snapshot.clone()).collect();
    let drills = crate::drill::record::load(&cat.reach.live(), fleet.keys(), &ids).await;
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
                created_unix: m.created,
                revision: m.revision,
                k: m.layout.k,
                m: m.layout.m,
                state: state.into(),
                health,
                last_drill: drills
                    .iter()
                    .find(|(id, _)| *id == m.snapshot)
                    .map(|(_, r)| r.summary()),
            }
        })
        .collect();
    Ok(StatusReport {
        agents,
        snapshots,
        listing_failed: presence
            .failed
            .iter()
            .map(|(a, e)| format!("{a}: {e}"))
            .collect(),
        now: fleet.clock().now_secs(),
        exit,
    })
}

//! Collecting: mark what every kept manifest places on each agent, sweep the rest (older than
//! the grace period), repair the catalog copies (see the protocol in [`super`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use sa_core::catalog::FORGOTTEN_BLOB_PREFIX;
use sa_core::keys::{hex, unhex};
use sa_core::manifest::{parse_blob_name, Manifest, StripeRef};
use sa_core::shard::ShardKey;
use sa_core::store::{AgentClient, ShardRead, ShardWrite};
use serde::Serialize;
use tokio::task::JoinSet;

use super::read_catalog;
use crate::error::{Error, Result};
use crate::fleet::{Fleet, Reach};

/// Settings of a collection.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Shards younger than this are never collected.
    pub grace: Duration,
    /// Report only.
    pub dry_run: bool,
}

impl Default for GcOptions {
    fn default() -> Self {
        GcOptions {
            grace: super::DEFAULT_GRACE,
            dry_run: false,
        }
    }
}

/// What a collection did on one agent.
#[derive(Serialize, Debug, Clone, Default)]
pub struct AgentGc {
    /// Address.
    pub addr: String,
    /// Stable id (hex).
    pub agent_id: String,
    /// `done`, `unreachable: ...` or `failed: ...`.
    pub status: String,
    /// Shard files the agent holds before.
    pub shards_before: u64,
    /// Shards referenced by kept snapshots.
    pub shards_referenced: u64,
    /// Unreferenced shards deleted (or that would be, with --dry-run).
    pub shards_deleted: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Unreferenced shards kept because they are younger than the grace period or a lease.
    pub shards_young: u64,
    /// Catalog blobs deleted (stale manifests with a tombstone, expired leases).
    pub catalog_blobs_deleted: u64,
    /// Tombstones copied to it (a forget decided while it was down).
    pub tombstones_copied: u64,
}

/// What a collection did.
#[derive(Serialize, Debug, Clone, Default)]
pub struct GcReport {
    /// Kept snapshots (live, plus forgotten ones still named by a lease).
    pub snapshots_kept: usize,
    /// Live leases (running snapshots).
    pub leases: usize,
    /// The age below which nothing was collected, seconds.
    pub min_age: u64,
    /// Per agent.
    pub agents: Vec<AgentGc>,
    /// Totals.
    pub shards_deleted: u64,
    /// Bytes freed in all.
    pub bytes_freed: u64,
}

/// Shard keys each agent (by stable id) must keep for `manifests`.
fn mark(manifests: &[&Manifest]) -> HashMap<[u8; 16], HashSet<ShardKey>> {
    let mut keep: HashMap<[u8; 16], HashSet<ShardKey>> = HashMap::new();
    for m in manifests {
        for s in &m.stripes {
            if let StripeRef::Data { id, slots } = s {
                for (index, &slot) in slots.iter().enumerate() {
                    let agent = m.agents[slot as usize].id;
                    keep.entry(agent).or_default().insert(ShardKey {
                        volume: m.volume,
                        stripe: *id,
                        index: index as u8,
                    });
                }
            }
        }
    }
    keep
}

/// Runs a collection over the reachable agents of `reach` (unreachable ones are reported and
/// left alone: the next collection cleans them).
pub async fn collect(fleet: &Fleet, reach: &Reach, opts: GcOptions) -> Result<GcReport> {
    let keys = fleet.keys();
    let clients = reach.live_or_none()?;
    let now = fleet.clock().now_secs();
    let cat = read_catalog(&clients, keys, now).await?;
    let copied = if opts.dry_run {
        HashMap::new()
    } else {
        copy_tombstones(&clients).await
    };
    let oldest_lease = cat.leases.iter().map(|l| l.started).min();
    let min_age = opts.grace.as_secs()
        + oldest_lease
            .map(|s| now.saturating_sub(s) + 60)
            .unwrap_or(0);
    let kept: Vec<&Manifest> = cat.live.iter().chain(&cat.leased_forgotten).collect();
    let marked: Vec<&Manifest> = kept.iter().copied().chain(&cat.superseded).collect();
    let keep = Arc::new(mark(&marked));
    let leased: HashSet<String> = cat.leases.iter().filter_map(|l| l.base.clone()).collect();

    let mut report = GcReport {
        snapshots_kept: kept.len(),
        leases: cat.leases.len(),
        min_age,
        ..Default::default()
    };
    let mut tasks = JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let stale: Vec<String> = cat
            .snap_names
            .iter()
            .filter(|(j, n)| {
                *j == i
                    && parse_blob_name(n)
                        .is_some_and(|(id, _)| cat.tombstones.contains(id) && !leased.contains(id))
            })
            .map(|(_, n)| n.clone())
            .chain(
                cat.expired_leases
                    .iter()
                    .filter(|(j, _)| *j == i)
                    .map(|(_, n)| n.clone()),
            )
            .collect();
        let (c, keep) = (c.clone(), keep.clone());
        tasks.spawn(async move {
            let mut a = AgentGc {
                addr: c.addr().to_string(),
                agent_id: hex(&c.agent_id()),
                ..Default::default()
            };
            match sweep_agent(&c, &keep, stale, min_age, opts.dry_run, &mut a).await {
                Ok(()) => a.status = "done".into(),
                Err(e) => a.status = format!("failed: {e}"),
            }
            a
        });
    }
    while let Some(r) = tasks.join_next().await {
        let mut a = r.map_err(|e| Error::failed(format!("gc task failed: {e}")))?;
        a.tombstones_copied = copied.get(&a.agent_id).copied().unwrap_or(0);
        report.shards_deleted += a.shards_deleted;
        report.bytes_freed += a.bytes_freed;
        report.agents.push(a);
    }
    for d in &reach.down {
        report.agents.push(AgentGc {
            addr: d.addr.clone(),
            agent_id: hex(&d.id),
            status: format!(
                "unreachable: {} (collected when it is back and gc runs again)",
                d.why
            ),
            ..Default::default()
        });
    }
    report.agents.sort_by(|a, b| a.addr.cmp(&b.addr));
    Ok(report)
}

/// Sweeps one agent (see the module docs).
async fn sweep_agent(
    c: &AgentClient,
    keep: &HashMap<[u8; 16], HashSet<ShardKey>>,
    stale_blobs: Vec<String>,
    min_age: u64,
    dry_run: bool,
    a: &mut AgentGc,
) -> Result<()> {
    let empty = HashSet::new();
    let mine = keep.get(&c.agent_id()).unwrap_or(&empty);
    let vols = c.list_volumes().await.map_err(|e| {
        Error::failed(format!(
            "cannot list volumes ({e}): an agent older than this sa-image?"
        ))
    })?;
    for vol in vols {
        let Some(v) = unhex(&vol).filter(|v| v.len() == 16) else {
            continue;
        };
        let mut volume = [0u8; 16];
        volume.copy_from_slice(&v);
        let mut doomed = Vec::new();
        for bucket in 0..=255u8 {
            for e in c.list_shards(&volume, bucket).await? {
                a.shards_before += 1;
                let key = ShardKey {
                    volume,
                    stripe: e.stripe,
                    index: e.index,
                };
                if mine.contains(&key) {
                    a.shards_referenced += 1;
                } else if e.age < min_age {
                    a.shards_young += 1;
                } else {
                    doomed.push(key);
                }
            }
        }
        if dry_run {
            a.shards_deleted += doomed.len() as u64;
        } else if !doomed.is_empty() {
            let s = c.sweep(min_age, doomed).await?;
            a.shards_deleted += s.deleted;
            a.bytes_freed += s.bytes;
            a.shards_young += s.young;
        }
    }
    if !dry_run {
        for name in stale_blobs {
            c.delete_blob(&name).await?;
            a.catalog_blobs_deleted += 1;
        }
    }
    Ok(())
}

/// Copies every tombstone some agent holds to the agents that lack it (best effort); returns
/// how many each agent (id hex) received.
async fn copy_tombstones(clients: &[AgentClient]) -> HashMap<String, u64> {
    let mut copied: HashMap<String, u64> = HashMap::new();
    let mut held: Vec<HashSet<String>> = Vec::new();
    for c in clients {
        held.push(
            c.list_blobs(FORGOTTEN_BLOB_PREFIX)
                .await
                .unwrap_or_default()
                .into_iter()
                .collect(),
        );
    }
    let all: HashSet<&String> = held.iter().flatten().collect();
    for name in all {
        let Some(from) = held.iter().position(|h| h.contains(name)) else {
            continue;
        };
        let Ok(sealed) = clients[from].get_blob(name).await else {
            continue;
        };
        for (c, h) in clients.iter().zip(&held) {
            if !h.contains(name) {
                match c.put_blob(name, sealed.clone()).await {
                    Ok(()) => {
                        tracing::info!("{}: copied {name} (forgotten while it was away)", c.addr());
                        *copied.entry(hex(&c.agent_id())).or_default() += 1;
                    }
                    Err(e) => tracing::warn!("{}: cannot copy {name}: {e}", c.addr()),
                }
            }
        }
    }
    copied
}

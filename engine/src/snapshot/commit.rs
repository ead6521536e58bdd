//! The commit of a snapshot: a durability barrier (`SYNC`) on every agent still with the run,
//! then the sealed manifest on every such agent. An agent lost during the run (or whose `SYNC`
//! fails) holds shards that may not be durable: they count as absent, and the snapshot is
//! committed only if every stripe still has k shards elsewhere (its margin then shows in the
//! report and in `status`, and `repair` restores it).

use std::collections::HashSet;

use sa_core::manifest::{Manifest, StripeRef};
use sa_core::placement::stripe_margin;
use sa_core::store::{AgentClient, ShardWrite};

use super::cache::ManifestCache;
use super::RunContext;
use crate::error::{Error, Result};
use crate::fleet::each::on_each;

/// What the commit found.
pub(super) struct Committed {
    /// Agent losses the snapshot survives as stored.
    pub margin: i64,
    /// Agents lost during the run (addresses).
    pub agents_lost: Vec<String>,
    /// Size of the sealed manifest.
    pub manifest_bytes: u64,
}

/// Syncs, checks every stripe keeps k shards, and stores the manifest (see the module docs).
pub(super) async fn commit(
    ctx: &RunContext<'_>,
    clients: &[AgentClient],
    mut lost: HashSet<u16>,
    stripes: Vec<StripeRef>,
    mcache: Option<&ManifestCache>,
) -> Result<Committed> {
    let k = ctx.opts.k as usize;
    let kept = |lost: &HashSet<u16>| {
        let lost = lost.clone();
        clients
            .iter()
            .enumerate()
            .filter(move |(slot, _)| !lost.contains(&(*slot as u16)))
    };
    for (slot, r) in on_each(kept(&lost), |c| async move { c.sync().await }).await? {
        if let Err(e) = r {
            tracing::warn!(
                "agent {} could not make its shards durable ({e}); counting them as absent",
                clients[slot].addr()
            );
            lost.insert(slot as u16);
        }
    }
    let lost_names = || {
        lost.iter()
            .map(|&s| clients[s as usize].addr().to_string())
            .collect::<Vec<_>>()
    };
    let margins: Vec<i64> = stripes
        .iter()
        .filter_map(|s| match s {
            StripeRef::Data { slots, .. } => {
                let present: Vec<u16> = slots
                    .iter()
                    .copied()
                    .filter(|s| !lost.contains(s))
                    .collect();
                Some(stripe_margin(&present, k))
            }
            StripeRef::Zero => None,
        })
        .collect();
    let short = margins.iter().filter(|&&m| m < 0).count();
    if short > 0 {
        return Err(Error::failed(format!(
            "{short} stripe(s) have fewer than k = {k} shards on agents that stayed (lost during the run: {}); \
             snapshot not committed: bring the agents back or add agents, and run it again",
            lost_names().join(", ")
        )));
    }
    let margin = margins.into_iter().min().unwrap_or(ctx.opts.m as i64);
    let (created, created_nanos) = ctx.fleet.clock().now_precise();
    let manifest = Manifest {
        snapshot: ctx.snapshot_id.clone(),
        volume_name: ctx.opts.volume.clone(),
        volume: ctx.volume_id,
        revision: 0,
        created,
        created_nanos,
        layout: ctx.layout,
        agents: ctx.table.clone(),
        stripes,
        tracking_bitmap: ctx.opts.new_bitmap.clone(),
    };
    let sealed = manifest.seal(ctx.fleet.keys())?;
    let name = manifest.blob_name();
    let puts = on_each(kept(&lost), |c| {
        let (name, data) = (name.clone(), sealed.clone());
        async move { c.put_blob(&name, data).await }
    })
    .await?;
    let failures: Vec<String> = puts
        .into_iter()
        .filter_map(|(slot, r)| r.err().map(|e| format!("{}: {e}", clients[slot].addr())))
        .collect();
    if failures.len() == clients.len() - lost.len() {
        return Err(Error::failed(format!(
            "no agent accepted the catalog entry; snapshot not committed: {}",
            failures.join("; ")
        )));
    }
    for f in &failures {
        tracing::warn!("catalog copy not stored on {f}");
    }
    if let Some(c) = mcache {
        c.store(&manifest, &sealed);
    }
    Ok(Committed {
        margin,
        agents_lost: lost_names(),
        manifest_bytes: sealed.len() as u64,
    })
}

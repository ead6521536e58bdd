//! Where a snapshot's new shards go: each agent's room (`STAT`: quota minus used, else its
//! filesystem's free space), a plan proportional to it ([`sa_core::placement`]), and the refusal
//! up front of a first snapshot the fleet cannot hold.

use sa_core::layout::Layout;
use sa_core::manifest::AgentEntry;
use sa_core::placement::{Budget, Placement, PlacementError};
use sa_core::shard::SHARD_HEADER_LEN;
use sa_core::size::format_size;
use sa_core::store::{AgentClient, ShardRead};

use crate::error::{Error, Result};
use crate::fleet::each::on_each;

/// Per client, in order, the bytes it can still take (`None`: it did not say).
pub(crate) async fn agent_rooms(clients: &[AgentClient]) -> Vec<Option<u64>> {
    let answers = on_each(
        clients.iter().enumerate(),
        |c| async move { c.stat().await },
    )
    .await
    .unwrap_or_else(|e| {
        tracing::warn!("{e}; placing as if every agent had unlimited room");
        Vec::new()
    });
    let mut out = vec![None; clients.len()];
    for (i, r) in answers {
        match r {
            Ok(s) => out[i] = s.room(),
            Err(e) => tracing::warn!(
                "{}: cannot ask its free space ({e}); placing as if unlimited",
                clients[i].addr()
            ),
        }
    }
    out
}

/// Bytes kept free on every agent for the catalog (the manifest of this snapshot, leases, and
/// some slack): 64 KiB plus 64 bytes per stripe (a sealed manifest takes about 36).
fn catalog_reserve(layout: &Layout) -> u64 {
    (64 << 10) + 64 * layout.stripe_count()
}

/// The placement of this run: from each agent's room (in whole shards, the catalog reserve
/// kept), the stripes to read (`to_read`, each assumed new and non-zero), and whether this run is
/// incremental (a base exists: few stripes will be new). Returns the plan, the run-time budget,
/// and the most shards of one stripe one agent may hold (1, more only degraded).
pub(crate) fn plan_placement(
    layout: &Layout,
    table: &[AgentEntry],
    rooms: &[Option<u64>],
    to_read: u64,
    incremental: bool,
    allow_degraded: bool,
) -> Result<(Placement, Budget, usize)> {
    let shards = layout.shards();
    let k = layout.k as usize;
    let file = (layout.shard_len(layout.stripe_size as usize) + SHARD_HEADER_LEN) as u64;
    let reserve = catalog_reserve(layout);
    let in_shards: Vec<u64> = rooms
        .iter()
        .map(|r| r.map_or(u64::MAX, |b| b.saturating_sub(reserve) / file))
        .collect();
    let roomy = in_shards.iter().filter(|&&r| r > 0).count();
    let describe = || {
        table
            .iter()
            .zip(rooms)
            .map(|(a, r)| {
                format!(
                    "{} {}",
                    a.addr,
                    r.map_or("room unknown".into(), |b| format!(
                        "{} free",
                        format_size(b)
                    ))
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let per_stripe = if roomy >= shards {
        1
    } else if allow_degraded && roomy >= k {
        shards.div_ceil(roomy)
    } else {
        return Err(Error::NoRoom(format!(
            "only {roomy} of {} reachable agents have room for a {} shard, but k + m = {shards} are needed{}: \
             free space on the agents (or raise their --quota), or add agents ({})",
            table.len(),
            format_size(file),
            if allow_degraded {
                format!("; even --allow-degraded needs at least k = {k}")
            } else if roomy >= k {
                "; --allow-degraded stores with less redundancy for now".into()
            } else {
                String::new()
            },
            describe()
        )));
    };
    if per_stripe > 1 {
        tracing::warn!(
            "degraded: {roomy} agents for k + m = {shards} shards; up to {per_stripe} shards of a stripe on one agent"
        );
    }
    let budget = Budget::new(&in_shards, per_stripe);
    let stripes = layout.stripe_count();
    match Placement::new(stripes, to_read, shards, &in_shards, per_stripe) {
        Ok(p) => Ok((p, budget, per_stripe)),
        Err(PlacementError::NoRoom { room, need, .. }) if incremental => {
            tracing::warn!(
                "the agents could not hold a full rewrite of the {to_read} stripes read (room for {room} of \
                 {need} shard positions); placing by room anyway, as an incremental run stores only what changed"
            );
            let p = Placement::new(stripes, 0, shards, &in_shards, per_stripe)
                .map_err(|e| Error::NoRoom(e.to_string()))?;
            Ok((p, budget, per_stripe))
        }
        Err(e @ PlacementError::NoRoom { .. }) => {
            let need = to_read * shards as u64 * file;
            Err(Error::NoRoom(format!(
                "the agents cannot hold this snapshot: up to {} of new shards ({to_read} stripes × {shards} \
                 shards of {}; all-zero stripes store nothing but cannot be known before reading), and {e}; \
                 nothing was stored. Free space on the agents (or raise their --quota), or add agents ({})",
                format_size(need),
                format_size(file),
                describe()
            )))
        }
        Err(e) => Err(Error::NoRoom(e.to_string())),
    }
}

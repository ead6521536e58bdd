//! Retention for the bucket (`sa-image offsite gc`, and after `prune`/`gc` when an offsite tier
//! is set): the same mark-and-sweep with a grace period as the agents' collection
//! ([`crate::gc`]), over objects.
//!
//! 1. Tombstones: every tombstone the agents hold is copied to the bucket, and the bucket's
//!    manifests of forgotten snapshots are deleted.
//! 2. Mark: the stripes of every live snapshot, in the bucket's catalog *and* in the agents'.
//!    The agents' catalog is what keeps a racing push safe: a push uploads shards of a snapshot
//!    that is committed on the agents before its manifest reaches the bucket, so during that
//!    window the snapshot is live on the agents and its stripes are marked. The agents must be
//!    reachable for that reason; with [`SweepOptions::offsite_only`] (the office is gone, no
//!    push can run) the bucket's catalog alone decides.
//! 3. Sweep: every stripe's pack that no marked stripe names, and older than the grace period by
//!    the store's clock (`LastModified`), is deleted (counted in shards). A manifest that is listed but cannot be opened
//!    stops the collection: an unknown manifest may name anything.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sa_core::catalog::{load_catalog, load_tombstones, Tombstone};
use sa_core::manifest::{parse_blob_name, StripeRef, SNAPSHOT_BLOB_PREFIX};
use sa_core::seal::StripeId;
use sa_core::shard::VolumeId;
use sa_core::store::ShardRead;
use serde::Serialize;

use super::OffsiteStore;
use crate::catalog;
use crate::error::{Error, Result};
use crate::fleet::{Access, Fleet};

/// How the bucket is collected.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    /// Agent addresses (one is enough); ignored with `offsite_only`.
    pub agents: Vec<String>,
    /// Shard objects younger than this are kept even when nothing names them.
    pub grace: Duration,
    /// Judge from the bucket's catalog alone (no agent is asked).
    pub offsite_only: bool,
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
}

/// What a collection of the bucket did (`offsite gc --json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SweepReport {
    /// The bucket.
    pub url: String,
    /// Live snapshots whose stripes were kept.
    pub kept_snapshots: usize,
    /// Tombstones copied from the agents.
    pub tombstones_uploaded: usize,
    /// Manifests of forgotten snapshots deleted.
    pub manifests_deleted: usize,
    /// Shard objects deleted (or that would be, with `dry_run`).
    pub shards_deleted: u64,
    /// Shard objects named by nothing but younger than the grace period: kept.
    pub shards_young: u64,
    /// Shard objects kept because a live snapshot names them.
    pub shards_kept: u64,
    /// True when nothing was deleted on purpose.
    pub dry_run: bool,
    /// Wall time.
    pub seconds: f64,
}

/// Collects the bucket (see the module docs).
pub async fn sweep(
    fleet: &Fleet,
    offsite: &OffsiteStore,
    opts: &SweepOptions,
) -> Result<SweepReport> {
    let started = Instant::now();
    let keys = fleet.keys().clone();
    let fail = |e: sa_core::Error| {
        Error::failed(format!(
            "offsite gc of {} failed: {e}; nothing more was deleted",
            offsite.name()
        ))
    };
    let mut report = SweepReport {
        url: offsite.name().to_string(),
        dry_run: opts.dry_run,
        ..Default::default()
    };
    // Tombstones: the agents' (when asked) and the bucket's.
    let mut forgotten: BTreeMap<String, Tombstone> = BTreeMap::new();
    let mut live = Vec::new();
    if !opts.offsite_only {
        let cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
        for c in cat.reach.live() {
            for t in load_tombstones(&c, &keys, None).await? {
                forgotten.insert(t.snapshot.clone(), t);
            }
        }
        live = cat.manifests;
    }
    let in_bucket: HashSet<String> = load_tombstones(offsite, &keys, None)
        .await
        .map_err(fail)?
        .into_iter()
        .map(|t| t.snapshot)
        .collect();
    for (id, t) in &forgotten {
        if !in_bucket.contains(id) && !opts.dry_run {
            offsite
                .put_blob(&Tombstone::blob_name_of(id), t.seal(&keys)?)
                .await
                .map_err(fail)?;
            report.tombstones_uploaded += 1;
        }
    }
    let gone: HashSet<&String> = forgotten.keys().chain(in_bucket.iter()).collect();
    for name in offsite
        .list_blobs(SNAPSHOT_BLOB_PREFIX)
        .await
        .map_err(fail)?
    {
        if parse_blob_name(&name).is_some_and(|(id, _)| gone.contains(&id.to_string())) {
            if !opts.dry_run {
                offsite.delete_blob(&name).await.map_err(fail)?;
            }
            report.manifests_deleted += 1;
        }
    }
    // Mark.
    let (in_bucket_live, unreadable) = load_catalog(offsite, &keys).await.map_err(fail)?;
    if let Some((name, e)) = unreadable.first() {
        return Err(Error::failed(format!(
            "offsite gc of {}: manifest {name} in the bucket does not open ({e}); an unknown \
             manifest may name any shard, so nothing was collected. Is this the key the backups \
             were made with?",
            offsite.name()
        )));
    }
    let mut marked: HashSet<(VolumeId, StripeId)> = HashSet::new();
    let mut kept = HashSet::new();
    for m in live.iter().chain(&in_bucket_live) {
        if gone.contains(&m.snapshot) {
            continue;
        }
        kept.insert(m.snapshot.clone());
        for s in &m.stripes {
            if let StripeRef::Data { id, .. } = s {
                marked.insert((m.volume, *id));
            }
        }
    }
    report.kept_snapshots = kept.len();
    // Sweep, streaming the listing: memory stays one page whatever the bucket holds.
    let grace = opts.grace.as_secs();
    let mut packs = std::pin::pin!(offsite.all_packs());
    while let Some(entry) = packs.next().await {
        let (volume, stripe, count, age) = entry.map_err(fail)?;
        let shards = u64::from(count);
        if marked.contains(&(volume, stripe)) {
            report.shards_kept += shards;
        } else if age < grace {
            report.shards_young += shards;
        } else {
            if !opts.dry_run {
                offsite
                    .delete_pack(&volume, &stripe, count as usize)
                    .await
                    .map_err(fail)?;
            }
            report.shards_deleted += shards;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

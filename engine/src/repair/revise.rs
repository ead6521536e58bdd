//! Step 4 of a repair pass: each manifest whose slots changed as revision `N + 1`
//! (`snap-<ID>.r<N+1>`, same snapshot, new slots, agent table extended by the new agents) on
//! every reachable agent, then the older revisions deleted there; a current revision copied to
//! agents that lack it.

use std::collections::HashMap;

use sa_core::manifest::{parse_blob_name, AgentEntry, Manifest, StripeRef, SNAPSHOT_BLOB_PREFIX};
use sa_core::store::{ShardRead, ShardWrite};

use super::{not_committed, RepairReport, WorkKey};
use crate::error::Result;
use crate::fleet::census::Census;
use crate::fleet::Fleet;

/// Commits the new revisions (or, in a dry run, only says which revision each would get).
pub(super) async fn commit_all(
    fleet: &Fleet,
    manifests: &[Manifest],
    moved: &HashMap<WorkKey, Vec<[u8; 16]>>,
    census: &Census,
    dry_run: bool,
    report: &mut RepairReport,
) -> Result<()> {
    if dry_run {
        for (m, sr) in manifests.iter().zip(report.snapshots.iter_mut()) {
            let (new, slots_moved) = revise(m, moved, census);
            sr.slots_moved = slots_moved;
            sr.revision_after = new.map_or(m.revision, |n| n.revision);
        }
        return Ok(());
    }
    let held = list_catalogs(census).await;
    for (m, sr) in manifests.iter().zip(report.snapshots.iter_mut()) {
        let (new, slots_moved) = revise(m, moved, census);
        sr.slots_moved = slots_moved;
        let target = new.as_ref().unwrap_or(m);
        sr.revision_after = target.revision;
        let sealed = target.seal(fleet.keys())?;
        let (copies, written) = commit(census, &held, target, &sealed, new.is_some()).await;
        sr.catalog_copies = copies;
        report.catalog_copies_written += written;
        if new.is_some() && copies == 0 {
            return Err(not_committed(format!(
                "no agent took revision {} of snapshot {}; the rebuilt shards are unreferenced (gc collects them)",
                target.revision, target.snapshot
            )));
        }
    }
    Ok(())
}

/// The next revision of `m` with moved shards' slots changed (None when nothing moved), and how
/// many slots changed.
fn revise(
    m: &Manifest,
    moved: &HashMap<WorkKey, Vec<[u8; 16]>>,
    census: &Census,
) -> (Option<Manifest>, u64) {
    let mut new = m.clone();
    let mut changed = 0;
    for s in new.stripes.iter_mut() {
        let StripeRef::Data { id, slots } = s else {
            continue;
        };
        let placed: Vec<[u8; 16]> = slots.iter().map(|&s| m.agents[s as usize].id).collect();
        let Some(now) = moved.get(&(m.volume, *id, placed.clone())) else {
            continue;
        };
        for (idx, agent) in now.iter().enumerate() {
            if *agent == placed[idx] {
                continue;
            }
            let slot = match new.agents.iter().position(|a| a.id == *agent) {
                Some(p) => p,
                None => {
                    let addr = census
                        .members
                        .iter()
                        .find(|x| x.id == *agent)
                        .map(|x| x.addr.clone())
                        .unwrap_or_default();
                    new.agents.push(AgentEntry { id: *agent, addr });
                    new.agents.len() - 1
                }
            };
            slots[idx] = slot as u16;
            changed += 1;
        }
    }
    if changed == 0 {
        return (None, 0);
    }
    new.revision = m.revision + 1;
    (Some(new), changed)
}

/// Manifest blob names each reachable agent holds, by agent id.
async fn list_catalogs(census: &Census) -> HashMap<[u8; 16], Vec<String>> {
    let mut out = HashMap::new();
    for m in census.reachable() {
        if let Some(c) = &m.client {
            match c.list_blobs(SNAPSHOT_BLOB_PREFIX).await {
                Ok(n) => {
                    out.insert(m.id, n);
                }
                Err(e) => tracing::warn!("{}: cannot list its catalog: {e}", m.addr),
            }
        }
    }
    out
}

/// Stores `m` (sealed) on every reachable agent that lacks it (all of them for a new revision),
/// then deletes its older revisions there. Returns (agents holding it now, copies written).
async fn commit(
    census: &Census,
    held: &HashMap<[u8; 16], Vec<String>>,
    m: &Manifest,
    sealed: &[u8],
    new_revision: bool,
) -> (u64, u64) {
    let name = m.blob_name();
    let mut holding = 0;
    let mut written = 0;
    for member in census.reachable() {
        let Some(c) = &member.client else { continue };
        let names = held.get(&member.id).cloned().unwrap_or_default();
        if new_revision || !names.contains(&name) {
            if let Err(e) = c.put_blob(&name, sealed.to_vec()).await {
                tracing::warn!("{}: catalog entry {name} not stored: {e}", member.addr);
                continue;
            }
            written += 1;
        }
        holding += 1;
        for old in names.iter().filter(|n| {
            parse_blob_name(n).is_some_and(|(id, rev)| id == m.snapshot && rev < m.revision)
        }) {
            if let Err(e) = c.delete_blob(old).await {
                tracing::warn!("{}: superseded {old} not deleted: {e}", member.addr);
            }
        }
    }
    (holding, written)
}

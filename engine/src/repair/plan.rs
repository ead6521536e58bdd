//! What a repair pass must do: per distinct stripe (volume, stripe id, placement: snapshots
//! that share a stripe are repaired once) the absent and crowded shard indices, and a target
//! agent for each.

use std::collections::{HashMap, HashSet};

use sa_core::manifest::{Manifest, StripeRef};
use sa_core::seal::StripeId;
use sa_core::shard::VolumeId;

use super::{RepairReport, SnapshotRepair, WorkKey};
use crate::fleet::census::{bad_shards, crowded_shards, Census, Presence};

/// A distinct stripe to repair.
pub struct Work {
    /// Its volume.
    pub volume: VolumeId,
    /// Its id.
    pub id: StripeId,
    /// Agent per shard index (as placed now).
    pub placed: Vec<[u8; 16]>,
    /// Where it is first referenced: (manifest index, stripe index).
    pub first: (usize, u64),
    /// Absent shard index → target agent (None: no agent to put it on).
    pub targets: Vec<(usize, Option<[u8; 16]>)>,
    /// Which of `targets` are crowded (present, on an agent holding another shard of the stripe).
    pub crowded: HashSet<usize>,
    /// Fewer than k shards left: cannot be rebuilt now.
    pub lost: bool,
}

/// Step 1: the absent (missing, quarantined, on an unreachable agent) and crowded shards of
/// every stripe, except those of agents in `held` (missing, but not for long enough yet).
/// Fills the per-snapshot lines of `report`. With `offsite` (an offsite copy to read from), a
/// stripe with fewer than `k` shards left on the agents is not lost: it is rebuilt from the
/// bucket.
pub fn find_work(
    manifests: &[Manifest],
    census: &Census,
    presence: &Presence,
    held: &HashSet<[u8; 16]>,
    offsite: bool,
    report: &mut RepairReport,
) -> Vec<Work> {
    let mut work: Vec<Work> = Vec::new();
    let mut index: HashMap<WorkKey, usize> = HashMap::new();
    let mut held_seen: HashSet<WorkKey> = HashSet::new();
    for (mi, m) in manifests.iter().enumerate() {
        let mut sr = SnapshotRepair {
            snapshot: m.snapshot.clone(),
            revision_before: m.revision,
            revision_after: m.revision,
            ..Default::default()
        };
        for (si, s) in m.stripes.iter().enumerate() {
            let StripeRef::Data { id, slots } = s else {
                continue;
            };
            let bad = bad_shards(m, id, slots, presence);
            let crowded: Vec<usize> = crowded_shards(m, slots)
                .into_iter()
                .filter(|i| !bad.contains(i))
                .collect();
            if bad.is_empty() && crowded.is_empty() {
                continue;
            }
            sr.absent_shards += bad.len() as u64;
            sr.crowded_shards += crowded.len() as u64;
            let lost = slots.len() - bad.len() < m.layout.k as usize && !offsite;
            if lost {
                sr.lost_stripes += 1;
            }
            let placed: Vec<[u8; 16]> = slots.iter().map(|&s| m.agents[s as usize].id).collect();
            // Shards of an agent that is missing but not for long enough yet: left alone.
            let (held_idx, bad): (Vec<usize>, Vec<usize>) = bad
                .into_iter()
                .partition(|&i| held.contains(&placed[i]) && census.client(&placed[i]).is_none());
            sr.held_shards += held_idx.len() as u64;
            let key = (m.volume, *id, placed.clone());
            if !held_idx.is_empty() && held_seen.insert(key.clone()) {
                report.shards_held += held_idx.len() as u64;
            }
            if bad.is_empty() && crowded.is_empty() && !lost {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = index.entry(key) {
                e.insert(work.len());
                work.push(Work {
                    volume: m.volume,
                    id: *id,
                    placed,
                    first: (mi, si as u64),
                    targets: bad
                        .into_iter()
                        .chain(crowded.iter().copied())
                        .map(|i| (i, None))
                        .collect(),
                    crowded: crowded.into_iter().collect(),
                    lost,
                });
            }
        }
        report.snapshots.push(sr);
    }
    work
}

/// Step 2: a target for each shard: back in place when its agent answers (and holds no other
/// shard of the stripe), else the reachable agent outside the stripe with the most room (each
/// choice counts against it, so the load spreads).
pub fn choose_targets(work: &mut [Work], manifests: &[Manifest], census: &Census) {
    let mut room: HashMap<[u8; 16], i128> = census
        .reachable()
        .map(|m| {
            let s = m.stat.clone().unwrap_or_default();
            // Unknown (an old agent without a quota): what we know is what it holds.
            let free = s
                .room()
                .map_or((1i128 << 62) - s.used as i128, |r| r as i128);
            (m.id, free)
        })
        .collect();
    for w in work.iter_mut().filter(|w| !w.lost) {
        let m = &manifests[w.first.0];
        let shard_bytes = m.layout.shard_len(m.layout.stripe_len(w.first.1)) as i128;
        let mut used: HashSet<[u8; 16]> = w.placed.iter().copied().collect();
        for (idx, target) in w.targets.iter_mut() {
            let orig = w.placed[*idx];
            let alone = w.placed.iter().filter(|&&a| a == orig).count() == 1;
            if !w.crowded.contains(idx) && alone && census.client(&orig).is_some() {
                *target = Some(orig);
                continue;
            }
            let best = room
                .iter()
                .filter(|(id, free)| !used.contains(*id) && **free >= shard_bytes)
                .max_by_key(|(id, free)| (**free, **id))
                .map(|(id, _)| *id);
            if let Some(t) = best {
                used.insert(t);
                if let Some(r) = room.get_mut(&t) {
                    *r -= shard_bytes;
                }
                *target = Some(t);
            } else if !w.crowded.contains(idx) && census.client(&orig).is_some() {
                // Absent from an agent that holds another shard of the stripe, and no agent
                // outside: back where it was, crowded but present.
                *target = Some(orig);
            }
        }
    }
}

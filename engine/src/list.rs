//! List: the snapshots in the catalog, with what each one added and shares. Any one reachable
//! agent is enough; the book's members are asked too. Read-only.

use sa_core::manifest::{Manifest, StripeRef};
use sa_core::seal::StripeId;
use serde::Serialize;

use crate::catalog;
use crate::error::Result;
use crate::fleet::{Access, Fleet};
use crate::time::rfc3339;

/// What to list.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// Agent addresses (one is enough).
    pub agents: Vec<String>,
    /// Only this volume.
    pub volume: Option<String>,
}

/// One row of `list --json`.
#[derive(Serialize, Debug)]
pub struct ListEntry {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume name.
    pub volume: String,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Creation time, Unix seconds.
    pub created_unix: u64,
    /// Volume size.
    pub size: u64,
    /// Stripes.
    pub stripes: u64,
    /// Zero stripes.
    pub zero_stripes: u64,
    /// Data shards.
    pub k: u8,
    /// Parity shards.
    pub m: u8,
    /// Stripe size.
    pub stripe_size: u32,
    /// Agents in the table.
    pub agents: usize,
    /// Bytes of data (non-zero stripes, plaintext) this snapshot added: stripes that no older
    /// snapshot of the volume holds. What it costs on the agents is this times (k+m)/k.
    pub new_data: u64,
    /// Bytes of data it shares with at least one other snapshot of the volume (stored once).
    pub shared_data: u64,
    /// Its last recovery drill, if any ([`crate::drill`]).
    pub last_drill: Option<crate::drill::record::DrillSummary>,
}

/// New and shared data per manifest (same order), per volume, oldest first.
fn data_figures(manifests: &[Manifest]) -> Vec<(u64, u64)> {
    use std::collections::{HashMap, HashSet};
    let ids = |m: &Manifest| -> HashSet<StripeId> {
        m.stripes
            .iter()
            .filter_map(|s| {
                if let StripeRef::Data { id, .. } = s {
                    Some(*id)
                } else {
                    None
                }
            })
            .collect()
    };
    let mut refs: HashMap<(&str, StripeId), u32> = HashMap::new();
    for m in manifests {
        for id in ids(m) {
            *refs.entry((m.volume_name.as_str(), id)).or_default() += 1;
        }
    }
    let mut order: Vec<usize> = (0..manifests.len()).collect();
    order.sort_by_key(|&i| (manifests[i].created, manifests[i].created_nanos));
    let mut seen: HashSet<(&str, StripeId)> = HashSet::new();
    let mut out = vec![(0, 0); manifests.len()];
    for i in order {
        let m = &manifests[i];
        let v = m.volume_name.as_str();
        for (n, s) in m.stripes.iter().enumerate() {
            if let StripeRef::Data { id, .. } = s {
                let len = m.layout.stripe_len(n as u64) as u64;
                if !seen.contains(&(v, *id)) {
                    out[i].0 += len;
                }
                if refs.get(&(v, *id)).copied().unwrap_or(0) > 1 {
                    out[i].1 += len;
                }
            }
        }
        seen.extend(ids(m).into_iter().map(|id| (v, id)));
    }
    out
}

fn entry(m: &Manifest) -> ListEntry {
    ListEntry {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        created: rfc3339(m.created),
        created_unix: m.created,
        size: m.layout.volume_size,
        stripes: m.layout.stripe_count(),
        zero_stripes: m.zero_stripes(),
        k: m.layout.k,
        m: m.layout.m,
        stripe_size: m.layout.stripe_size,
        agents: m.agents.len(),
        new_data: 0,
        shared_data: 0,
        last_drill: None,
    }
}

/// Lists the snapshots, oldest first.
pub async fn list(fleet: &Fleet, opts: &ListOptions) -> Result<Vec<ListEntry>> {
    let cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
    let manifests = cat.manifests;
    if let Some(v) = &opts.volume {
        if !manifests.iter().any(|m| &m.volume_name == v) {
            return Err(crate::Error::NoSuchVolume {
                volume: v.clone(),
                known: catalog::volumes(&manifests),
            });
        }
    }
    let figures = data_figures(&manifests);
    let ids: Vec<String> = manifests.iter().map(|m| m.snapshot.clone()).collect();
    let drills = crate::drill::record::load(&cat.reach.live(), fleet.keys(), &ids).await;
    let drill_of = |id: &str| {
        drills
            .iter()
            .find(|(s, _)| s == id)
            .map(|(_, r)| r.summary())
    };
    Ok(manifests
        .iter()
        .zip(figures)
        .filter(|(m, _)| opts.volume.as_deref().is_none_or(|v| v == m.volume_name))
        .map(|(m, (new_data, shared_data))| ListEntry {
            new_data,
            shared_data,
            last_drill: drill_of(&m.snapshot),
            ..entry(m)
        })
        .collect())
}

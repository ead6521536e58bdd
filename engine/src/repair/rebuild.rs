//! Step 3 of a repair pass: read each stripe from k good shards ([`StripeReader`]: checked,
//! decoded, decrypted, verified against its id), encode it again (encryption is deterministic,
//! so this gives exactly the lost shard files), store them, then `SYNC` every agent written to.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use sa_core::manifest::Manifest;
use sa_core::seal::StripeId;
use sa_core::store::{AgentClient, ShardWrite};
use sa_core::stripe::StripeCodec;
use tokio::task::JoinSet;

use super::plan::Work;
use super::Placed;
use crate::error::{Error, Result};
use crate::fleet::census::Census;
use crate::fleet::Fleet;
use crate::read::StripeReader;

/// Stripes rebuilt at once.
const PARALLEL: usize = 4;

/// A dry run: every target as planned.
pub(super) fn plan_only(work: &[Work]) -> HashMap<usize, Placed> {
    work.iter()
        .enumerate()
        .filter(|(_, w)| !w.lost)
        .map(|(wi, w)| {
            let placed = w
                .targets
                .iter()
                .map(|(idx, t)| (*idx, t.ok_or_else(|| "no agent outside the stripe".into())))
                .collect();
            (wi, placed)
        })
        .collect()
}

/// Rebuilds every stripe of `work` that is not lost ([`PARALLEL`] at once) and syncs the agents
/// written to. Returns per work item where its shards went, and the bytes stored.
/// What [`rebuild_all`] did: per work item where its shards went, the bytes stored, and the
/// bytes of shard files read from agents to rebuild them.
pub(super) struct Rebuilt {
    pub outcomes: HashMap<usize, Placed>,
    pub bytes_stored: u64,
    pub bytes_read: u64,
}

pub(super) async fn rebuild_all(
    fleet: &Fleet,
    work: &[Work],
    manifests: &[Manifest],
    census: &Census,
) -> Result<Rebuilt> {
    let mut outcomes: HashMap<usize, Placed> = HashMap::new();
    let mut bytes_total = 0;
    let mut readers: HashMap<usize, (StripeReader, Arc<StripeCodec>)> = HashMap::new();
    let mut set: JoinSet<(usize, Placed, u64)> = JoinSet::new();
    let mut written: HashSet<[u8; 16]> = HashSet::new();
    let mut todo = work
        .iter()
        .enumerate()
        .filter(|(_, w)| !w.lost)
        .map(|(i, _)| i);
    loop {
        while set.len() < PARALLEL {
            let Some(wi) = todo.next() else { break };
            let w = &work[wi];
            let mi = w.first.0;
            let (reader, codec) = match readers.entry(mi) {
                std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                std::collections::hash_map::Entry::Vacant(e) => {
                    let m = Arc::new(manifests[mi].clone());
                    let codec =
                        Arc::new(StripeCodec::new(fleet.keys().clone(), m.layout, m.volume)?);
                    let reader = StripeReader::new(codec.clone(), m.clone(), census.slots_of(&m))
                        .with_offsite(fleet);
                    e.insert((reader, codec)).clone()
                }
            };
            let targets: Vec<(usize, Option<[u8; 16]>, Option<AgentClient>)> = w
                .targets
                .iter()
                .map(|(idx, t)| (*idx, *t, t.and_then(|t| census.client(&t).cloned())))
                .collect();
            written.extend(w.targets.iter().filter_map(|t| t.1));
            let (stripe, id) = (w.first.1, w.id);
            set.spawn(async move {
                let (r, bytes) = rebuild(&reader, &codec, stripe, id, targets).await;
                (wi, r, bytes)
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (wi, r, bytes) =
            joined.map_err(|e| Error::failed(format!("repair task failed: {e}")))?;
        bytes_total += bytes;
        outcomes.insert(wi, r);
    }
    let mut syncs = JoinSet::new();
    for id in written {
        if let Some(c) = census.client(&id).cloned() {
            syncs.spawn(async move { (c.addr().to_string(), c.sync().await) });
        }
    }
    while let Some(r) = syncs.join_next().await {
        let (addr, r) = r.map_err(|e| Error::failed(format!("sync task failed: {e}")))?;
        r.map_err(|e| {
            Error::failed(format!(
                "agent {addr} could not make the rebuilt shards durable ({e}); catalog unchanged"
            ))
        })?;
    }
    Ok(Rebuilt {
        outcomes,
        bytes_stored: bytes_total,
        bytes_read: readers.values().map(|(r, _)| r.bytes_fetched()).sum(),
    })
}

/// Reads stripe `stripe` from k good shards, encodes it again and stores the shards `targets`
/// names; per index the agent it went to, or why not; and the bytes stored.
async fn rebuild(
    reader: &StripeReader,
    codec: &Arc<StripeCodec>,
    stripe: u64,
    id: StripeId,
    targets: Vec<(usize, Option<[u8; 16]>, Option<AgentClient>)>,
) -> (Placed, u64) {
    let fail_all = |why: String| {
        targets
            .iter()
            .map(|(idx, _, _)| (*idx, Err(why.clone())))
            .collect()
    };
    let plain = match reader.read(stripe).await {
        Ok(d) => d.data,
        Err(lost) => {
            return (
                fail_all(format!("cannot read the stripe: {}", lost.error)),
                0,
            )
        }
    };
    let c2 = codec.clone();
    let mut encoded = match tokio::task::spawn_blocking(move || c2.encode(id, plain)).await {
        Ok(e) if e.id == id => e,
        Ok(_) => return (fail_all("re-encoded stripe has another id".into()), 0),
        Err(e) => return (fail_all(format!("encode task: {e}")), 0),
    };
    let mut out = Vec::new();
    let mut bytes = 0;
    for (idx, target, client) in targets {
        let r = match (target, client) {
            (None, _) => Err("no reachable agent outside the stripe has room".to_string()),
            (Some(_), None) => Err("target agent went away".to_string()),
            (Some(t), Some(c)) => {
                // Each index is stored once: the file moves out, no copy.
                let file = std::mem::take(&mut encoded.shards[idx]);
                let len = file.len() as u64;
                match c.put_shard(&codec.key(&id, idx), file).await {
                    Ok(()) => {
                        bytes += len;
                        Ok(t)
                    }
                    Err(e) => Err(format!("{}: {e}", c.addr())),
                }
            }
        };
        out.push((idx, r));
    }
    (out, bytes)
}

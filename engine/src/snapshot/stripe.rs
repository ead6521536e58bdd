//! One stripe of a running snapshot: zero? hash, already stored? encrypt and encode, then each
//! shard offered by header and sent where the placement says, with a failed or full agent's
//! shards re-placed on agents outside the stripe.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use sa_core::manifest::StripeRef;
use sa_core::placement::{Budget, Placement};
use sa_core::seal::{is_zero, StripeId};
use sa_core::shard::SHARD_HEADER_LEN;
use sa_core::store::{AgentClient, ShardWrite};
use sa_core::stripe::StripeCodec;
use tokio::task::JoinSet;

use crate::error::{Error, Result};
use crate::source::Source;

/// What became of the stripes of a run (summed over stripes).
#[derive(Default, Debug, Clone)]
pub(crate) struct StripeOutcome {
    pub zero: u64,
    pub new: u64,
    pub reused: u64,
    pub resumed: u64,
    pub bytes_sent: u64,
}

impl StripeOutcome {
    pub fn add(&mut self, o: &StripeOutcome) {
        self.zero += o.zero;
        self.new += o.new;
        self.reused += o.reused;
        self.resumed += o.resumed;
        self.bytes_sent += o.bytes_sent;
    }
}

/// What the stripe tasks share about where shards go.
pub(crate) struct Placed {
    /// Stripes already stored (earlier snapshot, or earlier in this run) and their slots.
    pub known: HashMap<StripeId, Vec<u16>>,
    /// The plan by room.
    pub placement: Placement,
    /// What each agent may still take.
    pub budget: Budget,
    /// Agents (slots) that failed during the run: given nothing more, not synced, their shards
    /// of this run counted as absent.
    pub lost: HashSet<u16>,
}

enum Prepared {
    Zero,
    Known(StripeId, Vec<u16>),
    New(sa_core::stripe::EncodedStripe, Vec<u16>),
}

/// Shard `idx` of stripe `i` made again from the source: read, checked to be the same stripe
/// (`id`), encoded.
async fn shard_again(
    source: &Arc<Source>,
    codec: &Arc<StripeCodec>,
    i: u64,
    id: StripeId,
    idx: usize,
) -> Result<Vec<u8>> {
    let layout = *codec.layout();
    let buf = source.read_stripe(&layout, i).await?;
    let codec = codec.clone();
    tokio::task::spawn_blocking(move || {
        if codec.stripe_id(&buf) != id {
            return Err(Error::SourceChanged { stripe: i });
        }
        let mut enc = codec.encode(id, buf);
        Ok(enc.shards.swap_remove(idx))
    })
    .await
    .map_err(|e| Error::failed(format!("re-encode task failed: {e}")))?
}

/// What a stripe task shares with the run.
#[derive(Clone)]
pub(crate) struct Run {
    pub codec: Arc<StripeCodec>,
    pub clients: Arc<Vec<AgentClient>>,
    pub placed: Arc<Mutex<Placed>>,
    pub source: Arc<Source>,
}

/// Stores stripe `i` (its plaintext `buf`): see the module docs. Returns its reference for the
/// manifest and what became of it.
pub(crate) async fn store_stripe(
    run: Run,
    i: u64,
    buf: Vec<u8>,
) -> Result<(u64, StripeRef, StripeOutcome)> {
    let mut outcome = StripeOutcome::default();
    let sref = match prepare(&run, i, buf).await? {
        Prepared::Zero => {
            outcome.zero = 1;
            StripeRef::Zero
        }
        Prepared::Known(id, slots) => {
            outcome.reused = 1;
            StripeRef::Data { id, slots }
        }
        Prepared::New(enc, slots) => {
            let id = enc.id;
            let (slots, sent) = send(&run, i, enc, slots).await?;
            outcome.bytes_sent = sent;
            if sent > 0 {
                outcome.new = 1;
            } else {
                outcome.resumed = 1;
            }
            StripeRef::Data { id, slots }
        }
    };
    Ok((i, sref, outcome))
}

/// Zero? hash, already stored? else place and encode (on the blocking pool).
async fn prepare(run: &Run, i: u64, buf: Vec<u8>) -> Result<Prepared> {
    let (codec, placed) = (run.codec.clone(), run.placed.clone());
    tokio::task::spawn_blocking(move || {
        if is_zero(&buf) {
            return Ok(Prepared::Zero);
        }
        let id = codec.stripe_id(&buf);
        let slots = {
            let mut p = placed.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slots) = p.known.get(&id) {
                return Ok(Prepared::Known(id, slots.clone()));
            }
            let planned = p.placement.slots(i);
            let Some(slots) = p.budget.take(&planned) else {
                return Err(Error::NoRoom(format!(
                    "the agents have no room left for stripe {i} (more was new than the agents could hold); \
                     nothing was committed: free space on the agents or add agents, and run the snapshot again"
                )));
            };
            p.known.insert(id, slots.clone());
            slots
        };
        Ok(Prepared::New(codec.encode(id, buf), slots))
    })
    .await
    .map_err(|e| Error::failed(format!("encode task failed: {e}")))?
}

/// Sends a new stripe's shards; returns where they ended up and the bytes sent.
///
/// Each shard is first offered by its header: an agent that already holds it whole (a snapshot
/// killed midway left it; encryption is deterministic) keeps it, and only the others travel.
/// This is what makes the next run resume. A shard whose agent fails (gone, cut off) or says it
/// is full goes to another agent outside the stripe ([`Budget::replace`]); a failed agent gets
/// nothing more in this run. The shard file is made again from the source (re-read, re-encoded:
/// the same bytes, as encryption is deterministic) rather than kept in memory for a retry.
async fn send(
    run: &Run,
    i: u64,
    enc: sa_core::stripe::EncodedStripe,
    mut slots: Vec<u16>,
) -> Result<(Vec<u16>, u64)> {
    let id = enc.id;
    let mut pending: Vec<(usize, Vec<u8>)> = enc.shards.into_iter().enumerate().collect();
    let mut sent_total = 0;
    while !pending.is_empty() {
        let mut puts = JoinSet::new();
        for (idx, file) in pending.drain(..) {
            let slot = slots[idx];
            let client = run.clients[slot as usize].clone();
            let key = run.codec.key(&id, idx);
            puts.spawn(async move {
                let header = &file[..SHARD_HEADER_LEN];
                let r = match client.confirm_shard(&key, header).await {
                    Ok(true) => Ok(0),
                    Ok(false) => {
                        let len = file.len() as u64;
                        client.put_shard(&key, file).await.map(|()| len)
                    }
                    Err(e) => Err(e),
                };
                (idx, slot, client.addr().to_string(), r)
            });
        }
        let mut failed = Vec::new();
        while let Some(r) = puts.join_next().await {
            let (idx, slot, addr, r) =
                r.map_err(|e| Error::failed(format!("upload task failed: {e}")))?;
            match r {
                Ok(sent) => sent_total += sent,
                Err(e @ sa_core::Error::ShardCorrupt(_)) => {
                    return Err(Error::failed(format!(
                    "agent {addr} rejected shard {idx} of stripe {i}: {e}; nothing was committed"
                )))
                }
                Err(e) => failed.push((idx, slot, addr, e)),
            }
        }
        for (idx, slot, addr, e) in failed {
            slots[idx] = replace(run, i, &slots, idx, slot, &addr, e)?;
            let file = shard_again(&run.source, &run.codec, i, id, idx).await?;
            pending.push((idx, file));
        }
    }
    run.placed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .known
        .insert(id, slots.clone());
    Ok((slots, sent_total))
}

/// Another agent outside the stripe for shard `idx`, whose agent (`slot`, `addr`) failed with `e`.
fn replace(
    run: &Run,
    i: u64,
    slots: &[u16],
    idx: usize,
    slot: u16,
    addr: &str,
    e: sa_core::Error,
) -> Result<u16> {
    let full = matches!(e, sa_core::Error::Full(_));
    let next = {
        let mut p = run.placed.lock().unwrap_or_else(|p| p.into_inner());
        p.budget.drop_agent(slot as usize);
        if !full && p.lost.insert(slot) {
            tracing::warn!(
                "agent {addr} failed while storing stripe {i} ({e}); its part of this run goes to the others"
            );
        } else if full {
            tracing::warn!("agent {addr} is full ({e}); its part of this run goes to the others");
        }
        p.budget.replace(slots, idx)
    };
    next.ok_or_else(|| {
        if full {
            Error::NoRoom(format!(
                "agent {addr} is full ({e}) and no other agent outside stripe {i} has room; \
                 nothing was committed: free space on the agents or add agents"
            ))
        } else {
            Error::failed(format!(
                "agent {addr} failed while storing stripe {i}: {e}; no other agent outside the stripe \
                 can take its shard; nothing was committed, run the snapshot again"
            ))
        }
    })
}

//! Reading one stripe back from the agents: fetch `k` shards in parallel (data shards first, so
//! a healthy stripe needs no reconstruction), and for every shard that is missing, corrupt or on an
//! unreachable agent, fetch a parity shard instead; then rebuild, decrypt and verify.

use std::sync::Arc;

use sa_core::manifest::{Manifest, StripeRef};
use sa_core::store::{AgentClient, ShardRead};
use sa_core::stripe::StripeCodec;
use sa_core::Error;
use tokio::task::JoinSet;

/// What went wrong with one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// The agent answered, but does not have it.
    Missing,
    /// The shard failed its checks (crc32c, header, identity).
    Corrupt,
    /// The agent could not be reached.
    Unreachable,
}

impl Problem {
    /// Classifies a shard fetch error.
    pub fn of(e: &Error) -> Self {
        match e {
            Error::ShardMissing => Problem::Missing,
            Error::ShardCorrupt(_) | Error::Malformed { .. } | Error::UnsupportedVersion { .. } => Problem::Corrupt,
            _ => Problem::Unreachable,
        }
    }
}

/// A shard that could not be used.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardProblem {
    /// Shard index within the stripe.
    pub index: usize,
    /// Agent table slot that should hold it.
    pub slot: usize,
    /// What kind of problem.
    pub problem: Problem,
    /// Details for the log.
    pub detail: String,
}

/// A stripe read back.
pub struct StripeData {
    /// The plaintext.
    pub data: Vec<u8>,
    /// Shards that could not be used on the way.
    pub problems: Vec<ShardProblem>,
    /// True when parity was needed.
    pub reconstructed: bool,
}

/// A stripe that could not be rebuilt.
#[derive(Debug)]
pub struct StripeLost {
    /// Stripe index.
    pub stripe: u64,
    /// Every shard problem met.
    pub problems: Vec<ShardProblem>,
    /// Final error.
    pub error: Error,
}

/// Reads stripes of one snapshot.
#[derive(Clone)]
pub struct StripeReader {
    codec: Arc<StripeCodec>,
    manifest: Arc<Manifest>,
    slots: Arc<Vec<Option<AgentClient>>>,
}

/// Fetches and checks one shard file.
pub async fn fetch_shard(
    codec: &StripeCodec,
    client: Option<&AgentClient>,
    id: &sa_core::seal::StripeId,
    index: usize,
    plain_len: usize,
) -> Result<Vec<u8>, Error> {
    let Some(client) = client else {
        return Err(Error::AgentUnreachable { addr: "agent".into(), why: "not connected".into() });
    };
    let file = client.get_shard(&codec.key(id, index)).await?;
    codec.check(id, index, plain_len, file)
}

impl StripeReader {
    /// A reader over a snapshot with one optional client per agent-table slot.
    pub fn new(codec: Arc<StripeCodec>, manifest: Arc<Manifest>, slots: Vec<Option<AgentClient>>) -> Self {
        StripeReader { codec, manifest, slots: Arc::new(slots) }
    }

    /// Reads stripe `i` (a zero stripe is returned as zeros without any fetch).
    pub async fn read(&self, i: u64) -> Result<StripeData, StripeLost> {
        let layout = *self.codec.layout();
        let plain_len = layout.stripe_len(i);
        let (id, slots) = match &self.manifest.stripes[i as usize] {
            StripeRef::Zero => return Ok(StripeData { data: vec![0; plain_len], problems: vec![], reconstructed: false }),
            StripeRef::Data { id, slots } => (*id, slots.clone()),
        };
        let k = layout.k as usize;
        let n = layout.shards();
        let mut payloads: Vec<Option<Vec<u8>>> = vec![None; n];
        let mut problems = Vec::new();
        let mut next = 0usize;
        let mut good = 0usize;
        let mut set = JoinSet::new();
        let launch = |set: &mut JoinSet<(usize, Result<Vec<u8>, Error>)>, idx: usize| {
            let codec = self.codec.clone();
            let client = self.slots.get(slots[idx] as usize).cloned().flatten();
            set.spawn(async move { (idx, fetch_shard(&codec, client.as_ref(), &id, idx, plain_len).await) });
        };
        while next < k {
            launch(&mut set, next);
            next += 1;
        }
        while good < k {
            let Some(joined) = set.join_next().await else { break };
            let (idx, result) = match joined {
                Ok(r) => r,
                Err(e) => {
                    return Err(StripeLost { stripe: i, problems, error: Error::Protocol(format!("fetch task: {e}")) })
                }
            };
            match result {
                Ok(p) => {
                    payloads[idx] = Some(p);
                    good += 1;
                }
                Err(e) => {
                    problems.push(ShardProblem {
                        index: idx,
                        slot: slots[idx] as usize,
                        problem: Problem::of(&e),
                        detail: e.to_string(),
                    });
                    if next < n {
                        launch(&mut set, next);
                        next += 1;
                    }
                }
            }
        }
        set.abort_all();
        if good < k {
            return Err(StripeLost { stripe: i, problems, error: Error::NotEnoughShards { have: good, need: k } });
        }
        let reconstructed = payloads.iter().take(k).any(|p| p.is_none());
        let codec = self.codec.clone();
        let decoded = tokio::task::spawn_blocking(move || codec.decode(&id, plain_len, payloads)).await;
        match decoded {
            Ok(Ok(data)) => Ok(StripeData { data, problems, reconstructed }),
            Ok(Err(error)) => Err(StripeLost { stripe: i, problems, error }),
            Err(e) => Err(StripeLost { stripe: i, problems, error: Error::Protocol(format!("decode task: {e}")) }),
        }
    }
}

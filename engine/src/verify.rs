//! Verify: read and check every shard of a snapshot.
//!
//! Each shard is fetched and checked (header, crc32c, identity); each stripe is then rebuilt,
//! decrypted and checked against its id, and when all shards are present the parity is
//! recomputed and compared, so a wrong parity shard cannot hide until the day it is needed.
//! [`VerifyReport::exit_code`]: 0 every shard present and sound; 2 some shard missing or corrupt
//! but every stripe still recoverable; 3 data is lost.
//!
//! With an offsite copy ([`Fleet::with_offsite`]): a stripe the agents can no longer rebuild is
//! read from the bucket (decrypted and checked against its id) and counts as degraded, not lost,
//! when that works. With `--offsite-only` the bucket's copy alone is verified: every stripe read
//! from it, decrypted and checked.

use std::sync::Arc;

use sa_core::manifest::StripeRef;
use sa_core::stripe::{Payload, StripeCodec};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::catalog::{self, clients_for};
use crate::error::{Error, Result};
use crate::fleet::{Access, Fleet};
use crate::progress::Progress;
use crate::read::{fetch_shard, Problem, StripeReader};
use crate::shutdown::Shutdown;

const PARALLEL: usize = 6;

/// What to verify.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Snapshot id, unique prefix, or `latest`.
    pub snapshot: String,
    /// With `latest`: of this volume.
    pub volume: Option<String>,
    /// Agent addresses (one is enough).
    pub agents: Vec<String>,
}

/// Per-agent figures.
#[derive(Serialize, Debug, Default, Clone)]
pub struct AgentReport {
    /// Address.
    pub addr: String,
    /// Agent id (hex).
    pub id: String,
    /// Whether it answered.
    pub reachable: bool,
    /// Sound shards.
    pub ok: u64,
    /// Missing shards (including all of an unreachable agent's).
    pub missing: u64,
    /// Corrupt shards.
    pub corrupt: u64,
}

/// One bad shard.
#[derive(Serialize, Debug, Clone)]
pub struct BadShard {
    /// Stripe index.
    pub stripe: u64,
    /// Shard index.
    pub index: usize,
    /// Agent address.
    pub agent: String,
    /// Problem.
    pub problem: Problem,
    /// Details.
    pub detail: String,
}

/// What `verify --json` prints.
#[derive(Serialize, Debug, Default)]
pub struct VerifyReport {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume.
    pub volume: String,
    /// Stripes.
    pub stripes: u64,
    /// Zero stripes (nothing to check).
    pub zero_stripes: u64,
    /// Stripes with every shard sound.
    pub healthy_stripes: u64,
    /// Stripes missing shards but recoverable.
    pub degraded_stripes: u64,
    /// Stripes that cannot be rebuilt.
    pub lost_stripes: u64,
    /// Sound shards.
    pub shards_ok: u64,
    /// Missing shards.
    pub shards_missing: u64,
    /// Corrupt shards.
    pub shards_corrupt: u64,
    /// True when every stripe can be rebuilt.
    pub recoverable: bool,
    /// Stripes read and checked from the offsite copy: those the agents could not rebuild, or,
    /// with `--offsite-only`, every one.
    pub offsite_stripes: u64,
    /// Per agent.
    pub agents: Vec<AgentReport>,
    /// Bad shards (first 1000).
    pub bad_shards: Vec<BadShard>,
    /// Lost stripe indices (first 1000).
    pub lost: Vec<u64>,
}

/// A shard's verdict: sound, or what is wrong with it.
type ShardOutcome = Result<(), (Problem, String)>;

struct StripeCheck {
    stripe: u64,
    /// (shard index, agent slot, sound or the problem).
    shard_results: Vec<(usize, usize, ShardOutcome)>,
    decodable: Result<(), String>,
}

impl VerifyReport {
    /// 3 data lost, 2 shards missing or corrupt (recoverable), 0 sound.
    pub fn exit_code(&self) -> u8 {
        if self.lost_stripes > 0 {
            3
        } else if self.shards_missing + self.shards_corrupt > 0 {
            2
        } else {
            0
        }
    }

    fn add(&mut self, c: StripeCheck) {
        let mut bad = 0;
        for (index, slot, r) in c.shard_results {
            let a = &mut self.agents[slot];
            match r {
                Ok(()) => {
                    a.ok += 1;
                    self.shards_ok += 1;
                }
                Err((problem, detail)) => {
                    bad += 1;
                    if problem == Problem::Corrupt {
                        a.corrupt += 1;
                        self.shards_corrupt += 1;
                    } else {
                        a.missing += 1;
                        self.shards_missing += 1;
                    }
                    if self.bad_shards.len() < 1000 {
                        self.bad_shards.push(BadShard {
                            stripe: c.stripe,
                            index,
                            agent: a.addr.clone(),
                            problem,
                            detail,
                        });
                    }
                }
            }
        }
        match (&c.decodable, bad) {
            (Err(why), _) => {
                self.lost_stripes += 1;
                if self.lost.len() < 1000 {
                    self.lost.push(c.stripe);
                }
                tracing::error!("stripe {} cannot be recovered: {why}", c.stripe);
            }
            (Ok(()), 0) => self.healthy_stripes += 1,
            (Ok(()), _) => self.degraded_stripes += 1,
        }
    }
}

/// Verifies a snapshot (see the module docs).
pub async fn verify(
    fleet: &Fleet,
    opts: &VerifyOptions,
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<VerifyReport> {
    let mut cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
    let m =
        Arc::new(catalog::resolve(&cat.manifests, &opts.snapshot, opts.volume.as_deref())?.clone());
    let layout = m.layout;
    // Verify reads every shard: it waits for every woken member it needs to read each stripe,
    // and the ones that answer in time are checked too.
    fleet
        .wake_sleepers(
            &mut cat.reach,
            &crate::fleet::sleepers::Need::Readable(vec![&m]),
            progress,
        )
        .await?;
    let slots = clients_for(fleet, &m, &cat.reach).await;
    let _awake = crate::fleet::keepalive::KeepAlive::start(slots.slots.iter().flatten());
    let used = catalog::used_slots(&m);
    let mut report = VerifyReport {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        stripes: layout.stripe_count(),
        agents: m
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| AgentReport {
                addr: a.addr.clone(),
                id: sa_core::keys::hex(&a.id),
                reachable: slots.slots[i].is_some(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    let codec = Arc::new(StripeCodec::new(fleet.keys().clone(), layout, m.volume)?);
    let clients = Arc::new(slots.slots.clone());
    let offsite = fleet.offsite().map(|_| {
        StripeReader::new(codec.clone(), m.clone(), slots.slots.clone()).with_offsite(fleet)
    });
    if let (Some(reader), true) = (&offsite, fleet.offsite_only()) {
        report.agents.clear();
        return from_bucket(reader, &m, report, progress, shutdown).await;
    }
    progress.start("verify", layout.volume_size);
    let mut set: JoinSet<StripeCheck> = JoinSet::new();
    let mut next = 0u64;
    loop {
        while set.len() < PARALLEL && next < layout.stripe_count() && !shutdown.is_cancelled() {
            let i = next;
            next += 1;
            let (id, sl) = match &m.stripes[i as usize] {
                StripeRef::Zero => {
                    report.zero_stripes += 1;
                    progress.advance(layout.stripe_len(i) as u64);
                    continue;
                }
                StripeRef::Data { id, slots } => (*id, slots.clone()),
            };
            let (codec, clients) = (codec.clone(), clients.clone());
            set.spawn(async move { check_stripe(i, id, sl, codec, clients).await });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let mut c = joined.map_err(|e| Error::failed(format!("verify task failed: {e}")))?;
        if let (Err(why), Some(reader)) = (&c.decodable, &offsite) {
            match reader.read(c.stripe).await {
                Ok(_) => {
                    tracing::warn!(
                        "stripe {} cannot be rebuilt from the agents ({why}); the offsite copy has it",
                        c.stripe
                    );
                    c.decodable = Ok(());
                    report.offsite_stripes += 1;
                }
                Err(lost) => tracing::error!(
                    "stripe {}: the offsite copy cannot complete it either: {}",
                    c.stripe,
                    lost.error
                ),
            }
        }
        progress.advance(layout.stripe_len(c.stripe) as u64);
        report.add(c);
    }
    progress.finish();
    if shutdown.is_cancelled() {
        return Err(Error::Interrupted(
            "the verify stopped before it was complete".into(),
        ));
    }
    // Agents no stripe uses (a repair moved every shard off them) are not reported.
    let mut i = 0;
    report.agents.retain(|_| {
        i += 1;
        used.contains(&((i - 1) as u16))
    });
    report.lost.sort_unstable();
    report.bad_shards.sort_by_key(|b| (b.stripe, b.index));
    report.recoverable = report.lost_stripes == 0;
    Ok(report)
}

/// `--offsite-only`: every stripe read from the bucket, decrypted and checked against its id.
async fn from_bucket(
    reader: &StripeReader,
    m: &sa_core::manifest::Manifest,
    mut report: VerifyReport,
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<VerifyReport> {
    let layout = m.layout;
    progress.start("verify offsite", layout.volume_size);
    let mut set = JoinSet::new();
    let mut next = 0u64;
    loop {
        while set.len() < PARALLEL && next < layout.stripe_count() && !shutdown.is_cancelled() {
            let i = next;
            next += 1;
            if matches!(m.stripes[i as usize], StripeRef::Zero) {
                report.zero_stripes += 1;
                progress.advance(layout.stripe_len(i) as u64);
                continue;
            }
            let reader = reader.clone();
            set.spawn(async move { (i, reader.read(i).await.map(|d| d.offsite)) });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        let (i, r) = joined.map_err(|e| Error::failed(format!("verify task failed: {e}")))?;
        progress.advance(layout.stripe_len(i) as u64);
        report.offsite_stripes += 1;
        match r {
            Ok(shards) => {
                report.healthy_stripes += 1;
                report.shards_ok += shards as u64;
            }
            Err(lost) => {
                tracing::error!(
                    "stripe {i}: the offsite copy cannot give it: {}",
                    lost.error
                );
                report.lost_stripes += 1;
                if report.lost.len() < 1000 {
                    report.lost.push(i);
                }
            }
        }
    }
    progress.finish();
    if shutdown.is_cancelled() {
        return Err(Error::Interrupted(
            "the verify stopped before it was complete".into(),
        ));
    }
    report.lost.sort_unstable();
    report.recoverable = report.lost_stripes == 0;
    Ok(report)
}

async fn check_stripe(
    i: u64,
    id: sa_core::seal::StripeId,
    slots: Vec<u16>,
    codec: Arc<StripeCodec>,
    clients: Arc<Vec<Option<sa_core::store::AgentClient>>>,
) -> StripeCheck {
    let layout = *codec.layout();
    let plain_len = layout.stripe_len(i);
    let mut set = JoinSet::new();
    for (idx, &slot) in slots.iter().enumerate() {
        let (codec, client) = (codec.clone(), clients.get(slot as usize).cloned().flatten());
        set.spawn(async move {
            (
                idx,
                fetch_shard(&codec, client.as_ref(), &id, idx, plain_len).await,
            )
        });
    }
    let mut payloads: Vec<Option<Payload>> = vec![None; layout.shards()];
    let mut shard_results = Vec::new();
    while let Some(r) = set.join_next().await {
        let Ok((idx, r)) = r else { continue };
        match r {
            Ok(p) => {
                payloads[idx] = Some(p);
                shard_results.push((idx, slots[idx] as usize, Ok(())));
            }
            Err(e) => {
                shard_results.push((
                    idx,
                    slots[idx] as usize,
                    Err((Problem::of(&e), e.to_string())),
                ));
            }
        }
    }
    let k = layout.k as usize;
    let c2 = codec.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let mut bad_parity = Vec::new();
        if payloads.iter().all(|p| p.is_some()) {
            let data: Vec<&[u8]> = payloads
                .iter()
                .take(k)
                .map(|p| p.as_ref().map(Payload::as_slice).unwrap_or_default())
                .collect();
            for (j, par) in c2.parity_of(&data).into_iter().enumerate() {
                if payloads[k + j].as_ref().map(Payload::as_slice) != Some(&par[..]) {
                    bad_parity.push(k + j);
                }
            }
        }
        let decoded = c2
            .decode(&id, plain_len, payloads)
            .map(|_| ())
            .map_err(|e| e.to_string());
        (bad_parity, decoded)
    })
    .await;
    let (bad_parity, decodable) = checked.unwrap_or_else(|e| (vec![], Err(e.to_string())));
    for idx in bad_parity {
        if let Some(entry) = shard_results.iter_mut().find(|(j, _, _)| *j == idx) {
            entry.2 = Err((
                Problem::Corrupt,
                "parity does not match the data shards".into(),
            ));
        }
    }
    StripeCheck {
        stripe: i,
        shard_results,
        decodable,
    }
}

//! Scrub: asks every agent of the catalog for a full scrub pass now (each checks the crc32c
//! values of all its shard files and quarantines bad ones; see `shard_agent::scrub`), waits for
//! the passes to finish (unless told not to), and gathers what they found.
//!
//! [`ScrubReport::exit_code`]: 0 no bad shard anywhere (or every one already restored by a
//! repair); 2 bad shards in quarantine not restored yet (`repair` rebuilds them); 1 an agent
//! could not be asked.

use std::time::{Duration, Instant};

use sa_core::keys::hex;
use sa_core::store::{AgentClient, ScrubStatus};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::catalog;
use crate::error::Result;
use crate::fleet::census::Census;
use crate::fleet::{Access, Fleet};

/// How often a waiting scrub asks the agents how far they are.
const POLL: Duration = Duration::from_millis(200);

/// What to scrub.
#[derive(Debug, Clone, Default)]
pub struct ScrubOptions {
    /// Agent addresses (the catalog and the book name the rest).
    pub agents: Vec<String>,
    /// Start a pass on every agent (false: only report what their scrubs found so far).
    pub start: bool,
    /// Wait until the passes are done.
    pub wait: bool,
}

/// One bad shard in `scrub --json`.
#[derive(Serialize, Debug)]
pub struct BadShard {
    /// Volume id (hex).
    pub volume: String,
    /// Stripe id (hex).
    pub stripe: String,
    /// Shard index.
    pub index: u8,
    /// A sound copy is stored again (a repair put it back).
    pub restored: bool,
    /// What was wrong.
    pub reason: String,
}

/// One agent in `scrub --json`.
#[derive(Serialize, Debug)]
pub struct AgentScrub {
    /// Address.
    pub addr: String,
    /// Stable id (hex).
    pub id: String,
    /// `done`, `running`, `unreachable: ...` or `failed: ...`.
    pub status: String,
    /// Background rate, bytes/s (0: background scrub off).
    pub rate: u64,
    /// Shards checked by the last (or running) pass.
    pub checked: u64,
    /// Bytes read by it.
    pub bytes: u64,
    /// Passes completed since the agent started.
    pub passes_done: u64,
    /// Shards in quarantine in all.
    pub bad_total: u64,
    /// Quarantined shards (as many as the agent lists).
    pub bad: Vec<BadShard>,
}

/// What `scrub --json` prints.
#[derive(Serialize, Debug)]
pub struct ScrubReport {
    /// Per agent.
    pub agents: Vec<AgentScrub>,
    /// Quarantined shards not restored yet, all agents.
    pub bad_unrestored: u64,
    /// Seconds spent.
    pub seconds: f64,
}

impl ScrubReport {
    /// 1 an agent failed, 2 bad shards wait for repair, 0 clean.
    pub fn exit_code(&self) -> u8 {
        if self.agents.iter().any(|a| a.status.starts_with("failed")) {
            1
        } else if self.bad_unrestored > 0 {
            2
        } else {
            0
        }
    }
}

/// Scrubs every agent of the catalog (see the module docs).
pub async fn scrub(fleet: &Fleet, opts: &ScrubOptions) -> Result<ScrubReport> {
    let started = Instant::now();
    let cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
    let census = Census::gather(fleet, &cat.reach, &cat.manifests).await;
    let mut set = JoinSet::new();
    for (i, m) in census.members.iter().enumerate() {
        if let Some(c) = m.client.clone() {
            let (start, wait) = (opts.start, opts.wait);
            set.spawn(async move { (i, scrub_agent(&c, start, wait).await) });
        }
    }
    let mut results: Vec<Option<sa_core::Result<ScrubStatus>>> =
        census.members.iter().map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        if let Ok((i, r)) = r {
            results[i] = Some(r);
        }
    }
    let mut report = ScrubReport {
        agents: Vec::new(),
        bad_unrestored: 0,
        seconds: 0.0,
    };
    for (m, r) in census.members.iter().zip(results) {
        let mut a = AgentScrub {
            addr: m.addr.clone(),
            id: hex(&m.id),
            status: String::new(),
            rate: 0,
            checked: 0,
            bytes: 0,
            passes_done: 0,
            bad_total: 0,
            bad: Vec::new(),
        };
        match r {
            None => {
                a.status = format!(
                    "unreachable: {}",
                    m.error.clone().unwrap_or_else(|| "no answer".into())
                )
            }
            Some(Err(e)) => a.status = format!("failed: {e}"),
            Some(Ok(s)) => {
                a.status = if s.running { "running" } else { "done" }.into();
                a.rate = s.rate;
                a.checked = s.checked;
                a.bytes = s.bytes;
                a.passes_done = s.passes_done;
                a.bad_total = s.bad_total;
                report.bad_unrestored += s.bad.iter().filter(|f| !f.restored).count() as u64;
                a.bad = s
                    .bad
                    .into_iter()
                    .map(|f| BadShard {
                        volume: hex(&f.key.volume),
                        stripe: hex(&f.key.stripe),
                        index: f.key.index,
                        restored: f.restored,
                        reason: f.reason,
                    })
                    .collect();
            }
        }
        report.agents.push(a);
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Starts a pass (when `start`) and, with `wait`, polls until it is done.
async fn scrub_agent(c: &AgentClient, start: bool, wait: bool) -> sa_core::Result<ScrubStatus> {
    let first = c.scrub(start).await?;
    if !wait {
        return Ok(first);
    }
    // The pass asked for is number `passes_started` of this agent run.
    let target = first.passes_started;
    let mut s = first;
    while s.passes_done < target {
        tokio::time::sleep(POLL).await;
        s = c.scrub(false).await?;
    }
    Ok(s)
}

//! The model's inputs taken from the fleet itself: for `sa-image status --durability` and
//! `sa-image plan`.
//!
//! * **Agents**: the book's members in service (and agents that answer but are not pinned yet).
//! * **Availability**: each agent's last 30 days from the history ([`crate::availability`]),
//!   once at least [`MIN_OBSERVED_HOURS`] of them were observed; before that
//!   [`DEFAULT_AVAILABILITY`] is *assumed*, and said so.
//! * **Wake success**: measured from the wakes recorded, with a prior of
//!   [`super::DEFAULT_WAKE_SUCCESS`] ([`crate::availability::AgentHistory::wake_success`]);
//!   *assumed* (the prior alone) while no wake was tried. An agent whose MAC is unknown cannot be
//!   woken.
//! * **Bytes held**: each reachable agent's `STAT`; an unreachable one is assumed to hold the
//!   mean of the others.
//! * **k, m**: the newest snapshot's; with no snapshot, the defaults, assumed.
//! * **Repair throughput**: not measured by the engine yet (a repair reports its rate but no
//!   record keeps it): the caller's figure, or [`DEFAULT_REPAIR_THROUGHPUT`], assumed.
//! * **Loss rate** and **repair-after**: the caller's, or the defaults.
//!
//! Every assumption made is listed in [`Measured::assumptions`], so the figures can be read
//! for what they are.

use std::time::Duration;

use sa_core::keys::hex;
use sa_core::store::ShardRead;
use serde::Serialize;

use super::{assess, plan, AgentModel, Plan, PlanOptions, Report, Scheme, DEFAULT_REPLACEMENT};
use crate::catalog;
use crate::error::{Error, Result};
use crate::fleet::{Access, Fleet};

/// Availability assumed for an agent observed less than [`MIN_OBSERVED_HOURS`].
pub const DEFAULT_AVAILABILITY: f64 = 0.8;
/// Hours of observation before an agent's measured availability is used.
pub const MIN_OBSERVED_HOURS: usize = 24;
/// Repair throughput assumed when none is given: 10 MB/s of rebuilt shards.
pub const DEFAULT_REPAIR_THROUGHPUT: f64 = 10e6;

/// What the caller decides.
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Agent addresses (one is enough).
    pub agents: Vec<String>,
    /// PCs lost for good per PC-year.
    pub loss_rate: f64,
    /// The repair delay to assess.
    pub repair_after: Duration,
    /// Rebuilt bytes per second (None: [`DEFAULT_REPAIR_THROUGHPUT`], assumed).
    pub repair_throughput: Option<f64>,
}

/// One agent as the model took it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentInput {
    /// Id (hex).
    pub id: String,
    /// Last known address.
    pub addr: String,
    /// Availability used.
    pub availability: f64,
    /// Whether it was measured (else assumed).
    pub availability_measured: bool,
    /// Hours of the last 30 days observed.
    pub observed_hours: usize,
    /// Wake success used (None: cannot be woken, its MAC is unknown).
    pub wake: Option<f64>,
    /// Whether wakes of it were recorded (else the prior is assumed).
    pub wake_measured: bool,
    /// Bytes it holds (reported, or assumed).
    pub bytes: u64,
}

/// The fleet as measured, and what was assumed.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Per agent.
    pub agents: Vec<AgentInput>,
    /// The model's fleet.
    pub fleet: super::Fleet,
    /// The scheme in use (newest snapshot's `k`, `m`) and the repair delay.
    pub scheme: Scheme,
    /// Everything assumed rather than measured, in words.
    pub assumptions: Vec<String>,
}

/// `status --durability`: the inputs and the assessment of the current scheme.
#[derive(Debug, Clone, Serialize)]
pub struct DurabilityReport {
    /// Inputs and assumptions.
    pub measured: Measured,
    /// The assessment.
    pub report: Report,
}

/// `plan`: the inputs and the recommendation.
#[derive(Debug, Clone, Serialize)]
pub struct PlanReport {
    /// Inputs and assumptions.
    pub measured: Measured,
    /// The current scheme's assessment, for comparison.
    pub current: Report,
    /// The recommendation.
    pub plan: Plan,
}

/// Gathers the model's inputs from the fleet (see the module docs).
pub async fn measure(fleet: &Fleet, opts: &ModelOptions) -> Result<Measured> {
    let cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
    let live = cat.reach.live();
    let history = fleet.fleet_history(&live).await;
    let now = fleet.clock().now_secs();
    let book = fleet.book();
    let mut assumptions = Vec::new();
    let (k, m) = match cat.manifests.last() {
        Some(latest) => (latest.layout.k as usize, latest.layout.m as usize),
        None => {
            assumptions.push(format!(
                "no snapshot yet: k={} m={} (the defaults) assessed",
                crate::DEFAULT_K,
                crate::DEFAULT_M
            ));
            (crate::DEFAULT_K as usize, crate::DEFAULT_M as usize)
        }
    };
    let mut ids: Vec<([u8; 16], String)> =
        book.active().map(|mb| (mb.id, mb.addr.clone())).collect();
    for c in &live {
        if !ids.iter().any(|(id, _)| *id == c.agent_id()) && book.get(&c.agent_id()).is_none() {
            ids.push((c.agent_id(), c.addr().to_string()));
        }
    }
    let mut used: Vec<Option<u64>> = Vec::new();
    for (id, _) in &ids {
        let stat = match live.iter().find(|c| c.agent_id() == *id) {
            Some(c) => c.stat().await.ok(),
            None => None,
        };
        used.push(stat.map(|s| s.used));
    }
    let known: Vec<u64> = used.iter().flatten().copied().collect();
    let mean = known.iter().sum::<u64>() / (known.len().max(1) as u64);
    let mut agents = Vec::new();
    let (mut few, mut no_bytes, mut prior) = (Vec::new(), Vec::new(), Vec::new());
    for ((id, addr), bytes) in ids.iter().zip(used) {
        let name = crate::fleet::agent_name(addr, id);
        let up = history.availability(id, now);
        let observed = up.map_or(0, |u| u.observed_hours);
        let measured = observed >= MIN_OBSERVED_HOURS;
        if !measured {
            few.push(format!("{name} ({observed} h)"));
        }
        let h = history.get(id);
        let wake = h.and_then(|a| a.wake_success());
        let wake_measured = h.is_some_and(|a| a.wake_tries > 0);
        if wake.is_some() && !wake_measured {
            prior.push(name.clone());
        }
        if bytes.is_none() {
            no_bytes.push(name.clone());
        }
        agents.push(AgentInput {
            id: hex(id),
            addr: addr.clone(),
            availability: if measured {
                up.map_or(DEFAULT_AVAILABILITY, |u| u.fraction)
            } else {
                DEFAULT_AVAILABILITY
            },
            availability_measured: measured,
            observed_hours: observed,
            wake,
            wake_measured,
            bytes: bytes.unwrap_or(mean),
        });
    }
    if !few.is_empty() {
        assumptions.push(format!(
            "availability {:.0}% assumed for agents observed under {MIN_OBSERVED_HOURS} hours of \
             the last 30 days: {}",
            DEFAULT_AVAILABILITY * 100.0,
            few.join(", ")
        ));
    }
    if !prior.is_empty() {
        assumptions.push(format!(
            "wake success {:.0}% assumed (no wake recorded yet): {}",
            super::DEFAULT_WAKE_SUCCESS * 100.0,
            prior.join(", ")
        ));
    }
    if !no_bytes.is_empty() {
        assumptions.push(format!(
            "bytes held assumed the mean of the others for agents that do not answer: {}",
            no_bytes.join(", ")
        ));
    }
    let throughput = match opts.repair_throughput {
        Some(t) => t,
        None => {
            assumptions.push(format!(
                "repair throughput {:.0} MB/s assumed (not measured: give --repair-throughput)",
                DEFAULT_REPAIR_THROUGHPUT / 1e6
            ));
            DEFAULT_REPAIR_THROUGHPUT
        }
    };
    assumptions.push(format!(
        "PCs lost for good: {:.1}% per PC per year; a lost PC replaced within {} days; agents \
         up or down independently of each other",
        opts.loss_rate * 100.0,
        DEFAULT_REPLACEMENT.as_secs() / 86_400
    ));
    let model_fleet = super::Fleet {
        agents: agents
            .iter()
            .map(|a| AgentModel {
                availability: a.availability,
                wake: a.wake,
                bytes: a.bytes,
            })
            .collect(),
        repair_throughput: throughput,
        loss_rate: opts.loss_rate,
        replacement: DEFAULT_REPLACEMENT,
    };
    Ok(Measured {
        agents,
        fleet: model_fleet,
        scheme: Scheme {
            k,
            m,
            repair_after: opts.repair_after,
        },
        assumptions,
    })
}

/// `status --durability` (see the module docs).
pub async fn durability(fleet: &Fleet, opts: &ModelOptions) -> Result<DurabilityReport> {
    let measured = measure(fleet, opts).await?;
    let report = assess(&measured.fleet, &measured.scheme).map_err(model_error)?;
    Ok(DurabilityReport { measured, report })
}

/// `plan --target T` (see the module docs).
pub async fn recommend(fleet: &Fleet, opts: &ModelOptions, target: f64) -> Result<PlanReport> {
    let measured = measure(fleet, opts).await?;
    let current = assess(&measured.fleet, &measured.scheme).map_err(model_error)?;
    let options = PlanOptions::new(target, (measured.scheme.k, measured.scheme.m));
    let plan = plan(&measured.fleet, &options).map_err(model_error)?;
    Ok(PlanReport {
        measured,
        current,
        plan,
    })
}

fn model_error(e: super::ModelError) -> Error {
    Error::invalid(e.to_string())
}

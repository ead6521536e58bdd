//! How safe the backup is: the chance a restore finds enough agents, and the chance of losing a
//! snapshot within a year. The full model, with its assumptions and what it leaves out, is in
//! `docs/durability.md`; in short:
//!
//! * **Availability.** Agent `i` is up a fraction `a_i` of the time (measured, see
//!   [`crate::availability`]), independently of the others. A sleeping agent with Wake-on-LAN
//!   information wakes with probability `w_i`, so woken it is up with `a_i + (1 - a_i) w_i`.
//!   A stripe's `k + m` shards sit on distinct agents; it reads when `k` of them are up.
//!   [`Availability`] gives three figures: one stripe on an average placement (mean over every
//!   `(k+m)`-subset of the fleet), one stripe on the worst placement (the `k + m` least available
//!   agents), and a whole snapshot when its stripes use every placement (at most `m` agents of
//!   the whole fleet down): a lower bound for any placement, exact when the fleet has `k + m`
//!   agents. [`snapshot_availability_for_groups`] is exact for a given snapshot's placements.
//!   Desk PCs are off *together* (nights, weekends): [`weekly_availability`] computes the same
//!   figures hour by hour over the week from each agent's usual hours (independent given the
//!   hour) and averages them; prefer it once the history covers a week.
//! * **Loss.** PCs are lost for good at `λ` per PC-year (default 10%). A lost agent's shards are
//!   rebuilt elsewhere once it has been missing `repair-after`, taking `bytes_i / throughput`
//!   while its stripes are readable: window `W_i = repair-after + bytes_i / (throughput ·
//!   stripe availability)`. A snapshot is lost when more than `m` agents are lost within
//!   overlapping windows (any `m + 1` agents share a stripe: conservative). See [`loss`].
//! * [`plan`]: which `k`, `m` and `repair-after` meet a yearly loss target with the best storage
//!   efficiency and availability.

pub mod loss;
pub mod measured;
pub mod plan;
pub mod prob;

#[cfg(test)]
mod sim_tests;

use std::time::Duration;

use serde::Serialize;

pub use plan::{plan, Candidate, Plan, PlanOptions};

/// Default rate of PCs lost for good (stolen, dead, wiped, thrown out), per PC per year.
pub const DEFAULT_LOSS_RATE: f64 = 0.10;
/// Default probability that a Wake-on-LAN packet wakes a sleeping PC, before any is measured.
pub const DEFAULT_WAKE_SUCCESS: f64 = 0.8;
/// Default time to replace a lost PC with a new agent: two weeks.
pub const DEFAULT_REPLACEMENT: Duration = Duration::from_secs(14 * 86_400);
/// Seconds in a (Julian) year.
pub const SECS_PER_YEAR: f64 = 365.25 * 86_400.0;

/// One agent, as the model sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentModel {
    /// Fraction of the time it is up (0..=1), e.g. over the last 30 days.
    pub availability: f64,
    /// `Some(p)`: its MAC and broadcast address are known, and a wake succeeds with `p`.
    pub wake: Option<f64>,
    /// Bytes of shards it holds (what must be rebuilt when it is lost).
    pub bytes: u64,
}

impl AgentModel {
    /// Its availability when a sleeping agent is woken: `a + (1 - a) w`.
    pub fn woken_availability(&self) -> f64 {
        let a = self.availability;
        a + (1.0 - a) * self.wake.unwrap_or(0.0)
    }
}

/// The fleet and what was measured of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fleet {
    /// Every agent in service.
    pub agents: Vec<AgentModel>,
    /// Bytes of lost shards a repair rebuilds per second while it runs.
    pub repair_throughput: f64,
    /// PCs lost for good per PC per year ([`DEFAULT_LOSS_RATE`]).
    pub loss_rate: f64,
    /// How long until a lost PC is replaced by a new agent ([`DEFAULT_REPLACEMENT`]). Only
    /// counts when the fleet has no agent to spare (`n = k + m`): a repair stores a shard on
    /// an agent that holds none of the stripe, so it must wait for the replacement.
    #[serde(serialize_with = "as_secs")]
    pub replacement: Duration,
}

/// An erasure scheme and repair delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Scheme {
    /// Data shards per stripe.
    pub k: usize,
    /// Parity shards per stripe.
    pub m: usize,
    /// How long an agent must be missing before its shards are rebuilt elsewhere.
    #[serde(serialize_with = "as_secs")]
    pub repair_after: Duration,
}

impl Scheme {
    /// Fraction of the stored bytes that is data: `k / (k + m)`.
    pub fn efficiency(&self) -> f64 {
        self.k as f64 / (self.k + self.m) as f64
    }
}

/// The chance that reads find `k` shards of a stripe, at a random time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Availability {
    /// Every stripe of a snapshot whose stripes use every placement: at most `m` agents of the
    /// fleet down. A lower bound for any placement; exact when the fleet has `k + m` agents.
    pub snapshot: f64,
    /// One stripe, averaged over every placement (`(k+m)`-subset of the fleet).
    pub stripe_mean: f64,
    /// One stripe on the `k + m` least available agents.
    pub stripe_worst: f64,
}

/// The chance of losing a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Loss {
    /// Loss events per year (`L` in [`loss`]).
    pub rate_per_year: f64,
    /// P(a snapshot is lost within a year) = `1 - exp(-L)`.
    pub per_year: f64,
    /// Mean time to data loss, years (`1 / L`; infinite when `L` is 0).
    pub mttdl_years: f64,
    /// The longest repair window of any agent (repair-after + its rebuild time).
    #[serde(serialize_with = "as_secs")]
    pub longest_window: Duration,
    /// The longest rebuild time of any agent.
    #[serde(serialize_with = "as_secs")]
    pub longest_rebuild: Duration,
    /// Whether every window is short against a PC's life (`λW < 0.1`), where the model holds.
    pub windows_short: bool,
    /// The fleet has no agent beyond `k + m`: a lost PC's shards wait for its replacement, and
    /// the windows include [`Fleet::replacement`].
    pub waits_for_replacement: bool,
}

/// What [`assess`] says of a fleet under a scheme.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Report {
    /// The scheme assessed.
    pub scheme: Scheme,
    /// Restore availability without waking anyone.
    pub awake: Availability,
    /// Restore availability when sleeping agents are woken first.
    pub woken: Availability,
    /// Agents that can be woken (have Wake-on-LAN information).
    pub wakeable: usize,
    /// The chance of losing a snapshot.
    pub loss: Loss,
}

/// Why the model cannot answer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// No agents.
    #[error("the fleet has no agents: add agents with `sa-image agents add`")]
    NoAgents,
    /// `k` is 0.
    #[error("k must be at least 1")]
    ZeroK,
    /// Fewer agents than shards per stripe.
    #[error(
        "k + m = {need} shards per stripe need {need} agents, the fleet has {have}: \
         add agents or lower k or m"
    )]
    TooFewAgents {
        /// `k + m`.
        need: usize,
        /// Agents in the fleet.
        have: usize,
    },
    /// An availability outside 0..=1.
    #[error("agent #{agent}: availability {value} is not a fraction between 0 and 1")]
    BadAvailability {
        /// Index of the agent.
        agent: usize,
        /// The value given.
        value: f64,
    },
    /// A wake success probability outside 0..=1.
    #[error("agent #{agent}: wake success {value} is not a probability between 0 and 1")]
    BadWake {
        /// Index of the agent.
        agent: usize,
        /// The value given.
        value: f64,
    },
    /// Repair throughput not positive.
    #[error(
        "repair throughput {0} bytes/s must be positive: run a repair (or a snapshot) to measure \
         it, or give it"
    )]
    BadThroughput(f64),
    /// Loss rate negative or not a number.
    #[error("the rate of PCs lost for good ({0} per year) must be 0 or more")]
    BadLossRate(f64),
    /// Placement groups the exact computation cannot take.
    #[error(
        "cannot compute over these placements: at most {} agents and {} distinct placements, \
         each agent index in the fleet",
        prob::MAX_GROUP_AGENTS,
        prob::MAX_GROUPS
    )]
    BadGroups,
    /// A plan target outside (0, 1).
    #[error("the target yearly loss probability {0} must be between 0 and 1 (e.g. 1e-6)")]
    BadTarget(f64),
    /// No scheme meets the target.
    #[error(
        "no k, m and repair-after meets a yearly loss of {target:e} with this fleet; the best, \
         k={} m={} repair-after {}s, gives {best_loss:e}: add agents, or shorten repair-after, \
         or speed repairs up", best.k, best.m, best.repair_after.as_secs()
    )]
    NoPlan {
        /// The target asked for.
        target: f64,
        /// The scheme with the lowest loss.
        best: Scheme,
        /// Its yearly loss probability.
        best_loss: f64,
    },
}

fn as_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

fn check(fleet: &Fleet, scheme: &Scheme) -> Result<(), ModelError> {
    let n = fleet.agents.len();
    if n == 0 {
        return Err(ModelError::NoAgents);
    }
    if scheme.k == 0 {
        return Err(ModelError::ZeroK);
    }
    if scheme.k + scheme.m > n {
        return Err(ModelError::TooFewAgents {
            need: scheme.k + scheme.m,
            have: n,
        });
    }
    let fraction = |v: f64| (0.0..=1.0).contains(&v);
    for (i, a) in fleet.agents.iter().enumerate() {
        if !fraction(a.availability) {
            return Err(ModelError::BadAvailability {
                agent: i,
                value: a.availability,
            });
        }
        if let Some(w) = a.wake.filter(|w| !fraction(*w)) {
            return Err(ModelError::BadWake { agent: i, value: w });
        }
    }
    if !(fleet.repair_throughput.is_finite() && fleet.repair_throughput > 0.0) {
        return Err(ModelError::BadThroughput(fleet.repair_throughput));
    }
    if !(fleet.loss_rate.is_finite() && fleet.loss_rate >= 0.0) {
        return Err(ModelError::BadLossRate(fleet.loss_rate));
    }
    Ok(())
}

/// The three availability figures for agents up with `p`, `k` of `k + m` needed.
pub fn availability(p: &[f64], k: usize, m: usize) -> Availability {
    let s = k + m;
    let mut sorted = p.to_vec();
    sorted.sort_by(f64::total_cmp);
    Availability {
        snapshot: prob::at_least(p, p.len().saturating_sub(m)),
        stripe_mean: prob::mean_over_subsets(p, s, k).unwrap_or(0.0),
        stripe_worst: prob::at_least(&sorted[..s.min(sorted.len())], k),
    }
}

/// Hours in a week (the resolution of [`weekly_availability`]).
pub const WEEK_HOURS: usize = 7 * 24;

/// One agent's week: per hour of the week, the fraction of the time it is up then (from
/// [`crate::availability::UsualHours::fractions_or`]), and its wake success.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentWeek {
    /// Fraction up per hour of the week (any fixed origin, the same for every agent).
    pub fraction: [f64; WEEK_HOURS],
    /// `Some(p)`: can be woken, with success `p`.
    pub wake: Option<f64>,
}

/// Restore availability at a random hour of the week, without and with waking: the three
/// [`Availability`] figures for each hour with the agents' fractions for that hour, averaged
/// over the week. Agents are independent *given the hour*, so PCs that are all off at night
/// and at weekends count as off together, which [`assess`] (independent at all times) cannot
/// see. `None` when there are fewer than `k + m` agents or a fraction is outside 0..=1.
pub fn weekly_availability(
    week: &[AgentWeek],
    k: usize,
    m: usize,
) -> Option<(Availability, Availability)> {
    let fraction = |v: &f64| (0.0..=1.0).contains(v);
    if k == 0 || week.len() < k + m {
        return None;
    }
    if !week
        .iter()
        .all(|a| a.fraction.iter().all(fraction) && a.wake.is_none_or(|w| fraction(&w)))
    {
        return None;
    }
    let mut sums = [[0.0f64; 3]; 2];
    for h in 0..WEEK_HOURS {
        let awake: Vec<f64> = week.iter().map(|a| a.fraction[h]).collect();
        let woken: Vec<f64> = week
            .iter()
            .map(|a| {
                let f = a.fraction[h];
                f + (1.0 - f) * a.wake.unwrap_or(0.0)
            })
            .collect();
        for (sum, p) in sums.iter_mut().zip([awake, woken]) {
            let a = availability(&p, k, m);
            sum[0] += a.snapshot;
            sum[1] += a.stripe_mean;
            sum[2] += a.stripe_worst;
        }
    }
    let avg = |s: [f64; 3]| Availability {
        snapshot: s[0] / WEEK_HOURS as f64,
        stripe_mean: s[1] / WEEK_HOURS as f64,
        stripe_worst: s[2] / WEEK_HOURS as f64,
    };
    Some((avg(sums[0]), avg(sums[1])))
}

/// Assesses `fleet` under `scheme`: restore availability with and without waking, and the
/// chance of losing a snapshot.
pub fn assess(fleet: &Fleet, scheme: &Scheme) -> Result<Report, ModelError> {
    check(fleet, scheme)?;
    let (k, m) = (scheme.k, scheme.m);
    let awake_p: Vec<f64> = fleet.agents.iter().map(|a| a.availability).collect();
    let woken_p: Vec<f64> = fleet
        .agents
        .iter()
        .map(AgentModel::woken_availability)
        .collect();
    let awake = availability(&awake_p, k, m);
    let woken = availability(&woken_p, k, m);
    // A repair rebuilds a stripe only while k of its other shards are up: the wall time of a
    // rebuild is its running time over the (awake) per-stripe availability.
    let readable = awake.stripe_mean.max(1e-9);
    let rebuilds: Vec<f64> = fleet
        .agents
        .iter()
        .map(|a| a.bytes as f64 / fleet.repair_throughput / readable)
        .collect();
    // Without an agent to spare, a rebuilt shard has nowhere to go until a new PC joins.
    let waits = fleet.agents.len() == k + m;
    let detect = scheme.repair_after.as_secs_f64()
        + if waits {
            fleet.replacement.as_secs_f64()
        } else {
            0.0
        };
    let windows: Vec<f64> = rebuilds
        .iter()
        .map(|r| (detect + r) / SECS_PER_YEAR)
        .collect();
    let rate = loss::loss_rate(fleet.loss_rate, &windows, m);
    let longest_rebuild = rebuilds.iter().cloned().fold(0.0, f64::max);
    let longest_window = windows.iter().cloned().fold(0.0, f64::max) * SECS_PER_YEAR;
    let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX);
    Ok(Report {
        scheme: *scheme,
        awake,
        woken,
        wakeable: fleet.agents.iter().filter(|a| a.wake.is_some()).count(),
        loss: Loss {
            rate_per_year: rate,
            per_year: loss::within(rate, 1.0),
            mttdl_years: 1.0 / rate,
            longest_window: secs(longest_window),
            longest_rebuild: secs(longest_rebuild),
            windows_short: fleet.loss_rate * longest_window / SECS_PER_YEAR < 0.1,
            waits_for_replacement: waits,
        },
    })
}

/// P(every stripe of a snapshot reads) for the snapshot's actual placements: `groups` are the
/// distinct agent sets (indices into `fleet.agents`) its stripes use, each of `k + m` agents.
/// With `woken`, sleeping agents are woken first. Exact (a pruned walk over the agents).
pub fn snapshot_availability_for_groups(
    fleet: &Fleet,
    groups: &[Vec<usize>],
    m: usize,
    woken: bool,
) -> Result<f64, ModelError> {
    let p: Vec<f64> = fleet
        .agents
        .iter()
        .map(|a| {
            if woken {
                a.woken_availability()
            } else {
                a.availability
            }
        })
        .collect();
    prob::all_groups_ok(&p, groups, m).ok_or(ModelError::BadGroups)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn fleet(avail: &[f64], wake: Option<f64>, bytes: u64) -> Fleet {
        Fleet {
            agents: avail
                .iter()
                .map(|&a| AgentModel {
                    availability: a,
                    wake,
                    bytes,
                })
                .collect(),
            repair_throughput: 50e6,
            loss_rate: DEFAULT_LOSS_RATE,
            replacement: DEFAULT_REPLACEMENT,
        }
    }

    fn scheme(k: usize, m: usize, hours: u64) -> Scheme {
        Scheme {
            k,
            m,
            repair_after: Duration::from_secs(hours * 3600),
        }
    }

    #[test]
    fn six_desk_pcs_at_80_percent() {
        let f = fleet(&[0.8; 6], Some(0.9), 100_000_000_000);
        let r = assess(&f, &scheme(4, 2, 72)).unwrap();
        // n = k + m: one placement, all three figures agree with the binomial tail.
        for a in [r.awake.snapshot, r.awake.stripe_mean, r.awake.stripe_worst] {
            assert!((a - 0.90112).abs() < 1e-5, "{a}");
        }
        // Woken, a PC is up with 0.8 + 0.2 * 0.9 = 0.98.
        let woken = prob::binomial_at_least(6, 0.98, 4);
        assert!((r.woken.snapshot - woken).abs() < 1e-12);
        assert_eq!(r.wakeable, 6);
        // 100 GB at 50 MB/s over a 0.9 stripe availability: about 37 minutes.
        let rebuild = r.loss.longest_rebuild.as_secs_f64();
        assert!((rebuild - 100e9 / 50e6 / 0.90112).abs() < 1.0, "{rebuild}");
        assert!(r.loss.windows_short);
        // Six agents for six shards: a lost PC's shards wait for its replacement (14 days).
        assert!(r.loss.waits_for_replacement);
        // About 1.3e-4 a year (the textbook form with W = 3 days + 14 days + 37 min).
        let w = (72.0 * 3600.0 + 14.0 * 86400.0 + rebuild) / SECS_PER_YEAR;
        let textbook = 6.0 * 0.1 * 10.0 * (0.1 * w).powi(2);
        // (The textbook form leaves out a factor (1 - λW)^(n-m), 0.98 here.)
        let ratio = r.loss.per_year / textbook;
        assert!(ratio > 0.97 && ratio < 1.0, "{ratio}");
        assert!(r.loss.per_year > 1.2e-4 && r.loss.per_year < 1.3e-4);
        assert!((r.loss.mttdl_years * r.loss.rate_per_year - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bigger_fleets_spread_the_placements() {
        let avail = [0.95, 0.8, 0.7, 0.9, 0.6, 0.85, 0.75, 0.99, 0.5, 0.8];
        let r = assess(&fleet(&avail, None, 1 << 30), &scheme(4, 2, 24)).unwrap();
        let a = r.awake;
        assert!(
            a.snapshot < a.stripe_worst && a.stripe_worst < a.stripe_mean,
            "{a:?}"
        );
        assert_eq!(r.awake, r.woken, "nobody can be woken");
        // The exact figure for a rotating placement lies between the bound and one stripe.
        let groups: Vec<Vec<usize>> = (0..10)
            .map(|s| (0..6).map(|j| (s + j) % 10).collect())
            .collect();
        let exact =
            snapshot_availability_for_groups(&fleet(&avail, None, 0), &groups, 2, false).unwrap();
        assert!(a.snapshot < exact && exact < a.stripe_mean, "{exact} {a:?}");
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let ok = fleet(&[0.9; 6], None, 1);
        let cases: Vec<(Fleet, Scheme, ModelError)> = vec![
            (fleet(&[], None, 1), scheme(4, 2, 1), ModelError::NoAgents),
            (ok.clone(), scheme(0, 2, 1), ModelError::ZeroK),
            (
                ok.clone(),
                scheme(5, 2, 1),
                ModelError::TooFewAgents { need: 7, have: 6 },
            ),
            (
                fleet(&[0.9, 0.9, 1.5, 0.9], None, 1),
                scheme(2, 1, 1),
                ModelError::BadAvailability {
                    agent: 2,
                    value: 1.5,
                },
            ),
            (
                fleet(&[0.9; 3], Some(-0.1), 1),
                scheme(2, 1, 1),
                ModelError::BadWake {
                    agent: 0,
                    value: -0.1,
                },
            ),
            (
                Fleet {
                    repair_throughput: 0.0,
                    ..ok.clone()
                },
                scheme(4, 2, 1),
                ModelError::BadThroughput(0.0),
            ),
            (
                Fleet {
                    loss_rate: -1.0,
                    ..ok.clone()
                },
                scheme(4, 2, 1),
                ModelError::BadLossRate(-1.0),
            ),
        ];
        for (f, s, want) in cases {
            assert_eq!(assess(&f, &s).unwrap_err(), want);
        }
        let msg = ModelError::TooFewAgents { need: 7, have: 6 }.to_string();
        assert!(msg.contains("add agents or lower k or m"), "{msg}");
        assert_eq!(
            snapshot_availability_for_groups(&ok, &[vec![0, 9]], 1, false),
            Err(ModelError::BadGroups)
        );
    }
}

//! Which `k`, `m` and `repair-after` to use: the scheme that meets a yearly loss target with the
//! best storage efficiency and availability.
//!
//! Every `k >= 1`, `m >= 1` with `k + m <= n` (and at most `max_shards`) is tried. For each, the
//! *longest* `repair-after` among the candidates (and not under `min_repair_after`, the longest
//! usual absence of a PC, so that nights and weekends do not start repairs) that meets the target
//! is kept: a longer delay rebuilds less for PCs that were only switched off. The schemes that
//! meet the target are then ranked:
//!
//! 1. those whose whole-snapshot availability (woken, when any agent can be woken; the
//!    conservative [`super::Availability::snapshot`] figure) reaches `min_availability` first;
//! 2. higher storage efficiency `k / (k + m)`;
//! 3. higher availability;
//! 4. lower yearly loss.
//!
//! Bytes per agent change with the scheme: an agent holding `b` bytes under the current
//! `(k, m)` holds `b · ((k'+m')/k') / ((k+m)/k)` under `(k', m')` (same data, same shares).
//! Rebuilding a shard reads `k` shards, so the measured repair throughput (rebuilt bytes per
//! second under the current `k`) is taken as `throughput · k / k'` under `k'` (reads bound it).
//!
//! Under the model's conservative placement assumption (any `m + 1` agents share a stripe) the
//! loss depends on `m`, the windows and the fleet, hardly on `k`: for a given `m` the largest `k`
//! that fits wins on efficiency, held back by the availability wanted and the longer rebuilds.

use std::cmp::Ordering;
use std::time::Duration;

use serde::Serialize;

use super::{assess, Fleet, ModelError, Report, Scheme};

/// What [`plan`] is asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Target probability of losing a snapshot within a year, e.g. `1e-6`.
    pub target: f64,
    /// The `(k, m)` the agents' bytes were stored with (to rescale them for other schemes).
    pub current: (usize, usize),
    /// `repair-after` values to consider.
    pub repair_after: Vec<Duration>,
    /// No `repair-after` under this (the longest usual absence of a PC).
    pub min_repair_after: Duration,
    /// Whole-snapshot availability wanted (with waking when possible).
    pub min_availability: f64,
    /// Most shards per stripe to consider.
    pub max_shards: usize,
    /// How many ranked alternatives to return besides the best.
    pub alternatives: usize,
}

impl PlanOptions {
    /// Defaults for `target` and the fleet's current `(k, m)`: repair-after from 1 hour to 14
    /// days, no floor, 99% availability, at most 16 shards, 5 alternatives.
    pub fn new(target: f64, current: (usize, usize)) -> Self {
        let h = |n: u64| Duration::from_secs(n * 3600);
        PlanOptions {
            target,
            current,
            repair_after: [1, 4, 12, 24, 48, 72, 120, 168, 336].map(h).to_vec(),
            min_repair_after: Duration::ZERO,
            min_availability: 0.99,
            max_shards: 16,
            alternatives: 5,
        }
    }
}

/// One scheme [`plan`] considered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Candidate {
    /// Its assessment (scheme, availability, loss).
    pub report: Report,
    /// `k / (k + m)`.
    pub efficiency: f64,
    /// The whole-snapshot availability ranked on (woken when any agent can be woken).
    pub availability: f64,
    /// Whether `availability` reaches the wanted one.
    pub meets_availability: bool,
}

/// The recommendation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The best scheme meeting the target.
    pub best: Candidate,
    /// The next best ones, in order.
    pub alternatives: Vec<Candidate>,
}

/// Recommends `k`, `m` and `repair-after` for `fleet`; see the module docs.
pub fn plan(fleet: &Fleet, options: &PlanOptions) -> Result<Plan, ModelError> {
    if !(options.target > 0.0 && options.target < 1.0) {
        return Err(ModelError::BadTarget(options.target));
    }
    let (ck, cm) = options.current;
    if ck == 0 {
        return Err(ModelError::ZeroK);
    }
    let n = fleet.agents.len();
    if n < 2 {
        return Err(ModelError::TooFewAgents { need: 2, have: n });
    }
    let mut delays: Vec<Duration> = options
        .repair_after
        .iter()
        .copied()
        .filter(|d| *d >= options.min_repair_after)
        .collect();
    if delays.is_empty() {
        delays.push(options.min_repair_after);
    }
    delays.sort_unstable_by(|a, b| b.cmp(a));
    let wake = fleet.agents.iter().any(|a| a.wake.is_some());
    let mut meeting = Vec::new();
    let mut best_miss: Option<Report> = None;
    for s in 2..=n.min(options.max_shards) {
        for m in 1..s {
            let k = s - m;
            let rescaled = rescale(fleet, (ck, cm), (k, m));
            for &repair_after in &delays {
                let r = assess(&rescaled, &Scheme { k, m, repair_after })?;
                if r.loss.per_year <= options.target {
                    let availability = if wake {
                        r.woken.snapshot
                    } else {
                        r.awake.snapshot
                    };
                    meeting.push(Candidate {
                        report: r,
                        efficiency: r.scheme.efficiency(),
                        availability,
                        meets_availability: availability >= options.min_availability,
                    });
                    break;
                }
                if best_miss.is_none_or(|b| r.loss.per_year < b.loss.per_year) {
                    best_miss = Some(r);
                }
            }
        }
    }
    meeting.sort_by(rank);
    let mut ranked = meeting.into_iter();
    let Some(best) = ranked.next() else {
        let b = best_miss.ok_or(ModelError::NoAgents)?;
        return Err(ModelError::NoPlan {
            target: options.target,
            best: b.scheme,
            best_loss: b.loss.per_year,
        });
    };
    Ok(Plan {
        best,
        alternatives: ranked.take(options.alternatives).collect(),
    })
}

/// Best first (see the module docs).
fn rank(a: &Candidate, b: &Candidate) -> Ordering {
    let (sa, sb) = (&a.report.scheme, &b.report.scheme);
    // Efficiency compared exactly: k_a / s_a vs k_b / s_b.
    let eff = (sa.k * (sb.k + sb.m)).cmp(&(sb.k * (sa.k + sa.m)));
    b.meets_availability
        .cmp(&a.meets_availability)
        .then(eff.reverse())
        .then(b.availability.total_cmp(&a.availability))
        .then(a.report.loss.per_year.total_cmp(&b.report.loss.per_year))
}

/// The fleet with each agent's bytes and the repair throughput scaled from scheme `from` to
/// scheme `to`.
fn rescale(fleet: &Fleet, from: (usize, usize), to: (usize, usize)) -> Fleet {
    let overhead = |(k, m): (usize, usize)| (k + m) as f64 / k as f64;
    let factor = overhead(to) / overhead(from);
    let mut f = fleet.clone();
    f.repair_throughput *= from.0 as f64 / to.0 as f64;
    for a in &mut f.agents {
        a.bytes = (a.bytes as f64 * factor) as u64;
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::durability::tests::fleet;

    #[test]
    fn plan_meets_the_target_with_the_best_efficiency() {
        let f = fleet(
            &[0.9, 0.95, 0.85, 0.9, 0.8, 0.99, 0.9, 0.95],
            Some(0.9),
            200 << 30,
        );
        let mut o = PlanOptions::new(1e-6, (4, 2));
        o.min_repair_after = Duration::from_secs(64 * 3600);
        let p = plan(&f, &o).unwrap();
        let b = p.best;
        assert!(b.report.loss.per_year <= 1e-6, "{b:?}");
        assert!(b.report.scheme.repair_after >= o.min_repair_after);
        assert!(b.meets_availability);
        // Nothing more efficient meets both the target and the availability.
        for s in 2..=8usize {
            for m in 1..s {
                let k = s - m;
                if (k as f64 / s as f64) <= b.efficiency + 1e-12 {
                    continue;
                }
                let g = rescale(&f, (4, 2), (k, m));
                let r = assess(
                    &g,
                    &Scheme {
                        k,
                        m,
                        repair_after: o.min_repair_after,
                    },
                )
                .unwrap();
                assert!(
                    r.loss.per_year > 1e-6 || r.woken.snapshot < 0.99,
                    "{k}/{m} would be better: {r:?}"
                );
            }
        }
        // The alternatives come in order.
        let all: Vec<_> = std::iter::once(b).chain(p.alternatives).collect();
        for w in all.windows(2) {
            assert_ne!(rank(&w[0], &w[1]), Ordering::Greater);
        }
    }

    #[test]
    fn plan_says_when_no_scheme_fits() {
        let f = fleet(&[0.9; 3], None, 1 << 40);
        let mut o = PlanOptions::new(1e-9, (2, 1));
        o.min_repair_after = Duration::from_secs(14 * 86400);
        match plan(&f, &o) {
            Err(ModelError::NoPlan {
                best, best_loss, ..
            }) => {
                assert!(best_loss > 1e-9);
                assert_eq!(best.repair_after, o.min_repair_after);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            plan(&f, &PlanOptions::new(0.0, (2, 1))).unwrap_err(),
            ModelError::BadTarget(0.0)
        );
        let msg = plan(&f, &o).unwrap_err().to_string();
        assert!(msg.contains("add agents"), "{msg}");
    }

    #[test]
    fn a_longer_delay_is_kept_when_it_meets_the_target() {
        let f = fleet(&[0.9; 6], None, 10 << 30);
        let mut o = PlanOptions::new(1e-4, (4, 2));
        o.min_availability = 0.0;
        let p = plan(&f, &o).unwrap();
        let d = p.best.report.scheme.repair_after;
        // Next longer candidate misses the target for the same k, m.
        if let Some(&longer) = o.repair_after.iter().find(|x| **x > d) {
            let s = Scheme {
                repair_after: longer,
                ..p.best.report.scheme
            };
            let g = rescale(&f, (4, 2), (s.k, s.m));
            assert!(assess(&g, &s).unwrap().loss.per_year > 1e-4);
        }
    }
}

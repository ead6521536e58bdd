//! Retention: apply a policy per volume ([`prune`]), or forget one snapshot ([`forget`]), then
//! collect the shards no kept snapshot needs (see [`crate::gc`]).
//!
//! The policy works like restic's `forget --keep-*`, on creation times in UTC. Per volume, the
//! snapshots are walked newest first; a snapshot is kept by
//! - `--keep-last N`: if it is one of the N newest;
//! - `--keep-daily N`: if it is the newest of its day and fewer than N days have been kept so far
//!   (likewise `--keep-weekly` with ISO weeks, Monday to Sunday, and `--keep-monthly`).
//!
//! It is removed when no rule keeps it. Without any rule, prune refuses to run (it would remove
//! everything). The newest snapshot of each volume is always kept.

use std::collections::BTreeMap;

use sa_core::manifest::Manifest;
use serde::Serialize;

use crate::catalog::resolve;
use crate::error::{Error, Result};
use crate::fleet::{Access, Fleet};
use crate::gc::{self, collect, GcOptions, GcReport};
use crate::time::{rfc3339, year_month};

/// The retention policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// N newest.
    pub last: u32,
    /// Daily.
    pub daily: u32,
    /// Weekly.
    pub weekly: u32,
    /// Monthly.
    pub monthly: u32,
}

/// One snapshot's verdict.
#[derive(Serialize, Debug, Clone)]
pub struct Decision {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume name.
    pub volume: String,
    /// Creation time (UTC).
    pub created: String,
    /// Kept?
    pub keep: bool,
    /// Why: the rules that keep it (`last`, `daily 2024-05-01`, ...), or `no rule keeps it`.
    pub reasons: Vec<String>,
}

/// What `prune --json` prints.
#[derive(Serialize, Debug)]
pub struct PruneReport {
    /// Every snapshot considered, newest first per volume.
    pub snapshots: Vec<Decision>,
    /// Ids removed (or, with `dry_run`, that would be).
    pub removed: Vec<String>,
    /// Nothing changed.
    pub dry_run: bool,
    /// Agents that could not be updated.
    pub warnings: Vec<String>,
    /// Members of the agent book that were down (they learn of it when they are back).
    pub agents_down: Vec<String>,
    /// The collection that followed.
    pub gc: Option<GcReport>,
}

/// The bucket a rule puts a creation time in, and its label.
fn bucket(rule: &str, created: u64) -> (i64, String) {
    let days = (created / 86400) as i64;
    let date = &rfc3339(created)[..10];
    match rule {
        "daily" => (days, date.to_string()),
        // 1970-01-01 was a Thursday: weeks counted from Monday 1969-12-29.
        "weekly" => {
            let w = (days + 3).div_euclid(7);
            (
                w,
                format!("week of {}", &rfc3339(((w * 7 - 3) * 86400) as u64)[..10]),
            )
        }
        _ => {
            let (y, m) = year_month(days);
            (y * 12 + m as i64, format!("{y:04}-{m:02}"))
        }
    }
}

/// Applies `policy` to the snapshots of one volume (any order); returns decisions newest first.
pub fn decide(snaps: &[&Manifest], policy: Policy) -> Vec<Decision> {
    let mut order: Vec<&Manifest> = snaps.to_vec();
    // Newest first, to the nanosecond: snapshots taken within one second keep their order.
    order.sort_by(|a, b| {
        (b.created, b.created_nanos, &b.snapshot).cmp(&(a.created, a.created_nanos, &a.snapshot))
    });
    let rules = [
        ("daily", policy.daily),
        ("weekly", policy.weekly),
        ("monthly", policy.monthly),
    ];
    let mut last_bucket: [Option<i64>; 3] = [None; 3];
    let mut kept_count = [0u32; 3];
    order
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mut reasons = Vec::new();
            if (i as u32) < policy.last {
                reasons.push(format!("last {}", i + 1));
            }
            for (r, (rule, n)) in rules.iter().enumerate() {
                let (b, label) = bucket(rule, m.created);
                if kept_count[r] < *n && last_bucket[r] != Some(b) {
                    last_bucket[r] = Some(b);
                    kept_count[r] += 1;
                    reasons.push(format!("{rule} {label}"));
                }
            }
            if i == 0 && reasons.is_empty() {
                reasons.push("newest of its volume".into());
            }
            let keep = !reasons.is_empty();
            if !keep {
                reasons.push("no rule keeps it".into());
            }
            Decision {
                snapshot: m.snapshot.clone(),
                volume: m.volume_name.clone(),
                created: rfc3339(m.created),
                keep,
                reasons,
            }
        })
        .collect()
}

/// What to prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// Agent addresses (the book names the rest).
    pub agents: Vec<String>,
    /// The policy.
    pub policy: Policy,
    /// Only this volume (None: every volume, each on its own).
    pub volume: Option<String>,
    /// The collection that follows.
    pub gc: GcOptions,
}

/// Applies a retention policy (see the module docs), forgets what it does not keep and collects.
pub async fn prune(fleet: &Fleet, opts: &PruneOptions) -> Result<PruneReport> {
    if opts.policy == Policy::default() {
        return Err(Error::invalid(
            "no retention policy: give at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly (N > 0)",
        ));
    }
    let reach = fleet.reach(&opts.agents, Access::Write).await;
    let clients = reach.live_or_none()?;
    let now = fleet.clock().now_secs();
    let cat = gc::read_catalog(&clients, fleet.keys(), now).await?;
    let mut by_volume: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
    for m in &cat.live {
        if opts.volume.as_deref().is_none_or(|v| v == m.volume_name) {
            by_volume.entry(&m.volume_name).or_default().push(m);
        }
    }
    if let (Some(v), true) = (&opts.volume, by_volume.is_empty()) {
        return Err(Error::NoSuchVolume {
            volume: v.clone(),
            known: crate::catalog::volumes(&cat.live),
        });
    }
    let decisions: Vec<Decision> = by_volume
        .values()
        .flat_map(|ms| decide(ms, opts.policy))
        .collect();
    let removed: Vec<String> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.snapshot.clone())
        .collect();
    let mut report = PruneReport {
        snapshots: decisions,
        removed: removed.clone(),
        dry_run: opts.gc.dry_run,
        warnings: Vec::new(),
        agents_down: reach.down_names(),
        gc: None,
    };
    if !opts.gc.dry_run && !removed.is_empty() {
        report.warnings = gc::forget(&clients, fleet.keys(), &removed, now).await?;
    }
    if !opts.gc.dry_run {
        report.gc = Some(collect(fleet, &reach, opts.gc).await?);
    }
    Ok(report)
}

/// What to forget.
#[derive(Debug, Clone)]
pub struct ForgetOptions {
    /// Agent addresses (the book names the rest).
    pub agents: Vec<String>,
    /// Snapshot id, unique prefix, or `latest`.
    pub snapshot: String,
    /// With `latest`: of this volume.
    pub volume: Option<String>,
    /// The collection that follows (its `dry_run` also means: forget nothing).
    pub gc: GcOptions,
}

/// What a forget did (`forget --json`).
#[derive(Serialize, Debug)]
pub struct ForgetReport {
    /// The snapshot forgotten (or, with `dry_run`, that would be).
    pub snapshot: String,
    /// Its volume.
    pub volume: String,
    /// Nothing changed.
    pub dry_run: bool,
    /// Agents that could not be updated.
    pub warnings: Vec<String>,
    /// Members of the agent book that were down (they learn of it when they are back).
    pub agents_down: Vec<String>,
    /// The collection that followed.
    pub gc: Option<GcReport>,
}

/// Forgets one snapshot (a tombstone on every agent, then its manifest deleted), then collects
/// the shards only it used.
pub async fn forget(fleet: &Fleet, opts: &ForgetOptions) -> Result<ForgetReport> {
    let reach = fleet.reach(&opts.agents, Access::Write).await;
    let clients = reach.live_or_none()?;
    let now = fleet.clock().now_secs();
    let cat = gc::read_catalog(&clients, fleet.keys(), now).await?;
    let m = resolve(&cat.live, &opts.snapshot, opts.volume.as_deref())?;
    let mut report = ForgetReport {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        dry_run: opts.gc.dry_run,
        warnings: Vec::new(),
        agents_down: reach.down_names(),
        gc: None,
    };
    if !opts.gc.dry_run {
        report.warnings = gc::forget(
            &clients,
            fleet.keys(),
            std::slice::from_ref(&m.snapshot),
            now,
        )
        .await?;
    }
    report.gc = Some(collect(fleet, &reach, opts.gc).await?);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sa_core::layout::Layout;

    fn snap(id: &str, created: u64) -> Manifest {
        Manifest {
            snapshot: id.into(),
            volume_name: "v".into(),
            volume: [0; 16],
            revision: 0,
            created,
            created_nanos: 0,
            layout: Layout::new(1 << 20, 1 << 20, 4, 2).unwrap(),
            agents: vec![],
            stripes: vec![sa_core::manifest::StripeRef::Zero],
            tracking_bitmap: None,
        }
    }

    fn kept(ms: &[Manifest], p: Policy) -> Vec<String> {
        let refs: Vec<&Manifest> = ms.iter().collect();
        decide(&refs, p)
            .into_iter()
            .filter(|d| d.keep)
            .map(|d| d.snapshot)
            .collect()
    }

    #[test]
    fn policies_like_restic() {
        const DAY: u64 = 86400;
        // 2024-01-01 (a Monday) 00:00 UTC, then two snapshots a day for 40 days.
        let t0 = 1_704_067_200;
        let ms: Vec<Manifest> = (0..80)
            .map(|i| {
                snap(
                    &format!("s{i:02}"),
                    t0 + (i / 2) * DAY + (i % 2) * 3600 * 12,
                )
            })
            .collect();
        assert_eq!(
            kept(
                &ms,
                Policy {
                    last: 3,
                    ..Default::default()
                }
            ),
            vec!["s79", "s78", "s77"]
        );
        // Newest of each of the last 3 days.
        assert_eq!(
            kept(
                &ms,
                Policy {
                    daily: 3,
                    ..Default::default()
                }
            ),
            vec!["s79", "s77", "s75"]
        );
        // Weeks start on Monday: days 35..39 are week 6 (s79), days 28..34 week 5 (newest s69).
        assert_eq!(
            kept(
                &ms,
                Policy {
                    weekly: 2,
                    ..Default::default()
                }
            ),
            vec!["s79", "s69"]
        );
        // January ends on day 30 (s61); February holds s62..s79.
        assert_eq!(
            kept(
                &ms,
                Policy {
                    monthly: 5,
                    ..Default::default()
                }
            ),
            vec!["s79", "s61"]
        );
        let both = kept(
            &ms,
            Policy {
                last: 1,
                daily: 2,
                ..Default::default()
            },
        );
        assert_eq!(both, vec!["s79", "s77"]);
    }
}

//! `sa-image prune`: apply a retention policy per volume, forget what it does not keep, and
//! collect the shards no kept snapshot needs (see [`crate::gc`]).
//!
//! The policy works like restic's `forget --keep-*`, on creation times in UTC. Per volume, the
//! snapshots are walked newest first; a snapshot is kept by
//! - `--keep-last N`: if it is one of the N newest;
//! - `--keep-daily N`: if it is the newest of its day and fewer than N days have been kept so far
//!   (likewise `--keep-weekly` with ISO weeks, Monday to Sunday, and `--keep-monthly`).
//!
//! It is removed when no rule keeps it. Without any `--keep-*`, prune refuses to run (it would
//! remove everything). The newest snapshot of each volume is always kept.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Result};
use sa_core::manifest::Manifest;
use serde::{Deserialize, Serialize};

use crate::agents::connect_many;
use crate::cmd::list::rfc3339;
use crate::config::{self, require_agents, KeyArgs};
use crate::gc::{self, collect, parse_duration, GcOptions, GcReport, DEFAULT_GRACE};
use crate::merge;

/// Flags of `prune`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PruneArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Every agent, HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Keep the N newest snapshots.
    #[arg(long)]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long)]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long)]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long)]
    pub keep_monthly: Option<u32>,
    /// Only this volume (default: every volume, each on its own).
    #[arg(long)]
    pub volume: Option<String>,
    /// Never delete a shard younger than this (0s, 30m, 1h, 2d); default 1h.
    #[arg(long)]
    pub gc_grace: Option<String>,
    /// Show what would be kept and removed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

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
    /// Ids removed (or that would be).
    pub removed: Vec<String>,
    /// Nothing changed.
    pub dry_run: bool,
    /// Agents that could not be updated.
    pub warnings: Vec<String>,
    /// The collection that followed.
    pub gc: Option<GcReport>,
}

/// Year and month of a day count since 1970-01-01 (UTC).
fn year_month(days: i64) -> (i64, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + if mo <= 2 { 1 } else { 0 };
    (y, mo)
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

/// `sa-image prune`.
pub async fn run(mut args: PruneArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: PruneArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; agents, keep_last, keep_daily, keep_weekly, keep_monthly, volume, gc_grace;
        bools dry_run, json);
    let policy = Policy {
        last: args.keep_last.unwrap_or(0),
        daily: args.keep_daily.unwrap_or(0),
        weekly: args.keep_weekly.unwrap_or(0),
        monthly: args.keep_monthly.unwrap_or(0),
    };
    if policy == Policy::default() {
        bail!("no retention policy: give at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly (N > 0)");
    }
    let keys = Arc::new(args.keyfile.load()?.derive());
    let grace = parse_duration(args.gc_grace.as_deref().unwrap_or(DEFAULT_GRACE))?;
    let attempts = connect_many(&require_agents(&args.agents)?, &keys).await;
    let clients = crate::agents::live_or_none(&attempts)?;
    let cat = gc::read_catalog(&clients, &keys).await?;
    let mut by_volume: BTreeMap<&str, Vec<&Manifest>> = BTreeMap::new();
    for m in &cat.live {
        if args.volume.as_deref().is_none_or(|v| v == m.volume_name) {
            by_volume.entry(&m.volume_name).or_default().push(m);
        }
    }
    if let (Some(v), true) = (&args.volume, by_volume.is_empty()) {
        bail!("no snapshot of volume '{v}' in the catalog (see `sa-image list`)");
    }
    let decisions: Vec<Decision> = by_volume
        .values()
        .flat_map(|ms| decide(ms, policy))
        .collect();
    let removed: Vec<String> = decisions
        .iter()
        .filter(|d| !d.keep)
        .map(|d| d.snapshot.clone())
        .collect();
    let mut report = PruneReport {
        snapshots: decisions,
        removed: removed.clone(),
        dry_run: args.dry_run,
        warnings: Vec::new(),
        gc: None,
    };
    if !args.dry_run && !removed.is_empty() {
        report.warnings = gc::forget(&clients, &keys, &removed).await?;
    }
    if !args.dry_run {
        report.gc = Some(
            collect(
                &attempts,
                &keys,
                GcOptions {
                    grace,
                    dry_run: false,
                },
            )
            .await?,
        );
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    let mut vol = "";
    for d in &report.snapshots {
        if d.volume != vol {
            vol = &d.volume;
            println!("volume '{vol}':");
        }
        let verdict = match (d.keep, args.dry_run) {
            (true, _) => "keep  ",
            (false, true) => "would remove",
            (false, false) => "remove",
        };
        println!(
            "  {verdict} {}  {}  ({})",
            d.snapshot,
            d.created,
            d.reasons.join(", ")
        );
    }
    println!(
        "{} kept, {} removed",
        report.snapshots.len() - report.removed.len(),
        report.removed.len()
    );
    for w in &report.warnings {
        println!("  warning: {w}");
    }
    if let Some(g) = &report.gc {
        gc::print_report(g, false);
    }
    Ok(0)
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
        assert_eq!(year_month(0), (1970, 1));
        assert_eq!(year_month(19_782), (2024, 2));
    }
}

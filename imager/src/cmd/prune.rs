//! `sa-image prune`: a retention policy per volume (see [`sa_engine::retention`]).

use std::path::Path;

use anyhow::Result;
use sa_engine::gc::GcOptions;
use sa_engine::retention::{prune, Policy, PruneOptions};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs};
use crate::exit::usage;
use crate::merge;
use crate::text::print_gc;

/// Flags of `prune`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PruneArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub offsite: crate::config::OffsiteArgs,
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
    /// Only this volume [default: every volume, each on its own].
    #[arg(long)]
    pub volume: Option<String>,
    /// Never delete a shard younger than this, e.g. 0s, 30m, 1.5h, 2d [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub gc_grace: Option<String>,
    /// Show what would be kept and removed, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `sa-image prune`.
pub async fn run(mut args: PruneArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: PruneArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; keep_last, keep_daily, keep_weekly, keep_monthly, volume, gc_grace;
        bools dry_run, json);
    let policy = Policy {
        last: args.keep_last.unwrap_or(0),
        daily: args.keep_daily.unwrap_or(0),
        weekly: args.keep_weekly.unwrap_or(0),
        monthly: args.keep_monthly.unwrap_or(0),
    };
    if policy == Policy::default() {
        return Err(usage("no retention policy: give at least one of --keep-last, --keep-daily, --keep-weekly, --keep-monthly (N > 0)"));
    }
    let opts = PruneOptions {
        agents: args.fleet.addrs()?,
        policy,
        volume: args.volume.clone(),
        gc: GcOptions {
            grace: config::gc_grace(args.gc_grace.as_deref())?,
            dry_run: args.dry_run,
        },
    };
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    let report = prune(&fleet, &opts).await?;
    let bucket = crate::cmd::offsite::sweep_after(
        &args.offsite,
        &fleet,
        opts.agents.clone(),
        opts.gc.grace,
        args.dry_run,
    )
    .await?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(b) = &bucket {
            v["offsite"] = serde_json::to_value(b)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
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
    let kept = report.snapshots.len() - report.removed.len();
    if args.dry_run {
        println!(
            "{kept} would be kept, {} would be removed (dry run: nothing changed)",
            report.removed.len()
        );
    } else {
        println!("{kept} kept, {} removed", report.removed.len());
    }
    for w in &report.warnings {
        println!("  warning: {w}");
    }
    for a in &report.agents_down {
        println!("  agent down: {a} (it learns of this when it is back and gc runs)");
    }
    if let Some(g) = &report.gc {
        print_gc(g, false);
    }
    if let Some(b) = &bucket {
        crate::cmd::offsite::print_sweep(b);
    }
    Ok(0)
}

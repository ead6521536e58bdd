//! `sa-image forget SNAPSHOT` (see [`sa_engine::retention::forget`]).

use std::path::Path;

use anyhow::Result;
use sa_engine::gc::GcOptions;
use sa_engine::retention::{forget, ForgetOptions};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs};
use crate::merge;
use crate::text::print_gc;

/// Flags of `forget`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ForgetArgs {
    /// Snapshot id (or unique prefix), or `latest` (of --volume; needed with several volumes).
    #[serde(skip)]
    pub snapshot: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    /// The volume whose snapshot `latest` names.
    #[arg(long)]
    pub volume: Option<String>,
    /// Never delete a shard younger than this, e.g. 0s, 30m, 1.5h, 2d [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub gc_grace: Option<String>,
    /// Show what would be forgotten, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `sa-image forget`.
pub async fn run(mut args: ForgetArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: ForgetArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    merge!(args, file; volume, gc_grace; bools dry_run, json);
    let opts = ForgetOptions {
        agents: args.fleet.addrs()?,
        snapshot: args.snapshot.clone(),
        volume: args.volume.clone(),
        gc: GcOptions {
            grace: config::gc_grace(args.gc_grace.as_deref())?,
            dry_run: args.dry_run,
        },
    };
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    let report = forget(&fleet, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    let verb = if args.dry_run {
        "would forget"
    } else {
        "forgot"
    };
    println!(
        "{verb} snapshot {} of volume '{}'",
        report.snapshot, report.volume
    );
    for w in &report.warnings {
        println!("  warning: {w}");
    }
    for a in &report.agents_down {
        println!("  agent down: {a} (it learns of this when it is back and gc runs)");
    }
    if let Some(g) = &report.gc {
        print_gc(g, args.dry_run);
    }
    Ok(0)
}

//! `sa-image list`: the snapshots in the catalog.

use std::path::Path;

use anyhow::Result;
use sa_core::size::format_size;
use sa_engine::list::{list, ListOptions};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs};
use crate::merge;

/// Flags of `list`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ListArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub offsite: crate::config::OffsiteArgs,
    /// Only the snapshots of this volume.
    #[arg(long)]
    pub volume: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// A snapshot's last drill in a few words: `passed 2026-01-02T03:04:05Z (2 withheld)`.
pub fn drill_text(d: Option<&sa_engine::drill::record::DrillSummary>) -> String {
    match d {
        None => "-".into(),
        Some(d) => format!(
            "{} {} ({} withheld)",
            if d.passed { "passed" } else { "FAILED" },
            d.at,
            d.withheld.len()
        ),
    }
}

/// `sa-image list`.
pub async fn run(mut args: ListArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: ListArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; volume; bools json);
    let fleet = args
        .offsite
        .apply(args.fleet.fleet(args.keyfile.load()?.derive())?)?;
    let opts = ListOptions {
        agents: args.offsite.addrs(&args.fleet)?,
        volume: args.volume.clone(),
    };
    let rows = list(&fleet, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(0);
    }
    if rows.is_empty() {
        println!("no snapshots yet");
        return Ok(0);
    }
    println!(
        "{:<16}  {:<20}  {:<16} {:>10} {:>10} {:>10} {:>8} {:>6}  k+m  last drill",
        "snapshot", "created", "volume", "size", "new data", "shared", "stripes", "zero"
    );
    for r in &rows {
        println!(
            "{:<16}  {:<20}  {:<16} {:>10} {:>10} {:>10} {:>8} {:>6}  {}+{}  {}",
            r.snapshot,
            r.created,
            r.volume,
            format_size(r.size),
            format_size(r.new_data),
            format_size(r.shared_data),
            r.stripes,
            r.zero_stripes,
            r.k,
            r.m,
            drill_text(r.last_drill.as_ref())
        );
    }
    Ok(0)
}

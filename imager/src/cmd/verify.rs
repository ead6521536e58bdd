//! `sa-image verify SNAPSHOT`: read and check every shard (see [`sa_engine::verify`]).

use std::path::Path;

use anyhow::Result;
use sa_engine::verify::{verify, VerifyOptions, VerifyReport};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs, WakeArgs};
use crate::merge;
use crate::progress::Bar;

/// Flags of `verify`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct VerifyArgs {
    /// Snapshot id (or unique prefix), or `latest` (of --volume; needed with several volumes).
    #[serde(skip)]
    pub snapshot: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub wake: WakeArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub offsite: crate::config::OffsiteArgs,
    /// The volume whose snapshot `latest` names.
    #[arg(long)]
    pub volume: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `sa-image verify`.
pub async fn run(mut args: VerifyArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: VerifyArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.wake.merge(&mut file.wake);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; volume; bools json);
    let fleet = args.offsite.apply(
        args.wake
            .apply(args.fleet.fleet(args.keyfile.load()?.derive())?)?,
    )?;
    let opts = VerifyOptions {
        snapshot: args.snapshot.clone(),
        volume: args.volume.clone(),
        agents: args.offsite.addrs(&args.fleet)?,
    };
    let shutdown = crate::signal::on_stop_signals();
    let report = verify(&fleet, &opts, &Bar::new(args.json), &shutdown).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(report.exit_code())
}

fn print_text(r: &VerifyReport) {
    println!(
        "snapshot {} of '{}': {} stripes ({} zero)",
        r.snapshot, r.volume, r.stripes, r.zero_stripes
    );
    println!(
        "  {:<28} {:>9} {:>8} {:>8} {:>8}",
        "agent", "reachable", "ok", "missing", "corrupt"
    );
    for a in &r.agents {
        println!(
            "  {:<28} {:>9} {:>8} {:>8} {:>8}",
            a.addr,
            if a.reachable { "yes" } else { "NO" },
            a.ok,
            a.missing,
            a.corrupt
        );
    }
    for b in r.bad_shards.iter().take(20) {
        println!(
            "  stripe {} shard {} on {}: {:?}: {}",
            b.stripe, b.index, b.agent, b.problem, b.detail
        );
    }
    if r.bad_shards.len() > 20 {
        println!(
            "  ... {} more bad shards (see --json)",
            r.bad_shards.len() - 20
        );
    }
    if r.offsite_stripes > 0 {
        println!(
            "  {} stripe(s) read and checked from the offsite copy",
            r.offsite_stripes
        );
    }
    if r.lost_stripes > 0 {
        println!(
            "DATA LOST: {} stripes cannot be rebuilt (first: {:?}); bring back the agents that are down",
            r.lost_stripes,
            &r.lost[..r.lost.len().min(10)]
        );
    } else if r.shards_missing + r.shards_corrupt > 0 {
        println!(
            "DEGRADED but recoverable: {} shards missing, {} corrupt, {} of {} stripes affected; every stripe can still be rebuilt",
            r.shards_missing,
            r.shards_corrupt,
            r.degraded_stripes,
            r.stripes - r.zero_stripes
        );
    } else {
        println!("OK: all {} shards present and sound", r.shards_ok);
    }
}

//! `sa-image restore SNAPSHOT --to TARGET` (see [`sa_engine::restore`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use sa_core::size::format_size;
use sa_engine::restore::{restore, RestoreOptions, RestoreReport};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs, WakeArgs};
use crate::exit::usage;
use crate::merge;
use crate::progress::Bar;

/// Flags of `restore`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RestoreArgs {
    /// Snapshot id (or unique prefix), or `latest` (of --volume; needed with several volumes).
    #[serde(skip)]
    pub snapshot: String,
    /// Target: an image file (created if missing) or a block device (not mounted, not in use).
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// Replace an existing target file that holds data.
    #[arg(long)]
    pub force: bool,
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

/// `sa-image restore`.
pub async fn run(mut args: RestoreArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: RestoreArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.wake.merge(&mut file.wake);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; to, volume; bools json, force);
    let to = args
        .to
        .clone()
        .ok_or_else(|| usage("give --to TARGET: an image file or a block device"))?;
    let fleet = args.offsite.apply(
        args.wake
            .apply(args.fleet.fleet(args.keyfile.load()?.derive())?)?,
    )?;
    let opts = RestoreOptions {
        snapshot: args.snapshot.clone(),
        volume: args.volume.clone(),
        target: to,
        force: args.force,
        agents: args.offsite.addrs(&args.fleet)?,
    };
    let shutdown = crate::signal::on_stop_signals();
    let report = restore(&fleet, &opts, &Bar::new(args.json), &shutdown).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(0)
}

/// The report for people.
pub fn print_report(r: &RestoreReport) {
    println!(
        "restored snapshot {} of '{}' to {}",
        r.snapshot, r.volume, r.target
    );
    println!(
        "  {} in {:.1}s ({}/s); {} of {} stripes rebuilt from parity",
        format_size(r.size),
        r.seconds,
        format_size((r.size as f64 / r.seconds.max(1e-9)) as u64),
        r.reconstructed_stripes,
        r.stripes
    );
    if r.missing_shards + r.corrupt_shards > 0 {
        println!(
            "  {} shards missing, {} corrupt: run `sa-image verify {}` and bring the agents back",
            r.missing_shards, r.corrupt_shards, r.snapshot
        );
    }
    if r.offsite_shards > 0 {
        println!(
            "  {} shard(s) taken from the offsite copy",
            r.offsite_shards
        );
    }
    for a in &r.wake.answered {
        println!("  woken by Wake-on-LAN: {a}");
    }
    for a in &r.agents_down {
        println!("  agent down: {a}");
    }
}

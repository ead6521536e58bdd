//! `sa-image snapshot SOURCE`: flags to [`sa_engine::snapshot::SnapshotOptions`], the engine's
//! report to text or JSON.

use std::path::{Path, PathBuf};

use anyhow::Result;
use sa_core::size::format_size;
use sa_engine::snapshot::{snapshot, SnapshotOptions, SnapshotReport};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs};
use crate::exit::usage;
use crate::merge;
use crate::progress::Bar;

/// Flags of `snapshot`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SnapshotArgs {
    /// Block device or image file to snapshot, e.g. /dev/sda.
    #[serde(skip)]
    pub source: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    /// Data shards per stripe (k) [default: 4].
    #[arg(long)]
    pub data_shards: Option<u8>,
    /// Parity shards per stripe (m): how many agents may be lost [default: 2].
    #[arg(long)]
    pub parity_shards: Option<u8>,
    /// Stripe size, e.g. 4MiB [default: 4MiB].
    #[arg(long)]
    pub stripe_size: Option<String>,
    /// Volume name [default: the source's file name].
    #[arg(long)]
    pub volume: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// With --changed-map: the snapshot (id, prefix or `latest`) the map's changes are relative to.
    #[arg(long, requires = "changed_map")]
    pub changed_since: Option<String>,
    /// File of changed byte ranges since --changed-since, one `OFFSET LENGTH` per line (decimal
    /// or 0x hex, `#` comments); stripes no range touches are not read.
    #[arg(long, requires = "changed_since")]
    pub changed_map: Option<PathBuf>,
    /// With fewer than k + m agents reachable (but at least k), store anyway: all k + m shards of
    /// every stripe, some agents holding two (or more) of one stripe, so the snapshot survives
    /// fewer agent losses than m until `sa-image repair` spreads them (status exits 2 meanwhile).
    #[arg(long)]
    pub allow_degraded: bool,
}

/// `sa-image snapshot`.
pub async fn run(mut args: SnapshotArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: SnapshotArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    merge!(args, file; data_shards, parity_shards, stripe_size, volume, changed_since,
        changed_map; bools json, allow_degraded);
    if args.changed_since.is_some() != args.changed_map.is_some() {
        return Err(usage("--changed-since and --changed-map go together: the map lists what changed since that snapshot"));
    }
    let stripe_size = match &args.stripe_size {
        Some(s) => u32::try_from(config::size(s, "--stripe-size")?)
            .map_err(|_| usage("--stripe-size: too large"))?,
        None => sa_engine::DEFAULT_STRIPE_SIZE,
    };
    let volume = match args.volume.clone() {
        Some(v) => v,
        None => args
            .source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "volume".into()),
    };
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    let mut opts = SnapshotOptions::new(args.source.clone(), &volume, args.fleet.addrs()?);
    opts.k = args.data_shards.unwrap_or(sa_engine::DEFAULT_K);
    opts.m = args.parity_shards.unwrap_or(sa_engine::DEFAULT_M);
    opts.stripe_size = stripe_size;
    opts.allow_degraded = args.allow_degraded;
    opts.cache_dir = args.fleet.cache_dir.clone();
    opts.changed = args.changed_since.clone().zip(args.changed_map.clone());
    let shutdown = crate::signal::on_stop_signals();
    let report = snapshot(&fleet, &opts, &Bar::new(args.json), &shutdown).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(0)
}

/// The report for people.
pub fn print_report(r: &SnapshotReport) {
    println!("snapshot {} of volume '{}' stored", r.snapshot, r.volume);
    println!(
        "  {} in {} stripes: {} new, {} already stored, {} kept from an interrupted run, {} zero",
        format_size(r.size),
        r.stripes,
        r.new_stripes,
        r.reused_stripes,
        r.resumed_stripes,
        r.zero_stripes
    );
    let survives = if r.margin == r.parity_shards as i64 {
        format!("any {} may be lost", r.parity_shards)
    } else {
        format!(
            "it survives {} agent loss(es) for now, not {}",
            r.margin, r.parity_shards
        )
    };
    println!(
        "  sent {} to {} agents (k={} m={}: {survives}) in {:.1}s ({}/s read)",
        format_size(r.bytes_sent),
        r.agents,
        r.data_shards,
        r.parity_shards,
        r.seconds,
        format_size((r.size as f64 / r.seconds.max(1e-9)) as u64)
    );
    for m in &r.source_mounted_rw {
        println!(
            "  warning: the source is mounted read-write on {m}: the image may not be consistent"
        );
    }
    for a in &r.agents_unreachable {
        println!("  warning: agent {a} did not answer; its share went to the others");
    }
    for a in &r.agents_lost {
        println!(
            "  warning: agent {a} failed during the run; its part went to the others and what it \
             took counts as absent (`sa-image repair` restores full redundancy)"
        );
    }
    if r.degraded {
        println!(
            "  warning: stored DEGRADED on {} agents: start more agents and run `sa-image repair` \
             to spread the shards",
            r.agents
        );
    }
}

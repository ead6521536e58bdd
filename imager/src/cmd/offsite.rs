//! `sa-image offsite push|gc`: the offsite copy in S3-compatible object storage (see
//! [`sa_engine::offsite`]). `snapshot` pushes by itself when `--offsite` (or the `offsite` table)
//! is set; `offsite push` catches up after a failed upload or for a volume set up later.

use std::path::Path;

use anyhow::Result;
use sa_core::size::format_size;
use sa_engine::offsite::{PushOptions, PushReport, SweepOptions, SweepReport};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs, OffsiteArgs};
use crate::exit::usage;
use crate::merge;
use crate::progress::Bar;

/// `offsite` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum OffsiteCommand {
    /// Upload what the bucket lacks: new snapshots' shards, then their manifests, and the
    /// tombstones of forgotten snapshots. Resumes where a failed upload stopped.
    Push(PushArgs),
    /// Delete from the bucket the manifests of forgotten snapshots and the shards no kept
    /// snapshot uses (older than --gc-grace).
    Gc(GcArgs),
}

/// Flags of `offsite push`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PushArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub offsite: OffsiteArgs,
    /// Only this volume's snapshots [default: every volume].
    #[arg(long)]
    pub volume: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `offsite gc`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GcArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub offsite: OffsiteArgs,
    /// Never delete an object younger than this, e.g. 0s, 30m, 2d [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub gc_grace: Option<String>,
    /// Report what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `sa-image offsite ...`.
pub async fn run(c: OffsiteCommand, cfg: Option<&Path>) -> Result<u8> {
    match c {
        OffsiteCommand::Push(a) => push(a, cfg).await,
        OffsiteCommand::Gc(a) => gc(a, cfg).await,
    }
}

fn store(o: &OffsiteArgs) -> Result<sa_engine::offsite::OffsiteStore> {
    o.store()?.ok_or_else(|| {
        usage("no offsite copy set: give --offsite s3://BUCKET[/PREFIX] (or the `offsite` table in the config file)")
    })
}

async fn push(mut args: PushArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: PushArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; volume; bools json);
    if args.offsite.offsite_only {
        return Err(usage(
            "offsite push reads the agents: --offsite-only does not apply",
        ));
    }
    let bucket = store(&args.offsite)?;
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    let opts = push_options(&args.offsite, args.fleet.addrs()?, args.volume.clone())?;
    let shutdown = crate::signal::on_stop_signals();
    let report =
        sa_engine::offsite::push(&fleet, &bucket, &opts, &Bar::new(args.json), &shutdown).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_push(&report);
    }
    Ok(0)
}

/// The push settings of `o` (shared with `snapshot`).
pub fn push_options(
    o: &OffsiteArgs,
    agents: Vec<String>,
    volume: Option<String>,
) -> Result<PushOptions> {
    Ok(PushOptions {
        agents,
        volume,
        rate: o.rate()?,
        shards: o.config()?.map(|c| c.shards).unwrap_or_default(),
    })
}

/// A push report for people.
pub fn print_push(r: &PushReport) {
    println!(
        "offsite {}: {} shard(s) uploaded ({}), {} already there, {} manifest(s), {} \
         tombstone(s) in {:.1}s ({}/s)",
        r.url,
        r.shards_uploaded,
        format_size(r.bytes_uploaded),
        r.shards_present,
        r.manifests_uploaded,
        r.tombstones_uploaded,
        r.seconds,
        format_size((r.bytes_uploaded as f64 / r.seconds.max(1e-9)) as u64),
    );
    if r.stripes_rebuilt > 0 {
        println!(
            "  {} stripe(s) read back from parity: their agents were down or their copies bad",
            r.stripes_rebuilt
        );
    }
}

async fn gc(mut args: GcArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: GcArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; gc_grace; bools dry_run, json);
    let bucket = store(&args.offsite)?;
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    let opts = SweepOptions {
        agents: args.offsite.addrs(&args.fleet)?,
        grace: config::gc_grace(args.gc_grace.as_deref())?,
        offsite_only: args.offsite.offsite_only,
        dry_run: args.dry_run,
    };
    let report = sa_engine::offsite::sweep(&fleet, &bucket, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_sweep(&report);
    }
    Ok(0)
}

/// After `prune` or `gc` on the agents: the same collection of the bucket when an offsite copy
/// is set (none: `None`). The agents were just reached, so the racing-push guard holds.
pub async fn sweep_after(
    o: &OffsiteArgs,
    fleet: &sa_engine::fleet::Fleet,
    agents: Vec<String>,
    grace: std::time::Duration,
    dry_run: bool,
) -> Result<Option<SweepReport>> {
    let Some(bucket) = o.store()? else {
        return Ok(None);
    };
    let opts = SweepOptions {
        agents,
        grace,
        offsite_only: false,
        dry_run,
    };
    Ok(Some(
        sa_engine::offsite::sweep(fleet, &bucket, &opts).await?,
    ))
}

/// A bucket collection's report for people.
pub fn print_sweep(r: &SweepReport) {
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    println!(
        "offsite {}: {verb} {} shard(s) and {} manifest(s) of forgotten snapshots; kept {} \
         shard(s) of {} snapshot(s), {} younger than the grace period; {} tombstone(s) copied",
        r.url,
        r.shards_deleted,
        r.manifests_deleted,
        r.shards_kept,
        r.kept_snapshots,
        r.shards_young,
        r.tombstones_uploaded
    );
}

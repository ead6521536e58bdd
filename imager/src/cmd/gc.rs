//! `sa-image gc`: delete shards that no kept snapshot references (see [`sa_engine::gc`]).

use std::path::Path;

use anyhow::Result;
use sa_engine::fleet::Access;
use sa_engine::gc::{collect, GcOptions};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs};
use crate::merge;
use crate::text::print_gc;

/// Flags of `gc`.
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
    pub offsite: crate::config::OffsiteArgs,
    /// Never delete a shard younger than this, e.g. 0s, 30m, 1.5h, 2d [default: 1h].
    #[arg(long, value_name = "DURATION")]
    pub gc_grace: Option<String>,
    /// Report what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `sa-image gc`.
pub async fn run(mut args: GcArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: GcArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; gc_grace; bools dry_run, json);
    let opts = GcOptions {
        grace: config::gc_grace(args.gc_grace.as_deref())?,
        dry_run: args.dry_run,
    };
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    let reach = fleet.reach(&args.fleet.addrs()?, Access::Write).await;
    let report = collect(&fleet, &reach, opts).await?;
    let bucket = crate::cmd::offsite::sweep_after(
        &args.offsite,
        &fleet,
        args.fleet.addrs()?,
        opts.grace,
        args.dry_run,
    )
    .await?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(b) = &bucket {
            v["offsite"] = serde_json::to_value(b)?;
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_gc(&report, args.dry_run);
        if let Some(b) = &bucket {
            crate::cmd::offsite::print_sweep(b);
        }
    }
    Ok(0)
}

//! `sa-image forget SNAPSHOT`: remove one snapshot from the catalog (a tombstone on every agent,
//! then its manifest deleted), then collect the shards only it used (see [`crate::gc`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use sa_core::catalog::resolve;
use serde::{Deserialize, Serialize};

use crate::agents::connect_many;
use crate::config::{self, require_agents, KeyArgs};
use crate::gc::{self, collect, parse_duration, GcOptions, GcReport, DEFAULT_GRACE};
use crate::merge;

/// Flags of `forget`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ForgetArgs {
    /// Snapshot id (or unique prefix), or `latest`.
    #[serde(skip)]
    pub snapshot: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Every agent, HOST:PORT, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// With `latest`: the newest snapshot of this volume.
    #[arg(long)]
    pub volume: Option<String>,
    /// Never delete a shard younger than this (0s, 30m, 1h, 2d); default 1h.
    #[arg(long)]
    pub gc_grace: Option<String>,
    /// Show what would be forgotten, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `forget --json` prints.
#[derive(Serialize, Debug)]
pub struct ForgetReport {
    /// The snapshot forgotten.
    pub snapshot: String,
    /// Its volume.
    pub volume: String,
    /// Nothing changed.
    pub dry_run: bool,
    /// Agents that could not be updated.
    pub warnings: Vec<String>,
    /// The collection that followed.
    pub gc: Option<GcReport>,
}

/// `sa-image forget`.
pub async fn run(mut args: ForgetArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: ForgetArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; agents, volume, gc_grace; bools dry_run, json);
    let keys = Arc::new(args.keyfile.load()?.derive());
    let grace = parse_duration(args.gc_grace.as_deref().unwrap_or(DEFAULT_GRACE))?;
    let attempts = connect_many(&require_agents(&args.agents)?, &keys).await;
    let clients = crate::agents::live_or_none(&attempts)?;
    let cat = gc::read_catalog(&clients, &keys).await?;
    let m = resolve(&cat.live, &args.snapshot, args.volume.as_deref())?;
    let mut report = ForgetReport {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        dry_run: args.dry_run,
        warnings: Vec::new(),
        gc: None,
    };
    if !args.dry_run {
        report.warnings = gc::forget(&clients, &keys, std::slice::from_ref(&m.snapshot)).await?;
    }
    report.gc = Some(
        collect(
            &attempts,
            &keys,
            GcOptions {
                grace,
                dry_run: args.dry_run,
            },
        )
        .await?,
    );
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
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
        if let Some(g) = &report.gc {
            gc::print_report(g, args.dry_run);
        }
    }
    Ok(0)
}

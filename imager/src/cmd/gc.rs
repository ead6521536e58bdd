//! `sa-image gc`: delete shards that no kept snapshot references (see [`crate::gc`]).

use std::path::Path;
use std::sync::Arc;

use anyhow::Result;
use serde::Deserialize;

use crate::agents::connect_many;
use crate::config::{self, require_agents, KeyArgs};
use crate::gc::{collect, parse_duration, print_report, GcOptions, DEFAULT_GRACE};
use crate::merge;

/// Flags of `gc`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GcArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Every agent, HOST:PORT, comma-separated: only reachable ones are collected.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Never delete a shard younger than this (0s, 30m, 1h, 2d); default 1h.
    #[arg(long)]
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
    merge!(args, file; agents, gc_grace; bools dry_run, json);
    let keys = Arc::new(args.keyfile.load()?.derive());
    let grace = parse_duration(args.gc_grace.as_deref().unwrap_or(DEFAULT_GRACE))?;
    let attempts = connect_many(&require_agents(&args.agents)?, &keys).await;
    let report = collect(
        &attempts,
        &keys,
        GcOptions {
            grace,
            dry_run: args.dry_run,
        },
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report, args.dry_run);
    }
    Ok(0)
}

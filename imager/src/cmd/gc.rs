//! `sa-image gc`: delete shards that no kept snapshot references (see [`crate::gc`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use serde::Deserialize;

use crate::agents::connect_many;
use crate::config::{self, require_agents};
use crate::gc::{collect, parse_duration, print_report, GcOptions, DEFAULT_GRACE};
use crate::merge;

/// Flags of `gc`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct GcArgs {
    /// The key file.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// File whose first line is the passphrase of a wrapped key file (without it, a wrapped
    /// key's passphrase is asked for on a terminal).
    #[arg(long)]
    pub passphrase_file: Option<PathBuf>,
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
    merge!(args, file; key, passphrase_file, agents, gc_grace; bools dry_run, json);
    let keys = Arc::new(config::load_key(&args.key, &args.passphrase_file)?.derive());
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

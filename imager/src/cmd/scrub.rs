//! `sa-image scrub`: every agent checks all its shard files now (see [`sa_engine::scrub`]).

use std::path::Path;

use anyhow::Result;
use sa_core::size::format_size;
use sa_engine::scrub::{scrub, ScrubOptions, ScrubReport};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs};
use crate::merge;

/// Flags of `scrub`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ScrubArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only start the passes (or, with --report-only, not even that) and report at once.
    #[arg(long)]
    pub no_wait: bool,
    /// Start no pass: report what the agents' scrubs found so far.
    #[arg(long)]
    pub report_only: bool,
}

/// `sa-image scrub`.
pub async fn run(mut args: ScrubArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: ScrubArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    merge!(args, file; ; bools json, no_wait, report_only);
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    let opts = ScrubOptions {
        agents: args.fleet.addrs()?,
        start: !args.report_only,
        wait: !args.no_wait && !args.report_only,
    };
    let report = scrub(&fleet, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(report.exit_code())
}

fn print_text(r: &ScrubReport) {
    for a in &r.agents {
        println!(
            "{:<24} {:<8} checked {} shards ({}), {} in quarantine",
            a.addr,
            a.status,
            a.checked,
            format_size(a.bytes),
            a.bad_total
        );
        for b in a.bad.iter().take(20) {
            println!(
                "    stripe {}… shard {}: {}{}",
                &b.stripe[..12],
                b.index,
                b.reason,
                if b.restored { " (restored since)" } else { "" }
            );
        }
    }
    if r.bad_unrestored > 0 {
        println!(
            "{} bad shard(s) quarantined and not yet rebuilt: run `sa-image repair`",
            r.bad_unrestored
        );
    } else {
        println!("no bad shard waiting for repair");
    }
}

//! `sa-image repair`: rebuild absent and crowded shards (see [`sa_engine::repair`]); `--watch`
//! keeps doing it ([`sa_engine::repair::watch`]).

use std::path::{Path, PathBuf};

use anyhow::Result;
use sa_engine::repair::watch::{watch, WatchOptions, DEFAULT_INTERVAL, DEFAULT_REPAIR_AFTER};
use sa_engine::repair::{repair_pass, PassOptions};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs, WakeArgs};
use crate::exit::usage;
use crate::merge;
use crate::text::print_repair;

/// Flags of `repair`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RepairArgs {
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
    /// Print one JSON object instead of text (with --watch: one JSON line per pass).
    #[arg(long)]
    pub json: bool,
    /// Report what would be rebuilt and where, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Keep running: look every --interval, rebuild bad or quarantined shards at once, and
    /// rebuild around a missing agent once it has been missing for --repair-after. Stops on
    /// SIGINT or SIGTERM.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: how long an agent may be missing (off, on holiday) before its shards are
    /// rebuilt elsewhere, e.g. 90s, 30m, 24h, 7d [default: 24h].
    #[arg(long, requires = "watch", value_name = "DURATION")]
    pub repair_after: Option<String>,
    /// With --watch: how often to look, e.g. 30s, 5m [default: 5m].
    #[arg(long, requires = "watch", value_name = "DURATION")]
    pub interval: Option<String>,
    /// With --watch: the file that remembers since when each agent has been missing, so a
    /// restarted watcher keeps the clock [default: `repair-watch` in the cache directory].
    #[arg(long, requires = "watch")]
    pub state: Option<PathBuf>,
}

/// `sa-image repair`.
pub async fn run(mut args: RepairArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: RepairArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.wake.merge(&mut file.wake);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; repair_after, interval, state;
        bools json, dry_run, watch);
    if args.offsite.offsite_only {
        return Err(usage(
            "repair rebuilds shards onto agents: it takes what they lack from --offsite, but \
             cannot run with --offsite-only",
        ));
    }
    let fleet = args
        .offsite
        .apply(args.fleet.fleet(args.keyfile.load()?.derive())?)?;
    // A watcher runs day and night: it does not wake sleeping PCs (one pass does).
    let fleet = if args.watch {
        fleet
    } else {
        args.wake.apply(fleet)?
    };
    let pass = PassOptions {
        dry_run: args.dry_run,
        cache_dir: args.fleet.cache_dir.clone(),
        agents: args.fleet.addrs()?,
    };
    if args.watch {
        let opts = WatchOptions {
            pass,
            repair_after: match &args.repair_after {
                Some(t) => config::duration(t, "--repair-after")?,
                None => DEFAULT_REPAIR_AFTER,
            },
            interval: match &args.interval {
                Some(t) => config::duration(t, "--interval")?,
                None => DEFAULT_INTERVAL,
            },
            state: args.state.clone(),
        };
        if opts.interval.is_zero() {
            return Err(usage("--interval must be more than 0"));
        }
        let json = args.json;
        let mut on_pass = |line: &sa_engine::repair::watch::PassLine| {
            if json {
                if let Ok(s) = serde_json::to_string(line) {
                    println!("{s}");
                }
            }
        };
        let shutdown = crate::signal::on_stop_signals();
        watch(&fleet, &opts, &shutdown, &mut on_pass).await?;
        return Ok(0);
    }
    let report = repair_pass(&fleet, &pass, &mut |_| Default::default()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_repair(&report);
    }
    Ok(report.exit_code())
}

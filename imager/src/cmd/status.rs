//! `sa-image status`: agents and each snapshot's margin (see [`sa_engine::status`]).

use std::path::Path;

use anyhow::Result;
use sa_core::duration::format_age;
use sa_core::size::format_size;
use sa_engine::limits::{check, Breach, Kind, Limits, VolumeLimits};
use sa_engine::status::{status, StatusOptions, StatusReport};
use sa_engine::time::rfc3339;
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs};
use crate::merge;

/// Flags of `status`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct StatusArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Exit 4 when the newest snapshot of some volume is older than this, e.g. 26h (for cron).
    #[arg(long, value_name = "DURATION")]
    pub max_age: Option<String>,
    /// Exit 4 when some agent has not answered for longer than this, e.g. 7d (an agent this
    /// machine never saw answer counts as absent).
    #[arg(long, value_name = "DURATION")]
    pub max_absence: Option<String>,
    /// How safe the backup is instead: the chance a restore finds k agents per stripe (with and
    /// without waking) and of losing a snapshot within a year (see docs/durability.md).
    #[arg(long)]
    pub durability: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub model: crate::cmd::plan::ModelArgs,
}

/// `sa-image status`.
pub async fn run(mut args: StatusArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: StatusArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    merge!(args, file; max_age, max_absence; bools json, durability);
    if args.durability {
        args.model.merge(&mut file.model);
        return crate::cmd::plan::durability(&args.keyfile, &args.fleet, &args.model, args.json)
            .await;
    }
    let limits = Limits {
        default: VolumeLimits {
            max_age: args
                .max_age
                .as_deref()
                .map(|t| config::duration(t, "--max-age"))
                .transpose()?,
            // Margins already set exits 2 and 3.
            min_margin: Some(i64::MIN),
        },
        max_absence: args
            .max_absence
            .as_deref()
            .map(|t| config::duration(t, "--max-absence"))
            .transpose()?,
        ..Default::default()
    };
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    let opts = StatusOptions {
        agents: args.fleet.addrs()?,
        cache_dir: args.fleet.cache_dir.clone(),
    };
    let report = status(&fleet, &opts).await?;
    // Data lost (a negative margin) is exit 3 already; only age and absence are judged here.
    let exceeded: Vec<Breach> = check(&report, &limits)
        .into_iter()
        .filter(|b| b.kind != Kind::DataLost)
        .collect();
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["limits_exceeded"] = serde_json::to_value(&exceeded)?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_text(&report);
        for b in &exceeded {
            println!("LIMIT EXCEEDED: {}", b.message);
        }
    }
    Ok(match report.exit {
        crate::exit::DATA_LOST => crate::exit::DATA_LOST,
        _ if !exceeded.is_empty() => crate::exit::STALE,
        code => code,
    })
}

fn print_text(r: &StatusReport) {
    println!(
        "{:<24} {:<10} {:>9} {:>10} {:>10} {:>8}  last seen",
        "agent", "id", "reachable", "used", "quota", "shards"
    );
    for a in &r.agents {
        let opt =
            |v: Option<u64>, f: &dyn Fn(u64) -> String| v.map(f).unwrap_or_else(|| "-".into());
        println!(
            "{:<24} {:<10} {:>9} {:>10} {:>10} {:>8}  {}",
            a.addr,
            a.id.get(..8).unwrap_or(""),
            if a.reachable { "yes" } else { "NO" },
            opt(a.used, &format_size),
            opt(a.quota, &|q| if q == 0 {
                "none".into()
            } else {
                format_size(q)
            }),
            opt(a.shards, &|s| s.to_string()),
            match a.last_seen {
                Some(_) if a.reachable => "now".to_string(),
                Some(t) => format!("{} ({})", format_age(r.now.saturating_sub(t)), rfc3339(t)),
                None => "never (by this machine)".into(),
            }
        );
        if let Some(e) = &a.error {
            println!("    {e}");
        }
    }
    for f in &r.listing_failed {
        println!("warning: shard listing failed on {f}; its shards count as absent");
    }
    println!();
    for s in &r.snapshots {
        let h = &s.health;
        let state = match s.state.as_str() {
            "ok" => "full redundancy".to_string(),
            "degraded" => format!(
                "DEGRADED: {} of {} stripes miss shards ({} shards absent){}; survives {} more agent loss(es); run `sa-image repair`",
                h.degraded_stripes,
                h.data_stripes,
                h.absent_shards,
                if h.crowded_stripes > 0 {
                    format!(
                        ", {} stripes hold two or more shards on one agent (stored with --allow-degraded)",
                        h.crowded_stripes
                    )
                } else {
                    String::new()
                },
                h.margin
            ),
            _ => format!(
                "LOST: {} stripes have fewer than k={} shards; bring back the agents that are down",
                h.lost_stripes, s.k
            ),
        };
        println!(
            "snapshot {} of '{}' ({}, {}, k={} m={}): margin {} of {}: {state}",
            s.snapshot,
            s.volume,
            s.created,
            format_age(r.now.saturating_sub(s.created_unix)),
            s.k,
            s.m,
            h.margin,
            s.m,
        );
        if let Some(d) = &s.last_drill {
            println!("  last drill: {}", crate::cmd::list::drill_text(Some(d)));
        }
    }
}

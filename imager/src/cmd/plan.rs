//! `sa-image plan --target 1e-6` and `sa-image status --durability`: the durability model over
//! the fleet as measured (see [`sa_engine::durability::measured`] and docs/durability.md).

use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use sa_core::size::format_size;
use sa_engine::durability::measured::{self, DurabilityReport, Measured, ModelOptions, PlanReport};
use sa_engine::durability::{Candidate, Report, DEFAULT_LOSS_RATE};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs};
use crate::exit::usage;
use crate::merge;

/// The model's settings: flags (and config keys) of `plan` and `status --durability`.
#[derive(clap::Args, Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct ModelArgs {
    /// PCs lost for good (stolen, dead, wiped) per PC per year, e.g. 10% or 0.1 [default: 10%].
    #[arg(long, value_name = "RATE")]
    pub loss_rate: Option<String>,
    /// How long an agent may be missing before its shards are rebuilt elsewhere (the repair
    /// watcher's setting) [default: 24h].
    #[arg(long, value_name = "DURATION")]
    pub repair_after: Option<String>,
    /// Rebuilt bytes per second of a repair, e.g. 40MB/s [default: 10MB/s, assumed].
    #[arg(long, value_name = "RATE")]
    pub repair_throughput: Option<String>,
}

impl ModelArgs {
    /// Fills the settings not given as flags from the config file's.
    pub fn merge(&mut self, file: &mut ModelArgs) {
        merge!(self, file; loss_rate, repair_after, repair_throughput);
    }

    fn options(&self, agents: Vec<String>) -> Result<ModelOptions> {
        let loss_rate = match &self.loss_rate {
            Some(t) => fraction(t, "--loss-rate")?,
            None => DEFAULT_LOSS_RATE,
        };
        let repair_after = match &self.repair_after {
            Some(t) => config::duration(t, "--repair-after")?,
            None => sa_engine::repair::watch::DEFAULT_REPAIR_AFTER,
        };
        let repair_throughput = match &self.repair_throughput {
            Some(t) => Some(
                config::rate(t, "--repair-throughput")?
                    .ok_or_else(|| usage("--repair-throughput must be more than 0"))?
                    as f64,
            ),
            None => None,
        };
        Ok(ModelOptions {
            agents,
            loss_rate,
            repair_after,
            repair_throughput,
        })
    }
}

/// `10%` or `0.1`.
fn fraction(text: &str, flag: &str) -> Result<f64> {
    let t = text.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|v| v / 100.0),
        None => t.parse::<f64>(),
    }
    .map_err(|_| {
        usage(format!(
            "{flag}: '{text}' is not a rate: write e.g. 10% or 0.1"
        ))
    })?;
    if !(0.0..=1.0).contains(&v) {
        return Err(usage(format!(
            "{flag}: '{text}' must be between 0% and 100% per year"
        )));
    }
    Ok(v)
}

/// Flags of `plan`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct PlanArgs {
    /// The chance of losing a snapshot within a year to stay under, e.g. 1e-6.
    #[arg(long)]
    pub target: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `sa-image plan`.
pub async fn run(mut args: PlanArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: PlanArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.model.merge(&mut file.model);
    merge!(args, file; target; bools json);
    let text = args
        .target
        .clone()
        .ok_or_else(|| usage("give --target P: the chance of losing a snapshot within a year to stay under, e.g. 1e-6"))?;
    let target: f64 = text
        .trim()
        .parse()
        .ok()
        .filter(|t: &f64| *t > 0.0 && *t < 1.0)
        .ok_or_else(|| {
            usage(format!(
                "--target: '{text}' is not a probability between 0 and 1 (exclusive), e.g. 1e-6"
            ))
        })?;
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    let opts = args.model.options(args.fleet.addrs()?)?;
    let r = measured::recommend(&fleet, &opts, target).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_plan(&r, target);
    }
    Ok(0)
}

/// `sa-image status --durability`.
pub async fn durability(
    keyfile: &KeyArgs,
    fleet_args: &FleetArgs,
    model: &ModelArgs,
    json: bool,
) -> Result<u8> {
    let fleet = fleet_args.fleet(keyfile.load()?.derive())?;
    let opts = model.options(fleet_args.addrs()?)?;
    let r = measured::durability(&fleet, &opts).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print_durability(&r);
    }
    Ok(0)
}

fn hours(d: Duration) -> String {
    let h = d.as_secs_f64() / 3600.0;
    if h >= 48.0 {
        format!("{:.1} days", h / 24.0)
    } else {
        format!("{h:.1} h")
    }
}

fn print_inputs(m: &Measured) {
    println!("agents ({}):", m.agents.len());
    for a in &m.agents {
        println!(
            "  {:<22} {}  up {:>5.1}% ({})  {}  holds {}",
            a.addr,
            &a.id[..8],
            a.availability * 100.0,
            if a.availability_measured {
                format!("measured over {} h", a.observed_hours)
            } else {
                "assumed".into()
            },
            match a.wake {
                Some(w) => format!(
                    "wakes {:.0}% ({})",
                    w * 100.0,
                    if a.wake_measured {
                        "measured"
                    } else {
                        "assumed"
                    }
                ),
                None => "cannot be woken (MAC unknown)".into(),
            },
            format_size(a.bytes)
        );
    }
}

fn print_report(r: &Report) {
    let s = &r.scheme;
    println!(
        "k={} m={} repair-after {}: a restore at a random time finds k agents per stripe:",
        s.k,
        s.m,
        hours(s.repair_after)
    );
    println!(
        "  without waking:  whole snapshot {:.6}, one stripe {:.6} (worst placement {:.6})",
        r.awake.snapshot, r.awake.stripe_mean, r.awake.stripe_worst
    );
    println!(
        "  waking sleepers: whole snapshot {:.6}, one stripe {:.6} ({} agent(s) can be woken)",
        r.woken.snapshot, r.woken.stripe_mean, r.wakeable
    );
    println!(
        "  chance of losing a snapshot within a year: {:.3e} (mean time to data loss {:.3e} years; \
         longest repair window {})",
        r.loss.per_year,
        r.loss.mttdl_years,
        hours(r.loss.longest_window)
    );
    if !r.loss.windows_short {
        println!("  note: repair windows are long against a PC's life: the loss figure is rough");
    }
}

fn print_assumptions(a: &[String]) {
    println!("assumptions:");
    for line in a {
        println!("  - {line}");
    }
    println!(
        "  - not modelled: fire, theft of the whole office, ransomware reaching every PC: keep \
         an offsite copy"
    );
}

fn print_durability(r: &DurabilityReport) {
    print_inputs(&r.measured);
    print_report(&r.report);
    print_assumptions(&r.measured.assumptions);
}

fn candidate(c: &Candidate) -> String {
    let s = &c.report.scheme;
    format!(
        "k={} m={} repair-after {}: loss {:.3e}/year, whole-snapshot availability {:.6}{}, \
         storage efficiency {:.0}%",
        s.k,
        s.m,
        hours(s.repair_after),
        c.report.loss.per_year,
        c.availability,
        if c.meets_availability {
            ""
        } else {
            " (under 99%)"
        },
        c.efficiency * 100.0
    )
}

fn print_plan(r: &PlanReport, target: f64) {
    print_inputs(&r.measured);
    println!("target: lose a snapshot within a year with probability at most {target:.1e}");
    println!("recommended: {}", candidate(&r.plan.best));
    for c in &r.plan.alternatives {
        println!("  or: {}", candidate(c));
    }
    println!("now:");
    print_report(&r.current);
    print_assumptions(&r.measured.assumptions);
}

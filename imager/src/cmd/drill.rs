//! `sa-image drill`: a recovery drill. The snapshot is served with agents withheld (by default
//! `m` of them, rotating from drill to drill), through a throwaway overlay, and booted in QEMU;
//! the drill passes when the criteria are met before the deadline (a console line, a guest TCP
//! port, a screen with content). The result and the screenshot are stored on the agents next to
//! the snapshot; `list` and `status` show each snapshot's last drill. See [`sa_engine::drill`].
//!
//! Exit 0 when the drill passed, 1 when it failed (the report says why) or could not run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use sa_engine::drill::criteria::Criteria;
use sa_engine::drill::qemu::Machine;
use sa_engine::drill::{drill, DrillOptions, DrillReport};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs};
use crate::exit::usage;
use crate::merge;

/// A drill's deadline unless told otherwise.
pub const DEFAULT_DEADLINE: &str = "5m";

/// Flags of `drill`.
#[derive(clap::Args, Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub struct DrillArgs {
    /// Snapshot id (or unique prefix), or `latest` [default: latest].
    #[serde(skip)]
    pub snapshot: Option<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    /// The volume whose snapshot `latest` names.
    #[arg(long)]
    pub volume: Option<String>,
    /// How many agents to withhold [default: the snapshot's parity shards, m]; they are chosen
    /// so that every agent is withheld over successive drills.
    #[arg(long, value_name = "N")]
    pub withhold: Option<usize>,
    /// Pass when a console (serial) line matches this regular expression.
    #[arg(long, value_name = "REGEX")]
    pub console: Option<String>,
    /// Pass when this guest TCP port answers (forwarded by QEMU's restricted user network).
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,
    /// Pass when, this long after the start, the screen shows something (e.g. 60s).
    #[arg(long, value_name = "DURATION")]
    pub screenshot_after: Option<String>,
    /// Fail unless every criterion is met within this [default: 5m].
    #[arg(long, value_name = "DURATION")]
    pub deadline: Option<String>,
    /// Guest memory, e.g. 2GiB [default: 1GiB].
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Guest CPUs [default: 1].
    #[arg(long)]
    pub cpus: Option<u32>,
    /// bios or uefi (OVMF) [default: bios].
    #[arg(long)]
    pub firmware: Option<String>,
    /// virtio, ide, sata or scsi [default: virtio].
    #[arg(long)]
    pub disk_bus: Option<String>,
    /// auto (KVM when /dev/kvm works, else TCG), kvm or tcg [default: auto].
    #[arg(long)]
    pub accel: Option<String>,
    /// The qemu binary [default: qemu-system-x86_64].
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Where the overlay, lock and screenshots live during the drill [default: CACHE_DIR/drill].
    #[arg(long, value_name = "DIR")]
    pub work_dir: Option<PathBuf>,
    /// Also write the screenshot (PNG) to this file.
    #[arg(long, value_name = "FILE")]
    pub screenshot: Option<PathBuf>,
    /// Memory for decoded stripes, e.g. 256MiB [default: 256MiB].
    #[arg(long)]
    pub cache: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The machine, criteria and withholding of `args` (flags merged with the file already);
/// `default_work_dir` when `--work-dir` is not given.
pub fn options(
    args: &DrillArgs,
    default_work_dir: impl FnOnce() -> Option<PathBuf>,
) -> Result<DrillOptions> {
    let mut machine = Machine::default();
    if let Some(m) = &args.memory {
        machine.memory_mib = (config::size(m, "--memory")? >> 20).max(16) as u32;
    }
    if let Some(c) = args.cpus {
        if c == 0 {
            return Err(usage("--cpus must be at least 1"));
        }
        machine.cpus = c;
    }
    let parse = |e: sa_engine::Error| usage(e.to_string());
    if let Some(f) = &args.firmware {
        machine.firmware = f.parse().map_err(parse)?;
    }
    if let Some(b) = &args.disk_bus {
        machine.disk_bus = b.parse().map_err(parse)?;
    }
    if let Some(a) = &args.accel {
        machine.accel = a.parse().map_err(parse)?;
    }
    if let Some(q) = &args.qemu {
        machine.qemu = q.clone();
    }
    let console = match &args.console {
        Some(re) => Some(
            regex::Regex::new(re)
                .map_err(|e| usage(format!("--console {re:?} is not a regular expression: {e}")))?,
        ),
        None => None,
    };
    let deadline = args.deadline.as_deref().unwrap_or(DEFAULT_DEADLINE);
    let criteria = Criteria {
        console,
        port: args.port,
        screenshot_after: args
            .screenshot_after
            .as_deref()
            .map(|s| config::duration(s, "--screenshot-after"))
            .transpose()?,
        deadline: config::duration(deadline, "--deadline")?.max(Duration::from_secs(1)),
    };
    criteria.check().map_err(parse)?;
    let work_dir = match &args.work_dir {
        Some(d) => d.clone(),
        None => default_work_dir()
            .ok_or_else(|| usage("no cache directory (no HOME): give --work-dir DIR"))?,
    };
    Ok(DrillOptions {
        snapshot: args.snapshot.clone().unwrap_or_else(|| "latest".into()),
        volume: args.volume.clone(),
        agents: args.fleet.addrs()?,
        withhold: args.withhold,
        machine,
        criteria,
        work_dir,
        cache: match &args.cache {
            Some(c) => config::size(c, "--cache")?,
            None => sa_engine::serve::run::DEFAULT_CACHE,
        },
    })
}

/// `sa-image drill`.
pub async fn run(mut args: DrillArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: DrillArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    merge!(args, file; volume, withhold, console, port, screenshot_after, deadline, memory, cpus,
        firmware, disk_bus, accel, qemu, work_dir, screenshot, cache; bools json);
    let keys = args.keyfile.load()?.derive();
    let opts = options(&args, || {
        sa_engine::cache_dir::owner_dir(args.fleet.cache_dir.as_deref(), &keys)
            .map(|d| d.join("drill"))
    })?;
    let fleet = args.fleet.fleet(keys)?;
    let shutdown = crate::signal::on_stop_signals();
    let report = drill(&fleet, &opts, &shutdown).await?;
    if let (Some(path), false) = (&args.screenshot, report.screenshot.is_empty()) {
        std::fs::write(path, &report.screenshot)
            .with_context(|| format!("cannot write the screenshot to {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(if report.passed {
        crate::exit::OK
    } else {
        crate::exit::ERROR
    })
}

fn print(r: &DrillReport) {
    println!(
        "drill of snapshot {} ({}): {}",
        r.snapshot,
        r.volume,
        if r.passed { "PASSED" } else { "FAILED" }
    );
    println!("  why:       {}", r.reason);
    println!("  criteria:  {}", r.criteria);
    match r.boot_seconds {
        Some(b) => println!(
            "  booted in: {b:.1} s ({}), drill {:.1} s",
            r.accel, r.seconds
        ),
        None => println!("  drill:     {:.1} s ({})", r.seconds, r.accel),
    }
    println!(
        "  withheld:  {}",
        if r.withheld.is_empty() {
            "none".to_string()
        } else {
            r.withheld.join(", ")
        }
    );
    if !r.agents_down.is_empty() {
        println!("  also down: {}", r.agents_down.join(", "));
    }
    println!(
        "  stripes rebuilt from parity: {}, lost: {}",
        r.stripes_rebuilt, r.stripes_lost
    );
    println!(
        "  screenshot: {} bytes; record stored on {} agent(s)",
        r.screenshot_bytes, r.record_stored_on
    );
    if !r.reaped.is_empty() {
        println!(
            "  cleaned up after an earlier drill: {}",
            r.reaped.join(", ")
        );
    }
}

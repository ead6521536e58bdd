//! `sa-image snapshot SOURCE`: flags to [`sa_engine::snapshot::SnapshotOptions`], the engine's
//! report to text or JSON.

use std::path::{Path, PathBuf};

use anyhow::Result;
use sa_core::size::format_size;
use sa_engine::consistency::guard::GuardCommand;
use sa_engine::consistency::ConsistencyOptions;
use sa_engine::snapshot::{snapshot, SnapshotOptions, SnapshotReport};
use sa_engine::source::is_nbd_uri;
use sa_engine::source::nbd::NbdUri;
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs, WakeArgs};
use crate::exit::usage;
use crate::merge;
use crate::progress::Bar;

/// Flags of `snapshot`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SnapshotArgs {
    /// Block device, image file or NBD export to snapshot: /dev/sda, disk.img,
    /// nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH (a VM disk's point-in-time
    /// export).
    #[serde(skip)]
    pub source: PathBuf,
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
    /// Data shards per stripe (k) [default: 4].
    #[arg(long)]
    pub data_shards: Option<u8>,
    /// Parity shards per stripe (m): how many agents may be lost [default: 2].
    #[arg(long)]
    pub parity_shards: Option<u8>,
    /// Stripe size, e.g. 4MiB [default: 4MiB].
    #[arg(long)]
    pub stripe_size: Option<String>,
    /// How stripes are sealed: 2 = in 4 KiB chunks, each with its own tag, so a small read
    /// fetches and decrypts only the chunks it needs; 1 = one tag per stripe (every snapshot
    /// before format 2; readers older than format 2 read only these) [default: 2].
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub seal_format: Option<u8>,
    /// Volume name [default: the source's file name].
    #[arg(long)]
    pub volume: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// With --changed-map: the snapshot (id, prefix or `latest`) the map's changes are relative to.
    #[arg(long, requires = "changed_map")]
    pub changed_since: Option<String>,
    /// File of changed byte ranges since --changed-since, one `OFFSET LENGTH` per line (decimal
    /// or 0x hex, `#` comments); stripes no range touches are not read.
    #[arg(long, requires = "changed_since")]
    pub changed_map: Option<PathBuf>,
    /// With fewer than k + m agents reachable (but at least k), store anyway: all k + m shards of
    /// every stripe, some agents holding two (or more) of one stripe, so the snapshot survives
    /// fewer agent losses than m until `sa-image repair` spreads them (status exits 2 meanwhile).
    #[arg(long)]
    pub allow_degraded: bool,
    /// NBD sources: the export's dirty bitmap (qemu:dirty-bitmap:NAME) that marks what changed
    /// since the previous snapshot of the volume; only stripes it marks are read. Used only if
    /// that snapshot was taken with --new-bitmap NAME; otherwise everything is read, with a
    /// warning saying why.
    #[arg(long, value_name = "NAME")]
    pub dirty_bitmap: Option<String>,
    /// NBD sources: the dirty bitmap that started recording writes at this export's point in
    /// time (created with it), recorded in the snapshot for the next --dirty-bitmap. Give each
    /// point its own name.
    #[arg(long, value_name = "NAME")]
    pub new_bitmap: Option<String>,
    /// Freeze the filesystem mounted at MOUNTPOINT (fsfreeze) while the disk is read, and thaw
    /// it as soon as the read ends (also if sa-image is killed); repeat it for every filesystem
    /// of the source that is mounted read-write. Writers wait meanwhile: for short reads.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Option<Vec<PathBuf>>,
    /// Longest a --freeze may last; past it the filesystem is thawed and the snapshot fails
    /// [default: 10m].
    #[arg(long, value_name = "DURATION")]
    pub freeze_timeout: Option<String>,
    /// The source is an LVM logical volume: create a temporary snapshot LV of it, read that,
    /// and remove it (also on failure).
    #[arg(long)]
    pub lvm_snapshot: bool,
    /// Room of the snapshot LV of a thick LV, as lvcreate takes it (2G, 20%ORIGIN)
    /// [default: 10%ORIGIN].
    #[arg(long, value_name = "SIZE")]
    pub lvm_snapshot_size: Option<String>,
    /// Shell command run before the point in time is taken (flush and lock an application);
    /// a failure fails the snapshot.
    #[arg(long, value_name = "CMD")]
    pub pre_hook: Option<String>,
    /// Shell command run once the point in time is over (after the thaw; for LVM right after
    /// the snapshot LV exists), also when the read failed ($SA_IMAGE_RESULT is ok or failed); a
    /// failure fails the snapshot.
    #[arg(long, value_name = "CMD")]
    pub post_hook: Option<String>,
    /// Longest a hook may run before it is killed and the snapshot fails [default: 60s].
    #[arg(long, value_name = "DURATION")]
    pub hook_timeout: Option<String>,
    /// Read a source that is mounted read-write without --freeze or --lvm-snapshot: the image
    /// may not be consistent (the report says so).
    #[arg(long)]
    pub inconsistent_ok: bool,
}

/// `sa-image snapshot`.
pub async fn run(mut args: SnapshotArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: SnapshotArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.wake.merge(&mut file.wake);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; data_shards, parity_shards, stripe_size, seal_format, volume, changed_since,
        changed_map, dirty_bitmap, new_bitmap, freeze, freeze_timeout, lvm_snapshot_size, pre_hook,
        post_hook, hook_timeout; bools json, allow_degraded, lvm_snapshot, inconsistent_ok);
    if args.changed_since.is_some() != args.changed_map.is_some() {
        return Err(usage("--changed-since and --changed-map go together: the map lists what changed since that snapshot"));
    }
    let stripe_size = match &args.stripe_size {
        Some(s) => u32::try_from(config::size(s, "--stripe-size")?)
            .map_err(|_| usage("--stripe-size: too large"))?,
        None => sa_engine::DEFAULT_STRIPE_SIZE,
    };
    let volume = match args.volume.clone() {
        Some(v) => v,
        None => default_volume(&args.source)?,
    };
    if args.offsite.offsite_only {
        return Err(usage(
            "--offsite-only is for readers (restore, serve, list); a snapshot goes to the agents, \
             then to --offsite",
        ));
    }
    // A wrong bucket setting is found before the disk is read.
    let bucket = args.offsite.store()?;
    let fleet = args
        .wake
        .apply(args.fleet.fleet(args.keyfile.load()?.derive())?)?;
    let mut opts = SnapshotOptions::new(args.source.clone(), &volume, args.fleet.addrs()?);
    opts.k = args.data_shards.unwrap_or(sa_engine::DEFAULT_K);
    opts.m = args.parity_shards.unwrap_or(sa_engine::DEFAULT_M);
    opts.stripe_size = stripe_size;
    opts.seal = args.seal_format.unwrap_or(sa_core::seal::SEAL_CHUNKED);
    opts.allow_degraded = args.allow_degraded;
    opts.cache_dir = args.fleet.cache_dir.clone();
    opts.changed = args.changed_since.clone().zip(args.changed_map.clone());
    opts.dirty_bitmap = args.dirty_bitmap.clone();
    opts.new_bitmap = args.new_bitmap.clone();
    opts.consistency = consistency_options(&args)?;
    let shutdown = crate::signal::on_stop_signals();
    let report = snapshot(&fleet, &opts, &Bar::new(args.json), &shutdown).await?;
    if !args.json {
        print_report(&report);
    }
    let Some(bucket) = bucket else {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        return Ok(0);
    };
    // The snapshot is committed on the agents: now its offsite copy. A failure here loses
    // nothing; the next push finishes it.
    let popts = crate::cmd::offsite::push_options(
        &args.offsite,
        opts.agents.clone(),
        Some(report.volume.clone()),
    )?;
    let pushed =
        sa_engine::offsite::push(&fleet, &bucket, &popts, &Bar::new(args.json), &shutdown).await;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["offsite"] = match &pushed {
            Ok(p) => serde_json::to_value(p)?,
            Err(e) => serde_json::json!({ "error": e.to_string() }),
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else if let Ok(p) = &pushed {
        crate::cmd::offsite::print_push(p);
    }
    match pushed {
        Ok(_) => Ok(0),
        Err(e) => Err(anyhow::anyhow!(
            "snapshot {} is committed on the agents, but its offsite copy failed: {e}",
            report.snapshot
        )),
    }
}

/// The consistency flags as engine options.
fn consistency_options(args: &SnapshotArgs) -> Result<ConsistencyOptions> {
    let mut c = ConsistencyOptions {
        freeze: args.freeze.clone().unwrap_or_default(),
        lvm_snapshot: args.lvm_snapshot,
        lvm_snapshot_size: args.lvm_snapshot_size.clone(),
        pre_hook: args.pre_hook.clone(),
        post_hook: args.post_hook.clone(),
        inconsistent_ok: args.inconsistent_ok,
        ..ConsistencyOptions::default()
    };
    if let Some(t) = &args.freeze_timeout {
        c.freeze_timeout = positive(config::duration(t, "--freeze-timeout")?, "--freeze-timeout")?;
    }
    if let Some(t) = &args.hook_timeout {
        c.hook_timeout = positive(config::duration(t, "--hook-timeout")?, "--hook-timeout")?;
    }
    for (flag, hook) in [("--pre-hook", &c.pre_hook), ("--post-hook", &c.post_hook)] {
        if hook.as_deref().is_some_and(|h| h.trim().is_empty()) {
            return Err(usage(format!("{flag}: the command is empty")));
        }
    }
    if c.lvm_snapshot_size.is_some() && !c.lvm_snapshot {
        return Err(usage("--lvm-snapshot-size goes with --lvm-snapshot"));
    }
    if c.lvm_snapshot || !c.freeze.is_empty() {
        // The guard is this very binary (`sa-image consistency-guard`, hidden).
        let program = std::env::current_exe().map_err(|e| {
            anyhow::anyhow!("cannot find the sa-image binary to run the guard: {e}")
        })?;
        c.guard = Some(GuardCommand {
            program,
            args: vec![crate::GUARD_COMMAND.to_string()],
        });
    }
    Ok(c)
}

fn positive(d: std::time::Duration, flag: &str) -> Result<std::time::Duration> {
    if d.is_zero() {
        return Err(usage(format!("{flag} must be more than 0")));
    }
    Ok(d)
}

/// The volume name when none is given: the file name of a path; an NBD export's name.
fn default_volume(source: &Path) -> Result<String> {
    let text = source.to_string_lossy();
    if is_nbd_uri(&text) {
        let uri = NbdUri::parse(&text).map_err(|e| usage(format!("{text}: {e}")))?;
        if uri.export.is_empty() {
            return Err(usage(format!(
                "{text} names no export: give --volume NAME (the name the snapshots of this disk \
                 go under; incrementals need the same name every time)"
            )));
        }
        return Ok(uri
            .export
            .rsplit('/')
            .next()
            .unwrap_or(&uri.export)
            .to_string());
    }
    Ok(source
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "volume".into()))
}

/// The report for people.
pub fn print_report(r: &SnapshotReport) {
    println!("snapshot {} of volume '{}' stored", r.snapshot, r.volume);
    println!(
        "  {} in {} stripes: {} new, {} already stored, {} kept from an interrupted run, {} zero",
        format_size(r.size),
        r.stripes,
        r.new_stripes,
        r.reused_stripes,
        r.resumed_stripes,
        r.zero_stripes
    );
    let survives = if r.margin == r.parity_shards as i64 {
        format!("any {} may be lost", r.parity_shards)
    } else {
        format!(
            "it survives {} agent loss(es) for now, not {}",
            r.margin, r.parity_shards
        )
    };
    println!(
        "  sent {} to {} agents (k={} m={}: {survives}) in {:.1}s ({}/s read)",
        format_size(r.bytes_sent),
        r.agents,
        r.data_shards,
        r.parity_shards,
        r.seconds,
        format_size((r.size as f64 / r.seconds.max(1e-9)) as u64)
    );
    println!("  point in time: {}", r.consistency);
    let how = match &r.changes_from {
        Some(from) => format!(", {} unchanged by the {from} not read", r.unread_stripes),
        None => String::new(),
    };
    println!(
        "  read {} stripes ({}){how}{}",
        r.stripes_read,
        format_size(r.bytes_read),
        if r.zero_stripes_unread > 0 {
            format!(
                ", {} zero by the export's allocation map not read",
                r.zero_stripes_unread
            )
        } else {
            String::new()
        }
    );
    if let Some(b) = &r.tracking_bitmap {
        println!(
            "  dirty bitmap {b} records the changes from here: give --dirty-bitmap {b} next time"
        );
    }
    for w in &r.warnings {
        println!("  warning: {w}");
    }
    for a in &r.agents_unreachable {
        println!("  warning: agent {a} did not answer; its share went to the others");
    }
    for a in &r.agents_lost {
        println!(
            "  warning: agent {a} failed during the run; its part went to the others and what it \
             took counts as absent (`sa-image repair` restores full redundancy)"
        );
    }
    if r.degraded {
        println!(
            "  warning: stored DEGRADED on {} agents: start more agents and run `sa-image repair` \
             to spread the shards",
            r.agents
        );
    }
}

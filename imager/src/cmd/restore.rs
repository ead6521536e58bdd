//! `sa-image restore`: rebuild a snapshot onto a file or block device, stripes in parallel.
//!
//! One agent's address is enough: the catalog there names the others. Shards that are missing,
//! corrupt or on unreachable agents are rebuilt from parity and reported. If any stripe cannot
//! be rebuilt, the restore fails naming those stripes: a file target is written under
//! `TARGET.sa-partial` and renamed only when complete, so a failed restore never leaves a file
//! that looks whole.

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use sa_core::catalog::resolve;
use sa_core::pool::BufferPool;
use sa_core::size::format_size;
use sa_core::stripe::StripeCodec;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::agents::{clients_for, open_catalog};
use crate::config::{self, require_agents, KeyArgs};
use crate::fetch::{Problem, StripeReader};
use crate::merge;
use crate::progress::bytes_bar;
use crate::source::open_target;

/// Stripes restored at once.
const PARALLEL: usize = 8;

/// Flags of `restore`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RestoreArgs {
    /// Snapshot id (or unique prefix), or `latest`.
    #[serde(skip)]
    pub snapshot: String,
    /// Target: an image file (created if missing) or a block device.
    #[arg(long)]
    pub to: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Agents to ask, HOST:PORT, comma-separated: one is enough.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `restore --json` prints.
#[derive(Serialize, Debug)]
pub struct RestoreReport {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume name.
    pub volume: String,
    /// Target path.
    pub target: String,
    /// Bytes restored.
    pub size: u64,
    /// Stripes.
    pub stripes: u64,
    /// Stripes rebuilt from parity.
    pub reconstructed_stripes: u64,
    /// Shards missing (or on unreachable agents).
    pub missing_shards: u64,
    /// Shards that failed their checks.
    pub corrupt_shards: u64,
    /// Agents that could not be reached.
    pub agents_down: Vec<String>,
    /// Wall time.
    pub seconds: f64,
}

/// `sa-image restore`.
pub async fn run(mut args: RestoreArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: RestoreArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; to, agents; bools json);
    let key = args.keyfile.load()?;
    let to = args
        .to
        .clone()
        .context("give --to TARGET: an image file or a block device")?;
    let report = restore(
        &args.snapshot,
        &to,
        &require_agents(&args.agents)?,
        Arc::new(key.derive()),
        args.json,
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "restored snapshot {} of '{}' to {}",
            report.snapshot, report.volume, report.target
        );
        println!(
            "  {} in {:.1}s ({}/s); {} of {} stripes rebuilt from parity",
            format_size(report.size),
            report.seconds,
            format_size((report.size as f64 / report.seconds.max(1e-9)) as u64),
            report.reconstructed_stripes,
            report.stripes
        );
        if report.missing_shards + report.corrupt_shards > 0 {
            println!(
                "  {} shards missing, {} corrupt: run `sa-image verify {}` and bring the agents back",
                report.missing_shards, report.corrupt_shards, report.snapshot
            );
        }
        for a in &report.agents_down {
            println!("  agent down: {a}");
        }
    }
    Ok(0)
}

fn partial_path(to: &Path) -> PathBuf {
    let mut name = to.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".sa-partial");
    to.with_file_name(name)
}

/// Restores `snapshot` to `to`.
pub async fn restore(
    snapshot: &str,
    to: &Path,
    agents: &[String],
    keys: Arc<sa_core::keys::Keys>,
    quiet: bool,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let (manifests, attempts) = open_catalog(agents, &keys).await?;
    let m = Arc::new(resolve(&manifests, snapshot, None)?.clone());
    let layout = m.layout;
    let slots = clients_for(&m, &attempts, &keys).await;
    for (i, why) in &slots.down {
        tracing::warn!("agent {} is down: {why}", slots.names[*i]);
    }
    let agents_down: Vec<String> = slots
        .down
        .iter()
        .map(|(i, _)| slots.names[*i].clone())
        .collect();
    let target = open_target(to, Some(&partial_path(to)), layout.volume_size)?;
    let (is_device, write_path) = (target.is_device, target.path.clone());
    let target = Arc::new(target.file);

    let codec = Arc::new(StripeCodec::new(keys.clone(), layout, m.volume)?);
    // Written stripes' buffers are reused for the next ones (see sa_core::pool).
    let pool = Arc::new(BufferPool::new(PARALLEL));
    let reader = StripeReader::new(codec, m.clone(), slots.slots.clone()).with_pool(pool.clone());
    let bar = bytes_bar(layout.volume_size, "restore", quiet);
    let mut set = JoinSet::new();
    let mut lost: Vec<crate::fetch::StripeLost> = Vec::new();
    let mut reconstructed = 0u64;
    let mut per_problem: BTreeMap<&'static str, u64> = BTreeMap::new();
    // Agents already reported down above are not reported again per shard.
    let mut reported: std::collections::HashSet<usize> =
        slots.down.iter().map(|(i, _)| *i).collect();
    let mut next = 0u64;
    let count = layout.stripe_count();
    loop {
        while set.len() < PARALLEL && next < count {
            let i = next;
            next += 1;
            let (reader, target, m, pool) =
                (reader.clone(), target.clone(), m.clone(), pool.clone());
            set.spawn(async move {
                let zero = matches!(m.stripes[i as usize], sa_core::manifest::StripeRef::Zero);
                // A fresh file is already zero; a device must be written.
                if zero && !is_device {
                    return Ok((i, vec![], false));
                }
                let sd = reader.read(i).await?;
                let off = m.layout.stripe_offset(i);
                let problems = sd.problems;
                let rec = sd.reconstructed;
                let data = sd.data;
                tokio::task::spawn_blocking(move || {
                    let r = target.write_all_at(&data, off);
                    pool.give(data);
                    r
                })
                .await
                .map_err(|e| crate::fetch::StripeLost {
                    stripe: i,
                    problems: vec![],
                    error: sa_core::Error::Protocol(e.to_string()),
                })?
                .map_err(|e| crate::fetch::StripeLost {
                    stripe: i,
                    problems: vec![],
                    error: sa_core::Error::io("write target", e),
                })?;
                Ok((i, problems, rec))
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        match joined.context("restore task failed")? {
            Ok((i, problems, rec)) => {
                reconstructed += rec as u64;
                for p in &problems {
                    let key = match p.problem {
                        Problem::Corrupt => "corrupt",
                        _ => "missing",
                    };
                    *per_problem.entry(key).or_default() += 1;
                    if p.problem == Problem::Corrupt || reported.insert(p.slot) {
                        tracing::warn!(
                            "stripe {i} shard {}: {} on {}: {}",
                            p.index,
                            key,
                            slots.names[p.slot],
                            p.detail
                        );
                    }
                }
                bar.inc(layout.stripe_len(i) as u64);
            }
            Err(l) => lost.push(l),
        }
    }
    bar.finish_and_clear();
    if !lost.is_empty() {
        lost.sort_by_key(|l| l.stripe);
        let shown: Vec<String> = lost
            .iter()
            .take(10)
            .map(|l| {
                let offset = layout.stripe_offset(l.stripe);
                let lost_on: Vec<String> = l
                    .problems
                    .iter()
                    .map(|p| {
                        format!(
                            "shard {} on {} {:?}",
                            p.index, slots.names[p.slot], p.problem
                        )
                    })
                    .collect();
                format!(
                    "stripe {} (bytes {}..{}): {} [{}]",
                    l.stripe,
                    offset,
                    offset + layout.stripe_len(l.stripe) as u64,
                    l.error,
                    lost_on.join(", ")
                )
            })
            .collect();
        if !is_device {
            let _ = std::fs::remove_file(&write_path);
        }
        bail!(
            "{} of {} stripes cannot be recovered: more than m={} shards of each are lost{}.\n  {}\n\
             Bring back the agents that are down ({}) and run restore again; {}",
            lost.len(),
            count,
            layout.m,
            if lost.len() > 10 { " (first 10 shown)" } else { "" },
            shown.join("\n  "),
            if agents_down.is_empty() { "none".to_string() } else { agents_down.join(", ") },
            if is_device { "the device holds an INCOMPLETE image" } else { "no target file was left behind" }
        );
    }
    target
        .sync_all()
        .context("cannot flush the target to disk")?;
    if !is_device {
        std::fs::rename(&write_path, to)
            .with_context(|| format!("cannot rename into {}", to.display()))?;
    }
    Ok(RestoreReport {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        target: to.display().to_string(),
        size: layout.volume_size,
        stripes: count,
        reconstructed_stripes: reconstructed,
        missing_shards: per_problem.get("missing").copied().unwrap_or(0),
        corrupt_shards: per_problem.get("corrupt").copied().unwrap_or(0),
        agents_down,
        seconds: started.elapsed().as_secs_f64(),
    })
}

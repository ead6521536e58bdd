//! Restore: rebuild a snapshot onto a file or block device, stripes in parallel.
//!
//! One agent's address is enough: the catalog there names the others. Shards that are missing,
//! corrupt or on unreachable agents are rebuilt from parity and reported. If any stripe cannot
//! be rebuilt, the restore fails naming those stripes ([`Error::StripesLost`]): a file target is
//! written under `TARGET.sa-partial` and renamed only when complete, so a failed restore never
//! leaves a file that looks whole. An existing file holding data is replaced only with
//! [`RestoreOptions::force`]; a block device is opened exclusively (see [`crate::volume`]).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use sa_core::layout::Layout;
use sa_core::manifest::StripeRef;
use sa_core::pool::BufferPool;
use sa_core::stripe::StripeCodec;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::catalog::{self, clients_for, SlotClients};
use crate::direct::TargetWriter;
use crate::error::{Error, IoContext, LostStripe, Result, StripesLost};
use crate::fleet::keepalive::KeepAlive;
use crate::fleet::sleepers::{Need, WakeOutcome};
use crate::fleet::{Access, Fleet};
use crate::progress::Progress;
use crate::read::{Problem, ShardProblem, StripeLost, StripeReader};
use crate::shutdown::Shutdown;
use crate::volume::{open_target, TargetOptions};

/// Stripes restored at once.
const PARALLEL: usize = 8;

/// What to restore where.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Snapshot id, unique prefix, or `latest`.
    pub snapshot: String,
    /// With `latest`: of this volume.
    pub volume: Option<String>,
    /// The target: an image file (created if missing) or a block device.
    pub target: PathBuf,
    /// Replace an existing file target that holds data.
    pub force: bool,
    /// Agent addresses (one is enough).
    pub agents: Vec<String>,
}

/// What a restore did (`restore --json`).
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
    /// Shards taken from the offsite copy (agents missing, or `--offsite-only`).
    pub offsite_shards: u64,
    /// Agents that could not be reached, as `address (id…)`.
    pub agents_down: Vec<String>,
    /// Members woken by Wake-on-LAN, and which answered before the restore started.
    pub wake: WakeOutcome,
    /// Wall time.
    pub seconds: f64,
}

/// `TARGET.sa-partial`, where a file target is written until it is complete.
pub fn partial_path(to: &Path) -> PathBuf {
    let mut name = to.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".sa-partial");
    to.with_file_name(name)
}

/// The figures gathered while stripes come back.
#[derive(Default)]
struct Tally {
    lost: Vec<StripeLost>,
    reconstructed: u64,
    per_problem: BTreeMap<&'static str, u64>,
    /// Slots already reported (down at the start, or once per agent).
    reported: HashSet<usize>,
}

/// Restores a snapshot (see the module docs).
pub async fn restore(
    fleet: &Fleet,
    opts: &RestoreOptions,
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<RestoreReport> {
    let started = Instant::now();
    let mut cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
    let m =
        Arc::new(catalog::resolve(&cat.manifests, &opts.snapshot, opts.volume.as_deref())?.clone());
    let layout = m.layout;
    let waking = fleet
        .wake_sleepers(&mut cat.reach, &Need::Readable(vec![&m]), progress)
        .await?;
    let slots = clients_for(fleet, &m, &cat.reach).await;
    for (i, why) in &slots.down {
        tracing::warn!("agent {} is down: {why}", slots.names[*i]);
    }
    let agents_down = slots.down_names();
    let target = open_target(
        &opts.target,
        layout.volume_size,
        &TargetOptions {
            force: opts.force,
            partial: Some(partial_path(&opts.target)),
        },
    )?;
    let (is_device, write_path) = (target.is_device, target.path.clone());
    let file = Arc::new(target.file);
    let writer = Arc::new(TargetWriter::new(file.clone(), &write_path));
    let codec = Arc::new(StripeCodec::new(fleet.keys().clone(), layout, m.volume)?);
    // Written stripes' buffers are reused for the next ones (see sa_core::pool).
    let pool = Arc::new(BufferPool::new(PARALLEL));
    let reader = StripeReader::new(codec, m.clone(), slots.slots.clone())
        .with_pool(pool.clone())
        .with_offsite(fleet);
    let woken = waking.outcome.clone();
    let awake = KeepAlive::start(slots.slots.iter().flatten());
    waking.join_late(m.clone(), reader.clone(), &[], &awake);
    progress.start("restore", layout.volume_size);
    let mut tally = Tally {
        reported: slots.down.iter().map(|(i, _)| *i).collect(),
        ..Default::default()
    };
    let copied = copy_stripes(
        &reader, &m, &writer, is_device, &pool, &slots, &mut tally, progress, shutdown,
    )
    .await;
    progress.finish();
    if let Err(e) = copied {
        if !is_device {
            let _ = std::fs::remove_file(&write_path);
        }
        return Err(e);
    }
    if !tally.lost.is_empty() {
        if !is_device {
            let _ = std::fs::remove_file(&write_path);
        }
        return Err(lost_error(
            tally.lost,
            &layout,
            &slots,
            agents_down,
            is_device,
        ));
    }
    file.sync_all()
        .ctx(|| format!("cannot flush {} to disk", opts.target.display()))?;
    if !is_device {
        std::fs::rename(&write_path, &opts.target).ctx(|| {
            format!(
                "cannot rename the restored image into {}",
                opts.target.display()
            )
        })?;
        let _ = sa_core::durable::sync_parent(&opts.target);
    }
    Ok(RestoreReport {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        target: opts.target.display().to_string(),
        size: layout.volume_size,
        stripes: layout.stripe_count(),
        reconstructed_stripes: tally.reconstructed,
        offsite_shards: reader.offsite_shards(),
        missing_shards: tally.per_problem.get("missing").copied().unwrap_or(0),
        corrupt_shards: tally.per_problem.get("corrupt").copied().unwrap_or(0),
        agents_down,
        wake: woken,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// One stripe's write as the restore loop counts it: its shard problems and whether it was
/// rebuilt from parity, or the stripe lost with the write's error. (The loop's task result;
/// the lost stripe travels by value as the reader returns it.)
#[allow(clippy::result_large_err)]
fn result_of(
    i: u64,
    written: std::result::Result<std::io::Result<()>, tokio::task::JoinError>,
    problems: Vec<ShardProblem>,
    rebuilt: bool,
) -> std::result::Result<(u64, Vec<ShardProblem>, bool), StripeLost> {
    let lost = |error| StripeLost {
        stripe: i,
        problems: vec![],
        error,
    };
    match written {
        Ok(Ok(())) => Ok((i, problems, rebuilt)),
        Ok(Err(e)) => Err(lost(sa_core::Error::io("write target", e))),
        Err(e) => Err(lost(sa_core::Error::Protocol(e.to_string()))),
    }
}

/// Reads every stripe and writes it to `file` ([`PARALLEL`] at once); lost stripes go to the
/// tally, so the error can name them all.
#[allow(clippy::too_many_arguments)]
async fn copy_stripes(
    reader: &StripeReader,
    m: &Arc<sa_core::manifest::Manifest>,
    file: &Arc<TargetWriter>,
    is_device: bool,
    pool: &Arc<BufferPool>,
    slots: &SlotClients,
    tally: &mut Tally,
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<()> {
    let layout = m.layout;
    let count = layout.stripe_count();
    let mut set = JoinSet::new();
    let mut next = 0u64;
    loop {
        while set.len() < PARALLEL && next < count && !shutdown.is_cancelled() {
            let i = next;
            next += 1;
            let (reader, file, m, pool) = (reader.clone(), file.clone(), m.clone(), pool.clone());
            set.spawn(async move {
                // A fresh file is already zero; a device must be written.
                if matches!(m.stripes[i as usize], StripeRef::Zero) && !is_device {
                    return Ok((i, vec![], false));
                }
                let off = m.layout.stripe_offset(i);
                let written = if matches!(m.stripes[i as usize], StripeRef::Zero) {
                    let len = m.layout.stripe_len(i) as u64;
                    tokio::task::spawn_blocking(move || file.zero_range(off, len)).await
                } else {
                    let sd = reader.read(i).await?;
                    let data = sd.data;
                    let r = tokio::task::spawn_blocking(move || {
                        let r = file.write_all_at(&data, off);
                        pool.give(data);
                        r
                    })
                    .await;
                    return result_of(i, r, sd.problems, sd.reconstructed);
                };
                result_of(i, written, vec![], false)
            });
        }
        let Some(joined) = set.join_next().await else {
            break;
        };
        match joined.map_err(|e| Error::failed(format!("restore task failed: {e}")))? {
            Ok((i, problems, rec)) => {
                tally.reconstructed += rec as u64;
                for p in &problems {
                    let key = match p.problem {
                        Problem::Corrupt => "corrupt",
                        _ => "missing",
                    };
                    *tally.per_problem.entry(key).or_default() += 1;
                    if p.problem == Problem::Corrupt || tally.reported.insert(p.slot) {
                        tracing::warn!(
                            "stripe {i} shard {}: {} on {}: {}",
                            p.index,
                            key,
                            slots.names[p.slot],
                            p.detail
                        );
                    }
                }
                progress.advance(layout.stripe_len(i) as u64);
            }
            Err(l) if matches!(l.error, sa_core::Error::Io { .. }) => {
                return Err(Error::failed(format!(
                    "cannot write stripe {} to the target: {}",
                    l.stripe, l.error
                )))
            }
            Err(l) => tally.lost.push(l),
        }
    }
    if shutdown.is_cancelled() {
        return Err(Error::Interrupted(
            "the restore stopped before it was complete".into(),
        ));
    }
    Ok(())
}

/// The error naming the lost stripes.
fn lost_error(
    mut lost: Vec<StripeLost>,
    layout: &Layout,
    slots: &SlotClients,
    agents_down: Vec<String>,
    is_device: bool,
) -> Error {
    lost.sort_by_key(|l| l.stripe);
    let shown = lost
        .iter()
        .take(10)
        .map(|l| LostStripe {
            stripe: l.stripe,
            offset: layout.stripe_offset(l.stripe),
            len: layout.stripe_len(l.stripe) as u64,
            error: l.error.to_string(),
            shards: l
                .problems
                .iter()
                .map(|p| {
                    format!(
                        "shard {} on {} {:?}",
                        p.index, slots.names[p.slot], p.problem
                    )
                })
                .collect(),
        })
        .collect();
    Error::StripesLost(StripesLost {
        count: lost.len() as u64,
        total: layout.stripe_count(),
        m: layout.m,
        shown,
        agents_down,
        target_note: Some(
            if is_device {
                "the device holds an INCOMPLETE image"
            } else {
                "no target file was left behind"
            }
            .into(),
        ),
    })
}

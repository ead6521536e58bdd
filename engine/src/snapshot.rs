//! Snapshot: read a disk, cut it into stripes, and spread their shards over the agents.
//!
//! Pipeline, every stage bounded so memory does not grow with the disk:
//! ```text
//! reader thread --(channel, 4 stripes)--> per-stripe task: zero? -> hash -> seen? -> encrypt+encode
//!     (blocking pool) -> PUT k+m shards to k+m distinct agents in parallel
//! at most IN_FLIGHT stripes exist between read and stored; then SYNC every agent (durability
//! barrier) and only then store the sealed manifest on every agent: the commit point.
//! ```
//! Each new stripe's shards are first offered by header (`confirm_shard`): shards that an
//! interrupted earlier run left whole on their agents are kept, not sent again, so a run after
//! a crash resumes ([`stripe`]).
//! A stripe whose id is already stored (by the previous snapshot of the same volume, on agents
//! still in the table, or earlier in this run) is referenced, not sent again. A snapshot killed
//! midway leaves only unreferenced shard files; it is never listed, and earlier ones are intact.
//! Every snapshot's manifest is complete by itself: restore never replays a chain.
//!
//! **Agents.** The shards go to the agents given plus every member of the agent book in service
//! that answers ([`crate::fleet`], with [`Access::Write`]: new agents at new addresses are pinned).
//! A member that does not answer is placed around and named in the report; a stranger at a
//! member's address is not used and never blocks the snapshot when enough others answer.
//!
//! **Incremental runs**: the previous snapshot of the volume (same k, m, stripe size) is the
//! base. Its manifest comes from the local cache ([`cache`]) when it is there, else from the
//! agents ([`base`]). With a changed map ([`changed`]) stripes that no listed range touches are
//! copied from that snapshot's manifest without reading the source at all.
//!
//! **Placement** ([`plan`]): before reading anything, every agent's room is asked and each agent
//! gets a share of the new shards proportional to it, never more than it can take. The need is
//! estimated as every stripe to read being new and non-zero: a first snapshot the fleet cannot
//! hold is refused up front, before anything is stored; an incremental run (which stores only
//! changed stripes) then still runs, placed by room, and fails cleanly only if more changed than
//! fits. While it runs a budget counts what each agent took and moves a shard to the roomiest
//! agent outside the stripe when the planned one has no room left.
//!
//! **Degraded mode** ([`SnapshotOptions::allow_degraded`]): with fewer than `k + m` agents
//! reachable (or with room), the default is to refuse. With it, and at least `k` such agents,
//! every stripe still gets all `k + m` shards, spread as evenly as possible (at most
//! `ceil((k + m) / n)` on one agent), so a stripe survives fewer agent losses than `m` (its
//! *margin*, reported); `repair` spreads them later. Fewer than `k` agents are refused even then:
//! one PC would hold a whole stripe's worth of data.
//!
//! **Garbage-collection safety** (see [`crate::gc`]): before storing anything, the snapshot writes
//! a lease naming its base on every agent, then checks the base was not forgotten meanwhile; the
//! lease is deleted after the commit (or a failure).
//!
//! **Shutdown**: when the caller's [`Shutdown`] fires, no new stripe is started, the run ends
//! with [`Error::Interrupted`] and nothing is committed; the next run resumes.

pub mod base;
pub mod cache;
pub mod changed;
mod commit;
pub mod plan;
mod report;
mod stripe;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sa_core::catalog::{Lease, Tombstone};
use sa_core::keys::{hex, random_bytes};
use sa_core::layout::Layout;
use sa_core::manifest::{AgentEntry, Manifest, StripeRef};
use sa_core::seal::StripeId;
use sa_core::size::format_size;
use sa_core::store::{AgentClient, ShardRead, ShardWrite};
use sa_core::stripe::StripeCodec;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

pub use report::{AgentPlacement, SnapshotReport};

use crate::error::{Error, Result};
use crate::fleet::{none_reachable, Access, Fleet};
use crate::progress::Progress;
use crate::shutdown::Shutdown;
use crate::source::Source;
use base::{find_base, Base, Pick};
use cache::ManifestCache;
use stripe::{store_stripe, Placed, Run, StripeOutcome};

/// Stripes between read and stored at once (bounds memory: about 2.5x stripe size each).
const IN_FLIGHT: usize = 8;

/// What to snapshot, where, and how.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Block device or image file.
    pub source: PathBuf,
    /// Volume name.
    pub volume: String,
    /// Agent addresses given (the book's members are added).
    pub agents: Vec<String>,
    /// Data shards per stripe.
    pub k: u8,
    /// Parity shards per stripe.
    pub m: u8,
    /// Stripe size in bytes.
    pub stripe_size: u32,
    /// Store with fewer than k + m agents (see the module docs).
    pub allow_degraded: bool,
    /// Manifest cache root (None: the default).
    pub cache_dir: Option<PathBuf>,
    /// A changed map: the snapshot (id, prefix or `latest`) it is relative to, and the file.
    pub changed: Option<(String, PathBuf)>,
}

impl SnapshotOptions {
    /// A snapshot of `source` as `volume` through `agents`, with the default layout.
    pub fn new(source: PathBuf, volume: &str, agents: Vec<String>) -> Self {
        SnapshotOptions {
            source,
            volume: volume.to_string(),
            agents,
            k: crate::DEFAULT_K,
            m: crate::DEFAULT_M,
            stripe_size: crate::DEFAULT_STRIPE_SIZE,
            allow_degraded: false,
            cache_dir: None,
            changed: None,
        }
    }
}

/// The agents a snapshot stores on.
struct Targets {
    clients: Vec<AgentClient>,
    /// Members and addresses that did not answer (`address (id…)`, or the address).
    unreachable: Vec<String>,
}

/// Takes a snapshot (see the module docs).
pub async fn snapshot(
    fleet: &Fleet,
    opts: &SnapshotOptions,
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<SnapshotReport> {
    let started = Instant::now();
    let vol = crate::volume::open_source(&opts.source)?;
    let mounted_rw = vol.mounted_rw.clone();
    for m in &mounted_rw {
        tracing::warn!(
            "{} is mounted read-write on {m}: stripes read at different moments of a disk in use \
             may not form one consistent image (snapshot a frozen filesystem, an LVM or VM snapshot)",
            opts.source.display()
        );
    }
    let source = Arc::new(Source::new(vol));
    let layout = Layout::new(source.size(), opts.stripe_size, opts.k, opts.m)?;
    let targets = connect_targets(fleet, opts, &layout).await?;
    let rooms = plan::agent_rooms(&targets.clients).await;
    let table: Vec<AgentEntry> = targets
        .clients
        .iter()
        .map(|c| AgentEntry {
            id: c.agent_id(),
            addr: c.addr().to_string(),
        })
        .collect();
    let keys = fleet.keys();
    let volume_id = keys.volume_id(&opts.volume);
    let mcache = ManifestCache::open(opts.cache_dir.as_deref(), keys);
    let (mut base, touched) =
        base_of_run(fleet, opts, &targets.clients, mcache.as_ref(), &layout).await?;

    // The lease, then the check that the base was not forgotten meanwhile (see crate::gc).
    let snapshot_id = hex(&random_bytes::<8>());
    let lease = Lease {
        id: snapshot_id.clone(),
        base: base.as_ref().map(|b| b.manifest.snapshot.clone()),
        started: fleet.clock().now_secs(),
    };
    let lease_name = lease.blob_name();
    put_everywhere(&targets.clients, &lease_name, &lease.seal(keys)?)
        .await
        .map_err(|e| {
            Error::failed(format!(
                "cannot write the snapshot's lease; nothing was stored: {e}"
            ))
        })?;
    if let Some(b) = &base {
        if forgotten_anywhere(&targets.clients, &b.manifest.snapshot).await {
            if opts.changed.is_some() {
                let _ = delete_everywhere(&targets.clients, &lease_name).await;
                return Err(Error::invalid(format!(
                    "--changed-since: snapshot {} was just forgotten; snapshot without a changed map",
                    b.manifest.snapshot
                )));
            }
            tracing::warn!(
                "base snapshot {} was forgotten meanwhile; reusing nothing from it",
                b.manifest.snapshot
            );
            base = None;
        }
    }
    let ctx = RunContext {
        fleet,
        opts,
        layout,
        volume_id,
        table,
        rooms,
        source,
        snapshot_id,
        started,
        mounted_rw,
    };
    let result = run(
        &ctx,
        &targets,
        base,
        touched,
        mcache.as_ref(),
        progress,
        shutdown,
    )
    .await;
    // Committed (or failed): the lease has done its job either way.
    if let Err(e) = delete_everywhere(&targets.clients, &lease_name).await {
        tracing::warn!("lease {lease_name} not removed everywhere (it expires by itself): {e}");
    }
    result
}

/// Reaches the agents given and the book's members; refuses when too few answer (with the
/// members that did not, by name) or when the key is refused.
async fn connect_targets(
    fleet: &Fleet,
    opts: &SnapshotOptions,
    layout: &Layout,
) -> Result<Targets> {
    let shards = layout.shards();
    let k = opts.k as usize;
    let reach = fleet.reach(&opts.agents, Access::Write).await;
    let clients = reach.live();
    if clients.is_empty()
        || reach
            .attempts
            .iter()
            .any(|(_, r)| matches!(r, Err(sa_core::Error::Refused { .. })))
    {
        return Err(none_reachable(&reach.attempts));
    }
    let mut unreachable = reach.down_names();
    for (addr, r) in &reach.attempts {
        if let Err(e) = r {
            tracing::warn!("{addr}: {e}; placing around it");
            if !reach.down.iter().any(|d| d.addr == *addr) {
                unreachable.push(addr.clone());
            }
        }
    }
    if clients.len() < shards && !(opts.allow_degraded && clients.len() >= k) {
        let hint = if clients.len() >= k {
            format!(
                "start the agents that are down, add agents (`sa-image agents add`), or lower \
                 --data-shards/--parity-shards; or pass --allow-degraded to store all {shards} shards \
                 of each stripe on the {} agents that answer now (some holding two of a stripe: it \
                 survives fewer losses until `sa-image repair` spreads them)",
                clients.len()
            )
        } else {
            format!(
                "start the agents that are down, add agents (`sa-image agents add`), or lower \
                 --data-shards/--parity-shards; even --allow-degraded needs at least k = {k}"
            )
        };
        return Err(Error::TooFewAgents {
            what: format!(
                "cannot store {} with k={} + m={}",
                opts.volume, opts.k, opts.m
            ),
            reachable: clients.len(),
            needed: shards,
            down: unreachable,
            hint,
        });
    }
    Ok(Targets {
        clients,
        unreachable,
    })
}

/// The base of this run (the newest snapshot of the volume with this layout, or the changed
/// map's snapshot) and, with a changed map, which stripes it touches.
async fn base_of_run(
    fleet: &Fleet,
    opts: &SnapshotOptions,
    clients: &[AgentClient],
    mcache: Option<&ManifestCache>,
    layout: &Layout,
) -> Result<(Option<Base>, Option<Vec<bool>>)> {
    let keys = fleet.keys();
    let volume_id = keys.volume_id(&opts.volume);
    let Some((since, map)) = &opts.changed else {
        let pick = Pick::Latest {
            volume: volume_id,
            k: opts.k,
            m: opts.m,
            stripe_size: opts.stripe_size,
        };
        return match find_base(clients, keys, mcache, pick).await {
            Ok(b) => Ok((b, None)),
            Err(e) => {
                tracing::warn!("cannot read the catalog for reuse, sending everything: {e}");
                Ok((None, None))
            }
        };
    };
    let b = find_base(clients, keys, mcache, Pick::Named(since, volume_id))
        .await?
        .ok_or_else(|| Error::invalid(format!("--changed-since {since}: no such snapshot")))?;
    let bm = &b.manifest;
    if bm.volume != volume_id {
        return Err(Error::invalid(format!(
            "--changed-since {since}: snapshot {} is of volume '{}', not '{}': a changed map only \
             makes sense against an earlier snapshot of the same volume",
            bm.snapshot, bm.volume_name, opts.volume
        )));
    }
    if bm.layout != *layout {
        return Err(Error::invalid(format!(
            "--changed-since {since}: snapshot {} has size {} with {} stripes at k={} m={}, this run has \
             size {} with {} stripes at k={} m={}: the layouts must match (snapshot without a changed map)",
            bm.snapshot,
            bm.layout.volume_size,
            format_size(bm.layout.stripe_size as u64),
            bm.layout.k,
            bm.layout.m,
            layout.volume_size,
            format_size(layout.stripe_size as u64),
            layout.k,
            layout.m
        )));
    }
    let ranges = changed::load(map, layout.volume_size)?;
    let touched = changed::touched(&ranges, layout);
    Ok((Some(b), Some(touched)))
}

/// What one run holds while it stores and commits.
struct RunContext<'a> {
    fleet: &'a Fleet,
    opts: &'a SnapshotOptions,
    layout: Layout,
    volume_id: [u8; 16],
    table: Vec<AgentEntry>,
    rooms: Vec<Option<u64>>,
    source: Arc<Source>,
    snapshot_id: String,
    started: Instant,
    mounted_rw: Vec<String>,
}

/// Where already-stored stripes live, from the previous snapshot of the volume.
fn known_stripes(prev: Option<&Manifest>, table: &[AgentEntry]) -> HashMap<StripeId, Vec<u16>> {
    let mut known = HashMap::new();
    let Some(prev) = prev else { return known };
    // Map the previous table's slots to the new table's; a stripe is reusable only when
    // every one of its shards is on an agent that is in the new table.
    let remap: Vec<Option<u16>> = prev
        .agents
        .iter()
        .map(|a| table.iter().position(|t| t.id == a.id).map(|p| p as u16))
        .collect();
    for s in &prev.stripes {
        if let StripeRef::Data { id, slots } = s {
            let mapped: Option<Vec<u16>> = slots
                .iter()
                .map(|&s| remap.get(s as usize).copied().flatten())
                .collect();
            if let Some(mapped) = mapped {
                known.insert(*id, mapped);
            }
        }
    }
    known
}

/// Stripes a changed map says are untouched, taken from the base without reading: fills
/// `stripes` and `totals`, returns how many.
fn take_untouched(
    base: &Manifest,
    touched: &[bool],
    known: &HashMap<StripeId, Vec<u16>>,
    stripes: &mut [Option<StripeRef>],
    totals: &mut StripeOutcome,
) -> u64 {
    let mut unread = 0;
    for (i, s) in base.stripes.iter().enumerate() {
        if touched[i] {
            continue;
        }
        match s {
            StripeRef::Zero => {
                stripes[i] = Some(StripeRef::Zero);
                totals.zero += 1;
            }
            StripeRef::Data { id, .. } => match known.get(id) {
                Some(slots) => {
                    stripes[i] = Some(StripeRef::Data {
                        id: *id,
                        slots: slots.clone(),
                    });
                    totals.reused += 1;
                }
                // Its shards are on agents no longer in the table: read it after all.
                None => continue,
            },
        }
        unread += 1;
    }
    unread
}

/// Stores every stripe to read, then commits the manifest.
async fn run(
    ctx: &RunContext<'_>,
    targets: &Targets,
    base: Option<Base>,
    touched: Option<Vec<bool>>,
    mcache: Option<&ManifestCache>,
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<SnapshotReport> {
    let layout = ctx.layout;
    let known = known_stripes(base.as_ref().map(|b| &b.manifest), &ctx.table);
    let mut stripes: Vec<Option<StripeRef>> = vec![None; layout.stripe_count() as usize];
    let mut totals = StripeOutcome::default();
    let unread = match (&touched, &base) {
        (Some(t), Some(b)) => take_untouched(&b.manifest, t, &known, &mut stripes, &mut totals),
        _ => 0,
    };
    let to_read: Vec<u64> = (0..layout.stripe_count())
        .filter(|&i| stripes[i as usize].is_none())
        .collect();
    let bytes_read: u64 = to_read.iter().map(|&i| layout.stripe_len(i) as u64).sum();
    let (placement, budget, per_stripe) = plan::plan_placement(
        &layout,
        &ctx.table,
        &ctx.rooms,
        to_read.len() as u64,
        base.is_some(),
        ctx.opts.allow_degraded,
    )?;
    let planned = placement.quotas();
    let run = Run {
        codec: Arc::new(StripeCodec::new(
            ctx.fleet.keys().clone(),
            layout,
            ctx.volume_id,
        )?),
        clients: Arc::new(targets.clients.clone()),
        placed: Arc::new(Mutex::new(Placed {
            known,
            placement,
            budget,
            lost: HashSet::new(),
        })),
        source: ctx.source.clone(),
    };
    progress.start("snapshot", layout.volume_size);
    progress.advance(layout.volume_size - bytes_read);
    let stored = pipeline(&run, &layout, to_read, &mut stripes, progress, shutdown).await;
    progress.finish();
    totals.add(&stored?);
    let stripes: Vec<StripeRef> = stripes
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            s.ok_or_else(|| {
                Error::failed(format!(
                    "stripe {i} was never read: source shrank while reading? nothing was committed"
                ))
            })
        })
        .collect::<Result<_>>()?;
    let lost = run
        .placed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .lost
        .clone();
    let committed = commit::commit(ctx, &targets.clients, lost, stripes, mcache).await?;
    Ok(SnapshotReport {
        snapshot: ctx.snapshot_id.clone(),
        volume: ctx.opts.volume.clone(),
        size: layout.volume_size,
        stripes: layout.stripe_count(),
        zero_stripes: totals.zero,
        new_stripes: totals.new,
        reused_stripes: totals.reused,
        resumed_stripes: totals.resumed,
        bytes_sent: totals.bytes_sent,
        seconds: ctx.started.elapsed().as_secs_f64(),
        agents: targets.clients.len(),
        agents_unreachable: targets.unreachable.clone(),
        data_shards: ctx.opts.k,
        parity_shards: ctx.opts.m,
        base: base.as_ref().map(|b| b.manifest.snapshot.clone()),
        base_manifest_from: base.as_ref().map(|b| b.from.to_string()),
        unread_stripes: unread,
        bytes_read,
        manifest_bytes: committed.manifest_bytes,
        margin: committed.margin,
        degraded: per_stripe > 1,
        agents_lost: committed.agents_lost,
        placement: ctx
            .table
            .iter()
            .zip(&ctx.rooms)
            .zip(&planned)
            .map(|((a, r), p)| AgentPlacement {
                addr: a.addr.clone(),
                room: *r,
                planned_shards: *p,
            })
            .collect(),
        source_mounted_rw: ctx.mounted_rw.clone(),
    })
}

/// Reads `to_read` sequentially on a thread, stores each stripe (at most [`IN_FLIGHT`] at once),
/// and fills `stripes`. Stops at the first failure or when `shutdown` fires.
async fn pipeline(
    run: &Run,
    layout: &Layout,
    to_read: Vec<u64>,
    stripes: &mut [Option<StripeRef>],
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<StripeOutcome> {
    let mut totals = StripeOutcome::default();
    let (tx, mut rx) = mpsc::channel::<Result<(u64, Vec<u8>)>>(4);
    let (source, l) = (run.source.clone(), *layout);
    let reader = tokio::task::spawn_blocking(move || {
        for i in to_read {
            let r = source.read_stripe_blocking(&l, i).map(|b| (i, b));
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                break;
            }
        }
    });
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks: JoinSet<Result<(u64, StripeRef, StripeOutcome, u64)>> = JoinSet::new();
    let mut collect = |r: std::result::Result<_, tokio::task::JoinError>,
                       stripes: &mut [Option<StripeRef>]|
     -> Result<()> {
        let (i, sref, outcome, len): (u64, StripeRef, StripeOutcome, u64) =
            r.map_err(|e| Error::failed(format!("stripe task failed: {e}")))??;
        stripes[i as usize] = Some(sref);
        totals.add(&outcome);
        progress.advance(len);
        Ok(())
    };
    loop {
        let item = tokio::select! {
            item = rx.recv() => item,
            () = shutdown.cancelled() => {
                return Err(Error::Interrupted("the snapshot stopped between stripes; nothing was committed, the next run resumes".into()));
            }
        };
        let Some(item) = item else { break };
        let (i, buf) = item?;
        let permit = in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Error::failed("pipeline closed"))?;
        let run = run.clone();
        tasks.spawn(async move {
            let len = buf.len() as u64;
            let r = store_stripe(run, i, buf).await;
            drop(permit);
            r.map(|(i, s, o)| (i, s, o, len))
        });
        while let Some(r) = tasks.try_join_next() {
            collect(r, stripes)?;
        }
    }
    while let Some(r) = tasks.join_next().await {
        collect(r, stripes)?;
    }
    reader
        .await
        .map_err(|e| Error::failed(format!("reader thread failed: {e}")))?;
    Ok(totals)
}

/// Stores `data` as blob `name` on every client; fails if any refuses.
async fn put_everywhere(clients: &[AgentClient], name: &str, data: &[u8]) -> Result<()> {
    let mut set = JoinSet::new();
    for c in clients.iter() {
        let c = c.clone();
        let (name, data) = (name.to_string(), data.to_vec());
        set.spawn(async move { (c.addr().to_string(), c.put_blob(&name, data).await) });
    }
    while let Some(r) = set.join_next().await {
        let (addr, r) = r.map_err(|e| Error::failed(format!("catalog task failed: {e}")))?;
        r.map_err(|e| Error::failed(format!("agent {addr} did not store {name}: {e}")))?;
    }
    Ok(())
}

/// Whether any client holds a tombstone for `snapshot`.
async fn forgotten_anywhere(clients: &[AgentClient], snapshot: &str) -> bool {
    let name = Tombstone::blob_name_of(snapshot);
    for c in clients {
        if c.list_blobs(&name).await.is_ok_and(|n| n.contains(&name)) {
            return true;
        }
    }
    false
}

/// Deletes blob `name` from every client (5 s each at most: an agent lost during the run must
/// not hold up the end of it; what is left expires by itself).
async fn delete_everywhere(clients: &[AgentClient], name: &str) -> Result<()> {
    let mut failed = Vec::new();
    for c in clients {
        match tokio::time::timeout(std::time::Duration::from_secs(5), c.delete_blob(name)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("{}: {e}", c.addr())),
            Err(_) => failed.push(format!("{}: no answer", c.addr())),
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::failed(failed.join("; ")))
    }
}

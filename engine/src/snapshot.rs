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
//! **Sources** ([`crate::source`]): an image file, a block device, or an NBD export (a VM
//! disk's point-in-time view). A source mounted read-write is refused unless a way to read it
//! consistently is chosen ([`crate::consistency`]: `--freeze`, `--lvm-snapshot`, or
//! `--inconsistent-ok`); the point in time is taken (hooks, freeze, LVM snapshot) after the
//! agents and the base are found, and released as soon as the last stripe is read.
//!
//! **Incremental runs**: the previous snapshot of the volume (same k, m, stripe size) is the
//! base. Its manifest comes from the local cache ([`cache`]) when it is there, else from the
//! agents ([`base`]). With a changed map ([`changed`]) or an NBD export's dirty bitmap that
//! belongs to the base ([`changes`]), stripes that nothing marks are copied from that snapshot's
//! manifest without reading the source at all; an export's `base:allocation` zeroes are not
//! read either.
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
mod blobs;
pub mod cache;
pub mod changed;
mod changes;
mod commit;
mod open;
pub mod plan;
mod report;
mod stripe;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sa_core::catalog::Lease;
use sa_core::keys::{hex, random_bytes};
use sa_core::layout::Layout;
use sa_core::manifest::{AgentEntry, StripeRef};
use sa_core::store::AgentClient;
use sa_core::stripe::StripeCodec;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

pub use report::{AgentPlacement, Phases, SnapshotReport};

use crate::consistency::hooks::HookEnv;
use crate::consistency::{self, ConsistencyOptions, Method};
use crate::error::{Error, Result};
use crate::fleet::keepalive::KeepAlive;
use crate::fleet::{none_reachable, Access, Fleet};
use crate::progress::Progress;
use crate::shutdown::Shutdown;
use crate::source::{Source, StripeRead};
use blobs::{delete_everywhere, forgotten_anywhere, put_everywhere};
use cache::ManifestCache;
use changes::Changes;
use stripe::{store_stripe, Placed, Run, StripeOutcome};

/// Stripes between read and stored at once (bounds memory: about 2.5x stripe size each).
const IN_FLIGHT: usize = 8;

/// What to snapshot, where, and how.
#[derive(Debug, Clone)]
pub struct SnapshotOptions {
    /// Block device, image file, or NBD URI (`nbd://HOST[:PORT]/EXPORT`,
    /// `nbd+unix:///EXPORT?socket=PATH`).
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
    /// How stripes are sealed ([`sa_core::seal`]: 2 = in chunks, the default; 1 = whole).
    pub seal: u8,
    /// Store with fewer than k + m agents (see the module docs).
    pub allow_degraded: bool,
    /// Manifest cache root (None: the default).
    pub cache_dir: Option<PathBuf>,
    /// A changed map: the snapshot (id, prefix or `latest`) it is relative to, and the file.
    pub changed: Option<(String, PathBuf)>,
    /// NBD sources: the export's dirty bitmap marking what changed since the previous snapshot
    /// of the volume; used only if that snapshot was taken with `new_bitmap` of this name
    /// ([`changes`]), else the run reads everything and says why.
    pub dirty_bitmap: Option<String>,
    /// NBD sources: the dirty bitmap that records writes from this snapshot's point in time on,
    /// recorded in the manifest for the next run's `dirty_bitmap`.
    pub new_bitmap: Option<String>,
    /// How a source in use is read consistently.
    pub consistency: ConsistencyOptions,
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
            seal: sa_core::seal::SEAL_CHUNKED,
            allow_degraded: false,
            cache_dir: None,
            changed: None,
            dirty_bitmap: None,
            new_bitmap: None,
            consistency: ConsistencyOptions::default(),
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
    // The source and the agents are reached at once; a source that cannot be opened is
    // reported as soon as it is known, without waiting for slow agents.
    let (opened, targets) = tokio::try_join!(open::open(opts), connect_targets(fleet, opts))?;
    // The PCs stay awake until the snapshot is committed or fails, hooks and freezes included.
    let _awake = KeepAlive::start(&targets.clients);
    let source = Arc::new(opened.source);
    let layout =
        Layout::new(source.size(), opts.stripe_size, opts.k, opts.m)?.with_seal(opts.seal)?;
    let mut phases = Phases {
        reached: started.elapsed().as_secs_f64(),
        ..Phases::default()
    };
    tracing::debug!("{} agents reached", targets.clients.len());
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
    // Room, base and changes, and the export's zeroes: asked at once.
    let zero_map = async {
        match source.nbd() {
            Some(n) => n.zero_stripes(&layout).await.unwrap_or_else(|e| {
                tracing::warn!("{e}; reading every stripe");
                None
            }),
            None => None,
        }
    };
    let (rooms, changes, zero_map) = tokio::join!(
        plan::agent_rooms(&targets.clients),
        changes::find(
            fleet,
            opts,
            &targets.clients,
            mcache.as_ref(),
            &layout,
            &source,
        ),
        zero_map
    );
    let mut changes = changes?;
    phases.planned = started.elapsed().as_secs_f64();
    tracing::debug!(
        "base {:?}, changes from {:?}",
        changes.base.as_ref().map(|b| &b.manifest.snapshot),
        changes.from
    );

    // The lease, then the check that the base was not forgotten meanwhile (see crate::gc).
    let snapshot_id = hex(&random_bytes::<8>());
    let lease = Lease {
        id: snapshot_id.clone(),
        base: changes.base.as_ref().map(|b| b.manifest.snapshot.clone()),
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
    if let Some(b) = &changes.base {
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
            changes = Changes {
                base: None,
                touched: None,
                from: None,
                fallback: opts.dirty_bitmap.as_ref().map(|_| {
                    format!(
                        "the previous snapshot {} was forgotten meanwhile",
                        b.manifest.snapshot
                    )
                }),
            };
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
        mounted_rw: opened.mounted_rw,
        method: opened.method,
        zero_map,
    };
    phases.leased = started.elapsed().as_secs_f64();
    tracing::debug!("lease written; storing");
    let result = run(
        &ctx,
        &targets,
        changes,
        mcache.as_ref(),
        phases,
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
async fn connect_targets(fleet: &Fleet, opts: &SnapshotOptions) -> Result<Targets> {
    let shards = opts.k as usize + opts.m as usize;
    let k = opts.k as usize;
    let mut reach = fleet.reach(&opts.agents, Access::Write).await;
    let need = if opts.allow_degraded { k } else { shards };
    fleet
        .wake_sleepers(
            &mut reach,
            &crate::fleet::sleepers::Need::Agents(need),
            &crate::progress::NoProgress,
        )
        .await?;
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
    method: Method,
    /// Per stripe: the export reports it as all zeroes (NBD sources with `base:allocation`).
    zero_map: Option<Vec<bool>>,
}

/// Stores every stripe to read, then commits the manifest.
async fn run(
    ctx: &RunContext<'_>,
    targets: &Targets,
    changes: Changes,
    mcache: Option<&ManifestCache>,
    mut phases: Phases,
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<SnapshotReport> {
    let layout = ctx.layout;
    let base = changes.base.as_ref().map(|b| &b.manifest);
    let known = changes::known_stripes(base, &ctx.table);
    let mut stripes: Vec<Option<StripeRef>> = vec![None; layout.stripe_count() as usize];
    let mut totals = StripeOutcome::default();
    let unread = match (&changes.touched, base) {
        (Some(t), Some(b)) => changes::take_untouched(b, t, &known, &mut stripes, &mut totals),
        _ => 0,
    };
    let zero_unread = match &ctx.zero_map {
        Some(z) => changes::take_zero(z, &mut stripes, &mut totals),
        None => 0,
    };
    let to_read: Vec<u64> = (0..layout.stripe_count())
        .filter(|&i| stripes[i as usize].is_none())
        .collect();
    let stripes_read = to_read.len() as u64;
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
    let codec = Arc::new(StripeCodec::new(
        ctx.fleet.keys().clone(),
        layout,
        ctx.volume_id,
    )?);
    let placed = Arc::new(Mutex::new(Placed {
        known,
        placement,
        budget,
        lost: HashSet::new(),
    }));
    progress.start("snapshot", layout.volume_size);
    progress.advance(layout.volume_size - bytes_read);
    let mut warnings: Vec<String> = changes
        .fallback
        .iter()
        .map(|why| {
            format!(
                "dirty bitmap {} not used, the whole export was read: {why}",
                ctx.opts.dirty_bitmap.as_deref().unwrap_or("")
            )
        })
        .collect();
    let stored = read_and_store(
        ctx,
        Run {
            codec,
            clients: Arc::new(targets.clients.clone()),
            placed: placed.clone(),
            source: ctx.source.clone(),
        },
        to_read,
        &mut stripes,
        &mut warnings,
        progress,
        shutdown,
    )
    .await;
    phases.stored = ctx.started.elapsed().as_secs_f64();
    progress.finish();
    let (stored, read_at) = stored?;
    phases.read = read_at;
    totals.add(&stored);
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
    let lost = placed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .lost
        .clone();
    tracing::debug!("every stripe stored; committing");
    let committed = commit::commit(ctx, &targets.clients, lost, stripes, mcache).await?;
    phases.committed = ctx.started.elapsed().as_secs_f64();
    tracing::debug!("committed");
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
        phases,
        agents: targets.clients.len(),
        agents_unreachable: targets.unreachable.clone(),
        data_shards: ctx.opts.k,
        parity_shards: ctx.opts.m,
        base: changes.base.as_ref().map(|b| b.manifest.snapshot.clone()),
        base_manifest_from: changes.base.as_ref().map(|b| b.from.to_string()),
        unread_stripes: unread,
        zero_stripes_unread: zero_unread,
        stripes_read,
        bytes_read,
        changes_from: changes.from.clone(),
        tracking_bitmap: ctx.opts.new_bitmap.clone(),
        consistency: ctx.method.to_string(),
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
        warnings,
    })
}

/// Takes the point in time ([`consistency::take`]: hooks, freeze or LVM snapshot), reads and
/// stores `to_read`, releases the point as soon as the last stripe is read (thaw, post-hook),
/// and the LVM snapshot once every stripe is stored. Whatever fails, the point is released; a
/// failed release fails the run (its image would not be consistent). A snapshot LV that cannot
/// be removed is a warning: the image is good.
async fn read_and_store(
    ctx: &RunContext<'_>,
    mut run: Run,
    to_read: Vec<u64>,
    stripes: &mut [Option<StripeRef>],
    warnings: &mut Vec<String>,
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<(StripeOutcome, f64)> {
    let env = HookEnv {
        source: ctx.opts.source.display().to_string(),
        volume: ctx.opts.volume.clone(),
    };
    let mut point = consistency::take(
        &ctx.opts.consistency,
        &ctx.method,
        env,
        ctx.layout.volume_size,
    )
    .await?;
    if let Some(snap) = &point.source {
        run.source = snap.clone();
    }
    let (tx, rx) = mpsc::channel::<StripeRead>(4);
    let mut reader = run.source.spawn_reader(&ctx.layout, to_read, tx);
    let abort = reader.abort_handle();
    let mut read_at = 0.0;
    let storing = async {
        let r = pipeline(&run, rx, stripes, progress, shutdown).await;
        if r.is_err() {
            abort.abort();
        }
        r
    };
    let released = async {
        let read_all = matches!((&mut reader).await, Ok(true));
        read_at = ctx.started.elapsed().as_secs_f64();
        tracing::debug!("read done (all: {read_all}); releasing the point in time");
        point.after_read(read_all).await
    };
    tracing::debug!("point in time taken ({}); reading", ctx.method);
    let (stored, released) = tokio::join!(storing, released);
    // Every handle on the source goes before the LVM snapshot is removed.
    drop(run);
    if let Err(e) = point.finish().await {
        tracing::warn!("{e}");
        warnings.push(e.to_string());
    }
    let stored = stored?;
    released?;
    Ok((stored, read_at))
}

/// Stores the stripes the reader sends on `rx` (at most [`IN_FLIGHT`] at once) and fills
/// `stripes`. Stops at the first failure or when `shutdown` fires.
async fn pipeline(
    run: &Run,
    mut rx: mpsc::Receiver<StripeRead>,
    stripes: &mut [Option<StripeRef>],
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<StripeOutcome> {
    let mut totals = StripeOutcome::default();
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut tasks: JoinSet<Result<(u64, StripeRef, StripeOutcome, u64)>> = JoinSet::new();
    let mut collect = |r: std::result::Result<_, tokio::task::JoinError>,
                       stripes: &mut [Option<StripeRef>]|
     -> Result<()> {
        let (i, sref, outcome, len): (u64, StripeRef, StripeOutcome, u64) =
            r.map_err(|e| Error::failed(format!("stripe task failed: {e}")))??;
        tracing::trace!("stripe {i} stored");
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
    Ok(totals)
}

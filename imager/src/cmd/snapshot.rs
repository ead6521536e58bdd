//! `sa-image snapshot`: read a disk, cut it into stripes, and spread their shards over the agents.
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
//! a crash resumes.
//! A stripe whose id is already stored (by the previous snapshot of the same volume, on agents
//! still in the table, or earlier in this run) is referenced, not sent again. A snapshot killed
//! midway leaves only unreferenced shard files; it is never listed, and earlier ones are intact.
//! Every snapshot's manifest is complete by itself: restore never replays a chain.
//!
//! Incremental runs: the previous snapshot of the volume (same k, m, stripe size) is the base.
//! Its manifest comes from the local cache ([`cache`]) when it is there, else from the agents.
//! With `--changed-since SNAPSHOT --changed-map FILE` ([`changed`]) stripes that no listed range
//! touches are copied from that snapshot's manifest without reading the source at all.
//!
//! Placement ([`sa_core::placement`]): before reading anything, every agent's room is asked
//! (`STAT`: `quota - used` with a quota, else the free space of its filesystem) and each agent
//! gets a share of the new shards proportional to it, never more than it can take. The need is
//! estimated as every stripe to read being new and non-zero (all-zero stripes cannot be known
//! before reading): a first snapshot the fleet cannot hold is refused up front, before anything
//! is stored; an incremental run (which stores only changed stripes) then still runs, placed by
//! room, and fails cleanly only if more changed than fits. While it runs a [`Budget`] counts what
//! each agent took and moves a shard to the roomiest agent outside the stripe when the planned
//! one has no room left.
//!
//! Degraded mode (`--allow-degraded`): with fewer than `k + m` agents reachable (or with room),
//! the default is to refuse. With the flag, and at least `k` such agents, every stripe still gets
//! all `k + m` shards, spread as evenly as possible (at most `ceil((k + m) / n)` on one agent):
//! every shard exists, so the data is as safe as it can be on `n` PCs, but a stripe survives
//! fewer agent losses than `m` (its *margin*, reported). `status` then exits 2 and `repair`
//! moves the doubled-up shards onto agents that hold no other shard of the stripe once enough
//! agents are up. Fewer than `k` agents are refused even with the flag: one PC would then hold
//! a whole stripe's worth of data (or more) and the backup would hinge on a couple of desks.
//!
//! Garbage-collection safety (see [`crate::gc`]): before storing anything, the snapshot writes a
//! lease naming its base on every agent, then checks the base was not forgotten meanwhile; the
//! lease is deleted after the commit (or a failure).

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sa_core::keys::{hex, random_bytes, Keys};
use sa_core::layout::Layout;
use sa_core::manifest::{AgentEntry, Manifest, StripeRef};
use sa_core::placement::{stripe_margin, Budget, Placement, PlacementError};
use sa_core::seal::{is_zero, StripeId};
use sa_core::shard::SHARD_HEADER_LEN;
use sa_core::size::{format_size, parse_size};
use sa_core::store::{AgentClient, ShardWrite};
use sa_core::stripe::StripeCodec;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::agents::{connect_with_members, live, none_reachable};
use crate::config::{self, require_agents, KeyArgs};
use crate::merge;
use crate::progress::bytes_bar;
use crate::source::open_source;

pub mod cache;
pub mod changed;

use cache::{find_base, ManifestCache, Pick};
use sa_core::catalog::{Lease, Tombstone};
use sa_core::store::ShardRead;

/// Stripes between read and stored at once (bounds memory: about 2.5x stripe size each).
const IN_FLIGHT: usize = 8;

/// Flags of `snapshot`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SnapshotArgs {
    /// Block device or image file to snapshot, e.g. /dev/sda.
    #[serde(skip)]
    pub source: PathBuf,
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Agents to store shards on, HOST:PORT, comma-separated (at least k + m).
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Data shards per stripe (k).
    #[arg(long)]
    pub data_shards: Option<u8>,
    /// Parity shards per stripe (m): how many agents may be lost.
    #[arg(long)]
    pub parity_shards: Option<u8>,
    /// Stripe size, e.g. 4MiB.
    #[arg(long)]
    pub stripe_size: Option<String>,
    /// Volume name (default: the source's file name).
    #[arg(long)]
    pub volume: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Local manifest cache (default: $XDG_CACHE_HOME/sa-image or ~/.cache/sa-image).
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
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
}

/// Incremental options of a snapshot run.
#[derive(Debug, Default, Clone)]
pub struct Incremental {
    /// Manifest cache root (None: the default location).
    pub cache_dir: Option<PathBuf>,
    /// `--changed-since` and `--changed-map`.
    pub changed: Option<(String, PathBuf)>,
}

/// What `snapshot --json` prints.
#[derive(Serialize, Debug, Clone)]
pub struct SnapshotReport {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume name.
    pub volume: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Stripes in the volume.
    pub stripes: u64,
    /// All-zero stripes (nothing stored).
    pub zero_stripes: u64,
    /// Stripes whose shards were sent.
    pub new_stripes: u64,
    /// Stripes already stored, referenced only.
    pub reused_stripes: u64,
    /// Stripes found stored whole on their agents (left by an interrupted run) and kept.
    pub resumed_stripes: u64,
    /// Bytes of shard files sent.
    pub bytes_sent: u64,
    /// Wall time.
    pub seconds: f64,
    /// Agents used.
    pub agents: usize,
    /// Agents given but unreachable (placed around).
    pub agents_unreachable: Vec<String>,
    /// k and m.
    pub data_shards: u8,
    /// m.
    pub parity_shards: u8,
    /// The snapshot whose stripes were reused (the previous one of the volume, or --changed-since).
    pub base: Option<String>,
    /// Where the base's manifest came from: `cache` or `agents`.
    pub base_manifest_from: Option<String>,
    /// Stripes not read at all thanks to --changed-map.
    pub unread_stripes: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Size of the sealed (compressed, encrypted) manifest, bytes.
    pub manifest_bytes: u64,
    /// Agent losses the snapshot survives as stored (m, unless stored degraded).
    pub margin: i64,
    /// Stored with fewer than k + m agents (`--allow-degraded`).
    pub degraded: bool,
    /// Agents that failed during the run: their part went to the others, and the shards they
    /// took before failing count as absent (the margin shows it; `repair` restores it).
    pub agents_lost: Vec<String>,
    /// Per agent used (address): the room it reported before the run (bytes; None: unknown)
    /// and the shards it was given.
    pub placement: Vec<AgentPlacement>,
}

/// One agent's part in a snapshot (`snapshot --json`).
#[derive(Serialize, Debug, Clone)]
pub struct AgentPlacement {
    /// Address.
    pub addr: String,
    /// Bytes it could take when the run started (`quota - used`, else the filesystem's free
    /// space); None when it did not say.
    pub room: Option<u64>,
    /// New shards planned for it over the volume (if every stripe read were new and non-zero).
    pub planned_shards: u64,
}

/// Parameters of a snapshot run (also used by `demo`).
pub struct SnapshotPlan {
    /// Source path.
    pub source: PathBuf,
    /// Volume name.
    pub volume: String,
    /// Agent addresses.
    pub agents: Vec<String>,
    /// k.
    pub k: u8,
    /// m.
    pub m: u8,
    /// Stripe size.
    pub stripe_size: u32,
    /// Hide progress.
    pub quiet: bool,
    /// Store with fewer than k + m agents (see the module docs).
    pub allow_degraded: bool,
}

/// `sa-image snapshot`.
pub async fn run(mut args: SnapshotArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: SnapshotArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; agents, data_shards, parity_shards, stripe_size, volume, cache_dir, changed_since,
        changed_map; bools json, allow_degraded);
    if args.changed_since.is_some() != args.changed_map.is_some() {
        bail!("--changed-since and --changed-map go together: the map lists what changed since that snapshot");
    }
    let key = args.keyfile.load()?;
    let stripe_size = parse_size(args.stripe_size.as_deref().unwrap_or("4MiB"))?;
    let stripe_size = u32::try_from(stripe_size).context("stripe size too large")?;
    let volume = match args.volume {
        Some(v) => v,
        None => args
            .source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "volume".into()),
    };
    let plan = SnapshotPlan {
        source: args.source.clone(),
        volume,
        agents: require_agents(&args.agents)?,
        k: args.data_shards.unwrap_or(4),
        m: args.parity_shards.unwrap_or(2),
        stripe_size,
        quiet: args.json,
        allow_degraded: args.allow_degraded,
    };
    let inc = Incremental {
        cache_dir: args.cache_dir.clone(),
        changed: args.changed_since.clone().zip(args.changed_map.clone()),
    };
    let report = snapshot_with(&plan, &inc, Arc::new(key.derive())).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(0)
}

fn print_report(r: &SnapshotReport) {
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
    println!(
        "  sent {} to {} agents (k={} m={}: any {} may be lost) in {:.1}s ({}/s read)",
        format_size(r.bytes_sent),
        r.agents,
        r.data_shards,
        r.parity_shards,
        r.parity_shards,
        r.seconds,
        format_size((r.size as f64 / r.seconds.max(1e-9)) as u64)
    );
    for a in &r.agents_unreachable {
        println!("  warning: agent {a} was unreachable; its share went to the others");
    }
    for a in &r.agents_lost {
        println!(
            "  warning: agent {a} failed during the run; its part went to the others and what it \
             took counts as absent (survives {} agent loss(es); `sa-image repair` restores {})",
            r.margin, r.parity_shards
        );
    }
    if r.degraded {
        println!(
            "  warning: stored DEGRADED on {} agents: it survives {} agent loss(es), not {}; \
             start more agents and run `sa-image repair` to spread the shards",
            r.agents, r.margin, r.parity_shards
        );
    }
}

fn now() -> (u64, u32) {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| (d.as_secs(), d.subsec_nanos()))
        .unwrap_or((0, 0))
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

/// Runs a snapshot with the default incremental options.
pub async fn snapshot(plan: &SnapshotPlan, keys: Arc<Keys>) -> Result<SnapshotReport> {
    snapshot_with(plan, &Incremental::default(), keys).await
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
        let (addr, r) = r.context("catalog task failed")?;
        r.with_context(|| format!("agent {addr} did not store {name}"))?;
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

/// Runs a snapshot.
pub async fn snapshot_with(
    plan: &SnapshotPlan,
    inc: &Incremental,
    keys: Arc<Keys>,
) -> Result<SnapshotReport> {
    let started = Instant::now();
    let vol = open_source(&plan.source)?;
    let layout = Layout::new(vol.size, plan.stripe_size, plan.k, plan.m)?;
    let shards = layout.shards();
    let k = plan.k as usize;
    // Connect to the agents given, and to every other member of the agent book that answers
    // (`sa-image agents add` puts a PC in service without changing every snapshot command).
    let (mut attempts, members) = connect_with_members(&plan.agents, &keys).await;
    let seen: Vec<[u8; 16]> = live(&attempts).iter().map(AgentClient::agent_id).collect();
    for (addr, r) in members {
        match r {
            Ok(c) if !seen.contains(&c.agent_id()) => attempts.push((addr, Ok(c))),
            Ok(_) => {}
            Err(e) => tracing::info!("{addr} (in the agent book): {e}; not used"),
        }
    }
    let given = attempts.len();
    if given < shards && !(plan.allow_degraded && given >= k) {
        bail!(
            "{given} agents given but k={} + m={} needs {shards} distinct agents: add agents or lower --data-shards/--parity-shards{}",
            plan.k,
            plan.m,
            if given >= k {
                " (or --allow-degraded to store with less redundancy for now)"
            } else {
                ""
            }
        );
    }
    // Place around agents that do not answer, as long as k + m remain.
    let mut clients: Vec<AgentClient> = Vec::new();
    let mut unreachable = Vec::new();
    for (addr, r) in &attempts {
        match r {
            Ok(c) if clients.iter().any(|x| x.agent_id() == c.agent_id()) => {
                bail!(
                    "{addr} is the same agent (id {}) as another address given",
                    hex(&c.agent_id())
                );
            }
            Ok(c) => clients.push(c.clone()),
            Err(sa_core::Error::Refused { .. }) => return Err(none_reachable(&attempts)),
            Err(e) => {
                tracing::warn!("{addr}: {e}; placing around it");
                unreachable.push(addr.clone());
            }
        }
    }
    if clients.is_empty() {
        return Err(none_reachable(&attempts));
    }
    if clients.len() < shards && !(plan.allow_degraded && clients.len() >= k) {
        bail!(
            "only {} of {} agents reachable but k + m = {shards}: {} cannot be stored with full redundancy; \
             start the missing agents (unreachable: {}){}",
            clients.len(),
            given,
            plan.volume,
            unreachable.join(", "),
            if clients.len() >= k {
                format!(
                    ", or pass --allow-degraded to store all {shards} shards of each stripe on the {} reachable \
                     agents now (some holding two of a stripe: it survives fewer losses until `sa-image repair` \
                     spreads them)",
                    clients.len()
                )
            } else {
                format!(
                    "; even --allow-degraded needs at least k = {k} agents",
                )
            }
        );
    }
    let rooms = agent_rooms(&clients).await;
    let table: Vec<AgentEntry> = clients
        .iter()
        .map(|c| AgentEntry {
            id: c.agent_id(),
            addr: c.addr().to_string(),
        })
        .collect();

    // What is already stored: the base snapshot (the newest of this volume, or --changed-since).
    let volume_id = keys.volume_id(&plan.volume);
    let mcache = inc
        .cache_dir
        .clone()
        .or_else(cache::default_root)
        .and_then(|r| ManifestCache::open(&r, &keys));
    let (mut base, touched) = match &inc.changed {
        Some((since, map)) => {
            let b = find_base(
                &clients,
                &keys,
                mcache.as_ref(),
                Pick::Named(since, volume_id),
            )
            .await?
            .with_context(|| format!("--changed-since {since}: no such snapshot"))?;
            let bm = &b.manifest;
            if bm.volume != volume_id {
                bail!(
                    "--changed-since {since}: snapshot {} is of volume '{}', not '{}': a changed map only \
                     makes sense against an earlier snapshot of the same volume",
                    bm.snapshot,
                    bm.volume_name,
                    plan.volume
                );
            }
            if bm.layout != layout {
                bail!(
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
                );
            }
            let ranges = changed::load(map, vol.size)?;
            (Some(b), Some(changed::touched(&ranges, &layout)))
        }
        None => {
            let pick = Pick::Latest {
                volume: volume_id,
                k: plan.k,
                m: plan.m,
                stripe_size: plan.stripe_size,
            };
            match find_base(&clients, &keys, mcache.as_ref(), pick).await {
                Ok(b) => (b, None),
                Err(e) => {
                    tracing::warn!("cannot read the catalog for reuse, sending everything: {e}");
                    (None, None)
                }
            }
        }
    };

    // The lease, then the check that the base was not forgotten meanwhile (see crate::gc).
    let snapshot_id = hex(&random_bytes::<8>());
    let lease = Lease {
        id: snapshot_id.clone(),
        base: base.as_ref().map(|b| b.manifest.snapshot.clone()),
        started: now().0,
    };
    put_everywhere(&clients, &lease.blob_name(), &lease.seal(&keys)?)
        .await
        .context("cannot write the snapshot's lease; nothing was stored")?;
    let lease_name = lease.blob_name();
    if let Some(b) = &base {
        if forgotten_anywhere(&clients, &b.manifest.snapshot).await {
            if inc.changed.is_some() {
                let _ = delete_everywhere(&clients, &lease_name).await;
                bail!("--changed-since: snapshot {} was just forgotten; snapshot without a changed map", b.manifest.snapshot);
            }
            tracing::warn!(
                "base snapshot {} was forgotten meanwhile; reusing nothing from it",
                b.manifest.snapshot
            );
            base = None;
        }
    }
    let clients_for_lease = clients.clone();
    let result = async {
        let known_map = known_stripes(base.as_ref().map(|b| &b.manifest), &table);
        let mut stripes: Vec<Option<StripeRef>> = vec![None; layout.stripe_count() as usize];
        let mut totals = StripeOutcome::default();
        let mut unread = 0u64;
        if let (Some(t), Some(b)) = (&touched, &base) {
            for (i, s) in b.manifest.stripes.iter().enumerate() {
                if t[i] {
                    continue;
                }
                match s {
                    StripeRef::Zero => {
                        stripes[i] = Some(StripeRef::Zero);
                        totals.zero += 1;
                    }
                    StripeRef::Data { id, .. } => match known_map.get(id) {
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
        }
        let to_read: Vec<u64> = (0..layout.stripe_count())
            .filter(|&i| stripes[i as usize].is_none())
            .collect();
        let bytes_read: u64 = to_read.iter().map(|&i| layout.stripe_len(i) as u64).sum();
        let (placement, budget, per_stripe) = plan_placement(
            &layout,
            &table,
            &rooms,
            to_read.len() as u64,
            base.is_some(),
            plan.allow_degraded,
        )?;
        let planned = placement.quotas();
        let placed = Arc::new(Mutex::new(Placed {
            known: known_map,
            placement,
            budget,
            lost: HashSet::new(),
        }));

        let codec = Arc::new(StripeCodec::new(keys.clone(), layout, volume_id)?);
        let clients = Arc::new(clients);
        let bar = bytes_bar(vol.size, "snapshot", plan.quiet);
        bar.inc(vol.size - bytes_read);

        // Reader thread: sequential reads into a bounded channel.
        let (tx, mut rx) = mpsc::channel::<std::io::Result<(u64, Vec<u8>)>>(4);
        let source = Arc::new(vol.file);
        let file = source.clone();
        let reader = tokio::task::spawn_blocking(move || {
            for i in to_read {
                let mut buf = vec![0u8; layout.stripe_len(i)];
                let r = file
                    .read_exact_at(&mut buf, layout.stripe_offset(i))
                    .map(|_| (i, buf));
                let failed = r.is_err();
                if tx.blocking_send(r).is_err() || failed {
                    break;
                }
            }
        });

        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut tasks: JoinSet<Result<(u64, StripeRef, StripeOutcome)>> = JoinSet::new();
        let mut collect =
            |r: Result<Result<(u64, StripeRef, StripeOutcome)>, tokio::task::JoinError>,
             stripes: &mut Vec<Option<StripeRef>>|
             -> Result<()> {
                let (i, sref, outcome) = r.context("stripe task failed")??;
                stripes[i as usize] = Some(sref);
                totals.add(&outcome);
                Ok(())
            };
        while let Some(item) = rx.recv().await {
            let (i, buf) =
                item.with_context(|| format!("cannot read {}", plan.source.display()))?;
            let permit = in_flight
                .clone()
                .acquire_owned()
                .await
                .context("pipeline closed")?;
            let (codec, clients, placed, bar, source) = (
                codec.clone(),
                clients.clone(),
                placed.clone(),
                bar.clone(),
                source.clone(),
            );
            tasks.spawn(async move {
                let len = buf.len() as u64;
                let r = store_stripe(i, buf, codec, clients, placed, source).await;
                bar.inc(len);
                drop(permit);
                r
            });
            while let Some(r) = tasks.try_join_next() {
                collect(r, &mut stripes)?;
            }
        }
        while let Some(r) = tasks.join_next().await {
            collect(r, &mut stripes)?;
        }
        reader.await.context("reader thread failed")?;
        bar.finish_and_clear();
        let stripes: Vec<StripeRef> = stripes
            .into_iter()
            .enumerate()
            .map(|(i, s)| {
                s.with_context(|| {
                    format!("stripe {i} was never read: source shrank while reading?")
                })
            })
            .collect::<Result<_>>()?;

        // Durability barrier on every agent still with us, then the commit: the manifest on
        // every agent. An agent lost during the run (or whose SYNC fails) holds shards that may
        // not be durable: they count as absent, and the snapshot is committed only if every
        // stripe still has k shards elsewhere (its margin then shows in the report and in
        // `status`, and `repair` restores it).
        let mut lost = placed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .lost
            .clone();
        let mut syncs = JoinSet::new();
        for (slot, c) in clients.iter().enumerate() {
            if lost.contains(&(slot as u16)) {
                continue;
            }
            let c = c.clone();
            syncs.spawn(async move { (slot as u16, c.addr().to_string(), c.sync().await) });
        }
        while let Some(r) = syncs.join_next().await {
            let (slot, addr, r) = r.context("sync task failed")?;
            if let Err(e) = r {
                tracing::warn!("agent {addr} could not make its shards durable ({e}); counting them as absent");
                lost.insert(slot);
            }
        }
        let margin_of = |slots: &[u16]| {
            let present: Vec<u16> = slots.iter().copied().filter(|s| !lost.contains(s)).collect();
            stripe_margin(&present, k)
        };
        let margins: Vec<i64> = stripes
            .iter()
            .filter_map(|s| match s {
                StripeRef::Data { slots, .. } => Some(margin_of(slots)),
                StripeRef::Zero => None,
            })
            .collect();
        let short = margins.iter().filter(|&&m| m < 0).count();
        if short > 0 {
            bail!(
                "{short} stripe(s) have fewer than k = {k} shards on agents that stayed (lost during the run: {}); \
                 snapshot not committed: bring the agents back or add agents, and run it again",
                lost.iter()
                    .map(|&s| clients[s as usize].addr().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let margin = margins.into_iter().min().unwrap_or(plan.m as i64);
        let agents_lost: Vec<String> = lost
            .iter()
            .map(|&s| clients[s as usize].addr().to_string())
            .collect();
        let (created, created_nanos) = now();
        let manifest = Manifest {
            snapshot: snapshot_id.clone(),
            volume_name: plan.volume.clone(),
            volume: volume_id,
            revision: 0,
            created,
            created_nanos,
            layout,
            agents: table,
            stripes,
        };
        let sealed = manifest.seal(&keys)?;
        let mut puts = JoinSet::new();
        for (slot, c) in clients.iter().enumerate() {
            if lost.contains(&(slot as u16)) {
                continue;
            }
            let c = c.clone();
            let (name, data) = (manifest.blob_name(), sealed.clone());
            puts.spawn(async move { (c.addr().to_string(), c.put_blob(&name, data).await) });
        }
        let mut catalog_failures = Vec::new();
        while let Some(r) = puts.join_next().await {
            let (addr, r) = r.context("catalog task failed")?;
            if let Err(e) = r {
                catalog_failures.push(format!("{addr}: {e}"));
            }
        }
        if catalog_failures.len() == clients.len() - lost.len() {
            bail!(
                "no agent accepted the catalog entry; snapshot not committed: {}",
                catalog_failures.join("; ")
            );
        }
        for f in &catalog_failures {
            tracing::warn!("catalog copy not stored on {f}");
        }
        if let Some(c) = &mcache {
            c.store(&manifest, &sealed);
        }
        Ok(SnapshotReport {
            snapshot: snapshot_id.clone(),
            volume: plan.volume.clone(),
            size: layout.volume_size,
            stripes: layout.stripe_count(),
            zero_stripes: totals.zero,
            new_stripes: totals.new,
            reused_stripes: totals.reused,
            resumed_stripes: totals.resumed,
            bytes_sent: totals.bytes_sent,
            seconds: started.elapsed().as_secs_f64(),
            agents: clients.len(),
            agents_unreachable: unreachable.clone(),
            data_shards: plan.k,
            parity_shards: plan.m,
            base: base.as_ref().map(|b| b.manifest.snapshot.clone()),
            base_manifest_from: base.as_ref().map(|b| b.from.to_string()),
            unread_stripes: unread,
            bytes_read,
            manifest_bytes: sealed.len() as u64,
            margin,
            degraded: per_stripe > 1,
            agents_lost,
            placement: manifest
                .agents
                .iter()
                .zip(&rooms)
                .zip(&planned)
                .map(|((a, r), p)| AgentPlacement {
                    addr: a.addr.clone(),
                    room: *r,
                    planned_shards: *p,
                })
                .collect(),
        })
    }
    .await;
    // The manifest is committed (or the run failed): the lease has done its job either way.
    if let Err(e) = delete_everywhere(&clients_for_lease, &lease_name).await {
        tracing::warn!("lease {lease_name} not removed everywhere (it expires by itself): {e:#}");
    }
    result
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
        bail!("{}", failed.join("; "))
    }
}

#[derive(Default, Debug, Clone)]
struct StripeOutcome {
    zero: u64,
    new: u64,
    reused: u64,
    resumed: u64,
    bytes_sent: u64,
}

impl StripeOutcome {
    fn add(&mut self, o: &StripeOutcome) {
        self.zero += o.zero;
        self.new += o.new;
        self.reused += o.reused;
        self.resumed += o.resumed;
        self.bytes_sent += o.bytes_sent;
    }
}

/// What the stripe tasks share about where shards go.
struct Placed {
    /// Stripes already stored (earlier snapshot, or earlier in this run) and their slots.
    known: HashMap<StripeId, Vec<u16>>,
    /// The plan by room.
    placement: Placement,
    /// What each agent may still take.
    budget: Budget,
    /// Agents (slots) that failed during the run: given nothing more, not synced, their shards
    /// of this run counted as absent.
    lost: HashSet<u16>,
}

/// Per client, in order, the bytes it can still take (`None`: it did not say).
async fn agent_rooms(clients: &[AgentClient]) -> Vec<Option<u64>> {
    let mut set = JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let c = c.clone();
        set.spawn(async move { (i, c.addr().to_string(), c.stat().await) });
    }
    let mut out = vec![None; clients.len()];
    while let Some(r) = set.join_next().await {
        let Ok((i, addr, r)) = r else { continue };
        match r {
            Ok(s) => out[i] = s.room(),
            Err(e) => {
                tracing::warn!("{addr}: cannot ask its free space ({e}); placing as if unlimited")
            }
        }
    }
    out
}

/// Bytes kept free on every agent for the catalog (the manifest of this snapshot, leases, and
/// some slack): 64 KiB plus 64 bytes per stripe (a sealed manifest takes about 36).
fn catalog_reserve(layout: &Layout) -> u64 {
    (64 << 10) + 64 * layout.stripe_count()
}

/// The placement of this run: from each agent's room (in whole shards, the catalog reserve
/// kept), the stripes to read (`to_read`, each assumed new and non-zero), and whether this run is
/// incremental (a base exists: few stripes will be new). Returns the plan, the run-time budget,
/// and the most shards of one stripe one agent may hold (1, more only degraded).
fn plan_placement(
    layout: &Layout,
    table: &[AgentEntry],
    rooms: &[Option<u64>],
    to_read: u64,
    incremental: bool,
    allow_degraded: bool,
) -> Result<(Placement, Budget, usize)> {
    let shards = layout.shards();
    let k = layout.k as usize;
    let file = (layout.shard_len(layout.stripe_size as usize) + SHARD_HEADER_LEN) as u64;
    let reserve = catalog_reserve(layout);
    let in_shards: Vec<u64> = rooms
        .iter()
        .map(|r| r.map_or(u64::MAX, |b| b.saturating_sub(reserve) / file))
        .collect();
    let roomy = in_shards.iter().filter(|&&r| r > 0).count();
    let describe = || {
        table
            .iter()
            .zip(rooms)
            .map(|(a, r)| {
                format!(
                    "{} {}",
                    a.addr,
                    r.map_or("room unknown".into(), |b| format!(
                        "{} free",
                        format_size(b)
                    ))
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let per_stripe = if roomy >= shards {
        1
    } else if allow_degraded && roomy >= k {
        shards.div_ceil(roomy)
    } else {
        bail!(
            "only {roomy} of {} reachable agents have room for a {} shard, but k + m = {shards} are needed{}: \
             free space on the agents (or raise their --quota), or add agents ({})",
            table.len(),
            format_size(file),
            if allow_degraded {
                format!("; even --allow-degraded needs at least k = {k}")
            } else if roomy >= k {
                "; --allow-degraded stores with less redundancy for now".into()
            } else {
                String::new()
            },
            describe()
        );
    };
    if per_stripe > 1 {
        tracing::warn!(
            "degraded: {roomy} agents for k + m = {shards} shards; up to {per_stripe} shards of a stripe on one agent"
        );
    }
    let budget = Budget::new(&in_shards, per_stripe);
    let stripes = layout.stripe_count();
    match Placement::new(stripes, to_read, shards, &in_shards, per_stripe) {
        Ok(p) => Ok((p, budget, per_stripe)),
        Err(PlacementError::NoRoom { room, need, .. }) if incremental => {
            tracing::warn!(
                "the agents could not hold a full rewrite of the {to_read} stripes read (room for {room} of \
                 {need} shard positions); placing by room anyway, as an incremental run stores only what changed"
            );
            let p = Placement::new(stripes, 0, shards, &in_shards, per_stripe)?;
            Ok((p, budget, per_stripe))
        }
        Err(e @ PlacementError::NoRoom { .. }) => {
            let need = to_read * shards as u64 * file;
            bail!(
                "the agents cannot hold this snapshot: up to {} of new shards ({to_read} stripes × {shards} \
                 shards of {}; all-zero stripes store nothing but cannot be known before reading), and {e}; \
                 nothing was stored. Free space on the agents (or raise their --quota), or add agents ({})",
                format_size(need),
                format_size(file),
                describe()
            )
        }
        Err(e) => Err(e.into()),
    }
}

enum Prepared {
    Zero,
    Known(StripeId, Vec<u16>),
    New(sa_core::stripe::EncodedStripe, Vec<u16>),
}

/// Shard `idx` of stripe `i` made again from the source: read, checked to be the same stripe
/// (`id`), encoded.
async fn shard_again(
    source: &Arc<std::fs::File>,
    codec: &Arc<StripeCodec>,
    i: u64,
    id: StripeId,
    idx: usize,
) -> Result<Vec<u8>> {
    let (source, codec) = (source.clone(), codec.clone());
    tokio::task::spawn_blocking(move || {
        let layout = *codec.layout();
        let mut buf = vec![0u8; layout.stripe_len(i)];
        source
            .read_exact_at(&mut buf, layout.stripe_offset(i))
            .with_context(|| format!("cannot read stripe {i} again"))?;
        if codec.stripe_id(&buf) != id {
            bail!(
                "stripe {i} changed while the snapshot ran (a live disk?); nothing was committed"
            );
        }
        let mut enc = codec.encode(id, buf);
        Ok(enc.shards.swap_remove(idx))
    })
    .await
    .context("re-encode task failed")?
}

async fn store_stripe(
    i: u64,
    buf: Vec<u8>,
    codec: Arc<StripeCodec>,
    clients: Arc<Vec<AgentClient>>,
    placed: Arc<Mutex<Placed>>,
    source: Arc<std::fs::File>,
) -> Result<(u64, StripeRef, StripeOutcome)> {
    let c2 = codec.clone();
    let p2 = placed.clone();
    let prepared = tokio::task::spawn_blocking(move || {
        if is_zero(&buf) {
            return Ok(Prepared::Zero);
        }
        let id = c2.stripe_id(&buf);
        let slots = {
            let mut p = p2.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(slots) = p.known.get(&id) {
                return Ok(Prepared::Known(id, slots.clone()));
            }
            let planned = p.placement.slots(i);
            let Some(slots) = p.budget.take(&planned) else {
                bail!(
                    "the agents have no room left for stripe {i} (more was new than the agents could hold); \
                     nothing was committed: free space on the agents or add agents, and run the snapshot again"
                );
            };
            p.known.insert(id, slots.clone());
            slots
        };
        Ok(Prepared::New(c2.encode(id, buf), slots))
    })
    .await
    .context("encode task failed")??;
    let mut outcome = StripeOutcome::default();
    let sref = match prepared {
        Prepared::Zero => {
            outcome.zero = 1;
            StripeRef::Zero
        }
        Prepared::Known(id, slots) => {
            outcome.reused = 1;
            StripeRef::Data { id, slots }
        }
        Prepared::New(enc, mut slots) => {
            // Each shard is first offered by its header: an agent that already holds it whole
            // (a snapshot killed midway left it; encryption is deterministic) keeps it, and
            // only the others travel. This is what makes the next run resume.
            // A shard whose agent fails (gone, cut off) or says it is full goes to another agent
            // outside the stripe ([`Budget::replace`]); a failed agent gets nothing more in this
            // run. The shard file is made again from the source (re-read, re-encoded: the same
            // bytes, as encryption is deterministic) rather than kept in memory for a retry.
            let id = enc.id;
            let mut pending: Vec<(usize, Vec<u8>)> = enc.shards.into_iter().enumerate().collect();
            let mut sent_any = false;
            while !pending.is_empty() {
                let mut puts = JoinSet::new();
                for (idx, file) in pending.drain(..) {
                    let slot = slots[idx];
                    let client = clients[slot as usize].clone();
                    let key = codec.key(&id, idx);
                    puts.spawn(async move {
                        let header = &file[..SHARD_HEADER_LEN];
                        let r = match client.confirm_shard(&key, header).await {
                            Ok(true) => Ok(0),
                            Ok(false) => {
                                let len = file.len() as u64;
                                client.put_shard(&key, file).await.map(|()| len)
                            }
                            Err(e) => Err(e),
                        };
                        (idx, slot, client.addr().to_string(), r)
                    });
                }
                let mut failed = Vec::new();
                while let Some(r) = puts.join_next().await {
                    let (idx, slot, addr, r) = r.context("upload task failed")?;
                    match r {
                        Ok(sent) => {
                            outcome.bytes_sent += sent;
                            sent_any |= sent > 0;
                        }
                        Err(e @ sa_core::Error::ShardCorrupt(_)) => bail!(
                            "agent {addr} rejected shard {idx} of stripe {i}: {e}; nothing was committed"
                        ),
                        Err(e) => failed.push((idx, slot, addr, e)),
                    }
                }
                for (idx, slot, addr, e) in failed {
                    let full = matches!(e, sa_core::Error::Full(_));
                    let next = {
                        let mut p = placed.lock().unwrap_or_else(|p| p.into_inner());
                        p.budget.drop_agent(slot as usize);
                        if !full && p.lost.insert(slot) {
                            tracing::warn!(
                                "agent {addr} failed while storing stripe {i} ({e}); its part of this run goes to the others"
                            );
                        } else if full {
                            tracing::warn!("agent {addr} is full ({e}); its part of this run goes to the others");
                        }
                        p.budget.replace(&slots, idx)
                    };
                    let Some(next) = next else {
                        if full {
                            bail!("agent {addr} is full ({e}) and no other agent outside stripe {i} has room; nothing was committed");
                        }
                        bail!(
                            "agent {addr} failed while storing stripe {i}: {e}; no other agent outside the stripe \
                             can take its shard; nothing was committed, run the snapshot again"
                        );
                    };
                    slots[idx] = next;
                    pending.push((idx, shard_again(&source, &codec, i, id, idx).await?));
                }
            }
            placed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .known
                .insert(id, slots.clone());
            if sent_any {
                outcome.new = 1;
            } else {
                outcome.resumed = 1;
            }
            return Ok((i, StripeRef::Data { id, slots }, outcome));
        }
    };
    Ok((i, sref, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sa_core::keys::MasterKey;

    /// The catalog figure: a sealed manifest of a 1 TiB volume of distinct, non-zero 4 MiB
    /// stripes (the worst case: stripe ids are random and do not compress) on 6 agents.
    #[test]
    fn manifest_bytes_per_tib() {
        let keys = MasterKey::from_bytes([1; 32]).derive();
        let layout = Layout::new(1 << 40, 4 << 20, 4, 2).unwrap();
        let stripes: Vec<StripeRef> = (0..layout.stripe_count())
            .map(|i| StripeRef::Data {
                id: *blake3::hash(&i.to_le_bytes()).as_bytes(),
                slots: sa_core::layout::rotate_placement(i, 6, 6),
            })
            .collect();
        let m = Manifest {
            snapshot: "0123456789abcdef".into(),
            volume_name: "sda".into(),
            volume: [0; 16],
            revision: 0,
            created: 0,
            created_nanos: 0,
            layout,
            agents: (0..6)
                .map(|i| AgentEntry {
                    id: [i; 16],
                    addr: format!("10.0.0.{i}:7710"),
                })
                .collect(),
            stripes,
        };
        let sealed = m.seal(&keys).unwrap();
        eprintln!(
            "[figure] sealed manifest of 1 TiB (262144 data stripes): {} bytes",
            sealed.len()
        );
        // 32-byte ids dominate; slots compress to almost nothing.
        assert!(sealed.len() < 9 << 20, "{} bytes", sealed.len());
    }
}

//! `sa-image repair`: rebuild every shard that is absent (missing, quarantined by a scrub, or on
//! an agent that does not answer) and store it where the stripe has no other shard; then write a
//! new revision of every manifest whose slots changed.
//!
//! 1. The catalog (newest revisions), the fleet and shard presence, as `status` sees them
//!    ([`crate::health`]).
//! 2. Per distinct stripe (volume, stripe id, placement: snapshots that share a stripe are
//!    repaired once) the absent shard indices, and a target for each: the agent that should hold
//!    it when that agent answers (the shard was quarantined or deleted: put it back), else a
//!    reachable agent that holds no shard of the stripe, the one with the most free space
//!    (quota minus use; each choice counts against it, so the load spreads).
//! 3. Rebuild: read the stripe from any `k` good shards ([`StripeReader`]: checked, decoded,
//!    decrypted, verified against its id), encode it again: encryption is deterministic, so this
//!    gives exactly the lost shard files. Store them, then `SYNC` every agent written to.
//! 4. Commit: each changed manifest as revision `N + 1` (`snap-<ID>.r<N+1>`, same snapshot,
//!    new slots, agent table extended by the new agents) on every reachable agent, then the
//!    older revisions deleted there. Readers take the newest revision any agent holds; the
//!    collector keeps the shards of every revision it sees, so a crash anywhere leaves a
//!    readable catalog and no shard collected too early (new shards are younger than the grace
//!    period until the revision that names them is committed).
//!
//! *Crowded* shards are rebuilt too: a stripe stored with `snapshot --allow-degraded` holds two
//! (or more) shards on one agent; every shard after the first on an agent is moved to an agent
//! that holds no shard of the stripe, when one is reachable with room (rebuilt like an absent
//! one; the old copy is unreferenced once the new revision commits, and `gc` collects it). When
//! no such agent exists the shard stays where it is and counts as not placed (exit 2).
//!
//! `repair --watch` ([`crate::cmd::repair_watch`]) runs [`repair_pass`] in a loop and holds
//! back the shards of agents missing for less than `--repair-after`.
//!
//! Exit 0: everything rebuilt (or nothing to do). Exit 2: some shard could not be placed
//! (too few agents outside a stripe). Exit 3: some stripe is lost (fewer than k shards left).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use sa_core::keys::hex;
use sa_core::manifest::{parse_blob_name, AgentEntry, Manifest, StripeRef, SNAPSHOT_BLOB_PREFIX};
use sa_core::seal::StripeId;
use sa_core::shard::VolumeId;
use sa_core::size::format_size;
use sa_core::store::{AgentClient, ShardRead, ShardWrite};
use sa_core::stripe::StripeCodec;
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::agents::open_catalog;
use crate::config::{self, require_agents, KeyArgs};
use crate::fetch::StripeReader;
use crate::gc::now_secs;
use crate::health::{bad_shards, crowded_shards, Fleet, Presence, SeenBook};
use crate::merge;

/// Stripes rebuilt at once.
const PARALLEL: usize = 4;

/// Flags of `repair`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct RepairArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Agents to ask, HOST:PORT, comma-separated: the catalog names the rest.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Report what would be rebuilt and where, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Where this machine keeps its manifest cache and agent sightings.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Keep running: look every --interval, rebuild bad or quarantined shards at once, and
    /// rebuild around a missing agent once it has been missing for --repair-after. Stops on
    /// SIGINT or SIGTERM. With --json, one JSON line per pass.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: how long an agent may be missing (off, on holiday) before its shards are
    /// rebuilt elsewhere, e.g. 90s, 30m, 24h, 7d (default 24h).
    #[arg(long, requires = "watch")]
    pub repair_after: Option<String>,
    /// With --watch: how often to look, e.g. 30s, 5m (default 5m).
    #[arg(long, requires = "watch")]
    pub interval: Option<String>,
    /// With --watch: the file that remembers since when each agent has been missing, so a
    /// restarted watcher keeps the clock (default: `repair-watch` in the cache directory).
    #[arg(long, requires = "watch")]
    pub state: Option<PathBuf>,
}

/// One shard rebuilt (or that would be).
#[derive(Serialize, Debug, Clone)]
pub struct Move {
    /// Stripe id (hex).
    pub stripe: String,
    /// Shard index.
    pub index: usize,
    /// The agent that should have held it (address).
    pub from: String,
    /// The agent it is stored on now (address).
    pub to: String,
    /// `rebuilt`, `planned`, or `failed: ...`.
    pub outcome: String,
    /// `absent` (missing, quarantined, or its agent is gone) or `crowded` (its agent holds
    /// another shard of the stripe).
    pub why: String,
}

/// One snapshot in `repair --json`.
#[derive(Serialize, Debug, Clone, Default)]
pub struct SnapshotRepair {
    /// Snapshot id.
    pub snapshot: String,
    /// Revision before.
    pub revision_before: u32,
    /// Revision after (the same when no slot changed).
    pub revision_after: u32,
    /// Shards of it that were absent.
    pub absent_shards: u64,
    /// Shards of it on an agent holding another shard of the same stripe.
    pub crowded_shards: u64,
    /// Absent shards left alone for now: their agent has not been missing long enough
    /// (`--watch`).
    pub held_shards: u64,
    /// Slots that now name another agent.
    pub slots_moved: u64,
    /// Stripes with fewer than k shards (cannot be rebuilt now).
    pub lost_stripes: u64,
    /// Agents that took the new revision.
    pub catalog_copies: u64,
}

/// What `repair --json` prints.
#[derive(Serialize, Debug, Default)]
pub struct RepairReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Per snapshot.
    pub snapshots: Vec<SnapshotRepair>,
    /// Distinct stripes that needed work.
    pub stripes_repaired: u64,
    /// Shard files rebuilt and stored.
    pub shards_rebuilt: u64,
    /// Bytes of those shard files.
    pub bytes_rebuilt: u64,
    /// Shards that could not be rebuilt or placed.
    pub shards_failed: u64,
    /// Absent shards left alone for now (`--watch`: their agent is missing for less than
    /// `--repair-after`).
    pub shards_held: u64,
    /// Crowded shards moved (or planned) to agents outside their stripe.
    pub shards_spread: u64,
    /// Distinct stripes lost (fewer than k shards).
    pub stripes_lost: u64,
    /// Seconds spent rebuilding (reading, decoding, encoding, storing, syncing).
    pub rebuild_seconds: f64,
    /// Rebuilt shard bytes per second, MB/s (10^6).
    pub rebuild_mb_per_s: f64,
    /// Catalog copies written (new revisions, and copies an agent lacked).
    pub catalog_copies_written: u64,
    /// Every shard moved (first 1000).
    pub moves: Vec<Move>,
    /// Whole seconds.
    pub seconds: f64,
}

/// A distinct stripe to repair.
struct Work {
    volume: VolumeId,
    id: StripeId,
    /// Agent per shard index (as placed now).
    placed: Vec<[u8; 16]>,
    /// Where it is first referenced: (manifest index, stripe index).
    first: (usize, u64),
    /// Absent shard index → target agent (None: no agent to put it on).
    targets: Vec<(usize, Option<[u8; 16]>)>,
    /// Which of `targets` are crowded (present, on an agent holding another shard of the stripe).
    crowded: HashSet<usize>,
    lost: bool,
}

/// Settings of one repair pass.
#[derive(Debug, Clone, Default)]
pub struct PassOptions {
    /// Plan only.
    pub dry_run: bool,
    /// Manifest cache and sightings root.
    pub cache_dir: Option<PathBuf>,
}

impl RepairReport {
    /// The exit code: 3 some stripe lost, 2 some shard not placed, else 0.
    pub fn exit_code(&self) -> u8 {
        if self.stripes_lost > 0 {
            3
        } else if self.shards_failed > 0 {
            2
        } else {
            0
        }
    }
}

type WorkKey = (VolumeId, StripeId, Vec<[u8; 16]>);
/// Per absent shard index: the agent it was stored on, or why not.
type Placed = Vec<(usize, Result<[u8; 16], String>)>;

/// `sa-image repair`.
pub async fn run(mut args: RepairArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: RepairArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; agents, cache_dir, repair_after, interval, state;
        bools json, dry_run, watch);
    let keys = Arc::new(args.keyfile.load()?.derive());
    let agents = require_agents(&args.agents)?;
    if args.watch {
        return crate::cmd::repair_watch::run(&args, keys, agents).await;
    }
    let opts = PassOptions {
        dry_run: args.dry_run,
        cache_dir: args.cache_dir.clone(),
    };
    let report = repair_pass(&agents, &keys, &opts, &mut |_| HashSet::new()).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(report.exit_code())
}

/// One repair: gathers the catalog, fleet and presence, rebuilds what is absent or crowded, and
/// commits new manifest revisions. `hold` is asked once, with the fleet: the absent shards of
/// the agents it names (unreachable ones) are left alone this time.
pub async fn repair_pass(
    agents: &[String],
    keys: &Arc<sa_core::keys::Keys>,
    opts: &PassOptions,
    hold: &mut dyn FnMut(&Fleet) -> HashSet<[u8; 16]>,
) -> Result<RepairReport> {
    let started = Instant::now();
    let (manifests, attempts) = open_catalog(agents, keys).await?;
    let fleet = Fleet::gather(&attempts, &manifests, keys).await;
    SeenBook::open(opts.cache_dir.as_deref(), keys).record(&fleet, now_secs());
    let held_agents = hold(&fleet);
    let mut volumes: Vec<VolumeId> = manifests.iter().map(|m| m.volume).collect();
    volumes.sort();
    volumes.dedup();
    let presence = Presence::gather(&fleet, &volumes).await;
    for (a, e) in &presence.failed {
        tracing::warn!("{a}: cannot list its shards ({e}); counting them as absent");
    }
    let name_of = |id: &[u8; 16]| {
        fleet
            .members
            .iter()
            .find(|m| &m.id == id)
            .map(|m| m.addr.clone())
            .unwrap_or_else(|| hex(id))
    };

    // 1. What is absent, per distinct stripe.
    let mut work: Vec<Work> = Vec::new();
    let mut index: HashMap<WorkKey, usize> = HashMap::new();
    let mut held_seen: HashSet<WorkKey> = HashSet::new();
    let mut report = RepairReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    for (mi, m) in manifests.iter().enumerate() {
        let mut sr = SnapshotRepair {
            snapshot: m.snapshot.clone(),
            revision_before: m.revision,
            revision_after: m.revision,
            ..Default::default()
        };
        for (si, s) in m.stripes.iter().enumerate() {
            let StripeRef::Data { id, slots } = s else {
                continue;
            };
            let bad = bad_shards(m, id, slots, &presence);
            let crowded: Vec<usize> = crowded_shards(m, slots)
                .into_iter()
                .filter(|i| !bad.contains(i))
                .collect();
            if bad.is_empty() && crowded.is_empty() {
                continue;
            }
            sr.absent_shards += bad.len() as u64;
            sr.crowded_shards += crowded.len() as u64;
            let lost = slots.len() - bad.len() < m.layout.k as usize;
            if lost {
                sr.lost_stripes += 1;
            }
            let placed: Vec<[u8; 16]> = slots.iter().map(|&s| m.agents[s as usize].id).collect();
            // Shards of an agent that is missing but not for long enough yet: left alone.
            let (held, bad): (Vec<usize>, Vec<usize>) = bad.into_iter().partition(|&i| {
                held_agents.contains(&placed[i]) && fleet.client(&placed[i]).is_none()
            });
            sr.held_shards += held.len() as u64;
            let key = (m.volume, *id, placed.clone());
            if !held.is_empty() && held_seen.insert(key.clone()) {
                report.shards_held += held.len() as u64;
            }
            if bad.is_empty() && crowded.is_empty() && !lost {
                continue;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = index.entry(key) {
                e.insert(work.len());
                work.push(Work {
                    volume: m.volume,
                    id: *id,
                    placed,
                    first: (mi, si as u64),
                    targets: bad
                        .into_iter()
                        .chain(crowded.iter().copied())
                        .map(|i| (i, None))
                        .collect(),
                    crowded: crowded.into_iter().collect(),
                    lost,
                });
            }
        }
        report.snapshots.push(sr);
    }

    // 2. Targets: back in place when the agent answers (and holds no other shard of the
    //    stripe), else the roomiest agent outside the stripe.
    let mut room: HashMap<[u8; 16], i128> = fleet
        .reachable()
        .map(|m| {
            let s = m.stat.clone().unwrap_or_default();
            // Unknown (an old agent without a quota): what we know is what it holds.
            let free = s
                .room()
                .map_or((1i128 << 62) - s.used as i128, |r| r as i128);
            (m.id, free)
        })
        .collect();
    for w in work.iter_mut().filter(|w| !w.lost) {
        let m = &manifests[w.first.0];
        let shard_bytes = m.layout.shard_len(m.layout.stripe_len(w.first.1)) as i128;
        let mut used: HashSet<[u8; 16]> = w.placed.iter().copied().collect();
        for (idx, target) in w.targets.iter_mut() {
            let orig = w.placed[*idx];
            let alone = w.placed.iter().filter(|&&a| a == orig).count() == 1;
            if !w.crowded.contains(idx) && alone && fleet.client(&orig).is_some() {
                *target = Some(orig);
                continue;
            }
            let best = room
                .iter()
                .filter(|(id, free)| !used.contains(*id) && **free >= shard_bytes)
                .max_by_key(|(id, free)| (**free, **id))
                .map(|(id, _)| *id);
            if let Some(t) = best {
                used.insert(t);
                if let Some(r) = room.get_mut(&t) {
                    *r -= shard_bytes;
                }
                *target = Some(t);
            } else if !w.crowded.contains(idx) && fleet.client(&orig).is_some() {
                // Absent from an agent that holds another shard of the stripe, and no agent
                // outside: back where it was, crowded but present.
                *target = Some(orig);
            }
        }
    }
    report.stripes_lost = work.iter().filter(|w| w.lost).count() as u64;
    report.stripes_repaired = work.iter().filter(|w| !w.lost).count() as u64;

    // 3. Rebuild and store.
    let mut outcomes: HashMap<usize, Placed> = HashMap::new();
    let rebuild_started = Instant::now();
    if opts.dry_run {
        for (wi, w) in work.iter().enumerate().filter(|(_, w)| !w.lost) {
            outcomes.insert(
                wi,
                w.targets
                    .iter()
                    .map(|(idx, t)| (*idx, t.ok_or_else(|| "no agent outside the stripe".into())))
                    .collect(),
            );
        }
    } else {
        let mut readers: HashMap<usize, (StripeReader, Arc<StripeCodec>)> = HashMap::new();
        let mut set: JoinSet<(usize, Placed, u64)> = JoinSet::new();
        let mut written: HashSet<[u8; 16]> = HashSet::new();
        let mut todo = work
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.lost)
            .map(|(i, _)| i);
        loop {
            while set.len() < PARALLEL {
                let Some(wi) = todo.next() else { break };
                let w = &work[wi];
                let mi = w.first.0;
                let (reader, codec) = match readers.entry(mi) {
                    std::collections::hash_map::Entry::Occupied(e) => e.get().clone(),
                    std::collections::hash_map::Entry::Vacant(e) => {
                        let m = Arc::new(manifests[mi].clone());
                        let codec = Arc::new(StripeCodec::new(keys.clone(), m.layout, m.volume)?);
                        let reader =
                            StripeReader::new(codec.clone(), m.clone(), fleet.slots_of(&m));
                        e.insert((reader, codec)).clone()
                    }
                };
                let targets: Vec<(usize, Option<[u8; 16]>, Option<AgentClient>)> = w
                    .targets
                    .iter()
                    .map(|(idx, t)| (*idx, *t, t.and_then(|t| fleet.client(&t).cloned())))
                    .collect();
                written.extend(w.targets.iter().filter_map(|t| t.1));
                let (stripe, id) = (w.first.1, w.id);
                set.spawn(async move {
                    let (r, bytes) = rebuild(&reader, &codec, stripe, id, targets).await;
                    (wi, r, bytes)
                });
            }
            let Some(joined) = set.join_next().await else {
                break;
            };
            let (wi, r, bytes) = joined.context("repair task failed")?;
            report.bytes_rebuilt += bytes;
            outcomes.insert(wi, r);
        }
        let mut syncs = JoinSet::new();
        for id in written {
            if let Some(c) = fleet.client(&id).cloned() {
                syncs.spawn(async move { (c.addr().to_string(), c.sync().await) });
            }
        }
        while let Some(r) = syncs.join_next().await {
            let (addr, r) = r.context("sync task failed")?;
            r.with_context(|| {
                format!("agent {addr} could not make the rebuilt shards durable; catalog unchanged")
            })?;
        }
    }
    report.rebuild_seconds = rebuild_started.elapsed().as_secs_f64();
    report.rebuild_mb_per_s = report.bytes_rebuilt as f64 / 1e6 / report.rebuild_seconds.max(1e-9);

    // Where each distinct stripe's shards live now.
    let mut moved: HashMap<WorkKey, Vec<[u8; 16]>> = HashMap::new();
    for (wi, res) in &outcomes {
        let w = &work[*wi];
        let mut now = w.placed.clone();
        for (idx, r) in res {
            let crowded = w.crowded.contains(idx);
            let outcome = match r {
                Ok(t) => {
                    report.shards_rebuilt += u64::from(!opts.dry_run);
                    report.shards_spread += u64::from(crowded && *t != w.placed[*idx]);
                    now[*idx] = *t;
                    if opts.dry_run { "planned" } else { "rebuilt" }.to_string()
                }
                Err(e) => {
                    report.shards_failed += 1;
                    format!("failed: {e}")
                }
            };
            if report.moves.len() < 1000 {
                report.moves.push(Move {
                    stripe: hex(&w.id),
                    index: *idx,
                    from: name_of(&w.placed[*idx]),
                    to: match r {
                        Ok(t) => name_of(t),
                        Err(_) => "-".into(),
                    },
                    outcome,
                    why: if crowded { "crowded" } else { "absent" }.into(),
                });
            }
        }
        if now != w.placed {
            moved.insert((w.volume, w.id, w.placed.clone()), now);
        }
    }
    report.shards_failed += work
        .iter()
        .filter(|w| w.lost)
        .map(|w| w.targets.len() as u64)
        .sum::<u64>();

    // 4. New revisions where slots changed; catalog copies where an agent lacks one.
    if !opts.dry_run {
        let held = list_catalogs(&fleet).await;
        for (m, sr) in manifests.iter().zip(report.snapshots.iter_mut()) {
            let (new, slots_moved) = revise(m, &moved, &fleet);
            sr.slots_moved = slots_moved;
            let target = new.as_ref().unwrap_or(m);
            sr.revision_after = target.revision;
            let sealed = target.seal(keys)?;
            let (copies, written) = commit(&fleet, &held, target, &sealed, new.is_some()).await;
            sr.catalog_copies = copies;
            report.catalog_copies_written += written;
            if new.is_some() && copies == 0 {
                anyhow::bail!(
                    "no agent took revision {} of snapshot {}; the rebuilt shards are unreferenced (gc collects them)",
                    target.revision,
                    target.snapshot
                );
            }
        }
    } else {
        for (m, sr) in manifests.iter().zip(report.snapshots.iter_mut()) {
            let (new, slots_moved) = revise(m, &moved, &fleet);
            sr.slots_moved = slots_moved;
            sr.revision_after = new.map_or(m.revision, |n| n.revision);
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Reads stripe `stripe` from k good shards, encodes it again and stores the shards `targets`
/// names; per index the agent it went to, or why not; and the bytes stored.
async fn rebuild(
    reader: &StripeReader,
    codec: &Arc<StripeCodec>,
    stripe: u64,
    id: StripeId,
    targets: Vec<(usize, Option<[u8; 16]>, Option<AgentClient>)>,
) -> (Placed, u64) {
    let fail_all = |why: String| {
        targets
            .iter()
            .map(|(idx, _, _)| (*idx, Err(why.clone())))
            .collect()
    };
    let plain = match reader.read(stripe).await {
        Ok(d) => d.data,
        Err(lost) => {
            return (
                fail_all(format!("cannot read the stripe: {}", lost.error)),
                0,
            )
        }
    };
    let c2 = codec.clone();
    let encoded = match tokio::task::spawn_blocking(move || c2.encode(id, plain)).await {
        Ok(e) if e.id == id => e,
        Ok(_) => return (fail_all("re-encoded stripe has another id".into()), 0),
        Err(e) => return (fail_all(format!("encode task: {e}")), 0),
    };
    let mut out = Vec::new();
    let mut bytes = 0;
    for (idx, target, client) in targets {
        let r = match (target, client) {
            (None, _) => Err("no reachable agent outside the stripe has room".to_string()),
            (Some(_), None) => Err("target agent went away".to_string()),
            (Some(t), Some(c)) => {
                let file = encoded.shards[idx].clone();
                let len = file.len() as u64;
                match c.put_shard(&codec.key(&id, idx), file).await {
                    Ok(()) => {
                        bytes += len;
                        Ok(t)
                    }
                    Err(e) => Err(format!("{}: {e}", c.addr())),
                }
            }
        };
        out.push((idx, r));
    }
    (out, bytes)
}

/// The next revision of `m` with moved shards' slots changed (None when nothing moved), and how
/// many slots changed.
fn revise(
    m: &Manifest,
    moved: &HashMap<WorkKey, Vec<[u8; 16]>>,
    fleet: &Fleet,
) -> (Option<Manifest>, u64) {
    let mut new = m.clone();
    let mut changed = 0;
    for s in new.stripes.iter_mut() {
        let StripeRef::Data { id, slots } = s else {
            continue;
        };
        let placed: Vec<[u8; 16]> = slots.iter().map(|&s| m.agents[s as usize].id).collect();
        let Some(now) = moved.get(&(m.volume, *id, placed.clone())) else {
            continue;
        };
        for (idx, agent) in now.iter().enumerate() {
            if *agent == placed[idx] {
                continue;
            }
            let slot = match new.agents.iter().position(|a| a.id == *agent) {
                Some(p) => p,
                None => {
                    let addr = fleet
                        .members
                        .iter()
                        .find(|x| x.id == *agent)
                        .map(|x| x.addr.clone())
                        .unwrap_or_default();
                    new.agents.push(AgentEntry { id: *agent, addr });
                    new.agents.len() - 1
                }
            };
            slots[idx] = slot as u16;
            changed += 1;
        }
    }
    if changed == 0 {
        return (None, 0);
    }
    new.revision = m.revision + 1;
    (Some(new), changed)
}

/// Manifest blob names each reachable agent holds, by agent id.
async fn list_catalogs(fleet: &Fleet) -> HashMap<[u8; 16], Vec<String>> {
    let mut out = HashMap::new();
    for m in fleet.reachable() {
        if let Some(c) = &m.client {
            match c.list_blobs(SNAPSHOT_BLOB_PREFIX).await {
                Ok(n) => {
                    out.insert(m.id, n);
                }
                Err(e) => tracing::warn!("{}: cannot list its catalog: {e}", m.addr),
            }
        }
    }
    out
}

/// Stores `m` (sealed) on every reachable agent that lacks it (all of them for a new revision),
/// then deletes its older revisions there. Returns (agents holding it now, copies written).
async fn commit(
    fleet: &Fleet,
    held: &HashMap<[u8; 16], Vec<String>>,
    m: &Manifest,
    sealed: &[u8],
    new_revision: bool,
) -> (u64, u64) {
    let name = m.blob_name();
    let mut holding = 0;
    let mut written = 0;
    for member in fleet.reachable() {
        let Some(c) = &member.client else { continue };
        let names = held.get(&member.id).cloned().unwrap_or_default();
        if new_revision || !names.contains(&name) {
            if let Err(e) = c.put_blob(&name, sealed.to_vec()).await {
                tracing::warn!("{}: catalog entry {name} not stored: {e}", member.addr);
                continue;
            }
            written += 1;
        }
        holding += 1;
        for old in names.iter().filter(|n| {
            parse_blob_name(n).is_some_and(|(id, rev)| id == m.snapshot && rev < m.revision)
        }) {
            if let Err(e) = c.delete_blob(old).await {
                tracing::warn!("{}: superseded {old} not deleted: {e}", member.addr);
            }
        }
    }
    (holding, written)
}

pub fn print_text(r: &RepairReport) {
    let verb = if r.dry_run {
        "would rebuild"
    } else {
        "rebuilt"
    };
    let mut per_target: BTreeMap<&str, u64> = BTreeMap::new();
    for m in &r.moves {
        if !m.outcome.starts_with("failed") {
            *per_target.entry(m.to.as_str()).or_default() += 1;
        }
    }
    for s in &r.snapshots {
        if s.absent_shards > 0 || s.crowded_shards > 0 || s.revision_after != s.revision_before {
            println!(
                "snapshot {}: {} shard(s) absent{}{}, {} slot(s) moved, revision {} -> {}{}",
                s.snapshot,
                s.absent_shards,
                if s.held_shards > 0 {
                    format!(
                        " ({} held back: their agent is not missing long enough)",
                        s.held_shards
                    )
                } else {
                    String::new()
                },
                if s.crowded_shards > 0 {
                    format!(", {} crowded (two on one agent)", s.crowded_shards)
                } else {
                    String::new()
                },
                s.slots_moved,
                s.revision_before,
                s.revision_after,
                if s.lost_stripes > 0 {
                    format!(", {} stripe(s) LOST", s.lost_stripes)
                } else {
                    String::new()
                }
            );
        }
    }
    for (to, n) in &per_target {
        println!("  {verb} {n} shard(s) onto {to}");
    }
    for m in r
        .moves
        .iter()
        .filter(|m| m.outcome.starts_with("failed"))
        .take(20)
    {
        println!(
            "  stripe {}… shard {}: {}",
            &m.stripe[..12],
            m.index,
            m.outcome
        );
    }
    if r.stripes_repaired == 0 && r.stripes_lost == 0 && r.shards_held > 0 {
        println!(
            "{} shard(s) held back until their agent has been missing long enough",
            r.shards_held
        );
    } else if r.stripes_repaired == 0 && r.stripes_lost == 0 {
        println!("nothing to repair: every shard is present, each stripe on distinct agents");
    } else if !r.dry_run {
        println!(
            "{verb} {} shard(s), {} in {:.1}s ({:.1} MB/s); {} catalog copies written",
            r.shards_rebuilt,
            format_size(r.bytes_rebuilt),
            r.rebuild_seconds,
            r.rebuild_mb_per_s,
            r.catalog_copies_written
        );
    }
    if r.stripes_lost > 0 {
        println!(
            "{} stripe(s) have fewer than k shards: bring back the agents that are down",
            r.stripes_lost
        );
    }
}

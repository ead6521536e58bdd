//! Repair: rebuild every shard that is absent (missing, quarantined by a scrub, or on
//! an agent that does not answer) and store it where the stripe has no other shard; then write a
//! new revision of every manifest whose slots changed.
//!
//! 1. The catalog (newest revisions), the fleet and shard presence, as `status` sees them
//!    ([`crate::fleet::census`]).
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
//! [`watch`] runs [`repair_pass`] in a loop and holds back the shards of agents missing for less
//! than the repair delay. Retiring an agent ([`crate::agents::retire`]) is one pass that holds
//! back every other missing agent, so only the retired agent's shards are rebuilt.
//!
//! [`RepairReport::exit_code`]: 0 everything rebuilt (or nothing to do); 2 some shard could not be
//! placed (too few agents outside a stripe); 3 some stripe is lost (fewer than k shards left).
//!
//! Files: [`plan`] (what is absent or crowded, per distinct stripe, and where each shard goes),
//! `rebuild` (read, re-encode, store, sync), `commit` (new manifest revisions), [`watch`].

pub mod plan;
mod rebuild;
mod revise;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use sa_core::keys::hex;
use sa_core::seal::StripeId;
use sa_core::shard::VolumeId;
use serde::Serialize;

use crate::catalog;
use crate::error::{Error, Result};
use crate::fleet::census::{Census, Presence};
use crate::fleet::seen::SeenBook;
use crate::fleet::{Access, Fleet};
use plan::Work;

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
    /// Bytes of shard files read from agents to rebuild them (k per byte rebuilt with the
    /// Reed-Solomon and XOR codes; more when hedged or failed fetches had to be replaced).
    pub bytes_read: u64,
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

/// Settings of one repair pass.
#[derive(Debug, Clone, Default)]
pub struct PassOptions {
    /// Plan only.
    pub dry_run: bool,
    /// Manifest cache and sightings root.
    pub cache_dir: Option<PathBuf>,
    /// Agent addresses (the catalog and the book name the rest).
    pub agents: Vec<String>,
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

pub(crate) type WorkKey = (VolumeId, StripeId, Vec<[u8; 16]>);
/// Per absent shard index: the agent it was stored on, or why not.
pub(crate) type Placed = Vec<(usize, Result<[u8; 16], String>)>;

/// One repair: gathers the catalog, the census and presence, rebuilds what is absent or
/// crowded, and commits new manifest revisions. `hold` is asked once, with the census: the absent
/// shards of the agents it names (unreachable ones) are left alone this time.
pub async fn repair_pass(
    fleet: &Fleet,
    opts: &PassOptions,
    hold: &mut (dyn FnMut(&Census) -> HashSet<[u8; 16]> + Send),
) -> Result<RepairReport> {
    let started = Instant::now();
    let mut cat = catalog::open(fleet, &opts.agents, Access::Write).await?;
    // Members asleep are woken first: a shard on a PC that wakes is not absent.
    fleet
        .wake_sleepers(
            &mut cat.reach,
            &crate::fleet::sleepers::Need::Readable(cat.manifests.iter().collect()),
            &crate::progress::NoProgress,
        )
        .await?;
    let manifests = cat.manifests;
    let _awake = crate::fleet::keepalive::KeepAlive::start(&cat.reach.live());
    let census = Census::gather(fleet, &cat.reach, &manifests).await;
    SeenBook::open(opts.cache_dir.as_deref(), fleet.keys())
        .record(&census, fleet.clock().now_secs());
    let held_agents = hold(&census);
    let mut volumes: Vec<VolumeId> = manifests.iter().map(|m| m.volume).collect();
    volumes.sort();
    volumes.dedup();
    let presence = Presence::gather(&census, &volumes).await;
    for (a, e) in &presence.failed {
        tracing::warn!("{a}: cannot list its shards ({e}); counting them as absent");
    }
    let mut report = RepairReport {
        dry_run: opts.dry_run,
        ..Default::default()
    };
    // 1. What is absent, per distinct stripe; 2. where each shard goes.
    let mut work = plan::find_work(
        &manifests,
        &census,
        &presence,
        &held_agents,
        fleet.offsite().is_some(),
        &mut report,
    );
    plan::choose_targets(&mut work, &manifests, &census);
    report.stripes_lost = work.iter().filter(|w| w.lost).count() as u64;
    report.stripes_repaired = work.iter().filter(|w| !w.lost).count() as u64;
    // 3. Rebuild and store.
    let rebuild_started = Instant::now();
    let outcomes = if opts.dry_run {
        rebuild::plan_only(&work)
    } else {
        let done = rebuild::rebuild_all(fleet, &work, &manifests, &census).await?;
        report.bytes_rebuilt = done.bytes_stored;
        report.bytes_read = done.bytes_read;
        done.outcomes
    };
    report.rebuild_seconds = rebuild_started.elapsed().as_secs_f64();
    report.rebuild_mb_per_s = report.bytes_rebuilt as f64 / 1e6 / report.rebuild_seconds.max(1e-9);
    let moved = tally(&work, &outcomes, &census, opts.dry_run, &mut report);
    // 4. New revisions where slots changed; catalog copies where an agent lacks one.
    revise::commit_all(
        fleet,
        &manifests,
        &moved,
        &census,
        opts.dry_run,
        &mut report,
    )
    .await?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Counts what each rebuild did and lists the moves; returns where each distinct stripe's
/// shards live now (only those that changed).
fn tally(
    work: &[Work],
    outcomes: &HashMap<usize, Placed>,
    census: &Census,
    dry_run: bool,
    report: &mut RepairReport,
) -> HashMap<WorkKey, Vec<[u8; 16]>> {
    let name_of = |id: &[u8; 16]| {
        census
            .members
            .iter()
            .find(|m| &m.id == id)
            .map(|m| m.addr.clone())
            .unwrap_or_else(|| hex(id))
    };
    let mut moved: HashMap<WorkKey, Vec<[u8; 16]>> = HashMap::new();
    for (wi, res) in outcomes {
        let w = &work[*wi];
        let mut now = w.placed.clone();
        for (idx, r) in res {
            let crowded = w.crowded.contains(idx);
            let outcome = match r {
                Ok(t) => {
                    report.shards_rebuilt += u64::from(!dry_run);
                    report.shards_spread += u64::from(crowded && *t != w.placed[*idx]);
                    now[*idx] = *t;
                    if dry_run { "planned" } else { "rebuilt" }.to_string()
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
    moved
}

/// An error for a repair that could not commit.
pub(crate) fn not_committed(msg: String) -> Error {
    Error::failed(msg)
}

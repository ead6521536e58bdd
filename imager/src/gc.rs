//! Forgetting snapshots and collecting the shards nobody needs any more.
//!
//! # The protocol: tombstones, leases, mark and sweep with a grace period
//!
//! Agents are dumb stores; every decision is made here, from the catalog, which every agent holds
//! a copy of. Four kinds of catalog blobs take part:
//! `snap-<ID>` (a committed manifest), `forgotten-<ID>` (a tombstone), `lease-<ID>` (a running
//! snapshot), and the shard files themselves.
//!
//! **Forget** (`forget`, `prune`): for each snapshot, first a sealed tombstone `forgotten-<ID>`
//! goes to every reachable agent, then `snap-<ID>` is deleted from every reachable agent unless
//! a live lease names it as its base (then a later collection deletes it). An agent
//! that was offline keeps its stale `snap-<ID>`, but the tombstone hides it from `list`,
//! `restore` and reuse (see `sa_core::catalog::load_catalog`), and the next collection deletes it
//! there. Tombstones are authenticated: an agent cannot forge one.
//!
//! **Snapshot**: before its first shard is stored, a snapshot writes a sealed lease
//! `lease-<ID>` (its own id, the id of the base snapshot whose stripes it will reuse, its start
//! time) to every agent it uses, *then* checks that the base has no tombstone on any of them
//! (if it has, it reuses nothing from it). It deletes the lease only after its manifest is
//! committed on every agent.
//!
//! **Collect** (`gc`, and after `forget`/`prune`), over every reachable agent:
//! 1. read the leases of every agent (expired ones, older than [`LEASE_TTL`], are ignored and
//!    deleted: they belong to snapshots that died);
//! 2. *then* read every agent's tombstones and `snap-` names, and open each manifest (from any
//!    agent that has it). A manifest that is listed but cannot be opened stops the collection:
//!    an unknown manifest may reference anything;
//! 3. mark: the kept set is every manifest without a tombstone, plus the base of every live
//!    lease (even if forgotten in the meantime); per agent (by stable id), the shard keys those
//!    manifests place on it;
//! 4. sweep: every shard an agent holds (`LIST_SHARDS`) that is not marked for that agent is
//!    deleted with `SWEEP_SHARDS`, which the agent carries out only for files older than
//!    `min_age` seconds by its own clock, where `min_age` is the grace period (`--gc-grace`,
//!    default 1h) plus, while any lease is live, the age of the oldest one;
//! 5. catalog repair: `snap-<ID>` blobs that have a tombstone (and no live lease) are deleted
//!    from the agents that still hold them.
//!
//! Why a running snapshot is safe: its shards are either *new* (stored since it started, so
//! younger than its lease: kept by `min_age`; re-storing an existing identical shard refreshes
//! its time on the agent, and the agent's sweep and store exclude each other), or *reused* from
//! its base. If the collector read the leases before the lease existed, the snapshot's tombstone
//! check came after step 1, hence after the forget that preceded the collection: it sees the
//! tombstone and reuses nothing. If the collector read the leases after the lease was deleted,
//! the manifest was committed before, so step 2 sees it and marks its shards.
//!
//! Why an offline agent is safe and catches up: nothing is deleted on an agent the collector
//! cannot reach, and its tombstones, manifests and shards are judged on its return against the
//! union of all agents' catalogs.
//!
//! Known limits: a snapshot whose manifest reached *only* an agent that is offline during a
//! collection is unknown to it, and its shards on other agents older than the grace period are
//! collected (a snapshot commits its manifest on every agent it used, so this needs a failure
//! during the commit and an agent lost right after). Tombstones are never deleted (tens of bytes
//! each).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use sa_core::catalog::{Lease, Tombstone, FORGOTTEN_BLOB_PREFIX, LEASE_BLOB_PREFIX};
use sa_core::keys::{hex, unhex, Keys};
use sa_core::manifest::{
    group_revisions, parse_blob_name, Manifest, StripeRef, SNAPSHOT_BLOB_PREFIX,
};
use sa_core::shard::ShardKey;
use sa_core::store::{AgentClient, ShardRead, ShardWrite};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::agents::Attempt;

/// A lease older than this belongs to a snapshot that died: it no longer protects anything.
pub const LEASE_TTL: u64 = 7 * 86400;
/// Default grace period: shards younger than this are never collected.
pub const DEFAULT_GRACE: &str = "1h";

/// Unix seconds now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Parses a duration: `0`, `90s`, `30m`, `1h`, `2d`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .with_context(|| format!("'{s}' is not a duration such as 0s, 30m, 1h, 2d"))?;
    let mul = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86400,
        u => bail!("'{s}': unknown unit '{u}' (use s, m, h or d)"),
    };
    Ok(n * mul)
}

/// The catalog as the union of every reachable agent's copy.
pub struct Catalog {
    /// Committed manifests without a tombstone, oldest first.
    pub live: Vec<Manifest>,
    /// Manifests with a tombstone that a live lease still names (kept until the lease ends).
    pub leased_forgotten: Vec<Manifest>,
    /// Older revisions of kept snapshots (replaced by a repair): their shards are kept too.
    pub superseded: Vec<Manifest>,
    /// Tombstoned snapshot ids.
    pub tombstones: HashSet<String>,
    /// Live leases.
    pub leases: Vec<Lease>,
    /// Expired lease blob names, per agent index.
    pub expired_leases: Vec<(usize, String)>,
    /// `snap-` names per agent index (to repair stale copies).
    pub snap_names: Vec<(usize, String)>,
}

/// Live leases (union over `clients`) and expired lease blobs per client index.
async fn read_leases(
    clients: &[AgentClient],
    keys: &Keys,
) -> Result<(Vec<Lease>, Vec<(usize, String)>)> {
    let now = now_secs();
    let mut leases: BTreeMap<String, Lease> = BTreeMap::new();
    let mut expired_leases = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for name in c
            .list_blobs(LEASE_BLOB_PREFIX)
            .await
            .with_context(|| format!("{}: cannot list leases", c.addr()))?
        {
            match c
                .get_blob(&name)
                .await
                .and_then(|b| Lease::open(keys, &name, &b))
            {
                Ok(l) if l.started + LEASE_TTL < now => expired_leases.push((i, name)),
                Ok(l) => {
                    leases.insert(l.id.clone(), l);
                }
                Err(sa_core::Error::ShardMissing) => {}
                Err(e) => tracing::warn!("{}: ignoring {name}: {e}", c.addr()),
            }
        }
    }
    Ok((leases.into_values().collect(), expired_leases))
}

/// Reads the catalog from every client: leases first, then tombstones and manifests (the order
/// the protocol needs, see the module docs).
pub async fn read_catalog(clients: &[AgentClient], keys: &Keys) -> Result<Catalog> {
    let (leases, expired_leases) = read_leases(clients, keys).await?;
    let mut tombstones = HashSet::new();
    let mut snap_names = Vec::new();
    let mut holders: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in clients.iter().enumerate() {
        for name in c
            .list_blobs(FORGOTTEN_BLOB_PREFIX)
            .await
            .with_context(|| format!("{}: cannot list", c.addr()))?
        {
            let id = name[FORGOTTEN_BLOB_PREFIX.len()..].to_string();
            if tombstones.contains(&id) {
                continue;
            }
            match c
                .get_blob(&name)
                .await
                .and_then(|b| Tombstone::open(keys, &name, &b))
            {
                Ok(t) => {
                    tombstones.insert(t.snapshot);
                }
                Err(sa_core::Error::ShardMissing) => {}
                Err(e) => tracing::warn!("{}: ignoring {name}: {e}", c.addr()),
            }
        }
        for name in c
            .list_blobs(SNAPSHOT_BLOB_PREFIX)
            .await
            .with_context(|| format!("{}: cannot list", c.addr()))?
        {
            holders.entry(name.clone()).or_default().push(i);
            snap_names.push((i, name));
        }
    }
    let leased: HashSet<&str> = leases.iter().filter_map(|l| l.base.as_deref()).collect();
    let mut live = Vec::new();
    let mut leased_forgotten = Vec::new();
    let mut superseded = Vec::new();
    let revisions = group_revisions(holders.keys().map(String::as_str));
    for (id, revs) in &revisions {
        let forgotten = tombstones.contains(id.as_str());
        if forgotten && !leased.contains(id.as_str()) {
            continue;
        }
        // Every revision present is opened: the newest describes the snapshot, and the shards
        // the older ones place are kept too (an agent offline during a repair still has one).
        let mut newest: Option<Manifest> = None;
        for (_, name) in revs {
            let mut opened = None;
            let mut errors = Vec::new();
            let mut only_missing = true;
            for &i in &holders[name] {
                match clients[i]
                    .get_blob(name)
                    .await
                    .and_then(|b| Manifest::open(keys, name, &b))
                {
                    Ok(m) => {
                        opened = Some(m);
                        break;
                    }
                    Err(e) => {
                        only_missing &= matches!(e, sa_core::Error::ShardMissing);
                        errors.push(format!("{}: {e}", clients[i].addr()));
                    }
                }
            }
            match opened {
                Some(m) if newest.is_none() => newest = Some(m),
                Some(m) => superseded.push(m),
                // Every copy vanished between list and get: a concurrent forget or repair.
                None if only_missing => {}
                None => bail!(
                    "catalog entry {name} cannot be opened on any agent ({}); nothing is collected while a \
                     manifest is unreadable: is this the right key? run `sa-image list` to see",
                    errors.join("; ")
                ),
            }
        }
        match newest {
            Some(m) if forgotten => leased_forgotten.push(m),
            Some(m) => live.push(m),
            None => {}
        }
    }
    sa_core::catalog::sort_by_creation(&mut live);
    Ok(Catalog {
        live,
        leased_forgotten,
        superseded,
        tombstones,
        leases,
        expired_leases,
        snap_names,
    })
}

/// Writes tombstones for `ids` on every client, then deletes their `snap-` blobs, except those a
/// live lease names as its base (a running snapshot reuses their stripes: the collector keeps
/// them until the lease ends, then deletes them). Fails if no client took a tombstone (nothing is
/// deleted then).
pub async fn forget(clients: &[AgentClient], keys: &Keys, ids: &[String]) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    for id in ids {
        let t = Tombstone {
            snapshot: id.clone(),
            forgotten_at: now_secs(),
        };
        let sealed = t.seal(keys)?;
        let name = Tombstone::blob_name_of(id);
        let mut stored = 0;
        for c in clients {
            match c.put_blob(&name, sealed.clone()).await {
                Ok(()) => stored += 1,
                Err(e) => warnings.push(format!("{}: tombstone of {id} not stored: {e}", c.addr())),
            }
        }
        if stored == 0 {
            bail!(
                "no agent accepted the tombstone of snapshot {id}; nothing forgotten: {}",
                warnings.join("; ")
            );
        }
    }
    // Leases read after the tombstones are down: a snapshot that leases a base later sees its
    // tombstone and does not use it.
    let (leases, _) = read_leases(clients, keys).await?;
    for id in ids {
        if leases
            .iter()
            .any(|l| l.base.as_deref() == Some(id.as_str()))
        {
            continue;
        }
        let prefix = format!("{SNAPSHOT_BLOB_PREFIX}{id}");
        for c in clients {
            // Every revision of it (repair writes `snap-<ID>.r<N>`).
            let names = match c.list_blobs(&prefix).await {
                Ok(n) => n,
                Err(e) => {
                    warnings.push(format!(
                        "{}: {prefix} not deleted (the tombstone hides it): {e}",
                        c.addr()
                    ));
                    continue;
                }
            };
            for name in names
                .into_iter()
                .filter(|n| parse_blob_name(n).is_some_and(|(i, _)| i == id))
            {
                if let Err(e) = c.delete_blob(&name).await {
                    warnings.push(format!(
                        "{}: {name} not deleted (the tombstone hides it): {e}",
                        c.addr()
                    ));
                }
            }
        }
    }
    Ok(warnings)
}

/// Settings of a collection.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Shards younger than this many seconds are never collected.
    pub grace: u64,
    /// Report only.
    pub dry_run: bool,
}

/// What a collection did on one agent.
#[derive(Serialize, Debug, Clone, Default)]
pub struct AgentGc {
    /// Address.
    pub addr: String,
    /// Stable id (hex).
    pub agent_id: String,
    /// `done`, `unreachable: ...` or `failed: ...`.
    pub status: String,
    /// Shard files the agent holds before.
    pub shards_before: u64,
    /// Shards referenced by kept snapshots.
    pub shards_referenced: u64,
    /// Unreferenced shards deleted (or that would be, with --dry-run).
    pub shards_deleted: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Unreferenced shards kept because they are younger than the grace period or a lease.
    pub shards_young: u64,
    /// Catalog blobs deleted (stale manifests with a tombstone, expired leases).
    pub catalog_blobs_deleted: u64,
}

/// What a collection did.
#[derive(Serialize, Debug, Clone, Default)]
pub struct GcReport {
    /// Kept snapshots (live, plus forgotten ones still named by a lease).
    pub snapshots_kept: usize,
    /// Live leases (running snapshots).
    pub leases: usize,
    /// The age below which nothing was collected, seconds.
    pub min_age: u64,
    /// Per agent.
    pub agents: Vec<AgentGc>,
    /// Totals.
    pub shards_deleted: u64,
    /// Bytes freed in all.
    pub bytes_freed: u64,
}

/// Shard keys each agent (by stable id) must keep for `manifests`.
fn mark(manifests: &[&Manifest]) -> HashMap<[u8; 16], HashSet<ShardKey>> {
    let mut keep: HashMap<[u8; 16], HashSet<ShardKey>> = HashMap::new();
    for m in manifests {
        for s in &m.stripes {
            if let StripeRef::Data { id, slots } = s {
                for (index, &slot) in slots.iter().enumerate() {
                    let agent = m.agents[slot as usize].id;
                    keep.entry(agent).or_default().insert(ShardKey {
                        volume: m.volume,
                        stripe: *id,
                        index: index as u8,
                    });
                }
            }
        }
    }
    keep
}

/// Runs a collection over the reachable agents of `attempts` (unreachable ones are reported and
/// left alone: the next collection cleans them).
pub async fn collect(attempts: &[Attempt], keys: &Arc<Keys>, opts: GcOptions) -> Result<GcReport> {
    let clients = crate::agents::live_or_none(attempts)?;
    let cat = read_catalog(&clients, keys).await?;
    let now = now_secs();
    let oldest_lease = cat.leases.iter().map(|l| l.started).min();
    let min_age = opts.grace
        + oldest_lease
            .map(|s| now.saturating_sub(s) + 60)
            .unwrap_or(0);
    let kept: Vec<&Manifest> = cat.live.iter().chain(&cat.leased_forgotten).collect();
    let marked: Vec<&Manifest> = kept.iter().copied().chain(&cat.superseded).collect();
    let keep = Arc::new(mark(&marked));
    let leased: HashSet<String> = cat.leases.iter().filter_map(|l| l.base.clone()).collect();

    let mut report = GcReport {
        snapshots_kept: kept.len(),
        leases: cat.leases.len(),
        min_age,
        ..Default::default()
    };
    let mut tasks = JoinSet::new();
    for (i, c) in clients.iter().enumerate() {
        let stale: Vec<String> = cat
            .snap_names
            .iter()
            .filter(|(j, n)| {
                *j == i
                    && parse_blob_name(n)
                        .is_some_and(|(id, _)| cat.tombstones.contains(id) && !leased.contains(id))
            })
            .map(|(_, n)| n.clone())
            .chain(
                cat.expired_leases
                    .iter()
                    .filter(|(j, _)| *j == i)
                    .map(|(_, n)| n.clone()),
            )
            .collect();
        let (c, keep) = (c.clone(), keep.clone());
        tasks.spawn(async move {
            let mut a = AgentGc {
                addr: c.addr().to_string(),
                agent_id: hex(&c.agent_id()),
                ..Default::default()
            };
            match sweep_agent(&c, &keep, stale, min_age, opts.dry_run, &mut a).await {
                Ok(()) => a.status = "done".into(),
                Err(e) => a.status = format!("failed: {e}"),
            }
            a
        });
    }
    while let Some(r) = tasks.join_next().await {
        let a = r.context("gc task failed")?;
        report.shards_deleted += a.shards_deleted;
        report.bytes_freed += a.bytes_freed;
        report.agents.push(a);
    }
    for (addr, r) in attempts {
        if let Err(e) = r {
            report.agents.push(AgentGc {
                addr: addr.clone(),
                status: format!("unreachable: {e} (collected when it is back and gc runs again)"),
                ..Default::default()
            });
        }
    }
    report.agents.sort_by(|a, b| a.addr.cmp(&b.addr));
    Ok(report)
}

async fn sweep_agent(
    c: &AgentClient,
    keep: &HashMap<[u8; 16], HashSet<ShardKey>>,
    stale_blobs: Vec<String>,
    min_age: u64,
    dry_run: bool,
    a: &mut AgentGc,
) -> Result<()> {
    let empty = HashSet::new();
    let mine = keep.get(&c.agent_id()).unwrap_or(&empty);
    for vol in c
        .list_volumes()
        .await
        .context("cannot list volumes (agent older than this sa-image?)")?
    {
        let Some(v) = unhex(&vol).filter(|v| v.len() == 16) else {
            continue;
        };
        let mut volume = [0u8; 16];
        volume.copy_from_slice(&v);
        let mut doomed = Vec::new();
        for bucket in 0..=255u8 {
            for e in c.list_shards(&volume, bucket).await? {
                a.shards_before += 1;
                let key = ShardKey {
                    volume,
                    stripe: e.stripe,
                    index: e.index,
                };
                if mine.contains(&key) {
                    a.shards_referenced += 1;
                } else if e.age < min_age {
                    a.shards_young += 1;
                } else {
                    doomed.push(key);
                }
            }
        }
        if dry_run {
            a.shards_deleted += doomed.len() as u64;
        } else if !doomed.is_empty() {
            let s = c.sweep(min_age, doomed).await?;
            a.shards_deleted += s.deleted;
            a.bytes_freed += s.bytes;
            a.shards_young += s.young;
        }
    }
    if !dry_run {
        for name in stale_blobs {
            c.delete_blob(&name).await?;
            a.catalog_blobs_deleted += 1;
        }
    }
    Ok(())
}

/// Prints a collection report for people.
pub fn print_report(r: &GcReport, dry_run: bool) {
    let verb = if dry_run { "would delete" } else { "deleted" };
    println!(
        "garbage collection: {} snapshot(s) kept, {} running, shards younger than {}s kept",
        r.snapshots_kept, r.leases, r.min_age
    );
    for a in &r.agents {
        if a.status == "done" {
            println!(
                "  {}: {} of {} shard files referenced; {verb} {} ({}), {} unreferenced but young, {} stale catalog blob(s) removed",
                a.addr,
                a.shards_referenced,
                a.shards_before,
                a.shards_deleted,
                sa_core::size::format_size(a.bytes_freed),
                a.shards_young,
                a.catalog_blobs_deleted
            );
        } else {
            println!("  {}: {}", a.addr, a.status);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        assert_eq!(super::parse_duration("0").unwrap(), 0);
        assert_eq!(super::parse_duration("0s").unwrap(), 0);
        assert_eq!(super::parse_duration("90").unwrap(), 90);
        assert_eq!(super::parse_duration("30m").unwrap(), 1800);
        assert_eq!(super::parse_duration("1h").unwrap(), 3600);
        assert_eq!(super::parse_duration("2d").unwrap(), 172_800);
        assert!(super::parse_duration("1y").is_err());
        assert!(super::parse_duration("h").is_err());
    }
}

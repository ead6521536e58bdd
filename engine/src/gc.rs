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
//! `restore` and reuse (see [`crate::catalog`]), and the next collection deletes it there. Tombstones are authenticated: an agent cannot forge one.
//!
//! **Snapshot**: before its first shard is stored, a snapshot writes a sealed lease
//! `lease-<ID>` (its own id, the id of the base snapshot whose stripes it will reuse, its start
//! time) to every agent it uses, *then* checks that the base has no tombstone on any of them
//! (if it has, it reuses nothing from it). It deletes the lease only after its manifest is
//! committed on every agent.
//!
//! Every step reaches the agents given *and every member of the agent book in service*
//! ([`crate::fleet`]), so a forget through one agent's address is a forget on all of them.
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
//!    from the agents that still hold them, and every tombstone is copied to the agents that lack
//!    it: a forget decided while an agent was down reaches it when it is back.
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

mod collect;
mod forget;

use std::collections::{BTreeMap, HashSet};

use sa_core::catalog::{Lease, Tombstone, FORGOTTEN_BLOB_PREFIX, LEASE_BLOB_PREFIX};
use sa_core::keys::Keys;
use sa_core::manifest::{group_revisions, Manifest, SNAPSHOT_BLOB_PREFIX};
use sa_core::store::{AgentClient, ShardRead};

pub use collect::{collect, AgentGc, GcOptions, GcReport};
pub use forget::forget;

use crate::error::{Error, Result};

/// A lease older than this belongs to a snapshot that died: it no longer protects anything.
pub const LEASE_TTL: u64 = 7 * 86400;
/// Default grace period: shards younger than this are never collected.
pub const DEFAULT_GRACE: std::time::Duration = std::time::Duration::from_secs(3600);

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

/// Live leases (union over `clients`) and expired lease blobs per client index, at `now`
/// (Unix seconds).
pub(crate) async fn read_leases(
    clients: &[AgentClient],
    keys: &Keys,
    now: u64,
) -> Result<(Vec<Lease>, Vec<(usize, String)>)> {
    let mut leases: BTreeMap<String, Lease> = BTreeMap::new();
    let mut expired_leases = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for name in c
            .list_blobs(LEASE_BLOB_PREFIX)
            .await
            .map_err(|e| Error::failed(format!("{}: cannot list leases: {e}", c.addr())))?
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
pub async fn read_catalog(clients: &[AgentClient], keys: &Keys, now: u64) -> Result<Catalog> {
    let (leases, expired_leases) = read_leases(clients, keys, now).await?;
    let mut tombstones = HashSet::new();
    let mut snap_names = Vec::new();
    let mut holders: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, c) in clients.iter().enumerate() {
        for name in c
            .list_blobs(FORGOTTEN_BLOB_PREFIX)
            .await
            .map_err(|e| Error::failed(format!("{}: cannot list its catalog: {e}", c.addr())))?
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
            .map_err(|e| Error::failed(format!("{}: cannot list its catalog: {e}", c.addr())))?
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
                None => {
                    return Err(Error::failed(format!(
                        "catalog entry {name} cannot be opened on any agent ({}); nothing is collected while a \
                         manifest is unreadable: is this the right key? run `sa-image list` to see",
                        errors.join("; ")
                    )))
                }
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

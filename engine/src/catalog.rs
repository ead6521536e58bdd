//! The catalog as readers see it: every live snapshot's newest manifest revision, read from
//! the whole fleet, and a snapshot picked by id, prefix or `latest` of a volume.
//!
//! Every reachable agent (the ones given and every member of the book in service, see
//! [`crate::fleet`]) is asked for the names it holds (cheap), and each snapshot's manifest is read
//! from the first agent that holds a sound copy: a damaged or missing copy on one agent falls
//! through to the next. A snapshot with a tombstone on *any* reachable agent is hidden, so a
//! `forget` decided while one agent was down stays decided when that agent is the one asked.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use sa_core::catalog::sort_by_creation;
use sa_core::keys::hex;
use sa_core::manifest::{group_revisions, Manifest, StripeRef, SNAPSHOT_BLOB_PREFIX};
use sa_core::store::{AgentClient, ShardRead};

use crate::error::{Error, Result};
use crate::fleet::{agent_name, Access, Fleet, Reach};

/// The live snapshots, oldest first, and the agents reached to read them.
pub struct Catalog {
    /// Newest revision of every snapshot without a tombstone, oldest first.
    pub manifests: Vec<Manifest>,
    /// The agents reached.
    pub reach: Reach,
}

/// Reaches the fleet through `addrs` and reads the catalog. When no agent answers and the
/// fleet wakes sleepers, the book's members (as this machine's copy knows them) are woken
/// until one answers.
///
/// With an offsite tier ([`Fleet::with_offsite`]): `--offsite-only` reads the catalog from the
/// bucket and reaches no agent; otherwise the bucket's catalog is used only when no agent
/// answers, even after waking sleepers (with a warning: the bucket may lag the agents by the
/// last push).
pub async fn open(fleet: &Fleet, addrs: &[String], access: Access) -> Result<Catalog> {
    if let (Some(offsite), true) = (fleet.offsite(), fleet.offsite_only()) {
        return from_offsite(fleet, offsite).await;
    }
    let mut reach = fleet.reach(addrs, access).await;
    if reach.live().is_empty() {
        // Sleeping PCs first (the LAN copy is the fast one), then the bucket.
        let woken = fleet
            .wake_sleepers(
                &mut reach,
                &crate::fleet::sleepers::Need::Agents(1),
                &crate::progress::NoProgress,
            )
            .await;
        if reach.live().is_empty() {
            if let (Some(offsite), Access::Read) = (fleet.offsite(), access) {
                tracing::warn!(
                    "no agent answers ({}); reading the catalog from the offsite copy {}",
                    reach
                        .live_or_none()
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                    offsite.name()
                );
                let mut cat = from_offsite(fleet, offsite).await?;
                cat.reach = reach;
                return Ok(cat);
            }
        }
        woken?;
    }
    let live = reach.live_or_none()?;
    let manifests = read(fleet, &live).await?;
    Ok(Catalog { manifests, reach })
}

/// The catalog as the bucket holds it.
async fn from_offsite(fleet: &Fleet, offsite: &crate::offsite::OffsiteStore) -> Result<Catalog> {
    let (manifests, bad) = sa_core::catalog::load_catalog(offsite, fleet.keys())
        .await
        .map_err(|e| Error::failed(format!("cannot read the offsite catalog: {e}")))?;
    if manifests.is_empty() && !bad.is_empty() {
        return Err(Error::failed(format!(
            "the offsite copy {} holds {} snapshot(s) but none opens with this key ({}): is \
             this the key file these backups were made with?",
            offsite.name(),
            bad.len(),
            bad[0].1
        )));
    }
    for (name, e) in &bad {
        tracing::warn!("offsite catalog copy {name} unusable: {e}");
    }
    // load_catalog returns them oldest first already.
    Ok(Catalog {
        manifests,
        reach: Reach::default(),
    })
}

/// Reads the catalog from `live` (see the module docs).
pub async fn read(fleet: &Fleet, live: &[AgentClient]) -> Result<Vec<Manifest>> {
    let keys = fleet.keys();
    let mut holders: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut listed = 0;
    for (i, c) in live.iter().enumerate() {
        match c.list_blobs(SNAPSHOT_BLOB_PREFIX).await {
            Ok(names) => {
                listed += 1;
                for n in names {
                    holders.entry(n).or_default().push(i);
                }
            }
            Err(e) => tracing::warn!("{}: cannot list the catalog: {e}", c.addr()),
        }
    }
    if listed == 0 {
        return Err(Error::failed(
            "no reachable agent could list its catalog (see the warnings above)",
        ));
    }
    let mut revisions = group_revisions(holders.keys().map(String::as_str));
    let ids: Vec<String> = revisions.keys().cloned().collect();
    for c in live {
        match sa_core::catalog::load_tombstones(c, keys, Some(&ids)).await {
            Ok(ts) => {
                for t in ts {
                    revisions.remove(&t.snapshot);
                }
            }
            Err(e) => tracing::warn!("{}: cannot list tombstones: {e}", c.addr()),
        }
    }
    let mut manifests = Vec::new();
    let mut unreadable: Vec<(String, sa_core::Error)> = Vec::new();
    // Per snapshot, the newest revision (a repair's) any agent holds; an older one only when no
    // copy of every newer one opens.
    for revs in revisions.into_values() {
        let mut last = None;
        'revs: for (_, name) in &revs {
            for &i in holders.get(name).map(Vec::as_slice).unwrap_or_default() {
                match live[i]
                    .get_blob(name)
                    .await
                    .and_then(|b| Manifest::open(keys, name, &b))
                {
                    Ok(m) => {
                        manifests.push(m);
                        last = None;
                        break 'revs;
                    }
                    Err(e) => {
                        tracing::warn!("{}: catalog copy {name} unusable: {e}", live[i].addr());
                        last = Some((name.clone(), e));
                    }
                }
            }
        }
        if let Some(e) = last {
            unreadable.push(e);
        }
    }
    if manifests.is_empty() && !unreadable.is_empty() {
        return Err(Error::failed(format!(
            "the catalog holds {} snapshot(s) but no copy on the {} agent(s) reached opens with this \
             key ({}): either the key file is not the one these backups were made with, or those \
             copies are damaged; give the address of another agent with --agents",
            unreadable.len(),
            live.len(),
            unreadable[0].1
        )));
    }
    sort_by_creation(&mut manifests);
    Ok(manifests)
}

/// The volume names in `manifests`, sorted.
pub fn volumes(manifests: &[Manifest]) -> Vec<String> {
    manifests
        .iter()
        .map(|m| m.volume_name.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Finds a snapshot by id, unique id prefix, or `latest`: the newest of `volume`, or, without
/// a volume, the newest of the only volume (with several volumes `latest` needs one named).
pub fn resolve<'a>(
    manifests: &'a [Manifest],
    wanted: &str,
    volume: Option<&str>,
) -> Result<&'a Manifest> {
    let pool: Vec<&Manifest> = manifests
        .iter()
        .filter(|m| volume.is_none_or(|v| m.volume_name == v))
        .collect();
    if let (Some(v), true) = (volume, pool.is_empty()) {
        return Err(Error::NoSuchVolume {
            volume: v.to_string(),
            known: volumes(manifests),
        });
    }
    if wanted == "latest" {
        if volume.is_none() {
            let vols = volumes(manifests);
            if vols.len() > 1 {
                return Err(Error::VolumeNeeded { volumes: vols });
            }
        }
        return pool.last().copied().ok_or(Error::EmptyCatalog);
    }
    let hits: Vec<&Manifest> = pool
        .iter()
        .copied()
        .filter(|m| m.snapshot.starts_with(wanted))
        .collect();
    match hits.len() {
        1 => Ok(hits[0]),
        0 => Err(Error::NoSuchSnapshot(wanted.to_string())),
        count => Err(Error::AmbiguousSnapshot {
            prefix: wanted.to_string(),
            count,
        }),
    }
}

/// A snapshot's agent table mapped onto connections: `slots[i]` serves table entry `i`.
pub struct SlotClients {
    /// Connection per table slot, `None` when that agent cannot be used.
    pub slots: Vec<Option<AgentClient>>,
    /// Names per slot (`addr (id…)`).
    pub names: Vec<String>,
    /// Slots some stripe places a shard on whose agent cannot be used, and why.
    pub down: Vec<(usize, String)>,
}

impl SlotClients {
    /// The names of the down slots.
    pub fn down_names(&self) -> Vec<String> {
        self.down
            .iter()
            .map(|(i, _)| self.names[*i].clone())
            .collect()
    }
}

/// The table slots some stripe of `m` places a shard on.
pub fn used_slots(m: &Manifest) -> HashSet<u16> {
    let mut used = HashSet::new();
    for s in &m.stripes {
        if let StripeRef::Data { slots, .. } = s {
            used.extend(slots.iter().copied());
        }
    }
    used
}

/// Maps `m`'s agent table to live agents: by stable id among those reached, else by connecting
/// to the agent's address (the book's, else the table's). Slots no stripe uses (an agent a
/// repair or a retirement moved every shard off) are left alone: they are neither connected nor
/// reported down.
pub async fn clients_for(fleet: &Fleet, m: &Manifest, reach: &Reach) -> SlotClients {
    let used = used_slots(m);
    let mut slots: Vec<Option<AgentClient>> = vec![None; m.agents.len()];
    let names = m
        .agents
        .iter()
        .map(|a| agent_name(&a.addr, &a.id))
        .collect();
    if fleet.offsite_only() {
        // Not one agent is asked: every slot reads from the bucket.
        return SlotClients {
            slots,
            names,
            down: Vec::new(),
        };
    }
    let mut to_try = Vec::new();
    for (i, entry) in m.agents.iter().enumerate() {
        if !used.contains(&(i as u16)) {
            continue;
        }
        match reach.client(&entry.id) {
            Some(c) => slots[i] = Some(c),
            None => to_try.push(i),
        }
    }
    let mut down = Vec::new();
    let mut addrs = Vec::new();
    let mut tried = Vec::new();
    for &i in &to_try {
        let entry = &m.agents[i];
        if let Some(d) = reach.down.iter().find(|d| d.id == entry.id) {
            down.push((i, d.why.clone()));
            continue;
        }
        addrs.push(
            fleet
                .book_addr(&entry.id)
                .unwrap_or_else(|| entry.addr.clone()),
        );
        tried.push(i);
    }
    let attempts = fleet.connect(&addrs, Access::Read).await;
    for (&i, (addr, r)) in tried.iter().zip(attempts) {
        match r {
            Ok(c) if c.agent_id() == m.agents[i].id => slots[i] = Some(c),
            Ok(c) => down.push((
                i,
                format!(
                    "{addr}: another agent ({}) answers there now",
                    &hex(&c.agent_id())[..8]
                ),
            )),
            Err(e) => down.push((i, e.to_string())),
        }
    }
    down.sort_by_key(|d| d.0);
    SlotClients { slots, names, down }
}

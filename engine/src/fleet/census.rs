//! What `status`, `scrub` and `repair` share: the agents a catalog names, which shards each one
//! holds, and how many more agent losses each snapshot survives.
//!
//! * [`Census`]: every agent reached (the addresses given and the book's members in service),
//!   every member that is down, and every agent a live snapshot places shards on, by stable id;
//!   reachable ones with a connection and their `STAT`. Retired members are not in it.
//! * [`Presence`]: which shards each reachable agent holds, from `LIST_SHARDS` (names only: a
//!   shard whose file rots is still present until the agent's scrub quarantines it; `verify`
//!   reads every shard).
//! * [`snapshot_margin`]: per stripe, how many more agents may go before the stripe is lost: the
//!   *margin*. Agents are counted, not shards: the agents holding the most present shards of the
//!   stripe go first ([`stripe_margin`]), so a stripe stored degraded (two shards on one agent)
//!   has a margin below `present - k`. A snapshot's margin is its worst stripe's; it is below the
//!   configured redundancy when less than `m`, and data is lost when negative.

use std::collections::{HashMap, HashSet};

use sa_core::keys::hex;
use sa_core::manifest::{Manifest, StripeRef};
use sa_core::placement::stripe_margin;
use sa_core::seal::StripeId;
use sa_core::shard::VolumeId;
use sa_core::store::{AgentClient, ShardRead, StoreStat};
use tokio::task::JoinSet;

use crate::catalog::used_slots;
use crate::fleet::{Access, Fleet, Reach};

/// One agent of the fleet.
#[derive(Debug, Clone)]
pub struct Member {
    /// Stable id.
    pub id: [u8; 16],
    /// Address it answered at, or the last one known.
    pub addr: String,
    /// Connection, when reachable.
    pub client: Option<AgentClient>,
    /// Its usage, when reachable.
    pub stat: Option<StoreStat>,
    /// Why it is not reachable.
    pub error: Option<String>,
}

/// Every agent known from the addresses given, the agent book and the snapshots' agent tables.
pub struct Census {
    /// By first appearance: the addresses given, then table entries.
    pub members: Vec<Member>,
}

impl Census {
    /// Builds the census: the agents of `reach` (those that answered, and the book's members
    /// that are down), plus every agent a stripe of `manifests` places a shard on that is not
    /// among them and not retired, connected by its last known address.
    pub async fn gather(fleet: &Fleet, reach: &Reach, manifests: &[Manifest]) -> Census {
        let mut members: Vec<Member> = Vec::new();
        for c in reach.live() {
            members.push(Member {
                id: c.agent_id(),
                addr: c.addr().to_string(),
                client: Some(c),
                stat: None,
                error: None,
            });
        }
        for d in &reach.down {
            if !members.iter().any(|m| m.id == d.id) {
                members.push(Member {
                    id: d.id,
                    addr: d.addr.clone(),
                    client: None,
                    stat: None,
                    error: Some(d.why.clone()),
                });
            }
        }
        Self::add_table_agents(fleet, manifests, &mut members).await;
        // Addresses given that did not answer and belong to no member: still listed.
        for (addr, r) in &reach.attempts {
            if let Err(e) = r {
                if !members.iter().any(|m| m.addr == *addr) {
                    members.push(Member {
                        id: [0; 16],
                        addr: addr.clone(),
                        client: None,
                        stat: None,
                        error: Some(e.to_string()),
                    });
                }
            }
        }
        let mut set = JoinSet::new();
        for (i, m) in members.iter().enumerate() {
            if let Some(c) = m.client.clone() {
                set.spawn(async move { (i, c.stat().await) });
            }
        }
        while let Some(r) = set.join_next().await {
            if let Ok((i, r)) = r {
                match r {
                    Ok(s) => members[i].stat = Some(s),
                    Err(e) => {
                        members[i].client = None;
                        members[i].error = Some(e.to_string());
                    }
                }
            }
        }
        Census { members }
    }

    /// Agents a live snapshot still places shards on that are not in `members` (newest
    /// snapshot's address first), connected by their last known address.
    async fn add_table_agents(fleet: &Fleet, manifests: &[Manifest], members: &mut Vec<Member>) {
        let mut wanted: Vec<([u8; 16], String)> = Vec::new();
        for m in manifests.iter().rev() {
            let used = used_slots(m);
            for (slot, a) in m.agents.iter().enumerate() {
                if !used.contains(&(slot as u16))
                    || fleet.is_retired(&a.id)
                    || members.iter().any(|x| x.id == a.id)
                    || wanted.iter().any(|w| w.0 == a.id)
                {
                    continue;
                }
                let addr = fleet.book_addr(&a.id).unwrap_or_else(|| a.addr.clone());
                wanted.push((a.id, addr));
            }
        }
        let addrs: Vec<String> = wanted.iter().map(|w| w.1.clone()).collect();
        let attempts = fleet.connect(&addrs, Access::Read).await;
        for ((id, addr), (_, r)) in wanted.into_iter().zip(attempts) {
            let (client, error) = match r {
                Ok(c) if c.agent_id() == id => (Some(c), None),
                Ok(c) => (
                    None,
                    Some(format!(
                        "another agent ({}) answers at {addr} now",
                        &hex(&c.agent_id())[..8]
                    )),
                ),
                Err(e) => (None, Some(e.to_string())),
            };
            members.push(Member {
                id,
                addr,
                client,
                stat: None,
                error,
            });
        }
    }

    /// The connection to agent `id`, when reachable.
    pub fn client(&self, id: &[u8; 16]) -> Option<&AgentClient> {
        self.members
            .iter()
            .find(|m| &m.id == id)
            .and_then(|m| m.client.as_ref())
    }

    /// Reachable agents.
    pub fn reachable(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| m.client.is_some())
    }

    /// Per slot of `m`'s agent table, the connection (None: unreachable).
    pub fn slots_of(&self, m: &Manifest) -> Vec<Option<AgentClient>> {
        m.agents
            .iter()
            .map(|a| self.client(&a.id).cloned())
            .collect()
    }
}

/// The shards one agent holds of one volume: `(stripe, index)`.
type Held = HashSet<(StripeId, u8)>;

/// Which shards each reachable agent holds, per volume: `(agent id, volume)` → shards.
#[derive(Default)]
pub struct Presence {
    held: HashMap<([u8; 16], VolumeId), Held>,
    /// Agents whose listing failed (counted as holding nothing), with why.
    pub failed: Vec<(String, String)>,
}

impl Presence {
    /// Lists the shards of `volumes` on every reachable agent of `census` (256 small requests per
    /// volume and agent, agents in parallel).
    pub async fn gather(census: &Census, volumes: &[VolumeId]) -> Presence {
        let mut set = JoinSet::new();
        for m in census.reachable() {
            let (c, id, vols) = (m.client.clone(), m.id, volumes.to_vec());
            let Some(c) = c else { continue };
            set.spawn(async move {
                let mut out = Vec::new();
                for v in vols {
                    let mut held = HashSet::new();
                    for bucket in 0..=255u8 {
                        match c.list_shards(&v, bucket).await {
                            Ok(es) => held.extend(es.into_iter().map(|e| (e.stripe, e.index))),
                            Err(e) => return (id, c.addr().to_string(), Err(e)),
                        }
                    }
                    out.push((v, held));
                }
                (id, c.addr().to_string(), Ok(out))
            });
        }
        let mut p = Presence::default();
        while let Some(r) = set.join_next().await {
            let Ok((id, addr, r)) = r else { continue };
            match r {
                Ok(vols) => {
                    for (v, held) in vols {
                        p.held.insert((id, v), held);
                    }
                }
                Err(e) => p.failed.push((addr, e.to_string())),
            }
        }
        p
    }

    /// Whether agent `agent` holds shard `index` of stripe `stripe` of `volume` (false when it
    /// is unreachable or its listing failed).
    pub fn holds(&self, agent: &[u8; 16], volume: &VolumeId, stripe: &StripeId, index: u8) -> bool {
        self.held
            .get(&(*agent, *volume))
            .is_some_and(|h| h.contains(&(*stripe, index)))
    }

    /// Records that `agent` holds a shard (tests).
    #[cfg(test)]
    pub fn add(&mut self, agent: [u8; 16], volume: VolumeId, stripe: StripeId, index: u8) {
        self.held
            .entry((agent, volume))
            .or_default()
            .insert((stripe, index));
    }
}

/// Shard indices of a stripe that are not present on a reachable agent.
pub fn bad_shards(m: &Manifest, id: &StripeId, slots: &[u16], p: &Presence) -> Vec<usize> {
    slots
        .iter()
        .enumerate()
        .filter(|(idx, &slot)| !p.holds(&m.agents[slot as usize].id, &m.volume, id, *idx as u8))
        .map(|(idx, _)| idx)
        .collect()
}

/// Shard indices of a stripe that share their agent with a lower index of the same stripe
/// (stored degraded): `repair` moves them to agents outside the stripe.
pub fn crowded_shards(m: &Manifest, slots: &[u16]) -> Vec<usize> {
    let ids: Vec<[u8; 16]> = slots.iter().map(|&s| m.agents[s as usize].id).collect();
    (0..ids.len())
        .filter(|&j| ids[..j].contains(&ids[j]))
        .collect()
}

/// A snapshot's health by presence.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Margin {
    /// Worst stripe's margin: present shards minus k (`m` when every shard is there; negative
    /// when a stripe cannot be rebuilt). `m` for a snapshot of zero stripes only.
    pub margin: i64,
    /// Stripes that store data.
    pub data_stripes: u64,
    /// Stripes with at least one shard absent but recoverable.
    pub degraded_stripes: u64,
    /// Stripes with fewer than k shards present.
    pub lost_stripes: u64,
    /// Shards absent (missing, quarantined, or on an unreachable agent).
    pub absent_shards: u64,
    /// Stripes with two or more shards on one agent (stored degraded; `repair` spreads them).
    pub crowded_stripes: u64,
}

/// The presence-based health of one snapshot.
pub fn snapshot_margin(m: &Manifest, p: &Presence) -> Margin {
    let k = m.layout.k as i64;
    let mut out = Margin {
        margin: m.layout.m as i64,
        ..Default::default()
    };
    for s in &m.stripes {
        let StripeRef::Data { id, slots } = s else {
            continue;
        };
        out.data_stripes += 1;
        let bad = bad_shards(m, id, slots, p);
        let present: Vec<[u8; 16]> = slots
            .iter()
            .enumerate()
            .filter(|(idx, _)| !bad.contains(idx))
            .map(|(_, &s)| m.agents[s as usize].id)
            .collect();
        let margin = stripe_margin(&present, k as usize);
        out.margin = out.margin.min(margin);
        out.absent_shards += bad.len() as u64;
        if !crowded_shards(m, slots).is_empty() {
            out.crowded_stripes += 1;
        }
        if margin < 0 {
            out.lost_stripes += 1;
        } else if !bad.is_empty() {
            out.degraded_stripes += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use sa_core::layout::Layout;
    use sa_core::manifest::AgentEntry;

    fn manifest() -> Manifest {
        Manifest {
            snapshot: "s".into(),
            volume_name: "v".into(),
            volume: [1; 16],
            revision: 0,
            created: 0,
            created_nanos: 0,
            layout: Layout::new(3 << 20, 1 << 20, 2, 1).unwrap(),
            agents: (0..3)
                .map(|i| AgentEntry {
                    id: [i; 16],
                    addr: format!("a{i}:1"),
                })
                .collect(),
            stripes: vec![
                StripeRef::Data {
                    id: [7; 32],
                    slots: vec![0, 1, 2],
                },
                StripeRef::Zero,
                StripeRef::Data {
                    id: [8; 32],
                    slots: vec![1, 2, 0],
                },
            ],
            tracking_bitmap: None,
        }
    }

    #[test]
    fn margins_follow_presence() {
        let m = manifest();
        let mut p = Presence::default();
        for (stripe, slots) in [([7u8; 32], [0u8, 1, 2]), ([8; 32], [1, 2, 0])] {
            for (idx, a) in slots.iter().enumerate() {
                p.add([*a; 16], [1; 16], stripe, idx as u8);
            }
        }
        let h = snapshot_margin(&m, &p);
        assert_eq!((h.margin, h.data_stripes, h.absent_shards), (1, 2, 0));
        // Agent 2 gone: every stripe loses one shard, margin 0, nothing lost.
        p.held.remove(&([2; 16], [1; 16]));
        let h = snapshot_margin(&m, &p);
        assert_eq!((h.margin, h.degraded_stripes, h.lost_stripes), (0, 2, 0));
        assert_eq!(bad_shards(&m, &[8; 32], &[1, 2, 0], &p), vec![1]);
        // And one more shard of stripe 0: lost.
        p.held
            .get_mut(&([0; 16], [1; 16]))
            .unwrap()
            .remove(&([7; 32], 0));
        let h = snapshot_margin(&m, &p);
        assert_eq!((h.margin, h.lost_stripes), (-1, 1));
    }

    #[test]
    fn an_agent_with_two_shards_of_a_stripe_counts_once() {
        // k=2 m=1, stripe 0 stored degraded: shards 0 and 2 on agent 0, shard 1 on agent 1.
        let mut m = manifest();
        m.stripes = vec![StripeRef::Data {
            id: [7; 32],
            slots: vec![0, 1, 0],
        }];
        let mut p = Presence::default();
        for (idx, a) in [0u8, 1, 0].iter().enumerate() {
            p.add([*a; 16], [1; 16], [7; 32], idx as u8);
        }
        // Three shards, k=2: by shards one more could go, but losing agent 0 loses two.
        let h = snapshot_margin(&m, &p);
        assert_eq!((h.margin, h.absent_shards, h.crowded_stripes), (0, 0, 1));
        assert_eq!(crowded_shards(&m, &[0, 1, 0]), vec![2]);
        // Agent 1 gone: agent 0 still holds k shards; margin 0, nothing lost.
        p.held.remove(&([1; 16], [1; 16]));
        let h = snapshot_margin(&m, &p);
        assert_eq!((h.margin, h.lost_stripes), (0, 0));
        // Agent 0 gone instead: one shard left, lost.
        let mut p2 = Presence::default();
        p2.add([1; 16], [1; 16], [7; 32], 1);
        assert_eq!(snapshot_margin(&m, &p2).margin, -1);
    }
}

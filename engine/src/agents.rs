//! The agent book ([`sa_core::pins`]) as the admin changes it: which agents belong to this
//! owner, their stable ids, last addresses and pinned identity keys.
//!
//! * [`list`] reads the book from the agents given (one is enough) and asks every member in
//!   service whether it answers. It only reads: it never writes the book. Retired members are
//!   listed as retired and not asked.
//! * [`add`] connects to a new agent, pins its identity on purpose and writes the book to every
//!   reachable member; the next snapshot places shards on it. A PC reinstalled at a member's
//!   address (a stranger there) is added this way, as a new agent.
//! * [`accept`] pins the key an agent shows now, on purpose, in place of the pinned one: after
//!   its identity key was replaced deliberately (a directory restored without `identity.key`).
//! * [`retire`] takes an agent out of service: it is marked retired in the book, then one repair
//!   pass rebuilds every shard it held onto agents outside each stripe (shards of *other* missing
//!   agents are held back: retiring one PC rebuilds only its share) and commits new manifest
//!   revisions that no longer name it. The shards are rebuilt from the other agents, so it does
//!   not need to answer. When some stripe cannot be rebuilt without it, it is put back in
//!   service and the retire fails, saying why.

use std::collections::HashSet;
use std::path::PathBuf;

use sa_core::keys::hex;
use sa_core::pins::Member;
use sa_core::store::ShardRead;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::fleet::census::Census;
use crate::fleet::{live, Access, Attempt, Fleet, Reach};
use crate::repair::{repair_pass, PassOptions, RepairReport};
use crate::time::rfc3339;

/// One row of `agents list`.
#[derive(Serialize, Debug)]
pub struct AgentRow {
    /// Stable agent id (hex).
    pub id: String,
    /// Last known address.
    pub addr: String,
    /// Pinned identity key (hex).
    pub identity: String,
    /// `active`, `retired`, or `unpinned` (it answered at an address given but is not in the
    /// book yet: the next snapshot or `agents add` pins it).
    pub state: &'static str,
    /// `first-contact` (pinned automatically), `deliberate` (`agents add`/`accept`), or `-`.
    pub pinned_by: &'static str,
    /// When this key was pinned, RFC 3339 (empty when not pinned).
    pub pinned: String,
    /// Answers now with the pinned identity (always false for a retired agent: not asked).
    pub reachable: bool,
    /// Why not, when an agent in service does not.
    pub error: Option<String>,
    /// Bytes stored (when reachable).
    pub used: Option<u64>,
    /// Quota, 0 = none (when reachable).
    pub quota: Option<u64>,
    /// Shard files (when reachable).
    pub shards: Option<u64>,
    /// MAC it is woken at (Wake-on-LAN), once it reported one.
    pub mac: Option<String>,
    /// How often it was up over the last 30 days, and how much of that time was observed
    /// (recorded by every command that reaches the fleet; see [`crate::fleet::observe`]).
    pub availability: Option<crate::availability::Uptime>,
    /// Its usual hours in the caller's time zone, e.g. `usually up Mon-Fri 08-18`.
    pub usual_hours: Option<String>,
}

/// Lists the book's members (see the module docs), usual hours in UTC.
pub async fn list(fleet: &Fleet, agents: &[String]) -> Result<Vec<AgentRow>> {
    list_at(fleet, agents, 0).await
}

/// [`list`], usual hours in local time `utc_offset_secs` east of UTC.
pub async fn list_at(
    fleet: &Fleet,
    agents: &[String],
    utc_offset_secs: i32,
) -> Result<Vec<AgentRow>> {
    let reach = fleet.reach(agents, Access::Read).await;
    reach.live_or_none()?;
    let book = fleet.book();
    let mut rows = Vec::new();
    for m in book.members() {
        rows.push(row(m, &reach).await);
    }
    for c in reach.live() {
        if book.get(&c.agent_id()).is_some() {
            continue;
        }
        let stat = c.stat().await.ok();
        rows.push(AgentRow {
            id: hex(&c.agent_id()),
            addr: c.addr().to_string(),
            identity: c.key().to_string(),
            state: "unpinned",
            pinned_by: "-",
            pinned: String::new(),
            reachable: true,
            error: None,
            used: stat.as_ref().map(|s| s.used),
            quota: stat.as_ref().map(|s| s.quota),
            shards: stat.as_ref().map(|s| s.shards),
            mac: stat.and_then(|s| s.mac).map(crate::wake::format_mac),
            availability: None,
            usual_hours: None,
        });
    }
    let history = fleet.fleet_history(&reach.live()).await;
    let now = fleet.clock().now_secs();
    for r in &mut rows {
        let Some(id) = sa_core::keys::unhex(&r.id).and_then(|v| <[u8; 16]>::try_from(v).ok())
        else {
            continue;
        };
        r.availability = history.availability(&id, now);
        r.usual_hours = history
            .usual_hours(&id, now, utc_offset_secs)
            .map(|u| u.summary());
    }
    Ok(rows)
}

async fn row(m: &Member, reach: &Reach) -> AgentRow {
    let (mut reachable, mut error, mut stat) = (false, None, None);
    if !m.retired {
        if let Some(c) = reach.client(&m.id) {
            match c.stat().await {
                Ok(s) => {
                    reachable = true;
                    stat = Some(s);
                }
                Err(e) => error = Some(e.to_string()),
            }
        } else if let Some(d) = reach.down.iter().find(|d| d.id == m.id) {
            error = Some(d.why.clone());
        } else if let Some((_, Err(e))) = reach.attempts.iter().find(|(a, _)| *a == m.addr) {
            error = Some(e.to_string());
        } else {
            error = Some("not reached".into());
        }
    }
    AgentRow {
        id: hex(&m.id),
        addr: m.addr.clone(),
        identity: m.key.to_string(),
        state: if m.retired { "retired" } else { "active" },
        pinned_by: if m.deliberate {
            "deliberate"
        } else {
            "first-contact"
        },
        pinned: rfc3339(m.pinned / 1_000_000_000),
        reachable,
        error,
        used: stat.as_ref().map(|s| s.used),
        quota: stat.as_ref().map(|s| s.quota),
        shards: stat.as_ref().map(|s| s.shards),
        mac: m.wake.map(|w| crate::wake::format_mac(w.mac)),
        availability: None,
        usual_hours: None,
    }
}

/// What `agents add` did.
#[derive(Serialize, Debug)]
pub struct Added {
    /// The agent's id (hex).
    pub id: String,
    /// Its address.
    pub addr: String,
    /// Its identity key (hex).
    pub identity: String,
    /// Agents that hold the book now.
    pub book_copies: usize,
}

/// Adds the agent at `new_addr` (see the module docs); `agents` are other members to reach.
pub async fn add(fleet: &Fleet, new_addr: &str, agents: &[String]) -> Result<Added> {
    let addrs: Vec<String> = agents.iter().filter(|a| *a != new_addr).cloned().collect();
    // Reach the members first (they carry the book), then the new agent unjudged: it may be a
    // stranger at a member's address, which the user now adds on purpose.
    let reach = fleet.reach(&addrs, Access::Write).await;
    let new = fleet
        .connect_unchecked(&[new_addr.to_string()])
        .await
        .pop()
        .map(|(_, r)| r)
        .unwrap_or_else(|| Err(sa_core::Error::Protocol("connect task failed".into())))
        .map_err(|e| Error::failed(format!("cannot add {new_addr}: {e}")))?;
    let (id, key) = (new.agent_id(), new.key());
    if let Some(m) = fleet.book().get(&id) {
        if m.key != key && !m.retired {
            return Err(Error::invalid(format!(
                "agent {} is in the book with another identity key ({}, it shows {}): if that was \
                 replaced on purpose run `sa-image agents accept {}`",
                hex(&id),
                m.key.fingerprint(),
                key.fingerprint(),
                hex(&id)
            )));
        }
    }
    let mut clients = reach.live();
    clients.retain(|c| c.agent_id() != id);
    clients.push(new);
    fleet
        .change_book(&clients, |b| {
            let was_retired = b.get(&id).is_some_and(|m| m.retired);
            b.pin(id, key, new_addr, true) || was_retired
        })
        .await;
    Ok(Added {
        id: hex(&id),
        addr: new_addr.to_string(),
        identity: key.to_string(),
        book_copies: clients.len(),
    })
}

/// The one book member whose id starts with `prefix`.
pub fn find_member(fleet: &Fleet, prefix: &str) -> Result<Member> {
    let want = prefix.to_ascii_lowercase();
    let matches: Vec<Member> = fleet
        .book()
        .members()
        .filter(|m| hex(&m.id).starts_with(&want))
        .cloned()
        .collect();
    match matches.as_slice() {
        [m] => Ok(m.clone()),
        [] => Err(Error::invalid(format!(
            "no agent with id {prefix} in the agent book (see `sa-image agents list`)"
        ))),
        _ => Err(Error::invalid(format!(
            "id prefix {prefix} names {} agents: give more digits",
            matches.len()
        ))),
    }
}

/// What `agents accept` did.
#[derive(Serialize, Debug)]
pub struct Accepted {
    /// The agent's id (hex).
    pub id: String,
    /// Where it answered.
    pub addr: String,
    /// The key now pinned (hex).
    pub identity: String,
    /// The key it replaced (hex); equal to `identity` when nothing changed.
    pub replaced: String,
}

/// Accepts the identity key agent `id_prefix` shows now (see the module docs).
pub async fn accept(fleet: &Fleet, id_prefix: &str, agents: &[String]) -> Result<Accepted> {
    // Judged connections load the book; the agent in question shows up as refused.
    let reach = fleet.reach(agents, Access::Read).await;
    let member = find_member(fleet, id_prefix)?;
    // Where it answers: its address in the book, and the addresses given.
    let mut tries = vec![member.addr.clone()];
    tries.extend(agents.iter().filter(|x| **x != member.addr).cloned());
    let raw: Vec<Attempt> = fleet.connect_unchecked(&tries).await;
    let Some(c) = raw
        .iter()
        .find_map(|(_, r)| r.as_ref().ok().filter(|c| c.agent_id() == member.id))
        .cloned()
    else {
        return Err(Error::failed(format!(
            "agent {} does not answer at {} (or at the addresses given): start it, or give its address with --agents",
            hex(&member.id),
            tries.join(", ")
        )));
    };
    let key = c.key();
    let out = Accepted {
        id: hex(&member.id),
        addr: c.addr().to_string(),
        identity: key.to_string(),
        replaced: member.key.to_string(),
    };
    if key == member.key && !member.retired {
        return Ok(out);
    }
    let mut clients = live(&reach.attempts);
    clients.push(c.clone());
    fleet
        .change_book(&clients, |b| b.pin(member.id, key, c.addr(), true))
        .await;
    Ok(out)
}

/// What `agents retire` did.
#[derive(Serialize, Debug)]
pub struct Retired {
    /// The agent's id (hex).
    pub id: String,
    /// Its last address.
    pub addr: String,
    /// False when it was retired already (nothing done).
    pub retired_now: bool,
    /// The repair pass that rebuilt its shards.
    pub repair: Option<RepairReport>,
}

/// Retires agent `id_prefix` (see the module docs).
pub async fn retire(
    fleet: &Fleet,
    id_prefix: &str,
    agents: &[String],
    cache_dir: Option<PathBuf>,
) -> Result<Retired> {
    let reach = fleet.reach(agents, Access::Write).await;
    let member = find_member(fleet, id_prefix)?;
    if member.retired {
        return Ok(Retired {
            id: hex(&member.id),
            addr: member.addr,
            retired_now: false,
            repair: None,
        });
    }
    let clients: Vec<_> = reach
        .live()
        .into_iter()
        .filter(|c| c.agent_id() != member.id)
        .collect();
    if clients.is_empty() {
        return Err(Error::failed(format!(
            "no other agent answers: retiring {} would leave nothing",
            hex(&member.id)
        )));
    }
    fleet.change_book(&clients, |b| b.retire(&member.id)).await;
    // From here on this fleet refuses the retired agent: its shards count as absent. Every other
    // agent that does not answer is held back: only the retired agent's share is rebuilt.
    let opts = PassOptions {
        dry_run: false,
        cache_dir,
        agents: clients.iter().map(|c| c.addr().to_string()).collect(),
    };
    let retiring = member.id;
    let mut hold = |census: &Census| -> HashSet<[u8; 16]> {
        census
            .members
            .iter()
            .filter(|m| m.client.is_none() && m.id != retiring)
            .map(|m| m.id)
            .collect()
    };
    let pass = repair_pass(fleet, &opts, &mut hold).await;
    match pass {
        Ok(r) if r.stripes_lost == 0 && r.shards_failed == 0 => Ok(Retired {
            id: hex(&member.id),
            addr: member.addr,
            retired_now: true,
            repair: Some(r),
        }),
        other => {
            // Back in service: it still holds shards nothing else can replace.
            fleet
                .change_book(&clients, |b| {
                    b.pin(member.id, member.key, &member.addr, true)
                })
                .await;
            let why = match other {
                Ok(r) => format!(
                    "{} stripe(s) cannot be rebuilt without it and {} shard(s) found no place \
                     (other agents down, or too few agents outside the stripes)",
                    r.stripes_lost, r.shards_failed
                ),
                Err(e) => e.to_string(),
            };
            Err(Error::failed(format!(
                "agent {} stays in service: {why}; bring the other agents back (or add one) and \
                 retire it again",
                hex(&member.id)
            )))
        }
    }
}

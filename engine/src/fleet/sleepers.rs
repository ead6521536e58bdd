//! Sleeping members: learning how to wake each PC, waking the ones that do not answer by
//! Wake-on-LAN ([`crate::wake`]), and waiting until enough of them answer.
//!
//! **Learning.** [`Fleet::reach`] asks every agent that answered for its `STAT`: the MAC and
//! IPv4 broadcast address of the interface it was reached on go into the agent book
//! ([`sa_core::pins::WakeAddr`]), so the PC can be woken once it sleeps. A command that may
//! write the book ([`Access::Write`]: snapshot, repair, the daemon's jobs) stores the changed
//! book on the agents; a read-only one keeps it in this machine's copy only.
//!
//! **Waking.** [`Fleet::wake_sleepers`] sends magic packets to every member in service that did
//! not answer at all ([`super::Down::asleep`]) and whose MAC is known, then tries each of them
//! again every [`RETRY`] until it answers or the wait ([`WakeOptions::wait`]) runs out. The
//! command waits only as long as it lacks what it [`Need`]s (`k` agents per stripe to read a
//! snapshot, `k + m` to store one), naming the sleepers in a progress line every few seconds;
//! a member that wakes after the command started arrives on [`Waking::late`] (a restore or a
//! serve then reads from it too, first to hedge). When the wait runs out first, the command
//! fails with [`Error::Asleep`] naming the sleepers. When even every sleeper waking would not
//! meet the need, nothing is awaited: the command goes on and says what is missing itself.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sa_core::keys::hex;
use sa_core::manifest::{Manifest, StripeRef};
use sa_core::store::{AgentClient, ShardRead};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{agent_name, live, Access, Fleet, Reach};
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::read::StripeReader;
use crate::wake::{format_mac, wake, WakeTarget, WAKE_PORTS};

/// How long a command waits for sleeping members unless told otherwise.
pub const DEFAULT_WAKE_WAIT: Duration = Duration::from_secs(120);
/// How often a woken member is tried again.
pub const RETRY: Duration = Duration::from_millis(250);
/// Longest a single try may take (a sleeping PC does not answer a SYN at all).
const TRY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the progress line names who is still asleep.
const NOTE_EVERY: Duration = Duration::from_secs(5);

/// Whether and how to wake members that do not answer.
#[derive(Debug, Clone)]
pub struct WakeOptions {
    /// How long a command waits for them (zero: they are not woken).
    pub wait: Duration,
    /// Destination ports of the magic packets ([`WAKE_PORTS`]).
    pub ports: Vec<u16>,
}

impl Default for WakeOptions {
    fn default() -> Self {
        WakeOptions {
            wait: DEFAULT_WAKE_WAIT,
            ports: WAKE_PORTS.to_vec(),
        }
    }
}

/// What a command needs up before it starts.
#[derive(Debug, Clone)]
pub enum Need<'a> {
    /// `k` agents per stripe of each of these snapshots (restore, serve, verify, repair).
    Readable(Vec<&'a Manifest>),
    /// This many distinct agents (a snapshot: `k + m`).
    Agents(usize),
    /// Every one of these agents (`agents wake`).
    Every(HashSet<[u8; 16]>),
}

impl Need<'_> {
    /// Whether the agents `up` meet the need.
    pub fn met(&self, up: &HashSet<[u8; 16]>) -> bool {
        match self {
            Need::Agents(n) => up.len() >= *n,
            Need::Readable(ms) => ms.iter().all(|m| readable(m, up)),
            Need::Every(ids) => ids.is_subset(up),
        }
    }
}

/// Whether every stripe of `m` has `k` shards on agents in `up`.
fn readable(m: &Manifest, up: &HashSet<[u8; 16]>) -> bool {
    let slot_up: Vec<bool> = m.agents.iter().map(|a| up.contains(&a.id)).collect();
    let k = m.layout.k as usize;
    m.stripes.iter().all(|s| match s {
        StripeRef::Zero => true,
        StripeRef::Data { slots, .. } => {
            slots
                .iter()
                .filter(|&&i| slot_up.get(i as usize).copied().unwrap_or(false))
                .count()
                >= k
        }
    })
}

/// What waking did (part of a command's report).
#[derive(Debug, Clone, Default, Serialize)]
pub struct WakeOutcome {
    /// Members magic packets were sent to, as `address (id…)`.
    pub woken: Vec<String>,
    /// Of those, the ones that answered before the command started.
    pub answered: Vec<String>,
    /// Members that did not answer and could not be woken (no MAC known yet), and why.
    pub not_woken: Vec<String>,
    /// Of those, the ones that had not answered when the command started (or gave up).
    pub asleep: Vec<String>,
    /// Seconds the command waited for them.
    pub waited: f64,
    /// The wait ran out before the need was met.
    pub timed_out: bool,
}

/// Members still waking after the command started; dropping it stops trying them.
pub struct Waking {
    /// What waking did until the command started.
    pub outcome: WakeOutcome,
    /// Members that answer later (identity checked), to read from as they come.
    pub late: mpsc::Receiver<AgentClient>,
    tasks: JoinSet<()>,
}

impl Waking {
    fn none() -> Waking {
        Waking {
            outcome: WakeOutcome::default(),
            late: mpsc::channel(1).1,
            tasks: JoinSet::new(),
        }
    }

    /// Whether members are still being tried.
    pub fn pending(&self) -> bool {
        !self.tasks.is_empty()
    }

    /// Hands every member that answers from now on to `reader` (its slot in `m`'s agent table),
    /// in the background, until the wait runs out; members in `withheld` (a drill's) are not.
    /// Each one joined is also kept awake by `awake` (see [`super::keepalive`]).
    pub fn join_late(
        mut self,
        m: Arc<Manifest>,
        reader: StripeReader,
        withheld: &[[u8; 16]],
        awake: &super::keepalive::KeepAlive,
    ) {
        let withheld = withheld.to_vec();
        let awake = awake.clone();
        if !self.pending() {
            return;
        }
        tokio::spawn(async move {
            while let Some(c) = self.late.recv().await {
                let id = c.agent_id();
                if withheld.contains(&id) {
                    continue;
                }
                for (slot, _) in m.agents.iter().enumerate().filter(|(_, a)| a.id == id) {
                    if reader.join(slot, c.clone()) {
                        tracing::info!("{} woke up: used from now on", agent_name(c.addr(), &id));
                        awake.add(c.clone());
                    }
                }
            }
            drop(self.tasks);
        });
    }
}

/// The IP of `addr` (`host:port`, `[v6]:port`), resolving a host name.
async fn ip_of(addr: &str) -> Option<IpAddr> {
    let found = tokio::time::timeout(Duration::from_secs(2), tokio::net::lookup_host(addr)).await;
    found.ok()?.ok()?.next().map(|s| s.ip())
}

/// Tries the woken member `(id, key)` at `addr` every [`RETRY`] until it answers as itself
/// (then hands the connection over on `tx`) or `deadline` passes.
async fn retry(
    addr: String,
    (id, key): ([u8; 16], sa_core::tls::AgentKey),
    keys: Arc<sa_core::keys::Keys>,
    client: sa_core::store::ClientOptions,
    deadline: Instant,
    tx: mpsc::Sender<AgentClient>,
) {
    while Instant::now() < deadline {
        let tried = Instant::now();
        match AgentClient::connect_with(&addr, keys.clone(), client).await {
            Ok(c) if c.agent_id() == id && c.key() == key => {
                let _ = tx.send(c).await;
                return;
            }
            Ok(c) => tracing::warn!(
                "{addr}: agent {} answers where {} was expected; not used",
                &hex(&c.agent_id())[..8],
                &hex(&id)[..8]
            ),
            Err(e) => tracing::debug!("{addr}: not awake yet: {e}"),
        }
        tokio::time::sleep(RETRY.saturating_sub(tried.elapsed())).await;
    }
}

impl Fleet {
    /// Records how to wake each of `clients` from its `STAT` answer (see the module docs).
    pub(super) async fn learn_wake(&self, clients: &[AgentClient], access: Access) {
        let mut set = JoinSet::new();
        for c in clients {
            let c = c.clone();
            set.spawn(async move { (c.agent_id(), c.stat().await) });
        }
        let mut changed = false;
        while let Some(Ok((id, stat))) = set.join_next().await {
            match stat {
                Ok(s) => {
                    if let Some(mac) = s.mac {
                        changed |= self.with_book(|b| b.set_wake(&id, mac, s.broadcast));
                    }
                }
                Err(e) => tracing::debug!("agent {}: no STAT answer: {e}", &hex(&id)[..8]),
            }
        }
        if changed {
            if access == Access::Write {
                self.store_book(clients).await;
            }
            self.save_cache();
        }
    }

    /// Wakes the members of `reach` that did not answer and waits until `need` is met (see the
    /// module docs); members that answer are added to `reach`. Without wake options (or with a
    /// zero wait) it does nothing. Fails with [`Error::Asleep`] when the wait ran out first.
    pub async fn wake_sleepers(
        &self,
        reach: &mut Reach,
        need: &Need<'_>,
        progress: &dyn Progress,
    ) -> Result<Waking> {
        let Some(opts) = self.wake.clone().filter(|_| !self.offsite_only()) else {
            return Ok(Waking::none());
        };
        let waking = self.wake_with(reach, need, progress, &opts, None).await;
        if waking.outcome.timed_out {
            return Err(Error::Asleep {
                waited: opts.wait,
                asleep: waking.outcome.asleep.clone(),
            });
        }
        Ok(waking)
    }

    /// Counts the wakes in the history: a success when the member answered in time, a failure
    /// when the wait ran out without it; one still being tried after the command started counts
    /// as neither.
    fn record_wakes(
        &self,
        sleeping: &[([u8; 16], String)],
        up: &HashSet<[u8; 16]>,
        timed_out: bool,
    ) {
        let now = self.clock.now_secs();
        self.update_history(|h| {
            for (id, _) in sleeping {
                if up.contains(id) {
                    h.record_wake(*id, true);
                    h.observe(*id, now, true);
                } else if timed_out {
                    h.record_wake(*id, false);
                }
            }
        });
    }

    /// Wakes the members of `reach.down` that did not answer (of `only`, when given) with
    /// `opts`, and waits until `need` is met or the wait runs out ([`WakeOutcome::timed_out`]).
    pub async fn wake_with(
        &self,
        reach: &mut Reach,
        need: &Need<'_>,
        progress: &dyn Progress,
        opts: &WakeOptions,
        only: Option<&HashSet<[u8; 16]>>,
    ) -> Waking {
        let started = Instant::now();
        let deadline = started + opts.wait;
        let book = self.book();
        let (tx, rx) = mpsc::channel(reach.down.len().max(1));
        let mut waking = Waking {
            late: rx,
            ..Waking::none()
        };
        let mut sleeping: Vec<([u8; 16], String)> = Vec::new();
        let candidates = reach
            .down
            .iter()
            .filter(|d| d.asleep && only.is_none_or(|o| o.contains(&d.id)));
        for d in candidates {
            let Some(member) = book.get(&d.id) else {
                continue;
            };
            let Some(w) = member.wake else {
                waking
                    .outcome
                    .not_woken
                    .push(format!("{}: its MAC is not known yet", d.name()));
                continue;
            };
            let target = WakeTarget {
                mac: w.mac,
                broadcast: w.broadcast,
                last_ip: ip_of(&d.addr).await,
            };
            if let Err(e) = wake(&target, &opts.ports).await {
                tracing::warn!("cannot wake {}: {e}", d.name());
                waking.outcome.not_woken.push(format!("{}: {e}", d.name()));
                continue;
            }
            tracing::info!("woke {} (MAC {})", d.name(), format_mac(w.mac));
            waking.outcome.woken.push(d.name());
            sleeping.push((d.id, d.name()));
            let mut client = self.opts.client;
            client.connect_timeout = client.connect_timeout.min(TRY_TIMEOUT);
            waking.tasks.spawn(retry(
                d.addr.clone(),
                (d.id, member.key),
                self.keys.clone(),
                client,
                deadline,
                tx.clone(),
            ));
        }
        drop(tx);
        let mut up: HashSet<[u8; 16]> =
            live(&reach.attempts).iter().map(|c| c.agent_id()).collect();
        let all: HashSet<[u8; 16]> = up
            .iter()
            .copied()
            .chain(sleeping.iter().map(|s| s.0))
            .collect();
        let waits = !sleeping.is_empty() && !need.met(&up) && need.met(&all);
        let mut next_note = Instant::now();
        while waits && !need.met(&up) {
            if Instant::now() >= deadline {
                waking.outcome.timed_out = true;
                break;
            }
            if Instant::now() >= next_note {
                let names: Vec<&str> = sleeping
                    .iter()
                    .filter(|s| !up.contains(&s.0))
                    .map(|s| s.1.as_str())
                    .collect();
                progress.note(&format!(
                    "waiting for {} agent(s) to wake ({:.0}s of {:.0}s): {}",
                    names.len(),
                    started.elapsed().as_secs_f64(),
                    opts.wait.as_secs_f64(),
                    names.join(", ")
                ));
                next_note = Instant::now() + NOTE_EVERY;
            }
            let until = next_note.min(deadline);
            tokio::select! {
                got = waking.late.recv() => match got {
                    Some(c) => {
                        let name = agent_name(c.addr(), &c.agent_id());
                        tracing::info!("{name} woke up after {:.1}s", started.elapsed().as_secs_f64());
                        up.insert(c.agent_id());
                        reach.down.retain(|d| d.id != c.agent_id());
                        reach.attempts.push((c.addr().to_string(), Ok(c)));
                        waking.outcome.answered.push(name);
                    }
                    None => {
                        waking.outcome.timed_out = !need.met(&up);
                        break;
                    }
                },
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
        waking.outcome.waited = started.elapsed().as_secs_f64();
        self.record_wakes(&sleeping, &up, waking.outcome.timed_out);
        waking.outcome.asleep = sleeping
            .iter()
            .filter(|s| !up.contains(&s.0))
            .map(|s| s.1.clone())
            .collect();
        waking
    }
}

/// One member `sa-image agents wake` dealt with.
#[derive(Debug, Clone, Serialize)]
pub struct WakeRow {
    /// Agent id (hex).
    pub id: String,
    /// Its last known address.
    pub addr: String,
    /// The MAC woken, when known.
    pub mac: Option<String>,
    /// `up` (it answered already), `woke` (it answered after the magic packet), `asleep` (it did
    /// not answer within the wait), `sent` (packets sent, not waited for), `not woken` (see why).
    pub state: &'static str,
    /// Why it was not woken, or what it said.
    pub why: Option<String>,
}

/// What `sa-image agents wake` did.
#[derive(Debug, Clone, Serialize)]
pub struct AgentsWoken {
    /// Per member chosen.
    pub agents: Vec<WakeRow>,
    /// Seconds waited.
    pub waited: f64,
}

impl AgentsWoken {
    /// Whether every member chosen answers now (or packets were only sent, with no wait).
    pub fn all_up(&self) -> bool {
        self.agents
            .iter()
            .all(|r| matches!(r.state, "up" | "woke" | "sent"))
    }
}

/// Wakes member `id_prefix`, or every member that does not answer (`None`), and waits up to
/// `opts.wait` for them to answer (zero: sends the packets only).
pub async fn wake_agents(
    fleet: &Fleet,
    addrs: &[String],
    id_prefix: Option<&str>,
    opts: &WakeOptions,
    progress: &dyn Progress,
) -> Result<AgentsWoken> {
    let mut reach = fleet.reach(addrs, Access::Read).await;
    let book = fleet.book();
    let chosen: Vec<[u8; 16]> = match id_prefix {
        Some(p) => vec![crate::agents::find_member(fleet, p)?.id],
        None => book.active().map(|m| m.id).collect(),
    };
    if chosen.is_empty() {
        return Err(Error::invalid(
            "the agent book is empty: no agent has been used yet, so none can be woken",
        ));
    }
    let up: HashSet<[u8; 16]> = live(&reach.attempts).iter().map(|c| c.agent_id()).collect();
    let wakeable: HashSet<[u8; 16]> = chosen
        .iter()
        .copied()
        .filter(|id| {
            !up.contains(id)
                && reach.down.iter().any(|d| d.id == *id && d.asleep)
                && book.get(id).is_some_and(|m| m.wake.is_some())
        })
        .collect();
    let down_why: Vec<([u8; 16], String, bool)> = reach
        .down
        .iter()
        .map(|d| (d.id, d.why.clone(), d.asleep))
        .collect();
    let waking = fleet
        .wake_with(
            &mut reach,
            &Need::Every(wakeable.clone()),
            progress,
            opts,
            Some(&wakeable),
        )
        .await;
    let answered: HashSet<[u8; 16]> = live(&reach.attempts).iter().map(|c| c.agent_id()).collect();
    let mut rows = Vec::new();
    for id in chosen {
        let member = book.get(&id);
        let wake = member.and_then(|m| m.wake);
        let (state, why) = if up.contains(&id) {
            ("up", None)
        } else if wakeable.contains(&id) && answered.contains(&id) {
            ("woke", None)
        } else if wakeable.contains(&id) && opts.wait.is_zero() {
            ("sent", None)
        } else if wakeable.contains(&id) {
            ("asleep", Some("did not answer within the wait".to_string()))
        } else {
            let down = down_why.iter().find(|d| d.0 == id);
            let why = match (down, wake) {
                (Some((_, why, false)), _) => format!("it is not asleep: {why}"),
                (_, None) => "its MAC is not known yet (an agent reports it once reached while \
                              up)"
                .to_string(),
                (None, _) => "it was not tried (not in service)".to_string(),
                (Some((_, why, true)), Some(_)) => why.clone(),
            };
            ("not woken", Some(why))
        };
        rows.push(WakeRow {
            id: hex(&id),
            addr: member.map(|m| m.addr.clone()).unwrap_or_default(),
            mac: wake.map(|w| format_mac(w.mac)),
            state,
            why,
        });
    }
    Ok(AgentsWoken {
        agents: rows,
        waited: waking.outcome.waited,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use sa_core::layout::Layout;
    use sa_core::manifest::AgentEntry;

    /// Six agents (ids 0..6), k = 4 m = 2; stripe 0 on agents 0..6, stripe 1 stored degraded
    /// with two shards on agent 0 (slots 0,0,1,2,3,4), stripe 2 zero.
    fn manifest() -> Manifest {
        Manifest {
            snapshot: "00aa".into(),
            volume_name: "v".into(),
            volume: [1; 16],
            revision: 0,
            created: 0,
            created_nanos: 0,
            layout: Layout::new(12 << 20, 4 << 20, 4, 2).unwrap(),
            agents: (0..6)
                .map(|i| AgentEntry {
                    id: [i; 16],
                    addr: format!("pc{i}:7710"),
                })
                .collect(),
            stripes: vec![
                StripeRef::Data {
                    id: [1; 32],
                    slots: vec![0, 1, 2, 3, 4, 5],
                },
                StripeRef::Data {
                    id: [2; 32],
                    slots: vec![0, 0, 1, 2, 3, 4],
                },
                StripeRef::Zero,
            ],
            tracking_bitmap: None,
        }
    }

    fn ids(v: &[u8]) -> HashSet<[u8; 16]> {
        v.iter().map(|&i| [i; 16]).collect()
    }

    #[test]
    fn readable_needs_k_shards_of_every_stripe_up() {
        let m = manifest();
        let need = Need::Readable(vec![&m]);
        assert!(need.met(&ids(&[0, 1, 2, 3, 4, 5])));
        // Agent 0 holds two shards of stripe 1: with 0 and 1 up, 3 of its shards are.
        assert!(!need.met(&ids(&[0, 1])));
        assert!(
            need.met(&ids(&[0, 1, 5, 2])),
            "stripe 0: 4 of 6; stripe 1: 4 shards"
        );
        // Without agent 0, stripe 1 has 4 shards only with 1..5 all up.
        assert!(!need.met(&ids(&[1, 2, 3])));
        assert!(need.met(&ids(&[1, 2, 3, 4])));
        assert!(Need::Readable(vec![]).met(&ids(&[])));
        assert!(Need::Every(ids(&[1, 2])).met(&ids(&[1, 2, 3])));
        assert!(!Need::Every(ids(&[1, 2])).met(&ids(&[1, 3])));
    }

    #[test]
    fn agents_need_counts_distinct_agents() {
        let up: HashSet<[u8; 16]> = [[1; 16], [2; 16]].into_iter().collect();
        assert!(Need::Agents(2).met(&up));
        assert!(!Need::Agents(3).met(&up));
    }
}

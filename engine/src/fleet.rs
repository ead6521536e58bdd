//! The fleet: reaching the agents, judging each one against the agent book, and knowing which
//! members are down.
//!
//! **One fleet for every command.** A command is given one or more addresses; it reaches them
//! *and every other member of the agent book in service* ([`Fleet::reach`]), so `list`, `status`,
//! `prune` and `forget` through any one agent see and change the same backup as through any
//! other. Members that do not answer are listed in [`Reach::down`] with why, by address and id.
//!
//! **Pins.** Every connection is judged against the agent book ([`sa_core::pins`]), merged from
//! every copy the reached agents hold:
//! - a known id with its pinned key is used;
//! - a known id with another key ([`sa_core::Error::IdentityChanged`]) or a retired agent
//!   ([`sa_core::Error::Retired`]) is not used, and its attempt says why and what to do;
//! - an unknown id at an address the book gives to another member in service is a *stranger*
//!   ([`sa_core::Error::Stranger`]: a reinstalled PC): not used, reported with what to do, and it
//!   never blocks an operation that has enough other agents;
//! - any other unknown id is used; with [`Access::Write`] it is pinned (trust on first contact)
//!   and the book is written back to every agent whose copy differs. With [`Access::Read`]
//!   (`list`, `status`, `verify`, `agents list`, `restore`, `serve`) nothing is written: a
//!   read-only command never changes the book.
//!
//! The book lives in the [`Fleet`] value (one per command run, or per daemon job), never in a
//! process-wide static. With [`Fleet::with_book_cache`] this machine also keeps a sealed copy
//! in its cache directory, merged like any agent's copy: given only the address of a PC that was
//! reinstalled, a command still knows the other members and that the PC is a stranger.

pub mod census;
pub mod each;
pub mod keepalive;
pub mod observe;
pub mod seen;
pub mod sleepers;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use sa_core::keys::{hex, Keys};
use sa_core::pins::{Book, Member, Verdict, BOOK_BLOB};
use sa_core::store::{AgentClient, ClientOptions, ShardRead, ShardWrite};
use tokio::task::JoinSet;

use crate::clock::{Clock, SystemClock};
use crate::error::{Error, NoAgent, Result};

/// The outcome of connecting to one address.
pub type Attempt = (String, sa_core::Result<AgentClient>);

/// Whether a command may change the agent book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads only: new agents are used but not pinned, and the book is never written.
    Read,
    /// Stores or deletes: new agents at new addresses are pinned, the book is written back.
    Write,
}

/// How the fleet reaches agents.
#[derive(Debug, Clone, Copy, Default)]
pub struct FleetOptions {
    /// Connect and request timeouts of every agent connection.
    pub client: ClientOptions,
}

/// A member of the book in service that could not be used.
#[derive(Debug, Clone)]
pub struct Down {
    /// Its id.
    pub id: [u8; 16],
    /// Its last known address.
    pub addr: String,
    /// Why it is not used.
    pub why: String,
    /// It did not answer at all (no connection, or no handshake in time), as a PC that is off
    /// or asleep does not: a candidate for waking ([`sleepers`]). False when something else
    /// answers at its address, or it refused us.
    pub asleep: bool,
}

impl Down {
    /// `address (id…)`.
    pub fn name(&self) -> String {
        agent_name(&self.addr, &self.id)
    }
}

/// `address (first 8 hex digits of the id)`: how agents are named in messages.
pub fn agent_name(addr: &str, id: &[u8; 16]) -> String {
    format!("{addr} ({})", &hex(id)[..8])
}

/// The agents a command reached.
#[derive(Debug, Default)]
pub struct Reach {
    /// Every address tried: the ones given first, then the book's other members in service.
    pub attempts: Vec<Attempt>,
    /// Members in service that could not be used, and why.
    pub down: Vec<Down>,
}

impl Reach {
    /// The agents that answered and passed the identity check, each once (an agent reached at
    /// two addresses counts once, at the first).
    pub fn live(&self) -> Vec<AgentClient> {
        live(&self.attempts)
    }

    /// [`Reach::live`], or the error that says why no agent could be used.
    pub fn live_or_none(&self) -> Result<Vec<AgentClient>> {
        let l = self.live();
        if l.is_empty() {
            return Err(none_reachable(&self.attempts));
        }
        Ok(l)
    }

    /// The connection to agent `id`, when it answered.
    pub fn client(&self, id: &[u8; 16]) -> Option<AgentClient> {
        self.attempts
            .iter()
            .filter_map(|(_, r)| r.as_ref().ok())
            .find(|c| c.agent_id() == *id)
            .cloned()
    }

    /// The down members' names (`address (id…)`).
    pub fn down_names(&self) -> Vec<String> {
        self.down.iter().map(Down::name).collect()
    }
}

/// The agents of `attempts` that answered (and passed the identity check), each id once.
pub fn live(attempts: &[Attempt]) -> Vec<AgentClient> {
    let mut seen = HashSet::new();
    attempts
        .iter()
        .filter_map(|(_, c)| c.as_ref().ok())
        .filter(|c| seen.insert(c.agent_id()))
        .cloned()
        .collect()
}

/// Explains why no agent of `attempts` could be used.
pub fn none_reachable(attempts: &[Attempt]) -> Error {
    let mut no = NoAgent {
        attempts: Vec::new(),
        refused: false,
        identity_changed: false,
    };
    for (a, r) in attempts {
        if let Err(e) = r {
            no.refused |= matches!(e, sa_core::Error::Refused { .. });
            no.identity_changed |= matches!(e, sa_core::Error::IdentityChanged { .. });
            no.attempts.push((a.clone(), e.to_string()));
        }
    }
    Error::NoAgent(no)
}

/// The agents of this owner, as one command (or daemon job) sees them.
pub struct Fleet {
    keys: Arc<Keys>,
    opts: FleetOptions,
    clock: Arc<dyn Clock>,
    book: Mutex<Book>,
    /// Per agent id reached, the copy of the book it holds (None: none, or unreadable).
    copies: Mutex<HashMap<[u8; 16], Option<Book>>>,
    /// This machine's copy of the book: where, and the book as last read or written there.
    cache: Option<(PathBuf, Mutex<Option<Book>>)>,
    /// Whether and how long to wake members that do not answer ([`sleepers`]).
    wake: Option<sleepers::WakeOptions>,
    /// Each member's availability as this machine knows it ([`observe`]).
    history: Mutex<observe::HistoryCache>,
    /// The offsite tier readers fall back on, and whether it is the only source
    /// ([`Fleet::with_offsite`]).
    offsite: Option<(crate::offsite::OffsiteStore, bool)>,
}

impl Fleet {
    /// A fleet for the owner of `keys`, on the system clock.
    pub fn new(keys: Arc<Keys>, opts: FleetOptions) -> Fleet {
        Fleet {
            keys,
            opts,
            clock: Arc::new(SystemClock),
            book: Mutex::new(Book::default()),
            copies: Mutex::new(HashMap::new()),
            cache: None,
            wake: None,
            history: Mutex::new(observe::HistoryCache::new(None)),
            offsite: None,
        }
    }

    /// Readers (`restore`, `serve`, `verify`, `repair`) take shards their agents cannot give
    /// from `store`; with `only`, no agent is asked at all and the catalog comes from the bucket
    /// (the office is gone: the key and the bucket are enough).
    pub fn with_offsite(mut self, store: crate::offsite::OffsiteStore, only: bool) -> Fleet {
        self.offsite = Some((store, only));
        self
    }

    /// The offsite tier readers fall back on, if any.
    pub fn offsite(&self) -> Option<&crate::offsite::OffsiteStore> {
        self.offsite.as_ref().map(|o| &o.0)
    }

    /// True when the offsite tier is the only source (`--offsite-only`).
    pub fn offsite_only(&self) -> bool {
        self.offsite.as_ref().is_some_and(|o| o.1)
    }

    /// Wakes members that do not answer by Wake-on-LAN, and waits for them (see [`sleepers`]);
    /// a zero wait turns waking off.
    pub fn with_wake(mut self, wake: sleepers::WakeOptions) -> Fleet {
        self.wake = (!wake.wait.is_zero()).then_some(wake);
        self
    }

    /// How members that do not answer are woken; `None`: they are not.
    pub fn wake_options(&self) -> Option<&sleepers::WakeOptions> {
        self.wake.as_ref()
    }

    /// This machine's copies of the book ([`with_book_cache`](Self::with_book_cache)) and of
    /// the availability history ([`with_history_cache`](Self::with_history_cache)), as the files
    /// `agent-book` and `availability` in `owner_dir` (the key owner's cache directory,
    /// [`crate::cache_dir::owner_dir`]); None keeps none.
    pub fn with_cache_dir(self, owner_dir: Option<&std::path::Path>) -> Fleet {
        self.with_book_cache(owner_dir.map(|d| d.join("agent-book")))
            .with_history_cache(owner_dir.map(|d| d.join("availability")))
    }

    /// Keeps a sealed copy of the book at `path` (this machine's cache), read before the first
    /// connection and written whenever the merged book changes. A copy that does not open is
    /// ignored with a warning.
    pub fn with_book_cache(mut self, path: Option<PathBuf>) -> Fleet {
        let Some(path) = path else { return self };
        let cached = match std::fs::read(&path) {
            Ok(sealed) => match Book::open(&self.keys, &sealed) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!("{}: the cached agent book is unusable: {e}", path.display());
                    None
                }
            },
            Err(_) => None,
        };
        if let Some(b) = &cached {
            self.with_book(|mine| mine.merge(b));
        }
        self.cache = Some((path, Mutex::new(cached)));
        self
    }

    /// Writes the merged book to this machine's cache when it differs from what is there.
    fn save_cache(&self) {
        let Some((path, last)) = &self.cache else {
            return;
        };
        let book = self.book();
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_ref() == Some(&book) || book == Book::default() {
            return;
        }
        let written = book.seal(&self.keys).and_then(|sealed| {
            sa_core::durable::write(
                path,
                &sealed,
                sa_core::durable::Access::Private,
                sa_core::durable::Replace::Yes,
            )
        });
        match written {
            Ok(()) => *last = Some(book),
            Err(e) => tracing::warn!("cannot keep the agent book in this machine's cache: {e}"),
        }
    }

    /// The same fleet on another clock (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Fleet {
        self.clock = clock;
        self
    }

    /// The owner's keys.
    pub fn keys(&self) -> &Arc<Keys> {
        &self.keys
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The options.
    pub fn options(&self) -> &FleetOptions {
        &self.opts
    }

    fn with_book<T>(&self, f: impl FnOnce(&mut Book) -> T) -> T {
        let mut g = self.book.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// The agent book as merged from every copy read so far.
    pub fn book(&self) -> Book {
        self.with_book(|b| b.clone())
    }

    /// Connects to every address in parallel without judging identities (only `agents accept`,
    /// which decides about them, uses this directly); results in the order given.
    pub async fn connect_unchecked(&self, addrs: &[String]) -> Vec<Attempt> {
        let mut set = JoinSet::new();
        for (i, a) in addrs.iter().enumerate() {
            let (a, keys, opts) = (a.clone(), self.keys.clone(), self.opts.client);
            set.spawn(async move {
                let r = AgentClient::connect_with(&a, keys, opts).await;
                (i, a, r)
            });
        }
        let mut out: Vec<Option<Attempt>> = (0..addrs.len()).map(|_| None).collect();
        while let Some(r) = set.join_next().await {
            if let Ok((i, a, c)) = r {
                out[i] = Some((a, c));
            }
        }
        out.into_iter()
            .zip(addrs)
            .map(|(o, a)| {
                o.unwrap_or_else(|| {
                    (
                        a.clone(),
                        Err(sa_core::Error::Protocol("connect task failed".into())),
                    )
                })
            })
            .collect()
    }

    /// Reads the book from each client and merges every copy that opens.
    pub async fn load_book(&self, clients: &[AgentClient]) {
        let mut set = JoinSet::new();
        for c in clients {
            let c = c.clone();
            set.spawn(async move {
                let got = c.get_blob(BOOK_BLOB).await;
                (c, got)
            });
        }
        while let Some(Ok((c, got))) = set.join_next().await {
            let copy = match got.and_then(|b| Book::open(&self.keys, &b)) {
                Ok(copy) => {
                    self.with_book(|b| b.merge(&copy));
                    Some(copy)
                }
                Err(sa_core::Error::Remote(_)) | Err(sa_core::Error::ShardMissing) => None,
                Err(e) => {
                    tracing::warn!("{}: agent book unusable: {e}", c.addr());
                    None
                }
            };
            self.copies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(c.agent_id(), copy);
        }
        self.save_cache();
    }

    /// Connects to `addrs` and judges each agent (see the module docs); results in order.
    pub async fn connect(&self, addrs: &[String], access: Access) -> Vec<Attempt> {
        let mut attempts = self.connect_unchecked(addrs).await;
        self.judge(&mut attempts, access).await;
        attempts
    }

    async fn judge(&self, attempts: &mut [Attempt], access: Access) {
        let reached = live(attempts);
        if reached.is_empty() {
            return;
        }
        self.load_book(&reached).await;
        let mut changed = false;
        for (addr, r) in attempts.iter_mut() {
            let Ok(c) = r else { continue };
            let (id, key) = (c.agent_id(), c.key());
            let verdict = self.with_book(|b| b.check(&id, &key));
            match verdict {
                Verdict::Known => {
                    if access == Access::Write {
                        changed |= self.with_book(|b| b.pin(id, key, addr, false));
                    }
                }
                Verdict::New => {
                    let holder = self.with_book(|b| {
                        b.active()
                            .find(|m| m.addr == *addr && m.id != id)
                            .map(|m| m.id)
                    });
                    if let Some(member) = holder {
                        let e = sa_core::Error::Stranger {
                            addr: addr.clone(),
                            id: hex(&id),
                            member: hex(&member),
                        };
                        tracing::warn!("{e}");
                        *r = Err(e);
                    } else if access == Access::Write {
                        tracing::info!(
                            "{addr}: agent {} seen for the first time; pinned its identity {}",
                            &hex(&id)[..8],
                            key.fingerprint()
                        );
                        changed |= self.with_book(|b| b.pin(id, key, addr, false));
                    } else {
                        tracing::info!(
                            "{addr}: agent {} is not in the agent book; used for reading only \
                             (a snapshot or `sa-image agents add` pins it)",
                            &hex(&id)[..8]
                        );
                    }
                }
                Verdict::Changed { pinned } => {
                    let e = sa_core::Error::IdentityChanged {
                        addr: addr.clone(),
                        id: hex(&id),
                        pinned: pinned.to_string(),
                        presented: key.to_string(),
                    };
                    // Loud wherever it happens: a command that places around the agent would
                    // otherwise only say it is unreachable.
                    tracing::warn!("{e}");
                    *r = Err(e);
                }
                Verdict::Retired => {
                    *r = Err(sa_core::Error::Retired {
                        addr: addr.clone(),
                        id: hex(&id),
                    });
                }
            }
        }
        if access == Access::Write {
            let stale = self.stale_copies(&live(attempts));
            if changed || !stale.is_empty() {
                let targets = if changed { live(attempts) } else { stale };
                self.store_book(&targets).await;
            }
            self.save_cache();
        }
    }

    /// The clients whose copy of the book differs from the merged one.
    fn stale_copies(&self, clients: &[AgentClient]) -> Vec<AgentClient> {
        let book = self.book();
        let copies = self.copies.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .iter()
            .filter(|c| {
                copies
                    .get(&c.agent_id())
                    .is_none_or(|b| b.as_ref() != Some(&book))
            })
            .cloned()
            .collect()
    }

    /// Connects to `addrs`, then to every other member of the book in service (see the module
    /// docs). Members that do not answer, or that another agent answers for, are in
    /// [`Reach::down`].
    pub async fn reach(&self, addrs: &[String], access: Access) -> Reach {
        let mut attempts = self.connect(addrs, access).await;
        let seen: HashSet<[u8; 16]> = live(&attempts).iter().map(|c| c.agent_id()).collect();
        let members: Vec<Member> = self.with_book(|b| {
            b.active()
                .filter(|m| !seen.contains(&m.id))
                .cloned()
                .collect()
        });
        let mut down = Vec::new();
        let mut to_try: Vec<Member> = Vec::new();
        for m in members {
            match attempts.iter().find(|(a, _)| *a == m.addr) {
                // Its address was tried already and answered as another agent, or failed.
                Some((_, r)) => down.push(Down {
                    id: m.id,
                    addr: m.addr.clone(),
                    asleep: matches!(r, Err(sa_core::Error::AgentUnreachable { .. })),
                    why: match r {
                        Ok(c) => format!(
                            "agent {} answers at its address now",
                            &hex(&c.agent_id())[..8]
                        ),
                        Err(e) => e.to_string(),
                    },
                }),
                None => to_try.push(m),
            }
        }
        let addrs: Vec<String> = to_try.iter().map(|m| m.addr.clone()).collect();
        let mut more = self.connect_unchecked(&addrs).await;
        self.judge(&mut more, access).await;
        for (m, (addr, r)) in to_try.iter().zip(&more) {
            match r {
                Ok(c) if c.agent_id() == m.id => {}
                Ok(c) => down.push(Down {
                    id: m.id,
                    addr: addr.clone(),
                    asleep: false,
                    why: format!(
                        "agent {} answers at its address now",
                        &hex(&c.agent_id())[..8]
                    ),
                }),
                Err(e) => down.push(Down {
                    id: m.id,
                    addr: addr.clone(),
                    asleep: matches!(e, sa_core::Error::AgentUnreachable { .. }),
                    why: e.to_string(),
                }),
            }
        }
        attempts.extend(more);
        self.learn_wake(&live(&attempts), access).await;
        let reach = Reach { attempts, down };
        self.observe(&reach, access).await;
        reach
    }

    /// Writes the book to every client (best effort: a failure is a warning, and the next
    /// command that writes writes it again).
    pub async fn store_book(&self, clients: &[AgentClient]) {
        let sealed = match self.book().seal(&self.keys) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot seal the agent book: {e}");
                return;
            }
        };
        let book = self.book();
        let mut set = JoinSet::new();
        for c in clients {
            let (c, sealed) = (c.clone(), sealed.clone());
            set.spawn(async move {
                let r = c.put_blob(BOOK_BLOB, sealed).await;
                (c, r)
            });
        }
        while let Some(Ok((c, r))) = set.join_next().await {
            match r {
                Ok(()) => {
                    self.copies
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(c.agent_id(), Some(book.clone()));
                }
                Err(e) => tracing::warn!("{}: cannot store the agent book: {e}", c.addr()),
            }
        }
    }

    /// Changes the book with `f` (a user's decision: add, accept, retire), then writes it to
    /// every client. Returns whether it changed.
    pub async fn change_book(
        &self,
        clients: &[AgentClient],
        f: impl FnOnce(&mut Book) -> bool,
    ) -> bool {
        let changed = self.with_book(f);
        if changed {
            self.store_book(clients).await;
            self.save_cache();
        }
        changed
    }

    /// Whether `id` is retired in the book.
    pub fn is_retired(&self, id: &[u8; 16]) -> bool {
        self.with_book(|b| b.get(id).is_some_and(|m| m.retired))
    }

    /// The book's last known address of `id`.
    pub fn book_addr(&self, id: &[u8; 16]) -> Option<String> {
        self.with_book(|b| b.get(id).map(|m| m.addr.clone()))
    }
}

//! Reaching the agents: connect to many at once, check each one's identity against the agent
//! book, read the catalog from any one, and map a snapshot's agent table (stable ids + last
//! known addresses) onto live connections.
//!
//! **Pins.** Every connection goes through [`connect_many`], which reads the agent book
//! ([`sa_core::pins`]) from every agent it reached, merges the copies into the process-wide
//! book, and then judges each agent: a known id with its pinned key is used; a new id is pinned
//! (trust on first contact) and the book written back to every agent reached; a known id with
//! another key, or a retired agent, is not used and its attempt becomes the error that says so
//! (and how to accept the new key on purpose). The book is kept for the whole process, so an
//! agent reached later (a snapshot's table entry looked up by address) is judged against every
//! pin seen so far, not only against copies it serves itself.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use anyhow::{bail, Result};

use sa_core::catalog::sort_by_creation;
use sa_core::keys::{hex, Keys};
use sa_core::manifest::{group_revisions, Manifest, SNAPSHOT_BLOB_PREFIX};
use sa_core::pins::{Book, Verdict, BOOK_BLOB};
use sa_core::store::{AgentClient, ShardRead, ShardWrite};
use tokio::task::JoinSet;

/// The outcome of connecting to one address.
pub type Attempt = (String, sa_core::Result<AgentClient>);

/// The agent book as merged from every copy this process has read or written.
static BOOK: Mutex<Option<Book>> = Mutex::new(None);

fn with_book<T>(f: impl FnOnce(&mut Book) -> T) -> T {
    let mut g = BOOK.lock().unwrap_or_else(|p| p.into_inner());
    f(g.get_or_insert_with(Book::default))
}

/// A copy of the agent book as this process knows it.
pub fn book() -> Book {
    with_book(|b| b.clone())
}

/// Reads the book from each client and merges every copy that opens into the process's book.
pub async fn load_book(clients: &[AgentClient], keys: &Keys) {
    let mut set = JoinSet::new();
    for c in clients {
        let c = c.clone();
        set.spawn(async move {
            let got = c.get_blob(BOOK_BLOB).await;
            (c, got)
        });
    }
    while let Some(Ok((c, got))) = set.join_next().await {
        match got.and_then(|b| Book::open(keys, &b)) {
            Ok(copy) => {
                with_book(|b| b.merge(&copy));
            }
            Err(sa_core::Error::Remote(_)) | Err(sa_core::Error::ShardMissing) => {}
            Err(e) => tracing::warn!("{}: agent book unusable: {e}", c.addr()),
        }
    }
}

/// Writes the process's book to every client (best effort: a failure is a warning, and the
/// next command writes it again).
pub async fn store_book(clients: &[AgentClient], keys: &Keys) -> Result<()> {
    let sealed = book().seal(keys)?;
    let mut set = JoinSet::new();
    for c in clients {
        let (c, sealed) = (c.clone(), sealed.clone());
        set.spawn(async move {
            if let Err(e) = c.put_blob(BOOK_BLOB, sealed).await {
                tracing::warn!("{}: cannot store the agent book: {e}", c.addr());
            }
        });
    }
    while set.join_next().await.is_some() {}
    Ok(())
}

/// Changes the book with `f` (a user's decision: add, accept, retire), then writes it to every
/// client.
pub async fn change_book(
    clients: &[AgentClient],
    keys: &Keys,
    f: impl FnOnce(&mut Book) -> bool,
) -> Result<bool> {
    let changed = with_book(f);
    if changed {
        store_book(clients, keys).await?;
    }
    Ok(changed)
}

/// Connects to every address in parallel and judges each agent against the agent book (see
/// the module docs); results in the order given.
pub async fn connect_many(addrs: &[String], keys: &Arc<Keys>) -> Vec<Attempt> {
    let mut attempts = connect_unchecked(addrs, keys).await;
    let reached = live(&attempts);
    if reached.is_empty() {
        return attempts;
    }
    load_book(&reached, keys).await;
    let mut changed = false;
    for (addr, r) in attempts.iter_mut() {
        let Ok(c) = r else { continue };
        let (id, key) = (c.agent_id(), c.key());
        let verdict = with_book(|b| b.check(&id, &key));
        match verdict {
            Verdict::Known | Verdict::New => {
                if verdict == Verdict::New {
                    tracing::info!(
                        "{addr}: agent {} seen for the first time; pinned its identity {}",
                        &hex(&id)[..8],
                        key.fingerprint()
                    );
                }
                changed |= with_book(|b| b.pin(id, key, addr, false));
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
    if changed {
        if let Err(e) = store_book(&live(&attempts), keys).await {
            tracing::warn!("cannot store the agent book: {e}");
        }
    }
    attempts
}

/// Connects to `addrs` ([`connect_many`]), then to every member of the agent book in service
/// that is not among them. Returns the attempts for `addrs` (in order) and those for the
/// members.
pub async fn connect_with_members(
    addrs: &[String],
    keys: &Arc<Keys>,
) -> (Vec<Attempt>, Vec<Attempt>) {
    let given = connect_many(addrs, keys).await;
    let seen: Vec<[u8; 16]> = live(&given).iter().map(AgentClient::agent_id).collect();
    let more: Vec<String> = book()
        .active()
        .filter(|m| !seen.contains(&m.id) && !addrs.contains(&m.addr))
        .map(|m| m.addr.clone())
        .collect();
    let members = connect_many(&more, keys).await;
    (given, members)
}

/// Connects to every address in parallel without judging identities (only for `agents
/// accept`, which decides about them); results in the order given.
pub async fn connect_unchecked(addrs: &[String], keys: &Arc<Keys>) -> Vec<Attempt> {
    let mut set = JoinSet::new();
    for (i, a) in addrs.iter().enumerate() {
        let (a, keys) = (a.clone(), keys.clone());
        set.spawn(async move { (i, a.clone(), AgentClient::connect(&a, keys).await) });
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

/// The agents of `attempts` that answered (and passed the identity check).
pub fn live(attempts: &[Attempt]) -> Vec<AgentClient> {
    attempts
        .iter()
        .filter_map(|(_, c)| c.as_ref().ok().cloned())
        .collect()
}

/// [`live`], or the error that says why no agent could be used.
pub fn live_or_none(attempts: &[Attempt]) -> Result<Vec<AgentClient>> {
    let clients = live(attempts);
    if clients.is_empty() {
        return Err(none_reachable(attempts));
    }
    Ok(clients)
}

/// Explains why no agent could be used.
pub fn none_reachable(attempts: &[Attempt]) -> anyhow::Error {
    let mut msg = String::from("no agent could be used:");
    let mut refused = false;
    for (a, r) in attempts {
        if let Err(e) = r {
            refused |= matches!(e, sa_core::Error::Refused { .. });
            msg.push_str(&format!("\n  {a}: {e}"));
        }
    }
    if attempts
        .iter()
        .any(|(_, r)| matches!(r, Err(sa_core::Error::IdentityChanged { .. })))
    {
        msg.push_str("\nan agent showed another identity than the one pinned for it: see above");
    } else if refused {
        msg.push_str("\nthe agents refused this key: is it the key these backups were made with? (`sa-image owner-id --key KEYFILE` must print the id the agents were started with)");
    } else {
        msg.push_str("\nare the agents running, and are the addresses right?");
    }
    anyhow::anyhow!(msg)
}

/// Connects to the given agents and reads the catalog. Every reachable agent is asked for the
/// names it holds (cheap), and each snapshot's manifest is read from the first agent that holds
/// a sound copy: a damaged or missing copy on one agent falls through to the next.
pub async fn open_catalog(
    addrs: &[String],
    keys: &Arc<Keys>,
) -> Result<(Vec<Manifest>, Vec<Attempt>)> {
    let attempts = connect_many(addrs, keys).await;
    let live = live_or_none(&attempts)?;
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
        bail!("no reachable agent could list its catalog (see the warnings above)");
    }
    // A snapshot forgotten (tombstone on any agent) stays hidden where a stale copy remains,
    // e.g. on an agent that was offline during `forget`/`prune`.
    let mut revisions = group_revisions(holders.keys().map(String::as_str));
    let ids: Vec<String> = revisions.keys().cloned().collect();
    for c in &live {
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
        bail!(
            "the catalog holds {} snapshot(s) but none opens with this key: wrong key file? ({})",
            unreadable.len(),
            unreadable[0].1
        );
    }
    sort_by_creation(&mut manifests);
    Ok((manifests, attempts))
}

/// A snapshot's agent table mapped onto connections: `slots[i]` serves table entry `i`.
pub struct SlotClients {
    /// Connection per table slot, `None` when that agent cannot be reached.
    pub slots: Vec<Option<AgentClient>>,
    /// Human names per slot (`addr (id…)`).
    pub names: Vec<String>,
    /// Why unreachable slots are unreachable.
    pub down: Vec<(usize, String)>,
}

/// Maps the manifest's agent table to live agents: by stable id among those already connected,
/// else by connecting to the table's last known address.
pub async fn clients_for(m: &Manifest, attempts: &[Attempt], keys: &Arc<Keys>) -> SlotClients {
    let mut slots: Vec<Option<AgentClient>> = vec![None; m.agents.len()];
    let mut to_try = Vec::new();
    for (i, entry) in m.agents.iter().enumerate() {
        let found = attempts
            .iter()
            .filter_map(|(_, c)| c.as_ref().ok())
            .find(|c| c.agent_id() == entry.id);
        match found {
            Some(c) => slots[i] = Some(c.clone()),
            None => to_try.push(i),
        }
    }
    let addrs: Vec<String> = to_try.iter().map(|&i| m.agents[i].addr.clone()).collect();
    let mut down = Vec::new();
    for (&i, (addr, r)) in to_try.iter().zip(connect_many(&addrs, keys).await) {
        match r {
            Ok(c) if c.agent_id() == m.agents[i].id => slots[i] = Some(c),
            Ok(_) => down.push((i, format!("{addr}: a different agent answers there now"))),
            Err(e) => down.push((i, e.to_string())),
        }
    }
    let names = m
        .agents
        .iter()
        .map(|a| format!("{} ({})", a.addr, &hex(&a.id)[..8]))
        .collect();
    SlotClients { slots, names, down }
}

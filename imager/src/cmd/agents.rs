//! `sa-image agents list|add|accept`: the agent book ([`sa_core::pins`]) — which agents belong
//! to this owner, their stable ids, last addresses and pinned identity keys.
//!
//! * `list` reads the book from the agents given (one is enough) and asks every member whether
//!   it answers.
//! * `add ADDR` connects to a new agent, pins its identity on purpose and writes the book to
//!   every reachable member; the next `snapshot` places shards on it (snapshot uses the agents
//!   given plus every member in the book).
//! * `accept ID` pins the key an agent shows now, on purpose, in place of the pinned one: after
//!   its identity key was replaced deliberately (a directory restored without `identity.key`).
//!   Nothing else ever changes a pin.
//! * `retire ID` takes an agent out of service: it is marked retired in the book (so no command
//!   uses it again, and it is not pinned anew as a stranger), then a repair pass rebuilds every
//!   shard it held onto agents outside each stripe and commits new manifest revisions that no
//!   longer name it. The shards are rebuilt from the other agents (not copied from the retiring
//!   one), so it does not need to answer: a PC already gone for good is retired the same way.
//!   When some stripe cannot be rebuilt without it (other agents down too), it is put back in
//!   service and the command fails, naming how many stripes would be lost. Its directory can be
//!   deleted afterwards; the book keeps it as retired (`agents add` brings it back).

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sa_core::keys::hex;
use sa_core::pins::Member;
use sa_core::store::{AgentClient, ShardRead};
use serde::{Deserialize, Serialize};

use crate::agents::{
    book, change_book, connect_unchecked, connect_with_members, live, none_reachable, Attempt,
};
use crate::cmd::list::rfc3339;
use crate::config::{self, normalize_addr, require_agents, KeyArgs};
use crate::merge;

/// `agents` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum AgentsCommand {
    /// Every agent in the book: id, address, pinned identity, whether it answers, its usage.
    List(AgentsArgs),
    /// Add an agent: pin its identity and record it in the book on every agent.
    Add(AddArgs),
    /// Accept the identity key an agent shows now in place of the pinned one (on purpose only).
    Accept(AcceptArgs),
    /// Take an agent out of service: rebuild its shards elsewhere, then leave it retired.
    Retire(AcceptArgs),
}

/// Flags every `agents` subcommand takes.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AgentsArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Agents to ask, HOST:PORT, comma-separated: one member is enough, the book names the rest.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `agents add`.
#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The new agent, HOST:PORT.
    pub addr: String,
    #[command(flatten)]
    common: AgentsArgs,
}

/// Flags of `agents accept` and `agents retire`.
#[derive(clap::Args, Debug)]
pub struct AcceptArgs {
    /// The agent's id (or a unique prefix of it), as `agents list` or the refusal printed it.
    pub id: String,
    #[command(flatten)]
    common: AgentsArgs,
}

/// One row of `agents list --json`.
#[derive(Serialize, Debug)]
pub struct AgentRow {
    /// Stable agent id (hex).
    pub id: String,
    /// Last known address.
    pub addr: String,
    /// Pinned identity key (hex).
    pub identity: String,
    /// `active` or `retired`.
    pub state: &'static str,
    /// `first-contact` (pinned automatically) or `deliberate` (`agents add`/`accept`).
    pub pinned_by: &'static str,
    /// When this key was pinned, RFC 3339.
    pub pinned: String,
    /// Answers now with the pinned identity.
    pub reachable: bool,
    /// Why not, when it does not.
    pub error: Option<String>,
    /// Bytes stored (when reachable).
    pub used: Option<u64>,
    /// Quota, 0 = none (when reachable).
    pub quota: Option<u64>,
    /// Shard files (when reachable).
    pub shards: Option<u64>,
}

/// `sa-image agents ...`.
pub async fn run(command: AgentsCommand, cfg: Option<&Path>) -> Result<u8> {
    match command {
        AgentsCommand::List(args) => list(args, cfg).await,
        AgentsCommand::Add(a) => add(a, cfg).await,
        AgentsCommand::Accept(a) => accept(a, cfg).await,
        AgentsCommand::Retire(a) => retire(a, cfg).await,
    }
}

fn load(
    mut args: AgentsArgs,
    cfg: Option<&Path>,
) -> Result<(AgentsArgs, Arc<sa_core::keys::Keys>)> {
    let mut file: AgentsArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; agents; bools json);
    let keys = Arc::new(args.keyfile.load()?.derive());
    Ok((args, keys))
}

/// Connects to the agents given, then to every other member of the book in service.
async fn reach_all(addrs: &[String], keys: &Arc<sa_core::keys::Keys>) -> Vec<Attempt> {
    let (mut attempts, members) = connect_with_members(addrs, keys).await;
    attempts.extend(members);
    attempts
}

async fn list(args: AgentsArgs, cfg: Option<&Path>) -> Result<u8> {
    let (args, keys) = load(args, cfg)?;
    let attempts = reach_all(&require_agents(&args.agents)?, &keys).await;
    if live(&attempts).is_empty() {
        return Err(none_reachable(&attempts));
    }
    let mut rows = Vec::new();
    for m in book().members() {
        rows.push(row(m, &attempts).await);
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("the agent book is empty: no agent has been used yet");
    } else {
        println!(
            "{:<16}  {:<21}  {:<16}  {:<7}  {:<13}  {:<20}  status",
            "ID", "ADDRESS", "IDENTITY", "STATE", "PINNED BY", "PINNED"
        );
        for r in &rows {
            let status = match (&r.error, r.used) {
                (Some(e), _) => format!("unreachable: {e}"),
                (None, Some(used)) => format!(
                    "up, {} used{}, {} shards",
                    sa_core::size::format_size(used),
                    match r.quota {
                        Some(q) if q > 0 => format!(" of {}", sa_core::size::format_size(q)),
                        _ => String::new(),
                    },
                    r.shards.unwrap_or(0)
                ),
                (None, None) => "up".into(),
            };
            println!(
                "{:<16}  {:<21}  {:<16}  {:<7}  {:<13}  {:<20}  {status}",
                &r.id[..16],
                r.addr,
                &r.identity[..16],
                r.state,
                r.pinned_by,
                r.pinned
            );
        }
    }
    Ok(0)
}

async fn row(m: &Member, attempts: &[Attempt]) -> AgentRow {
    let found = attempts.iter().find_map(|(addr, r)| match r {
        Ok(c) if c.agent_id() == m.id => Some(Ok(c.clone())),
        Err(e) if *addr == m.addr => Some(Err(e.to_string())),
        _ => None,
    });
    let (mut reachable, mut error, mut stat) = (false, None, None);
    match found {
        Some(Ok(c)) => match c.stat().await {
            Ok(s) => {
                reachable = true;
                stat = Some(s);
            }
            Err(e) => error = Some(e.to_string()),
        },
        Some(Err(e)) => error = Some(e),
        None if m.retired => {}
        None => error = Some("not asked".into()),
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
    }
}

async fn add(a: AddArgs, cfg: Option<&Path>) -> Result<u8> {
    let (args, keys) = load(a.common, cfg)?;
    let new_addr = normalize_addr(&a.addr);
    let mut addrs = args
        .agents
        .clone()
        .map(|_| require_agents(&args.agents))
        .transpose()?
        .unwrap_or_default();
    addrs.retain(|x| *x != new_addr);
    addrs.insert(0, new_addr.clone());
    let attempts = reach_all(&addrs, &keys).await;
    let new = match &attempts[0].1 {
        Ok(c) => c.clone(),
        Err(e) => bail!("cannot add {new_addr}: {e}"),
    };
    let (id, key) = (new.agent_id(), new.key());
    let clients = live(&attempts);
    change_book(&clients, &keys, |b| {
        let was_retired = b.get(&id).is_some_and(|m| m.retired);
        b.pin(id, key, &new_addr, true) || was_retired
    })
    .await?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"id": hex(&id), "addr": new_addr, "identity": key.to_string(),
                "book_copies": clients.len()})
        );
    } else {
        println!(
            "added agent {} at {new_addr}, identity {}; the agent book is on {} agent(s). \
             The next snapshot places shards on it.",
            hex(&id),
            key.fingerprint(),
            clients.len()
        );
    }
    Ok(0)
}

/// The one book member whose id starts with `prefix`.
fn find_member(prefix: &str) -> Result<Member> {
    let want = prefix.to_ascii_lowercase();
    let matches: Vec<Member> = book()
        .members()
        .filter(|m| hex(&m.id).starts_with(&want))
        .cloned()
        .collect();
    match matches.as_slice() {
        [m] => Ok(m.clone()),
        [] => bail!("no agent with id {prefix} in the agent book (see `sa-image agents list`)"),
        _ => bail!(
            "id prefix {prefix} names {} agents: give more digits",
            matches.len()
        ),
    }
}

async fn retire(a: AcceptArgs, cfg: Option<&Path>) -> Result<u8> {
    let (args, keys) = load(a.common, cfg)?;
    let addrs = require_agents(&args.agents)?;
    let attempts = reach_all(&addrs, &keys).await;
    let member = find_member(&a.id)?;
    if member.retired {
        println!("agent {} is already retired", hex(&member.id));
        return Ok(0);
    }
    let clients: Vec<AgentClient> = live(&attempts)
        .into_iter()
        .filter(|c| c.agent_id() != member.id)
        .collect();
    if clients.is_empty() {
        bail!(
            "no other agent answers: retiring {} would leave nothing",
            hex(&member.id)
        );
    }
    change_book(&clients, &keys, |b| b.retire(&member.id)).await?;
    // From here on this process refuses the retired agent: its shards count as absent.
    let others: Vec<String> = clients.iter().map(|c| c.addr().to_string()).collect();
    let opts = crate::cmd::repair::PassOptions {
        dry_run: false,
        cache_dir: None,
    };
    let pass = crate::cmd::repair::repair_pass(&others, &keys, &opts, &mut |_| {
        std::collections::HashSet::new()
    })
    .await;
    let report = match pass {
        Ok(r) if r.stripes_lost == 0 && r.shards_failed == 0 => r,
        other => {
            // Back in service: it still holds shards nothing else can replace.
            change_book(&clients, &keys, |b| {
                b.pin(member.id, member.key, &member.addr, true)
            })
            .await?;
            let why = match other {
                Ok(r) => format!(
                    "{} stripe(s) cannot be rebuilt without it and {} shard(s) found no place \
                     (other agents down, or too few agents outside the stripes)",
                    r.stripes_lost, r.shards_failed
                ),
                Err(e) => format!("{e:#}"),
            };
            bail!(
                "agent {} stays in service: {why}; bring the other agents back (or add one) and \
                 retire it again",
                hex(&member.id)
            );
        }
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({"id": hex(&member.id), "addr": member.addr, "retired": true,
                "repair": report})
        );
    } else {
        crate::cmd::repair::print_text(&report);
        println!(
            "retired agent {} ({}): {} shard(s) rebuilt elsewhere; it is no longer used and its \
             directory may be deleted",
            hex(&member.id),
            member.addr,
            report.shards_rebuilt
        );
    }
    Ok(0)
}

async fn accept(a: AcceptArgs, cfg: Option<&Path>) -> Result<u8> {
    let (args, keys) = load(a.common, cfg)?;
    let addrs = require_agents(&args.agents)?;
    // Judged connections load the book; the agent in question shows up as refused.
    let attempts = reach_all(&addrs, &keys).await;
    let member = find_member(&a.id)?;
    // Where it answers: its address in the book, and the addresses given.
    let mut tries = vec![member.addr.clone()];
    tries.extend(addrs.iter().filter(|x| **x != member.addr).cloned());
    let raw = connect_unchecked(&tries, &keys).await;
    let Some(c) = raw
        .iter()
        .find_map(|(_, r)| r.as_ref().ok().filter(|c| c.agent_id() == member.id))
        .cloned()
    else {
        bail!(
            "agent {} does not answer at {} (or at the addresses given): start it, or give its address with --agents",
            hex(&member.id),
            tries.join(", ")
        )
    };
    let key = c.key();
    if key == member.key && !member.retired {
        println!(
            "agent {} at {} already shows its pinned identity {}; nothing to accept",
            hex(&member.id),
            c.addr(),
            key.fingerprint()
        );
        return Ok(0);
    }
    let mut clients = live(&attempts);
    clients.push(c.clone());
    change_book(&clients, &keys, |b| b.pin(member.id, key, c.addr(), true))
        .await
        .context("cannot store the agent book")?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"id": hex(&member.id), "addr": c.addr(), "identity": key.to_string(),
                "replaced": member.key.to_string()})
        );
    } else {
        println!(
            "accepted identity {} for agent {} at {} (was {})",
            key.fingerprint(),
            hex(&member.id),
            c.addr(),
            member.key.fingerprint()
        );
    }
    Ok(0)
}

//! `sa-image agents list|add|accept|retire` (see [`sa_engine::agents`]).

use std::path::Path;

use anyhow::Result;
use sa_core::size::format_size;
use sa_engine::agents::{self, AgentRow};
use serde::Deserialize;

use crate::config::{self, normalize_addr, FleetArgs, KeyArgs, WakeArgs};
use crate::exit::usage;
use crate::merge;
use crate::text::print_repair;

/// `agents` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum AgentsCommand {
    /// Every agent in the book: id, address, pinned identity, whether it answers, its usage.
    List(AgentsArgs),
    /// Add an agent (a new PC, or one reinstalled at a member's address): pin its identity and
    /// record it in the book on every agent.
    Add(AddArgs),
    /// Accept the identity key an agent shows now in place of the pinned one (on purpose only).
    Accept(IdArgs),
    /// Take an agent out of service: rebuild its shards elsewhere, then leave it retired.
    Retire(IdArgs),
    /// Wake an agent's PC (or every member that does not answer, with --all) by Wake-on-LAN,
    /// and wait for it to answer.
    Wake(WakeCmdArgs),
}

/// Flags of `agents wake`.
#[derive(clap::Args, Debug)]
pub struct WakeCmdArgs {
    /// The agent's id (or a unique prefix of it), as `agents list` prints it.
    pub id: Option<String>,
    /// Wake every member of the agent book that does not answer.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    wake: WakeArgs,
    #[command(flatten)]
    common: AgentsArgs,
}

/// Flags every `agents` subcommand takes.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct AgentsArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Flags of `agents add`.
#[derive(clap::Args, Debug)]
pub struct AddArgs {
    /// The new agent, HOST[:PORT].
    pub addr: String,
    #[command(flatten)]
    common: AgentsArgs,
}

/// Flags of `agents accept` and `agents retire`.
#[derive(clap::Args, Debug)]
pub struct IdArgs {
    /// The agent's id (or a unique prefix of it), as `agents list` or the refusal printed it.
    pub id: String,
    #[command(flatten)]
    common: AgentsArgs,
}

/// `sa-image agents ...`.
pub async fn run(command: AgentsCommand, cfg: Option<&Path>) -> Result<u8> {
    match command {
        AgentsCommand::List(args) => list(args, cfg).await,
        AgentsCommand::Add(a) => add(a, cfg).await,
        AgentsCommand::Accept(a) => accept(a, cfg).await,
        AgentsCommand::Retire(a) => retire(a, cfg).await,
        AgentsCommand::Wake(a) => wake(a, cfg).await,
    }
}

fn load(mut args: AgentsArgs, cfg: Option<&Path>) -> Result<(AgentsArgs, sa_engine::fleet::Fleet)> {
    let mut file: AgentsArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    merge!(args, file; ; bools json);
    let fleet = args.fleet.fleet(args.keyfile.load()?.derive())?;
    Ok((args, fleet))
}

async fn list(args: AgentsArgs, cfg: Option<&Path>) -> Result<u8> {
    let (args, fleet) = load(args, cfg)?;
    let offset = chrono::Local::now().offset().local_minus_utc();
    let rows = agents::list_at(&fleet, &args.fleet.addrs()?, offset).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if rows.is_empty() {
        println!("the agent book is empty: no agent has been used yet");
    } else {
        print_rows(&rows);
    }
    Ok(0)
}

fn print_rows(rows: &[AgentRow]) {
    println!(
        "{:<16}  {:<21}  {:<16}  {:<8}  {:<13}  {:<20}  status",
        "ID", "ADDRESS", "IDENTITY", "STATE", "PINNED BY", "PINNED"
    );
    for r in rows {
        let status = match (r.state, &r.error, r.used) {
            ("retired", _, _) => "retired: not used".to_string(),
            (_, Some(e), _) => format!("unreachable: {e}"),
            (_, None, Some(used)) => format!(
                "up, {} used{}, {} shards",
                format_size(used),
                match r.quota {
                    Some(q) if q > 0 => format!(" of {}", format_size(q)),
                    _ => String::new(),
                },
                r.shards.unwrap_or(0)
            ),
            (_, None, None) => "up".into(),
        };
        println!(
            "{:<16}  {:<21}  {:<16}  {:<8}  {:<13}  {:<20}  {status}",
            &r.id[..16],
            r.addr,
            &r.identity[..16],
            r.state,
            r.pinned_by,
            r.pinned
        );
        println!("{:<16}  {}", "", availability_text(r));
    }
}

/// `up 83% of the last 30 days (700 of 720 hours seen); usually up Mon-Fri 08-18; wakes at MAC`.
fn availability_text(r: &AgentRow) -> String {
    let up = match &r.availability {
        Some(u) => format!(
            "up {:.0}% of the last 30 days ({} of {} hours seen)",
            u.fraction * 100.0,
            u.observed_hours,
            u.span_hours
        ),
        None => "availability: not observed yet".into(),
    };
    let usual = r.usual_hours.as_deref().unwrap_or("usual hours unknown");
    let mac = match &r.mac {
        Some(m) => format!("woken at MAC {m}"),
        None => "MAC unknown (cannot be woken yet)".into(),
    };
    format!("{up}; {usual}; {mac}")
}

async fn add(a: AddArgs, cfg: Option<&Path>) -> Result<u8> {
    let (args, fleet) = load(a.common, cfg)?;
    let new_addr = normalize_addr(&a.addr);
    let others = match &args.fleet.agents {
        Some(_) => args.fleet.addrs()?,
        None => Vec::new(),
    };
    let added = agents::add(&fleet, &new_addr, &others).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&added)?);
    } else {
        println!(
            "added agent {} at {}, identity {}; the agent book is on {} agent(s). The next \
             snapshot places shards on it.",
            added.id,
            added.addr,
            &added.identity[..16],
            added.book_copies
        );
    }
    Ok(0)
}

async fn accept(a: IdArgs, cfg: Option<&Path>) -> Result<u8> {
    let (args, fleet) = load(a.common, cfg)?;
    let acc = agents::accept(&fleet, &a.id, &args.fleet.addrs()?).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&acc)?);
    } else if acc.identity == acc.replaced {
        println!(
            "agent {} at {} already shows its pinned identity {}; nothing to accept",
            acc.id,
            acc.addr,
            &acc.identity[..16]
        );
    } else {
        println!(
            "accepted identity {} for agent {} at {} (was {})",
            &acc.identity[..16],
            acc.id,
            acc.addr,
            &acc.replaced[..16]
        );
    }
    Ok(0)
}

async fn retire(a: IdArgs, cfg: Option<&Path>) -> Result<u8> {
    let (args, fleet) = load(a.common, cfg)?;
    let r = agents::retire(
        &fleet,
        &a.id,
        &args.fleet.addrs()?,
        args.fleet.cache_dir.clone(),
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(0);
    }
    match &r.repair {
        None => println!("agent {} is already retired", r.id),
        Some(rep) => {
            print_repair(rep);
            println!(
                "retired agent {} ({}): {} shard(s) rebuilt elsewhere; it is no longer used and its \
                 directory may be deleted",
                r.id, r.addr, rep.shards_rebuilt
            );
        }
    }
    Ok(0)
}

async fn wake(mut a: WakeCmdArgs, cfg: Option<&Path>) -> Result<u8> {
    if a.id.is_some() == a.all {
        return Err(usage(
            "give the id of the agent to wake (see `sa-image agents list`), or --all for every \
             member that does not answer",
        ));
    }
    let mut file: WakeArgs = config::load(cfg)?;
    a.wake.merge(&mut file);
    let opts = a.wake.options()?;
    let (args, fleet) = load(a.common, cfg)?;
    let r = sa_engine::fleet::sleepers::wake_agents(
        &fleet,
        &args.fleet.addrs()?,
        a.id.as_deref(),
        &opts,
        &crate::progress::Bar::new(true),
    )
    .await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        for row in &r.agents {
            let text = match row.state {
                "up" => "up: it answers already".to_string(),
                "woke" => format!("woke up (MAC {})", row.mac.as_deref().unwrap_or("?")),
                "sent" => format!(
                    "magic packets sent to MAC {} (not waited for)",
                    row.mac.as_deref().unwrap_or("?")
                ),
                "asleep" => format!(
                    "still asleep after {:.0}s (MAC {}): check that Wake-on-LAN is enabled on \
                     that PC",
                    r.waited,
                    row.mac.as_deref().unwrap_or("?")
                ),
                _ => format!("not woken: {}", row.why.as_deref().unwrap_or("")),
            };
            println!("{} ({})  {text}", row.addr, &row.id[..8]);
        }
    }
    Ok(if r.all_up() { 0 } else { crate::exit::ERROR })
}

//! `sa-image scrub`: asks every agent of the catalog for a full scrub pass now (each checks the
//! crc32c values of all its shard files and quarantines bad ones; see `shard_agent::scrub`),
//! waits for the passes to finish (unless `--no-wait`), and gathers what they found.
//!
//! Exit 0: no bad shard anywhere (or every one already restored by a repair). Exit 2: bad shards
//! in quarantine that are not restored yet (`sa-image repair` rebuilds them). Exit 1: an agent
//! could not be asked.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use sa_core::keys::hex;
use sa_core::size::format_size;
use sa_core::store::{AgentClient, ScrubStatus};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use crate::agents::open_catalog;
use crate::config::{self, require_agents, KeyArgs};
use crate::health::Fleet;
use crate::merge;

/// How often a waiting `scrub` asks the agents how far they are.
const POLL: Duration = Duration::from_millis(200);

/// Flags of `scrub`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ScrubArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Agents to ask, HOST:PORT, comma-separated: the catalog names the rest.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Only start the passes (or, with --report-only, not even that) and report at once.
    #[arg(long)]
    pub no_wait: bool,
    /// Start no pass: report what the agents' scrubs found so far.
    #[arg(long)]
    pub report_only: bool,
}

/// One bad shard in `scrub --json`.
#[derive(Serialize, Debug)]
pub struct BadShard {
    /// Volume id (hex).
    pub volume: String,
    /// Stripe id (hex).
    pub stripe: String,
    /// Shard index.
    pub index: u8,
    /// A sound copy is stored again (a repair put it back).
    pub restored: bool,
    /// What was wrong.
    pub reason: String,
}

/// One agent in `scrub --json`.
#[derive(Serialize, Debug)]
pub struct AgentScrub {
    /// Address.
    pub addr: String,
    /// Stable id (hex).
    pub id: String,
    /// `done`, `running`, `unreachable: ...` or `failed: ...`.
    pub status: String,
    /// Background rate, bytes/s (0: background scrub off).
    pub rate: u64,
    /// Shards checked by the last (or running) pass.
    pub checked: u64,
    /// Bytes read by it.
    pub bytes: u64,
    /// Passes completed since the agent started.
    pub passes_done: u64,
    /// Shards in quarantine in all.
    pub bad_total: u64,
    /// Quarantined shards (as many as the agent lists).
    pub bad: Vec<BadShard>,
}

/// What `scrub --json` prints.
#[derive(Serialize, Debug)]
pub struct ScrubReport {
    /// Per agent.
    pub agents: Vec<AgentScrub>,
    /// Quarantined shards not restored yet, all agents.
    pub bad_unrestored: u64,
    /// Seconds spent.
    pub seconds: f64,
}

/// `sa-image scrub`.
pub async fn run(mut args: ScrubArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: ScrubArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; agents; bools json, no_wait, report_only);
    let keys = Arc::new(args.keyfile.load()?.derive());
    let started = Instant::now();
    let (manifests, attempts) = open_catalog(&require_agents(&args.agents)?, &keys).await?;
    let fleet = Fleet::gather(&attempts, &manifests, &keys).await;
    let wait = !args.no_wait && !args.report_only;
    let start = !args.report_only;
    let mut set = JoinSet::new();
    for (i, m) in fleet.members.iter().enumerate() {
        if let Some(c) = m.client.clone() {
            set.spawn(async move { (i, scrub_agent(&c, start, wait).await) });
        }
    }
    let mut results: Vec<Option<sa_core::Result<ScrubStatus>>> =
        fleet.members.iter().map(|_| None).collect();
    while let Some(r) = set.join_next().await {
        if let Ok((i, r)) = r {
            results[i] = Some(r);
        }
    }
    let mut report = ScrubReport {
        agents: Vec::new(),
        bad_unrestored: 0,
        seconds: 0.0,
    };
    let mut failed = false;
    for (m, r) in fleet.members.iter().zip(results) {
        let mut a = AgentScrub {
            addr: m.addr.clone(),
            id: hex(&m.id),
            status: String::new(),
            rate: 0,
            checked: 0,
            bytes: 0,
            passes_done: 0,
            bad_total: 0,
            bad: Vec::new(),
        };
        match r {
            None => {
                a.status = format!(
                    "unreachable: {}",
                    m.error.clone().unwrap_or_else(|| "no answer".into())
                )
            }
            Some(Err(e)) => {
                failed = true;
                a.status = format!("failed: {e}");
            }
            Some(Ok(s)) => {
                a.status = if s.running { "running" } else { "done" }.into();
                a.rate = s.rate;
                a.checked = s.checked;
                a.bytes = s.bytes;
                a.passes_done = s.passes_done;
                a.bad_total = s.bad_total;
                report.bad_unrestored += s.bad.iter().filter(|f| !f.restored).count() as u64;
                a.bad = s
                    .bad
                    .into_iter()
                    .map(|f| BadShard {
                        volume: hex(&f.key.volume),
                        stripe: hex(&f.key.stripe),
                        index: f.key.index,
                        restored: f.restored,
                        reason: f.reason,
                    })
                    .collect();
            }
        }
        report.agents.push(a);
    }
    report.seconds = started.elapsed().as_secs_f64();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    Ok(if failed {
        1
    } else if report.bad_unrestored > 0 {
        2
    } else {
        0
    })
}

/// Starts a pass (when `start`) and, with `wait`, polls until it is done.
async fn scrub_agent(c: &AgentClient, start: bool, wait: bool) -> sa_core::Result<ScrubStatus> {
    let first = c.scrub(start).await?;
    if !wait {
        return Ok(first);
    }
    // The pass asked for is number `passes_started` of this agent run.
    let target = first.passes_started;
    let mut s = first;
    while s.passes_done < target {
        tokio::time::sleep(POLL).await;
        s = c.scrub(false).await?;
    }
    Ok(s)
}

fn print_text(r: &ScrubReport) {
    for a in &r.agents {
        println!(
            "{:<24} {:<8} checked {} shards ({}), {} in quarantine",
            a.addr,
            a.status,
            a.checked,
            format_size(a.bytes),
            a.bad_total
        );
        for b in a.bad.iter().take(20) {
            println!(
                "    stripe {}… shard {}: {}{}",
                &b.stripe[..12],
                b.index,
                b.reason,
                if b.restored { " (restored since)" } else { "" }
            );
        }
    }
    if r.bad_unrestored > 0 {
        println!(
            "{} bad shard(s) quarantined and not yet rebuilt: run `sa-image repair`",
            r.bad_unrestored
        );
    } else {
        println!("no bad shard waiting for repair");
    }
}

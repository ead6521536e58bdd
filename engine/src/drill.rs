//! Recovery drills (`sa-image drill`): proof that a snapshot boots from the agents with PCs
//! missing, the way a disaster would look.
//!
//! ```text
//! catalog ─▶ plan: withhold m agents (rotating, from the volume's drill records)
//!         ─▶ serve the snapshot on 127.0.0.1:0, withheld agents never asked for a shard,
//!            writes into a throwaway overlay in the work directory
//!         ─▶ qemu boots it (KVM or TCG, no network out) ─▶ criteria until the deadline
//!         ─▶ screenshot (QMP) ─▶ stop qemu and serve, remove the overlay
//!         ─▶ sealed record `drill-<SNAPSHOT>` on every agent reached
//! ```
//!
//! - [`plan`]: which agents are withheld; [`record`]: the stored result;
//!   [`qemu`]: the virtual machine and its QMP screenshots; [`criteria`]: what passes and the
//!   wait; [`workdir`]: one drill at a time, and the reaping of what a killed drill left.
//!
//! A drill never writes to the backup: the export's writes go to the overlay, the only blob
//! written is the record. The withheld agents are asked for the catalog (to know the snapshot
//! and its table) but never for a shard of it. A failed boot is a report with `passed: false`,
//! not an error; errors are for drills that could not be run (no such snapshot, no qemu, more
//! agents to withhold than the snapshot can lose).

pub mod criteria;
pub mod plan;
pub mod qemu;
pub mod record;
pub mod workdir;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::catalog::{self, used_slots};
use crate::error::{Error, Result};
use crate::fleet::{agent_name, Access, Fleet};
use crate::serve::{self, ServeOptions};
use crate::shutdown::Shutdown;
use criteria::Criteria;
use plan::Candidate;
use qemu::{Machine, Vm};
use record::DrillRecord;
use workdir::WorkDir;

/// What to drill and how.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// Snapshot id, unique prefix, or `latest`.
    pub snapshot: String,
    /// With `latest`: of this volume.
    pub volume: Option<String>,
    /// Agent addresses (one is enough).
    pub agents: Vec<String>,
    /// How many agents to withhold (None: the snapshot's `m`).
    pub withhold: Option<usize>,
    /// The virtual machine.
    pub machine: Machine,
    /// What passes.
    pub criteria: Criteria,
    /// Where the overlay, the lock and the screenshots live.
    pub work_dir: PathBuf,
    /// Memory for decoded stripes.
    pub cache: u64,
}

/// What a drill found (`drill --json`).
#[derive(Debug, Serialize)]
pub struct DrillReport {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume name.
    pub volume: String,
    /// Passed or failed.
    pub passed: bool,
    /// Why.
    pub reason: String,
    /// The criteria, in words.
    pub criteria: String,
    /// Seconds from starting qemu to the last criterion met (None: did not pass).
    pub boot_seconds: Option<f64>,
    /// Seconds the whole drill took.
    pub seconds: f64,
    /// Agents withheld, as `address (id…)`.
    pub withheld: Vec<String>,
    /// Agents that did not answer besides (their shards were rebuilt too).
    pub agents_down: Vec<String>,
    /// Stripes rebuilt from parity.
    pub stripes_rebuilt: u64,
    /// Stripes that could not be read.
    pub stripes_lost: u64,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Bytes of the PNG screenshot (0: none).
    pub screenshot_bytes: usize,
    /// Agents the record was stored on.
    pub record_stored_on: usize,
    /// What an earlier, killed drill left and this one removed.
    pub reaped: Vec<String>,
    /// The PNG screenshot.
    #[serde(skip)]
    pub screenshot: Vec<u8>,
}

/// Runs a drill (see the module docs).
pub async fn drill(fleet: &Fleet, opts: &DrillOptions, shutdown: &Shutdown) -> Result<DrillReport> {
    opts.criteria.check()?;
    let started = Instant::now();
    let started_unix = crate::clock::Clock::now_secs(&crate::clock::SystemClock);
    let (dir, reaped) = WorkDir::open(&opts.work_dir)?;
    let cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
    let m = catalog::resolve(&cat.manifests, &opts.snapshot, opts.volume.as_deref())?.clone();
    let n = opts.withhold.unwrap_or(m.layout.m as usize);
    if n > m.layout.m as usize {
        return Err(Error::invalid(format!(
            "cannot withhold {n} agents: snapshot {} has {} parity shards per stripe, so it can \
             lose at most {} agents; give --withhold {} or less",
            m.snapshot, m.layout.m, m.layout.m, m.layout.m
        )));
    }
    let live = cat.reach.live();
    let same_volume: Vec<String> = cat
        .manifests
        .iter()
        .filter(|x| x.volume_name == m.volume_name)
        .map(|x| x.snapshot.clone())
        .collect();
    let history = record::load(&live, fleet.keys(), &same_volume).await;
    let used = used_slots(&m);
    let candidates: Vec<Candidate> = m
        .agents
        .iter()
        .enumerate()
        .filter(|(i, _)| used.contains(&(*i as u16)))
        .map(|(_, a)| Candidate {
            id: a.id,
            addr: a.addr.clone(),
        })
        .collect();
    let chosen = plan::choose(
        &candidates,
        &plan::last_withheld(history.iter().map(|(_, r)| r)),
        n,
    );
    let withheld: Vec<String> = chosen.iter().map(|c| agent_name(&c.addr, &c.id)).collect();
    tracing::info!(
        "drill of snapshot {} ({}): withholding {}",
        m.snapshot,
        m.volume_name,
        if withheld.is_empty() {
            "no agent".to_string()
        } else {
            withheld.join(", ")
        }
    );

    let mut sopts = ServeOptions::new(&m.snapshot, opts.agents.clone());
    sopts.overlay = Some(dir.file("overlay.img"));
    sopts.withhold = chosen.iter().map(|c| c.id).collect();
    sopts.cache = opts.cache;
    sopts.idle_timeout = None;
    let served = serve::open(fleet, &sopts).await?;
    let agents_down: Vec<String> = served
        .agents_down
        .iter()
        .filter(|d| !withheld.contains(d))
        .cloned()
        .collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::io("cannot listen on 127.0.0.1 for the drill's export", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("cannot read the export's address", e))?;
    let stop_serve = Shutdown::new();
    let serving = tokio::spawn(served.run(listener, stop_serve.clone()));

    let run = boot(opts, &dir, addr, shutdown).await;
    stop_serve.cancel();
    let served = serving
        .await
        .map_err(|e| Error::failed(format!("the drill's serve task failed: {e}")));
    dir.clean();
    let (outcome, accel) = run?;
    let counters = served??.counters;

    let rec = DrillRecord {
        started: started_unix,
        passed: outcome.passed && counters.stripes_lost == 0,
        boot_ms: outcome.boot.map(|d| d.as_millis() as u64),
        total_ms: started.elapsed().as_millis() as u64,
        stripes_rebuilt: counters.stripes_reconstructed,
        stripes_lost: counters.stripes_lost,
        accel: accel.to_string(),
        reason: if counters.stripes_lost > 0 {
            format!(
                "{} stripe(s) could not be read from the agents; {}",
                counters.stripes_lost, outcome.reason
            )
        } else {
            outcome.reason
        },
        criteria: opts.criteria.describe(),
        withheld: chosen.iter().map(|c| (c.id, c.addr.clone())).collect(),
        screenshot: outcome.screenshot,
    };
    let stored = store(&live, fleet, &m.snapshot, &rec).await?;
    let s = rec.summary();
    Ok(DrillReport {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        passed: rec.passed,
        reason: rec.reason.clone(),
        criteria: rec.criteria.clone(),
        boot_seconds: s.boot_seconds,
        seconds: s.seconds,
        withheld,
        agents_down,
        stripes_rebuilt: rec.stripes_rebuilt,
        stripes_lost: rec.stripes_lost,
        accel: rec.accel.clone(),
        screenshot_bytes: rec.screenshot.len(),
        record_stored_on: stored,
        reaped,
        screenshot: rec.screenshot,
    })
}

/// Boots the export at `addr` and waits for the criteria; qemu is stopped before returning.
async fn boot(
    opts: &DrillOptions,
    dir: &WorkDir,
    addr: std::net::SocketAddr,
    shutdown: &Shutdown,
) -> Result<(criteria::Outcome, &'static str)> {
    let fwd = match opts.criteria.port {
        Some(guest) => Some((free_port()?, guest)),
        None => None,
    };
    let mut vm = Vm::start(
        &opts.machine,
        &format!("nbd://{addr}"),
        fwd,
        &dir.file("qmp.sock"),
    )?;
    if let Some(pid) = vm.pid() {
        dir.set_qemu_pid(pid)?;
    }
    tracing::info!("qemu ({}) boots nbd://{addr}", vm.accel);
    let outcome = criteria::wait(&mut vm, &opts.criteria, fwd.map(|f| f.0), dir, shutdown).await;
    vm.stop().await;
    Ok((outcome?, vm.accel))
}

/// A free TCP port on 127.0.0.1 for the forwarded guest port.
fn free_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::io("cannot find a free port for the guest's forwarded port", e))
}

/// Stores the record on every agent of `live`; returns on how many it landed. Fails only when
/// it landed nowhere.
async fn store(
    live: &[sa_core::store::AgentClient],
    fleet: &Fleet,
    snapshot: &str,
    rec: &DrillRecord,
) -> Result<usize> {
    use sa_core::store::ShardWrite;
    let sealed = rec.seal(fleet.keys(), snapshot)?;
    let name = record::blob_name(snapshot);
    let mut stored = 0;
    let mut errors = Vec::new();
    for c in live {
        match tokio::time::timeout(Duration::from_secs(30), c.put_blob(&name, sealed.clone())).await
        {
            Ok(Ok(())) => stored += 1,
            Ok(Err(e)) => errors.push(format!("{}: {e}", c.addr())),
            Err(_) => errors.push(format!("{}: no answer", c.addr())),
        }
    }
    for e in &errors {
        tracing::warn!("drill record not stored on {e}");
    }
    if stored == 0 {
        return Err(Error::failed(format!(
            "the drill's record could not be stored on any agent: {}",
            errors.join("; ")
        )));
    }
    Ok(stored)
}

//! The job queue and the loops that feed it.
//!
//! **One job at a time.** Every job (snapshot, prune, scrub request, repair pass) goes through one
//! queue and runs alone, in order: jobs never overlap, on one volume or across volumes (the
//! server's disk and the office network are shared anyway). A request for a job that is already
//! queued or running (same kind and volume) joins it instead of queueing twice, so the queue holds
//! at most one request per kind and volume.
//!
//! **Schedules** ([`schedule_loop`]): the next run of a volume's snapshots (or of the scrub) is the
//! schedule's first time after the end of the last job that finished (ok or failed; an
//! interrupted one does not count), or, when none ever did, after the moment the daemon first
//! knew the schedule (its anchor in the state file). When that time has already passed (the
//! server was off, or the daemon died mid-job) the job runs once at once (`missed`), however many
//! runs were missed. A snapshot that succeeded is followed at once by its volume's prune, when the
//! volume has a retention policy.
//!
//! **Repair** ([`repair_loop`]): a pass every `repair_interval`, holding back the shards of agents
//! missing for less than `repair_after` (their clock in `repair-watch` in the state directory, as
//! `repair --watch` keeps it). A pass is journaled when it rebuilt something or failed, and the
//! first good pass after a failed one (which resolves its alert).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sa_engine::repair::watch::WatchState;
use tokio::sync::{mpsc, oneshot};

use sa_engine::shutdown::Shutdown as CancellationToken;

use super::jobs::{self, Ended};
use super::journal::{JobKind, Outcome, Slot};
use super::schedule::Schedule;
use super::shared::{lock, now_ms, RepairSeen, Shared};

/// A job to run.
#[derive(Debug, Clone)]
pub struct Request {
    /// What.
    pub kind: JobKind,
    /// On which volume.
    pub volume: Option<String>,
    /// Why (`schedule`, `missed`, `watch`).
    pub trigger: &'static str,
    /// The time it was due (Unix ms).
    pub due_ms: u64,
}

/// The queue's sending side.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::UnboundedSender<Request>,
    waiting: Arc<Mutex<HashMap<Slot, Vec<oneshot::Sender<()>>>>>,
}

impl Queue {
    /// A queue and its receiving side (for [`run`]).
    pub fn new() -> (Queue, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Queue {
                tx,
                waiting: Arc::new(Mutex::new(HashMap::new())),
            },
            rx,
        )
    }

    /// Queues `r` (or joins the same job already queued or running); the receiver fires when it
    /// has ended.
    pub fn submit(&self, r: Request) -> oneshot::Receiver<()> {
        let (done, rx) = oneshot::channel();
        let slot = (r.kind, r.volume.clone());
        let mut w = lock(&self.waiting);
        match w.get_mut(&slot) {
            Some(list) => list.push(done),
            None => {
                w.insert(slot, vec![done]);
                let _ = self.tx.send(r);
            }
        }
        rx
    }

    fn finished(&self, slot: &Slot) {
        for d in lock(&self.waiting).remove(slot).unwrap_or_default() {
            let _ = d.send(());
        }
    }
}

/// Runs queued jobs one at a time until shutdown (the running job is told through the shutdown
/// token and ends first).
pub async fn run(shared: Arc<Shared>, queue: Queue, mut rx: mpsc::UnboundedReceiver<Request>) {
    let mut watch = WatchState::load(&jobs::watch_state_path(&shared.settings()));
    loop {
        let req = tokio::select! {
            r = rx.recv() => match r { Some(r) => r, None => return },
            () = shared.shutdown.cancelled() => return,
        };
        let slot = (req.kind, req.volume.clone());
        run_one(&shared, &req, &mut watch).await;
        queue.finished(&slot);
        shared.poke.notify_one();
        if shared.shutdown.is_cancelled() {
            return;
        }
    }
}

async fn run_one(shared: &Shared, req: &Request, watch: &mut WatchState) {
    let s = shared.settings();
    match req.kind {
        JobKind::Snapshot => {
            let Some(v) = s
                .volumes
                .iter()
                .find(|v| Some(&v.name) == req.volume.as_ref())
            else {
                return; // removed by a reload meanwhile
            };
            let ended = journaled(shared, req, |id| jobs::snapshot_job(shared, &s, v, id)).await;
            if ended == Some(Outcome::Ok)
                && v.offsite.as_ref().is_some_and(|o| o.schedule.is_none())
            {
                // The snapshot is committed; its offsite copy is a job of its own, so a failed
                // upload alerts on its own and the next one (after the next snapshot) catches up.
                let push = Request {
                    kind: JobKind::Offsite,
                    trigger: "after snapshot",
                    due_ms: now_ms(),
                    ..req.clone()
                };
                journaled(shared, &push, |_| jobs::offsite_job(shared, &s, v)).await;
            }
            if ended == Some(Outcome::Ok) && v.retention.is_some() {
                let prune = Request {
                    kind: JobKind::Prune,
                    trigger: "after snapshot",
                    due_ms: now_ms(),
                    ..req.clone()
                };
                journaled(shared, &prune, |_| jobs::prune_job(shared, &s, v)).await;
            }
        }
        JobKind::Prune => {
            if let Some(v) = s
                .volumes
                .iter()
                .find(|v| Some(&v.name) == req.volume.as_ref())
            {
                journaled(shared, req, |_| jobs::prune_job(shared, &s, v)).await;
            }
        }
        JobKind::Scrub => {
            journaled(shared, req, |_| jobs::scrub_job(shared, &s)).await;
        }
        JobKind::Repair => {
            if let Some(r) = s.repair {
                repair(shared, req, &s, r, watch).await;
            }
        }
        JobKind::Offsite => {
            if let Some(v) = s
                .volumes
                .iter()
                .find(|v| Some(&v.name) == req.volume.as_ref() && v.offsite.is_some())
            {
                journaled(shared, req, |_| jobs::offsite_job(shared, &s, v)).await;
            }
        }
        JobKind::Drill => {
            if let Some(v) = s
                .volumes
                .iter()
                .find(|v| Some(&v.name) == req.volume.as_ref())
            {
                journaled(shared, req, |_| super::drill::drill_job(shared, &s, v)).await;
            }
        }
    }
}

/// Records the start, runs `f`, records the end; returns the outcome (None: not run, because
/// the journal could not be written).
async fn journaled<F, Fut>(shared: &Shared, req: &Request, f: F) -> Option<Outcome>
where
    F: FnOnce(u64) -> Fut,
    Fut: std::future::Future<Output = Ended>,
{
    let what = describe(req.kind, req.volume.as_deref());
    let started = lock(&shared.journal).start(
        req.kind,
        req.volume.as_deref(),
        req.trigger,
        req.due_ms,
        now_ms(),
    );
    let job = match started {
        Ok(j) => j,
        Err(e) => {
            shared.event("error", format!("{what} not run: {e:#}"));
            return None;
        }
    };
    shared.with_view(|v| v.running = Some(job.clone()));
    if req.trigger == "missed" {
        shared.event("info", format!("{what}: running a missed run now"));
    }
    let ended = f(job.id).await;
    shared.with_view(|v| v.running = None);
    let outcome = ended.outcome;
    let r = lock(&shared.journal).end(job.id, now_ms(), outcome, ended.error, ended.figures);
    match r {
        Ok(j) => report(shared, &what, &j),
        Err(e) => shared.event("error", format!("{what}: cannot record its end: {e:#}")),
    }
    Some(outcome)
}

/// `snapshot of 'system'`, `scrub`.
pub fn describe(kind: JobKind, volume: Option<&str>) -> String {
    match volume {
        Some(v) => format!("{} of '{v}'", kind.name()),
        None => kind.name().to_string(),
    }
}

fn report(shared: &Shared, what: &str, j: &super::journal::Job) {
    let secs = j
        .ended_ms
        .unwrap_or(j.started_ms)
        .saturating_sub(j.started_ms) as f64
        / 1000.0;
    match j.outcome {
        Some(Outcome::Ok) => {
            let extra = match (j.figures.get("snapshot"), j.figures.get("bytes_sent")) {
                (Some(id), Some(b)) => format!(
                    ": snapshot {} ({} sent)",
                    id.as_str().unwrap_or(""),
                    sa_core::size::format_size(b.as_u64().unwrap_or(0))
                ),
                _ => match j.figures.get("removed") {
                    Some(n) => format!(": {n} snapshot(s) removed"),
                    None => String::new(),
                },
            };
            shared.event("info", format!("{what} done in {secs:.1}s{extra}"));
        }
        Some(Outcome::Failed) => shared.event(
            "error",
            format!("{what} FAILED: {}", j.error.as_deref().unwrap_or("")),
        ),
        _ => shared.event(
            "warn",
            format!("{what} interrupted: {}", j.error.as_deref().unwrap_or("")),
        ),
    }
}

async fn repair(
    shared: &Shared,
    req: &Request,
    s: &super::config::Settings,
    r: super::config::RepairSettings,
    watch: &mut WatchState,
) {
    let started = now_ms();
    let (ended, backlog) = jobs::repair_job(shared, s, r, watch).await;
    if ended.outcome == Outcome::Interrupted {
        return;
    }
    shared.with_view(|v| {
        v.repair = Some(RepairSeen {
            at_ms: started,
            backlog,
            error: ended.error.clone(),
        })
    });
    let last_failed = lock(&shared.journal)
        .last_done
        .get(&(JobKind::Repair, None))
        .is_some_and(|j| j.outcome == Some(Outcome::Failed));
    let rebuilt = ended
        .figures
        .get("shards_rebuilt")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if rebuilt == 0 && ended.outcome == Outcome::Ok && !last_failed {
        return; // a quiet pass
    }
    let mut j = lock(&shared.journal);
    let r = j
        .start(JobKind::Repair, None, req.trigger, req.due_ms, started)
        .and_then(|job| j.end(job.id, now_ms(), ended.outcome, ended.error, ended.figures));
    drop(j);
    match r {
        Ok(job) => report(shared, "repair pass", &job),
        Err(e) => shared.event("error", format!("repair pass: cannot record it: {e:#}")),
    }
}

/// Waits until wall-clock time `at_ms` (looking again at least every minute, so a clock that
/// jumps is followed), or until `stop`; false when stopped.
async fn wait_until(at_ms: u64, stop: &CancellationToken) -> bool {
    loop {
        let now = now_ms();
        if now >= at_ms {
            return true;
        }
        let d = Duration::from_millis((at_ms - now).min(60_000));
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = stop.cancelled() => return false,
        }
    }
}

/// Submits the job of `kind` (on `volume`) whenever `schedule` says (see the module docs), until
/// `stop`.
pub async fn schedule_loop(
    shared: Arc<Shared>,
    queue: Queue,
    kind: JobKind,
    volume: Option<String>,
    schedule: Schedule,
    stop: CancellationToken,
) {
    let key = match &volume {
        Some(v) => format!("{}/{v}", kind.name()),
        None => kind.name().to_string(),
    };
    let mut first = true;
    // Never the same time twice, even when a job could not be journaled.
    let mut floor = 0;
    loop {
        let now = now_ms();
        let reference = lock(&shared.journal)
            .last_done
            .get(&(kind, volume.clone()))
            .map(|j| j.ended_ms.unwrap_or(j.started_ms));
        let reference = match reference {
            Some(t) => t,
            None => lock(&shared.state).anchor(&key, now),
        }
        .max(floor);
        let Some(next) = schedule.next_after(reference) else {
            shared.with_view(|v| v.next_runs.remove(&key));
            return;
        };
        let missed = first && next <= now;
        first = false;
        shared.with_view(|v| v.next_runs.insert(key.clone(), next.max(now)));
        if !wait_until(next, &stop).await {
            return;
        }
        floor = next.max(now_ms());
        let done = queue.submit(Request {
            kind,
            volume: volume.clone(),
            trigger: if missed { "missed" } else { "schedule" },
            due_ms: next,
        });
        tokio::select! {
            _ = done => {}
            () = stop.cancelled() => return,
        }
    }
}

/// A repair pass now and then every `interval`, until `stop`.
pub async fn repair_loop(queue: Queue, interval: Duration, stop: CancellationToken) {
    loop {
        let done = queue.submit(Request {
            kind: JobKind::Repair,
            volume: None,
            trigger: "watch",
            due_ms: now_ms(),
        });
        tokio::select! {
            _ = done => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

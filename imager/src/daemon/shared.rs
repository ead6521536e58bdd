//! What the daemon's tasks share: the settings in force, the keys, the job journal, the state
//! file, and the [`View`] that the page and `/metrics` are drawn from.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use anyhow::Result;
use sa_core::keys::Keys;
use sa_engine::clock::{Clock, SystemClock};
use sa_engine::fleet::{Fleet, FleetOptions};
use sa_engine::shutdown::Shutdown;
use sa_engine::status::StatusReport;
use serde::Serialize;

use super::config::Settings;
use super::journal::{Job, Journal};
use super::notify::Notifier;
use super::state::State;

/// Events kept for the page.
const EVENTS: usize = 100;

/// One line of "recent events".
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    /// When (Unix ms).
    pub at_ms: u64,
    /// `info`, `warn` or `error`.
    pub level: &'static str,
    /// What happened.
    pub text: String,
}

/// What the last repair pass left.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairSeen {
    /// When it ran (Unix ms).
    pub at_ms: u64,
    /// Absent shards not rebuilt: held back (their agent is not missing long enough) or with
    /// no place to go.
    pub backlog: u64,
    /// Why the pass failed.
    pub error: Option<String>,
}

/// The latest picture of the backup.
#[derive(Default)]
pub struct View {
    /// The last status check's report.
    pub status: Option<Arc<StatusReport>>,
    /// When it was made (Unix ms).
    pub checked_ms: Option<u64>,
    /// Why the last check failed (the report shown is then older).
    pub check_error: Option<String>,
    /// Quarantined shards not restored yet, all agents (last gathered).
    pub scrub_bad: Option<u64>,
    /// When that was gathered (Unix ms).
    pub scrub_ms: Option<u64>,
    /// The last repair pass.
    pub repair: Option<RepairSeen>,
    /// The job running now.
    pub running: Option<Job>,
    /// Recent events, newest last.
    pub events: VecDeque<Event>,
    /// Per schedule key (`snapshot/VOLUME`, `scrub`), the next run (Unix ms).
    pub next_runs: BTreeMap<String, u64>,
}

/// The daemon's shared state.
pub struct Shared {
    settings: RwLock<Arc<Settings>>,
    keys: RwLock<Arc<Keys>>,
    notifier: RwLock<Arc<Notifier>>,
    /// The job journal.
    pub journal: Mutex<Journal>,
    /// Anchors, missing agents, open alerts.
    pub state: Mutex<State>,
    /// What the page shows.
    pub view: RwLock<View>,
    /// Wakes the status check (after a job, at a reload).
    pub poke: tokio::sync::Notify,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: Shutdown,
    /// When the daemon started (Unix ms).
    pub started_ms: u64,
}

/// Locks a mutex, also when a panicking holder poisoned it.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Now, Unix ms.
pub fn now_ms() -> u64 {
    SystemClock.now_ms()
}

impl Shared {
    /// The shared state of a daemon starting with these.
    pub fn new(
        settings: Arc<Settings>,
        keys: Arc<Keys>,
        notifier: Arc<Notifier>,
        journal: Journal,
        state: State,
        shutdown: Shutdown,
    ) -> Shared {
        Shared {
            settings: RwLock::new(settings),
            keys: RwLock::new(keys),
            notifier: RwLock::new(notifier),
            journal: Mutex::new(journal),
            state: Mutex::new(state),
            view: RwLock::new(View::default()),
            poke: tokio::sync::Notify::new(),
            shutdown,
            started_ms: now_ms(),
        }
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The alert channels in force.
    pub fn notifier(&self) -> Arc<Notifier> {
        self.notifier
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts reloaded settings (and keys, channels) in force; running jobs finish with the old.
    pub fn replace(&self, s: Arc<Settings>, keys: Arc<Keys>, notifier: Arc<Notifier>) {
        *self.settings.write().unwrap_or_else(|p| p.into_inner()) = s;
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
        *self.notifier.write().unwrap_or_else(|p| p.into_inner()) = notifier;
    }

    /// A fleet for one job or check (the engine's book of agents lives in it, per job), with
    /// this machine's copies of the agent book and of the availability history, as every
    /// command has: when every PC sleeps at backup time, the book's copy is what names the
    /// members and their MACs to wake.
    pub fn fleet(&self) -> Result<Fleet> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
        let settings = self.settings();
        let client = settings.fleet.client_options()?;
        let owner_dir = sa_engine::cache_dir::owner_dir(settings.cache_dir.as_deref(), &keys);
        Ok(Fleet::new(keys, FleetOptions { client }).with_cache_dir(owner_dir.as_deref()))
    }

    /// Adds a recent event (and logs it).
    pub fn event(&self, level: &'static str, text: impl Into<String>) {
        let text = text.into();
        match level {
            "error" => tracing::error!("{text}"),
            "warn" => tracing::warn!("{text}"),
            _ => tracing::info!("{text}"),
        }
        let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
        v.events.push_back(Event {
            at_ms: now_ms(),
            level,
            text,
        });
        while v.events.len() > EVENTS {
            v.events.pop_front();
        }
    }

    /// Runs `f` on the view.
    pub fn with_view<T>(&self, f: impl FnOnce(&mut View) -> T) -> T {
        f(&mut self.view.write().unwrap_or_else(|p| p.into_inner()))
    }
}

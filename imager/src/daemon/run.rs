//! The daemon's life: start, run, reload on SIGHUP, stop on SIGTERM.
//!
//! At start: the settings are checked (a wrong one stops the start with exit 64), the key is
//! loaded, the journal is opened (jobs a dead daemon left running are ended as interrupted), the
//! web server binds (its URL is printed on stdout as `status page on URL`), the loops start, and
//! systemd is told `READY=1` (when run under it, `Type=notify`).
//!
//! **SIGHUP** reads the settings again. When they are wrong, the error is logged and shown on the
//! page, and the daemon goes on with the settings in force. Otherwise the schedules, checks and
//! alert channels start over with the new ones (a running job finishes with the old; the web
//! server rebinds only when its address, TLS files or token file changed; `daemon.state_dir` changes only
//! with a restart). systemd hears `RELOADING=1` then `READY=1`.
//!
//! **SIGTERM** (or SIGINT) stops the loops, tells the running job to stop (a snapshot stops
//! between stripes, commits nothing, and is journaled as interrupted; the next start runs it again
//! as a missed run), waits for it, and exits 0.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use sa_engine::shutdown::Shutdown;
use tokio::task::JoinHandle;

use super::config::{self, Overrides, Settings};
use super::journal::{JobKind, Journal};
use super::notify::Notifier;
use super::runner::{self, Queue};
use super::shared::{now_ms, Shared};
use super::state::State;
use super::web::{self, Web};

/// How long a stopping daemon waits for its running job.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Where the settings come from.
pub struct Source {
    /// The config file.
    pub path: PathBuf,
    /// Whether it must exist (given with `--config`).
    pub must_exist: bool,
    /// Flags.
    pub over: Overrides,
}

impl Source {
    /// Reads and checks the settings.
    pub fn load(&self) -> Result<Settings> {
        config::load(&self.path, self.must_exist, &self.over)
    }
}

/// The loops of one set of settings.
struct Generation {
    stop: Shutdown,
    tasks: Vec<JoinHandle<()>>,
}

impl Generation {
    fn start(shared: &Arc<Shared>, queue: &Queue) -> Generation {
        let s = shared.settings();
        let stop = shared.shutdown.child_token();
        let mut tasks = Vec::new();
        for v in &s.volumes {
            tasks.push(tokio::spawn(runner::schedule_loop(
                shared.clone(),
                queue.clone(),
                JobKind::Snapshot,
                Some(v.name.clone()),
                v.schedule.clone(),
                stop.clone(),
            )));
        }
        for v in &s.volumes {
            if let Some(d) = &v.drill {
                tasks.push(tokio::spawn(runner::schedule_loop(
                    shared.clone(),
                    queue.clone(),
                    JobKind::Drill,
                    Some(v.name.clone()),
                    d.every.clone(),
                    stop.clone(),
                )));
            }
        }
        for v in &s.volumes {
            // An offsite table with a schedule of its own pushes on it (e.g. at night, when the
            // uplink is free); without one, after each snapshot.
            if let Some(sc) = v.offsite.as_ref().and_then(|o| o.schedule.clone()) {
                tasks.push(tokio::spawn(runner::schedule_loop(
                    shared.clone(),
                    queue.clone(),
                    JobKind::Offsite,
                    Some(v.name.clone()),
                    sc,
                    stop.clone(),
                )));
            }
        }
        if let Some(sc) = &s.scrub {
            tasks.push(tokio::spawn(runner::schedule_loop(
                shared.clone(),
                queue.clone(),
                JobKind::Scrub,
                None,
                sc.clone(),
                stop.clone(),
            )));
        }
        if let Some(r) = s.repair {
            tasks.push(tokio::spawn(runner::repair_loop(
                queue.clone(),
                r.interval,
                stop.clone(),
            )));
        }
        tasks.push(tokio::spawn(super::health::check_loop(
            shared.clone(),
            s.check_interval,
            stop.clone(),
        )));
        Generation { stop, tasks }
    }

    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn notifier(s: &Settings, web: Option<&Web>) -> Arc<Notifier> {
    Arc::new(Notifier {
        settings: s.alerts.clone(),
        host: super::host_name(),
        page: s
            .web
            .as_ref()
            .and_then(|w| w.public_url.clone())
            .or_else(|| web.map(|w| w.url.clone())),
    })
}

fn notify_systemd(states: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("sd_notify: {e}");
    }
}

/// Runs the daemon until SIGTERM or SIGINT (see the module docs).
pub async fn run(src: Source) -> Result<u8> {
    use tokio::signal::unix::{signal, SignalKind};
    let settings = Arc::new(src.load()?);
    let keys = shared_keys(&settings)?;
    let (mut term, mut int, mut hup) = (
        signal(SignalKind::terminate()).context("cannot watch SIGTERM")?,
        signal(SignalKind::interrupt()).context("cannot watch SIGINT")?,
        signal(SignalKind::hangup()).context("cannot watch SIGHUP")?,
    );
    let journal = Journal::open(&settings.state_dir, now_ms())?;
    let state = State::load(&settings.state_dir);
    let shutdown = Shutdown::new();
    let shared = Arc::new(Shared::new(
        settings.clone(),
        keys.clone(),
        notifier(&settings, None),
        journal,
        state,
        shutdown.clone(),
    ));
    let mut web = match &settings.web {
        Some(w) => Some(web::start(w, shared.clone()).await?),
        None => None,
    };
    shared.replace(settings.clone(), keys, notifier(&settings, web.as_ref()));
    if let Some(w) = &web {
        println!("status page on {}", w.url);
    }
    let (queue, rx) = Queue::new();
    let runner = tokio::spawn(runner::run(shared.clone(), queue.clone(), rx));
    let mut generation = Generation::start(&shared, &queue);
    shared.event(
        "info",
        format!(
            "daemon started: {} volume(s), settings from {}, state in {}",
            settings.volumes.len(),
            settings.path.display(),
            settings.state_dir.display()
        ),
    );
    notify_systemd(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("watching the backup"),
    ]);
    loop {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => {
                notify_systemd(&[sd_notify::NotifyState::Reloading]);
                generation.stop().await;
                web = reload(&src, &shared, web).await;
                generation = Generation::start(&shared, &queue);
                shared.poke.notify_one();
                notify_systemd(&[sd_notify::NotifyState::Ready]);
                continue;
            }
        };
        shared.event("info", format!("{name}: stopping"));
        break;
    }
    notify_systemd(&[sd_notify::NotifyState::Stopping]);
    shutdown.cancel();
    generation.stop().await;
    if tokio::time::timeout(STOP_WAIT, runner).await.is_err() {
        tracing::warn!("the running job did not stop within {STOP_WAIT:?}; leaving it");
    }
    if let Some(w) = web {
        w.stop().await;
    }
    Ok(0)
}

fn shared_keys(s: &Settings) -> Result<Arc<sa_core::keys::Keys>> {
    Ok(Arc::new(s.key.load()?.derive()))
}

/// Reads the settings again and puts them in force; on error keeps the old ones (see the module
/// docs). Returns the web server now running.
async fn reload(src: &Source, shared: &Arc<Shared>, web: Option<Web>) -> Option<Web> {
    let old = shared.settings();
    let loaded = src.load().and_then(|s| {
        let keys = shared_keys(&s)?;
        Ok((s, keys))
    });
    let (mut new, keys) = match loaded {
        Ok(x) => x,
        Err(e) => {
            shared.event(
                "error",
                format!("SIGHUP: the settings are wrong; going on with the ones in force: {e:#}"),
            );
            return web;
        }
    };
    if new.state_dir != old.state_dir {
        shared.event(
            "warn",
            "SIGHUP: daemon.state_dir changed; it takes effect at the next start",
        );
        new.state_dir = old.state_dir.clone();
    }
    let same_web = match (&new.web, &old.web) {
        (Some(a), Some(b)) => {
            a.listen == b.listen && a.tls == b.tls && a.token_file == b.token_file
        }
        (None, None) => true,
        _ => false,
    };
    let web = if same_web {
        web
    } else {
        if let Some(w) = web {
            w.stop().await;
        }
        match &new.web {
            Some(w) => match web::start(w, shared.clone()).await {
                Ok(w) => {
                    println!("status page on {}", w.url);
                    Some(w)
                }
                Err(e) => {
                    shared.event("error", format!("SIGHUP: no status page: {e:#}"));
                    None
                }
            },
            None => None,
        }
    };
    let n = notifier(&new, web.as_ref());
    shared.replace(Arc::new(new), keys, n);
    shared.event(
        "info",
        format!("SIGHUP: settings reloaded from {}", old.path.display()),
    );
    web
}

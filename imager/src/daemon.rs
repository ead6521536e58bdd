//! `sa-image daemon`: the backup runs by itself. One long-running process on the server that,
//! per volume, takes snapshots on a schedule and applies the retention policy after each, runs the
//! repair watcher, asks the agents for a scrub weekly, records every job in a journal that
//! survives restarts, alerts (webhook, e-mail, healthchecks pings) when something is wrong and
//! again when it is resolved, and serves a status page and Prometheus metrics.
//!
//! Every job is an engine call ([`sa_engine`]); the daemon never runs `sa-image` itself.
//!
//! # Tour
//!
//! - [`config`]: the TOML settings (default `/etc/sa-image/config.toml`) checked into
//!   [`config::Settings`]; [`env`]: every key also from `SA_IMAGE_*` variables;
//!   [`schedule`]: calendar expressions, cron patterns and intervals (`croner`).
//! - [`run`]: start, SIGHUP reload, SIGTERM stop, systemd readiness (`sd-notify`).
//! - [`runner`]: the job queue (one job at a time, never two of one volume), the schedule loops
//!   (missed runs run once at start) and the repair loop; [`jobs`]: each job as an engine call;
//!   [`hooks`]: pre/post snapshot commands with a timeout; [`drill`]: scheduled recovery drills
//!   (a failed one alerts as a failed job) and their screenshot on the page.
//! - [`journal`]: the job records (append-only, fsynced; a crash loses or doubles none);
//!   [`state`]: anchors, missing agents and open alerts (written whole, durably).
//! - [`health`]: the periodic status check and the alert conditions; [`alerts`]: one alert per
//!   condition, repeated at most every `alert_repeat`, then "resolved"; [`notify`]: webhook,
//!   SMTP, pings.
//! - [`web`]: the HTTP(S) server with the login token; [`page`]: the status page;
//!   [`metrics`]: `/metrics`; [`shared`]: what the tasks share.
//!
//! The config keys are shown and explained in `packaging/config.example.toml`.

pub mod alerts;
pub mod config;
pub mod drill;
pub mod env;
pub mod health;
pub mod hooks;
pub mod jobs;
pub mod journal;
pub mod metrics;
pub mod notify;
pub mod page;
pub mod run;
pub mod runner;
pub mod schedule;
pub mod shared;
pub mod state;
pub mod web;

/// This machine's host name (for alerts and the page).
pub fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "this server".into())
}

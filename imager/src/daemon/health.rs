//! The status check: every `check_interval` (and after every job) the daemon asks the engine for
//! the status ([`sa_engine::status`]) and, hourly or after a scrub job, for what the agents'
//! scrubs found; it keeps them for the page and `/metrics`, notes agents that go down or come back, and judges the alert conditions
//! ([`super::alerts`]).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use sa_core::duration::format_age;
use sa_engine::limits::{check as judge, Limits, VolumeLimits};
use sa_engine::scrub::{scrub, ScrubOptions};
use sa_engine::shutdown::Shutdown;
use sa_engine::status::{status, StatusOptions, StatusReport};

use super::alerts::{self, Condition};
use super::config::Settings;
use super::journal::{JobKind, Outcome};
use super::runner::describe;
use super::shared::{lock, now_ms, Shared};

/// Checks now, then every `interval` or when poked, until `stop`.
pub async fn check_loop(shared: Arc<Shared>, interval: Duration, stop: Shutdown) {
    loop {
        tokio::select! {
            () = check(&shared) => {}
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = shared.poke.notified() => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One check (see the module docs).
pub async fn check(shared: &Shared) {
    let s = shared.settings();
    let now = now_ms();
    let scrub_due = scrub_due(shared, now);
    let got = async {
        let fleet = shared.fleet()?;
        let agents = s.fleet.addrs()?;
        let opts = StatusOptions {
            agents: agents.clone(),
            cache_dir: s.cache_dir.clone(),
        };
        let report = status(&fleet, &opts).await?;
        if !scrub_due {
            return anyhow::Ok((report, None));
        }
        let scrub_opts = ScrubOptions {
            agents,
            start: false,
            wait: false,
        };
        let bad = match scrub(&fleet, &scrub_opts).await {
            Ok(r) => Some(r.bad_unrestored),
            Err(e) => {
                tracing::warn!("cannot gather the agents' scrub results: {e}");
                None
            }
        };
        anyhow::Ok((report, bad))
    }
    .await;
    match got {
        Ok((mut report, bad)) => {
            note_missing(shared, &mut report, now);
            shared.with_view(|v| {
                v.status = Some(Arc::new(report));
                v.checked_ms = Some(now);
                v.check_error = None;
                if bad.is_some() {
                    v.scrub_bad = bad;
                    v.scrub_ms = Some(now);
                }
            });
        }
        Err(e) => {
            let first = shared.with_view(|v| v.check_error.replace(format!("{e:#}")).is_none());
            if first {
                shared.event("error", format!("status check failed: {e:#}"));
            }
        }
    }
    evaluate(shared, &s, now).await;
}

/// Whether to gather what the agents' scrubs found: at the first check, after a scrub job, and
/// otherwise every [`SCRUB_GATHER`] (each gathering reaches every agent once more; the agents'
/// background scrubs find little between two, and the repair passes rebuild what they find).
fn scrub_due(shared: &Shared, now: u64) -> bool {
    let last = shared.with_view(|v| v.scrub_ms);
    let scrubbed = lock(&shared.journal)
        .last_done
        .get(&(JobKind::Scrub, None))
        .and_then(|j| j.ended_ms);
    match last {
        None => true,
        Some(t) => {
            now.saturating_sub(t) >= SCRUB_GATHER.as_millis() as u64
                || scrubbed.is_some_and(|s| s > t)
        }
    }
}

/// How often the scrub results are gathered when no scrub job ran.
const SCRUB_GATHER: Duration = Duration::from_secs(3600);

/// Keeps since when each unreachable agent is missing (the absence of an agent this machine
/// never saw answer counts from there), and notes agents going and coming back.
fn note_missing(shared: &Shared, report: &mut StatusReport, now: u64) {
    let mut st = lock(&shared.state);
    let mut changed = false;
    let mut events = Vec::new();
    let mut present = BTreeSet::new();
    for a in report.agents.iter_mut() {
        let key = if a.id.is_empty() {
            a.addr.clone()
        } else {
            a.id.clone()
        };
        if a.reachable {
            if st.missing.remove(&key).is_some() {
                changed = true;
                events.push(("info", format!("PC {} answers again", a.addr)));
            }
            continue;
        }
        present.insert(key.clone());
        let since = *st.missing.entry(key).or_insert_with(|| {
            changed = true;
            let seen = match a.last_seen {
                Some(t) => format!("last seen {}", format_age(now / 1000 - t.min(now / 1000))),
                None => "never seen by this machine".into(),
            };
            events.push((
                "warn",
                format!(
                    "PC {} does not answer ({seen}): {}",
                    a.addr,
                    a.error.as_deref().unwrap_or("unreachable")
                ),
            ));
            now
        });
        if a.last_seen.is_none() {
            a.last_seen = Some(since / 1000);
        }
    }
    // Agents no longer listed at all (retired): forget them.
    let before = st.missing.len();
    st.missing.retain(|k, _| present.contains(k));
    changed |= st.missing.len() != before;
    if changed {
        st.save();
    }
    drop(st);
    for (level, text) in events {
        shared.event(level, text);
    }
}

/// The limits the settings give at `now` (a volume that never had a snapshot is expected to have
/// one `max_age` after the daemon first knew it).
fn limits(shared: &Shared, s: &Settings, now: u64) -> Limits {
    let mut l = Limits {
        max_absence: Some(s.max_absence),
        ..Default::default()
    };
    let st = lock(&shared.state);
    for v in &s.volumes {
        l.volumes.insert(
            v.name.clone(),
            VolumeLimits {
                max_age: Some(v.max_age),
                min_margin: v.min_margin,
            },
        );
        let anchor = st
            .anchors
            .get(&format!("snapshot/{}", v.name))
            .copied()
            .unwrap_or(now);
        if now.saturating_sub(anchor) > v.max_age.as_millis() as u64 {
            l.expected.push(v.name.clone());
        }
    }
    l
}

/// Every condition that holds now.
pub fn conditions(shared: &Shared, s: &Settings, now: u64) -> Vec<Condition> {
    let mut out: Vec<Condition> = Vec::new();
    let (report, check_error) = shared.with_view(|v| (v.status.clone(), v.check_error.clone()));
    if let Some(r) = &report {
        out.extend(
            judge(r, &limits(shared, s, now))
                .into_iter()
                .map(Condition::from),
        );
    }
    if let Some(e) = check_error {
        out.push(Condition {
            key: "check_failed".into(),
            kind: "check_failed".into(),
            volume: None,
            agent: None,
            message: format!("the daemon cannot check the backup: {e}"),
        });
    }
    let j = lock(&shared.journal);
    for ((kind, volume), job) in &j.last_done {
        let configured = match volume {
            Some(v) => s.volumes.iter().any(|x| &x.name == v),
            None => match kind {
                JobKind::Scrub => s.scrub.is_some(),
                _ => s.repair.is_some(),
            },
        };
        if configured && job.outcome == Some(Outcome::Failed) {
            let what = describe(*kind, volume.as_deref());
            out.push(Condition {
                key: match volume {
                    Some(v) => format!("job_failed/{}/{v}", kind.name()),
                    None => format!("job_failed/{}", kind.name()),
                },
                kind: "job_failed".into(),
                volume: volume.clone(),
                agent: None,
                message: format!(
                    "the last {what} failed: {}",
                    job.error.as_deref().unwrap_or("no reason given")
                ),
            });
        }
    }
    out
}

/// Judges the conditions, and sends what is due.
async fn evaluate(shared: &Shared, s: &Settings, now: u64) {
    let conds = conditions(shared, s, now);
    let notices = {
        let mut st = lock(&shared.state);
        let n = alerts::update(&mut st.alerts, conds, now, s.alert_repeat);
        if !n.is_empty() {
            st.save();
        }
        n
    };
    if notices.is_empty() {
        return;
    }
    let notifier = shared.notifier();
    for n in notices {
        let sent = notifier.send(&n).await;
        let subject = alerts::subject(&n);
        match sent {
            Ok(()) => {
                if n.event == "alert" {
                    alerts::mark_sent(&mut lock(&shared.state).alerts, &n.key, now);
                }
                let level = if n.event == "alert" { "warn" } else { "info" };
                shared.event(level, format!("{subject}: {}", n.message));
            }
            Err(e) => shared.event("error", format!("{subject}: not delivered: {e}")),
        }
    }
    lock(&shared.state).save();
}

//! The status page: one screen that an office manager understands, plain HTML and CSS (no
//! script), laid out for a phone first, reloading itself every minute.
//!
//! - Each volume with a traffic light: green (recent, full redundancy), amber (below its margin
//!   target, or its last job failed), red (too old, no snapshot, or data lost now); the newest
//!   snapshot's age and margin in words ("survives 2 more PCs lost"); the next run; and a
//!   timeline of the last 30 days, one cell a day (snapshots taken, jobs failed).
//! - Each PC (agent): up or down, last seen in words, and space used against its quota as a bar.
//! - Open alerts, and recent events.

use std::collections::BTreeMap;
use std::fmt::Write;

use chrono::{Local, TimeZone};
use sa_core::duration::format_age;
use sa_core::size::format_size;
use sa_engine::limits::{margin_words, newest};
use sa_engine::status::{AgentStatus, SnapshotStatus, StatusReport};

use super::config::Settings;
use super::journal::{JobKind, Outcome};
use super::shared::{lock, now_ms, Shared};

/// Days in the timeline.
const DAYS: i64 = 30;

const STYLE: &str = "
*{box-sizing:border-box}body{font:16px/1.4 system-ui,sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:12px 16px}header h1{font-size:20px;margin:0}
header p{margin:2px 0 0;font-size:14px;color:#c5cad6}main{max-width:760px;margin:0 auto;padding:8px}
section{background:#fff;border-radius:10px;margin:10px 0;padding:12px 14px;box-shadow:0 1px 2px #0002}
h2{font-size:17px;margin:0 0 8px}.vol{display:flex;gap:12px;align-items:flex-start}
.light{flex:none;width:28px;height:28px;border-radius:50%;margin-top:2px;border:2px solid #0003}
.green{background:#2fb344}.amber{background:#f2a20c}.red{background:#d63939}.grey{background:#9aa0ac}
.vol .body{flex:1;min-width:0}.vol h3{margin:0;font-size:18px}.state{margin:2px 0;font-weight:600}
.small{font-size:13px;color:#5b6373}.tl{display:grid;grid-template-columns:repeat(30,1fr);gap:2px;margin-top:6px}
.tl span{height:16px;border-radius:2px;background:#e3e6eb}.tl .ok{background:#2fb344}
.tl .fail{background:#d63939}.tl .mixed{background:linear-gradient(#2fb344 50%,#d63939 50%)}
ul{list-style:none;margin:0;padding:0}li{padding:8px 0;border-top:1px solid #eceef2}li:first-child{border-top:0}
.pc{display:flex;flex-wrap:wrap;align-items:center;gap:4px 10px}.dot{width:12px;height:12px;border-radius:50%}
.pc .name{font-weight:600;overflow-wrap:anywhere}.bar{width:100%;height:8px;background:#e3e6eb;border-radius:4px;overflow:hidden}
.bar i{display:block;height:100%;background:#4c7bd9}.alert{border-left:4px solid #d63939}
.ev time{color:#5b6373;font-size:13px;margin-right:6px}.ev .error{color:#b42323}.ev .warn{color:#9a6400}
";

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn local(ms: u64) -> chrono::DateTime<Local> {
    Local
        .timestamp_millis_opt(ms as i64)
        .single()
        .unwrap_or_else(Local::now)
}

/// When, for people: `14:05` today, else `Mon 15 Jan 14:05`.
fn when(ms: u64, now: u64) -> String {
    let (t, n) = (local(ms), local(now));
    if t.date_naive() == n.date_naive() {
        t.format("%H:%M").to_string()
    } else {
        t.format("%a %-d %b %H:%M").to_string()
    }
}

/// The page.
pub fn render(shared: &Shared) -> String {
    let s = shared.settings();
    let now = now_ms();
    let (report, checked, check_error, events) = shared.with_view(|v| {
        (
            v.status.clone(),
            v.checked_ms,
            v.check_error.clone(),
            v.events.iter().rev().take(15).cloned().collect::<Vec<_>>(),
        )
    });
    let mut h = String::with_capacity(16 * 1024);
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content=\"width=device-width,initial-scale=1\">\
         <meta http-equiv=refresh content=60><title>Backup status · {host}</title>\
         <style>{STYLE}</style></head><body><header><h1>Backup status</h1><p>{host} · {checked}</p>\
         </header><main>",
        host = esc(&super::host_name()),
        checked = match checked {
            Some(t) => format!("checked {}", format_age(now.saturating_sub(t) / 1000)),
            None => "first check running…".into(),
        }
    );
    if let Some(e) = &check_error {
        let _ = write!(
            h,
            "<section class=alert><h2>Cannot check the backup</h2><p>{}</p></section>",
            esc(e)
        );
    }
    alerts(&mut h, shared);
    h.push_str("<section><h2>Volumes</h2><ul>");
    for (name, vs) in volume_names(&s, report.as_deref()) {
        volume(&mut h, shared, &s, report.as_deref(), &name, vs, now);
    }
    h.push_str("</ul></section>");
    if let Some(r) = &report {
        pcs(&mut h, r);
    }
    h.push_str("<section class=ev><h2>Recent events</h2><ul>");
    if events.is_empty() {
        h.push_str("<li>None yet.</li>");
    }
    for e in events {
        let _ = write!(
            h,
            "<li><time>{}</time><span class={}>{}</span></li>",
            when(e.at_ms, now),
            e.level,
            esc(&e.text)
        );
    }
    h.push_str("</ul></section></main></body></html>");
    h
}

fn alerts(h: &mut String, shared: &Shared) {
    let open: Vec<_> = lock(&shared.state).alerts.values().cloned().collect();
    if open.is_empty() {
        return;
    }
    h.push_str("<section class=alert><h2>Needs attention</h2><ul>");
    for a in open {
        let _ = write!(h, "<li>{}</li>", esc(&a.message));
    }
    h.push_str("</ul></section>");
}

/// Configured volumes first, then the catalog's others; with whether each is configured.
fn volume_names(s: &Settings, r: Option<&StatusReport>) -> Vec<(String, bool)> {
    let mut out: Vec<(String, bool)> = s.volumes.iter().map(|v| (v.name.clone(), true)).collect();
    if let Some(r) = r {
        for v in newest(r).keys() {
            if !out.iter().any(|(n, _)| n == v) {
                out.push((v.to_string(), false));
            }
        }
    }
    out
}

fn volume(
    h: &mut String,
    shared: &Shared,
    s: &Settings,
    r: Option<&StatusReport>,
    name: &str,
    configured: bool,
    now: u64,
) {
    let cfg = s.volumes.iter().find(|v| v.name == name);
    let newest_snap: Option<&SnapshotStatus> = r.and_then(|r| newest(r).get(name).copied());
    let last_failed = lock(&shared.journal)
        .last_done
        .get(&(JobKind::Snapshot, Some(name.to_string())))
        .filter(|j| j.outcome == Some(Outcome::Failed))
        .map(|j| j.error.clone().unwrap_or_default());
    let (light, state) = match newest_snap {
        None if r.is_none() => ("grey", "Not checked yet".to_string()),
        None => ("red", "No backup yet".to_string()),
        Some(sn) => {
            let age = r.map_or(0, |r| r.now.saturating_sub(sn.created_unix));
            let target = cfg.and_then(|c| c.min_margin).unwrap_or(sn.m as i64);
            let too_old = cfg.is_some_and(|c| age > c.max_age.as_secs());
            let light = if too_old || sn.health.margin < 0 {
                "red"
            } else if sn.health.margin < target || last_failed.is_some() {
                "amber"
            } else {
                "green"
            };
            (
                light,
                format!(
                    "Last backup {} · {}",
                    format_age(age),
                    margin_words(sn.health.margin)
                ),
            )
        }
    };
    let _ = write!(
        h,
        "<li class=vol id=\"vol-{id}\"><div class=\"light {light}\" title={light}></div>\
         <div class=body><h3>{name}</h3><p class=state>{state}</p>",
        id = esc(name),
        name = esc(name),
        state = esc(&state)
    );
    if let Some(e) = last_failed {
        let _ = write!(h, "<p class=small>Last run FAILED: {}</p>", esc(&e));
    }
    let count = r.map_or(0, |r| {
        r.snapshots.iter().filter(|x| x.volume == name).count()
    });
    let next = shared.with_view(|v| v.next_runs.get(&format!("snapshot/{name}")).copied());
    let plan = match (cfg, next) {
        (Some(c), Some(n)) => format!("next {} ({})", when(n, now), c.schedule),
        (Some(c), None) => format!("schedule: {}", c.schedule),
        (None, _) if !configured => "not scheduled by this server".to_string(),
        _ => String::new(),
    };
    let _ = write!(
        h,
        "<p class=small>{count} snapshot{} kept · {}</p>",
        if count == 1 { "" } else { "s" },
        esc(&plan)
    );
    super::drill::page_html(h, shared, s, name, esc);
    timeline(h, shared, r, name, now);
    h.push_str("</div></li>");
}

/// One cell a day for the last 30 days: snapshots in the catalog, failed jobs in the journal.
fn timeline(h: &mut String, shared: &Shared, r: Option<&StatusReport>, name: &str, now: u64) {
    let today = local(now).date_naive();
    let day_of = |ms: u64| (today - local(ms).date_naive()).num_days();
    let mut snaps: BTreeMap<i64, u32> = BTreeMap::new();
    let mut fails: BTreeMap<i64, u32> = BTreeMap::new();
    for sn in r.map(|r| r.snapshots.as_slice()).unwrap_or(&[]) {
        if sn.volume == name {
            *snaps.entry(day_of(sn.created_unix * 1000)).or_default() += 1;
        }
    }
    for j in lock(&shared.journal).recent.iter() {
        if j.volume.as_deref() == Some(name) && j.outcome == Some(Outcome::Failed) {
            *fails.entry(day_of(j.started_ms)).or_default() += 1;
        }
    }
    h.push_str("<div class=tl aria-label=\"last 30 days\">");
    for ago in (0..DAYS).rev() {
        let (n, f) = (
            snaps.get(&ago).copied().unwrap_or(0),
            fails.get(&ago).copied().unwrap_or(0),
        );
        let class = match (n > 0, f > 0) {
            (true, true) => "mixed",
            (true, false) => "ok",
            (false, true) => "fail",
            _ => "none",
        };
        let date = today - chrono::Days::new(ago as u64);
        let _ = write!(
            h,
            "<span class={class} title=\"{}: {n} snapshot(s), {f} failure(s)\"></span>",
            date.format("%a %-d %b")
        );
    }
    h.push_str("</div>");
}

fn pcs(h: &mut String, r: &StatusReport) {
    let up = r.agents.iter().filter(|a| a.reachable).count();
    let _ = write!(
        h,
        "<section><h2>PCs ({up} of {} up)</h2><ul>",
        r.agents.len()
    );
    for a in &r.agents {
        pc(h, a, r.now);
    }
    h.push_str("</ul></section>");
}

fn pc(h: &mut String, a: &AgentStatus, now: u64) {
    let seen = match (a.reachable, a.last_seen) {
        (true, _) => "up".to_string(),
        (false, Some(t)) => format!("DOWN · last seen {}", format_age(now.saturating_sub(t))),
        (false, None) => "DOWN · never seen".to_string(),
    };
    let id = a.id.get(..8).unwrap_or("");
    let _ = write!(
        h,
        "<li class=pc><span class=\"dot {}\"></span><span class=name>{}</span>\
         <span class=small>{}</span><span>{}</span>",
        if a.reachable { "green" } else { "red" },
        esc(&a.addr),
        esc(id),
        esc(&seen)
    );
    let (used, cap) = match (a.used, a.quota, a.fs_free) {
        (Some(u), Some(q), _) if q > 0 => (u, Some(q)),
        (Some(u), _, Some(free)) => (u, Some(u + free)),
        (Some(u), _, None) => (u, None),
        _ => {
            h.push_str("</li>");
            return;
        }
    };
    let (pct, of) = match cap {
        Some(c) if c > 0 => (
            (used as f64 / c as f64 * 100.0).min(100.0),
            format!(
                " of {}{}",
                format_size(c),
                if a.quota.unwrap_or(0) > 0 {
                    ""
                } else {
                    " (disk)"
                }
            ),
        ),
        _ => (0.0, String::new()),
    };
    let _ = write!(
        h,
        "<span class=small>{} used{of}</span><div class=bar title=\"{pct:.0}%\"><i style=\"width:{pct:.1}%\"></i></div></li>",
        format_size(used)
    );
}

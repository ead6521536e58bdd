//! `/metrics` in the Prometheus text format (version 0.0.4). Every name, from the last status
//! check and the job journal:
//!
//! | metric | type | labels | meaning |
//! |---|---|---|---|
//! | `sa_image_up` | gauge | | 1 while the daemon runs |
//! | `sa_image_check_success` | gauge | | 1 when the last status check worked, else 0 |
//! | `sa_image_check_timestamp_seconds` | gauge | | when the shown status was gathered |
//! | `sa_image_volume_snapshots` | gauge | `volume` | live snapshots of the volume |
//! | `sa_image_volume_newest_snapshot_timestamp_seconds` | gauge | `volume` | creation time of the newest |
//! | `sa_image_volume_newest_snapshot_age_seconds` | gauge | `volume` | its age at the check |
//! | `sa_image_volume_margin` | gauge | `volume` | further agent losses the newest survives (below 0: data lost now) |
//! | `sa_image_volume_parity_shards` | gauge | `volume` | its m: the margin at full redundancy |
//! | `sa_image_agents` | gauge | | agents known (book, catalog, addresses given) |
//! | `sa_image_agents_up` | gauge | | of them, answering now |
//! | `sa_image_agent_up` | gauge | `agent`, `addr` | 1 answering, 0 not |
//! | `sa_image_agent_used_bytes` | gauge | `agent`, `addr` | bytes stored (answering agents) |
//! | `sa_image_agent_quota_bytes` | gauge | `agent`, `addr` | its quota (0: none) |
//! | `sa_image_agent_last_seen_timestamp_seconds` | gauge | `agent`, `addr` | when it last answered this machine |
//! | `sa_image_jobs_total` | counter | `kind`, `volume`, `outcome` | jobs ended, all history of the journal |
//! | `sa_image_job_last_duration_seconds` | gauge | `kind`, `volume` | the last finished job's wall time |
//! | `sa_image_job_last_success` | gauge | `kind`, `volume` | 1 when it succeeded |
//! | `sa_image_job_last_end_timestamp_seconds` | gauge | `kind`, `volume` | when it ended |
//! | `sa_image_snapshot_last_bytes_sent` | gauge | `volume` | bytes of shards the last snapshot sent |
//! | `sa_image_snapshot_last_bytes_read` | gauge | `volume` | bytes it read from the source |
//! | `sa_image_scrub_bad_shards` | gauge | | quarantined shards not yet rebuilt, all agents |
//! | `sa_image_repair_backlog_shards` | gauge | | absent shards the last repair pass left (held back or not placed) |
//! | `sa_image_alerts_open` | gauge | | alert conditions holding now |
//!
//! `agent` is the agent's id (hex; its address when it never answered); fleet-wide jobs (scrub,
//! repair) have no `volume` label.

use std::fmt::Write;

use sa_engine::limits::newest;

use super::journal::Outcome;
use super::shared::{lock, Shared};

/// One family being written.
struct Out(String);

impl Out {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], value);
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics page.
pub fn render(shared: &Shared) -> String {
    let mut o = Out(String::new());
    let (report, checked, err, bad, repair) = shared.with_view(|v| {
        (
            v.status.clone(),
            v.checked_ms,
            v.check_error.is_some(),
            v.scrub_bad,
            v.repair.clone(),
        )
    });
    o.one("sa_image_up", "gauge", "1 while the daemon runs.", 1.0);
    o.one(
        "sa_image_check_success",
        "gauge",
        "1 when the last status check worked.",
        if err || report.is_none() { 0.0 } else { 1.0 },
    );
    if let Some(t) = checked {
        o.one(
            "sa_image_check_timestamp_seconds",
            "gauge",
            "When the status shown was gathered.",
            t as f64 / 1000.0,
        );
    }
    if let Some(r) = &report {
        volumes(&mut o, r);
        agents(&mut o, r);
    }
    jobs(&mut o, shared);
    if let Some(b) = bad {
        o.one(
            "sa_image_scrub_bad_shards",
            "gauge",
            "Quarantined shards not yet rebuilt, all agents.",
            b as f64,
        );
    }
    if let Some(r) = repair {
        o.one(
            "sa_image_repair_backlog_shards",
            "gauge",
            "Absent shards the last repair pass left (held back or not placed).",
            r.backlog as f64,
        );
    }
    let open = lock(&shared.state).alerts.len();
    o.one(
        "sa_image_alerts_open",
        "gauge",
        "Alert conditions holding now.",
        open as f64,
    );
    o.0
}

fn volumes(o: &mut Out, r: &sa_engine::status::StatusReport) {
    let newest = newest(r);
    let fams: [(&str, &str); 5] = [
        ("sa_image_volume_snapshots", "Live snapshots of the volume."),
        (
            "sa_image_volume_newest_snapshot_timestamp_seconds",
            "Creation time of the newest snapshot.",
        ),
        (
            "sa_image_volume_newest_snapshot_age_seconds",
            "Age of the newest snapshot at the last check.",
        ),
        (
            "sa_image_volume_margin",
            "Further agent losses the newest snapshot survives (below 0: data lost now).",
        ),
        (
            "sa_image_volume_parity_shards",
            "Parity shards (m) of the newest snapshot: its margin at full redundancy.",
        ),
    ];
    for (i, (name, help)) in fams.iter().enumerate() {
        o.family(name, "gauge", help);
        for (v, s) in &newest {
            let value = match i {
                0 => r.snapshots.iter().filter(|x| x.volume == *v).count() as f64,
                1 => s.created_unix as f64,
                2 => r.now.saturating_sub(s.created_unix) as f64,
                3 => s.health.margin as f64,
                _ => s.m as f64,
            };
            o.sample(name, &[("volume", v)], value);
        }
    }
}

fn agents(o: &mut Out, r: &sa_engine::status::StatusReport) {
    o.one(
        "sa_image_agents",
        "gauge",
        "Agents known.",
        r.agents.len() as f64,
    );
    o.one(
        "sa_image_agents_up",
        "gauge",
        "Agents answering now.",
        r.agents.iter().filter(|a| a.reachable).count() as f64,
    );
    let fams = [
        ("sa_image_agent_up", "1 when the agent answers."),
        ("sa_image_agent_used_bytes", "Bytes the agent stores."),
        ("sa_image_agent_quota_bytes", "The agent's quota (0: none)."),
        (
            "sa_image_agent_last_seen_timestamp_seconds",
            "When the agent last answered this machine.",
        ),
    ];
    for (i, (name, help)) in fams.iter().enumerate() {
        o.family(name, "gauge", help);
        for a in &r.agents {
            let id = if a.id.is_empty() { &a.addr } else { &a.id };
            let value = match i {
                0 => Some(if a.reachable { 1.0 } else { 0.0 }),
                1 => a.used.map(|u| u as f64),
                2 => a.quota.map(|q| q as f64),
                _ => a.last_seen.map(|t| t as f64),
            };
            if let Some(value) = value {
                o.sample(name, &[("agent", id), ("addr", &a.addr)], value);
            }
        }
    }
}

fn jobs(o: &mut Out, shared: &Shared) {
    let j = lock(&shared.journal);
    o.family(
        "sa_image_jobs_total",
        "counter",
        "Jobs ended, by kind, volume and outcome.",
    );
    for (((kind, volume), outcome), n) in &j.counts {
        let mut l = vec![("kind", kind.name())];
        if let Some(v) = volume {
            l.push(("volume", v));
        }
        l.push(("outcome", outcome.name()));
        o.sample("sa_image_jobs_total", &l, *n as f64);
    }
    let fams = [
        (
            "sa_image_job_last_duration_seconds",
            "Wall time of the last finished job.",
        ),
        (
            "sa_image_job_last_success",
            "1 when the last finished job succeeded.",
        ),
        (
            "sa_image_job_last_end_timestamp_seconds",
            "When the last finished job ended.",
        ),
    ];
    for (i, (name, help)) in fams.iter().enumerate() {
        o.family(name, "gauge", help);
        for ((kind, volume), job) in &j.last_done {
            let mut l = vec![("kind", kind.name())];
            if let Some(v) = volume {
                l.push(("volume", v));
            }
            let end = job.ended_ms.unwrap_or(job.started_ms);
            let value = match i {
                0 => end.saturating_sub(job.started_ms) as f64 / 1000.0,
                1 => f64::from(u8::from(job.outcome == Some(Outcome::Ok))),
                _ => end as f64 / 1000.0,
            };
            o.sample(name, &l, value);
        }
    }
    for (name, field, help) in [
        (
            "sa_image_snapshot_last_bytes_sent",
            "bytes_sent",
            "Bytes of shards the last snapshot sent.",
        ),
        (
            "sa_image_snapshot_last_bytes_read",
            "bytes_read",
            "Bytes the last snapshot read from its source.",
        ),
    ] {
        o.family(name, "gauge", help);
        for ((kind, volume), job) in &j.last_done {
            if let (super::journal::JobKind::Snapshot, Some(v)) = (kind, volume) {
                if let Some(b) = job.figures.get(field).and_then(|b| b.as_u64()) {
                    o.sample(name, &[("volume", v)], b as f64);
                }
            }
        }
    }
}

//! Limits on a [`StatusReport`]: the conditions that `sa-image status --max-age --max-absence`
//! exits on and that the daemon alerts on.
//!
//! Per volume, the *newest* snapshot (the one a restore would take) is judged:
//! - [`Kind::SnapshotOld`]: it was created longer ago than the volume's `max_age`;
//! - [`Kind::NoSnapshot`]: a volume the caller expects has no snapshot at all;
//! - [`Kind::MarginLow`]: it survives fewer further agent losses than the volume's `min_margin`
//!   (by default its own `m`: anything below full redundancy);
//! - [`Kind::DataLost`]: some stripe of it has fewer than k shards present (margin below 0).
//!
//! Per agent that does not answer now: [`Kind::AgentAbsent`] once it was last seen (by this
//! machine) longer ago than `max_absence`, or never.
//!
//! Each [`Breach`] has a stable [`Breach::key`] (`snapshot_old/VOLUME`, `agent_absent/ID`, ...):
//! the daemon keeps one alert per key, and sends "resolved" when the key is gone.

use std::collections::BTreeMap;
use std::time::Duration;

use sa_core::duration::{format_age, format_span};
use serde::Serialize;

use crate::status::{AgentStatus, SnapshotStatus, StatusReport};

/// What a volume must meet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeLimits {
    /// The newest snapshot may be at most this old (None: no limit).
    pub max_age: Option<Duration>,
    /// The newest snapshot must survive at least this many further agent losses (None: its m).
    pub min_margin: Option<i64>,
}

/// What the backup must meet.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// Limits of volumes not named in `volumes`.
    pub default: VolumeLimits,
    /// Per volume name.
    pub volumes: BTreeMap<String, VolumeLimits>,
    /// Volumes that must have a snapshot (a missing one is [`Kind::NoSnapshot`]).
    pub expected: Vec<String>,
    /// An agent may be absent at most this long (None: no limit).
    pub max_absence: Option<Duration>,
}

impl Limits {
    /// The limits of volume `name`.
    pub fn of(&self, name: &str) -> VolumeLimits {
        self.volumes.get(name).copied().unwrap_or(self.default)
    }
}

/// What kind of condition a breach is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The newest snapshot is older than `max_age`.
    SnapshotOld,
    /// An expected volume has no snapshot.
    NoSnapshot,
    /// The newest snapshot's margin is below the target.
    MarginLow,
    /// Some stripe of the newest snapshot cannot be rebuilt now.
    DataLost,
    /// An agent has not answered for longer than `max_absence`.
    AgentAbsent,
}

impl Kind {
    /// The key prefix (`snapshot_old`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Kind::SnapshotOld => "snapshot_old",
            Kind::NoSnapshot => "no_snapshot",
            Kind::MarginLow => "margin_low",
            Kind::DataLost => "data_lost",
            Kind::AgentAbsent => "agent_absent",
        }
    }
}

/// One limit exceeded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Breach {
    /// Stable key: kind and subject (`snapshot_old/system`, `agent_absent/1a2b…`).
    pub key: String,
    /// Its kind.
    pub kind: Kind,
    /// The volume concerned.
    pub volume: Option<String>,
    /// The agent concerned (its address).
    pub agent: Option<String>,
    /// One line for people: what is wrong and, where it helps, what to do.
    pub message: String,
}

/// The newest snapshot of each volume in `report`, by volume name.
pub fn newest(report: &StatusReport) -> BTreeMap<&str, &SnapshotStatus> {
    let mut out: BTreeMap<&str, &SnapshotStatus> = BTreeMap::new();
    for s in &report.snapshots {
        let e = out.entry(s.volume.as_str()).or_insert(s);
        if s.created_unix > e.created_unix {
            *e = s;
        }
    }
    out
}

/// How many further agent losses a margin survives, in words: `survives 2 more PCs lost`,
/// `survives no further PC loss`, `cannot be fully restored now`.
pub fn margin_words(margin: i64) -> String {
    match margin {
        m if m < 0 => "cannot be fully restored now".into(),
        0 => "survives no further PC loss".into(),
        1 => "survives 1 more PC lost".into(),
        m => format!("survives {m} more PCs lost"),
    }
}

/// Every limit `report` exceeds (see the module docs), volumes first, in a stable order.
pub fn check(report: &StatusReport, limits: &Limits) -> Vec<Breach> {
    let mut out = Vec::new();
    let newest = newest(report);
    for v in &limits.expected {
        if !newest.contains_key(v.as_str()) {
            out.push(Breach {
                key: format!("{}/{v}", Kind::NoSnapshot.name()),
                kind: Kind::NoSnapshot,
                volume: Some(v.clone()),
                agent: None,
                message: format!("volume '{v}' has no snapshot yet"),
            });
        }
    }
    for (v, s) in &newest {
        out.extend(volume_breaches(report.now, v, s, limits.of(v)));
    }
    if let Some(max) = limits.max_absence {
        for a in report.agents.iter().filter(|a| !a.reachable) {
            if let Some(b) = absent(report.now, a, max) {
                out.push(b);
            }
        }
    }
    out
}

fn volume_breaches(now: u64, v: &str, s: &SnapshotStatus, l: VolumeLimits) -> Vec<Breach> {
    let mut out = Vec::new();
    let breach = |kind: Kind, message: String| Breach {
        key: format!("{}/{v}", kind.name()),
        kind,
        volume: Some(v.to_string()),
        agent: None,
        message,
    };
    let age = now.saturating_sub(s.created_unix);
    if let Some(max) = l.max_age {
        if age > max.as_secs() {
            out.push(breach(
                Kind::SnapshotOld,
                format!(
                    "the newest snapshot of volume '{v}' was taken {} (limit: {}); check that \
                     the backup still runs",
                    format_age(age),
                    format_span(max.as_secs())
                ),
            ));
        }
    }
    let margin = s.health.margin;
    if margin < 0 {
        out.push(breach(
            Kind::DataLost,
            format!(
                "the newest snapshot of volume '{v}' cannot be fully restored now: {} stripe(s) \
                 have fewer than k={} shards; bring back the PCs that are down",
                s.health.lost_stripes, s.k
            ),
        ));
    } else {
        let target = l.min_margin.unwrap_or(s.m as i64);
        if margin < target {
            out.push(breach(
                Kind::MarginLow,
                format!(
                    "the newest snapshot of volume '{v}' {} (target: {target}); bring back the \
                     PCs that are down, or let `repair` rebuild their shards elsewhere",
                    margin_words(margin)
                ),
            ));
        }
    }
    out
}

fn absent(now: u64, a: &AgentStatus, max: Duration) -> Option<Breach> {
    let subject = if a.id.is_empty() {
        a.addr.clone()
    } else {
        a.id.clone()
    };
    let message = match a.last_seen {
        Some(t) if now.saturating_sub(t) <= max.as_secs() => return None,
        Some(t) => format!(
            "PC {} has not answered since {} (limit: {})",
            a.addr,
            format_age(now.saturating_sub(t)),
            format_span(max.as_secs())
        ),
        None => format!(
            "PC {} does not answer and was never seen by this machine",
            a.addr
        ),
    };
    Some(Breach {
        key: format!("{}/{subject}", Kind::AgentAbsent.name()),
        kind: Kind::AgentAbsent,
        volume: None,
        agent: Some(a.addr.clone()),
        message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::census::Margin;

    fn snap(volume: &str, created: u64, margin: i64) -> SnapshotStatus {
        SnapshotStatus {
            snapshot: format!("{volume}-{created}"),
            volume: volume.into(),
            created: String::new(),
            created_unix: created,
            revision: 0,
            k: 4,
            m: 2,
            state: String::new(),
            health: Margin {
                margin,
                lost_stripes: u64::from(margin < 0),
                ..Default::default()
            },
            last_drill: None,
        }
    }

    fn agent(addr: &str, reachable: bool, last_seen: Option<u64>) -> AgentStatus {
        AgentStatus {
            id: format!("id-{addr}"),
            addr: addr.into(),
            reachable,
            last_seen,
            used: None,
            quota: None,
            free: None,
            fs_free: None,
            shards: None,
            error: None,
        }
    }

    fn report(snapshots: Vec<SnapshotStatus>, agents: Vec<AgentStatus>) -> StatusReport {
        StatusReport {
            agents,
            snapshots,
            listing_failed: Vec::new(),
            now: 1000 * 3600,
            exit: 0,
        }
    }

    #[test]
    fn only_the_newest_snapshot_counts() {
        // An old degraded snapshot and a fresh sound one: nothing is wrong.
        let r = report(
            vec![snap("sys", 3600, 0), snap("sys", 999 * 3600, 2)],
            vec![],
        );
        let l = Limits {
            default: VolumeLimits {
                max_age: Some(Duration::from_secs(26 * 3600)),
                min_margin: None,
            },
            ..Default::default()
        };
        assert_eq!(check(&r, &l), vec![]);
        // Only the old one: too old and below its m.
        let r = report(vec![snap("sys", 3600, 1)], vec![]);
        let keys: Vec<String> = check(&r, &l).into_iter().map(|b| b.key).collect();
        assert_eq!(keys, ["snapshot_old/sys", "margin_low/sys"]);
    }

    #[test]
    fn margin_target_lost_data_and_expected_volumes() {
        let l = Limits {
            volumes: [(
                "db".to_string(),
                VolumeLimits {
                    max_age: None,
                    min_margin: Some(1),
                },
            )]
            .into(),
            expected: vec!["db".into(), "mail".into()],
            ..Default::default()
        };
        let r = report(vec![snap("db", 999 * 3600, 1)], vec![]);
        let b = check(&r, &l);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].key, "no_snapshot/mail");
        let r = report(vec![snap("db", 999 * 3600, -1), snap("mail", 1, 2)], vec![]);
        let b = check(&r, &l);
        assert_eq!(b[0].key, "data_lost/db");
        assert!(b[0].message.contains("cannot be fully restored"), "{b:?}");
    }

    #[test]
    fn absent_agents() {
        let now = 1000 * 3600;
        let r = report(
            vec![],
            vec![
                agent("pc1:7710", true, Some(now)),
                agent("pc2:7710", false, Some(now - 3600)),
                agent("pc3:7710", false, Some(now - 8 * 86400)),
                agent("pc4:7710", false, None),
            ],
        );
        let l = Limits {
            max_absence: Some(Duration::from_secs(7 * 86400)),
            ..Default::default()
        };
        let b = check(&r, &l);
        let keys: Vec<&str> = b.iter().map(|b| b.key.as_str()).collect();
        assert_eq!(
            keys,
            ["agent_absent/id-pc3:7710", "agent_absent/id-pc4:7710"]
        );
        assert!(b[0].message.contains("1 week ago"), "{}", b[0].message);
        assert!(b[1].message.contains("never seen"), "{}", b[1].message);
    }

    #[test]
    fn margins_in_words() {
        assert_eq!(margin_words(2), "survives 2 more PCs lost");
        assert_eq!(margin_words(1), "survives 1 more PC lost");
        assert_eq!(margin_words(0), "survives no further PC loss");
        assert_eq!(margin_words(-1), "cannot be fully restored now");
    }
}

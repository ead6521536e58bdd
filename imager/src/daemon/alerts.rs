//! Alerts: one per condition, sent when it appears, again at most every `alert_repeat` while it
//! lasts, and a "resolved" message when it is gone.
//!
//! Conditions come from each status check ([`sa_engine::limits`]: a newest snapshot older than the
//! volume's `max_age`, an agent absent longer than `max_absence`, a margin below the volume's
//! `min_margin`, data lost, an expected volume without snapshot), from the job journal (the last
//! job of a kind and volume failed: `job_failed/KIND/VOLUME`), and from the check itself
//! (`check_failed`: no agent answers). [`update`] compares them with the open alerts kept in the
//! state file and says what to send; [`super::notify`] sends it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::state::OpenAlert;

/// A condition that holds now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// Stable key (`snapshot_old/system`, `agent_absent/ID`, `job_failed/snapshot/system`).
    pub key: String,
    /// Kind (`snapshot_old`, `job_failed`, ...).
    pub kind: String,
    /// The volume concerned.
    pub volume: Option<String>,
    /// The agent concerned (address).
    pub agent: Option<String>,
    /// What is wrong, for people.
    pub message: String,
}

impl From<sa_engine::limits::Breach> for Condition {
    fn from(b: sa_engine::limits::Breach) -> Self {
        Condition {
            key: b.key,
            kind: b.kind.name().to_string(),
            volume: b.volume,
            agent: b.agent,
            message: b.message,
        }
    }
}

/// What to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notice {
    /// `alert` or `resolved`.
    pub event: &'static str,
    /// The condition's key.
    pub key: String,
    /// Its kind.
    pub kind: String,
    /// The volume concerned.
    pub volume: Option<String>,
    /// The agent concerned.
    pub agent: Option<String>,
    /// What is (or was) wrong.
    pub message: String,
    /// Since when (Unix ms).
    pub since_ms: u64,
    /// An alert sent again because the condition still holds.
    pub repeat: bool,
}

/// Compares `now_conditions` with the `open` alerts at `now_ms`: opens new ones, closes the ones
/// gone, and returns what to send (new alerts, repeats due, alerts never sent yet, resolutions).
/// The caller marks the alerts it delivered with [`mark_sent`].
pub fn update(
    open: &mut BTreeMap<String, OpenAlert>,
    now_conditions: Vec<Condition>,
    now_ms: u64,
    repeat: Duration,
) -> Vec<Notice> {
    let mut out = Vec::new();
    let mut holding = std::collections::BTreeSet::new();
    for c in now_conditions {
        holding.insert(c.key.clone());
        let a = open.entry(c.key.clone()).or_insert_with(|| OpenAlert {
            kind: c.kind.clone(),
            volume: c.volume.clone(),
            agent: c.agent.clone(),
            message: c.message.clone(),
            opened_ms: now_ms,
            sent_ms: None,
        });
        a.message = c.message.clone();
        let due = match a.sent_ms {
            None => Some(false),
            Some(t) if now_ms.saturating_sub(t) >= repeat.as_millis() as u64 => Some(true),
            Some(_) => None,
        };
        if let Some(repeat) = due {
            out.push(Notice {
                event: "alert",
                key: c.key,
                kind: c.kind,
                volume: c.volume,
                agent: c.agent,
                message: c.message,
                since_ms: a.opened_ms,
                repeat,
            });
        }
    }
    let gone: Vec<String> = open
        .keys()
        .filter(|k| !holding.contains(*k))
        .cloned()
        .collect();
    for key in gone {
        if let Some(a) = open.remove(&key) {
            // An alert nobody received needs no resolution either.
            if a.sent_ms.is_some() {
                out.push(Notice {
                    event: "resolved",
                    key,
                    kind: a.kind,
                    volume: a.volume,
                    agent: a.agent,
                    message: a.message,
                    since_ms: a.opened_ms,
                    repeat: false,
                });
            }
        }
    }
    out
}

/// Notes that the alert `key` was delivered at `now_ms`.
pub fn mark_sent(open: &mut BTreeMap<String, OpenAlert>, key: &str, now_ms: u64) {
    if let Some(a) = open.get_mut(key) {
        a.sent_ms = Some(now_ms);
    }
}

/// The subject line of a notice (`ALERT: ...` / `RESOLVED: ...`).
pub fn subject(n: &Notice) -> String {
    let what = match n.kind.as_str() {
        "snapshot_old" => format!(
            "backup of '{}' is too old",
            n.volume.as_deref().unwrap_or("")
        ),
        "no_snapshot" => format!(
            "volume '{}' has no backup yet",
            n.volume.as_deref().unwrap_or("")
        ),
        "margin_low" => format!(
            "backup of '{}' has less redundancy than it should",
            n.volume.as_deref().unwrap_or("")
        ),
        "data_lost" => format!(
            "backup of '{}' cannot be fully restored now",
            n.volume.as_deref().unwrap_or("")
        ),
        "agent_absent" => format!("PC {} is away", n.agent.as_deref().unwrap_or("")),
        "job_failed" => format!(
            "a backup job failed ({})",
            n.key.trim_start_matches("job_failed/")
        ),
        "check_failed" => "the backup cannot be checked".to_string(),
        other => other.to_string(),
    };
    if n.event == "resolved" {
        format!("RESOLVED: {what}")
    } else {
        format!("ALERT: {what}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(key: &str) -> Condition {
        Condition {
            key: key.into(),
            kind: key.split('/').next().unwrap().into(),
            volume: Some("sys".into()),
            agent: None,
            message: format!("{key} holds"),
        }
    }

    #[test]
    fn one_alert_per_condition_repeated_daily_then_resolved() {
        let day = Duration::from_secs(86400);
        let mut open = BTreeMap::new();
        let n = update(&mut open, vec![cond("margin_low/sys")], 1000, day);
        assert_eq!(n.len(), 1);
        assert_eq!((n[0].event, n[0].repeat), ("alert", false));
        mark_sent(&mut open, "margin_low/sys", 1000);
        // Still there an hour later: nothing sent.
        assert!(update(&mut open, vec![cond("margin_low/sys")], 3_601_000, day).is_empty());
        // A day later: sent again.
        let n = update(&mut open, vec![cond("margin_low/sys")], 86_401_000, day);
        assert_eq!((n.len(), n[0].repeat), (1, true));
        mark_sent(&mut open, "margin_low/sys", 86_401_000);
        // Gone: resolved, once.
        let n = update(&mut open, vec![], 90_000_000, day);
        assert_eq!((n.len(), n[0].event, n[0].since_ms), (1, "resolved", 1000));
        assert!(update(&mut open, vec![], 90_000_001, day).is_empty());
        assert_eq!(
            subject(&n[0]),
            "RESOLVED: backup of 'sys' has less redundancy than it should"
        );
    }

    #[test]
    fn an_undelivered_alert_is_tried_again_and_needs_no_resolution() {
        let day = Duration::from_secs(86400);
        let mut open = BTreeMap::new();
        assert_eq!(
            update(&mut open, vec![cond("agent_absent/x")], 1, day).len(),
            1
        );
        // Not marked sent: the next check tries again.
        assert_eq!(
            update(&mut open, vec![cond("agent_absent/x")], 2, day).len(),
            1
        );
        assert!(update(&mut open, vec![], 3, day).is_empty());
        assert!(open.is_empty());
    }
}

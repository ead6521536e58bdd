//! The daemon's small state besides the journal (`state.json` in the state directory, written
//! whole through [`sa_core::durable::write`] at every change, version 1):
//! - `anchors`: when the daemon first knew each schedule (`snapshot/VOLUME`, `scrub`): a schedule
//!   that never ran counts its missed runs from there, so a new volume does not snapshot at once;
//! - `missing`: since when each agent the status check lists as unreachable has been missing, as
//!   this daemon saw it (the absence of an agent this machine never saw answer counts from there);
//! - `alerts`: the open alerts, and when each was last sent (repeated at most every
//!   `alert_repeat`, also across restarts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format version.
const VERSION: u32 = 1;

/// One open alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenAlert {
    /// Its kind (`snapshot_old`, `job_failed`, ...).
    pub kind: String,
    /// The volume concerned.
    pub volume: Option<String>,
    /// The agent concerned.
    pub agent: Option<String>,
    /// The newest message.
    pub message: String,
    /// When the condition was first seen (Unix ms).
    pub opened_ms: u64,
    /// When it was last sent (None: not sent yet, or every channel failed).
    pub sent_ms: Option<u64>,
}

/// What `state.json` holds.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// Format version.
    pub version: u32,
    /// Per schedule key, when the daemon first knew it (Unix ms).
    pub anchors: BTreeMap<String, u64>,
    /// Per agent (id, or address when it never answered), since when it is missing (Unix ms).
    pub missing: BTreeMap<String, u64>,
    /// Open alerts by key.
    pub alerts: BTreeMap<String, OpenAlert>,
    #[serde(skip)]
    path: PathBuf,
}

impl State {
    /// Reads `dir/state.json` (absent: empty; unreadable: empty, with a warning: the worst case
    /// is an alert sent again).
    pub fn load(dir: &Path) -> State {
        let path = dir.join("state.json");
        let mut s = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice::<State>(&b).unwrap_or_else(|e| {
                tracing::warn!("{}: unreadable ({e}); starting afresh", path.display());
                State::default()
            }),
            Err(_) => State::default(),
        };
        s.version = VERSION;
        s.path = path;
        s
    }

    /// Writes it durably; a failure is logged (the state is rebuilt as the daemon goes on).
    pub fn save(&self) {
        let r = serde_json::to_vec_pretty(self)
            .map_err(|e| e.to_string())
            .and_then(|b| {
                sa_core::durable::write(
                    &self.path,
                    &b,
                    sa_core::durable::Access::Shared,
                    sa_core::durable::Replace::Yes,
                )
                .map_err(|e| e.to_string())
            });
        if let Err(e) = r {
            tracing::warn!("cannot save the daemon's state: {e}");
        }
    }

    /// The anchor of schedule `key`, set to `now_ms` (and saved) the first time.
    pub fn anchor(&mut self, key: &str, now_ms: u64) -> u64 {
        if let Some(t) = self.anchors.get(key) {
            return *t;
        }
        self.anchors.insert(key.to_string(), now_ms);
        self.save();
        now_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = State::load(dir.path());
        assert_eq!(s.anchor("snapshot/sys", 10), 10);
        s.alerts.insert(
            "margin_low/sys".into(),
            OpenAlert {
                kind: "margin_low".into(),
                volume: Some("sys".into()),
                agent: None,
                message: "m".into(),
                opened_ms: 5,
                sent_ms: Some(6),
            },
        );
        s.save();
        let mut s = State::load(dir.path());
        assert_eq!(s.anchor("snapshot/sys", 99), 10);
        assert_eq!(s.alerts["margin_low/sys"].sent_ms, Some(6));
    }
}

//! The result of a drill, kept on the agents next to its snapshot.
//!
//! One sealed catalog record ([`sa_core::catalog::seal_record`]) per snapshot, blob
//! `drill-<SNAPSHOT>` on every agent reached: a newer drill of the same snapshot replaces it, so
//! `list` and `status` show each snapshot's last drill, and the drills of a volume's snapshots
//! say which agents were withheld when (the rotation, [`super::plan`]). Copies may differ (an
//! agent was off when another was written): the first copy that opens is used.
//!
//! Body (version 1): `u16 version | u64 started (Unix s) | u8 passed | u64 boot ms (u64::MAX:
//! did not boot) | u64 total ms | u64 stripes rebuilt | u64 stripes lost | str accel | str
//! reason | str criteria | u16 n`, then per withheld agent `id [16] | str address`, then `blob
//! screenshot` (PNG, empty when none was taken). Strings are u16-length UTF-8. A screenshot over
//! [`MAX_SCREENSHOT`] is not stored.

use sa_core::catalog::{open_record, seal_record};
use sa_core::enc::{Reader, Writer};
use sa_core::keys::{hex, Keys};
use sa_core::store::{AgentClient, ShardRead};
use sa_core::{Error, Result};
use serde::Serialize;

use crate::time::rfc3339;

/// Prefix of drill record blobs.
pub const DRILL_BLOB_PREFIX: &str = "drill-";
/// Body version.
const VERSION: u16 = 1;
/// Largest screenshot kept in a record (a VGA text screen as PNG is a few KiB).
pub const MAX_SCREENSHOT: usize = 1 << 20;
/// Most withheld agents a record holds (bounds what a damaged record makes us allocate).
const MAX_WITHHELD: usize = 255;
const NO_BOOT: u64 = u64::MAX;

/// The blob name of the drill record of `snapshot`.
pub fn blob_name(snapshot: &str) -> String {
    format!("{DRILL_BLOB_PREFIX}{snapshot}")
}

/// One drill's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrillRecord {
    /// When it started, Unix seconds.
    pub started: u64,
    /// Whether every criterion was met before the deadline.
    pub passed: bool,
    /// Milliseconds from starting the VM to the last criterion met (None: did not pass).
    pub boot_ms: Option<u64>,
    /// Milliseconds the whole drill took.
    pub total_ms: u64,
    /// Stripes served by rebuilding from parity.
    pub stripes_rebuilt: u64,
    /// Stripes that could not be read at all.
    pub stripes_lost: u64,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Why it passed or failed, in words.
    pub reason: String,
    /// The criteria, in words.
    pub criteria: String,
    /// The agents withheld: id and address.
    pub withheld: Vec<([u8; 16], String)>,
    /// The screen at the end, PNG (empty: none).
    pub screenshot: Vec<u8>,
}

/// What `list --json` and `status --json` show of a snapshot's last drill.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DrillSummary {
    /// When it started, RFC 3339 UTC.
    pub at: String,
    /// When it started, Unix seconds.
    pub at_unix: u64,
    /// Passed or failed.
    pub passed: bool,
    /// Why.
    pub reason: String,
    /// Seconds to boot (None: did not pass).
    pub boot_seconds: Option<f64>,
    /// Seconds the drill took.
    pub seconds: f64,
    /// Agents withheld, as `address (id…)`.
    pub withheld: Vec<String>,
    /// Stripes rebuilt from parity.
    pub stripes_rebuilt: u64,
    /// Stripes lost.
    pub stripes_lost: u64,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// Bytes of the PNG screenshot stored (0: none).
    pub screenshot_bytes: usize,
}

impl DrillRecord {
    /// The summary shown by `list` and `status`.
    pub fn summary(&self) -> DrillSummary {
        DrillSummary {
            at: rfc3339(self.started),
            at_unix: self.started,
            passed: self.passed,
            reason: self.reason.clone(),
            boot_seconds: self.boot_ms.map(|ms| ms as f64 / 1000.0),
            seconds: self.total_ms as f64 / 1000.0,
            withheld: self
                .withheld
                .iter()
                .map(|(id, addr)| crate::fleet::agent_name(addr, id))
                .collect(),
            stripes_rebuilt: self.stripes_rebuilt,
            stripes_lost: self.stripes_lost,
            accel: self.accel.clone(),
            screenshot_bytes: self.screenshot.len(),
        }
    }

    /// Sealed blob contents for snapshot `snapshot`.
    pub fn seal(&self, keys: &Keys, snapshot: &str) -> Result<Vec<u8>> {
        let shot: &[u8] = if self.screenshot.len() <= MAX_SCREENSHOT {
            &self.screenshot
        } else {
            &[]
        };
        let mut w = Writer::with_capacity(256 + shot.len());
        w.u16(VERSION)
            .u64(self.started)
            .u8(u8::from(self.passed))
            .u64(self.boot_ms.unwrap_or(NO_BOOT))
            .u64(self.total_ms)
            .u64(self.stripes_rebuilt)
            .u64(self.stripes_lost)
            .str(&self.accel)
            .str(&self.reason)
            .str(&self.criteria)
            .u16(self.withheld.len().min(MAX_WITHHELD) as u16);
        for (id, addr) in self.withheld.iter().take(MAX_WITHHELD) {
            w.bytes(id).str(addr);
        }
        w.blob(shot);
        seal_record(keys, &blob_name(snapshot), &w.buf)
    }

    /// Opens the sealed record of snapshot `snapshot`.
    pub fn open(keys: &Keys, snapshot: &str, sealed: &[u8]) -> Result<Self> {
        let body = open_record(keys, &blob_name(snapshot), sealed)?;
        Self::decode(&body)
    }

    fn decode(body: &[u8]) -> Result<Self> {
        const WHAT: &str = "drill record";
        let mut r = Reader::new(body, WHAT);
        r.version(VERSION..=VERSION)?;
        let started = r.u64()?;
        let passed = match r.u8()? {
            0 => false,
            1 => true,
            v => return Err(Error::malformed(WHAT, format!("passed flag {v}"))),
        };
        let boot_ms = Some(r.u64()?).filter(|&ms| ms != NO_BOOT);
        let total_ms = r.u64()?;
        let stripes_rebuilt = r.u64()?;
        let stripes_lost = r.u64()?;
        let accel = r.str()?;
        let reason = r.str()?;
        let criteria = r.str()?;
        let n = r.u16()? as usize;
        if n > MAX_WITHHELD {
            return Err(Error::malformed(WHAT, format!("{n} withheld agents")));
        }
        let mut withheld = Vec::with_capacity(n);
        for _ in 0..n {
            let id: [u8; 16] = r.array()?;
            withheld.push((id, r.str()?));
        }
        let screenshot = r.blob()?.to_vec();
        if screenshot.len() > MAX_SCREENSHOT {
            return Err(Error::malformed(WHAT, "screenshot too large"));
        }
        r.finish()?;
        Ok(DrillRecord {
            started,
            passed,
            boot_ms,
            total_ms,
            stripes_rebuilt,
            stripes_lost,
            accel,
            reason,
            criteria,
            withheld,
            screenshot,
        })
    }
}

/// The last drill of each of `snapshots` that has one, read from `live` (the first copy that
/// opens; damaged copies are logged and skipped). Same order as `snapshots`.
pub async fn load(
    live: &[AgentClient],
    keys: &Keys,
    snapshots: &[String],
) -> Vec<(String, DrillRecord)> {
    let mut holders: std::collections::BTreeMap<String, Vec<usize>> = Default::default();
    for (i, c) in live.iter().enumerate() {
        match c.list_blobs(DRILL_BLOB_PREFIX).await {
            Ok(names) => {
                for n in names {
                    holders.entry(n).or_default().push(i);
                }
            }
            Err(e) => tracing::warn!("{}: cannot list the drill records: {e}", c.addr()),
        }
    }
    let mut out = Vec::new();
    for s in snapshots {
        let Some(on) = holders.get(&blob_name(s)) else {
            continue;
        };
        // The first copy that opens: every copy is written by the same drill unless an agent
        // was off then, and reading all of them would cost a status check one read per agent.
        for &i in on {
            match live[i]
                .get_blob(&blob_name(s))
                .await
                .and_then(|b| DrillRecord::open(keys, s, &b))
            {
                Ok(r) => {
                    out.push((s.clone(), r));
                    break;
                }
                Err(e) => tracing::warn!("{}: drill record of {s} unusable: {e}", live[i].addr()),
            }
        }
    }
    out
}

/// The short id of an agent, for messages.
pub fn short_id(id: &[u8; 16]) -> String {
    hex(id)[..8].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DrillRecord {
        DrillRecord {
            started: 1_700_000_000,
            passed: true,
            boot_ms: Some(12_345),
            total_ms: 15_000,
            stripes_rebuilt: 7,
            stripes_lost: 0,
            accel: "tcg".into(),
            reason: "console line matched".into(),
            criteria: "console /DONE/".into(),
            withheld: vec![([1; 16], "127.0.0.2:7710".into()), ([2; 16], "h:1".into())],
            screenshot: b"\x89PNG\r\n\x1a\nxyz".to_vec(),
        }
    }

    #[test]
    fn a_record_round_trips_and_is_bound_to_its_snapshot() {
        let keys = sa_core::keys::MasterKey::from_bytes([7; 32]).derive();
        let r = sample();
        let sealed = r.seal(&keys, "abc").unwrap();
        assert_eq!(DrillRecord::open(&keys, "abc", &sealed).unwrap(), r);
        assert!(DrillRecord::open(&keys, "abd", &sealed).is_err());
        let failed = DrillRecord {
            passed: false,
            boot_ms: None,
            screenshot: Vec::new(),
            ..sample()
        };
        let sealed = failed.seal(&keys, "abc").unwrap();
        let back = DrillRecord::open(&keys, "abc", &sealed).unwrap();
        assert_eq!(back, failed);
        assert_eq!(back.summary().boot_seconds, None);
    }

    #[test]
    fn damaged_bodies_are_refused() {
        let body = {
            let mut w = Writer::with_capacity(8);
            w.u16(2);
            w.buf
        };
        assert!(DrillRecord::decode(&body).is_err());
        let keys = sa_core::keys::MasterKey::from_bytes([7; 32]).derive();
        let sealed = sample().seal(&keys, "abc").unwrap();
        let body = open_record(&keys, &blob_name("abc"), &sealed).unwrap();
        assert!(DrillRecord::decode(&body[..body.len() - 1]).is_err());
        let mut bad = body.clone();
        bad[10] = 9; // the passed flag
        assert!(DrillRecord::decode(&bad).is_err());
    }
}

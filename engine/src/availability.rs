//! Each agent's up/down history: what the durability model ([`crate::durability`]) and
//! `sa-image agents list` read as "up 83% of the last 30 days, usually up Mon-Fri 08-18".
//!
//! # Record
//!
//! The history is a sealed catalog record ([`sa_core::catalog::seal_record`]), blob
//! [`AVAILABILITY_BLOB`], written to every agent like the agent book, so a replacement server
//! starts with the history the old one had. Copies on different agents may differ (one was off
//! when another was written): [`History::merge`] takes the union of their observations.
//!
//! # Resolution: one hour, 35 days
//!
//! An observation is (agent, Unix time, up or down): the imager saw the agent answer, or tried
//! and could not reach it. Per agent and per hour two bits are kept: *seen up* and *seen down*
//! (neither: not observed, e.g. the server itself was off; both: the hour counts half). Hours are
//! a ring of [`HOURS`] = 840 slots (35 days: 30 days of availability plus slack, and five
//! whole weeks for the usual hours), the slot of Unix hour `h` being `h mod 840`, so two
//! copies merge by moving both to the later end and OR-ing the bits. That is 210 bytes of
//! bits per agent, about 240 with its id and Wake-on-LAN fields: 12 KB for 50 agents, 1 MB at the
//! cap of [`MAX_AGENTS`]. Ten-minute slots would cost six times that for nothing the model uses:
//! availability is a fraction over a month, and usual hours are whole hours.
//!
//! # Wake-on-LAN
//!
//! Beside the bits, each agent's last reported MAC and broadcast address (from its `STAT`
//! answer) and how many wakes were tried and succeeded, so the model can use a measured
//! success rate ([`AgentHistory::wake_success`]).
//!
//! Body (version 1): `u16 version | u64 end (Unix hour one past the newest slot) | u16 hours
//! (840) | u32 n`, then per agent `id [16] | up bits [105] | down bits [105] | flags u8
//! (1 MAC known, 2 broadcast known) | mac [6] | broadcast [4] | wake info seen u64 (Unix s) |
//! wake tries u32 | wake successes u32`. Unknown flags, duplicate ids, more successes than
//! tries, and a size that does not fit the count are refused.

mod usual;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use sa_core::catalog::{open_record, seal_record};
use sa_core::enc::{Reader, Writer};
use sa_core::keys::Keys;
use sa_core::{Error, Result};

use crate::durability::{AgentModel, DEFAULT_WAKE_SUCCESS};

pub use usual::UsualHours;

/// Blob name of the availability record.
pub const AVAILABILITY_BLOB: &str = "availability";
/// Body version.
const VERSION: u16 = 1;
/// Slots kept per agent (one an hour).
pub const HOURS: usize = 35 * 24;
/// Seconds per slot.
pub const SLOT_SECS: u64 = 3600;
/// Most agents a record holds (bounds what a damaged record can make us allocate).
pub const MAX_AGENTS: usize = 4096;
/// The span [`History::availability`] averages over: 30 days.
pub const AVAILABILITY_HOURS: usize = 30 * 24;

const BITS: usize = HOURS / 8;
const HAS_MAC: u8 = 1;
const HAS_BROADCAST: u8 = 2;
/// Bytes of one agent's entry in the body.
const ENTRY: usize = 16 + 2 * BITS + 1 + 6 + 4 + 8 + 4 + 4;
/// Weight of the prior in [`AgentHistory::wake_success`], in wakes.
const WAKE_PRIOR: f64 = 5.0;

/// How to wake an agent, as it last reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeInfo {
    /// MAC of the interface it is reached on.
    pub mac: Option<[u8; 6]>,
    /// Broadcast address of that interface's IPv4 subnet.
    pub broadcast: Option<Ipv4Addr>,
    /// When it reported them (Unix seconds).
    pub seen: u64,
}

/// One agent's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentHistory {
    up: [u8; BITS],
    down: [u8; BITS],
    /// How to wake it.
    pub wake: Option<WakeInfo>,
    /// Wakes tried.
    pub wake_tries: u32,
    /// Wakes after which it answered.
    pub wake_ok: u32,
}

impl Default for AgentHistory {
    fn default() -> Self {
        AgentHistory {
            up: [0; BITS],
            down: [0; BITS],
            wake: None,
            wake_tries: 0,
            wake_ok: 0,
        }
    }
}

impl AgentHistory {
    /// The chance a wake succeeds: `(ok + 4) / (tries + 5)`, a prior worth five wakes at
    /// [`DEFAULT_WAKE_SUCCESS`] that measurements take over from. `None` when no MAC is known.
    pub fn wake_success(&self) -> Option<f64> {
        self.wake.and_then(|w| w.mac)?;
        let prior = DEFAULT_WAKE_SUCCESS * WAKE_PRIOR;
        Some((self.wake_ok as f64 + prior) / (self.wake_tries as f64 + WAKE_PRIOR))
    }

    /// The value of Unix hour `h` (assumed inside the ring): 1 up, 0 down, 0.5 both, `None`
    /// not observed.
    fn hour(&self, h: u64) -> Option<f64> {
        let (i, bit) = slot(h);
        let up = self.up[i] & bit != 0;
        let down = self.down[i] & bit != 0;
        match (up, down) {
            (false, false) => None,
            (true, false) => Some(1.0),
            (false, true) => Some(0.0),
            (true, true) => Some(0.5),
        }
    }

    fn clear(&mut self, h: u64) {
        let (i, bit) = slot(h);
        self.up[i] &= !bit;
        self.down[i] &= !bit;
    }
}

fn slot(h: u64) -> (usize, u8) {
    let s = (h % HOURS as u64) as usize;
    (s / 8, 1 << (s % 8))
}

/// Availability of an agent over a span.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Uptime {
    /// Fraction of the observed hours it was up.
    pub fraction: f64,
    /// Hours observed in the span.
    pub observed_hours: usize,
    /// Hours in the span.
    pub span_hours: usize,
}

/// Every agent's history; see the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// Unix hour one past the newest slot (0: empty).
    end: u64,
    agents: BTreeMap<[u8; 16], AgentHistory>,
}

impl History {
    /// One agent's history.
    pub fn get(&self, id: &[u8; 16]) -> Option<&AgentHistory> {
        self.agents.get(id)
    }

    /// Agent ids with a history.
    pub fn ids(&self) -> impl Iterator<Item = &[u8; 16]> {
        self.agents.keys()
    }

    /// Drops an agent's history (a retired agent). Returns whether it had one.
    pub fn remove(&mut self, id: &[u8; 16]) -> bool {
        self.agents.remove(id).is_some()
    }

    /// Records that agent `id` was seen up (or found down) at `unix_secs`. Observations older
    /// than the ring are ignored; a newer one moves the ring forward. Returns false when the
    /// record is full ([`MAX_AGENTS`]) and `id` is new.
    pub fn observe(&mut self, id: [u8; 16], unix_secs: u64, up: bool) -> bool {
        let h = unix_secs / SLOT_SECS;
        if h >= self.end {
            self.advance(h + 1);
        }
        if h + (HOURS as u64) < self.end {
            return true;
        }
        let Some(a) = self.entry(id) else {
            return false;
        };
        let (i, bit) = slot(h);
        if up {
            a.up[i] |= bit;
        } else {
            a.down[i] |= bit;
        }
        true
    }

    /// Records what agent `id` reported for waking it, at `unix_secs`.
    pub fn set_wake(
        &mut self,
        id: [u8; 16],
        mac: Option<[u8; 6]>,
        broadcast: Option<Ipv4Addr>,
        unix_secs: u64,
    ) {
        if let Some(a) = self.entry(id) {
            a.wake = Some(WakeInfo {
                mac,
                broadcast,
                seen: unix_secs,
            });
        }
    }

    /// Records a wake of agent `id`: `answered` when it came up afterwards.
    pub fn record_wake(&mut self, id: [u8; 16], answered: bool) {
        if let Some(a) = self.entry(id) {
            a.wake_tries = a.wake_tries.saturating_add(1);
            a.wake_ok = a.wake_ok.saturating_add(u32::from(answered));
        }
    }

    fn entry(&mut self, id: [u8; 16]) -> Option<&mut AgentHistory> {
        if !self.agents.contains_key(&id) && self.agents.len() >= MAX_AGENTS {
            return None;
        }
        Some(self.agents.entry(id).or_default())
    }

    /// Moves the ring's end to `end`, clearing the slots that now stand for new hours.
    fn advance(&mut self, end: u64) {
        if end <= self.end {
            return;
        }
        let from = self.end.max(end.saturating_sub(HOURS as u64));
        for a in self.agents.values_mut() {
            for h in from..end {
                a.clear(h);
            }
        }
        self.end = end;
    }

    /// Merges another copy into this one: the union of the observations (hours older than the
    /// newer copy's ring are dropped); the newer wake information; the larger wake counters.
    pub fn merge(&mut self, other: &History) {
        let mut other = other.clone();
        let end = self.end.max(other.end);
        self.advance(end);
        other.advance(end);
        for (id, theirs) in other.agents {
            let Some(ours) = self.entry(id) else {
                continue;
            };
            for i in 0..BITS {
                ours.up[i] |= theirs.up[i];
                ours.down[i] |= theirs.down[i];
            }
            if theirs.wake.map(|w| w.seen) > ours.wake.map(|w| w.seen) {
                ours.wake = theirs.wake;
            }
            ours.wake_tries = ours.wake_tries.max(theirs.wake_tries);
            ours.wake_ok = ours.wake_ok.max(theirs.wake_ok);
        }
    }

    /// The hours of the ring within the last `span` hours before `now_secs`, newest last.
    fn span(&self, now_secs: u64, span: usize) -> std::ops::Range<u64> {
        let now_h = (now_secs / SLOT_SECS + 1).min(self.end);
        let lo = now_h
            .saturating_sub(span as u64)
            .max(self.end.saturating_sub(HOURS as u64));
        lo..now_h.max(lo)
    }

    /// Agent `id`'s availability over the 30 days before `now_secs` (unobserved hours left out).
    /// `None` when it was never observed then.
    pub fn availability(&self, id: &[u8; 16], now_secs: u64) -> Option<Uptime> {
        let a = self.agents.get(id)?;
        let (mut sum, mut seen) = (0.0, 0usize);
        for h in self.span(now_secs, AVAILABILITY_HOURS) {
            if let Some(v) = a.hour(h) {
                sum += v;
                seen += 1;
            }
        }
        (seen > 0).then(|| Uptime {
            fraction: sum / seen as f64,
            observed_hours: seen,
            span_hours: AVAILABILITY_HOURS,
        })
    }

    /// Agent `id`'s usual hours over the whole ring, in local time `utc_offset_secs` east of
    /// UTC (the caller's time zone; one offset for the whole span, so a daylight-saving change
    /// inside it shifts part of the history by an hour).
    pub fn usual_hours(
        &self,
        id: &[u8; 16],
        now_secs: u64,
        utc_offset_secs: i32,
    ) -> Option<UsualHours> {
        let a = self.agents.get(id)?;
        let hours = self
            .span(now_secs, HOURS)
            .filter_map(|h| a.hour(h).map(|v| (h, v)));
        Some(UsualHours::from_hours(hours, utc_offset_secs))
    }

    /// What the durability model needs of agent `id`: its 30-day availability, and its wake
    /// success when its MAC is known; `bytes` is what it holds. `None` when never observed.
    pub fn agent_model(&self, id: &[u8; 16], now_secs: u64, bytes: u64) -> Option<AgentModel> {
        let up = self.availability(id, now_secs)?;
        Some(AgentModel {
            availability: up.fraction,
            wake: self.agents.get(id).and_then(AgentHistory::wake_success),
            bytes,
        })
    }

    /// Sealed blob contents.
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>> {
        let mut w = Writer::with_capacity(16 + self.agents.len() * ENTRY);
        w.u16(VERSION)
            .u64(self.end)
            .u16(HOURS as u16)
            .u32(self.agents.len() as u32);
        for (id, a) in &self.agents {
            let wake = a.wake.unwrap_or(WakeInfo {
                mac: None,
                broadcast: None,
                seen: 0,
            });
            let flags = if wake.mac.is_some() { HAS_MAC } else { 0 }
                | if wake.broadcast.is_some() {
                    HAS_BROADCAST
                } else {
                    0
                };
            w.bytes(id)
                .bytes(&a.up)
                .bytes(&a.down)
                .u8(flags)
                .bytes(&wake.mac.unwrap_or_default())
                .bytes(&wake.broadcast.unwrap_or(Ipv4Addr::UNSPECIFIED).octets())
                .u64(wake.seen)
                .u32(a.wake_tries)
                .u32(a.wake_ok);
        }
        seal_record(keys, AVAILABILITY_BLOB, &w.buf)
    }

    /// Opens a sealed copy.
    pub fn open(keys: &Keys, sealed: &[u8]) -> Result<Self> {
        let body = open_record(keys, AVAILABILITY_BLOB, sealed)?;
        Self::decode(&body)
    }

    fn decode(body: &[u8]) -> Result<Self> {
        const WHAT: &str = "availability record";
        let mut r = Reader::new(body, WHAT);
        r.version(VERSION..=VERSION)?;
        let end = r.u64()?;
        let hours = r.u16()? as usize;
        if hours != HOURS {
            return Err(Error::malformed(
                WHAT,
                format!("{hours} hours, not {HOURS}"),
            ));
        }
        let n = r.u32()? as usize;
        if n > MAX_AGENTS || n * ENTRY != r.remaining() {
            return Err(Error::malformed(
                WHAT,
                format!("{n} agents in {} bytes", r.remaining()),
            ));
        }
        let mut agents = BTreeMap::new();
        for _ in 0..n {
            let id: [u8; 16] = r.array()?;
            let (up, down) = (r.array()?, r.array()?);
            let flags = r.u8()?;
            if flags & !(HAS_MAC | HAS_BROADCAST) != 0 {
                return Err(Error::malformed(WHAT, format!("unknown flags {flags:#x}")));
            }
            let mac: [u8; 6] = r.array()?;
            let broadcast = Ipv4Addr::from(r.array::<4>()?);
            let seen = r.u64()?;
            let (wake_tries, wake_ok) = (r.u32()?, r.u32()?);
            if wake_ok > wake_tries {
                return Err(Error::malformed(
                    WHAT,
                    "more wakes succeeded than were tried",
                ));
            }
            let wake = (flags != 0 || seen != 0).then_some(WakeInfo {
                mac: (flags & HAS_MAC != 0).then_some(mac),
                broadcast: (flags & HAS_BROADCAST != 0).then_some(broadcast),
                seen,
            });
            let a = AgentHistory {
                up,
                down,
                wake,
                wake_tries,
                wake_ok,
            };
            if agents.insert(id, a).is_some() {
                return Err(Error::malformed(WHAT, "an agent appears twice"));
            }
        }
        r.finish()?;
        Ok(History { end, agents })
    }
}

#[cfg(test)]
mod tests;

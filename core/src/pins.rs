//! The agent book: which agents belong to this owner, where they were last seen, and the
//! identity key pinned for each ([`crate::tls`]).
//!
//! It is a sealed catalog record ([`crate::catalog::seal_record`]) stored as blob `agents` on
//! every agent, so a replacement server with only the recovery key and one agent's address
//! learns every pin from the first agent it reaches. Copies on different agents may differ (an
//! agent was off when another was added); readers merge every copy they can open ([`Book::merge`]).
//!
//! **Trust on first contact.** An agent id not in the book is pinned with the key it showed
//! (an *automatic* pin). A known id showing another key is refused ([`Verdict::Changed`]) until
//! the user accepts the new key (a *deliberate* pin: `sa-image agents accept`).
//!
//! **Merging two entries of one id.** Same key: the one updated last (address, state) wins,
//! pinned at the earlier time. Different keys: a deliberate pin beats an automatic one; between
//! deliberate pins the later wins (the user changed their mind); between automatic pins the
//! *earlier* wins: first contact is what was trusted, and a machine that later posed as the
//! agent while the book was out of reach must not displace it.
//!
//! **Waking.** Each entry also keeps how to wake the agent's PC by Wake-on-LAN: the MAC and
//! IPv4 broadcast address of the interface it was reached on, as its `STAT` answer last
//! reported them ([`WakeAddr`]). Merging keeps the most recently reported.
//!
//! Body (version 2): `u32 n`, then per entry `id [16] | key [32] | addr str | pinned u64 ns |
//! updated u64 ns | flags u8 (1 deliberate, 2 retired, 4 MAC known, 8 broadcast known) |
//! mac [6] | broadcast [4] | wake seen u64 ns`. Version 1 (no wake fields, flags 1 and 2 only)
//! is still read.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::catalog::{open_record, seal_record};
use crate::enc::{Reader, Writer};
use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::tls::AgentKey;

/// Blob name of the agent book.
pub const BOOK_BLOB: &str = "agents";
/// Body version of the book.
const BOOK_VERSION: u16 = 2;
/// Most entries a book may hold (bounds what a damaged record can make us allocate).
const MAX_MEMBERS: usize = 4096;

const DELIBERATE: u8 = 1;
const RETIRED: u8 = 2;
const HAS_MAC: u8 = 4;
const HAS_BROADCAST: u8 = 8;

/// How to wake an agent's PC, as the agent last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeAddr {
    /// MAC of the interface the agent was reached on.
    pub mac: [u8; 6],
    /// Broadcast address of that interface's IPv4 subnet, when it has one.
    pub broadcast: Option<Ipv4Addr>,
    /// When the agent reported them (Unix ns).
    pub seen: u64,
}

/// One agent of the book.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Stable agent id.
    pub id: [u8; 16],
    /// Pinned identity key.
    pub key: AgentKey,
    /// Last address it was reached at.
    pub addr: String,
    /// When this key was pinned (Unix ns).
    pub pinned: u64,
    /// When this entry last changed (Unix ns).
    pub updated: u64,
    /// Pinned on purpose (`agents add`, `agents accept`), not on first contact.
    pub deliberate: bool,
    /// Retired (`agents retire`): kept so it is not pinned again as new.
    pub retired: bool,
    /// How to wake its PC, once it reported that.
    pub wake: Option<WakeAddr>,
}

/// What the book says of an agent that showed `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Pinned with this key.
    Known,
    /// Not in the book.
    New,
    /// Pinned with another key.
    Changed {
        /// The pinned key.
        pinned: AgentKey,
    },
    /// Retired.
    Retired,
}

/// The agent book.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Book {
    members: BTreeMap<[u8; 16], Member>,
}

/// Now, in Unix nanoseconds.
pub fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

impl Book {
    /// Every member, retired ones included, by id.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    /// The member with this id.
    pub fn get(&self, id: &[u8; 16]) -> Option<&Member> {
        self.members.get(id)
    }

    /// Members in service (not retired).
    pub fn active(&self) -> impl Iterator<Item = &Member> {
        self.members.values().filter(|m| !m.retired)
    }

    /// What the book says of agent `id` showing `key`.
    pub fn check(&self, id: &[u8; 16], key: &AgentKey) -> Verdict {
        match self.members.get(id) {
            None => Verdict::New,
            Some(m) if m.retired => Verdict::Retired,
            Some(m) if m.key == *key => Verdict::Known,
            Some(m) => Verdict::Changed { pinned: m.key },
        }
    }

    /// Pins (or re-pins) `id` to `key` at `addr`; `deliberate` for a user's decision. Returns
    /// whether the book changed.
    pub fn pin(&mut self, id: [u8; 16], key: AgentKey, addr: &str, deliberate: bool) -> bool {
        let now = now_nanos();
        match self.members.get_mut(&id) {
            Some(m) if m.key == key && !m.retired && (m.deliberate || !deliberate) => {
                if m.addr == addr {
                    return false;
                }
                m.addr = addr.to_string();
                m.updated = now;
            }
            _ => {
                self.members.insert(
                    id,
                    Member {
                        id,
                        key,
                        addr: addr.to_string(),
                        pinned: now,
                        updated: now,
                        deliberate,
                        retired: false,
                        wake: self.members.get(&id).and_then(|m| m.wake),
                    },
                );
            }
        }
        true
    }

    /// Records how to wake member `id` (from its `STAT` answer). Returns whether the book
    /// changed: not when `id` is not a member, nor when the MAC and broadcast are the ones known.
    pub fn set_wake(&mut self, id: &[u8; 16], mac: [u8; 6], broadcast: Option<Ipv4Addr>) -> bool {
        let Some(m) = self.members.get_mut(id) else {
            return false;
        };
        if m.wake
            .is_some_and(|w| w.mac == mac && w.broadcast == broadcast)
        {
            return false;
        }
        let now = now_nanos();
        m.wake = Some(WakeAddr {
            mac,
            broadcast,
            seen: now,
        });
        m.updated = now;
        true
    }

    /// Marks `id` retired (a deliberate decision). Returns false when it is not in the book.
    pub fn retire(&mut self, id: &[u8; 16]) -> bool {
        let Some(m) = self.members.get_mut(id) else {
            return false;
        };
        m.retired = true;
        m.deliberate = true;
        m.updated = now_nanos();
        true
    }

    /// Merges another copy into this one (see the module docs). Returns whether this changed.
    pub fn merge(&mut self, other: &Book) -> bool {
        let mut changed = false;
        for theirs in other.members.values() {
            let winner = match self.members.get(&theirs.id) {
                None => theirs.clone(),
                Some(ours) => merge_entry(ours, theirs),
            };
            if self.members.get(&theirs.id) != Some(&winner) {
                self.members.insert(theirs.id, winner);
                changed = true;
            }
        }
        changed
    }

    /// Sealed blob contents.
    pub fn seal(&self, keys: &Keys) -> Result<Vec<u8>> {
        let mut w = Writer::default();
        w.u16(BOOK_VERSION).u32(self.members.len() as u32);
        for m in self.members.values() {
            let flags = if m.deliberate { DELIBERATE } else { 0 }
                | if m.retired { RETIRED } else { 0 }
                | if m.wake.is_some() { HAS_MAC } else { 0 }
                | if m.wake.and_then(|w| w.broadcast).is_some() {
                    HAS_BROADCAST
                } else {
                    0
                };
            w.bytes(&m.id)
                .bytes(&m.key.0)
                .str(&m.addr)
                .u64(m.pinned)
                .u64(m.updated)
                .u8(flags)
                .bytes(&m.wake.map(|w| w.mac).unwrap_or_default())
                .bytes(
                    &m.wake
                        .and_then(|w| w.broadcast)
                        .unwrap_or(Ipv4Addr::UNSPECIFIED)
                        .octets(),
                )
                .u64(m.wake.map_or(0, |w| w.seen));
        }
        seal_record(keys, BOOK_BLOB, &w.buf)
    }

    /// Opens a sealed copy.
    pub fn open(keys: &Keys, sealed: &[u8]) -> Result<Self> {
        let body = open_record(keys, BOOK_BLOB, sealed)?;
        let mut r = Reader::new(&body, "agent book");
        let version = r.version(1..=BOOK_VERSION)?;
        let n = r.u32()? as usize;
        if n > MAX_MEMBERS {
            return Err(Error::malformed("agent book", format!("{n} entries")));
        }
        let mut members = BTreeMap::new();
        for _ in 0..n {
            let id: [u8; 16] = r.array()?;
            let key = AgentKey(r.array()?);
            let addr = r.str()?;
            let (pinned, updated, flags) = (r.u64()?, r.u64()?, r.u8()?);
            let known = if version == 1 {
                DELIBERATE | RETIRED
            } else {
                DELIBERATE | RETIRED | HAS_MAC | HAS_BROADCAST
            };
            if flags & !known != 0 {
                return Err(Error::malformed(
                    "agent book",
                    format!("unknown flags {flags:#x}"),
                ));
            }
            let wake = if version == 1 {
                None
            } else {
                let mac: [u8; 6] = r.array()?;
                let broadcast = Ipv4Addr::from(r.array::<4>()?);
                let seen = r.u64()?;
                (flags & HAS_MAC != 0).then_some(WakeAddr {
                    mac,
                    broadcast: (flags & HAS_BROADCAST != 0).then_some(broadcast),
                    seen,
                })
            };
            let m = Member {
                id,
                key,
                addr,
                pinned,
                updated,
                deliberate: flags & DELIBERATE != 0,
                retired: flags & RETIRED != 0,
                wake,
            };
            members.insert(id, m);
        }
        r.finish()?;
        Ok(Book { members })
    }
}

fn merge_entry(a: &Member, b: &Member) -> Member {
    if a.key == b.key {
        let (newer, older) = if b.updated > a.updated {
            (b, a)
        } else {
            (a, b)
        };
        let wake = match (newer.wake, older.wake) {
            (Some(n), Some(o)) if o.seen > n.seen => Some(o),
            (n, o) => n.or(o),
        };
        return Member {
            pinned: newer.pinned.min(older.pinned),
            wake,
            ..newer.clone()
        };
    }
    match (a.deliberate, b.deliberate) {
        (true, false) => a.clone(),
        (false, true) => b.clone(),
        (true, true) if b.pinned > a.pinned => b.clone(),
        (true, true) => a.clone(),
        (false, false) if b.pinned < a.pinned => b.clone(),
        (false, false) => a.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::MasterKey;

    fn k(b: u8) -> AgentKey {
        AgentKey([b; 32])
    }

    fn entry(key: u8, pinned: u64, updated: u64, deliberate: bool) -> Member {
        Member {
            id: [1; 16],
            key: k(key),
            addr: format!("h{updated}:1"),
            pinned,
            updated,
            deliberate,
            retired: false,
            wake: None,
        }
    }

    fn book(m: Member) -> Book {
        let mut b = Book::default();
        b.members.insert(m.id, m);
        b
    }

    #[test]
    fn first_contact_then_refuse_a_change() {
        let mut b = Book::default();
        assert_eq!(b.check(&[1; 16], &k(1)), Verdict::New);
        assert!(b.pin([1; 16], k(1), "a:1", false));
        assert_eq!(b.check(&[1; 16], &k(1)), Verdict::Known);
        assert_eq!(b.check(&[1; 16], &k(2)), Verdict::Changed { pinned: k(1) });
        assert!(!b.pin([1; 16], k(1), "a:1", false), "nothing new");
        assert!(b.pin([1; 16], k(1), "b:1", false), "moved");
        assert_eq!(b.get(&[1; 16]).unwrap().addr, "b:1");
        assert!(b.retire(&[1; 16]));
        assert_eq!(b.check(&[1; 16], &k(1)), Verdict::Retired);
    }

    #[test]
    fn merge_rules() {
        // Automatic pins: the first contact wins, whichever copy is merged into which.
        let first = entry(1, 10, 10, false);
        let later = entry(2, 20, 20, false);
        for (x, y) in [(&first, &later), (&later, &first)] {
            let mut b = book(x.clone());
            b.merge(&book(y.clone()));
            assert_eq!(b.get(&[1; 16]).unwrap().key, k(1));
        }
        // A deliberate pin beats an automatic one, older or newer.
        let accepted = entry(2, 5, 5, true);
        for (x, y) in [(&first, &accepted), (&accepted, &first)] {
            let mut b = book(x.clone());
            b.merge(&book(y.clone()));
            assert_eq!(b.get(&[1; 16]).unwrap().key, k(2));
        }
        // Two deliberate pins: the later decision wins.
        let again = entry(3, 30, 30, true);
        let mut b = book(accepted.clone());
        assert!(b.merge(&book(again.clone())));
        assert_eq!(b.get(&[1; 16]).unwrap().key, k(3));
        // Same key: the latest update wins, first pin time kept.
        let moved = entry(1, 15, 40, false);
        let mut b = book(first.clone());
        assert!(b.merge(&book(moved)));
        let m = b.get(&[1; 16]).unwrap();
        assert_eq!((m.pinned, m.addr.as_str()), (10, "h40:1"));
        assert!(
            !b.clone().merge(&b),
            "merging a copy into itself changes nothing"
        );
    }

    #[test]
    fn seal_round_trip_and_tamper() {
        let keys = MasterKey::generate().unwrap().derive();
        let mut b = Book::default();
        b.pin([1; 16], k(1), "a:1", false);
        b.pin([2; 16], k(2), "b:2", true);
        b.retire(&[2; 16]);
        let sealed = b.seal(&keys).unwrap();
        assert_eq!(Book::open(&keys, &sealed).unwrap(), b);
        let other = MasterKey::generate().unwrap().derive();
        assert!(Book::open(&other, &sealed).is_err());
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(Book::open(&keys, &bad).is_err());
    }

    #[test]
    fn wake_addresses_are_kept_merged_and_sealed() {
        let keys = MasterKey::generate().unwrap().derive();
        let mut b = Book::default();
        let mac = [2, 0, 0, 0, 0, 7];
        let bc = Some(Ipv4Addr::new(10, 0, 0, 255));
        assert!(!b.set_wake(&[1; 16], mac, bc), "not a member");
        b.pin([1; 16], k(1), "a:1", false);
        assert!(b.set_wake(&[1; 16], mac, bc));
        assert!(!b.set_wake(&[1; 16], mac, bc), "nothing new");
        let w = b.get(&[1; 16]).unwrap().wake.unwrap();
        assert_eq!((w.mac, w.broadcast), (mac, bc));
        // A re-pin at a new address keeps what is known for waking.
        assert!(b.pin([1; 16], k(1), "b:1", false));
        assert_eq!(b.get(&[1; 16]).unwrap().wake, Some(w));
        let sealed = b.seal(&keys).unwrap();
        assert_eq!(Book::open(&keys, &sealed).unwrap(), b);
        // A copy without wake information (an older writer) does not erase it on merge.
        let mut older = b.clone();
        older.members.get_mut(&[1; 16]).unwrap().wake = None;
        older.members.get_mut(&[1; 16]).unwrap().updated += 1;
        let mut merged = b.clone();
        merged.merge(&older);
        assert_eq!(merged.get(&[1; 16]).unwrap().wake, Some(w));
        // No broadcast known: still a MAC.
        let mut nb = Book::default();
        nb.pin([3; 16], k(3), "c:1", false);
        nb.set_wake(&[3; 16], mac, None);
        let back = Book::open(&keys, &nb.seal(&keys).unwrap()).unwrap();
        assert_eq!(back.get(&[3; 16]).unwrap().wake.unwrap().broadcast, None);
    }

    #[test]
    fn a_version_1_book_is_still_read() {
        let keys = MasterKey::generate().unwrap().derive();
        let mut w = Writer::default();
        w.u16(1).u32(1);
        w.bytes(&[5; 16])
            .bytes(&[6; 32])
            .str("pc5:7710")
            .u64(10)
            .u64(20)
            .u8(DELIBERATE);
        let sealed = seal_record(&keys, BOOK_BLOB, &w.buf).unwrap();
        let b = Book::open(&keys, &sealed).unwrap();
        let m = b.get(&[5; 16]).unwrap();
        assert_eq!(
            (m.addr.as_str(), m.deliberate, m.wake),
            ("pc5:7710", true, None)
        );
        // Unknown flags are refused, in either version.
        let mut bad = Writer::default();
        bad.u16(1).u32(1);
        bad.bytes(&[5; 16])
            .bytes(&[6; 32])
            .str("pc5:7710")
            .u64(10)
            .u64(20)
            .u8(HAS_MAC);
        let sealed = seal_record(&keys, BOOK_BLOB, &bad.buf).unwrap();
        assert!(Book::open(&keys, &sealed).is_err());
    }
}

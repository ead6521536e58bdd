//! How much an agent may store: a quota, and a floor of free space it never takes from the PC.
//!
//! An agent lives on somebody's desk PC: whatever its quota, it must not fill the user's disk.
//! [`MinFree`] is the free space it leaves on its filesystem (a share of the filesystem's size,
//! e.g. `10%`, or a size); a store refuses a shard ([`Error::Full`]) that would take the free
//! space below that floor, counting the writes in flight, and reports only the free space above
//! the floor ([`crate::wire::StoreStat::fs_free`]), so servers place less on it. The floor is
//! checked against the filesystem's free space at each write (the user's own files come and
//! go), with `statvfs` / `GetDiskFreeSpaceEx` through `fs4`.

use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::size::{format_size, parse_size};

/// Free space an agent leaves on its filesystem.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFree {
    /// A percentage (0 to below 100) of the filesystem's total size.
    Percent(f64),
    /// A number of bytes (0: no floor).
    Bytes(u64),
}

impl MinFree {
    /// The agent's default: 10% of its filesystem stays free.
    pub const DEFAULT: MinFree = MinFree::Percent(10.0);

    /// Parses `10%`, `2.5%`, `20G`, `0`.
    pub fn parse(text: &str) -> Result<MinFree> {
        let t = text.trim();
        match t.strip_suffix('%') {
            Some(p) => {
                let v: f64 = p.trim().parse().map_err(|_| {
                    Error::Invalid(format!(
                        "'{text}' is not a percentage (try 10% or a size such as 20G)"
                    ))
                })?;
                if !(0.0..100.0).contains(&v) {
                    return Err(Error::Invalid(format!(
                        "min-free '{text}' must be at least 0% and below 100%"
                    )));
                }
                Ok(MinFree::Percent(v))
            }
            None => parse_size(t).map(MinFree::Bytes),
        }
    }

    /// The floor in bytes on a filesystem of `total` bytes.
    pub fn bytes_of(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            MinFree::Percent(p) => (total as f64 * p / 100.0).ceil() as u64,
        }
    }

    /// The floor in bytes for the filesystem holding `dir`.
    pub fn resolve(self, dir: &Path) -> Result<u64> {
        match self {
            MinFree::Bytes(b) => Ok(b),
            MinFree::Percent(0.0) => Ok(0),
            MinFree::Percent(_) => {
                let total = fs4::total_space(dir).map_err(|e| {
                    Error::io(
                        format!(
                            "cannot read the size of the filesystem holding {} (for a free-space \
                             floor of {self}; give the floor as a size instead, e.g. 20G)",
                            dir.display()
                        ),
                        e,
                    )
                })?;
                Ok(self.bytes_of(total))
            }
        }
    }
}

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinFree::Percent(p) => write!(f, "{p}%"),
            MinFree::Bytes(b) => f.write_str(&format_size(*b)),
        }
    }
}

/// What a directory store may hold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most bytes stored (shards and blobs), 0 for no quota.
    pub quota: u64,
    /// Free space left on the filesystem whatever the quota.
    pub min_free: MinFree,
}

impl Limits {
    /// A quota and no floor (a store on a disk of its own, tests).
    pub fn quota_only(quota: u64) -> Limits {
        Limits {
            quota,
            min_free: MinFree::Bytes(0),
        }
    }
}

/// The floor of one store: its bytes, and the bytes being written now.
pub(super) struct Floor {
    /// Free bytes to leave (0: none).
    pub bytes: u64,
    /// What was asked for, for messages.
    pub asked: MinFree,
    in_flight: AtomicU64,
    /// Reads the free space of a filesystem (`fs4::available_space`; a fixed figure in tests).
    free: fn(&Path) -> std::io::Result<u64>,
}

/// Bytes counted as being written until dropped.
pub(super) struct InFlight<'a> {
    floor: &'a Floor,
    len: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.floor.in_flight.fetch_sub(self.len, Ordering::SeqCst);
    }
}

impl Floor {
    pub fn new(bytes: u64, asked: MinFree) -> Floor {
        Floor {
            bytes,
            asked,
            in_flight: AtomicU64::new(0),
            free: |p| fs4::available_space(p),
        }
    }

    /// Counts `len` bytes about to be written under `root`, or refuses them when the
    /// filesystem's free space, less what is being written, would drop below the floor.
    /// When the free space cannot be read the write goes ahead (a full disk still fails it).
    pub fn admit(&self, root: &Path, len: u64) -> Result<InFlight<'_>> {
        self.in_flight.fetch_add(len, Ordering::SeqCst);
        let ticket = InFlight { floor: self, len };
        if self.bytes == 0 || len == 0 {
            return Ok(ticket);
        }
        let Ok(free) = (self.free)(root) else {
            return Ok(ticket);
        };
        let busy = self.in_flight.load(Ordering::SeqCst);
        if free < self.bytes.saturating_add(busy) {
            return Err(Error::Full(format!(
                "the disk holding {} is down to {} free and this agent leaves {} ({}) free for \
                 the PC's user: free space on that disk, lower the agent's --min-free, or add agents",
                root.display(),
                format_size(free),
                format_size(self.bytes),
                self.asked
            )));
        }
        Ok(ticket)
    }

    /// Free bytes above the floor on the filesystem holding `root`, `None` when unknown.
    pub fn room(&self, root: &Path) -> Option<u64> {
        let free = (self.free)(root).ok()?;
        Some(free.saturating_sub(self.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_shares_and_sizes() {
        assert_eq!(MinFree::parse("10%").unwrap(), MinFree::Percent(10.0));
        assert_eq!(MinFree::parse(" 2.5 %").unwrap(), MinFree::Percent(2.5));
        assert_eq!(MinFree::parse("20G").unwrap(), MinFree::Bytes(20 << 30));
        assert_eq!(MinFree::parse("0").unwrap(), MinFree::Bytes(0));
        for bad in ["100%", "-1%", "x%", "lots"] {
            assert!(MinFree::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(MinFree::Percent(10.0).bytes_of(1000), 100);
        assert_eq!(MinFree::Bytes(7).bytes_of(1000), 7);
        assert_eq!(MinFree::DEFAULT.to_string(), "10%");
    }

    #[test]
    fn floor_counts_writes_in_flight() {
        let dir = Path::new("/agent");
        // 10 MiB free, a floor of 7 MiB: 3 MiB may be written, counting writes in flight.
        let mut floor = Floor::new(7 << 20, MinFree::Percent(10.0));
        floor.free = |_| Ok(10 << 20);
        assert_eq!(floor.room(dir), Some(3 << 20));
        let a = floor.admit(dir, 2 << 20).unwrap();
        let e = floor.admit(dir, 2 << 20).err().expect("over the floor");
        assert!(matches!(e, Error::Full(_)), "{e}");
        assert!(
            e.to_string().contains("(10%) free for the PC's user"),
            "{e}"
        );
        let b = floor.admit(dir, 1 << 20).unwrap();
        drop((a, b));
        assert_eq!(floor.in_flight.load(Ordering::SeqCst), 0);
        assert!(floor.admit(dir, 3 << 20).is_ok());
        // Free space that cannot be read does not block writes; room is then unknown.
        floor.free = |_| Err(std::io::Error::other("no statvfs"));
        assert!(floor.admit(dir, 1 << 30).is_ok());
        assert_eq!(floor.room(dir), None);
        // No floor: anything goes.
        let none = Floor::new(0, MinFree::Bytes(0));
        assert!(none.admit(dir, u64::MAX / 2).is_ok());
    }
}

//! Per-slot deadlines shared by every clone of a reader: "until when is this agent cooling
//! down", "until when do ranged reads skip it".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One deadline per agent-table slot, in milliseconds since the set was made (0: none).
#[derive(Clone)]
pub(super) struct Until {
    epoch: Instant,
    slots: Arc<Vec<AtomicU64>>,
}

impl Until {
    /// No deadline for any of `slots` slots.
    pub(super) fn new(slots: usize) -> Self {
        Until {
            epoch: Instant::now(),
            slots: Arc::new((0..slots).map(|_| AtomicU64::new(0)).collect()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Sets `slot`'s deadline to `d` from now, unless it already runs later.
    pub(super) fn hold(&self, slot: usize, d: Duration) {
        if let Some(t) = self.slots.get(slot) {
            t.fetch_max(self.now_ms() + d.as_millis() as u64, Ordering::Relaxed);
        }
    }

    /// Whether `slot`'s deadline has not passed yet (false for a slot out of range).
    pub(super) fn holds(&self, slot: usize) -> bool {
        self.slots
            .get(slot)
            .is_some_and(|t| t.load(Ordering::Relaxed) > self.now_ms())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deadline_holds_until_it_passes_and_never_shortens() {
        let u = Until::new(2);
        assert!(!u.holds(0) && !u.holds(1) && !u.holds(7));
        u.hold(0, Duration::from_secs(3600));
        u.hold(0, Duration::ZERO);
        assert!(u.holds(0), "a shorter hold does not end a longer one");
        assert!(!u.holds(1));
        u.hold(1, Duration::ZERO);
        assert!(!u.holds(1), "a deadline of now has passed");
        u.hold(9, Duration::from_secs(1));
        assert!(!u.holds(9), "out of range: nothing held");
    }
}

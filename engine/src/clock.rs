//! Time as the engine sees it, handed in by the caller: the system clock in production, a clock
//! a test sets by hand (the repair watcher's `--repair-after`, lease ages, "last seen").

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock time in Unix milliseconds.
pub trait Clock: Send + Sync {
    /// Now, Unix milliseconds.
    fn now_ms(&self) -> u64;
    /// Now, Unix seconds.
    fn now_secs(&self) -> u64 {
        self.now_ms() / 1000
    }
    /// Now, Unix seconds and nanoseconds (creation times of snapshots).
    fn now_precise(&self) -> (u64, u32) {
        let ms = self.now_ms();
        (ms / 1000, (ms % 1000) as u32 * 1_000_000)
    }
}

/// The system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
    fn now_precise(&self) -> (u64, u32) {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| (d.as_secs(), d.subsec_nanos()))
            .unwrap_or((0, 0))
    }
}

/// A clock that moves only when told (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock at `ms` Unix milliseconds.
    pub fn at(ms: u64) -> Arc<Self> {
        Arc::new(ManualClock(AtomicU64::new(ms)))
    }
    /// Moves it forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

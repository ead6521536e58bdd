//! Waiting for conditions, with deadlines.

use std::time::{Duration, Instant};

/// How often [`until`] looks again.
const POLL: Duration = Duration::from_millis(10);

/// Polls `cond` until it returns `Some`, and returns that; panics naming `what` after `timeout`.
pub fn until<T>(timeout: Duration, what: &str, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `cond` until it is true; panics naming `what` after `timeout`.
pub fn until_true(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    until(timeout, what, || cond().then_some(()))
}

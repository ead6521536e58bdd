//! `--max-rate`: a token bucket over the agent's shard traffic, so a backup never fills a desk
//! PC's network link.
//!
//! The bucket fills at `rate` bytes per second up to a burst of a tenth of a second's worth.
//! A transfer takes its bytes at once, possibly into debt, and then waits until the debt is
//! paid: a frame larger than the burst (a 1 MiB shard at 2 MiB/s) still passes, and every
//! transfer waits its turn, in the order it asked. Requests are throttled after they are read
//! (so the next one is not read until then, and TCP holds the sender back) and data replies
//! before they are sent.

use std::time::Duration;

use tokio::sync::Mutex;
use tokio::time::Instant;

/// A shared token bucket; `None` rate means unlimited.
#[derive(Debug)]
pub struct RateLimit {
    rate: u64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A bucket of `rate` bytes per second (at least 1).
    pub fn new(rate: u64) -> RateLimit {
        let rate = rate.max(1);
        let burst = rate as f64 / 10.0;
        RateLimit {
            rate,
            burst,
            state: Mutex::new(State {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Bytes per second.
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `bytes` from the bucket, waiting until they are paid for.
    pub async fn take(&self, bytes: u64) {
        let wait = {
            let mut s = self.state.lock().await;
            let now = Instant::now();
            let earned = now.duration_since(s.last).as_secs_f64() * self.rate as f64;
            s.tokens = (s.tokens + earned).min(self.burst) - bytes as f64;
            s.last = now;
            if s.tokens >= 0.0 {
                return;
            }
            Duration::from_secs_f64(-s.tokens / self.rate as f64)
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_the_rate_over_many_transfers() {
        let r = RateLimit::new(1 << 20);
        let start = Instant::now();
        // 20 MiB in 1 MiB transfers at 1 MiB/s: 20 s less the initial burst (0.1 s).
        for _ in 0..20 {
            r.take(1 << 20).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!((19.8..20.0).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_takers_share_the_rate() {
        let r = std::sync::Arc::new(RateLimit::new(1 << 20));
        let start = Instant::now();
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let r = r.clone();
                tokio::spawn(async move {
                    for _ in 0..4 {
                        r.take(512 << 10).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // 8 MiB at 1 MiB/s, less the burst.
        let took = start.elapsed().as_secs_f64();
        assert!((7.8..8.0).contains(&took), "{took}");
    }

    #[tokio::test(start_paused = true)]
    async fn small_transfers_within_the_burst_do_not_wait_and_idle_time_refills() {
        let r = RateLimit::new(10 << 20);
        let start = Instant::now();
        r.take(512 << 10).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        tokio::time::sleep(Duration::from_secs(5)).await;
        // Idle time refills only up to the burst (1 MiB here): 3 MiB more waits 0.2 s.
        let t = Instant::now();
        r.take(3 << 20).await;
        let took = t.elapsed().as_secs_f64();
        assert!((0.19..0.21).contains(&took), "{took}");
    }
}

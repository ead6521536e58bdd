//! The agent's scrub: every shard file's crc32c values checked in the background, at a bounded
//! rate, with no key (see [`sa_core::shard::check_shard`]).
//!
//! * A background pass starts [`FIRST_PASS_DELAY`] after the agent starts and then every
//!   [`PASS_INTERVAL`] after the previous one ended, reading at most `rate` bytes per second
//!   (`--scrub-rate`, default [`DEFAULT_RATE`]; `0` turns the background scrub off).
//! * A `SCRUB` request with `start` asks for a full pass now; it runs at the same rate, or
//!   unthrottled when the background scrub is off (an operator asked for it and waits).
//! * A bad file is moved to `DIR/quarantine/` ([`DirStore::quarantine_blocking`], which checks it
//!   again under the lock that excludes stores), never deleted: the shard is then simply missing,
//!   which `sa-image status` sees and `sa-image repair` rebuilds. What each file was found to be
//!   is remembered for the `SCRUB` answer; the quarantine directory itself is the lasting record.
//!
//! Portable std + tokio only: file reads run on tokio's blocking pool, throttling is a sleep.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sa_core::keys::unhex;
use sa_core::shard::ShardKey;
use sa_core::store::{Checked, DirStore, ScrubFinding, ScrubStatus};
use sa_core::wire::MAX_SCRUB_FINDINGS;
use sa_core::{Error, Result};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Default background rate, bytes per second (20 MiB/s: a 500 GB share in about 7 hours).
pub const DEFAULT_RATE: u64 = 20 << 20;
/// Time between the end of one background pass and the start of the next.
pub const PASS_INTERVAL: Duration = Duration::from_secs(24 * 3600);
/// Time between the agent's start and its first background pass.
pub const FIRST_PASS_DELAY: Duration = Duration::from_secs(60);

/// The scrub of one agent's store; cheap to clone.
#[derive(Clone)]
pub struct Scrubber {
    inner: Arc<Inner>,
}

struct Inner {
    store: DirStore,
    rate: u64,
    wake: Notify,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A pass was asked for and has not started yet (it is already counted as started).
    pending: bool,
    running: bool,
    passes_started: u64,
    passes_done: u64,
    last_done: u64,
    checked: u64,
    bytes: u64,
    /// Why each quarantined shard was found bad (this run of the agent).
    reasons: HashMap<ShardKey, String>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::io("scrub task", std::io::Error::other(e.to_string())))?
}

impl Scrubber {
    /// A scrub of `store` at `rate` bytes per second (0: no background passes).
    pub fn new(store: DirStore, rate: u64) -> Self {
        Scrubber {
            inner: Arc::new(Inner {
                store,
                rate,
                wake: Notify::new(),
                state: Mutex::new(State::default()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs passes forever: in the background on schedule, and whenever one is asked for.
    pub async fn run(self) {
        let background = self.inner.rate > 0;
        let mut next_due = background.then(|| Instant::now() + FIRST_PASS_DELAY);
        loop {
            let pending = self.state().pending;
            if !pending {
                match next_due {
                    Some(t) => tokio::select! {
                        () = tokio::time::sleep_until(t) => {}
                        () = self.inner.wake.notified() => {}
                    },
                    None => self.inner.wake.notified().await,
                }
            }
            self.pass().await;
            next_due = background.then(|| Instant::now() + PASS_INTERVAL);
        }
    }

    /// Asks for a pass now (unless one is already asked for) when `start`, and reports.
    pub async fn request(&self, start: bool) -> Result<ScrubStatus> {
        if start {
            let mut st = self.state();
            if !st.pending {
                st.pending = true;
                st.passes_started += 1;
                self.inner.wake.notify_one();
            }
        }
        let store = self.inner.store.clone();
        let quarantined = blocking(move || store.quarantined_blocking()).await?;
        let st = self.state();
        Ok(ScrubStatus {
            rate: self.inner.rate,
            running: st.running || st.pending,
            passes_started: st.passes_started,
            passes_done: st.passes_done,
            last_done: st.last_done,
            checked: st.checked,
            bytes: st.bytes,
            bad_total: quarantined.len() as u64,
            bad: quarantined
                .into_iter()
                .take(MAX_SCRUB_FINDINGS)
                .map(|(key, restored)| ScrubFinding {
                    reason: st
                        .reasons
                        .get(&key)
                        .cloned()
                        .unwrap_or_else(|| "quarantined before the agent last started".into()),
                    key,
                    restored,
                })
                .collect(),
        })
    }

    /// One full pass over every shard file.
    async fn pass(&self) {
        {
            let mut st = self.state();
            if st.pending {
                st.pending = false;
            } else {
                st.passes_started += 1;
            }
            st.running = true;
            st.checked = 0;
            st.bytes = 0;
        }
        let started = Instant::now();
        let result = self.walk(started).await;
        let mut st = self.state();
        st.running = false;
        st.passes_done += 1;
        st.last_done = unix_now();
        let (checked, bytes) = (st.checked, st.bytes);
        drop(st);
        match result {
            Ok(bad) => tracing::info!(
                checked,
                bytes,
                bad,
                seconds = started.elapsed().as_secs_f64(),
                "scrub pass done"
            ),
            Err(e) => tracing::warn!("scrub pass stopped early: {e}"),
        }
    }

    async fn walk(&self, started: Instant) -> Result<u64> {
        let store = self.inner.store.clone();
        let volumes = blocking(move || store.list_volumes_blocking()).await?;
        let mut bad = 0;
        let mut read = 0u64;
        for vol in volumes {
            let Some(v) = unhex(&vol).filter(|v| v.len() == 16) else {
                continue;
            };
            let mut volume = [0u8; 16];
            volume.copy_from_slice(&v);
            for bucket in 0..=255u8 {
                let store = self.inner.store.clone();
                let entries = blocking(move || store.list_shards_blocking(&volume, bucket)).await?;
                for e in entries {
                    let key = ShardKey {
                        volume,
                        stripe: e.stripe,
                        index: e.index,
                    };
                    let store = self.inner.store.clone();
                    let verdict = blocking(move || {
                        let v = store.check_stored_blocking(&key)?;
                        let moved = match &v {
                            Checked::Bad(_) => store.quarantine_blocking(&key)?,
                            _ => false,
                        };
                        Ok((v, moved))
                    })
                    .await?;
                    let len = match verdict {
                        (Checked::Sound(len), _) => len,
                        (Checked::Missing, _) => 0,
                        (Checked::Bad(reason), moved) => {
                            if moved {
                                bad += 1;
                                tracing::warn!(
                                    shard = %key.short(),
                                    "scrub: bad shard file moved to quarantine: {reason}"
                                );
                                self.state().reasons.insert(key, reason);
                            }
                            0
                        }
                    };
                    read += len;
                    {
                        let mut st = self.state();
                        st.checked += 1;
                        st.bytes += len;
                    }
                    // Throttle: never ahead of `rate` bytes per second since the pass began.
                    if self.inner.rate > 0 {
                        let due =
                            started + Duration::from_secs_f64(read as f64 / self.inner.rate as f64);
                        tokio::time::sleep_until(due).await;
                    }
                }
            }
        }
        Ok(bad)
    }
}

//! The snapshot side of an export: bytes at any offset, assembled from stripes.
//!
//! A read is cut at stripe boundaries. Zero stripes are filled in place, never fetched. Other
//! stripes come from the [`StripeCache`], which fetches each missing one once (through the
//! [`StripeReader`], at most [`FETCH_PARALLEL`] at a time) however many requests want it. A read
//! spanning several stripes starts all their fetches before waiting for the first. When a read
//! continues where an earlier one stopped (the stripe before it, or the same one, was read
//! recently), the next [`READ_AHEAD`] stripes are fetched in the background, at most
//! [`READ_AHEAD_PARALLEL`] such fetches at a time.
//!
//! **Small random reads** of a snapshot sealed in chunks (seal format 2): a read of at most
//! [`RANGED_MAX`] bytes that does not continue an earlier one, of a stripe neither cached nor on
//! its way, fetches only the sealed chunks that hold its bytes ([`StripeReader::read_range`]) and
//! caches nothing; when that fails (an agent down, slow or old; a missing or corrupt shard) the
//! whole stripe is read as before. A database's 4 KiB read then costs 4,112 bytes from one agent,
//! not 4 MiB from `k`. Sequential reads (and hydration) keep reading whole stripes and reading
//! ahead.
//!
//! A read counts as sequential when it starts exactly where one of the last [`RECENT`] reads
//! ended.
//!
//! A stripe that cannot be rebuilt (more than `m` shards gone) fails the read with EIO and is
//! logged once, naming the stripe, its byte range and every shard problem.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nbd_server::{Extent, SourceError};
use sa_core::layout::Layout;
use sa_core::manifest::{Manifest, StripeRef};
use tokio::sync::Semaphore;

use super::cache::{Origin, Stripe, StripeCache};
use super::stats::{add, bump, Stats};
use crate::read::{Problem, StripeData, StripeLost, StripeReader};
use sa_core::pool::BufferPool;

/// Stripes fetched from the agents at once (across all requests and read-ahead).
pub const FETCH_PARALLEL: usize = 16;
/// Stripes read ahead of a sequential reader.
pub const READ_AHEAD: u64 = 2;
/// Read-ahead fetches in flight at once.
pub const READ_AHEAD_PARALLEL: usize = 4;
/// Reconstructed stripes logged at warn level before the rest go to info.
const WARN_RECONSTRUCTED: u64 = 10;
/// Most extents one block-status answer lists.
pub const MAX_EXTENTS: usize = 1024;
/// Read ends remembered for detecting sequential reads.
const RECENT: usize = 32;
/// Largest read served through ranged reads (see the module docs).
pub const RANGED_MAX: usize = 256 * 1024;

/// A snapshot, readable at any byte offset.
pub struct Snapshot {
    manifest: Arc<Manifest>,
    layout: Layout,
    reader: StripeReader,
    cache: StripeCache,
    stats: Arc<Stats>,
    names: Vec<String>,
    fetches: Semaphore,
    readahead: Arc<Semaphore>,
    recent: Mutex<VecDeque<u64>>,
    /// (slot, problem) pairs already logged at warn level.
    warned: Mutex<HashSet<(usize, Problem)>>,
    /// Lost stripes already logged.
    lost: Mutex<HashSet<u64>>,
    warned_reconstructed: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Snapshot {
    /// A snapshot read through `reader`, caching up to `cache_bytes` of decoded stripes; `names`
    /// names the agent-table slots in logs and stats.
    pub fn new(
        manifest: Arc<Manifest>,
        reader: StripeReader,
        cache_bytes: usize,
        names: Vec<String>,
        stats: Arc<Stats>,
    ) -> Self {
        // Evicted stripes' buffers are reused for the next fetches (see sa_core::pool).
        let pool = Arc::new(BufferPool::new(FETCH_PARALLEL + READ_AHEAD_PARALLEL));
        Snapshot {
            layout: manifest.layout,
            manifest,
            reader: reader.with_pool(pool.clone()),
            cache: StripeCache::new(cache_bytes).with_pool(pool),
            stats,
            names,
            fetches: Semaphore::new(FETCH_PARALLEL),
            readahead: Arc::new(Semaphore::new(READ_AHEAD_PARALLEL)),
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            warned: Mutex::new(HashSet::new()),
            lost: Mutex::new(HashSet::new()),
            warned_reconstructed: AtomicU64::new(0),
        }
    }

    /// The volume size in bytes.
    pub fn size(&self) -> u64 {
        self.layout.volume_size
    }

    /// Whether stripe `i` is all zero (stored as no shards at all).
    pub fn is_zero(&self, i: u64) -> bool {
        matches!(self.manifest.stripes.get(i as usize), Some(StripeRef::Zero))
    }

    fn agent(&self, slot: usize) -> &str {
        self.names.get(slot).map_or("?", String::as_str)
    }

    /// Stripe `i` (not a zero stripe), from the cache or the agents.
    pub async fn stripe(&self, i: u64) -> Result<Stripe, SourceError> {
        let result = self
            .cache
            .get_or_fetch(i, || async move {
                let _permit = self.fetches.acquire().await;
                let r = self.reader.read(i).await;
                self.note(i, &r);
                r.map(|d| d.data).map_err(|lost| self.lost_error(&lost))
            })
            .await;
        match result {
            Ok((data, origin)) => {
                if origin != Origin::Fetched {
                    bump(&self.stats.stripes_from_cache);
                }
                Ok(data)
            }
            Err(e) => Err(e),
        }
    }

    /// Stripe `i` (not a zero stripe) for a copy that passes through, such as hydration: from
    /// the cache when it is there, else fetched from the agents without being cached, so a copy
    /// of the whole disk does not evict the stripes the guest reads. (A guest read of the same
    /// stripe at the same moment fetches it again: rare, and only costs a fetch.)
    pub async fn stripe_passing(&self, i: u64) -> Result<Stripe, SourceError> {
        if let Some(s) = self.cache.peek(i) {
            bump(&self.stats.stripes_from_cache);
            return Ok(s);
        }
        let _permit = self.fetches.acquire().await;
        let r = self.reader.read(i).await;
        self.note(i, &r);
        r.map(|d| Arc::new(d.data))
            .map_err(|lost| self.lost_error(&lost))
    }

    /// Stats and logs for one fetch.
    fn note(&self, i: u64, r: &Result<StripeData, StripeLost>) {
        let problems = match r {
            Ok(d) => &d.problems,
            Err(l) => &l.problems,
        };
        let start = self.layout.stripe_offset(i);
        let end = start + self.layout.stripe_len(i) as u64;
        for p in problems {
            self.stats.shard_problem(p.slot, p.problem);
            let first = lock(&self.warned).insert((p.slot, p.problem));
            if p.problem == Problem::Corrupt {
                tracing::warn!(
                    "stripe {i} (bytes {start}..{end}): shard {} on agent {} is corrupt: {}",
                    p.index,
                    self.agent(p.slot),
                    p.detail
                );
            } else if first {
                tracing::warn!(
                    "agent {}: shard {} of stripe {i} is {}: {} (further such problems on this agent are counted in the stats, not logged)",
                    self.agent(p.slot),
                    p.index,
                    if p.problem == Problem::Missing { "missing" } else { "unreachable" },
                    p.detail
                );
            } else {
                tracing::debug!(
                    "agent {}: shard {} of stripe {i}: {:?}",
                    self.agent(p.slot),
                    p.index,
                    p.problem
                );
            }
        }
        match r {
            Ok(d) => {
                bump(&self.stats.stripes_fetched);
                add(&self.stats.hedged_shards, d.hedged as u64);
                add(&self.stats.offsite_shards, d.offsite as u64);
                if d.reconstructed {
                    bump(&self.stats.stripes_reconstructed);
                    let n = self.warned_reconstructed.fetch_add(1, Ordering::Relaxed);
                    let why = if d.problems.is_empty() {
                        "agents known to be down or slow were skipped".to_string()
                    } else {
                        d.problems
                            .iter()
                            .map(|p| {
                                format!(
                                    "shard {} on {} {:?}",
                                    p.index,
                                    self.agent(p.slot),
                                    p.problem
                                )
                            })
                            .collect::<Vec<_>>()
                            .join(", ")
                    };
                    if n < WARN_RECONSTRUCTED {
                        tracing::warn!(
                            "stripe {i} (bytes {start}..{end}) reconstructed from parity: {why}"
                        );
                        if n + 1 == WARN_RECONSTRUCTED {
                            tracing::warn!(
                                "further reconstructed stripes are logged at info level (-v) and counted in the stats"
                            );
                        }
                    } else {
                        tracing::info!(
                            "stripe {i} (bytes {start}..{end}) reconstructed from parity: {why}"
                        );
                    }
                }
            }
            Err(l) => {
                bump(&self.stats.stripes_lost);
                if lock(&self.lost).insert(i) {
                    let shards: Vec<String> = l
                        .problems
                        .iter()
                        .map(|p| {
                            format!(
                                "shard {} on {} {:?}",
                                p.index,
                                self.agent(p.slot),
                                p.problem
                            )
                        })
                        .collect();
                    tracing::error!(
                        "stripe {i} (bytes {start}..{end}) cannot be read: {} [{}]; reads of it fail with EIO until more agents are back",
                        l.error,
                        shards.join(", ")
                    );
                }
            }
        }
    }

    fn lost_error(&self, l: &StripeLost) -> SourceError {
        SourceError::Io(std::io::Error::other(format!(
            "stripe {} lost: {}",
            l.stripe, l.error
        )))
    }

    /// Starts fetching stripe `i` in the background (if it is data and not cached or on its way).
    /// With `permit`, the fetch holds it (read-ahead's bound) until done.
    fn spawn_fetch(self: &Arc<Self>, i: u64, permit: Option<tokio::sync::OwnedSemaphorePermit>) {
        if i >= self.layout.stripe_count() || self.is_zero(i) || self.cache.contains(i) {
            return;
        }
        if permit.is_some() {
            bump(&self.stats.readahead);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Errors are logged by the fetch and met again by the read that needs the stripe.
            let _ = me.stripe(i).await;
        });
    }

    /// Whether a read of `offset..end` continues an earlier one (it starts where one ended);
    /// remembers where this one ends.
    fn sequential(&self, offset: u64, end: u64) -> bool {
        let mut recent = lock(&self.recent);
        let seq = recent.contains(&offset);
        if !recent.contains(&end) {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(end);
        }
        seq
    }

    /// Read-ahead after a sequential read covering stripes `..=last`.
    fn read_ahead(self: &Arc<Self>, last: u64) {
        for i in last + 1..=last + READ_AHEAD {
            if i >= self.layout.stripe_count() || self.is_zero(i) || self.cache.contains(i) {
                continue;
            }
            let Ok(permit) = self.readahead.clone().try_acquire_owned() else {
                return;
            };
            self.spawn_fetch(i, Some(permit));
        }
    }

    /// Hints that `offset..offset + len` will be read soon: fetch its stripes in the background.
    pub fn prefetch(self: &Arc<Self>, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let (first, last) = (
            self.layout.stripe_of(offset),
            self.layout.stripe_of(offset + len - 1),
        );
        for i in first..=last.min(first + FETCH_PARALLEL as u64) {
            self.spawn_fetch(i, None);
        }
    }

    /// Fills `buf` with the snapshot's bytes at `offset`.
    pub async fn read(self: &Arc<Self>, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        let first = self.layout.stripe_of(offset);
        let last = self.layout.stripe_of(end - 1);
        let sequential = self.sequential(offset, end);
        let ranged = !sequential
            && buf.len() <= RANGED_MAX
            && self.layout.seal == sa_core::seal::SEAL_CHUNKED;
        if !ranged {
            // The later stripes of a large read fetch while we wait for the first.
            for i in first + 1..=last {
                self.spawn_fetch(i, None);
            }
        }
        if sequential {
            self.read_ahead(last);
        }
        let mut pos = 0usize;
        for i in first..=last {
            let s_off = self.layout.stripe_offset(i);
            let from = (offset.max(s_off) - s_off) as usize;
            let to = (end.min(s_off + self.layout.stripe_len(i) as u64) - s_off) as usize;
            let dst = &mut buf[pos..pos + (to - from)];
            if self.is_zero(i) {
                dst.fill(0);
            } else if ranged && !self.cache.contains(i) && self.read_range(i, from, to, dst).await {
                bump(&self.stats.ranged_reads);
            } else {
                let data = self.stripe(i).await?;
                let src = data.get(from..to).ok_or_else(|| {
                    SourceError::Io(std::io::Error::other(format!(
                        "stripe {i} decoded to {} bytes",
                        data.len()
                    )))
                })?;
                dst.copy_from_slice(src);
            }
            pos += to - from;
        }
        Ok(())
    }

    /// Fills `dst` with bytes `from..to` of stripe `i` through a ranged read; false when it
    /// could not (the caller reads the whole stripe).
    async fn read_range(&self, i: u64, from: usize, to: usize, dst: &mut [u8]) -> bool {
        let r = {
            let _permit = self.fetches.acquire().await;
            self.reader.read_range(i, from, to).await
        };
        match r {
            Ok(got) if got.bytes.len() == dst.len() => {
                dst.copy_from_slice(&got.bytes);
                add(&self.stats.ranged_hedges, got.hedged as u64);
                true
            }
            Ok(_) => false,
            Err(e) => {
                bump(&self.stats.ranged_fallbacks);
                tracing::debug!(
                    "stripe {i}: ranged read of {from}..{to} failed ({e}); reading the stripe"
                );
                false
            }
        }
    }

    /// Allocation of `offset..offset + len`: zero stripes are holes that read as zeroes, the rest
    /// is data. Adjacent extents of one kind are merged. The answer may stop short of `len`
    /// after [`MAX_EXTENTS`] extents (the client asks again from there).
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let mut out: Vec<Extent> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end && out.len() < MAX_EXTENTS {
            let i = self.layout.stripe_of(at);
            let stripe_end = self.layout.stripe_offset(i) + self.layout.stripe_len(i) as u64;
            let n = stripe_end.min(end) - at;
            let e = if self.is_zero(i) {
                Extent::hole(n)
            } else {
                Extent::data(n)
            };
            match out.last_mut() {
                Some(l) if l.hole == e.hole && l.zero == e.zero => l.len += n,
                _ => out.push(e),
            }
            at += n;
        }
        out
    }
}

//! Counters of a `serve` run, and the report printed when it stops.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::read::Problem;

/// Shard problems met on one agent.
#[derive(Debug, Default, Clone, Copy, Serialize)]
pub struct AgentProblems {
    /// The agent answered but did not have the shard.
    pub missing: u64,
    /// The shard failed its checks.
    pub corrupt: u64,
    /// The agent could not be reached.
    pub unreachable: u64,
}

/// Live counters, updated by every request.
#[derive(Debug, Default)]
pub struct Stats {
    /// NBD commands handled (reads, writes, flushes, block status, ...).
    pub requests: AtomicU64,
    /// Read commands.
    pub reads: AtomicU64,
    /// Bytes returned by reads.
    pub bytes_read: AtomicU64,
    /// Write (and write-zeroes) commands.
    pub writes: AtomicU64,
    /// Bytes written into the overlay.
    pub bytes_written: AtomicU64,
    /// Flushes (and FUA writes) made durable.
    pub flushes: AtomicU64,
    /// Stripes fetched from the agents.
    pub stripes_fetched: AtomicU64,
    /// Stripe reads served from the cache (or by waiting for another reader's fetch).
    pub stripes_from_cache: AtomicU64,
    /// Fetched stripes that needed parity.
    pub stripes_reconstructed: AtomicU64,
    /// Stripe fetches that failed (the read got EIO).
    pub stripes_lost: AtomicU64,
    /// Stripes fetched by read-ahead.
    pub readahead: AtomicU64,
    /// Extra shard fetches started because an agent was slow.
    pub hedged_shards: AtomicU64,
    /// Reads served from only the sealed chunks they needed (seal format 2), without the stripe.
    pub ranged_reads: AtomicU64,
    /// Shards taken from the offsite copy (agents missing, or `--offsite-only`).
    pub offsite_shards: AtomicU64,
    /// Ranged reads that gave up (agent down, slow or old, a shard missing or corrupt) and read
    /// the whole stripe instead.
    pub ranged_fallbacks: AtomicU64,
    /// Data-shard ranges that were slow and rebuilt alongside from other shards.
    pub ranged_hedges: AtomicU64,
    per_slot: Mutex<BTreeMap<usize, AgentProblems>>,
}

/// Adds one to a counter.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Stats {
    /// Records one shard problem on the agent of table slot `slot`.
    pub fn shard_problem(&self, slot: usize, p: Problem) {
        let mut m = self.per_slot.lock().unwrap_or_else(|e| e.into_inner());
        let e = m.entry(slot).or_default();
        match p {
            Problem::Missing => e.missing += 1,
            Problem::Corrupt => e.corrupt += 1,
            Problem::Unreachable => e.unreachable += 1,
        }
    }

    /// A report of the counters so far; `names` names the agent-table slots.
    pub fn report(&self, names: &[String]) -> Counters {
        let per_slot = self
            .per_slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Counters {
            requests: get(&self.requests),
            reads: get(&self.reads),
            bytes_read: get(&self.bytes_read),
            writes: get(&self.writes),
            bytes_written: get(&self.bytes_written),
            flushes: get(&self.flushes),
            stripes_fetched: get(&self.stripes_fetched),
            stripes_from_cache: get(&self.stripes_from_cache),
            stripes_reconstructed: get(&self.stripes_reconstructed),
            stripes_lost: get(&self.stripes_lost),
            readahead: get(&self.readahead),
            hedged_shards: get(&self.hedged_shards),
            ranged_reads: get(&self.ranged_reads),
            offsite_shards: get(&self.offsite_shards),
            ranged_fallbacks: get(&self.ranged_fallbacks),
            ranged_hedges: get(&self.ranged_hedges),
            shard_problems: per_slot
                .into_iter()
                .map(|(slot, p)| {
                    (
                        names
                            .get(slot)
                            .cloned()
                            .unwrap_or_else(|| format!("slot {slot}")),
                        p,
                    )
                })
                .collect(),
        }
    }
}

/// A snapshot of [`Stats`], as printed (`--json` field names).
#[derive(Debug, Serialize)]
pub struct Counters {
    /// NBD commands handled.
    pub requests: u64,
    /// Read commands.
    pub reads: u64,
    /// Bytes returned by reads.
    pub bytes_read: u64,
    /// Write commands.
    pub writes: u64,
    /// Bytes written into the overlay.
    pub bytes_written: u64,
    /// Flushes made durable.
    pub flushes: u64,
    /// Stripes fetched from the agents.
    pub stripes_fetched: u64,
    /// Stripe reads served from the cache.
    pub stripes_from_cache: u64,
    /// Fetched stripes rebuilt from parity.
    pub stripes_reconstructed: u64,
    /// Stripe fetches that failed.
    pub stripes_lost: u64,
    /// Stripes fetched by read-ahead.
    pub readahead: u64,
    /// Extra shard fetches for slow agents.
    pub hedged_shards: u64,
    /// Reads served from the chunks they needed, without fetching the stripe.
    pub ranged_reads: u64,
    /// Shards taken from the offsite copy.
    pub offsite_shards: u64,
    /// Ranged reads that fell back to reading the whole stripe.
    pub ranged_fallbacks: u64,
    /// Slow data-shard ranges rebuilt alongside from other shards.
    pub ranged_hedges: u64,
    /// Shard problems per agent (`addr (id)`).
    pub shard_problems: BTreeMap<String, AgentProblems>,
}

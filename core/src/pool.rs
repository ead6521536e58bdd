//! A small pool of reusable byte buffers.
//!
//! Decoding a stripe needs a fresh stripe-sized buffer; freeing it and allocating the next one
//! makes the allocator hand memory back to the kernel and fault it in again, zeroed, page by page
//! — measured at half of `sa-image serve`'s CPU time. Keeping a few buffers for reuse avoids that.
//!
//! [`frames`] is one process-wide pool for the bodies of large agent frames (shard files on both
//! ends of a `GET_SHARD`): a restore's profile showed a sixth of its CPU in the kernel zeroing
//! freshly faulted pages for them. It keeps at most [`FRAME_POOL_BYTES`], and a long-running
//! process gives them back once it is idle ([`BufferPool::trim_idle`]: the agent, after
//! [`FRAME_POOL_IDLE`] without a large frame).

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Bytes the process-wide frame pool keeps at most.
pub const FRAME_POOL_BYTES: usize = 48 << 20;
/// How long the agent's frame pool may go unused before its buffers are freed.
pub const FRAME_POOL_IDLE: Duration = Duration::from_secs(30);
/// Buffers smaller than this are not worth pooling (the allocator serves them from warm pages).
pub const FRAME_POOL_MIN: usize = 64 << 10;

/// The process-wide pool for large frame bodies (see the module docs).
pub fn frames() -> &'static BufferPool {
    static POOL: OnceLock<BufferPool> = OnceLock::new();
    POOL.get_or_init(|| BufferPool::with_bytes(FRAME_POOL_BYTES, FRAME_POOL_MIN))
}

/// Holds up to `max` free buffers (and at most `max_bytes` of them).
pub struct BufferPool {
    free: Mutex<Free>,
    max: usize,
    max_bytes: usize,
    min_capacity: usize,
}

#[derive(Default)]
struct Free {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
    /// When a buffer was last taken or given (None: never).
    used: Option<Instant>,
}

impl BufferPool {
    /// A pool keeping at most `max` free buffers.
    pub fn new(max: usize) -> Self {
        BufferPool {
            free: Mutex::new(Free::default()),
            max,
            max_bytes: usize::MAX,
            min_capacity: 1,
        }
    }

    /// A pool keeping at most `max_bytes` of free buffers, each of at least `min_capacity`.
    pub fn with_bytes(max_bytes: usize, min_capacity: usize) -> Self {
        BufferPool {
            free: Mutex::new(Free::default()),
            max: usize::MAX,
            max_bytes,
            min_capacity: min_capacity.max(1),
        }
    }

    /// An empty buffer with room for at least `capacity` bytes (reused when one is free).
    pub fn take(&self, capacity: usize) -> Vec<u8> {
        if capacity < self.min_capacity {
            return Vec::with_capacity(capacity);
        }
        let reused = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            free.used = Some(Instant::now());
            // The most recently returned buffer that is large enough, else the last one.
            let at = free
                .bufs
                .iter()
                .rposition(|b| b.capacity() >= capacity)
                .or_else(|| free.bufs.len().checked_sub(1));
            at.map(|i| {
                let b = free.bufs.swap_remove(i);
                free.bytes -= b.capacity();
                b
            })
        };
        let mut buf = reused.unwrap_or_default();
        buf.clear();
        buf.reserve(capacity);
        buf
    }

    /// Returns a buffer for reuse (dropped when the pool is full).
    pub fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < self.min_capacity {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.used = Some(Instant::now());
        if free.bufs.len() < self.max && free.bytes + cap <= self.max_bytes {
            free.bytes += cap;
            free.bufs.push(buf);
        }
    }

    /// Frees every buffer kept if the pool has not been used for `idle`; returns the bytes
    /// freed. A long-running process (the agent) calls it now and then, so the memory of a busy
    /// hour goes back to the system once the work is over.
    pub fn trim_idle(&self, idle: Duration) -> usize {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.used.is_some_and(|t| t.elapsed() < idle) {
            return 0;
        }
        let bytes = free.bytes;
        free.bufs = Vec::new();
        free.bytes = 0;
        bytes
    }

    /// Bytes of the free buffers kept.
    pub fn kept_bytes(&self) -> usize {
        self.free.lock().unwrap_or_else(|p| p.into_inner()).bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_up_to_max() {
        let pool = BufferPool::new(1);
        let mut a = pool.take(100);
        a.extend_from_slice(&[1; 100]);
        let ptr = a.as_ptr();
        pool.give(a);
        pool.give(vec![0; 10]);
        let b = pool.take(50);
        assert!(b.is_empty(), "handed out cleared");
        assert_eq!(b.as_ptr(), ptr, "the same allocation is reused");
        assert!(
            pool.take(10).capacity() >= 10,
            "a new one when none is free"
        );
    }

    #[test]
    fn an_idle_pool_gives_its_buffers_back() {
        let pool = BufferPool::with_bytes(1 << 20, 100);
        pool.give(Vec::with_capacity(1000));
        pool.give(Vec::with_capacity(2000));
        assert!(pool.kept_bytes() >= 3000);
        assert_eq!(pool.trim_idle(Duration::from_secs(3600)), 0, "just used");
        assert!(pool.kept_bytes() >= 3000);
        assert!(pool.trim_idle(Duration::ZERO) >= 3000, "idle long enough");
        assert_eq!(pool.kept_bytes(), 0);
        assert_eq!(pool.take(500).capacity(), 500, "nothing kept to reuse");
    }

    #[test]
    fn byte_bound_and_small_buffers() {
        let pool = BufferPool::with_bytes(1000, 100);
        pool.give(Vec::with_capacity(50));
        assert_eq!(pool.take(200).capacity(), 200, "too small to be pooled");
        pool.give(Vec::with_capacity(600));
        pool.give(Vec::with_capacity(600));
        let a = pool.take(500);
        assert!(a.capacity() >= 600, "the one kept");
        assert_eq!(
            pool.take(500).capacity(),
            500,
            "the second was over the bound"
        );
    }
}

//! A bounded LRU cache of decoded stripes, with single-flight fetching.
//!
//! Entries are `Arc<Vec<u8>>`: a reader copies only the slice it needs out of a shared stripe,
//! never the whole stripe. The first reader of a stripe that is not cached runs the fetch; readers
//! arriving while it runs wait for the same result (a [`OnceCell`] per stripe), so concurrent reads
//! of one stripe fetch it once. If the fetch fails, nothing is cached; a waiter then tries again.
//!
//! Only finished stripes count against the capacity (in bytes). Stripes being fetched are bounded
//! by the caller (the number of fetches in flight), not here. Eviction scans for the least recently
//! used finished entry: the cache holds capacity / stripe size entries (64 by default), so a scan
//! per insertion costs less than copying one request's data.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use sa_core::pool::BufferPool;
use tokio::sync::OnceCell;

/// A decoded stripe shared between readers.
pub type Stripe = Arc<Vec<u8>>;

/// Where a stripe returned by [`StripeCache::get_or_fetch`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// It was in the cache.
    Hit,
    /// Another reader was fetching it; this one waited for that fetch.
    Joined,
    /// This reader fetched it.
    Fetched,
}

struct Slot {
    cell: OnceCell<Stripe>,
    last_use: AtomicU64,
}

#[derive(Default)]
struct State {
    slots: HashMap<u64, Arc<Slot>>,
    /// Bytes of finished entries.
    used: usize,
    tick: u64,
}

/// Decoded stripes by index, at most `capacity` bytes of them.
pub struct StripeCache {
    capacity: usize,
    state: Mutex<State>,
    /// Where evicted stripes' buffers go back, for the next fetch.
    pool: Option<Arc<BufferPool>>,
}

impl StripeCache {
    /// A cache holding at most `capacity` bytes of finished stripes.
    pub fn new(capacity: usize) -> Self {
        StripeCache {
            capacity,
            state: Mutex::new(State::default()),
            pool: None,
        }
    }

    /// Hands the buffers of evicted stripes (that no reader still holds) back to `pool`.
    pub fn with_pool(mut self, pool: Arc<BufferPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether stripe `i` is cached or being fetched.
    pub fn contains(&self, i: u64) -> bool {
        self.lock().slots.contains_key(&i)
    }

    /// Stripe `i` when it is cached and finished, without counting as a use (a copy passing
    /// through, such as hydration, does not make a stripe recent).
    pub fn peek(&self, i: u64) -> Option<Stripe> {
        self.lock()
            .slots
            .get(&i)
            .and_then(|s| s.cell.get().cloned())
    }

    /// Bytes held by finished entries.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// Stripe `i` from the cache, or from `fetch` (run by at most one caller at a time).
    pub async fn get_or_fetch<F, Fut, E>(&self, i: u64, fetch: F) -> Result<(Stripe, Origin), E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Vec<u8>, E>>,
    {
        let slot = {
            let mut st = self.lock();
            st.tick += 1;
            let tick = st.tick;
            let slot = st
                .slots
                .entry(i)
                .or_insert_with(|| {
                    Arc::new(Slot {
                        cell: OnceCell::new(),
                        last_use: AtomicU64::new(0),
                    })
                })
                .clone();
            slot.last_use.store(tick, Ordering::Relaxed);
            slot
        };
        if let Some(v) = slot.cell.get() {
            return Ok((v.clone(), Origin::Hit));
        }
        let mut ran = false;
        let result = slot
            .cell
            .get_or_try_init(|| {
                ran = true;
                let fut = fetch();
                async move { fut.await.map(Arc::new) }
            })
            .await;
        match result {
            Ok(v) => {
                let v = v.clone();
                if ran {
                    self.charge(i, &slot, v.len());
                    Ok((v, Origin::Fetched))
                } else {
                    Ok((v, Origin::Joined))
                }
            }
            Err(e) => {
                if ran {
                    let mut st = self.lock();
                    if st
                        .slots
                        .get(&i)
                        .is_some_and(|s| Arc::ptr_eq(s, &slot) && s.cell.get().is_none())
                    {
                        st.slots.remove(&i);
                    }
                }
                Err(e)
            }
        }
    }

    /// Counts a freshly fetched entry and evicts least recently used ones over capacity.
    fn charge(&self, i: u64, slot: &Arc<Slot>, len: usize) {
        let mut st = self.lock();
        if !st.slots.get(&i).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            return;
        }
        st.used += len;
        while st.used > self.capacity {
            let victim = st
                .slots
                .iter()
                .filter(|(_, s)| s.cell.initialized())
                .min_by_key(|(_, s)| s.last_use.load(Ordering::Relaxed))
                .map(|(&k, s)| (k, s.cell.get().map_or(0, |v| v.len())));
            let Some((k, bytes)) = victim else { break };
            let evicted = st.slots.remove(&k);
            st.used -= bytes;
            let buf = evicted
                .and_then(|s| Arc::try_unwrap(s).ok())
                .and_then(|s| s.cell.into_inner())
                .and_then(|v| Arc::try_unwrap(v).ok());
            if let (Some(pool), Some(buf)) = (&self.pool, buf) {
                pool.give(buf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_readers_fetch_once() {
        let cache = Arc::new(StripeCache::new(1 << 20));
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(7, || async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        Ok::<_, ()>(vec![7u8; 1000])
                    })
                    .await
                    .unwrap()
            }));
        }
        let mut origins = Vec::new();
        for t in tasks {
            let (v, o) = t.await.unwrap();
            assert_eq!(v.len(), 1000);
            origins.push(o);
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert_eq!(origins.iter().filter(|o| **o == Origin::Fetched).count(), 1);
        let (_, o) = cache
            .get_or_fetch(7, || async { Err::<Vec<u8>, ()>(()) })
            .await
            .unwrap();
        assert_eq!(o, Origin::Hit);
    }

    #[tokio::test]
    async fn evicts_least_recently_used_within_capacity() {
        let cache = StripeCache::new(3000);
        for i in 0..3 {
            cache
                .get_or_fetch(i, || async { Ok::<_, ()>(vec![0u8; 1000]) })
                .await
                .unwrap();
        }
        // Touch 0, so 1 is the oldest.
        cache
            .get_or_fetch(0, || async { Err::<Vec<u8>, ()>(()) })
            .await
            .unwrap();
        cache
            .get_or_fetch(3, || async { Ok::<_, ()>(vec![0u8; 1000]) })
            .await
            .unwrap();
        assert!(cache.contains(0) && !cache.contains(1) && cache.contains(2) && cache.contains(3));
        assert_eq!(cache.used(), 3000);
    }

    #[tokio::test]
    async fn failures_are_not_cached() {
        let cache = StripeCache::new(1 << 20);
        assert!(cache
            .get_or_fetch(1, || async { Err::<Vec<u8>, &str>("lost") })
            .await
            .is_err());
        assert!(!cache.contains(1));
        let (v, o) = cache
            .get_or_fetch(1, || async { Ok::<_, &str>(vec![1]) })
            .await
            .unwrap();
        assert_eq!((v.as_slice(), o), (&[1u8][..], Origin::Fetched));
    }
}

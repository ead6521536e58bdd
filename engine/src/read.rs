//! Reading one stripe back from the agents: fetch `k` shards in parallel (data shards first, so
//! a healthy stripe needs no reconstruction), and for every shard that is missing, corrupt or on an
//! unreachable agent, fetch a parity shard instead; then rebuild, decrypt and verify.
//!
//! Two refinements for live serving (both on only after [`StripeReader::with_hedge`], so
//! `restore` behaves as before):
//! - **Hedging** ([`StripeReader::with_hedge`]): when `k` good shards have not arrived within the
//!   hedge delay, one more shard (the next in preference order) is fetched alongside, and again
//!   after each further delay, up to all `k + m`. The first `k` to arrive win; the rest are
//!   dropped. One slow PC then costs a boot the hedge delay, not its full timeout.
//! - **Agent health**: an agent that could not be reached, or that was still silent when a hedged
//!   fetch completed the stripe without it, is "cooling down" for the cool-down time
//!   ([`COOL_DOWN`] unless [`StripeReader::with_cool_down`] says otherwise);
//!   while it is, its shards are asked for last (after parity on healthy agents), so a dead PC
//!   does not cost every stripe a failed round trip. Shards are otherwise asked for data first.
//!
//! **Ranged reads** ([`StripeReader::read_range`], seal format 2): a small read fetches only the
//! sealed chunks that hold its bytes (`GET_RANGE` on the data shards that hold them; usually one
//! agent, 4,112 bytes for 4 KiB) and checks each chunk's tag. A data shard on an agent that is
//! down, cooling or lately failed a range is rebuilt from the same bytes (widened to 64-byte
//! blocks) of `k` other shards. Ranged reads hedge too, on a much shorter fuse than whole
//! stripes: a data shard's range that has not come back after [`StripeReader::range_hedge`]
//! (four times the running mean of ranged fetches, at least [`RANGE_HEDGE_MIN`], at most the
//! hedge delay) is rebuilt from `k` other shards alongside, and the first answer wins; when the
//! rebuild wins, ranged reads leave the slow agent alone for the cool-down time, so one PC on a
//! slow link costs a few reads about 10 ms, not every read its queue. Whole-stripe reads keep
//! using it (they hedge on their own, longer delay): a busy machine that delays one small range
//! must not make every stripe of a sequential copy reconstruct. When a fetch is slower than the
//! hedge delay, an agent is too old for `GET_RANGE`, or a shard is missing or corrupt, it fails
//! and the caller reads the whole stripe (which hedges, reconstructs and reports the problem).
//!
//! An agent whose link went silent costs the first fetch the stall timeout; after that its
//! client fails at once for a while (`sa_core::store::remote::health`), so restore, which asks
//! in plain order, reads every later stripe around it at no cost.

mod until;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sa_core::manifest::{Manifest, StripeRef};
use sa_core::pool::BufferPool;
use sa_core::store::{AgentClient, ShardRead};
use sa_core::stripe::{Payload, StripeCodec};
use sa_core::Error;
use tokio::task::JoinSet;
use until::Until;

/// What went wrong with one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Problem {
    /// The agent answered, but does not have it.
    Missing,
    /// The shard failed its checks (crc32c, header, identity).
    Corrupt,
    /// The agent could not be reached.
    Unreachable,
}

impl Problem {
    /// Classifies a shard fetch error.
    pub fn of(e: &Error) -> Self {
        match e {
            Error::ShardMissing => Problem::Missing,
            Error::ShardCorrupt(_) | Error::Malformed { .. } | Error::UnsupportedVersion { .. } => {
                Problem::Corrupt
            }
            _ => Problem::Unreachable,
        }
    }
}

/// A shard that could not be used.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardProblem {
    /// Shard index within the stripe.
    pub index: usize,
    /// Agent table slot that should hold it.
    pub slot: usize,
    /// What kind of problem.
    pub problem: Problem,
    /// Details for the log.
    pub detail: String,
}

/// A stripe read back.
pub struct StripeData {
    /// The plaintext.
    pub data: Vec<u8>,
    /// Shards that could not be used on the way.
    pub problems: Vec<ShardProblem>,
    /// True when parity was needed.
    pub reconstructed: bool,
    /// Extra shard fetches started because others were slow (see [`StripeReader::with_hedge`]).
    pub hedged: usize,
    /// Shards taken from the offsite tier (see [`StripeReader::with_offsite`]).
    pub offsite: usize,
}

/// A stripe that could not be rebuilt.
#[derive(Debug)]
pub struct StripeLost {
    /// Stripe index.
    pub stripe: u64,
    /// Every shard problem met.
    pub problems: Vec<ShardProblem>,
    /// Final error.
    pub error: Error,
}

/// How long an agent that could not be reached is asked last, unless told otherwise.
pub const COOL_DOWN: Duration = Duration::from_secs(5);
/// How long a serving read waits for k shards before asking one more, unless told otherwise.
pub const HEDGE_AFTER: Duration = Duration::from_millis(300);

/// Ranged reads hedge no sooner than this (see [`StripeReader::range_hedge`]): above a loaded
/// LAN's p99 for one 4 KiB range (about 5 ms with the agents on the same two cores), so a healthy
/// agent is rarely hedged around.
pub const RANGE_HEDGE_MIN: Duration = Duration::from_millis(10);

/// A ranged read's bytes.
pub struct RangeRead {
    /// The plaintext asked for.
    pub bytes: Vec<u8>,
    /// Data-shard ranges that were slow and rebuilt alongside from other shards.
    pub hedged: usize,
}

/// Reads stripes of one snapshot.
#[derive(Clone)]
pub struct StripeReader {
    codec: Arc<StripeCodec>,
    manifest: Arc<Manifest>,
    /// Per agent-table slot, its connection; a slot empty at the start may be filled once
    /// later by an agent that woke up ([`StripeReader::join`]).
    slots: Arc<Vec<OnceLock<AgentClient>>>,
    /// Per slot: until when the agent counts as unreachable (cooling down).
    cooling: Until,
    hedge: Option<Duration>,
    cool_down: Duration,
    /// Where decoded stripes' buffers come from (serve recycles evicted cache entries).
    pool: Option<Arc<BufferPool>>,
    /// Per slot: until when ranged reads skip the agent (it failed one for a reason other than a
    /// missing or corrupt shard, e.g. an agent too old for `GET_RANGE`, or was slower than a
    /// rebuild).
    no_ranges: Until,
    /// The bucket asked for shards the agents cannot give, and whether it is the only source.
    offsite: Option<(crate::offsite::OffsiteStore, bool)>,
    /// Shards taken from the bucket so far, by every clone of this reader.
    offsite_used: Arc<AtomicU64>,
    /// Bytes of good shard files received from agents by whole-stripe reads, by every clone.
    fetched: Arc<AtomicU64>,
    /// Running mean (µs) of ranged fetches that came back before their hedge.
    range_mean_us: Arc<AtomicU64>,
}

/// How long ranged reads skip an agent that failed one (not for a missing or bad shard).
pub const NO_RANGES_FOR: Duration = Duration::from_secs(60);

/// One data-shard range of a ranged read, and what the read knows of the stripe's shards.
struct RangePiece {
    id: sa_core::seal::StripeId,
    /// Shard index within the stripe, and the byte range of its file.
    idx: usize,
    off: usize,
    len: usize,
    /// The stripe's agent-table slots, and per shard the connection ranged reads may use.
    slots: Arc<Vec<u16>>,
    usable: Arc<Vec<Option<AgentClient>>>,
}

/// Fetches and checks one shard file.
pub async fn fetch_shard(
    codec: &StripeCodec,
    client: Option<&AgentClient>,
    id: &sa_core::seal::StripeId,
    index: usize,
    plain_len: usize,
) -> Result<Payload, Error> {
    let Some(client) = client else {
        return Err(Error::AgentDown);
    };
    let file = client.get_shard(&codec.key(id, index)).await?;
    codec.check(id, index, plain_len, file)
}

impl StripeReader {
    /// A reader over a snapshot with one optional client per agent-table slot.
    pub fn new(
        codec: Arc<StripeCodec>,
        manifest: Arc<Manifest>,
        slots: Vec<Option<AgentClient>>,
    ) -> Self {
        let cooling = Until::new(slots.len());
        let no_ranges = Until::new(slots.len());
        StripeReader {
            no_ranges,
            codec,
            manifest,
            slots: Arc::new(
                slots
                    .into_iter()
                    .map(|c| {
                        let cell = OnceLock::new();
                        if let Some(c) = c {
                            let _ = cell.set(c);
                        }
                        cell
                    })
                    .collect(),
            ),
            cooling,
            hedge: None,
            cool_down: COOL_DOWN,
            pool: None,
            offsite: None,
            offsite_used: Arc::new(AtomicU64::new(0)),
            fetched: Arc::new(AtomicU64::new(0)),
            range_mean_us: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Takes the shards of a stripe that the agents cannot give from the fleet's offsite tier
    /// (none: as before); with `--offsite-only`, every shard, and no agent is asked.
    pub fn with_offsite(mut self, fleet: &crate::fleet::Fleet) -> Self {
        self.offsite = fleet.offsite().map(|o| (o.clone(), fleet.offsite_only()));
        self
    }

    /// Decodes into buffers taken from `pool`.
    pub fn with_pool(mut self, pool: Arc<BufferPool>) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Hedges slow fetches: after `delay` without `k` good shards, fetch one more shard (and one
    /// more per further `delay`).
    pub fn with_hedge(mut self, delay: Duration) -> Self {
        self.hedge = Some(delay);
        self
    }

    /// Asks an agent that failed last for `d` (default [`COOL_DOWN`]).
    pub fn with_cool_down(mut self, d: Duration) -> Self {
        self.cool_down = d;
        self
    }

    /// Bytes of good shard files whole-stripe reads received from agents so far, extra hedged
    /// fetches included (by this reader and its clones).
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    /// Shards taken from the offsite tier so far (by this reader and its clones).
    pub fn offsite_shards(&self) -> u64 {
        self.offsite_used.load(Ordering::Relaxed)
    }

    /// Gives the empty `slot` a connection (an agent that answered after the reads started,
    /// e.g. a PC woken by Wake-on-LAN): later reads use it, first to hedge. Returns false when
    /// the slot does not exist or already has one.
    pub fn join(&self, slot: usize, client: AgentClient) -> bool {
        self.slots.get(slot).is_some_and(|c| c.set(client).is_ok())
    }

    /// Whether the agent in `slot` is known to be unreachable (not connected, or failed within
    /// the last cool-down time).
    pub fn slot_down(&self, slot: usize) -> bool {
        match self.slots.get(slot).map(OnceLock::get) {
            Some(Some(_)) => self.cooling.holds(slot),
            _ => true,
        }
    }

    fn cool_down(&self, slot: usize) {
        self.cooling.hold(slot, self.cool_down);
    }

    /// Reads plaintext bytes `from..to` of stripe `i` through its sealed chunks alone (see the
    /// module docs); an error means: read the whole stripe instead.
    pub async fn read_range(&self, i: u64, from: usize, to: usize) -> Result<RangeRead, Error> {
        let layout = *self.codec.layout();
        let plain_len = layout.stripe_len(i);
        let (id, slots) = match &self.manifest.stripes[i as usize] {
            StripeRef::Zero => {
                let bytes = vec![0; to.saturating_sub(from)];
                return Ok(RangeRead { bytes, hedged: 0 });
            }
            StripeRef::Data { id, slots } => (*id, slots),
        };
        let plan = layout
            .range_plan(plain_len, from, to)
            .ok_or_else(|| Error::Invalid("this snapshot's stripes are read whole".into()))?;
        let usable: Arc<Vec<Option<AgentClient>>> = Arc::new(
            slots
                .iter()
                .map(|&s| self.range_client(s as usize))
                .collect(),
        );
        let slots: Arc<Vec<u16>> = Arc::new(slots.clone());
        let hedge = self.range_hedge();
        let mut pieces = JoinSet::new();
        for (n, &(idx, off, len)) in plan.pieces.iter().enumerate() {
            let piece = RangePiece {
                id,
                idx,
                off,
                len,
                slots: slots.clone(),
                usable: usable.clone(),
            };
            let me = self.clone();
            pieces.spawn(async move { (n, me.range_piece(piece, hedge).await) });
        }
        let mut parts: Vec<Vec<u8>> = vec![Vec::new(); plan.pieces.len()];
        let mut hedged = 0;
        while let Some(joined) = pieces.join_next().await {
            match joined {
                Ok((n, Ok((bytes, h)))) => {
                    parts[n] = bytes;
                    hedged += usize::from(h);
                }
                Ok((_, Err(e))) => return Err(e),
                Err(e) => return Err(Error::Protocol(format!("range fetch task: {e}"))),
            }
        }
        let sealed = if parts.len() == 1 {
            parts.pop().unwrap_or_default()
        } else {
            parts.concat()
        };
        let bytes = self.codec.open_range(&id, &plan, to - from, sealed)?;
        Ok(RangeRead { bytes, hedged })
    }

    /// How long a ranged fetch may take before the same bytes are rebuilt from other shards
    /// alongside: four times the running mean of ranged fetches, within [`RANGE_HEDGE_MIN`] and
    /// the hedge delay; `None` when this reader does not hedge.
    pub fn range_hedge(&self) -> Option<Duration> {
        let max = self.hedge?;
        let mean = Duration::from_micros(self.range_mean_us.load(Ordering::Relaxed));
        Some((mean * 4).clamp(RANGE_HEDGE_MIN.min(max), max))
    }

    /// Folds one ranged fetch's time into the running mean (weight 1/16; races between
    /// readers lose an update now and then, which a mean can afford).
    fn note_range_time(&self, took: Duration) {
        let x = took.as_micros().min(u64::MAX as u128) as u64;
        let old = self.range_mean_us.load(Ordering::Relaxed);
        let new = if old == 0 { x } else { old - old / 16 + x / 16 };
        self.range_mean_us.store(new, Ordering::Relaxed);
    }

    /// One data-shard range of a ranged read, with whether it was hedged: fetched from its
    /// agent, or rebuilt from `k` others when that agent is not usable, or both at once when the
    /// fetch is slower than `hedge` (the first answer wins; a winning rebuild keeps ranged reads
    /// off the agent for the cool-down time).
    async fn range_piece(
        &self,
        p: RangePiece,
        hedge: Option<Duration>,
    ) -> Result<(Vec<u8>, bool), Error> {
        let Some(client) = p.usable[p.idx].clone() else {
            return self.rebuild_range(&p).await.map(|b| (b, false));
        };
        let slot = p.slots[p.idx] as usize;
        let started = Instant::now();
        let direct = self.fetch_range(client, slot, &p.id, p.idx, p.off, p.len);
        tokio::pin!(direct);
        let others = p.usable.iter().filter(|c| c.is_some()).count() - 1;
        let hedge = match hedge {
            Some(h) if others >= self.codec.layout().k as usize => h,
            _ => return direct.await.map(|b| (b, false)),
        };
        tokio::select! {
            r = &mut direct => {
                if r.is_ok() {
                    self.note_range_time(started.elapsed());
                }
                return r.map(|b| (b, false));
            }
            () = tokio::time::sleep(hedge) => {}
        }
        let rebuild = self.rebuild_range(&p);
        tokio::pin!(rebuild);
        tokio::select! {
            r = &mut direct => match r {
                Ok(b) => Ok((b, true)),
                Err(_) => rebuild.await.map(|b| (b, true)),
            },
            r = &mut rebuild => match r {
                Ok(b) => {
                    // Ranged reads only: a whole-stripe read hedges on its own delay, and a
                    // cooled agent would make every whole stripe of a busy copy reconstruct.
                    self.keep_ranges_off(slot, self.cool_down);
                    Ok((b, true))
                }
                Err(_) => direct.await.map(|b| (b, true)),
            },
        }
    }

    /// Rebuilds a data-shard range from the same bytes of `k` other usable shards; the codec
    /// works on 64-byte blocks, so the range is widened to them (shard lengths are multiples
    /// of 64).
    async fn rebuild_range(&self, p: &RangePiece) -> Result<Vec<u8>, Error> {
        let layout = *self.codec.layout();
        let k = layout.k as usize;
        let (a, b) = (p.off / 64 * 64, (p.off + p.len).next_multiple_of(64));
        let helpers: Vec<(usize, AgentClient)> = p
            .usable
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != p.idx)
            .filter_map(|(j, c)| c.clone().map(|c| (j, c)))
            .take(k)
            .collect();
        if helpers.len() < k {
            return Err(Error::NotEnoughShards {
                have: helpers.len(),
                need: k,
            });
        }
        let mut parts = JoinSet::new();
        for (j, c) in helpers {
            let fetch = self.fetch_range(c, p.slots[j] as usize, &p.id, j, a, b - a);
            parts.spawn(async move { (j, fetch.await) });
        }
        let mut got: Vec<Option<Vec<u8>>> = vec![None; layout.shards()];
        while let Some(joined) = parts.join_next().await {
            match joined {
                Ok((j, Ok(bytes))) => got[j] = Some(bytes),
                Ok((_, Err(e))) => return Err(e),
                Err(e) => return Err(Error::Protocol(format!("range fetch: {e}"))),
            }
        }
        let refs: Vec<Option<&[u8]>> = got.iter().map(|g| g.as_deref()).collect();
        let whole = self.codec.rebuild_shard_range(&refs, p.idx)?;
        Ok(whole[p.off - a..p.off - a + p.len].to_vec())
    }

    /// Ranged reads leave the agent in `slot` alone for `d` (whole-stripe reads still use it).
    fn keep_ranges_off(&self, slot: usize, d: Duration) {
        self.no_ranges.hold(slot, d);
    }

    /// The connection to use for ranged reads from `slot`: none when the agent is absent, down
    /// or cooling, or failed a ranged read lately.
    fn range_client(&self, slot: usize) -> Option<AgentClient> {
        if self.no_ranges.holds(slot) || self.slot_down(slot) {
            return None;
        }
        self.slots.get(slot).and_then(OnceLock::get).cloned()
    }

    /// Fetches bytes `off..off + len` of shard `idx` from `client` (table slot `slot`) within
    /// the hedge delay. Slower: the agent cools down, like one a hedged fetch left behind. A
    /// failure other than a missing or corrupt shard (an agent too old for `GET_RANGE`, say)
    /// keeps ranged reads off the agent for [`NO_RANGES_FOR`].
    fn fetch_range(
        &self,
        client: AgentClient,
        slot: usize,
        id: &sa_core::seal::StripeId,
        idx: usize,
        off: usize,
        len: usize,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, Error>> + Send + 'static {
        let me = self.clone();
        let key = self.codec.key(id, idx);
        let wait = self.hedge.unwrap_or(Duration::from_secs(3600));
        async move {
            match tokio::time::timeout(wait, client.get_range(&key, off as u32, len as u32)).await {
                Ok(Ok(bytes)) => Ok(bytes),
                Err(_) => {
                    me.cool_down(slot);
                    Err(Error::AgentDown)
                }
                Ok(Err(e)) => {
                    if !matches!(e, Error::ShardMissing | Error::ShardCorrupt(_)) {
                        me.keep_ranges_off(slot, NO_RANGES_FOR);
                    }
                    Err(e)
                }
            }
        }
    }

    /// Reads stripe `i` (a zero stripe is returned as zeros without any fetch).
    ///
    /// Long by design: the launch, hedge and collect steps share the in-flight state of one
    /// `select!` loop, and splitting them would scatter that state over several structs.
    pub async fn read(&self, i: u64) -> Result<StripeData, StripeLost> {
        let layout = *self.codec.layout();
        let plain_len = layout.stripe_len(i);
        let (id, slots) = match &self.manifest.stripes[i as usize] {
            StripeRef::Zero => {
                return Ok(StripeData {
                    data: vec![0; plain_len],
                    problems: vec![],
                    reconstructed: false,
                    hedged: 0,
                    offsite: 0,
                })
            }
            StripeRef::Data { id, slots } => (*id, slots.clone()),
        };
        let k = layout.k as usize;
        let n = layout.shards();
        // Preference: data shards before parity; when serving (hedge set), healthy agents before
        // cooling or absent ones too. Restore keeps the plain order, so its report still counts
        // every shard on an absent agent.
        let mut order: Vec<usize> = (0..n).collect();
        if self.hedge.is_some() {
            order.sort_by_key(|&idx| self.slot_down(slots[idx] as usize));
        }
        let mut payloads: Vec<Option<Payload>> = vec![None; n];
        let mut problems = Vec::new();
        let mut next = 0usize;
        let mut good = 0usize;
        let mut hedged = 0usize;
        let mut in_flight = vec![false; n];
        let mut set = JoinSet::new();
        let launch = |set: &mut JoinSet<(usize, Result<Payload, Error>)>,
                      in_flight: &mut [bool],
                      idx: usize| {
            in_flight[idx] = true;
            let codec = self.codec.clone();
            let client = self
                .slots
                .get(slots[idx] as usize)
                .and_then(|c| c.get().cloned());
            set.spawn(async move {
                (
                    idx,
                    fetch_shard(&codec, client.as_ref(), &id, idx, plain_len).await,
                )
            });
        };
        let agents = !self.offsite.as_ref().is_some_and(|o| o.1);
        while agents && next < k {
            launch(&mut set, &mut in_flight, order[next]);
            next += 1;
        }
        let far = Duration::from_secs(3600);
        let hedge_timer = tokio::time::sleep(self.hedge.unwrap_or(far));
        tokio::pin!(hedge_timer);
        while good < k {
            let joined = tokio::select! {
                j = set.join_next() => j,
                () = &mut hedge_timer, if self.hedge.is_some() && next < n => {
                    launch(&mut set, &mut in_flight, order[next]);
                    next += 1;
                    hedged += 1;
                    let delay = self.hedge.unwrap_or(far);
                    hedge_timer.as_mut().reset(tokio::time::Instant::now() + delay);
                    continue;
                }
            };
            let Some(joined) = joined else { break };
            let (idx, result) = match joined {
                Ok(r) => {
                    in_flight[r.0] = false;
                    r
                }
                Err(e) => {
                    return Err(StripeLost {
                        stripe: i,
                        problems,
                        error: Error::Protocol(format!("fetch task: {e}")),
                    })
                }
            };
            match result {
                Ok(p) => {
                    self.fetched
                        .fetch_add(p.file_len() as u64, Ordering::Relaxed);
                    payloads[idx] = Some(p);
                    good += 1;
                }
                Err(e) => {
                    let problem = Problem::of(&e);
                    if problem == Problem::Unreachable {
                        self.cool_down(slots[idx] as usize);
                    }
                    problems.push(ShardProblem {
                        index: idx,
                        slot: slots[idx] as usize,
                        problem,
                        detail: e.to_string(),
                    });
                    // Keep k fetches in flight while shards are left to try.
                    if next < n && set.len() + good < k {
                        launch(&mut set, &mut in_flight, order[next]);
                        next += 1;
                    }
                }
            }
        }
        set.abort_all();
        if hedged > 0 {
            // Agents still silent after a hedge are slow: ask them last for a while.
            for (idx, _) in in_flight.iter().enumerate().filter(|(_, f)| **f) {
                self.cool_down(slots[idx] as usize);
            }
        }
        let mut offsite = 0;
        if good < k {
            if let Some((store, _)) = &self.offsite {
                offsite = self
                    .fill_from_offsite(store, &id, plain_len, &mut payloads)
                    .await;
                good += offsite;
                self.offsite_used
                    .fetch_add(offsite as u64, Ordering::Relaxed);
            }
        }
        if good < k {
            return Err(StripeLost {
                stripe: i,
                problems,
                error: Error::NotEnoughShards {
                    have: good,
                    need: k,
                },
            });
        }
        // With more than k good shards (hedging), keep exactly k so the decoder has no choice to
        // make; prefer data shards, which need no reconstruction.
        let mut kept = 0;
        for p in payloads.iter_mut() {
            if p.is_some() {
                if kept == k {
                    *p = None;
                } else {
                    kept += 1;
                }
            }
        }
        let reconstructed = payloads.iter().take(k).any(|p| p.is_none());
        let codec = self.codec.clone();
        let buf = self
            .pool
            .as_ref()
            .map(|p| p.take(layout.shard_len(layout.stripe_size as usize) * k))
            .unwrap_or_default();
        let decoded =
            tokio::task::spawn_blocking(move || codec.decode_into(&id, plain_len, payloads, buf))
                .await;
        match decoded {
            Ok(Ok(data)) => Ok(StripeData {
                data,
                problems,
                reconstructed,
                hedged,
                offsite,
            }),
            Ok(Err(error)) => Err(StripeLost {
                stripe: i,
                problems,
                error,
            }),
            Err(e) => Err(StripeLost {
                stripe: i,
                problems,
                error: Error::Protocol(format!("decode task: {e}")),
            }),
        }
    }
}

impl StripeReader {
    /// Fills `payloads` up to `k` good shards from the bucket: the stripe's pack (its `k` data
    /// shards, or all `k + m`) is fetched once and each shard it holds that is still absent is
    /// checked like one from an agent. Returns how many it gave; failures are logged.
    async fn fill_from_offsite(
        &self,
        store: &crate::offsite::OffsiteStore,
        id: &sa_core::seal::StripeId,
        plain_len: usize,
        payloads: &mut [Option<Payload>],
    ) -> usize {
        let layout = *self.codec.layout();
        let (k, n) = (layout.k as usize, layout.shards());
        let volume = self.codec.key(id, 0).volume;
        let mut files = Err(Error::ShardMissing);
        for count in [k, n] {
            files = store.get_pack(&volume, id, count).await;
            if !matches!(files, Err(Error::ShardMissing)) {
                break;
            }
        }
        let files = match files {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    "offsite {}: stripe {} unusable: {e}",
                    store.name(),
                    self.codec.key(id, 0).short()
                );
                return 0;
            }
        };
        let mut have = payloads.iter().filter(|p| p.is_some()).count();
        let mut gave = 0;
        for (idx, file) in files.into_iter().enumerate() {
            if have >= k || idx >= payloads.len() || payloads[idx].is_some() {
                continue;
            }
            match self.codec.check(id, idx, plain_len, file) {
                Ok(p) => {
                    payloads[idx] = Some(p);
                    have += 1;
                    gave += 1;
                }
                Err(e) => tracing::warn!(
                    "offsite {}: shard {} unusable: {e}",
                    store.name(),
                    self.codec.key(id, idx).short()
                ),
            }
        }
        gave
    }
}

//! Live restore (`sa-image serve SNAPSHOT --hydrate TARGET`): serve the snapshot at once, writable,
//! while a background copier moves every stripe onto TARGET; when it is done TARGET alone is the
//! disk: the snapshot plus every write made while serving.
//!
//! ```text
//! NBD READ ──▶ block on TARGET? (its stripe filled, or the block written) ──yes──▶ pread TARGET
//!                                     └─no──▶ Snapshot (cache, agents)
//! NBD WRITE ─▶ [write lock, exclusive] read-modify-write partial blocks ─▶ pwrite TARGET ─▶ mark blocks written
//! copier ────▶ stripe i from the Snapshot ─▶ [write lock, shared] pwrite its unwritten blocks ─▶ mark i filled
//! FLUSH / FUA, and the copier every second ─▶ fdatasync TARGET ─▶ write changed bitmap pages ─▶ fdatasync state
//! ```
//!
//! The copier passes by the guest's caches: a stripe already in the stripe cache is used, any
//! other is fetched without being cached (`ServedSnapshot::stripe_passing`), and its blocks are
//! written with `O_DIRECT` where the target allows ([`crate::direct`]), so copying the whole disk
//! evicts neither the stripes nor the pages the guest reads.
//!
//! # The state file
//!
//! `TARGET.hydrate` next to a file target, or the file given by `--hydrate-state` (required for a
//! block device: there is no persistent place next to `/dev/sdb`). Little-endian; frozen, the
//! version is in the header — PLEASE DO NOT MODIFY, add a version:
//!
//! | bytes | field |
//! |---|---|
//! | 0..8 | magic `SA-HYDRT` |
//! | 8..10 | format version (1) |
//! | 10..12 | flags: bit 0 = TARGET read as zeroes when hydration began (a file `serve` created) |
//! | 12..16 | block size (4096) |
//! | 16..24 | volume size in bytes |
//! | 24..28 | stripe size in bytes |
//! | 28..32 | reserved, 0 |
//! | 32..64 | snapshot id, ASCII, zero-padded |
//! | 64..4096 | reserved, 0 |
//! | 4096.. | *filled* bitmap, one bit per stripe, padded to a multiple of 4096 bytes |
//! | then | *written* bitmap, one bit per 4 KiB block of the volume |
//!
//! Bit `i % 64` of little-endian word `i / 64` is stripe (or block) `i`. A stripe is *filled* when
//! every block of it that is not *written* holds the snapshot's bytes on TARGET; a block is
//! *written* when an NBD write put it on TARGET. A block is served from TARGET when its stripe is
//! filled or it is written, else from the snapshot. The state belongs to one snapshot and volume
//! size: opening it for another is refused. A new state file is made under a temporary name,
//! synced and renamed into place, before a missing TARGET file is created.
//!
//! # Ordering rules that keep writes safe
//!
//! 1. **One lock.** Every NBD write (with its read-modify-write of partial blocks) holds the
//!    export's write lock ([`ServeSource::write_lock`]) exclusively and the copier's write of a
//!    stripe holds it shared, so a copy and a write never interleave (copies of different
//!    stripes may: each writes only its own stripe's blocks and sets only its own bit). The copier fetches outside the lock and,
//!    holding it, writes only the blocks not marked *written*: a guest write is never overwritten.
//! 2. **Every NBD write marks its blocks written**, also in filled stripes: if the *filled* bit of a
//!    stripe did not reach the disk before a crash, the resumed copier still skips those blocks.
//! 3. **Data before bits.** A bit is set in memory only after its data was written to TARGET; a
//!    flush takes the changed bitmap pages, then `fdatasync`s TARGET, then writes and syncs the
//!    pages. So a bit on disk never names data that is not on TARGET's disk, and after a crash
//!    a stripe either is marked filled with its data durable, or is copied again.
//! 4. **A partial-block write into a block not on TARGET** first reads that block from the
//!    snapshot (under the lock) and writes the whole merged block.
//! 5. **Flush and FUA** answer only after rule 3 ran: the writes before them survive a crash.
//!    Writes not flushed may be lost or kept, as NBD allows.
//!
//! # The copier
//!
//! Stripes not filled are copied in order, at most [`PARALLEL`] at a time, paced to
//! `--hydrate-rate` bytes per second ([`DEFAULT_RATE`] unless told otherwise; `unlimited` or `0`
//! for none). It reads through the same single-flight stripe cache as the guest (a stripe the
//! guest is reading is fetched once), and yields: while the guest has had a read answered from
//! the agents within the last [`BUSY_WINDOW`], the copier keeps one stripe in flight, not
//! [`PARALLEL`]. Zero stripes cost nothing on a fresh file (it already reads as zeroes: they are
//! just marked); on a block device or a reused file they are written as zeroes. Progress is
//! checkpointed (rule 3) every [`CHECKPOINT_EVERY`]. A stripe that cannot be fetched (too many
//! agents gone) is retried after [`RETRY_AFTER`] until it can; a write error on TARGET stops the
//! copier (serving goes on) and is logged.
//!
//! Longer than the engine's ~600-line rule on purpose: the five ordering rules above and the
//! code that keeps them (the NBD write path, the copier, the flush) are read against each other
//! in one file; the on-disk format and its bitmaps are apart, in [`state`].

pub mod state;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::direct::TargetWriter;
use crate::error::{Error, IoContext, Result};
use async_trait::async_trait;
use sa_core::layout::Layout;
use sa_core::size::format_size;
use serde::Serialize;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use self::state::{State, FLAG_TARGET_ZEROED};
use super::overlay::BLOCK;
use super::snapshot::Snapshot;
#[cfg(doc)]
use super::source::ServeSource;
use super::source::WriteLayer;

/// Hydration rate unless `--hydrate-rate` says otherwise: about half of a gigabit link, so a
/// guest reading from the agents over the same link keeps the other half.
pub const DEFAULT_RATE: u64 = 64 << 20;
/// Stripes the copier has in flight at most (the guest's reads have `FETCH_PARALLEL` in all).
pub const PARALLEL: usize = 8;
/// A guest read answered from the agents this recently makes the copier keep one stripe in flight.
pub const BUSY_WINDOW: Duration = Duration::from_secs(1);
/// How often the copier makes its progress durable.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How long the copier waits before retrying stripes it could not fetch.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The state file used for `target` when `--hydrate-state` is not given: `TARGET.hydrate`.
pub fn default_state_path(target: &Path) -> PathBuf {
    let mut name = target
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(".hydrate");
    target.with_file_name(name)
}

/// Counters of a live restore.
#[derive(Debug, Default)]
struct Counters {
    hydrated_stripes: AtomicU64,
    hydrate_bytes: AtomicU64,
    reads_from_target: AtomicU64,
    reads_from_agents: AtomicU64,
    /// Milliseconds since start of the last read answered (partly) from the snapshot, plus one.
    last_remote_read: AtomicU64,
    /// Milliseconds since start when hydration completed, plus one; 0 while not complete.
    done_at: AtomicU64,
}

/// What `serve --json` adds for a live restore.
#[derive(Debug, Serialize)]
pub struct HydrateReport {
    /// The target.
    pub hydrate_target: String,
    /// Its state file.
    pub hydrate_state: String,
    /// Whether every stripe is on the target.
    pub hydrate_complete: bool,
    /// Stripes of the volume.
    pub hydrate_stripes_total: u64,
    /// Stripes on the target now (from this run and earlier ones).
    pub hydrate_stripes_filled: u64,
    /// Stripes this run copied (or, for zero stripes on a fresh file, marked).
    pub hydrated_stripes: u64,
    /// Bytes this run's copier wrote to the target.
    pub hydrate_bytes: u64,
    /// Seconds from start until hydration completed (or until now, if it did not).
    pub hydrate_seconds: f64,
    /// Reads answered from the target alone.
    pub reads_from_target: u64,
    /// Reads that needed the snapshot for some of their bytes.
    pub reads_from_agents: u64,
    /// Blocks (4 KiB) written through NBD, this run and earlier ones.
    pub written_blocks: u64,
}

/// The target of a live restore and its progress: the [`WriteLayer`] of a hydrating export.
pub struct Hydrate {
    target: Arc<File>,
    /// Copied stripes go to the target through this (`O_DIRECT` where it can: a whole-disk copy
    /// does not push the guest's pages out of the page cache).
    copy_writer: Arc<TargetWriter>,
    path: PathBuf,
    is_device: bool,
    state: State,
    layout: Layout,
    counters: Counters,
    started: Instant,
    /// `Some((stripes, seconds))` once hydration is complete.
    done: watch::Sender<Option<(u64, f64)>>,
}

impl Hydrate {
    /// A receiver that holds `Some((stripes copied, seconds))` once hydration is complete.
    pub fn done(&self) -> watch::Receiver<Option<(u64, f64)>> {
        self.done.subscribe()
    }

    /// Opens (or starts) the live restore of `snapshot` onto `target`, with its state at
    /// `state_path` (default: [`default_state_path`]; required for a block device).
    ///
    /// Long by design: each refusal below guards one way a target could be overwritten by
    /// mistake, and they read best in the order they are checked.
    pub fn open(
        target: &Path,
        state_path: Option<&Path>,
        layout: Layout,
        snapshot: &str,
    ) -> Result<Hydrate> {
        let size = layout.volume_size;
        let meta = std::fs::metadata(target).ok();
        let is_device = meta
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        if meta
            .as_ref()
            .is_some_and(|m| !is_device && !m.file_type().is_file())
        {
            return Err(Error::invalid(format!(
                "--hydrate {}: neither a block device nor a regular file",
                target.display()
            )));
        }
        let state_path = match state_path {
            Some(p) => p.to_path_buf(),
            None if is_device => return Err(Error::invalid(format!(
                "--hydrate {} is a block device: give --hydrate-state FILE, a file on persistent storage \
                 (not /dev) where the progress is kept, so a restart resumes",
                target.display()
            ))),
            None => default_state_path(target),
        };
        if state_path == target {
            return Err(Error::invalid(
                "--hydrate-state must not be the target itself",
            ));
        }
        if !State::exists(&state_path) {
            let fresh = match &meta {
                None => true,
                Some(m) if !is_device => m.len() == 0,
                Some(_) => false,
            };
            if !is_device && !fresh {
                return Err(Error::invalid(format!(
                    "{} exists but its state file {} does not: it is not the target of a live restore \
                     started by `sa-image serve` (its contents would be overwritten); remove it, or give \
                     another --hydrate path",
                    target.display(),
                    state_path.display()
                )));
            }
            State::create(
                &state_path,
                size,
                layout.stripe_size,
                snapshot,
                if fresh { FLAG_TARGET_ZEROED } else { 0 },
            )?;
        }
        let state = State::open(&state_path, size, layout.stripe_size, snapshot)?;
        let file = if is_device {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(target)
                .ctx(|| {
                    format!(
                        "cannot open {} for writing (root needed?)",
                        target.display()
                    )
                })?;
            let dev_size = std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
                .ctx(|| format!("cannot find the size of {}", target.display()))?;
            if dev_size < size {
                return Err(Error::invalid(format!(
                    "{} holds {dev_size} bytes but the snapshot needs {size}: use a larger disk",
                    target.display()
                )));
            }
            f
        } else {
            if meta.is_none()
                && (state.filled.count() > 0 || state.written.count() > 0 || !state.target_zeroed())
            {
                return Err(Error::invalid(format!(
                    "target {} is gone but its state file {} says part of it was restored: remove the \
                     state file to start again",
                    target.display(),
                    state_path.display()
                )));
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(target)
                .ctx(|| format!("cannot open {}", target.display()))?;
            let len = f
                .metadata()
                .ctx(|| format!("cannot read the size of {}", target.display()))?
                .len();
            if len < size {
                f.set_len(size).ctx(|| {
                    format!(
                        "cannot size {} to {size} bytes (disk full?)",
                        target.display()
                    )
                })?;
                f.sync_all()
                    .and_then(|()| sa_core::durable::sync_parent(target))
                    .ctx(|| format!("cannot sync {}", target.display()))?;
            }
            f
        };
        let file = Arc::new(file);
        Ok(Hydrate {
            copy_writer: Arc::new(TargetWriter::new(file.clone(), target)),
            target: file,
            path: target.to_path_buf(),
            is_device,
            state,
            layout,
            counters: Counters::default(),
            started: Instant::now(),
            done: watch::channel(None).0,
        })
    }

    /// The target's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state file's path.
    pub fn state_path(&self) -> &Path {
        self.state.path()
    }

    /// Stripes on the target.
    pub fn filled_stripes(&self) -> u64 {
        self.state.filled.count()
    }

    /// Whether every stripe is on the target.
    pub fn complete(&self) -> bool {
        self.filled_stripes() >= self.layout.stripe_count()
    }

    fn ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64 + 1
    }

    fn guest_busy(&self) -> bool {
        let last = self.counters.last_remote_read.load(Ordering::Relaxed);
        last != 0 && self.ms().saturating_sub(last) < BUSY_WINDOW.as_millis() as u64
    }

    /// The counters so far.
    pub fn report(&self) -> HydrateReport {
        let c = &self.counters;
        let done = c.done_at.load(Ordering::Relaxed);
        HydrateReport {
            hydrate_target: self.path.display().to_string(),
            hydrate_state: self.state.path().display().to_string(),
            hydrate_complete: self.complete(),
            hydrate_stripes_total: self.layout.stripe_count(),
            hydrate_stripes_filled: self.filled_stripes(),
            hydrated_stripes: c.hydrated_stripes.load(Ordering::Relaxed),
            hydrate_bytes: c.hydrate_bytes.load(Ordering::Relaxed),
            hydrate_seconds: if done > 0 {
                (done - 1) as f64 / 1000.0
            } else {
                self.started.elapsed().as_secs_f64()
            },
            reads_from_target: c.reads_from_target.load(Ordering::Relaxed),
            reads_from_agents: c.reads_from_agents.load(Ordering::Relaxed),
            written_blocks: self.state.written.count(),
        }
    }

    /// Whether block `b` is served from the target.
    fn present(&self, b: u64) -> bool {
        self.state.written.get(b) || self.state.filled.get(self.layout.stripe_of(b * BLOCK))
    }

    /// Runs of `offset..offset + len` by `pick(block)`, where a filled stripe counts as
    /// `filled_value` for all its blocks (None: ask `pick`).
    fn runs_by(
        &self,
        offset: u64,
        len: u64,
        filled_value: Option<bool>,
        pick: impl Fn(u64) -> bool,
    ) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let i = self.layout.stripe_of(at);
            let (n, v) = match filled_value.filter(|_| self.state.filled.get(i)) {
                Some(v) => {
                    let s_end = self.layout.stripe_offset(i) + self.layout.stripe_len(i) as u64;
                    (s_end.min(end) - at, v)
                }
                None => {
                    let b = at / BLOCK;
                    (((b + 1) * BLOCK).min(end) - at, pick(b))
                }
            };
            match out.last_mut() {
                Some(last) if last.2 == v => last.1 += n,
                _ => out.push((at, n, v)),
            }
            at += n;
        }
        out
    }

    /// Fills stripe `i` from `data` (None: zeroes), sparing the blocks written through NBD.
    /// The caller holds the write lock (shared). Returns the bytes written.
    async fn fill(&self, i: u64, data: Option<super::cache::Stripe>) -> std::io::Result<u64> {
        let s_off = self.layout.stripe_offset(i);
        let s_len = self.layout.stripe_len(i) as u64;
        let runs: Vec<(u64, u64)> = self
            .runs_by(s_off, s_len, None, |b| self.state.written.get(b))
            .into_iter()
            .filter(|r| !r.2)
            .map(|(at, n, _)| (at, n))
            .collect();
        let bytes: u64 = runs.iter().map(|r| r.1).sum();
        let f = self.copy_writer.clone();
        blocking(move || {
            let zeros = if data.is_none() {
                vec![0u8; s_len as usize]
            } else {
                Vec::new()
            };
            for (at, n) in runs {
                let from = (at - s_off) as usize;
                let src = match &data {
                    Some(d) => d.get(from..from + n as usize).ok_or_else(|| {
                        std::io::Error::other(format!("stripe {i} decoded to {} bytes", d.len()))
                    })?,
                    None => &zeros[from..from + n as usize],
                };
                f.write_all_at(src, at)?;
            }
            Ok(())
        })
        .await?;
        self.state.filled.set_range(i, i);
        Ok(bytes)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(e)),
    }
}

#[async_trait]
impl WriteLayer for Hydrate {
    fn any(&self, offset: u64, len: u64) -> bool {
        if len == 0 {
            return false;
        }
        let (first, last) = (
            self.layout.stripe_of(offset),
            self.layout.stripe_of(offset + len - 1),
        );
        if (first..=last).any(|i| self.state.filled.get(i)) {
            return true;
        }
        (offset / BLOCK..=(offset + len - 1) / BLOCK).any(|b| self.state.written.get(b))
    }

    fn runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        self.runs_by(offset, len, Some(true), |b| self.present(b))
    }

    fn written_any(&self, offset: u64, len: u64) -> bool {
        len > 0 && (offset / BLOCK..=(offset + len - 1) / BLOCK).any(|b| self.state.written.get(b))
    }

    fn written_runs(&self, offset: u64, len: u64) -> Vec<(u64, u64, bool)> {
        self.runs_by(offset, len, None, |b| self.state.written.get(b))
    }

    async fn read(&self, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
        let f = self.target.clone();
        blocking(move || {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, offset)?;
            Ok(buf)
        })
        .await
    }

    async fn write_blocks(&self, offset: u64, data: Vec<u8>) -> std::io::Result<()> {
        debug_assert_eq!(offset % BLOCK, 0);
        if data.is_empty() {
            return Ok(());
        }
        let end = offset + data.len() as u64;
        let f = self.target.clone();
        blocking(move || f.write_all_at(&data, offset)).await?;
        // Rule 2: marked written even in a filled stripe.
        self.state
            .written
            .set_range(offset / BLOCK, (end - 1) / BLOCK);
        Ok(())
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.state.flush(&self.target).await
    }

    fn note_read(&self, from_layer_only: bool) {
        let c = &self.counters;
        if from_layer_only {
            c.reads_from_target.fetch_add(1, Ordering::Relaxed);
        } else {
            c.reads_from_agents.fetch_add(1, Ordering::Relaxed);
            c.last_remote_read.store(self.ms(), Ordering::Relaxed);
        }
    }
}

/// Spaces out the copier's starts so that it moves at most `rate` bytes per second.
struct Pacer {
    rate: Option<u64>,
    next: tokio::time::Instant,
}

impl Pacer {
    /// Waits until `bytes` more may start; false if `stop` fired meanwhile.
    async fn admit(&mut self, bytes: u64, stop: &mut watch::Receiver<bool>) -> bool {
        let Some(rate) = self.rate else {
            return !*stop.borrow();
        };
        let now = tokio::time::Instant::now();
        // No credit saved up while idle or behind: at most the current stripe at once.
        self.next = self.next.max(now);
        let at = self.next;
        self.next += Duration::from_secs_f64(bytes as f64 / rate as f64);
        let stopped = tokio::select! {
            _ = tokio::time::sleep_until(at) => false,
            _ = stop.wait_for(|s| *s) => true,
        };
        !stopped && !*stop.borrow()
    }
}

/// How one stripe's copy ended.
enum Filled {
    Done(u64),
    /// It could not be fetched now (too many agents gone): try again later.
    Unavailable(u64, String),
}

/// The background copier of a live restore.
pub struct Copier {
    hyd: Arc<Hydrate>,
    snapshot: Arc<Snapshot>,
    writing: Arc<tokio::sync::RwLock<()>>,
    rate: Option<u64>,
    announced: AtomicBool,
}

impl Copier {
    /// A copier filling `hyd` from `snapshot`, taking `writing` (the export's write lock, see
    /// [`ServeSource::write_lock`]) around each stripe it writes, at most `rate` bytes per second.
    pub fn new(
        hyd: Arc<Hydrate>,
        snapshot: Arc<Snapshot>,
        writing: Arc<tokio::sync::RwLock<()>>,
        rate: Option<u64>,
    ) -> Copier {
        Copier {
            hyd,
            snapshot,
            writing,
            rate,
            announced: AtomicBool::new(false),
        }
    }

    async fn copy_one(&self, i: u64) -> std::io::Result<Filled> {
        let data = if self.snapshot.is_zero(i) {
            None
        } else {
            match self.snapshot.stripe_passing(i).await {
                Ok(d) => Some(d),
                Err(e) => return Ok(Filled::Unavailable(i, e.to_string())),
            }
        };
        // Shared with other copies (they fill different stripes), exclusive of guest writes.
        let _w = self.writing.read().await;
        Ok(Filled::Done(self.hyd.fill(i, data).await?))
    }

    fn counted(
        &self,
        r: Result<std::io::Result<Filled>, tokio::task::JoinError>,
        failed: &mut Vec<u64>,
    ) -> std::io::Result<()> {
        let c = &self.hyd.counters;
        match r.map_err(std::io::Error::other)?? {
            Filled::Done(bytes) => {
                c.hydrated_stripes.fetch_add(1, Ordering::Relaxed);
                c.hydrate_bytes.fetch_add(bytes, Ordering::Relaxed);
            }
            Filled::Unavailable(i, why) => {
                tracing::debug!("hydrate: stripe {i} not available now: {why}");
                failed.push(i);
            }
        }
        Ok(())
    }

    /// Copies every stripe not yet on the target, until done or until `stop` turns true; the
    /// stripes in flight then finish and the progress is made durable.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let hyd = self.hyd.clone();
        match self.copy_all(&mut stop).await {
            Ok(true) => {}
            Ok(false) => tracing::info!(
                "hydration stopped at {} of {} stripes; the next `serve --hydrate {}` resumes",
                hyd.filled_stripes(),
                hyd.layout.stripe_count(),
                hyd.path.display()
            ),
            Err(e) => tracing::error!(
                "hydration of {} stopped: {e}; serving goes on (reads of stripes not on it come from the agents); \
                 fix the target and restart serve to resume",
                hyd.path.display()
            ),
        }
    }

    /// True when complete, false when stopped.
    async fn copy_all(self, stop: &mut watch::Receiver<bool>) -> std::io::Result<bool> {
        let me = Arc::new(self);
        let hyd = &me.hyd;
        let count = hyd.layout.stripe_count();
        let mut todo: Vec<u64> = (0..count).filter(|&i| !hyd.state.filled.get(i)).collect();
        if todo.is_empty() {
            me.complete()?;
            return Ok(true);
        }
        let todo_bytes: u64 = todo.iter().map(|&i| hyd.layout.stripe_len(i) as u64).sum();
        tracing::info!(
            "hydrating {}: {} of {count} stripes ({}) to copy{}, at {}",
            hyd.path.display(),
            todo.len(),
            format_size(todo_bytes),
            if todo.len() as u64 == count {
                String::new()
            } else {
                format!(
                    ", {} already there from an earlier run",
                    count - todo.len() as u64
                )
            },
            me.rate.map_or("full speed".to_string(), |r| format!(
                "{}/s",
                format_size(r)
            ))
        );
        let mut pacer = Pacer {
            rate: me.rate,
            next: tokio::time::Instant::now(),
        };
        loop {
            let mut failed = Vec::new();
            me.pass(std::mem::take(&mut todo), &mut pacer, stop, &mut failed)
                .await?;
            hyd.flush().await?;
            if *stop.borrow() {
                return Ok(false);
            }
            if failed.is_empty() && hyd.complete() {
                me.complete()?;
                return Ok(true);
            }
            failed.sort_unstable();
            tracing::warn!(
                "hydration: {} stripes cannot be fetched now (first: stripe {}); retrying in {}s \
                 (bring the agents that are down back)",
                failed.len(),
                failed.first().copied().unwrap_or_default(),
                RETRY_AFTER.as_secs()
            );
            tokio::select! {
                _ = tokio::time::sleep(RETRY_AFTER) => {}
                _ = stop.wait_for(|s| *s) => return Ok(false),
            }
            todo = failed;
        }
    }

    /// One pass over `todo`; stripes that could not be fetched go to `failed`. Returns only
    /// when none of its copies is in flight any more (an aborted copy could still be writing
    /// after giving up the write lock).
    async fn pass(
        self: &Arc<Self>,
        todo: Vec<u64>,
        pacer: &mut Pacer,
        stop: &mut watch::Receiver<bool>,
        failed: &mut Vec<u64>,
    ) -> std::io::Result<()> {
        let hyd = &self.hyd;
        let zeroed = hyd.state.target_zeroed() && !hyd.is_device;
        let slots = Arc::new(Semaphore::new(PARALLEL));
        let mut last_checkpoint = Instant::now();
        let mut set: JoinSet<std::io::Result<Filled>> = JoinSet::new();
        let mut result = Ok(());
        for i in todo {
            if *stop.borrow() || result.is_err() {
                break;
            }
            if hyd.state.filled.get(i) {
                continue;
            }
            if zeroed && self.snapshot.is_zero(i) {
                // Nothing to write: the unwritten blocks of a fresh file read as zeroes.
                hyd.state.filled.set_range(i, i);
                hyd.counters
                    .hydrated_stripes
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if !pacer.admit(hyd.layout.stripe_len(i) as u64, stop).await {
                break;
            }
            let permit = if hyd.guest_busy() {
                slots.clone().acquire_many_owned(PARALLEL as u32).await
            } else {
                slots.clone().acquire_owned().await
            };
            let Ok(permit) = permit else { break };
            let c = self.clone();
            set.spawn(async move {
                let _permit = permit;
                c.copy_one(i).await
            });
            while let Some(r) = set.try_join_next() {
                result = result.and(self.counted(r, failed));
            }
            if result.is_ok() && last_checkpoint.elapsed() >= CHECKPOINT_EVERY {
                result = hyd.flush().await;
                last_checkpoint = Instant::now();
            }
        }
        while let Some(r) = set.join_next().await {
            result = result.and(self.counted(r, failed));
        }
        result
    }

    /// Says that hydration is complete (once): log, and the `done` channel.
    fn complete(&self) -> std::io::Result<()> {
        if self.announced.swap(true, Ordering::Relaxed) {
            return Ok(());
        }
        let hyd = &self.hyd;
        let c = &hyd.counters;
        c.done_at.store(hyd.ms(), Ordering::Relaxed);
        let n = c.hydrated_stripes.load(Ordering::Relaxed);
        let secs = hyd.started.elapsed().as_secs_f64();
        let bytes = c.hydrate_bytes.load(Ordering::Relaxed);
        tracing::info!(
            "hydration complete: {} is now the whole disk ({n} stripes, {} written, in {secs:.1}s; \
             {} blocks written through NBD); it no longer needs the agents",
            hyd.path.display(),
            format_size(bytes),
            hyd.state.written.count()
        );
        hyd.done.send_replace(Some((n, secs)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(size: u64) -> Layout {
        Layout::new(size, 1 << 20, 4, 2).unwrap()
    }

    #[tokio::test]
    async fn fill_spares_written_blocks_and_runs_split_by_presence() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("t.img");
        let size = 3 << 20;
        let h = Hydrate::open(&target, None, layout(size), "snap").unwrap();
        assert!(dir.path().join("t.img.hydrate").exists());
        // Guest writes block 1 of stripe 0, then the copier fills stripe 0.
        h.write_blocks(BLOCK, vec![7; BLOCK as usize])
            .await
            .unwrap();
        assert_eq!(
            h.runs(0, 3 * BLOCK),
            vec![
                (0, BLOCK, false),
                (BLOCK, BLOCK, true),
                (2 * BLOCK, BLOCK, false)
            ]
        );
        let stripe = Arc::new(vec![1u8; 1 << 20]);
        let n = h.fill(0, Some(stripe)).await.unwrap();
        assert_eq!(n, (1 << 20) - BLOCK);
        assert_eq!(
            h.runs(0, 2 << 20),
            vec![(0, 1 << 20, true), (1 << 20, 1 << 20, false)]
        );
        assert_eq!(h.read(0, 4).await.unwrap(), vec![1; 4]);
        assert_eq!(h.read(BLOCK, 4).await.unwrap(), vec![7; 4]);
        assert!(h.written_any(0, 2 * BLOCK) && !h.written_any(2 * BLOCK, 1 << 20));
        h.flush().await.unwrap();
        drop(h);
        // Resumed: the progress is there; an existing file without state is refused.
        let h = Hydrate::open(&target, None, layout(size), "snap").unwrap();
        assert_eq!(h.filled_stripes(), 1);
        assert!(h.state.written.get(1));
        drop(h);
        let other = dir.path().join("other.img");
        std::fs::write(&other, b"precious").unwrap();
        assert!(Hydrate::open(&other, None, layout(size), "snap").is_err());
        assert_eq!(std::fs::read(&other).unwrap(), b"precious");
    }
}

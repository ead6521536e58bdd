//! Uploading to the offsite tier (`sa-image offsite push`, and after each snapshot when a volume
//! has an offsite table).
//!
//! Order, so that the bucket never names what it does not hold:
//! 1. the tombstones of forgotten snapshots the bucket lacks, then the bucket's copies of those
//!    snapshots' manifests are deleted (their shards go at the next [`super::sweep`]);
//! 2. for every live snapshot whose newest manifest revision the bucket lacks: the shards of its
//!    stripes that the bucket lacks (listed once per volume and stripe-id byte, so memory stays
//!    one listing page group, not the bucket), then the manifest itself.
//!
//! A shard comes from the agent that holds it, checked (crc32c, header) before it travels. When
//! that agent is down or its copy is bad, the stripe is read back from any `k` shards (parity,
//! decryption, the id check) and re-encoded; encryption is deterministic, so the result is the
//! same file. A stripe's shards go up as one object (a pack, see [`super::store`]), [`PARALLEL`]
//! stripes at a time, paced to [`PushOptions::rate`]; memory is bounded by `PARALLEL` stripes
//! whatever the volume size.
//!
//! Resumable by construction: a push that dies part way left only whole objects (S3 PUTs are
//! atomic) and no manifest for the unfinished snapshot, so the next push lists what is there and
//! sends the rest.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sa_core::catalog::{load_tombstones, Tombstone};
use sa_core::manifest::{parse_blob_name, Manifest, StripeRef};
use sa_core::seal::StripeId;
use sa_core::shard::VolumeId;
use sa_core::store::{AgentClient, ShardRead};
use sa_core::stripe::StripeCodec;
use serde::Serialize;
use tokio::task::JoinSet;

use super::{OffsiteStore, ShardSet};
use crate::catalog::{self, clients_for};
use crate::error::{Error, Result};
use crate::fleet::{Access, Fleet};
use crate::progress::Progress;
use crate::read::StripeReader;
use crate::shutdown::Shutdown;

/// A volume and a first stripe-id byte: the unit the bucket is listed in.
type Group = (VolumeId, u8);
/// The shards the bucket holds of one group.
type Held = HashMap<StripeId, u8>;

/// Stripes uploaded at once.
pub const PARALLEL: usize = 8;

/// What to push.
#[derive(Debug, Clone, Default)]
pub struct PushOptions {
    /// Agent addresses (one is enough).
    pub agents: Vec<String>,
    /// Only this volume's snapshots (all volumes when `None`).
    pub volume: Option<String>,
    /// Bytes per second at most (`None`: as fast as the link goes).
    pub rate: Option<u64>,
    /// Which shards of each stripe.
    pub shards: ShardSet,
}

/// What a push did (`offsite push --json`, and `offsite` in `snapshot --json`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PushReport {
    /// The bucket.
    pub url: String,
    /// Live snapshots considered.
    pub snapshots: usize,
    /// Manifests uploaded (snapshots new to the bucket, or new revisions after a repair).
    pub manifests_uploaded: usize,
    /// Tombstones uploaded (snapshots forgotten since the last push).
    pub tombstones_uploaded: usize,
    /// Manifests of forgotten snapshots deleted from the bucket.
    pub manifests_deleted: usize,
    /// Distinct stripes of the snapshots pushed.
    pub stripes: u64,
    /// Shards uploaded.
    pub shards_uploaded: u64,
    /// Shards the bucket already held.
    pub shards_present: u64,
    /// Stripes read back from k shards and re-encoded (their agent was down or its copy bad).
    pub stripes_rebuilt: u64,
    /// Bytes uploaded (shards and blobs).
    pub bytes_uploaded: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Spaces out uploads so that they move at most `rate` bytes per second.
struct Pacer {
    rate: Option<u64>,
    next: Mutex<tokio::time::Instant>,
}

impl Pacer {
    async fn admit(&self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        let at = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = tokio::time::Instant::now();
            // No credit saved up while idle: at most one shard early.
            *next = (*next).max(now);
            let at = *next;
            *next += Duration::from_secs_f64(bytes as f64 / rate as f64);
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// One snapshot being pushed: its codec, its agents, a reader for stripes to rebuild.
struct Source {
    codec: Arc<StripeCodec>,
    manifest: Arc<Manifest>,
    slots: Vec<Option<AgentClient>>,
    reader: StripeReader,
}

/// Pushes the catalog's live snapshots to `offsite` (see the module docs).
pub async fn push(
    fleet: &Fleet,
    offsite: &OffsiteStore,
    opts: &PushOptions,
    progress: &dyn Progress,
    shutdown: &Shutdown,
) -> Result<PushReport> {
    let started = Instant::now();
    let mut report = PushReport {
        url: offsite.name().to_string(),
        ..Default::default()
    };
    let cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
    let keys = fleet.keys().clone();
    let held: HashSet<String> = offsite
        .list_blobs(sa_core::manifest::SNAPSHOT_BLOB_PREFIX)
        .await
        .map_err(|e| offsite_failed(offsite, e))?
        .into_iter()
        .collect();

    // 1. Tombstones first: the bucket must never show a forgotten snapshot as live.
    let live_agents = cat.reach.live();
    let mut forgotten: BTreeMap<String, Tombstone> = BTreeMap::new();
    for c in &live_agents {
        match load_tombstones(c, &keys, None).await {
            Ok(ts) => forgotten.extend(ts.into_iter().map(|t| (t.snapshot.clone(), t))),
            Err(e) => tracing::warn!("{}: cannot list tombstones: {e}", c.addr()),
        }
    }
    let bucket_tombs: HashSet<String> = offsite
        .list_blobs(sa_core::catalog::FORGOTTEN_BLOB_PREFIX)
        .await
        .map_err(|e| offsite_failed(offsite, e))?
        .into_iter()
        .collect();
    for (id, t) in &forgotten {
        let name = Tombstone::blob_name_of(id);
        if !bucket_tombs.contains(&name) {
            let sealed = t.seal(&keys)?;
            report.bytes_uploaded += sealed.len() as u64;
            offsite
                .put_blob(&name, sealed)
                .await
                .map_err(|e| offsite_failed(offsite, e))?;
            report.tombstones_uploaded += 1;
        }
        for name in held
            .iter()
            .filter(|n| parse_blob_name(n).is_some_and(|(s, _)| s == id))
        {
            offsite
                .delete_blob(name)
                .await
                .map_err(|e| offsite_failed(offsite, e))?;
            report.manifests_deleted += 1;
        }
    }

    // 2. Snapshots the bucket lacks (or lacks this revision of).
    let todo: Vec<&Manifest> = cat
        .manifests
        .iter()
        .filter(|m| opts.volume.as_deref().is_none_or(|v| m.volume_name == v))
        .collect();
    report.snapshots = todo.len();
    let todo: Vec<&Manifest> = todo
        .into_iter()
        .filter(|m| !held.contains(&m.blob_name()))
        .collect();
    let mut sources = Vec::new();
    for m in &todo {
        let m = Arc::new((*m).clone());
        let slots = clients_for(fleet, &m, &cat.reach).await;
        let codec = Arc::new(StripeCodec::new(keys.clone(), m.layout, m.volume)?);
        let reader = StripeReader::new(codec.clone(), m.clone(), slots.slots.clone());
        sources.push(Arc::new(Source {
            codec,
            manifest: m,
            slots: slots.slots,
            reader,
        }));
    }
    // Each distinct stripe once, ordered by volume and id so that the bucket is listed one
    // stripe-id byte at a time.
    let mut stripes: BTreeMap<(VolumeId, StripeId), (usize, u64)> = BTreeMap::new();
    for (si, s) in sources.iter().enumerate() {
        for (i, r) in s.manifest.stripes.iter().enumerate() {
            if let StripeRef::Data { id, .. } = r {
                stripes
                    .entry((s.manifest.volume, *id))
                    .or_insert((si, i as u64));
            }
        }
    }
    report.stripes = stripes.len() as u64;
    let total: u64 = stripes
        .values()
        .map(|&(si, i)| sources[si].manifest.layout.stripe_len(i) as u64)
        .sum();
    progress.start("offsite", total);
    let pacer = Arc::new(Pacer {
        rate: opts.rate,
        next: Mutex::new(tokio::time::Instant::now()),
    });
    // The bucket's shards of one (volume, stripe-id byte) group, listed when the group starts.
    let mut listed: Option<(Group, Held)> = None;
    let mut set: JoinSet<Result<Pushed>> = JoinSet::new();
    for (&(volume, id), &(si, i)) in &stripes {
        if shutdown.is_cancelled() {
            set.abort_all();
            return Err(Error::Interrupted(
                "offsite push stopped; the next push sends the rest".into(),
            ));
        }
        let group = (volume, id[0]);
        if listed.as_ref().is_none_or(|(g, _)| *g != group) {
            let have = offsite
                .packs_held(&volume, id[0])
                .await
                .map_err(|e| offsite_failed(offsite, e))?;
            listed = Some((group, have));
        }
        let have = listed.as_ref().map(|(_, h)| h);
        let src = sources[si].clone();
        let l = src.manifest.layout;
        let count = opts.shards.indices(l.k, l.m).len();
        let held = have.and_then(|h| h.get(&id)).copied().unwrap_or(0) as usize;
        let plain = l.stripe_len(i) as u64;
        if held >= count {
            report.shards_present += held as u64;
            progress.advance(plain);
            continue;
        }
        while set.len() >= PARALLEL {
            collect(&mut set, &mut report, progress).await?;
        }
        let (store, pacer) = (offsite.clone(), pacer.clone());
        set.spawn(async move {
            let mut p = push_stripe(&src, &store, &pacer, id, i, count).await?;
            p.plain = plain;
            Ok(p)
        });
    }
    while !set.is_empty() {
        collect(&mut set, &mut report, progress).await?;
    }
    // Every shard is in: now the manifests (sealed afresh: a manifest's seal is random, its
    // contents are the same).
    for s in &sources {
        let sealed = s.manifest.seal(&keys)?;
        report.bytes_uploaded += sealed.len() as u64;
        offsite
            .put_blob(&s.manifest.blob_name(), sealed)
            .await
            .map_err(|e| offsite_failed(offsite, e))?;
        report.manifests_uploaded += 1;
    }
    progress.finish();
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// An error of the bucket, with what to do about it.
fn offsite_failed(offsite: &OffsiteStore, e: sa_core::Error) -> Error {
    Error::failed(format!(
        "offsite copy to {} failed: {e}. Check the endpoint, the bucket and the credentials; \
         what was uploaded stays, and the next push (`sa-image offsite push`, or the next \
         snapshot) sends the rest",
        offsite.name()
    ))
}

/// One stripe's upload.
#[derive(Default)]
struct Pushed {
    shards: u64,
    bytes: u64,
    rebuilt: bool,
    plain: u64,
}

async fn collect(
    set: &mut JoinSet<Result<Pushed>>,
    report: &mut PushReport,
    progress: &dyn Progress,
) -> Result<()> {
    let Some(joined) = set.join_next().await else {
        return Ok(());
    };
    let p = joined.map_err(|e| Error::failed(format!("offsite upload task: {e}")))??;
    report.shards_uploaded += p.shards;
    report.bytes_uploaded += p.bytes;
    report.stripes_rebuilt += u64::from(p.rebuilt);
    progress.advance(p.plain);
    Ok(())
}

/// Uploads shards `0..count` of stripe `i` (id `id`) of `src` as the stripe's pack. They are
/// fetched from their agents at once; when one cannot be had, the stripe is read back and
/// re-encoded.
async fn push_stripe(
    src: &Source,
    store: &OffsiteStore,
    pacer: &Pacer,
    id: StripeId,
    i: u64,
    count: usize,
) -> Result<Pushed> {
    let layout = src.manifest.layout;
    let plain_len = layout.stripe_len(i);
    let slots = match &src.manifest.stripes[i as usize] {
        StripeRef::Data { slots, .. } => slots.clone(),
        StripeRef::Zero => return Ok(Pushed::default()),
    };
    let mut out = Pushed::default();
    let fetches = (0..count).map(|idx| {
        let key = src.codec.key(&id, idx);
        let client = src.slots.get(slots[idx] as usize).and_then(Option::as_ref);
        async move {
            let Some(c) = client else {
                return Err(sa_core::Error::AgentDown);
            };
            let file = c.get_shard(&key).await?;
            src.codec
                .check(&id, idx, plain_len, file)
                .map(|p| p.into_file())
        }
    });
    let got: Vec<_> = futures::future::join_all(fetches).await;
    let files: Vec<Vec<u8>> = if got.iter().all(Result::is_ok) {
        got.into_iter().flatten().collect()
    } else {
        let why = got
            .iter()
            .enumerate()
            .find_map(|(idx, r)| r.as_ref().err().map(|e| format!("shard {idx}: {e}")))
            .unwrap_or_default();
        tracing::info!("offsite: stripe {i} not taken from its agents ({why}); rebuilding it");
        let data = src.reader.read(i).await.map_err(|lost| {
            Error::failed(format!(
                "offsite: stripe {i} of snapshot {} cannot be read back: {}",
                src.manifest.snapshot, lost.error
            ))
        })?;
        let codec = src.codec.clone();
        let enc = tokio::task::spawn_blocking(move || codec.encode(id, data.data))
            .await
            .map_err(|e| Error::failed(format!("encode task: {e}")))?;
        out.rebuilt = true;
        enc.shards.into_iter().take(count).collect()
    };
    let bytes: usize = files.iter().map(Vec::len).sum();
    pacer.admit(bytes).await;
    store
        .put_pack(&src.manifest.volume, &id, files)
        .await
        .map_err(|e| offsite_failed(store, e))?;
    out.bytes = bytes as u64;
    out.shards = count as u64;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_pacer_keeps_the_rate() {
        let p = Pacer {
            rate: Some(10 << 20),
            next: Mutex::new(tokio::time::Instant::now()),
        };
        let t0 = std::time::Instant::now();
        for _ in 0..4 {
            p.admit(1 << 20).await;
        }
        // Four MiB at 10 MiB/s: the fourth starts 0.3 s after the first, not at once.
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t0.elapsed()
        );
        let free = Pacer {
            rate: None,
            next: Mutex::new(tokio::time::Instant::now()),
        };
        let t0 = std::time::Instant::now();
        free.admit(1 << 30).await;
        assert!(t0.elapsed() < Duration::from_millis(300));
    }
}

//! Serving a snapshot: open it ([`open`]: catalog, agents, cache, overlay or live-restore
//! target), then run the NBD server on the caller's listener until its [`Shutdown`] fires
//! ([`Served::run`]), and report what was served.
//!
//! The export answers to the default name `""` and to the snapshot id. Read-only unless an
//! overlay (writes go to a local file, never to the agents) or a hydrate target (live restore)
//! is given. When the server stops, the live-restore copier finishes the stripes in flight and
//! makes its progress durable, and the overlay or target is synced.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd_server::{rustls, Export, Exports, Server, ServerConfig};
use sa_core::size::format_size;
use sa_core::stripe::StripeCodec;
use serde::Serialize;
use tokio::net::TcpListener;

use super::hydrate::{Copier, Hydrate, HydrateReport};
use super::overlay::Overlay;
use super::snapshot::{Snapshot, READ_AHEAD};
use super::source::{ServeSource, WriteLayer};
use super::stats::{Counters, Stats};
use crate::catalog::{self, clients_for};
use crate::error::{Error, Result};
use crate::fleet::keepalive::KeepAlive;
use crate::fleet::{Access, Fleet};
use crate::read::{StripeReader, COOL_DOWN, HEDGE_AFTER};
use crate::shutdown::Shutdown;

/// Decoded stripes kept in memory unless told otherwise (256 MiB).
pub const DEFAULT_CACHE: u64 = 256 << 20;

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Snapshot id, unique prefix, or `latest`.
    pub snapshot: String,
    /// With `latest`: of this volume.
    pub volume: Option<String>,
    /// Agent addresses (one is enough).
    pub agents: Vec<String>,
    /// Writes go to this sparse file (and FILE.map), never to the agents.
    pub overlay: Option<PathBuf>,
    /// Live restore onto this target.
    pub hydrate: Option<PathBuf>,
    /// Most bytes per second the live-restore copier moves (None: unlimited).
    pub hydrate_rate: Option<u64>,
    /// Where the live-restore progress is kept (None: TARGET.hydrate).
    pub hydrate_state: Option<PathBuf>,
    /// Memory for decoded stripes, bytes.
    pub cache: u64,
    /// A shard fetch slower than this gets a parity fetch alongside.
    pub hedge_after: Duration,
    /// How long an agent that failed is asked last.
    pub cool_down: Duration,
    /// TLS: every client must start TLS first (built by [`tls_config`]).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Drop a client idle this long (None: never).
    pub idle_timeout: Option<Duration>,
    /// Agents (by id) never asked for a shard: their shards are rebuilt from parity, as if
    /// their PCs were off (a recovery drill, [`crate::drill`]).
    pub withhold: Vec<[u8; 16]>,
}

impl ServeOptions {
    /// Serving `snapshot` through `agents`, read-only, with the defaults.
    pub fn new(snapshot: &str, agents: Vec<String>) -> Self {
        ServeOptions {
            snapshot: snapshot.to_string(),
            volume: None,
            agents,
            overlay: None,
            hydrate: None,
            hydrate_rate: Some(super::hydrate::DEFAULT_RATE),
            hydrate_state: None,
            cache: DEFAULT_CACHE,
            hedge_after: HEDGE_AFTER,
            cool_down: COOL_DOWN,
            tls: None,
            idle_timeout: ServerConfig::default().idle_timeout,
            withhold: Vec::new(),
        }
    }
}

/// The TLS configuration from a certificate chain and its key (PEM files), and optionally the
/// CA whose client certificates are required.
pub fn tls_config(
    cert: Option<&std::path::Path>,
    key: Option<&std::path::Path>,
    client_ca: Option<&std::path::Path>,
) -> Result<Option<Arc<rustls::ServerConfig>>> {
    match (cert, key) {
        (None, None) if client_ca.is_some() => Err(Error::invalid(
            "--tls-client-ca needs --tls-cert and --tls-key: the server needs its own certificate \
             to ask clients for theirs",
        )),
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => nbd_server::load_pem(cert, key, client_ca)
            .map(Some)
            .map_err(|e| {
                Error::invalid(format!(
                    "cannot set up NBD over TLS (--tls-cert, --tls-key, --tls-client-ca): {e}"
                ))
            }),
        (Some(_), None) => Err(Error::invalid(
            "--tls-cert needs --tls-key: give the private key of the certificate too (PEM)",
        )),
        (None, Some(_)) => Err(Error::invalid(
            "--tls-key needs --tls-cert: give the certificate chain of the key too (PEM)",
        )),
    }
}

/// What `serve --json` prints when it stops.
#[derive(Serialize, Debug)]
pub struct ServeReport {
    /// Snapshot id.
    pub snapshot: String,
    /// Volume name.
    pub volume: String,
    /// Volume size in bytes.
    pub size: u64,
    /// Address served.
    pub listen: String,
    /// Overlay file, if writable.
    pub overlay: Option<String>,
    /// Blocks (4 KiB) held by the overlay at the end.
    pub overlay_blocks: u64,
    /// Live restore, if a hydrate target was given.
    #[serde(flatten)]
    pub hydrate: Option<HydrateReport>,
    /// Counters.
    #[serde(flatten)]
    pub counters: Counters,
    /// Agents that could not be reached at start, as `address (id…)`.
    pub agents_down: Vec<String>,
    /// Wall time served.
    pub seconds: f64,
}

/// A snapshot opened for serving.
pub struct Served {
    /// The snapshot id.
    pub snapshot: String,
    /// Its volume's name.
    pub volume: String,
    /// Its size in bytes.
    pub size: u64,
    /// Agents that could not be reached at start, as `address (id…)`.
    pub agents_down: Vec<String>,
    exports: Exports,
    snap: Arc<Snapshot>,
    overlay: Option<Arc<Overlay>>,
    hydrate: Option<Arc<Hydrate>>,
    layer: Option<Arc<dyn WriteLayer>>,
    write_lock: Arc<tokio::sync::RwLock<()>>,
    stats: Arc<Stats>,
    names: Vec<String>,
    opts: ServeOptions,
    /// Keeps the agents' PCs awake while this lives.
    _awake: KeepAlive,
}

/// Opens a snapshot for serving (see the module docs).
pub async fn open(fleet: &Fleet, opts: &ServeOptions) -> Result<Served> {
    open_with(fleet, opts, &crate::progress::NoProgress).await
}

/// [`open`], saying on `progress` which members are still being woken.
pub async fn open_with(
    fleet: &Fleet,
    opts: &ServeOptions,
    progress: &dyn crate::progress::Progress,
) -> Result<Served> {
    if opts.overlay.is_some() && opts.hydrate.is_some() {
        return Err(Error::invalid(
            "--overlay and --hydrate cannot be used together: with --hydrate the writes go to the \
             hydrate target; give one of them",
        ));
    }
    if opts.hydrate_state.is_some() && opts.hydrate.is_none() {
        return Err(Error::invalid("--hydrate-state needs --hydrate TARGET"));
    }
    let mut cat = catalog::open(fleet, &opts.agents, Access::Read).await?;
    let m =
        Arc::new(catalog::resolve(&cat.manifests, &opts.snapshot, opts.volume.as_deref())?.clone());
    let layout = m.layout;
    let waking = fleet
        .wake_sleepers(
            &mut cat.reach,
            &crate::fleet::sleepers::Need::Readable(vec![&m]),
            progress,
        )
        .await?;
    let mut slots = clients_for(fleet, &m, &cat.reach).await;
    withhold(&mut slots, &m, &opts.withhold);
    for (i, why) in &slots.down {
        tracing::warn!(
            "agent {} is down: {why}; its shards are rebuilt from parity",
            slots.names[*i]
        );
    }
    let codec = Arc::new(StripeCodec::new(fleet.keys().clone(), layout, m.volume)?);
    let reader = StripeReader::new(codec, m.clone(), slots.slots.clone())
        .with_offsite(fleet)
        .with_hedge(opts.hedge_after)
        .with_cool_down(opts.cool_down);
    // The PCs stay awake while the disk is served, even when the machine booted from it
    // reads nothing for a while; a withheld agent that wakes late stays out of a drill.
    let awake = KeepAlive::start(slots.slots.iter().flatten());
    waking.join_late(m.clone(), reader.clone(), &opts.withhold, &awake);
    // The cache must hold the stripes being read plus the read-ahead, or read-ahead is wasted.
    let floor = layout.stripe_size as u64 * (READ_AHEAD + 2);
    if opts.cache < floor {
        tracing::warn!(
            "a cache of {} is less than {}: using that",
            format_size(opts.cache),
            format_size(floor)
        );
    }
    let stats = Arc::new(Stats::default());
    let snap = Arc::new(Snapshot::new(
        m.clone(),
        reader,
        opts.cache.max(floor) as usize,
        slots.names.clone(),
        stats.clone(),
    ));
    let overlay = match &opts.overlay {
        Some(p) => Some(Arc::new(Overlay::open(p, layout.volume_size, &m.snapshot)?)),
        None => None,
    };
    let hydrate = match &opts.hydrate {
        Some(t) => Some(Arc::new(
            Hydrate::open(t, opts.hydrate_state.as_deref(), layout, &m.snapshot).map_err(|e| {
                Error::invalid(format!(
                    "cannot start the live restore onto {}: {e}",
                    t.display()
                ))
            })?,
        )),
        None => None,
    };
    let layer: Option<Arc<dyn WriteLayer>> = match (&overlay, &hydrate) {
        (Some(o), _) => Some(o.clone()),
        (None, Some(h)) => Some(h.clone()),
        (None, None) => None,
    };
    let source = Arc::new(ServeSource::new(snap.clone(), layer.clone(), stats.clone()));
    let description = format!(
        "sa-image snapshot {} of '{}' ({}){}",
        m.snapshot,
        m.volume_name,
        format_size(layout.volume_size),
        if overlay.is_some() {
            ", writes to an overlay"
        } else if hydrate.is_some() {
            ", live restore: writes to the target"
        } else {
            ", read-only"
        }
    );
    let write_lock = source.write_lock();
    let exports = Exports::single(Export::new(m.snapshot.clone(), description, source))
        .map_err(|e| Error::failed(format!("cannot name the export after the snapshot: {e}")))?;
    if let Some(o) = &overlay {
        tracing::info!(
            "writes go to {} ({} blocks written before)",
            o.path().display(),
            o.written_blocks()
        );
    }
    if let Some(h) = &hydrate {
        tracing::info!(
            "live restore onto {} (progress in {}): {} of {} stripes there already",
            h.path().display(),
            h.state_path().display(),
            h.filled_stripes(),
            layout.stripe_count()
        );
    }
    Ok(Served {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        size: layout.volume_size,
        agents_down: slots.down_names(),
        exports,
        snap,
        overlay,
        hydrate,
        layer,
        write_lock,
        stats,
        names: slots.names.clone(),
        opts: opts.clone(),
        _awake: awake,
    })
}

/// Takes the agents of `ids` out of `slots`: they are reported down, "withheld".
fn withhold(slots: &mut catalog::SlotClients, m: &sa_core::manifest::Manifest, ids: &[[u8; 16]]) {
    for (i, entry) in m.agents.iter().enumerate() {
        if ids.contains(&entry.id) && slots.slots[i].take().is_some() {
            slots.down.push((i, "withheld by the drill".to_string()));
        }
    }
    slots.down.sort_by_key(|d| d.0);
}

impl Served {
    /// Whether clients must use TLS.
    pub fn tls(&self) -> bool {
        self.opts.tls.is_some()
    }

    /// With a live restore: a receiver that holds `Some((stripes, seconds))` once hydration is
    /// complete.
    pub fn hydration_done(&self) -> Option<tokio::sync::watch::Receiver<Option<(u64, f64)>>> {
        self.hydrate.as_ref().map(|h| h.done())
    }

    /// Serves on `listener` until `shutdown` fires, then stops taking connections, answers the
    /// requests in flight, lets the copier checkpoint, syncs the overlay or target, and reports.
    pub async fn run(self, listener: TcpListener, shutdown: Shutdown) -> Result<ServeReport> {
        let bound = listener
            .local_addr()
            .map_err(|e| Error::io("cannot read the listening address", e))?;
        let started = Instant::now();
        // The copier starts once the export is announced: the guest can boot at once.
        let (stop_copier, stopped) = tokio::sync::watch::channel(false);
        let copier = self.hydrate.as_ref().map(|h| {
            let c = Copier::new(
                h.clone(),
                self.snap.clone(),
                self.write_lock.clone(),
                self.opts.hydrate_rate,
            );
            tokio::spawn(c.run(stopped))
        });
        let config = ServerConfig {
            tls: self.opts.tls.clone(),
            idle_timeout: self.opts.idle_timeout,
            ..ServerConfig::default()
        };
        let stop = shutdown.clone();
        let served = Server::with_config(Arc::new(self.exports), config)
            .run(listener, async move { stop.cancelled().await })
            .await
            .map_err(|e| Error::failed(format!("NBD server failed: {e}")));
        // The copier finishes the stripes in flight and makes its progress durable.
        let _ = stop_copier.send(true);
        if let Some(c) = copier {
            let _ = c.await;
        }
        served?;
        if let Some(l) = &self.layer {
            let what = match (&self.overlay, &self.hydrate) {
                (Some(o), _) => format!("the overlay {}", o.path().display()),
                (_, Some(h)) => format!("the hydrate target {}", h.path().display()),
                _ => String::new(),
            };
            l.flush()
                .await
                .map_err(|e| Error::io(format!("cannot sync {what}"), e))?;
        }
        Ok(ServeReport {
            snapshot: self.snapshot.clone(),
            volume: self.volume.clone(),
            size: self.size,
            listen: bound.to_string(),
            overlay: self
                .overlay
                .as_ref()
                .map(|o| o.path().display().to_string()),
            overlay_blocks: self.overlay.as_ref().map_or(0, |o| o.written_blocks()),
            hydrate: self.hydrate.as_ref().map(|h| h.report()),
            counters: self.stats.report(&self.names),
            agents_down: self.agents_down.clone(),
            seconds: started.elapsed().as_secs_f64(),
        })
    }
}

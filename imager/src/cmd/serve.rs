//! `sa-image serve`: a snapshot as a live NBD export, assembled from the agents on demand.
//!
//! One agent's address is enough (the catalog there names the others). The export answers to
//! the default name `""` and to the snapshot id. Read-only unless `--overlay FILE` is given; then
//! writes go to that file (see [`crate::serve::overlay`]) and never to the agents. Once listening,
//! one line goes to stdout: `serving snapshot ID (SIZE) on nbd://ADDR` (with `--listen HOST:0`,
//! ADDR has the port the system chose). On SIGINT or SIGTERM, `serve` stops taking connections,
//! answers the requests in flight, syncs the overlay, and prints its counters (one JSON object
//! after the `serving` line with `--json`).
//!
//! With `--hydrate TARGET` (live restore, see [`crate::serve::hydrate`]) the export is writable
//! into TARGET, and a background copier moves every stripe onto it at `--hydrate-rate`; when it is
//! done, one more line goes to stdout: `hydration complete: N stripes in S s`, and TARGET alone is
//! the disk. Stopping `serve` midway keeps the progress: the next `serve --hydrate TARGET` resumes.
//!
//! With `--tls-cert FILE --tls-key FILE` (PEM) every client must start TLS (NBD_OPT_STARTTLS)
//! before anything else, and the line says `nbds://ADDR`; clients connect with e.g.
//! `nbdcopy 'nbds://HOST:PORT/?tls-certificates=DIR'` where DIR holds the CA as `ca-cert.pem`.
//! `--tls-client-ca FILE` also requires each client to present a certificate that CA signed
//! (libnbd: `client-cert.pem` and `client-key.pem` in DIR): only then does TLS decide who reads.
//! Without them the export is plain NBD, fit for loopback only: the default `--listen` is
//! 127.0.0.1, and a LAN export should use TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use nbd_server::{rustls, Export, Exports, Server, ServerConfig};
use sa_core::catalog::resolve;
use sa_core::size::{format_size, parse_size};
use sa_core::stripe::StripeCodec;
use serde::{Deserialize, Serialize};

use crate::agents::{clients_for, open_catalog};
use crate::config::{self, require_agents, KeyArgs};
use crate::fetch::StripeReader;
use crate::gc::parse_duration;
use crate::merge;
use crate::serve::hydrate::{self, Copier, Hydrate, HydrateReport};
use crate::serve::overlay::Overlay;
use crate::serve::snapshot::{Snapshot, READ_AHEAD};
use crate::serve::source::{ServeSource, WriteLayer};
use crate::serve::stats::{Counters, Stats};

/// Where `serve` listens unless told otherwise (the IANA NBD port, loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";
/// Decoded stripes kept in memory unless told otherwise.
pub const DEFAULT_CACHE: &str = "256MiB";
/// A shard fetch slower than this gets a parity fetch alongside.
pub const HEDGE_AFTER: Duration = Duration::from_millis(300);

/// Flags of `serve`.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ServeArgs {
    /// Snapshot id (or unique prefix), or `latest`.
    #[serde(skip)]
    pub snapshot: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub keyfile: KeyArgs,
    /// Agents to ask, HOST:PORT, comma-separated: one is enough.
    #[arg(long, value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Address to listen on, HOST:PORT (port 0: any free port) [default: 127.0.0.1:10809].
    /// Plain NBD has no encryption or authentication: to export over a LAN, listen on its
    /// address and give --tls-cert and --tls-key.
    #[arg(long)]
    pub listen: Option<String>,
    /// Server certificate chain (PEM) for NBD over TLS; with --tls-key, every client must use
    /// TLS (NBD_OPT_STARTTLS, e.g. `nbds://` URIs).
    #[arg(long, value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// CA certificate(s) (PEM): only clients presenting a certificate signed by it may connect.
    /// Without it, TLS encrypts, but any client that can connect reads the export.
    #[arg(long, value_name = "PEM")]
    pub tls_client_ca: Option<PathBuf>,
    /// Make the export writable: writes go to this sparse file (and its map FILE.map), never
    /// to the agents. Reopening the same file keeps earlier writes.
    #[arg(long)]
    pub overlay: Option<PathBuf>,
    /// Live restore: writes go to TARGET (a block device, or a file created if missing), and every
    /// stripe is copied onto it in the background; afterwards TARGET alone is the disk. Not with
    /// --overlay.
    #[arg(long, value_name = "TARGET", conflicts_with = "overlay")]
    pub hydrate: Option<PathBuf>,
    /// Most bytes per second the live-restore copier moves, e.g. 200MiB, or `unlimited`
    /// [default: 64MiB, about half of a gigabit link].
    #[arg(long, value_name = "RATE")]
    pub hydrate_rate: Option<String>,
    /// Where the live-restore progress is kept [default: TARGET.hydrate]; required when TARGET
    /// is a block device (put it on persistent storage, not /dev).
    #[arg(long, value_name = "FILE")]
    pub hydrate_state: Option<PathBuf>,
    /// Drop a client that sends no request for this long while none of its requests is in
    /// flight, e.g. 30m, 2h; 0: never [default: 10m]. A machine booted from the export whose
    /// disk sees no I/O for that long loses it (NBD clients seldom reconnect): give 0 or a long
    /// time for boots. Vanished clients are found by TCP keepalive either way.
    #[arg(long, value_name = "DURATION")]
    pub idle_timeout: Option<String>,
    /// Memory for decoded stripes, e.g. 256MiB [default: 256MiB].
    #[arg(long)]
    pub cache: Option<String>,
    /// Print the counters as one JSON object when stopping.
    #[arg(long)]
    pub json: bool,
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
    /// Live restore, if `--hydrate` was given.
    #[serde(flatten)]
    pub hydrate: Option<HydrateReport>,
    /// Counters.
    #[serde(flatten)]
    pub counters: Counters,
    /// Agents that could not be reached at start.
    pub agents_down: Vec<String>,
    /// Wall time served.
    pub seconds: f64,
}

/// `sa-image serve`.
pub async fn run(mut args: ServeArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: ServeArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    merge!(args, file; agents, listen, tls_cert, tls_key, tls_client_ca, idle_timeout, overlay, cache, hydrate, hydrate_rate, hydrate_state; bools json);
    // Before anything slow (catalog, agents): a TLS mistake is found at once.
    let tls = load_tls(&args.tls_cert, &args.tls_key, &args.tls_client_ca)?;
    let idle_timeout = match args.idle_timeout.as_deref() {
        None => ServerConfig::default().idle_timeout,
        Some(text) => {
            match parse_duration(text).with_context(|| format!("--idle-timeout {text}"))? {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            }
        }
    };
    if args.overlay.is_some() && args.hydrate.is_some() {
        anyhow::bail!(
            "--overlay and --hydrate cannot be used together: with --hydrate the writes go to the \
             hydrate target; give one of them"
        );
    }
    if args.hydrate_state.is_some() && args.hydrate.is_none() {
        anyhow::bail!("--hydrate-state needs --hydrate TARGET");
    }
    let rate_text = args
        .hydrate_rate
        .clone()
        .unwrap_or_else(|| hydrate::DEFAULT_RATE.to_string());
    let rate = hydrate::parse_rate(&rate_text)?;
    let key = args.keyfile.load()?;
    let keys = Arc::new(key.derive());
    let agents = require_agents(&args.agents)?;
    let listen = args
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let cache_text = args
        .cache
        .clone()
        .unwrap_or_else(|| DEFAULT_CACHE.to_string());
    let cache = parse_size(&cache_text).with_context(|| format!("--cache {cache_text}"))?;

    let (manifests, attempts) = open_catalog(&agents, &keys).await?;
    let m = Arc::new(resolve(&manifests, &args.snapshot, None)?.clone());
    let layout = m.layout;
    let slots = clients_for(&m, &attempts, &keys).await;
    for (i, why) in &slots.down {
        tracing::warn!(
            "agent {} is down: {why}; its shards are rebuilt from parity",
            slots.names[*i]
        );
    }
    let agents_down: Vec<String> = slots
        .down
        .iter()
        .map(|(i, _)| slots.names[*i].clone())
        .collect();
    let codec = Arc::new(StripeCodec::new(keys.clone(), layout, m.volume)?);
    let reader = StripeReader::new(codec, m.clone(), slots.slots.clone()).with_hedge(HEDGE_AFTER);

    // The cache must hold the stripes being read plus the read-ahead, or read-ahead is wasted.
    let floor = layout.stripe_size as u64 * (READ_AHEAD + 2);
    if cache < floor {
        tracing::warn!(
            "--cache {cache_text} is less than {}: using that",
            format_size(floor)
        );
    }
    let stats = Arc::new(Stats::default());
    let snapshot = Arc::new(Snapshot::new(
        m.clone(),
        reader,
        cache.max(floor) as usize,
        slots.names.clone(),
        stats.clone(),
    ));
    let overlay = match &args.overlay {
        Some(p) => Some(Arc::new(Overlay::open(p, layout.volume_size, &m.snapshot)?)),
        None => None,
    };
    let hydrate = match &args.hydrate {
        Some(t) => Some(Arc::new(
            Hydrate::open(t, args.hydrate_state.as_deref(), layout, &m.snapshot)
                .with_context(|| format!("cannot start the live restore onto {}", t.display()))?,
        )),
        None => None,
    };
    let layer: Option<Arc<dyn WriteLayer>> = match (&overlay, &hydrate) {
        (Some(o), _) => Some(o.clone()),
        (None, Some(h)) => Some(h.clone()),
        (None, None) => None,
    };
    let source = Arc::new(ServeSource::new(
        snapshot.clone(),
        layer.clone(),
        stats.clone(),
    ));
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
        .context("cannot name the export after the snapshot")?;

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| {
            format!("cannot listen on {listen}: is another serve (or NBD server) using it?")
        })?;
    let bound: SocketAddr = listener.local_addr()?;
    let started = Instant::now();
    println!(
        "serving snapshot {} ({}) on {}://{bound}",
        m.snapshot,
        format_size(layout.volume_size),
        if tls.is_some() { "nbds" } else { "nbd" }
    );
    if tls.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(
            "serving plain NBD on {bound}: anyone on that network can read the disk; \
             give --tls-cert and --tls-key to require TLS"
        );
    }
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
    use std::io::Write as _;
    let _ = std::io::stdout().flush();

    // The copier starts once the export is announced: the guest can boot at once.
    let (stop_copier, stopped) = tokio::sync::watch::channel(false);
    let copier = hydrate.as_ref().map(|h| {
        let c = Copier::new(h.clone(), snapshot.clone(), write_lock.clone(), rate);
        tokio::spawn(c.run(stopped))
    });

    let config = ServerConfig {
        tls,
        idle_timeout,
        ..ServerConfig::default()
    };
    let served = Server::with_config(Arc::new(exports), config)
        .run(listener, stop_signal())
        .await
        .context("NBD server failed");

    // The copier finishes the stripes in flight and makes its progress durable.
    let _ = stop_copier.send(true);
    if let Some(c) = copier {
        let _ = c.await;
    }
    served?;
    if let Some(l) = &layer {
        let what = match (&overlay, &hydrate) {
            (Some(o), _) => format!("the overlay {}", o.path().display()),
            (_, Some(h)) => format!("the hydrate target {}", h.path().display()),
            _ => String::new(),
        };
        l.flush()
            .await
            .with_context(|| format!("cannot sync {what}"))?;
    }
    let report = ServeReport {
        snapshot: m.snapshot.clone(),
        volume: m.volume_name.clone(),
        size: layout.volume_size,
        listen: bound.to_string(),
        overlay: overlay.as_ref().map(|o| o.path().display().to_string()),
        overlay_blocks: overlay.as_ref().map_or(0, |o| o.written_blocks()),
        hydrate: hydrate.as_ref().map(|h| h.report()),
        counters: stats.report(&slots.names),
        agents_down,
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(0)
}

fn print_report(r: &ServeReport) {
    let c = &r.counters;
    println!(
        "stopped serving snapshot {} after {:.1}s",
        r.snapshot, r.seconds
    );
    println!(
        "  {} requests; read {} ({} reads), wrote {} ({} writes, {} flushes)",
        c.requests,
        format_size(c.bytes_read),
        c.reads,
        format_size(c.bytes_written),
        c.writes,
        c.flushes
    );
    println!(
        "  stripes: {} fetched ({} rebuilt from parity, {} by read-ahead), {} from cache, {} lost",
        c.stripes_fetched,
        c.stripes_reconstructed,
        c.readahead,
        c.stripes_from_cache,
        c.stripes_lost
    );
    for (agent, p) in &c.shard_problems {
        println!(
            "  agent {agent}: {} missing, {} corrupt, {} unreachable",
            p.missing, p.corrupt, p.unreachable
        );
    }
    for a in &r.agents_down {
        println!("  agent down: {a}");
    }
    if let Some(o) = &r.overlay {
        println!("  overlay {o}: {} blocks written", r.overlay_blocks);
    }
    if let Some(h) = &r.hydrate {
        println!(
            "  live restore onto {}: {} of {} stripes there{}; this run copied {} stripes ({}) in {:.1}s; \
             reads: {} from the target, {} needed the agents; {} blocks written",
            h.hydrate_target,
            h.hydrate_stripes_filled,
            h.hydrate_stripes_total,
            if h.hydrate_complete { " (complete)" } else { "" },
            h.hydrated_stripes,
            format_size(h.hydrate_bytes),
            h.hydrate_seconds,
            h.reads_from_target,
            h.reads_from_agents,
            h.written_blocks
        );
    }
}

/// The TLS configuration from `--tls-cert` and `--tls-key` (both or neither) and
/// `--tls-client-ca` (only with them).
fn load_tls(
    cert: &Option<PathBuf>,
    key: &Option<PathBuf>,
    client_ca: &Option<PathBuf>,
) -> Result<Option<Arc<rustls::ServerConfig>>> {
    match (cert, key) {
        (None, None) if client_ca.is_some() => anyhow::bail!(
            "--tls-client-ca needs --tls-cert and --tls-key: the server needs its own certificate \
             to ask clients for theirs"
        ),
        (None, None) => Ok(None),
        (Some(cert), Some(key)) => nbd_server::load_pem(cert, key, client_ca.as_deref())
            .map(Some)
            .context("cannot set up NBD over TLS (--tls-cert, --tls-key, --tls-client-ca)"),
        (Some(_), None) => anyhow::bail!(
            "--tls-cert needs --tls-key: give the private key of the certificate too (PEM)"
        ),
        (None, Some(_)) => anyhow::bail!(
            "--tls-key needs --tls-cert: give the certificate chain of the key too (PEM)"
        ),
    }
}

/// Completes on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        tracing::warn!("cannot watch for signals; stop serve with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received: finishing requests in flight");
}

//! `sa-image serve`: a snapshot as a live NBD export, assembled from the agents on demand.
//!
//! One agent's address is enough (the catalog there names the others). The engine opens the
//! snapshot ([`sa_engine::serve::open`]); this command binds the listener, prints the line
//! scripts wait for, and runs the server until SIGINT or SIGTERM. The export answers to
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
use std::time::Duration;

use anyhow::{Context, Result};
use sa_core::size::format_size;
use sa_engine::serve::{open_with, tls_config, ServeOptions, ServeReport};
use serde::Deserialize;

use crate::config::{self, FleetArgs, KeyArgs, WakeArgs};
use crate::merge;

/// Where `serve` listens unless told otherwise (the IANA NBD port, loopback only).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:10809";

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
    #[command(flatten)]
    #[serde(flatten)]
    pub fleet: FleetArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub wake: WakeArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub offsite: crate::config::OffsiteArgs,
    /// The volume whose snapshot `latest` names.
    #[arg(long)]
    pub volume: Option<String>,
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
    /// A read whose k shards have not all arrived after this gets one more shard fetched
    /// alongside (a slow PC is hedged around), e.g. 300ms [default: 300ms]. Small ranged reads
    /// hedge sooner: after 4x their mean fetch time, at least 10ms, at most this.
    #[arg(long, value_name = "DURATION")]
    pub hedge_after: Option<String>,
    /// Print the counters as one JSON object when stopping.
    #[arg(long)]
    pub json: bool,
}

/// `sa-image serve`.
pub async fn run(mut args: ServeArgs, cfg: Option<&Path>) -> Result<u8> {
    let mut file: ServeArgs = config::load(cfg)?;
    args.keyfile.merge(&mut file.keyfile);
    args.fleet.merge(&mut file.fleet);
    args.wake.merge(&mut file.wake);
    args.offsite.merge(&mut file.offsite);
    merge!(args, file; volume, listen, tls_cert, tls_key, tls_client_ca, idle_timeout, overlay,
        cache, hedge_after, hydrate, hydrate_rate, hydrate_state; bools json);
    // Before anything slow (catalog, agents): a TLS mistake is found at once.
    let tls = tls_config(
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
        args.tls_client_ca.as_deref(),
    )
    .map_err(|e| crate::exit::usage(e.to_string()))?;
    let mut opts = ServeOptions::new(&args.snapshot, args.offsite.addrs(&args.fleet)?);
    opts.volume = args.volume.clone();
    opts.tls = tls;
    if let Some(t) = &args.idle_timeout {
        opts.idle_timeout = Some(config::duration(t, "--idle-timeout")?).filter(|d| !d.is_zero());
    }
    if let Some(c) = &args.cache {
        opts.cache = config::size(c, "--cache")?;
    }
    if let Some(h) = &args.hedge_after {
        opts.hedge_after = config::duration(h, "--hedge-after")?.max(Duration::from_millis(1));
    }
    opts.overlay = args.overlay.clone();
    opts.hydrate = args.hydrate.clone();
    opts.hydrate_state = args.hydrate_state.clone();
    if let Some(r) = &args.hydrate_rate {
        opts.hydrate_rate = config::rate(r, "--hydrate-rate")?;
    }
    let listen = args
        .listen
        .clone()
        .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let fleet = args.offsite.apply(
        args.wake
            .apply(args.fleet.fleet(args.keyfile.load()?.derive())?)?,
    )?;
    let served = open_with(&fleet, &opts, &crate::progress::Bar::new(true)).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| {
            format!("cannot listen on {listen}: is another serve (or NBD server) using it?")
        })?;
    let bound: SocketAddr = listener.local_addr()?;
    println!(
        "serving snapshot {} ({}) on {}://{bound}",
        served.snapshot,
        format_size(served.size),
        if served.tls() { "nbds" } else { "nbd" }
    );
    if !served.tls() && !bound.ip().is_loopback() {
        tracing::warn!(
            "serving plain NBD on {bound}: anyone on that network can read the disk; \
             give --tls-cert and --tls-key to require TLS"
        );
    }
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    if let Some(mut done) = served.hydration_done() {
        tokio::spawn(async move {
            if let Ok(d) = done.wait_for(Option::is_some).await {
                if let Some((n, secs)) = *d {
                    println!("hydration complete: {n} stripes in {secs:.1}s");
                    let _ = std::io::stdout().flush();
                }
            }
        });
    }
    let shutdown = crate::signal::on_stop_signals();
    let report = served.run(listener, shutdown).await?;
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

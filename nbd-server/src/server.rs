//! The accept loop: one task per connection, a cap on connections, and
//! graceful shutdown.
//!
//! Hostile or broken clients are bounded by [`ServerConfig`]: at most
//! `max_connections` are served at once (more wait in the listen backlog
//! until a slot frees); each has `handshake_timeout` to get from connecting
//! (TLS handshake included) to transmission, so half-open connections do not
//! hold slots; in transmission a client that sends nothing for
//! `idle_timeout` while nothing is in flight is dropped, and TCP keepalive
//! (first probe after 60 s of silence, then every 10 s, 6 probes) finds peers
//! that vanished (a crashed or unplugged machine) within about 2 minutes,
//! whatever the idle timeout; a client that stops
//! reading its replies is dropped after `reply_timeout` without progress, and
//! until then its bounded queue (`max_in_flight` requests,
//! `max_buffered_bytes` of payload) stops only its own reader. Connections
//! share nothing but the export, so one slow client does not stall others.
//! Worst-case payload memory is `max_connections * max_buffered_bytes`, plus
//! 16 MiB of pooled buffers per connection.
//!
//! Shutdown: when the `shutdown` future completes, the server stops
//! accepting, connections still in the handshake are closed, and connections
//! in transmission stop reading new requests, send the replies of the ones in
//! flight ("the server SHOULD wait for inflight requests to be serviced prior
//! to initiating a hard disconnect"), and close. `run` returns when all are gone.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::error::ServeError;
use crate::exports::Exports;
use crate::handshake::{greet, haggle, Negotiated, Step, TlsMode};
use crate::tls::Transport;
use crate::transmission::{shutdown_signalled, transmit, Limits};

/// Read buffer of one connection.
const READ_BUFFER: usize = 64 * 1024;

/// TCP keepalive: silence before the first probe, time between probes, probes.
const KEEPALIVE: (Duration, Duration, u32) = (Duration::from_secs(60), Duration::from_secs(10), 6);

/// Turns on TCP keepalive, so that a peer that vanished is noticed.
fn keepalive(stream: &TcpStream) -> std::io::Result<()> {
    let (time, interval, retries) = KEEPALIVE;
    let ka = socket2::TcpKeepalive::new()
        .with_time(time)
        .with_interval(interval)
        .with_retries(retries);
    socket2::SockRef::from(stream).set_tcp_keepalive(&ka)
}

/// Tunables of a [`Server`]. The defaults suit a LAN appliance.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests of one connection served at once.
    pub max_in_flight: usize,
    /// Payload bytes one connection may hold in flight (raised to at least 32 MiB).
    pub max_buffered_bytes: usize,
    /// Time a client has from connecting to entering transmission (TLS
    /// handshake included).
    pub handshake_timeout: Duration,
    /// A client in transmission that sends no request for this long while none
    /// of its requests is in flight (or that stops in the middle of a
    /// request) is disconnected; `None`: never. Default 10 minutes. A machine
    /// booted from the export whose disk sees no I/O for that long loses its
    /// connection (and most clients do not reconnect): raise it, or use
    /// `None`, for exports that boot machines; dead peers are found by TCP
    /// keepalive either way.
    pub idle_timeout: Option<Duration>,
    /// A reply that makes no progress towards the client for this long (the
    /// client stopped reading) closes the connection. Default 60 s.
    pub reply_timeout: Duration,
    /// TLS: when set, the server requires `NBD_OPT_STARTTLS` before any other
    /// option (the spec's FORCEDTLS mode); see [`crate::tls`] and
    /// [`crate::tls::load_pem`]. When `None`, `NBD_OPT_STARTTLS` gets
    /// `NBD_REP_ERR_UNSUP`.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            max_in_flight: 64,
            max_buffered_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            idle_timeout: Some(Duration::from_secs(600)),
            reply_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// An NBD server over a table of exports.
#[derive(Debug, Clone)]
pub struct Server {
    exports: Arc<Exports>,
    config: ServerConfig,
}

impl Server {
    /// A server with the default [`ServerConfig`].
    pub fn new(exports: Arc<Exports>) -> Server {
        Server::with_config(exports, ServerConfig::default())
    }

    /// A server with explicit tunables.
    pub fn with_config(exports: Arc<Exports>, config: ServerConfig) -> Server {
        Server { exports, config }
    }

    /// Serves clients of `listener` until `shutdown` completes, then drains
    /// the connections and returns. Errors of single connections are logged,
    /// not returned.
    pub async fn run<F>(&self, listener: TcpListener, shutdown: F) -> Result<(), ServeError>
    where
        F: Future<Output = ()> + Send,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let slots = Arc::new(Semaphore::new(self.config.max_connections.max(1)));
        let mut tasks = JoinSet::new();
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, exports = self.exports.len(), "NBD server listening");
        }
        tokio::pin!(shutdown);
        loop {
            let permit = tokio::select! {
                _ = &mut shutdown => break,
                p = Arc::clone(&slots).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(%e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            while tasks.try_join_next().is_some() {}
            tasks.spawn(connection(
                stream,
                peer,
                Arc::clone(&self.exports),
                self.config.clone(),
                stop_rx.clone(),
                permit,
            ));
        }
        info!(connections = tasks.len(), "NBD server shutting down");
        let _ = stop_tx.send(true);
        while tasks.join_next().await.is_some() {}
        Ok(())
    }
}

/// Serves `exports` on `listener` with default settings until `shutdown` completes.
pub async fn serve<F>(
    listener: TcpListener,
    exports: Arc<Exports>,
    shutdown: F,
) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send,
{
    Server::new(exports).run(listener, shutdown).await
}

/// Greeting, option haggling and (FORCEDTLS) the TLS upgrade. `Ok(None)`
/// means the session ended before transmission.
async fn handshake(
    stream: TcpStream,
    exports: &Exports,
    tls: Option<&TlsAcceptor>,
) -> Result<Option<(BufReader<Transport>, Negotiated)>, ServeError> {
    let mut conn = BufReader::with_capacity(READ_BUFFER, Transport::Plain(stream));
    let mut session = greet(&mut conn, tls.is_some()).await?;
    loop {
        match haggle(&mut conn, exports, &mut session).await? {
            Step::Transmit(neg) => return Ok(Some((conn, neg))),
            Step::End => return Ok(None),
            Step::StartTls => {
                // The client "MUST immediately upgrade the session to TLS" on
                // our ACK; bytes it sent before reading the ACK are not TLS.
                if !conn.buffer().is_empty() {
                    return Err(ServeError::Protocol(
                        "data after NBD_OPT_STARTTLS before the TLS handshake".into(),
                    ));
                }
                let (Some(acceptor), Transport::Plain(tcp)) = (tls, conn.into_inner()) else {
                    return Err(ServeError::Protocol("NBD_OPT_STARTTLS twice".into()));
                };
                // "If the handshake is unsuccessful ... the server MUST
                // terminate the session": the error closes the connection.
                let stream = acceptor.accept(tcp).await.map_err(ServeError::Tls)?;
                conn = BufReader::with_capacity(READ_BUFFER, Transport::Tls(Box::new(stream)));
                session.tls = TlsMode::Active;
            }
        }
    }
}

/// One client, from greeting to close.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    exports: Arc<Exports>,
    config: ServerConfig,
    shutdown: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
) {
    debug!(%peer, "connection opened");
    if let Err(e) = stream.set_nodelay(true) {
        debug!(%peer, %e, "TCP_NODELAY failed");
    }
    if let Err(e) = keepalive(&stream) {
        debug!(%peer, %e, "TCP keepalive failed");
    }
    let acceptor = config.tls.clone().map(TlsAcceptor::from);
    let mut stop = shutdown.clone();
    let negotiated = tokio::select! {
        r = tokio::time::timeout(config.handshake_timeout, handshake(stream, &exports, acceptor.as_ref())) => match r {
            Err(_) => Err(ServeError::HandshakeTimeout),
            Ok(r) => r,
        },
        _ = shutdown_signalled(&mut stop) => Ok(None),
    };
    let (conn, neg) = match negotiated {
        Ok(Some(n)) => n,
        Ok(None) => {
            debug!(%peer, "connection closed during handshake");
            return;
        }
        Err(ServeError::Io(e)) => {
            debug!(%peer, %e, "connection lost during handshake");
            return;
        }
        Err(e) => {
            warn!(%peer, %e, "handshake failed; connection closed");
            return;
        }
    };
    let tls = matches!(conn.get_ref(), Transport::Tls(_));
    info!(%peer, export = %neg.name, size = neg.export.source().size(), tls,
        structured = neg.structured, flags = format_args!("{:#x}", neg.flags), "client entered transmission");
    let limits = Limits {
        max_in_flight: config.max_in_flight,
        max_buffered_bytes: config.max_buffered_bytes,
        idle_timeout: config.idle_timeout,
        reply_timeout: config.reply_timeout,
    };
    // Requests the client sent right behind its last option are in the
    // handshake's buffer: they go first.
    let early = std::io::Cursor::new(conn.buffer().to_vec());
    let ended = match conn.into_inner() {
        Transport::Plain(tcp) => {
            let (rd, wr) = tcp.into_split();
            let rd = BufReader::with_capacity(READ_BUFFER, early.chain(rd));
            transmit(rd, wr, neg, limits, shutdown).await
        }
        Transport::Tls(tls) => {
            let (rd, wr) = tokio::io::split(*tls);
            let rd = BufReader::with_capacity(READ_BUFFER, early.chain(rd));
            transmit(rd, wr, neg, limits, shutdown).await
        }
    };
    match ended {
        Ok(()) => info!(%peer, "connection closed"),
        Err(ServeError::Io(e)) => info!(%peer, %e, "connection lost"),
        Err(e) => warn!(%peer, %e, "connection closed on error"),
    }
}

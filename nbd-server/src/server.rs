//! The accept loop: one task per connection, a cap on connections, and
//! graceful shutdown.
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

use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::error::ServeError;
use crate::exports::Exports;
use crate::handshake::negotiate;
use crate::transmission::{shutdown_signalled, transmit, Limits};

/// Tunables of a [`Server`]. The defaults suit a LAN appliance.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once; further clients wait in the listen backlog.
    pub max_connections: usize,
    /// Requests of one connection served at once.
    pub max_in_flight: usize,
    /// Payload bytes one connection may hold in flight (raised to at least 32 MiB).
    pub max_buffered_bytes: usize,
    /// Time a client has from connecting to entering transmission.
    pub handshake_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 64,
            max_in_flight: 64,
            max_buffered_bytes: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
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
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(64 * 1024, rd);
    let mut stop = shutdown.clone();
    let negotiated = tokio::select! {
        r = tokio::time::timeout(config.handshake_timeout, negotiate(&mut rd, &mut wr, &exports)) => match r {
            Err(_) => Err(ServeError::HandshakeTimeout),
            Ok(r) => r,
        },
        _ = shutdown_signalled(&mut stop) => Ok(None),
    };
    let neg = match negotiated {
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
    info!(%peer, export = %neg.name, size = neg.export.source().size(),
        structured = neg.structured, flags = format_args!("{:#x}", neg.flags), "client entered transmission");
    let limits = Limits {
        max_in_flight: config.max_in_flight,
        max_buffered_bytes: config.max_buffered_bytes,
    };
    match transmit(rd, wr, neg, limits, shutdown).await {
        Ok(()) => info!(%peer, "connection closed"),
        Err(ServeError::Io(e)) => info!(%peer, %e, "connection lost"),
        Err(e) => warn!(%peer, %e, "connection closed on error"),
    }
}

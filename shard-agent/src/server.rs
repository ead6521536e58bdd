//! The agent's server: TLS 1.3 with the agent's own identity key (`sa_core::tls`), then the
//! owner's challenge bound to that TLS session, then one request at a time per connection.
//! Plain TCP is not served: a client that does not start TLS is dropped at the handshake.

use std::sync::Arc;
use std::time::Duration;

use sa_core::keys::{random_bytes, verify_owner, OwnerId};
use sa_core::store::DirStore;
use sa_core::wire::{
    auth_message, read_frame, read_frame_max, write_frame, Handshake, Request, Response,
    MAX_HANDSHAKE_FRAME, PROTOCOL_VERSION,
};
use sa_core::{Error, Result};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::awake::KeepAwake;
use crate::rate::RateLimit;
use crate::scrub::Scrubber;

/// How long a client has to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// The agent server.
#[derive(Clone)]
pub struct Server {
    store: DirStore,
    owner: OwnerId,
    tls: TlsAcceptor,
    conns: Arc<Semaphore>,
    scrub: Option<Scrubber>,
    rate: Option<Arc<RateLimit>>,
    awake: Option<KeepAwake>,
}

impl Server {
    /// A server over `store` for `owner`, presenting `tls` (see
    /// [`sa_core::tls::AgentIdentity::server_config`]), at most `max_connections` at once.
    pub fn new(
        store: DirStore,
        owner: OwnerId,
        tls: Arc<rustls::ServerConfig>,
        max_connections: usize,
    ) -> Self {
        Server {
            store,
            owner,
            tls: TlsAcceptor::from(tls),
            conns: Arc::new(Semaphore::new(max_connections.max(1))),
            scrub: None,
            rate: None,
            awake: None,
        }
    }

    /// Answers `SCRUB` requests from `scrub` (without one, they are refused as unsupported).
    pub fn with_scrub(mut self, scrub: Scrubber) -> Self {
        self.scrub = Some(scrub);
        self
    }

    /// Holds the shard traffic of all connections together (requests read and data sent) to
    /// `rate` ([`RateLimit`]).
    pub fn with_rate_limit(mut self, rate: RateLimit) -> Self {
        self.rate = Some(Arc::new(rate));
        self
    }

    /// Keeps the PC awake while clients make requests ([`KeepAwake`]).
    pub fn with_keep_awake(mut self, awake: KeepAwake) -> Self {
        self.awake = Some(awake);
        self
    }

    async fn throttle(&self, bytes: usize) {
        if let Some(r) = &self.rate {
            r.take(bytes as u64).await;
        }
    }

    /// Accepts connections until the listener fails.
    pub async fn run(self, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Running out of file descriptors must not kill the agent.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(permit) = self.conns.clone().try_acquire_owned() else {
                tracing::warn!(%peer, "too many connections; refusing one");
                drop(stream);
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match this.handle(stream).await {
                    Ok(()) => tracing::debug!(%peer, "connection closed"),
                    Err(e) => tracing::warn!(%peer, "connection dropped: {e}"),
                }
            });
        }
    }

    async fn handle(&self, tcp: TcpStream) -> Result<()> {
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().ok();
        let start = async {
            let mut s = self.tls.accept(tcp).await.map_err(|e| {
                Error::Protocol(format!("TLS handshake failed (not a TLS 1.3 client?): {e}"))
            })?;
            self.handshake(&mut s).await?;
            Ok::<_, Error>(s)
        };
        let mut s = match tokio::time::timeout(HANDSHAKE_TIMEOUT, start).await {
            Ok(r) => r?,
            Err(_) => return Err(Error::Protocol("handshake timed out".into())),
        };
        loop {
            let frame = match tokio::time::timeout(IDLE_TIMEOUT, read_frame(&mut s)).await {
                Ok(f) => f?,
                Err(_) => return Ok(()),
            };
            let Some((kind, body)) = frame else {
                return Ok(());
            };
            if let Some(a) = &self.awake {
                a.touch();
            }
            self.throttle(body.len()).await;
            let req = Request::parse(kind, body)?;
            let mut resp = self.apply(req).await;
            if let Response::Stat(stat) = &mut resp {
                if let Some(local) = local {
                    crate::netinfo::fill(stat, local.ip()).await;
                }
                stat.keep_awake = self.awake.as_ref().and_then(KeepAwake::hold);
            }
            if let Response::Data(data) = &resp {
                self.throttle(data.len()).await;
            }
            write_frame(&mut s, &resp.frame())
                .await
                .map_err(|e| Error::io("send", e))?;
            if let Response::Data(data) = resp {
                sa_core::pool::frames().give(data);
            }
        }
    }

    async fn handshake(&self, s: &mut TlsStream<TcpStream>) -> Result<()> {
        let binding = sa_core::tls::server_binding(s.get_ref().1)?;
        let (kind, body) = read_frame_max(s, MAX_HANDSHAKE_FRAME)
            .await?
            .ok_or_else(|| Error::Protocol("closed before hello".into()))?;
        match Handshake::parse(kind, &body)? {
            Handshake::Hello { .. } => {}
            _ => return Err(Error::Protocol("expected hello".into())),
        }
        let nonce: [u8; 32] = random_bytes();
        let agent_id = self.store.agent_id();
        let challenge = Handshake::Challenge {
            version: PROTOCOL_VERSION,
            agent_id,
            nonce,
        };
        write_frame(s, &challenge.frame())
            .await
            .map_err(|e| Error::io("send", e))?;
        let (kind, body) = read_frame_max(s, MAX_HANDSHAKE_FRAME)
            .await?
            .ok_or_else(|| Error::Protocol("closed before auth".into()))?;
        let Handshake::Auth { owner, signature } = Handshake::parse(kind, &body)? else {
            return Err(Error::Protocol("expected auth".into()));
        };
        let msg = auth_message(&agent_id, &nonce, &binding);
        if owner != self.owner.0 || !verify_owner(&self.owner, &msg, &signature) {
            let why =
                "this agent belongs to another owner: start it with --owner set to the id that \
                       `sa-image owner-id --key KEYFILE` prints for your key";
            let resp = Response::Error {
                code: sa_core::wire::ErrorCode::Unauthorized,
                message: why.into(),
            };
            let _ = write_frame(s, &resp.frame()).await;
            return Err(Error::Refused {
                addr: "client".into(),
                why: "wrong owner".into(),
            });
        }
        write_frame(s, &Response::Ok.frame())
            .await
            .map_err(|e| Error::io("send", e))
    }

    async fn apply(&self, req: Request) -> Response {
        if let Request::Scrub { start } = req {
            let Some(scrub) = &self.scrub else {
                return Response::error(&Error::Invalid("this agent runs no scrub".into()));
            };
            if start {
                tracing::info!("scrub pass asked for");
            }
            return match scrub.request(start).await {
                Ok(s) => Response::Scrubbed(s),
                Err(e) => Response::error(&e),
            };
        }
        let store = self.store.clone();
        let result = tokio::task::spawn_blocking(move || -> Result<Response> {
            Ok(match req {
                Request::PutShard { key, data } => {
                    let r = store.put_shard_blocking(&key, &data);
                    sa_core::pool::frames().give(data);
                    r?;
                    Response::Ok
                }
                Request::GetShard { key } => Response::Data(store.get_shard_blocking(&key)?),
                Request::GetRange { key, offset, len } => {
                    Response::Data(store.get_range_blocking(&key, offset, len)?)
                }
                Request::ConfirmShard { key, header } => {
                    if store.confirm_shard_blocking(&key, &header)? {
                        Response::Ok
                    } else {
                        Response::error(&Error::ShardMissing)
                    }
                }
                Request::DeleteShard { key } => {
                    store.delete_shard_blocking(&key)?;
                    Response::Ok
                }
                Request::PutBlob { name, data } => {
                    store.put_blob_blocking(&name, &data)?;
                    Response::Ok
                }
                Request::GetBlob { name } => Response::Data(store.get_blob_blocking(&name)?),
                Request::ListBlobs { prefix } => {
                    Response::Names(store.list_blobs_blocking(&prefix)?)
                }
                Request::DeleteBlob { name } => {
                    store.delete_blob_blocking(&name)?;
                    Response::Ok
                }
                Request::Sync => {
                    store.sync_blocking()?;
                    Response::Ok
                }
                Request::Stat => Response::Stat(store.stat_blocking()),
                Request::ListVolumes => Response::Names(store.list_volumes_blocking()?),
                Request::ListShards { volume, bucket } => {
                    Response::Shards(store.list_shards_blocking(&volume, bucket)?)
                }
                Request::SweepShards { min_age, keys } => {
                    let stats = store.sweep_blocking(min_age, &keys)?;
                    if stats.deleted > 0 {
                        tracing::info!(
                            "swept {} unreferenced shard(s), {} bytes",
                            stats.deleted,
                            stats.bytes
                        );
                    }
                    Response::Swept(stats)
                }
                // Answered above, off the blocking pool.
                Request::Scrub { .. } => Response::error(&Error::Invalid("scrub".into())),
            })
        })
        .await;
        match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if !matches!(e, Error::ShardMissing) {
                    tracing::warn!("request failed: {e}");
                }
                Response::error(&e)
            }
            Err(e) => Response::error(&Error::io(
                "agent task",
                std::io::Error::other(e.to_string()),
            )),
        }
    }
}

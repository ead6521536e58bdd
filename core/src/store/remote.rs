//! A store on a remote `shard-agent`, reached over TLS 1.3 ([`crate::tls`]) with the
//! [`crate::wire`] protocol.
//!
//! The key the agent proves in its first TLS handshake is remembered ([`AgentClient::key`]);
//! every later connection of the same client must show the same key and the same agent id, or
//! it is refused ([`Error::IdentityChanged`]). Whether the first key is the right one is the
//! caller's check against the pins in the catalog (`crate::pins`).
//!
//! Each client keeps a small pool of authenticated connections (at most
//! [`MAX_CONNECTIONS`] at once), so many shards travel to one agent in parallel. A request that
//! fails on a pooled connection (the agent restarted, say) is retried once on a fresh one;
//! after that the failure is the caller's, as [`Error::AgentUnreachable`].
//!
//! An agent that vanishes without a reset costs a request the stall timeout
//! ([`ClientOptions::stall_timeout`]), not the request timeout, and is then not asked again for a
//! while: see [`health`] for how the kernel notices a silent link and how long an agent stays
//! down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::error::{Error, Result};
use crate::keys::Keys;
use crate::shard::{ShardKey, VolumeId};
use crate::store::{ShardEntry, ShardRead, ShardWrite, StoreStat, SweepStats};
use crate::tls::{self, AgentKey};
use crate::wire::{
    auth_message, read_frame, write_frame, Handshake, Request, Response, ScrubStatus,
    PROTOCOL_VERSION,
};

pub mod health;
use health::{Health, Verdict};

/// Most connections one client opens to one agent.
pub const MAX_CONNECTIONS: usize = 8;
/// How long to wait for a TCP connection and handshake, unless told otherwise.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one request may take before the agent counts as gone, unless told otherwise.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a link may stay silent (nothing acknowledged) before the agent counts as gone,
/// unless told otherwise (see [`health`]).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(4);
/// How long an agent that stopped answering is not asked, unless told otherwise.
pub const RETRY_AFTER: Duration = Duration::from_secs(10);

/// How long a client waits for an agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// TCP connection plus TLS and owner handshake.
    pub connect_timeout: Duration,
    /// One request and its whole answer.
    pub request_timeout: Duration,
    /// How long the link may carry nothing (no acknowledgement of what was sent, no answer to a
    /// keepalive probe) while a request is out before the connection counts as dead.
    pub stall_timeout: Duration,
    /// How long an agent that stopped answering is not asked (calls fail at once); then it is
    /// reconnected in the background.
    pub retry_after: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            connect_timeout: CONNECT_TIMEOUT,
            request_timeout: REQUEST_TIMEOUT,
            stall_timeout: STALL_TIMEOUT,
            retry_after: RETRY_AFTER,
        }
    }
}

/// A client of one agent.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

struct Inner {
    addr: String,
    keys: Arc<Keys>,
    opts: ClientOptions,
    agent_id: [u8; 16],
    key: AgentKey,
    idle: Mutex<Vec<Conn>>,
    slots: Semaphore,
    health: Health,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentClient({})", self.inner.addr)
    }
}

/// One authenticated connection.
type Conn = TlsStream<TcpStream>;

impl Inner {
    /// A new connection to the same agent: refused when another agent, or another key, answers.
    async fn open_same(&self) -> Result<Conn> {
        let (s, id, key) = open(&self.addr, &self.keys, &self.opts).await?;
        if id != self.agent_id {
            return Err(Error::Refused {
                addr: self.addr.clone(),
                why: "a different agent now answers at this address".into(),
            });
        }
        if key != self.key {
            return Err(Error::IdentityChanged {
                addr: self.addr.clone(),
                id: crate::keys::hex(&id),
                pinned: self.key.to_string(),
                presented: key.to_string(),
            });
        }
        Ok(s)
    }
}

async fn open(addr: &str, keys: &Keys, opts: &ClientOptions) -> Result<(Conn, [u8; 16], AgentKey)> {
    let timeout = opts.connect_timeout;
    let unreachable = |why: String| Error::AgentUnreachable {
        addr: addr.to_string(),
        why,
    };
    let fut = async {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tcp.set_nodelay(true)
            .map_err(|e| unreachable(e.to_string()))?;
        health::tune(&tcp, opts.stall_timeout).map_err(|e| unreachable(e.to_string()))?;
        let mut s = TlsConnector::from(tls::client_config())
            .connect(tls::server_name(), tcp)
            .await
            .map_err(|e| {
                Error::Protocol(format!(
                    "TLS handshake with {addr} failed: {e} (is a shard-agent of this version listening there?)"
                ))
            })?;
        let key = tls::peer_key(s.get_ref().1)?;
        let binding = tls::client_binding(s.get_ref().1)?;
        write_frame(
            &mut s,
            &Handshake::Hello {
                version: PROTOCOL_VERSION,
            }
            .frame(),
        )
        .await
        .map_err(|e| unreachable(e.to_string()))?;
        let (kind, body) = read_frame(&mut s)
            .await?
            .ok_or_else(|| unreachable("closed the connection during the handshake".into()))?;
        let (agent_id, nonce) = match Handshake::parse(kind, &body) {
            Ok(Handshake::Challenge {
                version,
                agent_id,
                nonce,
            }) => {
                if version != PROTOCOL_VERSION {
                    return Err(Error::Protocol(format!(
                        "agent {addr} speaks protocol version {version}, this sa-image speaks {PROTOCOL_VERSION}"
                    )));
                }
                (agent_id, nonce)
            }
            _ => {
                return Err(Error::Protocol(format!(
                    "{addr} did not answer like a shard-agent"
                )))
            }
        };
        let auth = Handshake::Auth {
            owner: keys.owner_id().0,
            signature: keys.sign(&auth_message(&agent_id, &nonce, &binding)),
        };
        write_frame(&mut s, &auth.frame())
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let (kind, body) = read_frame(&mut s)
            .await?
            .ok_or_else(|| unreachable("closed the connection during the handshake".into()))?;
        match Response::parse(kind, body)? {
            Response::Ok => Ok((s, agent_id, key)),
            Response::Error { message, .. } => Err(Error::Refused {
                addr: addr.to_string(),
                why: message,
            }),
            _ => Err(Error::Protocol(format!(
                "{addr} sent an unexpected handshake answer"
            ))),
        }
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(unreachable(format!(
            "no answer within {}",
            seconds(timeout)
        ))),
    }
}

/// `5s`, `0.5s`: a timeout as a person reads it.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{s:.1}s")
    }
}

impl AgentClient {
    /// Connects and authenticates to the agent at `addr` (`host:port`) with the default timeouts.
    pub async fn connect(addr: &str, keys: Arc<Keys>) -> Result<Self> {
        Self::connect_with(addr, keys, ClientOptions::default()).await
    }

    /// Connects and authenticates to the agent at `addr` (`host:port`).
    pub async fn connect_with(addr: &str, keys: Arc<Keys>, opts: ClientOptions) -> Result<Self> {
        let (stream, agent_id, key) = open(addr, &keys, &opts).await?;
        Ok(AgentClient {
            inner: Arc::new(Inner {
                addr: addr.to_string(),
                keys,
                opts,
                agent_id,
                key,
                idle: Mutex::new(vec![stream]),
                slots: Semaphore::new(MAX_CONNECTIONS),
                health: Health::default(),
            }),
        })
    }

    /// The agent's address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// The agent's stable id.
    pub fn agent_id(&self) -> [u8; 16] {
        self.inner.agent_id
    }

    /// The identity key the agent proved in the TLS handshake.
    pub fn key(&self) -> AgentKey {
        self.inner.key
    }

    async fn exchange(&self, stream: &mut Conn, req: &Request) -> Result<Response> {
        let fut = async {
            write_frame(stream, &req.frame())
                .await
                .map_err(|e| Error::io("send", e))?;
            let (kind, body) = read_frame(stream)
                .await?
                .ok_or_else(|| Error::Protocol("connection closed".into()))?;
            Response::parse(kind, body)
        };
        let limit = self.inner.opts.request_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(Error::Protocol(format!(
                "no answer within {}",
                seconds(limit)
            ))),
        }
    }

    /// Sends a request and returns the agent's answer; an agent's error becomes an [`Error`].
    ///
    /// An agent that counts as down (see [`health`]) is not asked: the call fails at once with
    /// [`Error::AgentUnreachable`].
    pub async fn call(&self, req: &Request) -> Result<Response> {
        self.check_up()?;
        let _slot = self
            .inner
            .slots
            .acquire()
            .await
            .map_err(|_| Error::Protocol("client closed".into()))?;
        // Requests queued behind ones that found the agent silent fail at once too.
        self.check_up()?;
        let pooled = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let silent_after = health::silent_after(
            self.inner.opts.connect_timeout,
            self.inner.opts.stall_timeout,
        );
        let started = std::time::Instant::now();
        let result = match pooled {
            Some(mut s) => match self.exchange(&mut s, req).await {
                Ok(r) => Ok((r, s)),
                // A stale pooled connection (the agent restarted, say) fails at once: retry once
                // on a fresh one. One that failed after a silence is a dead link: do not pay the
                // connect timeout on top.
                Err(e) if started.elapsed() >= silent_after => Err(Error::AgentUnreachable {
                    addr: self.inner.addr.clone(),
                    why: e.to_string(),
                }),
                Err(_) => self.fresh_exchange(req).await,
            },
            None => self.fresh_exchange(req).await,
        };
        let (resp, stream) = match result {
            Ok(r) => r,
            Err(e) => {
                if let Error::AgentUnreachable { why, .. } = &e {
                    if started.elapsed() >= silent_after {
                        self.inner.health.down(why);
                        // Its other connections went over the same link.
                        self.inner
                            .idle
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clear();
                    }
                }
                return Err(e);
            }
        };
        self.inner
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(stream);
        match resp {
            Response::Error { code, message } => Err(code.into_error(message)),
            r => Ok(r),
        }
    }

    /// Whether the agent counts as up; when it is down, the error to fail with (and, once the
    /// retry time has passed, a reconnection started in the background).
    fn check_up(&self) -> Result<()> {
        let why = match self.inner.health.verdict(self.inner.opts.retry_after) {
            Verdict::Ask => return Ok(()),
            Verdict::Down(why) => why,
            Verdict::DownProbe(why) => {
                let inner = self.inner.clone();
                tokio::spawn(async move {
                    match inner.open_same().await {
                        Ok(conn) => {
                            inner
                                .idle
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push(conn);
                            inner.health.up();
                            tracing::info!("agent {} answers again", inner.addr);
                        }
                        Err(e) => inner.health.down(&e.to_string()),
                    }
                });
                why
            }
        };
        Err(Error::AgentUnreachable {
            addr: self.inner.addr.clone(),
            why,
        })
    }

    /// Whether this client counts the agent as down (it stopped answering; see [`health`]).
    pub fn is_down(&self) -> bool {
        self.inner.health.is_down()
    }

    async fn fresh_exchange(&self, req: &Request) -> Result<(Response, Conn)> {
        let mut s = self.inner.open_same().await?;
        let r = self
            .exchange(&mut s, req)
            .await
            .map_err(|e| Error::AgentUnreachable {
                addr: self.inner.addr.clone(),
                why: e.to_string(),
            })?;
        Ok((r, s))
    }

    /// Asks for the agent's scrub state; with `start`, the agent first begins a full pass over
    /// its shards (unless one is running). Not part of [`ShardRead`]: a local directory has no
    /// background scrub.
    pub async fn scrub(&self, start: bool) -> Result<ScrubStatus> {
        match self.call(&Request::Scrub { start }).await? {
            Response::Scrubbed(s) => Ok(s),
            _ => Err(Error::Protocol(format!(
                "{}: unexpected answer",
                self.inner.addr
            ))),
        }
    }

    async fn expect_ok(&self, req: &Request) -> Result<()> {
        match self.call(req).await? {
            Response::Ok => Ok(()),
            _ => Err(Error::Protocol(format!(
                "{}: unexpected answer",
                self.inner.addr
            ))),
        }
    }

    /// Bytes `offset..offset + len` of a shard's payload (`GET_RANGE`; see [`crate::wire`]),
    /// unchecked: the caller checks them (by their AEAD tags).
    pub async fn get_range(&self, key: &ShardKey, offset: u32, len: u32) -> Result<Vec<u8>> {
        let d = self
            .expect_data(&Request::GetRange {
                key: *key,
                offset,
                len,
            })
            .await?;
        if d.len() != len as usize {
            return Err(Error::Protocol(format!(
                "{}: asked {len} bytes of shard {}, got {}",
                self.inner.addr,
                key.short(),
                d.len()
            )));
        }
        Ok(d)
    }

    async fn expect_data(&self, req: &Request) -> Result<Vec<u8>> {
        match self.call(req).await? {
            Response::Data(d) => Ok(d),
            _ => Err(Error::Protocol(format!(
                "{}: unexpected answer",
                self.inner.addr
            ))),
        }
    }
}

#[async_trait]
impl ShardRead for AgentClient {
    async fn get_shard(&self, key: &ShardKey) -> Result<Vec<u8>> {
        self.expect_data(&Request::GetShard { key: *key }).await
    }
    async fn get_blob(&self, name: &str) -> Result<Vec<u8>> {
        self.expect_data(&Request::GetBlob {
            name: name.to_string(),
        })
        .await
    }
    async fn list_blobs(&self, prefix: &str) -> Result<Vec<String>> {
        match self
            .call(&Request::ListBlobs {
                prefix: prefix.to_string(),
            })
            .await?
        {
            Response::Names(n) => Ok(n),
            _ => Err(Error::Protocol(format!(
                "{}: unexpected answer",
                self.inner.addr
            ))),
        }
    }
    async fn stat(&self) -> Result<StoreStat> {
        match self.call(&Request::Stat).await? {
            Response::Stat(s) => Ok(s),
            _ => Err(Error::Protocol(format!(
                "{}: unexpected answer",
                self.inner.addr
            ))),
        }
    }
    async fn list_volumes(&self) -> Result<Vec<String>> {
        match self.call(&Request::ListVolumes).await? {
            Response::Names(n) => Ok(n),
            _ => Err(Error::Protocol(format!(
                "{}: unexpected answer",
                self.inner.addr
            ))),
        }
    }
    async fn list_shards(&self, volume: &VolumeId, bucket: u8) -> Result<Vec<ShardEntry>> {
        match self
            .call(&Request::ListShards {
                volume: *volume,
                bucket,
            })
            .await?
        {
            Response::Shards(s) => Ok(s),
            _ => Err(Error::Protocol(format!(
                "{}: unexpected answer",
                self.inner.addr
            ))),
        }
    }
}

#[async_trait]
impl ShardWrite for AgentClient {
    async fn put_shard(&self, key: &ShardKey, file: Vec<u8>) -> Result<()> {
        let req = Request::PutShard {
            key: *key,
            data: file,
        };
        let r = self.expect_ok(&req).await;
        if let Request::PutShard { data, .. } = req {
            crate::pool::frames().give(data);
        }
        r
    }
    async fn confirm_shard(&self, key: &ShardKey, header: &[u8]) -> Result<bool> {
        let req = Request::ConfirmShard {
            key: *key,
            header: header.to_vec(),
        };
        match self.expect_ok(&req).await {
            Ok(()) => Ok(true),
            Err(Error::ShardMissing) => Ok(false),
            Err(e) => Err(e),
        }
    }
    async fn delete_shard(&self, key: &ShardKey) -> Result<()> {
        self.expect_ok(&Request::DeleteShard { key: *key }).await
    }
    async fn put_blob(&self, name: &str, data: Vec<u8>) -> Result<()> {
        self.expect_ok(&Request::PutBlob {
            name: name.to_string(),
            data,
        })
        .await
    }
    async fn delete_blob(&self, name: &str) -> Result<()> {
        self.expect_ok(&Request::DeleteBlob {
            name: name.to_string(),
        })
        .await
    }
    async fn sync(&self) -> Result<()> {
        self.expect_ok(&Request::Sync).await
    }
    async fn sweep(&self, min_age: u64, keys: Vec<ShardKey>) -> Result<SweepStats> {
        let mut total = SweepStats::default();
        for chunk in keys.chunks(crate::wire::MAX_SWEEP_KEYS) {
            match self
                .call(&Request::SweepShards {
                    min_age,
                    keys: chunk.to_vec(),
                })
                .await?
            {
                Response::Swept(s) => {
                    total.deleted += s.deleted;
                    total.bytes += s.bytes;
                    total.young += s.young;
                }
                _ => {
                    return Err(Error::Protocol(format!(
                        "{}: unexpected answer",
                        self.inner.addr
                    )))
                }
            }
        }
        Ok(total)
    }
}

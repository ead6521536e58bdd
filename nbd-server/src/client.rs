//! An NBD client: read an export and query its block status.
//!
//! Built for taking snapshots of VM disks served by QEMU (`block-export-add`,
//! `qemu-nbd`) or by any fixed-newstyle server: read the export, skip what
//! `base:allocation` reports as holes, and for incrementals read only what a
//! `qemu:dirty-bitmap:NAME` context marks dirty. Read-only: it sends
//! `NBD_CMD_READ`, `NBD_CMD_BLOCK_STATUS` and `NBD_CMD_DISC`, nothing else.
//!
//! - [`NbdUri`]: `nbd://HOST[:PORT][/EXPORT]` and `nbd+unix:///EXPORT?socket=PATH`
//!   (doc/uri.md); TLS schemes are refused with an error that says so.
//! - [`Client::connect`]: TCP or Unix socket, with connect and handshake
//!   timeouts; fixed newstyle only (oldstyle and non-fixed servers are refused
//!   by name); negotiates structured replies, the metadata contexts of
//!   [`ClientConfig::meta_contexts`] (those the server does not offer are simply
//!   absent from [`Client::contexts`]), and `NBD_OPT_GO` with
//!   `NBD_INFO_BLOCK_SIZE`, falling back to `NBD_OPT_EXPORT_NAME`.
//! - [`Client::read`] splits a read at the negotiated maximum payload and keeps
//!   up to [`ClientConfig::max_in_flight`] requests in flight;
//!   [`Client::start_read`] is the primitive for a sequential reader that keeps
//!   a pipeline full with buffers of its own. Structured replies are reassembled
//!   (`OFFSET_DATA`, `OFFSET_HOLE` as zeroes, error chunks as
//!   [`ClientError::Server`]); simple replies are used when the server has no
//!   structured replies.
//! - [`Client::block_status`] (one request), [`Client::walk_extents`] (a whole
//!   range, one reply at a time, in bounded memory) and
//!   [`Client::collect_extents`] (a range, merged, in one vector).
//! - A [`Client`] is a cheap handle: clones share one connection, whose task
//!   demultiplexes replies by cookie. Call [`Client::connect`] again (or
//!   [`Client::connect_many`]) for more connections.
//!
//! Hostile or broken servers: every length from the wire is bounded before
//! anything is allocated or read for it, chunks are checked against their
//! request, and a violation closes the connection with a
//! [`ProtocolError`]; nothing panics. A request without a reply for
//! [`ClientConfig::request_timeout`] closes the connection too.
//!
//! ```no_run
//! use nbd_server::client::{Client, ClientConfig, NbdUri};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let uri: NbdUri = "nbd+unix:///vda?socket=/run/qemu/nbd.sock".parse()?;
//! let config = ClientConfig {
//!     meta_contexts: vec!["base:allocation".into(), "qemu:dirty-bitmap:backup-1".into()],
//!     ..ClientConfig::default()
//! };
//! let client = Client::connect(&uri, &config).await?;
//! if client.context("qemu:dirty-bitmap:backup-1").is_none() {
//!     return Err("no such bitmap: take a full snapshot instead".into());
//! }
//! let mut dirty = client.walk_extents("qemu:dirty-bitmap:backup-1", 0, client.size());
//! let mut buf = Vec::new();
//! while let Some(extents) = dirty.next().await? {
//!     for e in extents.iter().filter(|e| e.is_dirty()) {
//!         buf.resize(e.len as usize, 0); // a real reader goes in bounded pieces
//!         client.read(e.offset, &mut buf).await?;
//!     }
//! }
//! client.disconnect().await?;
//! # Ok(()) }
//! ```

mod conn;
mod coverage;
mod error;
mod handshake;
mod info;
mod reply;
mod uri;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tracing::{debug, warn};

pub use error::{ClientError, ProtocolError};
pub use info::{merge_extents, BlockSizes, ExportInfo, MetaContext, StatusExtent};
pub use uri::{Endpoint, NbdUri, UriError};

use crate::proto::{NBD_CMD_BLOCK_STATUS, NBD_CMD_READ};
use conn::Conn;
use reply::{Job, Output};

/// Tunables of a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Time to establish the TCP or Unix connection. Default 10 s.
    pub connect_timeout: Duration,
    /// Time from connected to transmission. Default 30 s.
    pub handshake_timeout: Duration,
    /// A request whose reply is not complete this long after its caller
    /// started waiting closes the connection. Default 60 s.
    pub request_timeout: Duration,
    /// Negotiate structured replies (needed for block status; lets holes
    /// travel as holes). Default true; false forces simple replies.
    pub structured_replies: bool,
    /// Metadata contexts to select, e.g. `base:allocation`,
    /// `qemu:dirty-bitmap:NAME`. Default none.
    pub meta_contexts: Vec<String>,
    /// Requests in flight on one connection. Default 16.
    pub max_in_flight: usize,
    /// Largest single read request, further lowered to the server's maximum
    /// payload. Default 1 MiB: against qemu-nbd, 256 KiB to 2 MiB requests
    /// with 16 in flight read fastest, 4 MiB is slower and 32 MiB less than
    /// half as fast (bench/nbd-client.sh), and in-flight memory stays at
    /// `max_in_flight` MiB per connection.
    pub max_read_request: u32,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            structured_replies: true,
            meta_contexts: Vec::new(),
            max_in_flight: 16,
            max_read_request: 1 << 20,
        }
    }
}

/// A connection to one NBD export. Clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    conn: Conn,
    info: ExportInfo,
    contexts: Vec<MetaContext>,
    max_read: u32,
    window: usize,
}

impl Client {
    /// Connects to `uri` and runs the handshake.
    pub async fn connect(uri: &NbdUri, config: &ClientConfig) -> Result<Client, ClientError> {
        let target = match &uri.endpoint {
            Endpoint::Tcp { host, port } => format!("{host}:{port}"),
            Endpoint::Unix { path } => path.display().to_string(),
        };
        debug!(%uri, "connecting to NBD server");
        let after = config.connect_timeout;
        let timed_out = |_| ClientError::ConnectTimeout {
            target: target.clone(),
            after,
        };
        let failed = |source| ClientError::Connect {
            target: target.clone(),
            source,
        };
        match &uri.endpoint {
            Endpoint::Tcp { host, port } => {
                let connect = TcpStream::connect((host.as_str(), *port));
                let s = tokio::time::timeout(after, connect)
                    .await
                    .map_err(timed_out)?
                    .map_err(failed)?;
                // Headers are batched by the writer; do not delay them further.
                s.set_nodelay(true).map_err(ClientError::Io)?;
                Client::handshake(s, &uri.export, config).await
            }
            Endpoint::Unix { path } => {
                let s = tokio::time::timeout(after, UnixStream::connect(path))
                    .await
                    .map_err(timed_out)?
                    .map_err(failed)?;
                Client::handshake(s, &uri.export, config).await
            }
        }
    }

    /// Opens `n` connections to the same export (at least one).
    pub async fn connect_many(
        uri: &NbdUri,
        config: &ClientConfig,
        n: usize,
    ) -> Result<Vec<Client>, ClientError> {
        let first = Client::connect(uri, config).await?;
        if n > 1 && !first.info().can_multi_conn() && !first.info().read_only() {
            warn!(%uri, "the server does not set NBD_FLAG_CAN_MULTI_CONN on a writable export: \
                connections may see different caches");
        }
        let mut all = vec![first];
        for _ in 1..n {
            all.push(Client::connect(uri, config).await?);
        }
        Ok(all)
    }

    /// Runs the handshake on an already connected stream (any transport).
    pub async fn handshake<S>(
        mut stream: S,
        export: &str,
        config: &ClientConfig,
    ) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let after = config.handshake_timeout;
        let hs = handshake::handshake(
            &mut stream,
            export,
            config.structured_replies,
            &config.meta_contexts,
        );
        let neg = tokio::time::timeout(after, hs)
            .await
            .map_err(|_| ClientError::HandshakeTimeout { after })??;
        let bs = neg.info.block_size;
        // "the client MUST NOT request a length larger than the maximum payload
        // size", and lengths are multiples of the minimum block size.
        let max = config.max_read_request.min(bs.maximum).max(bs.minimum);
        let max_read = max - max % bs.minimum;
        let granted = neg.contexts.iter().map(|c| c.id).collect();
        let window = config.max_in_flight.max(1);
        let conn = Conn::start(
            stream,
            neg.info.structured_replies,
            granted,
            window,
            config.request_timeout,
        );
        Ok(Client {
            inner: Arc::new(Inner {
                conn,
                info: neg.info,
                contexts: neg.contexts,
                max_read,
                window,
            }),
        })
    }

    /// The export: size, flags, size constraints.
    pub fn info(&self) -> &ExportInfo {
        &self.inner.info
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.inner.info.size
    }

    /// The metadata contexts the server granted.
    pub fn contexts(&self) -> &[MetaContext] {
        &self.inner.contexts
    }

    /// A granted context by name.
    pub fn context(&self, name: &str) -> Option<&MetaContext> {
        self.inner.contexts.iter().find(|c| c.name == name)
    }

    /// The largest single read request this connection sends.
    pub fn max_read(&self) -> u32 {
        self.inner.max_read
    }

    /// Checks a range against the export size and the minimum block size.
    fn check_range(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ClientError::OutOfRange { offset, len, size });
        }
        let min_block = self.inner.info.block_size.minimum;
        if !offset.is_multiple_of(min_block.into()) || !len.is_multiple_of(min_block.into()) {
            return Err(ClientError::Unaligned {
                offset,
                len,
                min_block,
            });
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`, in requests of at most
    /// [`max_read`](Client::max_read) bytes, several in flight.
    pub async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        self.check_range(offset, buf.len() as u64)?;
        let piece = self.inner.max_read as usize;
        let mut queue: VecDeque<(usize, ReadHandle)> = VecDeque::new();
        let mut spare: Vec<u8> = Vec::new();
        let mut next = 0usize;
        loop {
            while next < buf.len() && queue.len() < self.inner.window {
                let n = piece.min(buf.len() - next);
                let mut v = std::mem::take(&mut spare);
                v.clear();
                v.resize(n, 0);
                queue.push_back((next, self.start_read(offset + next as u64, v).await?));
                next += n;
            }
            let Some((at, handle)) = queue.pop_front() else {
                return Ok(());
            };
            let data = handle.finish().await?;
            buf[at..at + data.len()].copy_from_slice(&data);
            spare = data;
        }
    }

    /// Reads `len` bytes at `offset` into a new buffer. A range that fits one request is read
    /// straight into the buffer returned (no copy); a larger one as [`read`](Client::read) does.
    pub async fn read_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        if len > 0 && len as u64 <= u64::from(self.inner.max_read) {
            return self
                .start_read(offset, vec![0u8; len])
                .await?
                .finish()
                .await;
        }
        let mut buf = vec![0u8; len];
        self.read(offset, &mut buf).await?;
        Ok(buf)
    }

    /// Sends one read of `buf.len()` bytes at `offset` (at most
    /// [`max_read`](Client::max_read)) and returns at once; the handle gives
    /// the filled buffer back. Waits only when the connection already has
    /// [`ClientConfig::max_in_flight`] requests out.
    pub async fn start_read(&self, offset: u64, buf: Vec<u8>) -> Result<ReadHandle, ClientError> {
        let len = buf.len() as u64;
        if len > u64::from(self.inner.max_read) {
            return Err(ClientError::RequestTooLarge {
                len,
                max: self.inner.max_read,
            });
        }
        self.check_range(offset, len)?;
        if len == 0 {
            // "The client SHOULD NOT request a read length of 0".
            return Ok(ReadHandle {
                client: self.clone(),
                state: ReadState::Ready(buf),
            });
        }
        let rx = self
            .inner
            .conn
            .submit(NBD_CMD_READ, offset, len as u32, Job::read(offset, buf))
            .await?;
        Ok(ReadHandle {
            client: self.clone(),
            state: ReadState::Waiting(rx),
        })
    }

    /// One `NBD_CMD_BLOCK_STATUS` for `context` over `offset..offset+len`.
    /// The server may describe less than asked ("the server MAY return less
    /// data than requested"), never more: extents are clamped to the range.
    pub async fn block_status(
        &self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<StatusExtent>, ClientError> {
        let id = self
            .context(context)
            .ok_or_else(|| ClientError::ContextNotGranted {
                name: context.to_owned(),
            })?
            .id;
        self.check_range(offset, len.into())?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let job = Job::status(offset, len, id);
        let rx = self
            .inner
            .conn
            .submit(NBD_CMD_BLOCK_STATUS, offset, len, job)
            .await?;
        match self.inner.conn.wait(rx).await? {
            Output::Extents(e) => Ok(e),
            Output::Data(_) => {
                Err(ProtocolError::Invalid("data in a block status reply".into()).into())
            }
        }
    }

    /// Walks the extents of `context` over a range, one reply at a time.
    pub fn walk_extents(&self, context: &str, offset: u64, len: u64) -> ExtentWalk {
        ExtentWalk {
            client: self.clone(),
            context: context.to_owned(),
            pos: offset,
            end: offset.saturating_add(len),
        }
    }

    /// All extents of `context` over a range, neighbours with equal flags
    /// merged. Memory grows with the number of extents: for a whole disk with
    /// a fragmented map prefer [`walk_extents`](Client::walk_extents).
    pub async fn collect_extents(
        &self,
        context: &str,
        offset: u64,
        len: u64,
    ) -> Result<Vec<StatusExtent>, ClientError> {
        let mut walk = self.walk_extents(context, offset, len);
        let mut all = Vec::new();
        while let Some(mut batch) = walk.next().await? {
            all.append(&mut batch);
            merge_extents(&mut all);
        }
        Ok(all)
    }

    /// Waits for the requests in flight, sends `NBD_CMD_DISC` and closes.
    /// Other clones of this handle get [`ClientError::Closed`] afterwards.
    /// Dropping every handle also sends `NBD_CMD_DISC`, without waiting.
    pub async fn disconnect(self) -> Result<(), ClientError> {
        self.inner.conn.disconnect().await
    }
}

/// A read in flight, from [`Client::start_read`].
#[derive(Debug)]
pub struct ReadHandle {
    client: Client,
    state: ReadState,
}

#[derive(Debug)]
enum ReadState {
    Ready(Vec<u8>),
    Waiting(oneshot::Receiver<Result<Output, ClientError>>),
}

impl ReadHandle {
    /// Waits for the data; returns the buffer given to `start_read`, filled.
    pub async fn finish(self) -> Result<Vec<u8>, ClientError> {
        match self.state {
            ReadState::Ready(buf) => Ok(buf),
            ReadState::Waiting(rx) => match self.client.inner.conn.wait(rx).await? {
                Output::Data(buf) => Ok(buf),
                Output::Extents(_) => {
                    Err(ProtocolError::Invalid("extents in a read reply".into()).into())
                }
            },
        }
    }
}

/// The extents of one context over a range, from [`Client::walk_extents`].
#[derive(Debug)]
pub struct ExtentWalk {
    client: Client,
    context: String,
    pos: u64,
    end: u64,
}

impl ExtentWalk {
    /// The next reply's extents, in order and contiguous; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Vec<StatusExtent>>, ClientError> {
        if self.pos >= self.end {
            return Ok(None);
        }
        // Block status has no payload limit; a request length is 32 bits and
        // a multiple of the minimum block size.
        let min_block = self.client.info().block_size.minimum;
        let most = u64::from(u32::MAX - u32::MAX % min_block);
        let len = (self.end - self.pos).min(most) as u32;
        let extents = self
            .client
            .block_status(&self.context, self.pos, len)
            .await?;
        // A successful reply has at least one descriptor of nonzero length
        // ("a client can always make progress on a successful return").
        match extents.last() {
            Some(last) => self.pos = last.end(),
            None => {
                return Err(
                    ProtocolError::Invalid("a block status reply without extents".into()).into(),
                )
            }
        }
        Ok(Some(extents))
    }
}

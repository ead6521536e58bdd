//! The transmission phase: requests in, replies out.
//!
//! One reader loop parses request headers (and write payloads) and spawns a
//! task per request, bounded by two per-connection semaphores: a count of
//! requests in flight and a budget of payload bytes in flight. Each task sends
//! its finished reply through a bounded channel to a single writer task, which
//! batches small replies into one buffer and sends large read payloads with a
//! vectored write (header + data, no extra copy). "Replies need not be sent in
//! the same order as requests", so replies leave in completion order.
//!
//! Payload buffers come from a small per-connection pool, so steady streams of
//! same-sized reads and writes do not allocate.

use std::future::Future;
use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, trace, warn};

use crate::error::{ServeError, SourceError};
use crate::handshake::Negotiated;
use crate::proto::*;
use crate::source::{BlockSource, ZeroFlags};

/// Per-connection limits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Requests being served at once.
    pub max_in_flight: usize,
    /// Payload bytes (read replies + write data) held at once; at least 32 MiB.
    pub max_buffered_bytes: usize,
    /// A client that sends nothing for this long, with no request in flight
    /// (or in the middle of a request), is disconnected; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// A reply that makes no progress towards the client for this long closes
    /// the connection.
    pub reply_timeout: Duration,
}

/// The writer batches replies into a buffer of this size before a syscall.
const OUT_CAP: usize = 256 * 1024;
/// Pooled buffers larger than this are freed rather than kept.
const POOL_MAX_BUF: usize = 4 << 20;
/// At most this many idle buffers are kept per connection.
const POOL_MAX_FREE: usize = 32;
/// At most this many bytes of idle buffers are kept per connection, so that a
/// connection between bursts holds little more than its reader's buffer.
const POOL_MAX_FREE_BYTES: usize = 16 << 20;
/// Budget semaphore unit: one permit per KiB of payload.
const BUDGET_UNIT: usize = 1024;

// ------------------------------------------------------------ buffer pool

/// Reusable payload buffers of one connection.
#[derive(Debug, Default)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// A buffer of exactly `len` bytes (contents unspecified).
    fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let mut buf = self
            .free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        } else {
            buf.truncate(len);
        }
        PooledBuf {
            buf,
            pool: Arc::clone(self),
        }
    }
}

/// A buffer that returns to its pool when dropped.
struct PooledBuf {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if self.buf.capacity() <= POOL_MAX_BUF {
            let mut free = self.pool.free.lock().unwrap_or_else(|p| p.into_inner());
            let held: usize = free.iter().map(Vec::capacity).sum();
            if free.len() < POOL_MAX_FREE && held + self.buf.capacity() <= POOL_MAX_FREE_BYTES {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

// ------------------------------------------------------------------ replies

/// Keeps a request's share of the connection limits until its reply is sent.
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: OwnedSemaphorePermit,
}

/// One complete reply, ready for the writer: `head`, then `extra`, then `data`.
struct Reply {
    head: [u8; 32],
    head_len: usize,
    extra: Vec<u8>,
    data: Option<PooledBuf>,
    _permits: Permits,
}

/// What a successful command produced.
enum Done {
    /// No payload.
    Empty,
    /// Read data.
    Data(PooledBuf),
    /// `NBD_REPLY_TYPE_BLOCK_STATUS` descriptors (length, flags pairs).
    Extents(Vec<u8>),
}

/// Everything a request task needs, shared by the connection's tasks.
struct Ctx {
    source: Arc<dyn BlockSource>,
    size: u64,
    structured: bool,
    base_allocation: bool,
    flags: u16,
    pool: Arc<BufferPool>,
}

impl Ctx {
    fn reply(&self, req: &Request, result: Result<Done, SourceError>, permits: Permits) -> Reply {
        let mut r = Reply {
            head: [0u8; 32],
            head_len: 0,
            extra: Vec::new(),
            data: None,
            _permits: permits,
        };
        let mut put = |bytes: &[u8]| {
            r.head[r.head_len..r.head_len + bytes.len()].copy_from_slice(bytes);
            r.head_len += bytes.len();
        };
        match result {
            Err(e) => {
                let errno = e.nbd_errno();
                debug!(cmd = command_name(req.kind), offset = req.offset, len = req.len, %e, "request failed");
                if self.structured {
                    // "The server SHOULD prefer sending errors via a structured
                    // reply, as the error can then be accompanied by a string".
                    let msg = e.to_string();
                    let msg = &msg.as_bytes()[..msg.len().min(MAX_STRING)];
                    let len = 6 + msg.len() as u32;
                    put(&structured_header(
                        NBD_REPLY_FLAG_DONE,
                        NBD_REPLY_TYPE_ERROR,
                        req.handle,
                        len,
                    ));
                    put(&errno.to_be_bytes());
                    put(&(msg.len() as u16).to_be_bytes());
                    r.extra = msg.to_vec();
                } else {
                    // Simple error reply: "it MUST NOT send any payload for this request".
                    put(&simple_reply(errno, req.handle));
                }
            }
            Ok(Done::Data(buf)) if self.structured => {
                // One content chunk, marked final: the data is complete before
                // we send it, so no error can follow ("MUST NOT mark a chunk as
                // final if there is still a possibility of detecting an error").
                let len = 8 + buf.buf.len() as u32;
                put(&structured_header(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_OFFSET_DATA,
                    req.handle,
                    len,
                ));
                put(&req.offset.to_be_bytes());
                r.data = Some(buf);
            }
            Ok(Done::Data(buf)) => {
                put(&simple_reply(0, req.handle));
                r.data = Some(buf);
            }
            Ok(Done::Extents(descriptors)) => {
                let len = 4 + descriptors.len() as u32;
                put(&structured_header(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_BLOCK_STATUS,
                    req.handle,
                    len,
                ));
                put(&BASE_ALLOCATION_ID.to_be_bytes());
                r.extra = descriptors;
            }
            Ok(Done::Empty) if self.structured && req.kind == NBD_CMD_READ => {
                // A zero-length read: "MUST NOT use a simple reply for NBD_CMD_READ".
                put(&structured_header(
                    NBD_REPLY_FLAG_DONE,
                    NBD_REPLY_TYPE_NONE,
                    req.handle,
                    0,
                ));
            }
            Ok(Done::Empty) => {
                // "a simple reply MAY be used as a reply to any request other
                // than NBD_CMD_READ, but only if the reply has no data payload".
                put(&simple_reply(0, req.handle));
            }
        }
        r
    }

    /// Checks a request against the negotiated session before touching the source.
    fn validate(&self, req: &Request) -> Result<(), SourceError> {
        let advertised = |flag: u16| self.flags & flag != 0;
        // "provided `NBD_FLAG_SEND_FUA` has been negotiated ... the server MUST
        // accept all commands with this bit set (even by ignoring the bit)".
        let mut allowed = if advertised(NBD_FLAG_SEND_FUA) {
            NBD_CMD_FLAG_FUA
        } else {
            0
        };
        let writes = matches!(
            req.kind,
            NBD_CMD_WRITE | NBD_CMD_TRIM | NBD_CMD_WRITE_ZEROES
        );
        match req.kind {
            NBD_CMD_READ => {
                if advertised(NBD_FLAG_SEND_DF) {
                    allowed |= NBD_CMD_FLAG_DF;
                }
            }
            NBD_CMD_WRITE | NBD_CMD_FLUSH | NBD_CMD_TRIM | NBD_CMD_CACHE => {}
            NBD_CMD_WRITE_ZEROES => {
                allowed |= NBD_CMD_FLAG_NO_HOLE;
                if advertised(NBD_FLAG_SEND_FAST_ZERO) {
                    allowed |= NBD_CMD_FLAG_FAST_ZERO;
                }
            }
            NBD_CMD_BLOCK_STATUS => allowed |= NBD_CMD_FLAG_REQ_ONE,
            // "The server SHOULD return `NBD_EINVAL` if it receives an unknown command."
            _ => return Err(SourceError::Invalid("unknown command")),
        }
        if req.flags & !allowed != 0 {
            // "SHOULD return `NBD_EINVAL` if it receives an unknown command flag."
            return Err(SourceError::Invalid("command flag not valid here"));
        }
        if writes && advertised(NBD_FLAG_READ_ONLY) {
            // "it SHOULD return `NBD_EPERM` if it receives a write or trim
            // request on a read-only export."
            return Err(SourceError::ReadOnly);
        }
        match req.kind {
            NBD_CMD_FLUSH if !advertised(NBD_FLAG_SEND_FLUSH) => {
                return Err(SourceError::Invalid("flush not supported"))
            }
            NBD_CMD_TRIM if !advertised(NBD_FLAG_SEND_TRIM) => {
                return Err(SourceError::Invalid("trim not supported"))
            }
            NBD_CMD_WRITE_ZEROES if !advertised(NBD_FLAG_SEND_WRITE_ZEROES) => {
                return Err(SourceError::Invalid("write zeroes not supported"))
            }
            NBD_CMD_BLOCK_STATUS if !self.base_allocation => {
                // "Servers SHOULD reply with `NBD_EINVAL` to clients sending
                // `NBD_CMD_BLOCK_STATUS` without selecting at least one metadata context."
                return Err(SourceError::Invalid("no metadata context selected"));
            }
            NBD_CMD_READ if req.len > MAX_PAYLOAD => {
                return Err(if self.structured {
                    // "the server is also permitted to reject large read
                    // requests up front with `NBD_EOVERFLOW`".
                    SourceError::TooLarge("read larger than the 32 MiB maximum payload")
                } else {
                    SourceError::Invalid("read larger than the 32 MiB maximum payload")
                });
            }
            _ => {}
        }
        if req.kind == NBD_CMD_FLUSH {
            return Ok(());
        }
        let in_range = req
            .offset
            .checked_add(u64::from(req.len))
            .is_some_and(|end| end <= self.size);
        if !in_range {
            return Err(match req.kind {
                // "The server SHOULD return `NBD_ENOSPC` if it receives a write
                // request including one or more sectors beyond the size of the device."
                NBD_CMD_WRITE | NBD_CMD_WRITE_ZEROES => SourceError::NoSpace,
                // "It SHOULD return `NBD_EINVAL` if it receives a read or trim
                // request including one or more sectors beyond the size".
                _ => SourceError::Invalid("request beyond the end of the export"),
            });
        }
        Ok(())
    }

    /// Runs one request against the source.
    async fn execute(&self, req: &Request, data: Option<PooledBuf>) -> Result<Done, SourceError> {
        self.validate(req)?;
        let fua = req.flags & NBD_CMD_FLAG_FUA != 0;
        let offset = req.offset;
        let len = u64::from(req.len);
        // "The client SHOULD NOT request a ... length of 0; the behavior of a
        // server on such a request is unspecified although the server SHOULD
        // NOT disconnect." Zero-length reads, writes, trims and zeroes succeed
        // without touching the source; a zero-length block status cannot be
        // answered with a nonzero descriptor and gets EINVAL.
        match req.kind {
            NBD_CMD_READ => {
                if len == 0 {
                    return Ok(Done::Empty);
                }
                let mut buf = self.pool.take(req.len as usize);
                self.source.read(offset, &mut buf.buf).await?;
                Ok(Done::Data(buf))
            }
            NBD_CMD_WRITE => {
                if let Some(d) = data.as_ref().filter(|d| !d.buf.is_empty()) {
                    self.source.write(offset, &d.buf, fua).await?;
                }
                Ok(Done::Empty)
            }
            NBD_CMD_FLUSH => self.source.flush().await.map(|()| Done::Empty),
            NBD_CMD_TRIM => {
                if len > 0 {
                    self.source.trim(offset, len, fua).await?;
                }
                Ok(Done::Empty)
            }
            NBD_CMD_CACHE => {
                if len > 0 {
                    self.source.cache(offset, len).await?;
                }
                Ok(Done::Empty)
            }
            NBD_CMD_WRITE_ZEROES => {
                if len == 0 {
                    return Ok(Done::Empty);
                }
                let flags = ZeroFlags {
                    no_hole: req.flags & NBD_CMD_FLAG_NO_HOLE != 0,
                    fast: req.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
                    fua,
                };
                match self.source.write_zeroes(offset, len, flags).await {
                    // "If the server advertised `NBD_FLAG_SEND_FAST_ZERO` but
                    // `NBD_CMD_FLAG_FAST_ZERO` is not set, then the server MUST
                    // NOT fail with `NBD_ENOTSUP`": fall back to plain writes.
                    Err(SourceError::Unsupported) if !flags.fast => {
                        self.write_zeroes_slowly(offset, len, fua).await?
                    }
                    other => other?,
                }
                Ok(Done::Empty)
            }
            NBD_CMD_BLOCK_STATUS => {
                if len == 0 {
                    return Err(SourceError::Invalid("zero-length block status"));
                }
                let extents = self.source.block_status(offset, len).await?;
                Ok(Done::Extents(encode_extents(
                    &extents,
                    len,
                    req.flags & NBD_CMD_FLAG_REQ_ONE != 0,
                )))
            }
            _ => Err(SourceError::Invalid("unknown command")),
        }
    }

    async fn write_zeroes_slowly(
        &self,
        mut offset: u64,
        len: u64,
        fua: bool,
    ) -> Result<(), SourceError> {
        const CHUNK: u64 = 1 << 20;
        let end = offset + len;
        let mut zeroes = self.pool.take(CHUNK.min(len) as usize);
        zeroes.buf.fill(0);
        while offset < end {
            let n = (end - offset).min(CHUNK) as usize;
            self.source.write(offset, &zeroes.buf[..n], fua).await?;
            offset += n as u64;
        }
        Ok(())
    }
}

/// Turns source extents into `NBD_REPLY_TYPE_BLOCK_STATUS` descriptors.
///
/// The result never covers more than `len` bytes, merges neighbours with the
/// same status ("SHOULD use different *status* values between consecutive
/// descriptors"), has no zero-length descriptor ("MUST be nonzero"), holds one
/// descriptor with REQ_ONE ("MUST contain exactly one descriptor"), at most
/// 2^20 otherwise, and at least one: a source that reports nothing gets the
/// always-safe status 0 for the whole range.
pub(crate) fn encode_extents(extents: &[crate::Extent], len: u64, req_one: bool) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::with_capacity(8 * extents.len().clamp(1, 64));
    let mut covered = 0u64;
    let mut last: Option<(usize, u32)> = None; // (byte index of length, flags)
    let mut count = 0usize;
    for e in extents {
        if e.len == 0 {
            continue;
        }
        if covered >= len {
            break;
        }
        let mut flags = 0;
        if e.hole {
            flags |= NBD_STATE_HOLE;
        }
        if e.zero {
            flags |= NBD_STATE_ZERO;
        }
        let n = e.len.min(len - covered);
        match last {
            Some((at, f)) if f == flags => {
                let prev = u32::from_be_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
                // prev + n <= len <= u32::MAX
                out[at..at + 4].copy_from_slice(&(prev + n as u32).to_be_bytes());
            }
            _ => {
                if (req_one && count == 1) || count == MAX_EXTENTS {
                    break;
                }
                last = Some((out.len(), flags));
                out.extend_from_slice(&(n as u32).to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                count += 1;
            }
        }
        covered += n;
    }
    if out.is_empty() {
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
    }
    out
}

// ------------------------------------------------------------------ writer

/// One write step of the writer: fails with [`ServeError::ReplyStalled`] when
/// the client has taken no bytes for `stall` (its socket buffer stays full).
async fn step<T>(stall: Duration, f: impl Future<Output = io::Result<T>>) -> Result<T, ServeError> {
    match tokio::time::timeout(stall, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ServeError::ReplyStalled),
    }
}

/// `write_all`, where every write must make progress within `stall`.
async fn write_all<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut a: &[u8],
    stall: Duration,
) -> Result<(), ServeError> {
    while !a.is_empty() {
        let n = step(stall, w.write(a)).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero).into());
        }
        a = &a[n..];
    }
    Ok(())
}

/// Writes `a` then `b` with vectored writes, avoiding a copy of `b`.
async fn write_two<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut a: &[u8],
    mut b: &[u8],
    stall: Duration,
) -> Result<(), ServeError> {
    while !a.is_empty() {
        let n = step(stall, w.write_vectored(&[IoSlice::new(a), IoSlice::new(b)])).await?;
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero).into());
        }
        if n >= a.len() {
            b = &b[n - a.len()..];
            a = &[];
        } else {
            a = &a[n..];
        }
    }
    write_all(w, b, stall).await
}

/// The single writer of a connection: drains the reply channel, batching.
///
/// Every batch is flushed before the writer waits for the next reply: over
/// TLS, written bytes may sit in the TLS layer until flushed. A client that
/// stops reading stalls only this writer, and only for `stall`; meanwhile the
/// bounded channel and the request permits stop its reader, so the
/// connection's memory stays within its limits.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
    stall: Duration,
) -> Result<(), ServeError> {
    let mut out: Vec<u8> = Vec::with_capacity(OUT_CAP);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next {
            out.extend_from_slice(&reply.head[..reply.head_len]);
            out.extend_from_slice(&reply.extra);
            if let Some(data) = &reply.data {
                if out.len() + data.buf.len() <= OUT_CAP {
                    out.extend_from_slice(&data.buf);
                } else {
                    write_two(&mut w, &out, &data.buf, stall).await?;
                    out.clear();
                }
            }
            if out.len() >= OUT_CAP / 2 {
                write_all(&mut w, &out, stall).await?;
                out.clear();
            }
            drop(reply); // frees permits and returns the buffer to the pool
            next = rx.try_recv().ok();
        }
        if !out.is_empty() {
            write_all(&mut w, &out, stall).await?;
            out.clear();
        }
        step(stall, w.flush()).await?;
    }
    // The peer may be gone already; nothing left to tell it.
    let _ = tokio::time::timeout(stall, w.shutdown()).await;
    Ok(())
}

// ------------------------------------------------------------------ reader

/// Resolves once `shutdown` reads true (never if its sender is gone).
pub(crate) async fn shutdown_signalled(shutdown: &mut watch::Receiver<bool>) {
    loop {
        if *shutdown.borrow_and_update() {
            return;
        }
        if shutdown.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Completes after `timeout`, or never.
async fn idle(timeout: Option<Duration>) {
    match timeout {
        Some(t) => tokio::time::sleep(t).await,
        None => std::future::pending().await,
    }
}

/// Reads a write payload; the client must keep sending: no bytes for `timeout`
/// closes the connection.
async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
    timeout: Option<Duration>,
) -> Result<(), ServeError> {
    let mut filled = 0;
    while filled < buf.len() {
        tokio::select! {
            res = r.read(&mut buf[filled..]) => match res {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
                Ok(n) => filled += n,
                Err(e) => return Err(e.into()),
            },
            _ = idle(timeout) => return Err(ServeError::IdleTimeout),
        }
    }
    Ok(())
}

/// Serves requests until `NBD_CMD_DISC`, EOF, a protocol error, the idle
/// timeout, a stalled reply or shutdown, then waits for the in-flight replies to go out and closes the write side.
pub(crate) async fn transmit<R, W>(
    mut r: R,
    w: W,
    neg: Negotiated,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(Ctx {
        size: neg.export.source().size(),
        source: Arc::clone(neg.export.source()),
        structured: neg.structured,
        base_allocation: neg.base_allocation,
        flags: neg.flags,
        pool: Arc::new(BufferPool::default()),
    });
    let count = Arc::new(Semaphore::new(limits.max_in_flight.max(1)));
    let budget_units = (limits.max_buffered_bytes.max(MAX_PAYLOAD as usize) / BUDGET_UNIT) as u32;
    let budget = Arc::new(Semaphore::new(budget_units as usize));
    let max_in_flight = limits.max_in_flight.max(1);
    let (tx, rx) = mpsc::channel::<Reply>(max_in_flight);
    let writer = tokio::spawn(write_replies(w, rx, limits.reply_timeout));

    let end: Result<(), ServeError> = loop {
        // The header is read with cancel-safe `read`s, so that the idle timer
        // can fire and be re-armed without losing a partly read header.
        let mut head = [0u8; REQUEST_HEADER_LEN];
        let mut filled = 0;
        let stop: Option<Result<(), ServeError>> = loop {
            if filled == head.len() {
                break None;
            }
            tokio::select! {
                biased;
                // The writer failed: its error (awaited below) says why.
                _ = tx.closed() => break Some(Ok(())),
                _ = shutdown_signalled(&mut shutdown) => {
                    debug!("shutdown: no new requests on this connection");
                    break Some(Ok(()));
                }
                res = r.read(&mut head[filled..]) => match res {
                    Ok(0) => {
                        debug!(partial = filled, "client closed the connection without NBD_CMD_DISC");
                        break Some(Ok(()));
                    }
                    Ok(n) => filled += n,
                    Err(e) => break Some(Err(e.into())),
                },
                _ = idle(limits.idle_timeout) => {
                    // With requests in flight the client is waiting for
                    // replies, not idle; in the middle of a header it is stuck.
                    if filled > 0 || count.available_permits() >= max_in_flight {
                        break Some(Err(ServeError::IdleTimeout));
                    }
                }
            }
        };
        if let Some(stop) = stop {
            break stop;
        }
        let Some(req) = Request::parse(&head) else {
            warn!("bad request magic; closing connection");
            break Err(ServeError::Protocol("bad request magic".into()));
        };
        trace!(
            cmd = command_name(req.kind),
            flags = req.flags,
            offset = req.offset,
            len = req.len,
            "request"
        );
        if req.kind == NBD_CMD_DISC {
            // "The server MUST handle all outstanding requests ... and close
            // the TCP session." There is no reply.
            debug!("NBD_CMD_DISC");
            break Ok(());
        }
        if req.kind == NBD_CMD_WRITE && req.len > MAX_PAYLOAD {
            // "the client MUST NOT request a length larger than the maximum
            // payload size"; we cannot skip 4 GiB safely, so hard disconnect.
            warn!(
                len = req.len,
                "write payload larger than the maximum; closing connection"
            );
            break Err(ServeError::Protocol(format!(
                "write of {} bytes exceeds the maximum payload",
                req.len
            )));
        }
        let payload = if matches!(req.kind, NBD_CMD_READ | NBD_CMD_WRITE) {
            (req.len.min(MAX_PAYLOAD) as usize).div_ceil(BUDGET_UNIT) as u32
        } else {
            0
        };
        let (Ok(c), Ok(b)) = (
            Arc::clone(&count).acquire_owned().await,
            Arc::clone(&budget).acquire_many_owned(payload).await,
        ) else {
            break Err(ServeError::Protocol("semaphore closed".into()));
        };
        let permits = Permits {
            _count: c,
            _bytes: b,
        };
        let data = if req.kind == NBD_CMD_WRITE {
            let mut buf = ctx.pool.take(req.len as usize);
            if let Err(e) = read_payload(&mut r, &mut buf.buf, limits.idle_timeout).await {
                break Err(e);
            }
            Some(buf)
        } else {
            None
        };
        let ctx = Arc::clone(&ctx);
        let tx = tx.clone();
        tokio::spawn(async move {
            let result = ctx.execute(&req, data).await;
            let reply = ctx.reply(&req, result, permits);
            // If the writer is gone the connection is closing; drop the reply.
            let _ = tx.send(reply).await;
        });
    };
    drop(tx);
    match writer.await {
        Ok(Ok(())) => end,
        Ok(Err(e)) => end.and(Err(e)),
        Err(join) => end.and(Err(ServeError::Protocol(format!(
            "writer task failed: {join}"
        )))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Export, Extent, MemorySource};
    use tokio::io::{duplex, split};

    /// A session on a 64 MiB memory export with short timeouts, over an
    /// in-memory pipe; returns the client's end and the running transmit.
    fn session(
        idle: Duration,
        reply: Duration,
    ) -> (
        tokio::io::DuplexStream,
        tokio::task::JoinHandle<Result<(), ServeError>>,
        watch::Sender<bool>,
    ) {
        let source = Arc::new(MemorySource::new(64 << 20));
        let flags = crate::handshake::transmission_flags(source.as_ref(), false);
        let neg = Negotiated {
            export: Arc::new(Export::new("disk", "", source)),
            name: "disk".into(),
            structured: false,
            base_allocation: false,
            flags,
        };
        let limits = Limits {
            max_in_flight: 8,
            max_buffered_bytes: 32 << 20,
            idle_timeout: Some(idle),
            reply_timeout: reply,
        };
        let (client, server) = duplex(64 * 1024);
        let (r, w) = split(server);
        let (stop, shutdown) = watch::channel(false);
        let task = tokio::spawn(transmit(r, w, neg, limits, shutdown));
        (client, task, stop)
    }

    fn read_request(handle: u64, len: u32) -> [u8; REQUEST_HEADER_LEN] {
        Request {
            flags: 0,
            kind: NBD_CMD_READ,
            handle,
            offset: 0,
            len,
        }
        .encode()
    }

    // The timeout tests run on tokio's paused clock: the timeouts are the real defaults (10
    // minutes idle, a minute of reply stall) and the tests take no time; the clock advances
    // only when every task waits.

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_nothing_is_dropped_after_the_idle_timeout() {
        let idle = Duration::from_secs(600);
        let (_client, task, _stop) = session(idle, Duration::from_secs(60));
        let started = tokio::time::Instant::now();
        let r = tokio::time::timeout(idle * 2, task).await;
        let r = r.expect("transmit must end").expect("no panic");
        assert!(matches!(r, Err(ServeError::IdleTimeout)), "{r:?}");
        let waited = started.elapsed();
        assert!(
            waited >= idle && waited < idle + Duration::from_secs(1),
            "dropped after {waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn half_a_request_header_times_out_too() {
        let idle = Duration::from_secs(600);
        let (mut client, task, _stop) = session(idle, Duration::from_secs(60));
        client.write_all(&read_request(1, 512)[..10]).await.unwrap();
        let r = tokio::time::timeout(idle * 2, task).await;
        let r = r.expect("transmit must end").expect("no panic");
        assert!(matches!(r, Err(ServeError::IdleTimeout)), "{r:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_waiting_for_replies_is_not_idle() {
        // Replies are in flight (the client does not read them yet): the idle
        // timer must not fire while the reply timeout is long.
        let idle = Duration::from_secs(600);
        let (mut client, task, stop) = session(idle, Duration::from_secs(3600));
        for h in 0..4 {
            client.write_all(&read_request(h, 1 << 20)).await.unwrap();
        }
        tokio::time::sleep(idle * 3).await;
        assert!(!task.is_finished(), "ended while replies were pending");
        // Now read everything: 4 simple replies of 16 + 1 MiB bytes.
        let mut buf = vec![0u8; 4 * (16 + (1 << 20))];
        client.read_exact(&mut buf).await.unwrap();
        let _ = stop.send(true);
        let r = tokio::time::timeout(Duration::from_secs(10), task).await;
        assert!(r.expect("ends on shutdown").expect("no panic").is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_is_dropped_after_the_reply_timeout() {
        let (mut client, task, _stop) = session(Duration::from_secs(600), Duration::from_secs(60));
        for h in 0..8 {
            client.write_all(&read_request(h, 8 << 20)).await.unwrap();
        }
        let r = tokio::time::timeout(Duration::from_secs(120), task).await;
        let r = r.expect("transmit must end").expect("no panic");
        assert!(matches!(r, Err(ServeError::ReplyStalled)), "{r:?}");
    }

    fn decode(b: &[u8]) -> Vec<(u32, u32)> {
        b.chunks(8)
            .map(|c| {
                (
                    u32::from_be_bytes([c[0], c[1], c[2], c[3]]),
                    u32::from_be_bytes([c[4], c[5], c[6], c[7]]),
                )
            })
            .collect()
    }

    #[test]
    fn extents_are_clamped_merged_and_never_empty() {
        let e = [
            Extent::data(100),
            Extent::data(50),
            Extent::hole(0),
            Extent::hole(1000),
        ];
        assert_eq!(
            decode(&encode_extents(&e, 400, false)),
            [(150, 0), (250, 3)]
        );
        assert_eq!(decode(&encode_extents(&e, 400, true)), [(150, 0)]);
        assert_eq!(decode(&encode_extents(&e, 120, true)), [(120, 0)]);
        assert_eq!(decode(&encode_extents(&[], 512, false)), [(512, 0)]);
        assert_eq!(
            decode(&encode_extents(&[Extent::hole(0)], 7, true)),
            [(7, 0)]
        );
    }

    #[test]
    fn pool_reuses_buffers() {
        let pool = Arc::new(BufferPool::default());
        let a = pool.take(4096);
        let p = a.buf.as_ptr();
        drop(a);
        let b = pool.take(1000);
        assert_eq!(b.buf.as_ptr(), p);
        assert_eq!(b.buf.len(), 1000);
    }
}

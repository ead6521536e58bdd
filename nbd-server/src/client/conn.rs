//! One connection in transmission: requests out, replies demultiplexed by cookie.
//!
//! Callers register a [`Pending`] request under a fresh cookie and queue its
//! header; one task per connection writes queued headers (batched) and reads
//! replies, handing each to the request whose cookie it carries: "Replies
//! need not be sent in the same order as requests ... and structured reply
//! chunks from one request may be interleaved with reply messages from other
//! requests". A semaphore bounds the requests in flight; a request keeps its
//! slot until its reply is complete, even when its caller has given up.
//!
//! The connection closes on a protocol violation, a socket error, the
//! server's EOF, a request timeout, or the client's disconnect; every request
//! still waiting then gets [`ClientError::Closed`] with the first reason.
//! When every handle is dropped, the task sends `NBD_CMD_DISC` by itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};
use tracing::{debug, trace, warn};

use super::error::{ClientError, ProtocolError};
use super::reply::{Job, Output, Pending};
use crate::proto::*;

/// Read buffer of a connection; reads larger than this bypass it.
const READ_BUFFER: usize = 256 * 1024;

/// What the writer sends.
#[derive(Debug)]
enum Outgoing {
    Request([u8; REQUEST_HEADER_LEN]),
    Disconnect,
}

/// State shared by the handles and the connection task.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    slots: Arc<Semaphore>,
    max_in_flight: u32,
    structured: bool,
    /// Ids of the granted metadata contexts.
    granted: Vec<u32>,
}

#[derive(Debug)]
struct State {
    pending: HashMap<u64, Pending>,
    next_cookie: u64,
    /// Set once: new requests are refused with this reason.
    closed: Option<Arc<ClientError>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; recover rather than cascade.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The error for a request on a closed connection.
    fn closed_error(&self) -> ClientError {
        let reason = self
            .lock()
            .closed
            .clone()
            .unwrap_or_else(|| Arc::new(ClientError::Disconnected));
        ClientError::Closed { reason }
    }

    /// Refuses new requests from now on (the first reason stays).
    fn refuse_new(&self, reason: ClientError) {
        self.lock().closed.get_or_insert_with(|| Arc::new(reason));
    }

    /// Refuses new requests and fails every request still waiting.
    fn close(&self, reason: ClientError) {
        let (reason, pending) = {
            let mut st = self.lock();
            let reason = st.closed.get_or_insert_with(|| Arc::new(reason)).clone();
            (reason, std::mem::take(&mut st.pending))
        };
        for (_, mut p) in pending {
            p.error = Some(ClientError::Closed {
                reason: reason.clone(),
            });
            p.complete();
        }
    }

    fn take(&self, cookie: u64) -> Result<Pending, ClientError> {
        self.lock()
            .pending
            .remove(&cookie)
            .ok_or_else(|| ProtocolError::UnknownCookie { cookie }.into())
    }

    fn put_back(&self, cookie: u64, p: Pending) {
        self.lock().pending.insert(cookie, p);
    }
}

/// The handle side of a connection.
#[derive(Debug)]
pub(crate) struct Conn {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Outgoing>,
    task: Mutex<Option<JoinHandle<()>>>,
    abort: AbortHandle,
    request_timeout: Duration,
}

impl Conn {
    /// Starts the connection task on a stream that finished its handshake.
    pub(crate) fn start<S>(
        stream: S,
        structured: bool,
        granted: Vec<u32>,
        max_in_flight: usize,
        request_timeout: Duration,
    ) -> Conn
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let max_in_flight = max_in_flight.clamp(1, 1 << 16);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                next_cookie: 1,
                closed: None,
            }),
            slots: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight: max_in_flight as u32,
            structured,
            granted,
        });
        // Room for every request in flight plus the disconnect.
        let (tx, rx) = mpsc::channel(max_in_flight + 1);
        let task = tokio::spawn(drive(
            stream,
            rx,
            Arc::clone(&shared),
            tx.downgrade(),
            request_timeout,
        ));
        Conn {
            shared,
            abort: task.abort_handle(),
            task: Mutex::new(Some(task)),
            tx,
            request_timeout,
        }
    }

    /// Registers a request and queues its header; returns where its result
    /// will arrive. Cancel-safe: nothing is registered until the header is
    /// queued in the same step.
    pub(crate) async fn submit(
        &self,
        kind: u16,
        offset: u64,
        len: u32,
        job: Job,
    ) -> Result<oneshot::Receiver<Result<Output, ClientError>>, ClientError> {
        if self.shared.lock().closed.is_some() {
            return Err(self.shared.closed_error());
        }
        let slot = Arc::clone(&self.shared.slots)
            .acquire_owned()
            .await
            .map_err(|_| self.shared.closed_error())?;
        let queue = self
            .tx
            .reserve()
            .await
            .map_err(|_| self.shared.closed_error())?;
        let (done, rx) = oneshot::channel();
        let mut st = self.shared.lock();
        if let Some(reason) = &st.closed {
            return Err(ClientError::Closed {
                reason: reason.clone(),
            });
        }
        // "Clients SHOULD use a cookie that is distinct from all other
        // currently pending transactions".
        let cookie = loop {
            let c = st.next_cookie;
            st.next_cookie = c.wrapping_add(1).max(1);
            if !st.pending.contains_key(&c) {
                break c;
            }
        };
        st.pending.insert(cookie, Pending::new(job, done, slot));
        let header = Request {
            flags: 0,
            kind,
            handle: cookie,
            offset,
            len,
        };
        queue.send(Outgoing::Request(header.encode()));
        drop(st);
        trace!(cmd = command_name(kind), cookie, offset, len, "request");
        Ok(rx)
    }

    /// Waits for a result; a request that gets no reply within the request
    /// timeout closes the connection.
    pub(crate) async fn wait(
        &self,
        rx: oneshot::Receiver<Result<Output, ClientError>>,
    ) -> Result<Output, ClientError> {
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.shared.closed_error()),
            Err(_) => {
                let after = self.request_timeout;
                warn!(?after, "NBD request timed out; closing the connection");
                self.shared.close(ClientError::Timeout { after });
                self.abort.abort();
                Err(ClientError::Timeout { after })
            }
        }
    }

    /// Soft disconnect: waits for the requests in flight, sends
    /// `NBD_CMD_DISC`, and waits for the server to close.
    pub(crate) async fn disconnect(&self) -> Result<(), ClientError> {
        // "The client MAY issue a soft disconnect at any time, but SHOULD wait
        // until there are no inflight requests first."
        let all = self.shared.slots.acquire_many(self.shared.max_in_flight);
        let _slots = tokio::time::timeout(self.request_timeout, all).await;
        let earlier = self.shared.lock().closed.clone();
        self.shared.refuse_new(ClientError::Disconnected);
        let _ = self.tx.send(Outgoing::Disconnect).await;
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            if tokio::time::timeout(self.request_timeout, task)
                .await
                .is_err()
            {
                self.abort.abort();
            }
        }
        match earlier {
            Some(reason) if !matches!(*reason, ClientError::Disconnected) => {
                Err(ClientError::Closed { reason })
            }
            _ => Ok(()),
        }
    }
}

/// The connection task: the writer and the reader on one socket.
async fn drive<S>(
    stream: S,
    rx: mpsc::Receiver<Outgoing>,
    shared: Arc<Shared>,
    queue: mpsc::WeakSender<Outgoing>,
    grace: Duration,
) where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (r, w) = tokio::io::split(stream);
    let mut r = BufReader::with_capacity(READ_BUFFER, r);
    let read = read_replies(&mut r, &shared, &queue);
    let write = write_requests(w, rx);
    tokio::pin!(read, write);
    let reason = tokio::select! {
        res = &mut read => res.err().unwrap_or(ClientError::ServerClosed { during: "transmission" }),
        res = &mut write => match res {
            // "The server MUST handle all outstanding requests ... and close
            // the TCP session": read their replies, then the EOF.
            Ok(()) => match tokio::time::timeout(grace, &mut read).await {
                Ok(Err(e)) => e,
                _ => ClientError::Disconnected,
            },
            Err(e) => e,
        },
    };
    match &reason {
        ClientError::Protocol(p) => {
            warn!(%p, "NBD server broke the protocol; closing the connection")
        }
        r => debug!(reason = %r, "NBD connection closed"),
    }
    shared.close(reason);
}

/// Writes queued request headers, several per system call when they queue
/// up; sends `NBD_CMD_DISC` and shuts the socket's write side when asked to
/// or when every handle is gone.
async fn write_requests<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> Result<(), ClientError> {
    let mut out = Vec::with_capacity(64 * REQUEST_HEADER_LEN);
    loop {
        let mut disconnect = false;
        match rx.recv().await {
            Some(Outgoing::Request(h)) => out.extend_from_slice(&h),
            Some(Outgoing::Disconnect) | None => disconnect = true,
        }
        while !disconnect {
            match rx.try_recv() {
                Ok(Outgoing::Request(h)) => out.extend_from_slice(&h),
                Ok(Outgoing::Disconnect) => disconnect = true,
                Err(_) => break,
            }
        }
        if disconnect {
            // "The values of the length and offset fields in a disconnect
            // request MUST be zero"; "There is no reply to an `NBD_CMD_DISC`."
            let disc = Request {
                flags: 0,
                kind: NBD_CMD_DISC,
                handle: 0,
                offset: 0,
                len: 0,
            };
            out.extend_from_slice(&disc.encode());
        }
        w.write_all(&out).await.map_err(ClientError::Io)?;
        w.flush().await.map_err(ClientError::Io)?;
        out.clear();
        if disconnect {
            debug!("NBD_CMD_DISC sent");
            // "A client MUST NOT send anything to the server after sending an
            // `NBD_CMD_DISC` command."
            let _ = w.shutdown().await;
            return Ok(());
        }
    }
}

/// Reads replies until EOF (`Ok`) or a failure, completing requests.
async fn read_replies<R: AsyncRead + Unpin>(
    r: &mut R,
    shared: &Shared,
    queue: &mpsc::WeakSender<Outgoing>,
) -> Result<(), ClientError> {
    let eof = |e| ClientError::io(e, "a reply");
    loop {
        let mut magic = [0u8; 4];
        // EOF is clean only between replies.
        if r.read(&mut magic[..1]).await.map_err(ClientError::Io)? == 0 {
            return Ok(());
        }
        r.read_exact(&mut magic[1..]).await.map_err(eof)?;
        let (cookie, p, res, done) = match u32::from_be_bytes(magic) {
            NBD_SIMPLE_REPLY_MAGIC => {
                // "S: 32 bits, error (MAY be zero); S: 64 bits, cookie".
                let errno = r.read_u32().await.map_err(eof)?;
                let cookie = r.read_u64().await.map_err(eof)?;
                let mut p = shared.take(cookie)?;
                let res = p.simple(r, errno, shared.structured).await;
                (cookie, p, res, true)
            }
            NBD_STRUCTURED_REPLY_MAGIC => {
                // "The server MUST NOT send this reply type unless the client
                // has successfully negotiated structured replies".
                if !shared.structured {
                    return Err(ProtocolError::Invalid(
                        "a structured reply although structured replies were not negotiated".into(),
                    )
                    .into());
                }
                // "S: 16 bits, flags; S: 16 bits, type; S: 64 bits, cookie;
                // S: 32 bits, length of payload (unsigned)".
                let flags = r.read_u16().await.map_err(eof)?;
                let kind = r.read_u16().await.map_err(eof)?;
                let cookie = r.read_u64().await.map_err(eof)?;
                let len = r.read_u32().await.map_err(eof)?;
                let mut p = shared.take(cookie)?;
                let res = p.chunk(r, flags, kind, len, &shared.granted).await;
                // "the server MUST ... set this bit if this is the final reply";
                // "Clients MUST ignore unrecognized flags."
                (cookie, p, res, flags & NBD_REPLY_FLAG_DONE != 0)
            }
            m => {
                return Err(ProtocolError::BadMagic {
                    what: "reply",
                    got: m.into(),
                }
                .into())
            }
        };
        let res = res.and_then(|()| {
            if done {
                p.check_complete(&shared.granted)
            } else {
                Ok(())
            }
        });
        if let Err(e) = res {
            // Back in the table, so that closing the connection answers it.
            shared.put_back(cookie, p);
            return Err(e);
        }
        if !done {
            shared.put_back(cookie, p);
            continue;
        }
        if p.server_shutting_down() {
            // "If the client receives an `NBD_ESHUTDOWN` error it MUST
            // initiate a soft disconnect."
            shared.refuse_new(ClientError::ServerShutdown {
                message: "the server answered a request with NBD_ESHUTDOWN".into(),
            });
            if let Some(q) = queue.upgrade() {
                let _ = q.try_send(Outgoing::Disconnect);
            }
        }
        trace!(cookie, "reply complete");
        p.complete();
    }
}

//! Decoding the replies to one request: simple replies and structured chunks.
//!
//! A [`Pending`] request owns what its reply fills in (the caller's read
//! buffer, or the extents of one context) and is filled chunk by chunk as the
//! connection's reader finds them. Every length is checked against the
//! request before a byte is read for it, so a hostile server cannot make us
//! allocate or write outside the request. Violations return an error, which
//! closes the connection: "For all other messages with unknown or unexpected
//! type or inconsistent contents, the client MUST initiate a hard disconnect."

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{oneshot, OwnedSemaphorePermit};

use super::coverage::Coverage;
use super::error::{message, ClientError, ProtocolError};
use super::info::StatusExtent;
use crate::proto::*;

/// Bound on an error chunk: error, message length, a 4096-byte message and
/// an offset fit many times over.
pub(crate) const MAX_ERROR_CHUNK: u32 = 64 * 1024;

/// What a finished request hands back.
#[derive(Debug)]
pub(crate) enum Output {
    /// The read buffer, filled.
    Data(Vec<u8>),
    /// Extents of the wanted context, clamped to the request.
    Extents(Vec<StatusExtent>),
}

/// The request-specific part of a [`Pending`].
#[derive(Debug)]
pub(crate) enum Job {
    Read(ReadJob),
    Status(StatusJob),
}

/// An `NBD_CMD_READ` in flight.
#[derive(Debug)]
pub(crate) struct ReadJob {
    offset: u64,
    buf: Vec<u8>,
    cover: Coverage,
}

/// An `NBD_CMD_BLOCK_STATUS` in flight.
#[derive(Debug)]
pub(crate) struct StatusJob {
    offset: u64,
    len: u32,
    /// The context whose extents the caller wants.
    want: u32,
    extents: Option<Vec<StatusExtent>>,
    /// Context ids that already had their chunk.
    seen: Vec<u32>,
}

impl Job {
    pub(crate) fn read(offset: u64, buf: Vec<u8>) -> Job {
        let cover = Coverage::new(buf.len() as u64);
        Job::Read(ReadJob { offset, buf, cover })
    }

    pub(crate) fn status(offset: u64, len: u32, want: u32) -> Job {
        Job::Status(StatusJob {
            offset,
            len,
            want,
            extents: None,
            seen: Vec::new(),
        })
    }

    /// (offset, length) of the request.
    fn range(&self) -> (u64, u64) {
        match self {
            Job::Read(j) => (j.offset, j.buf.len() as u64),
            Job::Status(j) => (j.offset, j.len.into()),
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Job::Read(_) => "NBD_CMD_READ",
            Job::Status(_) => "NBD_CMD_BLOCK_STATUS",
        }
    }
}

/// A request waiting for (the rest of) its reply.
#[derive(Debug)]
pub(crate) struct Pending {
    pub job: Job,
    /// The first error the server reported for this request.
    pub error: Option<ClientError>,
    done: oneshot::Sender<Result<Output, ClientError>>,
    /// The connection's in-flight slot, freed when the reply is complete.
    _slot: OwnedSemaphorePermit,
}

pub(crate) fn invalid(s: String) -> ClientError {
    ProtocolError::Invalid(s).into()
}

fn eof(e: std::io::Error) -> ClientError {
    ClientError::io(e, "a reply")
}

impl Pending {
    pub(crate) fn new(
        job: Job,
        done: oneshot::Sender<Result<Output, ClientError>>,
        slot: OwnedSemaphorePermit,
    ) -> Pending {
        Pending {
            job,
            error: None,
            done,
            _slot: slot,
        }
    }

    /// Whether the server said `NBD_ESHUTDOWN` for this request.
    pub(crate) fn server_shutting_down(&self) -> bool {
        matches!(
            self.error,
            Some(ClientError::Server {
                errno: NBD_ESHUTDOWN,
                ..
            })
        )
    }

    /// Checks a finished reply; an error here is a protocol violation.
    pub(crate) fn check_complete(&self, granted: &[u32]) -> Result<(), ClientError> {
        if self.error.is_some() {
            return Ok(());
        }
        match &self.job {
            // "When no error is detected, the server MUST send enough data
            // chunks to cover the entire region described by the offset and
            // length of the client's request."
            Job::Read(j) if j.cover.covered != j.buf.len() as u64 => Err(invalid(format!(
                "the reply to a read of {} bytes at {} ended after {} bytes",
                j.buf.len(),
                j.offset,
                j.cover.covered
            ))),
            // "A successful block status request MUST have exactly one status
            // chunk per negotiated metadata context ID."
            Job::Status(j) if j.extents.is_none() || j.seen.len() != granted.len() => {
                Err(invalid(format!(
                    "the block status reply has chunks for contexts {:?}, not for all of {granted:?}",
                    j.seen
                )))
            }
            _ => Ok(()),
        }
    }

    /// Hands the result to the waiting caller (who may be gone).
    pub(crate) fn complete(self) {
        let result = match (self.error, self.job) {
            (Some(e), _) => Err(e),
            (None, Job::Read(j)) => Ok(Output::Data(j.buf)),
            (None, Job::Status(j)) => Ok(Output::Extents(j.extents.unwrap_or_default())),
        };
        let _ = self.done.send(result);
    }

    fn record(&mut self, e: ClientError) {
        // "the client MAY NOT make any assumptions about partial success":
        // the first error decides.
        self.error.get_or_insert(e);
    }

    /// The payload of a simple reply (after its 16-byte header).
    pub(crate) async fn simple<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        errno: u32,
        structured: bool,
    ) -> Result<(), ClientError> {
        match &mut self.job {
            // "if structured replies are negotiated, the server ... MUST NOT
            // use a simple reply for `NBD_CMD_READ`".
            Job::Read(_) if structured => Err(invalid(
                "a simple reply to NBD_CMD_READ after structured replies were negotiated".into(),
            )),
            // "(*length* bytes of data if the request is of type `NBD_CMD_READ`
            // and *error* is zero)".
            Job::Read(j) if errno == 0 => {
                r.read_exact(&mut j.buf).await.map_err(eof)?;
                j.cover.covered = j.buf.len() as u64;
                Ok(())
            }
            // "For a successful return, the server MUST use a structured reply".
            Job::Status(_) if errno == 0 => Err(invalid(
                "a simple reply without error to NBD_CMD_BLOCK_STATUS".into(),
            )),
            _ => {
                self.record(ClientError::Server {
                    errno,
                    message: String::new(),
                    offset: None,
                });
                Ok(())
            }
        }
    }

    /// The payload of one structured reply chunk.
    pub(crate) async fn chunk<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        flags: u16,
        kind: u16,
        len: u32,
        granted: &[u32],
    ) -> Result<(), ClientError> {
        match (kind, &mut self.job) {
            // "*length* MUST be 0 ... This chunk type MUST always be used with
            // the `NBD_REPLY_FLAG_DONE` bit set".
            (NBD_REPLY_TYPE_NONE, _) if len == 0 && flags & NBD_REPLY_FLAG_DONE != 0 => Ok(()),
            (NBD_REPLY_TYPE_NONE, _) => Err(invalid(format!(
                "NBD_REPLY_TYPE_NONE with length {len} and flags {flags:#x}"
            ))),
            (NBD_REPLY_TYPE_OFFSET_DATA, Job::Read(j)) => j.data(r, len).await,
            (NBD_REPLY_TYPE_OFFSET_HOLE, Job::Read(j)) => j.hole(r, len).await,
            (NBD_REPLY_TYPE_BLOCK_STATUS, Job::Status(j)) => j.chunk(r, len, granted).await,
            (k, _) if k & (1 << 15) != 0 => self.error_chunk(r, kind, len).await,
            (k, job) => Err(invalid(format!(
                "chunk type {k} in a reply to {}",
                job.name()
            ))),
        }
    }

    /// `NBD_REPLY_TYPE_ERROR`, `NBD_REPLY_TYPE_ERROR_OFFSET`, or an unknown
    /// type with bit 15 set: "it MUST consider the current reply as errored,
    /// but MAY continue transmission unless it detects that *message length*
    /// is too large to fit within the *length* specified by the header."
    async fn error_chunk<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        kind: u16,
        len: u32,
    ) -> Result<(), ClientError> {
        // ERROR: "*length* MUST be at least 6"; ERROR_OFFSET: "at least 14".
        let fixed = if kind == NBD_REPLY_TYPE_ERROR_OFFSET {
            14
        } else {
            6
        };
        if len < fixed {
            return Err(invalid(format!("error chunk type {kind} of {len} bytes")));
        }
        if len > MAX_ERROR_CHUNK {
            return Err(ProtocolError::TooLong {
                what: "error chunk",
                len: len.into(),
                max: MAX_ERROR_CHUNK.into(),
            }
            .into());
        }
        let errno = r.read_u32().await.map_err(eof)?;
        let mlen = u32::from(r.read_u16().await.map_err(eof)?);
        if mlen > len - fixed {
            return Err(invalid(format!(
                "error message of {mlen} bytes in an error chunk of {len}"
            )));
        }
        let mut msg = vec![0u8; mlen as usize];
        r.read_exact(&mut msg).await.map_err(eof)?;
        let mut message = message(&msg);
        let mut offset = None;
        if kind == NBD_REPLY_TYPE_ERROR_OFFSET {
            let at = r.read_u64().await.map_err(eof)?;
            // The offset "MUST lie within the original offset and length of the request".
            let (start, n) = self.job.range();
            if at < start || at - start >= n {
                return Err(invalid(format!(
                    "error offset {at} outside the request {start}+{n}"
                )));
            }
            offset = Some(at);
        } else if kind != NBD_REPLY_TYPE_ERROR {
            message = format!("unknown error chunk type {kind}: {message}");
        }
        skip(r, u64::from(len - fixed - mlen)).await?;
        // "32 bits: error (MUST be nonzero)".
        if errno == 0 {
            return Err(invalid("an error chunk with error value 0".into()));
        }
        self.record(ClientError::Server {
            errno,
            message,
            offset,
        });
        Ok(())
    }
}

impl ReadJob {
    /// Checks that `n` bytes at `at` lie in the request and overlap nothing
    /// earlier; returns their index in the buffer.
    fn place(&mut self, at: u64, n: u64) -> Result<usize, ClientError> {
        let len = self.buf.len() as u64;
        // "The data MUST lie within the bounds of the original offset and
        // length of the client's request".
        let rel = at
            .checked_sub(self.offset)
            .filter(|rel| rel.checked_add(n).is_some_and(|end| end <= len))
            .ok_or_else(|| {
                invalid(format!(
                    "a chunk at {at}+{n} outside the read {}+{len}",
                    self.offset
                ))
            })?;
        // "and MUST NOT overlap with the bounds of any earlier content chunk".
        self.cover.add(rel, rel + n)?;
        Ok(rel as usize)
    }

    /// `NBD_REPLY_TYPE_OFFSET_DATA`: "64 bits: offset (unsigned); *length - 8* bytes: data".
    async fn data<R: AsyncRead + Unpin>(&mut self, r: &mut R, len: u32) -> Result<(), ClientError> {
        // "*length* MUST be at least 9".
        if len < 9 {
            return Err(invalid(format!(
                "NBD_REPLY_TYPE_OFFSET_DATA of {len} bytes"
            )));
        }
        let n = u64::from(len - 8);
        if n > self.buf.len() as u64 {
            return Err(ProtocolError::TooLong {
                what: "data chunk",
                len: n,
                max: self.buf.len() as u64,
            }
            .into());
        }
        let at = r.read_u64().await.map_err(eof)?;
        let i = self.place(at, n)?;
        r.read_exact(&mut self.buf[i..i + n as usize])
            .await
            .map_err(eof)?;
        Ok(())
    }

    /// `NBD_REPLY_TYPE_OFFSET_HOLE`: "64 bits: offset (unsigned); 32 bits:
    /// hole size (unsigned, MUST be nonzero)"; the range reads as zeroes.
    async fn hole<R: AsyncRead + Unpin>(&mut self, r: &mut R, len: u32) -> Result<(), ClientError> {
        // "*length* MUST be exactly 12".
        if len != 12 {
            return Err(invalid(format!(
                "NBD_REPLY_TYPE_OFFSET_HOLE of {len} bytes"
            )));
        }
        let at = r.read_u64().await.map_err(eof)?;
        let n = r.read_u32().await.map_err(eof)?;
        if n == 0 {
            return Err(invalid("a hole of size 0".into()));
        }
        let i = self.place(at, n.into())?;
        self.buf[i..i + n as usize].fill(0);
        Ok(())
    }
}

impl StatusJob {
    /// `NBD_REPLY_TYPE_BLOCK_STATUS`: context id, then (length, flags) descriptors.
    async fn chunk<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        len: u32,
        granted: &[u32],
    ) -> Result<(), ClientError> {
        // "*length* MUST be 4 + (a positive integer multiple of 8)".
        if len < 12 || !(len - 4).is_multiple_of(8) {
            return Err(invalid(format!(
                "NBD_REPLY_TYPE_BLOCK_STATUS of {len} bytes"
            )));
        }
        let count = ((len - 4) / 8) as usize;
        // "Servers SHOULD NOT send more than 2^20 extents in a single reply chunk".
        if count > MAX_EXTENTS {
            return Err(ProtocolError::TooLong {
                what: "block status chunk",
                len: len.into(),
                max: 4 + 8 * MAX_EXTENTS as u64,
            }
            .into());
        }
        let id = r.read_u32().await.map_err(eof)?;
        if !granted.contains(&id) {
            return Err(invalid(format!(
                "block status for context id {id}, which was not granted"
            )));
        }
        if self.seen.contains(&id) {
            return Err(invalid(format!(
                "two block status chunks for context id {id}"
            )));
        }
        self.seen.push(id);
        if id != self.want {
            return skip(r, 8 * count as u64).await;
        }
        let end = self.offset + u64::from(self.len);
        let mut pos = self.offset;
        let mut extents = Vec::with_capacity(count.min(1024));
        let mut buf = [0u8; 8 * 512];
        let mut left = count;
        while left > 0 {
            let n = left.min(512);
            r.read_exact(&mut buf[..8 * n]).await.map_err(eof)?;
            for d in buf[..8 * n].chunks_exact(8) {
                let dlen = u64::from(u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
                let flags = u32::from_be_bytes([d[4], d[5], d[6], d[7]]);
                // "32 bits, length of the extent ... (unsigned, MUST be nonzero)".
                if dlen == 0 {
                    return Err(invalid("a block status descriptor of length 0".into()));
                }
                // "the sum of the *length* fields of the first N-1 extents (if
                // any) MUST be less than the requested length, while the
                // *length* of the final extent MAY result in a sum larger".
                if pos >= end {
                    return Err(invalid(format!(
                        "block status descriptors past the end of the request {}+{}",
                        self.offset, self.len
                    )));
                }
                extents.push(StatusExtent {
                    offset: pos,
                    len: dlen.min(end - pos),
                    flags,
                });
                pos += dlen;
            }
            left -= n;
        }
        self.extents = Some(extents);
        Ok(())
    }
}

/// Reads and drops `n` bytes.
async fn skip<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> Result<(), ClientError> {
    let mut scratch = [0u8; 4096];
    while n > 0 {
        let k = n.min(scratch.len() as u64) as usize;
        r.read_exact(&mut scratch[..k]).await.map_err(eof)?;
        n -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(job: Job) -> (Pending, oneshot::Receiver<Result<Output, ClientError>>) {
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(1));
        let slot = sem.try_acquire_owned().unwrap();
        let (tx, rx) = oneshot::channel();
        (Pending::new(job, tx, slot), rx)
    }

    #[tokio::test]
    async fn data_and_holes_fill_the_buffer() {
        let (mut p, mut rx) = pending(Job::read(1000, vec![7u8; 8]));
        let mut wire = Vec::new();
        wire.extend_from_slice(&1000u64.to_be_bytes());
        wire.extend_from_slice(b"abcd");
        p.chunk(&mut wire.as_slice(), 0, NBD_REPLY_TYPE_OFFSET_DATA, 12, &[])
            .await
            .unwrap();
        let mut hole = 1004u64.to_be_bytes().to_vec();
        hole.extend_from_slice(&4u32.to_be_bytes());
        p.chunk(&mut hole.as_slice(), 1, NBD_REPLY_TYPE_OFFSET_HOLE, 12, &[])
            .await
            .unwrap();
        p.check_complete(&[]).unwrap();
        p.complete();
        match rx.try_recv().unwrap().unwrap() {
            Output::Data(d) => assert_eq!(d, b"abcd\0\0\0\0"),
            o => panic!("{o:?}"),
        }
    }

    #[tokio::test]
    async fn chunks_outside_the_request_are_violations() {
        let (mut p, _rx) = pending(Job::read(1000, vec![0u8; 8]));
        let mut wire = 996u64.to_be_bytes().to_vec();
        wire.extend_from_slice(b"abcd");
        let e = p
            .chunk(&mut wire.as_slice(), 0, NBD_REPLY_TYPE_OFFSET_DATA, 12, &[])
            .await
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Protocol(ProtocolError::Invalid(_))),
            "{e}"
        );
        // A data chunk longer than the whole read is refused before reading it.
        let e = p
            .chunk(
                &mut [].as_slice(),
                0,
                NBD_REPLY_TYPE_OFFSET_DATA,
                8 + 9,
                &[],
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, ClientError::Protocol(ProtocolError::TooLong { .. })),
            "{e}"
        );
    }

    #[tokio::test]
    async fn block_status_is_clamped_and_checked() {
        let (mut p, _rx) = pending(Job::status(4096, 8192, 2));
        let mut wire = 2u32.to_be_bytes().to_vec();
        for (len, flags) in [(4096u32, 3u32), (1 << 20, 0)] {
            wire.extend_from_slice(&len.to_be_bytes());
            wire.extend_from_slice(&flags.to_be_bytes());
        }
        p.chunk(
            &mut wire.as_slice(),
            1,
            NBD_REPLY_TYPE_BLOCK_STATUS,
            20,
            &[2],
        )
        .await
        .unwrap();
        let Job::Status(j) = &p.job else { panic!() };
        let got = j.extents.clone().unwrap();
        assert_eq!(
            got,
            [
                StatusExtent {
                    offset: 4096,
                    len: 4096,
                    flags: 3
                },
                StatusExtent {
                    offset: 8192,
                    len: 4096,
                    flags: 0
                },
            ]
        );
        // A third descriptor after the request is covered is a violation.
        let (mut p, _rx) = pending(Job::status(0, 100, 2));
        let mut wire = 2u32.to_be_bytes().to_vec();
        for _ in 0..2 {
            wire.extend_from_slice(&100u32.to_be_bytes());
            wire.extend_from_slice(&0u32.to_be_bytes());
        }
        assert!(p
            .chunk(
                &mut wire.as_slice(),
                1,
                NBD_REPLY_TYPE_BLOCK_STATUS,
                20,
                &[2]
            )
            .await
            .is_err());
    }
}

//! Error types and the one mapping from errors to NBD error values.
//!
//! Rules: a [`BlockSource`](crate::BlockSource) reports [`SourceError`]; the
//! transmission phase also uses `SourceError` for requests it rejects itself
//! (out of range, read-only, too large), so that [`SourceError::nbd_errno`] is
//! the single place where an error becomes a number on the wire. Connection
//! and server failures are [`ServeError`]; they end one connection (or the
//! accept loop), never the process.

use std::io;

use crate::proto;

/// Why a block operation failed. Each variant maps to one NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The backing storage failed (`NBD_EIO`, or `NBD_ENOSPC` when the OS said
    /// ENOSPC/EDQUOT/EFBIG: "SHOULD map the `EDQUOT` and `EFBIG` errors to `NBD_ENOSPC`").
    #[error("I/O error: {0}")]
    Io(#[source] io::Error),
    /// No space left, or a write beyond the end of the export (`NBD_ENOSPC`).
    #[error("no space left on device")]
    NoSpace,
    /// The request is malformed or outside the export (`NBD_EINVAL`).
    #[error("invalid request: {0}")]
    Invalid(&'static str),
    /// A write to a read-only export (`NBD_EPERM`).
    #[error("export is read-only")]
    ReadOnly,
    /// The source does not implement the operation (`NBD_ENOTSUP`). The server
    /// only calls optional operations it advertised, so clients normally see
    /// this only for `NBD_CMD_FLAG_FAST_ZERO`, where the spec asks for it.
    #[error("operation not supported")]
    Unsupported,
    /// The request is larger than this server handles in one piece (`NBD_EOVERFLOW`).
    #[error("request too large: {0}")]
    TooLarge(&'static str),
    /// The server is shutting down (`NBD_ESHUTDOWN`).
    #[error("server is shutting down")]
    Shutdown,
}

impl From<io::Error> for SourceError {
    fn from(e: io::Error) -> Self {
        SourceError::Io(e)
    }
}

/// Linux errno values that the spec asks us to report as `NBD_ENOSPC`.
const ENOSPC: i32 = 28;
const EFBIG: i32 = 27;
const EDQUOT: i32 = 122;
const EROFS: i32 = 30;
const EPERM: i32 = 1;
const EACCES: i32 = 13;

impl SourceError {
    /// The NBD error value sent to the client for this error (never zero).
    pub fn nbd_errno(&self) -> u32 {
        match self {
            SourceError::Io(e) => match e.raw_os_error() {
                Some(ENOSPC | EFBIG | EDQUOT) => proto::NBD_ENOSPC,
                Some(EROFS | EPERM | EACCES) => proto::NBD_EPERM,
                _ => proto::NBD_EIO,
            },
            SourceError::NoSpace => proto::NBD_ENOSPC,
            SourceError::Invalid(_) => proto::NBD_EINVAL,
            SourceError::ReadOnly => proto::NBD_EPERM,
            SourceError::Unsupported => proto::NBD_ENOTSUP,
            SourceError::TooLarge(_) => proto::NBD_EOVERFLOW,
            SourceError::Shutdown => proto::NBD_ESHUTDOWN,
        }
    }
}

/// Why a connection or the server stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket failed.
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
    /// The peer broke the protocol; the connection is closed.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The peer did not finish the handshake in time.
    #[error("handshake timed out")]
    HandshakeTimeout,
    /// The TLS handshake after `NBD_OPT_STARTTLS` failed (not TLS, a
    /// certificate the client refused, a broken record).
    #[error("TLS handshake failed: {0}")]
    Tls(#[source] io::Error),
    /// The client sent nothing (and waited for nothing) for the idle timeout,
    /// or stopped in the middle of a request.
    #[error("client idle for longer than the idle timeout")]
    IdleTimeout,
    /// A reply made no progress towards the client for the reply timeout: the
    /// client stopped reading.
    #[error("client stopped reading its replies")]
    ReplyStalled,
}

/// Why an [`Exports`](crate::Exports) table refused a change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportsError {
    /// The name is already taken by another export or alias.
    #[error("export name {0:?} is already in use")]
    Duplicate(String),
    /// An alias points to a name that does not exist.
    #[error("no export named {0:?}")]
    Unknown(String),
    /// The name breaks the spec's string rules ("MUST NOT contain `NUL`
    /// characters ... MUST be no longer than 4096 bytes").
    #[error("invalid export name or description {0:?}")]
    InvalidName(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_variant_maps_to_a_spec_value() {
        let cases = [
            (SourceError::Io(io::Error::other("x")), proto::NBD_EIO),
            (
                SourceError::Io(io::Error::from_raw_os_error(ENOSPC)),
                proto::NBD_ENOSPC,
            ),
            (
                SourceError::Io(io::Error::from_raw_os_error(EDQUOT)),
                proto::NBD_ENOSPC,
            ),
            (
                SourceError::Io(io::Error::from_raw_os_error(EROFS)),
                proto::NBD_EPERM,
            ),
            (SourceError::NoSpace, proto::NBD_ENOSPC),
            (SourceError::Invalid("x"), proto::NBD_EINVAL),
            (SourceError::ReadOnly, proto::NBD_EPERM),
            (SourceError::Unsupported, proto::NBD_ENOTSUP),
            (SourceError::TooLarge("x"), proto::NBD_EOVERFLOW),
            (SourceError::Shutdown, proto::NBD_ESHUTDOWN),
        ];
        for (e, n) in cases {
            assert_eq!(e.nbd_errno(), n, "{e}");
        }
    }
}

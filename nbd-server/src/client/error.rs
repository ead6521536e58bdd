//! Errors of the NBD client.
//!
//! [`ClientError`] is what every client call returns. Its variants say who
//! is at fault and what to do: a bad URI ([`UriError`]), a server we cannot
//! reach, a server that refused an option (unknown export, TLS required), a
//! request the caller got wrong (out of range, unaligned), an error the
//! server reported for one request ([`ClientError::Server`]; the connection
//! stays usable), or a server that broke the protocol ([`ProtocolError`]; the
//! connection is closed, as the spec allows: "Either side MAY initiate a hard
//! disconnect if it detects a violation by the other party of a mandatory
//! condition"). Once a connection is closed, every call on it returns
//! [`ClientError::Closed`] carrying the first reason.

use std::io;
use std::sync::Arc;
use std::time::Duration;

pub use super::uri::UriError;
use crate::proto::errno_name;

/// The server broke the NBD protocol; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A magic number that is not the one the spec puts there.
    #[error("bad {what} magic {got:#x}")]
    BadMagic {
        /// Which message ("option reply", "reply", ...).
        what: &'static str,
        /// The value received.
        got: u64,
    },
    /// A length larger than this client accepts for that message; nothing
    /// was allocated or read for it.
    #[error("{what} of {len} bytes exceeds this client's bound of {max}")]
    TooLong {
        /// Which message.
        what: &'static str,
        /// The length the server announced.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// "the server MUST use the same value for cookie as was sent by the
    /// client in the corresponding request": no request in flight has it.
    #[error("a reply carries cookie {cookie:#x}, which no request in flight has")]
    UnknownCookie {
        /// The cookie received.
        cookie: u64,
    },
    /// Any other inconsistent content (the text says what).
    #[error("{0}")]
    Invalid(String),
}

/// Why an NBD client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The URI cannot be used.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// Connecting failed (refused, no route, no such socket file, ...).
    #[error("cannot connect to the NBD server at {target}: {source}")]
    Connect {
        /// Where we tried to connect.
        target: String,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// Connecting took longer than the connect timeout.
    #[error("connecting to the NBD server at {target} took longer than {after:?}")]
    ConnectTimeout {
        /// Where we tried to connect.
        target: String,
        /// The timeout.
        after: Duration,
    },
    /// The handshake took longer than the handshake timeout.
    #[error(
        "the NBD handshake took longer than {after:?}: the server is stuck or is not an NBD server"
    )]
    HandshakeTimeout {
        /// The timeout.
        after: Duration,
    },
    /// The peer does not start with `NBDMAGIC`.
    #[error(
        "the peer is not an NBD server: it sent {got:#018x} where NBD servers send 'NBDMAGIC'; \
         check the host and port"
    )]
    NotNbd {
        /// The first 8 bytes, big-endian.
        got: u64,
    },
    /// The server speaks the oldstyle handshake.
    #[error(
        "the server uses the oldstyle NBD handshake, which this client does not support: serve \
         the export with the newstyle protocol (e.g. qemu-nbd without --oldstyle)"
    )]
    Oldstyle,
    /// The server does not set `NBD_FLAG_FIXED_NEWSTYLE`.
    #[error(
        "the server does not speak fixed newstyle NBD (handshake flags {flags:#06x}), which this \
         client requires: use a newer NBD server"
    )]
    NotFixedNewstyle {
        /// The handshake flags received.
        flags: u16,
    },
    /// `NBD_REP_ERR_UNKNOWN`, or a server that hung up after `NBD_OPT_EXPORT_NAME`.
    #[error(
        "the server has no export named {export:?}{}: list its exports with `nbdinfo --list URI`",
        detail(message)
    )]
    ExportNotFound {
        /// The export asked for.
        export: String,
        /// The server's message (may be empty).
        message: String,
    },
    /// `NBD_REP_ERR_TLS_REQD`.
    #[error(
        "the server requires TLS, which this client does not support yet{}",
        detail(message)
    )]
    TlsRequired {
        /// The server's message (may be empty).
        message: String,
    },
    /// `NBD_REP_ERR_SHUTDOWN`, or `NBD_ESHUTDOWN` for a request.
    #[error("the NBD server is shutting down{}", detail(message))]
    ServerShutdown {
        /// The server's message (may be empty).
        message: String,
    },
    /// Another error reply to an option.
    #[error("the server refused {option} with {reply}{}", detail(message))]
    OptionRefused {
        /// The option sent.
        option: &'static str,
        /// The error reply's name.
        reply: &'static str,
        /// The server's message (may be empty).
        message: String,
    },
    /// The server broke the protocol; the connection is closed.
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(#[from] ProtocolError),
    /// The server reported an error for one request; the connection stays open.
    #[error("the NBD server failed the request with {} ({errno}){}{}", errno_name(*errno),
        offset.map(|o| format!(" at offset {o}")).unwrap_or_default(), detail(message))]
    Server {
        /// The NBD error value.
        errno: u32,
        /// The server's message (may be empty).
        message: String,
        /// The offset an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk named.
        offset: Option<u64>,
    },
    /// The range is not inside the export.
    #[error("the range {offset}+{len} is outside the export of {size} bytes")]
    OutOfRange {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Export size.
        size: u64,
    },
    /// "the client MUST ensure that *offset* and *length* are integer
    /// multiples of any advertised minimum block size".
    #[error("the range {offset}+{len} is not aligned to the server's minimum block size of {min_block} bytes")]
    Unaligned {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// The server's minimum block size.
        min_block: u32,
    },
    /// One request larger than the negotiated maximum (use [`read`](super::Client::read), which splits).
    #[error("a single request of {len} bytes exceeds the maximum of {max} bytes (Client::read splits large reads)")]
    RequestTooLarge {
        /// Requested length.
        len: u64,
        /// The maximum.
        max: u32,
    },
    /// A name we were asked to send that the protocol cannot carry.
    #[error(
        "invalid {what} {name:?}: names are UTF-8 without NUL, at most 4096 bytes, and metadata \
         context names are NAMESPACE:LEAF (e.g. base:allocation, qemu:dirty-bitmap:NAME)"
    )]
    InvalidName {
        /// What the name is for.
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// Block status for a metadata context the server did not grant.
    #[error("the metadata context {name:?} was not granted by the server on this connection")]
    ContextNotGranted {
        /// The context name asked for.
        name: String,
    },
    /// A request got no complete reply within the request timeout; the
    /// connection is closed.
    #[error("the NBD server did not answer a request within {after:?}")]
    Timeout {
        /// The timeout.
        after: Duration,
    },
    /// The server closed the connection.
    #[error("the NBD server closed the connection during {during}")]
    ServerClosed {
        /// What we were waiting for.
        during: &'static str,
    },
    /// This client disconnected (`NBD_CMD_DISC`, or every handle dropped).
    #[error("the client disconnected from the NBD server")]
    Disconnected,
    /// The connection is closed; `reason` is what closed it.
    #[error("the NBD connection is closed: {reason}")]
    Closed {
        /// The first error that closed the connection.
        #[source]
        reason: Arc<ClientError>,
    },
    /// The socket failed.
    #[error("NBD socket I/O failed: {0}")]
    Io(#[source] io::Error),
}

impl ClientError {
    /// The error that closed the connection, when this is [`ClientError::Closed`];
    /// otherwise `self`.
    pub fn root(&self) -> &ClientError {
        match self {
            ClientError::Closed { reason } => reason.root(),
            e => e,
        }
    }

    /// Maps a socket error: EOF becomes [`ClientError::ServerClosed`].
    pub(crate) fn io(e: io::Error, during: &'static str) -> ClientError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ClientError::ServerClosed { during }
        } else {
            ClientError::Io(e)
        }
    }
}

/// ": MESSAGE", or nothing for an empty message.
fn detail(message: &str) -> String {
    if message.is_empty() {
        String::new()
    } else {
        format!(": {message}")
    }
}

/// A server's message for humans: lossy UTF-8, at most 4096 bytes kept
/// (strings "MUST be no longer than 4096 bytes").
pub(crate) fn message(bytes: &[u8]) -> String {
    let b = &bytes[..bytes.len().min(crate::proto::MAX_STRING)];
    String::from_utf8_lossy(b)
        .chars()
        .filter(|c| !c.is_control())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_fault_and_the_fix() {
        let e = ClientError::ExportNotFound {
            export: "snap".into(),
            message: "no such export".into(),
        };
        let s = e.to_string();
        assert!(
            s.contains("\"snap\"") && s.contains("no such export") && s.contains("nbdinfo --list")
        );
        let e = ClientError::Server {
            errno: 5,
            message: String::new(),
            offset: Some(4096),
        };
        assert_eq!(
            e.to_string(),
            "the NBD server failed the request with NBD_EIO (5) at offset 4096"
        );
        let closed = ClientError::Closed {
            reason: Arc::new(ClientError::Protocol(ProtocolError::UnknownCookie {
                cookie: 7,
            })),
        };
        assert!(matches!(
            closed.root(),
            ClientError::Protocol(ProtocolError::UnknownCookie { cookie: 7 })
        ));
    }

    #[test]
    fn server_messages_are_bounded_and_printable() {
        let long = vec![b'a'; 10_000];
        assert_eq!(message(&long).len(), 4096);
        assert_eq!(message(b"bad\x1b[31m\xff"), "bad[31m\u{fffd}");
    }
}

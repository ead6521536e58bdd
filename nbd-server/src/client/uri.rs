//! NBD URIs, as doc/uri.md of the NBD project defines them:
//! `nbd://HOST[:PORT][/EXPORT]` and `nbd+unix:///EXPORT?socket=PATH`.
//!
//! "All NBD URIs MUST also be valid URIs as described in RFC 3986", so the
//! export name and the socket path are percent-decoded. TLS schemes and TLS
//! parameters are recognised and refused with an error that says so, and
//! every other parameter is refused too: "Any other query parameters which
//! the client does not understand SHOULD be diagnosed by the parser."

use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::str::FromStr;

use crate::proto::{MAX_STRING, NBD_DEFAULT_PORT};

/// What the URI forms look like, for error messages.
const FORMS: &str = "nbd://HOST[:PORT][/EXPORT] or nbd+unix:///EXPORT?socket=PATH";

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// TCP: a host name or IP address (IPv6 without brackets) and a port.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port (10809 when the URI names none).
        port: u16,
    },
    /// A Unix domain socket.
    Unix {
        /// Path of the socket.
        path: PathBuf,
    },
}

/// A parsed NBD URI: where to connect and which export to ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdUri {
    /// Where the server listens.
    pub endpoint: Endpoint,
    /// The export name ("" is the server's default export).
    pub export: String,
}

/// Why a string is not an NBD URI this client can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UriError {
    /// No `scheme://` at the start.
    #[error("{uri:?} is not an NBD URI: expected {FORMS}")]
    NotAUri {
        /// The text given.
        uri: String,
    },
    /// A scheme other than `nbd`, `nbd+unix` (and the TLS ones).
    #[error("URI scheme {scheme:?} is not supported: use {FORMS}")]
    UnsupportedScheme {
        /// The scheme given.
        scheme: String,
    },
    /// `nbds://` or `nbds+unix://`: NBD over TLS.
    #[error(
        "{scheme}:// asks for NBD over TLS, which this client does not support yet: use nbd:// \
         or nbd+unix:// (plain, unencrypted) on a network you trust"
    )]
    TlsNotSupported {
        /// The scheme given.
        scheme: String,
    },
    /// `nbd://` without a host.
    #[error("the NBD URI {uri:?} names no host: write nbd://HOST[:PORT][/EXPORT]")]
    MissingHost {
        /// The text given.
        uri: String,
    },
    /// A host that is not a name or address (a bad IPv6 literal, spaces, ...).
    #[error("bad host {host:?} in NBD URI: use a host name, an IPv4 address or [IPv6]")]
    BadHost {
        /// The host part given.
        host: String,
    },
    /// A port that is not 1..=65535.
    #[error("bad port {port:?} in NBD URI: expected a number from 1 to 65535")]
    BadPort {
        /// The port part given.
        port: String,
    },
    /// `user@host`: only meaningful for TLS authentication.
    #[error(
        "the user name {user:?} in an NBD URI is only used for TLS authentication, which this \
         client does not support: remove `{user}@`"
    )]
    UserInfo {
        /// The user part given.
        user: String,
    },
    /// `nbd+unix://host/...`.
    #[error("nbd+unix URIs take no host (got {host:?}): write nbd+unix:///EXPORT?socket=PATH")]
    UnixWithHost {
        /// The host part given.
        host: String,
    },
    /// `nbd+unix` without `?socket=`.
    #[error("the nbd+unix URI names no socket: write nbd+unix:///EXPORT?socket=PATH")]
    MissingSocket,
    /// `socket=` starting with NUL (Linux abstract namespace).
    #[error("abstract Unix sockets (socket=%00...) are not supported: give a socket path")]
    AbstractSocket,
    /// `?socket=` on a TCP URI, or a parameter nobody defined.
    #[error(
        "query parameter {key:?} is not understood here (nbd:// takes none; nbd+unix:// takes \
         socket=PATH)"
    )]
    UnknownParameter {
        /// The parameter name given.
        key: String,
    },
    /// The same parameter twice.
    #[error("query parameter {key:?} is given twice")]
    DuplicateParameter {
        /// The parameter name given.
        key: String,
    },
    /// `tls-type`, `tls-hostname`, `tls-verify-peer`.
    #[error("query parameter {key:?} configures TLS, which this client does not support yet")]
    TlsParameter {
        /// The parameter name given.
        key: String,
    },
    /// `#fragment`: meaningless for NBD.
    #[error("NBD URIs take no #fragment (got {fragment:?}): percent-encode `#` as %23")]
    Fragment {
        /// The fragment given.
        fragment: String,
    },
    /// `%` not followed by two hex digits, or bytes that are not UTF-8.
    #[error("bad percent-encoding in {text:?}: `%` must be followed by two hex digits and the result must be UTF-8")]
    BadEncoding {
        /// The component that failed to decode.
        text: String,
    },
    /// An export name the protocol cannot carry.
    #[error("bad export name {name:?}: {reason}")]
    BadExportName {
        /// The decoded name.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

impl NbdUri {
    /// Parses `nbd://HOST[:PORT][/EXPORT]` or `nbd+unix:///EXPORT?socket=PATH`.
    pub fn parse(uri: &str) -> Result<NbdUri, UriError> {
        let not_a_uri = || UriError::NotAUri {
            uri: uri.to_owned(),
        };
        let (scheme, rest) = uri.split_once(':').ok_or_else(not_a_uri)?;
        let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !valid_scheme {
            return Err(not_a_uri());
        }
        // "Scheme names ... are case-insensitive" (RFC 3986, 3.1).
        let unix = match scheme.to_ascii_lowercase().as_str() {
            "nbd" => false,
            "nbd+unix" => true,
            s @ ("nbds" | "nbds+unix") => {
                return Err(UriError::TlsNotSupported {
                    scheme: s.to_owned(),
                })
            }
            _ => {
                return Err(UriError::UnsupportedScheme {
                    scheme: scheme.to_owned(),
                })
            }
        };
        let rest = rest.strip_prefix("//").ok_or_else(not_a_uri)?;
        let (rest, fragment) = match rest.split_once('#') {
            Some((r, f)) => (r, Some(f)),
            None => (rest, None),
        };
        if let Some(f) = fragment {
            return Err(UriError::Fragment {
                fragment: f.to_owned(),
            });
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, q),
            None => (rest, ""),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let export = export_name(path)?;
        let socket = parse_query(query, unix)?;
        let endpoint = if unix {
            if !authority.is_empty() {
                return Err(UriError::UnixWithHost {
                    host: authority.to_owned(),
                });
            }
            let path = socket.ok_or(UriError::MissingSocket)?;
            if path.starts_with('\0') {
                return Err(UriError::AbstractSocket);
            }
            Endpoint::Unix {
                path: PathBuf::from(path),
            }
        } else {
            let (host, port) = parse_authority(authority, uri)?;
            Endpoint::Tcp { host, port }
        };
        Ok(NbdUri { endpoint, export })
    }

    /// `nbd://HOST:PORT/EXPORT`.
    pub fn tcp(host: impl Into<String>, port: u16, export: impl Into<String>) -> NbdUri {
        NbdUri {
            endpoint: Endpoint::Tcp {
                host: host.into(),
                port,
            },
            export: export.into(),
        }
    }

    /// `nbd+unix:///EXPORT?socket=PATH`.
    pub fn unix(path: impl Into<PathBuf>, export: impl Into<String>) -> NbdUri {
        NbdUri {
            endpoint: Endpoint::Unix { path: path.into() },
            export: export.into(),
        }
    }
}

impl FromStr for NbdUri {
    type Err = UriError;
    fn from_str(s: &str) -> Result<NbdUri, UriError> {
        NbdUri::parse(s)
    }
}

impl fmt::Display for NbdUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd://[{host}]:{port}/{}", encode(&self.export, "/"))
            }
            Endpoint::Tcp { host, port } => {
                write!(f, "nbd://{host}:{port}/{}", encode(&self.export, "/"))
            }
            Endpoint::Unix { path } => write!(
                f,
                "nbd+unix:///{}?socket={}",
                encode(&self.export, "/"),
                encode(&path.to_string_lossy(), "/")
            ),
        }
    }
}

/// "the path part of the URI except for the leading `/` character MUST be
/// passed to the server as the export name".
fn export_name(path: &str) -> Result<String, UriError> {
    let raw = path.strip_prefix('/').unwrap_or(path);
    let name = decode(raw)?;
    // Export names are strings: "MUST NOT contain `NUL` characters ... MUST be
    // no longer than 4096 bytes".
    let reason = if name.contains('\0') {
        Some("it contains a NUL character")
    } else if name.len() > MAX_STRING {
        Some("it is longer than the protocol's 4096 bytes")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(UriError::BadExportName { name, reason }),
        None => Ok(name),
    }
}

/// Checks the query parameters; returns the decoded `socket` value.
fn parse_query(query: &str, unix: bool) -> Result<Option<String>, UriError> {
    let mut socket = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode(k)?;
        if key.starts_with("tls-") {
            return Err(UriError::TlsParameter { key });
        }
        if key != "socket" || !unix {
            return Err(UriError::UnknownParameter { key });
        }
        if socket.is_some() {
            return Err(UriError::DuplicateParameter { key });
        }
        socket = Some(decode(v)?).filter(|s| !s.is_empty());
    }
    Ok(socket)
}

/// `[userinfo@]host[:port]` of a TCP URI.
fn parse_authority(authority: &str, uri: &str) -> Result<(String, u16), UriError> {
    if let Some((user, _)) = authority.rsplit_once('@') {
        return Err(UriError::UserInfo {
            user: user.to_owned(),
        });
    }
    let bracketed = authority.starts_with('[');
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (addr, after) = v6.split_once(']').ok_or_else(|| UriError::BadHost {
            host: authority.to_owned(),
        })?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(|| UriError::BadHost {
                host: authority.to_owned(),
            })?),
        };
        // RFC 3986 writes a zone as `%25`; decode before checking.
        let addr = decode(addr)?;
        let plain = addr.split('%').next().unwrap_or_default();
        if plain.parse::<Ipv6Addr>().is_err() {
            return Err(UriError::BadHost {
                host: authority.to_owned(),
            });
        }
        (addr, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (decode(h)?, Some(p)),
            None => (decode(authority)?, None),
        }
    };
    if host.is_empty() {
        return Err(UriError::MissingHost {
            uri: uri.to_owned(),
        });
    }
    // Literal IPv6 addresses "MUST be formatted in the way specified by RFC
    // 2732" (in brackets), so a bare host has no colon.
    if !bracketed
        && host
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "/?#[]@:%".contains(c))
    {
        return Err(UriError::BadHost { host });
    }
    // "If the `port` field is not present then it MUST default to ... 10809";
    // RFC 3986 allows an empty port after the colon, with the same meaning.
    let port = match port {
        None | Some("") => NBD_DEFAULT_PORT,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&n| n != 0 && p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| UriError::BadPort { port: p.to_owned() })?,
    };
    Ok((host, port))
}

/// Percent-decodes one URI component into UTF-8.
fn decode(s: &str) -> Result<String, UriError> {
    let bad = || UriError::BadEncoding { text: s.to_owned() };
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

/// Percent-encodes everything but RFC 3986 unreserved characters and `keep`.
fn encode(s: &str, keep: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        let c = b as char;
        if c.is_ascii_alphanumeric() || "-._~".contains(c) || (b < 0x80 && keep.contains(c)) {
            out.push(c);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(host: &str, port: u16, export: &str) -> NbdUri {
        NbdUri::tcp(host, port, export)
    }

    #[test]
    fn the_spec_examples_parse() {
        // The table of doc/uri.md, "NBD URI export name".
        let cases = [
            ("nbd://example.com/disk", "disk"),
            ("nbd://example.com/", ""),
            ("nbd://example.com", ""),
            ("nbd://example.com//disk", "/disk"),
            ("nbd://example.com/hello%20world", "hello world"),
        ];
        for (uri, export) in cases {
            assert_eq!(
                NbdUri::parse(uri),
                Ok(tcp("example.com", 10809, export)),
                "{uri}"
            );
        }
        assert_eq!(
            NbdUri::parse("nbd+unix:///disk?socket=sock"),
            Ok(NbdUri::unix("sock", "disk"))
        );
    }

    #[test]
    fn hosts_ports_and_sockets() {
        assert_eq!(
            NbdUri::parse("nbd://127.0.0.1:10900/snap"),
            Ok(tcp("127.0.0.1", 10900, "snap"))
        );
        assert_eq!(NbdUri::parse("NBD://h:/"), Ok(tcp("h", 10809, "")));
        assert_eq!(NbdUri::parse("nbd://[::1]:99/x"), Ok(tcp("::1", 99, "x")));
        assert_eq!(
            NbdUri::parse("nbd://[fe80::1]"),
            Ok(tcp("fe80::1", 10809, ""))
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///?socket=/run/q%20m.sock"),
            Ok(NbdUri::unix("/run/q m.sock", ""))
        );
        assert_eq!(
            NbdUri::parse("nbd+unix:///a%2Fb?socket=/s"),
            Ok(NbdUri::unix("/s", "a/b"))
        );
    }

    #[test]
    fn display_round_trips() {
        for uri in [
            "nbd://example.com:10809/disk",
            "nbd://[::1]:99/a%20b",
            "nbd+unix:///snap?socket=/tmp/x%20y.sock",
            "nbd://h:1/",
        ] {
            let parsed = NbdUri::parse(uri).unwrap();
            assert_eq!(parsed.to_string(), uri);
            assert_eq!(NbdUri::parse(&parsed.to_string()), Ok(parsed));
        }
    }

    type Check = fn(&UriError) -> bool;

    #[test]
    fn every_bad_uri_gets_its_own_error() {
        use UriError::*;
        let cases: Vec<(&str, Check)> = vec![
            ("", |e| matches!(e, NotAUri { .. })),
            ("/dev/nbd0", |e| matches!(e, NotAUri { .. })),
            ("nbd:/x", |e| matches!(e, NotAUri { .. })),
            ("1nbd://h", |e| matches!(e, NotAUri { .. })),
            ("http://h/x", |e| matches!(e, UnsupportedScheme { .. })),
            ("nbd+vsock://1/x", |e| matches!(e, UnsupportedScheme { .. })),
            ("nbds://h/x", |e| matches!(e, TlsNotSupported { .. })),
            ("nbds+unix:///x?socket=/s", |e| {
                matches!(e, TlsNotSupported { .. })
            }),
            ("nbd:///x", |e| matches!(e, MissingHost { .. })),
            ("nbd://:10809/x", |e| matches!(e, MissingHost { .. })),
            ("nbd://h:0/x", |e| matches!(e, BadPort { .. })),
            ("nbd://h:65536/x", |e| matches!(e, BadPort { .. })),
            ("nbd://h:+80/x", |e| matches!(e, BadPort { .. })),
            ("nbd://h:port/x", |e| matches!(e, BadPort { .. })),
            ("nbd://[::1/x", |e| matches!(e, BadHost { .. })),
            ("nbd://[nope]/x", |e| matches!(e, BadHost { .. })),
            ("nbd://[::1]x/x", |e| matches!(e, BadHost { .. })),
            ("nbd://a%20b/x", |e| matches!(e, BadHost { .. })),
            ("nbd://::1/x", |e| matches!(e, BadHost { .. })),
            ("nbd://me@h/x", |e| matches!(e, UserInfo { .. })),
            ("nbd+unix://h/x?socket=/s", |e| {
                matches!(e, UnixWithHost { .. })
            }),
            ("nbd+unix:///x", |e| matches!(e, MissingSocket)),
            ("nbd+unix:///x?socket=", |e| matches!(e, MissingSocket)),
            ("nbd+unix:///x?socket=%00abs", |e| {
                matches!(e, AbstractSocket)
            }),
            ("nbd://h/x?socket=/s", |e| {
                matches!(e, UnknownParameter { .. })
            }),
            ("nbd+unix:///x?socket=/s&x-foo=1", |e| {
                matches!(e, UnknownParameter { .. })
            }),
            ("nbd+unix:///x?socket=/s&socket=/t", |e| {
                matches!(e, DuplicateParameter { .. })
            }),
            ("nbd://h/x?tls-type=x509", |e| {
                matches!(e, TlsParameter { .. })
            }),
            ("nbd://h/x#frag", |e| matches!(e, Fragment { .. })),
            ("nbd://h/a%2", |e| matches!(e, BadEncoding { .. })),
            ("nbd://h/a%zz", |e| matches!(e, BadEncoding { .. })),
            ("nbd://h/a%ff", |e| matches!(e, BadEncoding { .. })),
            ("nbd://h/a%00b", |e| matches!(e, BadExportName { .. })),
        ];
        for (uri, is) in cases {
            let e = NbdUri::parse(uri).expect_err(uri);
            assert!(is(&e), "{uri}: {e:?}");
            assert!(!e.to_string().is_empty());
        }
        let long = format!("nbd://h/{}", "a".repeat(MAX_STRING + 1));
        assert!(matches!(
            NbdUri::parse(&long),
            Err(UriError::BadExportName { .. })
        ));
    }

    #[test]
    fn the_tls_error_says_what_to_do() {
        let e = NbdUri::parse("nbds://h/x").unwrap_err().to_string();
        assert!(e.contains("not support") && e.contains("nbd://"), "{e}");
    }
}

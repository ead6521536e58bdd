//! The `--listen` address: `HOST:PORT`, or a bare host (IPv4, IPv6 with or without brackets, or
//! a name) that means the agent's default port, 7710.

use std::net::{IpAddr, SocketAddr};

/// Default TCP port of a shard agent (the one `sa-image` assumes for an address without one).
pub const DEFAULT_PORT: u16 = 7710;

/// Where the agent listens when nothing is said: every IPv4 address, port 7710.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7710";

/// Turns a `--listen` value into `HOST:PORT` for binding; the default port when none is given.
/// The error says what is wrong with the value.
pub fn listen_addr(text: &str) -> Result<String, String> {
    let t = text.trim();
    if t.is_empty() {
        return Err("the listen address is empty: give HOST[:PORT], e.g. 0.0.0.0:7710".into());
    }
    if let Ok(sa) = t.parse::<SocketAddr>() {
        return Ok(sa.to_string());
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT).to_string());
    }
    if let Some(inner) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return match inner.parse::<IpAddr>() {
            Ok(ip) => Ok(SocketAddr::new(ip, DEFAULT_PORT).to_string()),
            Err(_) => Err(format!("'{t}' is not an IPv6 address in brackets")),
        };
    }
    let (host, port) = match t.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        Some(_) => {
            return Err(format!(
                "'{t}' is neither an address nor HOST:PORT (write an IPv6 address with a port \
                 as [ADDR]:PORT)"
            ))
        }
        None => (t, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if !host_ok {
        return Err(format!("'{host}' in '{t}' is not a host name or address"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => p.parse::<u16>().map_err(|_| {
            format!("'{p}' in '{t}' is not a port number (0 to 65535; 0 picks a free one)")
        })?,
    };
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_hosts_get_the_default_port() {
        for (given, want) in [
            ("0.0.0.0", "0.0.0.0:7710"),
            ("127.0.0.2:0", "127.0.0.2:0"),
            ("10.1.2.3:9000", "10.1.2.3:9000"),
            ("::", "[::]:7710"),
            ("[::1]", "[::1]:7710"),
            ("[::1]:7711", "[::1]:7711"),
            ("localhost", "localhost:7710"),
            ("desk-pc.office.lan:8000", "desk-pc.office.lan:8000"),
            (" 0.0.0.0 ", "0.0.0.0:7710"),
        ] {
            assert_eq!(listen_addr(given).as_deref(), Ok(want), "{given}");
        }
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        for (given, says) in [
            ("", "empty"),
            ("0.0.0.0:http", "not a port"),
            ("0.0.0.0:70000", "not a port"),
            ("host:", "not a port"),
            ("[zz]", "IPv6"),
            ("a b", "not a host"),
            (":7710", "not a host"),
            ("fe80::1:x", "[ADDR]:PORT"),
        ] {
            let e = listen_addr(given).unwrap_err();
            assert!(e.contains(says), "{given}: {e}");
        }
    }
}

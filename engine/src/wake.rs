//! Wake-on-LAN: wakes a sleeping desk PC before a restore or a live serve needs its shards.
//!
//! The magic packet is 6 bytes `0xFF` then the target's MAC 16 times (102 bytes), sent by UDP.
//! A sleeping PC's network card looks for that pattern in any frame, so the UDP port does not
//! matter to it; ports 9 (discard) and 7 (echo) are the customary ones and what routers
//! forwarding WoL expect ([`WAKE_PORTS`]). Each packet goes
//!
//! * to the broadcast address of the agent's subnet (reported by the agent in its `STAT` answer,
//!   kept in [`crate::availability`]): every card on that segment sees it, whatever the
//!   switches have forgotten; it only leaves the server's own segment where a router forwards
//!   directed broadcasts;
//! * directed to the agent's last address: this reaches a PC on another subnet when its router
//!   still knows the MAC for that address (an ARP entry), which a router often does for a while.
//!
//! Sending proves nothing about waking: the caller then waits for the agent to answer, with a
//! deadline, and records the outcome ([`crate::availability::History::record_wake`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::net::UdpSocket;

/// Destination ports of the magic packet.
pub const WAKE_PORTS: [u16; 2] = [9, 7];
/// Length of a magic packet.
pub const PACKET_LEN: usize = 6 + 16 * 6;

/// Why a wake could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    /// A MAC address that does not parse.
    #[error("{0:?} is not a MAC address: write six hex bytes, e.g. 3c:52:82:0a:1b:2c")]
    BadMac(String),
    /// Nowhere to send.
    #[error(
        "cannot wake {mac}: neither its subnet's broadcast address nor its last address is known \
         (an agent reports them once it is reached while up)"
    )]
    NoDestination {
        /// The MAC, as text.
        mac: String,
    },
    /// No socket to send from.
    #[error("cannot open a UDP socket to send Wake-on-LAN packets: {0}")]
    Socket(#[source] std::io::Error),
    /// Every send failed.
    #[error("no Wake-on-LAN packet for {mac} could be sent: {}", failures.join("; "))]
    NothingSent {
        /// The MAC, as text.
        mac: String,
        /// Each destination and why it failed.
        failures: Vec<String>,
    },
}

/// The magic packet for `mac`.
pub fn magic_packet(mac: [u8; 6]) -> [u8; PACKET_LEN] {
    let mut p = [0xFF; PACKET_LEN];
    for chunk in p[6..].chunks_exact_mut(6) {
        chunk.copy_from_slice(&mac);
    }
    p
}

/// `3c:52:82:0a:1b:2c`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// Parses `3c:52:82:0a:1b:2c` or `3C-52-82-0A-1B-2C`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], WakeError> {
    let bad = || WakeError::BadMac(s.to_string());
    let parts: Vec<&str> = s.trim().split([':', '-']).collect();
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

/// An agent to wake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WakeTarget {
    /// MAC of its network card.
    pub mac: [u8; 6],
    /// Broadcast address of its IPv4 subnet.
    pub broadcast: Option<Ipv4Addr>,
    /// The address it was last reached at.
    pub last_ip: Option<IpAddr>,
}

impl WakeTarget {
    /// Every (address, port) a packet goes to: the broadcast address first.
    pub fn destinations(&self, ports: &[u16]) -> Vec<SocketAddr> {
        let last = self.last_ip.map(|ip| match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        });
        let mut out = Vec::new();
        for ip in self.broadcast.map(IpAddr::V4).into_iter().chain(last) {
            for &port in ports {
                let to = SocketAddr::new(ip, port);
                if !out.contains(&to) {
                    out.push(to);
                }
            }
        }
        out
    }
}

/// What [`wake`] sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WakeReport {
    /// Where a packet went.
    pub sent: Vec<SocketAddr>,
    /// Where it could not, and why.
    pub failed: Vec<(SocketAddr, String)>,
}

/// Sends the magic packet of `target` to each of its [`WakeTarget::destinations`] on `ports`
/// (normally [`WAKE_PORTS`]). Succeeds when at least one packet was sent.
pub async fn wake(target: &WakeTarget, ports: &[u16]) -> Result<WakeReport, WakeError> {
    let mac = format_mac(target.mac);
    let destinations = target.destinations(ports);
    if destinations.is_empty() {
        return Err(WakeError::NoDestination { mac });
    }
    let packet = magic_packet(target.mac);
    let mut v4: Option<UdpSocket> = None;
    let mut v6: Option<UdpSocket> = None;
    let mut report = WakeReport::default();
    for to in destinations {
        let socket = match to {
            SocketAddr::V4(_) => &mut v4,
            SocketAddr::V6(_) => &mut v6,
        };
        if socket.is_none() {
            match open_socket(to.is_ipv4()).await {
                Ok(s) => *socket = Some(s),
                Err(e) => {
                    report.failed.push((to, e.to_string()));
                    continue;
                }
            }
        }
        let s = socket.as_ref().expect("opened above");
        match s.send_to(&packet, to).await {
            Ok(_) => report.sent.push(to),
            Err(e) => report.failed.push((to, e.to_string())),
        }
    }
    for (to, why) in &report.failed {
        tracing::debug!(%to, "Wake-on-LAN packet not sent: {why}");
    }
    if report.sent.is_empty() {
        return Err(WakeError::NothingSent {
            mac,
            failures: report
                .failed
                .iter()
                .map(|(to, why)| format!("{to}: {why}"))
                .collect(),
        });
    }
    tracing::info!(mac, to = ?report.sent, "Wake-on-LAN packets sent");
    Ok(report)
}

/// A UDP socket of the family, on any port, allowed to send to broadcast addresses.
async fn open_socket(v4: bool) -> Result<UdpSocket, WakeError> {
    let any: SocketAddr = if v4 {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let s = UdpSocket::bind(any).await.map_err(WakeError::Socket)?;
    if v4 {
        s.set_broadcast(true).map_err(WakeError::Socket)?;
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MAC: [u8; 6] = [0x3c, 0x52, 0x82, 0x0a, 0x1b, 0x2c];

    /// Receives one datagram within 5 s.
    async fn receive(s: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 512];
        let (n, _) = tokio::time::timeout(Duration::from_secs(5), s.recv_from(&mut buf))
            .await
            .expect("no packet within 5 s")
            .unwrap();
        buf[..n].to_vec()
    }

    fn assert_magic(p: &[u8]) {
        assert_eq!(p.len(), 102);
        assert_eq!(&p[..6], &[0xFF; 6]);
        for copy in p[6..].chunks(6) {
            assert_eq!(copy, MAC);
        }
    }

    #[test]
    fn packet_and_mac_text() {
        assert_magic(&magic_packet(MAC));
        assert_eq!(format_mac(MAC), "3c:52:82:0a:1b:2c");
        assert_eq!(parse_mac("3C-52-82-0A-1B-2C").unwrap(), MAC);
        assert_eq!(parse_mac(" 3c:52:82:0a:1b:2c ").unwrap(), MAC);
        for bad in [
            "3c:52:82:0a:1b",
            "3c:52:82:0a:1b:2c:00",
            "3c:52:82:0a:1b:zz",
            "3c5:2:82:0a:1b:2c",
            "",
        ] {
            let e = parse_mac(bad).unwrap_err().to_string();
            assert!(e.contains("six hex bytes"), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn directed_packets_reach_a_listener_on_every_port() {
        let a = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let ports = [
            a.local_addr().unwrap().port(),
            b.local_addr().unwrap().port(),
        ];
        let target = WakeTarget {
            mac: MAC,
            broadcast: None,
            last_ip: Some("127.0.0.1".parse().unwrap()),
        };
        let report = wake(&target, &ports).await.unwrap();
        assert_eq!(report.sent.len(), 2);
        assert_magic(&receive(&a).await);
        assert_magic(&receive(&b).await);
    }

    #[tokio::test]
    async fn ipv6_and_mapped_addresses() {
        let Ok(l) = UdpSocket::bind("[::1]:0").await else {
            eprintln!("no IPv6 loopback here: skipped the IPv6 half");
            return;
        };
        let port = l.local_addr().unwrap().port();
        let target = WakeTarget {
            mac: MAC,
            broadcast: None,
            last_ip: Some("::1".parse().unwrap()),
        };
        wake(&target, &[port]).await.unwrap();
        assert_magic(&receive(&l).await);
        // An IPv4-mapped address goes out as IPv4.
        let mapped = WakeTarget {
            last_ip: Some("::ffff:127.0.0.1".parse().unwrap()),
            ..target
        };
        assert_eq!(
            mapped.destinations(&[9]),
            vec!["127.0.0.1:9".parse::<SocketAddr>().unwrap()]
        );
    }

    /// The loopback network's broadcast address, 127.255.255.255, stands in for a LAN's: the
    /// send fails unless the socket may broadcast, and the packet reaches a listener on the
    /// wildcard address as a LAN broadcast would. (No packet may leave this machine in tests,
    /// so a real LAN broadcast is not tested.)
    #[tokio::test]
    async fn broadcast_reaches_a_wildcard_listener() {
        let l = UdpSocket::bind("0.0.0.0:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let target = WakeTarget {
            mac: MAC,
            broadcast: Some(Ipv4Addr::new(127, 255, 255, 255)),
            last_ip: None,
        };
        let report = wake(&target, &[port]).await.unwrap();
        assert_eq!(
            report.sent,
            vec![SocketAddr::from(([127, 255, 255, 255], port))]
        );
        assert_magic(&receive(&l).await);
        // Without the broadcast permission the same send is refused by the OS.
        let plain = UdpSocket::bind("0.0.0.0:0").await.unwrap();
        assert!(plain
            .send_to(&magic_packet(MAC), ("127.255.255.255", port))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn nowhere_to_send_is_an_error() {
        let target = WakeTarget {
            mac: MAC,
            broadcast: None,
            last_ip: None,
        };
        let e = wake(&target, &WAKE_PORTS).await.unwrap_err();
        assert!(matches!(e, WakeError::NoDestination { .. }));
        assert!(e.to_string().contains("3c:52:82:0a:1b:2c"), "{e}");
        let both = WakeTarget {
            broadcast: Some(Ipv4Addr::new(10, 0, 0, 255)),
            last_ip: Some("10.0.0.7".parse().unwrap()),
            ..target
        };
        assert_eq!(
            both.destinations(&WAKE_PORTS),
            ["10.0.0.255:9", "10.0.0.255:7", "10.0.0.7:9", "10.0.0.7:7"]
                .map(|s| s.parse::<SocketAddr>().unwrap())
        );
    }
}

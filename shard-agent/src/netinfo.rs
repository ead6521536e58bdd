//! Which network card a client reaches the agent through: its MAC and its IPv4 subnet's
//! broadcast address, reported in the `STAT` answer so that sa-image can wake this PC by
//! Wake-on-LAN once it sleeps.
//!
//! The interface is the one holding the connection's local address (the address the client
//! connected to). Interfaces come from `if-addrs` (addresses, broadcast) and `mac_address`
//! (hardware address by interface name): both portable crates over `getifaddrs` on Unix and
//! `GetAdaptersAddresses` on Windows. Loopback has no MAC worth reporting; an IPv6 connection
//! reports the IPv4 broadcast of the same interface when it has one.

use std::net::{IpAddr, Ipv4Addr};

use sa_core::store::StoreStat;

/// What the agent reports for waking it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetInfo {
    /// MAC of the interface.
    pub mac: Option<[u8; 6]>,
    /// IPv4 broadcast address of its subnet.
    pub broadcast: Option<Ipv4Addr>,
}

/// One address of one interface, as the OS lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddress {
    /// Interface name (on Windows its friendly name).
    pub name: String,
    /// The address.
    pub ip: IpAddr,
    /// IPv4 broadcast address of the address's subnet, when the interface has one.
    pub broadcast: Option<Ipv4Addr>,
    /// A loopback interface.
    pub loopback: bool,
}

/// Picks the interface holding `local` among `addrs`, and its MAC by `mac_of(name)`.
pub fn pick(
    local: IpAddr,
    addrs: &[IfAddress],
    mac_of: impl Fn(&str) -> Option<[u8; 6]>,
) -> NetInfo {
    let local = unmap(local);
    let Some(found) = addrs.iter().find(|a| unmap(a.ip) == local) else {
        return NetInfo::default();
    };
    if found.loopback || local.is_loopback() {
        return NetInfo::default();
    }
    let usable =
        |b: &Ipv4Addr| !b.is_unspecified() && !b.is_loopback() && *b != Ipv4Addr::BROADCAST;
    let broadcast = found.broadcast.filter(usable).or_else(|| {
        addrs
            .iter()
            .filter(|a| a.name == found.name)
            .find_map(|a| a.broadcast.filter(usable))
    });
    NetInfo {
        mac: mac_of(&found.name).filter(|m| *m != [0; 6]),
        broadcast,
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The machine's interface addresses (empty when the OS will not list them).
pub fn interfaces() -> Vec<IfAddress> {
    let list = match if_addrs::get_if_addrs() {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!("cannot list network interfaces: {e}");
            return Vec::new();
        }
    };
    list.into_iter()
        .map(|i| IfAddress {
            loopback: i.is_loopback(),
            ip: i.ip(),
            broadcast: match &i.addr {
                if_addrs::IfAddr::V4(v4) => v4.broadcast,
                if_addrs::IfAddr::V6(_) => None,
            },
            name: i.name,
        })
        .collect()
}

/// The MAC of the interface named `name`, from the OS.
pub fn mac_of(name: &str) -> Option<[u8; 6]> {
    match mac_address::mac_address_by_name(name) {
        Ok(m) => m.map(|m| m.bytes()),
        Err(e) => {
            tracing::debug!("cannot read the MAC of {name}: {e}");
            None
        }
    }
}

/// What the OS says of the interface holding `local`.
pub fn lookup(local: IpAddr) -> NetInfo {
    pick(local, &interfaces(), mac_of)
}

/// Fills the Wake-on-LAN fields of a `STAT` answer for a connection whose local address is
/// `local` (the OS calls run on the blocking pool).
pub async fn fill(stat: &mut StoreStat, local: IpAddr) {
    let info = tokio::task::spawn_blocking(move || lookup(local))
        .await
        .unwrap_or_default();
    stat.mac = info.mac;
    stat.broadcast = info.broadcast;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(name: &str, ip: &str, broadcast: Option<&str>, loopback: bool) -> IfAddress {
        IfAddress {
            name: name.into(),
            ip: ip.parse().unwrap(),
            broadcast: broadcast.map(|b| b.parse().unwrap()),
            loopback,
        }
    }

    fn macs(name: &str) -> Option<[u8; 6]> {
        match name {
            "eth0" => Some([2, 0, 0, 0, 0, 1]),
            "wlan0" => Some([2, 0, 0, 0, 0, 2]),
            "lo" => Some([0; 6]),
            _ => None,
        }
    }

    #[test]
    fn picks_the_interface_of_the_local_address() {
        let list = vec![
            addr("lo", "127.0.0.1", None, true),
            addr("lo", "::1", None, true),
            addr("eth0", "192.168.1.20", Some("192.168.1.255"), false),
            addr("eth0", "fd00::20", None, false),
            addr("wlan0", "10.0.0.5", Some("10.0.0.255"), false),
            addr("tun0", "10.8.0.2", None, false),
        ];
        let eth0 = NetInfo {
            mac: Some([2, 0, 0, 0, 0, 1]),
            broadcast: Some("192.168.1.255".parse().unwrap()),
        };
        let at = |ip: &str| pick(ip.parse().unwrap(), &list, macs);
        assert_eq!(at("192.168.1.20"), eth0);
        assert_eq!(at("::ffff:192.168.1.20"), eth0, "IPv4-mapped");
        assert_eq!(
            at("fd00::20"),
            eth0,
            "IPv6: the IPv4 broadcast of the same card"
        );
        assert_eq!(at("10.0.0.5").mac, Some([2, 0, 0, 0, 0, 2]));
        assert_eq!(
            at("10.8.0.2"),
            NetInfo::default(),
            "a tunnel: no MAC, no broadcast"
        );
        assert_eq!(at("127.0.0.1"), NetInfo::default(), "loopback");
        assert_eq!(at("::1"), NetInfo::default());
        assert_eq!(at("192.168.1.99"), NetInfo::default(), "not ours");
    }

    /// The OS lookup on this machine's own interfaces (no packet is sent): every non-loopback
    /// IPv4 address with a broadcast address maps to that broadcast and to the MAC the OS gives
    /// for its interface. Says so when the machine has no such interface.
    #[test]
    fn lookup_on_this_machine() {
        let list = interfaces();
        assert!(
            list.iter().any(|a| a.loopback),
            "no loopback interface listed: {list:?}"
        );
        assert_eq!(lookup("127.0.0.1".parse().unwrap()), NetInfo::default());
        let real: Vec<&IfAddress> = list
            .iter()
            .filter(|a| !a.loopback && a.ip.is_ipv4() && a.broadcast.is_some())
            .collect();
        if real.is_empty() {
            eprintln!("no non-loopback IPv4 interface here: only loopback was checked");
        }
        for a in real {
            let info = lookup(a.ip);
            assert_eq!(info.broadcast, a.broadcast, "{a:?}");
            let mac = mac_of(&a.name);
            assert_eq!(info.mac, mac.filter(|m| *m != [0; 6]), "{a:?}");
            // On Linux, the kernel's own word for the MAC, read another way.
            #[cfg(target_os = "linux")]
            if let Ok(text) = std::fs::read_to_string(format!("/sys/class/net/{}/address", a.name))
            {
                let sys: Vec<u8> = text
                    .trim()
                    .split(':')
                    .map(|h| u8::from_str_radix(h, 16).unwrap())
                    .collect();
                assert_eq!(info.mac.map(|m| m.to_vec()), Some(sys), "{a:?}");
            }
            eprintln!(
                "{} {}: mac {:?} broadcast {:?}",
                a.name, a.ip, info.mac, info.broadcast
            );
        }
    }
}

//! Where the XDP guard goes by default: the node's interfaces that carry a global address, and
//! the subnets of those addresses as the sources allowed to reach the agent's UDP ports.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one interface: (interface, address, prefix length).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub iface: String,
    pub ip: IpAddr,
    pub prefix: u8,
    /// A loopback interface (never guarded: nothing from other nodes arrives there).
    pub loopback: bool,
}

/// Every address of every interface that is up (getifaddrs(3)).
pub fn interface_addresses() -> std::io::Result<Vec<IfAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() || ifa.ifa_flags & libc::IFF_UP as u32 == 0 {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy().into_owned();
        // SAFETY: sa_family tells which sockaddr type the pointers hold.
        let (ip, prefix) = unsafe {
            match (*ifa.ifa_addr).sa_family as i32 {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in);
                    (IpAddr::V4(Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr))), u32::from_be(m.sin_addr.s_addr).count_ones() as u8)
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let m = &*(ifa.ifa_netmask as *const libc::sockaddr_in6);
                    (IpAddr::V6(Ipv6Addr::from(a.sin6_addr.s6_addr)), m.sin6_addr.s6_addr.iter().map(|b| b.count_ones()).sum::<u32>() as u8)
                }
                _ => continue,
            }
        };
        let loopback = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
        out.push(IfAddr { iface: name, ip, prefix, loopback });
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Addresses that other nodes can use: not loopback, not link-local, not multicast.
pub fn is_global(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_link_local() && !v4.is_multicast() && !v4.is_unspecified(),
        IpAddr::V6(v6) => {
            !v6.is_loopback() && !v6.is_multicast() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80
        }
    }
}

/// Default guard placement: interfaces with a global address, and their subnets.
pub fn defaults(addrs: &[IfAddr]) -> (Vec<String>, Vec<(IpAddr, u8)>) {
    let mut ifaces: Vec<String> = Vec::new();
    let mut allow = Vec::new();
    for a in addrs.iter().filter(|a| is_global(&a.ip) && !a.loopback) {
        if !ifaces.contains(&a.iface) {
            ifaces.push(a.iface.clone());
        }
        allow.push((a.ip, a.prefix));
    }
    (ifaces, allow)
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a host prefix).
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (ip, len) = match s.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (s, None),
    };
    let ip: IpAddr = ip.trim().parse().map_err(|e| format!("{s:?}: {e}"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.trim().parse::<u8>().map_err(|e| format!("{s:?}: prefix length: {e}"))?,
        None => max,
    };
    if len > max {
        return Err(format!("{s:?}: prefix length {len} is longer than {max}"));
    }
    Ok((ip, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_skip_loopback_and_link_local() {
        let a = |iface: &str, ip: &str, prefix| IfAddr { iface: iface.into(), ip: ip.parse().unwrap(), prefix, loopback: iface == "lo" };
        let addrs = vec![a("lo", "127.0.0.1", 8), a("lo", "::1", 128), a("lo", "10.9.9.9", 32), a("eth0", "10.1.2.3", 24), a("eth0", "fe80::1", 64), a("eth1", "2001:db8::5", 64)];
        let (ifaces, allow) = defaults(&addrs);
        assert_eq!(ifaces, vec!["eth0".to_string(), "eth1".to_string()]);
        assert_eq!(allow, vec![("10.1.2.3".parse().unwrap(), 24), ("2001:db8::5".parse().unwrap(), 64)]);
    }

    #[test]
    fn reads_this_machines_interfaces() {
        let addrs = interface_addresses().unwrap();
        assert!(addrs.iter().any(|a| a.ip.is_loopback()), "{addrs:?}");
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8").unwrap(), ("10.0.0.0".parse().unwrap(), 8));
        assert_eq!(parse_cidr("2001:db8::1").unwrap(), ("2001:db8::1".parse().unwrap(), 128));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        assert!(parse_cidr("nonsense/8").is_err());
    }
}

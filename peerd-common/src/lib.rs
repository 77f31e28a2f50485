//! Types shared by the kernel programs (`peerd-ebpf`) and the agent: map names, keys, values.
//!
//! Everything here is `#[repr(C)]` with explicit padding fields so the byte layout is identical on
//! both sides and no uninitialised padding ever reaches a map key (the kernel hashes raw bytes).
#![no_std]

/// Names of the maps in the kernel object; the agent looks them up by these.
pub mod maps {
    /// `HashMap<Endpoint, Endpoint>`: registry endpoint -> local agent endpoint.
    pub const REDIRECTS: &str = "REDIRECTS";
    /// `Array<Config>` with one element.
    pub const CONFIG: &str = "CONFIG";
    /// `LruHashMap<u64, u8>`: socket cookies of the agent's own sockets, never redirected. The
    /// value [`crate::BYPASS_REGISTER`] also exempts the connecting process (see `EXEMPT`).
    pub const BYPASS: &str = "BYPASS";
    /// `HashMap<u32, u8>`: thread-group ids (as the kernel's root PID namespace numbers them) of
    /// agent processes, whose connections are never redirected. Filled by the kernel itself.
    pub const EXEMPT: &str = "EXEMPT";
    /// `LruHashMap<u64, Endpoint>`: socket cookie -> original destination, between connect() and SYN.
    pub const PENDING: &str = "PENDING";
    /// `LruHashMap<Endpoint, Endpoint>`: client local endpoint -> original destination, while connected.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// `PerCpuArray<u64>` indexed by [`crate::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `HashMap<u16, u8>`: UDP ports (host order) the XDP guard protects.
    pub const GUARDED_PORTS: &str = "GUARDED_PORTS";
    /// `LpmTrie<[u8; 16], u8>`: allowed source prefixes (IPv4 as IPv4-mapped IPv6, prefix + 96).
    pub const ALLOWED: &str = "ALLOWED";
    /// `LruPerCpuHashMap<[u32; 4], PeerStats>`: per-source accounting for guarded ports.
    pub const PEER_STATS: &str = "PEER_STATS";
}

/// Program names in the kernel object.
pub mod programs {
    pub const CONNECT4: &str = "peerd_connect4";
    pub const CONNECT6: &str = "peerd_connect6";
    pub const SOCK_OPS: &str = "peerd_sock_ops";
    pub const XDP_GUARD: &str = "peerd_xdp_guard";
}

/// Capacity of the connection-tracking maps; LRU, so a flood can evict but never block.
pub const MAX_TRACKED_CONNECTIONS: u32 = 65_536;
/// Capacity of the per-source XDP accounting map.
pub const MAX_PEERS: u32 = 16_384;
/// Capacity of the redirect table (registry endpoints).
pub const MAX_REDIRECTS: u32 = 1_024;
/// Capacity of `EXEMPT` (agent processes; more than one only while an agent restarts).
pub const MAX_EXEMPT: u32 = 16;
/// `BYPASS` value that exempts the calling process too. An agent in a pod cannot know its PID
/// in the root PID namespace, which is what `bpf_get_current_pid_tgid` returns; so it connects
/// one socket marked with this value and the kernel program records the caller's tgid.
pub const BYPASS_REGISTER: u8 = 2;
/// Capacity of the allowed-prefix trie.
pub const MAX_ALLOWED_PREFIXES: u32 = 1_024;

/// An IP endpoint as the kernel sees it. IPv4 is stored IPv4-mapped (`::ffff:a.b.c.d`) so one map
/// serves connect4, connect6 (including v4-mapped destinations of dual-stack sockets) and sockets
/// accepted on a dual-stack listener.
///
/// `ip` words hold the address bytes in network order (as `bpf_sock_addr.user_ip6` does);
/// `port` holds the port in network byte order (as `bpf_sock_addr.user_port` does).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub ip: [u32; 4],
    pub port: u16,
    pub _pad: u16,
}

/// The third word of an IPv4-mapped address: bytes `00 00 ff ff` in memory order.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// An IPv4 address (raw, network order as in `user_ip4`) as the IPv4-mapped word array.
#[inline(always)]
pub const fn v4_mapped(ip4: u32) -> [u32; 4] {
    [0, 0, V4_MAPPED_WORD, ip4]
}

impl Endpoint {
    /// `ip4` raw in network order, `port` in network order.
    #[inline(always)]
    pub const fn v4(ip4: u32, port_be: u16) -> Self {
        Self { ip: v4_mapped(ip4), port: port_be, _pad: 0 }
    }

    #[inline(always)]
    pub const fn v6(ip6: [u32; 4], port_be: u16) -> Self {
        Self { ip: ip6, port: port_be, _pad: 0 }
    }

    /// Whether this is an IPv4 endpoint (stored IPv4-mapped).
    #[inline(always)]
    pub const fn is_v4(&self) -> bool {
        self.ip[0] == 0 && self.ip[1] == 0 && self.ip[2] == V4_MAPPED_WORD
    }

    /// The port in host byte order.
    #[inline(always)]
    pub const fn port_host(&self) -> u16 {
        u16::from_be(self.port)
    }
}

/// Address words as stored in the maps (network-order bytes, IPv4 as IPv4-mapped): the IPv4
/// address if it is one. With [`v6_addr`] for log records; kept apart rather than as one
/// `IpAddr`, whose IPv4 variant leaves bytes undefined that the kernel program would then copy
/// (the verifier rejects the read of an uninitialised register).
#[inline(always)]
pub fn v4_addr(words: &[u32; 4]) -> Option<core::net::Ipv4Addr> {
    (words[0] == 0 && words[1] == 0 && words[2] == V4_MAPPED_WORD)
        .then(|| core::net::Ipv4Addr::from(words[3].to_ne_bytes()))
}

/// Address words as an IPv6 address (IPv4 shows IPv4-mapped).
#[inline(always)]
pub fn v6_addr(words: &[u32; 4]) -> core::net::Ipv6Addr {
    let (a, b, c, d) = (words[0].to_ne_bytes(), words[1].to_ne_bytes(), words[2].to_ne_bytes(), words[3].to_ne_bytes());
    core::net::Ipv6Addr::from([
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2], d[3],
    ])
}

/// Runtime configuration the agent writes; one element of [`maps::CONFIG`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// `CLOCK_MONOTONIC` nanoseconds (what `bpf_ktime_get_ns` returns) of the agent's last heartbeat.
    /// Zero means "never": nothing is redirected.
    pub heartbeat_ns: u64,
    /// A heartbeat older than this fails open: connections go to their original destination.
    pub stale_after_ns: u64,
    /// The agent's network namespace (its netns cookie). Only connect() calls made in it are
    /// redirected: the rewrite target is 127.0.0.1 *of the caller's namespace*, so a pod in its
    /// own namespace must keep its connection (it would reach its own loopback). Zero: any.
    pub netns_cookie: u64,
}

/// Default fail-open bound.
pub const DEFAULT_STALE_AFTER_NS: u64 = 1_000_000_000;

/// Per-source accounting kept by the XDP guard.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub passed_packets: u64,
    pub passed_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
}

/// Reason-coded counters, indices into [`maps::COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect() to a registry endpoint rewritten to the agent.
    Redirected = 0,
    /// connect() to a registry endpoint left alone because the heartbeat was stale (fail open).
    FailOpen = 1,
    /// connect() by one of the agent's own sockets to a registry endpoint, left alone.
    Bypassed = 2,
    /// Original destination recorded for a redirected connection (at SYN time).
    OrigDstRecorded = 3,
    /// Original destination entry removed because the connection closed.
    OrigDstClosed = 4,
    /// A redirected connect() whose pending entry was lost before SYN (LRU eviction).
    OrigDstMissing = 5,
    /// Packets to a guarded UDP port from an allowed source.
    XdpPassed = 6,
    /// Packets to a guarded UDP port from a source outside the allowed prefixes, dropped.
    XdpDropped = 7,
    /// connect() to a registry endpoint whose target family the socket cannot reach.
    FamilyMismatch = 8,
    /// connect() to a registry endpoint by an exempt (agent) process, allowed untouched.
    Exempt = 9,
    /// connect() to a registry endpoint from another network namespace than the agent's, allowed
    /// untouched (a pod with its own network).
    OtherNetns = 10,
}

impl Counter {
    pub const COUNT: u32 = 11;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Redirected,
        Counter::FailOpen,
        Counter::Bypassed,
        Counter::OrigDstRecorded,
        Counter::OrigDstClosed,
        Counter::OrigDstMissing,
        Counter::XdpPassed,
        Counter::XdpDropped,
        Counter::FamilyMismatch,
        Counter::Exempt,
        Counter::OtherNetns,
    ];

    /// Stable metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::FailOpen => "fail_open",
            Counter::Bypassed => "bypassed",
            Counter::OrigDstRecorded => "orig_dst_recorded",
            Counter::OrigDstClosed => "orig_dst_closed",
            Counter::OrigDstMissing => "orig_dst_missing",
            Counter::XdpPassed => "xdp_passed",
            Counter::XdpDropped => "xdp_dropped",
            Counter::FamilyMismatch => "family_mismatch",
            Counter::Exempt => "exempt",
            Counter::OtherNetns => "other_netns",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), Copy, with explicit padding and no pointers.
    unsafe impl aya::Pod for super::Endpoint {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::PeerStats {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(core::mem::size_of::<Endpoint>(), 20);
        assert_eq!(core::mem::size_of::<Config>(), 24);
        assert_eq!(core::mem::size_of::<PeerStats>(), 32);
    }

    #[test]
    fn v4_mapped_bytes() {
        let e = Endpoint::v4(u32::from_ne_bytes([10, 1, 2, 3]), 5000u16.to_be());
        assert!(e.is_v4());
        let mut bytes = [0u8; 16];
        for (i, w) in e.ip.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        assert_eq!(bytes, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]);
        assert!(!Endpoint::v6([0, 0, 0, 1u32.to_be()], 0).is_v4());
        assert_eq!(v4_addr(&e.ip), Some(core::net::Ipv4Addr::new(10, 1, 2, 3)));
        assert_eq!(e.port_host(), 5000);
        let v6 = Endpoint::v6([0x2001_0db8u32.to_be(), 0, 0, 1u32.to_be()], 0);
        assert_eq!(v4_addr(&v6.ip), None);
        assert_eq!(v6_addr(&v6.ip), "2001:db8::1".parse::<core::net::Ipv6Addr>().unwrap());
    }

    #[test]
    fn counters_are_dense() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}

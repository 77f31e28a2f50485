//! The XDP guard on a real veth pair between two network namespaces: packets to a guarded UDP port
//! from a disallowed source are dropped, from an allowed one they pass; other ports are untouched;
//! the counters equal the packets sent; with kernel logging at debug each drop is logged.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::Result;
use aya::programs::XdpMode;
use bpf_tests::{require_root, unique, LogCapture, Netns};
use peerd_agent::bpf::{Kernel, KernelLog, LOG_TARGET};
use peerd_common::Counter;

const GUARDED: u16 = 7000;
const UNGUARDED: u16 = 7001;
const PAYLOAD: usize = 100;

struct Pair {
    sender: Netns,
    receiver: Netns,
}

/// sender (198.18.0.1, .2 / 2001:2::1, ::2) <-veth-> receiver (198.18.0.10 / 2001:2::10)
fn pair() -> Result<(Pair, String)> {
    let p = Pair { sender: Netns::new()?, receiver: Netns::new()? };
    // Without this the veths' link-local addresses stay tentative (DAD) for a second and neighbour
    // discovery, hence every IPv6 packet, waits.
    for ns in [&p.sender, &p.receiver] {
        bpf_tests::run(
            "ip",
            &["netns", "exec", &ns.name, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"],
        )?;
    }
    let (a, b) = (unique("pa"), unique("pb"));
    bpf_tests::run(
        "ip",
        &["link", "add", &a, "netns", &p.sender.name, "type", "veth", "peer", "name", &b, "netns", &p.receiver.name],
    )?;
    // Links up before addresses: IPv6 prefix routes for addresses added to a down link went
    // missing here.
    p.sender.ip(&["link", "set", &a, "up"])?;
    p.receiver.ip(&["link", "set", &b, "up"])?;
    for addr in ["198.18.0.1/24", "198.18.0.2/24"] {
        p.sender.ip(&["addr", "add", addr, "dev", &a])?;
    }
    for addr in ["2001:2::1/64", "2001:2::2/64"] {
        p.sender.ip(&["addr", "add", addr, "dev", &a, "nodad"])?;
    }
    p.receiver.ip(&["addr", "add", "198.18.0.10/24", "dev", &b])?;
    p.receiver.ip(&["addr", "add", "2001:2::10/64", "dev", &b, "nodad"])?;
    Ok((p, b))
}

fn xdp_guard(mode: XdpMode, log: KernelLog) -> Result<()> {
    require_root();
    let (p, iface) = pair()?;
    let capture = LogCapture::default();
    let _guard = capture.install(&format!("{LOG_TARGET}=debug"));
    let mut kernel = Kernel::load_with(log)?;
    kernel.guard_port(GUARDED)?;
    // 198.18.0.0/31 holds .0 and .1, not .2: a prefix, not an exact match.
    kernel.allow_prefix("198.18.0.0".parse()?, 31)?;
    kernel.allow_prefix("2001:2::1".parse()?, 128)?;
    p.receiver.run(|| Ok(kernel.attach_xdp(&iface, mode)?))?;

    let receivers = p.receiver.run(|| {
        let mut v = Vec::new();
        for addr in ["198.18.0.10", "2001:2::10"] {
            for port in [GUARDED, UNGUARDED] {
                let s = UdpSocket::bind(SocketAddr::new(addr.parse()?, port))?;
                s.set_nonblocking(true)?;
                v.push(s);
            }
        }
        Ok(v)
    })?;

    // (source, destination, packets)
    let plan: Vec<(&str, SocketAddr, usize)> = vec![
        ("198.18.0.1", SocketAddr::new("198.18.0.10".parse()?, GUARDED), 20),
        ("198.18.0.2", SocketAddr::new("198.18.0.10".parse()?, GUARDED), 15),
        ("198.18.0.2", SocketAddr::new("198.18.0.10".parse()?, UNGUARDED), 10),
        ("2001:2::1", SocketAddr::new("2001:2::10".parse()?, GUARDED), 12),
        ("2001:2::2", SocketAddr::new("2001:2::10".parse()?, GUARDED), 9),
    ];
    p.sender.run(|| {
        for (src, dst, n) in &plan {
            let s = UdpSocket::bind(SocketAddr::new(src.parse()?, 0))?;
            for _ in 0..*n {
                s.send_to(&[0u8; PAYLOAD], dst)?;
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Ok(())
    })?;

    // Count what arrived, per (source, port), until quiet (bounded).
    let mut got: HashMap<(IpAddr, u16), usize> = HashMap::new();
    let mut buf = [0u8; 2048];
    let mut last = Instant::now();
    while last.elapsed() < Duration::from_millis(500) {
        for r in &receivers {
            while let Ok((_, from)) = r.recv_from(&mut buf) {
                *got.entry((from.ip(), r.local_addr()?.port())).or_default() += 1;
                last = Instant::now();
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let count = |src: &str, port| got.get(&(src.parse().unwrap(), port)).copied().unwrap_or(0);
    assert_eq!(count("198.18.0.1", GUARDED), 20, "allowed source passes: {got:?}");
    assert_eq!(count("198.18.0.2", GUARDED), 0, "disallowed source dropped: {got:?}");
    assert_eq!(count("198.18.0.2", UNGUARDED), 10, "unguarded port untouched: {got:?}");
    assert_eq!(count("2001:2::1", GUARDED), 12, "allowed v6 source passes: {got:?}");
    assert_eq!(count("2001:2::2", GUARDED), 0, "disallowed v6 source dropped: {got:?}");

    assert_eq!(kernel.counter(Counter::XdpPassed), 20 + 12);
    assert_eq!(kernel.counter(Counter::XdpDropped), 15 + 9);
    let s1 = kernel.peer_stats("198.18.0.1".parse()?).expect("stats for .1");
    assert_eq!((s1.passed_packets, s1.dropped_packets), (20, 0));
    // Ethernet 14 + IPv4 20 + UDP 8 + payload.
    assert_eq!(s1.passed_bytes, 20 * (14 + 20 + 8 + PAYLOAD as u64));
    let s2 = kernel.peer_stats("198.18.0.2".parse()?).expect("stats for .2");
    assert_eq!((s2.passed_packets, s2.dropped_packets), (0, 15), "unguarded traffic is not counted");
    let s6 = kernel.peer_stats("2001:2::2".parse()?).expect("stats for ::2");
    assert_eq!(s6.dropped_bytes, 9 * (14 + 40 + 8 + PAYLOAD as u64));

    if log == KernelLog::Debug {
        // Ethernet + IP + UDP headers + payload, as the guard counts bytes.
        capture.wait_for("xdp_dropped 198.18.0.2 to port 7000 len 142", 15)?;
        let text = capture.wait_for("xdp_dropped 2001:2::2 to port 7000 len 162", 9)?;
        assert_eq!(text.lines().filter(|l| l.contains("xdp_dropped")).count(), 15 + 9, "{text}");
        assert!(!text.contains("xdp_passed"), "passes are trace, not debug: {text}");
    } else {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(capture.text(), "", "logging off: nothing from the kernel");
    }
    Ok(())
}

#[test]
fn xdp_guard_generic_mode() -> Result<()> {
    xdp_guard(XdpMode::Skb, KernelLog::Off)
}

#[test]
fn xdp_guard_native_mode() -> Result<()> {
    xdp_guard(XdpMode::Driver, KernelLog::Off)
}

#[test]
fn xdp_guard_logs_drops() -> Result<()> {
    xdp_guard(XdpMode::Skb, KernelLog::Debug)
}

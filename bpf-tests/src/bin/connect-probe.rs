//! A client for bpf-tests: joins a cgroup and a network namespace, then connects like any
//! workload on the node would. Prints `cookie N` (before connecting), `local ADDR`, `reply LINE`.
//!
//! usage: connect-probe --cgroup DIR --netns NAME --connect ADDR [--wait-go]
use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsRawFd, FromRawFd},
    time::Duration,
};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1));
    let need = |flag: &str| get(flag).ok_or_else(|| anyhow::anyhow!("{flag} missing"));
    let cgroup = need("--cgroup")?;
    let netns = need("--netns")?;
    let addr: SocketAddr = need("--connect")?.parse()?;
    let wait_go = args.iter().any(|a| a == "--wait-go");

    std::fs::write(format!("{cgroup}/cgroup.procs"), std::process::id().to_string())?;
    bpf_tests::enter_netns(netns)?;

    let domain = if addr.is_ipv4() { libc::AF_INET } else { libc::AF_INET6 };
    // SAFETY: plain socket(2); the fd is owned by the TcpStream built right after.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh, valid socket we own.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let cookie = peerd_agent::bpf::socket_cookie(&stream)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "cookie {cookie}")?;
    out.flush()?;
    if wait_go {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
    }
    let (sa, len) = raw_sockaddr(addr);
    // SAFETY: sa holds a valid sockaddr of length len for this socket's family.
    let rc = unsafe { libc::connect(stream.as_raw_fd(), sa.as_ptr().cast(), len) };
    anyhow::ensure!(rc == 0, "connect {addr}: {}", std::io::Error::last_os_error());
    writeln!(out, "local {}", stream.local_addr()?)?;
    out.flush()?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    writeln!(out, "reply {}", reply.trim())?;
    Ok(())
}

/// A raw sockaddr for `addr` (std has no connect() for a socket made beforehand).
fn raw_sockaddr(addr: SocketAddr) -> ([u8; 28], libc::socklen_t) {
    let mut buf = [0u8; 28];
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in is 16 bytes and buf is 28.
            unsafe { std::ptr::write_unaligned(buf.as_mut_ptr().cast(), sin) };
            (buf, std::mem::size_of::<libc::sockaddr_in>() as _)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 is 28 bytes.
            unsafe { std::ptr::write_unaligned(buf.as_mut_ptr().cast(), sin6) };
            (buf, std::mem::size_of::<libc::sockaddr_in6>() as _)
        }
    }
}

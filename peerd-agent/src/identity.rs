//! Who this node is to its peers: a node id unique even where host names collide, and the
//! address peers dial when the agent listens on a wildcard address.
use std::{
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    path::Path,
};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: node id {id:?} must be 1-128 characters of [A-Za-z0-9._-]")]
    Invalid { path: String, id: String },
}

/// The host name, as the kernel has it (a label: clones and namespaces share it).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "peerd".into())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// This node's id: `<data-dir>/node-id` when present, else `<hostname>-<8 random hex>` written
/// there. The random part keeps ids unique across cloned VMs and network namespaces that share
/// a host name; persisting it keeps the id stable across restarts (peers' rendezvous order and
/// their view of who holds what do not churn).
pub fn node_id(data_dir: &Path) -> Result<String, IdentityError> {
    let path = data_dir.join("node-id");
    let err = |source| IdentityError::Io { path: path.display().to_string(), source };
    match std::fs::read_to_string(&path) {
        Ok(s) => {
            let id = s.trim().to_string();
            if !valid_id(&id) {
                return Err(IdentityError::Invalid { path: path.display().to_string(), id });
            }
            Ok(id)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut r = [0u8; 4];
            std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut r)).map_err(err)?;
            let host: String = hostname().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '.' { c } else { '-' }).take(100).collect();
            let id = format!("{host}-{:02x}{:02x}{:02x}{:02x}", r[0], r[1], r[2], r[3]);
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, format!("{id}\n")).and_then(|_| std::fs::rename(&tmp, &path)).map_err(err)?;
            Ok(id)
        }
        Err(e) => Err(err(e)),
    }
}

/// How the advertised address was chosen (logged and shown in `peerd status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chosen {
    /// `--advertise-addr`.
    Flag,
    /// The listen address itself (not a wildcard).
    Listen,
    /// The source address of the route to this peer or seed.
    RouteTo(SocketAddr),
    /// The source address of the default route.
    DefaultRoute,
    /// Nothing routes anywhere: loopback (a node alone).
    Loopback,
}

impl std::fmt::Display for Chosen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Chosen::Flag => write!(f, "--advertise-addr"),
            Chosen::Listen => write!(f, "the listen address"),
            Chosen::RouteTo(a) => write!(f, "the route to {a}"),
            Chosen::DefaultRoute => write!(f, "the default route"),
            Chosen::Loopback => write!(f, "no route (loopback)"),
        }
    }
}

/// The source address the kernel would use to reach `to`: a connected UDP socket sends nothing,
/// it only looks the route up.
fn route_source(to: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if to.is_ipv4() { (Ipv4Addr::UNSPECIFIED, 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let s = UdpSocket::bind(bind).ok()?;
    s.connect(to).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// The address peers should dial for a listener on `listen`: never a wildcard. With a wildcard
/// listener, the source address of the route to the first peer or seed that has one (so a node
/// with several interfaces advertises the one its cluster is on), else of the default route.
pub fn advertise(listen: SocketAddr, flag: Option<SocketAddr>, towards: &[SocketAddr]) -> (SocketAddr, Chosen) {
    if let Some(a) = flag {
        return (a, Chosen::Flag);
    }
    if !listen.ip().is_unspecified() {
        return (listen, Chosen::Listen);
    }
    for t in towards {
        if let Some(ip) = route_source(*t) {
            // A route to ourselves says nothing about the cluster's network unless all of it is
            // on loopback.
            if !ip.is_loopback() || t.ip().is_loopback() {
                return (SocketAddr::new(ip, listen.port()), Chosen::RouteTo(*t));
            }
        }
    }
    // TEST-NET-1: only the routing table is consulted, nothing is sent.
    if let Some(ip) = route_source((Ipv4Addr::new(192, 0, 2, 1), 9).into()) {
        return (SocketAddr::new(ip, listen.port()), Chosen::DefaultRoute);
    }
    (SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port()), Chosen::Loopback)
}

/// Whether a peer's advertised address can be dialled from a node advertising `me`: not a
/// wildcard, not port 0, and not loopback unless this node is on loopback too (a loopback
/// address from a remote node names this node, not that one).
pub fn usable_peer_addr(addr: SocketAddr, me: SocketAddr) -> bool {
    !addr.ip().is_unspecified() && addr.port() != 0 && (!addr.ip().is_loopback() || me.ip().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ids_are_persisted_and_unique() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ida = node_id(a.path()).unwrap();
        assert_eq!(node_id(a.path()).unwrap(), ida, "stable across restarts");
        let idb = node_id(b.path()).unwrap();
        assert_ne!(ida, idb, "two data dirs on one host (one host name) get two ids");
        assert!(ida.starts_with(&hostname().chars().take(3).collect::<String>()) || hostname().is_empty());
        std::fs::write(a.path().join("node-id"), "bad id with spaces").unwrap();
        assert!(matches!(node_id(a.path()), Err(IdentityError::Invalid { .. })));
    }

    #[test]
    fn never_advertises_a_wildcard() {
        let any: SocketAddr = "0.0.0.0:30002".parse().unwrap();
        let (a, how) = advertise(any, None, &["127.0.0.7:30001".parse().unwrap()]);
        assert_eq!((a, how), ("127.0.0.1:30002".parse().unwrap(), Chosen::RouteTo("127.0.0.7:30001".parse().unwrap())));
        let (a, _) = advertise(any, None, &[]);
        assert!(!a.ip().is_unspecified());
        assert_eq!(a.port(), 30002);
        let fixed: SocketAddr = "10.1.2.3:9".parse().unwrap();
        assert_eq!(advertise(any, Some(fixed), &[]).0, fixed);
        let listen: SocketAddr = "127.0.0.5:30002".parse().unwrap();
        assert_eq!(advertise(listen, None, &[]), (listen, Chosen::Listen));
    }

    #[test]
    fn unusable_peer_addresses() {
        let me: SocketAddr = "198.18.0.11:30002".parse().unwrap();
        assert!(usable_peer_addr("198.18.0.12:30002".parse().unwrap(), me));
        assert!(!usable_peer_addr("0.0.0.0:30002".parse().unwrap(), me));
        assert!(!usable_peer_addr("127.0.0.1:30002".parse().unwrap(), me));
        assert!(!usable_peer_addr("198.18.0.12:0".parse().unwrap(), me));
        assert!(usable_peer_addr("127.0.0.1:30002".parse().unwrap(), "127.0.0.1:1".parse().unwrap()));
    }
}

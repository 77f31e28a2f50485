//! Who the other agents are and which of them may hold a blob. Gossip will answer this from its
//! content summaries; until then (and for small fixed clusters) a static list from `--peer`.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::store::Digest;

/// Peer addresses gossip carried that cannot be dialled from here (a wildcard, port 0, or
/// loopback from a node that is not on loopback), ignored: a peer started with a wildcard
/// listener and an older agent would otherwise be dialled at an address that reaches nobody, or
/// this node itself.
pub static IGNORED_PEER_ADDRS: AtomicU64 = AtomicU64::new(0);

fn usable(addr: SocketAddr, me: SocketAddr) -> Option<SocketAddr> {
    if crate::identity::usable_peer_addr(addr, me) {
        Some(addr)
    } else {
        IGNORED_PEER_ADDRS.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%addr, "ignoring a peer address that cannot be dialled from here");
        None
    }
}

/// One peer as `peerd status` shows it.
pub struct PeerStatus {
    pub id: String,
    pub addr: String,
    pub zone: String,
    pub state: String,
    pub last_seen_ms: Option<u64>,
    /// Blobs it advertises (complete, partial); None when unknown (static peers).
    pub advertised: Option<(u32, u32)>,
}

pub trait PeerDirectory: Send + Sync + 'static {
    /// Every known peer, for status output.
    fn describe(&self) -> Vec<PeerStatus>;
    /// Peers' QUIC addresses that may hold `d` complete, with "same zone", best first. Peers that
    /// turn out not to have it answer NotFound and are skipped.
    fn holders(&self, d: &Digest) -> Vec<(SocketAddr, bool)>;
    /// Every live member's QUIC address, this node included (for rendezvous ownership).
    fn members(&self) -> Vec<SocketAddr>;
    /// This node's advertised QUIC address.
    fn me(&self) -> SocketAddr;
}

/// A fixed cluster: every listed peer may hold anything.
pub struct StaticPeers {
    pub me: SocketAddr,
    pub peers: Vec<SocketAddr>,
}

impl PeerDirectory for StaticPeers {
    fn describe(&self) -> Vec<PeerStatus> {
        self.peers
            .iter()
            .filter(|p| **p != self.me)
            .map(|p| PeerStatus { id: String::new(), addr: p.to_string(), zone: String::new(), state: "configured".into(), last_seen_ms: None, advertised: None })
            .collect()
    }

    fn holders(&self, _d: &Digest) -> Vec<(SocketAddr, bool)> {
        self.peers.iter().filter(|p| **p != self.me).map(|p| (*p, true)).collect()
    }

    fn members(&self) -> Vec<SocketAddr> {
        let mut m = self.peers.clone();
        if !m.contains(&self.me) {
            m.push(self.me);
        }
        m
    }

    fn me(&self) -> SocketAddr {
        self.me
    }
}

/// Peers and content as gossip sees them: holders are the nodes advertising the digest
/// (complete ones first, same zone first), members the live nodes.
pub struct GossipPeers {
    pub gossip: std::sync::Arc<crate::gossip::Gossip>,
    pub me: SocketAddr,
    pub zone: String,
}

impl PeerDirectory for GossipPeers {
    fn describe(&self) -> Vec<PeerStatus> {
        let mut v: Vec<PeerStatus> = self
            .gossip
            .peers()
            .into_iter()
            .map(|p| PeerStatus {
                id: p.id.to_string(),
                addr: p.addr.map(|a| a.to_string()).unwrap_or_default(),
                zone: p.zone.to_string(),
                state: if p.state == crate::gossip::PeerState::Alive { "alive".into() } else { "dead".into() },
                last_seen_ms: Some(p.last_seen.elapsed().as_millis() as u64),
                advertised: Some(p.advertised),
            })
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn holders(&self, d: &Digest) -> Vec<(SocketAddr, bool)> {
        let mut h: Vec<(bool, bool, SocketAddr)> = self
            .gossip
            .who_has(d)
            .into_iter()
            .filter_map(|h| {
                let addr = h.addr.filter(|a| *a != self.me).and_then(|a| usable(a, self.me))?;
                let complete = matches!(h.kind, crate::gossip::Kind::Complete);
                Some((!complete, &*h.zone != self.zone.as_str(), addr))
            })
            .collect();
        h.sort();
        h.into_iter().map(|(_, other_zone, a)| (a, !other_zone)).collect()
    }

    fn members(&self) -> Vec<SocketAddr> {
        let mut m: Vec<SocketAddr> = self
            .gossip
            .peers()
            .into_iter()
            .filter(|p| p.state == crate::gossip::PeerState::Alive)
            .filter_map(|p| p.addr)
            .filter(|a| *a == self.me || usable(*a, self.me).is_some())
            .collect();
        if !m.contains(&self.me) {
            m.push(self.me);
        }
        m
    }

    fn me(&self) -> SocketAddr {
        self.me
    }
}

/// Keeps gossip's advertisement in step with the store and the node's containerd content store:
/// at once when the store's content changes (a blob completes, gets its first piece, or leaves),
/// and every second for containerd (scanned; one removed from containerd leaves the advertisement
/// after the next scan). Only changed shards are re-sent. Blobs being fetched from upstream are not
/// advertised: they are not readable yet. containerd's blobs count as complete.
pub async fn advertise(
    gossip: std::sync::Arc<crate::gossip::Gossip>,
    store: crate::store::Store,
    containerd: Option<std::sync::Arc<crate::containerd::ContainerdContent>>,
) {
    // Changes that land together (a burst of completions) go out as one update.
    const SETTLE: std::time::Duration = std::time::Duration::from_millis(20);
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    let mut changes = store.watch_content();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                tokio::time::sleep(SETTLE).await;
                changes.mark_unchanged();
            }
        }
        let blobs = store.list();
        let mut complete: Vec<Digest> = blobs.iter().filter(|b| b.complete).map(|b| b.digest).collect();
        if let Some(c) = &containerd {
            complete.extend(c.digests().iter().copied());
        }
        let partial: Vec<Digest> = blobs.iter().filter(|b| !b.complete && b.pieces_present > 0).map(|b| b.digest).collect();
        gossip.set_content(complete, partial).await;
    }
}

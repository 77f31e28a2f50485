//! Who the other agents are and which of them may hold a blob. Gossip will answer this from its
//! content summaries; until then (and for small fixed clusters) a static list from `--peer`.
use std::net::SocketAddr;

use crate::store::Digest;

pub trait PeerDirectory: Send + Sync + 'static {
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

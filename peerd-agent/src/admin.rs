//! The admin API's documents (`peerd-agent/openapi.yaml`): one set of serde types written by the
//! agent and read by the CLI, so the two cannot drift apart.
use serde::{Deserialize, Serialize};

/// `GET /status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub version: String,
    pub self_check: SelfCheck,
    /// The advertised peer address; empty for a node alone.
    pub peer_addr: String,
    pub cache: CacheStats,
    pub requests: Requests,
    pub bytes: ByteCounts,
    pub in_progress: Vec<InProgress>,
    pub peers: Vec<Peer>,
    /// How piece data travels to and from peers (absent from agents before the bulk channel).
    #[serde(default)]
    pub peer_data: PeerData,
}

/// The bulk channel (`--peer-data`): piece data on TLS over TCP, QUIC as the fallback.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PeerData {
    /// "tcp" or "quic" (`--peer-data`); empty for a node alone.
    pub transport: String,
    /// Whether this node's TCP port is open (false: peers send it piece data over QUIC).
    pub listening: bool,
    /// Piece requests answered over TCP, sent and served.
    pub bulk_requests: u64,
    /// Piece requests sent over QUIC because the peer's TCP port could not be reached.
    pub fallbacks: u64,
}

/// How this node is set up and whether it can be useful so (`/readyz` is 503 while `warnings`
/// is not empty).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SelfCheck {
    pub node_id: String,
    pub hostname: String,
    /// `mirror` (clients point at it) or `transparent` (eBPF redirect).
    pub mode: String,
    pub advertised: String,
    /// How the advertised address was chosen (`--advertise-addr`, the route to a seed, ...).
    pub advertised_from: String,
    pub seeds: Vec<String>,
    pub seeds_resolved: usize,
    pub peers_alive: usize,
    pub registries: Vec<RegistryCheck>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RegistryCheck {
    pub name: String,
    pub url: String,
    /// `cached` or `relayed`.
    pub pulls: String,
    pub why: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CacheStats {
    pub used_bytes: u64,
    pub budget_bytes: u64,
    pub blobs: usize,
    pub complete_blobs: usize,
    pub evictions: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Requests {
    pub hits: u64,
    pub peer_hits: u64,
    pub misses: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ByteCounts {
    pub from_upstream: u64,
    pub from_peers: u64,
    pub to_peers: u64,
    pub to_clients_from_cache: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct InProgress {
    pub digest: String,
    pub size: u64,
    pub pieces_present: usize,
    pub pieces_total: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Peer {
    pub id: String,
    pub addr: String,
    pub zone: String,
    pub state: String,
    pub last_seen_ms: Option<u64>,
    pub advertised: Option<Advertised>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Advertised {
    pub complete: u32,
    pub partial: u32,
}

/// One entry of `GET /cache`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CacheEntry {
    pub digest: String,
    pub size: u64,
    pub complete: bool,
    pub pieces_present: usize,
    pub pieces_total: usize,
}

/// `GET /readyz`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Ready {
    pub ready: bool,
    pub warnings: Vec<String>,
}

/// One line of `POST /preheat`'s progress (JSON lines): a blob done, the end, or the error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PreheatLine {
    Blob { blob: String, index: usize, blobs: usize, done_bytes: u64, total_bytes: u64 },
    Done { done: bool, blobs: usize, total_bytes: u64 },
    Error { error: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preheat_lines_round_trip() {
        for l in [
            PreheatLine::Blob { blob: "sha256:00".into(), index: 1, blobs: 2, done_bytes: 3, total_bytes: 4 },
            PreheatLine::Done { done: true, blobs: 2, total_bytes: 4 },
            PreheatLine::Error { error: "x".into() },
        ] {
            let s = serde_json::to_string(&l).unwrap();
            assert_eq!(serde_json::from_str::<PreheatLine>(&s).unwrap(), l, "{s}");
        }
    }
}

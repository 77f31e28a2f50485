//! Cluster membership and content discovery by gossip (chitchat): no leader, no DHT.
//!
//! Every node publishes a few small keys (peer address, zone, version, and its content summary
//! as binary fuse filters in 8 shards, see `summary`), gossips them sealed with the cluster secret (`seal`,
//! `transport`), and keeps every peer's filters (`index`), so "who has digest D" never leaves the
//! process: per node about 1.4 bytes per (peer, blob), no false negatives. Small content changes are also pushed as rumors
//! (`rumor`) so they reach everyone within a few rounds, while chitchat's anti-entropy, whose
//! every exchange carries a digest of all members, is held to a byte budget (`pace`).
//! Encoding and invariants: PROTOCOL.md.

pub mod index;
pub mod pace;
pub mod rumor;
pub mod rng;
pub mod seal;
pub mod summary;
pub mod transport;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chitchat::transport::Transport;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ListenerHandle,
    ProtocolVersion, spawn_chitchat,
};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

pub use index::Slot;
pub use seal::CounterSnapshot;
pub use summary::{ContentChange, Digest, Kind};

use index::{Index, KeyView};
use rumor::{RumorCounters, Rumors};
use seal::Counters;
use summary::{KeyUpdate, LocalContent};

/// A node's id in the cluster (hostname and a random suffix by default).
pub type NodeId = Arc<str>;

const KEY_ADDR: &str = "addr";
const KEY_ZONE: &str = "zone";
const KEY_VERSION: &str = "ver";
const CLUSTER_ID: &str = "peerd";

/// Gossip settings. `GossipConfig::new` fills in the defaults.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    pub node_id: String,
    /// UDP address gossip listens on.
    pub listen_addr: SocketAddr,
    /// Address peers gossip to; default: the peer address's IP with the listen port.
    pub gossip_advertise_addr: Option<SocketAddr>,
    /// The QUIC address peers fetch content from.
    pub peer_addr: SocketAddr,
    pub zone: String,
    /// `ip:port` or `host:port` (a headless Service resolves to every agent pod).
    pub seeds: Vec<String>,
    pub secret: Vec<u8>,
    /// The round: chitchat's gossip interval and the rumor tick. 100 ms: a rumor reaches 1,000
    /// nodes in about log3(1000) ~ 7 rounds, under 1 s.
    pub gossip_interval: Duration,
    /// Steady-state gossip bytes per second per node that chitchat's anti-entropy may use
    /// (`pace`; 0 = unlimited). Small clusters never reach it; large ones exchange digests less
    /// often instead of sending more.
    pub budget: u64,
    /// How long a dead node stays listed (as dead) before it is forgotten.
    pub dead_node_grace_period: Duration,
    /// How often DNS seeds are re-resolved (every second while no peer is known).
    pub seed_refresh: Duration,
    /// Reported to peers in `PeerInfo::version`.
    pub version: String,
}

impl GossipConfig {
    pub fn new(peer_addr: SocketAddr, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            node_id: default_node_id(),
            listen_addr: (Ipv4Addr::UNSPECIFIED, 30001).into(),
            gossip_advertise_addr: None,
            peer_addr,
            zone: String::new(),
            seeds: Vec::new(),
            secret: secret.into(),
            gossip_interval: Duration::from_millis(100),
            budget: 16_000,
            dead_node_grace_period: Duration::from_secs(60 * 60),
            seed_refresh: Duration::from_secs(30),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }

    fn advertise_addr(&self) -> SocketAddr {
        self.gossip_advertise_addr.unwrap_or_else(|| {
            if self.listen_addr.ip().is_unspecified() {
                SocketAddr::new(self.peer_addr.ip(), self.listen_addr.port())
            } else {
                self.listen_addr
            }
        })
    }
}

/// Hostname plus 4 random hex digits, so a pod restarted under the same name is a new node.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "node".to_string());
    let mut suffix = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix);
    format!("{host}-{:02x}{:02x}", suffix[0], suffix[1])
}

#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error("invalid gossip config: {0}")]
    Config(String),
    #[error("gossip could not start")]
    Start(#[source] Box<dyn std::error::Error + Send + Sync>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    Alive,
    Dead,
}

/// One peer as this node sees it.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub id: NodeId,
    /// Distinguishes restarts of one node id.
    pub generation: u64,
    pub gossip_addr: SocketAddr,
    /// QUIC address (None until the peer's `addr` key arrived or if it is malformed).
    pub addr: Option<SocketAddr>,
    pub zone: Arc<str>,
    pub version: Arc<str>,
    pub state: PeerState,
    /// When its heartbeat last advanced (local clock).
    pub last_seen: Instant,
    /// Blobs it advertises (complete, partial), as this node's index has them.
    pub advertised: (u32, u32),
}

/// A peer that advertises a digest.
#[derive(Debug, Clone)]
pub struct Holder {
    pub id: NodeId,
    pub addr: Option<SocketAddr>,
    pub zone: Arc<str>,
    /// Partial holders have some pieces; ask them for their piece map.
    pub kind: Kind,
}

#[derive(Debug, Default)]
struct View {
    index: Index<ChitchatId>,
    peers: HashMap<Slot, PeerInfo>,
    /// Last heartbeat seen per slot, to tell when a peer was last heard from.
    heartbeats: HashMap<Slot, u64>,
    /// chitchat's max version per slot: how far the index is for that node (rumors older than
    /// this are already in it).
    versions: HashMap<Slot, u64>,
    /// The anti-entropy budget, which sets how far apart heartbeats arrive (`liveness_grace`).
    budget: u64,
}

impl View {
    fn known_version(&self, id: &ChitchatId) -> Option<u64> {
        self.index.slot_of(id).and_then(|slot| self.versions.get(&slot).copied())
    }

    fn live_members(&self) -> usize {
        1 + self.peers.values().filter(|p| p.state == PeerState::Alive).count()
    }
}

/// Where rumor datagrams go out: sealed UDP, or the simulator's network.
#[async_trait]
pub trait RumorSender: Send + Sync + 'static {
    async fn send(&self, to: SocketAddr, payload: &[u8]);
}

/// The rumor side of a transport: a sender and the inbox of received payloads.
pub struct RumorLink {
    pub sender: Arc<dyn RumorSender>,
    pub inbox: mpsc::Receiver<(SocketAddr, Vec<u8>)>,
}

/// A running gossip member.
pub struct Gossip {
    handle: Arc<ChitchatHandle>,
    view: Arc<RwLock<View>>,
    local: Mutex<LocalContent>,
    rumors: Arc<Mutex<Rumors>>,
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
    _listener: ListenerHandle,
}

impl Gossip {
    /// Joins the cluster over sealed UDP.
    pub async fn start(config: GossipConfig) -> Result<Gossip, GossipError> {
        if config.secret.len() < 16 {
            return Err(GossipError::Config("cluster secret shorter than 16 bytes".into()));
        }
        let counters = Arc::new(Counters::default());
        let transport = transport::SealedUdpTransport::new(&config.secret, counters.clone());
        let link = transport
            .rumor_link()
            .ok_or_else(|| GossipError::Config("rumor link already taken".into()))?;
        Self::start_with_transport(config, &transport, counters, link).await
    }

    /// Joins over any chitchat transport and rumor link (the simulator's in-memory ones).
    pub async fn start_with_transport(
        config: GossipConfig,
        transport: &dyn Transport,
        counters: Arc<Counters>,
        link: RumorLink,
    ) -> Result<Gossip, GossipError> {
        let advertise = config.advertise_addr();
        let generation = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        let chitchat_config = ChitchatConfig {
            chitchat_id: ChitchatId::new(config.node_id.clone(), generation, advertise),
            cluster_id: CLUSTER_ID.to_string(),
            gossip_interval: config.gossip_interval,
            listen_addr: config.listen_addr,
            seed_nodes: config.seeds.clone(),
            failure_detector_config: FailureDetectorConfig {
                // chitchat's phi is the silence over the mean heartbeat spacing, smoothed with
                // 5 prior samples of `initial_interval`. Spacing changes by two orders of
                // magnitude when a cluster moves from catching up (unpaced, ~100 ms) to paced
                // anti-entropy (seconds at 1,000 nodes): a long window keeps the old, short mean
                // and declares every peer dead at once (the simulator saw each node think all
                // others dead for seconds after converging). A short window adapts within ten
                // heartbeats, and the prior keeps the mean at or above ~0.7 s, so a peer is
                // declared dead after at least ~7 s of silence even in a small, unpaced cluster.
                initial_interval: Duration::from_secs(2).max(config.gossip_interval),
                // Spacings up to this long are learned.
                max_interval: Duration::from_secs(30),
                sampling_window_size: 10,
                phi_threshold: 10.0,
                dead_node_grace_period: config.dead_node_grace_period,
            },
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            // Only filters chitchat's live-nodes watch channel, which this code never reads: with
            // None chitchat clones every live member's whole state into it whenever any member's
            // version or liveness changes (a second copy of all summaries, and O(members x keys)
            // work per change: most of the simulator's time at 1,000 nodes). False keeps it empty;
            // `live_nodes()` and the failure detector are unaffected.
            extra_liveness_predicate: Some(Box::new(|_| false)),
            // V1 compresses the per-node digest every SYN carries; all peers are this code.
            protocol_version: ProtocolVersion::V1,
        };
        let initial = vec![
            (KEY_ADDR.to_string(), config.peer_addr.to_string()),
            (KEY_ZONE.to_string(), config.zone.clone()),
            (KEY_VERSION.to_string(), config.version.clone()),
        ];
        let paced = pace::Paced::open(transport, config.listen_addr, config.budget, config.gossip_interval, counters.clone())
            .await
            .map_err(|e| GossipError::Start(e.into()))?;
        let me = chitchat_config.chitchat_id.clone();
        let handle = spawn_chitchat(chitchat_config, initial, &paced)
            .await
            .map_err(|e| GossipError::Start(e.into()))?;
        let handle = Arc::new(handle);
        let changed = Arc::new(Notify::new());
        let listener = {
            let changed = changed.clone();
            let chitchat = handle.chitchat();
            let guard = chitchat.lock().await;
            guard.subscribe_event("", move |_| changed.notify_one())
        };
        let view = Arc::new(RwLock::new(View { budget: config.budget, ..View::default() }));
        let seed = me.generation_id ^ u64::from_le_bytes(blake3::hash(me.node_id.as_bytes()).as_bytes()[..8].try_into().unwrap_or_default());
        let rumors = Arc::new(Mutex::new(Rumors::new(me, seed)));
        let tasks = vec![
            tokio::spawn(refresh_loop(handle.clone(), view.clone(), rumors.clone(), changed, config.gossip_interval)),
            tokio::spawn(seed_loop(handle.clone(), config.seeds.clone(), advertise, config.seed_refresh)),
            tokio::spawn(rumor_loop(view.clone(), rumors.clone(), link, config.gossip_interval)),
        ];
        Ok(Gossip {
            handle,
            view,
            local: Mutex::new(LocalContent::default()),
            rumors,
            counters,
            tasks,
            _listener: listener,
        })
    }

    pub fn id(&self) -> NodeId {
        self.handle.chitchat_id().node_id.clone()
    }

    /// Replaces what this node advertises; only changed shards are re-published.
    pub async fn set_content(
        &self,
        complete: impl IntoIterator<Item = Digest>,
        partial: impl IntoIterator<Item = Digest>,
    ) {
        let (updates, changes) = match self.local.lock() {
            Ok(mut local) => {
                local.set(complete, partial);
                (local.take_updates(), local.take_changes())
            }
            Err(_) => return,
        };
        self.publish(updates, changes).await;
    }

    /// Applies incremental changes (a blob finished, started, was evicted).
    pub async fn apply(&self, changes: impl IntoIterator<Item = ContentChange>) {
        let (updates, changes) = match self.local.lock() {
            Ok(mut local) => {
                local.apply(changes);
                (local.take_updates(), local.take_changes())
            }
            Err(_) => return,
        };
        self.publish(updates, changes).await;
    }

    /// Writes the changed shards to chitchat, then rumors the per-blob changes (`Err(n)`: n
    /// changes, too many; anti-entropy alone carries them) tagged with the version that includes
    /// them.
    async fn publish(&self, updates: Vec<KeyUpdate>, changes: Result<Vec<ContentChange>, u64>) {
        if updates.is_empty() {
            return;
        }
        let members = self.view.read().map(|view| view.live_members()).unwrap_or(1);
        let chitchat = self.handle.chitchat();
        let mut chitchat = chitchat.lock().await;
        let state = chitchat.self_node_state();
        for update in updates {
            match update {
                KeyUpdate::Set(key, value) => state.set(key, value),
                KeyUpdate::Delete(key) => {
                    if state.contains_key(&key) {
                        state.delete(&key)
                    }
                }
            }
        }
        let version = state.max_version();
        if let Ok(mut rumors) = self.rumors.lock() {
            match changes {
                Ok(changes) => rumors.publish(&changes, version, members),
                Err(n) => rumors.counters.bulk_skipped += n,
            }
        }
    }

    /// Every other node known, alive or dead.
    pub fn peers(&self) -> Vec<PeerInfo> {
        match self.view.read() {
            Ok(view) => view
                .peers
                .iter()
                .map(|(slot, p)| PeerInfo { advertised: view.index.advertised(*slot), ..p.clone() })
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Live peers advertising `digest`: a match in their binary fuse filter (no false negatives;
    /// a false positive per peer with probability ~1/256, PROTOCOL.md; a peer without the blob
    /// answers "not found" and the transfer goes on to the next holder or upstream).
    pub fn who_has(&self, digest: &Digest) -> Vec<Holder> {
        let Ok(view) = self.view.read() else { return Vec::new() };
        let mut slots = Vec::new();
        view.index.lookup(digest, &mut slots);
        if let Ok(rumors) = self.rumors.lock() {
            if !rumors.overlay().is_empty() {
                rumors.overlay().adjust(digest, &mut slots, |id| view.index.slot_of(id));
            }
        }
        slots
            .into_iter()
            .filter_map(|(slot, kind)| {
                let peer = view.peers.get(&slot)?;
                (peer.state == PeerState::Alive).then(|| Holder {
                    id: peer.id.clone(),
                    addr: peer.addr,
                    zone: peer.zone.clone(),
                    kind,
                })
            })
            .collect()
    }

    /// Drop and traffic counters of the sealed transport.
    pub fn counters(&self) -> CounterSnapshot {
        self.counters.snapshot()
    }

    /// Rumor counters and the overlay's size.
    pub fn rumor_stats(&self) -> (RumorCounters, usize) {
        match self.rumors.lock() {
            Ok(rumors) => (rumors.counters, rumors.overlay().len()),
            Err(_) => (RumorCounters::default(), 0),
        }
    }

    /// (index entries, index table bytes, undecodable shard values seen).
    pub fn index_stats(&self) -> (usize, usize, u64) {
        match self.view.read() {
            Ok(view) => (view.index.len(), view.index.table_bytes(), view.index.undecodable),
            Err(_) => (0, 0, 0),
        }
    }

    /// Bytes of chitchat's state, measured: (content summaries, everything else), each the
    /// key and value bytes plus chitchat's per-key entry (`String` key, `VersionedValue`).
    pub async fn state_bytes(&self) -> (usize, usize) {
        let per_key = std::mem::size_of::<String>() + std::mem::size_of::<chitchat::VersionedValue>();
        let chitchat = self.handle.chitchat();
        let chitchat = chitchat.lock().await;
        let (mut content, mut other) = (0, 0);
        for state in chitchat.node_states().values() {
            for (key, value) in state.key_values_including_deleted() {
                let bytes = per_key + key.len() + value.value.len();
                if summary::parse_shard_key(key).is_some() {
                    content += bytes;
                } else {
                    other += bytes;
                }
            }
        }
        (content, other)
    }

    /// Rebuilds the local view now instead of at the next change or tick.
    pub async fn refresh(&self) {
        refresh(&self.handle, &self.view, &self.rumors).await;
    }

    /// Leaves: stops gossiping (peers will see this node die) and the background tasks.
    pub async fn shutdown(self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = self.handle.initiate_shutdown();
    }
}

/// Gossip's reason-coded counters for `/metrics`: datagrams dropped by reason, traffic, paced
/// SYNs, rumor events, members and index size.
impl crate::metrics::MetricsSource for Gossip {
    fn render(&self, r: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::{counter::ConstCounter, family::Family, gauge::Gauge};
        let c = self.counters();
        r.register("gossip_dropped_datagrams", "Gossip datagrams dropped, by reason", labelled("reason", &[
            ("not_sealed", c.not_sealed),
            ("unknown_version", c.unknown_version),
            ("auth_failed", c.auth_failed),
            ("bad_fragment", c.bad_fragment),
            ("evicted", c.evicted),
            ("undecodable", c.undecodable),
            ("oversize", c.oversize),
            ("rumor_backlog", c.rumor_backlog),
        ]));
        r.register("gossip_sent_bytes", "Sealed gossip bytes sent (chitchat and rumors)", ConstCounter::new(c.bytes_sent));
        r.register("gossip_received_bytes", "Gossip bytes received", ConstCounter::new(c.bytes_received));
        r.register("gossip_paced_syns", "chitchat SYNs not sent because the anti-entropy budget was spent", ConstCounter::new(c.paced));
        let (rc, overlay_len) = self.rumor_stats();
        r.register("gossip_rumors", "Rumor events: rumors published, received_new, received_stale, undecodable; bulk_skipped and overlay_full count changes left to anti-entropy; datagram_sent datagrams; hot_overflow rumors dropped unsent", labelled("event", &[
            ("published", rc.published),
            ("bulk_skipped", rc.bulk_skipped),
            ("received_new", rc.received_new),
            ("received_stale", rc.received_stale),
            ("undecodable", rc.undecodable),
            ("datagram_sent", rc.datagrams_sent),
            ("hot_overflow", rc.hot_overflow),
            ("overlay_full", rc.overlay_full),
        ]));
        let overlay = Gauge::<i64>::default();
        overlay.set(overlay_len as i64);
        r.register("gossip_rumor_overlay_entries", "Rumored changes not yet in chitchat's state", overlay);
        let members: Family<Vec<(String, String)>, Gauge> = Family::default();
        let (alive, dead) = self.peers().iter().fold((0i64, 0i64), |(a, d), p| match p.state {
            PeerState::Alive => (a + 1, d),
            PeerState::Dead => (a, d + 1),
        });
        members.get_or_create(&vec![("state".into(), "alive".into())]).set(alive);
        members.get_or_create(&vec![("state".into(), "dead".into())]).set(dead);
        r.register("gossip_peers", "Peers known by gossip, by state", members);
        let (entries, _, undecodable) = self.index_stats();
        let index = Gauge::<i64>::default();
        index.set(entries as i64);
        r.register("gossip_index_entries", "(peer, blob) pairs advertised in the peers' content filters held", index);
        r.register("gossip_undecodable_shards", "Peers' summary shards that failed to decode", ConstCounter::new(undecodable));
    }
}

type CounterFamily = prometheus_client::metrics::family::Family<Vec<(String, String)>, prometheus_client::metrics::counter::Counter>;

/// A counter family with one label, from (label value, count) pairs.
fn labelled(label: &str, values: &[(&str, u64)]) -> CounterFamily {
    let family = CounterFamily::default();
    for (value, count) in values {
        family.get_or_create(&vec![(label.to_string(), value.to_string())]).inc_by(*count);
    }
    family
}

impl Drop for Gossip {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let _ = self.handle.initiate_shutdown();
    }
}

/// Folds chitchat's state into the view on every change (new keys arrive as events), and at
/// least once a second for liveness and last-seen (the failure detector itself works on a scale
/// of seconds; at 1,000 peers a pass every 100 ms would be most of a simulator's work).
async fn refresh_loop(
    handle: Arc<ChitchatHandle>,
    view: Arc<RwLock<View>>,
    rumors: Arc<Mutex<Rumors>>,
    changed: Arc<Notify>,
    interval: Duration,
) {
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep(interval.max(Duration::from_secs(1))) => {}
        }
        refresh(&handle, &view, &rumors).await;
    }
}

/// Each round: hot rumors out to random live peers; received ones in as they come.
async fn rumor_loop(view: Arc<RwLock<View>>, rumors: Arc<Mutex<Rumors>>, link: RumorLink, interval: Duration) {
    let RumorLink { sender, mut inbox } = link;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let peers: Vec<SocketAddr> = match view.read() {
                    Ok(view) => view.peers.values().filter(|p| p.state == PeerState::Alive).map(|p| p.gossip_addr).collect(),
                    Err(_) => return,
                };
                let out = match rumors.lock() {
                    Ok(mut rumors) => rumors.poll_transmit(&peers),
                    Err(_) => return,
                };
                for (to, payload) in out {
                    sender.send(to, &payload).await;
                }
            }
            received = inbox.recv() => {
                let Some((from, payload)) = received else { return };
                let Ok(view) = view.read() else { return };
                let Ok(mut rumors) = rumors.lock() else { return };
                if let Err(error) = rumors.receive(&payload, Instant::now(), view.live_members(), |id| view.known_version(id)) {
                    debug!(%from, %error, "undecodable rumor");
                }
            }
        }
    }
}

/// Bytes a member adds to every digest (id, generation, address, heartbeat, versions, after
/// chitchat's compression), to estimate heartbeat spacing when paced. An upper estimate: the
/// simulator's short ids (`n0`..`n999`) compress to ~9 bytes (a 200-member SYN: 1,715 bytes);
/// real node names are longer and less alike. Overestimating only lengthens the grace.
const DIGEST_BYTES_PER_MEMBER: u64 = 30;
/// At most this long a peer whose heartbeat stopped is still counted alive (`liveness_grace`).
const MAX_GRACE: Duration = Duration::from_secs(30);

/// How long after its heartbeat last advanced a peer still counts as alive, whatever chitchat's
/// failure detector says. A paced cluster exchanges a digest at most every `members x 30 / budget`
/// seconds per node, so heartbeats reach a node seconds apart and irregularly; the phi detector
/// then suspects a few percent of live peers at any moment (the simulator: 15 of 399 per node
/// at 400 nodes), and a suspected peer gets no rumors and is hidden from `who_has`. Ten exchange
/// periods of grace removes those false deaths; small or unpaced clusters get none (phi alone
/// decides, in seconds), 1,000 nodes at the default budget about 19 s.
fn liveness_grace(members: usize, budget: u64) -> Duration {
    if budget == 0 {
        return Duration::ZERO;
    }
    let period = members as f64 * DIGEST_BYTES_PER_MEMBER as f64 / budget as f64;
    Duration::from_secs_f64(10.0 * period).min(MAX_GRACE)
}

async fn refresh(handle: &ChitchatHandle, view: &RwLock<View>, rumors: &Mutex<Rumors>) {
    let chitchat = handle.chitchat();
    let chitchat = chitchat.lock().await;
    let me = chitchat.self_chitchat_id().clone();
    let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
    let Ok(mut view) = view.write() else { return };
    let members = chitchat.node_states().len();
    let grace = liveness_grace(members, view.budget);
    let View { index, peers, heartbeats, versions, .. } = &mut *view;
    let now = Instant::now();
    let mut present = HashSet::with_capacity(members);
    for (id, state) in chitchat.node_states() {
        if *id == me {
            continue;
        }
        present.insert(id.clone());
        let keys = state.key_values_including_deleted().map(|(key, v)| KeyView {
            key,
            value: &v.value,
            version: v.version,
            deleted: v.is_deleted(),
        });
        let slot = match index.update_node(id, state.max_version(), keys) {
            Ok(slot) => slot,
            Err(error) => {
                warn!(%error, "peer not indexed");
                continue;
            }
        };
        versions.insert(slot, state.max_version());
        let is_live = live.contains(id);
        let heartbeat = u64::from(state.heartbeat());
        let peer = peers.entry(slot).or_insert_with(|| PeerInfo {
            id: id.node_id.clone(),
            generation: id.generation_id,
            gossip_addr: id.gossip_advertise_addr,
            addr: None,
            zone: Arc::from(""),
            version: Arc::from(""),
            state: PeerState::Dead,
            // A peer first met dead (from another node's state) was never heard alive here.
            last_seen: if is_live { now } else { now.checked_sub(MAX_GRACE).unwrap_or(now) },
            advertised: (0, 0),
        });
        if heartbeats.insert(slot, heartbeat).is_some_and(|previous| previous != heartbeat) {
            peer.last_seen = now;
        }
        peer.state = if is_live || now.duration_since(peer.last_seen) < grace { PeerState::Alive } else { PeerState::Dead };
        if peer.addr.is_none() {
            peer.addr = state.get(KEY_ADDR).and_then(|a| a.parse().ok());
        }
        if let Some(zone) = state.get(KEY_ZONE) {
            if *peer.zone != *zone {
                peer.zone = Arc::from(zone);
            }
        }
        if let Some(version) = state.get(KEY_VERSION) {
            if *peer.version != *version {
                peer.version = Arc::from(version);
            }
        }
    }
    index.retain(|id| present.contains(id));
    peers.retain(|slot, _| index.key(*slot).is_some());
    heartbeats.retain(|slot, _| index.key(*slot).is_some());
    versions.retain(|slot, _| index.key(*slot).is_some());
    if let Ok(mut rumors) = rumors.lock() {
        rumors.prune(now, |id| index.slot_of(id).and_then(|slot| versions.get(&slot).copied()));
    }
}

/// Gossips with seed addresses we do not know yet: at start, then every `every` (every second
/// while alone), so nodes that came up before DNS listed them still meet.
async fn seed_loop(
    handle: Arc<ChitchatHandle>,
    seeds: Vec<String>,
    me: SocketAddr,
    every: Duration,
) {
    if seeds.is_empty() {
        return;
    }
    loop {
        let mut addrs = HashSet::new();
        for seed in &seeds {
            if let Ok(addr) = seed.parse::<SocketAddr>() {
                addrs.insert(addr);
                continue;
            }
            match tokio::net::lookup_host(seed.as_str()).await {
                Ok(resolved) => addrs.extend(resolved),
                Err(error) => debug!(%seed, %error, "seed did not resolve"),
            }
        }
        let (known, alone) = {
            let chitchat = handle.chitchat();
            let chitchat = chitchat.lock().await;
            let known: HashSet<SocketAddr> =
                chitchat.node_states().keys().map(|id| id.gossip_advertise_addr).collect();
            (known, chitchat.live_nodes().count() <= 1)
        };
        for addr in addrs {
            if addr != me && !known.contains(&addr) {
                let _ = handle.gossip(addr);
            }
        }
        tokio::time::sleep(if alone { every.min(Duration::from_secs(1)) } else { every }).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_grace_follows_the_paced_heartbeat_spacing() {
        // Unpaced, or too small to be paced: the failure detector alone decides.
        assert_eq!(liveness_grace(1_000, 0), Duration::ZERO);
        assert!(liveness_grace(8, 16_000) < Duration::from_millis(200));
        // 1,000 members at the default budget: ten digest periods of ~1.9 s.
        let g = liveness_grace(1_000, 16_000);
        assert!(g > Duration::from_secs(15) && g < Duration::from_secs(25), "{g:?}");
        assert!(liveness_grace(400, 4_800) > Duration::from_secs(20));
        assert_eq!(liveness_grace(100_000, 16_000), MAX_GRACE);
    }

    fn config(port: u16, secret: &[u8], seeds: &[u16]) -> GossipConfig {
        let mut config = GossipConfig::new(([127, 0, 0, 1], port + 1000).into(), secret.to_vec());
        config.node_id = format!("n{port}");
        config.listen_addr = ([127, 0, 0, 1], port).into();
        config.seeds = seeds.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        config.gossip_interval = Duration::from_millis(50);
        config
    }

    /// Real sealed UDP on loopback: two members meet and see each other's content; a third
    /// with another secret is never admitted and its datagrams are counted as auth failures.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sealed_udp_members_meet_and_outsiders_are_ignored() {
        let secret = b"0123456789abcdef-cluster";
        let a = Gossip::start(config(41001, secret, &[])).await.unwrap();
        let b = Gossip::start(config(41002, secret, &[41001])).await.unwrap();
        let outsider = Gossip::start(config(41003, b"another secret, 16+ bytes", &[41001, 41002])).await.unwrap();
        let (da, db) = (Digest::from_sha256_bytes([1u8; 32]), Digest::from_sha256_bytes([2u8; 32]));
        a.set_content([da], []).await;
        b.apply([ContentChange::Partial(db)]).await;
        let mut met = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let a_sees = a.who_has(&db);
            let b_sees = b.who_has(&da);
            if a_sees.len() == 1 && b_sees.len() == 1 {
                assert_eq!(a_sees[0].kind, Kind::Partial);
                assert_eq!(&*b_sees[0].id, "n41001");
                assert_eq!(b_sees[0].addr, Some(([127, 0, 0, 1], 42001).into()));
                met = true;
                break;
            }
        }
        assert!(met, "members did not meet");
        // A later single change also travels as a rumor over the sealed socket (whether it or
        // chitchat's next exchange arrives first is a race at this size: count either).
        let dc = Digest::from_sha256_bytes([3u8; 32]);
        a.apply([ContentChange::Complete(dc)]).await;
        let mut rumored = false;
        for _ in 0..100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let (counters, _) = b.rumor_stats();
            if counters.received_new + counters.received_stale > 0 && !b.who_has(&dc).is_empty() {
                rumored = true;
                break;
            }
        }
        assert!(rumored, "no rumor arrived: {:?}", b.rumor_stats());
        assert!(b.who_has(&dc).iter().any(|h| &*h.id == "n41001"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        for member in [&a, &b] {
            assert!(member.peers().iter().all(|p| &*p.id != "n41003"));
        }
        assert!(outsider.peers().is_empty());
        assert!(a.counters().auth_failed > 0);
        outsider.shutdown().await;
        b.shutdown().await;
        a.shutdown().await;
    }
}

//! Deterministic-time simulation of many gossip members in one process (`gossip-sim`).
//!
//! All nodes run the real `Gossip` over chitchat's in-memory `ChannelTransport`, wrapped to drop
//! packets (seeded), cut a partition, and count bytes per node (plus the seal's per-datagram
//! overhead, since the in-memory transport does not seal). Run it on a paused tokio clock so time
//! only advances when every node is idle: results do not depend on host speed. chitchat picks
//! gossip targets with its own unseeded RNG, so runs differ slightly. Links have no latency
//! (in-cluster round trips are far below the gossip interval).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{ChannelTransport, RecvOutcome, SendOutcome, Socket, Transport};
use tokio::time::Instant;

use tokio::sync::mpsc;

use peerd_agent::gossip::rng::Rng;
use peerd_agent::gossip::seal::{Counters, MAX_DATAGRAM, OVERHEAD};
use peerd_agent::gossip::summary::{ContentChange, Digest};
use peerd_agent::gossip::{Gossip, GossipConfig, PeerState, RumorLink, RumorSender};

#[derive(Debug, Clone)]
pub struct SimOptions {
    pub nodes: usize,
    pub blobs: usize,
    pub interval: Duration,
    /// Anti-entropy byte budget per node (`GossipConfig::budget`).
    pub budget: u64,
    /// Packet loss during the lossy propagation run.
    pub loss: f64,
    pub seed: u64,
    /// Give up waiting for convergence after this much simulated time.
    pub max_wait: Duration,
    /// Skip the lossy propagation and partition phases (the scaling runs).
    pub quick: bool,
}

/// Where a node's received rumor payloads go.
type Inbox = mpsc::Sender<(SocketAddr, Vec<u8>)>;

/// The simulated network: loss, partition, byte counts.
#[derive(Default)]
struct Net {
    loss_ppm: AtomicU64,
    partitioned: AtomicBool,
    /// Nodes on side B of the partition.
    side_b: Mutex<HashSet<SocketAddr>>,
    rng: Mutex<Option<Rng>>,
    sent: Mutex<HashMap<SocketAddr, u64>>,
    /// Bytes of rumors among `sent`.
    rumor_bytes: AtomicU64,
    inboxes: Mutex<HashMap<SocketAddr, Inbox>>,
}

impl Net {
    fn delivers(&self, from: SocketAddr, to: SocketAddr) -> bool {
        if self.partitioned.load(Ordering::Relaxed) {
            if let Ok(side_b) = self.side_b.lock() {
                if side_b.contains(&from) != side_b.contains(&to) {
                    return false;
                }
            }
        }
        let loss = self.loss_ppm.load(Ordering::Relaxed);
        if loss == 0 {
            return true;
        }
        match self.rng.lock() {
            Ok(mut rng) => rng.as_mut().is_none_or(|rng| rng.next_u64() % 1_000_000 >= loss),
            Err(_) => true,
        }
    }

    fn total_sent(&self) -> u64 {
        self.sent.lock().map(|s| s.values().sum()).unwrap_or(0)
    }

    fn count_sent(&self, from: SocketAddr, bytes: u64) {
        if let Ok(mut sent) = self.sent.lock() {
            *sent.entry(from).or_default() += bytes;
        }
    }

    fn rumor_link(self: &Arc<Self>, addr: SocketAddr) -> RumorLink {
        let (tx, inbox) = mpsc::channel(1_024);
        if let Ok(mut inboxes) = self.inboxes.lock() {
            inboxes.insert(addr, tx);
        }
        RumorLink { sender: Arc::new(SimRumors { addr, net: self.clone() }), inbox }
    }
}

/// Rumors over the simulated network: same loss, partition and byte accounting as chitchat's.
struct SimRumors {
    addr: SocketAddr,
    net: Arc<Net>,
}

#[async_trait]
impl RumorSender for SimRumors {
    async fn send(&self, to: SocketAddr, payload: &[u8]) {
        let bytes = (payload.len() + OVERHEAD) as u64;
        self.net.count_sent(self.addr, bytes);
        self.net.rumor_bytes.fetch_add(bytes, Ordering::Relaxed);
        if !self.net.delivers(self.addr, to) {
            return;
        }
        let inbox = self.net.inboxes.lock().ok().and_then(|i| i.get(&to).cloned());
        if let Some(inbox) = inbox {
            let _ = inbox.try_send((self.addr, payload.to_vec()));
        }
    }
}

struct SimTransport {
    inner: ChannelTransport,
    net: Arc<Net>,
}

struct SimSocket {
    inner: Box<dyn Socket>,
    addr: SocketAddr,
    net: Arc<Net>,
}

#[async_trait]
impl Transport for SimTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        let inner = self.inner.open(listen_addr).await?;
        Ok(Box::new(SimSocket { inner, addr: listen_addr, net: self.net.clone() }))
    }
}

#[async_trait]
impl Socket for SimSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.addr)
    }

    async fn send(&mut self, to: SocketAddr, envelope: ChitchatEnvelope) -> anyhow::Result<SendOutcome> {
        // Sealing adds OVERHEAD per datagram (two datagrams past the fragment size).
        let account = |n: usize| {
            let datagrams = if n + OVERHEAD > MAX_DATAGRAM { 2 } else { 1 };
            (n + datagrams * OVERHEAD) as u64
        };
        let outcome = if self.net.delivers(self.addr, to) {
            self.inner.send(to, envelope).await?
        } else {
            // Dropped on the wire: the bytes were still sent. Estimate them as the message's size
            // through a throwaway send to nobody.
            let sink: SocketAddr = (Ipv4Addr::UNSPECIFIED, 9).into();
            self.inner.send(sink, envelope).await?
        };
        self.net.count_sent(self.addr, account(outcome.num_bytes_sent));
        Ok(outcome)
    }

    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        self.inner.recv().await
    }
}

fn addr_of(i: usize) -> SocketAddr {
    (Ipv4Addr::new(198, 18, (i >> 8) as u8, (i & 0xff) as u8), 30001).into()
}

fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("not reached".into(), |d| format!("{} ms", d.as_millis()))
}

/// Times until each node (other than the advertiser) lists the digest, polling every 10 ms.
async fn propagation(nodes: &[Gossip], from: usize, digest: Digest, max_wait: Duration) -> Vec<Duration> {
    let start = Instant::now();
    let owner = nodes[from].id();
    nodes[from].apply([ContentChange::Complete(digest)]).await;
    let mut pending: Vec<usize> = (0..nodes.len()).filter(|i| *i != from).collect();
    let mut times = Vec::new();
    while !pending.is_empty() && start.elapsed() < max_wait {
        tokio::time::sleep(Duration::from_millis(10)).await;
        pending.retain(|i| {
            // Only the advertiser counts: another node may hold a colliding fingerprint.
            if !nodes[*i].who_has(&digest).iter().any(|h| h.id == owner) {
                true
            } else {
                times.push(start.elapsed());
                false
            }
        });
    }
    times.sort();
    times
}

/// Halves cannot talk for 5 s; one side advertises; then heal. Returns how many nodes of the
/// other side saw the advertisement during the partition and how long after the heal all did.
async fn partition(nodes: &[Gossip], net: &Net, rng: &mut Rng, n: usize) -> (usize, Option<Duration>) {
    if let Ok(mut side_b) = net.side_b.lock() {
        side_b.extend((n / 2..n).map(addr_of));
    }
    net.partitioned.store(true, Ordering::Relaxed);
    let hidden = rng.digest();
    nodes[0].apply([ContentChange::Complete(hidden)]).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let owner = nodes[0].id();
    let sees = |n: &Gossip| n.who_has(&hidden).iter().any(|h| h.id == owner);
    let leaked = nodes[n / 2..].iter().filter(|n| sees(n)).count();
    net.partitioned.store(false, Ordering::Relaxed);
    let healed_at = Instant::now();
    let mut healed = None;
    while healed_at.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if nodes[1..].iter().all(sees) {
            healed = Some(healed_at.elapsed());
            break;
        }
    }
    (leaked, healed)
}

/// Runs the scenarios and returns a Markdown report. `heap_bytes` reports live heap bytes (the
/// binary installs a counting allocator).
pub async fn run(opts: SimOptions, heap_bytes: fn() -> usize) -> String {
    let net = Arc::new(Net::default());
    if let Ok(mut rng) = net.rng.lock() {
        *rng = Some(Rng::new(opts.seed ^ 0x5eed));
    }
    let transport = SimTransport { inner: ChannelTransport::with_mtu(MAX_DATAGRAM), net: net.clone() };
    let mut rng = Rng::new(opts.seed);
    let heap_before = heap_bytes();
    let wall = std::time::Instant::now();
    let mut nodes = Vec::with_capacity(opts.nodes);
    let seeds: Vec<String> = (0..opts.nodes.min(3)).map(|i| addr_of(i).to_string()).collect();
    let mut contents: Vec<Vec<Digest>> = Vec::with_capacity(opts.nodes);
    let mut counters: Vec<Arc<Counters>> = Vec::with_capacity(opts.nodes);
    for i in 0..opts.nodes {
        let mut config = GossipConfig::new(SocketAddr::new(addr_of(i).ip(), 30002), b"simulated cluster secret".to_vec());
        config.node_id = format!("n{i}");
        config.listen_addr = addr_of(i);
        config.zone = format!("z{}", i % 3);
        config.seeds = seeds.clone();
        config.gossip_interval = opts.interval;
        config.budget = opts.budget;
        let link = net.rumor_link(addr_of(i));
        counters.push(Arc::new(Counters::default()));
        let gossip = match Gossip::start_with_transport(config, &transport, counters[i].clone(), link).await {
            Ok(gossip) => gossip,
            Err(error) => return format!("node {i} failed to start: {error}\n"),
        };
        let content: Vec<Digest> = (0..opts.blobs).map(|_| rng.digest()).collect();
        gossip.set_content(content.iter().copied(), []).await;
        contents.push(content);
        nodes.push(gossip);
        // Spread start times over one interval so rounds are not in lockstep: links have no
        // latency here, which is close to real only if nodes' rounds are out of phase.
        tokio::time::sleep(opts.interval / opts.nodes as u32).await;
    }
    // Index entries each node should end up with: everyone else's blobs (random digests are
    // distinct, so each is one filter entry).
    let entries: Vec<usize> = contents.iter().map(Vec::len).collect();
    let total: usize = entries.iter().sum();

    let start = Instant::now();
    let mut membership = None;
    let mut content = None;
    while start.elapsed() < opts.max_wait && content.is_none() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if membership.is_none()
            && nodes.iter().all(|n| n.peers().iter().filter(|p| p.state == PeerState::Alive).count() == opts.nodes - 1)
        {
            membership = Some(start.elapsed());
        }
        if membership.is_some()
            && nodes.iter().enumerate().all(|(i, n)| n.index_stats().0 == total - entries[i])
        {
            content = Some(start.elapsed());
        }
    }
    let converge_wall = wall.elapsed();
    eprintln!("gossip-sim: converged after {:.0} s wall; measuring steady state", converge_wall.as_secs_f64());

    let heap_per_node = heap_bytes().saturating_sub(heap_before) / opts.nodes.max(1);
    let index_bytes = nodes.first().map_or(0, |n| n.index_stats().1);
    // Discovery: the filters held (index) plus chitchat's copy of every summary key; membership:
    // everything else in the heap per node (chitchat's other keys, failure detector, views,
    // tasks, rumors, the simulated network's queues).
    let (content_state, other_state) = match nodes.first() {
        Some(node) => node.state_bytes().await,
        None => (0, 0),
    };
    let discovery_bytes = index_bytes + content_state;
    let membership_bytes = heap_per_node.saturating_sub(discovery_bytes);

    // Steady state: nothing changes for 10 s, measured once nodes stopped catching up (a node
    // gossips unpaced for 2 s after its last large delta, `pace`).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let paced = || counters.iter().map(|c| c.paced.load(Ordering::Relaxed)).sum::<u64>();
    let (before, rumor_before, paced_before) = (net.total_sent(), net.rumor_bytes.load(Ordering::Relaxed), paced());
    let window = Duration::from_secs(10);
    // Liveness as each node sees it, sampled each second: a peer another node wrongly thinks
    // dead gets no rumors from it (rumors go to live peers).
    let mut dead_views = 0usize;
    for _ in 0..window.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for node in &nodes {
            dead_views += node.peers().iter().filter(|p| p.state != PeerState::Alive).count();
        }
    }
    let dead_views = dead_views as f64 / (window.as_secs() as usize * opts.nodes).max(1) as f64;
    let per_node_s = |bytes: u64| bytes as f64 / opts.nodes as f64 / window.as_secs_f64();
    let steady = per_node_s(net.total_sent() - before);
    let steady_rumors = per_node_s(net.rumor_bytes.load(Ordering::Relaxed) - rumor_before);
    let paced_per_s = (paced() - paced_before) as f64 / opts.nodes as f64 / window.as_secs_f64();

    let mid = opts.nodes / 2;
    let rumor_before = net.rumor_bytes.load(Ordering::Relaxed);
    let fresh = rng.digest();
    let clean = propagation(&nodes, mid, fresh, Duration::from_secs(30)).await;
    contents[mid].push(fresh);
    let rumor_cost = net.rumor_bytes.load(Ordering::Relaxed) - rumor_before;
    let lossy = if opts.quick {
        Vec::new()
    } else {
        net.loss_ppm.store((opts.loss * 1e6) as u64, Ordering::Relaxed);
        let fresh = rng.digest();
        let lossy = propagation(&nodes, mid, fresh, Duration::from_secs(30)).await;
        contents[mid].push(fresh);
        net.loss_ppm.store(0, Ordering::Relaxed);
        lossy
    };

    // False negatives once converged: random (holder, blob) pairs asked at random nodes.
    let mut false_negatives = 0usize;
    let checks = 2_000usize;
    for _ in 0..checks {
        let owner = rng.next_u64() as usize % opts.nodes;
        let at = (owner + 1 + rng.next_u64() as usize % (opts.nodes - 1).max(1)) % opts.nodes;
        let list = &contents[owner];
        let Some(digest) = list.get(rng.next_u64() as usize % list.len().max(1)) else { continue };
        let name = nodes[owner].id();
        if !nodes[at].who_has(digest).iter().any(|h| h.id == name) {
            false_negatives += 1;
        }
    }

    // A node joins the converged cluster: how long until its filters cover every blob of every
    // member, and whether it then finds them all.
    let joined_total: usize = contents.iter().map(Vec::len).sum();
    let join = {
        let i = opts.nodes;
        let mut config = GossipConfig::new(SocketAddr::new(addr_of(i).ip(), 30002), b"simulated cluster secret".to_vec());
        config.node_id = format!("n{i}");
        config.listen_addr = addr_of(i);
        config.seeds = seeds.clone();
        config.gossip_interval = opts.interval;
        config.budget = opts.budget;
        let link = net.rumor_link(addr_of(i));
        match Gossip::start_with_transport(config, &transport, Arc::new(Counters::default()), link).await {
            Ok(joiner) => {
                let started = Instant::now();
                let mut done = None;
                while started.elapsed() < Duration::from_secs(60) {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    // Complete when it holds every member's filters and sees every member
                    // alive (`who_has` lists live peers only).
                    if joiner.index_stats().0 >= joined_total
                        && joiner.peers().iter().filter(|p| p.state == PeerState::Alive).count() >= opts.nodes
                    {
                        done = Some(started.elapsed());
                        break;
                    }
                }
                let mut missed = 0usize;
                for _ in 0..checks {
                    let owner = rng.next_u64() as usize % opts.nodes;
                    let list = &contents[owner];
                    let Some(digest) = list.get(rng.next_u64() as usize % list.len().max(1)) else { continue };
                    let name = nodes[owner].id();
                    if !joiner.who_has(digest).iter().any(|h| h.id == name) {
                        missed += 1;
                    }
                }
                joiner.shutdown().await;
                (done, missed)
            }
            Err(_) => (None, checks),
        }
    };

    // Reported as soon as measured: at 1,000 nodes the partition phase alone takes many minutes
    // of wall time, and a run stopped there should not lose these.
    eprintln!(
        "gossip-sim: steady {:.1} KB/s per node ({:.1} of it rumors), paced SYNs {paced_per_s:.1}/s; propagation 50/99/100%: {} / {} / {} ({} of {} nodes), with loss: {} / {} / {} ({} nodes); heap {:.1} MB per node; live peers seen dead {dead_views:.1} per node",
        steady / 1000.0,
        steady_rumors / 1000.0,
        ms(percentile(&clean, 50.0)),
        ms(percentile(&clean, 99.0)),
        ms(clean.last().copied()),
        clean.len(),
        opts.nodes - 1,
        ms(percentile(&lossy, 50.0)),
        ms(percentile(&lossy, 99.0)),
        ms(lossy.last().copied()),
        lossy.len(),
        heap_per_node as f64 / 1e6
    );
    eprintln!("gossip-sim: propagation measured ({:.0} s wall); partition", wall.elapsed().as_secs_f64());
    // Partition: halves cannot talk for 5 s; one side advertises; then heal.
    let (leaked, healed) = if opts.quick { (0, None) } else { partition(&nodes, &net, &mut rng, opts.nodes).await };

    // Lookups on one node, real time: half hits (others' blobs), half misses.
    let mut lookups = Vec::with_capacity(20_000);
    let probe = &nodes[0];
    for i in 0..20_000usize {
        let digest = if i % 2 == 0 {
            let owner = 1 + (rng.next_u64() as usize % (opts.nodes - 1).max(1));
            let list = &contents[owner.min(opts.nodes - 1)];
            list.get(rng.next_u64() as usize % list.len().max(1)).copied().unwrap_or_else(|| rng.digest())
        } else {
            rng.digest()
        };
        let t = std::time::Instant::now();
        let holders = probe.who_has(&digest);
        lookups.push(t.elapsed());
        std::hint::black_box(holders);
    }
    lookups.sort();
    let false_positive_nodes = {
        let mut count = 0usize;
        for _ in 0..2_000 {
            count += probe.who_has(&rng.digest()).len();
        }
        count as f64 / 2_000.0
    };

    let n = opts.nodes;
    let mut out = String::new();
    let _ = writeln!(out, "gossip-sim: {n} nodes x {} blobs, gossip every {} ms, anti-entropy budget {} B/s, seed {}", opts.blobs, opts.interval.as_millis(), opts.budget, opts.seed);
    let _ = writeln!(out);
    let _ = writeln!(out, "| metric | result | target |");
    let _ = writeln!(out, "|---|---|---|");
    let _ = writeln!(out, "| membership converged (all see all alive) | {} | |", ms(membership));
    let _ = writeln!(out, "| content converged (all indexes complete) | {} | |", ms(content));
    let _ = writeln!(out, "| new advertisement reaches 50% / 99% / 100% | {} / {} / {} | p99 <= 1000 ms |", ms(percentile(&clean, 50.0)), ms(percentile(&clean, 99.0)), if clean.len() == n - 1 { ms(clean.last().copied()) } else { format!("{}/{} nodes", clean.len(), n - 1) });
    if !opts.quick {
        let _ = writeln!(out, "| same with {:.0}% packet loss | {} / {} / {} | |", opts.loss * 100.0, ms(percentile(&lossy, 50.0)), ms(percentile(&lossy, 99.0)), if lossy.len() == n - 1 { ms(lossy.last().copied()) } else { format!("{}/{} nodes", lossy.len(), n - 1) });
        let _ = writeln!(out, "| partition (halves, 5 s): other side saw it / all after heal | {leaked} nodes / {} | 0 / |", ms(healed));
    }
    let _ = writeln!(out, "| a joining node finds everything after | {} (then {} of {checks} held blobs missed) | <= 10000 ms, 0 |", ms(join.0), join.1);
    let _ = writeln!(out, "| steady state bytes sent per node (of which rumors) | {:.1} KB/s ({:.1} KB/s) | <= 20 KB/s |", steady / 1000.0, steady_rumors / 1000.0);
    let _ = writeln!(out, "| live peers a node wrongly sees dead, steady state (average) | {dead_views:.1} of {} | 0 |", n - 1);
    let _ = writeln!(out, "| SYNs held back by the {} B/s budget, per node | {paced_per_s:.1}/s | |", opts.budget);
    let _ = writeln!(out, "| rumor bytes to spread one advertisement, per node | {:.0} B | |", rumor_cost as f64 / n as f64);
    let _ = writeln!(out, "| heap per node (all state, filters, tasks) | {:.1} MB | <= 16 MB |", heap_per_node as f64 / 1e6);
    let _ = writeln!(out, "| of which discovery: filters held / chitchat's copy of the summaries | {:.2} MB / {:.2} MB | |", index_bytes as f64 / 1e6, content_state as f64 / 1e6);
    let _ = writeln!(out, "| of which membership (the rest; chitchat's other keys alone: {:.2} MB) | {:.2} MB | |", other_state as f64 / 1e6, membership_bytes as f64 / 1e6);
    let _ = writeln!(out, "| who_has p50 / p99 (20,000 lookups, half hits) | {:.2} us / {:.2} us | p99 <= 10 us |", percentile(&lookups, 50.0).unwrap_or_default().as_secs_f64() * 1e6, percentile(&lookups, 99.0).unwrap_or_default().as_secs_f64() * 1e6);
    let _ = writeln!(out, "| false-positive holders per miss (per node asked) | {false_positive_nodes:.3} ({:.4}) | ~1/256 per node |", false_positive_nodes / (n - 1).max(1) as f64);
    let _ = writeln!(out, "| false negatives once converged ({checks} held blobs at random nodes) | {false_negatives} | 0 |");
    let _ = writeln!(out, "| wall time to converge | {:.1} s | |", converge_wall.as_secs_f64());
    // For `cargo xtask bench gossip`'s growth table.
    let _ = writeln!(
        out,
        "\n<!-- figures nodes={n} blobs={} heap_mb={:.3} discovery_mb={:.3} membership_mb={:.3} steady_kbs={:.2} p50_ms={} p99_ms={} p100_ms={} join_ms={} fp_per_miss={:.4} fn={} lookup_p99_us={:.2} -->",
        opts.blobs,
        heap_per_node as f64 / 1e6,
        discovery_bytes as f64 / 1e6,
        membership_bytes as f64 / 1e6,
        steady / 1000.0,
        percentile(&clean, 50.0).map_or(-1, |d| d.as_millis() as i64),
        percentile(&clean, 99.0).map_or(-1, |d| d.as_millis() as i64),
        if clean.len() == n - 1 { clean.last().map_or(-1, |d| d.as_millis() as i64) } else { -1 },
        join.0.map_or(-1, |d| d.as_millis() as i64),
        false_positive_nodes,
        false_negatives + join.1,
        percentile(&lookups, 99.0).unwrap_or_default().as_secs_f64() * 1e6,
    );
    for node in nodes {
        node.shutdown().await;
    }
    out
}

/// Lookups alone, without chitchat: `nodes` peers' filters of `blobs` random digests each in
/// one `Index` (as a node holds them), then 20,000 lookups (half hits) timed in real time. Cheap
/// enough to measure 5,000 nodes directly, which the full simulation cannot on one machine. A
/// lower bound for `who_has`, which adds a read lock and building the `Holder`s. `vary` gives
/// each node between half and 1.5 times `blobs` (uniformly) instead of exactly `blobs`, as real
/// nodes differ: filters of more sizes, so more layout groups to probe.
pub fn lookup_bench(nodes: usize, blobs: usize, seed: u64, vary: bool) -> String {
    use peerd_agent::gossip::index::{Index, KeyView};
    use peerd_agent::gossip::summary::{self, Kind, SHARDS};
    let mut rng = Rng::new(seed);
    let mut index: Index<u32> = Index::default();
    let mut held: Vec<Digest> = Vec::new();
    let mut value_bytes = 0usize;
    for node in 0..nodes as u32 {
        let count = if vary { blobs / 2 + (rng.next_u64() as usize % (blobs + 1)) } else { blobs };
        let digests: Vec<Digest> = (0..count).map(|_| rng.digest()).collect();
        let mut values = Vec::new();
        for shard in 0..SHARDS as u8 {
            let mut keys: Vec<u64> = digests.iter().filter(|d| summary::shard_of(d) == shard).map(summary::filter_key).collect();
            keys.sort_unstable();
            keys.dedup();
            if let Ok(value) = summary::encode_shard(&keys) {
                value_bytes += value.len();
                values.push((summary::shard_key(Kind::Complete, shard), value));
            }
        }
        let views = values.iter().map(|(key, value)| KeyView { key, value, version: 1, deleted: false });
        if index.update_node(&node, 1, views).is_err() {
            break;
        }
        if let Some(d) = digests.first() {
            held.push(*d);
        }
    }
    let mut times = Vec::with_capacity(20_000);
    let mut found = 0usize;
    let mut out = Vec::new();
    for i in 0..20_000usize {
        let hit = held.get(rng.next_u64() as usize % held.len().max(1)).copied();
        let digest = match hit {
            Some(digest) if i % 2 == 0 => digest,
            _ => rng.digest(),
        };
        out.clear();
        let t = std::time::Instant::now();
        index.lookup(&digest, &mut out);
        times.push(t.elapsed());
        found += out.len();
        std::hint::black_box(&out);
    }
    times.sort();
    let us = |p: f64| percentile(&times, p).unwrap_or_default().as_secs_f64() * 1e6;
    format!(
        "lookup-bench: {nodes} nodes x {}{blobs} blobs: index lookup p50 {:.2} us, p99 {:.2} us, max {:.2} us; {} layout groups ({:.1} per shard); filters held {:.1} MB, their base64 values {:.1} MB; {:.2} holders per lookup (half hits)\n",
        if vary { "0.5-1.5 x " } else { "" },
        us(50.0),
        us(99.0),
        us(100.0),
        index.groups(),
        index.groups() as f64 / SHARDS as f64,
        index.table_bytes() as f64 / 1e6,
        value_bytes as f64 / 1e6,
        found as f64 / times.len().max(1) as f64,
    )
}

//! The cold-start swarm in one process, on a simulated clock: a blob arriving from upstream at
//! one node (the owner) or split in parts over several (`parts`, as `Coordinator::fetch_split`
//! does), every node running the real scheduler (`swarm::Download`) and every node that got
//! pieces from upstream the real hand-out (`handout::Handout`). Bytes move as fluid flows that
//! share each node's uplink and downlink max-min fairly, with a per-byte wire overhead; there is
//! no CPU, no packet, no congestion control and no disk. It shows what the scheduling achieves
//! when only the links bound the result, at cluster sizes one machine cannot run for real (bench
//! swarm-sim).
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use peerd_agent::store::Digest;
use peerd_agent::transfer::handout::Handout;
use peerd_agent::transfer::swarm::{Assignment, Download, Failure, SwarmConfig};
use peerd_agent::transfer::{Part, HANDOUT_GRACE};

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub nodes: usize,
    pub pieces: u32,
    pub piece_size: u64,
    /// Every link, both ways, and upstream's uplink, in bytes/s.
    pub rate: f64,
    /// Wire bytes per payload byte between peers (QUIC) and from upstream (TCP).
    pub peer_overhead: f64,
    pub upstream_overhead: f64,
    /// Request to first byte, and last byte to the requester's scheduler.
    pub rtt: Duration,
    /// How often a node refreshes its peers' bitfields.
    pub have_every: Duration,
    pub step: Duration,
    pub swarm: SwarmConfig,
    pub grace: Duration,
    /// Nodes fetching a part of the blob from upstream each (1: the owner fetches it all). Node
    /// j < parts fetches part j; node 0 is the owner.
    pub parts: usize,
    pub chunk_pieces: u32,
}

impl SimConfig {
    /// The bench swarm setting: 256 MiB in 1 MiB pieces over 200 Mbit/s links.
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            pieces: 256,
            piece_size: 1 << 20,
            rate: 25e6,
            peer_overhead: 1.045,
            upstream_overhead: 1.035,
            rtt: Duration::from_millis(2),
            have_every: SwarmConfig::default().have_every,
            step: Duration::from_millis(2),
            swarm: SwarmConfig::default(),
            grace: HANDOUT_GRACE,
            // The agent's split (`Mirror::fetch_split`): up to 8 parts of 16-piece chunks.
            parts: nodes.min(8),
            chunk_pieces: 16,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimResult {
    /// Seconds until each node holds the blob (node 0 is the owner).
    pub done: Vec<f64>,
    /// Seconds until upstream sent the last byte.
    pub upstream_done: f64,
    /// Pieces upstream sent (each once: the blob's piece count).
    pub upstream_pieces: u64,
    /// Bytes the owner sent to peers, as a multiple of the blob.
    pub origin_upload: f64,
    /// The part of `origin_upload` sent while the origin was still receiving the blob.
    pub origin_upload_fetching: f64,
    /// Piece transfers that delivered a piece the receiver already had.
    pub duplicates: u64,
}

struct Flow {
    src: usize,
    dst: usize,
    /// The requester's view (peer index in its download), None for the upstream flow.
    a: Option<Assignment>,
    piece: u32,
    /// Wire bytes left; the flow starts moving at `start`.
    left: f64,
    start: f64,
}

/// Link ids: node i's uplink 2i, downlink 2i+1, upstream's uplink 2n.
fn links(f: &Flow, n: usize) -> [usize; 2] {
    let up = if f.src == usize::MAX { 2 * n } else { 2 * f.src };
    [up, 2 * f.dst + 1]
}

/// Max-min fair rates (progressive filling) of the flows that are moving.
fn fair_rates(flows: &[Flow], moving: &[bool], n: usize, cap: f64) -> Vec<f64> {
    let mut rate = vec![0.0; flows.len()];
    let mut frozen: Vec<bool> = moving.iter().map(|m| !m).collect();
    let mut left = vec![cap; 2 * n + 1];
    loop {
        let mut count = vec![0usize; 2 * n + 1];
        for (i, f) in flows.iter().enumerate() {
            if !frozen[i] {
                for l in links(f, n) {
                    count[l] += 1;
                }
            }
        }
        let Some((bottleneck, share)) = (0..2 * n + 1).filter(|&l| count[l] > 0).map(|l| (l, left[l] / count[l] as f64)).min_by(|a, b| a.1.total_cmp(&b.1)) else {
            return rate;
        };
        for (i, f) in flows.iter().enumerate() {
            if !frozen[i] && links(f, n).contains(&bottleneck) {
                frozen[i] = true;
                rate[i] = share;
                for l in links(f, n) {
                    left[l] = (left[l] - share).max(0.0);
                }
            }
        }
    }
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(10, 0, (i >> 8) as u8, i as u8), 30002))
}

/// Runs until every node holds the blob (or 20 x the ideal time passes).
pub fn run(cfg: &SimConfig) -> SimResult {
    let n = cfg.nodes.max(2);
    let np = cfg.pieces as usize;
    let k = cfg.parts.clamp(1, n).min(cfg.pieces.div_ceil(cfg.chunk_pieces.max(1)).max(1) as usize);
    // Each fetching node's pieces from upstream, in the order it asks for them.
    let queue: Vec<Vec<u32>> = (0..k).map(|j| Part { index: j as u8, parts: k as u8, chunk_pieces: cfg.chunk_pieces }.chunks(cfg.pieces).flatten().collect()).collect();
    let mut fresh = vec![vec![false; np]; n];
    for (j, q) in queue.iter().enumerate() {
        for &p in q {
            fresh[j][p as usize] = true;
        }
    }
    let d = Digest::from_sha256_bytes([7; 32]);
    let t0 = Instant::now();
    let at = |t: f64| t0 + Duration::from_secs_f64(t);
    let step = cfg.step.as_secs_f64();
    let rtt = cfg.rtt.as_secs_f64();
    let piece_bytes = cfg.piece_size as f64;
    let blob = cfg.pieces as f64 * piece_bytes;
    let ideal = blob / cfg.rate;
    let mut have = vec![vec![false; np]; n];
    let mut done = vec![f64::NAN; n];
    // Every node that got pieces from upstream hands them out (`Transfer::handout`).
    let mut handouts: Vec<Handout> = (0..n).map(|_| Handout::new(cfg.grace)).collect();
    // As the agent lists sources: the owner's download has the part fetchers first (its
    // origins), everyone else's the owner first. A single owner does not download.
    let mut peers: Vec<Vec<usize>> = Vec::new();
    let mut dls: Vec<Option<Download>> = Vec::new();
    for i in 0..n {
        if i == 0 && k == 1 {
            peers.push(Vec::new());
            dls.push(None);
            continue;
        }
        let mut c = cfg.swarm.clone();
        c.seed = 0x5eed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        c.have_every = cfg.have_every;
        let mut dl = Download::new(cfg.pieces, c);
        // Nodes' polls are staggered, as real nodes' are (they start at different moments).
        dl.first_poll_at(at((i as f64 * 0.013) % cfg.have_every.as_secs_f64()));
        let list: Vec<usize> = (0..n).filter(|&j| j != i).collect();
        for _ in &list {
            dl.add_partial_peer(true);
        }
        for o in 0..if i == 0 { k - 1 } else { 1 } {
            dl.set_origin(o);
        }
        peers.push(list);
        dls.push(Some(dl));
    }
    let upstream = |j: usize, idx: usize, t: f64| Flow { src: usize::MAX, dst: j, a: None, piece: queue[j][idx], left: piece_bytes * cfg.upstream_overhead, start: t };
    let mut next_up = vec![1usize; k];
    let mut flows: Vec<Flow> = (0..k).filter(|&j| !queue[j].is_empty()).map(|j| upstream(j, 0, 0.0)).collect();
    let (mut origin_sent, mut origin_sent_fetching, mut upstream_done) = (0.0, 0.0, f64::NAN);
    let (mut duplicates, mut upstream_pieces) = (0, 0);
    let mut t = 0.0;
    while done.iter().any(|x| x.is_nan()) && t < 20.0 * ideal {
        let now = at(t);
        // A node hands out its fresh pieces while it does not hold the whole blob.
        let masking: Vec<bool> = (0..n).map(|j| j < k && done[j].is_nan()).collect();
        for i in 0..n {
            if !done[i].is_nan() {
                continue;
            }
            let Some(dl) = dls[i].as_mut() else { continue };
            // The agent's own polling decisions (`Download::bitfield_polls`).
            if let Some(asked) = dl.bitfield_polls(now) {
                for q in asked {
                    let j = peers[i][q];
                    let mut bits = have[j].clone();
                    if masking[j] {
                        handouts[j].mask(&d, addr(i), &mut bits, &fresh[j], now);
                    }
                    dl.set_have(q, bits);
                    dl.on_bitfield(q);
                }
            }
            for a in dl.expire(now) {
                flows.retain(|f| !(f.dst == i && f.a == Some(a)));
            }
            for a in dl.poll(now) {
                let j = peers[i][a.peer];
                let held = (a.first..a.first + a.count).all(|p| have[j][p as usize]);
                let given = !masking[j] || handouts[j].claim(&d, &fresh[j], addr(i), a.first, a.count, now);
                if !held || !given {
                    dl.on_failure(a, Failure::NotYet);
                    continue;
                }
                for p in a.first..a.first + a.count {
                    flows.push(Flow { src: j, dst: i, a: Some(a), piece: p, left: piece_bytes * cfg.peer_overhead, start: t + rtt / 2.0 });
                }
            }
        }
        let moving: Vec<bool> = flows.iter().map(|f| f.start <= t).collect();
        let rates = fair_rates(&flows, &moving, n, cfg.rate);
        let mut finished = Vec::new();
        for (q, f) in flows.iter_mut().enumerate() {
            let moved = rates[q] * step;
            if f.src == 0 {
                origin_sent += moved.min(f.left);
            }
            f.left -= moved;
            if f.left <= 0.0 {
                finished.push(q);
            }
        }
        for q in finished.into_iter().rev() {
            let f = flows.swap_remove(q);
            if have[f.dst][f.piece as usize] {
                duplicates += 1;
            }
            have[f.dst][f.piece as usize] = true;
            if f.src == usize::MAX {
                upstream_pieces += 1;
                let j = f.dst;
                if next_up[j] < queue[j].len() {
                    flows.push(upstream(j, next_up[j], t));
                    next_up[j] += 1;
                } else if (0..k).all(|j| next_up[j] >= queue[j].len()) && !flows.iter().any(|f| f.src == usize::MAX) {
                    upstream_done = t;
                }
                if j == 0 && next_up[0] >= queue[0].len() && origin_sent_fetching == 0.0 {
                    origin_sent_fetching = origin_sent;
                }
                // The agent's download marks what its store already holds (`HAVE_EVERY`).
                if let Some(dl) = dls[j].as_mut() {
                    dl.on_piece(f.piece);
                }
            } else if let (Some(dl), Some(a)) = (dls[f.dst].as_mut(), f.a) {
                // The last byte reaches the requester half a round trip later; close enough to
                // account at once (the next request waits for the next step anyway).
                dl.on_received(a, &[f.piece], at(t));
                dl.on_piece(f.piece);
            }
            if done[f.dst].is_nan() && have[f.dst].iter().all(|h| *h) {
                done[f.dst] = t + if f.src == usize::MAX { 0.0 } else { rtt / 2.0 };
            }
        }
        t += step;
    }
    SimResult { done, upstream_done, upstream_pieces, origin_upload: origin_sent / blob, origin_upload_fetching: origin_sent_fetching / blob, duplicates }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_nodes_finish_near_the_link_bound_and_the_origin_sends_each_piece_about_once() {
        let mut cfg = SimConfig::new(4);
        cfg.pieces = 64;
        cfg.parts = 1;
        let ideal = 64.0 * (1u64 << 20) as f64 / cfg.rate;
        let r = run(&cfg);
        assert!(r.done.iter().all(|t| t.is_finite()), "every node finishes: {:?}", r.done);
        for t in &r.done {
            assert!(*t >= ideal, "nobody beats the link: {t} vs {ideal}");
        }
        let worst = r.done.iter().cloned().fold(0.0, f64::max);
        assert!(worst < 2.0 * ideal, "the swarm is not starved: {worst} vs {ideal}");
        assert!(r.origin_upload > 1.0 && r.origin_upload < 1.5, "origin upload {}", r.origin_upload);
    }

    #[test]
    fn a_split_fetch_takes_each_piece_from_upstream_once_and_spreads_the_fresh_uploads() {
        let mut cfg = SimConfig::new(8);
        cfg.pieces = 128;
        let ideal = 128.0 * (1u64 << 20) as f64 / cfg.rate;
        let split = run(&cfg);
        assert_eq!(split.upstream_pieces, 128, "each piece leaves upstream once");
        assert!(split.done.iter().all(|t| t.is_finite() && *t >= ideal), "all finish, none beats its downlink: {:?}", split.done);
        let worst = split.done.iter().cloned().fold(0.0, f64::max);
        assert!(worst < 1.6 * ideal, "the swarm is not starved: {worst} vs {ideal}");
        cfg.parts = 1;
        let single = run(&cfg);
        assert_eq!(single.upstream_pieces, 128);
        // One owner sends every fresh piece out of its own uplink at least once; with 8 parts
        // it sends its own part's and forwards what it downloads like any node.
        assert!(single.origin_upload_fetching > 0.9, "single owner {}", single.origin_upload_fetching);
        assert!(split.origin_upload_fetching < single.origin_upload_fetching, "split {} vs single {}", split.origin_upload_fetching, single.origin_upload_fetching);
    }

    #[test]
    fn fair_rates_share_the_bottleneck_and_give_the_rest_elsewhere() {
        // Two flows from node 0's uplink (to 1 and 2), one from node 3 to node 2.
        let f = |src, dst| Flow { src, dst, a: None, piece: 0, left: 1.0, start: 0.0 };
        let flows = vec![f(0, 1), f(0, 2), f(3, 2)];
        let r = fair_rates(&flows, &[true, true, true], 4, 10.0);
        assert_eq!(r, vec![5.0, 5.0, 5.0]);
        let flows = vec![f(0, 1), f(3, 2)];
        let r = fair_rates(&flows, &[true, false], 4, 10.0);
        assert_eq!(r, vec![10.0, 0.0]);
    }
}

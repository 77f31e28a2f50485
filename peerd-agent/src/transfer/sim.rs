//! The cold-start swarm in one process, on a simulated clock: one origin receiving a blob from
//! upstream, every other node running the real scheduler (`swarm::Download`) and the origin the
//! real hand-out (`handout::Handout`). Bytes move as fluid flows that share each node's uplink
//! and downlink max-min fairly, with a per-byte wire overhead; there is no CPU, no packet, no
//! congestion control and no disk. It shows what the scheduling achieves when only the links
//! bound the result, at cluster sizes one machine cannot run for real (bench swarm-sim).
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use super::handout::Handout;
use super::swarm::{polled_on_tick, Assignment, Download, Failure, SwarmConfig};
use crate::store::Digest;

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
            have_every: super::HAVE_EVERY,
            step: Duration::from_millis(2),
            swarm: SwarmConfig::default(),
            grace: super::HANDOUT_GRACE,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimResult {
    /// Seconds until each node holds the blob (node 0 is the origin).
    pub done: Vec<f64>,
    /// Bytes the origin sent to peers, as a multiple of the blob.
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
    // The simulated origin's pieces all come from upstream.
    let all_fresh = vec![true; np];
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
    let mut handout = Handout::new(cfg.grace);
    // Node i's download lists the origin first (as the agent does), then the others.
    let mut peers: Vec<Vec<usize>> = Vec::new();
    let mut dls: Vec<Option<Download>> = vec![None];
    for i in 1..n {
        let mut c = cfg.swarm.clone();
        c.seed = 0x5eed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mut dl = Download::new(cfg.pieces, c);
        let list: Vec<usize> = std::iter::once(0).chain((1..n).filter(|&j| j != i)).collect();
        for _ in &list {
            dl.add_partial_peer(true);
        }
        dl.set_origin(0);
        peers.push(list);
        dls.push(Some(dl));
    }
    peers.insert(0, Vec::new());
    let mut flows: Vec<Flow> = vec![Flow { src: usize::MAX, dst: 0, a: None, piece: 0, left: piece_bytes * cfg.upstream_overhead, start: 0.0 }];
    let mut next_poll: Vec<f64> = (0..n).map(|i| (i as f64 * 0.013) % cfg.have_every.as_secs_f64()).collect();
    let mut tick = vec![0usize; n];
    let mut origin_sent = 0.0;
    let mut origin_sent_fetching = 0.0;
    let mut duplicates = 0;
    let mut t = 0.0;
    while done.iter().any(|x| x.is_nan()) && t < 20.0 * ideal {
        let now = at(t);
        let origin_fetching = done[0].is_nan();
        for i in 1..n {
            if !done[i].is_nan() {
                continue;
            }
            let Some(dl) = dls[i].as_mut() else { continue };
            if t >= next_poll[i] {
                next_poll[i] += cfg.have_every.as_secs_f64();
                tick[i] += 1;
                for (k, &j) in peers[i].iter().enumerate() {
                    if !polled_on_tick(peers[i].len(), k, tick[i]) {
                        continue;
                    }
                    let mut bits = have[j].clone();
                    if j == 0 && origin_fetching {
                        handout.mask(&d, addr(i), &mut bits, &all_fresh, now);
                    }
                    dl.set_have(k, bits);
                }
            }
            for a in dl.expire(now) {
                flows.retain(|f| !(f.dst == i && f.a == Some(a)));
            }
            for a in dl.poll(now) {
                let j = peers[i][a.peer];
                let held = (a.first..a.first + a.count).all(|p| have[j][p as usize]);
                let given = !(j == 0 && origin_fetching) || handout.claim(&d, &all_fresh, addr(i), a.first, a.count, now);
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
        for (k, f) in flows.iter_mut().enumerate() {
            let moved = rates[k] * step;
            if f.src == 0 {
                origin_sent += moved.min(f.left);
            }
            f.left -= moved;
            if f.left <= 0.0 {
                finished.push(k);
            }
        }
        for k in finished.into_iter().rev() {
            let f = flows.swap_remove(k);
            if f.src == usize::MAX {
                have[0][f.piece as usize] = true;
                if f.piece + 1 < cfg.pieces {
                    flows.push(Flow { src: usize::MAX, dst: 0, a: None, piece: f.piece + 1, left: piece_bytes * cfg.upstream_overhead, start: t });
                } else {
                    done[0] = t;
                    origin_sent_fetching = origin_sent;
                }
                continue;
            }
            // The last byte reaches the requester half a round trip later; close enough to
            // account at once (the next request waits for the next step anyway).
            if have[f.dst][f.piece as usize] {
                duplicates += 1;
            }
            have[f.dst][f.piece as usize] = true;
            if let (Some(dl), Some(a)) = (dls[f.dst].as_mut(), f.a) {
                dl.on_received(a, &[f.piece]);
                dl.on_piece(f.piece);
                if dl.is_complete() && done[f.dst].is_nan() {
                    done[f.dst] = t + rtt / 2.0;
                }
            }
        }
        t += step;
    }
    SimResult { done, origin_upload: origin_sent / blob, origin_upload_fetching: origin_sent_fetching / blob, duplicates }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_nodes_finish_near_the_link_bound_and_the_origin_sends_each_piece_about_once() {
        let mut cfg = SimConfig::new(4);
        cfg.pieces = 64;
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

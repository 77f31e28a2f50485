//! The origin's rule for fresh pieces, as in BitTorrent's super-seeding (BEP 16): while a blob
//! still arrives from upstream, this node's uplink is the one every other node waits on, and it
//! is only as fast as it must be to send each piece once. So each fresh piece goes to one peer:
//! it is listed first only to its designated downloader (rendezvous over the peers polling this
//! node's bitfield, so the split follows who is downloading), to all after `OFFER_FIRST` (that one
//! is slow), and the first to ask gets it. For `grace` after that, other peers neither see it in
//! this node's bitfield nor get it from here, and take it from that peer instead. After `grace`
//! (that peer died or is slow) it is offered again. Pure bookkeeping, no I/O: fed requests and
//! time.
//!
//! Why not leave it to the downloaders (each piece pulled by one node chosen by rendezvous
//! hashing, the others waiting for it): that needs the origin's uplink split evenly among the
//! downloaders, which congestion control does not do (bench swarm, N=4: one downloader's
//! requests to the origin took 1 s, another's 0.27 s), so the slow one's pieces aged past the
//! wait, were pulled by everyone, and duplicates took a fifth of the origin's upload.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::store::Digest;

pub struct Handout {
    grace: Duration,
    blobs: HashMap<Digest, Blob>,
}

/// How long a fresh piece is offered only to its designated peer before anyone may take it.
const OFFER_FIRST: Duration = Duration::from_millis(500);
/// A peer that asked for a bitfield this recently is downloading (and takes a share).
const ACTIVE: Duration = Duration::from_secs(1);

struct Blob {
    /// Who last got each piece from here, and when.
    given: Vec<Option<(SocketAddr, Instant)>>,
    /// When each piece was first in a bitfield this node answered.
    seen: Vec<Option<Instant>>,
    /// Peers downloading the blob: rendezvous key and last bitfield request.
    pollers: HashMap<SocketAddr, (u64, Instant)>,
}

/// A peer's rendezvous key for blob `d`.
fn key(d: &Digest, peer: SocketAddr) -> u64 {
    let w = super::node_weight(d, peer);
    u64::from_le_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
}

/// A rendezvous weight of (peer key, piece), for splitting pieces among peers with no
/// coordination: splitmix64's finaliser of their mix.
fn rendezvous(key: u64, piece: u32) -> u64 {
    let mut z = key ^ u64::from(piece).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl Blob {
    fn new(pieces: usize) -> Self {
        Self { given: vec![None; pieces], seen: vec![None; pieces], pollers: HashMap::new() }
    }

    fn taken_by_other(&self, piece: usize, peer: SocketAddr, now: Instant, grace: Duration) -> bool {
        self.given.get(piece).copied().flatten().is_some_and(|(to, at)| to != peer && now.duration_since(at) < grace)
    }

    /// The active downloader a fresh piece is offered to first (rendezvous: the split moves
    /// only when downloaders come or go).
    fn designated(&self, piece: usize, now: Instant) -> Option<SocketAddr> {
        self.pollers
            .iter()
            .filter(|(_, (_, at))| now.duration_since(*at) < ACTIVE)
            .max_by_key(|(a, (k, _))| (rendezvous(*k, piece as u32), **a))
            .map(|(a, _)| *a)
    }
}

impl Handout {
    pub fn new(grace: Duration) -> Self {
        Self { grace, blobs: HashMap::new() }
    }

    /// Masks `have` (this node's bitfield of `d`) for `peer`: a fresh piece (`fresh`: got from
    /// upstream here; pieces got from peers are everyone's and shown as they are) is shown first
    /// only to its designated downloader, to everyone after `OFFER_FIRST`, and to nobody but its
    /// taker for `grace` after it was sent.
    pub fn mask(&mut self, d: &Digest, peer: SocketAddr, have: &mut [bool], fresh: &[bool], now: Instant) {
        let grace = self.grace;
        let b = self.blobs.entry(*d).or_insert_with(|| Blob::new(have.len()));
        if b.seen.len() != have.len() || fresh.len() != have.len() {
            return;
        }
        b.pollers.entry(peer).or_insert_with(|| (key(d, peer), now)).1 = now;
        for (i, h) in have.iter_mut().enumerate() {
            if !*h || !fresh[i] {
                continue;
            }
            let seen = *b.seen[i].get_or_insert(now);
            let shown = match b.given[i] {
                Some((to, at)) if now.duration_since(at) < grace => to == peer,
                _ => now.duration_since(seen) >= OFFER_FIRST || b.designated(i, now).is_none_or(|p| p == peer),
            };
            *h = shown;
        }
    }

    /// Pieces `first..first + count` of `d` for `peer`: false, and nothing recorded, if another
    /// peer got any of its fresh pieces (`fresh`, one entry per piece of the blob) less than
    /// `grace` ago; otherwise its fresh pieces are recorded as given to `peer`.
    pub fn claim(&mut self, d: &Digest, fresh: &[bool], peer: SocketAddr, first: u32, count: u32, now: Instant) -> bool {
        let grace = self.grace;
        let b = self.blobs.entry(*d).or_insert_with(|| Blob::new(fresh.len()));
        let end = (first as usize + count as usize).min(b.given.len()).min(fresh.len());
        let range = (first as usize..end).filter(|&i| fresh[i]);
        if range.clone().any(|i| b.taken_by_other(i, peer, now, grace)) {
            return false;
        }
        for i in range {
            b.given[i] = Some((peer, now));
        }
        true
    }

    /// Keeps only the blobs `still` says are still arriving from upstream.
    pub fn retain(&mut self, mut still: impl FnMut(&Digest) -> bool) {
        self.blobs.retain(|d, _| still(d));
    }

    #[cfg(test)]
    pub fn tracked(&self) -> usize {
        self.blobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 30002))
    }

    fn shown(h: &mut Handout, d: &Digest, peer: SocketAddr, pieces: usize, now: Instant) -> Vec<usize> {
        let mut have = vec![true; pieces];
        h.mask(d, peer, &mut have, &vec![true; pieces], now);
        (0..pieces).filter(|&i| have[i]).collect()
    }

    #[test]
    fn fresh_pieces_are_split_among_active_downloaders_then_offered_to_all() {
        let d = Digest::from_sha256_bytes([7; 32]);
        let mut h = Handout::new(Duration::from_secs(3));
        let t0 = Instant::now();
        let n = 300;
        // Three downloaders poll; the first poll of each registers it.
        for p in 1..=3 {
            shown(&mut h, &d, addr(p), n, t0);
        }
        let t1 = t0 + Duration::from_millis(100);
        let shares: Vec<Vec<usize>> = (1..=3).map(|p| shown(&mut h, &d, addr(p), n, t1)).collect();
        // Each piece shown to exactly one of them, about a third each.
        let mut all: Vec<usize> = shares.concat();
        all.sort();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        assert!(shares.iter().all(|s| s.len() > 60 && s.len() < 140), "{:?}", shares.iter().map(Vec::len).collect::<Vec<_>>());
        // Unclaimed after OFFER_FIRST (its downloader is slow): offered to everyone.
        let later = t0 + OFFER_FIRST;
        assert_eq!(shown(&mut h, &d, addr(1), n, later).len(), n);
    }

    #[test]
    fn each_piece_goes_to_one_peer_until_the_grace_ends() {
        let d = Digest::from_sha256_bytes([7; 32]);
        let mut h = Handout::new(Duration::from_secs(3));
        let t0 = Instant::now();
        assert!(h.claim(&d, &[true; 4], addr(1), 0, 2, t0));
        // The same peer may ask again (a retry); another may not, for any piece of the run.
        assert!(h.claim(&d, &[true; 4], addr(1), 1, 1, t0));
        let t1 = t0 + Duration::from_secs(1);
        assert!(!h.claim(&d, &[true; 4], addr(2), 1, 2, t1));
        // Nothing of the refused run was recorded: piece 2 is still free.
        assert!(h.claim(&d, &[true; 4], addr(2), 2, 1, t1));
        // Bitfields hide what others got (the rest is past OFFER_FIRST by now for both).
        shown(&mut h, &d, addr(2), 4, t0);
        shown(&mut h, &d, addr(1), 4, t0);
        assert_eq!(shown(&mut h, &d, addr(2), 4, t1), vec![2, 3]);
        assert_eq!(shown(&mut h, &d, addr(1), 4, t1), vec![0, 1, 3]);
        // After the grace (the taker died or is slow) the piece is offered again.
        let later = t0 + Duration::from_secs(3);
        assert_eq!(shown(&mut h, &d, addr(3), 4, later), vec![0, 1, 2, 3].into_iter().filter(|&i| i != 2).collect::<Vec<_>>());
        assert!(h.claim(&d, &[true; 4], addr(3), 0, 1, later));
        // Runs past the end are cut, not recorded beyond it.
        assert!(h.claim(&d, &[true; 4], addr(3), 3, 5, later));
    }

    #[test]
    fn a_downloader_that_stops_polling_loses_its_share() {
        let d = Digest::from_sha256_bytes([9; 32]);
        let mut h = Handout::new(Duration::from_secs(3));
        let t0 = Instant::now();
        let n = 100;
        let mask = |h: &mut Handout, peer: u8, present: usize, t: Instant| {
            let mut have: Vec<bool> = (0..n).map(|i| i < present).collect();
            h.mask(&d, addr(peer), &mut have, &[true; 100], t);
            have.iter().filter(|b| **b).count()
        };
        // Both poll before anything arrived, then the first half arrives: split between them.
        mask(&mut h, 1, 0, t0);
        mask(&mut h, 2, 0, t0);
        let t1 = t0 + Duration::from_millis(100);
        let one = mask(&mut h, 1, 50, t1);
        let two = mask(&mut h, 2, 50, t1);
        assert_eq!(one + two, 50);
        assert!(one > 10 && two > 10, "{one} / {two}");
        // Peer 2 stops polling (it died): the second half is peer 1's alone, at once.
        let t2 = t1 + ACTIVE + Duration::from_millis(1);
        assert_eq!(mask(&mut h, 1, 100, t2), 100);
    }

    #[test]
    fn pieces_from_peers_are_shown_to_all_and_never_withheld() {
        let d = Digest::from_sha256_bytes([5; 32]);
        let mut h = Handout::new(Duration::from_secs(3));
        let t0 = Instant::now();
        // Pieces 0 and 1 came from upstream here, 2 and 3 from peers.
        let fresh = [true, true, false, false];
        let shown_to = |h: &mut Handout, peer: u8, t: Instant| {
            let mut have = vec![true; 4];
            h.mask(&d, addr(peer), &mut have, &fresh, t);
            (0..4).filter(|&i| have[i]).collect::<Vec<_>>()
        };
        shown_to(&mut h, 1, t0);
        shown_to(&mut h, 2, t0);
        let t1 = t0 + Duration::from_millis(100);
        // Fresh pieces go to one designated peer each; the others are shown to both.
        let (one, two) = (shown_to(&mut h, 1, t1), shown_to(&mut h, 2, t1));
        assert!(one.contains(&2) && one.contains(&3) && two.contains(&2) && two.contains(&3), "{one:?} {two:?}");
        assert_eq!(one.iter().chain(&two).filter(|&&i| i < 2).count(), 2, "{one:?} {two:?}");
        // A piece from peers given to one peer is still given to the next.
        assert!(h.claim(&d, &fresh, addr(1), 2, 2, t1));
        assert!(h.claim(&d, &fresh, addr(2), 2, 2, t1));
        assert_eq!(shown_to(&mut h, 2, t1 + OFFER_FIRST), vec![0, 1, 2, 3]);
        // A fresh piece is withheld from the others while its taker has it.
        assert!(h.claim(&d, &fresh, addr(1), 0, 1, t1));
        assert!(!h.claim(&d, &fresh, addr(2), 0, 1, t1));
    }

    #[test]
    fn blobs_no_longer_arriving_are_forgotten() {
        let (a, b) = (Digest::from_sha256_bytes([1; 32]), Digest::from_sha256_bytes([2; 32]));
        let mut h = Handout::new(Duration::from_secs(3));
        let t0 = Instant::now();
        assert!(h.claim(&a, &[true; 2], addr(1), 0, 1, t0));
        assert!(h.claim(&b, &[true; 2], addr(1), 0, 1, t0));
        h.retain(|d| *d == b);
        assert_eq!(h.tracked(), 1);
        assert!(h.claim(&a, &[true; 2], addr(2), 0, 1, t0), "a complete blob is an ordinary one");
    }
}

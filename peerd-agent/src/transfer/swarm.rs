//! Which piece to ask which peer for, and what to do when a peer fails: a plain state machine fed
//! events and time (no I/O), so it is tested deterministically and can drive a simulation.
//!
//! - Each peer's pieces are known from its bitfield (`set_have`; a holder of the complete blob
//!   has all). Pieces are requested rarest first, ties broken by a per-download shuffled order,
//!   in runs of up to `batch` contiguous pieces the chosen peer has, so nodes downloading
//!   together fetch different parts and serve each other (a swarm, as in BitTorrent).
//! - A download keeps `window` requests in flight, spread over the usable peers that hold any
//!   piece (at least one each): every request sharing a link delays the whole pieces others
//!   wait to forward.
//! - Each run goes to the usable peer with the fewest requests in flight, same zone first, ties
//!   spread by the per-download seed.
//! - The origin (`set_origin`: the node still receiving the blob from upstream) is the scarcest
//!   uplink: each fresh piece should leave it once. While its bitfield is incomplete it is asked
//!   only for pieces no other usable peer has, `origin_in_flight` at a time. Which downloader takes which fresh piece is the
//!   origin's decision (`handout`: it shows each downloader its share first and gives each piece
//!   once), so nothing here waits for anyone. Once the origin holds the whole blob it is an
//!   ordinary peer.
//! - A corrupt piece or a lost connection excludes the peer from this download at once; other
//!   failures (error, not found, timeout) exclude it after `max_failures`. Its pieces go back to the queue.
//! - Endgame: when nothing is left to assign and every piece exists somewhere, an idle peer
//!   duplicates an in-flight run that has taken `HEDGE_FACTOR` times as long as this download's
//!   requests typically take (at least `hedge_min`, at most `hedge_after`): a hedge against a
//!   slow or stalled peer, never onto an incomplete origin; whichever copy lands first wins.
//! - Pacing (`bitfield_polls`, `gave_up`): sources' bitfields are asked for every `have_every`
//!   (a bounded number per tick, `polled_on_tick`); when the source holding what the others lack
//!   is lost, every remaining source at once. Nothing to take for `stall` ends the download
//!   (`stall_source_lost` after such a loss, or as soon as every remaining source answered with
//!   nothing to take): the caller goes to another owner or upstream.
use std::collections::HashSet;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct SwarmConfig {
    pub batch: u32,
    pub max_in_flight_per_peer: u32,
    /// Requests in flight per download, spread over the usable peers that hold any piece (at
    /// least one each, at most `max_in_flight_per_peer`): a node with one source keeps 4 pieces coming, one with
    /// many asks each for one at a time.
    pub window: u32,
    /// Requests in flight to an origin still receiving the blob, when other peers share it.
    pub origin_in_flight: u32,
    pub request_timeout: Duration,
    pub max_failures: u32,
    /// A run in flight this long may be duplicated to an idle peer in the endgame (before any
    /// request completed, and the most the typical request time can stretch the wait to).
    pub hedge_after: Duration,
    /// The least a run waits before it is duplicated, however fast requests have been.
    pub hedge_min: Duration,
    pub seed: u64,
    /// No new requests while this many received pieces wait to be stored (writes slower than
    /// the network must not pile up pieces in memory).
    pub max_storing: u32,
    /// How often sources' bitfields are polled (`bitfield_polls`).
    pub have_every: Duration,
    /// Nothing to ask anyone for this long ends the download (`gave_up`).
    pub stall: Duration,
    /// The same after the source holding what the others lack was lost.
    pub stall_source_lost: Duration,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            // One piece per request keeps choices fine-grained: a node commits little to one
            // source and picks up pieces its peers finished a moment ago (bench swarm: batch 4
            // left nodes waiting on the single complete source).
            batch: 1,
            max_in_flight_per_peer: 4,
            // Pieces are forwarded only once whole, so every request in flight on a link makes
            // the others' pieces arrive later: swarm-sim (links only, N=4 / 8 / 16, 2 ms round
            // trips) 1.25x / 1.29x / 1.53x S/B with 4 per peer, 1.13x / 1.20x / 1.24x with one;
            // with 20 ms round trips, one each still 1.19x / 1.18x. In bench swarm (CPU-bound)
            // no difference (1.35x / 2.11x vs 1.37x / 2.13x at N=4 / 8).
            window: 4,
            // The origin's uplink is split over every request in flight there, and a fresh piece
            // is forwarded only once whole: with 4 each from 15 downloaders (bench swarm, N=16)
            // a piece took 60 piece-times to arrive. One each keeps that to N-1, and the origin
            // busy as long as there are two downloaders.
            origin_in_flight: 1,
            request_timeout: Duration::from_secs(10),
            max_failures: 2,
            // Several pieces share each link at once, so a healthy request can take a while (a
            // source serving 7 downloaders 4 pieces each took over a second at 25 MB/s); a
            // fixed shorter hedge duplicated healthy transfers (bench swarm, before the window).
            // The wait follows the requests' typical time between these bounds.
            hedge_after: Duration::from_millis(1500),
            hedge_min: Duration::from_millis(100),
            seed: 0x5eed,
            max_storing: 16,
            have_every: Duration::from_millis(100),
            // Sources that are alive but slow (an origin still receiving from upstream, peers
            // behind on a loaded node) are waited for: ending early sends the caller to another
            // owner or upstream, which fetches the blob from upstream a second time. A dead
            // source is noticed sooner (its requests fail or time out and it is excluded).
            stall: Duration::from_secs(5),
            // After the lost source every remaining peer is asked at once; this bounds the wait
            // for their answers.
            stall_source_lost: Duration::from_millis(300),
        }
    }
}

/// Whether a download polls the bitfield of its `peer`-th source (of `peers`) on poll `tick`.
/// Each node polling each peer is N^2 exchanges for N nodes: past `POLLED_EACH_TICK` peers, a
/// peer is polled every few ticks (at most `MAX_TICKS_APART`), spread over the ticks, so a node
/// makes a bounded number of polls per second at any cluster size (bench swarm, 16 nodes: 2,400
/// polls/s cluster-wide at one tick each). The first source (the origin, whose bitfield gains
/// the fresh pieces it hands out) is polled every tick.
pub fn polled_on_tick(peers: usize, peer: usize, tick: usize) -> bool {
    const POLLED_EACH_TICK: usize = 4;
    const MAX_TICKS_APART: usize = 4;
    let apart = peers.div_ceil(POLLED_EACH_TICK).clamp(1, MAX_TICKS_APART);
    peer == 0 || (tick + peer).is_multiple_of(apart)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// The peer does not have these pieces (its bitfield was stale): not held against it.
    NotYet,
    /// Bytes did not match the manifest's blake3: the peer lied or its disk is bad.
    Corrupt,
    NotFound,
    Error,
    Timeout,
    /// The connection is gone (no handshake, or it timed out): every request to the peer would
    /// fail the same way, so it is excluded at once.
    Unreachable,
}

/// A request to send: pieces `first..first+count` from `peer` (an index from `add_peer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub peer: usize,
    pub first: u32,
    pub count: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Piece {
    Missing,
    InFlight,
    /// Received, being verified and written (`on_received`); not asked for again meanwhile.
    Storing,
    Done,
}

struct Peer {
    same_zone: bool,
    /// Receiving the blob from upstream (see the module docs).
    origin: bool,
    /// `have` is all true (kept with `have`: asked for every candidate piece on every poll).
    complete: bool,
    /// `have` has any piece (only such peers share the window: a member that holds nothing of
    /// the blob is no source).
    any: bool,
    have: Vec<bool>,
    in_flight: u32,
    failures: u32,
    excluded: bool,
}

struct Flight {
    a: Assignment,
    since: Instant,
    hedged: bool,
}

pub struct Download {
    cfg: SwarmConfig,
    pieces: Vec<Piece>,
    /// Batch start indices in request order.
    order: Vec<u32>,
    peers: Vec<Peer>,
    flights: Vec<Flight>,
    done: u32,
    /// How long a request that delivered took, smoothed (EWMA, 1/4 weight per sample).
    typical: Option<Duration>,
    hedges: u32,
    /// When bitfields were last polled, and the poll count (`polled_on_tick`).
    last_poll: Option<Instant>,
    tick: usize,
    /// Sources asked for their bitfield after the lost source whose answers are still due.
    awaiting: Option<HashSet<usize>>,
    /// When any usable source last had something to take (`gave_up`).
    last_progress: Option<Instant>,
    /// Pieces whose blake3 is known (a manifest from a source still fetching from upstream has
    /// gaps): only those are asked for, so every piece stored was checked.
    known: Vec<bool>,
}

/// A run in the endgame is duplicated once it has taken this many times the typical request.
const HEDGE_FACTOR: u32 = 4;

fn shuffle(v: &mut [u32], mut seed: u64) {
    for i in (1..v.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        v.swap(i, (seed % (i as u64 + 1)) as usize);
    }
}

impl Download {
    pub fn new(pieces: u32, cfg: SwarmConfig) -> Self {
        let batch = cfg.batch.max(1);
        let mut order: Vec<u32> = (0..pieces).step_by(batch as usize).collect();
        shuffle(&mut order, cfg.seed | 1);
        let n = pieces as usize;
        Self {
            cfg,
            pieces: vec![Piece::Missing; n],
            order,
            peers: Vec::new(),
            flights: Vec::new(),
            done: 0,
            typical: None,
            hedges: 0,
            last_poll: None,
            tick: 0,
            awaiting: None,
            last_progress: None,
            known: vec![true; n],
        }
    }

    /// Which pieces' hashes are known (ignored if its length is wrong); bitfields set after
    /// this count only those pieces.
    pub fn set_known_hashes(&mut self, known: Vec<bool>) {
        if known.len() == self.pieces.len() {
            self.known = known;
        }
    }

    /// The pieces whose hashes are still unknown, when there are any (a source's manifest may
    /// fill them in).
    pub fn unknown_hashes(&self) -> Option<Vec<bool>> {
        self.known.iter().any(|k| !k).then(|| self.known.iter().map(|k| !k).collect())
    }

    /// The sources whose bitfields to ask for now, or `None` when no poll is due. A poll is due
    /// every `have_every` (the first at once), covering the sources `polled_on_tick` picks; and
    /// once, right after the source holding what the others lack was lost, every remaining
    /// source (their latest bitfields show what they got from it). Sources excluded or holding
    /// everything have nothing new to say and are skipped.
    pub fn bitfield_polls(&mut self, now: Instant) -> Option<Vec<usize>> {
        let asking = |this: &Self, tick: Option<usize>| -> Vec<usize> {
            (0..this.peers.len())
                .filter(|&i| !this.excluded(i) && !this.holds_all(i))
                .filter(|&i| tick.is_none_or(|t| polled_on_tick(this.peers.len(), i, t)))
                .collect()
        };
        if self.lost_its_sources() && self.awaiting.is_none() {
            let all = asking(self, None);
            self.awaiting = Some(all.iter().copied().collect());
            self.last_poll = Some(now);
            return Some(all);
        }
        if self.last_poll.is_some_and(|at| now.saturating_duration_since(at) < self.cfg.have_every) {
            return None;
        }
        self.last_poll = Some(now);
        let polled = asking(self, Some(self.tick));
        self.tick += 1;
        Some(polled)
    }

    /// Delays the first poll until `at` (a simulator staggers its nodes' polls this way).
    pub fn first_poll_at(&mut self, at: Instant) {
        self.last_poll = at.checked_sub(self.cfg.have_every);
    }

    /// A source answered a poll (after its `set_have`, or with nothing).
    pub fn on_bitfield(&mut self, peer: usize) {
        if let Some(w) = self.awaiting.as_mut() {
            w.remove(&peer);
        }
    }

    /// Whether the download should end for lack of anything to take: nothing for `stall`
    /// (`stall_source_lost` after the lost source), or every source asked after the lost source
    /// has answered and none has anything.
    pub fn gave_up(&mut self, now: Instant) -> bool {
        if self.can_progress() {
            self.last_progress = Some(now);
            return false;
        }
        let since = *self.last_progress.get_or_insert(now);
        let limit = if self.lost_its_sources() { self.cfg.stall_source_lost } else { self.cfg.stall };
        self.awaiting.as_ref().is_some_and(HashSet::is_empty) || now.saturating_duration_since(since) > limit
    }

    /// Ties broken in blob order instead of the shuffled one: for a download with a single
    /// source, which has no one to trade pieces with. Pieces then land in the order the blob's
    /// sha256 and a client reading the blob need them, and are taken from memory rather than
    /// read back from the file. (A windowed shuffle for every download was measured in the
    /// links-only simulation and slowed swarms of 16 nodes; see bench/RESULTS.md.)
    pub fn in_blob_order(&mut self) {
        self.order.sort_unstable();
    }

    /// Registers a peer holding the whole blob; returns its index.
    pub fn add_peer(&mut self, same_zone: bool) -> usize {
        let i = self.add_partial_peer(same_zone);
        self.peers[i].have.fill(true);
        self.peers[i].complete = true;
        self.peers[i].any = !self.pieces.is_empty();
        i
    }

    /// Registers a peer whose pieces are not known yet (see [`Download::set_have`]).
    pub fn add_partial_peer(&mut self, same_zone: bool) -> usize {
        self.peers.push(Peer { same_zone, origin: false, complete: false, any: false, have: vec![false; self.pieces.len()], in_flight: 0, failures: 0, excluded: false });
        self.peers.len() - 1
    }

    /// The peer's current bitfield (ignored if its length is wrong).
    pub fn set_have(&mut self, peer: usize, mut have: Vec<bool>) {
        if have.len() != self.pieces.len() {
            return;
        }
        for (h, k) in have.iter_mut().zip(&self.known) {
            *h &= *k;
        }
        if let Some(p) = self.peers.get_mut(peer) {
            p.complete = have.iter().all(|h| *h);
            p.any = have.iter().any(|h| *h);
            p.have = have;
        }
    }

    /// Whether `peer`'s bitfield says it holds every piece (its bitfield will not change).
    pub fn holds_all(&self, peer: usize) -> bool {
        self.peers.get(peer).is_some_and(|p| p.complete)
    }

    /// Marks `peer` as the origin: the node receiving the blob from upstream (module docs).
    pub fn set_origin(&mut self, peer: usize) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.origin = true;
        }
    }

    /// An origin still receiving the blob: asked only for what nobody else has.
    fn restricted(&self, peer: usize) -> bool {
        let p = &self.peers[peer];
        p.origin && !p.complete
    }

    /// Whether any usable peer has a piece we still miss (otherwise waiting is all we can do).
    pub fn can_progress(&self) -> bool {
        !self.flights.is_empty()
            || self.pieces.contains(&Piece::Storing)
            || self.pieces.iter().enumerate().any(|(i, p)| *p == Piece::Missing && self.peers.iter().any(|q| !q.excluded && q.have[i]))
    }

    pub fn is_complete(&self) -> bool {
        self.done as usize == self.pieces.len()
    }

    /// No piece can make progress: pieces remain and every peer is excluded.
    pub fn is_stuck(&self) -> bool {
        !self.is_complete() && self.peers.iter().all(|p| p.excluded)
    }

    /// A source that held what the others lack (a complete holder, or the origin) was excluded
    /// and no such source is left: the partial peers remaining were most likely fetching from it
    /// too, so waiting long for them to gain pieces is waiting for nothing.
    pub fn lost_its_sources(&self) -> bool {
        let key = |p: &Peer| p.complete || p.origin;
        self.peers.iter().any(|p| p.excluded && key(p)) && !self.peers.iter().any(|p| !p.excluded && key(p))
    }

    pub fn excluded(&self, peer: usize) -> bool {
        self.peers.get(peer).is_none_or(|p| p.excluded)
    }

    /// The best peer with spare capacity that has `piece`, same zone first, fewest in flight,
    /// ties spread by the seed (so the lowest index is not everyone's favourite). A restricted
    /// origin only when no other usable peer has the piece (even a busy one: then we wait).
    /// `share`: the window's share per peer (`window_share`, computed once per poll).
    fn pick(&self, piece: u32, not: Option<usize>, share: u32) -> Option<usize> {
        let holds = |i: usize| {
            let p = &self.peers[i];
            Some(i) != not && !p.excluded && p.have[piece as usize]
        };
        let others = (0..self.peers.len()).any(|i| holds(i) && !self.restricted(i));
        let seed = self.cfg.seed;
        (0..self.peers.len())
            .filter(|&i| holds(i) && self.peers[i].in_flight < self.limit(i, share))
            .filter(|&i| !(others && self.restricted(i)))
            .min_by_key(|&i| {
                let tie = (seed ^ (u64::from(piece) << 20) ^ i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32;
                (!self.peers[i].same_zone, self.peers[i].in_flight, tie, i)
            })
    }

    /// Requests `peer` may have in flight: the window's `share`, and fewer at a restricted origin
    /// that other peers share (this node is one of several downloaders).
    fn limit(&self, peer: usize, share: u32) -> u32 {
        if self.restricted(peer) && self.peers.len() > 1 {
            self.cfg.origin_in_flight.clamp(1, self.cfg.max_in_flight_per_peer.max(1))
        } else {
            share
        }
    }

    /// The window spread over the usable peers that hold any piece (1 to
    /// `max_in_flight_per_peer` each).
    fn window_share(&self) -> u32 {
        let usable = self.peers.iter().filter(|p| !p.excluded && p.any).count().max(1) as u32;
        (self.cfg.window / usable).clamp(1, self.cfg.max_in_flight_per_peer.max(1))
    }

    fn availability(&self, piece: u32) -> usize {
        self.peers.iter().filter(|p| !p.excluded && p.have[piece as usize]).count()
    }

    /// New requests to send now.
    pub fn poll(&mut self, now: Instant) -> Vec<Assignment> {
        let mut out = Vec::new();
        if self.pieces.iter().filter(|p| **p == Piece::Storing).count() >= self.cfg.max_storing as usize {
            return out;
        }
        let batch = self.cfg.batch.max(1);
        let n = self.pieces.len() as u32;
        // Rarest first; the shuffled order breaks ties (and spreads nodes over the blob).
        let mut order: Vec<(usize, u32)> = Vec::new();
        for &start in &self.order {
            let end = (start + batch).min(n);
            if let Some(first) = (start..end).find(|&i| self.pieces[i as usize] == Piece::Missing) {
                let avail = self.availability(first);
                if avail > 0 {
                    order.push((avail, start));
                }
            }
        }
        order.sort_by_key(|&(avail, _)| avail);
        let share = self.window_share();
        for (_, start) in order {
            let end = (start + batch).min(n);
            let Some(first) = (start..end).find(|&i| self.pieces[i as usize] == Piece::Missing) else { continue };
            let Some(peer) = self.pick(first, None, share) else { continue };
            let have = &self.peers[peer].have;
            let count = (first..end).take_while(|&i| self.pieces[i as usize] == Piece::Missing && have[i as usize]).count() as u32;
            for i in first..first + count {
                self.pieces[i as usize] = Piece::InFlight;
            }
            let a = Assignment { peer, first, count };
            self.peers[peer].in_flight += 1;
            self.flights.push(Flight { a, since: now, hedged: false });
            out.push(a);
        }
        // Endgame: duplicate old runs to idle peers (not while pieces are still to appear: the
        // origin is still receiving, and a long queue there is expected, not a stall).
        let all_exist = (0..n).all(|i| self.pieces[i as usize] == Piece::Done || self.availability(i) > 0);
        if !self.pieces.contains(&Piece::Missing) && all_exist {
            let hedge_after = self.hedge_wait();
            let mut i = 0;
            while i < self.flights.len() {
                let f = &self.flights[i];
                if !f.hedged && now.duration_since(f.since) >= hedge_after {
                    let orig = f.a;
                    let holds_run = |p: usize| (orig.first..orig.first + orig.count).all(|i| self.peers[p].have[i as usize]);
                    if let Some(peer) = self.pick(orig.first, Some(orig.peer), share).filter(|&p| self.peers[p].in_flight == 0 && holds_run(p) && !self.restricted(p)) {
                        self.flights[i].hedged = true;
                        self.hedges += 1;
                        let a = Assignment { peer, ..orig };
                        self.peers[peer].in_flight += 1;
                        self.flights.push(Flight { a, since: now, hedged: true });
                        out.push(a);
                    }
                }
                i += 1;
            }
        }
        out
    }

    /// How long an endgame run waits before it is duplicated: healthy requests take longer on
    /// a busy link (several pieces share it), so the wait follows what requests have taken.
    fn hedge_wait(&self) -> Duration {
        let (min, max) = (self.cfg.hedge_min, self.cfg.hedge_after.max(self.cfg.hedge_min));
        self.typical.map_or(max, |t| (t * HEDGE_FACTOR).clamp(min, max))
    }

    /// Ends `a`'s flight; when it started.
    fn end_flight(&mut self, a: Assignment) -> Option<Instant> {
        let pos = self.flights.iter().position(|f| f.a == a)?;
        let f = self.flights.swap_remove(pos);
        if let Some(p) = self.peers.get_mut(a.peer) {
            p.in_flight = p.in_flight.saturating_sub(1);
        }
        Some(f.since)
    }

    /// Piece `index` of request `a` arrived and was verified and stored.
    pub fn on_piece(&mut self, index: u32) {
        if let Some(p) = self.pieces.get_mut(index as usize) {
            if *p != Piece::Done {
                *p = Piece::Done;
                self.done += 1;
            }
        }
    }

    /// Request `a` delivered `pieces` (the rest of its run, if any, did not come): the peer is
    /// free for new requests while they are verified and stored; report each with `on_piece`
    /// or `on_unstored`.
    pub fn on_received(&mut self, a: Assignment, pieces: &[u32], now: Instant) {
        if let Some(since) = self.end_flight(a).filter(|_| !pieces.is_empty()) {
            let took = now.saturating_duration_since(since);
            self.typical = Some(self.typical.map_or(took, |t| (t * 3 + took) / 4));
        }
        for &i in pieces {
            if let Some(p) = self.pieces.get_mut(i as usize) {
                if *p == Piece::InFlight {
                    *p = Piece::Storing;
                }
            }
        }
        self.requeue(a);
    }

    /// A received piece was not stored (it did not match, or another writer had it claimed):
    /// unless stored meanwhile or in flight elsewhere, it is missing again.
    pub fn on_unstored(&mut self, index: u32) {
        let elsewhere = self.flights.iter().any(|f| f.a.first <= index && index < f.a.first + f.a.count);
        if let Some(p) = self.pieces.get_mut(index as usize) {
            if *p == Piece::Storing {
                *p = if elsewhere { Piece::InFlight } else { Piece::Missing };
            }
        }
    }

    /// `peer` sent bytes that did not match the manifest: excluded from this download.
    pub fn on_corrupt(&mut self, peer: usize) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.failures += 1;
            p.excluded = true;
        }
    }

    /// Request `a` ended (all its pieces were reported through `on_piece`, or it failed).
    pub fn on_done(&mut self, a: Assignment) {
        self.end_flight(a);
        self.requeue(a);
    }

    /// Request `a` failed; pieces it did not deliver go back to the queue.
    pub fn on_failure(&mut self, a: Assignment, why: Failure) {
        self.end_flight(a);
        if why == Failure::NotYet {
            if let Some(p) = self.peers.get_mut(a.peer) {
                for i in a.first..a.first + a.count {
                    p.have[i as usize] = false;
                }
                p.complete = false;
            }
            self.requeue(a);
            return;
        }
        if let Some(p) = self.peers.get_mut(a.peer) {
            p.failures += 1;
            if matches!(why, Failure::Corrupt | Failure::Unreachable) || p.failures >= self.cfg.max_failures {
                p.excluded = true;
            }
        }
        self.requeue(a);
    }

    /// Pieces of `a` neither done nor still in flight elsewhere become missing again.
    fn requeue(&mut self, a: Assignment) {
        for i in a.first..a.first + a.count {
            let elsewhere = self.flights.iter().any(|f| f.a.first <= i && i < f.a.first + f.a.count);
            if let Some(p) = self.pieces.get_mut(i as usize) {
                if *p == Piece::InFlight && !elsewhere {
                    *p = Piece::Missing;
                }
            }
        }
    }

    /// Requests older than the timeout: the caller cancels them; they count as failures.
    pub fn expire(&mut self, now: Instant) -> Vec<Assignment> {
        let t = self.cfg.request_timeout;
        let old: Vec<Assignment> = self.flights.iter().filter(|f| now.duration_since(f.since) >= t).map(|f| f.a).collect();
        for a in &old {
            self.on_failure(*a, Failure::Timeout);
        }
        old
    }

    /// Runs duplicated in the endgame so far.
    pub fn hedges(&self) -> u32 {
        self.hedges
    }

    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_whose_hash_is_unknown_are_not_asked_for() {
        let mut d = Download::new(4, SwarmConfig { batch: 1, window: 8, max_in_flight_per_peer: 8, ..Default::default() });
        d.set_known_hashes(vec![true, false, true, false]);
        assert_eq!(d.unknown_hashes(), Some(vec![false, true, false, true]));
        let p = d.add_partial_peer(true);
        d.set_have(p, vec![true; 4]);
        assert!(!d.holds_all(p), "pieces without a hash do not count as held");
        let mut asked: Vec<u32> = d.poll(Instant::now()).iter().map(|a| a.first).collect();
        asked.sort_unstable();
        assert_eq!(asked, vec![0, 2]);
        d.set_known_hashes(vec![true; 4]);
        assert_eq!(d.unknown_hashes(), None);
        d.set_have(p, vec![true; 4]);
        let mut more: Vec<u32> = d.poll(Instant::now()).iter().map(|a| a.first).collect();
        more.sort_unstable();
        assert_eq!(more, vec![1, 3], "asked once their hashes arrived");
    }

    #[test]
    fn bitfields_are_polled_every_interval_a_bounded_number_at_a_time() {
        let mut d = Download::new(8, SwarmConfig::default());
        for _ in 0..12 {
            d.add_partial_peer(true);
        }
        d.set_origin(0);
        let t0 = Instant::now();
        let every = d.cfg.have_every;
        let first = d.bitfield_polls(t0).expect("the first poll is at once");
        assert!(first.contains(&0), "the origin every tick: {first:?}");
        assert!(first.len() < 12, "12 sources are spread over ticks: {first:?}");
        assert_eq!(d.bitfield_polls(t0 + every / 2), None, "not before the interval");
        let mut seen: HashSet<usize> = first.into_iter().collect();
        for k in 1..=4u32 {
            let polled = d.bitfield_polls(t0 + every * k).expect("due");
            assert!(polled.contains(&0));
            seen.extend(polled);
        }
        assert_eq!(seen.len(), 12, "every source within a few ticks");
        // A source holding everything has nothing new to say.
        d.set_have(5, vec![true; 8]);
        for k in 5..=9u32 {
            assert!(!d.bitfield_polls(t0 + every * k).expect("due").contains(&5));
        }
    }

    #[test]
    fn a_download_with_nothing_to_take_gives_up_after_the_stall_bound() {
        let mut d = Download::new(4, SwarmConfig::default());
        let p = d.add_partial_peer(true);
        let t0 = Instant::now();
        let stall = d.cfg.stall;
        assert!(!d.gave_up(t0));
        assert!(!d.gave_up(t0 + stall), "a slow source is waited for");
        d.set_have(p, vec![true, false, false, false]);
        assert!(!d.gave_up(t0 + stall * 2), "something to take: progress");
        d.set_have(p, vec![false; 4]);
        assert!(!d.gave_up(t0 + stall * 2 + stall / 2));
        assert!(d.gave_up(t0 + stall * 3 + Duration::from_millis(1)), "nothing for the stall bound");
    }

    #[test]
    fn losing_the_source_polls_everyone_at_once_and_ends_when_all_answered_empty() {
        let mut d = Download::new(4, SwarmConfig::default());
        let origin = d.add_partial_peer(true);
        let (a, b) = (d.add_partial_peer(true), d.add_partial_peer(true));
        d.set_origin(origin);
        d.set_have(origin, vec![true; 4]);
        let t0 = Instant::now();
        let _ = d.bitfield_polls(t0);
        let reqs = d.poll(t0);
        assert!(reqs.iter().all(|r| r.peer == origin), "{reqs:?}");
        for r in reqs {
            d.on_failure(r, Failure::Unreachable);
        }
        assert!(d.lost_its_sources());
        let all = d.bitfield_polls(t0 + Duration::from_millis(1)).expect("at once, not at the next tick");
        assert_eq!(all.iter().copied().collect::<HashSet<_>>(), HashSet::from([a, b]));
        assert!(!d.gave_up(t0 + Duration::from_millis(2)), "answers still due");
        d.on_bitfield(a);
        assert!(!d.gave_up(t0 + Duration::from_millis(3)));
        d.on_bitfield(b);
        assert!(d.gave_up(t0 + Duration::from_millis(4)), "everyone answered, nobody has anything");
        // Had one answered with pieces, the download would go on.
        let mut e = Download::new(4, SwarmConfig::default());
        let o = e.add_partial_peer(true);
        let c = e.add_partial_peer(true);
        e.set_origin(o);
        e.set_have(o, vec![true; 4]);
        for r in e.poll(t0) {
            e.on_failure(r, Failure::Unreachable);
        }
        let _ = e.bitfield_polls(t0);
        e.set_have(c, vec![false, true, false, false]);
        e.on_bitfield(c);
        assert!(!e.gave_up(t0 + Duration::from_secs(1)));
    }

    fn cfg() -> SwarmConfig {
        SwarmConfig { batch: 2, max_in_flight_per_peer: 2, window: 64, ..Default::default() }
    }

    #[test]
    fn blob_order_asks_for_pieces_in_order() {
        let mut d = Download::new(64, SwarmConfig { batch: 1, max_in_flight_per_peer: 4, window: 4, ..Default::default() });
        d.in_blob_order();
        d.add_peer(true);
        let firsts: Vec<u32> = d.poll(Instant::now()).iter().map(|a| a.first).collect();
        assert_eq!(firsts, vec![0, 1, 2, 3]);
    }

    /// Runs a download where `behave(peer, piece)` says what a peer does; returns pieces fetched
    /// per peer.
    fn simulate(pieces: u32, peers: &[bool], behave: impl Fn(usize, u32) -> Option<Failure>) -> (Download, Vec<u32>) {
        let mut d = Download::new(pieces, cfg());
        for &z in peers {
            d.add_peer(z);
        }
        let mut served = vec![0; peers.len()];
        let now = Instant::now();
        for _ in 0..1000 {
            let reqs = d.poll(now);
            if reqs.is_empty() {
                break;
            }
            for a in reqs {
                let fail = (a.first..a.first + a.count).find_map(|i| behave(a.peer, i));
                match fail {
                    Some(f) => d.on_failure(a, f),
                    None => {
                        for i in a.first..a.first + a.count {
                            d.on_piece(i);
                        }
                        served[a.peer] += a.count;
                        d.on_done(a);
                    }
                }
            }
        }
        (d, served)
    }

    #[test]
    fn completes_and_spreads_load() {
        let (d, served) = simulate(100, &[false, false, false, false], |_, _| None);
        assert!(d.is_complete());
        assert_eq!(served.iter().sum::<u32>(), 100);
        assert!(served.iter().all(|&s| s >= 20), "load spread: {served:?}");
    }

    #[test]
    fn prefers_same_zone_until_it_is_saturated() {
        let mut d = Download::new(8, cfg());
        let far = d.add_peer(false);
        let near = d.add_peer(true);
        let a = d.poll(Instant::now());
        // batch 2, 2 in flight per peer: the near peer gets the first two runs, the far one the rest.
        assert_eq!(a.iter().map(|a| a.peer).collect::<Vec<_>>(), vec![near, near, far, far]);
    }

    #[test]
    fn liar_is_excluded_and_pieces_refetched_elsewhere() {
        let (d, served) = simulate(50, &[false, false, false], |peer, _| (peer == 1).then_some(Failure::Corrupt));
        assert!(d.is_complete());
        assert!(d.excluded(1));
        assert_eq!(served[1], 0);
        assert_eq!(served[0] + served[2], 50);
    }

    #[test]
    fn flaky_peer_is_excluded_after_repeated_errors() {
        let (d, _) = simulate(30, &[false, false], |peer, _| (peer == 0).then_some(Failure::Error));
        assert!(d.is_complete());
        assert!(d.excluded(0));
    }

    #[test]
    fn all_peers_bad_is_stuck_not_looping() {
        let (d, _) = simulate(10, &[false, false], |_, _| Some(Failure::NotFound));
        assert!(!d.is_complete());
        assert!(d.is_stuck());
    }

    #[test]
    fn partial_peers_get_only_pieces_they_have_rarest_first() {
        let mut d = Download::new(8, SwarmConfig { batch: 1, max_in_flight_per_peer: 8, window: 64, ..Default::default() });
        let seed = d.add_peer(false);
        let partial = d.add_partial_peer(false);
        d.set_have(partial, (0..8).map(|i| i < 4).collect());
        let a = d.poll(Instant::now());
        assert_eq!(a.len(), 8);
        for x in &a {
            if x.peer == partial {
                assert!(x.first < 4, "{x:?}");
            }
        }
        // Pieces 4..8 exist only at the seed: rarest, so they are requested first.
        assert!(a[..4].iter().all(|x| x.first >= 4 && x.peer == seed), "{a:?}");
    }

    #[test]
    fn stale_bitfield_is_not_a_failure() {
        let mut d = Download::new(2, SwarmConfig { batch: 2, ..Default::default() });
        let p = d.add_peer(false);
        let a = d.poll(Instant::now());
        for _ in 0..5 {
            d.on_failure(a[0], Failure::NotYet);
        }
        assert!(!d.excluded(p));
        assert!(!d.can_progress(), "the peer no longer claims the pieces");
        d.set_have(p, vec![true, true]);
        assert!(d.can_progress());
        assert_eq!(d.poll(Instant::now()).len(), 1);
    }

    #[test]
    fn timeouts_requeue_and_endgame_hedges() {
        let mut d = Download::new(2, SwarmConfig { batch: 2, max_in_flight_per_peer: 1, request_timeout: Duration::from_secs(5), hedge_after: Duration::from_millis(100), ..Default::default() });
        let a = d.add_peer(false);
        let b = d.add_peer(false);
        let t0 = Instant::now();
        let first = d.poll(t0);
        // Ties are spread by the seed: whichever got the run is the slow one.
        let slow = first[0].peer;
        let fast = if slow == a { b } else { a };
        assert_eq!(first, vec![Assignment { peer: slow, first: 0, count: 2 }]);
        // Nothing missing; the other peer is idle but the run is young: no hedge yet.
        assert!(d.poll(t0 + Duration::from_millis(50)).is_empty());
        // Old enough: hedged to the idle peer.
        let hedge = d.poll(t0 + Duration::from_millis(150));
        assert_eq!(hedge, vec![Assignment { peer: fast, first: 0, count: 2 }]);
        d.on_piece(0);
        d.on_piece(1);
        d.on_done(hedge[0]);
        assert!(d.is_complete());
        // The slow copy times out later without undoing anything.
        let expired = d.expire(t0 + Duration::from_secs(6));
        assert_eq!(expired, first);
        assert!(d.is_complete());
    }

    #[test]
    fn the_endgame_hedge_waits_as_long_as_requests_typically_take() {
        let mut d = Download::new(3, SwarmConfig { batch: 1, max_in_flight_per_peer: 1, window: 2, ..Default::default() });
        d.add_peer(false);
        d.add_peer(false);
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        let first = d.poll(t0);
        assert_eq!(first.len(), 2, "one run per peer");
        let (slow, fast) = (first[0], first[1]);
        // The fast peer answers in 10 ms, twice; the slow one never does.
        d.on_received(fast, &[fast.first], ms(10));
        d.on_piece(fast.first);
        let next = d.poll(ms(10));
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].peer, fast.peer);
        d.on_received(next[0], &[next[0].first], ms(20));
        d.on_piece(next[0].first);
        // Requests take ~10 ms here: the slow run is duplicated after hedge_min (100 ms), not
        // after hedge_after (1.5 s) as when nothing has completed yet.
        assert!(d.poll(ms(60)).is_empty(), "too young to hedge");
        let hedge = d.poll(ms(120));
        assert_eq!(hedge, vec![Assignment { peer: fast.peer, ..slow }]);
        // Slow requests stretch the wait, up to hedge_after.
        let mut d = Download::new(3, SwarmConfig { batch: 1, max_in_flight_per_peer: 1, window: 2, ..Default::default() });
        d.add_peer(false);
        d.add_peer(false);
        let first = d.poll(t0);
        let (slow, fast) = (first[0], first[1]);
        d.on_received(fast, &[fast.first], ms(300));
        d.on_piece(fast.first);
        let next = d.poll(ms(300));
        d.on_received(next[0], &[next[0].first], ms(600));
        d.on_piece(next[0].first);
        assert!(d.poll(ms(1000)).is_empty(), "4 x 300 ms not reached");
        assert_eq!(d.poll(ms(1250)), vec![Assignment { peer: fast.peer, ..slow }]);
    }

    #[test]
    fn losing_the_only_complete_source_is_noticed() {
        let mut d = Download::new(4, SwarmConfig { batch: 1, window: 4, max_failures: 5, ..Default::default() });
        let full = d.add_peer(true);
        let partial = d.add_partial_peer(true);
        d.set_have(partial, vec![true, false, false, false]);
        assert!(!d.lost_its_sources());
        let now = Instant::now();
        let asked = d.poll(now);
        // An ordinary error is not a loss; an unreachable peer is excluded at once.
        let to_full: Vec<_> = asked.iter().filter(|a| a.peer == full).copied().collect();
        assert!(to_full.len() >= 2, "{asked:?}");
        d.on_failure(to_full[0], Failure::Error);
        assert!(!d.excluded(full) && !d.lost_its_sources());
        d.on_failure(to_full[1], Failure::Unreachable);
        assert!(d.excluded(full) && d.lost_its_sources());
        // A partial peer that turns out complete is a source again.
        d.set_have(partial, vec![true; 4]);
        assert!(!d.lost_its_sources());
    }

    #[test]
    fn timeout_makes_pieces_missing_again() {
        let mut d = Download::new(4, SwarmConfig { batch: 4, max_in_flight_per_peer: 1, request_timeout: Duration::from_secs(1), ..Default::default() });
        let p0 = d.add_peer(false);
        let t0 = Instant::now();
        let a = d.poll(t0);
        assert_eq!(a.len(), 1);
        assert_eq!(d.expire(t0 + Duration::from_secs(2)).len(), 1);
        let p1 = d.add_peer(false);
        let again = d.poll(t0 + Duration::from_secs(2));
        assert_eq!(again.len(), 1);
        assert!(again[0].peer == p1 || again[0].peer == p0);
        assert_eq!((again[0].first, again[0].count), (0, 4));
    }

    #[test]
    fn incomplete_origin_serves_only_what_nobody_else_has() {
        let mut d = Download::new(4, SwarmConfig { batch: 1, max_in_flight_per_peer: 8, window: 64, origin_in_flight: 2, ..Default::default() });
        let origin = d.add_partial_peer(false);
        let peer = d.add_partial_peer(false);
        d.set_origin(origin);
        let t0 = Instant::now();
        d.set_have(origin, vec![true, true, true, false]);
        d.set_have(peer, vec![true, false, false, false]);
        let a = d.poll(t0);
        // Piece 0 is at a peer too: never from the origin. 1 and 2 only the origin has.
        for x in &a {
            assert_eq!(x.peer, if x.first == 0 { peer } else { origin }, "{a:?}");
        }
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn incomplete_origin_gets_origin_in_flight_requests_unless_it_is_the_only_peer() {
        let cfg = SwarmConfig { batch: 1, max_in_flight_per_peer: 4, window: 64, origin_in_flight: 1, ..Default::default() };
        let t0 = Instant::now();
        let mut d = Download::new(8, cfg.clone());
        let origin = d.add_partial_peer(false);
        let peer = d.add_partial_peer(false);
        d.set_origin(origin);
        d.set_have(origin, vec![true; 4].into_iter().chain(vec![false; 4]).collect());
        d.set_have(peer, vec![false; 8]);
        let a = d.poll(t0);
        assert_eq!(a.len(), 1, "one request at a time to a shared incomplete origin: {a:?}");
        // Once it holds the whole blob it is an ordinary peer.
        d.set_have(origin, vec![true; 8]);
        assert_eq!(d.poll(t0).len(), 3, "up to max_in_flight_per_peer");
        // The only peer: nobody shares its uplink with this node.
        let mut d = Download::new(8, cfg);
        let origin = d.add_partial_peer(false);
        d.set_origin(origin);
        d.set_have(origin, vec![true; 4].into_iter().chain(vec![false; 4]).collect());
        assert_eq!(d.poll(t0).len(), 4);
    }

    #[test]
    fn bitfield_polls_are_bounded_per_tick_and_the_origin_is_polled_every_tick() {
        for peers in [1usize, 3, 4, 7, 15, 100] {
            let apart = peers.div_ceil(4).clamp(1, 4);
            for tick in 0..8 {
                assert!(polled_on_tick(peers, 0, tick));
                let polled = (0..peers).filter(|&p| polled_on_tick(peers, p, tick)).count();
                assert!(polled <= 1 + peers.div_ceil(apart), "{peers} peers, tick {tick}: {polled}");
            }
            // Every peer is polled within `apart` ticks.
            for p in 0..peers {
                assert!((0..apart).any(|t| polled_on_tick(peers, p, t)), "{peers} peers: peer {p}");
            }
        }
    }

    #[test]
    fn the_window_is_spread_over_the_peers_one_request_each_at_least() {
        let t0 = Instant::now();
        let cfg = SwarmConfig { batch: 1, max_in_flight_per_peer: 4, window: 4, ..Default::default() };
        for (peers, each) in [(1, 4), (2, 2), (4, 1), (8, 1)] {
            let mut d = Download::new(64, cfg.clone());
            for _ in 0..peers {
                d.add_peer(false);
            }
            let a = d.poll(t0);
            assert_eq!(a.len(), peers * each, "{peers} peers: {each} each: {a:?}");
            for p in 0..peers {
                assert_eq!(a.iter().filter(|x| x.peer == p).count(), each);
            }
        }
        // Members that hold nothing of the blob do not take a share: one holder among eight
        // members still gets the whole window.
        let mut d = Download::new(64, cfg);
        let holder = d.add_peer(false);
        for _ in 0..7 {
            d.add_partial_peer(false);
        }
        let a = d.poll(t0);
        assert_eq!(a.len(), 4, "{a:?}");
        assert!(a.iter().all(|x| x.peer == holder));
    }

    #[test]
    fn busy_peer_is_waited_for_rather_than_asking_the_origin() {
        let mut d = Download::new(3, SwarmConfig { batch: 1, max_in_flight_per_peer: 1, ..Default::default() });
        let origin = d.add_partial_peer(false);
        let peer = d.add_partial_peer(false);
        d.set_origin(origin);
        let t0 = Instant::now();
        d.set_have(origin, vec![true, true, false]);
        d.set_have(peer, vec![true, true, false]);
        let a = d.poll(t0);
        assert_eq!(a.len(), 1, "one slot at the peer, none at the origin: {a:?}");
        assert_eq!(a[0].peer, peer);
        // Once the origin holds everything it is an ordinary peer.
        d.set_have(origin, vec![true; 3]);
        let b = d.poll(t0);
        assert!(b.iter().all(|x| x.peer == origin) && !b.is_empty(), "{b:?}");
    }

    #[test]
    fn complete_origin_may_be_hedged_to_but_not_an_incomplete_one() {
        let cfg = SwarmConfig { batch: 1, max_in_flight_per_peer: 1, hedge_after: Duration::from_millis(100), ..Default::default() };
        let mut d = Download::new(1, cfg);
        let origin = d.add_partial_peer(false);
        let peer = d.add_partial_peer(false);
        d.set_origin(origin);
        let t0 = Instant::now();
        d.set_have(origin, vec![true]);
        d.set_have(peer, vec![true]);
        let a = d.poll(t0);
        assert_eq!(a, vec![Assignment { peer, first: 0, count: 1 }]);
        // The origin is complete (it holds the one piece), so in the endgame it hedges.
        assert_eq!(d.poll(t0 + Duration::from_millis(200)), vec![Assignment { peer: origin, first: 0, count: 1 }]);
        let mut d = Download::new(2, SwarmConfig { batch: 1, max_in_flight_per_peer: 1, hedge_after: Duration::from_millis(100), ..Default::default() });
        let origin = d.add_partial_peer(false);
        let peer = d.add_partial_peer(false);
        d.set_origin(origin);
        d.set_have(origin, vec![true, false]);
        d.set_have(peer, vec![true, false]);
        assert_eq!(d.poll(t0).len(), 1);
        // Piece 1 exists nowhere yet: not the endgame, no hedge.
        assert!(d.poll(t0 + Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn received_pieces_are_not_asked_again_while_stored() {
        let mut d = Download::new(3, SwarmConfig { batch: 1, max_in_flight_per_peer: 1, max_storing: 2, ..Default::default() });
        let p = d.add_peer(false);
        let t0 = Instant::now();
        let a = d.poll(t0);
        assert_eq!(a.len(), 1);
        d.on_received(a[0], &[a[0].first], Instant::now());
        // The peer is free again; the stored piece is not asked again.
        let b = d.poll(t0);
        assert_eq!(b.len(), 1);
        assert_ne!(b[0].first, a[0].first);
        assert!(d.can_progress());
        d.on_received(b[0], &[b[0].first], Instant::now());
        // Two pieces waiting for the disk: no more requests.
        assert!(d.poll(t0).is_empty());
        // One did not match: missing again (and its sender is out).
        d.on_corrupt(p);
        d.on_unstored(a[0].first);
        d.on_piece(b[0].first);
        assert!(d.is_stuck());
        let q = d.add_peer(false);
        let c = d.poll(t0);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].peer, q);
        assert!(c[0].first != b[0].first);
    }

    #[test]
    fn complete_peers_are_recognised() {
        let mut d = Download::new(2, SwarmConfig::default());
        let p = d.add_partial_peer(false);
        assert!(!d.holds_all(p));
        d.set_have(p, vec![true, true]);
        assert!(d.holds_all(p));
        d.on_failure(Assignment { peer: p, first: 1, count: 1 }, Failure::NotYet);
        assert!(!d.holds_all(p), "a stale bitfield is corrected");
    }
}

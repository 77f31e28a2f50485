//! Rumors: small content changes pushed to a few random live peers each round (sans-IO).
//!
//! chitchat's anti-entropy sends every member's digest in each exchange, so at 1,000 nodes it is
//! paced by a byte budget (`pace`) and brings a change to everyone only after several seconds.
//! A new advertisement must reach the cluster in well under a second, so a node's small content
//! changes are also pushed as rumors, the way memberlist piggybacks its broadcasts: each round
//! (the gossip interval) the node sends its hot rumors to `FANOUT` random live peers; a receiver
//! that learns something new forwards it the same way; every node sends a rumor
//! `RETRANSMIT_MULT x ceil(log10(members + 1))` times, then forgets it. Nothing is sent when
//! nothing changed, so rumors cost no steady-state bandwidth.
//!
//! A receiver keeps rumored changes in an [`Overlay`] over the index until chitchat's state for
//! the origin reaches the version the rumor names (the origin's chitchat `max_version` right
//! after it wrote the change); from then the index has it and the overlay entry goes. Anything a
//! rumor misses (loss, partition, a bulk change too large to rumor) still arrives by
//! anti-entropy. Wire format in PROTOCOL.md.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use chitchat::ChitchatId;
use tokio::time::Instant;

use super::index::Slot;
use super::rng::Rng;
use super::summary::{ContentChange, Digest, Kind};

/// Largest rumor datagram payload (before sealing): stays under any path MTU.
pub const MAX_PAYLOAD: usize = 1_200;
/// Peers each round's rumors go to.
pub const FANOUT: usize = 3;
/// Changes published at once beyond which they are left to anti-entropy (a node's initial
/// content, a bulk eviction): rumors are for the trickle of single blobs. The local content
/// tracks exactly as many.
pub const MAX_PUBLISH: usize = super::summary::MAX_TRACKED_CHANGES;
const FORMAT_V1: u8 = 1;
/// Changes per rumor, so one rumor always fits a datagram (16 x 33 bytes + header).
const MAX_CHANGES: usize = 16;
const RETRANSMIT_MULT: u32 = 3;
/// Rumors waiting to be sent; past this the oldest is dropped (anti-entropy still delivers it).
const MAX_HOT: usize = 1_024;
/// Overlay entries kept; past this new rumors are not recorded (counted).
const MAX_OVERLAY: usize = 65_536;
/// An overlay entry whose origin never caught up in chitchat (it died) is dropped after this.
const OVERLAY_TTL: Duration = Duration::from_secs(300);

/// Why a rumor datagram was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RumorError {
    #[error("rumor datagram truncated")]
    Truncated,
    #[error("unknown rumor format {0}")]
    UnknownFormat(u8),
    #[error("bad field in rumor: {0}")]
    Malformed(&'static str),
}

/// One origin's batch of changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rumor {
    pub origin: ChitchatId,
    /// Per origin generation, increasing: orders two changes of one digest.
    pub seq: u64,
    /// The origin's chitchat max version once it had written these changes.
    pub version: u64,
    pub changes: Vec<ContentChange>,
}

/// Counters, read by the agent's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RumorCounters {
    pub published: u64,
    /// Changes too many to rumor at once (left to anti-entropy).
    pub bulk_skipped: u64,
    pub received_new: u64,
    /// Already known, or older than what chitchat has.
    pub received_stale: u64,
    pub undecodable: u64,
    pub datagrams_sent: u64,
    /// Hot rumors dropped because the queue was full.
    pub hot_overflow: u64,
    /// Changes not recorded because the overlay was full.
    pub overlay_full: u64,
}

struct Hot {
    encoded: Vec<u8>,
    sends_left: u32,
}

/// The rumor state machine of one node: fed its own changes, received datagrams and ticks.
pub struct Rumors {
    me: ChitchatId,
    next_seq: u64,
    hot: VecDeque<Hot>,
    overlay: Overlay,
    rng: Rng,
    pub counters: RumorCounters,
}

impl Rumors {
    pub fn new(me: ChitchatId, seed: u64) -> Self {
        Self {
            me,
            next_seq: 1,
            hot: VecDeque::new(),
            overlay: Overlay::default(),
            rng: Rng::new(seed),
            counters: RumorCounters::default(),
        }
    }

    /// Queues this node's own changes, written to chitchat as of `version`. `members` (live
    /// nodes known) sets how often each rumor is sent.
    pub fn publish(&mut self, changes: &[ContentChange], version: u64, members: usize) {
        if changes.is_empty() {
            return;
        }
        if changes.len() > MAX_PUBLISH {
            self.counters.bulk_skipped += changes.len() as u64;
            return;
        }
        for chunk in changes.chunks(MAX_CHANGES) {
            let rumor = Rumor { origin: self.me.clone(), seq: self.next_seq, version, changes: chunk.to_vec() };
            self.next_seq += 1;
            self.counters.published += 1;
            self.queue(&rumor, members);
        }
    }

    fn queue(&mut self, rumor: &Rumor, members: usize) {
        if self.hot.len() >= MAX_HOT {
            self.hot.pop_front();
            self.counters.hot_overflow += 1;
        }
        let mut encoded = Vec::new();
        encode_rumor(rumor, &mut encoded);
        self.hot.push_back(Hot { encoded, sends_left: transmissions(members) });
    }

    /// Takes a received datagram: records what is new in the overlay and queues it to be
    /// forwarded. `known_version` is chitchat's max version for a node, if it knows the node.
    /// Returns how many changes were new.
    pub fn receive(
        &mut self,
        datagram: &[u8],
        now: Instant,
        members: usize,
        known_version: impl Fn(&ChitchatId) -> Option<u64>,
    ) -> Result<usize, RumorError> {
        let rumors = match decode(datagram) {
            Ok(rumors) => rumors,
            Err(error) => {
                self.counters.undecodable += 1;
                return Err(error);
            }
        };
        let mut fresh = 0;
        for rumor in rumors {
            if rumor.origin == self.me || known_version(&rumor.origin).is_some_and(|v| v >= rumor.version) {
                self.counters.received_stale += 1;
                continue;
            }
            let mut new_here = 0;
            for change in &rumor.changes {
                match self.overlay.record(&rumor, *change, now) {
                    Recorded::New => new_here += 1,
                    Recorded::Known => {}
                    Recorded::Full => self.counters.overlay_full += 1,
                }
            }
            if new_here == 0 {
                self.counters.received_stale += 1;
                continue;
            }
            self.counters.received_new += 1;
            fresh += new_here;
            self.queue(&rumor, members);
        }
        Ok(fresh)
    }

    /// The datagrams to send this round: hot rumors (those sent least first) to `FANOUT`
    /// distinct random peers, one datagram each. Empty when nothing is hot.
    pub fn poll_transmit(&mut self, peers: &[SocketAddr]) -> Vec<(SocketAddr, Vec<u8>)> {
        if self.hot.is_empty() || peers.is_empty() {
            return Vec::new();
        }
        let mut chosen: Vec<SocketAddr> = peers.to_vec();
        let k = FANOUT.min(chosen.len());
        for i in 0..k {
            let j = i + (self.rng.next_u64() % (chosen.len() - i) as u64) as usize;
            chosen.swap(i, j);
        }
        chosen.truncate(k);
        // Freshest (most sends left) first, so a backlog never starves new changes.
        self.hot.make_contiguous().sort_by_key(|hot| std::cmp::Reverse(hot.sends_left));
        let mut out = Vec::with_capacity(k);
        for peer in chosen {
            let mut datagram = vec![FORMAT_V1, 0];
            for hot in self.hot.iter_mut() {
                if hot.sends_left == 0 || datagram[1] == u8::MAX {
                    continue;
                }
                if datagram.len() + hot.encoded.len() > MAX_PAYLOAD {
                    break;
                }
                datagram.extend_from_slice(&hot.encoded);
                datagram[1] += 1;
                hot.sends_left -= 1;
            }
            if datagram[1] > 0 {
                self.counters.datagrams_sent += 1;
                out.push((peer, datagram));
            }
        }
        self.hot.retain(|hot| hot.sends_left > 0);
        out
    }

    /// Drops overlay entries chitchat has caught up with (or too old).
    pub fn prune(&mut self, now: Instant, known_version: impl Fn(&ChitchatId) -> Option<u64>) {
        self.overlay.prune(now, known_version);
    }

    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    pub fn hot_len(&self) -> usize {
        self.hot.len()
    }
}

/// memberlist's retransmit rule: enough sends that a rumor reaches all but a vanishing fraction
/// of `members` nodes (each node forwards it this many times).
fn transmissions(members: usize) -> u32 {
    let scale = ((members + 1) as f64).log10().ceil().max(1.0) as u32;
    RETRANSMIT_MULT * scale
}

enum Recorded {
    New,
    Known,
    Full,
}

/// Rumored changes not yet in the index, by digest.
#[derive(Default)]
pub struct Overlay {
    by_digest: HashMap<Digest, Vec<Entry>>,
    len: usize,
}

struct Entry {
    origin: ChitchatId,
    seq: u64,
    version: u64,
    held: Option<Kind>,
    at: Instant,
}

impl Overlay {
    fn record(&mut self, rumor: &Rumor, change: ContentChange, now: Instant) -> Recorded {
        let (digest, held) = match change {
            ContentChange::Complete(d) => (d, Some(Kind::Complete)),
            ContentChange::Partial(d) => (d, Some(Kind::Partial)),
            ContentChange::Removed(d) => (d, None),
        };
        let entries = self.by_digest.entry(digest).or_default();
        if let Some(entry) = entries.iter_mut().find(|e| e.origin == rumor.origin) {
            if entry.seq >= rumor.seq {
                return Recorded::Known;
            }
            *entry = Entry { origin: rumor.origin.clone(), seq: rumor.seq, version: rumor.version, held, at: now };
            return Recorded::New;
        }
        if self.len >= MAX_OVERLAY {
            if entries.is_empty() {
                self.by_digest.remove(&digest);
            }
            return Recorded::Full;
        }
        entries.push(Entry { origin: rumor.origin.clone(), seq: rumor.seq, version: rumor.version, held, at: now });
        self.len += 1;
        Recorded::New
    }

    /// Corrects the index's holders of `digest` (slot, kind) with rumored changes: a removal
    /// drops the origin, an addition adds it or updates its kind. Origins the index does not know
    /// (`slot_of` is `None`: chitchat has not met them, so their address is unknown) are skipped.
    pub fn adjust(
        &self,
        digest: &Digest,
        holders: &mut Vec<(Slot, Kind)>,
        slot_of: impl Fn(&ChitchatId) -> Option<Slot>,
    ) {
        let Some(entries) = self.by_digest.get(digest) else { return };
        for entry in entries {
            let Some(slot) = slot_of(&entry.origin) else { continue };
            holders.retain(|(s, _)| *s != slot);
            if let Some(kind) = entry.held {
                holders.push((slot, kind));
            }
        }
    }

    fn prune(&mut self, now: Instant, known_version: impl Fn(&ChitchatId) -> Option<u64>) {
        let mut removed = 0;
        self.by_digest.retain(|_, entries| {
            let before = entries.len();
            entries.retain(|e| {
                now.duration_since(e.at) < OVERLAY_TTL && known_version(&e.origin).is_none_or(|v| v < e.version)
            });
            removed += before - entries.len();
            !entries.is_empty()
        });
        self.len -= removed;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

fn encode_rumor(rumor: &Rumor, out: &mut Vec<u8>) {
    let id = rumor.origin.node_id.as_bytes();
    let id = &id[..id.len().min(u8::MAX as usize)];
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(&rumor.origin.generation_id.to_be_bytes());
    let addr = rumor.origin.gossip_advertise_addr;
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
    out.extend_from_slice(&rumor.seq.to_be_bytes());
    out.extend_from_slice(&rumor.version.to_be_bytes());
    out.push(rumor.changes.len() as u8);
    for change in &rumor.changes {
        let (op, digest) = match change {
            ContentChange::Complete(d) => (0u8, d),
            ContentChange::Partial(d) => (1, d),
            ContentChange::Removed(d) => (2, d),
        };
        out.push(op);
        out.extend_from_slice(digest.as_bytes());
    }
}

/// Encodes rumors as one datagram payload (tests and tools; the engine packs its own).
pub fn encode(rumors: &[Rumor]) -> Vec<u8> {
    let mut out = vec![FORMAT_V1, rumors.len().min(u8::MAX as usize) as u8];
    for rumor in rumors.iter().take(u8::MAX as usize) {
        encode_rumor(rumor, &mut out);
    }
    out
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RumorError> {
        if self.0.len() < n {
            return Err(RumorError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, RumorError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, RumorError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, RumorError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(b))
    }
}

/// Decodes a datagram payload; all or nothing.
pub fn decode(datagram: &[u8]) -> Result<Vec<Rumor>, RumorError> {
    let mut r = Reader(datagram);
    let format = r.u8()?;
    if format != FORMAT_V1 {
        return Err(RumorError::UnknownFormat(format));
    }
    let count = r.u8()?;
    let mut rumors = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let id_len = r.u8()? as usize;
        let node_id = std::str::from_utf8(r.take(id_len)?).map_err(|_| RumorError::Malformed("node id"))?;
        let generation = r.u64()?;
        let ip: IpAddr = match r.u8()? {
            4 => <[u8; 4]>::try_from(r.take(4)?).map_err(|_| RumorError::Truncated)?.into(),
            6 => <[u8; 16]>::try_from(r.take(16)?).map_err(|_| RumorError::Truncated)?.into(),
            _ => return Err(RumorError::Malformed("address family")),
        };
        let port = r.u16()?;
        let seq = r.u64()?;
        let version = r.u64()?;
        let n = r.u8()? as usize;
        if n == 0 || n > MAX_CHANGES {
            return Err(RumorError::Malformed("change count"));
        }
        let mut changes = Vec::with_capacity(n);
        for _ in 0..n {
            let op = r.u8()?;
            let mut raw = [0u8; 32];
            raw.copy_from_slice(r.take(32)?);
            let digest = Digest::from_sha256_bytes(raw);
            changes.push(match op {
                0 => ContentChange::Complete(digest),
                1 => ContentChange::Partial(digest),
                2 => ContentChange::Removed(digest),
                _ => return Err(RumorError::Malformed("change op")),
            });
        }
        let origin = ChitchatId::new(node_id.to_string(), generation, SocketAddr::new(ip, port));
        rumors.push(Rumor { origin, seq, version, changes });
    }
    if !r.0.is_empty() {
        return Err(RumorError::Malformed("trailing bytes"));
    }
    Ok(rumors)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> ChitchatId {
        ChitchatId::new(format!("node-{n}"), 1_700_000_000_000 + n as u64, ([10, 0, 0, n], 30001).into())
    }

    fn addr(n: u8) -> SocketAddr {
        ([10, 0, 0, n], 30001).into()
    }

    fn slot_of(id: &ChitchatId) -> Option<Slot> {
        id.node_id.strip_prefix("node-").and_then(|n| n.parse().ok())
    }

    #[test]
    fn codec_round_trips_and_rejects_damage() {
        let rumors = vec![
            Rumor { origin: id(1), seq: 7, version: 42, changes: vec![ContentChange::Complete(Digest::from_sha256_bytes([1; 32])), ContentChange::Removed(Digest::from_sha256_bytes([2; 32]))] },
            Rumor {
                origin: ChitchatId::new("v6", 3, "[fd00::1]:30001".parse().unwrap()),
                seq: 1,
                version: 3,
                changes: vec![ContentChange::Partial(Digest::from_sha256_bytes([3; 32]))],
            },
        ];
        let bytes = encode(&rumors);
        assert_eq!(decode(&bytes).unwrap(), rumors);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "a datagram cut at {cut} decoded");
        }
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(RumorError::Malformed("trailing bytes")));
        let mut format = bytes.clone();
        format[0] = 9;
        assert_eq!(decode(&format), Err(RumorError::UnknownFormat(9)));
        let mut op = bytes;
        let first_op = 2 + 1 + 6 + 8 + 1 + 4 + 2 + 8 + 8 + 1;
        op[first_op] = 7;
        assert_eq!(decode(&op), Err(RumorError::Malformed("change op")));
    }

    #[test]
    fn nothing_is_sent_in_steady_state() {
        let mut a = Rumors::new(id(1), 1);
        assert!(a.poll_transmit(&[addr(2), addr(3)]).is_empty());
        a.publish(&[], 5, 10);
        assert!(a.poll_transmit(&[addr(2), addr(3)]).is_empty());
    }

    #[test]
    fn a_rumor_goes_to_fanout_distinct_peers_and_expires() {
        let mut a = Rumors::new(id(1), 1);
        a.publish(&[ContentChange::Complete(Digest::from_sha256_bytes([9; 32]))], 5, 8);
        let peers: Vec<SocketAddr> = (2..12).map(addr).collect();
        let mut sends = 0;
        for _ in 0..10 {
            let out = a.poll_transmit(&peers);
            let mut to: Vec<SocketAddr> = out.iter().map(|(p, _)| *p).collect();
            to.sort();
            to.dedup();
            assert_eq!(to.len(), out.len(), "one datagram per peer per round");
            assert!(out.len() <= FANOUT);
            sends += out.len();
        }
        assert_eq!(sends as u32, transmissions(8));
        assert_eq!(a.hot_len(), 0);
    }

    #[test]
    fn receivers_record_forward_once_and_ignore_stale() {
        let now = Instant::now();
        let mut a = Rumors::new(id(1), 1);
        a.publish(&[ContentChange::Complete(Digest::from_sha256_bytes([9; 32]))], 5, 100);
        let datagram = a.poll_transmit(&[addr(2)]).remove(0).1;
        let mut b = Rumors::new(id(2), 2);
        assert_eq!(b.receive(&datagram, now, 100, |_| Some(4)), Ok(1));
        let mut holders = Vec::new();
        b.overlay().adjust(&Digest::from_sha256_bytes([9; 32]), &mut holders, slot_of);
        assert_eq!(holders, vec![(1, Kind::Complete)]);
        // Forwarded, once.
        assert_eq!(b.hot_len(), 1);
        assert_eq!(b.receive(&datagram, now, 100, |_| Some(4)), Ok(0));
        assert_eq!(b.hot_len(), 1);
        // A node whose chitchat already has version 5 of the origin ignores it.
        let mut c = Rumors::new(id(3), 3);
        assert_eq!(c.receive(&datagram, now, 100, |_| Some(5)), Ok(0));
        assert!(c.overlay().is_empty());
        assert_eq!(c.hot_len(), 0);
        // Its own rumor coming back is ignored too.
        assert_eq!(a.receive(&datagram, now, 100, |_| None), Ok(0));
    }

    #[test]
    fn later_changes_win_and_chitchat_catching_up_clears_the_overlay() {
        let now = Instant::now();
        let mut a = Rumors::new(id(1), 1);
        let mut b = Rumors::new(id(2), 2);
        let d = Digest::from_sha256_bytes([7u8; 32]);
        a.publish(&[ContentChange::Partial(d)], 10, 4);
        let first = a.poll_transmit(&[addr(2)]).remove(0).1;
        a.publish(&[ContentChange::Complete(d)], 11, 4);
        a.publish(&[ContentChange::Removed(d)], 12, 4);
        let later = a.poll_transmit(&[addr(2)]).remove(0).1;
        // Out of order: the newer changes arrive first, the old partial cannot undo them.
        assert_eq!(b.receive(&later, now, 4, |_| None), Ok(2));
        assert_eq!(b.receive(&first, now, 4, |_| None), Ok(0));
        let mut holders = vec![(1, Kind::Complete), (3, Kind::Complete)];
        b.overlay().adjust(&d, &mut holders, slot_of);
        assert_eq!(holders, vec![(3, Kind::Complete)]);
        b.prune(now, |_| Some(11));
        assert_eq!(b.overlay().len(), 1);
        b.prune(now, |_| Some(12));
        assert!(b.overlay().is_empty());
        // Entries of an origin chitchat never hears from again expire.
        let mut c = Rumors::new(id(3), 3);
        c.receive(&later, now, 4, |_| None).unwrap();
        c.prune(now + OVERLAY_TTL, |_| None);
        assert!(c.overlay().is_empty());
    }

    #[test]
    fn bulk_changes_are_left_to_anti_entropy_and_batches_fit_a_datagram() {
        let mut a = Rumors::new(id(1), 1);
        let many: Vec<ContentChange> = (0..=MAX_PUBLISH).map(|i| ContentChange::Complete(Digest::from_sha256_bytes([i as u8; 32]))).collect();
        a.publish(&many, 1, 10);
        assert_eq!(a.hot_len(), 0);
        assert_eq!(a.counters.bulk_skipped, many.len() as u64);
        a.publish(&many[..MAX_PUBLISH], 2, 10);
        assert_eq!(a.hot_len(), MAX_PUBLISH / MAX_CHANGES);
        let mut b = Rumors::new(id(2), 2);
        let now = Instant::now();
        let mut learned = 0;
        for _ in 0..MAX_PUBLISH {
            for (_, datagram) in a.poll_transmit(&[addr(2)]) {
                assert!(datagram.len() <= MAX_PAYLOAD);
                learned += b.receive(&datagram, now, 10, |_| None).unwrap();
            }
        }
        assert_eq!(learned, MAX_PUBLISH);
    }

    /// 1,000 nodes, rounds in lockstep, 5% loss: a rumor alone (no anti-entropy) reaches every
    /// node within a handful of rounds, and then traffic stops.
    #[test]
    fn a_rumor_spreads_through_a_thousand_nodes_in_a_few_rounds() {
        let n = 1_000usize;
        let ids: Vec<ChitchatId> =
            (0..n).map(|i| ChitchatId::new(format!("n{i}"), 1, ([10, 1, (i >> 8) as u8, i as u8], 30001).into())).collect();
        let addrs: Vec<SocketAddr> = ids.iter().map(|i| i.gossip_advertise_addr).collect();
        let index_of: HashMap<SocketAddr, usize> = addrs.iter().enumerate().map(|(i, a)| (*a, i)).collect();
        let mut nodes: Vec<Rumors> = ids.iter().enumerate().map(|(i, id)| Rumors::new(id.clone(), i as u64 + 1)).collect();
        let mut loss = Rng::new(99);
        let d = Digest::from_sha256_bytes([5u8; 32]);
        nodes[0].publish(&[ContentChange::Complete(d)], 1, n);
        let now = Instant::now();
        let knows = |node: &Rumors| {
            let mut holders = Vec::new();
            node.overlay().adjust(&d, &mut holders, |_| Some(0));
            !holders.is_empty()
        };
        let mut rounds = 0;
        let mut reached = 1;
        while rounds < 50 {
            rounds += 1;
            let mut in_flight = Vec::new();
            for (i, node) in nodes.iter_mut().enumerate() {
                let peers: Vec<SocketAddr> = addrs.iter().copied().filter(|a| *a != addrs[i]).collect();
                in_flight.extend(node.poll_transmit(&peers));
            }
            if in_flight.is_empty() {
                break;
            }
            for (to, datagram) in in_flight {
                if loss.next_u64() % 100 < 5 {
                    continue;
                }
                nodes[index_of[&to]].receive(&datagram, now, n, |_| None).unwrap();
            }
            reached = 1 + nodes[1..].iter().filter(|node| knows(node)).count();
        }
        assert_eq!(reached, n, "rumor reached {reached} of {n}");
        assert!(rounds <= 20, "took {rounds} rounds to go quiet");
    }
}

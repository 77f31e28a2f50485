//! Peers' content filters as this node holds them, so `who_has` never leaves the process.
//!
//! A lookup must ask every node's filter for the digest's shard, so what it costs is set by how
//! those filters lie in memory. Filters with the same layout (`summary::Layout`: hash seed and
//! geometry; xorf's first seed is fixed and the geometry follows from the entry count, so nodes
//! holding similar numbers of blobs share one) are stored together, transposed: byte `p` of
//! every member's fingerprints is one row. A
//! key is hashed once per layout, and its three positions name three rows that are read
//! sequentially, 8 members per word, instead of three scattered loads per member behind a
//! pointer each. A lookup costs one hash and three row reads per layout present plus a pass
//! over N bytes (O(nodes), but ~1 byte each, in order) rather than N hashes and 3N random
//! loads. Memory is the fingerprints plus 1/8 spare columns per layout (up to as many again
//! after many nodes left, until the group shrinks); nothing is kept per (node, blob) pair.

use std::collections::HashMap;
use std::hash::Hash;

use super::summary::{self, Digest, Kind, Layout, SHARDS, ShardFilter};

/// A node's position in the index; at most 65,536 nodes at once.
pub type Slot = u16;

/// Where one node's filter for one (kind, shard) is stored: its layout group and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct At {
    group: u16,
    column: u16,
}

/// What the index remembers about one node.
#[derive(Debug)]
pub struct Entry<K> {
    pub key: K,
    /// Chitchat version of each applied shard key (0: nothing applied).
    applied: [[u64; SHARDS]; 2],
    /// The node's max version when its keys were last scanned.
    scanned_version: Option<u64>,
    /// Blobs it advertises per kind and shard (the senders' entry counts, for status).
    entries: [[u32; SHARDS]; 2],
    /// Where its filters are, per kind and shard.
    at: [[Option<At>; SHARDS]; 2],
}

/// One key of a peer's state as chitchat holds it.
#[derive(Debug, Clone, Copy)]
pub struct KeyView<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub version: u64,
    pub deleted: bool,
}

/// The filters of one kind and shard that share a layout, transposed: `cells[p * stride + c]`
/// is fingerprint `p` of the node `members[c]`. Columns past `members.len()` are padding.
#[derive(Debug)]
struct Group {
    layout: Layout,
    members: Vec<Slot>,
    /// Columns per row (members and spare).
    stride: usize,
    cells: Vec<u8>,
}

const WORD: usize = 8;
const ONES: u64 = u64::from_le_bytes([0x01; WORD]);
const LOW7: u64 = u64::from_le_bytes([0x7f; WORD]);

/// 0x80 in every byte of `x` that is zero, 0 elsewhere (exact: no borrow crosses bytes).
#[inline]
fn zero_bytes(x: u64) -> u64 {
    !(((x & LOW7) + LOW7) | x | LOW7)
}

#[inline]
fn word(bytes: &[u8]) -> u64 {
    let mut w = [0u8; WORD];
    w.copy_from_slice(bytes);
    u64::from_le_bytes(w)
}

impl Group {
    fn new(layout: Layout) -> Self {
        Self { layout, members: Vec::new(), stride: 0, cells: Vec::new() }
    }

    /// Stride for `members` columns: 1/8 spare, so a growing group is re-laid out O(log n)
    /// times and holds at most 12.5% more than its fingerprints (twice, after many leave,
    /// before it shrinks). No rounding up: a layout only one node has must cost what its filter
    /// does, since in a cluster of varied nodes there can be many such.
    fn stride_for(members: usize) -> usize {
        members + members / 8
    }

    fn relayout(&mut self, stride: usize) {
        let (rows, used) = (self.layout.len(), self.members.len());
        let mut cells = vec![0u8; rows * stride];
        if self.stride > 0 {
            for (new, old) in cells.chunks_exact_mut(stride).zip(self.cells.chunks_exact(self.stride)) {
                new[..used].copy_from_slice(&old[..used]);
            }
        }
        self.cells = cells;
        self.stride = stride;
    }

    /// Adds a filter of this layout; returns its column.
    fn push(&mut self, slot: Slot, fingerprints: &[u8]) -> usize {
        let column = self.members.len();
        if column >= self.stride {
            self.relayout(Self::stride_for(column + 1));
        }
        for (row, &fp) in self.cells.chunks_exact_mut(self.stride).zip(fingerprints) {
            row[column] = fp;
        }
        self.members.push(slot);
        column
    }

    /// Removes a column by moving the last one into it; returns the node moved, if any.
    fn swap_remove(&mut self, column: usize) -> Option<Slot> {
        let last = self.members.len().checked_sub(1)?;
        if column > last {
            return None;
        }
        if column != last {
            for row in self.cells.chunks_exact_mut(self.stride) {
                row[column] = row[last];
            }
        }
        self.members.swap_remove(column);
        let left = self.members.len();
        if left > 0 && Self::stride_for(left) * 2 <= self.stride {
            self.relayout(Self::stride_for(left));
        }
        self.members.get(column).copied()
    }

    /// Appends the members whose filter may hold the key hashed to `hash` (this layout's seed).
    #[inline]
    fn scan(&self, hash: u64, kind: Kind, out: &mut Vec<(Slot, Kind)>) {
        let probe = self.layout.probe_hashed(hash);
        let used = self.members.len();
        let row = |p: usize| self.cells.get(p * self.stride..p * self.stride + used).unwrap_or_default();
        let [r0, r1, r2] = probe.positions.map(row);
        let want = u64::from(probe.fingerprint) * ONES;
        let (w0, w1, w2) = (r0.chunks_exact(WORD), r1.chunks_exact(WORD), r2.chunks_exact(WORD));
        let tail = [w0.remainder(), w1.remainder(), w2.remainder()];
        for (i, ((a, b), c)) in w0.zip(w1).zip(w2).enumerate() {
            let mut hits = zero_bytes(word(a) ^ word(b) ^ word(c) ^ want);
            while hits != 0 {
                let column = i * WORD + hits.trailing_zeros() as usize / 8;
                if let Some(&slot) = self.members.get(column) {
                    out.push((slot, kind));
                }
                hits &= hits - 1;
            }
        }
        let start = used - tail[0].len();
        for (i, ((a, b), c)) in tail[0].iter().zip(tail[1]).zip(tail[2]).enumerate() {
            if a ^ b ^ c == probe.fingerprint {
                if let Some(&slot) = self.members.get(start + i) {
                    out.push((slot, kind));
                }
            }
        }
    }

    fn bytes(&self) -> usize {
        std::mem::size_of::<Self>() + self.cells.capacity() + self.members.capacity() * std::mem::size_of::<Slot>()
    }
}

/// The index, generic over the node key so tests need no chitchat types.
#[derive(Debug)]
pub struct Index<K> {
    /// `groups[kind][shard]`: one group per layout present.
    groups: [[Vec<Group>; SHARDS]; 2],
    entries: Vec<Option<Entry<K>>>,
    slots: HashMap<K, Slot>,
    free: Vec<Slot>,
    /// Shard values that failed to decode (a peer with a newer or broken encoding).
    pub undecodable: u64,
}

impl<K: Clone + Eq + Hash> Default for Index<K> {
    fn default() -> Self {
        Self {
            groups: Default::default(),
            entries: Vec::new(),
            slots: HashMap::new(),
            free: Vec::new(),
            undecodable: 0,
        }
    }
}

/// The index is full (65,536 nodes).
#[derive(Debug, thiserror::Error)]
#[error("content index is full")]
pub struct Full;

impl<K: Clone + Eq + Hash> Index<K> {
    /// Brings one node's shards up to date. `max_version` lets an unchanged node be skipped
    /// without looking at its keys. Returns its slot.
    // Shard numbers index several parallel arrays at once.
    #[allow(clippy::needless_range_loop)]
    pub fn update_node<'a>(
        &mut self,
        key: &K,
        max_version: u64,
        keys: impl Iterator<Item = KeyView<'a>>,
    ) -> Result<Slot, Full> {
        let slot = self.slot_for(key)?;
        let Some(entry) = self.entries[slot as usize].as_mut() else {
            return Err(Full); // unreachable: slot_for fills the entry
        };
        if entry.scanned_version == Some(max_version) {
            return Ok(slot);
        }
        entry.scanned_version = Some(max_version);
        let mut seen = [[false; SHARDS]; 2];
        let mut changes: Vec<(Kind, usize, Option<ShardFilter>)> = Vec::new();
        for view in keys {
            let Some((kind, shard)) = summary::parse_shard_key(view.key) else {
                continue;
            };
            let (k, shard) = (kind.index(), shard as usize);
            seen[k][shard] = true;
            if entry.applied[k][shard] == view.version {
                continue;
            }
            entry.applied[k][shard] = view.version;
            let filter = if view.deleted {
                None
            } else {
                match summary::decode_shard(view.value) {
                    Ok(filter) => Some(filter),
                    Err(_) => {
                        self.undecodable += 1;
                        None
                    }
                }
            };
            changes.push((kind, shard, filter));
        }
        // Keys that vanished (tombstones garbage-collected) empty their shard.
        for kind in Kind::ALL {
            for shard in 0..SHARDS {
                if !seen[kind.index()][shard] && entry.applied[kind.index()][shard] != 0 {
                    entry.applied[kind.index()][shard] = 0;
                    changes.push((kind, shard, None));
                }
            }
        }
        for (kind, shard, filter) in changes {
            self.remove(slot, kind, shard);
            if let Some(filter) = filter {
                self.insert(slot, kind, shard, &filter);
            }
        }
        Ok(slot)
    }

    /// Files a node's filter under its layout's group (made if new).
    fn insert(&mut self, slot: Slot, kind: Kind, shard: usize, filter: &ShardFilter) {
        let Some(entry) = self.entries.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        let groups = &mut self.groups[kind.index()][shard];
        let layout = filter.layout();
        let group = match groups.iter().position(|g| g.layout == layout) {
            Some(group) => group,
            None => {
                groups.push(Group::new(layout));
                groups.len() - 1
            }
        };
        let column = groups[group].push(slot, filter.fingerprints());
        // Both fit: at most 65,536 nodes, so at most that many groups and columns.
        entry.at[kind.index()][shard] = Some(At { group: group as u16, column: column as u16 });
        entry.entries[kind.index()][shard] = filter.entries();
    }

    /// Drops a node's filter for one kind and shard, if it has one; keeps every other node's
    /// position right (a column or group moved into the hole).
    fn remove(&mut self, slot: Slot, kind: Kind, shard: usize) {
        let (k, entries) = (kind.index(), &mut self.entries);
        let Some(entry) = entries.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        entry.entries[k][shard] = 0;
        let Some(at) = entry.at[k][shard].take() else { return };
        let groups = &mut self.groups[k][shard];
        let Some(group) = groups.get_mut(at.group as usize) else { return };
        if let Some(moved) = group.swap_remove(at.column as usize) {
            if let Some(e) = entries.get_mut(moved as usize).and_then(Option::as_mut) {
                e.at[k][shard] = Some(at);
            }
        }
        if group.members.is_empty() {
            groups.swap_remove(at.group as usize);
            if let Some(group) = groups.get(at.group as usize) {
                for (column, &member) in group.members.iter().enumerate() {
                    if let Some(e) = entries.get_mut(member as usize).and_then(Option::as_mut) {
                        e.at[k][shard] = Some(At { group: at.group, column: column as u16 });
                    }
                }
            }
        }
    }

    /// Forgets every node for which `keep` is false.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let gone: Vec<Slot> = self
            .entries
            .iter()
            .enumerate()
            .filter_map(|(slot, entry)| match entry {
                Some(entry) if !keep(&entry.key) => Some(slot as Slot),
                _ => None,
            })
            .collect();
        for slot in gone {
            for kind in Kind::ALL {
                for shard in 0..SHARDS {
                    self.remove(slot, kind, shard);
                }
            }
            if let Some(entry) = self.entries[slot as usize].take() {
                self.slots.remove(&entry.key);
            }
            self.free.push(slot);
        }
    }

    /// Appends every node whose filter for the digest's shard matches (no false negatives; a
    /// false positive per node with probability ~1/256).
    pub fn lookup(&self, digest: &Digest, out: &mut Vec<(Slot, Kind)>) {
        let (shard, key) = (summary::shard_of(digest) as usize, summary::filter_key(digest));
        // Most groups share xorf's first seed: hash once for them.
        let mut hashed: Option<(u64, u64)> = None;
        for kind in Kind::ALL {
            for group in &self.groups[kind.index()][shard] {
                let seed = group.layout.seed();
                let hash = match hashed {
                    Some((s, hash)) if s == seed => hash,
                    _ => {
                        let hash = Layout::hash(key, seed);
                        hashed = Some((seed, hash));
                        hash
                    }
                };
                group.scan(hash, kind, out);
            }
        }
    }

    pub fn advertised(&self, slot: Slot) -> (u32, u32) {
        let count = |e: &Entry<K>, kind: Kind| e.entries[kind.index()].iter().sum::<u32>();
        self.entries
            .get(slot as usize)
            .and_then(Option::as_ref)
            .map_or((0, 0), |e| (count(e, Kind::Complete), count(e, Kind::Partial)))
    }

    pub fn key(&self, slot: Slot) -> Option<&K> {
        self.entries.get(slot as usize)?.as_ref().map(|e| &e.key)
    }

    pub fn slot_of(&self, key: &K) -> Option<Slot> {
        self.slots.get(key).copied()
    }

    /// (node, blob) pairs advertised, as the senders counted them.
    pub fn len(&self) -> usize {
        self.entries.iter().flatten().map(|e| e.entries.iter().flatten().map(|&n| n as usize).sum::<usize>()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the filters hold: the groups (fingerprints, spare columns, member lists) and each
    /// node's record of where its filters are and what they count.
    pub fn table_bytes(&self) -> usize {
        let groups: usize = self
            .groups
            .iter()
            .flatten()
            .map(|groups| groups.capacity() * std::mem::size_of::<Group>() + groups.iter().map(Group::bytes).sum::<usize>())
            .sum();
        let per_node = std::mem::size_of::<[[Option<At>; SHARDS]; 2]>() + std::mem::size_of::<[[u32; SHARDS]; 2]>();
        groups + self.entries.iter().flatten().count() * per_node
    }

    /// Layout groups held, over all kinds and shards (a lookup hashes and reads rows once per
    /// group of its shard).
    pub fn groups(&self) -> usize {
        self.groups.iter().flatten().map(Vec::len).sum()
    }

    fn slot_for(&mut self, key: &K) -> Result<Slot, Full> {
        if let Some(slot) = self.slots.get(key) {
            return Ok(*slot);
        }
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                let slot = Slot::try_from(self.entries.len()).map_err(|_| Full)?;
                self.entries.push(None);
                slot
            }
        };
        self.entries[slot as usize] = Some(Entry {
            key: key.clone(),
            applied: [[0; SHARDS]; 2],
            scanned_version: None,
            entries: [[0; SHARDS]; 2],
            at: [[None; SHARDS]; 2],
        });
        self.slots.insert(key.clone(), slot);
        Ok(slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::summary::{encode_shard, filter_key, shard_key};

    /// A digest in shard `shard` with filter key `n`.
    fn d(shard: u8, n: u64) -> Digest {
        let mut d = [0u8; 32];
        d[0] = shard << 5;
        d[8..16].copy_from_slice(&n.to_le_bytes());
        Digest::from_sha256_bytes(d)
    }

    fn value(keys: &[u64]) -> String {
        let mut keys = keys.to_vec();
        keys.sort_unstable();
        encode_shard(&keys).unwrap()
    }

    fn kv<'a>(key: &'a str, value: &'a str, version: u64) -> KeyView<'a> {
        KeyView { key, value, version, deleted: false }
    }

    fn holders(index: &Index<&'static str>, digest: &Digest) -> Vec<(&'static str, Kind)> {
        let mut out = Vec::new();
        index.lookup(digest, &mut out);
        let mut named: Vec<_> = out.iter().map(|(s, k)| (*index.key(*s).unwrap(), *k)).collect();
        named.sort_by_key(|(n, _)| *n);
        named
    }

    /// Keys far apart so that a handful of them never collide in an 8-bit filter by chance
    /// here (the test is deterministic: xorf's seeds are).
    const K1: u64 = 0x1111_2222_3333_4444;
    const K2: u64 = 0x5555_6666_7777_8888;
    const K3: u64 = 0x9999_aaaa_bbbb_cccc;

    #[test]
    fn lookup_finds_holders_and_kinds() {
        let mut index = Index::default();
        let c1 = shard_key(Kind::Complete, 1);
        let p1 = shard_key(Kind::Partial, 1);
        let v_a = value(&[K1, K2]);
        let v_b = value(&[K1]);
        index.update_node(&"a", 2, [kv(&c1, &v_a, 2), kv("zone", "z1", 1)].into_iter()).unwrap();
        index.update_node(&"b", 1, [kv(&p1, &v_b, 1)].into_iter()).unwrap();
        assert_eq!(holders(&index, &d(1, K1)), vec![("a", Kind::Complete), ("b", Kind::Partial)]);
        assert!(holders(&index, &d(1, K2)).contains(&("a", Kind::Complete)));
        assert!(holders(&index, &d(2, K1)).is_empty(), "another shard");
        assert_eq!(index.len(), 3);
        let slot = |k| index.slot_of(&k).unwrap();
        assert_eq!((index.advertised(slot("a")), index.advertised(slot("b"))), ((2, 0), (0, 1)));
    }

    #[test]
    fn updates_deletes_and_vanished_keys() {
        let mut index = Index::default();
        let c1 = shard_key(Kind::Complete, 1);
        let c2 = shard_key(Kind::Complete, 2);
        let v = value(&[K1]);
        index.update_node(&"a", 2, [kv(&c1, &v, 1), kv(&c2, &v, 2)].into_iter()).unwrap();
        // Same max version: keys are not even looked at.
        index.update_node(&"a", 2, std::iter::empty()).unwrap();
        assert_eq!(index.len(), 2);
        let a = index.slot_of(&"a").unwrap();
        assert_eq!(index.advertised(a), (2, 0));
        // c/1 replaced, c/2 tombstoned.
        let v2 = value(&[K3]);
        let tomb = KeyView { key: &c2, value: "", version: 4, deleted: true };
        index.update_node(&"a", 4, [kv(&c1, &v2, 3), tomb].into_iter()).unwrap();
        assert_eq!(holders(&index, &d(1, K3)), vec![("a", Kind::Complete)]);
        assert!(holders(&index, &d(2, K1)).is_empty());
        assert_eq!(index.advertised(a), (1, 0));
        // c/1 garbage-collected away entirely.
        index.update_node(&"a", 5, std::iter::empty()).unwrap();
        assert!(index.is_empty());
        assert!(holders(&index, &d(1, K3)).is_empty());
        assert_eq!(index.advertised(a), (0, 0));
    }

    #[test]
    fn undecodable_values_are_counted_and_ignored() {
        let mut index = Index::default();
        let c1 = shard_key(Kind::Complete, 1);
        index.update_node(&"a", 1, [kv(&c1, "9zzzz", 1)].into_iter()).unwrap();
        assert_eq!(index.undecodable, 1);
        assert!(index.is_empty());
    }

    #[test]
    fn retain_forgets_nodes_and_reuses_slots() {
        let mut index = Index::default();
        let c1 = shard_key(Kind::Complete, 1);
        let v = value(&[K1]);
        let a = index.update_node(&"a", 1, [kv(&c1, &v, 1)].into_iter()).unwrap();
        index.update_node(&"b", 1, [kv(&c1, &v, 1)].into_iter()).unwrap();
        index.retain(|k| *k != "a");
        assert_eq!(holders(&index, &d(1, K1)), vec![("b", Kind::Complete)]);
        let c = index.update_node(&"c", 1, std::iter::empty()).unwrap();
        assert_eq!(a, c);
        assert_eq!(holders(&index, &d(1, K1)), vec![("b", Kind::Complete)], "c inherits nothing");
    }

    #[test]
    fn zero_bytes_is_exact() {
        let mut x = 0x0123_4567_89ab_cdefu64;
        for _ in 0..100_000 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Some zero bytes, some 0x80s and 0x01s (the cases a borrow would get wrong).
            let w = (x & 0x00ff_80ff_0001_ff00) ^ (x >> 56);
            let want = w.to_le_bytes().iter().enumerate().fold(0u64, |m, (i, b)| if *b == 0 { m | 0x80 << (8 * i) } else { m });
            assert_eq!(zero_bytes(w), want, "{w:016x}");
        }
    }

    /// The transposed groups answer exactly what probing each node's own filter would, through
    /// nodes joining, changing, emptying and leaving, with layouts of many sizes (so groups are
    /// made, shared, emptied and moved): no false negative, and no extra or missing holder.
    #[test]
    fn groups_match_the_filters_through_churn() {
        let mut index: Index<u32> = Index::default();
        // What each node currently advertises: (key set, its filter) per (node, kind, shard).
        let mut truth: HashMap<(u32, usize, usize), (Vec<u64>, ShardFilter)> = HashMap::new();
        let mut versions: HashMap<u32, u64> = HashMap::new();
        let mut x = 7u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut moved_groups = 0;
        for round in 0..30u64 {
            // Re-publish a few nodes' state: random sizes (1..400 keys) in random shards.
            for _ in 0..12 {
                let node = (next() % 40) as u32;
                let version = versions.entry(node).or_insert(0);
                *version += 1;
                let mut values = Vec::new();
                truth.retain(|(n, _, _), _| *n != node);
                for kind in Kind::ALL {
                    for shard in 0..SHARDS as u8 {
                        if next() % 3 == 0 {
                            continue; // absent (or removed) shard
                        }
                        let n = [1, 3, 40, 90, 150, 250, 310][(next() % 7) as usize] + (next() % 5) as usize;
                        let mut keys: Vec<u64> = (0..n).map(|_| next() % 4_000).collect();
                        keys.sort_unstable();
                        keys.dedup();
                        let value = encode_shard(&keys).unwrap();
                        truth.insert((node, kind.index(), shard as usize), (keys, summary::decode_shard(&value).unwrap()));
                        values.push((shard_key(kind, shard), value));
                    }
                }
                let views = values.iter().map(|(k, v)| kv(k, v, *version));
                let before = index.groups();
                index.update_node(&node, *version, views).unwrap();
                moved_groups += usize::from(index.groups() < before);
            }
            if round % 5 == 4 {
                let before = index.groups();
                let gone = (next() % 40) as u32;
                index.retain(|n| *n != gone);
                truth.retain(|(n, _, _), _| *n != gone);
                versions.remove(&gone);
                moved_groups += usize::from(index.groups() < before);
            }
            // Every key of the key space, in every shard: the index lists exactly the nodes
            // whose filter matches.
            for shard in 0..SHARDS as u8 {
                for key in (0..4_000u64).step_by(7) {
                    let digest = d(shard, key);
                    let mut got = Vec::new();
                    index.lookup(&digest, &mut got);
                    got.sort_unstable_by_key(|(s, k)| (*index.key(*s).unwrap(), k.index()));
                    let mut want: Vec<(u32, Kind)> = truth
                        .iter()
                        .filter(|((_, _, s), (_, f))| *s == shard as usize && f.contains(key))
                        .map(|((n, k, _), _)| (*n, Kind::ALL[*k]))
                        .collect();
                    want.sort_unstable_by_key(|(n, k)| (*n, k.index()));
                    let got: Vec<(u32, Kind)> = got.iter().map(|(s, k)| (*index.key(*s).unwrap(), *k)).collect();
                    assert_eq!(got, want, "round {round}, shard {shard}, key {key}");
                    for ((n, k, _), (keys, _)) in truth.iter().filter(|((_, _, s), _)| *s == shard as usize) {
                        if keys.binary_search(&key).is_ok() {
                            assert!(got.contains(&(*n, Kind::ALL[*k])), "false negative");
                        }
                    }
                }
            }
        }
        assert!(index.groups() > 2 * SHARDS, "several layouts per shard: {}", index.groups());
        assert!(moved_groups > 0, "groups emptied (and others moved into their place)");
        // Spare columns stay bounded.
        let fingerprints: usize = truth.values().map(|(_, f)| f.bytes()).sum();
        let overhead = index.groups() * (std::mem::size_of::<Group>() + 64) + 40 * 200;
        assert!(index.table_bytes() <= fingerprints * 2 + overhead, "{} for {fingerprints}", index.table_bytes());
    }

    /// 200 nodes x 500 blobs each: every held blob is found at its holder (no false negative),
    /// and a miss lists about nodes / 256 nodes.
    #[test]
    fn no_false_negatives_and_the_stated_false_positive_rate() {
        let mut index = Index::default();
        let names: Vec<&'static str> = (0..200).map(|i| &*Box::leak(format!("n{i}").into_boxed_str())).collect();
        let mut held = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let digests: Vec<Digest> = (0..500u64).map(|j| d((j % 8) as u8, (i as u64) << 32 | j)).collect();
            let mut updates = Vec::new();
            for shard in 0..SHARDS as u8 {
                let mut keys: Vec<u64> = digests.iter().filter(|x| summary::shard_of(x) == shard).map(filter_key).collect();
                keys.sort_unstable();
                updates.push((shard_key(Kind::Complete, shard), encode_shard(&keys).unwrap()));
            }
            let views = updates.iter().map(|(k, v)| kv(k, v, 1));
            index.update_node(name, 1, views).unwrap();
            held.push(digests);
        }
        assert_eq!(index.len(), 200 * 500);
        for (i, digests) in held.iter().enumerate() {
            for x in digests.iter().step_by(7) {
                assert!(holders(&index, x).iter().any(|(n, _)| *n == names[i]), "false negative");
            }
        }
        let misses = 2_000u64;
        let false_holders: usize = (0..misses).map(|j| holders(&index, &d((j % 8) as u8, u64::MAX - j)).len()).sum();
        let per_miss = false_holders as f64 / misses as f64;
        assert!(per_miss < 200.0 / 256.0 * 1.5, "{per_miss} false holders per miss");
    }
}

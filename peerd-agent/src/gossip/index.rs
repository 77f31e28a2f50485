//! Peers' content filters as this node holds them, so `who_has` never leaves the process.
//!
//! Per kind and shard, one vector indexed by slot of the peer's decoded binary fuse filter
//! (`summary::ShardFilter`, ~1.2-1.6 bytes per blob). A lookup probes, for the digest's shard,
//! every node's filter: three byte loads per node with a filter there, contiguous per shard, so
//! it costs O(nodes) and not O(nodes x blobs). Memory is what the filters weigh; nothing is kept
//! per (node, blob) pair beyond the filter's fingerprints.

use std::collections::HashMap;
use std::hash::Hash;

use super::summary::{self, Digest, Kind, SHARDS, ShardFilter};

/// A node's position in the index; at most 65,536 nodes at once.
pub type Slot = u16;

/// What the index remembers about one node.
#[derive(Debug)]
pub struct Entry<K> {
    pub key: K,
    /// Chitchat version of each applied shard key (0: nothing applied).
    applied: [[u64; SHARDS]; 2],
    /// The node's max version when its keys were last scanned.
    scanned_version: Option<u64>,
    /// Blobs it advertises, per kind (the senders' entry counts, for status).
    counts: [u32; 2],
}

/// One key of a peer's state as chitchat holds it.
#[derive(Debug, Clone, Copy)]
pub struct KeyView<'a> {
    pub key: &'a str,
    pub value: &'a str,
    pub version: u64,
    pub deleted: bool,
}

/// The index, generic over the node key so tests need no chitchat types.
#[derive(Debug)]
pub struct Index<K> {
    /// `filters[kind][shard][slot]`.
    filters: [[Vec<Option<ShardFilter>>; SHARDS]; 2],
    entries: Vec<Option<Entry<K>>>,
    slots: HashMap<K, Slot>,
    free: Vec<Slot>,
    /// Shard values that failed to decode (a peer with a newer or broken encoding).
    pub undecodable: u64,
}

impl<K: Clone + Eq + Hash> Default for Index<K> {
    fn default() -> Self {
        Self {
            filters: Default::default(),
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
            let added = filter.as_ref().map_or(0, ShardFilter::entries);
            let column = &mut self.filters[kind.index()][shard];
            if column.len() <= slot as usize {
                column.resize(slot as usize + 1, None);
            }
            let removed = std::mem::replace(&mut column[slot as usize], filter).map_or(0, |f| f.entries());
            if let Some(entry) = self.entries[slot as usize].as_mut() {
                let count = &mut entry.counts[kind.index()];
                *count = count.saturating_sub(removed).saturating_add(added);
            }
        }
        Ok(slot)
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
            for column in self.filters.iter_mut().flatten() {
                if let Some(filter) = column.get_mut(slot as usize) {
                    *filter = None;
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
        for kind in Kind::ALL {
            for (slot, filter) in self.filters[kind.index()][shard].iter().enumerate() {
                if let Some(filter) = filter {
                    if filter.contains(key) {
                        out.push((slot as Slot, kind));
                    }
                }
            }
        }
    }

    pub fn advertised(&self, slot: Slot) -> (u32, u32) {
        self.entries.get(slot as usize).and_then(Option::as_ref).map_or((0, 0), |e| (e.counts[Kind::Complete.index()], e.counts[Kind::Partial.index()]))
    }

    pub fn key(&self, slot: Slot) -> Option<&K> {
        self.entries.get(slot as usize)?.as_ref().map(|e| &e.key)
    }

    pub fn slot_of(&self, key: &K) -> Option<Slot> {
        self.slots.get(key).copied()
    }

    /// (node, blob) pairs advertised, as the senders counted them.
    pub fn len(&self) -> usize {
        self.entries.iter().flatten().map(|e| e.counts[0] as usize + e.counts[1] as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the filters and their tables hold.
    pub fn table_bytes(&self) -> usize {
        self.filters
            .iter()
            .flatten()
            .map(|column| {
                column.capacity() * std::mem::size_of::<Option<ShardFilter>>()
                    + column.iter().flatten().map(ShardFilter::bytes).sum::<usize>()
            })
            .sum()
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
            counts: [0; 2],
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
        d
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

//! The inverted index built from peers' summaries: fingerprint -> nodes, so `who_has` is a binary
//! search instead of a scan over every peer.
//!
//! Per kind and shard, one sorted `Vec<u32>` of `suffix << 16 | slot`: 4 bytes per (node, blob),
//! no per-entry allocation, and one lookup is a `partition_point` over about
//! nodes x blobs / 256 entries (39,000 at 1,000 x 10,000: 16 comparisons).

use std::collections::HashMap;
use std::hash::Hash;

use super::summary::{self, Digest, Kind, SHARDS};

/// A node's position in the index; at most 65,536 nodes at once.
pub type Slot = u16;

/// What the index remembers about one node.
#[derive(Debug)]
pub struct Entry<K> {
    pub key: K,
    /// Chitchat version of each applied shard key (0: nothing applied).
    applied: [Box<[u64; SHARDS]>; 2],
    /// The node's max version when its keys were last scanned.
    scanned_version: Option<u64>,
    /// Fingerprints it advertises, per kind (for status).
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
    tables: [Vec<Vec<u32>>; 2],
    entries: Vec<Option<Entry<K>>>,
    slots: HashMap<K, Slot>,
    free: Vec<Slot>,
    /// Shard values that failed to decode (a peer with a newer or broken encoding).
    pub undecodable: u64,
}

impl<K: Clone + Eq + Hash> Default for Index<K> {
    fn default() -> Self {
        Self {
            tables: [vec![Vec::new(); SHARDS], vec![Vec::new(); SHARDS]],
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
        let mut changes: Vec<(Kind, u8, Vec<u16>)> = Vec::new();
        for view in keys {
            let Some((kind, shard)) = summary::parse_shard_key(view.key) else {
                continue;
            };
            seen[kind.index()][shard as usize] = true;
            if entry.applied[kind.index()][shard as usize] == view.version {
                continue;
            }
            entry.applied[kind.index()][shard as usize] = view.version;
            let suffixes = if view.deleted {
                Vec::new()
            } else {
                match summary::decode_shard(view.value) {
                    Ok(suffixes) => suffixes,
                    Err(_) => {
                        self.undecodable += 1;
                        Vec::new()
                    }
                }
            };
            changes.push((kind, shard, suffixes));
        }
        // Keys that vanished (tombstones garbage-collected) empty their shard.
        for kind in Kind::ALL {
            for shard in 0..SHARDS {
                if !seen[kind.index()][shard] && entry.applied[kind.index()][shard] != 0 {
                    entry.applied[kind.index()][shard] = 0;
                    changes.push((kind, shard as u8, Vec::new()));
                }
            }
        }
        for (kind, shard, suffixes) in changes {
            let removed = self.replace(kind, shard, slot, &suffixes);
            if let Some(entry) = self.entries[slot as usize].as_mut() {
                let count = &mut entry.counts[kind.index()];
                *count = count.saturating_sub(removed as u32).saturating_add(suffixes.len() as u32);
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
        if gone.is_empty() {
            return;
        }
        for table in self.tables.iter_mut().flatten() {
            table.retain(|e| !gone.contains(&((e & 0xffff) as Slot)));
        }
        for slot in gone {
            if let Some(entry) = self.entries[slot as usize].take() {
                self.slots.remove(&entry.key);
            }
            self.free.push(slot);
        }
    }

    /// Slots of nodes that advertise the digest, with how.
    pub fn lookup(&self, digest: &Digest, out: &mut Vec<(Slot, Kind)>) {
        let (shard, suffix) = summary::fingerprint(digest);
        let lo = u32::from(suffix) << 16;
        for kind in Kind::ALL {
            let table = &self.tables[kind.index()][shard as usize];
            let start = table.partition_point(|e| *e < lo);
            for e in &table[start..] {
                if e >> 16 != u32::from(suffix) {
                    break;
                }
                out.push(((e & 0xffff) as Slot, kind));
            }
        }
    }

    /// How many blobs (fingerprints) a node advertises: complete, partial.
    pub fn advertised(&self, slot: Slot) -> (u32, u32) {
        self.entries.get(slot as usize).and_then(Option::as_ref).map_or((0, 0), |e| (e.counts[Kind::Complete.index()], e.counts[Kind::Partial.index()]))
    }

    pub fn key(&self, slot: Slot) -> Option<&K> {
        self.entries.get(slot as usize)?.as_ref().map(|e| &e.key)
    }

    /// Number of (node, fingerprint) entries held.
    /// The slot of a node, if indexed.
    pub fn slot_of(&self, key: &K) -> Option<Slot> {
        self.slots.get(key).copied()
    }

    pub fn len(&self) -> usize {
        self.tables.iter().flatten().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Heap bytes of the tables (for the memory figures).
    pub fn table_bytes(&self) -> usize {
        self.tables.iter().flatten().map(|t| t.capacity() * 4).sum()
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
            applied: [Box::new([0; SHARDS]), Box::new([0; SHARDS])],
            scanned_version: None,
            counts: [0; 2],
        });
        self.slots.insert(key.clone(), slot);
        Ok(slot)
    }

    /// Replaces one node's entries in one shard: drop its old ones, merge the new sorted ones.
    /// Returns how many it dropped.
    fn replace(&mut self, kind: Kind, shard: u8, slot: Slot, suffixes: &[u16]) -> usize {
        let table = &mut self.tables[kind.index()][shard as usize];
        let before = table.len();
        table.retain(|e| (e & 0xffff) as Slot != slot);
        let removed = before - table.len();
        if suffixes.is_empty() {
            return removed;
        }
        let mut merged = Vec::with_capacity(table.len() + suffixes.len());
        let mut old = table.iter().copied().peekable();
        for new in suffixes.iter().map(|s| u32::from(*s) << 16 | u32::from(slot)) {
            while let Some(e) = old.next_if(|e| *e < new) {
                merged.push(e);
            }
            merged.push(new);
        }
        merged.extend(old);
        *table = merged;
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gossip::summary::{encode_shard, shard_key};

    fn d(a: u8, b: u8, c: u8) -> Digest {
        let mut d = [0u8; 32];
        d[..3].copy_from_slice(&[a, b, c]);
        d
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

    #[test]
    fn lookup_finds_holders_and_kinds() {
        let mut index = Index::default();
        let c1 = shard_key(Kind::Complete, 1);
        let p1 = shard_key(Kind::Partial, 1);
        let v_a = encode_shard(&[0x0203, 0x0505]);
        let v_b = encode_shard(&[0x0203]);
        index.update_node(&"a", 2, [kv(&c1, &v_a, 2), kv("zone", "z1", 1)].into_iter()).unwrap();
        index.update_node(&"b", 1, [kv(&p1, &v_b, 1)].into_iter()).unwrap();
        assert_eq!(
            holders(&index, &d(1, 2, 3)),
            vec![("a", Kind::Complete), ("b", Kind::Partial)]
        );
        assert_eq!(holders(&index, &d(1, 5, 5)), vec![("a", Kind::Complete)]);
        assert!(holders(&index, &d(2, 2, 3)).is_empty());
        assert_eq!(index.len(), 3);
        let slot = |k| index.slot_of(&k).unwrap();
        assert_eq!((index.advertised(slot("a")), index.advertised(slot("b"))), ((2, 0), (0, 1)));
    }

    #[test]
    fn updates_deletes_and_vanished_keys() {
        let mut index = Index::default();
        let c1 = shard_key(Kind::Complete, 1);
        let c2 = shard_key(Kind::Complete, 2);
        let v = encode_shard(&[0x0203]);
        index.update_node(&"a", 2, [kv(&c1, &v, 1), kv(&c2, &v, 2)].into_iter()).unwrap();
        // Same max version: keys are not even looked at.
        index.update_node(&"a", 2, std::iter::empty()).unwrap();
        assert_eq!(index.len(), 2);
        let a = index.slot_of(&"a").unwrap();
        assert_eq!(index.advertised(a), (2, 0));
        // c/01 replaced, c/02 tombstoned.
        let v2 = encode_shard(&[0x0909]);
        let tomb = KeyView { key: &c2, value: "", version: 4, deleted: true };
        index.update_node(&"a", 4, [kv(&c1, &v2, 3), tomb].into_iter()).unwrap();
        assert!(holders(&index, &d(1, 2, 3)).is_empty());
        assert_eq!(holders(&index, &d(1, 9, 9)), vec![("a", Kind::Complete)]);
        assert!(holders(&index, &d(2, 2, 3)).is_empty());
        assert_eq!(index.advertised(a), (1, 0));
        // c/01 garbage-collected away entirely.
        index.update_node(&"a", 5, std::iter::empty()).unwrap();
        assert!(index.is_empty());
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
        let v = encode_shard(&[0x0203]);
        let a = index.update_node(&"a", 1, [kv(&c1, &v, 1)].into_iter()).unwrap();
        index.update_node(&"b", 1, [kv(&c1, &v, 1)].into_iter()).unwrap();
        index.retain(|k| *k != "a");
        assert_eq!(holders(&index, &d(1, 2, 3)), vec![("b", Kind::Complete)]);
        let c = index.update_node(&"c", 1, std::iter::empty()).unwrap();
        assert_eq!(a, c);
    }

    #[test]
    fn merge_keeps_tables_sorted() {
        let mut index = Index::default();
        let c7 = shard_key(Kind::Complete, 7);
        for (i, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let suffixes: Vec<u16> = (0..50u16).map(|s| s * 7 + i as u16).collect();
            let v = encode_shard(&suffixes);
            index.update_node(&name, 1, [kv(&c7, &v, 1)].into_iter()).unwrap();
        }
        let table = &index.tables[0][7];
        assert!(table.windows(2).all(|w| w[0] < w[1]));
        // 7 = 1 x 7 + 0: only "a".
        assert_eq!(holders(&index, &d(7, 0, 7)), vec![("a", Kind::Complete)]);
    }
}

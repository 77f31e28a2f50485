//! Content summaries: what one node holds, as a few small chitchat keys (PROTOCOL.md).
//!
//! A digest's first three bits pick one of 8 shards; the shard's value is a binary fuse filter
//! (`xorf::BinaryFuse8`, 8-bit fingerprints) over the digests in it: about 1.2-1.6 bytes per
//! blob whatever the cluster size, no false negatives, a false positive with probability about
//! 1/256 per (lookup, node). A peer wrongly listed as a holder answers "not found" when asked
//! (every fetch is verified), so a false positive costs one round trip, never wrong data. A
//! change touches one key (1/8 of the filter), so it travels as a small delta.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use xorf::{BinaryFuse8, Filter};

/// Content is named by the store's digest type (one type from the store to the wire).
pub use crate::store::Digest;

/// Number of shards, one per value of the digest's first three bits.
pub const SHARDS: usize = 8;

/// Entries kept per shard; beyond this the shard is truncated (counted) so one value always fits
/// a datagram: 32,768 entries are a ~40 KB filter, ~53 KB of base64; 262,144 blobs per node
/// before it matters.
pub const MAX_SHARD_ENTRIES: usize = 32_768;

/// Version tag at the start of every shard value. '1' (24-bit fingerprint lists, 256 shards)
/// is gone; '2' is a binary fuse filter.
const FORMAT_V2: char = '2';

/// Bytes before the fingerprints: entries (u32 BE), seed (u64 BE), log2 of the segment length.
const HEADER: usize = 4 + 8 + 1;

/// Largest segment length xorf builds (2^18).
const MAX_SEGMENT_LOG2: u8 = 18;

/// Whether a node holds a blob fully or is still fetching it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Complete,
    Partial,
}

impl Kind {
    pub(crate) const ALL: [Kind; 2] = [Kind::Complete, Kind::Partial];

    fn prefix(self) -> &'static str {
        match self {
            Kind::Complete => "c/",
            Kind::Partial => "p/",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Kind::Complete => 0,
            Kind::Partial => 1,
        }
    }
}

/// The shard of a digest: its first three bits.
pub fn shard_of(digest: &Digest) -> u8 {
    digest.as_bytes()[0] >> 5
}

/// The filter key of a digest: bytes 8..16 (independent of the shard bits; sha256 is uniform).
pub fn filter_key(digest: &Digest) -> u64 {
    let mut key = [0u8; 8];
    key.copy_from_slice(&digest.as_bytes()[8..16]);
    u64::from_le_bytes(key)
}

/// The chitchat key of one shard, e.g. `c/3`.
pub fn shard_key(kind: Kind, shard: u8) -> String {
    format!("{}{shard:x}", kind.prefix())
}

/// Parses a shard key; `None` for any other key (node metadata, or another format's shards).
pub fn parse_shard_key(key: &str) -> Option<(Kind, u8)> {
    let kind = Kind::ALL.into_iter().find(|kind| key.starts_with(kind.prefix()))?;
    let digit = &key.as_bytes()[2..];
    if digit.len() != 1 {
        return None;
    }
    let shard = (digit[0] as char).to_digit(16)?;
    (shard < SHARDS as u32).then_some((kind, shard as u8))
}

/// A peer's (or our) filter over one shard, checked on decode so lookups cannot index out of it.
#[derive(Debug, Clone)]
pub struct ShardFilter {
    filter: BinaryFuse8,
    entries: u32,
}

impl ShardFilter {
    /// Whether the digest may be in the set (never false for a member).
    #[inline]
    pub fn contains(&self, key: u64) -> bool {
        self.filter.contains(&key)
    }

    /// How many digests the sender put in it.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Heap bytes held (the fingerprints).
    pub fn bytes(&self) -> usize {
        self.filter.fingerprints.len()
    }

    /// Where keys land in the fingerprints: filters of equal layout are probed at the same
    /// positions, so the index stores them side by side and hashes a key once for all of them.
    pub fn layout(&self) -> Layout {
        let d = &self.filter.descriptor;
        Layout { seed: d.seed, segment_length: d.segment_length, segment_count_length: d.segment_count_length }
    }

    /// The fingerprint array (`layout().len()` bytes).
    pub fn fingerprints(&self) -> &[u8] {
        &self.filter.fingerprints
    }
}

/// A binary fuse filter's hash seed and geometry: what decides the three positions and the
/// fingerprint a key is checked against. Only `decode_shard` makes one, so the positions are
/// always inside `len()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Layout {
    seed: u64,
    segment_length: u32,
    segment_count_length: u32,
}

/// What a key is checked against in every filter of one layout: it may be in a filter iff the
/// XOR of the filter's bytes at `positions` equals `fingerprint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub fingerprint: u8,
    pub positions: [usize; 3],
}

impl Layout {
    /// Fingerprints per filter.
    pub fn len(&self) -> usize {
        self.segment_count_length as usize + 2 * self.segment_length as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// xorf's `BinaryFuse8::contains` up to the loads (xorf 0.13: `mix`, `fingerprint!`,
    /// `hash_of_hash`), which xorf keeps private; a test checks the two agree.
    #[inline]
    pub fn probe(&self, key: u64) -> Probe {
        self.probe_hashed(Self::hash(key, self.seed))
    }

    /// `probe` with the hash already computed by `hash(key, self.seed())` (shared by every
    /// layout with that seed).
    #[inline]
    pub fn probe_hashed(&self, hash: u64) -> Probe {
        let h0 = ((u128::from(hash) * u128::from(self.segment_count_length)) >> 64) as u32;
        let mask = self.segment_length - 1;
        let h1 = (h0 + self.segment_length) ^ ((hash >> 18) as u32 & mask);
        let h2 = (h0 + 2 * self.segment_length) ^ (hash as u32 & mask);
        Probe { fingerprint: (hash ^ (hash >> 32)) as u8, positions: [h0 as usize, h1 as usize, h2 as usize] }
    }

    /// xorf's `mix(key, seed)`: murmur3's 64-bit finalizer of `key + seed`.
    #[inline]
    pub fn hash(key: u64, seed: u64) -> u64 {
        let mut k = key.wrapping_add(seed);
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }
}

/// Why a shard could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("an empty shard is deleted, not encoded")]
    Empty,
    #[error("the filter could not be built")]
    Build,
}

/// Encodes sorted, deduplicated filter keys as a shard value.
pub fn encode_shard(keys: &[u64]) -> Result<String, EncodeError> {
    if keys.is_empty() {
        return Err(EncodeError::Empty);
    }
    let filter = BinaryFuse8::try_from(keys).map_err(|_| EncodeError::Build)?;
    let segment = filter.descriptor.segment_length;
    if !segment.is_power_of_two() || segment.trailing_zeros() > u32::from(MAX_SEGMENT_LOG2) {
        return Err(EncodeError::Build);
    }
    let mut raw = Vec::with_capacity(HEADER + filter.fingerprints.len());
    raw.extend_from_slice(&(keys.len() as u32).to_be_bytes());
    raw.extend_from_slice(&filter.descriptor.seed.to_be_bytes());
    raw.push(segment.trailing_zeros() as u8);
    raw.extend_from_slice(&filter.fingerprints);
    let mut out = String::with_capacity(1 + raw.len().div_ceil(3) * 4);
    out.push(FORMAT_V2);
    URL_SAFE_NO_PAD.encode_string(&raw, &mut out);
    Ok(out)
}

/// Why a received shard value was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown shard format")]
    UnknownFormat,
    #[error("shard value is not valid base64")]
    BadBase64,
    #[error("shard filter is malformed")]
    Malformed,
    #[error("shard value has more than {MAX_SHARD_ENTRIES} entries")]
    TooLong,
}

/// Decodes a shard value; the layout is checked so every lookup stays inside the fingerprints.
pub fn decode_shard(value: &str) -> Result<ShardFilter, DecodeError> {
    let body = value.strip_prefix(FORMAT_V2).ok_or(DecodeError::UnknownFormat)?;
    let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| DecodeError::BadBase64)?;
    if raw.len() < HEADER {
        return Err(DecodeError::Malformed);
    }
    let (header, fingerprints) = raw.split_at(HEADER);
    let mut entries = [0u8; 4];
    entries.copy_from_slice(&header[..4]);
    let entries = u32::from_be_bytes(entries);
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&header[4..12]);
    let seed = u64::from_be_bytes(seed);
    let log2 = header[12];
    if entries as usize > MAX_SHARD_ENTRIES {
        return Err(DecodeError::TooLong);
    }
    if log2 > MAX_SEGMENT_LOG2 {
        return Err(DecodeError::Malformed);
    }
    let segment = 1u32 << log2;
    let len = fingerprints.len();
    // xorf's layout: (segment count + 2) segments; positions h0 < count x segment, h1 and h2 in
    // the next two segments. A length that is a multiple of the segment, at least three of them,
    // keeps every position in bounds.
    if len % segment as usize != 0 || len < 3 * segment as usize || len > u32::MAX as usize {
        return Err(DecodeError::Malformed);
    }
    let filter = BinaryFuse8 {
        descriptor: xorf::Descriptor {
            seed,
            segment_length: segment,
            segment_length_mask: segment - 1,
            segment_count_length: len as u32 - 2 * segment,
        },
        fingerprints: fingerprints.into(),
    };
    Ok(ShardFilter { filter, entries })
}

/// One change to a node's published state: set a key or delete it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyUpdate {
    Set(String, String),
    Delete(String),
}

/// A change to local content, for incremental updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContentChange {
    /// The blob is complete here (it stops being partial).
    Complete(Digest),
    /// Some pieces are here; peers ask this node for its piece map (not gossiped).
    Partial(Digest),
    /// The blob is gone.
    Removed(Digest),
}

/// The local node's content, kept in full so that a change re-encodes only its own shard.
#[derive(Debug)]
pub struct LocalContent {
    /// Per kind, per shard, the full digests held.
    shards: [Vec<BTreeSet<Digest>>; 2],
    /// Shards whose encoding may have changed since the last `take_updates`.
    dirty: [BTreeSet<u8>; 2],
    /// Shards currently published (non-empty), so an emptied shard is deleted exactly once.
    published: [BTreeSet<u8>; 2],
    /// Entries left out because a shard exceeded `MAX_SHARD_ENTRIES`.
    pub truncated: u64,
    /// Shards whose filter could not be built (left as they were; never seen in practice).
    pub unencodable: u64,
    /// Per-blob changes since the last `take_changes`, for rumors; `None` once there were more
    /// than `rumor::MAX_PUBLISH` (a bulk change: anti-entropy carries it).
    changes: Option<Vec<ContentChange>>,
    /// How many changes the current bulk change counts (while `changes` is `None`).
    bulk: u64,
}

/// Per-blob changes remembered between two `take_changes`: as many as rumors publish at once
/// (`rumor::MAX_PUBLISH`); a bigger change is left to anti-entropy anyway.
pub const MAX_TRACKED_CHANGES: usize = 64;

impl Default for LocalContent {
    fn default() -> Self {
        Self {
            shards: [vec![BTreeSet::new(); SHARDS], vec![BTreeSet::new(); SHARDS]],
            dirty: Default::default(),
            published: Default::default(),
            truncated: 0,
            unencodable: 0,
            changes: Some(Vec::new()),
            bulk: 0,
        }
    }
}

impl LocalContent {
    /// Replaces the whole content; only the shards that differ become dirty.
    // Shard numbers index several parallel arrays at once.
    #[allow(clippy::needless_range_loop)]
    pub fn set(
        &mut self,
        complete: impl IntoIterator<Item = Digest>,
        partial: impl IntoIterator<Item = Digest>,
    ) {
        let mut next: [Vec<BTreeSet<Digest>>; 2] =
            [vec![BTreeSet::new(); SHARDS], vec![BTreeSet::new(); SHARDS]];
        for digest in complete {
            next[0][shard_of(&digest) as usize].insert(digest);
        }
        for digest in partial {
            if !next[0][shard_of(&digest) as usize].contains(&digest) {
                next[1][shard_of(&digest) as usize].insert(digest);
            }
        }
        for shard in 0..SHARDS {
            let (old, new) = ([&self.shards[0][shard], &self.shards[1][shard]], [&next[0][shard], &next[1][shard]]);
            if old == new {
                continue;
            }
            for kind in Kind::ALL {
                let k = kind.index();
                if old[k] != new[k] {
                    self.dirty[k].insert(shard as u8);
                }
            }
            let mut noted = Vec::new();
            noted.extend(new[0].difference(old[0]).map(|d| ContentChange::Complete(*d)));
            noted.extend(new[1].difference(old[1]).map(|d| ContentChange::Partial(*d)));
            noted.extend(
                old[0].iter().chain(old[1]).filter(|d| !new[0].contains(*d) && !new[1].contains(*d)).map(|d| ContentChange::Removed(*d)),
            );
            for change in noted {
                self.note(change);
            }
        }
        self.shards = next;
    }

    /// Applies incremental changes.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = ContentChange>) {
        for change in changes {
            let (digest, into) = match change {
                ContentChange::Complete(digest) => (digest, Some(Kind::Complete)),
                ContentChange::Partial(digest) => (digest, Some(Kind::Partial)),
                ContentChange::Removed(digest) => (digest, None),
            };
            let shard = shard_of(&digest);
            // A complete blob is never also advertised as partial.
            if into == Some(Kind::Partial) && self.shards[0][shard as usize].contains(&digest) {
                continue;
            }
            let mut any = false;
            for kind in Kind::ALL {
                let set = &mut self.shards[kind.index()][shard as usize];
                let changed = if Some(kind) == into {
                    set.insert(digest)
                } else {
                    set.remove(&digest)
                };
                if changed {
                    self.dirty[kind.index()].insert(shard);
                    any = true;
                }
            }
            if any {
                self.note(change);
            }
        }
    }

    fn note(&mut self, change: ContentChange) {
        match &mut self.changes {
            Some(changes) if changes.len() < MAX_TRACKED_CHANGES => changes.push(change),
            Some(changes) => {
                self.bulk = changes.len() as u64 + 1;
                self.changes = None;
            }
            None => self.bulk += 1,
        }
    }

    /// The per-blob changes since the last call, or after a bulk change how many there were
    /// (anti-entropy alone carries them).
    pub fn take_changes(&mut self) -> Result<Vec<ContentChange>, u64> {
        match self.changes.replace(Vec::new()) {
            Some(changes) => Ok(changes),
            None => Err(std::mem::take(&mut self.bulk)),
        }
    }

    /// Whether this node advertises the digest (and how).
    pub fn has(&self, digest: &Digest) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|kind| self.shards[kind.index()][shard_of(digest) as usize].contains(digest))
    }

    /// The key updates that bring the published state up to date. Re-encoding an unchanged
    /// shard is harmless: chitchat does not bump a key whose value is unchanged.
    pub fn take_updates(&mut self) -> Vec<KeyUpdate> {
        let mut updates = Vec::new();
        for kind in Kind::ALL {
            let k = kind.index();
            for shard in std::mem::take(&mut self.dirty[k]) {
                let key = shard_key(kind, shard);
                let set = &self.shards[k][shard as usize];
                if set.is_empty() {
                    if self.published[k].remove(&shard) {
                        updates.push(KeyUpdate::Delete(key));
                    }
                    continue;
                }
                let mut keys: Vec<u64> = set.iter().map(filter_key).collect();
                keys.sort_unstable();
                keys.dedup();
                if keys.len() > MAX_SHARD_ENTRIES {
                    self.truncated += (keys.len() - MAX_SHARD_ENTRIES) as u64;
                    keys.truncate(MAX_SHARD_ENTRIES);
                }
                match encode_shard(&keys) {
                    Ok(value) => {
                        self.published[k].insert(shard);
                        updates.push(KeyUpdate::Set(key, value));
                    }
                    Err(_) => self.unencodable += 1,
                }
            }
        }
        updates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A digest in shard `shard` whose filter key is derived from `n`.
    fn digest(shard: u8, n: u64) -> Digest {
        let mut d = [0u8; 32];
        d[0] = shard << 5;
        d[8..16].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        Digest::from_sha256_bytes(d)
    }

    fn value_of(updates: &[KeyUpdate], key: &str) -> Option<String> {
        updates.iter().find_map(|u| match u {
            KeyUpdate::Set(k, v) if k == key => Some(v.clone()),
            _ => None,
        })
    }

    #[test]
    fn per_blob_changes_are_tracked_until_a_bulk_change() {
        let mut local = LocalContent::default();
        let (a, b, c) = (digest(1, 1), digest(1, 2), digest(7, 3));
        local.set([a], [b]);
        let mut got = local.take_changes().expect("per-blob changes");
        got.sort_by_key(|c| format!("{c:?}"));
        let mut want = vec![ContentChange::Complete(a), ContentChange::Partial(b)];
        want.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(got, want);
        local.set([a, b], [c]);
        let mut got = local.take_changes().expect("per-blob changes");
        got.sort_by_key(|c| format!("{c:?}"));
        let mut want = vec![ContentChange::Complete(b), ContentChange::Partial(c)];
        want.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(got, want);
        local.set([b], []);
        let mut got = local.take_changes().expect("per-blob changes");
        got.sort_by_key(|c| format!("{c:?}"));
        let mut want = vec![ContentChange::Removed(a), ContentChange::Removed(c)];
        want.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(got, want);
        local.apply([ContentChange::Complete(b), ContentChange::Removed(c)]);
        assert_eq!(local.take_changes(), Ok(vec![]), "no-op changes are not rumored");
        // One past the bound (b removed, 65 new): a bulk change, counted in changes.
        local.set((0..=MAX_TRACKED_CHANGES as u64).map(|i| digest((i % 8) as u8, 100 + i)), []);
        assert_eq!(local.take_changes(), Err(MAX_TRACKED_CHANGES as u64 + 2));
        assert_eq!(local.take_changes(), Ok(vec![]));
    }

    #[test]
    fn filters_have_no_false_negatives_and_few_false_positives() {
        for n in [1usize, 2, 3, 10, 250, 2_000] {
            let keys: BTreeSet<u64> = (0..n as u64).map(|i| filter_key(&digest(0, i))).collect();
            let keys: Vec<u64> = keys.into_iter().collect();
            let value = encode_shard(&keys).unwrap();
            assert!(value.starts_with('2'));
            let filter = decode_shard(&value).unwrap();
            assert_eq!(filter.entries() as usize, n);
            assert!(keys.iter().all(|k| filter.contains(*k)), "false negative at n={n}");
            if n >= 250 {
                // ~1.2-1.6 bytes per entry.
                assert!(filter.bytes() <= n * 16 / 10, "{} bytes for {n}", filter.bytes());
            }
        }
        let keys: Vec<u64> = {
            let set: BTreeSet<u64> = (0..2_000u64).map(|i| filter_key(&digest(0, i))).collect();
            set.into_iter().collect()
        };
        let filter = decode_shard(&encode_shard(&keys).unwrap()).unwrap();
        let misses = 200_000u64;
        let fp = (0..misses).filter(|i| filter.contains(filter_key(&digest(0, 1_000_000 + i)))).count();
        let rate = fp as f64 / misses as f64;
        assert!(rate < 0.006 && rate > 0.002, "false-positive rate {rate}");
    }

    /// `Layout::probe` is what the index uses instead of xorf's `contains`: they must agree on
    /// every key, members and non-members, for every filter size (else false negatives).
    #[test]
    fn layout_probe_agrees_with_xorf() {
        let mut checked = 0;
        for n in [1usize, 2, 5, 60, 91, 250, 303, 2_000, 20_000] {
            let keys: BTreeSet<u64> = (0..n as u64).map(|i| filter_key(&digest(3, i * 7 + n as u64))).collect();
            let keys: Vec<u64> = keys.into_iter().collect();
            let filter = decode_shard(&encode_shard(&keys).unwrap()).unwrap();
            let layout = filter.layout();
            assert_eq!(layout.len(), filter.fingerprints().len());
            let fp = filter.fingerprints();
            let probe_says = |key: u64| {
                let p = layout.probe(key);
                fp[p.positions[0]] ^ fp[p.positions[1]] ^ fp[p.positions[2]] == p.fingerprint
            };
            for key in keys.iter().copied().chain((0..5_000u64).map(|i| filter_key(&digest(3, 1 << 40 | i)))) {
                assert_eq!(probe_says(key), filter.contains(key), "n={n} key={key:x}");
                assert!(layout.probe(key).positions.iter().all(|&p| p < layout.len()));
                checked += 1;
            }
        }
        assert!(checked > 45_000);
    }

    #[test]
    fn decode_rejects_garbage() {
        assert_eq!(decode_shard("1AAAA").err(), Some(DecodeError::UnknownFormat));
        assert_eq!(decode_shard("2***").err(), Some(DecodeError::BadBase64));
        assert_eq!(decode_shard("2AAAA").err(), Some(DecodeError::Malformed));
        assert_eq!(encode_shard(&[]), Err(EncodeError::Empty));
        let good = encode_shard(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]).unwrap();
        let raw = URL_SAFE_NO_PAD.decode(&good[1..]).unwrap();
        let reencode = |raw: &[u8]| {
            let mut s = String::from("2");
            URL_SAFE_NO_PAD.encode_string(raw, &mut s);
            s
        };
        // A segment length the fingerprints do not fit, one too large, a cut fingerprint array.
        for bad in [
            { let mut r = raw.clone(); r[12] = (usize::BITS - (raw.len() - HEADER).leading_zeros()) as u8; r },
            { let mut r = raw.clone(); r[12] = 30; r },
            raw[..raw.len() - 1].to_vec(),
        ] {
            assert_eq!(decode_shard(&reencode(&bad)).err(), Some(DecodeError::Malformed));
        }
        let mut too_many = raw.clone();
        too_many[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode_shard(&reencode(&too_many)).err(), Some(DecodeError::TooLong));
    }

    #[test]
    fn keys_parse() {
        assert_eq!(parse_shard_key("c/7"), Some((Kind::Complete, 7)));
        assert_eq!(parse_shard_key("p/0"), Some((Kind::Partial, 0)));
        assert_eq!(parse_shard_key("addr"), None);
        assert_eq!(parse_shard_key("c/8"), None);
        assert_eq!(parse_shard_key("c/0a"), None, "the old 256-shard keys are not ours");
        assert_eq!(parse_shard_key(&shard_key(Kind::Partial, 3)), Some((Kind::Partial, 3)));
    }

    #[test]
    fn a_change_touches_one_key() {
        let mut local = LocalContent::default();
        local.set((0..64u64).map(|i| digest((i % 8) as u8, i)), []);
        assert_eq!(local.take_updates().len(), SHARDS);
        local.apply([ContentChange::Complete(digest(5, 1_000))]);
        let updates = local.take_updates();
        assert_eq!(updates.len(), 1);
        assert!(matches!(&updates[0], KeyUpdate::Set(k, _) if k == "c/5"));
        // Re-setting the same content changes nothing.
        local.set((0..64u64).map(|i| digest((i % 8) as u8, i)).chain([digest(5, 1_000)]), []);
        assert!(local.take_updates().is_empty());
    }

    #[test]
    fn partial_then_complete_then_removed() {
        let d = digest(1, 42);
        let mut local = LocalContent::default();
        local.apply([ContentChange::Partial(d)]);
        assert_eq!(local.has(&d), Some(Kind::Partial));
        let updates = local.take_updates();
        assert_eq!(updates.len(), 1);
        let filter = decode_shard(&value_of(&updates, "p/1").unwrap()).unwrap();
        assert!(filter.contains(filter_key(&d)));
        local.apply([ContentChange::Complete(d)]);
        assert_eq!(local.has(&d), Some(Kind::Complete));
        let updates = local.take_updates();
        assert!(value_of(&updates, "c/1").is_some());
        assert!(updates.contains(&KeyUpdate::Delete("p/1".into())));
        local.apply([ContentChange::Partial(d)]); // ignored: complete wins
        assert!(local.take_updates().is_empty());
        local.apply([ContentChange::Removed(d)]);
        assert_eq!(local.take_updates(), vec![KeyUpdate::Delete("c/1".into())]);
        assert_eq!(local.has(&d), None);
    }
}

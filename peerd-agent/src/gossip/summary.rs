//! Content summaries: what one node holds, as a few small chitchat keys (PROTOCOL.md).
//!
//! A digest's first byte picks one of 256 shards; the shard's value lists the next two bytes of
//! every digest in it. A change touches one key of about 100 bytes, so it travels as a tiny delta,
//! and the whole summary costs 2 bytes per blob: 1,000 nodes x 10,000 blobs stay near 27 MB of
//! cluster state instead of the 640 MB that one key per blob would take.

use std::collections::BTreeSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A raw sha256 digest.
pub type Digest = [u8; 32];

/// Number of shards, one per value of the digest's first byte.
pub const SHARDS: usize = 256;

/// Entries kept per shard; beyond this the shard is truncated (counted) so one value always fits
/// a datagram: 8,192 x 2 bytes = 22 KB of base64, 2 million blobs per node before it matters.
pub const MAX_SHARD_ENTRIES: usize = 8_192;

/// Version tag at the start of every shard value, so the encoding can change later.
const FORMAT_V1: char = '1';

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

/// The 24-bit fingerprint of a digest: shard (first byte) and suffix (next two bytes).
pub fn fingerprint(digest: &Digest) -> (u8, u16) {
    (digest[0], u16::from_be_bytes([digest[1], digest[2]]))
}

/// The chitchat key of one shard, e.g. `c/3f`.
pub fn shard_key(kind: Kind, shard: u8) -> String {
    format!("{}{shard:02x}", kind.prefix())
}

/// Parses a shard key; `None` for any other key (node metadata).
pub fn parse_shard_key(key: &str) -> Option<(Kind, u8)> {
    let kind = Kind::ALL.into_iter().find(|kind| key.starts_with(kind.prefix()))?;
    let hex = &key[2..];
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok().map(|shard| (kind, shard))
}

/// Encodes sorted, deduplicated suffixes as a shard value.
pub fn encode_shard(suffixes: &[u16]) -> String {
    let mut raw = Vec::with_capacity(suffixes.len() * 2);
    for suffix in suffixes {
        raw.extend_from_slice(&suffix.to_be_bytes());
    }
    let mut out = String::with_capacity(1 + raw.len().div_ceil(3) * 4);
    out.push(FORMAT_V1);
    URL_SAFE_NO_PAD.encode_string(&raw, &mut out);
    out
}

/// Why a received shard value was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown shard format")]
    UnknownFormat,
    #[error("shard value is not valid base64")]
    BadBase64,
    #[error("shard value has an odd byte count")]
    OddLength,
    #[error("shard value has more than {MAX_SHARD_ENTRIES} entries")]
    TooLong,
}

/// Decodes a shard value into sorted, deduplicated suffixes (a peer's order is not trusted).
pub fn decode_shard(value: &str) -> Result<Vec<u16>, DecodeError> {
    if value.is_empty() {
        return Ok(Vec::new());
    }
    let body = value.strip_prefix(FORMAT_V1).ok_or(DecodeError::UnknownFormat)?;
    let raw = URL_SAFE_NO_PAD.decode(body).map_err(|_| DecodeError::BadBase64)?;
    if raw.len() % 2 != 0 {
        return Err(DecodeError::OddLength);
    }
    if raw.len() / 2 > MAX_SHARD_ENTRIES {
        return Err(DecodeError::TooLong);
    }
    let mut suffixes: Vec<u16> = raw
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    suffixes.sort_unstable();
    suffixes.dedup();
    Ok(suffixes)
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
    /// Per-blob changes since the last `take_changes`, for rumors; `None` once there were more
    /// than `rumor::MAX_PUBLISH` (a bulk change: anti-entropy carries it).
    changes: Option<Vec<ContentChange>>,
    /// How many changes the current bulk change counts (while `changes` is `None`).
    bulk: u64,
}

/// Per-blob changes remembered between two `take_changes`: no more than rumors carry at once.
use super::rumor::MAX_PUBLISH as MAX_TRACKED_CHANGES;

impl Default for LocalContent {
    fn default() -> Self {
        Self {
            shards: [vec![BTreeSet::new(); SHARDS], vec![BTreeSet::new(); SHARDS]],
            dirty: Default::default(),
            published: Default::default(),
            truncated: 0,
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
            next[0][digest[0] as usize].insert(digest);
        }
        for digest in partial {
            if !next[0][digest[0] as usize].contains(&digest) {
                next[1][digest[0] as usize].insert(digest);
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
            let shard = digest[0];
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
            .find(|kind| self.shards[kind.index()][digest[0] as usize].contains(digest))
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
                let mut suffixes: Vec<u16> = set.iter().map(|d| fingerprint(d).1).collect();
                suffixes.dedup(); // digests are sorted, so equal suffixes are adjacent
                if suffixes.len() > MAX_SHARD_ENTRIES {
                    self.truncated += (suffixes.len() - MAX_SHARD_ENTRIES) as u64;
                    suffixes.truncate(MAX_SHARD_ENTRIES);
                }
                self.published[k].insert(shard);
                updates.push(KeyUpdate::Set(key, encode_shard(&suffixes)));
            }
        }
        updates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(a: u8, b: u8, c: u8, tail: u8) -> Digest {
        let mut d = [tail; 32];
        d[0] = a;
        d[1] = b;
        d[2] = c;
        d
    }

    #[test]
    fn per_blob_changes_are_tracked_until_a_bulk_change() {
        let mut local = LocalContent::default();
        let (a, b, c) = (digest(1, 0, 0, 1), digest(1, 0, 1, 2), digest(9, 9, 9, 3));
        local.set([a], [b]);
        let mut got = local.take_changes().expect("per-blob changes");
        got.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(got, vec![ContentChange::Complete(a), ContentChange::Partial(b)]);
        local.set([a, b], [c]);
        let mut got = local.take_changes().expect("per-blob changes");
        got.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(got, vec![ContentChange::Complete(b), ContentChange::Partial(c)]);
        local.set([b], []);
        let mut got = local.take_changes().expect("per-blob changes");
        got.sort_by_key(|c| format!("{c:?}"));
        assert_eq!(got, vec![ContentChange::Removed(a), ContentChange::Removed(c)]);
        local.apply([ContentChange::Complete(b), ContentChange::Removed(c)]);
        assert_eq!(local.take_changes(), Ok(vec![]), "no-op changes are not rumored");
        // One past the bound (b removed, 65 new): a bulk change, counted in changes.
        local.set((0..=MAX_TRACKED_CHANGES as u8).map(|i| digest(i, i, i, i)), []);
        assert_eq!(local.take_changes(), Err(MAX_TRACKED_CHANGES as u64 + 2));
        assert_eq!(local.take_changes(), Ok(vec![]));
    }

    #[test]
    fn shard_round_trip() {
        let suffixes = vec![0u16, 7, 300, u16::MAX];
        let value = encode_shard(&suffixes);
        assert!(value.starts_with('1'));
        assert_eq!(decode_shard(&value).unwrap(), suffixes);
        assert_eq!(decode_shard("").unwrap(), Vec::<u16>::new());
    }

    #[test]
    fn decode_rejects_garbage_and_sorts() {
        assert_eq!(decode_shard("2AAAA"), Err(DecodeError::UnknownFormat));
        assert_eq!(decode_shard("1***"), Err(DecodeError::BadBase64));
        assert_eq!(decode_shard("1AA"), Err(DecodeError::OddLength));
        let unsorted = {
            let mut s = String::from("1");
            URL_SAFE_NO_PAD.encode_string([0, 9, 0, 1, 0, 9], &mut s);
            s
        };
        assert_eq!(decode_shard(&unsorted).unwrap(), vec![1, 9]);
    }

    #[test]
    fn keys_parse() {
        assert_eq!(parse_shard_key("c/0a"), Some((Kind::Complete, 10)));
        assert_eq!(parse_shard_key("p/ff"), Some((Kind::Partial, 255)));
        assert_eq!(parse_shard_key("addr"), None);
        assert_eq!(parse_shard_key("c/zz"), None);
        assert_eq!(parse_shard_key(&shard_key(Kind::Partial, 3)), Some((Kind::Partial, 3)));
    }

    #[test]
    fn a_change_touches_one_key() {
        let mut local = LocalContent::default();
        local.set((0..=255u8).map(|i| digest(i, i, 1, 0)), []);
        assert_eq!(local.take_updates().len(), 256);
        local.apply([ContentChange::Complete(digest(5, 0, 2, 0))]);
        let updates = local.take_updates();
        assert_eq!(updates.len(), 1);
        assert!(matches!(&updates[0], KeyUpdate::Set(k, _) if k == "c/05"));
        // Re-setting the same content changes nothing.
        local.set(
            (0..=255u8)
                .map(|i| digest(i, i, 1, 0))
                .chain([digest(5, 0, 2, 0)]),
            [],
        );
        assert!(local.take_updates().is_empty());
    }

    #[test]
    fn partial_then_complete_then_removed() {
        let d = digest(9, 1, 2, 3);
        let mut local = LocalContent::default();
        local.apply([ContentChange::Partial(d)]);
        assert_eq!(local.has(&d), Some(Kind::Partial));
        assert_eq!(
            local.take_updates(),
            vec![KeyUpdate::Set("p/09".into(), encode_shard(&[0x0102]))]
        );
        local.apply([ContentChange::Complete(d)]);
        assert_eq!(local.has(&d), Some(Kind::Complete));
        let updates = local.take_updates();
        assert!(updates.contains(&KeyUpdate::Set("c/09".into(), encode_shard(&[0x0102]))));
        assert!(updates.contains(&KeyUpdate::Delete("p/09".into())));
        local.apply([ContentChange::Partial(d)]); // ignored: complete wins
        assert!(local.take_updates().is_empty());
        local.apply([ContentChange::Removed(d)]);
        assert_eq!(local.take_updates(), vec![KeyUpdate::Delete("c/09".into())]);
        assert_eq!(local.has(&d), None);
    }

    #[test]
    fn equal_fingerprints_are_published_once() {
        let mut local = LocalContent::default();
        local.set([digest(1, 2, 3, 4), digest(1, 2, 3, 5)], []);
        assert_eq!(
            local.take_updates(),
            vec![KeyUpdate::Set("c/01".into(), encode_shard(&[0x0203]))]
        );
    }
}

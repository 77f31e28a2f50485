//! Bitset of which pieces of a blob are present. One bit per piece keeps the map tiny even for
//! multi-GiB layers (a 4 GiB blob at 1 MiB pieces is 512 bytes), so it can be rewritten
//! atomically with the metadata on every piece.

/// Fixed-length bitset with a cached population count (so "is it complete?" is O(1)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PieceMap {
    words: Vec<u64>,
    len: usize,
    count: usize,
}

impl PieceMap {
    /// An empty map for `len` pieces.
    pub(crate) fn new(len: usize) -> Self {
        PieceMap { words: vec![0; len.div_ceil(64)], len, count: 0 }
    }

    /// A map with every piece present.
    pub(crate) fn full(len: usize) -> Self {
        let mut m = Self::new(len);
        for i in 0..len {
            m.set(i);
        }
        m
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Number of present pieces.
    pub(crate) fn count(&self) -> usize {
        self.count
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.count == self.len
    }

    /// Out-of-range indices read as absent rather than panicking: callers validate indices
    /// separately and an absent piece is never served.
    pub(crate) fn get(&self, i: usize) -> bool {
        i < self.len && self.words[i / 64] & (1 << (i % 64)) != 0
    }

    /// Marks piece `i` present; returns whether it was newly set. Out-of-range is a no-op.
    pub(crate) fn set(&mut self, i: usize) -> bool {
        if i >= self.len || self.get(i) {
            return false;
        }
        self.words[i / 64] |= 1 << (i % 64);
        self.count += 1;
        true
    }

    /// Marks piece `i` absent; returns whether it was set.
    pub(crate) fn clear(&mut self, i: usize) -> bool {
        if !self.get(i) {
            return false;
        }
        self.words[i / 64] &= !(1 << (i % 64));
        self.count -= 1;
        true
    }

    /// True if every piece in `range` is present (an empty range is trivially present).
    pub(crate) fn all_in(&self, range: std::ops::Range<usize>) -> bool {
        range.into_iter().all(|i| self.get(i))
    }

    /// Indices of present pieces, ascending.
    #[cfg(test)]
    pub(crate) fn iter_present(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.len).filter(|&i| self.get(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn basics() {
        let mut m = PieceMap::new(130);
        assert_eq!(m.count(), 0);
        assert!(m.set(0) && m.set(64) && m.set(129));
        assert!(!m.set(64), "double set reports false");
        assert!(!m.set(130), "out of range is a no-op");
        assert!(!m.get(130));
        assert_eq!(m.iter_present().collect::<Vec<_>>(), vec![0, 64, 129]);
        assert!(m.clear(64) && !m.clear(64));
        assert_eq!(m.count(), 2);
        assert!(PieceMap::full(130).is_complete());
        assert!(PieceMap::new(0).is_complete());
        assert!(m.all_in(0..1) && !m.all_in(0..2) && m.all_in(5..5));
    }

    proptest! {
        /// The bitset behaves exactly like a set of indices below `len`.
        #[test]
        fn matches_model(len in 0usize..300, ops in proptest::collection::vec((any::<bool>(), 0usize..320), 0..200)) {
            let mut m = PieceMap::new(len);
            let mut model = BTreeSet::new();
            for (set, i) in ops {
                if set {
                    prop_assert_eq!(m.set(i), i < len && model.insert(i));
                } else {
                    prop_assert_eq!(m.clear(i), model.remove(&i));
                }
                prop_assert_eq!(m.count(), model.len());
                prop_assert_eq!(m.is_complete(), model.len() == len);
            }
            prop_assert_eq!(m.iter_present().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
            for i in 0..len + 5 {
                prop_assert_eq!(m.get(i), model.contains(&i));
            }
        }
    }
}

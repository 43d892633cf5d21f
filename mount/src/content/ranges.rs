//! A set of byte ranges: which bytes of a cached file are present.

use std::collections::BTreeMap;
use std::ops::Range;

/// Disjoint, non-adjacent, non-empty ranges (`start -> end`), and their total length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RangeSet {
    map: BTreeMap<u64, u64>,
    total: u64,
}

impl RangeSet {
    /// From ranges as stored; `None` unless they are sorted, non-empty, disjoint and
    /// non-adjacent (the form [`RangeSet::to_vec`] produces) and end at or before `limit`.
    pub fn from_stored(ranges: &[(u64, u64)], limit: u64) -> Option<Self> {
        let mut set = RangeSet::default();
        let mut prev_end: Option<u64> = None;
        for &(s, e) in ranges {
            if s >= e || e > limit || prev_end.is_some_and(|p| s <= p) {
                return None;
            }
            set.map.insert(s, e);
            set.total += e - s;
            prev_end = Some(e);
        }
        Some(set)
    }

    pub fn to_vec(&self) -> Vec<(u64, u64)> {
        self.map.iter().map(|(&s, &e)| (s, e)).collect()
    }

    /// Bytes present.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn insert(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let (mut start, mut end) = (r.start, r.end);
        // Ranges that overlap or touch [start, end]: those starting at or before `end` and
        // ending at or after `start`.
        let doomed: Vec<(u64, u64)> = self
            .map
            .range(..=end)
            .rev()
            .take_while(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in doomed {
            self.map.remove(&s);
            self.total -= e - s;
            start = start.min(s);
            end = end.max(e);
        }
        self.map.insert(start, end);
        self.total += end - start;
    }

    pub fn remove(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        let hit: Vec<(u64, u64)> = self
            .map
            .range(..r.end)
            .rev()
            .take_while(|&(_, &e)| e > r.start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in hit {
            self.map.remove(&s);
            self.total -= e - s;
            if s < r.start {
                self.map.insert(s, r.start);
                self.total += r.start - s;
            }
            if e > r.end {
                self.map.insert(r.end, e);
                self.total += e - r.end;
            }
        }
    }

    /// Whether every byte of `r` is present (true for an empty `r`).
    pub fn contains(&self, r: Range<u64>) -> bool {
        if r.is_empty() {
            return true;
        }
        match self.map.range(..=r.start).next_back() {
            Some((_, &e)) => e >= r.end,
            None => false,
        }
    }

    /// The parts of `r` not present, in order.
    pub fn missing(&self, r: Range<u64>) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        if r.is_empty() {
            return out;
        }
        let mut at = r.start;
        // A range starting before `r` may cover its beginning.
        if let Some((_, &e)) = self.map.range(..=r.start).next_back() {
            at = at.max(e);
        }
        for (&s, &e) in self.map.range(r.start..r.end) {
            if s > at {
                out.push(at..s);
            }
            at = at.max(e);
        }
        if at < r.end {
            out.push(at..r.end);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn basics() {
        let mut s = RangeSet::default();
        s.insert(10..20);
        s.insert(30..40);
        assert_eq!(s.to_vec(), vec![(10, 20), (30, 40)]);
        assert!(s.contains(12..20) && !s.contains(12..21) && !s.contains(20..30));
        assert_eq!(s.missing(0..50), vec![0..10, 20..30, 40..50]);
        s.insert(20..30); // touching both: one range
        assert_eq!(s.to_vec(), vec![(10, 40)]);
        s.remove(15..16);
        assert_eq!(s.to_vec(), vec![(10, 15), (16, 40)]);
        assert_eq!(s.total(), 29);
        assert_eq!(RangeSet::from_stored(&s.to_vec(), 40), Some(s.clone()));
        assert_eq!(RangeSet::from_stored(&s.to_vec(), 39), None);
        assert_eq!(RangeSet::from_stored(&[(1, 5), (5, 7)], 10), None);
        assert_eq!(RangeSet::from_stored(&[(5, 7), (1, 2)], 10), None);
        assert_eq!(RangeSet::from_stored(&[(3, 3)], 10), None);
    }

    proptest! {
        /// Against a per-byte model.
        #[test]
        fn matches_a_bitmap(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u64..20), 0..40),
                            q in (0u64..64, 0u64..30)) {
            let mut s = RangeSet::default();
            let mut model = [false; 100];
            for (add, start, len) in ops {
                let r = start..start + len;
                if add { s.insert(r.clone()) } else { s.remove(r.clone()) }
                for b in r { model[b as usize] = add; }
            }
            prop_assert_eq!(s.total(), model.iter().filter(|&&b| b).count() as u64);
            let v = s.to_vec();
            let back = RangeSet::from_stored(&v, 100);
            prop_assert_eq!(back.as_ref(), Some(&s));
            let r = q.0..q.0 + q.1;
            prop_assert_eq!(s.contains(r.clone()), r.clone().all(|b| model[b as usize]));
            let mut want = Vec::new();
            let mut cur: Option<Range<u64>> = None;
            for b in r.clone() {
                if model[b as usize] {
                    if let Some(c) = cur.take() { want.push(c); }
                } else {
                    match cur.as_mut() { Some(c) => c.end = b + 1, None => cur = Some(b..b + 1) }
                }
            }
            want.extend(cur);
            prop_assert_eq!(s.missing(r), want);
        }
    }
}

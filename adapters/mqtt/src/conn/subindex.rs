//! Where a session's subscription with a given filter sits in its record.

use std::collections::HashMap;

use crate::session::Subscription;

/// Up to this many subscriptions a look-up scans the record (most sessions hold one or
/// a few); past it, a hash map indexes them, so that a SUBSCRIBE or UNSUBSCRIBE costs
/// each filter O(1) however many the session holds.
const SCAN_MAX: usize = 16;

/// Filter → its place in the session record's subscriptions. Nothing while the session
/// holds few: an idle connection with one subscription pays no map (a hash map's first
/// table and a second copy of the filter were ~200 bytes of every idle connection).
/// Boxed: an empty hash map is 48 bytes of the connection's state, a box 8.
#[allow(clippy::box_collection)]
#[derive(Debug, Default)]
pub(super) struct SubIndex(Option<Box<HashMap<String, usize>>>);

impl SubIndex {
    /// The index of `subs`.
    pub(super) fn new(subs: &[Subscription]) -> Self {
        let mut index = Self::default();
        index.build(subs);
        index
    }

    fn build(&mut self, subs: &[Subscription]) {
        self.0 = (subs.len() > SCAN_MAX).then(|| {
            Box::new(
                subs.iter()
                    .enumerate()
                    .map(|(i, s)| (s.filter.clone(), i))
                    .collect(),
            )
        });
    }

    /// The place of the subscription with `filter`.
    pub(super) fn find(&self, subs: &[Subscription], filter: &str) -> Option<usize> {
        match &self.0 {
            Some(map) => map.get(filter).copied(),
            None => subs.iter().position(|s| s.filter == filter),
        }
    }

    /// Add `sub` at the end of `subs`.
    pub(super) fn push(&mut self, subs: &mut Vec<Subscription>, sub: Subscription) {
        // Grown one slot at a time while small (a vector's first growth makes room for
        // four, 160 bytes, for the one subscription most sessions hold).
        if subs.len() == subs.capacity() && subs.len() < SCAN_MAX {
            subs.reserve_exact(1);
        }
        subs.push(sub);
        match &mut self.0 {
            Some(map) => {
                let i = subs.len() - 1;
                map.insert(subs[i].filter.clone(), i);
            }
            None if subs.len() > SCAN_MAX => self.build(subs),
            None => {}
        }
    }

    /// Take the subscription with `filter` out of `subs`; whether there was one.
    pub(super) fn remove(&mut self, subs: &mut Vec<Subscription>, filter: &str) -> bool {
        let Some(i) = self.find(subs, filter) else {
            return false;
        };
        subs.swap_remove(i);
        if let Some(map) = &mut self.0 {
            map.remove(filter);
            if let Some(moved) = subs.get(i) {
                map.insert(moved.filter.clone(), i);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{QoS, SubOptions};

    fn sub(filter: String) -> Subscription {
        Subscription {
            filter,
            options: SubOptions {
                qos: QoS::AtLeastOnce,
                no_local: false,
                retain_as_published: false,
                retain_handling: 0,
            },
            id: None,
        }
    }

    /// Scanned or mapped, the index finds every subscription at its place as they are
    /// added and removed (past `SCAN_MAX` and back).
    #[test]
    fn finds_every_subscription_scanned_or_mapped() {
        let mut subs = Vec::new();
        let mut index = SubIndex::default();
        let n = SCAN_MAX * 2 + 3;
        for i in 0..n {
            index.push(&mut subs, sub(format!("t/{i}")));
            assert_eq!(index.0.is_some(), subs.len() > SCAN_MAX);
        }
        let check = |index: &SubIndex, subs: &[Subscription]| {
            for (i, s) in subs.iter().enumerate() {
                assert_eq!(index.find(subs, &s.filter), Some(i), "{}", s.filter);
            }
            assert_eq!(index.find(subs, "absent"), None);
        };
        check(&index, &subs);
        for i in (0..n).step_by(3) {
            assert!(index.remove(&mut subs, &format!("t/{i}")));
            assert!(!index.remove(&mut subs, &format!("t/{i}")));
            check(&index, &subs);
        }
        let rebuilt = SubIndex::new(&subs);
        check(&rebuilt, &subs);
        // Small: one slot per subscription.
        let mut few = Vec::new();
        let mut index = SubIndex::default();
        index.push(&mut few, sub("a".into()));
        assert_eq!(few.capacity(), 1);
        assert!(index.0.is_none());
    }
}

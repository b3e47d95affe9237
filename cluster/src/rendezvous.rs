//! Which live gateway owns a shard: rendezvous (highest-random-weight) hashing.
//!
//! `score(node, shard) = splitmix64(fnv1a(node) ^ (shard * golden))`; the live nodes
//! ordered by score, highest first (ties, never seen in practice, by name), give the
//! shard's owner and then its warm standby. Every gateway computes the same order from
//! the same live set, with no coordination. A node that joins takes exactly the shards
//! where it now ranks first (about `S / N`); a node that leaves gives up exactly the
//! shards it ranked first in, each to the node ranked second, which was its standby and
//! is already caught up.

use crate::placement::ShardId;
use crate::{fnv1a, splitmix64};

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// A node's score for a shard.
pub fn score(node: &str, shard: ShardId) -> u64 {
    splitmix64(fnv1a(node.as_bytes()) ^ u64::from(shard).wrapping_mul(GOLDEN))
}

/// The nodes in their order for `shard`: owner first, then the standby, then the rest.
pub fn ranking<'a>(nodes: &[&'a str], shard: ShardId) -> Vec<&'a str> {
    let mut ranked: Vec<(u64, &'a str)> = nodes.iter().map(|n| (score(n, shard), *n)).collect();
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
    ranked.dedup_by(|a, b| a.1 == b.1);
    ranked.into_iter().map(|(_, n)| n).collect()
}

/// Who should own `shard` and who should stand by for it, among `nodes`.
pub fn owner_and_standby<'a>(
    nodes: &[&'a str],
    shard: ShardId,
) -> (Option<&'a str>, Option<&'a str>) {
    let r = ranking(nodes, shard);
    (r.first().copied(), r.get(1).copied())
}

/// The owner and standby of every shard `0..shards`.
pub fn assignment<'a>(nodes: &[&'a str], shards: u16) -> Vec<(Option<&'a str>, Option<&'a str>)> {
    (0..shards).map(|s| owner_and_standby(nodes, s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn names() -> impl Strategy<Value = Vec<String>> {
        proptest::collection::btree_set("[a-z0-9-]{1,12}", 1..8)
            .prop_map(|s| s.into_iter().collect())
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    proptest! {
        /// The order does not depend on how the live set was listed.
        #[test]
        fn same_answer_whatever_the_listing_order(nodes in names(), shard in 0u16..512, rot in 0usize..8) {
            let a = refs(&nodes);
            let mut b = a.clone();
            let len = b.len();
            b.rotate_left(rot % len);
            b.reverse();
            prop_assert_eq!(ranking(&a, shard), ranking(&b, shard));
        }

        /// A join moves exactly the shards the new node now ranks first in, each from
        /// its old owner; every other shard keeps its owner.
        #[test]
        fn a_join_moves_only_the_joiners_share(nodes in names(), joiner in "[A-Z]{1,8}", shards in 1u16..128) {
            let before = refs(&nodes);
            let mut after = before.clone();
            after.push(joiner.as_str());
            for s in 0..shards {
                let (old, _) = owner_and_standby(&before, s);
                let (new, standby) = owner_and_standby(&after, s);
                if new == Some(joiner.as_str()) {
                    // The old owner becomes the standby: it holds the log already.
                    prop_assert_eq!(standby, old);
                } else {
                    prop_assert_eq!(new, old, "shard {} moved between old nodes", s);
                }
            }
        }

        /// A leave moves exactly the leaver's shards, each to its standby.
        #[test]
        fn a_leave_moves_only_the_leavers_shards_to_their_standby(nodes in names(), pick in 0usize..8, shards in 1u16..128) {
            prop_assume!(nodes.len() >= 2);
            let before = refs(&nodes);
            let leaver = before[pick % before.len()];
            let after: Vec<&str> = before.iter().copied().filter(|n| *n != leaver).collect();
            for s in 0..shards {
                let (old, standby) = owner_and_standby(&before, s);
                let (new, _) = owner_and_standby(&after, s);
                if old == Some(leaver) {
                    prop_assert_eq!(new, standby);
                } else {
                    prop_assert_eq!(new, old);
                }
            }
        }

        /// Owner and standby are two different live nodes whenever there are two.
        #[test]
        fn owner_and_standby_differ(nodes in names(), shard in 0u16..512) {
            let n = refs(&nodes);
            let (o, s) = owner_and_standby(&n, shard);
            prop_assert!(o.is_some());
            let live: BTreeSet<&str> = n.iter().copied().collect();
            prop_assert!(live.contains(o.unwrap()));
            match s {
                Some(s) => { prop_assert!(n.len() >= 2); prop_assert_ne!(Some(s), o); }
                None => prop_assert_eq!(n.len(), 1),
            }
        }
    }

    /// Gateways named as operators name them: the shards spread evenly enough that no
    /// gateway owns more than twice its share (16 shards over 3, 64 over 4 and 8).
    #[test]
    fn shards_spread_over_typical_gateway_names() {
        for (n, shards) in [(3usize, 16u16), (4, 64), (8, 64), (3, 8)] {
            let names: Vec<String> = (1..=n).map(|i| format!("gw-{i}")).collect();
            let nodes = refs(&names);
            let mut owned = vec![0u32; n];
            for (o, _) in assignment(&nodes, shards) {
                owned[nodes.iter().position(|x| Some(*x) == o).unwrap()] += 1;
            }
            let share = f64::from(shards) / n as f64;
            for (i, c) in owned.iter().enumerate() {
                assert!(
                    f64::from(*c) <= 2.0 * share && *c >= 1,
                    "{} owns {c} of {shards} shards (share {share:.1}): {owned:?}",
                    nodes[i]
                );
            }
        }
    }
}

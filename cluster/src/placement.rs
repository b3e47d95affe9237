//! Where a topic lives: `shard_of(topic) = splitmix64(fnv1a(topic)) % shards`.
//!
//! The cluster records each topic's shard the first time it is created (a KV entry,
//! `docs/design/sharding.md` section 1), so a topic never moves silently if the shard
//! count ever changes; this function only proposes the shard for a new topic. A group's
//! home is the shard of its first topic; `%RETRY%<g>` and `%DLQ%<g>` follow the group.

pub use mqgate_core::shard::{shard_of, ShardId, MAX_SHARDS};

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The pinned values are checked where the function lives (`mqgate_core::shard`).

    #[test]
    fn topics_spread_over_the_shards() {
        for shards in [2u16, 8, 16, 64] {
            let mut counts = vec![0u32; usize::from(shards)];
            let n = 20_000u32;
            for i in 0..n {
                counts[usize::from(shard_of(&format!("sensor/{i}/temp"), shards))] += 1;
            }
            let mean = f64::from(n) / f64::from(shards);
            for (s, c) in counts.iter().enumerate() {
                let off = (f64::from(*c) - mean).abs() / mean;
                assert!(
                    off < 0.25,
                    "shard {s} of {shards} holds {c} topics, mean {mean}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn always_a_valid_shard(topic in ".{0,64}", shards in 1u16..=MAX_SHARDS) {
            let s = shard_of(&topic, shards);
            prop_assert!(s < shards);
            prop_assert_eq!(s, shard_of(&topic, shards));
        }
    }
}

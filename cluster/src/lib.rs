//! mqgate's scale-out (issue 16, `docs/design/sharding.md`): the decisions every
//! gateway of a cluster must take alike without talking to each other, and the
//! machinery that moves shards between gateways.
//!
//! - [`placement`]: which shard a topic (or a group) lives in.
//! - [`rendezvous`]: which live gateway owns a shard, and which is its warm standby.
//! - [`nodes`]: which gateways are alive (a TTL key each in a NATS KV bucket).
//! - [`manager`]: one task per shard on every gateway that follows, takes, keeps or
//!   hands over the shard's log (`mqgate_store::jetstream::ShardReplica`) as the
//!   ranking over the live gateways says.
//! - [`relay`]: requests about a shard relayed to its owner over core NATS.
//! - [`status`]: each shard's owner, standby and lag, read from NATS.
//! - `meta`: every gateway's follower of the routing state (shard 0's log).
//! - [`gateway`]: a broker core whose shards come and go with the manager's events,
//!   forwarding to shards owned elsewhere over the forward relay.
//!
//! Placement and ranking are functions of names only (stable 64-bit hashes, no process state), so two
//! gateways that see the same live set agree, and a version upgrade never moves a topic.

pub mod gateway;
pub mod manager;
mod meta;
pub mod nodes;
pub mod placement;
pub mod relay;
pub mod rendezvous;
pub mod status;

/// 64-bit FNV-1a and SplitMix64's finaliser: stable across builds, platforms and
/// versions; the core's (a sharded broker in one process places topics alike).
pub use mqgate_core::shard::{fnv1a, splitmix64};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_the_published_functions() {
        // FNV-1a test vectors (Fowler, Noll, Vo).
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        // SplitMix64 from seed 0: its first output is splitmix64(0).
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }
}

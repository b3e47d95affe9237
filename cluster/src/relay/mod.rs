//! Relays over core NATS between gateways (`docs/design/sharding.md` section 4).
//!
//! A shard's owner serves requests about it on `mqgate.<stream>.s.<NN>.<op>` in the
//! queue group `owner` while it owns the shard, so a request for a shard nobody owns
//! fails fast with *no responders*, and a request that meets an old owner after a move
//! is answered by its fenced store (an error), never as if it had been applied.
//! Requests are idempotent by construction (the destination's marks), so a caller
//! that hears nothing asks again: a lost request or a lost reply costs a retry, never a
//! loss or a duplicate.

pub(crate) mod codec;
pub mod consume;
pub mod forward;
pub mod publish;

/// The subject of operation `op` on `shard` in the cluster of `stream`.
pub fn subject(stream: &str, shard: u16, op: &str) -> String {
    format!("mqgate.{stream}.s.{shard:02}.{op}")
}

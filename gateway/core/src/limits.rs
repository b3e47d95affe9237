//! Length limits of endpoints (`x-max-length`, `x-max-length-bytes`, `x-overflow`),
//! applied on the publish path ([`crate::publish`]): a publish routed to a limited
//! endpoint is stored on its own, after what was published before it, so the count it
//! is checked against is exact. `reject-publish` leaves the full endpoint out (the
//! publisher is told); `drop-head` stores, then moves the endpoint's group past its
//! oldest ready messages until it is within its limits.
//!
//! Ready counts and bytes come from the endpoint's group (`group/limits.rs`): what is in
//! flight does not count, as in RabbitMQ. An endpoint with a byte limit holds little, so
//! its ready bytes are summed when asked.

use std::sync::Arc;

use crate::broker::ShardCore;
use crate::group::GroupSpec;

impl ShardCore {
    /// Whether one more message of `size` bytes would put the endpoint over its limits
    /// (ready messages only: what is in flight does not count, as in RabbitMQ).
    pub(crate) async fn is_full(self: &Arc<Self>, spec: &GroupSpec, size: u64) -> bool {
        let with_bytes = spec.policy.max_length_bytes.is_some();
        let Ok(group) = self.live_group(spec).await else {
            return false;
        };
        let Some((ready, bytes)) = group.ready(with_bytes).await else {
            return false;
        };
        spec.policy.max_length.is_some_and(|max| ready >= max)
            || spec
                .policy
                .max_length_bytes
                .is_some_and(|max| bytes + size > max)
    }

    /// Drop the oldest ready messages of a `drop-head` endpoint until it is within its
    /// limits: its group (started for the purpose when it has no members) drops them,
    /// dead-lettering them (`maxlen`) when the endpoint has a target; messages in flight
    /// stay and do not count.
    pub(crate) async fn trim(self: &Arc<Self>, spec: &GroupSpec) {
        match self.live_group(spec).await {
            Ok(g) => {
                g.trim(spec.policy.max_length, spec.policy.max_length_bytes)
                    .await
            }
            Err(e) => {
                tracing::warn!(group = %spec.name, error = %e, "core: length limit: dropping the head failed")
            }
        }
    }
}

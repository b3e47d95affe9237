//! The follower of the routing state (`docs/design/sharding.md` section 3, "Meta"):
//! every gateway tails shard 0's log into a view of its own (`<view>/meta`, apart from
//! the standby's view of the same log; a new folder each run, as the router starts
//! empty) and hands each record's keyed-area changes to
//! its broker ([`mqgate_core::Broker::apply_followed_routing`]), which applies the
//! routing ones to its router unless it owns shard 0 itself. Once it has reached the
//! log's end as it was at start, the broker routes exchange publishes itself
//! ([`mqgate_core::Broker::routing_caught_up`]).

use std::time::Duration;

use mqgate_core::Broker;
use mqgate_store::jetstream::{Nats, ReplicaSpec, ShardReplica};

/// How long one round of following lasts before its progress is looked at.
const ROUND: Duration = Duration::from_millis(100);

/// Follow shard 0's log into `broker`'s router until the task is aborted.
pub(crate) async fn follow(nats: Nats, broker: Broker) {
    // The router starts empty: so does the view, in a folder of this run's own (one
    // left by an earlier run would resume after records this router never saw, and
    // may still be closing); earlier runs' folders are removed.
    let base = nats.config().view.path.clone();
    let run = format!(
        "meta-{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    let mut spec = ReplicaSpec::shard(nats.config(), 0);
    spec.view.path = base.join(&run);
    spec.view.id_base = 0;
    let _ = tokio::task::spawn_blocking(move || {
        let Ok(dir) = std::fs::read_dir(&base) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if (name == "meta" || name.starts_with("meta-")) && name != run {
                if let Err(err) = std::fs::remove_dir_all(e.path()) {
                    tracing::warn!(folder = %e.path().display(), error = %err, "cluster: an earlier run's view of the routing state could not be removed");
                }
            }
        }
    })
    .await;
    let mut replica = loop {
        match ShardReplica::open(&nats, spec.clone()).await {
            Ok(r) => break r,
            Err(e) => {
                tracing::warn!(error = %e, "cluster: cannot follow the routing state yet; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let mut tip = None;
    loop {
        if tip.is_none() {
            match replica.last().await {
                Ok(last) => tip = Some(last),
                Err(e) => {
                    tracing::warn!(error = %e, "cluster: the routing log's end is unknown; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let deadline = tokio::time::Instant::now() + ROUND;
        match replica
            .follow_with(deadline, &mut |seq, changes| {
                broker.apply_followed_routing(seq, changes);
            })
            .await
        {
            Ok(applied) => {
                if tip.is_some_and(|t| applied >= t) {
                    broker.routing_caught_up();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cluster: following the routing state failed; going on in a second");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

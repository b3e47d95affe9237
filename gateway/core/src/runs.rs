//! Gateway runs: which run of which gateway declared a transient endpoint (an AMQP
//! exclusive or non-durable queue), and whether that run still lives.
//!
//! A transient endpoint dies with the process that declared it. A broker of its own
//! drops an earlier run's at start. In a cluster the endpoint's record lives in its
//! topic's shard, usually owned by another gateway, which outlives the declarer: the
//! sweep of the shard's owner deletes the endpoint once its run has been missing from
//! the live gateways' heartbeats for a grace period (the cluster's node TTL), as
//! RabbitMQ drops a dead node's exclusive and non-durable queues.

use std::collections::HashMap;
use std::time::Duration;

use mqgate_store::Millis;
use parking_lot::Mutex;

/// One run of one gateway (a process's life): its node id (empty for a broker of its
/// own) and a number drawn when it started.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Run {
    /// The gateway's node id.
    pub node: String,
    /// Drawn at start: two runs (a restart, two gateways) do not share one.
    pub id: u64,
}

/// What the live gateways' heartbeats say now: their runs, and how long a run may be
/// missing from them before it counts as gone (a new gateway's first heartbeat is
/// listed a moment late; a stopped one's key outlives it by the node TTL).
#[derive(Clone, Debug, Default)]
pub struct LiveRuns {
    /// The live (and draining) gateways' runs.
    pub runs: Vec<Run>,
    /// How long a run must be missing to be gone.
    pub grace: Duration,
}

/// A number naming this run: the clock's nanoseconds mixed with the process id.
pub(crate) fn draw() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos ^ (u64::from(std::process::id()) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    // splitmix64's finaliser.
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)).max(1)
}

/// Since when each run asked about has been missing from the live set.
#[derive(Debug, Default)]
pub(crate) struct Absences {
    since: Mutex<HashMap<Run, Millis>>,
}

/// Runs remembered as missing, at most (older ones are forgotten first).
const REMEMBERED: usize = 4096;

impl Absences {
    /// Whether `run` has been missing from `live` for its grace, as of `now`.
    fn gone(&self, run: &Run, live: &LiveRuns, now: Millis) -> bool {
        let mut since = self.since.lock();
        if live.runs.contains(run) {
            since.remove(run);
            return false;
        }
        if since.len() >= REMEMBERED && !since.contains_key(run) {
            if let Some(oldest) = since
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(r, _)| r.clone())
            {
                since.remove(&oldest);
            }
        }
        let first = *since.entry(run.clone()).or_insert(now);
        now.saturating_sub(first) >= live.grace.as_millis() as u64
    }
}

impl crate::Broker {
    /// This run of this gateway: transient endpoints it declares name it.
    pub fn run(&self) -> Run {
        Run {
            node: self
                .inner
                .link
                .as_ref()
                .map(|l| l.node())
                .unwrap_or_default(),
            id: self.inner.run_id,
        }
    }

    /// Whether `run` is gone: a gateway of a cluster whose heartbeats have not named it
    /// for the grace period. This run never is; a broker of its own judges none (it
    /// dropped an earlier run's endpoints at start).
    pub fn run_gone(&self, run: &Run) -> bool {
        let Some(link) = &self.inner.link else {
            return false;
        };
        if run.id == self.inner.run_id && run.node == link.node() {
            return false;
        }
        let Some(live) = link.live_runs() else {
            return false;
        };
        self.inner.absences.gone(run, &live, self.now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(node: &str, id: u64) -> Run {
        Run {
            node: node.into(),
            id,
        }
    }

    #[test]
    fn gone_after_missing_for_the_grace() {
        let a = Absences::default();
        let live = LiveRuns {
            runs: vec![run("gw1", 1), run("gw2", 2)],
            grace: Duration::from_secs(3),
        };
        assert!(!a.gone(&run("gw1", 1), &live, 0));
        // A restart of gw2 (another run) and a gateway not heard of: missing from now.
        assert!(!a.gone(&run("gw2", 9), &live, 1_000));
        assert!(!a.gone(&run("gw3", 3), &live, 1_000));
        assert!(!a.gone(&run("gw2", 9), &live, 3_999));
        assert!(a.gone(&run("gw2", 9), &live, 4_000));
        // Seen again (a late first heartbeat): its absence starts over.
        let back = LiveRuns {
            runs: vec![run("gw3", 3)],
            grace: live.grace,
        };
        assert!(!a.gone(&run("gw3", 3), &back, 5_000));
        assert!(!a.gone(&run("gw3", 3), &live, 6_000));
        assert!(!a.gone(&run("gw3", 3), &live, 8_999));
        assert!(a.gone(&run("gw3", 3), &live, 9_000));
    }

    #[test]
    fn remembers_a_bounded_number() {
        let a = Absences::default();
        let live = LiveRuns::default();
        for i in 0..(REMEMBERED as u64 + 10) {
            a.gone(&run("gw", i), &live, i);
        }
        assert_eq!(a.since.lock().len(), REMEMBERED);
    }
}

//! Brokers as gateways of one cluster (issue 16): 3 gateways on the shared 3-node NATS
//! cluster, 8 shards placed by rendezvous, each gateway's broker core attaching and
//! detaching the shards its manager hands it. A publisher fans messages out to 8
//! queues in 8 shards through one gateway; that gateway is killed mid-stream, a new
//! one joins, shards move. Every message ends up in all 8 queues exactly once or in
//! none (it was never committed), every confirmed one in all 8, each queue in publish
//! order.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_cluster::gateway::Gateway;
use mqgate_core::shard::{one_name_per_shard, shard_of};
use mqgate_core::{Broker, Outgoing, PublishBatch};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::{Message, TopicName};

const STREAM: &str = "gwcore";
const SHARDS: u16 = 8;

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

/// One queue per shard.
fn queues() -> Vec<TopicName> {
    one_name_per_shard("q", SHARDS)
        .iter()
        .map(|n| topic(n))
        .collect()
}

async fn start(cluster: &NatsCluster, name: &str, dir: &std::path::Path) -> Gateway {
    common::start_gateway(cluster, STREAM, SHARDS, name, dir).await
}

async fn wait_balanced(gws: &[(String, Gateway)]) {
    common::wait_balanced(SHARDS, gws).await
}

/// Publish `m<i>` for `i` in `range` to every queue in batches of 5, 4 batches in
/// flight, through `b`; the confirmed indexes (stops at the first error: the gateway
/// went away or lost every shard).
async fn publish(
    b: Broker,
    range: std::ops::Range<usize>,
    queues: Vec<TopicName>,
    progress: Arc<AtomicUsize>,
) -> Vec<usize> {
    let mut confirmed = Vec::new();
    let mut pipe = b.publish_pipeline::<Vec<usize>>(4);
    let mut i = range.start;
    while i < range.end || !pipe.is_empty() {
        if i < range.end && !pipe.must_drain() {
            let mut batch = PublishBatch::new();
            let mut idx = Vec::new();
            for _ in 0..5.min(range.end - i) {
                batch.push(Outgoing::routed(
                    Message::new(topic("fan"), Bytes::from(format!("m{i}"))),
                    queues.clone(),
                ));
                idx.push(i);
                i += 1;
            }
            if pipe.submit(batch, idx).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            continue;
        }
        match pipe.next().await {
            (idx, Ok(answers))
                if answers
                    .iter()
                    .all(|a| a.as_ref().is_some_and(|p| p.routed() == 8)) =>
            {
                confirmed.extend(idx);
                progress.store(confirmed.len(), Ordering::Relaxed);
            }
            _ => break,
        }
    }
    confirmed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_exactly_once_while_gateways_die_and_join() {
    common::watchdog("fanout_exactly_once_while_gateways_die_and_join", 240);
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let mut gws = Vec::new();
    for name in ["gc-a", "gc-b", "gc-c"] {
        gws.push((name.to_owned(), start(cluster, name, dir.path()).await));
    }
    wait_balanced(&gws).await;
    let queues = queues();
    for q in &queues {
        common::owner(&gws, shard_of(q.as_str(), SHARDS))
            .unwrap()
            .create_topic(q, Some(1))
            .await
            .unwrap();
    }

    // A publisher on the gateway owning shard 0; it is killed after a while.
    let victim = gws
        .iter()
        .position(|(_, g)| g.broker().owned_shards().contains(&0))
        .unwrap();
    let progress = Arc::new(AtomicUsize::new(0));
    let first = tokio::spawn(publish(
        gws[victim].1.broker().clone(),
        0..100_000,
        queues.clone(),
        Arc::clone(&progress),
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while progress.load(Ordering::Relaxed) < 40 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (name, killed) = gws.remove(victim);
    killed.abort();
    let confirmed_first = common::within(60, "the first publisher ends", first)
        .await
        .unwrap();
    assert!(
        confirmed_first.len() >= 40,
        "{name} confirmed {} before it died",
        confirmed_first.len()
    );
    let killed_at = confirmed_first.last().copied().unwrap_or(0) + 100;

    // The others take its shards; a new gateway joins while another publisher runs.
    wait_balanced(&gws).await;
    let second = tokio::spawn(publish(
        gws[0].1.broker().clone(),
        1_000_000..1_000_000 + 150,
        queues.clone(),
        Arc::new(AtomicUsize::new(0)),
    ));
    let joined = common::within(60, "gc-d joins", start(cluster, "gc-d", dir.path())).await;
    gws.push(("gc-d".to_owned(), joined));
    let confirmed_second = common::within(120, "the second publisher ends", second)
        .await
        .unwrap();
    wait_balanced(&gws).await;

    // Every queue: no duplicate, in publish order; each message in all 8 or none.
    let mut per_queue = Vec::new();
    for q in &queues {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let got = loop {
            if let Some(b) = common::queue_bodies(&gws, SHARDS, q).await {
                let has_all = confirmed_first
                    .iter()
                    .chain(&confirmed_second)
                    .all(|i| b.contains(&format!("m{i}")));
                if has_all || tokio::time::Instant::now() > deadline {
                    break b;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let idx: Vec<usize> = got.iter().map(|s| s[1..].parse().unwrap()).collect();
        // Each publisher's messages in its order (the dead gateway's last ones may
        // be forwarded after the second publisher's first ones), none twice.
        for from_first in [true, false] {
            let one: Vec<usize> = idx
                .iter()
                .copied()
                .filter(|i| (*i < 1_000_000) == from_first)
                .collect();
            let bad = one.windows(2).find(|w| w[0] >= w[1]);
            assert!(bad.is_none(), "{q}: out of order or twice: {bad:?}");
        }
        let mut sorted = idx.clone();
        sorted.sort_unstable();
        per_queue.push(sorted);
    }
    for (q, idx) in queues.iter().zip(&per_queue) {
        let missing: Vec<&usize> = confirmed_first
            .iter()
            .chain(&confirmed_second)
            .filter(|i| idx.binary_search(i).is_err())
            .collect();
        assert!(
            missing.is_empty(),
            "{q}: confirmed but missing: {missing:?}"
        );
    }
    // Unconfirmed messages of the dead gateway: all 8 queues or none.
    for i in 0..killed_at {
        let n = per_queue
            .iter()
            .filter(|idx| idx.binary_search(&i).is_ok())
            .count();
        assert!(n == 0 || n == 8, "m{i} is in {n} of 8 queues");
    }
    eprintln!(
        "confirmed {} before the kill, {} after; forwarded {}",
        confirmed_first.len(),
        confirmed_second.len(),
        gws.iter().map(|(_, g)| g.broker().forwarded()).sum::<u64>()
    );
    for (_, g) in gws {
        common::within(30, "a gateway leaves", g.leave(Duration::from_secs(5))).await;
    }
}

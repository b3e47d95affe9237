//! One stuck relayed publish holds up no other (issue 16, the publish relay): 3
//! gateways on the shared 3-node NATS cluster, 8 shards. A message for two queues in
//! shards H and D (home H, owned by gateway B) is published through gateway A just
//! after D's owner died: on B it is stored in H and then waits until D, between
//! owners, applies it (longer than the relay's timeout, so A's batch fails
//! unacknowledged). Meanwhile A publishes a message to H alone: B takes it at once and
//! it is confirmed, although the first request is still waiting there. The shards that
//! moved are served once their new owners' relay servers start (two failed starts
//! each, injected, tried again).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use mqgate_core::shard::{one_name_per_shard, shard_of};
use mqgate_core::{Broker, Outgoing, PublishBatch};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::{Message, TopicName};

const STREAM: &str = "gwiso";
const SHARDS: u16 = 8;

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

fn batch(to: &[TopicName], body: &str) -> PublishBatch {
    let mut b = PublishBatch::new();
    b.push(Outgoing::routed(
        Message::new(to[0].clone(), Bytes::from(body.to_owned())),
        to.to_vec(),
    ));
    b
}

async fn publish(b: &Broker, to: &[TopicName], body: &str) -> Result<bool, String> {
    let submitted = b
        .publish_submit(batch(to, body))
        .await
        .map_err(|e| e.to_string())?;
    let answers = submitted.await.map_err(|e| e.to_string())?;
    Ok(answers
        .iter()
        .all(|a| a.as_ref().is_some_and(|p| p.routed() == to.len())))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_waiting_for_a_shard_between_owners_holds_up_no_other() {
    common::watchdog(
        "a_publish_waiting_for_a_shard_between_owners_holds_up_no_other",
        240,
    );
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let mut gws = common::start_balanced(
        cluster,
        STREAM,
        SHARDS,
        &["gi-a", "gi-b", "gi-c"],
        dir.path(),
    )
    .await;
    // Shards H < D owned by two gateways B and K (a cross-shard message between two
    // shards that are not the publisher's has the lower one as its home); A is the
    // third.
    let owned: Vec<Vec<u16>> = gws.iter().map(|(_, g)| g.broker().owned_shards()).collect();
    let (mut pick, mut found) = ((0, 0, 0, 0), false);
    'outer: for b in 0..3 {
        for k in 0..3 {
            if b == k {
                continue;
            }
            for &h in &owned[b] {
                for &d in &owned[k] {
                    if h < d {
                        pick = (b, k, h, d);
                        found = true;
                        break 'outer;
                    }
                }
            }
        }
    }
    assert!(found, "two shards of two gateways in order: {owned:?}");
    let (b, k, h, d) = pick;
    let a = 3 - b - k;
    let names = one_name_per_shard("iq", SHARDS);
    let by_shard = |s: u16| topic(names.iter().find(|n| shard_of(n, SHARDS) == s).unwrap());
    let (qh, qd) = (by_shard(h), by_shard(d));
    let pa = gws[a].1.broker().clone();
    for q in [&qh, &qd] {
        common::within(30, "a topic is created", pa.create_topic(q, Some(1)))
            .await
            .unwrap();
    }
    assert_eq!(
        publish(&pa, &[qh.clone(), qd.clone()], "warm-up").await,
        Ok(true)
    );

    // D's owner dies; the cross-shard message waits on B for D's next owner. The
    // next owners' relay servers fail to start twice first (as a NATS subscription
    // that fails would): they are started again until they serve.
    for (i, (_, g)) in gws.iter().enumerate() {
        if i != k {
            g.delivery_faults().fail_starts.store(2, Ordering::Relaxed);
        }
    }
    let (killed, g) = gws.remove(k);
    let moved = g.broker().owned_shards();
    eprintln!(
        "killing {killed} (owns {:?}); home {h}, destination {d}",
        g.broker().owned_shards()
    );
    g.abort();
    let started = Instant::now();
    let stuck = {
        let pa = pa.clone();
        let to = vec![qh.clone(), qd.clone()];
        tokio::spawn(async move {
            let r = publish(&pa, &to, "both").await;
            (r, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A message to H alone, relayed to the same server meanwhile: confirmed.
    let plain = common::within(
        30,
        "the plain publish",
        publish(&pa, std::slice::from_ref(&qh), "alone"),
    )
    .await;
    let plain_took = started.elapsed();
    let (r, stuck_took) = common::within(60, "the stuck publish", stuck)
        .await
        .unwrap();
    eprintln!("cross-shard: {r:?} after {stuck_took:?}; plain: {plain:?} after {plain_took:?}");
    assert!(
        stuck_took >= Duration::from_millis(400),
        "the cross-shard publish waited for D (else this test shows nothing): {stuck_took:?}"
    );
    assert_eq!(
        plain,
        Ok(true),
        "a publish to H alone is not held up by the stuck one"
    );
    common::wait_balanced(SHARDS, &gws).await;
    // Every shard that moved is served by its new owner: topics created there and
    // publishes into them through both gateways.
    for s in moved {
        let q = by_shard(s);
        common::within(30, "a topic is created", pa.create_topic(&q, Some(1)))
            .await
            .unwrap();
        for (name, g) in &gws {
            let r = common::within(
                30,
                "a publish",
                publish(g.broker(), std::slice::from_ref(&q), name),
            )
            .await;
            assert_eq!(r, Ok(true), "{name} into shard {s}");
        }
    }
    let failed: u64 = gws
        .iter()
        .map(|(_, g)| 2 - g.delivery_faults().fail_starts.load(Ordering::Relaxed))
        .sum();
    assert!(failed > 0, "some server starts failed and were tried again");
    for (_, g) in gws {
        g.leave(Duration::from_secs(5)).await;
    }
}

//! Where a group lives, known by name on every gateway (issue 16): a consumer group
//! named apart from its topic (RocketMQ's usual case) lives in its first topic's shard,
//! not the one its name hashes to. The first gateway that places it records it in the
//! cluster's placement bucket; every gateway follows the bucket. 3 gateways on the
//! shared 3-node NATS cluster, 8 shards:
//! - the group's info, reset and `%RETRY%` topic are found through every gateway, also
//!   those that never saw it;
//! - deleted through one gateway while its member on another is connected, the
//!   member's consumer ends and the group is forgotten everywhere; the same name placed
//!   again on a topic of another shard lives there.

mod common;

use std::time::Duration;

use bytes::Bytes;
use mqgate_cluster::gateway::Gateway;
use mqgate_core::shard::{one_name_per_shard, shard_of};
use mqgate_core::{
    Broker, ConsumeMode, Consumer, GroupSpec, MemberOptions, Outgoing, PublishBatch, StartPosition,
};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::{GroupName, Message, TopicName};

const STREAM: &str = "gwplace";
const SHARDS: u16 = 8;
const GROUP: &str = "audit-readers";

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

fn group() -> GroupName {
    GroupName::new(GROUP).unwrap()
}

async fn publish(b: &Broker, t: &TopicName, n: usize) {
    let mut batch = PublishBatch::new();
    for i in 0..n {
        batch.push(Outgoing::routed(
            Message::new(t.clone(), Bytes::from(format!("m{i}"))),
            vec![t.clone()],
        ));
    }
    let answers = common::within(30, "a publish is answered", b.publish_batch(batch))
        .await
        .unwrap();
    assert!(answers.iter().all(Option::is_some));
}

async fn join(b: &Broker, t: &TopicName) -> Consumer {
    let mut spec = GroupSpec::new(group(), vec![t.clone()], ConsumeMode::Clustering);
    spec.start = StartPosition::First;
    common::within(
        30,
        "the member joins",
        b.subscribe(spec, MemberOptions::new("m-1", 20)),
    )
    .await
    .expect("joined")
}

/// Receive and ack `n` deliveries.
async fn take(c: &mut Consumer, n: usize) {
    for _ in 0..n {
        let d = common::within(30, "a delivery", c.recv())
            .await
            .expect("a delivery");
        c.ack(d.ack_token());
    }
}

/// Wait until every gateway answers the group's info with `t`'s queue at `next`.
async fn everywhere_at(gws: &[(String, Gateway)], t: &TopicName, next: u64) {
    for (name, g) in gws {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let info = g.broker().group_info(&group()).await;
            let at = info
                .as_ref()
                .ok()
                .and_then(|i| i.queues.iter().find(|q| q.queue.topic == *t))
                .map(|q| q.next);
            if at == Some(next) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: the group's info through this gateway: {:?}",
                info.map(|i| i.queues.len())
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_is_found_by_name_on_every_gateway() {
    common::watchdog("a_group_is_found_by_name_on_every_gateway", 240);
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let gws = common::start_balanced(
        cluster,
        STREAM,
        SHARDS,
        &["gq-a", "gq-b", "gq-c"],
        dir.path(),
    )
    .await;
    // Two topics in two shards, neither the one the group's name hashes to.
    let by_name = shard_of(GROUP, SHARDS);
    let names = one_name_per_shard("pt", SHARDS);
    let mut others = names.iter().filter(|n| shard_of(n, SHARDS) != by_name);
    let (t1, t2) = (topic(others.next().unwrap()), topic(others.next().unwrap()));
    let (s1, s2) = (shard_of(t1.as_str(), SHARDS), shard_of(t2.as_str(), SHARDS));
    let first = gws[0].1.broker().clone();
    for t in [&t1, &t2] {
        common::within(30, "a topic is created", first.create_topic(t, Some(1)))
            .await
            .unwrap();
    }
    publish(&first, &t1, 10).await;

    // A member joins on the gateway after t1's owner; all 10 consumed and acked.
    let owner_at = gws
        .iter()
        .position(|(_, g)| g.broker().owned_shards().contains(&s1))
        .unwrap();
    let member = gws[(owner_at + 1) % 3].1.broker().clone();
    let mut c = join(&member, &t1).await;
    take(&mut c, 10).await;
    // Every gateway finds it by name: its info, its retry topic's shard.
    everywhere_at(&gws, &t1, 10).await;
    let retry = topic(&format!("%RETRY%{GROUP}"));
    for (name, g) in &gws {
        assert_eq!(
            g.broker().shard_of_topic(&retry),
            s1,
            "{name}: the retry topic lives with the group"
        );
    }
    // A reset through the gateway that neither owns it nor holds its member.
    let third = gws[(owner_at + 2) % 3].1.broker().clone();
    common::within(
        30,
        "a reset",
        third.reset_group(&group(), StartPosition::Offset(7)),
    )
    .await
    .expect("a reset through a gateway that never saw the group");
    take(&mut c, 3).await;
    everywhere_at(&gws, &t1, 10).await;

    // Deleted through the third gateway while its member (on another gateway) is
    // connected: the member's consumer ends, as a local one's does, and the group is
    // forgotten everywhere (the member does not bring it back).
    common::within(30, "a delete", third.delete_group(&group()))
        .await
        .expect("deleted");
    let ended = common::within(30, "the member's consumer ends", c.recv()).await;
    assert!(ended.is_none(), "a delivery after the delete: {ended:?}");
    drop(c);
    for (name, g) in &gws {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while g.broker().shard_of_topic(&retry) != by_name {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: the deleted group is forgotten"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The same name on a topic of another shard: it lives there now.
    publish(&first, &t2, 4).await;
    let mut c = join(&third, &t2).await;
    take(&mut c, 4).await;
    everywhere_at(&gws, &t2, 4).await;
    for (name, g) in &gws {
        assert_eq!(g.broker().shard_of_topic(&retry), s2, "{name}");
    }
    drop(c);
    for (_, g) in gws {
        g.leave(Duration::from_secs(5)).await;
    }
}

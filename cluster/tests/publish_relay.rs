//! The publish relay (issue 16): a client may publish through any gateway. 3 gateways
//! on the shared 3-node NATS cluster, 8 shards, one queue in each shard, a fanout
//! exchange bound to all 8 (routing state on shard 0's owner). Every gateway publishes
//! at once, paced and in bursts, 8 batches in flight: messages to one queue (mostly in
//! a shard another gateway owns: relayed), to all 8 queues by topic (stored in a home,
//! forwarded to the rest), and through the exchange (routed by shard 0's owner). Then
//! the owner of some shards is killed while a publisher on another gateway goes on.
//!
//! Checked by reading each queue on its owner: every confirmed message is there, once,
//! each gateway's confirmed messages in the order it published them; nothing is
//! confirmed that was not stored, and nothing is stored twice.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use mqgate_cluster::gateway::Gateway;
use mqgate_core::router::{Binding, Destination as Bound, ExchangeDef, ExchangeKind};
use mqgate_core::shard::{one_name_per_shard, shard_of};
use mqgate_core::{Broker, Destination, Outgoing, PublishBatch};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::{Message, TopicName};

const STREAM: &str = "gwpub";
const SHARDS: u16 = 8;
const EXCHANGE: &str = "fx";

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

fn queues() -> Vec<TopicName> {
    one_name_per_shard("rq", SHARDS)
        .iter()
        .map(|n| topic(n))
        .collect()
}

/// Message `i` of a publisher: to one queue, to all by topic, or through the exchange.
fn item(tag: &str, i: usize, queues: &[TopicName]) -> (Outgoing, Vec<usize>) {
    let message = Message::new(topic("src"), Bytes::from(format!("{tag}#{i}")));
    match i % 3 {
        0 => {
            let q = i / 3 % queues.len();
            (
                Outgoing {
                    message,
                    to: Destination::Topic {
                        topic: queues[q].clone(),
                        queue: None,
                        sharding_key: None,
                    },
                    delay: None,
                    retain: None,
                },
                vec![q],
            )
        }
        1 => (
            Outgoing::routed(message, queues.to_vec()),
            (0..queues.len()).collect(),
        ),
        _ => (
            Outgoing {
                message,
                to: Destination::Exchange {
                    vhost: "/".into(),
                    exchange: EXCHANGE.into(),
                    key: String::new(),
                    headers: Vec::new(),
                },
                delay: None,
                retain: None,
            },
            (0..queues.len()).collect(),
        ),
    }
}

/// What one publisher did: per message index, its queues and whether it was confirmed.
type Outcome = BTreeMap<usize, (Vec<usize>, bool)>;

/// Publish `count` messages tagged `tag` through `b`, batches of 1 to 6, 8 in flight,
/// paced (2 ms between batches) for the first half and in bursts after. A failed
/// batch is left unconfirmed and publishing goes on (`keep_going`) or stops.
async fn publish(
    b: Broker,
    tag: String,
    count: usize,
    queues: Vec<TopicName>,
    keep_going: bool,
) -> Outcome {
    let mut out = Outcome::new();
    let mut pipe = b.publish_pipeline::<Vec<usize>>(8);
    let mut i = 0;
    let mut failures = 0;
    let settle = |out: &mut Outcome, idx: Vec<usize>, ok: bool| {
        for i in idx {
            out.get_mut(&i).expect("published").1 = ok;
        }
    };
    while i < count || !pipe.is_empty() {
        if i < count && !pipe.must_drain() {
            let mut batch = PublishBatch::new();
            let mut idx = Vec::new();
            for _ in 0..(1 + i % 6).min(count - i) {
                let (it, qs) = item(&tag, i, &queues);
                batch.push(it);
                out.insert(i, (qs, false));
                idx.push(i);
                i += 1;
            }
            if let Err((idx, _)) = pipe.submit(batch, idx).await {
                settle(&mut out, idx, false);
                failures += 1;
                if !keep_going {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if i < count / 2 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            continue;
        }
        let (idx, r) = pipe.next().await;
        let ok = match &r {
            Ok(answers) => answers.iter().zip(&idx).all(|(a, i)| {
                a.as_ref()
                    .is_some_and(|p| p.routed() == out[i].0.len() && !p.refused())
            }),
            Err(_) => false,
        };
        if !ok {
            failures += 1;
            assert!(keep_going, "{tag}: a batch failed: {r:?}");
        }
        settle(&mut out, idx, ok);
    }
    eprintln!(
        "{tag}: {} of {} confirmed, {failures} failed batches",
        out.values().filter(|(_, ok)| *ok).count(),
        out.len()
    );
    out
}

/// Check every queue against what the publishers did: each confirmed message there
/// once, each publisher's messages in its order, nothing twice.
async fn check(gws: &[(String, Gateway)], queues: &[TopicName], outcomes: &[(String, Outcome)]) {
    for (qi, q) in queues.iter().enumerate() {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let got = loop {
            let now = common::queue_bodies(gws, SHARDS, q).await;
            if let Some(b) = &now {
                let has_all = outcomes.iter().all(|(tag, o)| {
                    o.iter()
                        .filter(|(_, (qs, ok))| *ok && qs.contains(&qi))
                        .all(|(i, _)| b.contains(&format!("{tag}#{i}")))
                });
                if has_all {
                    break now.unwrap();
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{q}: confirmed messages missing after 30 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        for (tag, o) in outcomes {
            let mine: Vec<usize> = got
                .iter()
                .filter_map(|b| b.strip_prefix(&format!("{tag}#")))
                .map(|i| i.parse().unwrap())
                .collect();
            let mut seen = std::collections::BTreeSet::new();
            let twice = mine.iter().find(|i| !seen.insert(**i));
            assert!(twice.is_none(), "{q}: {tag}#{twice:?} twice");
            // A failed batch may still have been stored, later than what followed it
            // (the client sends it again anyway); confirmed ones keep their order.
            let confirmed: Vec<usize> = mine.iter().copied().filter(|i| o[i].1).collect();
            let bad = confirmed.windows(2).find(|w| w[0] >= w[1]);
            assert!(
                bad.is_none(),
                "{q}: {tag}'s confirmed messages out of order: {bad:?}"
            );
            let stray = mine.iter().find(|i| !o[i].0.contains(&qi));
            assert!(stray.is_none(), "{q}: {tag}#{stray:?} was not for it");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_gateway_publishes_into_every_shard() {
    common::watchdog("any_gateway_publishes_into_every_shard", 240);
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let mut gws = common::start_balanced(
        cluster,
        STREAM,
        SHARDS,
        &["gp-a", "gp-b", "gp-c"],
        dir.path(),
    )
    .await;
    let queues = queues();
    for q in &queues {
        common::owner(&gws, shard_of(q.as_str(), SHARDS))
            .unwrap()
            .create_topic(q, Some(1))
            .await
            .unwrap();
    }
    // The routing state lives with shard 0: declared and bound on its owner.
    let meta = common::owner(&gws, 0).unwrap();
    meta.declare_exchange(
        "/",
        ExchangeDef {
            name: EXCHANGE.into(),
            kind: ExchangeKind::Fanout,
            durable: true,
            auto_delete: false,
            internal: false,
            alternate: None,
            arguments: Bytes::new(),
        },
    )
    .await
    .unwrap();
    for q in &queues {
        meta.bind(
            "/",
            Binding {
                source: EXCHANGE.into(),
                destination: Bound::Topic(q.clone()),
                key: String::new(),
                headers: None,
                mqtt: false,
                arguments: Bytes::new(),
            },
            true,
        )
        .await
        .unwrap();
    }
    for (name, g) in &gws {
        let owned = g.broker().owned_shards().len();
        assert!(
            owned < usize::from(SHARDS),
            "{name} owns {owned}: nothing to relay"
        );
    }

    // Every gateway publishes at once; nothing fails.
    let mut tasks = Vec::new();
    for (name, g) in &gws {
        tasks.push(tokio::spawn(publish(
            g.broker().clone(),
            name.clone(),
            240,
            queues.clone(),
            false,
        )));
    }
    let mut outcomes = Vec::new();
    for ((name, _), t) in gws.iter().zip(tasks) {
        let o = common::within(120, "a publisher ends", t).await.unwrap();
        assert!(o.values().all(|(_, ok)| *ok), "{name}: all confirmed");
        outcomes.push((name.clone(), o));
    }
    check(&gws, &queues, &outcomes).await;

    // The owner of some shards dies while a gateway owning neither them nor shard 0
    // publishes on: batches fail while the shards have no owner, none is confirmed
    // without being stored, and publishing works again once they are taken over.
    let meta_at = gws
        .iter()
        .position(|(_, g)| g.broker().owned_shards().contains(&0))
        .unwrap();
    let victim = (meta_at + 1) % gws.len();
    let publisher = (meta_at + 2) % gws.len();
    let tag = format!("{}-late", gws[publisher].0);
    let late = tokio::spawn(publish(
        gws[publisher].1.broker().clone(),
        tag.clone(),
        600,
        queues.clone(),
        true,
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (killed, g) = gws.remove(victim);
    eprintln!("killing {killed} (owns {:?})", g.broker().owned_shards());
    g.abort();
    let late = common::within(180, "the publisher ends", late)
        .await
        .unwrap();
    common::wait_balanced(SHARDS, &gws).await;
    let confirmed = late.values().filter(|(_, ok)| *ok).count();
    assert!(confirmed > 0, "some of the late messages were confirmed");
    outcomes.push((tag, late));
    // Once its shards are owned again, the same gateway publishes without a failure.
    let after = format!(
        "{}-after",
        gws[if publisher > victim {
            publisher - 1
        } else {
            publisher
        }]
        .0
    );
    let b = gws[if publisher > victim {
        publisher - 1
    } else {
        publisher
    }]
    .1
    .broker()
    .clone();
    let o = common::within(
        120,
        "the last publisher ends",
        publish(b, after.clone(), 90, queues.clone(), false),
    )
    .await;
    outcomes.push((after, o));
    check(&gws, &queues, &outcomes).await;
    for (_, g) in gws {
        common::within(30, "a gateway leaves", g.leave(Duration::from_secs(5))).await;
    }
}

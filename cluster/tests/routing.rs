//! The routing state of a cluster (issue 16, `docs/design/sharding.md` section 3
//! "Meta"): 3 gateways on the shared 3-node NATS cluster, 8 shards. Exchanges and
//! bindings are declared through gateways that do not own shard 0 (its owner is the one
//! writer; every gateway follows its log into its router):
//! - a change returns once the gateway it went through routes by it (read your writes);
//! - every gateway's router ends up the same, transient exchanges and bindings included;
//! - errors come back as the owner's router gave them (conflict, no such exchange);
//! - publishes through any gateway route by the followed state, unbinds and deletes too;
//! - shard 0's owner killed: its successor rebuilds the router from the log (transient
//!   state included), and changes through the others go on.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use mqgate_core::router::{Binding, Destination as Bound, ExchangeDef, ExchangeKind};
use mqgate_core::shard::one_name_per_shard;
use mqgate_core::{Broker, CoreError, Destination, Outgoing, PublishBatch, Router};
use mqgate_store::jetstream::testing::NatsCluster;
use mqgate_store::{Message, TopicName};

const STREAM: &str = "gwroute";
const SHARDS: u16 = 8;

fn topic(s: &str) -> TopicName {
    TopicName::new(s).unwrap()
}

fn exchange(name: &str, kind: ExchangeKind, durable: bool) -> ExchangeDef {
    let mut d = ExchangeDef::new(name, kind);
    d.durable = durable;
    d
}

fn binding(source: &str, q: &TopicName, key: &str) -> Binding {
    Binding {
        source: source.into(),
        destination: Bound::Topic(q.clone()),
        key: key.into(),
        headers: None,
        mqtt: false,
        arguments: Bytes::new(),
    }
}

/// Everything a router holds, comparable.
fn snapshot(r: &Router) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for v in r.vhosts() {
        out.insert(format!("vhost {v}"));
        for e in r.exchanges(&v) {
            out.insert(format!("exchange {v} {e:?}"));
        }
        for b in r.bindings(&v, None) {
            out.insert(format!("binding {v} {b:?}"));
        }
    }
    out
}

/// Where `exchange` routes `key` on `b`'s own router.
fn routes(b: &Broker, exchange: &str, key: &str) -> BTreeSet<String> {
    b.router()
        .route("/", exchange, key, &[])
        .map(|r| r.topics.iter().map(|t| t.as_str().to_owned()).collect())
        .unwrap_or_default()
}

/// Wait until every gateway's router holds the same state; returns it.
async fn agreed(
    gws: &[(String, mqgate_cluster::gateway::Gateway)],
    stage: &str,
) -> BTreeSet<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let all: Vec<BTreeSet<String>> = gws
            .iter()
            .map(|(_, g)| snapshot(g.broker().router()))
            .collect();
        if all.windows(2).all(|w| w[0] == w[1]) {
            return all.into_iter().next().unwrap();
        }
        if tokio::time::Instant::now() > deadline {
            let first = &all[0];
            let diff: Vec<String> = gws
                .iter()
                .zip(&all)
                .map(|((name, g), s)| {
                    format!(
                        "{name} (owns {:?}, applied {}): {} entries, lacks {:?}, has more {:?}",
                        g.broker().owned_shards(),
                        g.broker().routing_applied(),
                        s.len(),
                        first.difference(s).take(2).collect::<Vec<_>>(),
                        s.difference(first).take(2).collect::<Vec<_>>(),
                    )
                })
                .collect();
            panic!("{stage}: routers differ after 20 s: {diff:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publish one message through `exchange` with `key` on `b`: how many queues took it.
async fn publish(b: &Broker, exchange: &str, key: &str, body: &str) -> usize {
    let mut batch = PublishBatch::new();
    batch.push(Outgoing {
        message: Message::new(topic("src"), Bytes::from(body.to_owned())),
        to: Destination::Exchange {
            vhost: "/".into(),
            exchange: exchange.into(),
            key: key.into(),
            headers: Vec::new(),
        },
        delay: None,
        retain: None,
    });
    let answers = common::within(30, "a publish is answered", b.publish_batch(batch))
        .await
        .expect("published");
    answers[0].as_ref().map_or(0, |p| p.routed())
}

/// Wait until queue `q` holds `body`.
async fn arrives(gws: &[(String, mqgate_cluster::gateway::Gateway)], q: &TopicName, body: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if common::queue_bodies(gws, SHARDS, q)
            .await
            .is_some_and(|b| b.iter().any(|x| x == body))
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{body} not in {q} after 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_changes_through_any_gateway_route_everywhere() {
    common::watchdog("routing_changes_through_any_gateway_route_everywhere", 240);
    let cluster = NatsCluster::shared();
    let dir = tempfile::tempdir().unwrap();
    let mut gws = common::start_balanced(
        cluster,
        STREAM,
        SHARDS,
        &["gr-a", "gr-b", "gr-c"],
        dir.path(),
    )
    .await;
    let meta_at = gws
        .iter()
        .position(|(_, g)| g.broker().owned_shards().contains(&0))
        .unwrap();
    let (a, c) = ((meta_at + 1) % 3, (meta_at + 2) % 3);
    let ga = gws[a].1.broker().clone();
    let gc = gws[c].1.broker().clone();
    let queues: Vec<TopicName> = one_name_per_shard("mq", SHARDS)
        .iter()
        .map(|n| topic(n))
        .collect();
    for q in &queues {
        common::within(30, "a topic is created", ga.create_topic(q, Some(1)))
            .await
            .unwrap();
    }

    // Through a gateway without shard 0: a durable fanout exchange and a transient
    // topic exchange, each usable here as soon as its declare returns.
    assert!(ga
        .declare_exchange("/", exchange("fx", ExchangeKind::Fanout, true))
        .await
        .unwrap());
    assert!(ga
        .declare_exchange("/", exchange("tx", ExchangeKind::Topic, false))
        .await
        .unwrap());
    assert!(
        !ga.declare_exchange("/", exchange("fx", ExchangeKind::Fanout, true))
            .await
            .unwrap(),
        "declared again: not new"
    );
    let conflict = ga
        .declare_exchange("/", exchange("fx", ExchangeKind::Topic, true))
        .await;
    assert!(
        matches!(conflict, Err(CoreError::Conflict(_))),
        "{conflict:?}"
    );
    for (i, q) in queues.iter().enumerate() {
        assert!(ga.bind("/", binding("fx", q, ""), true).await.unwrap());
        assert!(
            routes(&ga, "fx", "").contains(q.as_str()),
            "{q}: bound through this gateway, routed by it at once"
        );
        if i == 0 {
            // Bound twice: not new; to an exchange that does not exist: its error.
            assert!(!ga.bind("/", binding("fx", q, ""), true).await.unwrap());
            let missing = ga.bind("/", binding("nope", q, ""), true).await;
            assert!(
                matches!(missing, Err(CoreError::NoSuchExchange(_))),
                "{missing:?}"
            );
        }
    }
    let transient: Vec<Binding> = queues
        .iter()
        .enumerate()
        .map(|(i, q)| binding("tx", q, &format!("k.{i}")))
        .collect();
    let results = gc.bind_many("/", transient, false).await.unwrap();
    assert!(results.iter().all(|r| matches!(r, Ok(true))), "{results:?}");
    assert_eq!(
        routes(&gc, "tx", "k.3"),
        BTreeSet::from([queues[3].as_str().to_owned()])
    );
    let state = agreed(&gws, "declared").await;
    assert!(
        state.iter().filter(|s| s.starts_with("binding")).count() >= 16,
        "the 16 bindings are in every router"
    );

    // Publishes through each gateway route by what it followed.
    for (name, g) in &gws {
        let b = g.broker();
        assert_eq!(
            publish(b, "fx", "", &format!("f-{name}")).await,
            SHARDS as usize,
            "{name}"
        );
        assert_eq!(
            publish(b, "tx", "k.5", &format!("t-{name}")).await,
            1,
            "{name}"
        );
    }
    for (name, _) in &gws {
        for q in &queues {
            arrives(&gws, q, &format!("f-{name}")).await;
        }
        arrives(&gws, &queues[5], &format!("t-{name}")).await;
    }

    // An unbind and an exchange delete through the third gateway: gone everywhere.
    assert!(gc
        .unbind("/", &binding("tx", &queues[5], "k.5"))
        .await
        .unwrap());
    assert!(routes(&gc, "tx", "k.5").is_empty(), "unbound: at once here");
    assert!(gc
        .declare_exchange("/", exchange("gone", ExchangeKind::Direct, false))
        .await
        .unwrap());
    assert!(gc.delete_exchange("/", "gone", false).await.unwrap());
    assert!(gc.router().exchange("/", "gone").is_none());
    agreed(&gws, "unbound").await;
    assert_eq!(
        publish(&ga, "tx", "k.5", "t-late").await,
        0,
        "unbound on every gateway"
    );

    // Shard 0's owner dies: its successor rebuilds the router from the log, with the
    // transient exchange and bindings; changes through the others go on.
    let (killed, g) = gws.remove(meta_at);
    eprintln!("killing {killed} (owns {:?})", g.broker().owned_shards());
    g.abort();
    common::wait_balanced(SHARDS, &gws).await;
    let now = agreed(&gws, "owner killed").await;
    let before: BTreeSet<String> = snapshot(ga.router());
    assert_eq!(now, before);
    assert!(
        now.iter()
            .any(|s| s.contains("\"tx\"") && s.starts_with("exchange")),
        "the transient exchange survived the move"
    );
    let extra = topic("mq-extra");
    let other = gws
        .iter()
        .map(|(_, g)| g.broker())
        .find(|b| !b.owned_shards().contains(&0))
        .unwrap()
        .clone();
    common::within(
        30,
        "a topic is created",
        other.create_topic(&extra, Some(1)),
    )
    .await
    .unwrap();
    assert!(common::within(
        30,
        "a bind after the move",
        other.bind("/", binding("fx", &extra, ""), true)
    )
    .await
    .unwrap());
    agreed(&gws, "bound after the kill").await;
    for (name, g) in &gws {
        assert_eq!(
            publish(g.broker(), "fx", "", &format!("after-{name}")).await,
            SHARDS as usize + 1,
            "{name}"
        );
    }
    for (name, _) in &gws {
        arrives(&gws, &extra, &format!("after-{name}")).await;
    }

    // A gateway without shard 0 restarts (same name, same folder): its router is
    // followed from the start again, not from where its last run's view stopped.
    let at = gws
        .iter()
        .position(|(_, g)| !g.broker().owned_shards().contains(&0))
        .unwrap();
    let (name, g) = gws.remove(at);
    assert!(
        g.leave(Duration::from_secs(10)).await,
        "{name} handed its shards over"
    );
    let g = common::start_gateway(cluster, STREAM, SHARDS, &name, dir.path()).await;
    gws.push((name.clone(), g));
    common::wait_balanced(SHARDS, &gws).await;
    let state = agreed(&gws, "restarted").await;
    assert!(
        state
            .iter()
            .any(|s| s.starts_with("binding") && s.contains("mq-extra")),
        "the restarted gateway's router has the bindings made before and after its restart"
    );
    let back = gws.last().unwrap().1.broker();
    assert_eq!(
        publish(back, "fx", "", "after-restart").await,
        SHARDS as usize + 1,
        "{name} routes by the followed state after its restart"
    );
    for (_, g) in gws {
        g.leave(Duration::from_secs(5)).await;
    }
}

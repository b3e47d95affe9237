//! AMQP behaviour that needs mqgate's insides to check (the store's counters, a forced
//! memory alarm): fan-out stores a body once, connection.blocked, and length limits
//! measured exactly. Standard-AMQP scenarios live in `amqp.rs`.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use mqgate_conformance::amqp::{test_config, Backend, Target};
use mqgate_core::CoreConfig;

const WAIT: Duration = Duration::from_secs(5);

use mqgate_conformance::scenario;

scenario!(
    fanout_stores_the_body_once,
    blocked_and_unblocked,
    max_length_drop_head_keeps_the_newest,
    max_length_reject_publish_nacks,
    retry_ladder_then_dead_letter_exchange,
    delivery_limit_counts_the_same_everywhere,
    retry_queue_consumers_rotate_with_a_paced_publisher,
    delay_beyond_49_days,
    max_connections_refuses_the_next,
    consumer_lag_slows_publishers,
    stuck_consumers_slow_nobody
);

async fn fanout_stores_the_body_once(backend: Backend) {
    let Some(t) = Target::mqgate_only(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "fan10".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..10 {
        let q = format!("fan10.q{i}");
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            q.as_str().into(),
            "fan10".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let before = t.broker().unwrap().store_stats().messages;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "fan10".into(),
        "".into(),
        BasicPublishOptions::default(),
        &[7u8; 4096],
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let after = t.broker().unwrap().store_stats().messages;
    assert_eq!(after - before, 1, "one commit-log record for 10 queues");
    for i in 0..10 {
        let q = ch
            .queue_declare(
                format!("fan10.q{i}").as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        assert_eq!(q.message_count(), 1, "queue {i} has its index entry");
    }
}

async fn blocked_and_unblocked(backend: Backend) {
    let Some(t) = Target::mqgate_only(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "blk".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "blk".into(),
        BasicPublishOptions::default(),
        b"before",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    t.amqp().unwrap().set_blocked(Some("low on memory".into()));
    tokio::time::timeout(WAIT, async {
        while !conn.status().blocked() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connection.blocked arrives");
    t.amqp().unwrap().set_blocked(None);
    tokio::time::timeout(WAIT, async {
        while conn.status().blocked() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connection.unblocked arrives");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let c = ch
        .basic_publish(
            "".into(),
            "blk".into(),
            BasicPublishOptions::default(),
            b"after",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c.is_ack());
}

fn limit_args(kind: &str, overflow: &str, n: i64) -> FieldTable {
    let mut a = FieldTable::default();
    a.insert(kind.into(), AMQPValue::LongLongInt(n));
    a.insert("x-overflow".into(), AMQPValue::LongString(overflow.into()));
    a
}

async fn max_length_drop_head_keeps_the_newest(backend: Backend) {
    let Some(t) = Target::mqgate_only(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "ml.drop".into(),
        QueueDeclareOptions::default(),
        limit_args("x-max-length", "drop-head", 3),
    )
    .await
    .unwrap();
    for i in 0..5 {
        ch.basic_publish(
            "".into(),
            "ml.drop".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut c = ch
        .basic_consume(
            "ml.drop".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for want in ["m2", "m3", "m4"] {
        let d = tokio::time::timeout(WAIT, c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.data, want.as_bytes());
    }
}

async fn max_length_reject_publish_nacks(backend: Backend) {
    let Some(t) = Target::mqgate_only(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "ml.rej".into(),
        QueueDeclareOptions::default(),
        limit_args("x-max-length-bytes", "reject-publish", 10),
    )
    .await
    .unwrap();
    let mut acks = Vec::new();
    for body in ["12345", "67890", "x"] {
        let c = ch
            .basic_publish(
                "".into(),
                "ml.rej".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        acks.push(c.is_ack());
    }
    assert_eq!(acks, [true, true, false]);
    let q = ch
        .queue_declare(
            "ml.rej".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 2);
}

/// `x-retry-policy: rocketmq`: a nack without requeue comes back after the ladder's delay
/// as a retry copy (one more reconsume each time); at `x-delivery-limit` it goes to the
/// dead-letter exchange with an x-death entry. Delay levels are shortened to 200 ms.
async fn retry_ladder_then_dead_letter_exchange(backend: Backend) {
    // x-delivery-limit 3: three failures are retried, the fourth ends the ladder
    // (RabbitMQ: dead-lettered once delivered unsuccessfully more than the limit).
    ladder(backend, Some(3), true, 16, 4).await;
}

/// The same count without a dead-letter exchange (the ladder ends in the core's DLQ),
/// and, with no `x-delivery-limit`, the configured ladder length (`max_reconsume_times`,
/// here 2) rather than a fixed 16, with and without the exchange.
async fn delivery_limit_counts_the_same_everywhere(backend: Backend) {
    ladder(backend, Some(3), false, 16, 4).await;
    ladder(backend, None, true, 2, 3).await;
    ladder(backend, None, false, 2, 3).await;
}

/// A queue with the retry ladder: every delivery is nacked; it must be delivered exactly
/// `deliveries` times, then land in the dead-letter exchange's queue (`dlx`) or the
/// group's DLQ.
async fn ladder(
    backend: Backend,
    limit: Option<i32>,
    dlx: bool,
    max_reconsume: u32,
    deliveries: usize,
) {
    let core = CoreConfig {
        delay_levels: vec![Duration::from_millis(200); 18],
        max_reconsume_times: max_reconsume,
        ..CoreConfig::default()
    };
    let Some(t) = Target::mqgate_with_core(backend, test_config(), core).await else {
        return;
    };
    let what = format!("limit {limit:?}, dlx {dlx}, ladder {max_reconsume}");
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "ladder.dlq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-retry-policy".into(),
        AMQPValue::LongString("rocketmq".into()),
    );
    if let Some(l) = limit {
        args.insert("x-delivery-limit".into(), AMQPValue::LongInt(l));
    }
    if dlx {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString("ladder.dlq".into()),
        );
    }
    ch.queue_declare("ladder.q".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        "ladder.q".into(),
        BasicPublishOptions::default(),
        b"fails",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut c = ch
        .basic_consume(
            "ladder.q".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    for attempt in 0..deliveries {
        let started = std::time::Instant::now();
        let d = tokio::time::timeout(WAIT, c.next())
            .await
            .unwrap_or_else(|_| panic!("{what}: delivery {}", attempt + 1))
            .unwrap()
            .unwrap();
        assert_eq!(d.data, b"fails");
        if attempt > 0 {
            assert!(
                started.elapsed() >= Duration::from_millis(150),
                "retried after the ladder's delay"
            );
        }
        seen.push(d.routing_key.as_str().to_owned());
        d.acker
            .nack(BasicNackOptions {
                requeue: false,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert_eq!(
        seen,
        vec!["ladder.q"; deliveries],
        "retries keep the routing key"
    );
    // Nothing more on the queue: the ladder ended.
    assert!(
        tokio::time::timeout(Duration::from_millis(600), c.next())
            .await
            .is_err(),
        "{what}: delivered more than {deliveries} times"
    );
    if !dlx {
        let (_, group) = mqgate_amqp::queue::queue_topic("/", "ladder.q");
        let dead = t.broker().unwrap().dlq(&group, 0, 10).await.unwrap();
        assert_eq!(dead.len(), 1, "{what}: in the group's DLQ");
        return;
    }
    let mut dlq = ch
        .basic_consume(
            "ladder.dlq".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(WAIT, dlq.next())
        .await
        .expect("dead-lettered")
        .unwrap()
        .unwrap();
    assert_eq!(d.data, b"fails");
    let headers = d.properties.headers().clone().expect("headers");
    let Some(AMQPValue::FieldArray(deaths)) = headers.inner().get("x-death") else {
        panic!("x-death missing: {headers:?}")
    };
    let AMQPValue::FieldTable(death) = &deaths.as_slice()[0] else {
        panic!("x-death entry")
    };
    assert_eq!(
        death.inner().get("reason"),
        Some(&AMQPValue::LongString("rejected".into()))
    );
}

/// Two consumers of a queue with `x-retry-policy: rocketmq` (its group also reads the
/// `%RETRY%` queue) and a publisher that waits for each confirm and delivery: they take
/// turns (it was 60/0: looking into the empty retry queue moved the round robin).
async fn retry_queue_consumers_rotate_with_a_paced_publisher(backend: Backend) {
    let Some(t) = Target::mqgate_only(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-retry-policy".into(),
        AMQPValue::LongString("rocketmq".into()),
    );
    ch.queue_declare("paced.q".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut consumers = Vec::new();
    for tag in ["a", "b"] {
        let c = conn.create_channel().await.unwrap();
        consumers.push(
            c.basic_consume(
                "paced.q".into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap(),
        );
    }
    let mut got = [0usize; 2];
    for k in 0..60 {
        let confirm = ch
            .basic_publish(
                "".into(),
                "paced.q".into(),
                BasicPublishOptions::default(),
                k.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        let waits = consumers
            .iter_mut()
            .enumerate()
            .map(|(i, c)| Box::pin(async move { (i, tokio::time::timeout(WAIT, c.next()).await) }));
        let ((i, d), _, _) = futures_util::future::select_all(waits).await;
        let d = d.expect("a delivery").unwrap().unwrap();
        assert_eq!(d.data, k.to_string().as_bytes());
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
        got[i] += 1;
    }
    assert!(
        got.iter().all(|g| (27..=33).contains(g)),
        "each consumer half of 60, within 10%: {got:?}"
    );
}

/// RabbitMQ's delayed-message plugin caps `x-delay` at 2^32-1 ms (49 days); mqgate's
/// timers have no cap: a 60-day delay is accepted, confirmed and pending.
async fn delay_beyond_49_days(backend: Backend) {
    let Some(t) = Target::mqgate_only(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString("direct".into()),
    );
    ch.exchange_declare(
        "later.x".into(),
        ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions::default(),
        args,
    )
    .await
    .unwrap();
    ch.queue_declare(
        "later.q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "later.q".into(),
        "later.x".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let sixty_days_ms: i64 = 60 * 24 * 3600 * 1000;
    let mut headers = FieldTable::default();
    headers.insert("x-delay".into(), AMQPValue::LongLongInt(sixty_days_ms));
    let c = ch
        .basic_publish(
            "later.x".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"in two months",
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c.is_ack());
    assert_eq!(t.broker().unwrap().delayed_pending(), 1);
    let q = ch
        .queue_declare(
            "later.q".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0, "not delivered yet");
}

/// `limits.max_connections`: the connection past the limit is refused; a slot that frees
/// up is usable again.
async fn max_connections_refuses_the_next(backend: Backend) {
    let cfg = mqgate_amqp::AmqpConfig {
        max_connections: 1,
        ..test_config()
    };
    let Some(t) = Target::mqgate_with(backend, cfg).await else {
        return;
    };
    let first = t.connect().await;
    let url = t.url_for("guest", "guest", "/");
    let second =
        tokio::time::timeout(WAIT, lapin::Connection::connect(&url, Default::default())).await;
    assert!(matches!(second, Ok(Err(_))), "second connection refused");
    first.close(200, "bye".into()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = lapin::Connection::connect(&url, Default::default()).await;
    assert!(again.is_ok(), "a freed slot is usable");
}

/// A durable queue and a consumer of it with prefetch 10.
async fn durable_queue_consumed(ch: &lapin::Channel, queue: &str, tag: &str) -> lapin::Consumer {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    ch.basic_consume(
        queue.into(),
        tag.into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap()
}

/// Publish `n` persistent messages with confirms, up to 500 unconfirmed, while another
/// task samples the queue's ready count; the largest backlog seen.
async fn publish_watching_backlog(t: &Target, queue: &str, n: usize) -> u64 {
    let broker = t.broker().unwrap().clone();
    let group = mqgate_amqp::queue::queue_topic("/", queue).1;
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let w = std::sync::Arc::clone(&watching);
    let watcher = tokio::spawn(async move {
        let mut most = 0u64;
        while w.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(info) = broker.group_info(&group).await {
                let ready: u64 = info.queues.iter().map(|q| q.ready).sum();
                most = most.max(ready);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        most
    });
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        pending.push_back(c);
        if pending.len() >= 500 {
            assert!(pending.pop_front().unwrap().await.unwrap().is_ack());
        }
    }
    for c in pending {
        assert!(c.await.unwrap().is_ack());
    }
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    watcher.await.unwrap()
}

/// A consumer that acks each message slowly (~2 ms each): with `consumer_lag_limit`
/// the publisher is held to its pace, the backlog stays near the limit (plus what one
/// read of the publisher's socket holds); without it the backlog grows to most of what
/// was published.
async fn consumer_lag_slows_publishers(backend: Backend) {
    for limit in [Some(200), None] {
        let core = CoreConfig {
            consumer_lag_limit: limit,
            ..Default::default()
        };
        let Some(t) = Target::mqgate_with_core(backend, test_config(), core).await else {
            return;
        };
        let conn = t.connect().await;
        let ch = conn.create_channel().await.unwrap();
        let mut c = durable_queue_consumed(&ch, "lagging", "slow").await;
        let n = 2_000;
        let consumer = tokio::spawn(async move {
            let mut got = 0;
            while got < n {
                let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(30), c.next()).await
                else {
                    break;
                };
                tokio::time::sleep(Duration::from_millis(2)).await;
                d.ack(BasicAckOptions::default()).await.unwrap();
                got += 1;
            }
            got
        });
        let most = publish_watching_backlog(&t, "lagging", n).await;
        let waits = t.broker().unwrap().flow_waits();
        eprintln!("consumer lag limit {limit:?}: largest backlog {most}, waits {waits}");
        match limit {
            Some(l) => {
                assert!(waits > 0, "publishes waited");
                assert!(most <= 4 * l, "backlog held near {l}: at most {most}");
            }
            None => {
                assert_eq!(waits, 0);
                assert!(most > 800, "without flow control the backlog grows: {most}");
            }
        }
        assert_eq!(consumer.await.unwrap(), n, "every message consumed");
    }
}

/// Consumers that take nothing (a full prefetch never acked) do not hold publishers:
/// the queue buffers, as without flow control.
async fn stuck_consumers_slow_nobody(backend: Backend) {
    let core = CoreConfig {
        consumer_lag_limit: Some(100),
        ..Default::default()
    };
    let Some(t) = Target::mqgate_with_core(backend, test_config(), core).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let _held = durable_queue_consumed(&ch, "stuck", "never-acks").await;
    // Two seconds of no progress: the consumer counts as stuck.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    tokio::time::timeout(
        Duration::from_secs(20),
        publish_watching_backlog(&t, "stuck", 2_000),
    )
    .await
    .expect("publishing is not held by a stuck consumer");
    let group = mqgate_amqp::queue::queue_topic("/", "stuck").1;
    let info = t.broker().unwrap().group_info(&group).await.unwrap();
    let ready: u64 = info.queues.iter().map(|q| q.ready).sum();
    assert_eq!(ready, 1_990, "the queue buffers all but the prefetch");
    assert_eq!(t.broker().unwrap().flow_waits(), 0);
}

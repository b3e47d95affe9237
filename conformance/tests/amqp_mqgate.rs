//! AMQP behaviour that needs mqgate's insides to check (the store's counters, a forced
//! memory alarm): fan-out stores a body once, connection.blocked, and length limits
//! measured exactly. Standard-AMQP scenarios live in `amqp.rs`.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use mqgate_conformance::amqp::{Backend, Target};

const WAIT: Duration = Duration::from_secs(5);

macro_rules! scenario {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name(super::Backend::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rocks() {
                super::$name(super::Backend::Rocks).await
            }
        }
    )*};
}

scenario!(
    fanout_stores_the_body_once,
    blocked_and_unblocked,
    max_length_drop_head_keeps_the_newest,
    max_length_reject_publish_nacks
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
    let before = t.broker().unwrap().store().stats().messages;
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
    let after = t.broker().unwrap().store().stats().messages;
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

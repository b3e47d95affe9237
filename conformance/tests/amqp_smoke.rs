//! Temporary smoke test while the full suite is written.
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use mqgate_conformance::amqp::{Backend, Target};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    let t = Target::standard(Backend::Memory).await.unwrap();
    let conn = t.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "q1".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        ch.basic_publish(
            "".into(),
            "q1".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut c = ch
        .basic_consume(
            "q1".into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10 {
        let d = tokio::time::timeout(std::time::Duration::from_secs(5), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(d.data, format!("m{i}").as_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let g = ch
        .basic_get("q1".into(), BasicGetOptions::default())
        .await
        .unwrap();
    assert!(g.is_none());
    conn.close(200, "bye".into()).await.unwrap();
}

//! Every dashboard panel's query returns data from a real Prometheus (Debian's package)
//! scraping a real mqgate (RocksDB) while AMQP and MQTT clients publish, consume, fail
//! into the retry ladder and the DLQ, and delay messages.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, Broker};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

struct Prometheus(std::process::Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Traffic of every kind the dashboards show, for `secs` seconds.
async fn traffic(b: &Broker, secs: u64) {
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    common::durable_queue(&ch, "prom.q").await;
    let mut retry = FieldTable::default();
    retry.insert(
        "x-retry-policy".into(),
        AMQPValue::LongString("rocketmq".into()),
    );
    ch.queue_declare("prom.retry".into(), QueueDeclareOptions::default(), retry)
        .await
        .unwrap();
    let mut dlq = FieldTable::default();
    dlq.insert(
        "x-retry-policy".into(),
        AMQPValue::LongString("rocketmq".into()),
    );
    dlq.insert("x-delivery-limit".into(), AMQPValue::LongInt(0));
    ch.queue_declare("prom.dlq".into(), QueueDeclareOptions::default(), dlq)
        .await
        .unwrap();
    let mut dx = FieldTable::default();
    dx.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString("direct".into()),
    );
    ch.exchange_declare(
        "prom.delayed".into(),
        ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions::default(),
        dx,
    )
    .await
    .unwrap();
    ch.queue_bind(
        "prom.q".into(),
        "prom.delayed".into(),
        "prom.q".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let cch = conn.create_channel().await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "prom.q".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
    });
    for q in ["prom.retry", "prom.dlq"] {
        let mut c = cch
            .basic_consume(
                q.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        tokio::spawn(async move {
            while let Some(Ok(d)) = c.next().await {
                let _ = d
                    .acker
                    .nack(BasicNackOptions {
                        requeue: false,
                        ..Default::default()
                    })
                    .await;
            }
        });
    }
    // MQTT: a subscriber and a publisher.
    let mut sub = rumqttc::MqttOptions::new("prom-sub", "127.0.0.1", b.mqtt);
    sub.set_keep_alive(Duration::from_secs(30));
    let (sc, mut sev) = rumqttc::AsyncClient::new(sub, 100);
    sc.subscribe("prom/#", rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::spawn(async move { while sev.poll().await.is_ok() {} });
    let mut publ = rumqttc::MqttOptions::new("prom-pub", "127.0.0.1", b.mqtt);
    publ.set_keep_alive(Duration::from_secs(30));
    let (pc, mut pev) = rumqttc::AsyncClient::new(publ, 100);
    tokio::spawn(async move { while pev.poll().await.is_ok() {} });

    let end = Instant::now() + Duration::from_secs(secs);
    let mut i = 0u64;
    while Instant::now() < end {
        let props = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish(
            "".into(),
            "prom.q".into(),
            BasicPublishOptions::default(),
            b"m",
            props.clone(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        ch.basic_publish(
            "".into(),
            "prom.nowhere".into(),
            BasicPublishOptions::default(),
            b"lost",
            props.clone(),
        )
        .await
        .unwrap();
        if i.is_multiple_of(5) {
            for q in ["prom.retry", "prom.dlq"] {
                ch.basic_publish(
                    "".into(),
                    q.into(),
                    BasicPublishOptions::default(),
                    b"fails",
                    props.clone(),
                )
                .await
                .unwrap();
            }
            let mut h = FieldTable::default();
            h.insert("x-delay".into(), AMQPValue::LongInt(300));
            ch.basic_publish(
                "prom.delayed".into(),
                "prom.q".into(),
                BasicPublishOptions::default(),
                b"later",
                props.clone().with_headers(h),
            )
            .await
            .unwrap();
        }
        pc.publish("prom/a", rumqttc::QoS::AtLeastOnce, false, vec![1u8; 32])
            .await
            .unwrap();
        // A malformed AMQP connection now and then: protocol errors.
        if i.is_multiple_of(50) {
            use tokio::io::AsyncWriteExt;
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", b.amqp)).await {
                let _ = s.write_all(b"AMQP\x00\x00\x09\x01").await;
                let _ = s.write_all(&[9, 0, 0, 0, 0, 0, 0, 0xCE]).await;
            }
        }
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_returns_data() {
    if Command::new("prometheus")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("prometheus not found: apt-get install prometheus (.ci/run does)");
    }
    let b = Broker::start();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: mqgate\n    static_configs:\n      - targets: ['127.0.0.1:{}']\n",
            b.admin
        ),
    )
    .unwrap();
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus"),
    );
    traffic(&b, 8).await;
    let queries = common::dashboard_queries();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut missing: Vec<String> = Vec::new();
    for (file, title, expr) in &queries {
        loop {
            let (status, body) = common::http_get(
                port,
                &format!("/api/v1/query?query={}", common::urlencode(expr)),
                None,
            );
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let n = v["data"]["result"].as_array().map(|r| r.len()).unwrap_or(0);
            if status == 200 && n > 0 {
                break;
            }
            if Instant::now() > deadline {
                missing.push(format!("{file} / {title}: {expr} -> {status} {body}"));
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert!(
        missing.is_empty(),
        "panels without data:\n{}",
        missing.join("\n")
    );
}

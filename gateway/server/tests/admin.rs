//! The admin API and CLI against a running `mqgate` (RocksDB), with real AMQP and MQTT
//! clients making the state they show: topics, groups, dead letters and their resend,
//! messages, connections (and closing one), and /metrics that `promtool` accepts.

mod common;

use std::time::Duration;

use common::Broker;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde_json::Value;

fn json(out: &str) -> Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_api_show_and_change_the_broker() {
    let b = Broker::start();
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    // A queue whose failures go straight to the dead-letter queue (limit 0).
    let mut args = FieldTable::default();
    args.insert(
        "x-retry-policy".into(),
        AMQPValue::LongString("rocketmq".into()),
    );
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(0));
    ch.queue_declare(
        "work".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..3 {
        ch.basic_publish(
            "".into(),
            "work".into(),
            BasicPublishOptions::default(),
            format!("job {i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut c = ch
        .basic_consume(
            "work".into(),
            "w".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.acker
            .nack(BasicNackOptions {
                requeue: false,
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let group = "%AMQP%%2F/work";

    // An MQTT client to list and close.
    let mut opts = rumqttc::MqttOptions::new("cli-probe", "127.0.0.1", b.mqtt);
    opts.set_keep_alive(Duration::from_secs(30));
    let (_mc, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            if ev.poll().await.is_err() {
                let _ = closed_tx.send(());
                return;
            }
        }
    });

    let cli = |args: &[&str]| {
        let (ok, out, err) = b.cli(args);
        assert!(ok, "mqgate {args:?} failed: {err}");
        out
    };

    // Topics: the queue's topic is listed; create, offsets, delete.
    let topics = json(&cli(&["--json", "topics", "list"]));
    assert!(topics
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["name"] == group && t["messages"] == 3));
    cli(&["topics", "create", "orders", "--queues", "4"]);
    let t = json(&cli(&["--json", "topics", "offsets", "orders"]));
    assert_eq!(t["offsets"].as_array().unwrap().len(), 4);
    assert!(cli(&["topics", "list"]).contains("orders"), "table output");
    cli(&["topics", "delete", "orders"]);
    let (ok, _, err) = b.cli(&["topics", "delete", "orders"]);
    assert!(!ok && err.contains("404"), "{err}");

    // The DLQ holds the three failures; dlq list / show / resend with progress.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let dlq = loop {
        let v = json(&cli(&["--json", "dlq", "list", group]));
        if v.as_array().unwrap().len() == 3 || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dlq.as_array().unwrap().len(), 3, "{dlq}");
    assert!(cli(&["dlq", "show", group, "1"]).contains("job 1"));
    let id = dlq[0]["id"].as_u64().unwrap().to_string();
    assert!(cli(&["messages", "get", &id]).contains("job 0"));
    let r = json(&cli(&["--json", "dlq", "resend", group, "--all-from", "0"]));
    assert_eq!(r["resent"], 3);
    // Resent messages come back to the queue's consumer.
    for _ in 0..3 {
        let d = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&d.data).starts_with("job "));
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }

    // Groups: show the queue's group, replay it with reset --to first.
    let g = json(&cli(&["--json", "groups", "show", group]));
    assert_eq!(g["members"].as_array().unwrap().len(), 1);
    drop(c);
    ch.basic_cancel("w".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let g = json(&cli(&["--json", "groups", "reset", group, "--to", "first"]));
    assert!(g["lag"].as_u64().unwrap() >= 3, "{g}");
    let range = json(&cli(&[
        "--json", "messages", "range", group, "0", "--limit", "2",
    ]));
    assert_eq!(range.as_array().unwrap().len(), 2);

    // Connections: both protocols listed; closing the MQTT one disconnects it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let conns = loop {
        let v = json(&cli(&["--json", "connections", "list"]));
        if v.as_array().unwrap().len() >= 2 || std::time::Instant::now() > deadline {
            break v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let protos: Vec<&str> = conns
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["protocol"].as_str().unwrap())
        .collect();
    assert!(
        protos.contains(&"amqp") && protos.contains(&"mqtt"),
        "{conns}"
    );
    // The MQTT record: its client id, peer, protocol version and when it connected.
    let mqtt = conns
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["protocol"] == "mqtt")
        .unwrap();
    assert_eq!(mqtt["id"], "cli-probe", "{mqtt}");
    assert_eq!(mqtt["detail"], "V311", "{mqtt}");
    assert!(
        mqtt["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{mqtt}"
    );
    assert!(mqtt["connected_at"].as_u64().unwrap() > 0, "{mqtt}");
    cli(&["connections", "close", "mqtt", "cli-probe"]);
    tokio::time::timeout(Duration::from_secs(5), closed_rx.recv())
        .await
        .expect("MQTT client disconnected");

    // Wrong credentials: 401 with a clear message.
    let (ok, _, err) = b.cli(&["--password", "nope", "topics", "list"]);
    assert!(!ok && err.contains("401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_help_and_pass_promtool() {
    let b = Broker::start();
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "m".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "m".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let src =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs")).unwrap();
    let names = regex::Regex::new(r#"\("(mqgate_[a-z_]+)", "(counter|gauge|histogram)""#).unwrap();
    // The store records its latency histograms from its writer thread once the publish
    // is written: scrape until every series has shown up (at most 5 s), then check.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (status, text) = loop {
        let (status, text) = common::http_get(b.admin, "/metrics", None);
        let all = names
            .captures_iter(&src)
            .all(|c| text.contains(&format!("# HELP {} ", &c[1])));
        if all || std::time::Instant::now() > deadline {
            break (status, text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 200);
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../METRICS.md")).unwrap();
    for c in names.captures_iter(&src) {
        let (name, kind) = (&c[1], &c[2]);
        assert!(
            doc.contains(&format!("`{name}`")),
            "{name} missing from METRICS.md"
        );
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} has no HELP:\n{text}"
        );
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "{name} is not a {kind}"
        );
    }
    let promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut p) = promtool else {
        panic!("promtool not found: apt-get install prometheus (.ci/run does)");
    };
    use std::io::Write;
    p.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The API needs an administrator; /metrics does not.
    assert_eq!(
        common::http_get(b.admin, "/api/mqgate/overview", None).0,
        401
    );
    let (code, body) = common::http_get(b.admin, "/api/mqgate/overview", Some("Z3Vlc3Q6Z3Vlc3Q="));
    assert_eq!(code, 200);
    let o: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(
        o["memory"]["resident_bytes"].as_u64().unwrap() > 1 << 20,
        "{o}"
    );
}

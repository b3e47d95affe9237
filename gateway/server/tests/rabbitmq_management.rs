//! RabbitMQ's management API on mqgate's admin listener, driven by the tools RabbitMQ
//! users run: Debian's `rabbitmqadmin` (unchanged), KEDA's RabbitMQ scaler's reads, and
//! RabbitMQ's answers to bad requests.
//!
//! Against RabbitMQ itself, to check that these scenarios encode what RabbitMQ does:
//! `MQGATE_ADMIN_URL=http://127.0.0.1:15672 MQGATE_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
//! cargo test -p mqgate-server --test rabbitmq_management` (RabbitMQ 3.10 from Debian
//! with `rabbitmq-plugins enable rabbitmq_management`). The tag tests need users a
//! configuration file creates, so they run on mqgate only.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};

/// guest:guest
const GUEST: &str = "Z3Vlc3Q6Z3Vlc3Q=";

/// mqgate started for the test, or the broker the environment names.
struct Target {
    _broker: Option<common::Broker>,
    admin: u16,
    amqp_url: String,
}

fn target() -> Target {
    match (
        std::env::var("MQGATE_ADMIN_URL"),
        std::env::var("MQGATE_AMQP_URL"),
    ) {
        (Ok(admin), Ok(amqp)) => Target {
            _broker: None,
            admin: admin
                .rsplit(':')
                .next()
                .and_then(|p| p.trim_end_matches('/').parse().ok())
                .expect("MQGATE_ADMIN_URL ends with :<port>"),
            amqp_url: amqp,
        },
        _ => {
            let b = common::Broker::start();
            Target {
                admin: b.admin,
                amqp_url: b.amqp_url(),
                _broker: Some(b),
            }
        }
    }
}

/// A name no earlier run left behind (the target may be a long-lived RabbitMQ).
fn unique(prefix: &str) -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    format!("{prefix}-{}-{t}", std::process::id())
}

/// Run Debian's rabbitmqadmin against the target; its output, or the test fails.
fn admin(t: &Target, args: &[&str]) -> String {
    let out = Command::new("rabbitmqadmin")
        .args(["-H", "127.0.0.1", "-P", &t.admin.to_string()])
        .args(["-u", "guest", "-p", "guest"])
        .args(args)
        .output()
        .expect("rabbitmqadmin runs (apt-get install rabbitmq-server: .ci/run does)");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "rabbitmqadmin {args:?} failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn admin_json(t: &Target, args: &[&str]) -> Vec<Value> {
    let mut a = vec!["-f", "raw_json"];
    a.extend_from_slice(args);
    serde_json::from_str(&admin(t, &a)).expect("rabbitmqadmin prints JSON")
}

fn get_json(t: &Target, path: &str) -> (u16, Value) {
    let (code, body) = common::http_get(t.admin, path, Some(GUEST));
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn find<'a>(items: &'a [Value], name: &str) -> Option<&'a Value> {
    items.iter().find(|v| v["name"] == name)
}

/// RabbitMQ's counts lag (its statistics are collected every 5 s; mqgate's are read
/// live): wait up to 20 s for `what` to hold.
fn eventually<T: std::fmt::Debug>(what: &str, mut f: impl FnMut() -> (bool, T)) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, seen) = f();
        if ok {
            return seen;
        }
        assert!(Instant::now() < deadline, "{what}: last seen {seen:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn queue_messages(t: &Target, q: &str) -> Value {
    get_json(t, &format!("/api/queues/%2F/{q}")).1["messages"].clone()
}

#[test]
fn rabbitmqadmin_declares_publishes_gets_and_deletes() {
    let t = target();
    let q = unique("adm-q");
    let ex = unique("adm-ex");
    assert!(admin(
        &t,
        &["declare", "queue", &format!("name={q}"), "durable=true"]
    )
    .contains("queue declared"));
    admin(
        &t,
        &["declare", "exchange", &format!("name={ex}"), "type=topic"],
    );
    admin(
        &t,
        &[
            "declare",
            "binding",
            &format!("source={ex}"),
            &format!("destination={q}"),
            "routing_key=a.#",
        ],
    );
    admin(
        &t,
        &[
            "publish",
            &format!("exchange={ex}"),
            "routing_key=a.b",
            "payload=first",
        ],
    );
    admin(
        &t,
        &["publish", &format!("routing_key={q}"), "payload=second"],
    );
    // Listed with rabbitmqadmin's default columns and with chosen ones.
    assert!(admin(&t, &["list", "queues"]).contains(&q));
    let row = eventually("rabbitmqadmin lists the queue with 2 messages", || {
        let queues = admin_json(&t, &["list", "queues", "name", "messages", "durable"]);
        let row = find(&queues, &q).expect("the queue is listed").clone();
        (row["messages"] == 2, row)
    });
    assert_eq!(row["durable"], true);
    let exchanges = admin_json(&t, &["list", "exchanges", "name", "type"]);
    assert_eq!(
        find(&exchanges, &ex).expect("the exchange is listed")["type"],
        "topic"
    );
    let bindings = admin_json(
        &t,
        &[
            "list",
            "bindings",
            "source",
            "destination",
            "routing_key",
            "properties_key",
        ],
    );
    let b = bindings
        .iter()
        .find(|b| b["source"] == ex.as_str() && b["destination"] == q.as_str())
        .expect("the binding is listed");
    assert_eq!(b["routing_key"], "a.#");
    assert_eq!(b["properties_key"], "a.%23");
    assert!(
        bindings.iter().any(|b| b["source"] == ""
            && b["destination"] == q.as_str()
            && b["routing_key"] == q.as_str()),
        "the default exchange's binding is listed: {bindings:?}"
    );
    // get with requeue: both come back, in order, and stay.
    let got = admin_json(
        &t,
        &[
            "get",
            &format!("queue={q}"),
            "ackmode=ack_requeue_true",
            "count=5",
        ],
    );
    let payloads: Vec<&str> = got.iter().map(|m| m["payload"].as_str().unwrap()).collect();
    assert_eq!(payloads, ["first", "second"]);
    assert_eq!(got[0]["routing_key"], "a.b");
    assert_eq!(got[0]["exchange"], ex.as_str());
    assert_eq!(got[0]["payload_encoding"], "string");
    assert_eq!(got[1]["message_count"], 0);
    let again = admin_json(
        &t,
        &[
            "get",
            &format!("queue={q}"),
            "ackmode=ack_requeue_false",
            "count=1",
        ],
    );
    assert_eq!(again[0]["payload"], "first");
    assert_eq!(again[0]["redelivered"], true);
    eventually("one message left", || {
        let m = queue_messages(&t, &q);
        (m == 1, m)
    });
    admin(&t, &["purge", "queue", &format!("name={q}")]);
    eventually("purged", || {
        let m = queue_messages(&t, &q);
        (m == 0, m)
    });
    // Unbind by the properties key, then delete.
    admin(
        &t,
        &[
            "delete",
            "binding",
            &format!("source={ex}"),
            &format!("destination={q}"),
            "destination_type=queue",
            "properties_key=a.%23",
        ],
    );
    let bindings = admin_json(&t, &["list", "bindings", "source", "destination"]);
    assert!(
        !bindings.iter().any(|b| b["source"] == ex.as_str()),
        "{bindings:?}"
    );
    admin(&t, &["delete", "queue", &format!("name={q}")]);
    admin(&t, &["delete", "exchange", &format!("name={ex}")]);
    assert!(find(&admin_json(&t, &["list", "queues", "name"]), &q).is_none());
    assert!(find(&admin_json(&t, &["list", "exchanges", "name"]), &ex).is_none());
    // The overview rabbitmqadmin shows, and the other lists it has.
    let o = admin_json(&t, &["show", "overview"]);
    assert!(o[0]["rabbitmq_version"].is_string(), "{o:?}");
    for what in ["connections", "channels", "consumers", "vhosts", "users"] {
        admin(&t, &["list", what]);
    }
}

#[test]
fn http_answers_as_rabbitmq_does() {
    let t = target();
    let q = unique("http-q");
    // Authentication.
    let (code, body) = common::http_get(t.admin, "/api/queues", None);
    assert_eq!((code, body.as_str()), (401, ""));
    let (code, body) = common::http_get(t.admin, "/api/queues", Some("Z3Vlc3Q6d3Jvbmc="));
    assert_eq!(code, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["reason"],
        "Login failed"
    );
    let (_, me) = get_json(&t, "/api/whoami");
    assert_eq!(me["name"], "guest");
    // Declare: 201 new, 204 the same again, 400 with other arguments.
    let path = format!("/api/queues/%2F/{q}");
    let decl = r#"{"durable":true,"auto_delete":false,"arguments":{"x-max-length":100}}"#;
    assert_eq!(
        common::http(t.admin, "PUT", &path, Some(GUEST), Some(decl)).0,
        201
    );
    assert_eq!(
        common::http(t.admin, "PUT", &path, Some(GUEST), Some(decl)).0,
        204
    );
    let (code, body) = common::http(
        t.admin,
        "PUT",
        &path,
        Some(GUEST),
        Some(r#"{"durable":true,"arguments":{"x-max-length":5}}"#),
    );
    assert_eq!(code, 400);
    let err: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"], "bad_request");
    assert!(
        err["reason"]
            .as_str()
            .unwrap()
            .contains("inequivalent arg 'x-max-length'"),
        "{err}"
    );
    let (_, qv) = get_json(&t, &path);
    assert_eq!(qv["arguments"], json!({"x-max-length": 100}));
    // Without consumers it is idle since its declaration (Flower shows this).
    let idle = eventually("idle_since is reported", || {
        let v = get_json(&t, &path).1["idle_since"].clone();
        (v.is_string(), v)
    });
    assert!(idle.as_str().unwrap().ends_with("+00:00"), "{idle}");
    assert_eq!(qv["vhost"], "/");
    // Publish through the default exchange; routed, then unroutable.
    let publish = |key: &str| {
        common::http(
            t.admin,
            "POST",
            "/api/exchanges/%2F/amq.default/publish",
            Some(GUEST),
            Some(&json!({"properties": {"delivery_mode": 2, "headers": {"h": "v"}}, "routing_key": key,
                          "payload": "aGk=", "payload_encoding": "base64"}).to_string()),
        )
    };
    let (code, body) = publish(&q);
    assert_eq!(
        (code, serde_json::from_str::<Value>(&body).unwrap()),
        (200, json!({"routed": true}))
    );
    let (_, body) = publish(&unique("nowhere"));
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"routed": false})
    );
    // Get: the message with its properties; base64 when asked.
    let (code, body) = common::http(
        t.admin,
        "POST",
        &format!("{path}/get"),
        Some(GUEST),
        Some(r#"{"count":1,"ackmode":"ack_requeue_true","encoding":"base64","truncate":50000}"#),
    );
    assert_eq!(code, 200, "{body}");
    let got: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(got[0]["payload"], "aGk=");
    assert_eq!(got[0]["payload_encoding"], "base64");
    assert_eq!(got[0]["payload_bytes"], 2);
    assert_eq!(got[0]["properties"]["delivery_mode"], 2);
    assert_eq!(got[0]["properties"]["headers"]["h"], "v");
    // Deleting a queue that is not empty with if-empty: 400, and it stays.
    let (code, _) = common::http(
        t.admin,
        "DELETE",
        &format!("{path}?if-empty=true"),
        Some(GUEST),
        None,
    );
    assert_eq!(code, 400);
    assert_eq!(get_json(&t, &path).0, 200);
    // Purge, delete, then 404 as RabbitMQ words it.
    assert_eq!(
        common::http(
            t.admin,
            "DELETE",
            &format!("{path}/contents"),
            Some(GUEST),
            None
        )
        .0,
        204
    );
    assert_eq!(
        common::http(t.admin, "DELETE", &path, Some(GUEST), None).0,
        204
    );
    let (code, body) = common::http_get(t.admin, &path, Some(GUEST));
    assert_eq!(code, 404);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"error": "Object Not Found", "reason": "Not Found"})
    );
    // Paging: the envelope only with page=, bad pages refused.
    let (_, paged) = get_json(&t, "/api/exchanges?page=1&page_size=2");
    assert_eq!(paged["page"], 1);
    assert_eq!(paged["page_size"], 2);
    assert_eq!(paged["items"].as_array().unwrap().len(), 2);
    assert!(paged["total_count"].as_u64().unwrap() >= 5);
    let (code, body) =
        common::http_get(t.admin, "/api/exchanges?page=1&page_size=501", Some(GUEST));
    assert_eq!(code, 400);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["error"],
        "invalid_pagination_parameters"
    );
    let (_, cols) = get_json(
        &t,
        "/api/overview?columns=object_totals.queues,rabbitmq_version",
    );
    assert!(cols["object_totals"]["queues"].is_u64(), "{cols}");
    assert_eq!(cols.as_object().unwrap().len(), 2, "{cols}");
    // Health checks.
    assert_eq!(
        get_json(&t, "/api/healthchecks/node").1,
        json!({"status": "ok"})
    );
    assert_eq!(
        get_json(&t, "/api/aliveness-test/%2F").1,
        json!({"status": "ok"})
    );
}

/// KEDA's RabbitMQ scaler (HTTP mode) reads `GET /api/queues/{vhost}/{queue}`:
/// `messages`, `messages_ready` and `message_stats.publish_details.rate`; with a regex,
/// the paged list. The queue grows under a paced publisher, then drains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_read_as_kedas_scaler_reads_it_while_it_grows_and_drains() {
    let t = tokio::task::spawn_blocking(target).await.unwrap();
    let q = unique("keda");
    let conn = Connection::connect(&t.amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let admin = t.admin;
    let read = move |path: String| async move {
        tokio::task::spawn_blocking(move || {
            let (code, body) = common::http_get(admin, &path, Some(GUEST));
            (
                code,
                serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
            )
        })
        .await
        .unwrap()
    };
    let path = format!("/api/queues/%2F/{q}");
    // 200 messages a second for 12 s: at least two 5 s samples see it grow.
    let mut readings = Vec::new();
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(12) {
        for _ in 0..20 {
            ch.basic_publish(
                "".into(),
                q.as_str().into(),
                BasicPublishOptions::default(),
                b"job",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap()
            .await
            .unwrap();
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sent.is_multiple_of(200) {
            let (code, v) = read(path.clone()).await;
            assert_eq!(code, 200, "{v}");
            // Every publish was confirmed: never more than was sent (RabbitMQ's
            // figure may lag by its 5 s statistics interval; mqgate's is exact).
            // (RabbitMQ leaves the field out until its first statistics.)
            assert!(v["messages"].as_u64().unwrap_or(0) <= sent, "{v}");
            readings.push(v);
        }
    }
    let counts: Vec<u64> = readings
        .iter()
        .map(|v| v["messages"].as_u64().unwrap_or(0))
        .collect();
    assert!(
        counts.windows(2).all(|w| w[0] <= w[1]),
        "the backlog grows: {counts:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = read(path.clone()).await;
        if v["messages"].as_u64() == Some(sent) {
            readings.push(v);
            break;
        }
        assert!(Instant::now() < deadline, "the reading reaches {sent}: {v}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let rate = |v: &Value| {
        v["message_stats"]["publish_details"]["rate"]
            .as_f64()
            .unwrap_or(0.0)
    };
    let best = readings.iter().map(rate).fold(0.0, f64::max);
    assert!(
        (50.0..=400.0).contains(&best),
        "publish rate about 200/s: {:?}",
        readings.iter().map(rate).collect::<Vec<_>>()
    );
    assert!(readings.last().unwrap()["messages_ready"].is_u64());
    // The regex form KEDA uses for several queues.
    let (code, page) = read(format!(
        "/api/queues/%2F?page=1&use_regex=true&pagination=false&name=^{q}$&page_size=100"
    ))
    .await;
    assert_eq!(code, 200);
    assert_eq!(page["page_count"], 1);
    assert_eq!(page["items"][0]["name"], q.as_str());
    // Drain with per-message acks; the reading goes to 0.
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "keda-drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..sent {
        let d = consumer.next().await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, v) = read(path.clone()).await;
        if v["messages"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the reading drains to 0: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The consumer is listed while it consumes.
    let (_, consumers) = read("/api/consumers".into()).await;
    assert!(
        consumers
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["consumer_tag"] == "keda-drain" && c["queue"]["name"] == q.as_str()),
        "{consumers}"
    );
    // The connection, with what the client said about itself.
    let (_, conns) = read("/api/connections".into()).await;
    assert!(
        conns
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["client_properties"]["product"] == "lapin" && c["user"] == "guest"),
        "{conns}"
    );
    ch.queue_delete(q.as_str().into(), Default::default())
        .await
        .unwrap();
    conn.close(200, "bye".into()).await.unwrap();
}

/// RabbitMQ's tags: management users see their own vhosts and connections, monitoring
/// users see everything, only administrators see users; a user without a management
/// tag is refused; changes need the vhost permissions the user has over AMQP.
#[test]
fn tags_and_permissions_decide_what_a_user_sees_and_does() {
    if std::env::var("MQGATE_ADMIN_URL").is_ok() {
        return; // needs the users below: mqgate only
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mqgate.toml");
    std::fs::write(
        &cfg,
        r#"
[[users]]
name = "admin"
password = "a"
tags = ["administrator"]

[[users]]
name = "mon"
password = "m"
tags = ["monitoring"]

[[users]]
name = "app"
password = "p"
tags = ["management"]

[[users]]
name = "plain"
password = "x"

[[vhosts]]
name = "/"
permissions = [
  { user = "admin", configure = ".*", write = ".*", read = ".*" },
  { user = "app", configure = "^app\\.", write = "^app\\.", read = ".*" },
  { user = "plain", configure = ".*", write = ".*", read = ".*" },
]

[[vhosts]]
name = "other"
permissions = [{ user = "admin", configure = ".*", write = ".*", read = ".*" }]
"#,
    )
    .unwrap();
    let b = common::Broker::start_with(&["--config", cfg.to_str().unwrap()]);
    use base64::Engine as _;
    let auth =
        |u: &str, p: &str| base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
    let (admin, mon, app, plain) = (
        auth("admin", "a"),
        auth("mon", "m"),
        auth("app", "p"),
        auth("plain", "x"),
    );
    let vhosts = |a: &str| -> Vec<String> {
        let (code, body) = common::http_get(b.admin, "/api/vhosts", Some(a));
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(vhosts(&admin), ["/", "other"]);
    assert_eq!(vhosts(&mon), ["/", "other"]);
    assert_eq!(vhosts(&app), ["/"]);
    let (code, body) = common::http_get(b.admin, "/api/overview", Some(&plain));
    assert_eq!(code, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["reason"],
        "Not management user"
    );
    assert_eq!(common::http_get(b.admin, "/api/users", Some(&admin)).0, 200);
    for a in [&mon, &app] {
        let (code, body) = common::http_get(b.admin, "/api/users", Some(a));
        assert_eq!(code, 401);
        assert_eq!(
            serde_json::from_str::<Value>(&body).unwrap()["reason"],
            "Not administrator user"
        );
    }
    assert_eq!(
        common::http_get(b.admin, "/api/queues/other", Some(&app)).0,
        401
    );
    // app may configure app.* only, through the same checks as its AMQP connections.
    let put = |a: &str, name: &str| {
        common::http(
            b.admin,
            "PUT",
            &format!("/api/queues/%2F/{name}"),
            Some(a),
            Some("{}"),
        )
        .0
    };
    assert_eq!(put(&app, "app.jobs"), 201);
    assert_eq!(put(&app, "billing"), 401);
    assert_eq!(
        put(&mon, "anything"),
        401,
        "monitoring has no permissions on / here"
    );
    // mqgate's own API stays administrators' only, under its own prefix.
    assert_eq!(
        common::http_get(b.admin, "/api/mqgate/topics", Some(&app)).0,
        401
    );
    assert_eq!(
        common::http_get(b.admin, "/api/mqgate/topics", Some(&admin)).0,
        200
    );
}

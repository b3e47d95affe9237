//! Queues: list, show, declare, delete, purge, get.

use super::*;

/// A queue as RabbitMQ shows it; `all` is every active consumer (read once per list).
pub(super) async fn queue_json(
    s: &AdminState,
    q: &QueueView,
    all: &[mqgate_amqp::ConsumerView],
) -> Value {
    let c = s.rates.queue_now(s, q).await;
    let r = s.rates.queue_rates(&q.vhost, &q.name);
    let consumers: Vec<_> = all
        .iter()
        .filter(|c| c.vhost == q.vhost && c.queue == q.name)
        .collect();
    let exclusive_tag = consumers
        .iter()
        .find(|c| c.exclusive)
        .map(|c| c.tag.clone());
    let kind = match q.arguments.inner().get("x-queue-type") {
        Some(AMQPValue::LongString(t)) => String::from_utf8_lossy(t.as_bytes()).into_owned(),
        _ => "classic".into(),
    };
    no_nulls(json!({
        "name": q.name,
        "vhost": q.vhost,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive_owner.is_some(),
        "exclusive_consumer_tag": exclusive_tag,
        "owner_pid_details": q.exclusive_owner.and_then(|id| conn_details(s, "amqp", &id.to_string())),
        "arguments": json::table(&q.arguments),
        "type": kind,
        "node": node(),
        "state": "running",
        "effective_policy_definition": {},
        "consumers": q.consumers,
        "consumer_capacity": if q.consumers > 0 { 1.0 } else { 0.0 },
        "single_active_consumer_tag": if q.single_active { consumers.first().map(|c| c.tag.clone()) } else { None },
        // Unused since (RabbitMQ's form); absent while it has consumers.
        "idle_since": s.broker.endpoint_idle_since(&q.group).map(iso_ms),
        "messages": c.messages,
        "messages_details": details(r.messages),
        "messages_ready": c.ready,
        "messages_ready_details": details(r.ready),
        "messages_unacknowledged": c.unacked,
        "messages_unacknowledged_details": details(r.unacked),
        "messages_persistent": if q.durable { c.messages } else { 0 },
        "message_stats": {
            "publish": c.publish, "publish_details": details(r.publish),
            "deliver_get": c.deliver_get, "deliver_get_details": details(r.deliver_get),
            "deliver": c.deliver_get, "deliver_details": details(r.deliver_get),
            "ack": c.ack, "ack_details": details(r.ack),
        },
        // mqgate: the core topic and group holding this queue.
        "mqgate": { "topic": q.topic.as_str(), "group": q.group.as_str() },
    }))
}

/// Leave out fields without a value (rabbitmqadmin fails on a null it displays).
pub(super) fn no_nulls(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.retain(|_, x| !x.is_null());
    }
    v
}

pub(super) async fn queue_list(s: &AdminState, w: &Who, vhost: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    let consumers = s.amqp.consumers();
    for q in s.amqp.queues_everywhere().await {
        if vhost.is_some_and(|v| v != q.vhost) || !w.sees(s, &q.vhost) {
            continue;
        }
        out.push(queue_json(s, &q, &consumers).await);
    }
    out
}

pub(super) async fn queues(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    listed(queue_list(&s, &w, None).await, &q)
}

pub(super) async fn queues_of(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    listed(queue_list(&s, &w, Some(&v)).await, &q)
}

pub(super) async fn queue(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    Query(lq): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    let q = s.amqp.queue(&v, &name).ok_or_else(not_found)?;
    one(queue_json(&s, &q, &s.amqp.consumers()).await, &lq)
}

pub(super) async fn put_queue(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> RResult<StatusCode> {
    let b = body(&raw)?;
    let (durable, auto_delete) = (b.flag("durable", true)?, b.flag("auto_delete", false)?);
    let args = b.arguments()?;
    let existed = s.amqp.queue(&v, &name).is_some();
    w.on_direct(&s, &v, async |d| {
        d.declare_queue(&name, durable, auto_delete, args).await
    })
    .await?
    .map_err(from_direct)?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

#[derive(Deserialize, Default)]
pub(super) struct DeleteQuery {
    #[serde(rename = "if-unused", default)]
    pub(super) if_unused: Option<bool>,
    #[serde(rename = "if-empty", default)]
    pub(super) if_empty: Option<bool>,
}

pub(super) async fn delete_queue(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    Query(dq): Query<DeleteQuery>,
) -> RResult<StatusCode> {
    w.queue(&s, &v, &name)?;
    w.on_direct(&s, &v, async |d| {
        d.delete_queue(&name, dq.if_unused == Some(true), dq.if_empty == Some(true))
            .await
    })
    .await?
    .map_err(from_direct)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn purge_queue(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
) -> RResult<StatusCode> {
    w.queue(&s, &v, &name)?;
    w.on_direct(&s, &v, async |d| d.purge_queue(&name).await)
        .await?
        .map_err(from_direct)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn get_messages(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> RResult {
    let b = body(&raw)?;
    let count = b
        .count("count")?
        .ok_or_else(|| bad_request("[{key_missing,count}]"))?;
    let encoding = b.required("encoding")?;
    let truncate = b.count("truncate")?;
    let ack = match b.required("ackmode")?.as_str() {
        "ack_requeue_true" => GetAck::Requeue,
        "ack_requeue_false" => GetAck::Ack,
        "reject_requeue_true" => GetAck::RejectRequeue,
        "reject_requeue_false" => GetAck::Reject,
        other => return Err(bad_request(format!("Unknown ackmode: {other}"))),
    };
    if encoding != "auto" && encoding != "base64" {
        return Err(bad_request(format!("Unknown encoding: {encoding}")));
    }
    w.queue(&s, &v, &name)?;
    let got = w
        .on_direct(&s, &v, async |d| {
            d.get(&name, count.min(100_000) as usize, ack).await
        })
        .await?
        .map_err(from_direct)?;
    let out: Vec<Value> = got
        .iter()
        .map(|m| {
            let full = &m.body[..];
            let body = &full[..truncate.map_or(full.len(), |t| (t as usize).min(full.len()))];
            let (payload, encoding) = match std::str::from_utf8(body) {
                Ok(t) if encoding == "auto" => (t.to_owned(), "string"),
                _ => (
                    base64::engine::general_purpose::STANDARD.encode(body),
                    "base64",
                ),
            };
            json!({
                "payload_bytes": full.len(),
                "redelivered": m.redelivered,
                "exchange": m.exchange,
                "routing_key": m.routing_key,
                "message_count": m.message_count,
                "properties": properties_json(&m.properties),
                "payload": payload,
                "payload_encoding": encoding,
            })
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

pub(super) fn properties_json(p: &BasicProperties) -> Value {
    let mut m = serde_json::Map::new();
    let s = |x: &ShortString| Value::String(x.as_str().to_owned());
    if let Some(x) = p.content_type() {
        m.insert("content_type".into(), s(x));
    }
    if let Some(x) = p.content_encoding() {
        m.insert("content_encoding".into(), s(x));
    }
    if let Some(x) = p.headers() {
        m.insert("headers".into(), json::table(x));
    }
    if let Some(x) = p.delivery_mode() {
        m.insert("delivery_mode".into(), json!(x));
    }
    if let Some(x) = p.priority() {
        m.insert("priority".into(), json!(x));
    }
    if let Some(x) = p.correlation_id() {
        m.insert("correlation_id".into(), s(x));
    }
    if let Some(x) = p.reply_to() {
        m.insert("reply_to".into(), s(x));
    }
    if let Some(x) = p.expiration() {
        m.insert("expiration".into(), s(x));
    }
    if let Some(x) = p.message_id() {
        m.insert("message_id".into(), s(x));
    }
    if let Some(x) = p.timestamp() {
        m.insert("timestamp".into(), json!(x));
    }
    if let Some(x) = p.kind() {
        m.insert("type".into(), s(x));
    }
    if let Some(x) = p.user_id() {
        m.insert("user_id".into(), s(x));
    }
    if let Some(x) = p.app_id() {
        m.insert("app_id".into(), s(x));
    }
    // RabbitMQ writes an empty property list as [].
    if m.is_empty() {
        return json!([]);
    }
    Value::Object(m)
}

pub(super) fn properties_from(v: &Value) -> Result<BasicProperties, RError> {
    let mut p = BasicProperties::default();
    let Some(m) = v.as_object() else {
        return Ok(p);
    };
    let st = |k: &str| {
        m.get(k)
            .and_then(Value::as_str)
            .map(|x| ShortString::from(x.to_owned()))
    };
    if let Some(x) = st("content_type") {
        p = p.with_content_type(x);
    }
    if let Some(x) = st("content_encoding") {
        p = p.with_content_encoding(x);
    }
    if let Some(h) = m.get("headers") {
        p = p.with_headers(json::to_table(h).map_err(bad_request)?);
    }
    if let Some(x) = m.get("delivery_mode").and_then(Value::as_u64) {
        p = p.with_delivery_mode(x as u8);
    }
    if let Some(x) = m.get("priority").and_then(Value::as_u64) {
        p = p.with_priority(x as u8);
    }
    if let Some(x) = st("correlation_id") {
        p = p.with_correlation_id(x);
    }
    if let Some(x) = st("reply_to") {
        p = p.with_reply_to(x);
    }
    if let Some(x) = st("expiration") {
        p = p.with_expiration(x);
    }
    if let Some(x) = st("message_id") {
        p = p.with_message_id(x);
    }
    if let Some(x) = m.get("timestamp").and_then(Value::as_u64) {
        p = p.with_timestamp(x);
    }
    if let Some(x) = st("type") {
        p = p.with_type(x);
    }
    if let Some(x) = st("user_id") {
        p = p.with_user_id(x);
    }
    if let Some(x) = st("app_id") {
        p = p.with_app_id(x);
    }
    Ok(p)
}

//! The admin HTTP API (JSON, HTTP basic auth with an `administrator` user) and the
//! Prometheus `/metrics` endpoint, on the admin listener. `docs/openapi.yaml` documents
//! it; the `mqgate` CLI subcommands use it.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use mqgate_amqp::AmqpServer;
use mqgate_core::{Broker, CoreError, StartPosition, Users};
use mqgate_mqtt::MqttServer;
use mqgate_store::{
    GroupName, MessageId, QueueOffset, QueueRef, ReadLimits, StoredMessage, TopicName,
};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::metrics::Collector;

/// What the handlers share.
#[derive(Clone, Debug)]
pub(crate) struct AdminState {
    pub(crate) broker: Broker,
    pub(crate) mqtt: MqttServer,
    pub(crate) amqp: AmqpServer,
    pub(crate) users: Arc<Users>,
    pub(crate) metrics: Collector,
    /// With `store.backend = "jetstream"`: the replicated log's side.
    pub(crate) replication: Option<mqgate_store::jetstream::Replication>,
    /// With `[cluster]`: the cluster's connection, its shard count and this node.
    pub(crate) sharded: Option<(mqgate_store::jetstream::Nats, u16)>,
    /// `store.backend`.
    pub(crate) backend: String,
    /// The RabbitMQ management API's rate samples.
    pub(crate) rates: Arc<crate::rabbit::Rates>,
    /// Where the listeners are (RabbitMQ's overview and connections show them).
    pub(crate) listeners: Listeners,
    /// When the broker started (ms since the epoch).
    pub(crate) started_at: mqgate_store::Millis,
}

/// The bound addresses of the plain listeners.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Listeners {
    pub(crate) amqp: Option<std::net::SocketAddr>,
    pub(crate) mqtt: Option<std::net::SocketAddr>,
    pub(crate) admin: Option<std::net::SocketAddr>,
}

impl Listeners {
    /// The listener of `protocol` (`amqp`, `mqtt`).
    pub(crate) fn of(&self, protocol: &str) -> Option<std::net::SocketAddr> {
        match protocol {
            "amqp" => self.amqp,
            "mqtt" => self.mqtt,
            _ => None,
        }
    }
}

/// An API error: a status and a message (`{"error": "..."}`).
pub(crate) struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"mqgate\""),
            );
        }
        r
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let status = match &e {
            CoreError::NoSuchTopic(_)
            | CoreError::NoSuchGroup(_)
            | CoreError::NoSuchExchange(_) => StatusCode::NOT_FOUND,
            CoreError::Store(
                mqgate_store::StoreError::UnknownQueue(_)
                | mqgate_store::StoreError::UnknownTopic(_),
            ) => StatusCode::NOT_FOUND,
            CoreError::Conflict(_) => StatusCode::CONFLICT,
            CoreError::Invalid(_) | CoreError::Store(mqgate_store::StoreError::Invalid(_)) => {
                StatusCode::BAD_REQUEST
            }
            CoreError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<mqgate_store::StoreError> for ApiError {
    fn from(e: mqgate_store::StoreError) -> Self {
        ApiError::from(CoreError::from(e))
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

fn not_found(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, msg.into())
}

/// Build the router: mqgate's own API under `/api/mqgate/` (administrators), RabbitMQ's
/// management API under `/api/` (its own tags, see `rabbit`), and `/metrics`.
pub(crate) fn router(state: AdminState) -> Router {
    let own = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/mqgate/health", get(health))
        .route("/api/mqgate/overview", get(overview))
        .route("/api/mqgate/cluster", get(cluster))
        .route("/api/mqgate/topics", get(topics).post(create_topic))
        .route("/api/mqgate/topics/{name}", get(topic).delete(delete_topic))
        .route(
            "/api/mqgate/topics/{name}/queues/{queue}/messages",
            get(queue_messages),
        )
        .route("/api/mqgate/groups", get(groups))
        .route("/api/mqgate/groups/{name}", get(group))
        .route("/api/mqgate/groups/{name}/reset", post(reset_group))
        .route("/api/mqgate/dlq/{group}", get(dlq))
        .route("/api/mqgate/dlq/{group}/resend", post(resend_dlq))
        .route("/api/mqgate/messages/{id}", get(message))
        .route("/api/mqgate/messages", get(messages_by_key))
        .route("/api/mqgate/producers", get(producers))
        .route(
            "/api/mqgate/delayed",
            get(delayed).delete(cancel_delayed_by_key),
        )
        .route(
            "/api/mqgate/delayed/{id}",
            axum::routing::delete(cancel_delayed),
        )
        .route("/api/mqgate/connections", get(connections))
        .route(
            "/api/mqgate/connections/{protocol}/{id}",
            axum::routing::delete(close_connection),
        )
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    own.merge(crate::rabbit::router(state.clone()))
        .merge(crate::console::router())
        .with_state(state)
}

/// Basic auth with an administrator user; `/metrics` and `/api/mqgate/health` are open (as
/// Prometheus and load balancers expect).
async fn auth(
    State(s): State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    if path == "/metrics" || path == "/api/mqgate/health" {
        return next.run(req).await;
    }
    let tried = req.headers().contains_key(header::AUTHORIZATION);
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    if authorized(&s.users, req.headers()) {
        if let Some(ip) = source {
            s.broker.login_throttle().succeeded(ip);
        }
        next.run(req).await
    } else {
        // Wrong credentials (not a first request without any) are answered late, later
        // with every recent failure from the same address.
        if let (true, Some(ip)) = (tried, source) {
            tokio::time::sleep(s.broker.login_throttle().failed(ip, None)).await;
        }
        ApiError(
            StatusCode::UNAUTHORIZED,
            "an administrator user name and password are required (HTTP basic auth)".into(),
        )
        .into_response()
    }
}

fn authorized(users: &Users, headers: &HeaderMap) -> bool {
    basic_credentials(headers).is_some_and(|(user, pass)| {
        users
            .authenticate(&user, &pass)
            .is_some_and(|u| u.is_admin())
    })
}

/// The user name and password of an `Authorization: Basic` header (both APIs log in
/// with it).
pub(crate) fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.strip_prefix("Basic ")?.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, pass) = text.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

/// 200 `{"status": "ok"}` while the store takes writes; 503 `{"status": "degraded",
/// "reason", "since_ms"}` while it does not (a full disk, no file handles: it recovers by
/// itself). `last_degraded` tells the last such period once it ended.
async fn health(State(s): State<AdminState>) -> Response {
    let h = s.broker.store_health();
    let (code, mut body) = match &h.degraded {
        None => (StatusCode::OK, json!({ "status": "ok" })),
        Some(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "degraded", "reason": d.reason, "since_ms": d.since }),
        ),
    };
    if let Some(l) = &h.last_degraded {
        body["last_degraded"] = json!({
            "reason": l.reason,
            "since_ms": l.since,
            "until_ms": l.until,
        });
    }
    body["store_errors"] = json!(h.errors);
    (code, Json(body)).into_response()
}

/// The replicated log: this node, the owner and its epoch, the stream's replicas and
/// each gateway's lag (`{"backend": "rocksdb"}` etc. when the store is not replicated).
async fn cluster(State(s): State<AdminState>) -> ApiResult {
    use mqgate_store::jetstream::Role;
    if let Some((nats, shards)) = &s.sharded {
        return Ok(Json(sharded(&s.broker, nats, *shards).await));
    }
    let Some(r) = &s.replication else {
        return Ok(Json(json!({ "backend": s.backend, "replicated": false })));
    };
    let st = r.status().await.map_err(|e| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the replicated log does not answer: {e}"),
        )
    })?;
    let role = match &st.role {
        Role::Owner { epoch } => json!({ "role": "owner", "epoch": epoch }),
        Role::Standby { applied, last } => {
            json!({ "role": "standby", "applied": applied, "last": last })
        }
        Role::SteppedDown { reason } => json!({ "role": "stepped_down", "reason": reason }),
    };
    Ok(Json(json!({
        "backend": "jetstream",
        "replicated": true,
        "stream": st.stream,
        "node": st.node,
        "this_node": role,
        // The lease's current revision (it moves at each renewal); the owner's epoch is
        // the revision it took the log with, `this_node.epoch` on the owner.
        "owner": st.owner.as_ref().map(|(n, r)| json!({ "node": n, "lease_revision": r })),
        "first_seq": st.first_seq,
        "last_seq": st.last_seq,
        "applied": st.applied,
        "replicas": st.replicas.iter().map(|p| json!({
            "name": p.name,
            "leader": p.leader,
            "current": p.current,
            "offline": p.offline,
            "lag": p.lag,
        })).collect::<Vec<_>>(),
        "nodes": st.nodes.iter().map(|n| json!({
            "node": n.node,
            "role": n.role,
            "applied": n.applied,
            "lag": n.lag,
        })).collect::<Vec<_>>(),
    })))
}

/// A sharded cluster: the live gateways, this one's shards, and per shard its owner,
/// its ranked owner and standby, its log's length and each gateway's lag.
async fn sharded(broker: &Broker, nats: &mqgate_store::jetstream::Nats, shards: u16) -> Value {
    let live = mqgate_cluster::status::live_nodes(nats).await;
    let st = mqgate_cluster::status::shards(nats, shards).await;
    json!({
        "backend": "jetstream",
        "replicated": true,
        "sharded": true,
        "stream": nats.config().stream,
        "node": nats.config().node_id,
        "live": live,
        "owned": broker.owned_shards(),
        "routing_followed": broker.routing_followed(),
        "shards": st.iter().map(|x| json!({
            "shard": x.shard,
            "owner": x.owner.as_ref().map(|(n, _)| n),
            "lease_revision": x.owner.as_ref().map(|(_, r)| r),
            "ranked_owner": x.ranked_owner,
            "standby": x.standby,
            "last_seq": x.last_seq,
            "reports": x.reports.iter().map(|r| json!({
                "node": r.node,
                "role": r.role,
                "applied": r.applied,
                "lag": r.lag,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.render().await,
    )
}

fn topic_name(name: &str) -> Result<TopicName, ApiError> {
    TopicName::new(name).map_err(|e| bad_request(e.to_string()))
}

fn group_name(name: &str) -> Result<GroupName, ApiError> {
    GroupName::new(name).map_err(|e| bad_request(e.to_string()))
}

fn message_json(m: &StoredMessage) -> Value {
    let body = &m.message.body;
    let props: serde_json::Map<String, Value> = m
        .message
        .properties
        .iter()
        .filter(|(k, _)| k != "amqp.props")
        .map(|(k, v)| {
            (
                k.to_string(),
                Value::String(String::from_utf8_lossy(v).into_owned()),
            )
        })
        .collect();
    json!({
        "id": m.id.0,
        "topic": m.message.topic.as_str(),
        "stored_at": m.store_timestamp,
        "born_at": m.message.born_timestamp,
        "keys": m.message.keys,
        "tags": m.message.tags,
        "producer_group": m.message.producer_group,
        "reconsume_times": m.message.reconsume_times,
        "properties": props,
        "size": body.len(),
        "body": String::from_utf8_lossy(&body[..body.len().min(4096)]),
        "body_base64": base64::engine::general_purpose::STANDARD.encode(&body[..body.len().min(4096)]),
        "body_truncated": body.len() > 4096,
    })
}

async fn overview(State(s): State<AdminState>) -> ApiResult {
    let st = s.broker.store_stats();
    let a = s.amqp.stats();
    let m = s.mqtt.stats();
    Ok(Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "store": { "messages": st.messages, "log_bytes": st.log_bytes, "topics": st.topics, "timers": st.timers },
        "delayed_pending": s.broker.delayed_pending(),
        "connections": {
            "amqp": a.open_connections(),
            "mqtt": m.open_connections(),
        },
        "mqtt_sessions": s.mqtt.session_count(),
        "memory": { "resident_bytes": crate::metrics::process_rss() },
    })))
}

fn offsets(t: &mqgate_core::TopicView) -> Vec<Value> {
    t.ranges
        .iter()
        .enumerate()
        .map(|(q, r)| {
            json!({ "queue": q, "min": r.min.0, "next": r.next.0, "messages": r.next.0 - r.min.0 })
        })
        .collect()
}

/// Every topic of every shard (in a cluster, the others' through the gateways owning
/// them; a shard nobody answers for is logged and left out).
async fn topics(State(s): State<AdminState>) -> ApiResult {
    let all = s.broker.topic_views().await;
    if !all.missing.is_empty() {
        tracing::warn!(shards = ?all.missing, "admin: topics of shards nobody answers for now are not listed");
    }
    let v: Vec<Value> = all
        .items
        .iter()
        .map(|t| {
            let qs = offsets(t);
            let messages: u64 = qs.iter().map(|q| q["messages"].as_u64().unwrap_or(0)).sum();
            json!({
                "name": t.config.name.as_str(), "queues": t.config.queue_count,
                "messages": messages, "offsets": qs,
            })
        })
        .collect();
    Ok(Json(Value::Array(v)))
}

#[derive(Deserialize)]
struct CreateTopic {
    name: String,
    #[serde(default)]
    queues: Option<u32>,
}

async fn create_topic(State(s): State<AdminState>, Json(c): Json<CreateTopic>) -> ApiResult {
    let t = s
        .broker
        .create_topic(&topic_name(&c.name)?, c.queues)
        .await?;
    Ok(Json(
        json!({ "name": t.name.as_str(), "queues": t.queue_count }),
    ))
}

async fn topic(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    let n = topic_name(&name)?;
    let t = s
        .broker
        .topic_view(&n)
        .await?
        .ok_or_else(|| not_found(format!("no topic {name}")))?;
    let producers: Vec<Value> = s
        .broker
        .producer_stats()
        .into_iter()
        .filter(|p| p.topic == n)
        .map(|p| json!({ "producer_group": p.producer_group, "messages": p.messages }))
        .collect();
    Ok(Json(json!({
        "name": name, "queues": t.config.queue_count, "offsets": offsets(&t),
        "producers": producers,
    })))
}

/// What each producer group published to each topic since the broker started.
async fn producers(State(s): State<AdminState>) -> ApiResult {
    Ok(Json(Value::Array(
        s.broker
            .producer_stats()
            .into_iter()
            .map(|p| {
                json!({
                    "topic": p.topic.as_str(), "producer_group": p.producer_group,
                    "messages": p.messages,
                })
            })
            .collect(),
    )))
}

#[derive(Deserialize)]
struct DelayedQuery {
    topic: Option<String>,
    key: Option<String>,
    after: Option<String>,
    #[serde(default = "default_limit")]
    limit: usize,
}

/// A timer id as the API shows it: `<due ms>-<seq>`.
fn timer_id(k: &mqgate_store::TimerKey) -> String {
    format!("{}-{}", k.due, k.seq)
}

fn parse_timer_id(s: &str) -> Result<mqgate_store::TimerKey, ApiError> {
    let (due, seq) = s
        .split_once('-')
        .and_then(|(d, q)| Some((d.parse().ok()?, q.parse().ok()?)))
        .ok_or_else(|| bad_request(format!("bad delayed message id {s:?} (want <due>-<seq>)")))?;
    Ok(mqgate_store::TimerKey { due, seq })
}

/// Pending delayed messages (and retries, delayed wills), in due order, filtered by
/// topic and key, a page at a time (`after` = the last id of the previous page).
async fn delayed(State(s): State<AdminState>, Query(q): Query<DelayedQuery>) -> ApiResult {
    let after = q.after.as_deref().map(parse_timer_id).transpose()?;
    let page = s
        .broker
        .delayed(after, q.limit, q.topic.as_deref(), q.key.as_deref())
        .await?;
    let items: Vec<Value> = page
        .timers
        .iter()
        .map(|t| {
            json!({
                "id": timer_id(&t.id), "due": t.id.due, "kind": t.kind, "topic": t.topic,
                "route": t.route, "keys": t.keys, "producer_group": t.producer_group,
                "size": t.size, "born_timestamp": t.born_timestamp,
            })
        })
        .collect();
    Ok(Json(json!({
        "pending": s.broker.delayed_pending(),
        "items": items,
        "next": page.next.as_ref().map(timer_id),
    })))
}

/// Cancel one delayed message by its id.
async fn cancel_delayed(State(s): State<AdminState>, Path(id): Path<String>) -> ApiResult {
    let key = parse_timer_id(&id)?;
    if !s.broker.cancel_delayed(key).await? {
        return Err(not_found(format!("no pending delayed message {id}")));
    }
    Ok(Json(json!({ "cancelled": 1, "id": id })))
}

/// Cancel every pending delayed message of `topic` with `key`.
async fn cancel_delayed_by_key(
    State(s): State<AdminState>,
    Query(q): Query<DelayedQuery>,
) -> ApiResult {
    let (Some(topic), Some(key)) = (q.topic.as_deref(), q.key.as_deref()) else {
        return Err(bad_request("cancelling by key needs topic= and key="));
    };
    let n = s.broker.cancel_delayed_by_key(topic, key).await?;
    Ok(Json(json!({ "cancelled": n, "topic": topic, "key": key })))
}

async fn delete_topic(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    if !s.broker.delete_topic(&topic_name(&name)?).await? {
        return Err(not_found(format!("no topic {name}")));
    }
    Ok(Json(json!({ "deleted": name })))
}

#[derive(Deserialize)]
struct Range {
    #[serde(default)]
    from: u64,
    #[serde(default = "default_limit")]
    limit: usize,
}

fn default_limit() -> usize {
    20
}

async fn queue_messages(
    State(s): State<AdminState>,
    Path((name, queue)): Path<(String, u32)>,
    Query(r): Query<Range>,
) -> ApiResult {
    let q = QueueRef::new(topic_name(&name)?, queue);
    let msgs = s
        .broker
        .peek(
            &q,
            QueueOffset(r.from),
            ReadLimits::count(r.limit.min(1000)),
        )
        .await?;
    Ok(Json(with_offsets(&msgs)))
}

/// Messages read from a queue, each with its offset.
fn with_offsets(msgs: &[mqgate_store::QueueMessage]) -> Value {
    Value::Array(
        msgs.iter()
            .map(|m| {
                let mut v = message_json(&m.message);
                v["offset"] = json!(m.entry.offset.0);
                v
            })
            .collect(),
    )
}

async fn groups(State(s): State<AdminState>) -> ApiResult {
    let mut v = Vec::new();
    let all = s.broker.group_names().await;
    if !all.missing.is_empty() {
        tracing::warn!(shards = ?all.missing, "admin: groups of shards nobody answers for now are not listed");
    }
    for g in all.items {
        let info = s.broker.group_info(&g).await.ok();
        let (lag, members) = info
            .map(|i| (i.queues.iter().map(|q| q.lag).sum::<u64>(), i.members.len()))
            .unwrap_or((0, 0));
        v.push(json!({ "name": g.as_str(), "members": members, "lag": lag }));
    }
    Ok(Json(Value::Array(v)))
}

async fn group(State(s): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    let i = s.broker.group_info(&group_name(&name)?).await?;
    Ok(Json(json!({
        "name": name,
        "members": i.members.iter().map(|m| json!({
            "id": m.id, "unacked": m.unacked, "prefetch": m.prefetch,
            "queues": m.queues.iter().map(|q| q.to_string()).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
        "queues": i.queues.iter().map(|q| json!({
            "queue": q.queue.to_string(), "member": q.member, "committed": q.committed,
            "next": q.next, "lag": q.lag, "ready": q.ready, "in_flight": q.in_flight,
        })).collect::<Vec<_>>(),
        "lag": i.queues.iter().map(|q| q.lag).sum::<u64>(),
        "skipped": i.skipped,
    })))
}

#[derive(Deserialize)]
struct Reset {
    /// `first`, `last`, or a timestamp in ms since the epoch.
    to: Value,
}

async fn reset_group(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Json(r): Json<Reset>,
) -> ApiResult {
    let to = match &r.to {
        Value::String(x) if x == "first" => StartPosition::First,
        Value::String(x) if x == "last" => StartPosition::Last,
        Value::Number(n) => StartPosition::Timestamp(
            n.as_u64()
                .ok_or_else(|| bad_request("to: a timestamp in ms since the epoch"))?,
        ),
        Value::String(x) => StartPosition::Timestamp(
            x.parse()
                .map_err(|_| bad_request("to: first, last, or a timestamp in ms"))?,
        ),
        _ => return Err(bad_request("to: first, last, or a timestamp in ms")),
    };
    s.broker.reset_group(&group_name(&name)?, to).await?;
    group(State(s), Path(name)).await
}

async fn dlq(
    State(s): State<AdminState>,
    Path(g): Path<String>,
    Query(r): Query<Range>,
) -> ApiResult {
    let msgs = s
        .broker
        .dlq(&group_name(&g)?, r.from, r.limit.min(1000))
        .await?;
    Ok(Json(with_offsets(&msgs)))
}

#[derive(Deserialize)]
struct Resend {
    /// DLQ offsets to resend.
    #[serde(default)]
    offsets: Vec<u64>,
    /// Or a range: from this offset, at most `limit` messages.
    #[serde(default)]
    from: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

async fn resend_dlq(
    State(s): State<AdminState>,
    Path(g): Path<String>,
    Json(r): Json<Resend>,
) -> ApiResult {
    let group = group_name(&g)?;
    if let Some(from) = r.from {
        // A page in one store write.
        let limit = r.limit.unwrap_or(1000).min(10_000);
        let (resent, last) = s.broker.resend_dlq_page(&group, from, limit).await?;
        return Ok(Json(json!({ "resent": resent, "last_offset": last })));
    }
    let mut resent = 0;
    let mut last = None;
    for o in r.offsets {
        s.broker.resend_dlq(&group, o).await?;
        resent += 1;
        last = Some(o);
    }
    Ok(Json(json!({ "resent": resent, "last_offset": last })))
}

async fn message(State(s): State<AdminState>, Path(id): Path<u64>) -> ApiResult {
    let m = s
        .broker
        .message(MessageId(id))
        .await?
        .ok_or_else(|| not_found(format!("no message {id} (or retention deleted it)")))?;
    Ok(Json(message_json(&m)))
}

#[derive(Deserialize)]
struct ByKey {
    topic: String,
    key: String,
    #[serde(default = "default_limit")]
    limit: usize,
}

async fn messages_by_key(State(s): State<AdminState>, Query(q): Query<ByKey>) -> ApiResult {
    let msgs = s
        .broker
        .messages_by_key(&topic_name(&q.topic)?, &q.key, q.limit.min(1000))
        .await?;
    Ok(Json(Value::Array(
        msgs.iter().map(|m| message_json(m)).collect(),
    )))
}

async fn connections(State(s): State<AdminState>) -> ApiResult {
    let all = s.amqp.connections().into_iter().chain(s.mqtt.connections());
    Ok(Json(Value::Array(
        all.map(|c| {
            json!({
                "protocol": c.protocol, "id": c.id, "peer": c.peer, "user": c.user,
                "detail": c.detail, "connected_at": c.connected_at,
            })
        })
        .collect(),
    )))
}

async fn close_connection(
    State(s): State<AdminState>,
    Path((protocol, id)): Path<(String, String)>,
) -> ApiResult {
    let closed = match protocol.as_str() {
        "amqp" => s.amqp.close(&id),
        "mqtt" => s.mqtt.close(&id),
        _ => return Err(bad_request("protocol: amqp or mqtt")),
    };
    if !closed {
        return Err(not_found(format!("no {protocol} connection {id}")));
    }
    Ok(Json(json!({ "closed": id, "protocol": protocol })))
}

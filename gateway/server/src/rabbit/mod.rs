//! RabbitMQ's management HTTP API on the admin listener, so the tools RabbitMQ users run
//! (`rabbitmqadmin`, KEDA's RabbitMQ scaler, Flower's broker tab, monitoring scripts)
//! work unchanged: RabbitMQ's paths under `/api/`, its JSON field names, HTTP basic auth
//! with its user tags (`administrator`, `monitoring`, `management`, `policymaker`).
//! mqgate's own API lives under `/api/mqgate/` (see `admin.rs`).
//!
//! Reads come from the AMQP adapter (queues, consumers, channels), the router
//! (exchanges, bindings) and the core (each queue's group: ready, in flight, offsets).
//! Writes (declare, delete, bind, purge, publish, get) go through a direct AMQP
//! connection logged in as the HTTP user ([`mqgate_amqp::Direct`]): the same code and the
//! same permission checks as a socket client, answered as RabbitMQ answers them.
//! `docs/rabbitmq-management.md` lists what is served.

mod json;
mod rates;

use std::collections::HashMap;
use std::sync::Arc;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use mqgate_amqp::{DirectError, GetAck, QueueView};
use mqgate_core::router::Destination;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::admin::AdminState;
pub(crate) use rates::{spawn_sampler, Rates};

use json::ListQuery;

/// The version reported as `management_version` / `rabbitmq_version`: the RabbitMQ
/// release whose API this follows (tools check it), `product_version` is mqgate's.
const RABBITMQ_VERSION: &str = "3.10.8";

/// The node name shown where RabbitMQ shows its Erlang node.
fn node() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("mqgate@{host}")
}

/// An error as RabbitMQ's API answers it: `{"error": ..., "reason": ...}`.
pub(crate) struct RError(StatusCode, &'static str, String);

impl IntoResponse for RError {
    fn into_response(self) -> Response {
        // No credentials at all: RabbitMQ answers 401 with an empty body.
        let mut r = if self.1.is_empty() {
            self.0.into_response()
        } else {
            (self.0, Json(json!({ "error": self.1, "reason": self.2 }))).into_response()
        };
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"RabbitMQ Management\""),
            );
        }
        r
    }
}

type RResult<T = Json<Value>> = Result<T, RError>;

fn not_found() -> RError {
    RError(
        StatusCode::NOT_FOUND,
        "Object Not Found",
        "Not Found".into(),
    )
}

fn bad_request(reason: impl Into<String>) -> RError {
    RError(StatusCode::BAD_REQUEST, "bad_request", reason.into())
}

fn not_authorised(reason: impl Into<String>) -> RError {
    RError(StatusCode::UNAUTHORIZED, "not_authorised", reason.into())
}

/// A refusal from the direct connection, as RabbitMQ's API reports it.
fn from_direct(e: DirectError) -> RError {
    use mqgate_amqp::reply;
    let reason = e.text.clone();
    match e.code {
        reply::ACCESS_REFUSED | reply::NOT_ALLOWED => {
            RError(StatusCode::UNAUTHORIZED, "not_authorised", reason)
        }
        reply::NOT_FOUND => RError(StatusCode::NOT_FOUND, "not_found", reason),
        reply::PRECONDITION_FAILED
        | reply::RESOURCE_LOCKED
        | reply::COMMAND_INVALID
        | reply::SYNTAX_ERROR
        | reply::NOT_IMPLEMENTED => bad_request(reason),
        _ => RError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_server_error",
            reason,
        ),
    }
}

/// How much of the API a user may use, by tags (RabbitMQ's management permissions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    /// `management`, `policymaker`: their vhosts, their own connections.
    Management,
    /// `monitoring`: every vhost and connection, read only beyond their permissions.
    Monitoring,
    /// `administrator`: everything, users and permissions too.
    Administrator,
}

/// The logged-in user.
struct Who {
    name: String,
    password: String,
    tags: Vec<String>,
    level: Level,
}

fn who(s: &AdminState, headers: &HeaderMap) -> Result<Who, RError> {
    let creds = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        })
        .and_then(|raw| String::from_utf8(raw).ok())
        .and_then(|t| t.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())));
    let Some((name, password)) = creds else {
        return Err(RError(StatusCode::UNAUTHORIZED, "", String::new()));
    };
    let Some(account) = s.users.authenticate(&name, &password) else {
        return Err(RError(
            StatusCode::UNAUTHORIZED,
            "not_authorized",
            "Login failed".into(),
        ));
    };
    let has = |t: &str| account.tags.iter().any(|x| x == t);
    let level = if has("administrator") {
        Level::Administrator
    } else if has("monitoring") {
        Level::Monitoring
    } else if has("management") || has("policymaker") {
        Level::Management
    } else {
        return Err(not_authorised("Not management user"));
    };
    Ok(Who {
        name,
        password,
        tags: account.tags.clone(),
        level,
    })
}

/// Every management route: log in (a failed attempt is answered late, later with every
/// recent failure from the same address, as the other listeners do) and hand the
/// handlers the user.
async fn auth(
    State(s): State<AdminState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let source = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    match who(&s, req.headers()) {
        Ok(w) => {
            if let Some(ip) = source {
                s.broker.login_throttle().succeeded(ip);
            }
            req.extensions_mut().insert(Arc::new(w));
            next.run(req).await
        }
        Err(e) => {
            if let (true, Some(ip)) = (e.1 == "not_authorized", source) {
                tokio::time::sleep(s.broker.login_throttle().failed(ip, None)).await;
            }
            e.into_response()
        }
    }
}

impl Who {
    /// Whether it sees `vhost` (monitoring and administrators see all).
    fn sees(&self, s: &AdminState, vhost: &str) -> bool {
        self.level >= Level::Monitoring || s.amqp.config().permission(&self.name, vhost).is_some()
    }

    fn admin(&self) -> Result<(), RError> {
        match self.level {
            Level::Administrator => Ok(()),
            _ => Err(not_authorised("Not administrator user")),
        }
    }

    /// A vhost it may use, or 404 / 401 as RabbitMQ answers.
    fn vhost(&self, s: &AdminState, vhost: &str) -> Result<(), RError> {
        if !s.broker.router().vhosts().iter().any(|v| v == vhost) {
            return Err(not_found());
        }
        if !self.sees(s, vhost) {
            return Err(not_authorised("User not authorised to access virtual host"));
        }
        Ok(())
    }

    async fn direct(&self, s: &AdminState, vhost: &str) -> Result<mqgate_amqp::Direct, RError> {
        self.vhost(s, vhost)?;
        s.amqp
            .direct(&self.name, &self.password, vhost)
            .await
            .map_err(from_direct)
    }
}

/// The management API's routes (merged into the admin router; their own auth).
pub(crate) fn router(state: AdminState) -> Router<AdminState> {
    Router::new()
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/nodes", get(nodes))
        .route("/api/vhosts", get(vhosts))
        .route("/api/vhosts/{vhost}", get(vhost))
        .route("/api/users", get(users))
        .route("/api/users/{name}", get(user))
        .route("/api/permissions", get(permissions))
        .route("/api/queues", get(queues))
        .route("/api/queues/", get(queues))
        .route("/api/queues/{vhost}", get(queues_of))
        .route(
            "/api/queues/{vhost}/{name}",
            get(queue).put(put_queue).delete(delete_queue),
        )
        .route(
            "/api/queues/{vhost}/{name}/contents",
            axum::routing::delete(purge_queue),
        )
        .route("/api/queues/{vhost}/{name}/get", post(get_messages))
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route("/api/exchanges", get(exchanges))
        .route("/api/exchanges/{vhost}", get(exchanges_of))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(exchange).put(put_exchange).delete(delete_exchange),
        )
        .route("/api/exchanges/{vhost}/{name}/publish", post(publish))
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(exchange_bindings_source),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(exchange_bindings_destination),
        )
        .route("/api/bindings", get(bindings))
        .route("/api/bindings/{vhost}", get(bindings_of))
        .route(
            "/api/bindings/{vhost}/e/{source}/{dtype}/{dest}",
            get(bindings_between).post(post_binding),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{dtype}/{dest}/{props}",
            get(binding).delete(delete_binding),
        )
        .route("/api/connections", get(connections))
        .route(
            "/api/connections/{name}",
            get(connection).delete(close_connection),
        )
        .route("/api/channels", get(channels))
        .route("/api/consumers", get(consumers))
        .route("/api/consumers/{vhost}", get(consumers_of))
        .route("/api/healthchecks/node", get(healthcheck))
        .route("/api/health/checks/alarms", get(healthcheck))
        .route("/api/aliveness-test/{vhost}", get(aliveness))
        .route("/api/extensions", get(extensions))
        .route("/api/definitions", put(no_definitions).post(no_definitions))
        .layer(axum::middleware::from_fn_with_state(state, auth))
}

/// One object, with `columns=` applied.
fn one(v: Value, q: &ListQuery) -> RResult {
    match &q.columns {
        None => Ok(Json(v)),
        Some(_) => listed(vec![v], q).map(|Json(mut a)| Json(a[0].take())),
    }
}

fn listed(items: Vec<Value>, q: &ListQuery) -> RResult {
    json::list(items, q)
        .map(Json)
        .map_err(|(e, r)| RError(StatusCode::BAD_REQUEST, e, r))
}

/// A rate as RabbitMQ nests it: `{"rate": r}`.
fn details(rate: f64) -> Value {
    json!({ "rate": (rate * 10.0).round() / 10.0 })
}

// ----- overview, whoami, nodes, vhosts, users, permissions -----

async fn overview(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(lq): Query<ListQuery>,
) -> RResult {
    let queues: Vec<QueueView> = s
        .amqp
        .queues()
        .into_iter()
        .filter(|q| w.sees(&s, &q.vhost))
        .collect();
    let mut totals = rates::QueueCounters::default();
    for q in &queues {
        totals.add(&s.rates.queue_now(&s, q).await);
    }
    let r = s.rates.global_rates();
    let qr = s.rates.total_queue_rates();
    let g = s.rates.global_now(&s);
    let exchanges: usize = s
        .broker
        .router()
        .vhosts()
        .iter()
        .filter(|v| w.sees(&s, v))
        .map(|v| s.broker.router().exchanges(v).len())
        .sum();
    let node = node();
    let exchange_types: Vec<Value> = ["direct", "fanout", "headers", "topic", "x-delayed-message"]
        .iter()
        .map(|t| json!({ "name": t, "description": "", "enabled": true }))
        .collect();
    let listeners: Vec<Value> = [
        ("amqp", s.listeners.amqp),
        ("mqtt", s.listeners.mqtt),
        ("http", s.listeners.admin),
    ]
    .iter()
    .filter_map(|(p, a)| {
        a.map(|a| {
            json!({
                "node": node, "protocol": p, "ip_address": a.ip().to_string(), "port": a.port(),
                "socket_opts": {},
            })
        })
    })
    .collect();
    one(
        json!({
            "management_version": RABBITMQ_VERSION,
            "rates_mode": "basic",
            "sample_retention_policies": {"global": [600, 3600, 28800, 86400], "basic": [600, 3600], "detailed": [600]},
            "exchange_types": exchange_types,
            "product_version": env!("CARGO_PKG_VERSION"),
            "product_name": "mqgate",
            "rabbitmq_version": RABBITMQ_VERSION,
            "cluster_name": node,
            "erlang_version": "-",
            "erlang_full_version": "-",
            "disable_stats": false,
            "enable_queue_totals": false,
            "message_stats": {
                "publish": g.publish, "publish_details": details(r.publish),
                "deliver_get": g.deliver_get, "deliver_get_details": details(r.deliver_get),
                "deliver": g.deliver_get, "deliver_details": details(r.deliver_get),
                "ack": g.ack, "ack_details": details(r.ack),
                "redeliver": g.redeliver, "redeliver_details": details(r.redeliver),
                "return_unroutable": g.unroutable, "return_unroutable_details": details(r.unroutable),
            },
            "churn_rates": {},
            "queue_totals": {
                "messages": totals.messages, "messages_details": details(qr.messages),
                "messages_ready": totals.ready, "messages_ready_details": details(qr.ready),
                "messages_unacknowledged": totals.unacked,
                "messages_unacknowledged_details": details(qr.unacked),
            },
            "object_totals": {
                "channels": s.amqp.channels().len(),
                "connections": s.amqp.connections().len() + s.mqtt.connections().len(),
                "consumers": s.amqp.consumers().len(),
                "exchanges": exchanges,
                "queues": queues.len(),
            },
            "statistics_db_event_queue": 0,
            "node": node,
            "listeners": listeners,
            "contexts": [{"node": node, "description": "RabbitMQ Management (mqgate)", "path": "/",
                          "port": s.listeners.admin.map(|a| a.port().to_string())}],
        }),
        &lq,
    )
}

async fn whoami(Extension(w): Extension<Arc<Who>>) -> RResult {
    Ok(Json(json!({ "name": w.name, "tags": w.tags })))
}

async fn nodes(State(s): State<AdminState>) -> RResult {
    let m = crate::metrics::process_rss().unwrap_or(0);
    Ok(Json(json!([{
        "name": node(), "type": "disc", "running": true,
        "mem_used": m, "uptime": s.broker.now().saturating_sub(s.started_at),
        "os_pid": std::process::id().to_string(),
        "partitions": [], "being_drained": false,
    }])))
}

fn vhost_json(s: &AdminState, v: &str, totals: &rates::QueueCounters) -> Value {
    json!({
        "name": v,
        "description": if v == "/" { "Default virtual host" } else { "" },
        "tags": [],
        "metadata": {"description": if v == "/" { "Default virtual host" } else { "" }, "tags": []},
        "default_queue_type": "undefined",
        "tracing": false,
        "cluster_state": { node(): "running" },
        "messages": totals.messages,
        "messages_ready": totals.ready,
        "messages_unacknowledged": totals.unacked,
        "queues": s.amqp.queues().iter().filter(|q| q.vhost == v).count(),
    })
}

async fn vhost_totals(s: &AdminState, v: &str) -> rates::QueueCounters {
    let mut t = rates::QueueCounters::default();
    for q in s.amqp.queues().iter().filter(|q| q.vhost == v) {
        t.add(&s.rates.queue_now(s, q).await);
    }
    t
}

async fn vhosts(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    let mut out = Vec::new();
    for v in s.broker.router().vhosts() {
        if w.sees(&s, &v) {
            let t = vhost_totals(&s, &v).await;
            out.push(vhost_json(&s, &v, &t));
        }
    }
    listed(out, &q)
}

async fn vhost(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
) -> RResult {
    w.vhost(&s, &v)?;
    let t = vhost_totals(&s, &v).await;
    Ok(Json(vhost_json(&s, &v, &t)))
}

fn user_json(name: &str, u: &mqgate_core::auth::UserAccount) -> Value {
    json!({
        "name": name,
        "password_hash": u.password.to_hash_string(),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": u.tags,
        "limits": {},
    })
}

async fn users(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.admin()?;
    let mut v: Vec<Value> = s.users.0.iter().map(|(n, u)| user_json(n, u)).collect();
    v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    listed(v, &q)
}

async fn user(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(name): Path<String>,
) -> RResult {
    w.admin()?;
    let u = s.users.0.get(&name).ok_or_else(not_found)?;
    Ok(Json(user_json(&name, u)))
}

async fn permissions(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.admin()?;
    let mut v = Vec::new();
    let mut names: Vec<&String> = s.users.0.keys().collect();
    names.sort();
    for u in names {
        for vh in s.broker.router().vhosts() {
            if let Some(p) = s.amqp.config().permission(u, &vh) {
                v.push(json!({
                    "user": u, "vhost": vh, "configure": p.configure.as_str(),
                    "write": p.write.as_str(), "read": p.read.as_str(),
                }));
            }
        }
    }
    listed(v, &q)
}

// ----- queues -----

async fn queue_json(s: &AdminState, q: &QueueView) -> Value {
    let c = s.rates.queue_now(s, q).await;
    let r = s.rates.queue_rates(&q.vhost, &q.name);
    let consumers: Vec<_> = s
        .amqp
        .consumers()
        .into_iter()
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
fn no_nulls(mut v: Value) -> Value {
    if let Value::Object(m) = &mut v {
        m.retain(|_, x| !x.is_null());
    }
    v
}

async fn queue_list(s: &AdminState, w: &Who, vhost: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    for q in s.amqp.queues() {
        if vhost.is_some_and(|v| v != q.vhost) || !w.sees(s, &q.vhost) {
            continue;
        }
        out.push(queue_json(s, &q).await);
    }
    out
}

async fn queues(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    listed(queue_list(&s, &w, None).await, &q)
}

async fn queues_of(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    listed(queue_list(&s, &w, Some(&v)).await, &q)
}

async fn queue(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    Query(lq): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    let q = s.amqp.queue(&v, &name).ok_or_else(not_found)?;
    one(queue_json(&s, &q).await, &lq)
}

/// A request body as RabbitMQ reads it: an empty body is `{}`, and booleans and numbers
/// may come as strings (`rabbitmqadmin` sends `"durable": "true"`, `"count": "2"`).
struct Body(serde_json::Map<String, Value>);

fn body(raw: &[u8]) -> Result<Body, RError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        return Ok(Body(serde_json::Map::new()));
    }
    match serde_json::from_slice(raw) {
        Ok(Value::Object(m)) => Ok(Body(m)),
        Ok(_) => Err(bad_request("the body must be a JSON object")),
        Err(e) => Err(bad_request(format!("bad JSON body: {e}"))),
    }
}

impl Body {
    fn flag(&self, k: &str, default: bool) -> Result<bool, RError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(x)) if x == "true" => Ok(true),
            Some(Value::String(x)) if x == "false" => Ok(false),
            Some(other) => Err(bad_request(format!("{k}: not a boolean: {other}"))),
        }
    }

    fn count(&self, k: &str) -> Result<Option<u64>, RError> {
        match self.0.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) if n.as_u64().is_some() => Ok(n.as_u64()),
            Some(Value::String(x)) => x
                .parse()
                .map(Some)
                .map_err(|_| bad_request(format!("{k}: not a number: {x:?}"))),
            Some(other) => Err(bad_request(format!("{k}: not a number: {other}"))),
        }
    }

    fn text(&self, k: &str) -> Option<String> {
        match self.0.get(k) {
            Some(Value::String(x)) => Some(x.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    }

    fn required(&self, k: &str) -> Result<String, RError> {
        self.text(k)
            .ok_or_else(|| bad_request(format!("[{{key_missing,{k}}}]")))
    }

    fn arguments(&self) -> Result<FieldTable, RError> {
        json::to_table(self.0.get("arguments").unwrap_or(&Value::Null)).map_err(bad_request)
    }
}

async fn put_queue(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> RResult<StatusCode> {
    let b = body(&raw)?;
    let (durable, auto_delete) = (b.flag("durable", true)?, b.flag("auto_delete", false)?);
    let args = b.arguments()?;
    let existed = s.amqp.queue(&v, &name).is_some();
    let mut d = w.direct(&s, &v).await?;
    let r = d.declare_queue(&name, durable, auto_delete, args).await;
    d.close().await;
    r.map_err(from_direct)?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

#[derive(Deserialize, Default)]
struct DeleteQuery {
    #[serde(rename = "if-unused", default)]
    if_unused: Option<bool>,
    #[serde(rename = "if-empty", default)]
    if_empty: Option<bool>,
}

async fn delete_queue(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    Query(dq): Query<DeleteQuery>,
) -> RResult<StatusCode> {
    w.vhost(&s, &v)?;
    if s.amqp.queue(&v, &name).is_none() {
        return Err(not_found());
    }
    let mut d = w.direct(&s, &v).await?;
    let r = d
        .delete_queue(&name, dq.if_unused == Some(true), dq.if_empty == Some(true))
        .await;
    d.close().await;
    r.map_err(from_direct)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn purge_queue(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
) -> RResult<StatusCode> {
    w.vhost(&s, &v)?;
    if s.amqp.queue(&v, &name).is_none() {
        return Err(not_found());
    }
    let mut d = w.direct(&s, &v).await?;
    let r = d.purge_queue(&name).await;
    d.close().await;
    r.map_err(from_direct)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn get_messages(
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
    w.vhost(&s, &v)?;
    if s.amqp.queue(&v, &name).is_none() {
        return Err(not_found());
    }
    let mut d = w.direct(&s, &v).await?;
    let r = d.get(&name, count.min(100_000) as usize, ack).await;
    d.close().await;
    let got = r.map_err(from_direct)?;
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

fn properties_json(p: &BasicProperties) -> Value {
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

fn properties_from(v: &Value) -> Result<BasicProperties, RError> {
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

// ----- exchanges -----

/// The default exchange is `amq.default` in paths.
fn exchange_name(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

fn exchange_json(s: &AdminState, vhost: &str, e: &mqgate_core::router::ExchangeDef) -> Value {
    let delayed = s.amqp.exchange_delayed(vhost, &e.name);
    let args = match e.arguments.split_first() {
        Some((_, rest)) => json::table_bytes(rest),
        None => json!({}),
    };
    json!({
        "name": e.name,
        "vhost": vhost,
        "type": if delayed { "x-delayed-message" } else { e.kind.as_str() },
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "internal": e.internal,
        "arguments": args,
        "user_who_performed_action": "",
    })
}

fn exchange_list(s: &AdminState, w: &Who, vhost: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    for v in s.broker.router().vhosts() {
        if vhost.is_some_and(|x| x != v) || !w.sees(s, &v) {
            continue;
        }
        let mut ex = s.broker.router().exchanges(&v);
        ex.sort_by(|a, b| a.name.cmp(&b.name));
        out.extend(ex.iter().map(|e| exchange_json(s, &v, e)));
    }
    out
}

async fn exchanges(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    listed(exchange_list(&s, &w, None), &q)
}

async fn exchanges_of(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    listed(exchange_list(&s, &w, Some(&v)), &q)
}

async fn exchange(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
) -> RResult {
    w.vhost(&s, &v)?;
    let e = s
        .broker
        .router()
        .exchange(&v, exchange_name(&name))
        .ok_or_else(not_found)?;
    Ok(Json(exchange_json(&s, &v, &e)))
}

async fn put_exchange(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> RResult<StatusCode> {
    let b = body(&raw)?;
    let kind = b.required("type")?;
    let (durable, auto_delete, internal) = (
        b.flag("durable", true)?,
        b.flag("auto_delete", false)?,
        b.flag("internal", false)?,
    );
    let args = b.arguments()?;
    let existed = s.broker.router().exchange(&v, &name).is_some();
    let mut d = w.direct(&s, &v).await?;
    let r = d
        .declare_exchange(&name, &kind, durable, auto_delete, internal, args)
        .await;
    d.close().await;
    r.map_err(from_direct)?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

async fn delete_exchange(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    Query(dq): Query<DeleteQuery>,
) -> RResult<StatusCode> {
    w.vhost(&s, &v)?;
    if s.broker
        .router()
        .exchange(&v, exchange_name(&name))
        .is_none()
    {
        return Err(not_found());
    }
    let mut d = w.direct(&s, &v).await?;
    let r = d
        .delete_exchange(exchange_name(&name), dq.if_unused == Some(true))
        .await;
    d.close().await;
    r.map_err(from_direct)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn publish(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    raw: axum::body::Bytes,
) -> RResult {
    let b = body(&raw)?;
    let routing_key = b.required("routing_key")?;
    let text = b.required("payload")?;
    let payload = match b.required("payload_encoding")?.as_str() {
        "string" => text.into_bytes(),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| bad_request("payload is not valid base64"))?,
        other => return Err(bad_request(format!("Unknown payload_encoding: {other}"))),
    };
    let props = properties_from(b.0.get("properties").unwrap_or(&Value::Null))?;
    w.vhost(&s, &v)?;
    if s.broker
        .router()
        .exchange(&v, exchange_name(&name))
        .is_none()
    {
        return Err(not_found());
    }
    let mut d = w.direct(&s, &v).await?;
    let r = d
        .publish(exchange_name(&name), &routing_key, &props, &payload)
        .await;
    d.close().await;
    // RabbitMQ answers a refused publish with 400 and the AMQP error in the reason.
    let routed = r.map_err(|e| bad_request(format!("{} {}", e.code, e.text)))?;
    Ok(Json(json!({ "routed": routed })))
}

// ----- bindings -----

/// RabbitMQ's `properties_key`: the routing key (URL-quoted; `~` when empty), with a
/// digest of the arguments when there are any.
fn props_key(key: &str, args: &[u8]) -> String {
    let mut k = if key.is_empty() {
        "~".to_owned()
    } else {
        quote(key)
    };
    if !args.is_empty() && args != [0, 0, 0, 0] {
        let h = args.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        k = format!("{k}~{h:016x}");
    }
    k
}

fn quote(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every binding of a vhost as RabbitMQ lists them: the default exchange's implicit
/// binding of each queue first, then the declared ones (queues by name; bindings to
/// MQTT sessions are not AMQP objects and are left out).
fn binding_list(s: &AdminState, vhost: &str) -> Vec<Value> {
    let queues: Vec<QueueView> = s
        .amqp
        .queues()
        .into_iter()
        .filter(|q| q.vhost == vhost)
        .collect();
    let by_topic: HashMap<&str, &str> = queues
        .iter()
        .map(|q| (q.topic.as_str(), q.name.as_str()))
        .collect();
    let mut out: Vec<Value> = queues
        .iter()
        .map(|q| {
            json!({
                "source": "", "vhost": vhost, "destination": q.name, "destination_type": "queue",
                "routing_key": q.name, "arguments": {}, "properties_key": quote(&q.name),
            })
        })
        .collect();
    let mut declared: Vec<Value> = s
        .broker
        .router()
        .bindings(vhost, None)
        .iter()
        .filter(|b| !b.source.is_empty() && !b.mqtt)
        .filter_map(|b| {
            let (dest, dtype) = match &b.destination {
                Destination::Topic(t) => ((*by_topic.get(t.as_str())?).to_owned(), "queue"),
                Destination::Exchange(e) => (e.clone(), "exchange"),
            };
            Some(json!({
                "source": b.source, "vhost": vhost, "destination": dest,
                "destination_type": dtype, "routing_key": b.key,
                "arguments": json::table_bytes(&b.arguments),
                "properties_key": props_key(&b.key, &b.arguments),
            }))
        })
        .collect();
    declared.sort_by(|a, b| {
        let k = |v: &Value| {
            (
                v["source"].as_str().unwrap_or("").to_owned(),
                v["destination"].as_str().unwrap_or("").to_owned(),
                v["routing_key"].as_str().unwrap_or("").to_owned(),
            )
        };
        k(a).cmp(&k(b))
    });
    out.extend(declared);
    out
}

fn all_bindings(s: &AdminState, w: &Who) -> Vec<Value> {
    s.broker
        .router()
        .vhosts()
        .iter()
        .filter(|v| w.sees(s, v))
        .flat_map(|v| binding_list(s, v))
        .collect()
}

async fn bindings(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    listed(all_bindings(&s, &w), &q)
}

async fn bindings_of(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    listed(binding_list(&s, &v), &q)
}

fn filtered(s: &AdminState, v: &str, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
    binding_list(s, v).into_iter().filter(|b| keep(b)).collect()
}

async fn queue_bindings(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
) -> RResult {
    w.vhost(&s, &v)?;
    s.amqp.queue(&v, &name).ok_or_else(not_found)?;
    Ok(Json(Value::Array(filtered(&s, &v, |b| {
        b["destination_type"] == "queue" && b["destination"] == name.as_str()
    }))))
}

async fn exchange_bindings_source(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
) -> RResult {
    w.vhost(&s, &v)?;
    let n = exchange_name(&name).to_owned();
    s.broker.router().exchange(&v, &n).ok_or_else(not_found)?;
    Ok(Json(Value::Array(filtered(&s, &v, |b| {
        b["source"] == n.as_str()
    }))))
}

async fn exchange_bindings_destination(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
) -> RResult {
    w.vhost(&s, &v)?;
    s.broker
        .router()
        .exchange(&v, &name)
        .ok_or_else(not_found)?;
    Ok(Json(Value::Array(filtered(&s, &v, |b| {
        b["destination_type"] == "exchange" && b["destination"] == name.as_str()
    }))))
}

fn dest_type(d: &str) -> Result<&'static str, RError> {
    match d {
        "q" => Ok("queue"),
        "e" => Ok("exchange"),
        _ => Err(not_found()),
    }
}

async fn bindings_between(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, source, dtype, dest)): Path<(String, String, String, String)>,
) -> RResult {
    w.vhost(&s, &v)?;
    let dt = dest_type(&dtype)?;
    let src = exchange_name(&source).to_owned();
    Ok(Json(Value::Array(filtered(&s, &v, |b| {
        b["source"] == src.as_str()
            && b["destination_type"] == dt
            && b["destination"] == dest.as_str()
    }))))
}

async fn post_binding(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, source, dtype, dest)): Path<(String, String, String, String)>,
    raw: axum::body::Bytes,
) -> RResult<Response> {
    let dt = dest_type(&dtype)?;
    let b = body(&raw)?;
    let routing_key = b.text("routing_key").unwrap_or_default();
    let args = b.arguments()?;
    let mut d = w.direct(&s, &v).await?;
    let r = d
        .binding(
            true,
            &source,
            dt == "queue",
            &dest,
            &routing_key,
            args.clone(),
        )
        .await;
    d.close().await;
    r.map_err(from_direct)?;
    let (enc, _) = cookie_factory::gen(
        amq_protocol::types::generation::gen_field_table(&args),
        Vec::new(),
    )
    .map_err(|e| bad_request(e.to_string()))?;
    let enc = if args.inner().is_empty() {
        Vec::new()
    } else {
        enc
    };
    // Relative to the URL posted to, as RabbitMQ sends it.
    let location = format!("{}/{}", quote(&dest), props_key(&routing_key, &enc));
    Ok((StatusCode::CREATED, [(header::LOCATION, location)]).into_response())
}

fn find_binding(
    s: &AdminState,
    v: &str,
    source: &str,
    dt: &str,
    dest: &str,
    props: &str,
) -> Option<Value> {
    let src = exchange_name(source);
    // The segment arrives percent-decoded: rabbitmqadmin quotes the properties key once
    // more (it arrives as the key itself); a client that did not arrives with the
    // routing key unquoted.
    let requoted = requote(props);
    binding_list(s, v).into_iter().find(|b| {
        b["source"] == src
            && b["destination_type"] == dt
            && b["destination"] == dest
            && (b["properties_key"] == props || b["properties_key"] == requoted.as_str())
    })
}

async fn binding(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, source, dtype, dest, props)): Path<(String, String, String, String, String)>,
) -> RResult {
    w.vhost(&s, &v)?;
    let dt = dest_type(&dtype)?;
    find_binding(&s, &v, &source, dt, &dest, &props)
        .map(Json)
        .ok_or_else(not_found)
}

/// A properties key as it arrived in the path (percent-decoded) back in its quoted form.
fn requote(props: &str) -> String {
    match props.split_once('~') {
        Some(("", rest)) => format!("~{rest}"),
        Some((k, h)) => format!("{}~{h}", quote(k)),
        None => quote(props),
    }
}

async fn delete_binding(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, source, dtype, dest, props)): Path<(String, String, String, String, String)>,
) -> RResult<StatusCode> {
    w.vhost(&s, &v)?;
    let dt = dest_type(&dtype)?;
    let b = find_binding(&s, &v, &source, dt, &dest, &props).ok_or_else(not_found)?;
    let args = json::to_table(&b["arguments"]).map_err(bad_request)?;
    let key = b["routing_key"].as_str().unwrap_or("").to_owned();
    let mut d = w.direct(&s, &v).await?;
    let r = d
        .binding(false, &source, dt == "queue", &dest, &key, args)
        .await;
    d.close().await;
    r.map_err(from_direct)?;
    Ok(StatusCode::NO_CONTENT)
}

// ----- connections, channels, consumers -----

fn conn_name(c: &mqgate_core::ConnectionInfo) -> String {
    format!("{} -> {}:{}", c.peer, c.protocol, c.id)
}

fn all_conns(s: &AdminState) -> Vec<mqgate_core::ConnectionInfo> {
    s.amqp
        .connections()
        .into_iter()
        .chain(s.mqtt.connections())
        .collect()
}

fn conn_details(s: &AdminState, protocol: &str, id: &str) -> Option<Value> {
    let c = all_conns(s)
        .into_iter()
        .find(|c| c.protocol == protocol && c.id == id)?;
    let (host, port) = split_peer(&c.peer);
    Some(json!({ "name": conn_name(&c), "peer_host": host, "peer_port": port }))
}

fn split_peer(peer: &str) -> (String, u16) {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(a) => (a.ip().to_string(), a.port()),
        Err(_) => (peer.to_owned(), 0),
    }
}

fn conn_json(s: &AdminState, c: &mqgate_core::ConnectionInfo) -> Value {
    let (host, port) = split_peer(&c.peer);
    let amqp = c.protocol == "amqp";
    let channels = if amqp {
        let id: u64 = c.id.parse().unwrap_or(0);
        s.amqp.channels().iter().filter(|x| x.0 == id).count()
    } else {
        1
    };
    no_nulls(json!({
        "name": conn_name(c),
        "node": node(),
        "type": "network",
        "state": "running",
        "protocol": if amqp { "AMQP 0-9-1".to_owned() } else { format!("MQTT {}", c.detail) },
        "user": c.user,
        "vhost": if amqp { c.detail.as_str() } else { "/" },
        "peer_host": host,
        "peer_port": port,
        "host": s.listeners.of(c.protocol).map(|a| a.ip().to_string()),
        "port": s.listeners.of(c.protocol).map(|a| a.port()),
        "channels": channels,
        "connected_at": c.connected_at,
        "auth_mechanism": if amqp { "PLAIN" } else { "MQTT" },
        "ssl": false,
        "client_properties": if amqp { json!({}) } else { json!({ "client_id": c.id }) },
        // mqgate: the protocol and id its own API and CLI use.
        "mqgate": { "protocol": c.protocol, "id": c.id },
    }))
}

fn own(w: &Who, c: &mqgate_core::ConnectionInfo) -> bool {
    w.level >= Level::Monitoring || c.user.as_deref() == Some(w.name.as_str())
}

async fn connections(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    let v = all_conns(&s)
        .iter()
        .filter(|c| own(&w, c))
        .map(|c| conn_json(&s, c))
        .collect();
    listed(v, &q)
}

fn find_conn(s: &AdminState, w: &Who, name: &str) -> Result<mqgate_core::ConnectionInfo, RError> {
    all_conns(s)
        .into_iter()
        .find(|c| conn_name(c) == name && own(w, c))
        .ok_or_else(not_found)
}

async fn connection(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(name): Path<String>,
) -> RResult {
    let c = find_conn(&s, &w, &name)?;
    Ok(Json(conn_json(&s, &c)))
}

async fn close_connection(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(name): Path<String>,
) -> RResult<StatusCode> {
    let c = find_conn(&s, &w, &name)?;
    if w.level < Level::Administrator && c.user.as_deref() != Some(w.name.as_str()) {
        return Err(not_authorised("Access refused."));
    }
    let closed = match c.protocol {
        "amqp" => s.amqp.close(&c.id),
        _ => s.mqtt.close(&c.id),
    };
    if closed {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(not_found())
    }
}

async fn channels(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    let conns: HashMap<String, mqgate_core::ConnectionInfo> = s
        .amqp
        .connections()
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
    let consumers = s.amqp.consumers();
    let mut v = Vec::new();
    for (id, n) in s.amqp.channels() {
        let Some(c) = conns.get(&id.to_string()) else {
            continue;
        };
        if !own(&w, c) {
            continue;
        }
        let mine: Vec<_> = consumers
            .iter()
            .filter(|x| x.connection == id && x.channel == n)
            .collect();
        let (host, port) = split_peer(&c.peer);
        v.push(json!({
            "name": format!("{} ({n})", conn_name(c)),
            "number": n,
            "node": node(),
            "user": c.user,
            "vhost": c.detail,
            "state": "running",
            "consumer_count": mine.len(),
            "prefetch_count": mine.first().map_or(0, |x| x.prefetch),
            "connection_details": { "name": conn_name(c), "peer_host": host, "peer_port": port },
        }));
    }
    listed(v, &q)
}

fn consumer_list(s: &AdminState, w: &Who, vhost: Option<&str>) -> Vec<Value> {
    let conns: HashMap<String, mqgate_core::ConnectionInfo> = s
        .amqp
        .connections()
        .into_iter()
        .map(|c| (c.id.clone(), c))
        .collect();
    s.amqp
        .consumers()
        .into_iter()
        .filter(|c| vhost.is_none_or(|v| v == c.vhost) && w.sees(s, &c.vhost))
        .filter_map(|c| {
            let conn = conns.get(&c.connection.to_string())?;
            if !own(w, conn) {
                return None;
            }
            let (host, port) = split_peer(&conn.peer);
            Some(json!({
                "consumer_tag": c.tag,
                "queue": { "name": c.queue, "vhost": c.vhost },
                "channel_details": {
                    "name": format!("{} ({})", conn_name(conn), c.channel),
                    "number": c.channel, "connection_name": conn_name(conn),
                    "peer_host": host, "peer_port": port, "user": conn.user, "node": node(),
                },
                "ack_required": c.ack_required,
                "exclusive": c.exclusive,
                "prefetch_count": c.prefetch,
                "active": true,
                "activity_status": "up",
                "arguments": json::table(&c.arguments),
            }))
        })
        .collect()
}

async fn consumers(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    listed(consumer_list(&s, &w, None), &q)
}

async fn consumers_of(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    listed(consumer_list(&s, &w, Some(&v)), &q)
}

// ----- health -----

/// `{"status": "ok"}` while the store takes writes; RabbitMQ's failed form otherwise.
async fn healthcheck(State(s): State<AdminState>) -> Response {
    match s.broker.store_health().degraded {
        None => Json(json!({ "status": "ok" })).into_response(),
        Some(d) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "failed", "reason": d.reason })),
        )
            .into_response(),
    }
}

/// Declare `aliveness-test`, publish to it and get the message back, as RabbitMQ does.
async fn aliveness(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
) -> Response {
    let run = async {
        let mut d = w.direct(&s, &v).await?;
        let r = async {
            d.declare_queue("aliveness-test", false, false, FieldTable::default())
                .await?;
            d.publish(
                "",
                "aliveness-test",
                &BasicProperties::default(),
                b"test_message",
            )
            .await?;
            d.get("aliveness-test", 1, GetAck::Ack).await
        }
        .await;
        d.close().await;
        r.map_err(from_direct)
    };
    match run.await {
        Ok(got) if got.iter().any(|m| &m.body[..] == b"test_message") => {
            Json(json!({ "status": "ok" })).into_response()
        }
        Ok(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "failed", "reason": "the test message did not come back" })),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn extensions() -> RResult {
    Ok(Json(json!([])))
}

async fn no_definitions() -> RResult<StatusCode> {
    Err(RError(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "mqgate does not import definitions: declare with AMQP clients or rabbitmqadmin".into(),
    ))
}

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

mod bindings;
mod connections;
mod exchanges;
mod health;
mod json;
mod overview;
mod queues;
mod rates;

use bindings::*;
use connections::*;
use exchanges::*;
use health::*;
use overview::*;
use queues::*;

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

/// The node name shown where RabbitMQ shows its Erlang node (read once).
fn node() -> String {
    static NODE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NODE.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "localhost".into());
        format!("mqgate@{host}")
    })
    .clone()
}

/// Milliseconds since the epoch as RabbitMQ writes times: `2026-12-02T14:43:18.544+00:00`.
fn iso_ms(ms: u64) -> String {
    let (secs, milli) = (ms / 1000, ms % 1000);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}+00:00",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
#[test]
fn iso_ms_is_rabbitmqs_form() {
    assert_eq!(iso_ms(0), "1970-01-01T00:00:00.000+00:00");
    assert_eq!(iso_ms(1_796_222_598_544), "2026-12-02T14:43:18.544+00:00");
    assert_eq!(iso_ms(951_782_400_000), "2000-02-29T00:00:00.000+00:00");
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
    let creds = crate::admin::basic_credentials(headers);
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
            s.rates.touch();
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

    /// [`Who::vhost`], then 404 unless the AMQP queue `name` is declared there.
    fn queue(&self, s: &AdminState, vhost: &str, name: &str) -> Result<(), RError> {
        self.vhost(s, vhost)?;
        match s.amqp.queue(vhost, name) {
            Some(_) => Ok(()),
            None => Err(not_found()),
        }
    }

    /// [`Who::vhost`], then 404 unless the exchange `name` exists there.
    fn exchange(&self, s: &AdminState, vhost: &str, name: &str) -> Result<(), RError> {
        self.vhost(s, vhost)?;
        match s
            .broker
            .router()
            .exchange(vhost, exchanges::exchange_name(name))
        {
            Some(_) => Ok(()),
            None => Err(not_found()),
        }
    }

    /// Run `f` on a direct connection to `vhost` as this user, then close it: the
    /// outer error is the connection refused, the inner one what `f` met.
    async fn on_direct<T>(
        &self,
        s: &AdminState,
        vhost: &str,
        f: impl AsyncFnOnce(&mut mqgate_amqp::Direct) -> Result<T, DirectError>,
    ) -> Result<Result<T, DirectError>, RError> {
        let mut d = self.direct(s, vhost).await?;
        let r = f(&mut d).await;
        d.close().await;
        Ok(r)
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

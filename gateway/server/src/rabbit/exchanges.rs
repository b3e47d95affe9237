//! Exchanges: list, show, declare, delete, publish.

use super::*;

/// The default exchange is `amq.default` in paths.
pub(super) fn exchange_name(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

pub(super) fn exchange_json(
    s: &AdminState,
    vhost: &str,
    e: &mqgate_core::router::ExchangeDef,
) -> Value {
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

pub(super) fn exchange_list(s: &AdminState, w: &Who, vhost: Option<&str>) -> Vec<Value> {
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

pub(super) async fn exchanges(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    listed(exchange_list(&s, &w, None), &q)
}

pub(super) async fn exchanges_of(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    listed(exchange_list(&s, &w, Some(&v)), &q)
}

pub(super) async fn exchange(
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

pub(super) async fn put_exchange(
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
    w.on_direct(&s, &v, async |d| {
        d.declare_exchange(&name, &kind, durable, auto_delete, internal, args)
            .await
    })
    .await?
    .map_err(from_direct)?;
    Ok(if existed {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::CREATED
    })
}

pub(super) async fn delete_exchange(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, name)): Path<(String, String)>,
    Query(dq): Query<DeleteQuery>,
) -> RResult<StatusCode> {
    w.exchange(&s, &v, &name)?;
    w.on_direct(&s, &v, async |d| {
        d.delete_exchange(exchange_name(&name), dq.if_unused == Some(true))
            .await
    })
    .await?
    .map_err(from_direct)?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn publish(
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
    w.exchange(&s, &v, &name)?;
    // RabbitMQ answers a refused publish with 400 and the AMQP error in the reason.
    let routed = w
        .on_direct(&s, &v, async |d| {
            d.publish(exchange_name(&name), &routing_key, &props, &payload)
                .await
        })
        .await?
        .map_err(|e| bad_request(format!("{} {}", e.code, e.text)))?;
    Ok(Json(json!({ "routed": routed })))
}

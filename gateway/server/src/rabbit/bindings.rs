//! Bindings: list, show, bind, unbind (by properties key).

use super::*;

/// RabbitMQ's `properties_key`: the routing key (URL-quoted; `~` when empty), with a
/// digest of the arguments when there are any.
pub(super) fn props_key(key: &str, args: &[u8]) -> String {
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

pub(super) fn quote(s: &str) -> String {
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
pub(super) fn binding_list(s: &AdminState, vhost: &str) -> Vec<Value> {
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

pub(super) fn all_bindings(s: &AdminState, w: &Who) -> Vec<Value> {
    s.broker
        .router()
        .vhosts()
        .iter()
        .filter(|v| w.sees(s, v))
        .flat_map(|v| binding_list(s, v))
        .collect()
}

pub(super) async fn bindings(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    listed(all_bindings(&s, &w), &q)
}

pub(super) async fn bindings_of(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    listed(binding_list(&s, &v), &q)
}

pub(super) fn filtered(s: &AdminState, v: &str, keep: impl Fn(&Value) -> bool) -> Vec<Value> {
    binding_list(s, v).into_iter().filter(|b| keep(b)).collect()
}

pub(super) async fn queue_bindings(
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

pub(super) async fn exchange_bindings_source(
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

pub(super) async fn exchange_bindings_destination(
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

pub(super) fn dest_type(d: &str) -> Result<&'static str, RError> {
    match d {
        "q" => Ok("queue"),
        "e" => Ok("exchange"),
        _ => Err(not_found()),
    }
}

pub(super) async fn bindings_between(
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

pub(super) async fn post_binding(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, source, dtype, dest)): Path<(String, String, String, String)>,
    raw: axum::body::Bytes,
) -> RResult<Response> {
    let dt = dest_type(&dtype)?;
    let b = body(&raw)?;
    let routing_key = b.text("routing_key").unwrap_or_default();
    let args = b.arguments()?;
    w.on_direct(&s, &v, async |d| {
        d.binding(
            true,
            &source,
            dt == "queue",
            &dest,
            &routing_key,
            args.clone(),
        )
        .await
    })
    .await?
    .map_err(from_direct)?;
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

pub(super) fn find_binding(
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

pub(super) async fn binding(
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
pub(super) fn requote(props: &str) -> String {
    match props.split_once('~') {
        Some(("", rest)) => format!("~{rest}"),
        Some((k, h)) => format!("{}~{h}", quote(k)),
        None => quote(props),
    }
}

pub(super) async fn delete_binding(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path((v, source, dtype, dest, props)): Path<(String, String, String, String, String)>,
) -> RResult<StatusCode> {
    w.vhost(&s, &v)?;
    let dt = dest_type(&dtype)?;
    let b = find_binding(&s, &v, &source, dt, &dest, &props).ok_or_else(not_found)?;
    let args = json::to_table(&b["arguments"]).map_err(bad_request)?;
    let key = b["routing_key"].as_str().unwrap_or("").to_owned();
    w.on_direct(&s, &v, async |d| {
        d.binding(false, &source, dt == "queue", &dest, &key, args)
            .await
    })
    .await?
    .map_err(from_direct)?;
    Ok(StatusCode::NO_CONTENT)
}

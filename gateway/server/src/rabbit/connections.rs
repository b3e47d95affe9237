//! Connections, channels and consumers.

use super::*;

pub(super) fn conn_name(c: &mqgate_core::ConnectionInfo) -> String {
    format!("{} -> {}:{}", c.peer, c.protocol, c.id)
}

pub(super) fn all_conns(s: &AdminState) -> Vec<mqgate_core::ConnectionInfo> {
    s.amqp
        .connections()
        .into_iter()
        .chain(s.mqtt.connections())
        .collect()
}

pub(super) fn conn_details(s: &AdminState, protocol: &str, id: &str) -> Option<Value> {
    let c = all_conns(s)
        .into_iter()
        .find(|c| c.protocol == protocol && c.id == id)?;
    let (host, port) = split_peer(&c.peer);
    Some(json!({ "name": conn_name(&c), "peer_host": host, "peer_port": port }))
}

pub(super) fn split_peer(peer: &str) -> (String, u16) {
    match peer.parse::<std::net::SocketAddr>() {
        Ok(a) => (a.ip().to_string(), a.port()),
        Err(_) => (peer.to_owned(), 0),
    }
}

pub(super) fn conn_json(s: &AdminState, c: &mqgate_core::ConnectionInfo) -> Value {
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
        "client_properties": if amqp {
            Value::Object(c.client.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
        } else {
            json!({ "client_id": c.id })
        },
        // mqgate: the protocol and id its own API and CLI use.
        "mqgate": { "protocol": c.protocol, "id": c.id },
    }))
}

pub(super) fn own(w: &Who, c: &mqgate_core::ConnectionInfo) -> bool {
    w.level >= Level::Monitoring || c.user.as_deref() == Some(w.name.as_str())
}

pub(super) async fn connections(
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

pub(super) fn find_conn(
    s: &AdminState,
    w: &Who,
    name: &str,
) -> Result<mqgate_core::ConnectionInfo, RError> {
    all_conns(s)
        .into_iter()
        .find(|c| conn_name(c) == name && own(w, c))
        .ok_or_else(not_found)
}

pub(super) async fn connection(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(name): Path<String>,
) -> RResult {
    let c = find_conn(&s, &w, &name)?;
    Ok(Json(conn_json(&s, &c)))
}

pub(super) async fn close_connection(
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

pub(super) async fn channels(
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

pub(super) fn consumer_list(s: &AdminState, w: &Who, vhost: Option<&str>) -> Vec<Value> {
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

pub(super) async fn consumers(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    listed(consumer_list(&s, &w, None), &q)
}

pub(super) async fn consumers_of(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.vhost(&s, &v)?;
    listed(consumer_list(&s, &w, Some(&v)), &q)
}

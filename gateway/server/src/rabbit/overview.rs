//! Node-wide reads: the overview, whoami, nodes, vhosts, users and permissions.

use super::*;

pub(super) async fn overview(
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

pub(super) async fn whoami(Extension(w): Extension<Arc<Who>>) -> RResult {
    Ok(Json(json!({ "name": w.name, "tags": w.tags })))
}

pub(super) async fn nodes(State(s): State<AdminState>) -> RResult {
    let m = crate::metrics::process_rss().unwrap_or(0);
    Ok(Json(json!([{
        "name": node(), "type": "disc", "running": true,
        "mem_used": m, "uptime": s.broker.now().saturating_sub(s.started_at),
        "os_pid": std::process::id().to_string(),
        "partitions": [], "being_drained": false,
    }])))
}

pub(super) fn vhost_json(s: &AdminState, v: &str, totals: &rates::QueueCounters) -> Value {
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

pub(super) async fn vhost_totals(s: &AdminState, v: &str) -> rates::QueueCounters {
    let mut t = rates::QueueCounters::default();
    for q in s.amqp.queues().iter().filter(|q| q.vhost == v) {
        t.add(&s.rates.queue_now(s, q).await);
    }
    t
}

pub(super) async fn vhosts(
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

pub(super) async fn vhost(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
) -> RResult {
    w.vhost(&s, &v)?;
    let t = vhost_totals(&s, &v).await;
    Ok(Json(vhost_json(&s, &v, &t)))
}

pub(super) fn user_json(name: &str, u: &mqgate_core::auth::UserAccount) -> Value {
    json!({
        "name": name,
        "password_hash": u.password.to_hash_string(),
        "hashing_algorithm": "rabbit_password_hashing_sha256",
        "tags": u.tags,
        "limits": {},
    })
}

pub(super) async fn users(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Query(q): Query<ListQuery>,
) -> RResult {
    w.admin()?;
    let mut v: Vec<Value> = s.users.0.iter().map(|(n, u)| user_json(n, u)).collect();
    v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    listed(v, &q)
}

pub(super) async fn user(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(name): Path<String>,
) -> RResult {
    w.admin()?;
    let u = s.users.0.get(&name).ok_or_else(not_found)?;
    Ok(Json(user_json(&name, u)))
}

pub(super) async fn permissions(
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

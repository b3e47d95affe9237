//! Health checks, and the routes answered for tools that probe them.

use super::*;

/// `{"status": "ok"}` while the store takes writes; RabbitMQ's failed form otherwise.
pub(super) async fn healthcheck(State(s): State<AdminState>) -> Response {
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
pub(super) async fn aliveness(
    State(s): State<AdminState>,
    Extension(w): Extension<Arc<Who>>,
    Path(v): Path<String>,
) -> Response {
    let run = w.on_direct(&s, &v, async |d| {
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
    });
    match run.await.and_then(|r| r.map_err(from_direct)) {
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

pub(super) async fn extensions() -> RResult {
    Ok(Json(json!([])))
}

pub(super) async fn no_definitions() -> RResult<StatusCode> {
    Err(RError(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        "mqgate does not import definitions: declare with AMQP clients or rabbitmqadmin".into(),
    ))
}

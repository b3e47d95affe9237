//! The connection handshake: protocol header, start/start-ok (login), tune/tune-ok,
//! open/open-ok.

use std::net::SocketAddr;
use std::sync::Arc;

use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};

use crate::convert;
use crate::frame::{self, Frame, PROTOCOL_HEADER};
use crate::reply;
use crate::server::Shared;
use mqgate_amqp_codec::depth;

use mqgate_core::sockio::{Input, Output};

use super::{close_method, Channels, Conn};

fn capabilities() -> FieldTable {
    let mut c = FieldTable::default();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        c.insert(cap.into(), AMQPValue::Boolean(cap != "direct_reply_to"));
    }
    c
}

fn server_properties() -> FieldTable {
    let mut p = FieldTable::default();
    p.insert("product".into(), AMQPValue::LongString("mqgate".into()));
    p.insert(
        "version".into(),
        AMQPValue::LongString(env!("CARGO_PKG_VERSION").into()),
    );
    p.insert("platform".into(), AMQPValue::LongString("Rust".into()));
    p.insert(
        "information".into(),
        AMQPValue::LongString("RocketMQ's model behind AMQP 0-9-1 and MQTT".into()),
    );
    p.insert("capabilities".into(), AMQPValue::FieldTable(capabilities()));
    p
}

/// Read frames during the handshake (methods on channel 0 only; heartbeats skipped).
async fn next_method<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    frame_max: u32,
) -> Result<AMQPClass, Option<(u16, String)>> {
    loop {
        match frame::decode(buf, frame_max) {
            Ok(Some(Frame::Method(0, m))) => return Ok(*m),
            Ok(Some(Frame::Heartbeat(_))) => continue,
            Ok(Some(_)) => {
                return Err(Some((
                    reply::COMMAND_INVALID,
                    "only connection methods are allowed during the handshake".into(),
                )))
            }
            Ok(None) => {}
            Err(e) => return Err(Some((e.reply_code(), e.to_string()))),
        }
        match rd.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(_) => {}
        }
    }
}

/// Parse the SASL response of PLAIN (`\0user\0pass`) or AMQPLAIN (a field table without
/// its length).
fn credentials(mechanism: &str, response: &[u8]) -> Option<(String, String)> {
    match mechanism {
        "PLAIN" => {
            // RFC 4616: exactly authzid NUL authcid NUL passwd.
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = String::from_utf8(parts.next()?.to_vec()).ok()?;
            let pass = String::from_utf8(parts.next()?.to_vec()).ok()?;
            if parts.next().is_some() {
                return None;
            }
            Some((user, pass))
        }
        "AMQPLAIN" => {
            if !amqplain_depth_ok(response) {
                return None;
            }
            let framed = amqplain_table(response);
            let (_, t) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
            let get = |k: &str| t.inner().get(k).and_then(convert::str_value);
            Some((get("LOGIN")?, get("PASSWORD")?))
        }
        _ => None,
    }
}

/// AMQPLAIN's response is a field table without its length: give it one.
fn amqplain_table(response: &[u8]) -> Vec<u8> {
    let mut framed = (response.len() as u32).to_be_bytes().to_vec();
    framed.extend_from_slice(response);
    framed
}

/// The AMQPLAIN response nests no deeper than the codec allows (it is parsed
/// recursively, before the client has logged in).
fn amqplain_depth_ok(response: &[u8]) -> bool {
    depth::table_ok(&amqplain_table(response), depth::MAX_NESTING).is_ok()
}

pub(super) async fn handshake<S>(
    shared: &Arc<Shared>,
    id: u64,
    peer: SocketAddr,
    mut rd: ReadHalf<S>,
    mut wr: WriteHalf<S>,
    pending: mqgate_core::net::Pending,
) -> Option<(Conn<S>, mqgate_core::net::Admitted)>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut buf = BytesMut::with_capacity(4096);
    while buf.len() < 8 {
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if buf.len() < 8 && !PROTOCOL_HEADER.starts_with(&buf[..]) {
            break;
        }
    }
    if buf.len() < 8 || &buf[..8] != PROTOCOL_HEADER {
        tracing::info!(%peer, "AMQP: wrong protocol header; answered with 0-9-1's and closed");
        let _ = wr.write_all(PROTOCOL_HEADER).await;
        let _ = wr.shutdown().await;
        return None;
    }
    let _ = buf.split_to(8);
    let cfg = &shared.cfg;
    let mut out = BytesMut::new();
    frame::put_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        })),
    );
    wr.write_all(&out).await.ok()?;
    out.clear();
    let fail = |code: u16, text: String| async move {
        tracing::info!(%peer, code, text, "AMQP: handshake refused");
        let mut out = BytesMut::new();
        frame::put_method(&mut out, 0, close_method(code, &text, 0, 0));
        (out, text)
    };
    // Until tune-ok, frames are held to the spec's minimum frame size (as RabbitMQ does):
    // a client that has not logged in cannot make the broker buffer or parse more.
    let hs_max = frame::FRAME_MIN_SIZE;
    let start_ok = match next_method(&mut rd, &mut buf, hs_max).await {
        Ok(AMQPClass::Connection(connection::AMQPMethod::StartOk(s))) => s,
        Ok(_) => {
            let (o, _) = fail(
                reply::COMMAND_INVALID,
                "expected connection.start-ok".into(),
            )
            .await;
            let _ = wr.write_all(&o).await;
            return None;
        }
        Err(Some((code, text))) => {
            let (o, _) = fail(code, text).await;
            let _ = wr.write_all(&o).await;
            return None;
        }
        Err(None) => return None,
    };
    let mechanism = start_ok.mechanism.as_str().to_owned();
    if mechanism == "AMQPLAIN" && !amqplain_depth_ok(start_ok.response.as_bytes()) {
        let text = format!(
            "SYNTAX_ERROR - AMQPLAIN response nested deeper than {} levels",
            depth::MAX_NESTING
        );
        let (o, _) = fail(reply::SYNTAX_ERROR, text).await;
        let _ = wr.write_all(&o).await;
        return None;
    }
    let creds = credentials(&mechanism, start_ok.response.as_bytes());
    let user = match &creds {
        Some((u, p)) if cfg.authenticate(u, p) => {
            shared.broker.login_throttle().succeeded(peer.ip());
            u.clone()
        }
        _ => {
            let who = creds.map(|c| c.0).unwrap_or_default();
            // Answered late, later with every recent failure (per source and user).
            shared
                .broker
                .login_throttle()
                .refuse_later(peer.ip(), Some(who.as_str()).filter(|w| !w.is_empty()))
                .await;
            let text = if mechanism == "PLAIN" || mechanism == "AMQPLAIN" {
                format!("ACCESS_REFUSED - Login was refused using authentication mechanism {mechanism}. For details see the broker logfile.")
            } else {
                format!("ACCESS_REFUSED - unsupported authentication mechanism {mechanism}")
            };
            tracing::info!(%peer, user = %who, "AMQP: login refused");
            let mut o = BytesMut::new();
            frame::put_method(&mut o, 0, close_method(reply::ACCESS_REFUSED, &text, 0, 0));
            let _ = wr.write_all(&o).await;
            let _ = wr.shutdown().await;
            return None;
        }
    };
    let client_cap = |name: &str| {
        start_ok
            .client_properties
            .inner()
            .get("capabilities")
            .and_then(|c| match c {
                AMQPValue::FieldTable(t) => t.inner().get(name),
                _ => None,
            })
            .and_then(AMQPValue::as_bool)
            .unwrap_or(false)
    };
    let blocked_notify = client_cap("connection.blocked");
    let cancel_notify = start_ok
        .client_properties
        .inner()
        .get("capabilities")
        .and_then(|c| match c {
            AMQPValue::FieldTable(t) => t.inner().get("consumer_cancel_notify"),
            _ => None,
        })
        .and_then(AMQPValue::as_bool)
        .unwrap_or(false);
    let producer_group = start_ok
        .client_properties
        .inner()
        .get("producer_group")
        .and_then(crate::convert::str_value)
        .and_then(|g| mqgate_core::props::producer_group_name(&g));
    frame::put_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
            channel_max: cfg.channel_max,
            frame_max: cfg.frame_max,
            heartbeat: cfg.heartbeat,
        })),
    );
    wr.write_all(&out).await.ok()?;
    out.clear();
    let tune_ok = match next_method(&mut rd, &mut buf, hs_max).await {
        Ok(AMQPClass::Connection(connection::AMQPMethod::TuneOk(t))) => t,
        Ok(_) => {
            let (o, _) = fail(reply::COMMAND_INVALID, "expected connection.tune-ok".into()).await;
            let _ = wr.write_all(&o).await;
            return None;
        }
        Err(Some((code, text))) => {
            let (o, _) = fail(code, text).await;
            let _ = wr.write_all(&o).await;
            return None;
        }
        Err(None) => return None,
    };
    let frame_max = match tune_ok.frame_max {
        0 => cfg.frame_max,
        n => n.min(cfg.frame_max),
    };
    if frame_max < frame::FRAME_MIN_SIZE {
        let (o, _) = fail(
            reply::NOT_ALLOWED,
            format!("NOT_ALLOWED - frame_max {frame_max} is below the minimum 4096"),
        )
        .await;
        let _ = wr.write_all(&o).await;
        return None;
    }
    let channel_max = match tune_ok.channel_max {
        0 => cfg.channel_max,
        n => n.min(cfg.channel_max),
    };
    let heartbeat = tune_ok.heartbeat;
    let open = match next_method(&mut rd, &mut buf, frame_max).await {
        Ok(AMQPClass::Connection(connection::AMQPMethod::Open(o))) => o,
        Ok(_) => {
            let (o, _) = fail(reply::COMMAND_INVALID, "expected connection.open".into()).await;
            let _ = wr.write_all(&o).await;
            return None;
        }
        Err(Some((code, text))) => {
            let (o, _) = fail(code, text).await;
            let _ = wr.write_all(&o).await;
            return None;
        }
        Err(None) => return None,
    };
    let vhost = open.virtual_host.as_str().to_owned();
    let perm = cfg.permission(&user, &vhost).cloned();
    let exists = shared.broker.router().exchange(&vhost, "").is_some();
    let Some(perm) = perm.filter(|_| exists) else {
        let text = if exists {
            format!("NOT_ALLOWED - access to vhost '{vhost}' refused for user '{user}'")
        } else {
            format!("NOT_ALLOWED - vhost {vhost} not found")
        };
        let (o, _) = fail(reply::NOT_ALLOWED, text).await;
        let _ = wr.write_all(&o).await;
        return None;
    };
    // Counted against limits.max_connections from here (one atomic step; pending
    // handshakes never count). Over it: RabbitMQ's refusal at connection.open.
    let admitted = match pending.admit() {
        Ok(a) => a,
        Err(limit) => {
            let text = format!(
                "NOT_ALLOWED - connection refused: node connection limit ({}) is reached",
                limit.max
            );
            if shared.gate.log_refusal().is_some() {
                tracing::warn!(%peer, %user, max = limit.max, "AMQP: connection refused: limits.max_connections reached");
            }
            let mut o = BytesMut::new();
            frame::put_method(&mut o, 0, close_method(reply::NOT_ALLOWED, &text, 0, 0));
            let _ = wr.write_all(&o).await;
            let _ = wr.shutdown().await;
            return None;
        }
    };
    frame::put_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::OpenOk(connection::OpenOk {})),
    );
    wr.write_all(&out).await.ok()?;
    out.clear();
    tracing::debug!(%peer, %user, %vhost, "AMQP: connection open");
    let conn = Conn {
        shared: Arc::clone(shared),
        id,
        peer,
        user,
        perm,
        vhost,
        input: Input::new(rd, buf),
        output: Output::with_buffer(wr, out),
        frame_max,
        channel_max,
        heartbeat,
        cancel_notify,
        producer_group,
        blocked_notify,
        client: start_ok
            .client_properties
            .inner()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), convert::str_value(v)?)))
            .take(32)
            .map(|(k, v)| (k, v.chars().take(256).collect()))
            .collect(),
        published: false,
        names: Default::default(),
        channels: Channels::default(),
        exclusive: Vec::new(),
        batch: Vec::new(),
        writes: shared
            .broker
            .publish_pipeline(mqgate_core::config::PUBLISH_PIPELINE_DEPTH),
        next_consumer: 1,
        hb_timer: mqgate_core::sockio::Timer::default(),
        server_named: 0,
    };
    Some((conn, admitted))
}

//! The CONNECT handshake: authentication, takeover of an existing connection, the
//! session restored or created, and CONNACK.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use mqgate_core::acl::{Access, Subject};
use mqgate_core::{ConsumeMode, GroupSpec, Located, MemberOptions, OnFailure, StartPosition};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::time::Instant;

use mqgate_core::sockio::{Input, Output, QuickAck};

use super::splice::Preamble;
use super::{Conn, Inflight, Stage};
use crate::codec::{
    self, reason, Ack, AckKind, ConnAck, Connect, DecodeError, Packet, Properties, Version,
};
use crate::server::{ClientSlot, Shared};
use crate::session::{session_group, session_topic, SessionRecord, NS_SESSION};

/// Read the first packet, which must be CONNECT. Anything else closes the connection.
/// A connection another gateway spliced here starts with a preamble naming the
/// client's address (`splice.rs`): returned with the CONNECT.
pub(super) async fn read_connect<S: AsyncRead + AsyncWrite>(
    shared: &Shared,
    rd: &mut ReadHalf<S>,
    wr: &mut WriteHalf<S>,
    inbuf: &mut BytesMut,
    peer: SocketAddr,
) -> Option<(Box<Connect>, Option<String>)> {
    let deadline = Instant::now() + shared.cfg.connect_timeout;
    // Before login a client may make the broker hold at most this much.
    let max = shared.cfg.max_connect_size.min(shared.cfg.max_packet_size);
    // `None` until the first bytes told whether a preamble comes first.
    let mut via: Option<Option<String>> = None;
    loop {
        if via.is_none() && !shared.broker.clustered() {
            // Only a gateway of a cluster takes spliced connections.
            via = Some(None);
        }
        if via.is_none() {
            match super::splice::preamble(inbuf) {
                Preamble::No => via = Some(None),
                Preamble::Line { len, peer: from } => {
                    let _ = inbuf.split_to(len);
                    via = Some(Some(from));
                }
                Preamble::Bad => {
                    tracing::info!(%peer, "MQTT: a malformed splice preamble; closed");
                    shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
                Preamble::Partial => {}
            }
        }
        let decoded = match via {
            Some(_) => codec::decode(inbuf, None, max),
            None => Ok(None),
        };
        match decoded {
            Ok(Some(Packet::Connect(c))) => return Some((c, via.flatten())),
            Ok(Some(p)) => {
                tracing::info!(%peer, packet = p.name(), "MQTT: first packet is not CONNECT; closed");
                shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Ok(None) => {}
            Err(DecodeError::UnsupportedProtocol { name, level }) => {
                tracing::info!(%peer, %name, level, "MQTT: unsupported protocol version; refused");
                // 3.1.1's "unacceptable protocol version" (a 5.0 client reads 0x01 too).
                let mut out = BytesMut::new();
                let code = if level == 5 {
                    reason::UNSUPPORTED_PROTOCOL_VERSION
                } else {
                    1
                };
                let v = if level == 5 {
                    Version::V5
                } else {
                    Version::V311
                };
                codec::encode(
                    &Packet::ConnAck(ConnAck {
                        session_present: false,
                        code,
                        properties: Properties::default(),
                    }),
                    v,
                    &mut out,
                );
                let _ = wr.write_all(&out).await;
                let _ = wr.shutdown().await;
                return None;
            }
            Err(e) => {
                tracing::info!(%peer, error = %e, "MQTT: bad CONNECT; closed");
                shared.stats.protocol_errors.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        }
        match tokio::time::timeout_at(deadline, rd.read_buf(inbuf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(_)) => {}
            Err(_) => {
                tracing::info!(%peer, "MQTT: no CONNECT in time; closed");
                return None;
            }
        }
    }
}

fn connack(code: u8, session_present: bool, properties: Properties) -> Packet {
    Packet::ConnAck(ConnAck {
        session_present,
        code,
        properties,
    })
}

/// Check CONNECT, take over an existing connection, restore or create the session, and
/// answer CONNACK. `None` when the client was refused, or spliced to the gateway owning
/// its session (`via`: the peer a splice preamble named).
#[allow(clippy::too_many_arguments)]
pub(super) async fn accept<S>(
    shared: Arc<Shared>,
    rd: ReadHalf<S>,
    mut wr: WriteHalf<S>,
    inbuf: BytesMut,
    peer: SocketAddr,
    c: Connect,
    via: Option<String>,
    pending: mqgate_core::net::Pending,
    quick: Option<QuickAck>,
) -> Option<(Box<Conn<S>>, mqgate_core::net::Admitted)>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let v5 = c.version.is_v5();
    let cfg = &shared.cfg;
    let refuse = |code_v3: u8, code_v5: u8| {
        let mut out = BytesMut::new();
        let code = if v5 { code_v5 } else { code_v3 };
        codec::encode(
            &connack(code, false, Properties::default()),
            c.version,
            &mut out,
        );
        out
    };
    macro_rules! refuse {
        ($v3:expr, $v5:expr, $why:expr) => {{
            tracing::info!(%peer, client = %c.client_id, reason = $why, "MQTT: connection refused");
            let out = refuse($v3, $v5);
            let _ = wr.write_all(&out).await;
            let _ = wr.shutdown().await;
            return None;
        }};
    }
    if c.properties.auth_method.is_some() {
        refuse!(
            5,
            reason::BAD_AUTHENTICATION_METHOD,
            "enhanced authentication is not supported"
        );
    }
    match cfg.authenticate(c.username.as_deref(), c.password.as_deref()) {
        Ok(()) => shared.broker.login_throttle().succeeded(peer.ip()),
        Err(true) => {
            // Answered late, later with every recent failure (per source and user).
            shared
                .broker
                .login_throttle()
                .refuse_later(peer.ip(), c.username.as_deref())
                .await;
            refuse!(
                4,
                reason::BAD_USERNAME_OR_PASSWORD,
                "bad user name or password"
            )
        }
        Err(false) => refuse!(5, reason::NOT_AUTHORIZED, "not authorized"),
    }
    // MQTT lives in vhost "/": a named user without a permission there is refused, as
    // RabbitMQ's MQTT plugin does.
    if let Some(u) = c.username.as_deref() {
        if !cfg.vhost_allowed(u) {
            refuse!(5, reason::NOT_AUTHORIZED, "no permission on vhost /");
        }
    }
    // Authenticated: counted against limits.max_connections from here, in one atomic
    // step (handshakes never count). Over it: 5.0 Quota exceeded, 3.1.1 server unavailable.
    let admitted = match pending.admit() {
        Ok(a) => a,
        Err(limit) => {
            if let Some(held) = shared.gate.log_refusal() {
                tracing::warn!(%peer, max = limit.max, refused_since_last_line = held, "MQTT: connection refused: limits.max_connections reached");
            }
            refuse!(3, reason::QUOTA_EXCEEDED, "limits.max_connections reached");
        }
    };
    let mut assigned = None;
    let client_id = if c.client_id.is_empty() {
        if !v5 && !c.clean_start {
            refuse!(
                2,
                reason::CLIENT_ID_NOT_VALID,
                "empty client id without clean session"
            );
        }
        let id = format!(
            "mqgate-{:x}-{:x}",
            shared.now(),
            shared.next_conn.fetch_add(1, Ordering::Relaxed)
        );
        if v5 {
            assigned = Some(id.clone());
        }
        id
    } else {
        c.client_id.clone()
    };
    if client_id.len() > cfg.max_client_id_len {
        refuse!(2, reason::CLIENT_ID_NOT_VALID, "client id too long");
    }
    // A 3.1.1 client cannot be told a shorter keep alive (5.0's Server Keep Alive): held
    // to one it does not know, it would be closed for the silences it was allowed, so
    // it is refused with 2, as Mosquitto's `max_keepalive` after 2.0.11 (its test suite
    // expects that CONNACK; Debian's 2.0.11 still accepts the client).
    if !v5 && cfg.max_keep_alive > 0 && (c.keep_alive == 0 || c.keep_alive > cfg.max_keep_alive) {
        refuse!(
            2,
            reason::CLIENT_ID_NOT_VALID,
            "keep alive over mqtt.max_keep_alive (3.1.1 cannot be told a shorter one)"
        );
    }
    if let Some(w) = &c.will {
        let who = Subject {
            user: c.username.as_deref(),
            client_id: Some(&client_id),
        };
        if !shared.acl.check_topic(who, Access::Publish, &w.topic) {
            refuse!(5, reason::NOT_AUTHORIZED, "will topic not allowed");
        }
    }
    // In a cluster a session lives on the gateway owning its shard: a client that came
    // here is spliced there (a client without a client id gets a new clean session,
    // which stays where it is).
    let mut owned_here = None;
    if shared.broker.clustered() && !c.client_id.is_empty() {
        let topic = session_topic(&client_id);
        let located = match &via {
            // Spliced here by a gateway that found it here: if it has moved since, the
            // client tries again (no second hop).
            Some(_) if shared.broker.owns_topic(&topic) => Ok(Located::Here),
            Some(_) => Err("the session's shard moved".to_owned()),
            None => shared
                .broker
                .locate(&topic, "mqtt")
                .await
                .map_err(|e| format!("the session's shard has no owner now: {e}")),
        };
        match located {
            Ok(Located::Here) => owned_here = Some(topic),
            Ok(Located::Unadvertised) => {}
            Ok(Located::At(addr)) => {
                let wr = match super::splice::splice(
                    Arc::clone(&shared),
                    rd,
                    wr,
                    inbuf,
                    peer,
                    c.clone(),
                    &addr,
                    admitted,
                )
                .await
                {
                    Ok(()) => return None,
                    Err((wr, why)) => {
                        tracing::warn!(%peer, client = %client_id, reason = %why, "MQTT: the session's gateway could not be reached; connection refused");
                        wr
                    }
                };
                let mut wr = wr;
                let out = refuse(3, reason::SERVER_UNAVAILABLE);
                let _ = wr.write_all(&out).await;
                let _ = wr.shutdown().await;
                return None;
            }
            Err(why) => refuse!(3, reason::SERVER_UNAVAILABLE, why.as_str()),
        }
    }
    // Session expiry: 3.1.1 clean session = 0, persistent = never; 5.0 says.
    let asked_expiry = if v5 {
        c.properties.session_expiry.unwrap_or(0)
    } else if c.clean_start {
        0
    } else {
        u32::MAX
    };
    let expiry = asked_expiry.min(cfg.max_session_expiry);
    let keep_alive =
        if cfg.max_keep_alive > 0 && (c.keep_alive == 0 || c.keep_alive > cfg.max_keep_alive) {
            cfg.max_keep_alive
        } else {
            c.keep_alive
        };

    // Take over a connection with the same client id.
    let conn_id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
    let (kick_tx, kick_rx) = mqgate_core::mailbox::channel();
    let done = crate::server::Done::default();
    let previous = shared.clients.lock().insert(
        client_id.clone(),
        ClientSlot {
            conn: conn_id,
            kick: kick_tx,
            done: done.clone(),
            info: Box::new(crate::server::ClientInfo {
                peer,
                via: via.as_deref().map(Box::from),
                user: c.username.as_deref().map(Box::from),
                version: c.version,
                connected_at: shared.now(),
            }),
        },
    );
    // The shard left between the look-up and the slot (so its sessions were closed
    // without this one): the client tries again and finds its next owner.
    if owned_here
        .as_ref()
        .is_some_and(|t| !shared.broker.owns_topic(t))
    {
        {
            let mut clients = shared.clients.lock();
            if clients.get(&client_id).is_some_and(|s| s.conn == conn_id) {
                clients.remove(&client_id);
            }
        }
        if let Some(prev) = previous {
            let _ = prev.kick.send(crate::conn::USE_ANOTHER_SERVER);
        }
        done.set();
        refuse!(3, reason::SERVER_UNAVAILABLE, "the session's shard moved");
    }
    if let Some(prev) = previous {
        tracing::info!(%peer, client = %client_id, "MQTT: session taken over by a new connection");
        let _ = prev.kick.send(if c.clean_start {
            super::TAKEN_OVER_CLEAN_START
        } else {
            reason::SESSION_TAKEN_OVER
        });
        let _ = tokio::time::timeout(Duration::from_secs(10), prev.done.wait()).await;
    }
    // A will waiting for its delay: the client's return to its session cancels it; a
    // return with Clean Start ends that session, and a will goes out when its session
    // ends if that comes before its delay (5.0 3.1.3.2.2), so it is published now (as
    // HiveMQ; Mosquitto 2.0.11 drops it).
    let will = super::will::will_timer(&client_id);
    let settled = if c.clean_start {
        shared.broker.fire_scheduled(&will).await
    } else {
        shared.broker.cancel_scheduled(&will).await
    };
    if let Err(e) = settled {
        tracing::warn!(client = %client_id, error = %e, "MQTT: settling a delayed will failed");
    }
    // Connected: the core no longer expires it (if its sweep is deleting the session
    // right now, this waits until it is gone, and the client starts a new one).
    shared
        .broker
        .claim_endpoint(&session_group(&client_id))
        .await;
    shared.expiring.lock().remove(&client_id);

    // The session's record lives with its topic (in its shard).
    let topic_name = session_topic(&client_id);
    let existing = match shared
        .broker
        .endpoint_record(&topic_name, NS_SESSION, client_id.as_bytes())
        .await
    {
        Ok(v) => v.and_then(SessionRecord::decode),
        Err(e) => {
            tracing::error!(client = %client_id, error = %e, "MQTT: reading the session failed");
            shared.clients.lock().remove(&client_id);
            done.set();
            refuse!(3, reason::SERVER_UNAVAILABLE, "store unavailable");
        }
    };
    let mut record = SessionRecord {
        expiry,
        ..Default::default()
    };
    let session_present = match existing {
        Some(old) if !c.clean_start => {
            record.subscriptions = old.subscriptions;
            record.inbound_qos2 = old.inbound_qos2;
            record.pubrel = old.pubrel;
            true
        }
        Some(old) => {
            shared.destroy_session(&client_id, Some(&old)).await;
            false
        }
        None => {
            // A session topic left by a clean session that was connected at a crash.
            if shared.broker.topic(&topic_name).is_some() {
                shared.destroy_session(&client_id, None).await;
            }
            false
        }
    };
    if let Err(e) = shared.broker.create_topic(&topic_name, Some(1)).await {
        tracing::error!(client = %client_id, error = %e, "MQTT: creating the session topic failed");
        shared.clients.lock().remove(&client_id);
        done.set();
        refuse!(3, reason::SERVER_UNAVAILABLE, "store unavailable");
    }
    let client_recv_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
    let send_quota = client_recv_max.min(cfg.max_inflight).max(1);
    let session_consumer = shared
        .broker
        .subscribe(
            GroupSpec {
                start: StartPosition::First,
                // A session that ends with its connection needs no start stored until
                // it delivers (an idle connect writes nothing); one that outlives it
                // is known to the store from its start (listed after a crash).
                lazy_start: expiry == 0,
                on_failure: OnFailure::Discard,
                ..GroupSpec::new(
                    session_group(&client_id),
                    vec![topic_name.clone()],
                    ConsumeMode::Shared,
                )
            },
            MemberOptions::new(client_id.clone(), usize::from(send_quota)),
        )
        .await;
    let session_consumer = match session_consumer {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(client = %client_id, error = %e, "MQTT: joining the session group failed");
            shared.clients.lock().remove(&client_id);
            done.set();
            refuse!(3, reason::SERVER_UNAVAILABLE, "broker unavailable");
        }
    };
    let (direct_tx, direct_rx) =
        crate::qos0::queue(topic_name.clone(), cfg.qos0_queue, cfg.qos0_queue_bytes);
    shared
        .live
        .write()
        .insert(topic_name.clone(), (conn_id, direct_tx));

    let mut props = Properties::default();
    if v5 {
        props.receive_maximum = Some(cfg.receive_maximum);
        props.maximum_packet_size = Some(cfg.max_packet_size as u32);
        props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
        props.assigned_client_id = assigned;
        if keep_alive != c.keep_alive {
            props.server_keep_alive = Some(keep_alive);
        }
        if expiry != asked_expiry {
            props.session_expiry = Some(expiry);
        }
    }
    let mut conn = Conn {
        shared: Arc::clone(&shared),
        peer,
        input: Input::new(rd, inbuf),
        output: Output::new(wr),
        version: c.version,
        client_id,
        user: c.username.clone(),
        conn_id,
        keep_alive: (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
        record,
        sub_index: super::SubIndex::default(),
        session: Some(session_consumer),
        direct_rx,
        kick_rx,
        done,
        inflight: HashMap::new(),
        next_pkid: 1,
        send_quota,
        // No limit given: u32::MAX, past the largest packet MQTT can encode (256 MiB).
        client_max_packet: c.properties.maximum_packet_size.unwrap_or(u32::MAX),
        client_alias_max: c.properties.topic_alias_maximum.unwrap_or(0),
        rare: None,
        publishing: None,
        problem_info: c.properties.request_problem_info != Some(0),
        check_reads: false,
    };
    // A connection spliced here by another gateway comes from a socket that sends at once
    // (`splice.rs`): an early ACK would be a packet for nothing.
    if via.is_none() {
        conn.input.set_quick_ack(quick);
    }
    conn.check_reads = shared.acl.may_deny(conn.subject(), Access::Subscribe);
    let producer_group = c
        .properties
        .user
        .iter()
        .find(|(k, _)| k == "x-producer-group")
        .and_then(|(_, v)| mqgate_core::props::producer_group_name(v));
    if let Some(g) = producer_group {
        conn.rare().producer_group = Some(g.into_boxed_str());
    }
    if let Some(will) = c.will {
        conn.rare().will = Some(Box::new(will));
    }
    conn.done
        .keep_alive()
        .start(conn.keep_alive, shared.millis(conn.input.last));
    if !conn.record.inbound_qos2.is_empty() {
        let ids = conn.record.inbound_qos2.iter().copied().collect();
        conn.publishing().inbound_qos2 = ids;
    }
    conn.sub_index = super::SubIndex::new(&conn.record.subscriptions);
    conn.send(&connack(reason::SUCCESS, session_present, props));
    // Restore the subscriptions of a resumed session, and resend unfinished PUBRELs.
    conn.restore_subscriptions().await;
    for id in conn.record.pubrel.clone() {
        conn.inflight.insert(
            id,
            Inflight {
                source: None,
                stage: Stage::PubComp,
            },
        );
        conn.send(&Packet::Ack(Ack {
            kind: AckKind::PubRel,
            pkid: id,
            reason: 0,
            properties: Properties::default(),
        }));
    }
    if conn.keeps_record() {
        conn.save_record().await;
    }
    tracing::debug!(%peer, client = %conn.client_id, ?conn.version, session_present, "MQTT: connected");
    // Boxed: the connection task would otherwise hold it in more than one place.
    Some((Box::new(conn), admitted))
}

//! One AMQP connection: the handshake, then a task that reads frames, runs each
//! channel's state machine, and pulls deliveries from the core for its consumers.

use std::collections::{BTreeMap, HashMap};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, tx, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use bytes::{Bytes, BytesMut};
use mqgate_core::acl::{self, Access, Subject};
use mqgate_core::router::{amqp_to_mqtt, Binding, Destination, ExchangeKind, HeaderMatch};
use mqgate_core::{
    props, AckToken, ConsumeMode, Consumer, CoreError, Delay, Delivery, GroupSpec, MemberOptions,
    OnFailure, StartPosition,
};
use mqgate_store::{GroupName, Message, QueueRef, StoredMessage, TopicName};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::{Permission, RetryPolicy};
use crate::convert::{self, DeathReason};
use crate::frame::{self, ContentHeader, Frame, FrameError, PROTOCOL_HEADER};
use crate::queue::{queue_topic, Overflow, Queue, QueueArgs};
use crate::reply;
use crate::server::{ExMeta, Shared};
use mqgate_amqp_codec::depth;

/// Stop pulling deliveries past this much unsent output.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Stop reading past this much unsent output (a client that publishes without reading).
const OUT_HARD_LIMIT: usize = 4 * 1024 * 1024;
/// Deliveries taken per wake-up before the loop looks at its socket again.
const DELIVERY_BURST: usize = 256;

/// The exchange MQTT publishes through (vhost `/`): the topic access rules govern it.
const MQTT_EXCHANGE: &str = "amq.topic";
/// Room offered to one socket read: it starts small and doubles while reads fill half of
/// it, up to `MAX_READ`, so a busy publisher's reads take everything it sent and every
/// publish in them is stored in one write (a consumed `BytesMut` otherwise offers reads of
/// a few bytes, and each publish costs a write of its own). It halves while reads are
/// small, and a drained buffer larger than twice the room is given back: an idle
/// connection holds 2 KiB, not 64.
const MIN_READ: usize = 2 * 1024;
const MAX_READ: usize = 64 * 1024;

/// How a connection ends.
enum End {
    /// The peer went away or the socket failed.
    Closed,
    /// Close the connection with this code and text (connection.close, then wait for
    /// close-ok briefly).
    Error(u16, String, u16, u16),
    /// The client closed (close-ok sent).
    ClientClosed,
}

/// A channel-level failure: the channel is closed with this code.
struct ChanErr(u16, String);

type ChanResult<T = ()> = Result<T, ChanErr>;

fn chan_err(code: u16, text: impl Into<String>) -> ChanErr {
    ChanErr(code, format!("{} - {}", reply::name(code), text.into()))
}

fn internal(e: CoreError) -> ChanErr {
    match e {
        CoreError::NoSuchExchange(x) => chan_err(reply::NOT_FOUND, format!("no exchange '{x}'")),
        CoreError::Conflict(x) => chan_err(reply::PRECONDITION_FAILED, x),
        CoreError::Invalid(x) => chan_err(reply::PRECONDITION_FAILED, x),
        other => chan_err(reply::INTERNAL_ERROR, other.to_string()),
    }
}

pub(crate) async fn run<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    pending: mqgate_core::net::Pending,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let id = shared.conn_id();
    shared
        .stats
        .connections_opened
        .fetch_add(1, Ordering::Relaxed);
    let (done_tx, done_rx) = watch::channel(false);
    shared.open.lock().insert(id, done_rx);
    let (rd, wr) = tokio::io::split(stream);
    let timeout = shared.cfg.handshake_timeout;
    let evicted = pending.eviction();
    let conn = tokio::select! {
        c = tokio::time::timeout(timeout, handshake(&shared, id, peer, rd, wr, pending)) => c,
        // A newer connection needed the slot (limits.max_pending_handshakes): closed.
        () = evicted.wait() => Ok(None),
    };
    // Counted against limits.max_connections until the connection ends.
    if let Ok(Some((mut conn, _admitted))) = conn {
        let (kick, kicked) = tokio::sync::mpsc::unbounded_channel();
        let info = mqgate_core::ConnectionInfo {
            id: id.to_string(),
            protocol: "amqp",
            peer: peer.to_string(),
            user: Some(conn.user.clone()),
            detail: conn.vhost.clone(),
            connected_at: shared.broker.now(),
        };
        shared.conns.lock().insert(id, (info, kick));
        let end = conn.serve(kicked).await;
        shared.conns.lock().remove(&id);
        conn.finish(end).await;
    } else if conn.is_err() {
        tracing::info!(%peer, "AMQP: handshake timed out; connection closed");
    }
    shared.open.lock().remove(&id);
    let _ = done_tx.send(true);
    shared
        .stats
        .connections_closed
        .fetch_add(1, Ordering::Relaxed);
}

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

fn close_method(code: u16, text: &str, class: u16, method: u16) -> AMQPClass {
    AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
        reply_code: code,
        reply_text: ShortString::from(truncate(text, 255)),
        class_id: class,
        method_id: method,
    }))
}

fn truncate(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
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

async fn handshake<S>(
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
            let delay = shared
                .broker
                .login_throttle()
                .failed(peer.ip(), Some(who.as_str()).filter(|w| !w.is_empty()));
            tokio::time::sleep(delay).await;
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
        rd,
        wr,
        inbuf: buf,
        read_hint: MIN_READ,
        out,
        frame_max,
        channel_max,
        heartbeat,
        cancel_notify,
        blocked_notify,
        published: false,
        channels: HashMap::new(),
        last_read: Instant::now(),
        last_write: Instant::now(),
        exclusive: Vec::new(),
        batch: Vec::new(),
        next_consumer: 1,
        server_named: 0,
    };
    Some((conn, admitted))
}

/// A publish whose content is arriving.
struct Pending {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    header: Option<Box<ContentHeader>>,
    body: BytesMut,
}

/// A whole published message, routed or queued for a transaction.
struct Completed {
    channel: u16,
    exchange: String,
    routing_key: String,
    mandatory: bool,
    header: Box<ContentHeader>,
    body: Bytes,
}

/// A routed message waiting for the connection's next store write.
struct Batched {
    channel: u16,
    seq: Option<u64>,
    message: Message,
    topics: Vec<TopicName>,
}

/// One consumer (or the pull member of basic.get) of a channel.
struct Cons {
    tag: String,
    queue: Arc<Queue>,
    consumer: Consumer,
    no_ack: bool,
    get: bool,
    /// A stream queue's consumer: its own group, deleted on cancel.
    stream_group: Option<GroupName>,
    unacked: usize,
    cancelled: bool,
    /// basic.consume with exclusive.
    exclusive: bool,
}

struct Unacked {
    cons: u64,
    token: AckToken,
    message: Arc<StoredMessage>,
}

enum TxOp {
    Publish(Completed),
    Settle {
        tag: u64,
        multiple: bool,
        ack: bool,
        requeue: bool,
    },
}

#[derive(Default)]
struct Channel {
    /// We sent channel.close and wait for close-ok.
    closing: bool,
    content: Option<Pending>,
    confirm: bool,
    publish_seq: u64,
    tx: Option<Vec<TxOp>>,
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    /// Consumers by internal id.
    consumers: BTreeMap<u64, Cons>,
    /// Consumer tag → id (active consumers).
    tags: HashMap<String, u64>,
    /// Queue key → the id of this channel's basic.get member.
    gets: HashMap<(String, String), u64>,
    /// Prefetch for consumers started from now on (0: unlimited).
    prefetch: u16,
    /// Unacknowledged deliveries allowed on the whole channel (0: unlimited).
    global_prefetch: u16,
    /// channel.flow: false stops deliveries.
    flow_paused: bool,
}

struct Conn<S> {
    shared: Arc<Shared>,
    id: u64,
    peer: SocketAddr,
    user: String,
    perm: Permission,
    vhost: String,
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    inbuf: BytesMut,
    /// The room the next read is offered (see `MIN_READ`).
    read_hint: usize,
    out: BytesMut,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    cancel_notify: bool,
    /// The client understands connection.blocked.
    blocked_notify: bool,
    /// It has published: the memory watermark stops reading from it.
    published: bool,
    channels: HashMap<u16, Channel>,
    last_read: Instant,
    last_write: Instant,
    exclusive: Vec<Arc<Queue>>,
    batch: Vec<Batched>,
    next_consumer: u64,
    server_named: u64,
}

fn method_ids(m: &AMQPClass) -> (u16, u16) {
    (m.get_amqp_class_id(), m.get_amqp_method_id())
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    async fn serve(&mut self, mut kicked: tokio::sync::mpsc::UnboundedReceiver<()>) -> End {
        let mut shutdown = self.shared.shutdown.subscribe();
        let mut blocked = self.shared.broker.memory_blocked();
        let mut told_blocked = false;
        if !self.inbuf.is_empty() {
            if let Err(end) = self.handle_input().await {
                return end;
            }
        }
        let hb = (self.heartbeat > 0).then(|| Duration::from_secs(self.heartbeat as u64));
        loop {
            if self.inbuf.capacity() - self.inbuf.len() < self.read_hint / 2 {
                self.inbuf.reserve(self.read_hint);
            }
            let may_deliver = self.out.len() < OUT_HIGH_WATER;
            let is_blocked = *blocked.borrow_and_update();
            if is_blocked != told_blocked && self.blocked_notify {
                let m = if is_blocked {
                    connection::AMQPMethod::Blocked(connection::Blocked {
                        reason: "low on memory".into(),
                    })
                } else {
                    connection::AMQPMethod::Unblocked(connection::Unblocked {})
                };
                frame::put_method(&mut self.out, 0, AMQPClass::Connection(m));
            }
            told_blocked = is_blocked;
            let held = is_blocked && self.published;
            let may_read = self.out.len() < OUT_HARD_LIMIT && !held;
            let has_out = !self.out.is_empty();
            let hb_send = hb.map(|h| self.last_write + h / 2);
            // A connection not read while blocked is not missing heartbeats (RabbitMQ
            // pauses its heartbeat monitor too).
            let hb_dead = hb.filter(|_| !held).map(|h| self.last_read + h * 2);
            tokio::select! {
                biased;
                _ = blocked.changed() => {
                    self.last_read = Instant::now();
                    continue;
                }
                Some(()) = kicked.recv() => {
                    tracing::info!(peer = %self.peer, user = %self.user, "AMQP: connection closed by an administrator");
                    return End::Error(reply::CONNECTION_FORCED,
                        "CONNECTION_FORCED - Closed via management plugin".into(), 0, 0);
                }
                _ = shutdown.changed() => {
                    return End::Error(reply::CONNECTION_FORCED,
                        "CONNECTION_FORCED - broker forced connection closure with reason 'shutdown'".into(), 0, 0);
                }
                w = self.wr.write(&self.out), if has_out => match w {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => {
                        self.shared.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                        bytes::Buf::advance(&mut self.out, n);
                        self.last_write = Instant::now();
                        if self.out.is_empty() && self.out.capacity() > OUT_HIGH_WATER {
                            self.out = BytesMut::new();
                        }
                    }
                },
                r = self.rd.read_buf(&mut self.inbuf), if may_read => match r {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => {
                        self.shared.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        self.read_hint = if n >= self.read_hint / 2 {
                            (self.read_hint * 2).min(MAX_READ)
                        } else {
                            (self.read_hint / 2).max(MIN_READ)
                        };
                        self.last_read = Instant::now();
                        if let Err(end) = self.handle_input().await {
                            return end;
                        }
                        if self.inbuf.is_empty() && self.inbuf.capacity() > 2 * self.read_hint {
                            self.inbuf = BytesMut::new();
                        }
                        // A client that publishes without pause still gets its
                        // deliveries: the read branch wins every biased select.
                        self.deliver_burst();
                    }
                },
                (ch, cid, d) = poll_deliveries(&mut self.channels), if may_deliver => {
                    let Some(d) = d else {
                        self.consumer_ended(ch, cid);
                        continue;
                    };
                    self.deliver(ch, cid, d);
                    self.deliver_burst();
                }
                _ = sleep_until_opt(hb_send) => {
                    if self.out.is_empty() {
                        frame::put_heartbeat(&mut self.out);
                    }
                    self.last_write = Instant::now();
                }
                _ = sleep_until_opt(hb_dead) => {
                    tracing::info!(peer = %self.peer, user = %self.user, "AMQP: missed heartbeats from client; connection closed");
                    return End::Closed;
                }
            }
        }
    }

    /// Deliver what the consumers have ready now, up to a burst.
    fn deliver_burst(&mut self) {
        for _ in 0..DELIVERY_BURST {
            if self.out.len() >= OUT_HIGH_WATER {
                break;
            }
            match try_deliveries(&mut self.channels) {
                Some((ch, cid, Some(d))) => self.deliver(ch, cid, d),
                Some((ch, cid, None)) => self.consumer_ended(ch, cid),
                None => break,
            }
        }
        self.reap_ended_consumers();
    }

    /// Decode and handle every whole frame read. Publishes read together are stored
    /// together (one write), then confirmed.
    async fn handle_input(&mut self) -> Result<(), End> {
        let result = loop {
            let f = match frame::decode(&mut self.inbuf, self.frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(()),
                Err(e) => break Err(self.frame_error(&e)),
            };
            if let Err(end) = self.on_frame(f).await {
                break Err(end);
            }
        };
        let flushed = self.flush_batch().await;
        result.and(flushed)
    }

    fn frame_error(&self, e: &FrameError) -> End {
        self.shared
            .stats
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %self.peer, user = %self.user, error = %e, "AMQP: malformed frame; connection closed");
        End::Error(
            e.reply_code(),
            format!("{} - {e}", reply::name(e.reply_code())),
            0,
            0,
        )
    }

    fn conn_error(&self, code: u16, text: String, ids: (u16, u16)) -> End {
        self.shared
            .stats
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(peer = %self.peer, user = %self.user, code, %text, "AMQP: connection error");
        End::Error(
            code,
            format!("{} - {text}", reply::name(code)),
            ids.0,
            ids.1,
        )
    }

    async fn on_frame(&mut self, f: Frame) -> Result<(), End> {
        let ch = f.channel();
        match f {
            Frame::Heartbeat(_) => Ok(()),
            Frame::Method(0, m) => self.on_connection_method(*m).await,
            Frame::Method(ch, m) => self.on_channel_method(ch, *m).await,
            Frame::Header(_, h) => {
                let Some(c) = self.channels.get_mut(&ch).filter(|c| !c.closing) else {
                    return self.unexpected(ch, "content header");
                };
                let Some(p) = c.content.as_mut().filter(|p| p.header.is_none()) else {
                    return Err(self.conn_error(
                        reply::UNEXPECTED_FRAME,
                        format!("expected content body, got content header on channel {ch}"),
                        (60, 40),
                    ));
                };
                if h.class_id != frame::CLASS_BASIC {
                    return Err(self.conn_error(
                        reply::UNEXPECTED_FRAME,
                        format!("content header for class {} on channel {ch}", h.class_id),
                        (60, 40),
                    ));
                }
                if h.body_size > self.shared.cfg.max_message_size {
                    let max = self.shared.cfg.max_message_size;
                    let size = h.body_size;
                    c.content = None;
                    return self.channel_exception(
                        ch,
                        chan_err(
                            reply::PRECONDITION_FAILED,
                            format!("message size {size} is larger than configured max size {max}"),
                        ),
                        (60, 40),
                    );
                }
                p.body = BytesMut::with_capacity(h.body_size as usize);
                let done = h.body_size == 0;
                p.header = Some(h);
                if done {
                    self.complete_publish(ch).await?;
                }
                Ok(())
            }
            Frame::Body(_, b) => {
                let Some(c) = self.channels.get_mut(&ch).filter(|c| !c.closing) else {
                    return self.unexpected(ch, "content body");
                };
                let Some(p) = c.content.as_mut().filter(|p| p.header.is_some()) else {
                    return Err(self.conn_error(
                        reply::UNEXPECTED_FRAME,
                        format!("content body on channel {ch} without a content header"),
                        (60, 40),
                    ));
                };
                let want = p.header.as_ref().map(|h| h.body_size).unwrap_or(0);
                if (p.body.len() + b.len()) as u64 > want {
                    return Err(self.conn_error(
                        reply::FRAME_ERROR,
                        format!("content body on channel {ch} longer than its header announced"),
                        (60, 40),
                    ));
                }
                p.body.extend_from_slice(&b);
                if p.body.len() as u64 == want {
                    self.complete_publish(ch).await?;
                }
                Ok(())
            }
        }
    }

    /// A frame for a channel that is closing (ignored) or not open (connection error).
    fn unexpected(&self, ch: u16, what: &str) -> Result<(), End> {
        if self.channels.get(&ch).is_some_and(|c| c.closing) {
            return Ok(());
        }
        Err(self.conn_error(
            reply::CHANNEL_ERROR,
            format!("{what} on channel {ch}, which is not open"),
            (0, 0),
        ))
    }

    async fn on_connection_method(&mut self, m: AMQPClass) -> Result<(), End> {
        let ids = method_ids(&m);
        match m {
            AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                tracing::debug!(peer = %self.peer, code = c.reply_code, "AMQP: client closed the connection");
                frame::put_method(
                    &mut self.out,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Err(End::ClientClosed)
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => Err(End::Closed),
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                frame::put_method(
                    &mut self.out,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::UpdateSecretOk(
                        connection::UpdateSecretOk {},
                    )),
                );
                Ok(())
            }
            AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
            | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => Ok(()),
            _ => Err(self.conn_error(
                reply::COMMAND_INVALID,
                format!("method {}.{} is not allowed on channel 0", ids.0, ids.1),
                ids,
            )),
        }
    }

    /// Close a channel with an exception (or, for a hard error code, the connection).
    fn channel_exception(&mut self, ch: u16, e: ChanErr, ids: (u16, u16)) -> Result<(), End> {
        let ChanErr(code, text) = e;
        if reply::is_hard(code) {
            self.shared
                .stats
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %self.peer, user = %self.user, code, %text, "AMQP: connection error");
            return Err(End::Error(code, text, ids.0, ids.1));
        }
        tracing::info!(peer = %self.peer, user = %self.user, channel = ch, code, %text, "AMQP: channel error");
        if let Some(c) = self.channels.get_mut(&ch) {
            let c = std::mem::take(c);
            self.close_channel_state(c);
            self.channels.insert(
                ch,
                Channel {
                    closing: true,
                    ..Default::default()
                },
            );
        }
        frame::put_method(
            &mut self.out,
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: code,
                reply_text: ShortString::from(truncate(&text, 255)),
                class_id: ids.0,
                method_id: ids.1,
            })),
        );
        Ok(())
    }

    /// Release a channel's consumers (their unacked messages go back to their queues).
    fn close_channel_state(&mut self, c: Channel) {
        for (_, cons) in c.consumers {
            self.release_consumer(cons);
        }
    }

    fn release_consumer(&mut self, cons: Cons) {
        if !cons.get && !cons.cancelled {
            self.consumer_gone(&cons.queue, cons.exclusive);
        }
        if let Some(g) = cons.stream_group {
            let broker = self.shared.broker.clone();
            drop(cons.consumer);
            tokio::spawn(async move {
                let _ = broker.delete_group(&g).await;
            });
        }
    }

    /// A consumer of `q` went: auto-delete queues go with their last consumer.
    fn consumer_gone(&mut self, q: &Arc<Queue>, exclusive: bool) {
        let delete = {
            let mut s = q.state.lock();
            s.consumers = s.consumers.saturating_sub(1);
            if exclusive {
                s.exclusive_consumer = false;
            }
            s.last_used = self.shared.broker.now();
            q.auto_delete && s.had_consumer && s.consumers == 0 && !s.deleted
        };
        if delete {
            let shared = Arc::clone(&self.shared);
            let q = Arc::clone(q);
            tokio::spawn(async move {
                shared.delete_queue(&q).await;
            });
        }
    }

    async fn on_channel_method(&mut self, ch: u16, m: AMQPClass) -> Result<(), End> {
        let ids = method_ids(&m);
        // Content must be whole before the next method.
        if self.channels.get(&ch).is_some_and(|c| c.content.is_some()) {
            return Err(self.conn_error(
                reply::UNEXPECTED_FRAME,
                format!(
                    "expected content header/body on channel {ch}, got method {}.{}",
                    ids.0, ids.1
                ),
                ids,
            ));
        }
        match &m {
            AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                if self.channels.get(&ch).is_some_and(|c| !c.closing) {
                    return Err(self.conn_error(
                        reply::CHANNEL_ERROR,
                        format!("second 'channel.open' seen on channel {ch}"),
                        ids,
                    ));
                }
                if ch > self.channel_max {
                    return Err(self.conn_error(
                        reply::CHANNEL_ERROR,
                        format!("channel {ch} is above channel_max {}", self.channel_max),
                        ids,
                    ));
                }
                if self.channels.insert(ch, Channel::default()).is_none() {
                    self.shared.stats.channels.fetch_add(1, Ordering::Relaxed);
                }
                frame::put_method(
                    &mut self.out,
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                );
                return Ok(());
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                if self.channels.get(&ch).is_some_and(|c| c.closing) {
                    self.channels.remove(&ch);
                    self.shared.stats.channels.fetch_sub(1, Ordering::Relaxed);
                }
                return Ok(());
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                if let Some(c) = self.channels.remove(&ch) {
                    self.shared.stats.channels.fetch_sub(1, Ordering::Relaxed);
                    self.close_channel_state(c);
                    frame::put_method(
                        &mut self.out,
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                    return Ok(());
                }
                return self.unexpected(ch, "channel.close");
            }
            _ => {}
        }
        match self.channels.get(&ch) {
            None => return self.unexpected(ch, &format!("method {}.{}", ids.0, ids.1)),
            Some(c) if c.closing => return Ok(()),
            Some(_) => {}
        }
        // Keep order: what was published before this method is stored first.
        if !matches!(m, AMQPClass::Basic(basic::AMQPMethod::Publish(_))) {
            self.flush_batch().await?;
        }
        match self.on_method(ch, m).await {
            Ok(()) => Ok(()),
            Err(e) => self.channel_exception(ch, e, ids),
        }
    }

    fn chan(&mut self, ch: u16) -> &mut Channel {
        self.channels.get_mut(&ch).expect("checked open")
    }

    fn reply(&mut self, ch: u16, m: AMQPClass) {
        frame::put_method(&mut self.out, ch, m);
    }

    fn check(&self, kind: &str, name: &str, allowed: bool) -> ChanResult {
        if allowed {
            return Ok(());
        }
        Err(chan_err(
            reply::ACCESS_REFUSED,
            format!(
                "{kind} access to '{name}' in vhost '{}' refused for user '{}'",
                self.vhost, self.user
            ),
        ))
    }

    fn can_configure(&self, kind: &str, name: &str) -> ChanResult {
        self.check(
            &format!("configure {kind}"),
            name,
            self.perm.configure.is_match(name),
        )
    }

    fn can_write(&self, kind: &str, name: &str) -> ChanResult {
        let n = if name.is_empty() { "amq.default" } else { name };
        self.check(&format!("write {kind}"), n, self.perm.write.is_match(n))
    }

    fn can_read(&self, kind: &str, name: &str) -> ChanResult {
        let n = if name.is_empty() { "amq.default" } else { name };
        self.check(&format!("read {kind}"), n, self.perm.read.is_match(n))
    }

    /// Whether the topic access rules govern `exchange`: `amq.topic` of vhost `/` (the
    /// exchange MQTT publishes through), when rules are configured.
    fn topic_acl_applies(&self, exchange: &str) -> bool {
        exchange == MQTT_EXCHANGE
            && self.vhost == mqgate_core::router::DEFAULT_VHOST
            && !self.shared.cfg.topic_acl.is_open()
    }

    /// Who the topic access rules see (AMQP has no client id).
    fn subject(&self) -> Subject<'_> {
        Subject {
            user: Some(&self.user),
            client_id: None,
        }
    }

    /// A publish to `amq.topic`: the routing key, read as an MQTT topic, must be one the
    /// user may publish to (as RabbitMQ's topic authorisation; one rule set with MQTT).
    fn can_publish_topic(&self, exchange: &str, key: &str) -> ChanResult {
        if !self.topic_acl_applies(exchange) {
            return Ok(());
        }
        let topic = amqp_to_mqtt(key);
        if self
            .shared
            .cfg
            .topic_acl
            .check_topic(self.subject(), Access::Publish, &topic)
        {
            return Ok(());
        }
        tracing::info!(user = %self.user, %key, "AMQP: publish to amq.topic refused by the topic access rules");
        Err(chan_err(
            reply::ACCESS_REFUSED,
            format!(
                "write access to topic '{key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
                self.vhost, self.user
            ),
        ))
    }

    /// A binding from `amq.topic` (`Access::Subscribe`: a queue reading MQTT topics) or
    /// into it (`Access::Publish`): every topic `pattern` can match must be allowed, so
    /// AMQP deliveries need no check per message.
    fn can_bind_topic(&self, exchange: &str, access: Access, pattern: &str) -> ChanResult {
        if !self.topic_acl_applies(exchange) {
            return Ok(());
        }
        let filter = acl::amqp_pattern_to_filter(pattern);
        if self
            .shared
            .cfg
            .topic_acl
            .check_filter_strict(self.subject(), access, &filter)
        {
            return Ok(());
        }
        let kind = if access == Access::Publish {
            "write"
        } else {
            "read"
        };
        tracing::info!(user = %self.user, %pattern, kind, "AMQP: binding with amq.topic refused by the topic access rules");
        Err(chan_err(
            reply::ACCESS_REFUSED,
            format!(
                "{kind} access to topic '{pattern}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
                self.vhost, self.user
            ),
        ))
    }

    /// A queue this connection may use (404 if missing, 405 if another connection's
    /// exclusive queue).
    fn get_queue(&self, name: &str) -> ChanResult<Arc<Queue>> {
        let q = self.shared.queue(&self.vhost, name).ok_or_else(|| {
            chan_err(
                reply::NOT_FOUND,
                format!("no queue '{name}' in vhost '{}'", self.vhost),
            )
        })?;
        if q.exclusive.is_some_and(|c| c != self.id) {
            return Err(chan_err(
                reply::RESOURCE_LOCKED,
                format!(
                    "cannot obtain exclusive access to locked queue '{name}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                    self.vhost
                ),
            ));
        }
        Ok(q)
    }

    fn exchange_exists(&self, name: &str) -> ChanResult<mqgate_core::router::ExchangeDef> {
        self.shared
            .broker
            .router()
            .exchange(&self.vhost, name)
            .ok_or_else(|| {
                chan_err(
                    reply::NOT_FOUND,
                    format!("no exchange '{name}' in vhost '{}'", self.vhost),
                )
            })
    }

    async fn on_method(&mut self, ch: u16, m: AMQPClass) -> ChanResult {
        match m {
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                self.chan(ch).flow_paused = !f.active;
                self.reply(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: f.active,
                    })),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Access(_) => {
                self.reply(
                    ch,
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    )),
                );
                Ok(())
            }
            AMQPClass::Exchange(e) => self.on_exchange(ch, e).await,
            AMQPClass::Queue(q) => self.on_queue(ch, q).await,
            AMQPClass::Basic(b) => self.on_basic(ch, b).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let c = self.chan(ch);
                if c.tx.is_some() {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                c.confirm = true;
                if !s.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(t) => self.on_tx(ch, t).await,
            other => {
                let (c, m) = method_ids(&other);
                Err(chan_err(
                    reply::COMMAND_INVALID,
                    format!("method {c}.{m} is not valid from a client"),
                ))
            }
        }
    }

    // ------------------------------------------------------------------ exchanges

    async fn on_exchange(&mut self, ch: u16, m: exchange::AMQPMethod) -> ChanResult {
        match m {
            exchange::AMQPMethod::Declare(d) => {
                let name = d.exchange.as_str();
                if name.is_empty() {
                    // As RabbitMQ: the default exchange is not declared, not even passively.
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        format!(
                            "operation not permitted on the default exchange (vhost '{}')",
                            self.vhost
                        ),
                    ));
                }
                let existing = self.shared.broker.router().exchange(&self.vhost, name);
                if d.passive {
                    if existing.is_none() {
                        return Err(chan_err(
                            reply::NOT_FOUND,
                            format!("no exchange '{name}' in vhost '{}'", self.vhost),
                        ));
                    }
                } else {
                    self.can_configure("exchange", name)?;
                    let ty = d.kind.as_str();
                    let (kind, delayed) = if ty == "x-delayed-message" {
                        let inner = d
                            .arguments
                            .inner()
                            .get("x-delayed-type")
                            .and_then(convert::str_value)
                            .ok_or_else(|| {
                                chan_err(
                                    reply::PRECONDITION_FAILED,
                                    "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                                )
                            })?;
                        let k = ExchangeKind::parse(&inner).ok_or_else(|| {
                            chan_err(
                                reply::PRECONDITION_FAILED,
                                "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                            )
                        })?;
                        (k, true)
                    } else {
                        let k = ExchangeKind::parse(ty).ok_or_else(|| {
                            chan_err(
                                reply::COMMAND_INVALID,
                                format!("unknown exchange type '{ty}'"),
                            )
                        })?;
                        (k, false)
                    };
                    let def = Shared::exchange_def(
                        name,
                        kind,
                        d.durable,
                        d.auto_delete,
                        d.internal,
                        &d.arguments,
                        delayed,
                    );
                    match existing {
                        Some(e) => {
                            if e.kind != def.kind
                                || e.durable != def.durable
                                || e.auto_delete != def.auto_delete
                                || e.internal != def.internal
                                || (e.arguments != def.arguments
                                    && !name.is_empty()
                                    && !name.starts_with("amq."))
                            {
                                let what = if e.kind != def.kind {
                                    "type"
                                } else if e.durable != def.durable {
                                    "durable"
                                } else if e.auto_delete != def.auto_delete {
                                    "auto_delete"
                                } else if e.internal != def.internal {
                                    "internal"
                                } else {
                                    "arguments"
                                };
                                return Err(chan_err(
                                    reply::PRECONDITION_FAILED,
                                    format!("inequivalent arg '{what}' for exchange '{name}' in vhost '{}'", self.vhost),
                                ));
                            }
                        }
                        None => {
                            if name.starts_with("amq.") || name.is_empty() {
                                return Err(chan_err(
                                    reply::ACCESS_REFUSED,
                                    format!(
                                        "exchange name '{name}' contains reserved prefix 'amq.*'"
                                    ),
                                ));
                            }
                            // Unroutable messages go to the alternate exchange with
                            // their routing key, whatever it is.
                            if let Some(alt) = &def.alternate {
                                self.can_bind_topic(alt, Access::Publish, "#")?;
                            }
                            self.shared
                                .broker
                                .declare_exchange(&self.vhost, def)
                                .await
                                .map_err(internal)?;
                            if delayed {
                                self.shared.exchanges.write().insert(
                                    (self.vhost.clone(), name.to_owned()),
                                    ExMeta { delayed },
                                );
                            }
                        }
                    }
                }
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
                Ok(())
            }
            exchange::AMQPMethod::Delete(d) => {
                let name = d.exchange.as_str();
                if name.is_empty() || name.starts_with("amq.") {
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        format!("operation not permitted on the default exchange or 'amq.*' exchanges ('{name}')"),
                    ));
                }
                self.can_configure("exchange", name)?;
                if self
                    .shared
                    .broker
                    .router()
                    .exchange(&self.vhost, name)
                    .is_some()
                {
                    if d.if_unused {
                        let used = !self
                            .shared
                            .broker
                            .router()
                            .bindings(&self.vhost, Some(name))
                            .is_empty();
                        if used {
                            return Err(chan_err(
                                reply::PRECONDITION_FAILED,
                                format!("exchange '{name}' in vhost '{}' in use", self.vhost),
                            ));
                        }
                    }
                    self.shared
                        .broker
                        .delete_exchange(&self.vhost, name, false)
                        .await
                        .map_err(internal)?;
                    self.shared
                        .exchanges
                        .write()
                        .remove(&(self.vhost.clone(), name.to_owned()));
                }
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                }
                Ok(())
            }
            exchange::AMQPMethod::Bind(b) => {
                let (dest, src) = (b.destination.as_str(), b.source.as_str());
                self.exchange_bind(dest, src, b.routing_key.as_str(), &b.arguments, true)
                    .await?;
                if !b.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                    );
                }
                Ok(())
            }
            exchange::AMQPMethod::Unbind(b) => {
                let (dest, src) = (b.destination.as_str(), b.source.as_str());
                self.exchange_bind(dest, src, b.routing_key.as_str(), &b.arguments, false)
                    .await?;
                if !b.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                    );
                }
                Ok(())
            }
            _ => Err(chan_err(reply::COMMAND_INVALID, "not a client method")),
        }
    }

    fn binding(
        &self,
        source: &mqgate_core::router::ExchangeDef,
        destination: Destination,
        key: &str,
        args: &FieldTable,
    ) -> Binding {
        let headers = (source.kind == ExchangeKind::Headers).then(|| HeaderMatch {
            all: args
                .inner()
                .get("x-match")
                .and_then(convert::str_value)
                .is_none_or(|m| m != "any" && m != "any-with-x"),
            headers: args
                .inner()
                .iter()
                .filter(|(k, _)| !k.as_str().starts_with("x-"))
                .map(|(k, v)| (k.as_str().to_owned(), convert::header_value(v)))
                .collect(),
        });
        let (enc, _) = cookie_factory::gen(
            amq_protocol::types::generation::gen_field_table(args),
            Vec::new(),
        )
        .expect("writing to a Vec cannot fail");
        Binding {
            source: source.name.clone(),
            destination,
            key: key.to_owned(),
            headers,
            mqtt: false,
            arguments: Bytes::from(enc),
        }
    }

    async fn exchange_bind(
        &mut self,
        dest: &str,
        src: &str,
        key: &str,
        args: &FieldTable,
        bind: bool,
    ) -> ChanResult {
        if src.is_empty() || dest.is_empty() {
            return Err(chan_err(
                reply::ACCESS_REFUSED,
                "operation not permitted on the default exchange",
            ));
        }
        self.can_write("exchange", dest)?;
        self.can_read("exchange", src)?;
        if bind {
            self.can_bind_topic(src, Access::Subscribe, key)?;
            // What enters amq.topic keeps its routing key, whatever the binding's key.
            self.can_bind_topic(dest, Access::Publish, "#")?;
        }
        let d = self.exchange_exists(dest);
        let s = self.exchange_exists(src);
        if !bind && (d.is_err() || s.is_err()) {
            return Ok(());
        }
        let (d, s) = (d?, s?);
        let b = self.binding(&s, Destination::Exchange(d.name.clone()), key, args);
        if bind {
            self.shared
                .broker
                .bind(&self.vhost, b, s.durable && d.durable)
                .await
                .map_err(internal)?;
        } else {
            self.shared
                .broker
                .unbind(&self.vhost, &b)
                .await
                .map_err(internal)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------------ queues

    async fn on_queue(&mut self, ch: u16, m: queue::AMQPMethod) -> ChanResult {
        match m {
            queue::AMQPMethod::Declare(d) => {
                let mut name = d.queue.as_str().to_owned();
                if name.is_empty() && !d.passive {
                    self.server_named += 1;
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|t| t.as_nanos())
                        .unwrap_or(0);
                    name = format!(
                        "amq.gen-{:x}{:x}-{}",
                        self.id,
                        nanos & 0xffff_ffff,
                        self.server_named
                    );
                } else if d.passive {
                    let q = self.get_queue(&name)?;
                    let count = self.shared.ready_count(&q).await;
                    let consumers = q.state.lock().consumers as u32;
                    if !d.nowait {
                        self.reply_declare_ok(ch, &name, count, consumers);
                    }
                    return Ok(());
                } else if name.starts_with("amq.") {
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        format!("queue name '{name}' contains reserved prefix 'amq.*'"),
                    ));
                }
                self.can_configure("queue", &name)?;
                let (count, consumers) = match self.shared.queue(&self.vhost, &name) {
                    Some(_) => {
                        let q = self.get_queue(&name)?;
                        let what = if q.durable != d.durable {
                            Some(("durable", d.durable, q.durable))
                        } else if q.exclusive.is_some() != d.exclusive {
                            Some(("exclusive", d.exclusive, q.exclusive.is_some()))
                        } else if q.auto_delete != d.auto_delete {
                            Some(("auto_delete", d.auto_delete, q.auto_delete))
                        } else {
                            None
                        };
                        if let Some((arg, got, cur)) = what {
                            return Err(chan_err(
                                reply::PRECONDITION_FAILED,
                                format!("inequivalent arg '{arg}' for queue '{name}' in vhost '{}': received '{got}' but current is '{cur}'", self.vhost),
                            ));
                        }
                        for (k, v) in d.arguments.inner() {
                            if k.as_str().starts_with("x-") && q.raw_args.inner().get(k) != Some(v)
                            {
                                return Err(chan_err(
                                    reply::PRECONDITION_FAILED,
                                    format!(
                                        "inequivalent arg '{k}' for queue '{name}' in vhost '{}'",
                                        self.vhost
                                    ),
                                ));
                            }
                        }
                        q.state.lock().last_used = self.shared.broker.now();
                        let n = self.shared.ready_count(&q).await;
                        let c = q.state.lock().consumers as u32;
                        (n, c)
                    }
                    None => {
                        let args =
                            QueueArgs::parse(&d.arguments, self.shared.cfg.default_retry_policy)
                                .map_err(|(c, t)| chan_err(c, t))?;
                        // Dead letters are published with the message's routing key (or
                        // x-dead-letter-routing-key).
                        if let Some(dlx) = &args.dlx {
                            let key = args.dlrk.as_deref().unwrap_or("#");
                            self.can_bind_topic(dlx, Access::Publish, key)?;
                        }
                        let (topic, group) = queue_topic(&self.vhost, &name);
                        let q = Queue {
                            vhost: self.vhost.clone(),
                            name: name.clone(),
                            topic,
                            group,
                            durable: d.durable,
                            exclusive: d.exclusive.then_some(self.id),
                            auto_delete: d.auto_delete,
                            raw_args: d.arguments.clone(),
                            args,
                            state: Mutex::default(),
                        };
                        let q = self
                            .shared
                            .create_queue(q)
                            .await
                            .map_err(|(c, t)| chan_err(c, t))?;
                        if d.exclusive {
                            self.exclusive.push(q);
                        }
                        (0, 0)
                    }
                };
                if !d.nowait {
                    self.reply_declare_ok(ch, &name, count, consumers);
                }
                Ok(())
            }
            queue::AMQPMethod::Bind(b) => {
                let q = self.get_queue(b.queue.as_str())?;
                let ex = b.exchange.as_str();
                if ex.is_empty() {
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        "operation not permitted on the default exchange",
                    ));
                }
                self.can_write("queue", &q.name)?;
                self.can_read("exchange", ex)?;
                self.can_bind_topic(ex, Access::Subscribe, b.routing_key.as_str())?;
                let e = self.exchange_exists(ex)?;
                let binding = self.binding(
                    &e,
                    Destination::Topic(q.topic.clone()),
                    b.routing_key.as_str(),
                    &b.arguments,
                );
                self.shared
                    .broker
                    .bind(&self.vhost, binding, q.persistent() && e.durable)
                    .await
                    .map_err(internal)?;
                if !b.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Unbind(b) => {
                let q = self.get_queue(b.queue.as_str())?;
                let ex = b.exchange.as_str();
                if ex.is_empty() {
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        "operation not permitted on the default exchange",
                    ));
                }
                self.can_write("queue", &q.name)?;
                self.can_read("exchange", ex)?;
                if let Ok(e) = self.exchange_exists(ex) {
                    let binding = self.binding(
                        &e,
                        Destination::Topic(q.topic.clone()),
                        b.routing_key.as_str(),
                        &b.arguments,
                    );
                    self.shared
                        .broker
                        .unbind(&self.vhost, &binding)
                        .await
                        .map_err(internal)?;
                }
                self.reply(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
                Ok(())
            }
            queue::AMQPMethod::Purge(p) => {
                let q = self.get_queue(p.queue.as_str())?;
                self.can_read("queue", &q.name)?;
                let n = self.shared.purge(&q).await.map_err(internal)?;
                if !p.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count: n,
                        })),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Delete(d) => {
                let name = d.queue.as_str();
                let q = match self.get_queue(name) {
                    Ok(q) => q,
                    Err(ChanErr(reply::NOT_FOUND, _)) => {
                        // RabbitMQ: deleting a queue that does not exist succeeds.
                        if !d.nowait {
                            self.reply(
                                ch,
                                AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                                    message_count: 0,
                                })),
                            );
                        }
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                self.can_configure("queue", name)?;
                if d.if_unused && q.state.lock().consumers > 0 {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        format!("queue '{name}' in vhost '{}' in use", self.vhost),
                    ));
                }
                if d.if_empty && self.shared.ready_count(&q).await > 0 {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        format!("queue '{name}' in vhost '{}' is not empty", self.vhost),
                    ));
                }
                let n = self.shared.delete_queue(&q).await;
                self.exclusive.retain(|e| !Arc::ptr_eq(e, &q));
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count: n,
                        })),
                    );
                }
                Ok(())
            }
            _ => Err(chan_err(reply::COMMAND_INVALID, "not a client method")),
        }
    }

    fn reply_declare_ok(&mut self, ch: u16, name: &str, count: u32, consumers: u32) {
        self.reply(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                queue: name.into(),
                message_count: count,
                consumer_count: consumers,
            })),
        );
    }

    // ------------------------------------------------------------------ basic

    async fn on_basic(&mut self, ch: u16, m: basic::AMQPMethod) -> ChanResult {
        match m {
            basic::AMQPMethod::Publish(p) => {
                if p.immediate {
                    // RabbitMQ 3 dropped `immediate`: a connection error, as there.
                    return Err(chan_err(reply::NOT_IMPLEMENTED, "immediate=true"));
                }
                self.chan(ch).content = Some(Pending {
                    exchange: p.exchange.as_str().to_owned(),
                    routing_key: p.routing_key.as_str().to_owned(),
                    mandatory: p.mandatory,
                    header: None,
                    body: BytesMut::new(),
                });
                Ok(())
            }
            basic::AMQPMethod::Qos(q) => {
                let c = self.chan(ch);
                if q.global {
                    c.global_prefetch = q.prefetch_count;
                } else {
                    c.prefetch = q.prefetch_count;
                }
                self.reply(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::Consume(c) => self.consume(ch, c).await,
            basic::AMQPMethod::Cancel(c) => {
                let tag = c.consumer_tag.as_str().to_owned();
                self.cancel(ch, &tag);
                if !c.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: tag.into(),
                        })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Get(g) => self.get(ch, g).await,
            basic::AMQPMethod::Ack(a) => {
                self.settle_or_buffer(ch, a.delivery_tag, a.multiple, true, false)
                    .await
            }
            basic::AMQPMethod::Nack(n) => {
                self.settle_or_buffer(ch, n.delivery_tag, n.multiple, false, n.requeue)
                    .await
            }
            basic::AMQPMethod::Reject(r) => {
                self.settle_or_buffer(ch, r.delivery_tag, false, false, r.requeue)
                    .await
            }
            basic::AMQPMethod::Recover(r) => {
                self.recover(ch);
                let _ = r.requeue;
                self.reply(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::RecoverAsync(_) => {
                self.recover(ch);
                Ok(())
            }
            _ => Err(chan_err(reply::COMMAND_INVALID, "not a client method")),
        }
    }

    /// Every unacknowledged delivery of the channel goes back to its queue.
    fn recover(&mut self, ch: u16) {
        let c = self.chan(ch);
        let all = std::mem::take(&mut c.unacked);
        for (_, u) in all {
            if let Some(cons) = c.consumers.get_mut(&u.cons) {
                cons.unacked = cons.unacked.saturating_sub(1);
                cons.consumer.nack(u.token, true);
            }
        }
    }

    async fn consume(&mut self, ch: u16, c: basic::Consume) -> ChanResult {
        let q = self.get_queue(c.queue.as_str())?;
        self.can_read("queue", &q.name)?;
        let mut tag = c.consumer_tag.as_str().to_owned();
        if tag.is_empty() {
            tag = format!("amq.ctag-{}-{}-{}", self.id, ch, self.next_consumer);
        }
        if self.chan(ch).tags.contains_key(&tag) {
            return Err(chan_err(
                reply::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        {
            let s = q.state.lock();
            if s.exclusive_consumer || (c.exclusive && s.consumers > 0) {
                return Err(chan_err(
                    reply::ACCESS_REFUSED,
                    format!(
                        "queue '{}' in vhost '{}' in exclusive use",
                        q.name, self.vhost
                    ),
                ));
            }
        }
        let prefetch = match self.chan(ch).prefetch as usize {
            0 => self.shared.cfg.default_prefetch,
            n => n,
        };
        let offset = c.arguments.inner().get("x-stream-offset").cloned();
        let member = format!(
            "{:016}",
            self.shared.next_member.fetch_add(1, Ordering::Relaxed)
        );
        let (consumer, stream_group) = if q.args.stream {
            let pos = self.stream_position(&q, offset.as_ref())?;
            let g = GroupName::new(format!("{}%stream%{}", q.group, member))
                .map_err(|e| chan_err(reply::INTERNAL_ERROR, e.to_string()))?;
            let mut spec = GroupSpec::new(g.clone(), vec![q.topic.clone()], ConsumeMode::Shared);
            spec.start = pos;
            spec.on_failure = OnFailure::Discard;
            let mut opts = MemberOptions::new(member, prefetch);
            opts.exact_prefetch = true;
            let cons = self
                .shared
                .broker
                .subscribe(spec, opts)
                .await
                .map_err(internal)?;
            (cons, Some(g))
        } else {
            if let Some(v) = offset.as_ref() {
                // mqgate extension: replay an ordinary queue from a position.
                let pos = self.stream_position(&q, Some(v))?;
                self.shared
                    .broker
                    .reset_group(&q.group, pos)
                    .await
                    .map_err(internal)?;
            }
            let mut opts = MemberOptions::new(member, prefetch);
            opts.exact_prefetch = true;
            let cons = self
                .shared
                .broker
                .subscribe(self.queue_spec(&q), opts)
                .await
                .map_err(internal)?;
            (cons, None)
        };
        {
            let mut s = q.state.lock();
            s.consumers += 1;
            s.had_consumer = true;
            s.exclusive_consumer |= c.exclusive;
            s.last_used = self.shared.broker.now();
        }
        let id = self.next_consumer;
        self.next_consumer += 1;
        let chan = self.chan(ch);
        chan.tags.insert(tag.clone(), id);
        chan.consumers.insert(
            id,
            Cons {
                tag: tag.clone(),
                queue: q,
                consumer,
                no_ack: c.no_ack,
                get: false,
                stream_group,
                unacked: 0,
                cancelled: false,
                exclusive: c.exclusive,
            },
        );
        if !c.nowait {
            self.reply(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: tag.into(),
                })),
            );
        }
        Ok(())
    }

    fn queue_spec(&self, q: &Queue) -> GroupSpec {
        let mode = if q.args.single_active {
            ConsumeMode::Clustering
        } else {
            ConsumeMode::Shared
        };
        let mut spec = GroupSpec::new(q.group.clone(), vec![q.topic.clone()], mode);
        spec.start = StartPosition::First;
        spec.on_failure = match q.args.retry {
            Some(RetryPolicy::RocketMq) => OnFailure::Retry,
            None => OnFailure::Discard,
        };
        spec.max_reconsume_times = q.args.delivery_limit;
        spec
    }

    /// `x-stream-offset`: first, last, next, an offset, or a timestamp (seconds).
    fn stream_position(&self, q: &Queue, v: Option<&AMQPValue>) -> ChanResult<StartPosition> {
        let bad = || {
            chan_err(
                reply::PRECONDITION_FAILED,
                "invalid x-stream-offset: use first, last, next, an offset or a timestamp",
            )
        };
        Ok(match v {
            None => StartPosition::Last,
            Some(AMQPValue::Timestamp(s)) => StartPosition::Timestamp(s.saturating_mul(1000)),
            Some(v) => match convert::str_value(v).as_deref() {
                Some("first") => StartPosition::First,
                Some("next") => StartPosition::Last,
                Some("last") => {
                    let next = self
                        .shared
                        .broker
                        .store()
                        .queue_range(&QueueRef::new(q.topic.clone(), 0))
                        .map(|r| r.next.0)
                        .unwrap_or(0);
                    StartPosition::Offset(next.saturating_sub(1))
                }
                Some(_) => return Err(bad()),
                None => match convert::int_value(v) {
                    Some(n) if n >= 0 => StartPosition::Offset(n as u64),
                    _ => return Err(bad()),
                },
            },
        })
    }

    /// Cancel a consumer: no more deliveries; what it holds unacknowledged stays
    /// acknowledgeable on the channel.
    fn cancel(&mut self, ch: u16, tag: &str) {
        let chan = self.chan(ch);
        let Some(id) = chan.tags.remove(tag) else {
            return;
        };
        let Some(cons) = chan.consumers.get_mut(&id) else {
            return;
        };
        cons.cancelled = true;
        cons.consumer.set_prefetch(0);
        // Deliveries handed to it but not yet sent go back.
        while let Some(d) = cons.consumer.try_recv() {
            cons.consumer.nack(d.ack_token(), true);
        }
        let (q, excl, drop_now) = (Arc::clone(&cons.queue), cons.exclusive, cons.unacked == 0);
        if drop_now {
            if let Some(cons) = chan.consumers.remove(&id) {
                if let Some(g) = cons.stream_group {
                    let broker = self.shared.broker.clone();
                    drop(cons.consumer);
                    tokio::spawn(async move {
                        let _ = broker.delete_group(&g).await;
                    });
                }
            }
        }
        self.consumer_gone(&q, excl);
    }

    async fn get(&mut self, ch: u16, g: basic::Get) -> ChanResult {
        let q = self.get_queue(g.queue.as_str())?;
        self.can_read("queue", &q.name)?;
        if q.args.stream {
            return Err(chan_err(
                reply::PRECONDITION_FAILED,
                "basic.get is not supported by stream queues",
            ));
        }
        q.state.lock().last_used = self.shared.broker.now();
        let key = (q.vhost.clone(), q.name.clone());
        let existing = self.chan(ch).gets.get(&key).copied();
        let id = match existing {
            Some(id) => id,
            None => {
                let member = format!(
                    "{:016}",
                    self.shared.next_member.fetch_add(1, Ordering::Relaxed)
                );
                let mut opts = MemberOptions::new(member, 0);
                opts.exact_prefetch = true;
                let consumer = self
                    .shared
                    .broker
                    .subscribe(self.queue_spec(&q), opts)
                    .await
                    .map_err(internal)?;
                let id = self.next_consumer;
                self.next_consumer += 1;
                let chan = self.chan(ch);
                chan.gets.insert(key, id);
                chan.consumers.insert(
                    id,
                    Cons {
                        tag: String::new(),
                        queue: Arc::clone(&q),
                        consumer,
                        no_ack: g.no_ack,
                        get: true,
                        stream_group: None,
                        unacked: 0,
                        cancelled: false,
                        exclusive: false,
                    },
                );
                id
            }
        };
        let mut delivery = None;
        // Skip what screening settles (expired, transient from before a restart).
        for _ in 0..10_000 {
            let cons = self.chan(ch).consumers.get_mut(&id).expect("get member");
            let mut d = cons.consumer.try_recv();
            if d.is_none() && self.shared.ready_count(&q).await > 0 {
                let cons = self.chan(ch).consumers.get_mut(&id).expect("get member");
                cons.consumer.set_prefetch(cons.unacked + 1);
                d = tokio::time::timeout(Duration::from_secs(2), cons.consumer.recv())
                    .await
                    .ok()
                    .flatten();
                cons.consumer.set_prefetch(cons.unacked);
            }
            let Some(d) = d else { break };
            let shared = Arc::clone(&self.shared);
            let cons = self.chan(ch).consumers.get(&id).expect("get member");
            if screen(&shared, cons, &d) {
                delivery = Some(d);
                break;
            }
        }
        let Some(d) = delivery else {
            self.reply(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
            );
            return Ok(());
        };
        let remaining = self.shared.ready_count(&q).await;
        let (ex, rk) = convert::exchange_and_key(&d.message.message);
        let no_ack = g.no_ack;
        let token = d.ack_token();
        let shared = Arc::clone(&self.shared);
        let chan = self.chan(ch);
        chan.next_tag += 1;
        let tag = chan.next_tag;
        let cons = chan.consumers.get_mut(&id).expect("get member");
        if no_ack {
            shared.stats.acked.fetch_add(1, Ordering::Relaxed);
            cons.consumer.ack(token);
        } else {
            cons.unacked += 1;
            chan.unacked.insert(
                tag,
                Unacked {
                    cons: id,
                    token,
                    message: Arc::clone(&d.message),
                },
            );
        }
        frame::put_get_ok(
            &mut self.out,
            ch,
            tag,
            d.redelivered,
            ex.as_bytes(),
            rk.as_bytes(),
            remaining,
        );
        let props = convert::delivery_properties(&d.message.message);
        frame::put_content(
            &mut self.out,
            ch,
            &props,
            &d.message.message.body,
            self.frame_max,
        );
        self.shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn settle_or_buffer(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        ack: bool,
        requeue: bool,
    ) -> ChanResult {
        let chan = self.chan(ch);
        let known = (multiple && tag == 0)
            || chan.unacked.contains_key(&tag)
            || (multiple && chan.unacked.range(..=tag).next().is_some());
        if !known {
            return Err(chan_err(
                reply::PRECONDITION_FAILED,
                format!("unknown delivery tag {tag}"),
            ));
        }
        if let Some(ops) = chan.tx.as_mut() {
            ops.push(TxOp::Settle {
                tag,
                multiple,
                ack,
                requeue,
            });
            return Ok(());
        }
        self.settle(ch, tag, multiple, ack, requeue).await;
        Ok(())
    }

    async fn settle(&mut self, ch: u16, tag: u64, multiple: bool, ack: bool, requeue: bool) {
        let chan = self.chan(ch);
        let tags: Vec<u64> = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            chan.unacked.range(..=upto).map(|(t, _)| *t).collect()
        } else {
            vec![tag]
        };
        let mut dead = Vec::new();
        let shared = Arc::clone(&self.shared);
        for t in tags {
            let chan = self.chan(ch);
            let Some(u) = chan.unacked.remove(&t) else {
                continue;
            };
            let Some(cons) = chan.consumers.get_mut(&u.cons) else {
                continue;
            };
            cons.unacked = cons.unacked.saturating_sub(1);
            if ack {
                shared.stats.acked.fetch_add(1, Ordering::Relaxed);
                cons.consumer.ack(u.token);
            } else if requeue {
                cons.consumer.nack(u.token, true);
            } else {
                let q = Arc::clone(&cons.queue);
                // The same count as the core's ladder (and RabbitMQ's x-delivery-limit):
                // a message may fail `limit` times and is retried after each; the
                // failure after that ends the ladder. No limit: the configured ladder.
                let limit = q
                    .args
                    .delivery_limit
                    .unwrap_or(shared.broker.config().max_reconsume_times);
                let last_try = u.message.message.reconsume_times + 1 > limit;
                match (&q.args.dlx, q.args.retry) {
                    // A retry ladder runs in the core until its last step.
                    (_, Some(_)) if !last_try || q.args.dlx.is_none() => {
                        cons.consumer.nack(u.token, false)
                    }
                    // Settled only once the dead-letter copy is stored (below).
                    (Some(_), _) => dead.push((q, u.message, u.cons, u.token)),
                    (None, _) => cons.consumer.nack(u.token, false),
                }
            }
        }
        // The copy first, then the ack: a failed dead-letter write puts the message back
        // in its queue (redelivered), and a crash in between leaves it in both places,
        // never in neither.
        for (q, m, cons_id, token) in dead {
            let stored = dead_letter(&self.shared, &q, &m, DeathReason::Rejected).await;
            if let Some(cons) = self.chan(ch).consumers.get_mut(&cons_id) {
                if stored {
                    cons.consumer.ack(token);
                } else {
                    cons.consumer.nack(token, true);
                }
            }
        }
        self.reap_ended_consumers();
    }

    /// Drop cancelled consumers that hold nothing any more.
    fn reap_ended_consumers(&mut self) {
        for chan in self.channels.values_mut() {
            let done: Vec<u64> = chan
                .consumers
                .iter()
                .filter(|(_, c)| c.cancelled && c.unacked == 0)
                .map(|(id, _)| *id)
                .collect();
            for id in done {
                if let Some(c) = chan.consumers.remove(&id) {
                    if let Some(g) = c.stream_group {
                        let broker = self.shared.broker.clone();
                        drop(c.consumer);
                        tokio::spawn(async move {
                            let _ = broker.delete_group(&g).await;
                        });
                    }
                }
            }
        }
    }

    async fn on_tx(&mut self, ch: u16, m: tx::AMQPMethod) -> ChanResult {
        match m {
            tx::AMQPMethod::Select(_) => {
                let c = self.chan(ch);
                if c.confirm {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if c.tx.is_none() {
                    c.tx = Some(Vec::new());
                }
                self.reply(ch, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(ops) = self.chan(ch).tx.as_mut().map(std::mem::take) else {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                };
                // Publishes first, all in one store write; then the acks.
                let mut settles = Vec::new();
                for op in ops {
                    match op {
                        TxOp::Publish(c) => self.route(c).await?,
                        s => settles.push(s),
                    }
                }
                self.flush_batch()
                    .await
                    .map_err(|_| chan_err(reply::INTERNAL_ERROR, "store failed"))?;
                for s in settles {
                    if let TxOp::Settle {
                        tag,
                        multiple,
                        ack,
                        requeue,
                    } = s
                    {
                        self.settle(ch, tag, multiple, ack, requeue).await;
                    }
                }
                self.reply(ch, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(ops) = self.chan(ch).tx.as_mut() else {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                };
                ops.clear();
                self.reply(
                    ch,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
                Ok(())
            }
            _ => Err(chan_err(reply::COMMAND_INVALID, "not a client method")),
        }
    }

    // ------------------------------------------------------------------ publishing

    /// A publish's content is complete.
    async fn complete_publish(&mut self, ch: u16) -> Result<(), End> {
        let Some(p) = self.chan(ch).content.take() else {
            return Ok(());
        };
        let Some(header) = p.header else {
            return Ok(());
        };
        self.shared.stats.published.fetch_add(1, Ordering::Relaxed);
        self.published = true;
        let c = Completed {
            channel: ch,
            exchange: p.exchange,
            routing_key: p.routing_key,
            mandatory: p.mandatory,
            header,
            body: p.body.freeze(),
        };
        if let Some(ops) = self.chan(ch).tx.as_mut() {
            ops.push(TxOp::Publish(c));
            return Ok(());
        }
        match self.route(c).await {
            Ok(()) => Ok(()),
            Err(e) => self.channel_exception(ch, e, (60, 40)),
        }
    }

    /// Route a publish: returned if unroutable and mandatory, stored with the next batch
    /// otherwise (or as a timer on a delayed exchange).
    async fn route(&mut self, c: Completed) -> ChanResult {
        let ch = c.channel;
        self.can_write("exchange", &c.exchange)?;
        self.can_publish_topic(&c.exchange, &c.routing_key)?;
        let def = self.exchange_exists(&c.exchange)?;
        if def.internal {
            return Err(chan_err(
                reply::ACCESS_REFUSED,
                format!(
                    "cannot publish to internal exchange '{}' in vhost '{}'",
                    c.exchange, self.vhost
                ),
            ));
        }
        let seq = {
            let chan = self.chan(ch);
            chan.confirm.then(|| {
                chan.publish_seq += 1;
                chan.publish_seq
            })
        };
        let now = self.shared.broker.now();
        let headers = convert::header_values(&c.header.properties);
        let message = convert::to_message(
            &c.exchange,
            &c.routing_key,
            &c.header.properties,
            c.header.raw_properties.clone(),
            c.body.clone(),
            now,
        );
        let meta = self.shared.ex_meta(&self.vhost, &c.exchange);
        if meta.delayed {
            let delay = c
                .header
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-delay"))
                .and_then(convert::int_value)
                .filter(|d| *d > 0);
            if let Some(ms) = delay {
                self.flush_batch()
                    .await
                    .map_err(|_| chan_err(reply::INTERNAL_ERROR, "store failed"))?;
                let r = self
                    .shared
                    .broker
                    .publish_exchange(
                        &self.vhost,
                        &c.exchange,
                        &c.routing_key,
                        &headers,
                        message,
                        Some(Delay::For(Duration::from_millis(ms as u64))),
                    )
                    .await;
                if let Some(seq) = seq {
                    frame::put_confirm(&mut self.out, ch, seq, false, r.is_ok());
                }
                return r.map(|_| ()).map_err(internal);
            }
        }
        let routed = self
            .shared
            .broker
            .router()
            .route(&self.vhost, &c.exchange, &c.routing_key, &headers)
            .map_err(internal)?;
        if routed.topics.is_empty() {
            self.shared.stats.unroutable.fetch_add(1, Ordering::Relaxed);
            if c.mandatory {
                self.reply(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                        reply_code: reply::NO_ROUTE,
                        reply_text: "NO_ROUTE".into(),
                        exchange: c.exchange.as_str().into(),
                        routing_key: c.routing_key.as_str().into(),
                    })),
                );
                frame::put_content(
                    &mut self.out,
                    ch,
                    &c.header.raw_properties,
                    &c.body,
                    self.frame_max,
                );
            }
        }
        let limited: Vec<Arc<Queue>> = {
            let l = self.shared.limited.read();
            if l.is_empty() {
                Vec::new()
            } else {
                routed
                    .topics
                    .iter()
                    .filter_map(|t| l.get(t).cloned())
                    .collect()
            }
        };
        if limited.is_empty() {
            self.batch.push(Batched {
                channel: ch,
                seq,
                message,
                topics: routed.topics,
            });
            return Ok(());
        }
        // A queue with a length limit: count with everything published before stored.
        self.flush_batch()
            .await
            .map_err(|_| chan_err(reply::INTERNAL_ERROR, "store failed"))?;
        let mut topics = routed.topics;
        let mut rejected = false;
        let size = c.body.len() as u64;
        for q in &limited {
            if q.args.overflow == Some(Overflow::RejectPublish)
                && self.shared.is_full(q, size).await
            {
                topics.retain(|t| *t != q.topic);
                rejected = true;
            }
        }
        let stored = self
            .shared
            .broker
            .publish_routed_batch(vec![(message, topics)])
            .await;
        if let Some(seq) = seq {
            frame::put_confirm(&mut self.out, ch, seq, false, stored.is_ok() && !rejected);
        }
        stored.map_err(internal)?;
        for q in &limited {
            if q.args.overflow != Some(Overflow::RejectPublish) {
                self.shared.trim(q).await;
            }
        }
        Ok(())
    }

    /// Store the batched publishes in one write, then confirm them.
    async fn flush_batch(&mut self) -> Result<(), End> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        let mut confirms: Vec<(u16, u64)> = Vec::new();
        let mut items = Vec::with_capacity(batch.len());
        // Transient messages (delivery mode 1) are not worth an fsync, as in RabbitMQ; a
        // batch with one persistent message is synced whole.
        let mut transient = true;
        for b in batch {
            if let Some(seq) = b.seq {
                confirms.push((b.channel, seq));
            }
            transient &= props::get(&b.message.properties, convert::TRANSIENT).is_some();
            items.push((b.message, b.topics));
        }
        let stored = if transient {
            self.shared
                .broker
                .publish_routed_batch_transient(items)
                .await
        } else {
            self.shared.broker.publish_routed_batch(items).await
        };
        let ok = match stored {
            Ok(stored) => {
                let routed = stored.iter().filter(|p| p.is_some()).count();
                self.shared
                    .stats
                    .routed
                    .fetch_add(routed as u64, Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, error = %e, "AMQP: storing publishes failed; nacked");
                false
            }
        };
        // One confirm per channel, multiple=true up to its last sequence number.
        let mut last: Vec<(u16, u64)> = Vec::new();
        for (ch, seq) in confirms {
            match last.iter_mut().find(|(c, _)| *c == ch) {
                Some(e) => e.1 = seq,
                None => last.push((ch, seq)),
            }
        }
        for (ch, seq) in last {
            if self.channels.get(&ch).is_some_and(|c| !c.closing) {
                frame::put_confirm(&mut self.out, ch, seq, true, ok);
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ delivering

    fn deliver(&mut self, ch: u16, cid: u64, d: Delivery) {
        let frame_max = self.frame_max;
        let Some(chan) = self.channels.get_mut(&ch) else {
            return;
        };
        let Some(cons) = chan.consumers.get_mut(&cid) else {
            return;
        };
        if !screen(&self.shared, cons, &d) {
            return;
        }
        let token = d.ack_token();
        let m = &d.message.message;
        chan.next_tag += 1;
        let tag = chan.next_tag;
        let ex = props::get(&m.properties, props::AMQP_EXCHANGE);
        let rk = props::get(&m.properties, props::AMQP_ROUTING_KEY);
        match (ex, rk) {
            (Some(ex), Some(rk)) => {
                frame::put_deliver(&mut self.out, ch, &cons.tag, tag, d.redelivered, ex, rk)
            }
            _ => {
                let (ex, rk) = convert::exchange_and_key(m);
                frame::put_deliver(
                    &mut self.out,
                    ch,
                    &cons.tag,
                    tag,
                    d.redelivered,
                    ex.as_bytes(),
                    rk.as_bytes(),
                );
            }
        }
        let props = convert::delivery_properties(m);
        frame::put_content(&mut self.out, ch, &props, &m.body, frame_max);
        if d.redelivered {
            self.shared
                .stats
                .redelivered
                .fetch_add(1, Ordering::Relaxed);
        }
        if cons.no_ack {
            self.shared.stats.acked.fetch_add(1, Ordering::Relaxed);
            cons.consumer.ack(token);
        } else {
            cons.unacked += 1;
            chan.unacked.insert(
                tag,
                Unacked {
                    cons: cid,
                    token,
                    message: Arc::clone(&d.message),
                },
            );
        }
        self.shared.stats.delivered.fetch_add(1, Ordering::Relaxed);
    }

    /// A consumer's group ended under it (its queue was deleted): RabbitMQ's
    /// basic.cancel from the server, for clients that understand it.
    fn consumer_ended(&mut self, ch: u16, cid: u64) {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return;
        };
        let Some(cons) = chan.consumers.remove(&cid) else {
            return;
        };
        chan.tags.remove(&cons.tag);
        chan.unacked.retain(|_, u| u.cons != cid);
        if let Some(k) = chan
            .gets
            .iter()
            .find(|(_, v)| **v == cid)
            .map(|(k, _)| k.clone())
        {
            chan.gets.remove(&k);
        }
        if !cons.get && !cons.cancelled && self.cancel_notify {
            frame::put_method(
                &mut self.out,
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: cons.tag.as_str().into(),
                    nowait: true,
                })),
            );
        }
    }

    /// The connection ends: exclusive queues go, consumers leave (their unacked
    /// messages go back to their queues).
    async fn finish(mut self, end: End) {
        match &end {
            End::Error(code, text, class, method) => {
                frame::put_method(&mut self.out, 0, close_method(*code, text, *class, *method));
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = self.wr.write_all(&self.out).await;
                    // Wait briefly for close-ok (or the client closing).
                    let mut scratch = [0u8; 512];
                    let _ = self.rd.read(&mut scratch).await;
                })
                .await;
            }
            End::ClientClosed => {
                let _ = self.wr.write_all(&self.out).await;
            }
            End::Closed => {}
        }
        let _ = self.wr.shutdown().await;
        let chans: Vec<Channel> = self.channels.drain().map(|(_, c)| c).collect();
        self.shared
            .stats
            .channels
            .fetch_sub(chans.len() as u64, Ordering::Relaxed);
        for c in chans {
            self.close_channel_state(c);
        }
        for q in std::mem::take(&mut self.exclusive) {
            self.shared.delete_queue(&q).await;
        }
    }
}

/// The next delivery from any consumer allowed to receive one; `None` for a consumer
/// whose group ended (its queue was deleted).
async fn poll_deliveries(channels: &mut HashMap<u16, Channel>) -> (u16, u64, Option<Delivery>) {
    poll_fn(|cx| {
        for (ch, c) in channels.iter_mut() {
            if c.closing || c.flow_paused {
                continue;
            }
            if c.global_prefetch > 0 && c.unacked.len() >= c.global_prefetch as usize {
                continue;
            }
            for (id, cons) in c.consumers.iter_mut() {
                if cons.get || cons.cancelled {
                    continue;
                }
                if let Poll::Ready(d) = cons.consumer.poll_recv(cx) {
                    return Poll::Ready((*ch, *id, d));
                }
            }
        }
        Poll::Pending
    })
    .await
}

fn try_deliveries(channels: &mut HashMap<u16, Channel>) -> Option<(u16, u64, Option<Delivery>)> {
    for (ch, c) in channels.iter_mut() {
        if c.closing || c.flow_paused {
            continue;
        }
        if c.global_prefetch > 0 && c.unacked.len() >= c.global_prefetch as usize {
            continue;
        }
        for (id, cons) in c.consumers.iter_mut() {
            if cons.get || cons.cancelled {
                continue;
            }
            if let Some(d) = cons.consumer.try_recv() {
                return Some((*ch, *id, Some(d)));
            }
        }
    }
    None
}

/// Whether a delivery goes to the client. Transient messages stored before this broker
/// started, expired messages (queue TTL, per-message expiration) and messages past the
/// queue's delivery limit are settled here instead (and dead-lettered when the queue has
/// a dead-letter exchange).
fn screen(shared: &Arc<Shared>, cons: &Cons, d: &Delivery) -> bool {
    let m = &d.message.message;
    if d.message.store_timestamp < shared.boot
        && props::get(&m.properties, convert::TRANSIENT).is_some()
    {
        cons.consumer.ack(d.ack_token());
        return false;
    }
    let q = &cons.queue;
    let now = shared.broker.now();
    let expired = props::get_u64(&m.properties, props::EXPIRES_AT).is_some_and(|at| at <= now)
        || q.args
            .message_ttl
            .is_some_and(|ttl| d.message.store_timestamp + ttl <= now);
    let over_limit = q.args.retry.is_none()
        && q.args
            .delivery_limit
            .is_some_and(|l| d.delivery_count.saturating_sub(1) > l);
    if !(expired || over_limit) {
        return true;
    }
    cons.consumer.ack(d.ack_token());
    if q.args.dlx.is_some() {
        let why = if expired {
            DeathReason::Expired
        } else {
            DeathReason::DeliveryLimit
        };
        let shared = Arc::clone(shared);
        let q = Arc::clone(q);
        let msg = Arc::clone(&d.message);
        tokio::spawn(async move {
            // Expired or over its limit at delivery: settled before the copy is
            // stored, so a failed write still loses it (this policy moves into the
            // core, with the copy and the settlement in one batch, in issue 12).
            let _ = dead_letter(&shared, &q, &msg, why).await;
        });
    }
    false
}

/// Republish a message to its queue's dead-letter exchange. `false` when the copy could
/// not be stored (the caller keeps the message); a dead-letter exchange that does not
/// exist drops it, as RabbitMQ does.
async fn dead_letter(shared: &Shared, q: &Queue, m: &StoredMessage, why: DeathReason) -> bool {
    let Some(dlx) = &q.args.dlx else { return true };
    let now = shared.broker.now();
    let (msg, key) = convert::dead_letter(m, &q.name, why, dlx, q.args.dlrk.as_deref(), now);
    match shared
        .broker
        .publish_exchange(&q.vhost, dlx, &key, &[], msg, None)
        .await
    {
        Ok(_) => true,
        Err(mqgate_core::CoreError::NoSuchExchange(_)) => {
            tracing::info!(queue = %q.name, dlx = %dlx, "AMQP: dead-letter exchange does not exist; message dropped");
            true
        }
        Err(e) => {
            tracing::warn!(queue = %q.name, dlx = %dlx, error = %e, "AMQP: dead-lettering failed; the message stays in its queue");
            false
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

//! One MQTT connection: the CONNECT handshake, then one task that reads packets, pulls
//! deliveries from the session's consumers and writes, without ever blocking on a slow
//! peer (writes are polled like reads; deliveries pause while output is backed up).

use std::collections::{HashMap, HashSet};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqgate_core::acl::{Access, Subject};
use mqgate_core::router::{amqp_to_mqtt, Binding, Destination, DEFAULT_VHOST};
use mqgate_core::{
    props, AckToken, ConsumeMode, Consumer, Delay, Delivery, GroupSpec, MemberOptions, OnFailure,
    StartPosition,
};
use mqgate_store::{Message, TopicName, WriteBatch};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::codec::{
    self, reason, Ack, AckKind, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties,
    Publish, QoS, SubAck, SubOptions, Subscribe, UnsubAck, Unsubscribe, Version, Will,
};
use crate::server::{ClientSlot, Outbound, PendingWill, Shared, MQTT_EXCHANGE};
use crate::session::{
    session_group, session_topic, shared_topic, SessionRecord, Subscription, NS_SESSION,
};
use crate::topic;

/// Output beyond this stops pulling deliveries until the socket drains.
const OUT_HIGH_WATER: usize = 256 * 1024;
/// Output beyond this stops reading too (a client that floods without reading).
const OUT_HARD_LIMIT: usize = 4 * 1024 * 1024;
/// The smallest and largest room given to one socket read.
const MIN_READ: usize = 2 * 1024;
const MAX_READ: usize = 64 * 1024;

/// Deliveries handled per wake-up before the loop looks at the socket again.
const DELIVERY_BURST: usize = 256;

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// DISCONNECT from the client; `will`: 5.0 reason 0x04 asked for the will.
    Client { will: bool },
    /// The socket closed or failed.
    Closed,
    /// The server ends it with a reason code (5.0 gets a DISCONNECT).
    Server(u8, String),
}

/// Where an in-flight delivery came from, so its ack reaches the right place.
#[derive(Debug)]
enum Source {
    Session(AckToken),
    Shared(u32, AckToken),
    Retained,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[allow(clippy::enum_variant_names)]
enum Stage {
    /// QoS 1 sent, PUBACK awaited.
    PubAck,
    /// QoS 2 sent, PUBREC awaited.
    PubRec,
    /// PUBREL sent, PUBCOMP awaited.
    PubComp,
}

#[derive(Debug)]
struct Inflight {
    source: Option<Source>,
    stage: Stage,
}

#[derive(Debug)]
struct SharedSub {
    filter: String,
    options: SubOptions,
    id: Option<u32>,
    consumer: Consumer,
}

/// The connection's state after CONNECT.
struct Conn<S> {
    shared: Arc<Shared>,
    peer: SocketAddr,
    rd: ReadHalf<S>,
    wr: WriteHalf<S>,
    inbuf: BytesMut,
    out: BytesMut,
    version: Version,
    client_id: String,
    user: Option<String>,
    conn_id: u64,
    keep_alive: Option<Duration>,
    last_read: Instant,
    record: SessionRecord,
    /// Filter → its place in `record.subscriptions`, so a SUBSCRIBE or UNSUBSCRIBE
    /// costs each filter O(1), however many the session holds.
    sub_index: HashMap<String, usize>,
    session: Option<Consumer>,
    shared_subs: HashMap<u32, SharedSub>,
    next_shared: u32,
    direct_rx: crate::qos0::Qos0Rx,
    kick_rx: mpsc::UnboundedReceiver<u8>,
    done_tx: watch::Sender<bool>,
    will: Option<Will>,
    inflight: HashMap<u16, Inflight>,
    next_pkid: u16,
    send_quota: usize,
    client_max_packet: usize,
    client_alias_max: u16,
    aliases_out: HashMap<String, u16>,
    aliases_in: HashMap<u16, String>,
    inbound_qos2: HashSet<u16>,
    problem_info: bool,
    /// It has published: the memory watermark stops reading from it.
    published: bool,
    /// Retained messages still to send for new subscriptions, sent as the output buffer
    /// drains; the session's other deliveries wait behind them.
    retained_todo: std::collections::VecDeque<crate::retained::Pending>,
    /// Whether the access rules can deny this client a message: each delivery's topic
    /// is checked then (no cost per message otherwise).
    check_reads: bool,
    /// How much room the next read gets: grows while reads fill it, shrinks while
    /// they do not, so an idle connection holds a small buffer.
    read_hint: usize,
}

impl<S> std::fmt::Debug for Conn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("client_id", &self.client_id)
            .field("peer", &self.peer)
            .finish()
    }
}

/// Serve one connection to its end.
pub(crate) async fn run<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    pending: mqgate_core::net::Pending,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    shared
        .stats
        .connections_opened
        .fetch_add(1, Ordering::Relaxed);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut inbuf = BytesMut::with_capacity(1024);
    let evicted = pending.eviction();
    let read = tokio::select! {
        c = read_connect(&shared, &mut rd, &mut wr, &mut inbuf, peer) => c,
        // A newer connection needed the slot (limits.max_pending_handshakes): closed.
        () = evicted.wait() => None,
    };
    let connect = match read {
        Some(c) => c,
        None => {
            shared
                .stats
                .connections_closed
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    // `_admitted` counts it against limits.max_connections until it ends.
    if let Some((mut conn, _admitted)) =
        accept(shared.clone(), rd, wr, inbuf, peer, *connect, pending).await
    {
        let end = conn.serve().await;
        conn.finish(end).await;
    }
    shared
        .stats
        .connections_closed
        .fetch_add(1, Ordering::Relaxed);
}

/// Read the first packet, which must be CONNECT. Anything else closes the connection.
async fn read_connect<S: AsyncRead + AsyncWrite>(
    shared: &Shared,
    rd: &mut ReadHalf<S>,
    wr: &mut WriteHalf<S>,
    inbuf: &mut BytesMut,
    peer: SocketAddr,
) -> Option<Box<Connect>> {
    let deadline = Instant::now() + shared.cfg.connect_timeout;
    // Before login a client may make the broker hold at most this much.
    let max = shared.cfg.max_connect_size.min(shared.cfg.max_packet_size);
    loop {
        match codec::decode(inbuf, None, max) {
            Ok(Some(Packet::Connect(c))) => return Some(c),
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
/// answer CONNACK. `None` when the client was refused.
async fn accept<S>(
    shared: Arc<Shared>,
    rd: ReadHalf<S>,
    mut wr: WriteHalf<S>,
    inbuf: BytesMut,
    peer: SocketAddr,
    c: Connect,
    pending: mqgate_core::net::Pending,
) -> Option<(Conn<S>, mqgate_core::net::Admitted)>
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
            let delay = shared
                .broker
                .login_throttle()
                .failed(peer.ip(), c.username.as_deref());
            tokio::time::sleep(delay).await;
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
    if let Some(w) = &c.will {
        let who = Subject {
            user: c.username.as_deref(),
            client_id: Some(&client_id),
        };
        if !shared.acl.check_topic(who, Access::Publish, &w.topic) {
            refuse!(5, reason::NOT_AUTHORIZED, "will topic not allowed");
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
    let (kick_tx, kick_rx) = mpsc::unbounded_channel();
    let (done_tx, done_rx) = watch::channel(false);
    let previous = shared.clients.lock().insert(
        client_id.clone(),
        ClientSlot {
            conn: conn_id,
            kick: kick_tx,
            done: done_rx,
            info: mqgate_core::ConnectionInfo {
                id: client_id.clone(),
                protocol: "mqtt",
                peer: peer.to_string(),
                user: c.username.clone(),
                detail: format!("{:?}", c.version),
                connected_at: shared.now(),
            },
        },
    );
    if let Some(prev) = previous {
        tracing::info!(%peer, client = %client_id, "MQTT: session taken over by a new connection");
        let _ = prev.kick.send(reason::SESSION_TAKEN_OVER);
        let mut done = prev.done;
        let _ = tokio::time::timeout(Duration::from_secs(10), done.wait_for(|d| *d)).await;
    }
    // A will waiting for its delay is cancelled by the client's return.
    let pending = shared.wills.lock().remove(&client_id);
    if let Some(w) = pending {
        w.task.abort();
    }
    shared.expiring.lock().remove(&client_id);

    let store = Arc::clone(shared.broker.store());
    let existing = match store.kv_get(NS_SESSION, client_id.as_bytes()).await {
        Ok(v) => v.and_then(SessionRecord::decode),
        Err(e) => {
            tracing::error!(client = %client_id, error = %e, "MQTT: reading the session failed");
            shared.clients.lock().remove(&client_id);
            let _ = done_tx.send(true);
            refuse!(3, reason::SERVER_UNAVAILABLE, "store unavailable");
        }
    };
    let topic_name = session_topic(&client_id);
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
            if shared.broker.store().topic(&topic_name).is_some() {
                shared.destroy_session(&client_id, None).await;
            }
            false
        }
    };
    if let Err(e) = shared.broker.create_topic(&topic_name, Some(1)).await {
        tracing::error!(client = %client_id, error = %e, "MQTT: creating the session topic failed");
        shared.clients.lock().remove(&client_id);
        let _ = done_tx.send(true);
        refuse!(3, reason::SERVER_UNAVAILABLE, "store unavailable");
    }
    let client_recv_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
    let send_quota = usize::from(client_recv_max.min(cfg.max_inflight)).max(1);
    let session_consumer = shared
        .broker
        .subscribe(
            GroupSpec {
                start: StartPosition::First,
                on_failure: OnFailure::Discard,
                ..GroupSpec::new(
                    session_group(&client_id),
                    vec![topic_name.clone()],
                    ConsumeMode::Shared,
                )
            },
            MemberOptions::new(client_id.clone(), send_quota),
        )
        .await;
    let session_consumer = match session_consumer {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(client = %client_id, error = %e, "MQTT: joining the session group failed");
            shared.clients.lock().remove(&client_id);
            let _ = done_tx.send(true);
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
        rd,
        wr,
        inbuf,
        out: BytesMut::new(),
        read_hint: MIN_READ,
        version: c.version,
        client_id,
        user: c.username.clone(),
        conn_id,
        keep_alive: (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500)),
        last_read: Instant::now(),
        record,
        sub_index: HashMap::new(),
        session: Some(session_consumer),
        shared_subs: HashMap::new(),
        next_shared: 1,
        direct_rx,
        kick_rx,
        done_tx,
        will: c.will,
        inflight: HashMap::new(),
        next_pkid: 1,
        send_quota,
        client_max_packet: c
            .properties
            .maximum_packet_size
            .map_or(usize::MAX, |m| m as usize),
        client_alias_max: c.properties.topic_alias_maximum.unwrap_or(0),
        aliases_out: HashMap::new(),
        aliases_in: HashMap::new(),
        inbound_qos2: HashSet::new(),
        problem_info: c.properties.request_problem_info != Some(0),
        published: false,
        retained_todo: std::collections::VecDeque::new(),
        check_reads: false,
    };
    conn.check_reads = shared.acl.may_deny(conn.subject(), Access::Subscribe);
    conn.inbound_qos2 = conn.record.inbound_qos2.iter().copied().collect();
    conn.sub_index = conn
        .record
        .subscriptions
        .iter()
        .enumerate()
        .map(|(i, s)| (s.filter.clone(), i))
        .collect();
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
    if conn.persistent() {
        conn.save_record().await;
    }
    tracing::debug!(%peer, client = %conn.client_id, ?conn.version, session_present, "MQTT: connected");
    Some((conn, admitted))
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    fn v5(&self) -> bool {
        self.version.is_v5()
    }

    /// Who the access rules see.
    fn subject(&self) -> Subject<'_> {
        Subject {
            user: self.user.as_deref(),
            client_id: Some(&self.client_id),
        }
    }

    /// Whether the access rules let this client read a message published to `topic`
    /// (checked on every delivery: a subscription such as `#` may be granted while some
    /// of the topics it matches are denied).
    fn may_read(&self, topic: &str) -> bool {
        if !self.check_reads
            || self
                .shared
                .acl
                .check_topic(self.subject(), Access::Subscribe, topic)
        {
            return true;
        }
        tracing::debug!(client = %self.client_id, %topic, "MQTT: delivery not authorized; skipped");
        false
    }

    fn persistent(&self) -> bool {
        self.record.expiry > 0
    }

    fn send(&mut self, p: &Packet) {
        codec::encode(p, self.version, &mut self.out);
    }

    /// The connection's main loop.
    async fn serve(&mut self) -> End {
        let mut shutdown = self.shared.shutdown.subscribe();
        if *shutdown.borrow() {
            return End::Server(reason::SERVER_SHUTTING_DOWN, "server shutting down".into());
        }
        // Packets sent right behind CONNECT, in the same read.
        if !self.inbuf.is_empty() {
            if let Err(end) = self.handle_input().await {
                return end;
            }
        }
        // Above the memory watermark a connection that publishes is not read (MQTT has
        // no blocked packet: TCP pushes back on the client) and its keep alive waits.
        let mut blocked = self.shared.broker.memory_blocked();
        loop {
            let window_open = self.inflight.len() < self.send_quota;
            let may_deliver = self.out.len() < OUT_HIGH_WATER;
            let held = self.published && *blocked.borrow_and_update();
            let retained_first = !self.retained_todo.is_empty();
            let may_read = self.out.len() < OUT_HARD_LIMIT && !held;
            let ka_deadline = (!held)
                .then(|| self.keep_alive.map(|k| self.last_read + k))
                .flatten();
            let has_out = !self.out.is_empty();
            if self.inbuf.capacity() - self.inbuf.len() < MIN_READ / 2 {
                self.inbuf.reserve(self.read_hint);
            }
            tokio::select! {
                biased;
                _ = blocked.changed() => {
                    self.last_read = Instant::now();
                }
                r = self.kick_rx.recv() => {
                    let code = r.unwrap_or(reason::SESSION_TAKEN_OVER);
                    let why = if code == ADMINISTRATIVE_ACTION {
                        "closed by an administrator"
                    } else {
                        "session taken over"
                    };
                    return End::Server(code, why.into());
                }
                _ = shutdown.changed() => {
                    return End::Server(reason::SERVER_SHUTTING_DOWN, "server shutting down".into());
                }
                w = self.wr.write(&self.out), if has_out => match w {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => {
                        self.shared.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                        bytes::Buf::advance(&mut self.out, n);
                        // Give back a buffer a burst made big.
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
                _ = std::future::ready(()), if retained_first && may_deliver && window_open => {
                    self.send_retained().await;
                }
                m = self.direct_rx.recv(), if may_deliver && !retained_first => {
                    if let Some(m) = m {
                        self.deliver_direct(&m);
                        self.deliver_burst();
                    }
                }
                d = poll_deliveries(&mut self.session, &mut self.shared_subs), if may_deliver && window_open && !retained_first => {
                    let (src, d) = d;
                    self.deliver(src, d);
                    self.deliver_burst();
                }
                _ = sleep_until_opt(ka_deadline) => {
                    return End::Server(reason::KEEP_ALIVE_TIMEOUT, "keep alive timeout".into());
                }
            }
        }
    }

    /// Deliver what is ready now (direct QoS 0 and the consumers), up to a burst each,
    /// within the client's window and the output high-water mark.
    fn deliver_burst(&mut self) {
        if !self.retained_todo.is_empty() {
            // Retained messages of new subscriptions go first.
            return;
        }
        for _ in 0..DELIVERY_BURST {
            if self.out.len() >= OUT_HIGH_WATER {
                break;
            }
            match self.direct_rx.try_recv() {
                Some(m) => self.deliver_direct(&m),
                None => break,
            }
        }
        for _ in 0..DELIVERY_BURST {
            if self.inflight.len() >= self.send_quota || self.out.len() >= OUT_HIGH_WATER {
                break;
            }
            match try_deliveries(&mut self.session, &mut self.shared_subs) {
                Some((src, d)) => self.deliver(src, d),
                None => break,
            }
        }
    }

    /// Send retained messages of new subscriptions until the output buffer or the
    /// client's window is full; bodies not in the retained cache are read from the store.
    async fn send_retained(&mut self) {
        let store = Arc::clone(self.shared.broker.store());
        let now = self.shared.now();
        while self.out.len() < OUT_HIGH_WATER && self.inflight.len() < self.send_quota {
            let Some(mut pending) = self.retained_todo.pop_front() else {
                return;
            };
            let Some((topic, entry)) = pending.next(&self.shared.retained, now) else {
                continue;
            };
            if let Some(m) = self.shared.retained.body(&*store, &topic, entry).await {
                self.deliver_retained(&topic, &m, &pending.sub);
            }
            self.retained_todo.push_front(pending);
        }
    }

    /// Decode and handle every whole packet in the input buffer. Publishes read together
    /// are stored together (one write), then acknowledged in order.
    async fn handle_input(&mut self) -> Result<(), End> {
        let max = self.shared.cfg.max_packet_size;
        let mut batch: Vec<(Outbound, u16, QoS)> = Vec::new();
        let result = loop {
            let packet = match codec::decode(&mut self.inbuf, Some(self.version), max) {
                Ok(Some(p)) => p,
                Ok(None) => break Ok(()),
                Err(e) => break Err(self.protocol_error(e.reason_code(), &e.to_string())),
            };
            match packet {
                Packet::Publish(p) => {
                    if let Err(end) = self.on_publish(p, &mut batch) {
                        break Err(end);
                    }
                }
                other => {
                    // Keep order: what was published before this packet is stored first.
                    if !batch.is_empty() {
                        self.flush_publishes(std::mem::take(&mut batch)).await?;
                    }
                    if let Err(end) = self.on_packet(other).await {
                        break Err(end);
                    }
                }
            }
        };
        if !batch.is_empty() {
            self.flush_publishes(batch).await?;
        }
        result
    }

    fn protocol_error(&self, code: u8, why: &str) -> End {
        self.shared
            .stats
            .protocol_errors
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(client = %self.client_id, peer = %self.peer, reason_code = code, why, "MQTT: protocol violation; connection closed");
        End::Server(code, why.to_owned())
    }

    fn on_publish(
        &mut self,
        mut p: Publish,
        batch: &mut Vec<(Outbound, u16, QoS)>,
    ) -> Result<(), End> {
        self.published = true;
        self.shared
            .stats
            .publishes_in
            .fetch_add(1, Ordering::Relaxed);
        // Topic alias (5.0).
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias == 0 || alias > self.shared.cfg.topic_alias_maximum {
                return Err(
                    self.protocol_error(reason::TOPIC_ALIAS_INVALID, "topic alias out of range")
                );
            }
            if p.topic.is_empty() {
                match self.aliases_in.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(
                            self.protocol_error(reason::PROTOCOL_ERROR, "unknown topic alias")
                        )
                    }
                }
            } else {
                self.aliases_in.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            return Err(self.protocol_error(reason::TOPIC_NAME_INVALID, "empty topic name"));
        }
        if p.qos != QoS::AtMostOnce {
            let pending =
                self.inbound_qos2.len() + batch.iter().filter(|b| b.2 != QoS::AtMostOnce).count();
            if pending >= usize::from(self.shared.cfg.receive_maximum) {
                return Err(self
                    .protocol_error(reason::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded"));
            }
        }
        if p.properties.payload_format == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            return Err(self.protocol_error(reason::PAYLOAD_FORMAT_INVALID, "payload is not UTF-8"));
        }
        // A QoS 2 packet id already received and not released: a duplicate.
        if p.qos == QoS::ExactlyOnce && self.inbound_qos2.contains(&p.pkid) {
            self.ack(AckKind::PubRec, p.pkid, reason::SUCCESS);
            return Ok(());
        }
        // `$delayed/<seconds>/<topic>` and the x-delay / x-deliver-at user properties.
        let mut delay = None;
        let mut topic_name = p.topic.clone();
        match topic::parse_delayed(&p.topic) {
            Ok(Some((secs, t))) => {
                delay = Some(Delay::For(Duration::from_secs(secs)));
                topic_name = t.to_owned();
            }
            Ok(None) => {}
            Err(topic::BadForm) => {
                return Err(self.protocol_error(reason::TOPIC_NAME_INVALID, "bad $delayed topic"))
            }
        }
        for (k, v) in &p.properties.user {
            match k.as_str() {
                "x-delay" => {
                    if let Ok(ms) = v.trim().parse::<u64>() {
                        delay = Some(Delay::For(Duration::from_millis(ms)));
                    }
                }
                "x-deliver-at" => {
                    if let Ok(at) = v.trim().parse::<u64>() {
                        delay = Some(Delay::At(at));
                    }
                }
                _ => {}
            }
        }
        if !self
            .shared
            .acl
            .check_topic(self.subject(), Access::Publish, &topic_name)
        {
            tracing::info!(client = %self.client_id, topic = %topic_name, "MQTT: publish not authorized; dropped");
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.ack(AckKind::PubAck, p.pkid, reason::NOT_AUTHORIZED),
                QoS::ExactlyOnce => self.ack(AckKind::PubRec, p.pkid, reason::NOT_AUTHORIZED),
            }
            return Ok(());
        }
        let message = self.to_message(&topic_name, p.qos, p.retain, p.payload, &p.properties);
        batch.push((
            Outbound {
                topic: topic_name,
                qos: p.qos,
                retain: p.retain,
                message,
                delay,
            },
            p.pkid,
            p.qos,
        ));
        Ok(())
    }

    fn to_message(
        &self,
        topic: &str,
        qos: QoS,
        retain: bool,
        payload: Bytes,
        pp: &Properties,
    ) -> Message {
        let name = TopicName::new(topic).unwrap_or_else(|_| TopicName::new("?").expect("valid"));
        // Copy the payload out of the read buffer, so the buffer is not kept alive.
        let mut m = Message::new(name, Bytes::copy_from_slice(&payload));
        m.born_timestamp = self.shared.now();
        m.producer_group = "mqtt".into();
        let p = &mut m.properties;
        const QOS_BYTES: [&[u8]; 3] = [&[0], &[1], &[2]];
        p.push((
            props::MQTT_QOS.into(),
            Bytes::from_static(QOS_BYTES[qos as usize]),
        ));
        if retain {
            p.push((props::MQTT_RETAIN.into(), Bytes::from_static(&[1])));
        }
        p.push((
            props::MQTT_FROM.into(),
            Bytes::copy_from_slice(self.client_id.as_bytes()),
        ));
        if let Some(f) = pp.payload_format {
            p.push((props::PAYLOAD_FORMAT.into(), Bytes::copy_from_slice(&[f])));
        }
        if let Some(e) = pp.message_expiry {
            let at = m.born_timestamp + u64::from(e) * 1000;
            p.push((
                props::EXPIRES_AT.into(),
                Bytes::copy_from_slice(&at.to_be_bytes()),
            ));
        }
        if let Some(ct) = &pp.content_type {
            p.push((
                props::CONTENT_TYPE.into(),
                Bytes::copy_from_slice(ct.as_bytes()),
            ));
        }
        if let Some(rt) = &pp.response_topic {
            p.push((
                props::REPLY_TO.into(),
                Bytes::copy_from_slice(rt.as_bytes()),
            ));
        }
        if let Some(cd) = &pp.correlation_data {
            p.push((props::CORRELATION_ID.into(), cd.clone()));
        }
        for (k, v) in &pp.user {
            p.push((
                format!("{}{k}", props::USER_PREFIX),
                Bytes::copy_from_slice(v.as_bytes()),
            ));
        }
        m
    }

    /// Store a batch of publishes, then acknowledge each.
    async fn flush_publishes(&mut self, batch: Vec<(Outbound, u16, QoS)>) -> Result<(), End> {
        let mut acks = Vec::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
        for (o, pkid, qos) in batch {
            acks.push((pkid, qos));
            items.push(o);
        }
        let own = session_topic(&self.client_id);
        let matched = match self.shared.publish_batch(items, Some(&own)).await {
            Ok(m) => m,
            Err(e) if self.v5() => {
                // 5.0 says which messages failed: PUBACK / PUBREC 0x80 for each (a
                // PUBREC >= 0x80 ends that QoS 2 flow), and the connection goes on; the
                // client may publish them again (the store recovers by itself).
                tracing::warn!(client = %self.client_id, error = %e, "MQTT: storing publishes failed; answered 0x80");
                for (pkid, qos) in acks {
                    match qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => {
                            self.ack(AckKind::PubAck, pkid, reason::UNSPECIFIED_ERROR)
                        }
                        QoS::ExactlyOnce => {
                            self.ack(AckKind::PubRec, pkid, reason::UNSPECIFIED_ERROR)
                        }
                    }
                }
                return Ok(());
            }
            Err(e) => {
                tracing::error!(client = %self.client_id, error = %e, "MQTT: storing publishes failed");
                // 3.1.1 has no failure code: nothing is acknowledged and the connection
                // closes; the client resends after reconnecting.
                return Err(End::Server(
                    reason::UNSPECIFIED_ERROR,
                    "store failure".into(),
                ));
            }
        };
        let mut qos2_added = false;
        for ((pkid, qos), matched) in acks.into_iter().zip(matched) {
            let counter = if matched {
                &self.shared.stats.routed
            } else {
                &self.shared.stats.unroutable
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let code = if matched || !self.v5() {
                reason::SUCCESS
            } else {
                reason::NO_MATCHING_SUBSCRIBERS
            };
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.ack(AckKind::PubAck, pkid, code),
                QoS::ExactlyOnce => {
                    self.inbound_qos2.insert(pkid);
                    qos2_added = true;
                    self.ack(AckKind::PubRec, pkid, code)
                }
            }
        }
        if qos2_added && self.persistent() {
            self.save_record().await;
        }
        Ok(())
    }

    fn ack(&mut self, kind: AckKind, pkid: u16, code: u8) {
        let mut properties = Properties::default();
        if code >= 0x80 && self.v5() && self.problem_info {
            properties.reason_string = Some(reason_text(code).to_owned());
        }
        self.send(&Packet::Ack(Ack {
            kind,
            pkid,
            reason: code,
            properties,
        }));
    }

    async fn on_packet(&mut self, packet: Packet) -> Result<(), End> {
        match packet {
            Packet::PingReq => self.send(&Packet::PingResp),
            Packet::Ack(a) => self.on_ack(a).await?,
            Packet::Subscribe(s) => self.on_subscribe(s).await?,
            Packet::Unsubscribe(u) => self.on_unsubscribe(u).await,
            Packet::Disconnect(d) => {
                if let Some(e) = d.properties.session_expiry {
                    if self.record.expiry == 0 && e > 0 {
                        return Err(self.protocol_error(
                            reason::PROTOCOL_ERROR,
                            "session expiry set at DISCONNECT after 0 at CONNECT",
                        ));
                    }
                    self.record.expiry = e.min(self.shared.cfg.max_session_expiry);
                }
                return Err(End::Client {
                    will: d.reason == reason::DISCONNECT_WITH_WILL,
                });
            }
            Packet::Connect(_) => {
                return Err(self.protocol_error(reason::PROTOCOL_ERROR, "second CONNECT"))
            }
            Packet::Auth(_) => {
                return Err(self.protocol_error(
                    reason::PROTOCOL_ERROR,
                    "AUTH without an authentication method",
                ))
            }
            other => {
                return Err(self.protocol_error(
                    reason::PROTOCOL_ERROR,
                    &format!("{} sent by a client", other.name()),
                ));
            }
        }
        Ok(())
    }

    async fn on_ack(&mut self, a: Ack) -> Result<(), End> {
        match a.kind {
            AckKind::PubRel => {
                let known = self.inbound_qos2.remove(&a.pkid);
                let code = if known || !self.v5() {
                    reason::SUCCESS
                } else {
                    reason::PACKET_ID_NOT_FOUND
                };
                self.ack(AckKind::PubComp, a.pkid, code);
                if known && self.persistent() {
                    self.record.inbound_qos2 = self.inbound_qos2.iter().copied().collect();
                }
            }
            AckKind::PubAck | AckKind::PubRec => {
                let want = if a.kind == AckKind::PubAck {
                    Stage::PubAck
                } else {
                    Stage::PubRec
                };
                match self.inflight.get(&a.pkid) {
                    Some(f) if f.stage == want => {}
                    // An ack for nothing in flight (a resend after our restart): ignore.
                    _ => return Ok(()),
                }
                let f = self.inflight.remove(&a.pkid).expect("checked");
                let failed = a.reason >= 0x80;
                if let Some(src) = f.source {
                    self.settle(src, failed);
                }
                if a.kind == AckKind::PubRec && !failed {
                    self.inflight.insert(
                        a.pkid,
                        Inflight {
                            source: None,
                            stage: Stage::PubComp,
                        },
                    );
                    self.ack(AckKind::PubRel, a.pkid, reason::SUCCESS);
                    if self.persistent() {
                        self.record.pubrel.push(a.pkid);
                    }
                }
            }
            AckKind::PubComp => {
                if let Some(f) = self.inflight.get(&a.pkid) {
                    if f.stage == Stage::PubComp {
                        self.inflight.remove(&a.pkid);
                        self.record.pubrel.retain(|p| *p != a.pkid);
                    }
                }
            }
        }
        Ok(())
    }

    /// Settle a delivery with the group it came from. A failed consumption (5.0 reason
    /// >= 0x80) of a shared subscription goes through the group's retry ladder.
    fn settle(&mut self, src: Source, failed: bool) {
        if !failed {
            self.shared.stats.acked.fetch_add(1, Ordering::Relaxed);
        }
        match src {
            Source::Session(t) => {
                if let Some(c) = &self.session {
                    c.ack(t);
                }
            }
            Source::Shared(id, t) => {
                if let Some(s) = self.shared_subs.get(&id) {
                    if failed {
                        s.consumer.nack(t, false);
                    } else {
                        s.consumer.ack(t);
                    }
                }
            }
            Source::Retained => {}
        }
    }

    async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let v5 = self.v5();
        let quota = if v5 { reason::QUOTA_EXCEEDED } else { 0x80 };
        let max_filters = self.shared.cfg.max_filters_per_subscribe;
        if max_filters > 0 && s.filters.len() > max_filters {
            // Refused whole: a SUBACK still answers every filter (MQTT-3.8.4-5/6), none
            // is subscribed, and the connection stays up.
            tracing::warn!(
                client = %self.client_id,
                filters = s.filters.len(),
                max = max_filters,
                "MQTT: SUBSCRIBE refused: more filters than limits.mqtt_max_filters_per_subscribe"
            );
            self.send(&Packet::SubAck(SubAck {
                pkid: s.pkid,
                properties: Properties::default(),
                codes: vec![quota; s.filters.len()],
            }));
            return Ok(());
        }
        let max_subs = self.shared.cfg.max_subscriptions_per_session;
        let sub_id = s.properties.subscription_ids.first().copied();
        let stream_offset = s
            .properties
            .user
            .iter()
            .find(|(k, _)| k == "x-stream-offset")
            .map(|(_, v)| v.clone());
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained_to_send = Vec::new();
        // Plain subscriptions are bound together after the loop (one router update,
        // one store write): (place in `codes`, subscription, existed before).
        let mut plain: Vec<(usize, Subscription, bool)> = Vec::new();
        // Plain filters this packet adds (not yet in the record).
        let mut adding: HashSet<String> = HashSet::new();
        let mut over_quota = 0usize;
        for (filter, opts) in s.filters {
            let shared = topic::parse_shared(&filter);
            let inner = match &shared {
                Ok(Some((_, f))) => *f,
                Ok(None) => filter.as_str(),
                Err(topic::BadForm) => "",
            };
            if shared.is_err() || !topic::valid_filter(inner) {
                codes.push(if v5 {
                    reason::TOPIC_FILTER_INVALID
                } else {
                    0x80
                });
                continue;
            }
            if matches!(shared, Ok(Some(_))) && opts.no_local {
                return Err(self
                    .protocol_error(reason::PROTOCOL_ERROR, "no local on a shared subscription"));
            }
            if !self.shared.cfg.allowed(
                self.user.as_deref(),
                &self.client_id,
                Access::Subscribe,
                inner,
            ) {
                tracing::info!(client = %self.client_id, %filter, "MQTT: subscription not authorized");
                codes.push(if v5 { reason::NOT_AUTHORIZED } else { 0x80 });
                continue;
            }
            let existed = self.sub_index.contains_key(&filter) || adding.contains(&filter);
            if !existed
                && max_subs > 0
                && self.record.subscriptions.len() + adding.len() >= max_subs
            {
                over_quota += 1;
                codes.push(quota);
                continue;
            }
            let sub = Subscription {
                filter: filter.clone(),
                options: opts,
                id: sub_id,
            };
            let Ok(Some((name, f))) = shared else {
                if !existed {
                    adding.insert(filter);
                }
                plain.push((codes.len(), sub, existed));
                codes.push(opts.qos as u8);
                continue;
            };
            let (name, f) = (name.to_owned(), f.to_owned());
            let r = self
                .subscribe_shared(&sub, &name, &f, existed, stream_offset.as_deref())
                .await;
            if let Err(e) = r {
                tracing::warn!(client = %self.client_id, %filter, error = %e, "MQTT: subscribe failed");
                codes.push(if v5 { reason::UNSPECIFIED_ERROR } else { 0x80 });
                continue;
            }
            self.upsert_subscription(sub);
            codes.push(opts.qos as u8);
        }
        if over_quota > 0 {
            tracing::warn!(
                client = %self.client_id,
                refused = over_quota,
                max = max_subs,
                "MQTT: subscriptions refused: the session holds limits.mqtt_max_subscriptions_per_session"
            );
        }
        if !plain.is_empty() {
            let topic = session_topic(&self.client_id);
            let bindings: Vec<Binding> = plain
                .iter()
                .map(|(_, sub, _)| self.binding(&sub.filter, topic.clone()))
                .collect();
            let outcome: Vec<Result<(), String>> = match self
                .shared
                .broker
                .bind_many(DEFAULT_VHOST, bindings, self.persistent())
                .await
            {
                Ok(results) => results
                    .into_iter()
                    .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
                    .collect(),
                Err(e) => vec![Err(e.to_string()); plain.len()],
            };
            for ((slot, sub, existed), r) in plain.into_iter().zip(outcome) {
                if let Err(e) = r {
                    tracing::warn!(client = %self.client_id, filter = %sub.filter, error = %e, "MQTT: subscribe failed");
                    codes[slot] = if v5 { reason::UNSPECIFIED_ERROR } else { 0x80 };
                    continue;
                }
                let send_retained = match sub.options.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
                if send_retained {
                    retained_to_send.push(sub.clone());
                }
                self.upsert_subscription(sub);
            }
        }
        self.send(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            properties: Properties::default(),
            codes,
        }));
        if self.persistent() {
            self.save_record().await;
        }
        // Sent by the main loop as the output buffer drains (`send_retained`).
        self.retained_todo.extend(
            retained_to_send
                .into_iter()
                .map(crate::retained::Pending::new),
        );
        Ok(())
    }

    /// Add `sub` to the session, or replace the one with its filter.
    fn upsert_subscription(&mut self, sub: Subscription) {
        match self.sub_index.get(&sub.filter) {
            Some(&i) => self.record.subscriptions[i] = sub,
            None => {
                self.sub_index
                    .insert(sub.filter.clone(), self.record.subscriptions.len());
                self.record.subscriptions.push(sub);
            }
        }
    }

    /// Take the subscription with `filter` out of the session; whether it had one.
    fn remove_subscription(&mut self, filter: &str) -> bool {
        let Some(i) = self.sub_index.remove(filter) else {
            return false;
        };
        self.record.subscriptions.swap_remove(i);
        if let Some(moved) = self.record.subscriptions.get(i) {
            self.sub_index.insert(moved.filter.clone(), i);
        }
        true
    }

    fn binding(&self, filter: &str, destination: TopicName) -> Binding {
        Binding {
            source: MQTT_EXCHANGE.to_owned(),
            destination: Destination::Topic(destination),
            key: filter.to_owned(),
            headers: None,
            mqtt: true,
            arguments: Bytes::new(),
        }
    }

    async fn subscribe_shared(
        &mut self,
        sub: &Subscription,
        name: &str,
        filter: &str,
        existed: bool,
        stream_offset: Option<&str>,
    ) -> mqgate_core::Result<()> {
        let Some((topic, group)) = shared_topic(name, filter) else {
            return Err(mqgate_core::CoreError::Invalid(
                "shared subscription name too long".into(),
            ));
        };
        if !existed {
            self.join_shared(sub, filter, topic.clone(), group.clone())
                .await?;
            *self.shared.shared_refs.lock().entry(topic).or_default() += 1;
        } else if let Some(s) = self
            .shared_subs
            .values_mut()
            .find(|s| s.filter == sub.filter)
        {
            s.options = sub.options;
            s.id = sub.id;
        }
        if let Some(pos) = stream_offset {
            let pos = match pos.trim() {
                "first" => Some(StartPosition::First),
                "last" | "next" => Some(StartPosition::Last),
                t => t.parse::<u64>().ok().map(StartPosition::Timestamp),
            };
            if let Some(pos) = pos {
                self.shared.broker.reset_group(&group, pos).await?;
            }
        }
        Ok(())
    }

    /// Make sure a shared subscription's topic exists and is bound with `filter`, and
    /// join its group as a member.
    async fn join_shared(
        &mut self,
        sub: &Subscription,
        filter: &str,
        topic: TopicName,
        group: mqgate_store::GroupName,
    ) -> mqgate_core::Result<()> {
        self.shared.broker.create_topic(&topic, Some(1)).await?;
        let b = self.binding(filter, topic.clone());
        self.shared.broker.bind(DEFAULT_VHOST, b, true).await?;
        let consumer = self
            .shared
            .broker
            .subscribe(
                GroupSpec {
                    start: StartPosition::Last,
                    on_failure: OnFailure::Retry,
                    ..GroupSpec::new(group, vec![topic], ConsumeMode::Shared)
                },
                MemberOptions::new(self.client_id.clone(), self.send_quota),
            )
            .await?;
        let id = self.next_shared;
        self.next_shared += 1;
        self.shared_subs.insert(
            id,
            SharedSub {
                filter: sub.filter.clone(),
                options: sub.options,
                id: sub.id,
                consumer,
            },
        );
        Ok(())
    }

    /// Rejoin what a resumed session subscribed to: shared subscriptions one by one,
    /// plain ones in one batch (their bindings are usually there already: durable).
    async fn restore_subscriptions(&mut self) {
        let topic = session_topic(&self.client_id);
        let mut plain = Vec::new();
        for s in self.record.subscriptions.clone() {
            if let Err(e) = self.restore_subscription(&s, &topic, &mut plain).await {
                tracing::warn!(client = %self.client_id, filter = %s.filter, error = %e, "MQTT: restoring a subscription failed");
            }
        }
        if plain.is_empty() {
            return;
        }
        let persistent = self.persistent();
        match self
            .shared
            .broker
            .bind_many(DEFAULT_VHOST, plain.clone(), persistent)
            .await
        {
            Ok(results) => {
                for (b, r) in plain.iter().zip(results) {
                    if let Err(e) = r {
                        tracing::warn!(client = %self.client_id, filter = %b.key, error = %e, "MQTT: restoring a subscription failed");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(client = %self.client_id, error = %e, "MQTT: restoring the subscriptions failed")
            }
        }
    }

    /// Rejoin one shared subscription, or add a plain one's binding to `plain`.
    async fn restore_subscription(
        &mut self,
        s: &Subscription,
        session: &TopicName,
        plain: &mut Vec<Binding>,
    ) -> mqgate_core::Result<()> {
        match topic::parse_shared(&s.filter) {
            Ok(Some((name, f))) => {
                let (name, f) = (name.to_owned(), f.to_owned());
                // The session still holds its reference: join without counting again.
                let (topic, group) = shared_topic(&name, &f).ok_or_else(|| {
                    mqgate_core::CoreError::Invalid("bad shared subscription".into())
                })?;
                self.join_shared(s, &f, topic, group).await
            }
            _ => {
                plain.push(self.binding(&s.filter, session.clone()));
                Ok(())
            }
        }
    }

    async fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        let session = session_topic(&self.client_id);
        // Plain subscriptions are unbound together (one router update, one write).
        let mut unbind = Vec::new();
        for filter in u.filters {
            if !self.remove_subscription(&filter) {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
                continue;
            }
            match topic::parse_shared(&filter) {
                Ok(Some((name, f))) => {
                    let (name, f) = (name.to_owned(), f.to_owned());
                    self.shared_subs.retain(|_, s| s.filter != filter);
                    self.shared.release_shared(&name, &f).await;
                }
                _ => unbind.push(self.binding(&filter, session.clone())),
            }
            codes.push(reason::SUCCESS);
        }
        if !unbind.is_empty() {
            match self.shared.broker.unbind_many(DEFAULT_VHOST, &unbind).await {
                Ok(results) => {
                    for (b, r) in unbind.iter().zip(results) {
                        if let Err(e) = r {
                            tracing::warn!(client = %self.client_id, filter = %b.key, error = %e, "MQTT: unbind failed");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(client = %self.client_id, error = %e, "MQTT: unbind failed")
                }
            }
        }
        self.send(&Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            properties: Properties::default(),
            codes,
        }));
        if self.persistent() {
            self.save_record().await;
        }
    }

    async fn save_record(&mut self) {
        self.record.inbound_qos2 = self.inbound_qos2.iter().copied().collect();
        let mut b = WriteBatch::new();
        b.kv_put(
            NS_SESSION,
            Bytes::copy_from_slice(self.client_id.as_bytes()),
            self.record.encode(),
        );
        if let Err(e) = self.shared.broker.store().write(b).await {
            tracing::error!(client = %self.client_id, error = %e, "MQTT: saving the session failed");
        }
    }

    // -----------------------------------------------------------------------------------
    // Outgoing

    fn alloc_pkid(&mut self, preferred: Option<u16>) -> Option<u16> {
        if let Some(p) = preferred {
            if !self.inflight.contains_key(&p) {
                return Some(p);
            }
        }
        for _ in 0..u16::MAX {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// A delivery from the session's group or a shared subscription's group.
    fn deliver(&mut self, src: DeliverySource, d: Delivery) {
        let m = &d.message.message;
        let topic = mqtt_topic(m);
        if !self.may_read(&topic) {
            // Settled, so it does not hold the queue; never sent.
            match src {
                DeliverySource::Session => {
                    if let Some(c) = &self.session {
                        c.ack(d.ack_token());
                    }
                }
                DeliverySource::Shared(id) => {
                    if let Some(s) = self.shared_subs.get(&id) {
                        s.consumer.ack(d.ack_token());
                    }
                }
            }
            return;
        }
        let (qos_cap, retain_ok, sub_ids, shared_id) = match src {
            DeliverySource::Session => {
                match self.matching(m, &topic) {
                    Some((q, rap, ids)) => (q, rap, ids, None),
                    None => {
                        // No subscription wants it any more (unsubscribed, or no local).
                        if let Some(c) = &self.session {
                            c.ack(d.ack_token());
                        }
                        return;
                    }
                }
            }
            DeliverySource::Shared(id) => match self.shared_subs.get(&id) {
                Some(s) => (
                    s.options.qos,
                    s.options.retain_as_published,
                    s.id.into_iter().collect(),
                    Some(id),
                ),
                None => return,
            },
        };
        let source = match shared_id {
            Some(id) => Source::Shared(id, d.ack_token()),
            None => Source::Session(d.ack_token()),
        };
        let preferred = shared_id
            .is_none()
            .then(|| (d.offset.0 % 65_535) as u16 + 1);
        let retain = retain_ok && props::get(&m.properties, props::MQTT_RETAIN).is_some();
        self.emit(
            m,
            topic,
            qos_cap,
            retain,
            d.redelivered,
            sub_ids,
            Some(source),
            preferred,
        );
    }

    /// The session's plain subscriptions that want a message on `topic` (no-local ones
    /// skip the session's own publishes): the highest granted QoS, whether any keeps
    /// the retain flag, and every subscription identifier. `None`: no subscription
    /// wants it (any more).
    fn matching(&self, m: &Message, topic: &str) -> Option<(QoS, bool, Vec<u32>)> {
        let from_self = props::get(&m.properties, props::MQTT_FROM)
            .is_some_and(|f| f.as_ref() == self.client_id.as_bytes());
        let mut best: Option<QoS> = None;
        let mut rap = false;
        let mut ids = Vec::new();
        for s in &self.record.subscriptions {
            if s.filter.starts_with("$share/") || (s.options.no_local && from_self) {
                continue;
            }
            if topic::matches(&s.filter, topic) {
                best = Some(best.map_or(s.options.qos, |b| b.max(s.options.qos)));
                rap |= s.options.retain_as_published;
                ids.extend(s.id);
            }
        }
        best.map(|q| (q, rap, ids))
    }

    /// A QoS 0 message handed over directly (never stored).
    fn deliver_direct(&mut self, m: &Message) {
        let topic = mqtt_topic(m);
        if !self.may_read(&topic) {
            return;
        }
        if let Some((_, rap, ids)) = self.matching(m, &topic) {
            let retain = rap && props::get(&m.properties, props::MQTT_RETAIN).is_some();
            self.emit(m, topic, QoS::AtMostOnce, retain, false, ids, None, None);
        }
    }

    fn deliver_retained(&mut self, topic: &str, m: &Message, sub: &Subscription) {
        if !self.may_read(topic) {
            return;
        }
        let ids = sub.id.into_iter().collect();
        self.emit(
            m,
            topic.to_owned(),
            sub.options.qos,
            true,
            false,
            ids,
            Some(Source::Retained),
            None,
        );
    }

    /// Build and queue one PUBLISH: QoS is the lower of the message's and `qos_cap`;
    /// expired messages and messages over the client's maximum packet size are dropped
    /// (and settled).
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        m: &Message,
        topic: String,
        qos_cap: QoS,
        retain: bool,
        dup: bool,
        sub_ids: Vec<u32>,
        source: Option<Source>,
        preferred: Option<u16>,
    ) {
        let msg_qos = props::get(&m.properties, props::MQTT_QOS)
            .and_then(|v| v.first().copied())
            .and_then(QoS::from_u8)
            .unwrap_or(QoS::ExactlyOnce);
        let qos = msg_qos.min(qos_cap);
        let now = self.shared.now();
        let mut properties = Properties::default();
        if let Some(at) = props::get_u64(&m.properties, props::EXPIRES_AT) {
            if at <= now {
                if let Some(s) = source {
                    self.settle(s, false);
                }
                return;
            }
            properties.message_expiry = Some(((at - now).div_ceil(1000)) as u32);
        }
        if self.v5() {
            for (k, v) in &m.properties {
                match k.as_str() {
                    props::PAYLOAD_FORMAT => properties.payload_format = v.first().copied(),
                    props::CONTENT_TYPE => {
                        properties.content_type = Some(String::from_utf8_lossy(v).into_owned())
                    }
                    props::REPLY_TO => {
                        properties.response_topic = Some(String::from_utf8_lossy(v).into_owned())
                    }
                    props::CORRELATION_ID => properties.correlation_data = Some(v.clone()),
                    k if k.starts_with(props::USER_PREFIX) => properties.user.push((
                        k[props::USER_PREFIX.len()..].to_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )),
                    _ => {}
                }
            }
            properties.subscription_ids = sub_ids;
        } else {
            properties = Properties::default();
        }
        let pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            match self.alloc_pkid(preferred) {
                Some(id) => id,
                None => {
                    if let Some(s) = source {
                        self.settle(s, false);
                    }
                    return;
                }
            }
        };
        let mut publish = Publish {
            dup: {
                let dup = dup && qos != QoS::AtMostOnce;
                if dup {
                    self.shared
                        .stats
                        .redelivered
                        .fetch_add(1, Ordering::Relaxed);
                }
                dup
            },
            qos,
            retain,
            topic,
            pkid,
            properties,
            payload: m.body.clone(),
        };
        if self.v5() && self.client_alias_max > 0 {
            if let Some(&a) = self.aliases_out.get(&publish.topic) {
                publish.properties.topic_alias = Some(a);
                publish.topic.clear();
            } else if self.aliases_out.len() < usize::from(self.client_alias_max) {
                let a = self.aliases_out.len() as u16 + 1;
                self.aliases_out.insert(publish.topic.clone(), a);
                publish.properties.topic_alias = Some(a);
            }
        }
        if codec::publish_size(&publish, self.v5()) > self.client_max_packet {
            tracing::debug!(client = %self.client_id, "MQTT: message over the client's maximum packet size; dropped");
            if let Some(s) = source {
                self.settle(s, false);
            }
            return;
        }
        self.shared
            .stats
            .publishes_out
            .fetch_add(1, Ordering::Relaxed);
        self.send(&Packet::Publish(publish));
        match (qos, source) {
            (QoS::AtMostOnce, Some(s)) => self.settle(s, false),
            (QoS::AtMostOnce, None) => {}
            (q, source) => {
                let stage = if q == QoS::AtLeastOnce {
                    Stage::PubAck
                } else {
                    Stage::PubRec
                };
                self.inflight.insert(pkid, Inflight { source, stage });
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // The end

    async fn finish(mut self, end: End) {
        let v5 = self.v5();
        if let End::Server(code, why) = &end {
            if v5 {
                let mut properties = Properties::default();
                if self.problem_info {
                    properties.reason_string = Some(why.clone());
                }
                self.send(&Packet::Disconnect(Disconnect {
                    reason: *code,
                    properties,
                }));
            }
        }
        if !self.out.is_empty() {
            let _ =
                tokio::time::timeout(Duration::from_secs(1), self.wr.write_all(&self.out)).await;
        }
        let _ = self.wr.shutdown().await;
        tracing::debug!(client = %self.client_id, ?end, "MQTT: disconnected");

        let topic = session_topic(&self.client_id);
        {
            let mut live = self.shared.live.write();
            if live.get(&topic).is_some_and(|(c, _)| *c == self.conn_id) {
                live.remove(&topic);
            }
        }
        // Leave the groups: what is unacknowledged goes back (to other members of a
        // shared subscription, or to this session's next connection).
        self.session = None;
        self.shared_subs.clear();

        let publish_will = !matches!(end, End::Client { will: false });
        if let Some(will) = self.will.take().filter(|_| publish_will) {
            let delay = will
                .properties
                .will_delay
                .unwrap_or(0)
                .min(self.record.expiry);
            self.schedule_will(will, delay);
        }
        let taken_over = matches!(end, End::Server(reason::SESSION_TAKEN_OVER, _));
        if self.record.expiry == 0 && !taken_over {
            let rec = self.record.clone();
            self.shared
                .destroy_session(&self.client_id, Some(&rec))
                .await;
        } else if self.record.expiry == 0 {
            // The new connection decides what happens to the session.
            self.record.disconnected_at = self.shared.now();
            self.save_record().await;
        } else {
            self.record.disconnected_at = self.shared.now();
            self.save_record().await;
            if self.record.expiry != u32::MAX && !taken_over {
                let at = self.record.disconnected_at + u64::from(self.record.expiry) * 1000;
                self.shared
                    .expiring
                    .lock()
                    .insert(self.client_id.clone(), at);
            }
        }
        {
            let mut clients = self.shared.clients.lock();
            if clients
                .get(&self.client_id)
                .is_some_and(|s| s.conn == self.conn_id)
            {
                clients.remove(&self.client_id);
            }
        }
        let _ = self.done_tx.send(true);
    }

    fn schedule_will(&self, will: Will, delay_secs: u32) {
        let shared = Arc::clone(&self.shared);
        let client_id = self.client_id.clone();
        let message = self.to_message(
            &will.topic,
            will.qos,
            will.retain,
            will.payload.clone(),
            &will.properties,
        );
        let out = Outbound {
            topic: will.topic.clone(),
            qos: will.qos,
            retain: will.retain,
            message,
            delay: None,
        };
        if delay_secs == 0 {
            tokio::spawn(async move {
                if let Err(e) = shared.publish_batch(vec![out], None).await {
                    tracing::warn!(client = %client_id, error = %e, "MQTT: publishing a will failed");
                }
            });
            return;
        }
        let (fire, fired) = tokio::sync::oneshot::channel::<()>();
        let s2 = Arc::clone(&shared);
        let id2 = client_id.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(u64::from(delay_secs))) => {}
                _ = fired => {}
            }
            s2.wills.lock().remove(&id2);
            if let Err(e) = s2.publish_batch(vec![out], None).await {
                tracing::warn!(client = %id2, error = %e, "MQTT: publishing a will failed");
            }
        });
        shared
            .wills
            .lock()
            .insert(client_id, PendingWill { task, fire });
    }
}

/// The reason string sent with a failure code (5.0, when the client asks for problem
/// information).
fn reason_text(code: u8) -> &'static str {
    match code {
        reason::NOT_AUTHORIZED => "not authorized by the broker's access rules",
        reason::PACKET_ID_NOT_FOUND => "no such packet identifier in flight",
        reason::TOPIC_NAME_INVALID => "invalid topic name",
        reason::QUOTA_EXCEEDED => "quota exceeded",
        reason::PAYLOAD_FORMAT_INVALID => "payload is not UTF-8 as its format indicator says",
        _ => "unspecified error",
    }
}

/// DISCONNECT reason code 0x98: closed by an administrator (admin API).
pub(crate) const ADMINISTRATIVE_ACTION: u8 = 0x98;

/// Which consumer a delivery came from.
#[derive(Clone, Copy, Debug)]
enum DeliverySource {
    Session,
    Shared(u32),
}

/// The MQTT topic a message is delivered on: its AMQP routing key when it came through
/// AMQP, else the topic it was published to.
fn mqtt_topic(m: &Message) -> String {
    match props::get(&m.properties, props::AMQP_ROUTING_KEY) {
        Some(rk) => amqp_to_mqtt(&String::from_utf8_lossy(rk)),
        None => m.topic.as_str().to_owned(),
    }
}

async fn poll_deliveries(
    session: &mut Option<Consumer>,
    shared: &mut HashMap<u32, SharedSub>,
) -> (DeliverySource, Delivery) {
    poll_fn(|cx| {
        if let Some(c) = session {
            if let Poll::Ready(Some(d)) = c.poll_recv(cx) {
                return Poll::Ready((DeliverySource::Session, d));
            }
        }
        for (id, s) in shared.iter_mut() {
            if let Poll::Ready(Some(d)) = s.consumer.poll_recv(cx) {
                return Poll::Ready((DeliverySource::Shared(*id), d));
            }
        }
        Poll::Pending
    })
    .await
}

fn try_deliveries(
    session: &mut Option<Consumer>,
    shared: &mut HashMap<u32, SharedSub>,
) -> Option<(DeliverySource, Delivery)> {
    if let Some(c) = session {
        if let Some(d) = c.try_recv() {
            return Some((DeliverySource::Session, d));
        }
    }
    for (id, s) in shared.iter_mut() {
        if let Some(d) = s.consumer.try_recv() {
            return Some((DeliverySource::Shared(*id), d));
        }
    }
    None
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

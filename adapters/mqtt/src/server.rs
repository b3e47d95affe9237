//! The MQTT adapter's shared state: connected clients (for takeover), the live QoS 0
//! paths and session expiry; and the listener. Retained messages and delayed wills are
//! the core's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mqgate_core::router::{mqtt_to_amqp, RouteMemo, DEFAULT_VHOST};
use mqgate_core::sockio::QuickAck;
use mqgate_core::{Broker, Delay, Destination, Outgoing, PublishBatch, Records};
use mqgate_store::{Message, Millis, TopicName};
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::codec::QoS;
use crate::config::MqttConfig;
use crate::qos0::{Offer, Qos0Tx};
use crate::session::{session_group, session_topic, SessionRecord, NS_SESSION, SESSION_PREFIX};

/// The exchange MQTT publishes go through (RabbitMQ's convention).
pub const MQTT_EXCHANGE: &str = "amq.topic";

/// A connected session's direct QoS 0 queue, with the id of the connection owning it.
pub(crate) type LiveSession = (u64, Qos0Tx);

/// Set once when a connection has ended and saved its session; awaited by a takeover
/// and by shutdown. tokio's watch channel allocates about 400 bytes (nine `Notify`s) per
/// connection; this about 60.
#[derive(Clone, Debug, Default)]
pub(crate) struct Done(Arc<DoneState>);

#[derive(Debug, Default)]
struct DoneState {
    set: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
    keep_alive: crate::keepalive::Clock,
}

impl Done {
    /// The connection's keep-alive clock (what the sweep reads).
    pub(crate) fn keep_alive(&self) -> &crate::keepalive::Clock {
        &self.0.keep_alive
    }

    /// Mark it done and wake whoever waits.
    pub(crate) fn set(&self) {
        self.0.set.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Wait until it is done.
    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            tokio::pin!(notified);
            // Registered before the check, so a `set` between the two is not missed.
            notified.as_mut().enable();
            if self.0.set.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// A connected client's slot, for session takeover.
#[derive(Debug)]
pub(crate) struct ClientSlot {
    pub(crate) conn: u64,
    /// Tells the connection to end with this reason code.
    pub(crate) kick: mqgate_core::mailbox::Sender<u8>,
    /// Set once the connection has ended and saved its session.
    pub(crate) done: Done,
    /// What the admin API shows (boxed: the registry's table has room for more slots
    /// than clients, and an empty slot costs the entry's size).
    pub(crate) info: Box<ClientInfo>,
}

/// What the admin API shows of a connected client. Its [`mqgate_core::ConnectionInfo`]
/// is made when asked: an idle connection holds no strings for it (the id is the
/// table's key; the peer, the version and the time are plain values).
#[derive(Debug)]
pub(crate) struct ClientInfo {
    pub(crate) peer: SocketAddr,
    /// The gateway that spliced the client here, in a cluster.
    pub(crate) via: Option<Box<str>>,
    pub(crate) user: Option<Box<str>>,
    pub(crate) version: crate::codec::Version,
    pub(crate) connected_at: mqgate_store::Millis,
}

impl ClientInfo {
    fn connection(&self, id: &str) -> mqgate_core::ConnectionInfo {
        mqgate_core::ConnectionInfo {
            id: id.to_owned(),
            protocol: "mqtt",
            peer: match &self.via {
                Some(from) => format!("{from} (via {})", self.peer),
                None => self.peer.to_string(),
            },
            user: self.user.as_deref().map(str::to_owned),
            detail: format!("{:?}", self.version),
            connected_at: self.connected_at,
            client: Box::default(),
        }
    }
}

/// Counters, read by operators and benchmarks.
#[derive(Debug, Default)]
pub struct MqttStats {
    /// Connections accepted.
    pub connections_opened: AtomicU64,
    /// Connections ended.
    pub connections_closed: AtomicU64,
    /// PUBLISH packets received.
    pub publishes_in: AtomicU64,
    /// PUBLISH packets sent.
    pub publishes_out: AtomicU64,
    /// QoS 0 messages dropped because a client's queue was full or it was offline.
    pub qos0_dropped: AtomicU64,
    /// Connections closed for a protocol violation or malformed input.
    pub protocol_errors: AtomicU64,
    /// Publishes that matched at least one subscription or queue.
    pub routed: AtomicU64,
    /// Publishes that matched nothing.
    pub unroutable: AtomicU64,
    /// Deliveries settled (PUBACK / PUBCOMP, or sent at QoS 0).
    pub acked: AtomicU64,
    /// Deliveries sent again (DUP).
    pub redelivered: AtomicU64,
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) broker: Broker,
    pub(crate) cfg: MqttConfig,
    /// The topic access rules, built once from `cfg`.
    pub(crate) acl: mqgate_core::TopicAcl,
    pub(crate) clients: Mutex<HashMap<String, ClientSlot>>,
    /// Session topic → the connected session's QoS 0 queue.
    pub(crate) live: RwLock<HashMap<TopicName, LiveSession>>,
    /// Disconnected sessions with an expiry (the core expires them: see
    /// [`Shared::session_endpoint`]).
    pub(crate) expiring: Mutex<std::collections::HashSet<String>>,
    /// Shared subscriptions (topic) → how many sessions hold them.
    pub(crate) shared_refs: Mutex<HashMap<TopicName, usize>>,
    pub(crate) next_conn: AtomicU64,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) stats: MqttStats,
    /// Admission: pending handshakes and open connections (`max_connections`).
    pub(crate) gate: Arc<mqgate_core::net::ConnGate>,
    /// When the server started: connections' keep-alive clocks count from it.
    pub(crate) epoch: tokio::time::Instant,
}

/// The MQTT adapter: owns its state; [`MqttServer::listen`] serves a TCP listener,
/// [`MqttServer::serve_stream`] any byte stream (TLS, WebSocket).
#[derive(Clone, Debug)]
pub struct MqttServer {
    shared: Arc<Shared>,
}

impl MqttServer {
    /// Load retained messages and sessions from the store and start session expiry.
    pub async fn start(broker: Broker, cfg: MqttConfig) -> mqgate_core::Result<Self> {
        let now = broker.now();
        let mut expiring = std::collections::HashSet::new();
        let mut known = std::collections::HashSet::new();
        let mut shared_refs: HashMap<TopicName, usize> = HashMap::new();
        let mut after: Option<Bytes> = None;
        let mut fixes = Records::new();
        loop {
            let page = broker
                .records(NS_SESSION, b"", after.as_deref(), 1024)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            for (k, v) in page {
                let Ok(id) = String::from_utf8(k.to_vec()) else {
                    continue;
                };
                let Some(mut rec) = SessionRecord::decode(v) else {
                    tracing::warn!(client = %id, "unreadable MQTT session record; dropped");
                    fixes.delete(NS_SESSION, k);
                    continue;
                };
                if rec.disconnected_at == 0 {
                    // The broker stopped while it was connected: it disconnected now.
                    rec.disconnected_at = now;
                    fixes.put(NS_SESSION, k, rec.encode());
                }
                for s in &rec.subscriptions {
                    if let Ok(Some((name, f))) = crate::topic::parse_shared(&s.filter) {
                        if let Some((t, _)) = crate::session::shared_topic(name, f) {
                            *shared_refs.entry(t).or_default() += 1;
                        }
                    }
                }
                if rec.expiry != u32::MAX {
                    // The core deletes it once unused for its expiry, counted from when
                    // it disconnected.
                    broker.register_endpoint_since(
                        Shared::session_endpoint(&id, rec.expiry),
                        Some(rec.disconnected_at),
                    );
                    expiring.insert(id.clone());
                }
                known.insert(session_topic(&id));
            }
        }
        broker.write_records(fixes).await?;
        // Session topics of clean sessions that were connected when the broker stopped.
        let mut stale = 0;
        for t in broker.topics() {
            if t.name.as_str().starts_with(SESSION_PREFIX) && !known.contains(&t.name) {
                broker.unbind_topic(DEFAULT_VHOST, &t.name).await?;
                broker.delete_topic(&t.name).await?;
                stale += 1;
            }
        }
        tracing::info!(
            retained = broker.retained().stats().messages,
            sessions = known.len(),
            stale_clean_sessions = stale,
            "MQTT state recovered"
        );
        let (shutdown, _) = watch::channel(false);
        let gate = mqgate_core::net::ConnGate::new(
            "MQTT",
            cfg.max_connections,
            cfg.max_pending_handshakes,
        );
        let shared = Arc::new(Shared {
            broker,
            acl: cfg.topic_acl(),
            cfg,
            clients: Mutex::default(),
            live: RwLock::default(),
            expiring: Mutex::new(expiring),
            shared_refs: Mutex::new(shared_refs),
            next_conn: AtomicU64::new(1),
            shutdown,
            stats: MqttStats::default(),
            gate,
            epoch: tokio::time::Instant::now(),
        });
        crate::keepalive::spawn_sweep(&shared);
        if shared.broker.clustered() {
            // A shard attached here brings its sessions: the core manages their expiry
            // here from now on (see `SessionKind`).
            shared
                .broker
                .add_endpoint_kind(Arc::new(SessionKind {
                    shared: Arc::downgrade(&shared),
                }))
                .await?;
        }
        // The core expires disconnected sessions; the adapter only lets go of them.
        let mut events = shared.broker.endpoint_events();
        let mut shards = shared.broker.shard_events();
        let weak = Arc::downgrade(&shared);
        let mut stop = shared.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.changed() => return,
                    ev = shards.recv() => {
                        match (ev, weak.upgrade()) {
                            (Ok(mqgate_core::ShardEvent::Detached(id)), Some(s)) => s.shard_left(id),
                            (Err(tokio::sync::broadcast::error::RecvError::Closed), _) | (_, None) => return,
                            _ => {}
                        }
                        continue;
                    }
                    ev = events.recv() => ev,
                };
                let Some(s) = weak.upgrade() else { return };
                match ev {
                    Ok(mqgate_core::EndpointEvent::Expired { records, .. }) => {
                        s.session_expired(records).await
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "MQTT: missed endpoint events");
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(Self { shared })
    }

    /// Accept connections on `listener` until shutdown.
    pub fn listen(&self, listener: TcpListener) -> JoinHandle<()> {
        let server = self.clone();
        let stop = self.shared.shutdown.subscribe();
        // Only when answers wait on a sync: otherwise they carry the ACK at once.
        let ack_early = self.answers_wait();
        mqgate_core::net::accept_loop("MQTT", listener, stop, move |tcp, peer| {
            let quick = ack_early.then(|| QuickAck::of(tcp.get_ref())).flatten();
            server.serve_tcp_stream(tcp, peer, quick)
        })
    }

    /// Whether publishes' answers wait on I/O, so that connections ACK early
    /// ([`mqgate_core::Broker::answers_wait`]).
    pub fn answers_wait(&self) -> bool {
        self.shared.broker.answers_wait()
    }

    /// Serve one client over any byte stream.
    pub fn serve_stream<S>(&self, stream: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.serve_tcp_stream(stream, peer, None);
    }

    /// Serve one client over a byte stream carried by the TCP socket `quick` (TLS):
    /// publishes whose answers wait on an fsync are ACKed at once by its kernel
    /// (`mqgate_core::sockio`, "Answers that wait on a sync").
    pub fn serve_tcp_stream<S>(&self, stream: S, peer: SocketAddr, quick: Option<QuickAck>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // Pending until its handshake succeeds: capped by `max_pending_handshakes` (the
        // oldest is evicted for it), never counted against `max_connections`.
        let pending = self.shared.gate.begin(peer);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(crate::conn::run(shared, stream, peer, pending, quick));
    }

    /// The adapter's counters.
    pub fn stats(&self) -> &MqttStats {
        &self.shared.stats
    }

    /// Connections still in their handshake (capped by `max_pending_handshakes`).
    pub fn pending_handshakes(&self) -> usize {
        self.shared.gate.pending()
    }

    /// Retained messages, and what the body cache holds.
    pub fn retained_stats(&self) -> mqgate_core::RetainedStats {
        self.shared.broker.retained().stats()
    }

    /// Sessions the broker keeps: connected clients plus disconnected persistent ones.
    pub fn session_count(&self) -> usize {
        self.shared.clients.lock().len() + self.shared.expiring.lock().len()
    }

    /// Connected clients, for the admin API.
    pub fn connections(&self) -> Vec<mqgate_core::ConnectionInfo> {
        let mut v: Vec<_> = self
            .shared
            .clients
            .lock()
            .iter()
            .map(|(id, s)| s.info.connection(id))
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Disconnect a client (5.0: DISCONNECT 0x98 administrative action). Returns whether
    /// it was connected.
    pub fn close(&self, client_id: &str) -> bool {
        match self.shared.clients.lock().get(client_id) {
            Some(s) => s.kick.send(crate::conn::ADMINISTRATIVE_ACTION).is_ok(),
            None => false,
        }
    }

    /// Connected clients' ids.
    pub fn clients(&self) -> Vec<String> {
        self.shared.clients.lock().keys().cloned().collect()
    }

    /// Close every connection (5.0 clients get DISCONNECT 0x8B "server shutting down")
    /// and wait up to `grace` for them to save their sessions.
    pub async fn shutdown(&self, grace: Duration) {
        // Set before the connections are kicked: one registered after the kicks below
        // sees it when its loop starts (a connection's loop holds no watch of its own).
        self.shared.shutdown.send_replace(true);
        let dones: Vec<_> = self
            .shared
            .clients
            .lock()
            .values()
            .map(|s| {
                let _ = s.kick.send(crate::codec::reason::SERVER_SHUTTING_DOWN);
                s.done.clone()
            })
            .collect();
        let wait = async {
            for d in dones {
                d.wait().await;
            }
        };
        let _ = tokio::time::timeout(grace, wait).await;
    }
}

/// QoS 0 messages of one batch waiting for room in a session's queue, in order.
type Qos0Wait = (TopicName, Qos0Tx, Vec<Arc<Message>>);

/// A message ready to publish through `amq.topic`.
#[derive(Debug)]
pub(crate) struct Outbound {
    pub(crate) topic: String,
    pub(crate) qos: QoS,
    pub(crate) retain: bool,
    pub(crate) message: Message,
    pub(crate) delay: Option<Delay>,
}

impl MqttStats {
    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        let r = std::sync::atomic::Ordering::Relaxed;
        self.connections_opened
            .load(r)
            .saturating_sub(self.connections_closed.load(r))
    }
}

impl Shared {
    /// `t` in ms since the server started (the keep-alive clocks' unit).
    pub(crate) fn millis(&self, t: tokio::time::Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_millis() as u64
    }

    pub(crate) fn now(&self) -> Millis {
        self.broker.now()
    }

    /// Route and store a batch of publishes in one write; QoS 0 messages go straight to
    /// connected sessions instead. `own` is the publisher's session topic (its own QoS 0
    /// queue is never waited for: the waiting task is the one that drains it). Returns,
    /// per publish, whether anything matched.
    pub(crate) async fn publish_batch(
        &self,
        items: Vec<Outbound>,
        own: Option<&TopicName>,
    ) -> mqgate_core::Result<Vec<bool>> {
        let (out, batch) = self.route_batch(items, own, None).await?;
        if !batch.items.is_empty() {
            self.broker.publish_batch(batch).await?;
        }
        Ok(out)
    }

    /// [`Shared::publish_batch`] up to the store write: QoS 0 messages are handed to
    /// connected sessions, the rest is returned as the core batch to store (a
    /// connection submits it to its pipeline).
    /// `memo`: the publishing connection's last route, reused while its topic and the
    /// router's tables are the same.
    pub(crate) async fn route_batch(
        &self,
        items: Vec<Outbound>,
        own: Option<&TopicName>,
        mut memo: Option<&mut RouteMemo>,
    ) -> mqgate_core::Result<(Vec<bool>, PublishBatch)> {
        let mut out = Vec::with_capacity(items.len());
        // One core batch: the stored publishes, the delayed ones (timers, routed when
        // due) and the retained settings (in the same write as their publish).
        let mut batch = PublishBatch::new();
        let mut blocked: Vec<Qos0Wait> = Vec::new();
        for item in items {
            let retain = item.retain.then(|| item.topic.clone());
            if let Some(delay) = item.delay {
                batch.push(Outgoing {
                    message: item.message,
                    to: Destination::Exchange {
                        vhost: DEFAULT_VHOST.to_owned(),
                        exchange: MQTT_EXCHANGE.to_owned(),
                        key: mqtt_to_amqp(&item.topic),
                        headers: Vec::new(),
                    },
                    delay: Some(delay),
                    retain,
                });
                out.push(true);
                continue;
            }
            let router = self.broker.router();
            let generation = router.generation();
            let known = memo.as_deref().and_then(|m| m.get(&item.topic, generation));
            let routed_topics = match known {
                Some(topics) => topics,
                None => {
                    let (routed, stable) = router.route_stable(
                        DEFAULT_VHOST,
                        MQTT_EXCHANGE,
                        &mqtt_to_amqp(&item.topic),
                        &[],
                    )?;
                    if let (true, Some(m)) = (stable, memo.as_deref_mut()) {
                        m.remember(&item.topic, generation, &routed.topics);
                    }
                    routed.topics.into()
                }
            };
            out.push(!routed_topics.is_empty());
            if item.qos == QoS::AtMostOnce {
                let mut stored = Vec::new();
                let mut shared_msg: Option<Arc<Message>> = None;
                for t in routed_topics {
                    if t.as_str().starts_with(SESSION_PREFIX) {
                        let live = self.live.read();
                        match live.get(&t) {
                            Some((_, tx)) => {
                                let m = shared_msg
                                    .get_or_insert_with(|| Arc::new(item.message.clone()));
                                // Behind a message of this batch already waiting for the
                                // session: wait too, to keep the publisher's order.
                                if let Some(w) = blocked.iter_mut().find(|w| w.0 == t) {
                                    w.2.push(Arc::clone(m));
                                    continue;
                                }
                                match tx.try_send(Arc::clone(m)) {
                                    Offer::Queued => {}
                                    // The subscriber is behind: the publisher waits for it
                                    // (below) rather than the message being dropped.
                                    Offer::Full(m) if own != Some(&t) => {
                                        blocked.push((t.clone(), tx.clone(), vec![m]));
                                    }
                                    // Full for its own publisher, stuck, or gone: dropped.
                                    Offer::Full(_) | Offer::Refused => {
                                        self.stats.qos0_dropped.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                            }
                            // A session of another gateway (its shard lives there):
                            // stored in its topic through the relay and delivered from
                            // there at QoS 0 (a disconnected one gets it on return).
                            None if !self.broker.owns_topic(&t) => stored.push(t),
                            None => {
                                self.stats.qos0_dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    } else {
                        stored.push(t);
                    }
                }
                if !stored.is_empty() || retain.is_some() {
                    batch.push(Outgoing {
                        retain,
                        ..Outgoing::routed(item.message, stored)
                    });
                }
            } else if !routed_topics.is_empty() || retain.is_some() {
                batch.push(Outgoing {
                    retain,
                    ..Outgoing::routed(item.message, routed_topics)
                });
            }
        }
        if !blocked.is_empty() {
            self.wait_qos0(blocked).await;
        }
        Ok((out, batch))
    }

    /// QoS 0 messages for sessions whose queue is full: the publisher's connection waits
    /// (it reads no more from its socket, so TCP pushes back on the client) until each
    /// has room, as long as the session keeps taking messages (a slow reader slows the
    /// publisher down, it does not lose messages). A session that takes nothing for
    /// `qos0_max_wait` is marked stuck (see [`crate::qos0`]): the message is dropped and
    /// counted, and nobody waits for it again until it drains, so a stuck subscriber
    /// costs publishers one wait, not one per batch. The sessions wait side by side: a
    /// stuck one does not use up the others' time.
    async fn wait_qos0(&self, mut blocked: Vec<Qos0Wait>) {
        let window = self.cfg.qos0_max_wait;
        async fn send_all(tx: Qos0Tx, messages: Vec<Arc<Message>>, window: Duration) -> u64 {
            let mut dropped = 0;
            for m in messages {
                if !tx.send_by(m, window).await {
                    dropped += 1;
                }
            }
            dropped
        }
        let dropped = if blocked.len() == 1 {
            let (_, tx, messages) = blocked.pop().expect("one");
            send_all(tx, messages, window).await
        } else {
            let tasks: Vec<_> = blocked
                .into_iter()
                .map(|(_, tx, messages)| tokio::spawn(send_all(tx, messages, window)))
                .collect();
            let mut dropped = 0;
            for t in tasks {
                dropped += t.await.unwrap_or(0);
            }
            dropped
        };
        self.stats
            .qos0_dropped
            .fetch_add(dropped, Ordering::Relaxed);
    }

    /// The endpoint the core manages for a disconnected session: its group and topic,
    /// its record, deleted after `expiry` seconds unused.
    pub(crate) fn session_endpoint(client_id: &str, expiry: u32) -> mqgate_core::Endpoint {
        let spec = mqgate_core::GroupSpec::new(
            session_group(client_id),
            vec![session_topic(client_id)],
            mqgate_core::ConsumeMode::Shared,
        );
        mqgate_core::Endpoint {
            spec,
            vhost: DEFAULT_VHOST.to_owned(),
            records: vec![(
                NS_SESSION.to_owned(),
                Bytes::copy_from_slice(client_id.as_bytes()),
            )],
            idle_expiry: (expiry != u32::MAX).then(|| u64::from(expiry) * 1000),
            owner: None,
        }
    }

    /// Shard `id` left this gateway: its sessions are closed (5.0: DISCONNECT 0x9C
    /// "use another server"), and their clients' reconnects go to its next owner.
    fn shard_left(&self, id: u16) {
        let clients = self.clients.lock();
        let mut n = 0;
        for (client, slot) in clients.iter() {
            if self.broker.shard_of_topic(&session_topic(client)) == id {
                let _ = slot.kick.send(crate::conn::USE_ANOTHER_SERVER);
                n += 1;
            }
        }
        if n > 0 {
            tracing::info!(shard = id, sessions = n, "MQTT: the shard moved to another gateway; its sessions are closed and reconnect there");
        }
    }

    /// The core deleted a session unused for its expiry: release its shared
    /// subscriptions.
    async fn session_expired(&self, records: Vec<(String, Bytes, Option<Bytes>)>) {
        for (ns, key, value) in records {
            if ns != NS_SESSION {
                continue;
            }
            let id = String::from_utf8_lossy(&key).into_owned();
            tracing::debug!(client = %id, "MQTT session expired");
            self.expiring.lock().remove(&id);
            if let Some(rec) = value.and_then(SessionRecord::decode) {
                for s in &rec.subscriptions {
                    if let Ok(Some((name, f))) = crate::topic::parse_shared(&s.filter) {
                        self.release_shared(name, f).await;
                    }
                }
            }
        }
    }

    /// Remove a session for good: its bindings, group, topic and record (one core
    /// operation), and its hold on shared subscriptions.
    pub(crate) async fn destroy_session(&self, client_id: &str, rec: Option<&SessionRecord>) {
        self.broker.forget_endpoint(&session_group(client_id));
        let mut record = Records::new();
        record.delete(NS_SESSION, Bytes::copy_from_slice(client_id.as_bytes()));
        if let Err(e) = self
            .broker
            .delete_endpoint(
                DEFAULT_VHOST,
                &session_topic(client_id),
                &session_group(client_id),
                record,
            )
            .await
        {
            tracing::warn!(client = client_id, error = %e, "deleting a session failed");
        }
        if let Some(rec) = rec {
            for s in &rec.subscriptions {
                if let Ok(Some((name, f))) = crate::topic::parse_shared(&s.filter) {
                    self.release_shared(name, f).await;
                }
            }
        }
    }

    /// One more session holds shared subscription topic `topic` (bound with `filter`
    /// just before). In a cluster the count is kept with the topic, in its shard
    /// (sessions on every gateway hold it); otherwise here.
    ///
    /// A holder's bind and count, and a releaser's count and unbind, are separate
    /// steps and can interleave (a releaser's unbind after a new holder's bind). So the
    /// first holder binds again after counting itself, and a releaser that unbound
    /// looks at the count once more and binds again if a holder came meanwhile: the
    /// last routing change always matches the count.
    pub(crate) async fn hold_shared(&self, topic: TopicName, filter: &str) {
        if self.count_shared(&topic, 1).await == Some(1) {
            self.bind_shared(&topic, filter).await;
        }
    }

    /// One session stopped holding shared subscription `$share/name/filter`.
    pub(crate) async fn release_shared(&self, name: &str, filter: &str) {
        let Some((topic, _)) = crate::session::shared_topic(name, filter) else {
            return;
        };
        if self.count_shared(&topic, -1).await != Some(0) {
            return;
        }
        // Nobody holds it: stop routing to it (its offsets stay, for replay).
        let _ = self.broker.unbind_topic(DEFAULT_VHOST, &topic).await;
        if self.count_shared(&topic, 0).await.is_some_and(|n| n > 0) {
            self.bind_shared(&topic, filter).await;
        }
    }

    async fn bind_shared(&self, topic: &TopicName, filter: &str) {
        let b = mqgate_core::router::Binding {
            source: MQTT_EXCHANGE.to_owned(),
            destination: mqgate_core::router::Destination::Topic(topic.clone()),
            key: filter.to_owned(),
            headers: None,
            mqtt: true,
            arguments: Bytes::new(),
        };
        if let Err(e) = self.broker.bind(DEFAULT_VHOST, b, true).await {
            tracing::warn!(%topic, error = %e, "MQTT: binding a shared subscription again failed");
        }
    }

    /// Change the count of sessions holding shared subscription topic `topic` by
    /// `delta` (0: read it): the count after, `None` when it could not be changed (a
    /// count that cannot be lowered keeps the topic bound rather than risk cutting off
    /// the other holders).
    async fn count_shared(&self, topic: &TopicName, delta: i32) -> Option<u64> {
        if self.broker.clustered() {
            return match self.broker.adjust_refs(topic, delta).await {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(%topic, delta, error = %e, "MQTT: a shared subscription's holder count could not be changed");
                    None
                }
            };
        }
        let mut refs = self.shared_refs.lock();
        let n = refs.entry(topic.clone()).or_default();
        let d = delta.unsigned_abs() as usize;
        *n = if delta >= 0 {
            n.saturating_add(d)
        } else {
            n.saturating_sub(d)
        };
        let now = *n;
        if now == 0 {
            refs.remove(topic);
        }
        Some(now as u64)
    }
}

/// The core's view of MQTT sessions in a cluster: a disconnected session's record back
/// into the endpoint that expires it, on the gateway its shard is attached to.
#[derive(Debug)]
struct SessionKind {
    shared: std::sync::Weak<Shared>,
}

impl mqgate_core::EndpointKind for SessionKind {
    fn namespace(&self) -> &str {
        NS_SESSION
    }

    fn endpoint(&self, key: &[u8], value: &[u8]) -> Option<mqgate_core::Endpoint> {
        let id = std::str::from_utf8(key).ok()?;
        let rec = SessionRecord::decode(Bytes::copy_from_slice(value))?;
        if rec.expiry == u32::MAX {
            return None;
        }
        // Connected here: its connection registers it when it ends.
        if self
            .shared
            .upgrade()
            .is_some_and(|s| s.clients.lock().contains_key(id))
        {
            return None;
        }
        Some(Shared::session_endpoint(id, rec.expiry))
    }

    fn unused_since(&self, _key: &[u8], value: &[u8]) -> Option<Millis> {
        SessionRecord::decode(Bytes::copy_from_slice(value))
            .map(|r| r.disconnected_at)
            .filter(|at| *at > 0)
    }
}

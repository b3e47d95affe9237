//! The AMQP adapter's shared state (declared queues, exchange flags the core does not
//! keep, connections) and the listener.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::types::FieldTable;
use bytes::Bytes;
use mqgate_core::router::{Binding, Destination, ExchangeDef};
use mqgate_core::{Broker, CoreError, EndpointDecl, Records, StartPosition};
use parking_lot::{Mutex, RwLock};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::AmqpConfig;
use crate::queue::{queue_topic, Queue, QueueKind, NS_QUEUE, QUEUE_PREFIX};
use crate::reply;

/// A vhost and a name.
pub(crate) type Key = (String, String);

/// Counters, read by operators and benchmarks.
#[derive(Debug, Default)]
pub struct AmqpStats {
    /// Connections accepted.
    pub connections_opened: AtomicU64,
    /// Connections ended.
    pub connections_closed: AtomicU64,
    /// Messages published (whole, routed or not).
    pub published: AtomicU64,
    /// Messages delivered (basic.deliver and basic.get-ok).
    pub delivered: AtomicU64,
    /// Published messages that matched no queue.
    pub unroutable: AtomicU64,
    /// Connections closed for a protocol violation or malformed input.
    pub protocol_errors: AtomicU64,
    /// Published messages stored for at least one queue.
    pub routed: AtomicU64,
    /// Deliveries acknowledged (basic.ack, or sent to a no-ack consumer).
    pub acked: AtomicU64,
    /// Deliveries with the redelivered flag.
    pub redelivered: AtomicU64,
    /// Channels open now.
    pub channels: AtomicU64,
    /// Bytes read from clients.
    pub bytes_in: AtomicU64,
    /// Bytes written to clients.
    pub bytes_out: AtomicU64,
}

/// A declared queue, as the management API shows it.
#[derive(Clone, Debug)]
pub struct QueueView {
    /// Its vhost.
    pub vhost: String,
    /// Its name.
    pub name: String,
    /// Survives restarts.
    pub durable: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// The connection owning it, if exclusive.
    pub exclusive_owner: Option<u64>,
    /// The declare arguments as sent.
    pub arguments: FieldTable,
    /// Its core group (lag, in-flight and offsets come from it).
    pub group: mqgate_store::GroupName,
    /// Its core topic.
    pub topic: mqgate_store::TopicName,
    /// Consumers now.
    pub consumers: usize,
    /// An exclusive consumer holds it.
    pub exclusive_consumer: bool,
    /// `x-single-active-consumer`.
    pub single_active: bool,
}

/// An active consumer, as the management API shows it.
#[derive(Clone, Debug)]
pub struct ConsumerView {
    /// The connection's id.
    pub connection: u64,
    /// The channel number.
    pub channel: u16,
    /// The consumer tag.
    pub tag: String,
    /// The queue's vhost.
    pub vhost: String,
    /// The queue.
    pub queue: String,
    /// Acknowledgements required (not no-ack).
    pub ack_required: bool,
    /// basic.consume with exclusive.
    pub exclusive: bool,
    /// Its prefetch.
    pub prefetch: usize,
    /// The consume arguments.
    pub arguments: FieldTable,
}

/// Keeps a consumer listed while it lives (dropped with the consumer, however it ends).
pub(crate) struct Listed {
    shared: Arc<Shared>,
    key: (u64, u16, String),
}

impl Listed {
    pub(crate) fn new(shared: &Arc<Shared>, view: ConsumerView) -> Self {
        let key = (view.connection, view.channel, view.tag.clone());
        shared.consumers.lock().insert(key.clone(), view);
        Self {
            shared: Arc::clone(shared),
            key,
        }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.shared.consumers.lock().remove(&self.key);
    }
}

impl std::fmt::Debug for Listed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Listed").field(&self.key).finish()
    }
}

/// What the adapter keeps about an exchange beyond the core's definition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ExMeta {
    /// Declared as `x-delayed-message`: publishes with `x-delay` wait.
    pub(crate) delayed: bool,
}

/// The first byte of a stored exchange's arguments: 1 when declared `x-delayed-message`
/// (the core keeps the routing type; the argument bytes follow).
pub(crate) const EX_DELAYED: u8 = 1;

#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) broker: Broker,
    pub(crate) cfg: AmqpConfig,
    pub(crate) queues: RwLock<HashMap<Key, Arc<Queue>>>,
    /// This run of the adapter (exclusive queues' records name it with their
    /// connection).
    pub(crate) incarnation: u64,
    /// This gateway's run: transient queues' records name it.
    pub(crate) run: mqgate_core::Run,
    pub(crate) exchanges: RwLock<HashMap<Key, ExMeta>>,
    pub(crate) next_conn: AtomicU64,
    /// Member ids increase, so a single-active-consumer queue keeps its first consumer
    /// ([`Shared::member_id`]).
    pub(crate) next_member: AtomicU64,
    /// The last millisecond a member id was made in (ids never go back with the clock).
    member_ms: AtomicU64,
    pub(crate) shutdown: watch::Sender<bool>,
    pub(crate) open: Mutex<HashMap<u64, watch::Receiver<bool>>>,
    /// Open connections past the handshake, with the sender that closes one (admin API).
    pub(crate) conns: Mutex<
        HashMap<
            u64,
            (
                mqgate_core::ConnectionInfo,
                tokio::sync::mpsc::UnboundedSender<()>,
            ),
        >,
    >,
    pub(crate) stats: AmqpStats,
    /// Open channels (connection id, channel number), for the management API.
    pub(crate) channels: Mutex<std::collections::BTreeSet<(u64, u16)>>,
    /// Active consumers by (connection id, channel, tag), for the management API.
    pub(crate) consumers: Mutex<std::collections::BTreeMap<(u64, u16, String), ConsumerView>>,
    /// Admission: pending handshakes and open connections (`max_connections`).
    pub(crate) gate: Arc<mqgate_core::net::ConnGate>,
}

/// What declaring a queue found.
#[derive(Debug)]
pub(crate) enum Declared {
    /// It did not exist: created as asked.
    Created(Arc<Queue>),
    /// It exists (declared before, maybe through another gateway): as it is.
    Exists(Arc<Queue>),
}

/// The AMQP 0-9-1 adapter.
#[derive(Clone, Debug)]
pub struct AmqpServer {
    shared: Arc<Shared>,
}

impl AmqpServer {
    /// Load durable queue declarations, drop what transient queues left behind, and
    /// create the configured vhosts.
    pub async fn start(broker: Broker, cfg: AmqpConfig) -> mqgate_core::Result<Self> {
        for v in &cfg.vhosts {
            if broker.router().exchange(v, "").is_none() {
                broker.add_vhost(v).await?;
            }
        }
        // Connections of this run own the exclusive queues they declare; an owner of
        // an earlier run (or another gateway) is nobody here.
        let run = broker.run();
        let incarnation = run.id;
        let clustered = broker.clustered();
        let mut queues = HashMap::new();
        let mut after: Option<Bytes> = None;
        let mut fixes = Records::new();
        let mut leftover = HashSet::new();
        loop {
            let page = broker
                .records(NS_QUEUE, b"", after.as_deref(), 1024)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            for (k, v) in page {
                let Some(q) = Queue::from_record(&k, &v, cfg.default_retry_policy, incarnation)
                else {
                    tracing::warn!("unreadable AMQP queue record; dropped");
                    fixes.delete(NS_QUEUE, k);
                    continue;
                };
                if !q.persistent() {
                    // A transient queue of an earlier run of this broker: it died with
                    // it. In a cluster it is another gateway's (or one that died: not
                    // this one's to judge), and stays.
                    if !clustered {
                        fixes.delete(NS_QUEUE, k);
                        leftover.insert(q.topic.clone());
                    }
                    continue;
                }
                queues.insert((q.vhost.clone(), q.name.clone()), Arc::new(q));
            }
        }
        broker.write_records(fixes).await?;
        // The core applies each queue's policies (TTL sweeps, x-expires) where its
        // shard is owned, from its record; from now on, and wherever the shard moves.
        broker
            .add_endpoint_kind(Arc::new(QueueKind {
                default_retry: cfg.default_retry_policy,
            }))
            .await?;
        // Transient queues die with the broker: their topics, groups and bindings go.
        // (A gateway of a cluster drops nothing: another gateway's transient queues
        // live in the shards it owns.)
        let known: HashSet<_> = queues.values().map(|q| q.topic.clone()).collect();
        let mut dropped = 0;
        let topics = if clustered {
            Vec::new()
        } else {
            broker.topics()
        };
        for t in topics {
            if t.name.as_str().starts_with(QUEUE_PREFIX)
                && (!known.contains(&t.name) || leftover.contains(&t.name))
            {
                for v in broker.router().vhosts() {
                    broker.unbind_topic(&v, &t.name).await?;
                }
                if let Ok(g) = mqgate_store::GroupName::new(t.name.as_str()) {
                    broker.delete_group(&g).await?;
                }
                broker.delete_topic(&t.name).await?;
                dropped += 1;
            }
        }
        let mut exchanges = HashMap::new();
        for v in broker.router().vhosts() {
            for def in broker.router().exchanges(&v) {
                if def.arguments.first() == Some(&EX_DELAYED) {
                    exchanges.insert((v.clone(), def.name.clone()), ExMeta { delayed: true });
                }
            }
        }
        tracing::info!(
            durable_queues = queues.len(),
            transient_queues_dropped = dropped,
            "AMQP adapter started"
        );
        let (shutdown, _) = watch::channel(false);
        let gate = mqgate_core::net::ConnGate::new(
            "AMQP",
            cfg.max_connections,
            cfg.max_pending_handshakes,
        );
        let shared = Arc::new(Shared {
            broker,
            cfg,
            incarnation,
            run,
            queues: RwLock::new(queues),
            exchanges: RwLock::new(exchanges),
            next_conn: AtomicU64::new(1),
            next_member: AtomicU64::new(1),
            member_ms: AtomicU64::new(0),
            shutdown,
            open: Mutex::new(HashMap::new()),
            conns: Mutex::new(HashMap::new()),
            stats: AmqpStats::default(),
            channels: Mutex::default(),
            consumers: Mutex::default(),
            gate,
        });
        // The core expires unused queues (x-expires); the adapter only forgets them.
        let mut events = shared.broker.endpoint_events();
        let weak = Arc::downgrade(&shared);
        let mut stop = shared.shutdown.subscribe();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = stop.changed() => return,
                    ev = events.recv() => ev,
                };
                let Some(shared) = weak.upgrade() else { return };
                match ev {
                    Ok(mqgate_core::EndpointEvent::Expired { group, .. }) => shared.expired(&group),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "AMQP: missed endpoint events");
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
        mqgate_core::net::accept_loop("AMQP", listener, stop, move |tcp, peer| {
            server.serve_stream(tcp, peer)
        })
    }

    /// Serve one client over any byte stream (TCP, TLS).
    pub fn serve_stream<S>(&self, stream: S, peer: SocketAddr)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        // Pending until its handshake succeeds: capped by `max_pending_handshakes` (the
        // oldest is evicted for it), never counted against `max_connections`.
        let pending = self.shared.gate.begin(peer);
        let shared = Arc::clone(&self.shared);
        tokio::spawn(crate::conn::run(shared, stream, peer, pending));
    }

    /// Open connections, for the admin API.
    pub fn connections(&self) -> Vec<mqgate_core::ConnectionInfo> {
        let mut v: Vec<_> = self
            .shared
            .conns
            .lock()
            .values()
            .map(|(i, _)| i.clone())
            .collect();
        v.sort_by_key(|i| i.id.parse::<u64>().unwrap_or(0));
        v
    }

    /// Close a connection (connection.close 320 CONNECTION_FORCED). Returns whether it
    /// was open.
    pub fn close(&self, id: &str) -> bool {
        let Ok(id) = id.parse::<u64>() else {
            return false;
        };
        match self.shared.conns.lock().get(&id) {
            Some((_, kick)) => kick.send(()).is_ok(),
            None => false,
        }
    }

    /// Declared queues, sorted by vhost and name (management API).
    pub fn queues(&self) -> Vec<QueueView> {
        let mut v: Vec<QueueView> = self
            .shared
            .queues
            .read()
            .values()
            .map(|q| view(q))
            .collect();
        v.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        v
    }

    /// Every declared queue: [`AmqpServer::queues`], and in a cluster those declared
    /// through other gateways too (their records read from every shard; consumer
    /// counts are this gateway's).
    pub async fn queues_everywhere(&self) -> Vec<QueueView> {
        let mut v = self.queues();
        if !self.shared.broker.clustered() {
            return v;
        }
        let mut known: std::collections::HashSet<(String, String)> = v
            .iter()
            .map(|q| (q.vhost.clone(), q.name.clone()))
            .collect();
        let mut after: Option<bytes::Bytes> = None;
        loop {
            let page = self
                .shared
                .broker
                .records_everywhere(crate::queue::NS_QUEUE, b"", after.as_deref(), 1024)
                .await;
            if !page.missing.is_empty() {
                tracing::debug!(shards = ?page.missing, "AMQP: queues of shards nobody answers for now are not listed");
            }
            let Some(last) = page.items.last() else { break };
            after = Some(last.0.clone());
            for (k, r) in &page.items {
                let Some(q) = Queue::from_record(
                    k,
                    r,
                    self.shared.cfg.default_retry_policy,
                    crate::queue::FOREIGN_OWNER,
                ) else {
                    continue;
                };
                if known.insert((q.vhost.clone(), q.name.clone())) {
                    v.push(view(&q));
                }
            }
        }
        v.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
        v
    }

    /// One declared queue.
    pub fn queue(&self, vhost: &str, name: &str) -> Option<QueueView> {
        self.shared.queue(vhost, name).map(|q| view(&q))
    }

    /// Active consumers, by connection, channel and tag.
    pub fn consumers(&self) -> Vec<ConsumerView> {
        self.shared.consumers.lock().values().cloned().collect()
    }

    /// Open channels: (connection id, channel number).
    pub fn channels(&self) -> Vec<(u64, u16)> {
        self.shared.channels.lock().iter().copied().collect()
    }

    /// The adapter's configuration (users' permissions, vhosts).
    pub fn config(&self) -> &AmqpConfig {
        &self.shared.cfg
    }

    /// Whether the exchange was declared `x-delayed-message`.
    pub fn exchange_delayed(&self, vhost: &str, name: &str) -> bool {
        self.shared.ex_meta(vhost, name).delayed
    }

    /// The adapter's counters.
    pub fn stats(&self) -> &AmqpStats {
        &self.shared.stats
    }

    /// Connections still in their handshake (capped by `max_pending_handshakes`).
    pub fn pending_handshakes(&self) -> usize {
        self.shared.gate.pending()
    }

    /// Close every connection (connection.close 320 CONNECTION_FORCED) and wait up to
    /// `grace` for them to end.
    pub async fn shutdown(&self, grace: Duration) {
        let _ = self.shared.shutdown.send(true);
        let dones: Vec<_> = self.shared.open.lock().values().cloned().collect();
        let wait = async {
            for mut d in dones {
                let _ = d.wait_for(|v| *v).await;
            }
        };
        let _ = tokio::time::timeout(grace, wait).await;
    }
}

fn view(q: &Queue) -> QueueView {
    let s = q.state.lock();
    QueueView {
        vhost: q.vhost.clone(),
        name: q.name.clone(),
        durable: q.durable,
        auto_delete: q.auto_delete,
        exclusive_owner: q.exclusive,
        arguments: q.raw_args.clone(),
        group: q.group.clone(),
        topic: q.topic.clone(),
        consumers: s.consumers,
        exclusive_consumer: s.exclusive_consumer,
        single_active: q.args.single_active,
    }
}

impl AmqpServer {
    /// Block publishing connections (connection.blocked) or, with `None`, unblock them:
    /// what the core's memory watermark does (for every protocol), by hand, for
    /// operators and tests. The reason clients are told is always the watermark's.
    pub fn set_blocked(&self, reason: Option<String>) {
        self.shared.broker.set_publishers_blocked(reason.is_some());
    }
}

impl AmqpStats {
    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        let r = std::sync::atomic::Ordering::Relaxed;
        self.connections_opened
            .load(r)
            .saturating_sub(self.connections_closed.load(r))
    }
}

impl Shared {
    /// A new consumer's member id in its queue's group. Unique across the gateways of a
    /// cluster (it names this run): a join with an id the group already has replaces
    /// that member, so two gateways counting from 1 cut each other's consumers off. And
    /// increasing with the time it was made, then this gateway's count, so the members of
    /// a single-active-consumer queue sort by when they came (ids compare as text) and
    /// the first keeps the queue.
    pub(crate) fn member_id(&self) -> String {
        let now = self.broker.now();
        let ms = self.member_ms.fetch_max(now, Ordering::Relaxed).max(now);
        let n = self.next_member.fetch_add(1, Ordering::Relaxed);
        format!("{ms:013}-{n:010}-{:016x}", self.incarnation)
    }
    pub(crate) fn queue(&self, vhost: &str, name: &str) -> Option<Arc<Queue>> {
        self.queues
            .read()
            .get(&(vhost.to_owned(), name.to_owned()))
            .cloned()
    }

    pub(crate) fn ex_meta(&self, vhost: &str, name: &str) -> ExMeta {
        let exchanges = self.exchanges.read();
        // Only delayed exchanges are kept: without one, a publish makes no key.
        if exchanges.is_empty() {
            return ExMeta::default();
        }
        exchanges
            .get(&(vhost.to_owned(), name.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// Declare a queue unless it exists (its topic, its record, its default-exchange
    /// binding), wherever its shard is owned: the queue created, or the queue as it
    /// exists (for the caller's equivalence checks).
    pub(crate) async fn create_queue(&self, q: Queue) -> Result<Declared, (u16, String)> {
        let internal = |e: CoreError| (reply::INTERNAL_ERROR, e.to_string());
        // Its topic, its group at the topic's end (a new queue starts empty even if a
        // topic of that name held messages) and its record: the core's declaration,
        // made once on the gateway owning the queue's shard.
        let key = Queue::key(&q.vhost, &q.name);
        let decl = EndpointDecl {
            topic: q.topic.clone(),
            queues: q.queue_count(),
            group: q.group.clone(),
            namespace: NS_QUEUE.to_owned(),
            key: Bytes::from(key.clone()),
            record: q.record(&self.run),
        };
        if let mqgate_core::Declared::Exists(rec) = self
            .broker
            .declare_endpoint_once(decl)
            .await
            .map_err(internal)?
        {
            let existing =
                Queue::from_record(&key, &rec, self.cfg.default_retry_policy, self.incarnation)
                    .ok_or_else(|| {
                        (
                            reply::INTERNAL_ERROR,
                            format!("queue '{}': its stored declaration is unreadable", q.name),
                        )
                    })?;
            return Ok(Declared::Exists(self.cache(existing)));
        }
        let q = Arc::new(q);
        self.broker
            .bind(
                &q.vhost,
                Binding {
                    source: String::new(),
                    destination: Destination::Topic(q.topic.clone()),
                    key: q.name.clone(),
                    headers: None,
                    mqtt: false,
                    arguments: Bytes::new(),
                },
                q.persistent(),
            )
            .await
            .map_err(internal)?;
        self.queues
            .write()
            .insert((q.vhost.clone(), q.name.clone()), Arc::clone(&q));
        Ok(Declared::Created(q))
    }

    /// Hold `q` as this gateway's handle of its queue: the one held already when it
    /// is the same declaration (its consumers are counted there), else `q`.
    pub(crate) fn cache(&self, q: Queue) -> Arc<Queue> {
        let mut queues = self.queues.write();
        let key = (q.vhost.clone(), q.name.clone());
        if let Some(cur) = queues.get(&key) {
            let same = cur.durable == q.durable
                && cur.exclusive.is_some() == q.exclusive.is_some()
                && cur.auto_delete == q.auto_delete
                && cur.raw_args == q.raw_args
                && !cur.state.lock().deleted;
            if same {
                return Arc::clone(cur);
            }
        }
        let q = Arc::new(q);
        if let Some(old) = queues.insert(key, Arc::clone(&q)) {
            old.state.lock().deleted = true;
        }
        q
    }

    /// A queue as the gateway owning its shard has it (in a cluster, where another
    /// gateway may have declared or deleted it): its record read there, held here.
    /// A broker of its own holds every queue already.
    pub(crate) async fn lookup_queue(
        &self,
        vhost: &str,
        name: &str,
    ) -> Result<Option<Arc<Queue>>, CoreError> {
        if !self.broker.clustered() {
            return Ok(self.queue(vhost, name));
        }
        let (topic, _) = queue_topic(vhost, name);
        let key = Queue::key(vhost, name);
        let rec = self.broker.endpoint_record(&topic, NS_QUEUE, &key).await?;
        let found = rec.and_then(|r| {
            Queue::from_record(&key, &r, self.cfg.default_retry_policy, self.incarnation)
        });
        Ok(match found {
            Some(q) => Some(self.cache(q)),
            None => {
                if let Some(old) = self
                    .queues
                    .write()
                    .remove(&(vhost.to_owned(), name.to_owned()))
                {
                    old.state.lock().deleted = true;
                }
                None
            }
        })
    }

    /// Delete a queue: its bindings, group (consumers are cancelled), topic and record.
    /// Returns how many messages it held.
    pub(crate) async fn delete_queue(&self, q: &Arc<Queue>) -> u32 {
        let count = self.ready_count(q).await;
        {
            let mut queues = self.queues.write();
            match queues.get(&(q.vhost.clone(), q.name.clone())) {
                Some(cur) if Arc::ptr_eq(cur, q) => {
                    queues.remove(&(q.vhost.clone(), q.name.clone()));
                }
                _ => return 0,
            }
        }
        q.state.lock().deleted = true;
        let mut record = Records::new();
        record.delete(NS_QUEUE, Queue::key(&q.vhost, &q.name));
        // Bindings, group (consumers end), topic and record; the core logs each failure.
        if let Err(e) = self
            .broker
            .delete_endpoint(&q.vhost, &q.topic, &q.group, record)
            .await
        {
            tracing::error!(queue = %q.name, vhost = %q.vhost, error = %e, "AMQP: deleting a queue failed");
        }
        count
    }

    /// Messages ready for delivery in a queue (RabbitMQ's message count).
    pub(crate) async fn ready_count(&self, q: &Queue) -> u32 {
        match self.broker.group_info(&q.group).await {
            Ok(info) => info.queues.iter().map(|i| i.ready).sum::<u64>() as u32,
            Err(_) => 0,
        }
    }

    /// Drop every ready message of a queue; returns how many.
    pub(crate) async fn purge(&self, q: &Queue) -> Result<u32, CoreError> {
        let n = self.ready_count(q).await;
        self.broker
            .reset_group(&q.group, StartPosition::Last)
            .await?;
        Ok(n)
    }

    /// The core deleted a queue unused for its `x-expires`: forget it (handles still
    /// held see it deleted).
    pub(crate) fn expired(&self, group: &mqgate_store::GroupName) {
        let q = {
            let mut queues = self.queues.write();
            let key = queues
                .iter()
                .find(|(_, q)| &q.group == group)
                .map(|(k, _)| k.clone());
            key.and_then(|k| queues.remove(&k))
        };
        if let Some(q) = q {
            tracing::info!(queue = %q.name, vhost = %q.vhost, "AMQP: queue expired (x-expires); deleted");
            q.state.lock().deleted = true;
        }
    }

    /// Declare an exchange as mqgate stores it; `delayed` marks `x-delayed-message`.
    pub(crate) fn exchange_def(
        name: &str,
        kind: mqgate_core::router::ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        args: &FieldTable,
        delayed: bool,
    ) -> ExchangeDef {
        let (enc, _) = cookie_factory::gen(
            amq_protocol::types::generation::gen_field_table(args),
            vec![u8::from(delayed)],
        )
        .expect("writing to a Vec cannot fail");
        ExchangeDef {
            name: name.to_owned(),
            kind,
            durable,
            auto_delete,
            internal,
            alternate: args
                .inner()
                .get("alternate-exchange")
                .and_then(crate::convert::str_value),
            arguments: Bytes::from(enc),
        }
    }

    pub(crate) fn conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

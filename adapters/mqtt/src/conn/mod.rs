//! One MQTT connection: the CONNECT handshake, then one task that reads packets, pulls
//! deliveries from the session's consumers and writes, without ever blocking on a slow
//! peer (writes are polled like reads; deliveries pause while output is backed up).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use mqgate_core::acl::{Access, Subject};
use mqgate_core::{AckToken, Consumer, Delivery};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::codec::{self, reason, Disconnect, Packet, Properties, QoS, SubOptions, Version, Will};
use crate::server::{Outbound, Shared};
use crate::session::{session_topic, SessionRecord, NS_SESSION};

use self::connect::{accept, read_connect};
use self::deliver::{poll_deliveries, DeliverySource};
use self::subindex::SubIndex;

mod connect;
mod deliver;
mod publish;
mod splice;
mod subindex;
mod subscribe;
mod will;

use mqgate_core::sockio::{Input, Output, QuickAck, DELIVERY_BURST, OUT_HIGH_WATER};

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

/// Retained messages still to send for one new subscription.
#[derive(Debug)]
struct RetainedTodo {
    sub: crate::session::Subscription,
    cursor: mqgate_core::RetainedCursor,
}

impl RetainedTodo {
    fn new(sub: crate::session::Subscription) -> Self {
        let cursor = mqgate_core::RetainedCursor::new(&sub.filter);
        Self { sub, cursor }
    }
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

/// What one stored batch answers: (packet id, QoS) of each publish, and whether each
/// matched a subscription.
type PubAcks = (Vec<(u16, QoS)>, Vec<bool>);

/// The connection's state after CONNECT. Its maps that are empty for most connections
/// (topic aliases, QoS 2 ids) are B-trees: 24 bytes empty, not 48 (a map that usually
/// holds one entry stays a hash map: a B-tree's first node has room for eleven).
struct Conn<S> {
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// The socket: read room and input, output and the write arm (shared with AMQP).
    input: Input<ReadHalf<S>>,
    output: Output<WriteHalf<S>>,
    version: Version,
    client_id: String,
    user: Option<String>,
    conn_id: u64,
    keep_alive: Option<Duration>,
    record: SessionRecord,
    /// Filter → its place in `record.subscriptions`.
    sub_index: SubIndex,
    session: Option<Consumer>,
    direct_rx: crate::qos0::Qos0Rx,
    kick_rx: mqgate_core::mailbox::Receiver<u8>,
    done: crate::server::Done,
    inflight: HashMap<u16, Inflight>,
    next_pkid: u16,
    send_quota: u16,
    client_max_packet: u32,
    client_alias_max: u16,
    /// What a connection that publishes holds (`None` until its first PUBLISH, or a
    /// resumed session's QoS 2 ids): boxed, so a connection that only subscribes, the
    /// usual idle one, does not carry it.
    publishing: Option<Box<Publishing>>,
    problem_info: bool,
    /// What few connections use (`None` until one of them is needed).
    rare: Option<Box<Rare>>,
    /// Whether the access rules can deny this client a message: each delivery's topic
    /// is checked then (no cost per message otherwise).
    check_reads: bool,
}

/// What woke a connection's loop ([`Conn::poll_event`]).
enum Event {
    /// Its kick mailbox: taken over, closed, moved, or the server stops (`None`: the
    /// sender is gone).
    Kick(Option<u8>),
    /// Output written.
    Wrote(std::io::Result<usize>),
    /// The memory watermark changed (a publishing connection).
    Memory,
    /// A store write is done: its publishes are acknowledged.
    Written(
        PubAcks,
        mqgate_core::Result<Vec<Option<mqgate_core::Published>>>,
    ),
    /// Input read.
    Read(std::io::Result<usize>),
    /// Retained messages are next to send.
    Retained,
    /// A QoS 0 message handed over directly.
    Direct(Option<Arc<mqgate_store::Message>>),
    /// A delivery of one of the session's consumers.
    Delivery(DeliverySource, Delivery),
}

/// Which of the loop's sources are looked at this turn.
struct Arms {
    write: bool,
    read: bool,
    retained: bool,
    direct: bool,
    deliveries: bool,
}

/// A step of the loop that awaits, boxed (`Some`: the connection ends).
type Step<'a> = std::pin::Pin<Box<dyn Future<Output = Option<End>> + Send + 'a>>;

/// What few connections use, boxed out of the connection's state (an idle subscriber,
/// the usual connection, has none of it).
#[derive(Default)]
struct Rare {
    /// The producer group of what it publishes: the CONNECT user property
    /// `x-producer-group` (5.0), else `mqtt`; a PUBLISH's own `x-producer-group`
    /// overrides it.
    producer_group: Option<Box<str>>,
    /// Its shared subscriptions, by a number of the connection's own.
    shared_subs: HashMap<u32, SharedSub>,
    next_shared: u32,
    /// Boxed: the rest of this is much smaller.
    will: Option<Box<Will>>,
    /// Topic aliases given to the client (5.0).
    aliases_out: BTreeMap<String, u16>,
    /// Retained messages still to send for new subscriptions, sent as the output buffer
    /// drains; the session's other deliveries wait behind them.
    retained_todo: std::collections::VecDeque<RetainedTodo>,
    /// Taken over by a Clean Start connection: the session ends here, so the will goes
    /// out now (a takeover that resumes the session sends none).
    will_at_takeover: bool,
}

impl Rare {
    /// Nothing in it, and never a shared subscription (their numbers are not reused
    /// while an acknowledgement may still name one).
    fn unused(&self) -> bool {
        self.producer_group.is_none()
            && self.next_shared == 0
            && self.will.is_none()
            && self.aliases_out.is_empty()
            && self.retained_todo.is_empty()
    }
}

/// A publishing connection's state.
struct Publishing {
    aliases_in: BTreeMap<u16, String>,
    inbound_qos2: BTreeSet<u16>,
    /// Publishes whose store write is queued, acknowledged in order once durable.
    writes: mqgate_core::Pipeline<PubAcks>,
    /// QoS 1 and 2 publishes in `writes` (they count against receive maximum).
    acks_pending: usize,
    /// The memory watermark: above it, the connection is not read.
    memory: MemoryWatch,
    /// The last topic published to and where it routed.
    route: mqgate_core::router::RouteMemo,
    /// The last topic's name and the client id, as messages carry them.
    names: publish::PublishNames,
}

impl Publishing {
    fn new(shared: &Shared) -> Self {
        Self {
            aliases_in: BTreeMap::new(),
            inbound_qos2: BTreeSet::new(),
            writes: shared
                .broker
                .publish_pipeline(mqgate_core::config::PUBLISH_PIPELINE_DEPTH),
            acks_pending: 0,
            memory: MemoryWatch::new(shared.broker.memory_blocked()),
            route: mqgate_core::router::RouteMemo::default(),
            names: publish::PublishNames::default(),
        }
    }

    /// The memory watermark's next change, or the oldest store write's answers
    /// (pending for a connection that has not published).
    fn poll(p: &mut Option<Box<Publishing>>, cx: &mut std::task::Context<'_>) -> Poll<Event> {
        let Some(p) = p else {
            return Poll::Pending;
        };
        if let Poll::Ready(rx) = p.memory.change.as_mut().poll(cx) {
            p.memory = MemoryWatch::new(rx);
            return Poll::Ready(Event::Memory);
        }
        p.writes
            .poll_next(cx)
            .map(|(acks, stored)| Event::Written(acks, stored))
    }

    /// Store writes in flight.
    fn writing(p: &Option<Box<Publishing>>) -> bool {
        p.as_ref().is_some_and(|p| !p.writes.is_empty())
    }
}

/// The broker's memory watermark as a connection that publishes sees it.
struct MemoryWatch {
    /// Publishers are blocked now.
    blocked: bool,
    /// Resolves when that changes, with the watch to go on with.
    change: std::pin::Pin<Box<dyn Future<Output = watch::Receiver<bool>> + Send>>,
}

impl MemoryWatch {
    fn new(mut rx: watch::Receiver<bool>) -> Self {
        let blocked = *rx.borrow_and_update();
        Self {
            blocked,
            change: Box::pin(async move {
                if rx.changed().await.is_err() {
                    // The broker is gone: nothing changes any more.
                    std::future::pending::<()>().await;
                }
                rx
            }),
        }
    }
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
///
/// Not an `async fn`: its arguments would stay in the task's state for as long as the
/// connection lives. The handshake runs in its own box, let go of once it is done, so
/// what an idle connection's task holds is the loop's wait and a few pointers.
pub(crate) fn run<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    pending: mqgate_core::net::Pending,
    quick: Option<QuickAck>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let handshake = Box::pin(handshake(shared, stream, peer, pending, quick));
    async move {
        // `admitted` counts it against limits.max_connections until it ends.
        let Some((mut conn, admitted)) = handshake.await else {
            return;
        };
        let shared = Arc::clone(&conn.shared);
        let end = conn.serve().await;
        let linger = Box::pin(conn.finish(end)).await;
        drop(admitted);
        shared
            .stats
            .connections_closed
            .fetch_add(1, Ordering::Relaxed);
        // The session is settled and the broker's state let go of (the store, for a
        // restart); only the socket's read half waits for the client to close.
        let stop = shared.shutdown.subscribe();
        drop(shared);
        if let Some(rd) = linger {
            Box::pin(discard_until_closed(rd, stop)).await;
        }
    }
}

/// CONNECT read and answered: the connection's state, or `None` when it ended there.
async fn handshake<S>(
    shared: Arc<Shared>,
    stream: S,
    peer: SocketAddr,
    pending: mqgate_core::net::Pending,
    quick: Option<QuickAck>,
) -> Option<(Box<Conn<S>>, mqgate_core::net::Admitted)>
where
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
        c = Box::pin(read_connect(&shared, &mut rd, &mut wr, &mut inbuf, peer)) => c,
        // A newer connection needed the slot (limits.max_pending_handshakes): closed.
        () = evicted.wait() => None,
    };
    let accepted = match read {
        Some((c, via)) => {
            Box::pin(accept(
                shared.clone(),
                rd,
                wr,
                inbuf,
                peer,
                *c,
                via,
                pending,
                quick,
            ))
            .await
        }
        None => None,
    };
    if accepted.is_none() {
        shared
            .stats
            .connections_closed
            .fetch_add(1, Ordering::Relaxed);
    }
    accepted
}

/// How long a connection the server ended (DISCONNECT with a reason code, or a 3.1.1
/// close) goes on reading what the client still sends, waiting for it to close.
const DISCONNECT_LINGER: Duration = Duration::from_secs(5);

/// After the server's DISCONNECT and its FIN: read and discard what the client still
/// sends until it closes (or [`DISCONNECT_LINGER`] passes, or the broker shuts down).
/// Closing a socket with unread data makes the kernel answer with a reset, and a
/// client still writing then sees its write fail ("broken pipe", "connection reset")
/// instead of reading the DISCONNECT that tells it why.
async fn discard_until_closed<R: AsyncRead + Unpin>(mut rd: R, mut stop: watch::Receiver<bool>) {
    let mut scratch = vec![0u8; 16 * 1024];
    let drain = async { while matches!(rd.read(&mut scratch).await, Ok(n) if n > 0) {} };
    tokio::select! {
        _ = tokio::time::timeout(DISCONNECT_LINGER, drain) => {}
        // Also when the adapter is gone (the sender dropped).
        _ = stop.wait_for(|s| *s) => {}
    }
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

    /// Whether the session's record is kept while it is connected: a persistent one's
    /// always; in a cluster a clean one's too (expiry 0), so that when its shard moves
    /// away (its gateway killed, or a planned move) the next owner finds it and the
    /// core deletes the session (its topic and bindings) at once, instead of leaving
    /// them, matching messages stored for nobody, until the same client id returns.
    fn keeps_record(&self) -> bool {
        self.persistent() || self.shared.broker.clustered()
    }

    fn send(&mut self, p: &Packet) {
        codec::encode(p, self.version, &mut self.output.out);
    }

    /// The connection's main loop.
    ///
    /// What it waits on while idle is the state of this loop's `select!` (a few
    /// pointers per branch): shutdown comes through the kick mailbox, the keep-alive
    /// timer and the memory watermark's watch live boxed in the connection (the
    /// watermark only for a connection that has published).
    async fn serve(&mut self) -> End {
        // Registered in `clients` before this check, so a shutdown either kicks it or
        // is seen here.
        if *self.shared.shutdown.borrow() {
            return End::Server(reason::SERVER_SHUTTING_DOWN, "server shutting down".into());
        }
        // Packets sent right behind CONNECT, in the same read.
        if !self.input.buf.is_empty() {
            if let Err(end) = Box::pin(self.handle_input()).await {
                return end;
            }
        }
        // The handshake's buffer (1 KiB) is not kept by a connection that goes idle
        // after the packets it carried (a client that sent SUBSCRIBE behind CONNECT).
        self.input.settle();
        loop {
            // Above the memory watermark a connection that publishes is not read (MQTT
            // has no blocked packet: TCP pushes back on the client) and its keep alive
            // waits.
            let held = self.publishing.as_ref().is_some_and(|p| p.memory.blocked);
            let window_open = self.inflight.len() < usize::from(self.send_quota);
            let may_deliver = self.output.may_deliver();
            let retained_first = self.retained_pending();
            let arms = Arms {
                write: self.output.pending(),
                read: self.output.may_read() && !held,
                retained: retained_first && may_deliver && window_open,
                direct: may_deliver && !retained_first,
                deliveries: may_deliver && window_open && !retained_first,
            };
            self.input.prepare();
            // What awaits runs boxed, after the event is let go: the task an idle
            // connection keeps is this wait (the event's poll holds only references).
            let step: Option<Step<'_>> = {
                let event = std::future::poll_fn(|cx| self.poll_event(cx, &arms)).await;
                match event {
                    Event::Kick(r) => {
                        let code = r.unwrap_or(reason::SESSION_TAKEN_OVER);
                        if code == reason::SERVER_SHUTTING_DOWN {
                            return End::Server(code, "server shutting down".into());
                        }
                        if code == reason::KEEP_ALIVE_TIMEOUT {
                            if self.keep_alive_overdue(held) {
                                return End::Server(code, "keep alive timeout".into());
                            }
                            None
                        } else {
                            Some(Box::pin(self.kicked(code)))
                        }
                    }
                    Event::Wrote(Ok(0) | Err(_)) | Event::Read(Ok(0) | Err(_)) => {
                        return End::Closed
                    }
                    Event::Wrote(Ok(n)) => {
                        self.shared
                            .stats
                            .bytes_out
                            .fetch_add(n as u64, Ordering::Relaxed);
                        None
                    }
                    Event::Memory => {
                        // Its keep alive waited while it was held: it starts again.
                        self.input.last = Instant::now();
                        self.keep_alive_from(self.input.last);
                        None
                    }
                    Event::Written(acks, stored) => {
                        let this = &mut *self;
                        Some(Box::pin(async move {
                            this.acknowledge(acks, stored).await.err()
                        }))
                    }
                    Event::Read(Ok(n)) => {
                        self.shared
                            .stats
                            .bytes_in
                            .fetch_add(n as u64, Ordering::Relaxed);
                        self.keep_alive_from(self.input.last);
                        Some(Box::pin(self.after_read()))
                    }
                    Event::Retained => {
                        let this = &mut *self;
                        Some(Box::pin(async move {
                            this.send_retained().await;
                            None
                        }))
                    }
                    Event::Direct(m) => {
                        if let Some(m) = m {
                            self.deliver_direct(&m);
                            self.deliver_burst();
                        }
                        None
                    }
                    Event::Delivery(src, d) => {
                        self.deliver(src, d);
                        self.deliver_burst();
                        None
                    }
                }
            };
            if let Some(step) = step {
                if let Some(end) = step.await {
                    return end;
                }
            }
        }
    }

    /// What woke the loop, looked at in this order (a biased `select!` written out: each
    /// source is a poll over a field, so waiting holds no future but the references).
    fn poll_event(&mut self, cx: &mut std::task::Context<'_>, arms: &Arms) -> Poll<Event> {
        if let Poll::Ready(r) = self.kick_rx.poll_recv(cx) {
            return Poll::Ready(Event::Kick(r));
        }
        // Store answers before the write: groups made durable by one sync are answered
        // together, their PUBACKs in one write (bounded: a group is answered at most
        // once, and new ones need a read, looked at after the write).
        if let Poll::Ready(e) = Publishing::poll(&mut self.publishing, cx) {
            return Poll::Ready(e);
        }
        if arms.write {
            if let Poll::Ready(w) = self.output.poll_write_some(cx) {
                return Poll::Ready(Event::Wrote(w));
            }
        }
        if arms.read {
            if let Poll::Ready(r) = self.input.poll_read_some(cx) {
                return Poll::Ready(Event::Read(r));
            }
        }
        if arms.retained {
            return Poll::Ready(Event::Retained);
        }
        if arms.direct {
            if let Poll::Ready(m) = self.direct_rx.poll_recv(cx) {
                return Poll::Ready(Event::Direct(m));
            }
        }
        if arms.deliveries {
            if let Poll::Ready((src, d)) =
                poll_deliveries(&mut self.session, self.rare.as_deref_mut(), cx)
            {
                return Poll::Ready(Event::Delivery(src, d));
            }
        }
        Poll::Pending
    }

    /// What few connections use, made when first needed.
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_with(Box::default)
    }

    /// The shared subscription numbered `id`.
    fn shared_sub(&self, id: u32) -> Option<&SharedSub> {
        self.rare.as_ref()?.shared_subs.get(&id)
    }

    /// Retained messages of new subscriptions wait to be sent.
    fn retained_pending(&self) -> bool {
        self.rare
            .as_ref()
            .is_some_and(|r| !r.retained_todo.is_empty())
    }

    /// The keep-alive sweep kicked it: whether it has read nothing for its allowance
    /// (by its own clock: a read may have raced the sweep). Not while it is held at the
    /// memory watermark (it is not read then). If not, the sweep's clock is set right.
    fn keep_alive_overdue(&mut self, held: bool) -> bool {
        let now = Instant::now();
        match self.keep_alive {
            Some(k) if !held && now >= self.input.last + k => true,
            _ => {
                let from = if held { now } else { self.input.last };
                self.keep_alive_from(from);
                false
            }
        }
    }

    /// Tell the keep-alive sweep that the connection's allowance runs from `at`.
    fn keep_alive_from(&self, at: Instant) {
        self.done.keep_alive().touch(self.shared.millis(at));
    }

    /// The session record's copy of the QoS 2 ids received and awaiting PUBREL.
    fn record_inbound_qos2(&mut self) {
        self.record.inbound_qos2 = self
            .publishing
            .as_ref()
            .map(|p| p.inbound_qos2.iter().copied().collect())
            .unwrap_or_default();
    }

    /// Kicked (taken over, closed by an administrator, moved): what the client sent
    /// before comes first, a DISCONNECT or a close already in the socket ends the session
    /// the way the client asked (expiry, will), not as a takeover.
    async fn kicked(&mut self, code: u8) -> Option<End> {
        if let Some(end) = self.handle_arrived().await {
            return Some(end);
        }
        let code = if code == TAKEN_OVER_CLEAN_START {
            if let Some(r) = self.rare.as_mut() {
                r.will_at_takeover = true;
            }
            reason::SESSION_TAKEN_OVER
        } else {
            code
        };
        let why = match code {
            ADMINISTRATIVE_ACTION => "closed by an administrator",
            USE_ANOTHER_SERVER => "the session moved to another gateway",
            _ => "session taken over",
        };
        Some(End::Server(code, why.into()))
    }

    /// Handle what a read brought.
    async fn after_read(&mut self) -> Option<End> {
        if let Err(end) = self.handle_input().await {
            return Some(end);
        }
        self.input.settle();
        // A client that publishes without pause still gets its deliveries: the read
        // wins every turn of the loop.
        self.deliver_burst();
        None
    }

    /// Handle what the socket already holds, without waiting for more: `Some` when it
    /// ends the connection (a DISCONNECT, a protocol error, the client's close).
    async fn handle_arrived(&mut self) -> Option<End> {
        // Bounded: a client writing without pause must not keep a takeover waiting.
        for _ in 0..16 {
            self.input.prepare();
            match tokio::time::timeout(Duration::ZERO, self.input.read_some()).await {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(End::Closed),
                Ok(Ok(n)) => {
                    self.shared
                        .stats
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                    if let Err(end) = self.handle_input().await {
                        return Some(end);
                    }
                }
            }
        }
        None
    }

    /// Decode and handle every whole packet in the input buffer. Publishes read together
    /// are stored together (one write), then acknowledged in order.
    async fn handle_input(&mut self) -> Result<(), End> {
        let max = self.shared.cfg.max_packet_size;
        let mut batch: Vec<(Outbound, u16, QoS)> = Vec::new();
        let result = loop {
            let packet = match codec::decode(&mut self.input.buf, Some(self.version), max) {
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
                    // Keep order: what was published before this packet is stored
                    // first, and acknowledged before anything but an acknowledgement
                    // or a ping is handled.
                    if !batch.is_empty() {
                        self.flush_publishes(std::mem::take(&mut batch)).await?;
                    }
                    if !matches!(other, Packet::Ack(_) | Packet::PingReq) {
                        self.settle_writes().await?;
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

    async fn save_record(&mut self) {
        self.record_inbound_qos2();
        let mut b = mqgate_core::Records::new();
        b.put(
            NS_SESSION,
            Bytes::copy_from_slice(self.client_id.as_bytes()),
            self.record.encode(),
        );
        let topic = session_topic(&self.client_id);
        if let Err(e) = self.shared.broker.write_endpoint_records(&topic, b).await {
            tracing::error!(client = %self.client_id, error = %e, "MQTT: saving the session failed");
        }
    }

    // -----------------------------------------------------------------------------------
    // The end

    /// End the connection: the server's DISCONNECT written, flushed and followed by
    /// the write half's shutdown (FIN); then the session settled. Returns the read half
    /// when the server ended it, to read what the client still sends until it closes
    /// ([`discard_until_closed`]).
    async fn finish(mut self, end: End) -> Option<ReadHalf<S>> {
        // Writes in flight finish first: their PUBACKs go out before a DISCONNECT.
        if let Err(e) = self.settle_writes().await {
            tracing::debug!(client = %self.client_id, ?e, "MQTT: a write in flight failed at the end");
        }
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
        // Bounded: a half-open TLS or WebSocket peer (or a client that reads nothing)
        // must not hold up the session's end (a takeover waits for it, then cancels the
        // will and claims the session).
        // (TLS and WebSocket streams hold what was written until flushed: it flushes.)
        let _ = tokio::time::timeout(Duration::from_secs(1), self.output.write_all_pending()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), self.output.wr.shutdown()).await;
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
        if let Some(rare) = &mut self.rare {
            rare.shared_subs.clear();
        }

        let taken_over = matches!(end, End::Server(reason::SESSION_TAKEN_OVER, _));
        // A session moving to another gateway did not fail: its client comes back. A
        // takeover sends the will only when the session ends with it: none is kept (5.0
        // expiry 0, a 3.1.1 clean session), or the new connection starts clean; one that
        // resumes the session is the client's return (5.0 3.1.2.5, 3.1.3.2.2), and
        // Mosquitto sends nothing then either.
        let will_at_takeover = self.rare.as_ref().is_some_and(|r| r.will_at_takeover);
        let publish_will = match end {
            End::Client { will: false } | End::Server(USE_ANOTHER_SERVER, _) => false,
            _ if taken_over => self.record.expiry == 0 || will_at_takeover,
            _ => true,
        };
        let will = self.rare.as_mut().and_then(|r| r.will.take());
        if let Some(will) = will.filter(|_| publish_will) {
            let delay = if taken_over {
                0
            } else {
                will.properties
                    .will_delay
                    .unwrap_or(0)
                    .min(self.record.expiry)
            };
            self.schedule_will(*will, delay).await;
        }
        if matches!(end, End::Server(USE_ANOTHER_SERVER, _)) {
            // Its shard moved: the session is its next owner's now (its record is in
            // the shard, which manages its expiry there). Nothing is written from
            // here, or a late write could undo the reconnected client's session.
        } else if self.record.expiry == 0 {
            // A session without an expiry ends with its connection, a taken-over one
            // too (the new connection waits for this): a Clean Start 0 connection must
            // not inherit its subscriptions, their identifiers or its messages (5.0
            // 3.1.2.11.2 and 3.1.4-3/4; 3.1.1 3.1.2.4: a clean session's state is never
            // reused), as Mosquitto does.
            let rec = self.record.clone();
            self.shared
                .destroy_session(&self.client_id, Some(&rec))
                .await;
        } else {
            self.record.disconnected_at = self.shared.now();
            self.save_record().await;
            if self.record.expiry != u32::MAX && !taken_over {
                // The core deletes it once unused for its expiry.
                self.shared
                    .broker
                    .register_endpoint(crate::server::Shared::session_endpoint(
                        &self.client_id,
                        self.record.expiry,
                    ));
                self.shared.expiring.lock().insert(self.client_id.clone());
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
        self.done.set();
        matches!(end, End::Server(..)).then_some(self.input.rd)
    }
}

/// A kick, not a reason code on the wire: taken over by a connection with Clean Start,
/// which ends the session (the old client is sent 0x8E, session taken over).
pub(crate) const TAKEN_OVER_CLEAN_START: u8 = 0x01;
/// DISCONNECT reason code 0x98: closed by an administrator (admin API).
pub(crate) const ADMINISTRATIVE_ACTION: u8 = 0x98;
/// DISCONNECT reason code 0x9C: use another server (the session's shard moved to
/// another gateway of the cluster; the client's reconnect finds it there).
pub(crate) const USE_ANOTHER_SERVER: u8 = 0x9C;

#[cfg(test)]
mod tests {
    /// An idle connection's state is one 512-byte allocation (ARCHITECTURE.md, "What an
    /// idle MQTT connection costs"): a field more must make room for itself.
    #[test]
    fn a_connection_state_fits_512_bytes() {
        type Tcp = mqgate_core::net::Counted<tokio::net::TcpStream>;
        let size = std::mem::size_of::<super::Conn<Tcp>>();
        assert!(size <= 512, "Conn is {size} bytes");
    }
}

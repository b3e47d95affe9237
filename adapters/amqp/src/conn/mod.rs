//! One AMQP connection: the handshake, then a task that reads frames, runs each
//! channel's state machine, and pulls deliveries from the core for its consumers.

mod access;
mod basic;
mod channel;
mod deliver;
mod exchange;
mod handshake;
mod publish;
mod queue;

use std::collections::{BTreeMap, HashMap};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::ShortString;
use bytes::{Bytes, BytesMut};
use mqgate_core::{AckToken, Consumer, CoreError, Delivery, TopicList};
use mqgate_store::{GroupName, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Permission;
use crate::frame::{self, ContentHeader, Frame, FrameError};
use crate::queue::Queue;
use crate::reply;
use crate::server::Shared;

use self::handshake::handshake;

use mqgate_core::sockio::{Input, Output, DELIVERY_BURST, OUT_HIGH_WATER};

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
            client: std::mem::take(&mut conn.client).into_boxed_slice(),
        };
        shared.conns.lock().insert(id, (info, kick));
        let end = conn.serve(kicked).await;
        shared.conns.lock().remove(&id);
        conn.finish(end).await;
        shared.channels.lock().retain(|c| c.0 != id);
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

/// A publish whose content is arriving.
struct Pending {
    exchange: String,
    routing_key: String,
    mandatory: bool,
    header: Option<Box<ContentHeader>>,
    body: BytesMut,
    /// A body that came in one frame, kept as it was read.
    whole: Option<Bytes>,
}

/// Bodies of at least this many bytes that arrive in one frame are not copied.
const SHARE_BODY_BYTES: usize = 1024;

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
    topics: TopicList,
}

/// One consumer (or the pull member of basic.get) of a channel.
struct Cons {
    tag: String,
    queue: Arc<Queue>,
    consumer: Consumer,
    no_ack: bool,
    get: bool,
    /// The per-consumer basic.qos it started under, for a manual-ack consumer (it also
    /// draws on the channel's credit, and its own prefetch follows the global limit);
    /// `None` for the others.
    asked_prefetch: Option<u16>,
    /// A stream queue's consumer: its own group, deleted on cancel.
    stream_group: Option<GroupName>,
    unacked: usize,
    cancelled: bool,
    /// basic.consume with exclusive.
    exclusive: bool,
    /// Listed for the management API while it lives (basic.consume only).
    _listed: Option<crate::server::Listed>,
}

struct Unacked {
    cons: u64,
    token: AckToken,
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
    /// The same limit as credit every manual-ack consumer of the channel draws on in
    /// its queue's group (made at the first consume): shared across the channel's
    /// queues, and followed by consumers already started when basic.qos changes it.
    credit: Option<Arc<mqgate_core::CreditPool>>,
    /// channel.flow: false stops deliveries.
    flow_paused: bool,
}

/// A connection's channels by number.
type Channels = HashMap<u16, Channel, ChannelHash>;

/// Channel numbers hashed by one multiply: SipHash was ~0.5 % of the broker's CPU on
/// 4 KiB messages (a look-up or two per frame). The numbers are the client's own, on its
/// own connection, at most `channel_max`: there is nothing for it to flood but itself.
#[derive(Clone, Copy, Default)]
struct ChannelHash;

impl std::hash::BuildHasher for ChannelHash {
    type Hasher = ChannelHasher;

    fn build_hasher(&self) -> ChannelHasher {
        ChannelHasher(0)
    }
}

struct ChannelHasher(u64);

impl std::hash::Hasher for ChannelHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

struct Conn<S> {
    shared: Arc<Shared>,
    id: u64,
    peer: SocketAddr,
    user: String,
    perm: Permission,
    vhost: String,
    /// The socket: read room and input, output and the write arm (shared with MQTT).
    input: Input<ReadHalf<S>>,
    output: Output<WriteHalf<S>>,
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    cancel_notify: bool,
    /// The client property `producer_group`: the producer group of what this
    /// connection publishes (a message's `x-producer-group` header overrides it).
    producer_group: Option<String>,
    /// The client understands connection.blocked.
    blocked_notify: bool,
    /// Its client properties with text values (listed by the management API).
    client: Vec<(String, String)>,
    /// It has published: the memory watermark stops reading from it.
    published: bool,
    /// The names its last publish carried (reused while they repeat).
    names: crate::convert::PublishNames,
    channels: Channels,
    exclusive: Vec<Arc<Queue>>,
    batch: Vec<Batched>,
    /// Batches whose store write is queued, with the confirms each answers
    /// (channel, sequence number, item): confirmed in order once durable.
    writes: mqgate_core::Pipeline<Vec<(u16, u64, usize)>>,
    next_consumer: u64,
    /// The heartbeat timer (sending one, and the client's deadline).
    hb_timer: mqgate_core::sockio::Timer,
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
        if !self.input.buf.is_empty() {
            if let Err(end) = self.handle_input().await {
                return end;
            }
        }
        let hb = (self.heartbeat > 0).then(|| Duration::from_secs(self.heartbeat as u64));
        loop {
            self.input.prepare();
            let may_deliver = self.output.may_deliver();
            let is_blocked = *blocked.borrow_and_update();
            if is_blocked != told_blocked && self.blocked_notify {
                let m = if is_blocked {
                    connection::AMQPMethod::Blocked(connection::Blocked {
                        reason: "low on memory".into(),
                    })
                } else {
                    connection::AMQPMethod::Unblocked(connection::Unblocked {})
                };
                frame::put_method(&mut self.output.out, 0, AMQPClass::Connection(m));
            }
            told_blocked = is_blocked;
            let held = is_blocked && self.published;
            let may_read = self.output.may_read() && !held;
            let has_out = self.output.pending();
            let hb_send = hb.map(|h| self.output.last + h / 2);
            // A connection not read while blocked is not missing heartbeats (RabbitMQ
            // pauses its heartbeat monitor too).
            let hb_dead = hb.filter(|_| !held).map(|h| self.input.last + h * 2);
            // One timer for both, moved on only when it fires (not made and dropped on
            // every turn of the loop).
            let hb_next = match (hb_send, hb_dead) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            tokio::select! {
                biased;
                _ = blocked.changed() => {
                    self.input.last = Instant::now();
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
                // Store answers before the write: batches made durable by one sync are
                // confirmed in one write (bounded: new batches need a read, below).
                (confirms, stored) = self.writes.next(), if !self.writes.is_empty() => {
                    self.confirm(confirms, stored);
                }
                w = self.output.write_some(), if has_out => match w {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => {
                        self.shared.stats.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
                    }
                },
                r = self.input.read_some(), if may_read => match r {
                    Ok(0) | Err(_) => return End::Closed,
                    Ok(n) => {
                        self.shared.stats.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
                        if let Err(end) = self.handle_input().await {
                            return end;
                        }
                        self.input.settle();
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
                () = mqgate_core::sockio::expired(&mut self.hb_timer, hb_next) => {
                    let now = Instant::now();
                    if hb_dead.is_some_and(|d| now >= d) {
                        tracing::info!(peer = %self.peer, user = %self.user, "AMQP: missed heartbeats from client; connection closed");
                        return End::Closed;
                    }
                    if hb_send.is_some_and(|d| now >= d) {
                        if !self.output.pending() {
                            frame::put_heartbeat(&mut self.output.out);
                        }
                        self.output.last = now;
                    }
                }
            }
        }
    }

    /// Deliver what the consumers have ready now, up to a burst.
    fn deliver_burst(&mut self) {
        for _ in 0..DELIVERY_BURST {
            if self.output.len() >= OUT_HIGH_WATER {
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
            let f = match frame::decode(&mut self.input.buf, self.frame_max) {
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
                // Reserved at the first body frame that is copied.
                p.body = BytesMut::new();
                p.whole = None;
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
                if p.body.is_empty() && b.len() as u64 == want && b.len() >= SHARE_BODY_BYTES {
                    // A large body in one frame (the common case under frame_max): keep
                    // the bytes as they came, a view of the socket's read buffer, no copy
                    // (small ones are copied, so a stored message never pins a read
                    // buffer many times its size).
                    p.whole = Some(b);
                } else {
                    if p.body.is_empty() {
                        p.body.reserve(want as usize);
                    }
                    p.body.extend_from_slice(&b);
                }
                if p.whole.is_some() || p.body.len() as u64 == want {
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
                // Confirms of what it published come before close-ok.
                self.flush_batch().await?;
                self.settle_writes().await;
                frame::put_method(
                    &mut self.output.out,
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                );
                Err(End::ClientClosed)
            }
            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)) => Err(End::Closed),
            AMQPClass::Connection(connection::AMQPMethod::UpdateSecret(_)) => {
                frame::put_method(
                    &mut self.output.out,
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

    /// The connection ends: exclusive queues go, consumers leave (their unacked
    /// messages go back to their queues).
    async fn finish(mut self, end: End) {
        // Writes in flight finish (their topics woken); confirms go out before a close.
        self.settle_writes().await;
        match &end {
            End::Error(code, text, class, method) => {
                frame::put_method(
                    &mut self.output.out,
                    0,
                    close_method(*code, text, *class, *method),
                );
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = self.output.write_all_pending().await;
                    // Wait briefly for close-ok (or the client closing).
                    let mut scratch = [0u8; 512];
                    let _ = self.input.rd.read(&mut scratch).await;
                })
                .await;
            }
            End::ClientClosed => {
                let _ = self.output.write_all_pending().await;
            }
            End::Closed => {}
        }
        if !matches!(end, End::ClientClosed) {
            let _ = self.output.wr.shutdown().await;
        }
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
        if matches!(end, End::ClientClosed) {
            // The peer that sent connection.close closes the socket after close-ok
            // (AMQP 0-9-1 4.2.2): what it still sends is read and discarded until it
            // does (or for at most CLOSE_LINGER), so its writes do not fail.
            let mut scratch = [0u8; 4096];
            let _ = tokio::time::timeout(CLOSE_LINGER, async {
                while matches!(self.input.rd.read(&mut scratch).await, Ok(n) if n > 0) {}
            })
            .await;
            let _ = self.output.wr.shutdown().await;
        }
    }
}

/// How long a connection the client closed waits for the client to close its socket.
const CLOSE_LINGER: Duration = Duration::from_secs(5);

/// The next delivery from any consumer allowed to receive one; `None` for a consumer
/// whose group ended (its queue was deleted).
async fn poll_deliveries(channels: &mut Channels) -> (u16, u64, Option<Delivery>) {
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

fn try_deliveries(channels: &mut Channels) -> Option<(u16, u64, Option<Delivery>)> {
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

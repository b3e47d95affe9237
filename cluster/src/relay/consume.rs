//! The consume relay: a member on one gateway of a group whose shard another gateway
//! owns (`docs/design/sharding.md` section 4).
//!
//! ```text
//!  member's gateway                                 owner of the group's shard
//!   Broker::subscribe ─ClusterLink::subscribe─>
//!     Join {deliver_to, spec, member} ──s.NN.grp──> broker.subscribe (a local member)
//!                         <─────── {handle} ──────  + a pump task for it
//!   mailbox of the Consumer  <──── deliver_to ────  pump: deliveries in batches,
//!     (seq checked: a gap is      {handle, seq,       numbered; credit is the member's
//!      reported lost)              deliveries}        prefetch, as for any member
//!   acks, nacks, prefetch,
//!   heartbeat ─ Cmds {handle, received_through, ──> applied to the local member;
//!                lost, acks, nacks, prefetch?}        batches up to received_through
//!                                                     settled, lost ones requeued
//! ```
//! Loss never loses a message, it delivers it again: a lost delivery batch is reported
//! (a gap) or not covered by `received_through` in time, and its messages are nacked
//! with requeue on the owner; lost commands are sent again; a member not heard from for
//! 4 x the relay timeout is dropped on the owner (its messages in flight go to the
//! others, `redelivered`); an owner gone or moved (its pump ends, commands fail) makes
//! the member join the next owner, from the group's committed offsets. Acks of what
//! the member held before become stale there and are ignored: duplicates, never loss.
//!
//! Requests (`s.NN.grp`): `1` join: deliver_to, spec (name, topics, mode u8, orderly
//! u8, start: tag u8 + u64, on failure u8, max reconsume times?, policy: ttl?, delivery
//! limit?, max length?, max bytes?, overflow u8), member (id, prefetch u32, heartbeat
//! u8, exact u8); `2` commands: handle u64, received through u64, lost: count, seqs;
//! acks: count, (topic, queue u32, offset u64, token u64); nacks: the same + requeue
//! u8; prefetch?; leave u8. Replies: `0` ok (join: handle u64); `1` error (as
//! `codec::encode_error`). Deliveries (to deliver_to, no reply): `1` batch: handle,
//! seq, count, per delivery: topic, queue u32, offset u64, redelivered u8, delivery
//! count u32, token u64, message (`mqgate_store::wire`); `2` ended: handle.
//!
//! A dead-letter target is not carried: the owner uses the endpoint registered there
//! (`Broker::endpoint_spec`), whose spec is authoritative.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures_util::StreamExt;
use mqgate_core::endpoint::{Overflow, Policy};
use mqgate_core::outbox::ShardId;
use mqgate_core::{
    AckToken, Broker, ConsumeMode, Consumer, CoreError, Delivery, GroupSpec, MemberOptions,
    OnFailure, RemoteControl, Result, StartPosition,
};
use mqgate_store::{GroupName, QueueId, QueueOffset, QueueRef};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::codec::{decode_error, encode_error, put_bytes, Reader};
use super::subject;

const OP_JOIN: u8 = 1;
const OP_CMDS: u8 = 2;
const REPLY_OK: u8 = 0;
const REPLY_ERR: u8 = 1;
const DLV_BATCH: u8 = 1;
const DLV_ENDED: u8 = 2;

/// A member reports at most this many lost batches at once (more: the batch is
/// ignored as malformed; its messages come again).
const MAX_GAP: u64 = 4096;

/// A delivery batch holds at most this many messages ...
const BATCH_COUNT: usize = 256;
/// ... and about this many bytes of them.
const BATCH_BYTES: usize = 256 * 1024;

fn invalid(what: impl Into<String>) -> CoreError {
    CoreError::Invalid(format!("consume relay: {}", what.into()))
}

fn put_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => {
            out.put_u8(1);
            out.put_u64(v);
        }
        None => out.put_u8(0),
    }
}

fn opt_u64(r: &mut Reader) -> Result<Option<u64>> {
    match r.u8()? {
        0 => Ok(None),
        1 => r.u64().map(Some),
        k => Err(invalid(format!("option tag {k}"))),
    }
}

fn encode_spec(out: &mut Vec<u8>, spec: &GroupSpec) {
    put_bytes(out, spec.name.as_str().as_bytes());
    super::codec::put_topics(out, &spec.topics);
    out.put_u8(match spec.mode {
        ConsumeMode::Clustering => 0,
        ConsumeMode::Shared => 1,
        ConsumeMode::Broadcast => 2,
    });
    out.put_u8(u8::from(spec.orderly));
    let (tag, v) = match spec.start {
        StartPosition::First => (0, 0),
        StartPosition::Last => (1, 0),
        StartPosition::Timestamp(t) => (2, t),
        StartPosition::Offset(o) => (3, o),
        StartPosition::LastStored => (4, 0),
    };
    out.put_u8(tag);
    out.put_u64(v);
    out.put_u8(match spec.on_failure {
        OnFailure::Retry => 0,
        OnFailure::Discard => 1,
    });
    put_opt_u64(out, spec.max_reconsume_times.map(u64::from));
    let p = &spec.policy;
    put_opt_u64(out, p.message_ttl);
    put_opt_u64(out, p.delivery_limit.map(u64::from));
    put_opt_u64(out, p.max_length);
    put_opt_u64(out, p.max_length_bytes);
    out.put_u8(match p.overflow {
        Overflow::DropHead => 0,
        Overflow::RejectPublish => 1,
        Overflow::RejectPublishDlx => 2,
    });
}

fn u32_of(v: Option<u64>) -> Result<Option<u32>> {
    v.map(|v| u32::try_from(v).map_err(|_| invalid("a count out of range")))
        .transpose()
}

fn decode_spec(r: &mut Reader) -> Result<GroupSpec> {
    let name = GroupName::new(r.string()?).map_err(|e| invalid(e.to_string()))?;
    let topics = r.topics()?;
    let mode = match r.u8()? {
        0 => ConsumeMode::Clustering,
        1 => ConsumeMode::Shared,
        2 => ConsumeMode::Broadcast,
        k => return Err(invalid(format!("mode {k}"))),
    };
    let mut spec = GroupSpec::new(name, topics, mode);
    spec.orderly = r.u8()? != 0;
    let tag = r.u8()?;
    let v = r.u64()?;
    spec.start = match tag {
        0 => StartPosition::First,
        1 => StartPosition::Last,
        2 => StartPosition::Timestamp(v),
        3 => StartPosition::Offset(v),
        4 => StartPosition::LastStored,
        k => return Err(invalid(format!("start {k}"))),
    };
    spec.on_failure = match r.u8()? {
        0 => OnFailure::Retry,
        1 => OnFailure::Discard,
        k => return Err(invalid(format!("on failure {k}"))),
    };
    spec.max_reconsume_times = u32_of(opt_u64(r)?)?;
    spec.policy = Policy {
        message_ttl: opt_u64(r)?,
        delivery_limit: u32_of(opt_u64(r)?)?,
        dead_letter: None,
        max_length: opt_u64(r)?,
        max_length_bytes: opt_u64(r)?,
        overflow: match r.u8()? {
            0 => Overflow::DropHead,
            1 => Overflow::RejectPublish,
            2 => Overflow::RejectPublishDlx,
            k => return Err(invalid(format!("overflow {k}"))),
        },
    };
    Ok(spec)
}

fn encode_member(out: &mut Vec<u8>, m: &MemberOptions) {
    put_bytes(out, m.id.as_bytes());
    out.put_u32(u32::try_from(m.prefetch).unwrap_or(u32::MAX));
    out.put_u8(u8::from(m.heartbeat));
    out.put_u8(u8::from(m.exact_prefetch));
}

fn decode_member(r: &mut Reader) -> Result<MemberOptions> {
    let mut m = MemberOptions::new(r.string()?, r.u32()? as usize);
    m.heartbeat = r.u8()? != 0;
    m.exact_prefetch = r.u8()? != 0;
    Ok(m)
}

fn encode_join(deliver_to: &str, spec: &GroupSpec, member: &MemberOptions) -> Bytes {
    let mut out = vec![OP_JOIN];
    put_bytes(&mut out, deliver_to.as_bytes());
    encode_spec(&mut out, spec);
    encode_member(&mut out, member);
    Bytes::from(out)
}

fn put_token(out: &mut Vec<u8>, t: &AckToken) {
    put_bytes(out, t.queue().topic.as_str().as_bytes());
    out.put_u32(t.queue().queue.0);
    out.put_u64(t.offset());
    out.put_u64(t.token());
}

fn token(r: &mut Reader) -> Result<AckToken> {
    let topic = r.topic()?;
    let queue = QueueId(r.u32()?);
    Ok(AckToken::from_parts(
        QueueRef { topic, queue },
        r.u64()?,
        r.u64()?,
    ))
}

/// What a member's gateway tells the owner, in one request.
#[derive(Debug, Default, Clone, PartialEq)]
struct Cmds {
    handle: u64,
    received_through: u64,
    lost: Vec<u64>,
    acks: Vec<AckToken>,
    nacks: Vec<(AckToken, bool)>,
    prefetch: Option<u32>,
    leave: bool,
}

fn encode_cmds(c: &Cmds) -> Bytes {
    let mut out = vec![OP_CMDS];
    out.put_u64(c.handle);
    out.put_u64(c.received_through);
    out.put_u32(c.lost.len() as u32);
    for s in &c.lost {
        out.put_u64(*s);
    }
    out.put_u32(c.acks.len() as u32);
    for t in &c.acks {
        put_token(&mut out, t);
    }
    out.put_u32(c.nacks.len() as u32);
    for (t, requeue) in &c.nacks {
        put_token(&mut out, t);
        out.put_u8(u8::from(*requeue));
    }
    put_opt_u64(&mut out, c.prefetch.map(u64::from));
    out.put_u8(u8::from(c.leave));
    Bytes::from(out)
}

fn decode_cmds(r: &mut Reader) -> Result<Cmds> {
    let mut c = Cmds {
        handle: r.u64()?,
        received_through: r.u64()?,
        ..Cmds::default()
    };
    let n = r.count(8)?;
    for _ in 0..n {
        c.lost.push(r.u64()?);
    }
    let n = r.count(24)?;
    for _ in 0..n {
        c.acks.push(token(r)?);
    }
    let n = r.count(25)?;
    for _ in 0..n {
        let t = token(r)?;
        c.nacks.push((t, r.u8()? != 0));
    }
    c.prefetch = u32_of(opt_u64(r)?)?;
    c.leave = r.u8()? != 0;
    Ok(c)
}

/// A request as the owner reads it.
enum Request {
    Join(String, Box<GroupSpec>, MemberOptions),
    Cmds(Cmds),
}

fn decode_request(b: Bytes) -> Result<Request> {
    let mut r = Reader(b);
    let req = match r.u8()? {
        OP_JOIN => {
            let to = r.string()?;
            Request::Join(to, Box::new(decode_spec(&mut r)?), decode_member(&mut r)?)
        }
        OP_CMDS => Request::Cmds(decode_cmds(&mut r)?),
        op => return Err(invalid(format!("unknown operation {op}"))),
    };
    r.end()?;
    Ok(req)
}

fn encode_reply(r: &Result<u64>) -> Bytes {
    let mut out = Vec::new();
    match r {
        Ok(v) => {
            out.put_u8(REPLY_OK);
            out.put_u64(*v);
        }
        Err(e) => {
            out.put_u8(REPLY_ERR);
            encode_error(&mut out, e);
        }
    }
    Bytes::from(out)
}

fn decode_reply(b: Bytes) -> Result<u64> {
    let mut r = Reader(b);
    match r.u8()? {
        REPLY_OK => r.u64(),
        REPLY_ERR => Err(decode_error(&mut r)?),
        k => Err(invalid(format!("unknown reply kind {k}"))),
    }
}

fn encode_batch(handle: u64, seq: u64, batch: &[Delivery]) -> Bytes {
    let mut out = vec![DLV_BATCH];
    out.put_u64(handle);
    out.put_u64(seq);
    out.put_u32(batch.len() as u32);
    for d in batch {
        put_bytes(&mut out, d.queue.topic.as_str().as_bytes());
        out.put_u32(d.queue.queue.0);
        out.put_u64(d.offset.0);
        out.put_u8(u8::from(d.redelivered));
        out.put_u32(d.delivery_count);
        out.put_u64(d.ack_token().token());
        let m = &d.message;
        let mut one = Vec::with_capacity(mqgate_store::wire::encoded_len(&m.message));
        mqgate_store::wire::encode_into(m.id, m.store_timestamp, &m.message, &mut one);
        put_bytes(&mut out, &one);
    }
    Bytes::from(out)
}

/// What the owner sends a member's gateway.
#[derive(Debug)]
enum Dlv {
    Batch(u64, u64, Vec<Delivery>),
    Ended(u64),
}

fn decode_dlv(b: Bytes) -> Result<Dlv> {
    let mut r = Reader(b);
    let d = match r.u8()? {
        DLV_BATCH => {
            let handle = r.u64()?;
            let seq = r.u64()?;
            let n = r.count(30)?;
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let topic = r.topic()?;
                let queue = QueueRef {
                    topic,
                    queue: QueueId(r.u32()?),
                };
                let offset = QueueOffset(r.u64()?);
                let redelivered = r.u8()? != 0;
                let count = r.u32()?;
                let token = r.u64()?;
                let m =
                    mqgate_store::wire::decode(r.bytes()?).map_err(|e| invalid(e.to_string()))?;
                out.push(Delivery::relayed(
                    queue,
                    offset,
                    Arc::new(m),
                    redelivered,
                    count,
                    token,
                ));
            }
            Dlv::Batch(handle, seq, out)
        }
        DLV_ENDED => Dlv::Ended(r.u64()?),
        k => return Err(invalid(format!("unknown delivery kind {k}"))),
    };
    r.end()?;
    Ok(d)
}

/// The relay's times, all from the relay timeout `t`.
#[derive(Debug, Clone, Copy)]
struct Times {
    /// A member's gateway reports at least this often.
    heartbeat: Duration,
    /// A batch not reported received within this is delivered again.
    resend: Duration,
    /// A member not heard from within this is dropped.
    member: Duration,
    /// A request's answer is waited for this long.
    request: Duration,
}

impl Times {
    fn new(t: Duration) -> Self {
        Self {
            heartbeat: (t / 4).max(Duration::from_millis(50)),
            resend: t.max(Duration::from_millis(200)),
            member: t.saturating_mul(4).max(Duration::from_secs(2)),
            request: t,
        }
    }
}

type Members = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Cmds>>>>;

/// The owner's side: serves joins and commands for one shard's groups while it owns
/// the shard (drop or [`ConsumeServer::stop`] when it is released; the members' pumps
/// end with it and their gateways join the next owner).
#[derive(Debug)]
pub struct ConsumeServer {
    task: super::Serving,
}

impl ConsumeServer {
    /// Serve the groups of shard `shard` of the cluster of `stream`.
    pub async fn start(
        client: async_nats::Client,
        stream: &str,
        shard: ShardId,
        broker: Broker,
        timeout: Duration,
        faults: Arc<super::Faults>,
    ) -> Result<Self> {
        let mut sub = super::owner_subscription(&client, stream, shard, "grp").await?;
        let times = Times::new(timeout);
        let task = tokio::spawn(async move {
            let members: Members = Arc::default();
            let mut pumps = tokio::task::JoinSet::new();
            // Handles unique across owners and restarts: a member that held handle h
            // on a previous owner of this shard never matches another's here.
            let base = mqgate_core::shard::splitmix64(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
                    ^ (u64::from(shard) << 48),
            );
            let next = Arc::new(AtomicU64::new(0));
            // Joins run on their own (a join may wait for the group's actor): the
            // members' commands keep being answered meanwhile.
            let (joined_tx, mut joined) =
                mpsc::unbounded_channel::<(u64, String, Consumer, mpsc::UnboundedReceiver<Cmds>)>();
            loop {
                let msg = tokio::select! {
                    m = sub.next() => match m {
                        Some(m) => m,
                        None => break,
                    },
                    Some((handle, deliver_to, consumer, rx)) = joined.recv() => {
                        pumps.spawn(pump(
                            client.clone(),
                            deliver_to,
                            handle,
                            consumer,
                            rx,
                            times,
                            Arc::clone(&faults),
                            Arc::clone(&members),
                        ));
                        continue;
                    }
                };
                while pumps.try_join_next().is_some() {}
                let Some(reply_to) = msg.reply.clone() else {
                    continue;
                };
                match decode_request(msg.payload) {
                    Ok(Request::Join(deliver_to, spec, member)) => {
                        let (broker, client, members, next, joined_tx) = (
                            broker.clone(),
                            client.clone(),
                            Arc::clone(&members),
                            Arc::clone(&next),
                            joined_tx.clone(),
                        );
                        tokio::spawn(async move {
                            let answer = if broker.owned_shards().contains(&shard) {
                                // The endpoint registered here is authoritative (its
                                // dead-letter target is not carried over the relay).
                                let spec = broker.endpoint_spec(&spec.name).unwrap_or(*spec);
                                match broker.subscribe(spec, member).await {
                                    Ok(consumer) => {
                                        let handle =
                                            base.wrapping_add(next.fetch_add(1, Ordering::Relaxed));
                                        let (tx, rx) = mpsc::unbounded_channel();
                                        members.lock().insert(handle, tx);
                                        let _ = joined_tx.send((handle, deliver_to, consumer, rx));
                                        Ok(handle)
                                    }
                                    Err(e) => Err(e),
                                }
                            } else {
                                Err(CoreError::NotOwned(shard))
                            };
                            let _ = client.publish(reply_to, encode_reply(&answer)).await;
                        });
                    }
                    Ok(Request::Cmds(c)) => {
                        let tx = members.lock().get(&c.handle).cloned();
                        let answer = match tx {
                            Some(tx) if tx.send(c).is_ok() => Ok(0),
                            _ => Err(CoreError::NoSuchGroup("a member of this gateway".into())),
                        };
                        let _ = client.publish(reply_to, encode_reply(&answer)).await;
                    }
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "cluster: a malformed consume request; refused");
                        let _ = client.publish(reply_to, encode_reply(&Err(e))).await;
                    }
                }
            }
        });
        Ok(Self {
            task: super::Serving(task),
        })
    }

    /// Stop serving (the shard is released): the members' pumps end.
    pub fn stop(&self) {
        self.task.0.abort();
    }
}

/// The owner's side of one remote member: its deliveries out in numbered batches,
/// its commands in.
#[allow(clippy::too_many_arguments)]
async fn pump(
    client: async_nats::Client,
    deliver_to: String,
    handle: u64,
    mut consumer: Consumer,
    mut cmds: mpsc::UnboundedReceiver<Cmds>,
    times: Times,
    faults: Arc<super::Faults>,
    members: Members,
) {
    let mut seq = 0u64;
    // Batches sent and not yet reported received: seq, tokens, when sent.
    let mut sent: VecDeque<(u64, Vec<AckToken>, tokio::time::Instant)> = VecDeque::new();
    let mut heard = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(times.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let requeue = |consumer: &Consumer, tokens: Vec<AckToken>| {
        for t in tokens {
            consumer.nack(t, true);
        }
    };
    loop {
        tokio::select! {
            d = consumer.recv() => {
                let Some(d) = d else {
                    // The group ended here (the shard is released, the group deleted).
                    let mut out = vec![DLV_ENDED];
                    out.put_u64(handle);
                    let _ = client.publish(deliver_to.clone(), Bytes::from(out)).await;
                    break;
                };
                let mut bytes = d.message.message.body.len();
                let mut batch = vec![d];
                while batch.len() < BATCH_COUNT && bytes < BATCH_BYTES {
                    let Some(d) = consumer.try_recv() else { break };
                    bytes += d.message.message.body.len();
                    batch.push(d);
                }
                seq += 1;
                let tokens = batch.iter().map(Delivery::ack_token).collect();
                sent.push_back((seq, tokens, tokio::time::Instant::now()));
                if faults.drop_this() {
                    continue;
                }
                if let Err(e) = client.publish(deliver_to.clone(), encode_batch(handle, seq, &batch)).await {
                    tracing::warn!(handle, error = %e, "cluster: a delivery batch was not sent; it will be requeued");
                }
            }
            c = cmds.recv() => {
                let Some(c) = c else { break };
                heard = tokio::time::Instant::now();
                // Every request is a sign of life (for members that joined with
                // `heartbeat: true`).
                consumer.heartbeat();
                for t in c.acks {
                    consumer.ack(t);
                }
                for (t, rq) in c.nacks {
                    consumer.nack(t, rq);
                }
                if let Some(p) = c.prefetch {
                    consumer.set_prefetch(p as usize);
                }
                while sent.front().is_some_and(|(s, _, _)| *s <= c.received_through) {
                    let (s, tokens, _) = sent.pop_front().expect("front");
                    if c.lost.contains(&s) {
                        requeue(&consumer, tokens);
                    }
                }
                if c.leave {
                    break;
                }
            }
            _ = tick.tick() => {
                if heard.elapsed() > times.member {
                    tracing::info!(handle, "cluster: a remote member went silent; dropped (its messages go to others)");
                    break;
                }
                // Not reported received in time: lost on the way (or its report was).
                while sent.front().is_some_and(|(_, _, at)| at.elapsed() > times.resend) {
                    let (_, tokens, _) = sent.pop_front().expect("front");
                    requeue(&consumer, tokens);
                }
            }
        }
    }
    members.lock().remove(&handle);
}

/// What a remote [`Consumer`]'s calls become on the member's gateway.
enum Ctl {
    Ack(AckToken),
    Nack(AckToken, bool),
    Prefetch(usize),
    Heartbeat,
    Leave,
}

struct RemoteCtl(mpsc::UnboundedSender<Ctl>);

impl RemoteControl for RemoteCtl {
    fn ack(&self, token: AckToken) {
        let _ = self.0.send(Ctl::Ack(token));
    }
    fn nack(&self, token: AckToken, requeue: bool) {
        let _ = self.0.send(Ctl::Nack(token, requeue));
    }
    fn heartbeat(&self) {
        let _ = self.0.send(Ctl::Heartbeat);
    }
    fn set_prefetch(&self, prefetch: usize) {
        let _ = self.0.send(Ctl::Prefetch(prefetch));
    }
    fn leave(&self) {
        let _ = self.0.send(Ctl::Leave);
    }
}

/// The member's side: how a gateway joins groups whose shards others own.
#[derive(Debug, Clone)]
pub struct NatsConsumers {
    client: async_nats::Client,
    stream: String,
    times: Times,
}

impl NatsConsumers {
    /// Members of groups in the cluster of `stream`; requests time out after
    /// `timeout` (the other times follow from it).
    pub fn new(client: async_nats::Client, stream: &str, timeout: Duration) -> Self {
        Self {
            client,
            stream: stream.to_owned(),
            times: Times::new(timeout),
        }
    }

    async fn request(&self, shard: ShardId, payload: Bytes) -> Result<u64> {
        let req = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(self.times.request));
        let subject = subject(&self.stream, shard, "grp");
        match self.client.send_request(subject.clone(), req).await {
            Ok(reply) => decode_reply(reply.payload),
            // Nobody serves the shard, or its owner did not answer in time: the
            // shard is (as far as this gateway can tell) between owners.
            Err(e)
                if matches!(
                    e.kind(),
                    async_nats::RequestErrorKind::NoResponders
                        | async_nats::RequestErrorKind::TimedOut
                ) =>
            {
                Err(CoreError::NotOwned(shard))
            }
            Err(e) => Err(invalid(format!("{subject}: {e}"))),
        }
    }

    /// Join on the owner, waiting while the shard is between owners (no owner, or no
    /// answer in time): for up to the member timeout, or while `alive` says so.
    async fn join(
        &self,
        shard: ShardId,
        deliver_to: &str,
        spec: &GroupSpec,
        member: &MemberOptions,
        alive: Option<&(dyn Fn() -> bool + Sync)>,
    ) -> Result<u64> {
        let since = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self
                .request(shard, encode_join(deliver_to, spec, member))
                .await
            {
                Ok(h) => return Ok(h),
                Err(e @ (CoreError::NotOwned(_) | CoreError::ShuttingDown))
                    if alive.map_or(since.elapsed() < self.times.member, |a| a()) =>
                {
                    tracing::debug!(shard, error = %e, "cluster: joining a remote group; again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// [`mqgate_core::shard::ClusterLink::subscribe`].
    pub async fn subscribe(
        &self,
        shard: ShardId,
        spec: GroupSpec,
        member: MemberOptions,
    ) -> Result<Consumer> {
        let deliver_to = self.client.new_inbox();
        let sub = self
            .client
            .subscribe(deliver_to.clone())
            .await
            .map_err(|e| invalid(format!("subscribe: {e}")))?;
        let handle = self.join(shard, &deliver_to, &spec, &member, None).await?;
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        let (consumer, mailbox) =
            Consumer::remote(&member.id, spec.name.clone(), Arc::new(RemoteCtl(ctl_tx)));
        let member_side = MemberSide {
            link: self.clone(),
            shard,
            deliver_to,
            spec,
            member,
            handle,
            expected: 1,
            through: 0,
            pending: Cmds::default(),
            failures: 0,
        };
        tokio::spawn(member_side.run(sub, ctl_rx, mailbox));
        Ok(consumer)
    }
}

/// The member's gateway's task for one remote member.
struct MemberSide {
    link: NatsConsumers,
    shard: ShardId,
    deliver_to: String,
    spec: GroupSpec,
    member: MemberOptions,
    handle: u64,
    /// The next batch number expected from the owner.
    expected: u64,
    /// The last batch number received.
    through: u64,
    /// What the next commands request carries.
    pending: Cmds,
    /// Commands requests not taken in a row.
    failures: u32,
}

impl MemberSide {
    async fn run(
        mut self,
        mut sub: async_nats::Subscriber,
        mut ctl: mpsc::UnboundedReceiver<Ctl>,
        mailbox: mqgate_core::mailbox::Sender<Delivery>,
    ) {
        let mut tick = tokio::time::interval(self.link.times.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = sub.next() => {
                    let Some(msg) = msg else { return };
                    match decode_dlv(msg.payload) {
                        Ok(Dlv::Batch(h, seq, batch)) if h == self.handle => {
                            if seq < self.expected {
                                continue;
                            }
                            if seq - self.expected > MAX_GAP {
                                tracing::warn!(seq, expected = self.expected, "cluster: a delivery batch numbered far ahead; ignored (delivered again)");
                                continue;
                            }
                            self.pending.lost.extend(self.expected..seq);
                            self.expected = seq + 1;
                            self.through = seq;
                            for d in batch {
                                if mailbox.send(d).is_err() {
                                    // The consumer is gone: leave.
                                    self.pending.leave = true;
                                    let _ = self.flush().await;
                                    return;
                                }
                            }
                        }
                        Ok(Dlv::Ended(h)) if h == self.handle => {
                            if !self.rejoin(&mailbox).await {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %e, "cluster: a malformed delivery batch; ignored (delivered again)"),
                    }
                }
                c = ctl.recv() => {
                    let Some(c) = c else { return };
                    let mut next = Some(c);
                    while let Some(c) = next {
                        match c {
                            Ctl::Ack(t) => self.pending.acks.push(t),
                            Ctl::Nack(t, rq) => self.pending.nacks.push((t, rq)),
                            Ctl::Prefetch(p) => {
                                self.member.prefetch = p;
                                self.pending.prefetch = Some(u32::try_from(p).unwrap_or(u32::MAX));
                            }
                            Ctl::Heartbeat => {}
                            Ctl::Leave => self.pending.leave = true,
                        }
                        next = ctl.try_recv().ok();
                    }
                    let leaving = self.pending.leave;
                    if leaving {
                        let _ = self.flush().await;
                        return;
                    }
                    if !self.flush().await && !self.rejoin(&mailbox).await {
                        return;
                    }
                }
                _ = tick.tick() => {
                    if mailbox.is_closed() {
                        self.pending.leave = true;
                        let _ = self.flush().await;
                        return;
                    }
                    if !self.flush().await && !self.rejoin(&mailbox).await {
                        return;
                    }
                }
            }
        }
    }

    /// Send what is pending (and the heartbeat). False when the member must join
    /// anew: the owner does not know it (it moved, restarted, or dropped the member),
    /// or did not take 3 requests in a row; a single failure is retried with the next
    /// request.
    async fn flush(&mut self) -> bool {
        let mut c = std::mem::take(&mut self.pending);
        c.handle = self.handle;
        c.received_through = self.through;
        let leave = c.leave;
        match self.link.request(self.shard, encode_cmds(&c)).await {
            Ok(_) => {
                self.failures = 0;
                true
            }
            Err(e) => {
                self.failures += 1;
                let gone = matches!(e, CoreError::NoSuchGroup(_) | CoreError::ShuttingDown)
                    || self.failures >= 3;
                tracing::debug!(shard = self.shard, error = %e, "cluster: a remote member's commands were not taken");
                if !leave {
                    // Sent again with the next ones, unless the member joins anew
                    // (then they are stale: the owner delivers those messages again).
                    c.acks.append(&mut self.pending.acks);
                    c.nacks.append(&mut self.pending.nacks);
                    c.lost.append(&mut self.pending.lost);
                    c.prefetch = self.pending.prefetch.or(c.prefetch);
                    c.leave = false;
                    self.pending = c;
                }
                !gone
            }
        }
    }

    /// Join the group's (next) owner anew, for as long as the consumer lives (a
    /// takeover after a crash takes the lease's time to live); false when it is gone
    /// or the owner refuses (the consumer ends).
    async fn rejoin(&mut self, mailbox: &mqgate_core::mailbox::Sender<Delivery>) -> bool {
        let alive = || !mailbox.is_closed();
        match self
            .link
            .join(
                self.shard,
                &self.deliver_to,
                &self.spec,
                &self.member,
                Some(&alive),
            )
            .await
        {
            Ok(h) => {
                tracing::info!(shard = self.shard, group = %self.spec.name, "cluster: a remote member joined its group's owner anew");
                let prefetch = self.pending.prefetch;
                self.pending = Cmds {
                    prefetch,
                    ..Cmds::default()
                };
                self.handle = h;
                self.expected = 1;
                self.through = 0;
                self.failures = 0;
                true
            }
            Err(e) => {
                tracing::warn!(shard = self.shard, group = %self.spec.name, error = %e, "cluster: a remote member lost its group");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqgate_store::{Message, MessageId, StoredMessage, TopicName};
    use proptest::prelude::*;

    fn topic(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    proptest! {
        #[test]
        fn commands_round_trip(
            handle in any::<u64>(),
            through in any::<u64>(),
            lost in proptest::collection::vec(any::<u64>(), 0..5),
            offsets in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<bool>()), 0..6),
            prefetch in proptest::option::of(any::<u32>()),
            leave in any::<bool>(),
        ) {
            let q = QueueRef { topic: topic("q"), queue: QueueId(3) };
            let c = Cmds {
                handle,
                received_through: through,
                lost,
                acks: offsets.iter().map(|(o, t, _)| AckToken::from_parts(q.clone(), *o, *t)).collect(),
                nacks: offsets.iter().map(|(o, t, r)| (AckToken::from_parts(q.clone(), *o, *t), *r)).collect(),
                prefetch,
                leave,
            };
            match decode_request(encode_cmds(&c)).unwrap() {
                Request::Cmds(back) => prop_assert_eq!(back, c),
                Request::Join(..) => prop_assert!(false),
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(junk in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_request(Bytes::from(junk.clone()));
            let _ = decode_reply(Bytes::from(junk.clone()));
            let _ = decode_dlv(Bytes::from(junk));
        }
    }

    #[test]
    fn joins_and_deliveries_round_trip() {
        let mut spec = GroupSpec::new(
            GroupName::new("g").unwrap(),
            vec![topic("a")],
            ConsumeMode::Shared,
        );
        spec.start = StartPosition::Timestamp(77);
        spec.on_failure = OnFailure::Discard;
        spec.max_reconsume_times = Some(4);
        spec.policy.message_ttl = Some(1000);
        spec.policy.max_length = Some(5);
        spec.policy.overflow = Overflow::RejectPublishDlx;
        let mut m = MemberOptions::new("m-1", 20);
        m.heartbeat = true;
        match decode_request(encode_join("_INBOX.x", &spec, &m)).unwrap() {
            Request::Join(to, s, back) => {
                assert_eq!(to, "_INBOX.x");
                assert_eq!(format!("{s:?}"), format!("{spec:?}"));
                assert_eq!(format!("{back:?}"), format!("{m:?}"));
            }
            Request::Cmds(_) => panic!("a join"),
        }
        let msg = Message::new(topic("a"), Bytes::from_static(b"body"));
        let d = Delivery::relayed(
            QueueRef {
                topic: topic("a"),
                queue: QueueId(1),
            },
            QueueOffset(9),
            Arc::new(StoredMessage {
                id: MessageId(3 << 44),
                store_timestamp: 5,
                size: mqgate_store::wire::encoded_len(&msg) as u32 - 9,
                message: msg,
            }),
            true,
            2,
            41,
        );
        match decode_dlv(encode_batch(7, 8, std::slice::from_ref(&d))).unwrap() {
            Dlv::Batch(7, 8, back) => {
                assert_eq!(back.len(), 1);
                assert_eq!(back[0].ack_token(), d.ack_token());
                assert_eq!(back[0].message, d.message);
                assert!(back[0].redelivered);
                assert_eq!(back[0].delivery_count, 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decode_reply(encode_reply(&Ok(5))).unwrap(), 5);
    }
}

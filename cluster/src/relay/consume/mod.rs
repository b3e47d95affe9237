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
//! (a gap) or not covered by `received_through` in time, and its messages are released
//! on the owner (`Consumer::release`: delivered again, flagged redelivered, not counted
//! against a delivery limit: the client never had them); lost commands are sent
//! again; a member not heard from for 4 x the relay timeout is dropped on the owner
//! (its messages in flight go to the others, `redelivered`); an owner gone or moved
//! (its pump ends, commands fail) makes the member join the next owner, from the
//! group's committed offsets. Acks of what the member held before become stale there
//! and are ignored: duplicates, never loss. A member ended on an owner that still has
//! the shard (its group deleted, or the member cut off) is ended on its gateway too:
//! its consumer ends, as a local member's does, rather than bring the group back.
//!
//! Requests (`s.NN.grp`): `1` join: deliver_to, spec (name, topics, mode u8, orderly
//! u8, start: tag u8 + u64, on failure u8, max reconsume times?, policy: ttl?, delivery
//! limit?, max length?, max bytes?, overflow u8), member (id, prefetch u32, heartbeat
//! u8, exact u8, unbounded u8 only when set); `2` commands: handle u64, received
//! through u64, lost: count, seqs; acks: count, (topic, queue u32, offset u64, token
//! u64); nacks: the same + what u8 (0 failed, 1 requeue, 2 release: never reached the
//! client, not counted); prefetch?; leave u8; for an unbounded member only: waiting
//! u32, bounded u8 (from now on). Replies: `0` ok (join: handle u64); `1` error (as
//! `codec::encode_error`). Deliveries (to deliver_to, no reply): `1` batch: handle,
//! seq, count, per delivery: topic, queue u32, offset u64, redelivered u8, delivery
//! count u32, token u64, message (`mqgate_store::wire`); `2` ended: handle, for good
//! u8 (1: the shard is still there, the consumer ends; 0: the shard moved, join anew);
//! a batch NATS cannot carry in one message (a large message) goes in parts
//! (`relay::split_parts`), joined on the member's side (a part lost loses the batch,
//! which is then delivered again like any lost batch).
//!
//! A dead-letter target is not carried: the owner uses the endpoint registered there
//! (`Broker::endpoint_spec`), whose spec is authoritative.

mod member;
mod wire;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures_util::StreamExt;
use mqgate_core::outbox::ShardId;
use mqgate_core::{AckToken, Broker, Consumer, CoreError, Delivery, Result};
use parking_lot::Mutex;
use tokio::sync::mpsc;

pub use self::member::NatsConsumers;
use self::wire::{decode_request, encode_batch, encode_reply, Cmds, Request, DLV_ENDED};

/// A delivery batch holds at most this many messages ...
const BATCH_COUNT: usize = 256;
/// ... and about this many bytes of them (less when NATS carries less; a larger
/// message goes alone, in parts if it must).
const BATCH_BYTES: usize = 256 * 1024;

/// The relay's times, all from the relay timeout `t`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Times {
    /// A member's gateway reports at least this often.
    pub(super) heartbeat: Duration,
    /// A batch not reported received within this is delivered again.
    pub(super) resend: Duration,
    /// A member not heard from within this is dropped.
    pub(super) member: Duration,
    /// A request's answer is waited for this long.
    pub(super) request: Duration,
}

impl Times {
    pub(super) fn new(t: Duration) -> Self {
        Self {
            heartbeat: (t / 4).max(Duration::from_millis(50)),
            resend: t.max(Duration::from_millis(200)),
            member: t.saturating_mul(4).max(Duration::from_secs(2)),
            request: t,
        }
    }
}

/// A member's commands, each with what tells the request's task it was applied.
type CmdsIn = (Cmds, Option<tokio::sync::oneshot::Sender<()>>);
type Members = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<CmdsIn>>>>;

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
            let (joined_tx, mut joined) = mpsc::unbounded_channel::<(
                u64,
                String,
                Consumer,
                Option<usize>,
                mpsc::UnboundedReceiver<CmdsIn>,
            )>();
            loop {
                let msg = tokio::select! {
                    m = sub.next() => match m {
                        Some(m) => m,
                        None => break,
                    },
                    Some((handle, deliver_to, consumer, window, rx)) = joined.recv() => {
                        pumps.spawn(pump(
                            client.clone(),
                            deliver_to,
                            (handle, window),
                            consumer,
                            rx,
                            times,
                            Arc::clone(&faults),
                            Arc::clone(&members),
                            (broker.clone(), shard),
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
                                // An unbounded member: its prefetch bounds what is on
                                // its way to the client, here and there (`pump`).
                                let window = member.unbounded.then_some(member.prefetch);
                                match broker.subscribe_direct(spec, member).await {
                                    Ok(consumer) => {
                                        let handle =
                                            base.wrapping_add(next.fetch_add(1, Ordering::Relaxed));
                                        let (tx, rx) = mpsc::unbounded_channel();
                                        members.lock().insert(handle, tx);
                                        let _ = joined_tx
                                            .send((handle, deliver_to, consumer, window, rx));
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
                        let leave = c.leave;
                        // Answered once the pump has applied them (so that what the
                        // member's gateway asks the owner next, a group's counts, sees
                        // them), or has ended without (as before: the member learns
                        // that from its next request or the pump's ended message); a
                        // leave once the member has left.
                        let (applied_tx, applied) = tokio::sync::oneshot::channel();
                        let answer = match tx {
                            Some(tx) if tx.send((c, (!leave).then_some(applied_tx))).is_ok() => {
                                if leave {
                                    // Answered once the member has left here (what it
                                    // held released): its gateway's close waits for it.
                                    let client = client.clone();
                                    tokio::spawn(async move {
                                        let _ =
                                            tokio::time::timeout(times.request / 2, tx.closed())
                                                .await;
                                        let _ =
                                            client.publish(reply_to, encode_reply(&Ok(0))).await;
                                    });
                                } else {
                                    let client = client.clone();
                                    tokio::spawn(async move {
                                        let _ = applied.await;
                                        let _ =
                                            client.publish(reply_to, encode_reply(&Ok(0))).await;
                                    });
                                }
                                continue;
                            }
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

/// One use of a managed endpoint while it lives.
struct InUse(Broker, mqgate_store::GroupName);

impl InUse {
    fn new(broker: &Broker, group: &mqgate_store::GroupName) -> Self {
        broker.endpoint_in_use(group, true);
        Self(broker.clone(), group.clone())
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.0.endpoint_in_use(&self.1, false);
    }
}

/// What one delivery adds to a batch on the wire (about).
fn relayed_len(d: &Delivery) -> usize {
    mqgate_store::wire::encoded_len(&d.message.message) + d.queue.topic.as_str().len() + 40
}

/// The next delivery: one carried over, else the member's next.
async fn next_delivery(consumer: &mut Consumer, carry: &mut Option<Delivery>) -> Option<Delivery> {
    match carry.take() {
        Some(d) => Some(d),
        None => consumer.recv().await,
    }
}

/// The owner's side of one remote member: its deliveries out in numbered batches,
/// its commands in. `window`: an unbounded member's prefetch, which bounds what is on
/// its way to the client: batches not yet reported received, and what its gateway last
/// reported waiting in the consumer's mailbox (`Cmds::waiting`). The pump takes no more
/// from the member here while that is full; the member here then finds its mailbox
/// full, and is asked for more when the pump has taken it all (`Drain`).
#[allow(clippy::too_many_arguments)]
async fn pump(
    client: async_nats::Client,
    deliver_to: String,
    (handle, mut window): (u64, Option<usize>),
    mut consumer: Consumer,
    mut cmds: mpsc::UnboundedReceiver<CmdsIn>,
    times: Times,
    faults: Arc<super::Faults>,
    members: Members,
    (broker, shard): (Broker, ShardId),
) {
    // A member here is a use of its endpoint (an AMQP queue's x-expires, which the
    // core applies on this gateway, counts it), until the pump ends.
    let _in_use = InUse::new(&broker, consumer.group());
    let mut seq = 0u64;
    // A delivery taken that did not fit the previous batch.
    let mut carry: Option<Delivery> = None;
    // A batch is about BATCH_BYTES; a larger message goes alone, in parts when NATS
    // cannot carry it in one message.
    let max_payload = client
        .server_info()
        .max_payload
        .saturating_sub(1024)
        .max(4096);
    let limit = BATCH_BYTES.min(max_payload);
    // Batches sent and not yet reported received: seq, tokens, when sent.
    let mut sent: VecDeque<(u64, Vec<AckToken>, tokio::time::Instant)> = VecDeque::new();
    // Deliveries in `sent`, and what the member's gateway last reported waiting.
    let mut in_transit = 0usize;
    let mut waiting = 0usize;
    let mut heard = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(times.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Never seen by the member's client: again, not counted as a delivery.
    let requeue = |consumer: &Consumer, tokens: Vec<AckToken>| {
        for t in tokens {
            consumer.release(t);
        }
    };
    loop {
        let room = window.map_or(usize::MAX, |w| w.saturating_sub(in_transit + waiting));
        tokio::select! {
            d = next_delivery(&mut consumer, &mut carry), if room > 0 => {
                let Some(d) = d else {
                    // The member ended here: the shard was released (it joins the next
                    // owner), or, the shard still here, its group was deleted or it
                    // was cut off (its consumer ends, as a local member's does).
                    let gone = broker.owned_shards().contains(&shard);
                    let mut out = vec![DLV_ENDED];
                    out.put_u64(handle);
                    out.put_u8(u8::from(gone));
                    let _ = client.publish(deliver_to.clone(), Bytes::from(out)).await;
                    break;
                };
                let mut bytes = relayed_len(&d);
                let mut batch = vec![d];
                while batch.len() < BATCH_COUNT.min(room) {
                    let Some(d) = consumer.try_recv() else { break };
                    if bytes + relayed_len(&d) > limit {
                        carry = Some(d);
                        break;
                    }
                    bytes += relayed_len(&d);
                    batch.push(d);
                }
                seq += 1;
                let tokens = batch.iter().map(Delivery::ack_token).collect();
                in_transit += batch.len();
                sent.push_back((seq, tokens, tokio::time::Instant::now()));
                if faults.drop_this() {
                    continue;
                }
                for part in super::split_parts(encode_batch(handle, seq, &batch), max_payload) {
                    if let Err(e) = client.publish(deliver_to.clone(), part).await {
                        tracing::warn!(handle, error = %e, "cluster: a delivery batch was not sent; it will be requeued");
                        break;
                    }
                }
            }
            c = cmds.recv() => {
                let Some((c, applied)) = c else { break };
                heard = tokio::time::Instant::now();
                // Every request is a sign of life (for members that joined with
                // `heartbeat: true`).
                consumer.heartbeat();
                for t in c.acks {
                    consumer.ack(t);
                }
                for (t, kind) in c.nacks {
                    match kind {
                        wire::NACK_FAILED => consumer.nack(t, false),
                        wire::NACK_RELEASE => consumer.release(t),
                        _ => consumer.nack(t, true),
                    }
                }
                if let Some(p) = c.prefetch {
                    consumer.set_prefetch(p as usize);
                    if window.is_some() {
                        window = Some(p as usize);
                    }
                }
                if let Some(w) = c.waiting {
                    waiting = w as usize;
                }
                if c.bounded && window.take().is_some() {
                    // Its channel's global basic.qos got a limit: its prefetch bounds
                    // what it holds unacknowledged from now on.
                    consumer.bound();
                }
                while sent.front().is_some_and(|(s, _, _)| *s <= c.received_through) {
                    let (s, tokens, _) = sent.pop_front().expect("front");
                    in_transit -= tokens.len();
                    if c.lost.contains(&s) {
                        requeue(&consumer, tokens);
                    }
                }
                if let Some(applied) = applied {
                    // In the group's actor's mailbox, ahead of anything asked of it
                    // after the answer.
                    let _ = applied.send(());
                }
                if c.leave {
                    // What was sent after `received_through` never reached the client:
                    // the member drops batches that arrive once it has left. Released
                    // (not counted as deliveries), or a delivery limit would drop them
                    // unseen; then the leave puts back what the client did get.
                    for (_, tokens, _) in sent.drain(..) {
                        requeue(&consumer, tokens);
                    }
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
                    in_transit -= tokens.len();
                    requeue(&consumer, tokens);
                }
            }
        }
    }
    // A delivery taken and never sent goes back released too.
    if let Some(d) = carry.take() {
        consumer.release(d.ack_token());
    }
    // Left: what it held is released (its actor has the leave) before anyone is told.
    drop(consumer);
    members.lock().remove(&handle);
    drop(cmds);
}

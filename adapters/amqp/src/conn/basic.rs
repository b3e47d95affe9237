//! The basic class (except publishing): qos, consume, cancel, get, ack/nack/reject,
//! recover.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use amq_protocol::protocol::{basic, AMQPClass};
use amq_protocol::types::AMQPValue;
use bytes::BytesMut;
use mqgate_core::{ConsumeMode, GroupSpec, MemberOptions, OnFailure, StartPosition};
use mqgate_store::GroupName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::convert;
use crate::frame;
use crate::queue::Queue;
use crate::reply;

use super::{chan_err, internal, ChanResult, Conn, Cons, Pending, TxOp, Unacked};

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    pub(super) async fn on_basic(&mut self, ch: u16, m: basic::AMQPMethod) -> ChanResult {
        match m {
            basic::AMQPMethod::Publish(p) => {
                if p.immediate {
                    // RabbitMQ 3 dropped `immediate`: a connection error, as there.
                    return Err(chan_err(reply::NOT_IMPLEMENTED, "immediate=true"));
                }
                // The names parsed with the method, moved (not copied again).
                self.chan(ch).content = Some(Pending {
                    exchange: p.exchange.into(),
                    routing_key: p.routing_key.into(),
                    mandatory: p.mandatory,
                    header: None,
                    body: BytesMut::new(),
                    whole: None,
                });
                Ok(())
            }
            basic::AMQPMethod::Qos(q) => {
                let default = self.shared.cfg.default_prefetch;
                let c = self.chan(ch);
                if q.global {
                    c.global_prefetch = q.prefetch_count;
                    if let Some(pool) = &c.credit {
                        pool.set_limit(usize::from(q.prefetch_count));
                        // A member whose group is on another gateway cannot draw on the
                        // pool: its own prefetch follows the limit instead (a no-op
                        // beyond the pool for one on this gateway).
                        for cons in c.consumers.values().filter(|c| !c.cancelled) {
                            if let Some(asked) = cons.asked_prefetch {
                                cons.consumer.set_prefetch(consumer_prefetch(
                                    asked,
                                    q.prefetch_count,
                                    default,
                                ));
                            }
                        }
                    }
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
        let q = self.get_queue(c.queue.as_str()).await?;
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
        let (asked, global) = (self.chan(ch).prefetch, self.chan(ch).global_prefetch);
        let prefetch = consumer_prefetch(asked, global, self.shared.cfg.default_prefetch);
        // A manual-ack consumer also draws on the channel's credit pool (the global
        // limit), shared by the channel's consumers of every queue and followed when a
        // global basic.qos changes it (Celery raises it while it holds ETA tasks). No-ack
        // consumers take none (RabbitMQ applies no prefetch to them).
        let pool = (!c.no_ack).then(|| {
            self.chan(ch)
                .credit
                .get_or_insert_with(|| mqgate_core::CreditPool::new(usize::from(global)))
                .clone()
        });
        let offset = c.arguments.inner().get("x-stream-offset").cloned();
        let member = self.shared.member_id();
        let (consumer, stream_group) = if q.args.stream {
            let pos = self.stream_position(offset.as_ref())?;
            let g = GroupName::new(format!("{}%stream%{}", q.group, member))
                .map_err(|e| chan_err(reply::INTERNAL_ERROR, e.to_string()))?;
            let mut spec = GroupSpec::new(g.clone(), vec![q.topic.clone()], ConsumeMode::Shared);
            spec.start = pos;
            spec.on_failure = OnFailure::Discard;
            let mut opts = MemberOptions::new(member, prefetch);
            opts.exact_prefetch = true;
            opts.credit_pool = pool;
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
                let pos = self.stream_position(Some(v))?;
                self.shared
                    .broker
                    .reset_group(&q.group, pos)
                    .await
                    .map_err(internal)?;
            }
            let mut opts = MemberOptions::new(member, prefetch);
            opts.exact_prefetch = true;
            // No basic.qos at all: RabbitMQ sends everything, whatever is unacked (a
            // consumer that acks once per 2,000 messages waited for ever at the
            // default 1,024). The default bounds what waits for this connection to
            // take; a later global basic.qos still limits it, through the pool.
            opts.unbounded = asked == 0 && global == 0 && !c.no_ack;
            opts.credit_pool = pool;
            let cons = self
                .shared
                .broker
                .subscribe(self.queue_spec(&q), opts)
                .await
                .map_err(internal)?;
            (cons, None)
        };
        if !self.shared.broker.endpoint_in_use(&q.group, true) {
            // The core is deleting it (x-expires) right now: as if it had gone a moment
            // earlier. The consumer just made leaves with `consumer`.
            drop(consumer);
            return Err(chan_err(
                reply::NOT_FOUND,
                format!("no queue '{}' in vhost '{}'", q.name, self.vhost),
            ));
        }
        {
            let mut s = q.state.lock();
            s.consumers += 1;
            s.had_consumer = true;
            s.exclusive_consumer |= c.exclusive;
        }
        let id = self.next_consumer;
        self.next_consumer += 1;
        let listed = crate::server::Listed::new(
            &self.shared,
            crate::server::ConsumerView {
                connection: self.id,
                channel: ch,
                tag: tag.clone(),
                vhost: self.vhost.clone(),
                queue: q.name.clone(),
                ack_required: !c.no_ack,
                exclusive: c.exclusive,
                prefetch,
                arguments: c.arguments.clone(),
            },
        );
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
                asked_prefetch: (!c.no_ack).then_some(asked),
                stream_group,
                unacked: 0,
                cancelled: false,
                exclusive: c.exclusive,
                _listed: Some(listed),
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
        q.spec()
    }

    /// `x-stream-offset`: first, last, next, an offset, or a timestamp (seconds).
    fn stream_position(&self, v: Option<&AMQPValue>) -> ChanResult<StartPosition> {
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
                Some(word) => StartPosition::from_stream_offset_word(word).ok_or_else(bad)?,
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
        // Deliveries handed to it but not yet sent go back, released: the client never
        // saw them, so they do not count as deliveries (an `x-delivery-limit` of 0 would
        // otherwise drop them unseen).
        while let Some(d) = cons.consumer.try_recv() {
            cons.consumer.release(d.ack_token());
        }
        let (q, excl, drop_now) = (Arc::clone(&cons.queue), cons.exclusive, cons.unacked == 0);
        // Resolves once its member has left the group (an auto-delete queue's last
        // consumer waits for it before asking the group whether any is left).
        let mut left: Option<mqgate_core::Left> = None;
        if drop_now {
            if let Some(cons) = chan.consumers.remove(&id) {
                if let Some(g) = cons.stream_group {
                    let broker = self.shared.broker.clone();
                    drop(cons.consumer);
                    tokio::spawn(async move {
                        let _ = broker.delete_group(&g).await;
                    });
                } else {
                    left = Some(cons.consumer.leave());
                }
            }
        }
        self.consumer_gone(&q, excl, left);
    }

    async fn get(&mut self, ch: u16, g: basic::Get) -> ChanResult {
        let q = self.get_queue(g.queue.as_str()).await?;
        self.can_read("queue", &q.name)?;
        if q.args.stream {
            return Err(chan_err(
                reply::PRECONDITION_FAILED,
                "basic.get is not supported by stream queues",
            ));
        }
        if q.args.orderly {
            // Its logs are split between consumers; a puller would hold a share of them.
            return Err(chan_err(
                reply::PRECONDITION_FAILED,
                "basic.get is not supported by orderly queues (x-orderly); use basic.consume",
            ));
        }
        if !self.shared.broker.touch_endpoint(&q.group) {
            // Being deleted (x-expires) right now: as if it had gone a moment earlier.
            return Err(chan_err(
                reply::NOT_FOUND,
                format!("no queue '{}' in vhost '{}'", q.name, self.vhost),
            ));
        }
        let key = (q.vhost.clone(), q.name.clone());
        let existing = self.chan(ch).gets.get(&key).copied();
        let id = match existing {
            Some(id) => id,
            None => {
                let member = self.shared.member_id();
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
                        asked_prefetch: None,
                        stream_group: None,
                        unacked: 0,
                        cancelled: false,
                        exclusive: false,
                        _listed: None,
                    },
                );
                id
            }
        };
        // One credit for one delivery; the core has settled what is not to be delivered
        // (expired, over its limit, transient from before a restart).
        let cons = self.chan(ch).consumers.get_mut(&id).expect("get member");
        let mut delivery = cons.consumer.try_recv();
        if delivery.is_none() && self.shared.ready_count(&q).await > 0 {
            let cons = self.chan(ch).consumers.get_mut(&id).expect("get member");
            cons.consumer.set_prefetch(cons.unacked + 1);
            delivery = tokio::time::timeout(Duration::from_secs(2), cons.consumer.recv())
                .await
                .ok()
                .flatten();
            // Back to no credit at all: a get member receives only while a get waits
            // (with the in-flight count as prefetch, a nack or requeue of its messages
            // freed credit and the group handed a ready message to a member nobody
            // reads: it vanished from message_count until the next get).
            cons.consumer.set_prefetch(0);
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
            chan.unacked.insert(tag, Unacked { cons: id, token });
        }
        frame::put_get_ok(
            &mut self.output.out,
            ch,
            tag,
            d.redelivered,
            ex.as_bytes(),
            rk.as_bytes(),
            remaining,
        );
        let props = convert::delivery_properties(&d.message.message);
        frame::put_content(
            &mut self.output.out,
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

    pub(super) async fn settle(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        ack: bool,
        requeue: bool,
    ) {
        let chan = self.chan(ch);
        // One tag (the usual per-message ack) without a list.
        let many: Vec<u64>;
        let tags: &[u64] = if multiple {
            let upto = if tag == 0 { u64::MAX } else { tag };
            many = chan.unacked.range(..=upto).map(|(t, _)| *t).collect();
            &many
        } else {
            std::slice::from_ref(&tag)
        };
        let shared = Arc::clone(&self.shared);
        for &t in tags {
            let chan = self.chan(ch);
            let Some(u) = chan.unacked.remove(&t) else {
                continue;
            };
            let Some(cons) = chan.consumers.get_mut(&u.cons) else {
                // Its consumer ended with its queue: settles nothing.
                continue;
            };
            cons.unacked = cons.unacked.saturating_sub(1);
            if ack {
                shared.stats.acked.fetch_add(1, Ordering::Relaxed);
                cons.consumer.ack(u.token);
            } else {
                // Requeued, or failed: the core applies the queue's policy (its retry
                // ladder, its dead-letter exchange with the offset commit in the same
                // write, or discard).
                cons.consumer.nack(u.token, requeue);
            }
        }
        self.reap_ended_consumers();
    }

    /// Drop cancelled consumers that hold nothing any more.
    pub(super) fn reap_ended_consumers(&mut self) {
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
                    } else if self.shared.broker.clustered() && c.queue.auto_delete {
                        // Cancelled with messages unacknowledged, its member stayed until
                        // now: an auto-delete queue left without consumers here is
                        // checked again once it has left.
                        let unused = {
                            let s = c.queue.state.lock();
                            s.had_consumer && s.consumers == 0 && !s.deleted
                        };
                        let left = c.consumer.leave();
                        if unused {
                            super::channel::auto_delete(
                                Arc::clone(&self.shared),
                                Arc::clone(&c.queue),
                                vec![left],
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A consumer's prefetch in its queue's group: its own basic.qos, never more than the
/// channel's global one (beyond what the channel may take, a message held by its member
/// would be in flight to nobody while other consumers of the queue wait for it); neither
/// set: `default`.
fn consumer_prefetch(asked: u16, global: u16, default: usize) -> usize {
    match (asked, global) {
        (0, 0) => default,
        (0, g) => usize::from(g),
        (n, 0) => usize::from(n),
        (n, g) => usize::from(n.min(g)),
    }
}

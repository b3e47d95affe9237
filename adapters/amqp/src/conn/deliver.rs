//! Delivering to consumers: deliveries screened (expired, over their limit,
//! dead-lettered) and written; consumers whose queue went.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use amq_protocol::protocol::{basic, AMQPClass};
use mqgate_core::{props, Delivery};
use mqgate_store::StoredMessage;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::convert::{self, DeathReason};
use crate::frame;
use crate::queue::Queue;
use crate::server::Shared;

use super::{Conn, Cons, Unacked};

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    pub(super) fn deliver(&mut self, ch: u16, cid: u64, d: Delivery) {
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
    pub(super) fn consumer_ended(&mut self, ch: u16, cid: u64) {
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
}

/// Whether a delivery goes to the client. Transient messages stored before this broker
/// started, expired messages (queue TTL, per-message expiration) and messages past the
/// queue's delivery limit are settled here instead (and dead-lettered when the queue has
/// a dead-letter exchange).
pub(super) fn screen(shared: &Arc<Shared>, cons: &Cons, d: &Delivery) -> bool {
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
pub(super) async fn dead_letter(
    shared: &Shared,
    q: &Queue,
    m: &StoredMessage,
    why: DeathReason,
) -> bool {
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

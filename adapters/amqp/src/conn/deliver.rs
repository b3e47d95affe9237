//! Delivering to consumers: deliveries written (the core has settled what is not to
//! be delivered: expired, over the delivery limit, transient from before a restart);
//! consumers whose queue went.

use std::sync::atomic::Ordering;

use amq_protocol::protocol::{basic, AMQPClass};
use bytes::BufMut;
use mqgate_core::{props, Delivery};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::convert;
use crate::frame;

use super::{Conn, Unacked};

/// Bodies from this size go out as the stored `Bytes`, not copied into the output
/// buffer (smaller ones cost less to copy than to write as a slice of their own).
const SHARED_BODY_MIN: usize = 1024;

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
        let token = d.ack_token();
        let m = &d.message.message;
        chan.next_tag += 1;
        let tag = chan.next_tag;
        let ex = props::get(&m.properties, props::AMQP_EXCHANGE);
        let rk = props::get(&m.properties, props::AMQP_ROUTING_KEY);
        match (ex, rk) {
            (Some(ex), Some(rk)) => frame::put_deliver(
                &mut self.output.out,
                ch,
                &cons.tag,
                tag,
                d.redelivered,
                ex,
                rk,
            ),
            _ => {
                let (ex, rk) = convert::exchange_and_key(m);
                frame::put_deliver(
                    &mut self.output.out,
                    ch,
                    &cons.tag,
                    tag,
                    d.redelivered,
                    ex.as_bytes(),
                    rk.as_bytes(),
                );
            }
        }
        let mut props = convert::delivery_properties(m);
        let tried = d.reconsume_count();
        if tried > 0 {
            props = convert::with_delivery_count(&props, tried);
        }
        if m.body.len() < SHARED_BODY_MIN {
            frame::put_content(&mut self.output.out, ch, &props, &m.body, frame_max);
        } else {
            // The stored `Bytes` itself goes out, in one vectored write with the frames
            // around it (sockio, "Shared bodies").
            frame::put_content_header(&mut self.output.out, ch, &props, m.body.len());
            let chunk = frame::body_chunk(frame_max);
            let mut at = 0;
            while at < m.body.len() {
                let end = (at + chunk).min(m.body.len());
                frame::put_body_frame_start(&mut self.output.out, ch, end - at);
                self.output.put_shared(m.body.slice(at..end));
                self.output.out.put_u8(frame::FRAME_END);
                at = end;
            }
        }
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
            chan.unacked.insert(tag, Unacked { cons: cid, token });
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
        // Its deliveries stay known: a client acks the work it had in hand after the
        // cancel, and RabbitMQ takes those acks (settling nothing) instead of closing the
        // channel with 406 for an unknown tag. They still count against a channel-wide
        // prefetch until acked, as on RabbitMQ.
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
                &mut self.output.out,
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: cons.tag.as_str().into(),
                    nowait: true,
                })),
            );
        }
    }
}

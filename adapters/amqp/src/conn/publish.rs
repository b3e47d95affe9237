//! Publishing: whole messages routed and stored in batches, then confirmed; the tx
//! class.

use std::sync::atomic::Ordering;
use std::time::Duration;

use amq_protocol::protocol::{basic, tx, AMQPClass};
use mqgate_core::{props, Delay, Outgoing, PublishBatch};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::convert;
use crate::frame;
use crate::reply;

use super::{chan_err, internal, Batched, ChanResult, Completed, Conn, End, TxOp};

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    pub(super) async fn on_tx(&mut self, ch: u16, m: tx::AMQPMethod) -> ChanResult {
        match m {
            tx::AMQPMethod::Select(_) => {
                let c = self.chan(ch);
                if c.confirm {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if c.tx.is_none() {
                    c.tx = Some(Vec::new());
                }
                self.reply(ch, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let Some(ops) = self.chan(ch).tx.as_mut().map(std::mem::take) else {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                };
                // Publishes first, all in one store write; then the acks. Checked again
                // before any is routed (an exchange may have gone since), so a refused
                // commit stores none of them.
                for op in &ops {
                    if let TxOp::Publish(c) = op {
                        self.check_publish(&c.exchange, &c.routing_key)?;
                    }
                }
                let mut settles = Vec::new();
                for op in ops {
                    match op {
                        TxOp::Publish(c) => self.route(c).await?,
                        s => settles.push(s),
                    }
                }
                self.flush_batch()
                    .await
                    .map_err(|_| chan_err(reply::INTERNAL_ERROR, "store failed"))?;
                if !self.settle_writes().await {
                    return Err(chan_err(reply::INTERNAL_ERROR, "store failed"));
                }
                for s in settles {
                    if let TxOp::Settle {
                        tag,
                        multiple,
                        ack,
                        requeue,
                    } = s
                    {
                        self.settle(ch, tag, multiple, ack, requeue).await;
                    }
                }
                self.reply(ch, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                let Some(ops) = self.chan(ch).tx.as_mut() else {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        "channel is not transactional",
                    ));
                };
                ops.clear();
                self.reply(
                    ch,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
                Ok(())
            }
            _ => Err(chan_err(reply::COMMAND_INVALID, "not a client method")),
        }
    }

    /// A publish's content is complete.
    pub(super) async fn complete_publish(&mut self, ch: u16) -> Result<(), End> {
        let Some(p) = self.chan(ch).content.take() else {
            return Ok(());
        };
        let Some(header) = p.header else {
            return Ok(());
        };
        self.shared.stats.published.fetch_add(1, Ordering::Relaxed);
        self.published = true;
        let c = Completed {
            channel: ch,
            exchange: p.exchange,
            routing_key: p.routing_key,
            mandatory: p.mandatory,
            header,
            body: p.whole.unwrap_or_else(|| p.body.freeze()),
        };
        if self.chan(ch).tx.is_some() {
            // Checked now, as RabbitMQ does: a publish to a missing exchange closes the
            // channel at once (and its transaction with it), not at the commit.
            if let Err(e) = self.check_publish(&c.exchange, &c.routing_key) {
                return self.channel_exception(ch, e, (60, 40));
            }
            if let Some(ops) = self.chan(ch).tx.as_mut() {
                ops.push(TxOp::Publish(c));
            }
            return Ok(());
        }
        match self.route(c).await {
            Ok(()) => Ok(()),
            Err(e) => self.channel_exception(ch, e, (60, 40)),
        }
    }

    /// What a publish is refused for before it is routed: the user's write permission on
    /// the exchange and the topic rules (403), a missing exchange (404), an internal one
    /// (403).
    fn check_publish(&self, exchange: &str, routing_key: &str) -> ChanResult {
        self.can_write("exchange", exchange)?;
        self.can_publish_topic(exchange, routing_key)?;
        if self.exchange_internal(exchange)? {
            return Err(chan_err(
                reply::ACCESS_REFUSED,
                format!(
                    "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                    self.vhost
                ),
            ));
        }
        Ok(())
    }

    /// Route a publish: returned if unroutable and mandatory, stored with the next batch
    /// otherwise (or as a timer on a delayed exchange).
    async fn route(&mut self, c: Completed) -> ChanResult {
        let ch = c.channel;
        let now = self.shared.broker.now();
        let mut message = convert::to_message(
            &mut self.names,
            &c.exchange,
            &c.routing_key,
            &c.header.properties,
            c.header.raw_properties.clone(),
            // Moved: the unroutable return below sends the message's own.
            c.body,
            now,
        );
        // The same exchange and routing key as the last publish, with the router's tables
        // unchanged since it was checked and routed: its answer stands (three look-ups
        // under two locks each, a pattern match and a few allocations fewer a publish).
        let generation = self.shared.broker.router().generation();
        let known = self.names.routed(generation);
        if known.is_none() {
            self.check_publish(&c.exchange, &c.routing_key)?;
        }
        let seq = {
            let chan = self.chan(ch);
            chan.confirm.then(|| {
                chan.publish_seq += 1;
                chan.publish_seq
            })
        };
        let headers = convert::header_values(&c.header.properties);
        if let Some(g) = &self.producer_group {
            message.producer_group = g.clone().into();
        }
        let meta = self.shared.ex_meta(&self.vhost, &c.exchange);
        if meta.delayed {
            let delay = c
                .header
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get("x-delay"))
                .and_then(convert::int_value)
                .filter(|d| *d > 0);
            if let Some(ms) = delay {
                // Its expiration counts from when it reaches its queues, as with
                // RabbitMQ's plugin (the queue applies it on arrival): moved on by the delay.
                let mut message = message;
                let props = &mut message.properties;
                mqgate_core::props::update_u64(props, mqgate_core::props::EXPIRES_AT, |at| {
                    at.saturating_add(ms as u64)
                });
                // Confirmed in order: what came before is confirmed first.
                self.flush_batch()
                    .await
                    .map_err(|_| chan_err(reply::INTERNAL_ERROR, "store failed"))?;
                self.settle_writes().await;
                let r = self
                    .shared
                    .broker
                    .publish_exchange(
                        &self.vhost,
                        &c.exchange,
                        &c.routing_key,
                        &headers,
                        message,
                        Some(Delay::For(Duration::from_millis(ms as u64))),
                    )
                    .await;
                if let Some(seq) = seq {
                    frame::put_confirm(&mut self.output.out, ch, seq, false, r.is_ok());
                }
                return r.map(|_| ()).map_err(internal);
            }
        }
        let topics = match known {
            Some(topics) => topics,
            None => {
                let (routed, stable) = self
                    .shared
                    .broker
                    .router()
                    .route_stable(&self.vhost, &c.exchange, &c.routing_key, &headers)
                    .map_err(internal)?;
                if stable {
                    self.names.remember(generation, &routed.topics);
                }
                routed.topics.into()
            }
        };
        if topics.is_empty() {
            self.shared.stats.unroutable.fetch_add(1, Ordering::Relaxed);
            if c.mandatory {
                self.reply(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                        reply_code: reply::NO_ROUTE,
                        reply_text: "NO_ROUTE".into(),
                        exchange: c.exchange.as_str().into(),
                        routing_key: c.routing_key.as_str().into(),
                    })),
                );
                frame::put_content(
                    &mut self.output.out,
                    ch,
                    &c.header.raw_properties,
                    &message.body,
                    self.frame_max,
                );
            }
        }
        // Queue length limits (x-max-length, x-overflow) are the core's: a message a full
        // reject-publish queue refuses is nacked when the batch is confirmed.
        self.batch.push(Batched {
            channel: ch,
            seq,
            message,
            topics,
        });
        Ok(())
    }

    /// Queue the batched publishes for one store write, behind the connection's
    /// earlier writes; they are confirmed when it is durable (`confirm`, from the
    /// connection's loop). Waits for the oldest write first when the pipeline is full.
    pub(super) async fn flush_batch(&mut self) -> Result<(), End> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        // (channel, sequence number, the item it confirms).
        let mut confirms: Vec<(u16, u64, usize)> = Vec::new();
        let mut items = PublishBatch::new();
        // Transient messages (delivery mode 1) are not worth an fsync, as in RabbitMQ; a
        // batch with one persistent message is synced whole.
        let mut transient = true;
        for (i, b) in batch.into_iter().enumerate() {
            if let Some(seq) = b.seq {
                confirms.push((b.channel, seq, i));
            }
            transient &= props::get(&b.message.properties, convert::TRANSIENT).is_some();
            items.push(Outgoing::routed(b.message, b.topics));
        }
        items.durable = !transient;
        while self.writes.must_drain() {
            let (c, stored) = self.writes.next().await;
            self.confirm(c, stored);
        }
        if let Err((c, e)) = self.writes.submit(items, confirms).await {
            self.confirm(c, Err(e));
        }
        Ok(())
    }

    /// Wait for every write in flight and confirm it; whether all were stored.
    pub(super) async fn settle_writes(&mut self) -> bool {
        let mut all = true;
        while !self.writes.is_empty() {
            let (c, stored) = self.writes.next().await;
            all &= self.confirm(c, stored);
        }
        all
    }

    /// A batch's write is done: ack (or nack) its publishes; whether it was stored.
    pub(super) fn confirm(
        &mut self,
        confirms: Vec<(u16, u64, usize)>,
        stored: mqgate_core::Result<Vec<Option<mqgate_core::Published>>>,
    ) -> bool {
        let (ok, refused) = match stored {
            Ok(stored) => {
                let routed = stored
                    .iter()
                    .filter(|p| p.as_ref().is_some_and(|p| p.routed() > 0))
                    .count();
                self.shared
                    .stats
                    .routed
                    .fetch_add(routed as u64, Ordering::Relaxed);
                let refused: Vec<bool> = stored
                    .iter()
                    .map(|p| p.as_ref().is_some_and(|p| p.refused()))
                    .collect();
                (true, refused)
            }
            Err(e) => {
                tracing::error!(peer = %self.peer, error = %e, "AMQP: storing publishes failed; nacked");
                (false, Vec::new())
            }
        };
        if refused.iter().any(|r| *r) {
            // A full queue refused some: each message gets its own ack or nack.
            for (ch, seq, i) in confirms {
                if self.channels.get(&ch).is_some_and(|c| !c.closing) {
                    frame::put_confirm(&mut self.output.out, ch, seq, false, !refused[i]);
                }
            }
            return ok;
        }
        // One confirm per channel, multiple=true up to its last sequence number.
        let mut last: Vec<(u16, u64)> = Vec::new();
        for (ch, seq, _) in confirms {
            match last.iter_mut().find(|(c, _)| *c == ch) {
                Some(e) => e.1 = seq,
                None => last.push((ch, seq)),
            }
        }
        for (ch, seq) in last {
            if self.channels.get(&ch).is_some_and(|c| !c.closing) {
                frame::put_confirm(&mut self.output.out, ch, seq, true, ok);
            }
        }
        ok
    }
}

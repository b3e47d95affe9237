//! The channel class (open, close, flow), channel exceptions, and the dispatch of a
//! channel's methods to the class handlers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use amq_protocol::protocol::{basic, channel, confirm, AMQPClass};
use amq_protocol::types::ShortString;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::frame;
use crate::queue::Queue;
use crate::reply;

use super::{chan_err, method_ids, truncate, ChanErr, ChanResult, Channel, Conn, Cons, End};

/// How long a channel's close waits for its consumers to leave groups other gateways
/// own (their owners answer within the relay's timeout; a lost answer costs this).
const LEAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// Close a channel with an exception (or, for a hard error code, the connection).
    pub(super) fn channel_exception(
        &mut self,
        ch: u16,
        e: ChanErr,
        ids: (u16, u16),
    ) -> Result<(), End> {
        let ChanErr(code, text) = e;
        if reply::is_hard(code) {
            self.shared
                .stats
                .protocol_errors
                .fetch_add(1, Ordering::Relaxed);
            tracing::info!(peer = %self.peer, user = %self.user, code, %text, "AMQP: connection error");
            return Err(End::Error(code, text, ids.0, ids.1));
        }
        tracing::info!(peer = %self.peer, user = %self.user, channel = ch, code, %text, "AMQP: channel error");
        if let Some(c) = self.channels.get_mut(&ch) {
            let c = std::mem::take(c);
            self.close_channel_state(c);
            self.channels.insert(
                ch,
                Channel {
                    closing: true,
                    ..Default::default()
                },
            );
        }
        frame::put_method(
            &mut self.output.out,
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
                reply_code: code,
                reply_text: ShortString::from(truncate(&text, 255)),
                class_id: ids.0,
                method_id: ids.1,
            })),
        );
        Ok(())
    }

    /// Release a channel's consumers (their unacked messages go back to their queues).
    /// Returns what resolves once each has left its group where the group lives (at
    /// once on this gateway; a group another gateway owns answers).
    pub(super) fn close_channel_state(&mut self, c: Channel) -> Vec<mqgate_core::Left> {
        c.consumers
            .into_values()
            .map(|cons| self.release_consumer(cons))
            .collect()
    }

    fn release_consumer(&mut self, cons: Cons) -> mqgate_core::Left {
        if let Some(g) = cons.stream_group {
            if !cons.get && !cons.cancelled {
                self.consumer_gone(&cons.queue, cons.exclusive, None);
            }
            let broker = self.shared.broker.clone();
            drop(cons.consumer);
            tokio::spawn(async move {
                let _ = broker.delete_group(&g).await;
            });
            return Box::pin(std::future::ready(()));
        }
        let (queue, exclusive, gone) = (cons.queue, cons.exclusive, !cons.get && !cons.cancelled);
        let left = futures_util::FutureExt::shared(cons.consumer.leave());
        if gone {
            self.consumer_gone(&queue, exclusive, Some(Box::pin(left.clone())));
        }
        Box::pin(left)
    }

    /// A consumer of `q` went (`left`: resolves once its member has left the group
    /// where the group lives): auto-delete queues go with their last consumer.
    pub(super) fn consumer_gone(
        &mut self,
        q: &Arc<Queue>,
        exclusive: bool,
        left: Option<mqgate_core::Left>,
    ) {
        let clustered = self.shared.broker.clustered();
        let (delete, leaving) = {
            let mut s = q.state.lock();
            s.consumers = s.consumers.saturating_sub(1);
            if exclusive {
                s.exclusive_consumer = false;
            }
            if let (true, true, Some(l)) = (clustered, q.auto_delete, left) {
                // Those that have left already are dropped (a long-lived queue with
                // consumers coming and going keeps only the ones still leaving).
                s.leaving
                    .0
                    .retain_mut(|f| futures_util::FutureExt::now_or_never(f).is_none());
                s.leaving.0.push(l);
            }
            let delete = q.auto_delete && s.had_consumer && s.consumers == 0 && !s.deleted;
            let leaving = if s.consumers == 0 {
                std::mem::take(&mut s.leaving.0)
            } else {
                Vec::new()
            };
            (delete, leaving)
        };
        // A consumer of a deleted queue does not count against a queue of the same name
        // declared since (its group name is the same).
        if !q.state.lock().deleted {
            self.shared.broker.endpoint_in_use(&q.group, false);
        }
        if delete {
            auto_delete(Arc::clone(&self.shared), Arc::clone(q), leaving);
        }
    }

    pub(super) async fn on_channel_method(&mut self, ch: u16, m: AMQPClass) -> Result<(), End> {
        let ids = method_ids(&m);
        // Content must be whole before the next method.
        if self.channels.get(&ch).is_some_and(|c| c.content.is_some()) {
            return Err(self.conn_error(
                reply::UNEXPECTED_FRAME,
                format!(
                    "expected content header/body on channel {ch}, got method {}.{}",
                    ids.0, ids.1
                ),
                ids,
            ));
        }
        match &m {
            AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                if self.channels.get(&ch).is_some_and(|c| !c.closing) {
                    return Err(self.conn_error(
                        reply::CHANNEL_ERROR,
                        format!("second 'channel.open' seen on channel {ch}"),
                        ids,
                    ));
                }
                // Any id from 1 to 65535, as RabbitMQ: the negotiated channel_max limits how
                // many are open at once.
                let open = self.channels.len();
                if open >= usize::from(self.channel_max) {
                    return Err(self.conn_error(
                        reply::NOT_ALLOWED,
                        format!(
                            "number of channels opened ({open}) has reached the negotiated channel_max ({})",
                            self.channel_max
                        ),
                        ids,
                    ));
                }
                if self.channels.insert(ch, Channel::default()).is_none() {
                    self.shared.stats.channels.fetch_add(1, Ordering::Relaxed);
                }
                self.shared.channels.lock().insert((self.id, ch));
                frame::put_method(
                    &mut self.output.out,
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                );
                return Ok(());
            }
            AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)) => {
                if self.channels.get(&ch).is_some_and(|c| c.closing) {
                    self.channels.remove(&ch);
                    self.shared.stats.channels.fetch_sub(1, Ordering::Relaxed);
                    self.shared.channels.lock().remove(&(self.id, ch));
                }
                return Ok(());
            }
            AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                if let Some(c) = self.channels.remove(&ch) {
                    self.shared.stats.channels.fetch_sub(1, Ordering::Relaxed);
                    self.shared.channels.lock().remove(&(self.id, ch));
                    // Close-ok once the consumers' unacked messages are back in their
                    // queues (a client's next basic.get sees them, as with RabbitMQ).
                    for left in self.close_channel_state(c) {
                        let _ = tokio::time::timeout(LEAVE_WAIT, left).await;
                    }
                    frame::put_method(
                        &mut self.output.out,
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                    );
                    return Ok(());
                }
                return self.unexpected(ch, "channel.close");
            }
            _ => {}
        }
        match self.channels.get(&ch) {
            None => return self.unexpected(ch, &format!("method {}.{}", ids.0, ids.1)),
            Some(c) if c.closing => return Ok(()),
            Some(_) => {}
        }
        match &m {
            AMQPClass::Basic(basic::AMQPMethod::Publish(_)) => {}
            // Settling deliveries depends on nothing published: the batch goes on.
            AMQPClass::Basic(
                basic::AMQPMethod::Ack(_)
                | basic::AMQPMethod::Nack(_)
                | basic::AMQPMethod::Reject(_),
            ) => {}
            // Keep order: what was published before this method is stored (and
            // confirmed) first, so a basic.get or a queue's message count sees it.
            _ => {
                self.flush_batch().await?;
                self.settle_writes().await;
            }
        }
        match self.on_method(ch, m).await {
            Ok(()) => Ok(()),
            Err(e) => self.channel_exception(ch, e, ids),
        }
    }

    pub(super) fn chan(&mut self, ch: u16) -> &mut Channel {
        self.channels.get_mut(&ch).expect("checked open")
    }

    pub(super) fn reply(&mut self, ch: u16, m: AMQPClass) {
        frame::put_method(&mut self.output.out, ch, m);
    }

    async fn on_method(&mut self, ch: u16, m: AMQPClass) -> ChanResult {
        match m {
            AMQPClass::Channel(channel::AMQPMethod::Flow(f)) => {
                self.chan(ch).flow_paused = !f.active;
                self.reply(
                    ch,
                    AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                        active: f.active,
                    })),
                );
                Ok(())
            }
            AMQPClass::Channel(channel::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Access(_) => {
                self.reply(
                    ch,
                    AMQPClass::Access(amq_protocol::protocol::access::AMQPMethod::RequestOk(
                        amq_protocol::protocol::access::RequestOk {},
                    )),
                );
                Ok(())
            }
            AMQPClass::Exchange(e) => self.on_exchange(ch, e).await,
            AMQPClass::Queue(q) => self.on_queue(ch, q).await,
            AMQPClass::Basic(b) => self.on_basic(ch, b).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let c = self.chan(ch);
                if c.tx.is_some() {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        "cannot switch from tx to confirm mode",
                    ));
                }
                c.confirm = true;
                if !s.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(t) => self.on_tx(ch, t).await,
            other => {
                let (c, m) = method_ids(&other);
                Err(chan_err(
                    reply::COMMAND_INVALID,
                    format!("method {c}.{m} is not valid from a client"),
                ))
            }
        }
    }
}

/// Delete auto-delete queue `q`, whose last consumer of this gateway went. In a cluster
/// its other consumers may be on other gateways: once this gateway's members have left
/// (`leaving`), the group (where the queue lives) says whether any is left; the last
/// consumer to go, wherever, deletes it.
pub(super) fn auto_delete(
    shared: Arc<crate::server::Shared>,
    q: Arc<Queue>,
    leaving: Vec<mqgate_core::Left>,
) {
    tokio::spawn(async move {
        if shared.broker.clustered() {
            for l in leaving {
                l.await;
            }
            if let Ok(g) = shared.broker.group_info(&q.group).await {
                if !g.members.is_empty() {
                    return;
                }
            }
        }
        shared.delete_queue(&q).await;
    });
}

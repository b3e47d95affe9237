//! The queue class: declare, bind, unbind, purge, delete.

use std::sync::Arc;

use amq_protocol::protocol::{queue, AMQPClass};
use mqgate_core::acl::Access;
use mqgate_core::router::Destination;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::queue::{queue_topic, Queue, QueueArgs};
use crate::reply;
use crate::server::Declared;

use super::{chan_err, internal, ChanErr, ChanResult, Conn};

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// A queue this connection may use (404 if missing, 405 if another connection's
    /// exclusive queue). In a cluster, one this gateway does not hold is looked up
    /// where its shard is owned (another gateway may have declared it).
    pub(super) async fn get_queue(&mut self, name: &str) -> ChanResult<Arc<Queue>> {
        let held = self.shared.queue(&self.vhost, name);
        let q = match held {
            Some(q) => Some(q),
            None if self.shared.broker.clustered() => self
                .shared
                .lookup_queue(&self.vhost, name)
                .await
                .map_err(internal)?,
            None => None,
        };
        let q = q.ok_or_else(|| {
            chan_err(
                reply::NOT_FOUND,
                format!("no queue '{name}' in vhost '{}'", self.vhost),
            )
        })?;
        self.may_use(&q)?;
        Ok(q)
    }

    /// 405 if `q` is another connection's exclusive queue.
    fn may_use(&self, q: &Queue) -> ChanResult {
        if q.exclusive.is_some_and(|c| c != self.id) {
            return Err(chan_err(
                reply::RESOURCE_LOCKED,
                format!(
                    "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                    q.name, self.vhost
                ),
            ));
        }
        Ok(())
    }

    /// The answer to a declaration of `q`, which exists: 405 / 406 unless `d` declares
    /// it the same way; else its ready messages and consumers.
    async fn redeclared(&mut self, q: &Queue, d: &queue::Declare) -> ChanResult<(u32, u32)> {
        let name = q.name.as_str();
        self.may_use(q)?;
        let what = if q.durable != d.durable {
            Some(("durable", d.durable, q.durable))
        } else if q.exclusive.is_some() != d.exclusive {
            Some(("exclusive", d.exclusive, q.exclusive.is_some()))
        } else if q.auto_delete != d.auto_delete {
            Some(("auto_delete", d.auto_delete, q.auto_delete))
        } else {
            None
        };
        if matches!(what, Some(("exclusive", _, _))) {
            // RabbitMQ answers a mismatched exclusive flag as it answers another
            // connection's declare: 405.
            return Err(chan_err(
                reply::RESOURCE_LOCKED,
                format!(
                    "cannot obtain exclusive access to locked queue '{name}' in vhost '{}'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
                    self.vhost
                ),
            ));
        }
        if let Some((arg, got, cur)) = what {
            return Err(chan_err(
                reply::PRECONDITION_FAILED,
                format!("inequivalent arg '{arg}' for queue '{name}' in vhost '{}': received '{got}' but current is '{cur}'", self.vhost),
            ));
        }
        for (k, v) in d.arguments.inner() {
            if k.as_str().starts_with("x-")
                && !q
                    .raw_args
                    .inner()
                    .get(k)
                    .is_some_and(|cur| equivalent_arg(cur, v))
            {
                return Err(chan_err(
                    reply::PRECONDITION_FAILED,
                    format!(
                        "inequivalent arg '{k}' for queue '{name}' in vhost '{}'",
                        self.vhost
                    ),
                ));
            }
        }
        let n = self.shared.ready_count(q).await;
        let c = q.state.lock().consumers as u32;
        Ok((n, c))
    }

    pub(super) async fn on_queue(&mut self, ch: u16, m: queue::AMQPMethod) -> ChanResult {
        match m {
            queue::AMQPMethod::Declare(d) => {
                let mut name = d.queue.as_str().to_owned();
                if name.is_empty() && !d.passive {
                    self.server_named += 1;
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|t| t.as_nanos())
                        .unwrap_or(0);
                    name = format!(
                        "amq.gen-{:x}{:x}-{}",
                        self.id,
                        nanos & 0xffff_ffff,
                        self.server_named
                    );
                } else if d.passive {
                    // In a cluster, asked where the queue lives (deleted elsewhere:
                    // 404).
                    let q = self
                        .shared
                        .lookup_queue(&self.vhost, &name)
                        .await
                        .map_err(internal)?
                        .ok_or_else(|| {
                            chan_err(
                                reply::NOT_FOUND,
                                format!("no queue '{name}' in vhost '{}'", self.vhost),
                            )
                        })?;
                    self.may_use(&q)?;
                    let count = self.shared.ready_count(&q).await;
                    let consumers = q.state.lock().consumers as u32;
                    if !d.nowait {
                        self.reply_declare_ok(ch, &name, count, consumers);
                    }
                    return Ok(());
                } else if name.starts_with("amq.") {
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        format!("queue name '{name}' contains reserved prefix 'amq.*'"),
                    ));
                }
                self.can_configure("queue", &name)?;
                // A broker of its own holds every queue; in a cluster the gateway
                // owning the queue's shard answers (another gateway may have declared
                // or deleted it since).
                let held = match self.shared.broker.clustered() {
                    true => None,
                    false => self.shared.queue(&self.vhost, &name),
                };
                let existing = match held {
                    // The core is deleting it (x-expires) right now: wait until it is
                    // gone and declare it anew, as if it had gone a moment earlier.
                    Some(q) if !self.shared.broker.touch_endpoint(&q.group) => {
                        self.shared.broker.endpoint_settled(&q.group).await;
                        self.shared.expired(&q.group);
                        None
                    }
                    other => other,
                };
                let (count, consumers) = match existing {
                    Some(q) => self.redeclared(&q, &d).await?,
                    None => {
                        let args =
                            QueueArgs::parse(&d.arguments, self.shared.cfg.default_retry_policy)
                                .map_err(|(c, t)| chan_err(c, t))?;
                        // Dead letters are published with the message's routing key (or
                        // x-dead-letter-routing-key).
                        if let Some(dlx) = &args.dlx {
                            let key = args.dlrk.as_deref().unwrap_or("#");
                            self.can_bind_topic(dlx, Access::Publish, key)?;
                        }
                        let (topic, group) = queue_topic(&self.vhost, &name);
                        let q = Queue {
                            vhost: self.vhost.clone(),
                            name: name.clone(),
                            topic,
                            group,
                            durable: d.durable,
                            exclusive: d.exclusive.then_some(self.id),
                            auto_delete: d.auto_delete,
                            raw_args: d.arguments.clone(),
                            args,
                            state: Mutex::default(),
                        };
                        match self
                            .shared
                            .create_queue(q)
                            .await
                            .map_err(|(c, t)| chan_err(c, t))?
                        {
                            Declared::Created(q) => {
                                if d.exclusive {
                                    self.exclusive.push(q);
                                }
                                (0, 0)
                            }
                            Declared::Exists(q) => self.redeclared(&q, &d).await?,
                        }
                    }
                };
                if !d.nowait {
                    self.reply_declare_ok(ch, &name, count, consumers);
                }
                Ok(())
            }
            queue::AMQPMethod::Bind(b) => {
                let q = self.get_queue(b.queue.as_str()).await?;
                let ex = b.exchange.as_str();
                if ex.is_empty() {
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        "operation not permitted on the default exchange",
                    ));
                }
                self.can_write("queue", &q.name)?;
                self.can_read("exchange", ex)?;
                self.can_bind_topic(ex, Access::Subscribe, b.routing_key.as_str())?;
                let e = self.exchange_exists(ex)?;
                let binding = self.binding(
                    &e,
                    Destination::Topic(q.topic.clone()),
                    b.routing_key.as_str(),
                    &b.arguments,
                );
                self.shared
                    .broker
                    .bind(&self.vhost, binding, q.persistent() && e.durable)
                    .await
                    .map_err(internal)?;
                if !b.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Unbind(b) => {
                let q = self.get_queue(b.queue.as_str()).await?;
                let ex = b.exchange.as_str();
                if ex.is_empty() {
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        "operation not permitted on the default exchange",
                    ));
                }
                self.can_write("queue", &q.name)?;
                self.can_read("exchange", ex)?;
                if let Ok(e) = self.exchange_exists(ex) {
                    let binding = self.binding(
                        &e,
                        Destination::Topic(q.topic.clone()),
                        b.routing_key.as_str(),
                        &b.arguments,
                    );
                    self.shared
                        .broker
                        .unbind(&self.vhost, &binding)
                        .await
                        .map_err(internal)?;
                }
                self.reply(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
                );
                Ok(())
            }
            queue::AMQPMethod::Purge(p) => {
                let q = self.get_queue(p.queue.as_str()).await?;
                self.can_read("queue", &q.name)?;
                let n = self.shared.purge(&q).await.map_err(internal)?;
                if !p.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                            message_count: n,
                        })),
                    );
                }
                Ok(())
            }
            queue::AMQPMethod::Delete(d) => {
                let name = d.queue.as_str();
                let q = match self.get_queue(name).await {
                    Ok(q) => q,
                    Err(ChanErr(reply::NOT_FOUND, _)) => {
                        // RabbitMQ: deleting a queue that does not exist succeeds.
                        if !d.nowait {
                            self.reply(
                                ch,
                                AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                                    message_count: 0,
                                })),
                            );
                        }
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                self.can_configure("queue", name)?;
                if d.if_unused && q.state.lock().consumers > 0 {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        format!("queue '{name}' in vhost '{}' in use", self.vhost),
                    ));
                }
                if d.if_empty && self.shared.ready_count(&q).await > 0 {
                    return Err(chan_err(
                        reply::PRECONDITION_FAILED,
                        format!("queue '{name}' in vhost '{}' is not empty", self.vhost),
                    ));
                }
                let n = self.shared.delete_queue(&q).await;
                self.exclusive.retain(|e| !Arc::ptr_eq(e, &q));
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count: n,
                        })),
                    );
                }
                Ok(())
            }
            _ => Err(chan_err(reply::COMMAND_INVALID, "not a client method")),
        }
    }

    fn reply_declare_ok(&mut self, ch: u16, name: &str, count: u32, consumers: u32) {
        self.reply(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                queue: name.into(),
                message_count: count,
                consumer_count: consumers,
            })),
        );
    }
}

/// Two declarations' values of one argument are the same, as RabbitMQ compares them
/// (`rabbit_misc:type_class`): integers of any width and signedness by value (one
/// client sends `x-message-ttl` as a 32-bit 'I', another as a 64-bit 'l'), short and
/// long strings by their bytes, anything else as it is.
fn equivalent_arg(a: &amq_protocol::types::AMQPValue, b: &amq_protocol::types::AMQPValue) -> bool {
    use amq_protocol::types::AMQPValue as V;
    fn int(v: &V) -> Option<i128> {
        Some(match v {
            V::ShortShortInt(i) => i128::from(*i),
            V::ShortShortUInt(i) => i128::from(*i),
            V::ShortInt(i) => i128::from(*i),
            V::ShortUInt(i) => i128::from(*i),
            V::LongInt(i) => i128::from(*i),
            V::LongUInt(i) => i128::from(*i),
            V::LongLongInt(i) => i128::from(*i),
            _ => return None,
        })
    }
    fn text(v: &V) -> Option<&[u8]> {
        match v {
            V::ShortString(s) => Some(s.as_str().as_bytes()),
            V::LongString(s) => Some(s.as_bytes()),
            _ => None,
        }
    }
    match (int(a), int(b), text(a), text(b)) {
        (Some(x), Some(y), _, _) => x == y,
        (_, _, Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use amq_protocol::types::AMQPValue as V;

    #[test]
    fn integer_widths_and_string_kinds_are_one_class() {
        use super::equivalent_arg as eq;
        assert!(eq(&V::LongInt(60_000), &V::LongLongInt(60_000)));
        assert!(eq(&V::ShortUInt(10), &V::LongLongInt(10)));
        assert!(!eq(&V::LongInt(60_000), &V::LongLongInt(60_001)));
        assert!(eq(
            &V::ShortString("lazy".into()),
            &V::LongString("lazy".into())
        ));
        assert!(!eq(&V::LongString("60000".into()), &V::LongInt(60_000)));
        assert!(eq(&V::Boolean(true), &V::Boolean(true)));
        assert!(!eq(&V::Boolean(true), &V::Boolean(false)));
    }
}

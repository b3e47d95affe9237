//! The exchange class: declare, delete, bind, unbind.

use amq_protocol::protocol::{exchange, AMQPClass};
use amq_protocol::types::FieldTable;
use bytes::Bytes;
use mqgate_core::acl::Access;
use mqgate_core::router::{Binding, Destination, ExchangeKind, HeaderMatch};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::convert;
use crate::reply;
use crate::server::{ExMeta, Shared};

use super::{chan_err, internal, ChanResult, Conn};

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    pub(super) async fn on_exchange(&mut self, ch: u16, m: exchange::AMQPMethod) -> ChanResult {
        match m {
            exchange::AMQPMethod::Declare(d) => {
                let name = d.exchange.as_str();
                if name.is_empty() {
                    // As RabbitMQ: the default exchange is not declared, not even passively.
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        format!(
                            "operation not permitted on the default exchange (vhost '{}')",
                            self.vhost
                        ),
                    ));
                }
                let existing = self.shared.broker.router().exchange(&self.vhost, name);
                if d.passive {
                    if existing.is_none() {
                        return Err(chan_err(
                            reply::NOT_FOUND,
                            format!("no exchange '{name}' in vhost '{}'", self.vhost),
                        ));
                    }
                } else {
                    self.can_configure("exchange", name)?;
                    let ty = d.kind.as_str();
                    let (kind, delayed) = if ty == "x-delayed-message" {
                        let inner = d
                            .arguments
                            .inner()
                            .get("x-delayed-type")
                            .and_then(convert::str_value)
                            .ok_or_else(|| {
                                chan_err(
                                    reply::PRECONDITION_FAILED,
                                    "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                                )
                            })?;
                        let k = ExchangeKind::parse(&inner).ok_or_else(|| {
                            chan_err(
                                reply::PRECONDITION_FAILED,
                                "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                            )
                        })?;
                        (k, true)
                    } else {
                        let k = ExchangeKind::parse(ty).ok_or_else(|| {
                            chan_err(
                                reply::COMMAND_INVALID,
                                format!("unknown exchange type '{ty}'"),
                            )
                        })?;
                        (k, false)
                    };
                    let def = Shared::exchange_def(
                        name,
                        kind,
                        d.durable,
                        d.auto_delete,
                        d.internal,
                        &d.arguments,
                        delayed,
                    );
                    match existing {
                        Some(e) => {
                            if e.kind != def.kind
                                || e.durable != def.durable
                                || e.auto_delete != def.auto_delete
                                || e.internal != def.internal
                                || (e.arguments != def.arguments
                                    && !name.is_empty()
                                    && !name.starts_with("amq."))
                            {
                                let what = if e.kind != def.kind {
                                    "type"
                                } else if e.durable != def.durable {
                                    "durable"
                                } else if e.auto_delete != def.auto_delete {
                                    "auto_delete"
                                } else if e.internal != def.internal {
                                    "internal"
                                } else {
                                    "arguments"
                                };
                                return Err(chan_err(
                                    reply::PRECONDITION_FAILED,
                                    format!("inequivalent arg '{what}' for exchange '{name}' in vhost '{}'", self.vhost),
                                ));
                            }
                        }
                        None => {
                            if name.starts_with("amq.") || name.is_empty() {
                                return Err(chan_err(
                                    reply::ACCESS_REFUSED,
                                    format!(
                                        "exchange name '{name}' contains reserved prefix 'amq.*'"
                                    ),
                                ));
                            }
                            // Unroutable messages go to the alternate exchange with
                            // their routing key, whatever it is.
                            if let Some(alt) = &def.alternate {
                                self.can_bind_topic(alt, Access::Publish, "#")?;
                            }
                            self.shared
                                .broker
                                .declare_exchange(&self.vhost, def)
                                .await
                                .map_err(internal)?;
                            if delayed {
                                self.shared.exchanges.write().insert(
                                    (self.vhost.clone(), name.to_owned()),
                                    ExMeta { delayed },
                                );
                            }
                        }
                    }
                }
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                            exchange::DeclareOk {},
                        )),
                    );
                }
                Ok(())
            }
            exchange::AMQPMethod::Delete(d) => {
                let name = d.exchange.as_str();
                if name.is_empty() || name.starts_with("amq.") {
                    return Err(chan_err(
                        reply::ACCESS_REFUSED,
                        format!("operation not permitted on the default exchange or 'amq.*' exchanges ('{name}')"),
                    ));
                }
                self.can_configure("exchange", name)?;
                if self
                    .shared
                    .broker
                    .router()
                    .exchange(&self.vhost, name)
                    .is_some()
                {
                    if d.if_unused {
                        let used = !self
                            .shared
                            .broker
                            .router()
                            .bindings(&self.vhost, Some(name))
                            .is_empty();
                        if used {
                            return Err(chan_err(
                                reply::PRECONDITION_FAILED,
                                format!("exchange '{name}' in vhost '{}' in use", self.vhost),
                            ));
                        }
                    }
                    self.shared
                        .broker
                        .delete_exchange(&self.vhost, name, false)
                        .await
                        .map_err(internal)?;
                    self.shared
                        .exchanges
                        .write()
                        .remove(&(self.vhost.clone(), name.to_owned()));
                }
                if !d.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                    );
                }
                Ok(())
            }
            exchange::AMQPMethod::Bind(b) => {
                let (dest, src) = (b.destination.as_str(), b.source.as_str());
                self.exchange_bind(dest, src, b.routing_key.as_str(), &b.arguments, true)
                    .await?;
                if !b.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                    );
                }
                Ok(())
            }
            exchange::AMQPMethod::Unbind(b) => {
                let (dest, src) = (b.destination.as_str(), b.source.as_str());
                self.exchange_bind(dest, src, b.routing_key.as_str(), &b.arguments, false)
                    .await?;
                if !b.nowait {
                    self.reply(
                        ch,
                        AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                    );
                }
                Ok(())
            }
            _ => Err(chan_err(reply::COMMAND_INVALID, "not a client method")),
        }
    }

    pub(super) fn binding(
        &self,
        source: &mqgate_core::router::ExchangeDef,
        destination: Destination,
        key: &str,
        args: &FieldTable,
    ) -> Binding {
        let headers = (source.kind == ExchangeKind::Headers).then(|| {
            let mode = args.inner().get("x-match").and_then(convert::str_value);
            let mode = mode.as_deref();
            // `any-with-x` / `all-with-x` (RabbitMQ 3.10) match `x-` headers too; the
            // plain modes leave them out. `x-match` itself is never a header to match.
            let with_x = matches!(mode, Some("any-with-x" | "all-with-x"));
            HeaderMatch {
                all: !matches!(mode, Some("any" | "any-with-x")),
                headers: args
                    .inner()
                    .iter()
                    .filter(|(k, _)| {
                        k.as_str() != "x-match" && (with_x || !k.as_str().starts_with("x-"))
                    })
                    .map(|(k, v)| (k.as_str().to_owned(), convert::header_value(v)))
                    .collect(),
            }
        });
        let (enc, _) = cookie_factory::gen(
            amq_protocol::types::generation::gen_field_table(args),
            Vec::new(),
        )
        .expect("writing to a Vec cannot fail");
        Binding {
            source: source.name.clone(),
            destination,
            key: key.to_owned(),
            headers,
            mqtt: false,
            arguments: Bytes::from(enc),
        }
    }

    async fn exchange_bind(
        &mut self,
        dest: &str,
        src: &str,
        key: &str,
        args: &FieldTable,
        bind: bool,
    ) -> ChanResult {
        if src.is_empty() || dest.is_empty() {
            return Err(chan_err(
                reply::ACCESS_REFUSED,
                "operation not permitted on the default exchange",
            ));
        }
        self.can_write("exchange", dest)?;
        self.can_read("exchange", src)?;
        if bind {
            self.can_bind_topic(src, Access::Subscribe, key)?;
            // What enters amq.topic keeps its routing key, whatever the binding's key.
            self.can_bind_topic(dest, Access::Publish, "#")?;
        }
        let d = self.exchange_exists(dest);
        let s = self.exchange_exists(src);
        if !bind && (d.is_err() || s.is_err()) {
            return Ok(());
        }
        let (d, s) = (d?, s?);
        let b = self.binding(&s, Destination::Exchange(d.name.clone()), key, args);
        if bind {
            self.shared
                .broker
                .bind(&self.vhost, b, s.durable && d.durable)
                .await
                .map_err(internal)?;
        } else {
            self.shared
                .broker
                .unbind(&self.vhost, &b)
                .await
                .map_err(internal)?;
        }
        Ok(())
    }
}

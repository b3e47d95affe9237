//! An in-process AMQP connection, as RabbitMQ's management plugin opens a "direct"
//! connection: the HTTP management API declares, binds, publishes and gets through the
//! same connection code a client's frames go through, logged in as the HTTP user, so
//! every check (permissions, argument equivalence, reserved names, exclusive queues)
//! answers exactly as it would over the socket. Frames travel over an in-memory pipe.

use std::net::SocketAddr;
use std::time::Duration;

use amq_protocol::protocol::BasicProperties;
use amq_protocol::protocol::{basic, channel, confirm, connection, exchange, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use crate::frame::{self, Frame, PROTOCOL_HEADER};
use crate::reply;
use crate::server::AmqpServer;

/// How long one exchange of frames may take before the call fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a direct call failed: the reply code and text the broker closed the channel (or
/// connection) with, as a client would see them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code} {text}")]
pub struct DirectError {
    /// The AMQP reply code (403 ACCESS_REFUSED, 404 NOT_FOUND, 406 PRECONDITION_FAILED...).
    pub code: u16,
    /// The reply text.
    pub text: String,
}

impl DirectError {
    fn new(code: u16, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
        }
    }

    fn gone() -> Self {
        Self::new(reply::INTERNAL_ERROR, "the direct connection ended")
    }
}

type Result<T> = std::result::Result<T, DirectError>;

/// What `get` does with the messages it took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GetAck {
    /// Put them back (RabbitMQ's `ack_requeue_true`): they are marked redelivered.
    Requeue,
    /// Acknowledge them (`ack_requeue_false`).
    Ack,
    /// Reject and requeue (`reject_requeue_true`).
    RejectRequeue,
    /// Reject without requeue (`reject_requeue_false`): dead-lettered if configured.
    Reject,
}

/// A message `get` took.
#[derive(Clone, Debug)]
pub struct GotMessage {
    /// The exchange it was published to.
    pub exchange: String,
    /// Its routing key.
    pub routing_key: String,
    /// Delivered before.
    pub redelivered: bool,
    /// Messages left in the queue after this one was taken.
    pub message_count: u32,
    /// Its properties.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Bytes,
}

/// An open direct connection with one channel.
#[derive(Debug)]
pub struct Direct {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    buf: BytesMut,
    out: BytesMut,
    frame_max: u32,
    channel: u16,
    confirms: bool,
}

impl AmqpServer {
    /// Open a direct connection to `vhost` logged in as `user` (refused as a socket
    /// client would be: 403 for a bad login, 530 for a vhost it may not use).
    pub async fn direct(&self, user: &str, password: &str, vhost: &str) -> Result<Direct> {
        let (ours, theirs) = tokio::io::duplex(256 * 1024);
        // No network peer: an address no client has, so the login throttle's record of
        // a real source is neither cleared nor charged by management calls.
        let peer = SocketAddr::from(([0, 0, 0, 0], 0));
        self.serve_stream(theirs, peer);
        let (rd, wr) = tokio::io::split(ours);
        let mut d = Direct {
            rd,
            wr,
            buf: BytesMut::with_capacity(8192),
            out: BytesMut::new(),
            frame_max: frame::FRAME_MIN_SIZE,
            channel: 0,
            confirms: false,
        };
        d.write_raw(PROTOCOL_HEADER).await?;
        d.expect_connection(|m| matches!(m, connection::AMQPMethod::Start(_)))
            .await?;
        let mut props = FieldTable::default();
        props.insert(
            "connection_name".into(),
            AMQPValue::LongString("management API (direct)".into()),
        );
        let response = format!("\0{user}\0{password}");
        d.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: ShortString::from("PLAIN"),
                response: LongString::from(response.into_bytes()),
                locale: ShortString::from("en_US"),
            })),
        )
        .await?;
        let tune = match d.connection_method().await? {
            connection::AMQPMethod::Tune(t) => t,
            other => return Err(unexpected(&format!("{other:?}"))),
        };
        d.frame_max = tune.frame_max.max(frame::FRAME_MIN_SIZE);
        d.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max: d.frame_max,
                heartbeat: 0,
            })),
        )
        .await?;
        d.send(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: ShortString::from(vhost.to_owned()),
            })),
        )
        .await?;
        d.expect_connection(|m| matches!(m, connection::AMQPMethod::OpenOk(_)))
            .await?;
        d.open_channel().await?;
        Ok(d)
    }
}

fn unexpected(what: &str) -> DirectError {
    DirectError::new(
        reply::INTERNAL_ERROR,
        format!("unexpected frame on the direct connection: {what}"),
    )
}

impl Direct {
    async fn write_raw(&mut self, b: &[u8]) -> Result<()> {
        match tokio::time::timeout(STEP_TIMEOUT, self.wr.write_all(b)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(DirectError::gone()),
        }
    }

    async fn flush_out(&mut self) -> Result<()> {
        let out = std::mem::take(&mut self.out);
        let r = self.write_raw(&out).await;
        self.out = out;
        self.out.clear();
        r
    }

    async fn send(&mut self, ch: u16, m: AMQPClass) -> Result<()> {
        frame::put_method(&mut self.out, ch, m);
        self.flush_out().await
    }

    /// The next frame (heartbeats skipped).
    async fn frame(&mut self) -> Result<Frame> {
        loop {
            match frame::decode(&mut self.buf, self.frame_max.max(131_072)) {
                Ok(Some(Frame::Heartbeat(_))) => continue,
                Ok(Some(f)) => return Ok(f),
                Ok(None) => {}
                Err(e) => return Err(DirectError::new(e.reply_code(), e.to_string())),
            }
            match tokio::time::timeout(STEP_TIMEOUT, self.rd.read_buf(&mut self.buf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err(DirectError::gone()),
                Err(_) => {
                    return Err(DirectError::new(
                        reply::INTERNAL_ERROR,
                        "the direct connection did not answer in time",
                    ))
                }
            }
        }
    }

    /// A connection method on channel 0 (a connection.close is the error it carries).
    async fn connection_method(&mut self) -> Result<connection::AMQPMethod> {
        match self.frame().await? {
            Frame::Method(0, m) => match *m {
                AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                    Err(DirectError::new(c.reply_code, c.reply_text.as_str()))
                }
                AMQPClass::Connection(m) => Ok(m),
                other => Err(unexpected(&format!("{other:?}"))),
            },
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }

    async fn expect_connection(
        &mut self,
        ok: impl Fn(&connection::AMQPMethod) -> bool,
    ) -> Result<()> {
        let m = self.connection_method().await?;
        if ok(&m) {
            Ok(())
        } else {
            Err(unexpected(&format!("{m:?}")))
        }
    }

    async fn open_channel(&mut self) -> Result<()> {
        self.channel += 1;
        self.confirms = false;
        let ch = self.channel;
        self.send(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await?;
        loop {
            match self.frame().await? {
                Frame::Method(c, m) if c == ch => {
                    return match *m {
                        AMQPClass::Channel(channel::AMQPMethod::OpenOk(_)) => Ok(()),
                        AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                            Err(DirectError::new(c.reply_code, c.reply_text.as_str()))
                        }
                        other => Err(unexpected(&format!("{other:?}"))),
                    }
                }
                Frame::Method(0, m) => {
                    if let AMQPClass::Connection(connection::AMQPMethod::Close(c)) = *m {
                        return Err(DirectError::new(c.reply_code, c.reply_text.as_str()));
                    }
                }
                // Frames of a channel closed earlier.
                _ => continue,
            }
        }
    }

    /// The next method on our channel. A channel.close is answered (close-ok), a new
    /// channel is opened for the next call, and its code and text are the error.
    async fn method(&mut self) -> Result<AMQPClass> {
        loop {
            match self.frame().await? {
                Frame::Method(0, m) => match *m {
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)) => {
                        return Err(DirectError::new(c.reply_code, c.reply_text.as_str()))
                    }
                    AMQPClass::Connection(connection::AMQPMethod::Blocked(_))
                    | AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)) => continue,
                    other => return Err(unexpected(&format!("{other:?}"))),
                },
                Frame::Method(ch, m) if ch == self.channel => match *m {
                    AMQPClass::Channel(channel::AMQPMethod::Close(c)) => {
                        let err = DirectError::new(c.reply_code, c.reply_text.as_str());
                        self.send(
                            ch,
                            AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
                        )
                        .await?;
                        self.open_channel().await?;
                        return Err(err);
                    }
                    m => return Ok(m),
                },
                // Frames of a channel closed earlier.
                _ => continue,
            }
        }
    }

    async fn call(&mut self, m: AMQPClass) -> Result<AMQPClass> {
        let ch = self.channel;
        self.send(ch, m).await?;
        self.method().await
    }

    /// queue.declare (not passive); returns (messages, consumers).
    pub async fn declare_queue(
        &mut self,
        name: &str,
        durable: bool,
        auto_delete: bool,
        arguments: FieldTable,
    ) -> Result<(u32, u32)> {
        match self
            .call(AMQPClass::Queue(queue::AMQPMethod::Declare(
                queue::Declare {
                    queue: ShortString::from(name.to_owned()),
                    passive: false,
                    durable,
                    exclusive: false,
                    auto_delete,
                    nowait: false,
                    arguments,
                },
            )))
            .await?
        {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => {
                Ok((ok.message_count, ok.consumer_count))
            }
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }

    /// queue.delete; returns the messages it held.
    pub async fn delete_queue(
        &mut self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
    ) -> Result<u32> {
        match self
            .call(AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: ShortString::from(name.to_owned()),
                if_unused,
                if_empty,
                nowait: false,
            })))
            .await?
        {
            AMQPClass::Queue(queue::AMQPMethod::DeleteOk(ok)) => Ok(ok.message_count),
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }

    /// queue.purge; returns the messages dropped.
    pub async fn purge_queue(&mut self, name: &str) -> Result<u32> {
        match self
            .call(AMQPClass::Queue(queue::AMQPMethod::Purge(queue::Purge {
                queue: ShortString::from(name.to_owned()),
                nowait: false,
            })))
            .await?
        {
            AMQPClass::Queue(queue::AMQPMethod::PurgeOk(ok)) => Ok(ok.message_count),
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }

    /// exchange.declare (not passive).
    pub async fn declare_exchange(
        &mut self,
        name: &str,
        kind: &str,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Result<()> {
        match self
            .call(AMQPClass::Exchange(exchange::AMQPMethod::Declare(
                exchange::Declare {
                    exchange: ShortString::from(name.to_owned()),
                    kind: ShortString::from(kind.to_owned()),
                    passive: false,
                    durable,
                    auto_delete,
                    internal,
                    nowait: false,
                    arguments,
                },
            )))
            .await?
        {
            AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(_)) => Ok(()),
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }

    /// exchange.delete.
    pub async fn delete_exchange(&mut self, name: &str, if_unused: bool) -> Result<()> {
        match self
            .call(AMQPClass::Exchange(exchange::AMQPMethod::Delete(
                exchange::Delete {
                    exchange: ShortString::from(name.to_owned()),
                    if_unused,
                    nowait: false,
                },
            )))
            .await?
        {
            AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(_)) => Ok(()),
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }

    /// queue.bind (`to_queue`) or exchange.bind; with `bind` false, the unbind.
    pub async fn binding(
        &mut self,
        bind: bool,
        source: &str,
        to_queue: bool,
        destination: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<()> {
        let (s, d, k) = (
            ShortString::from(source.to_owned()),
            ShortString::from(destination.to_owned()),
            ShortString::from(routing_key.to_owned()),
        );
        let m = match (to_queue, bind) {
            (true, true) => AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: d,
                exchange: s,
                routing_key: k,
                nowait: false,
                arguments,
            })),
            (true, false) => AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
                queue: d,
                exchange: s,
                routing_key: k,
                arguments,
            })),
            (false, true) => AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                destination: d,
                source: s,
                routing_key: k,
                nowait: false,
                arguments,
            })),
            (false, false) => AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                destination: d,
                source: s,
                routing_key: k,
                nowait: false,
                arguments,
            })),
        };
        match self.call(m).await? {
            AMQPClass::Queue(queue::AMQPMethod::BindOk(_))
            | AMQPClass::Queue(queue::AMQPMethod::UnbindOk(_))
            | AMQPClass::Exchange(exchange::AMQPMethod::BindOk(_))
            | AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(_)) => Ok(()),
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }

    /// Publish with `mandatory` and a publisher confirm: returns whether any queue took
    /// it (false: it was returned unroutable). Answers once the broker confirmed it.
    pub async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<bool> {
        if !self.confirms {
            match self
                .call(AMQPClass::Confirm(confirm::AMQPMethod::Select(
                    confirm::Select { nowait: false },
                )))
                .await?
            {
                AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(_)) => self.confirms = true,
                other => return Err(unexpected(&format!("{other:?}"))),
            }
        }
        let ch = self.channel;
        frame::put_method(
            &mut self.out,
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: ShortString::from(exchange.to_owned()),
                routing_key: ShortString::from(routing_key.to_owned()),
                mandatory: true,
                immediate: false,
            })),
        );
        let raw = frame::encode_properties(properties);
        frame::put_content(&mut self.out, ch, &raw, body, self.frame_max);
        self.flush_out().await?;
        let mut routed = true;
        loop {
            match self.method().await? {
                AMQPClass::Basic(basic::AMQPMethod::Return(_)) => {
                    routed = false;
                    self.content().await?;
                }
                AMQPClass::Basic(basic::AMQPMethod::Ack(_)) => return Ok(routed),
                AMQPClass::Basic(basic::AMQPMethod::Nack(_)) => {
                    return Err(DirectError::new(
                        reply::INTERNAL_ERROR,
                        "the broker could not store the message (nack)",
                    ))
                }
                other => return Err(unexpected(&format!("{other:?}"))),
            }
        }
    }

    /// The content header and body frames that follow a basic.return / get-ok.
    async fn content(&mut self) -> Result<(BasicProperties, Bytes)> {
        let header = match self.frame().await? {
            Frame::Header(ch, h) if ch == self.channel => h,
            other => return Err(unexpected(&format!("{other:?}"))),
        };
        let mut body = BytesMut::with_capacity(header.body_size.min(1 << 20) as usize);
        while (body.len() as u64) < header.body_size {
            match self.frame().await? {
                Frame::Body(ch, b) if ch == self.channel => body.extend_from_slice(&b),
                other => return Err(unexpected(&format!("{other:?}"))),
            }
        }
        Ok((header.properties, body.freeze()))
    }

    /// Take up to `count` messages with basic.get, then settle them all as `ack` says
    /// (all are taken before any is requeued, so requeued ones are not taken twice).
    pub async fn get(&mut self, queue: &str, count: usize, ack: GetAck) -> Result<Vec<GotMessage>> {
        let mut got = Vec::new();
        let mut last_tag = 0;
        for _ in 0..count {
            match self
                .call(AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                    queue: ShortString::from(queue.to_owned()),
                    no_ack: false,
                })))
                .await?
            {
                AMQPClass::Basic(basic::AMQPMethod::GetOk(ok)) => {
                    let (properties, body) = self.content().await?;
                    last_tag = ok.delivery_tag;
                    got.push(GotMessage {
                        exchange: ok.exchange.as_str().to_owned(),
                        routing_key: ok.routing_key.as_str().to_owned(),
                        redelivered: ok.redelivered,
                        message_count: ok.message_count,
                        properties,
                        body,
                    });
                }
                AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_)) => break,
                other => return Err(unexpected(&format!("{other:?}"))),
            }
        }
        if got.is_empty() {
            return Ok(got);
        }
        let settle = match ack {
            GetAck::Ack => AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: last_tag,
                multiple: true,
            })),
            GetAck::Requeue | GetAck::RejectRequeue | GetAck::Reject => {
                AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                    delivery_tag: last_tag,
                    multiple: true,
                    requeue: ack != GetAck::Reject,
                }))
            }
        };
        let ch = self.channel;
        self.send(ch, settle).await?;
        // A round trip, so the settlement is done when this returns.
        self.confirm_settled().await?;
        Ok(got)
    }

    /// A no-op round trip (a passive declare of the default exchange would be refused;
    /// basic.qos is harmless): every frame sent before it has been handled.
    async fn confirm_settled(&mut self) -> Result<()> {
        match self
            .call(AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 0,
                global: false,
            })))
            .await?
        {
            AMQPClass::Basic(basic::AMQPMethod::QosOk(_)) => Ok(()),
            other => Err(unexpected(&format!("{other:?}"))),
        }
    }

    /// Close the connection (connection.close, waiting briefly for close-ok).
    pub async fn close(mut self) {
        let _ = self
            .send(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: reply::SUCCESS,
                    reply_text: ShortString::from("closed by the management API"),
                    class_id: 0,
                    method_id: 0,
                })),
            )
            .await;
        let wait = async {
            loop {
                match self.frame().await {
                    Ok(Frame::Method(0, m))
                        if matches!(
                            *m,
                            AMQPClass::Connection(connection::AMQPMethod::CloseOk(_))
                        ) =>
                    {
                        return
                    }
                    Ok(_) => continue,
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), wait).await;
        let _ = self.wr.shutdown().await;
    }
}

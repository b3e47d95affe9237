//! A do-nothing broker for the benchmarks' ceiling: it speaks just enough AMQP 0-9-1 and
//! MQTT to take a client's publishes and acknowledge them (publisher confirms, PUBACK,
//! PUBREC/PUBCOMP), and it delivers nothing. What a bench client reaches against it is
//! what the client itself can drive on this machine, whatever the broker.
//!
//! ```sh
//! ./target/release/bench_sink --amqp 127.0.0.1:45672 --mqtt 127.0.0.1:41883 &
//! ./target/release/amqp_pubsub --url amqp://guest:guest@127.0.0.1:45672/%2f --publish-only --broker-pid $!
//! ```
//!
//! AMQP: the handshake, channels, exchange/queue declare, bind, delete, qos, consume,
//! cancel and confirm.select are answered with their -ok; every publish in confirm mode
//! is acknowledged, coalesced into one basic.ack (multiple) per read. MQTT: CONNACK,
//! SUBACK, UNSUBACK, PINGRESP, PUBACK, PUBREC and PUBCOMP.

use std::collections::HashMap;

use bytes::BytesMut;
use clap::Parser;
use mqgate_amqp_codec::amq::protocol::{
    basic, channel, confirm, connection, exchange, queue, AMQPClass,
};
use mqgate_amqp_codec::amq::types::{AMQPValue, FieldTable};
use mqgate_amqp_codec::frame::{self, Frame, PROTOCOL_HEADER};
use mqgate_mqtt_codec::{self as mqtt, Ack, AckKind, ConnAck, Packet, SubAck, UnsubAck, Version};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Parser)]
struct Args {
    /// AMQP listener.
    #[arg(long, default_value = "127.0.0.1:45672")]
    amqp: String,
    /// MQTT listener.
    #[arg(long, default_value = "127.0.0.1:41883")]
    mqtt: String,
}

const FRAME_MAX: u32 = 131_072;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let a = Args::parse();
    let amqp = TcpListener::bind(&a.amqp).await?;
    let mqtt = TcpListener::bind(&a.mqtt).await?;
    eprintln!("bench_sink: AMQP on {}, MQTT on {}", a.amqp, a.mqtt);
    let amqp_loop = async {
        loop {
            let (s, _) = amqp.accept().await?;
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                if let Err(e) = amqp_conn(s).await {
                    eprintln!("bench_sink: AMQP connection ended: {e}");
                }
            });
        }
    };
    let mqtt_loop = async {
        loop {
            let (s, _) = mqtt.accept().await?;
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                if let Err(e) = mqtt_conn(s).await {
                    eprintln!("bench_sink: MQTT connection ended: {e}");
                }
            });
        }
    };
    tokio::select! {
        r = amqp_loop => r,
        r = mqtt_loop => r,
    }
}

fn bad(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
}

/// Per-channel state: confirm mode and the publish counter, the body still expected.
#[derive(Default)]
struct Chan {
    confirms: bool,
    published: u64,
    acked: u64,
    body_left: u64,
}

async fn amqp_conn(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while buf.len() < 8 {
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
    if &buf[..8] != PROTOCOL_HEADER {
        s.write_all(PROTOCOL_HEADER).await?;
        return Ok(());
    }
    let _ = buf.split_to(8);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut caps = FieldTable::default();
    for c in ["publisher_confirms", "basic.nack", "per_consumer_qos"] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut props = FieldTable::default();
    props.insert("product".into(), AMQPValue::LongString("bench_sink".into()));
    props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    frame::put_method(
        &mut out,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: props,
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        })),
    );
    let mut chans: HashMap<u16, Chan> = HashMap::new();
    let mut names = 0u64;
    loop {
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        while let Some(f) = frame::decode(&mut buf, FRAME_MAX).map_err(bad)? {
            match f {
                Frame::Heartbeat(_) => {}
                Frame::Header(ch, h) => {
                    let c = chans.entry(ch).or_default();
                    c.body_left = h.body_size;
                    if h.body_size == 0 {
                        c.published += 1;
                    }
                }
                Frame::Body(ch, b) => {
                    let c = chans.entry(ch).or_default();
                    c.body_left = c.body_left.saturating_sub(b.len() as u64);
                    if c.body_left == 0 {
                        c.published += 1;
                    }
                }
                Frame::Method(ch, m) => {
                    let reply = match *m {
                        AMQPClass::Connection(connection::AMQPMethod::StartOk(_)) => Some(
                            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                                channel_max: 2047,
                                frame_max: FRAME_MAX,
                                heartbeat: 0,
                            })),
                        ),
                        AMQPClass::Connection(connection::AMQPMethod::TuneOk(_)) => None,
                        AMQPClass::Connection(connection::AMQPMethod::Open(_)) => {
                            Some(AMQPClass::Connection(connection::AMQPMethod::OpenOk(
                                connection::OpenOk {},
                            )))
                        }
                        AMQPClass::Connection(connection::AMQPMethod::Close(_)) => {
                            frame::put_method(
                                &mut out,
                                0,
                                AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                    connection::CloseOk {},
                                )),
                            );
                            s.write_all(&out).await?;
                            return Ok(());
                        }
                        AMQPClass::Channel(channel::AMQPMethod::Open(_)) => {
                            chans.insert(ch, Chan::default());
                            Some(AMQPClass::Channel(channel::AMQPMethod::OpenOk(
                                channel::OpenOk {},
                            )))
                        }
                        AMQPClass::Channel(channel::AMQPMethod::Close(_)) => {
                            chans.remove(&ch);
                            Some(AMQPClass::Channel(channel::AMQPMethod::CloseOk(
                                channel::CloseOk {},
                            )))
                        }
                        AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                            chans.entry(ch).or_default().confirms = true;
                            (!s.nowait).then_some(AMQPClass::Confirm(
                                confirm::AMQPMethod::SelectOk(confirm::SelectOk {}),
                            ))
                        }
                        AMQPClass::Exchange(exchange::AMQPMethod::Declare(d)) => (!d.nowait)
                            .then_some(AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(
                                exchange::DeclareOk {},
                            ))),
                        AMQPClass::Exchange(exchange::AMQPMethod::Delete(d)) => (!d.nowait)
                            .then_some(AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(
                                exchange::DeleteOk {},
                            ))),
                        AMQPClass::Queue(queue::AMQPMethod::Declare(d)) => {
                            let name = if d.queue.as_str().is_empty() {
                                names += 1;
                                format!("sink.gen-{names}").into()
                            } else {
                                d.queue.clone()
                            };
                            (!d.nowait).then_some(AMQPClass::Queue(queue::AMQPMethod::DeclareOk(
                                queue::DeclareOk {
                                    queue: name,
                                    message_count: 0,
                                    consumer_count: 0,
                                },
                            )))
                        }
                        AMQPClass::Queue(queue::AMQPMethod::Bind(b)) => (!b.nowait).then_some(
                            AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                        ),
                        AMQPClass::Queue(queue::AMQPMethod::Delete(d)) => {
                            (!d.nowait).then_some(AMQPClass::Queue(queue::AMQPMethod::DeleteOk(
                                queue::DeleteOk { message_count: 0 },
                            )))
                        }
                        AMQPClass::Basic(basic::AMQPMethod::Qos(_)) => {
                            Some(AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})))
                        }
                        AMQPClass::Basic(basic::AMQPMethod::Consume(c)) => {
                            let tag = if c.consumer_tag.as_str().is_empty() {
                                names += 1;
                                format!("sink.ctag-{names}").into()
                            } else {
                                c.consumer_tag.clone()
                            };
                            (!c.nowait).then_some(AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(
                                basic::ConsumeOk { consumer_tag: tag },
                            )))
                        }
                        AMQPClass::Basic(basic::AMQPMethod::Cancel(c)) => (!c.nowait).then_some(
                            AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                                consumer_tag: c.consumer_tag,
                            })),
                        ),
                        // Publishes are counted when their content is complete; acks
                        // of deliveries never come (nothing is delivered).
                        _ => None,
                    };
                    if let Some(r) = reply {
                        frame::put_method(&mut out, ch, r);
                    }
                }
            }
        }
        // One confirm (multiple) per channel per read.
        for (&ch, c) in chans.iter_mut() {
            if c.confirms && c.published > c.acked {
                frame::put_confirm(&mut out, ch, c.published, true, true);
                c.acked = c.published;
            }
        }
    }
}

async fn mqtt_conn(mut s: TcpStream) -> std::io::Result<()> {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut out = BytesMut::with_capacity(64 * 1024);
    let mut version: Option<Version> = None;
    let max = 1 << 20;
    loop {
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
        while let Some(p) = mqtt::decode(&mut buf, version, max).map_err(bad)? {
            let v = version.unwrap_or(Version::V311);
            let reply = match p {
                Packet::Connect(c) => {
                    version = Some(c.version);
                    Some(Packet::ConnAck(ConnAck {
                        session_present: false,
                        code: 0,
                        properties: Default::default(),
                    }))
                }
                Packet::Publish(p) => match p.qos {
                    mqtt::QoS::AtMostOnce => None,
                    mqtt::QoS::AtLeastOnce => Some(ack(AckKind::PubAck, p.pkid)),
                    mqtt::QoS::ExactlyOnce => Some(ack(AckKind::PubRec, p.pkid)),
                },
                Packet::Ack(a) if a.kind == AckKind::PubRel => Some(ack(AckKind::PubComp, a.pkid)),
                Packet::Subscribe(sub) => Some(Packet::SubAck(SubAck {
                    pkid: sub.pkid,
                    properties: Default::default(),
                    codes: sub.filters.iter().map(|(_, o)| o.qos as u8).collect(),
                })),
                Packet::Unsubscribe(u) => Some(Packet::UnsubAck(UnsubAck {
                    pkid: u.pkid,
                    properties: Default::default(),
                    codes: if v == Version::V5 {
                        vec![0; u.filters.len()]
                    } else {
                        Vec::new()
                    },
                })),
                Packet::PingReq => Some(Packet::PingResp),
                Packet::Disconnect(_) => return Ok(()),
                _ => None,
            };
            if let Some(r) = reply {
                mqtt::encode(&r, version.unwrap_or(Version::V311), &mut out);
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            out.clear();
        }
    }
}

fn ack(kind: AckKind, pkid: u16) -> Packet {
    Packet::Ack(Ack {
        kind,
        pkid,
        reason: 0,
        properties: Default::default(),
    })
}

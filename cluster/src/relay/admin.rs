//! The admin relay: topic and group operations on a shard another gateway owns
//! (`docs/design/sharding.md` section 4, `adm`): `Broker::create_topic`,
//! `delete_topic`, `group_info`, `reset_group`, `delete_group`, and the endpoint
//! declarations (`declare_endpoint_once`, `endpoint_record`, `delete_endpoint`) on a
//! gateway that does not own the shard come here ([`mqgate_core::shard::AdminOp`]) and
//! run on the owner ([`mqgate_core::Broker::admin`]).
//!
//! Request (`s.NN.adm`): tag u8 (1 create topic: name, queues?; 2 delete topic: name;
//! 3 group info: name; 4 reset group: name, start tag u8 + u64; 5 delete group: name;
//! 6 routing change: bytes of `RoutingOp::encode`, run on shard 0; 7 declare an
//! endpoint once: topic, queues u32, group, namespace, key, record; 8 an endpoint
//! record: topic, namespace, key; 9 delete an endpoint: vhost, topic, group, records:
//! count, (namespace, key, value?); 10 locate: topic, service; 11 a page of retained
//! messages, on shard 0: filter, after?; 12 write records kept with a topic: topic,
//! records as in 9; 13 a shard's topics: shard u16; 14 a shard's groups: shard u16; 15
//! a topic's view: topic; 16 a message: id u64; 17 by key: topic, key, limit u32; 18
//! peek: queue, from u64, limit u32; 19 cancel a named timer: name; 20 a shard's
//! records: shard u16, namespace, prefix, after?, limit u32; 21 adjust a holder
//! count: topic, delta i32; 22 schedule a named timer, on shard 0: name, vhost,
//! exchange, key, encoded message, retain?, due u64).
//! Reply: `0` answer: tag u8 (1 topic: name, queue count u32; 2 deleted u8; 3 group:
//! name, members: count, (id, unacked u64, prefetch u64, queues: count, (topic, queue
//! u32)); queues: count, (topic, queue u32, member?, committed u64, next u64, lag u64,
//! ready u64, in flight u64); skipped u64; 4 done; 5 routed: log position u64, count,
//! per change u8 0 unchanged / 1 changed / 2 + error; 6 declared (created); 7 declared
//! (existed): its record; 8 record: value?; 9 located: address?; 10 retained: count,
//! (topic, encoded message), next?; 11 topics: count, (name, queue count u32, ranges:
//! count, (min u64, next u64)); 12 groups: count, names; 13 stored messages: count,
//! `wire` encodings; 14 queue messages: count, (offset, id u64, size u32, tag hash,
//! timestamp u64, `wire` encoding); 13 and 14 hold as many as fit 512 KiB, the first
//! always; 15 records: count, (key, value), as many as fit 512 KiB; 16 a count u64);
//! `1` error
//! (`codec::encode_error`).
//! No owner (*no responders*): asked again while the shard moves (every operation is
//! idempotent, and nobody received it).
//! A request or answer larger than the NATS server's payload limit (a retained message
//! of a megabyte, a large record) goes in parts (`super::split_parts`) on the request's
//! own reply subject, one inbox per gateway (`<inbox>.<id>`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use mqgate_core::outbox::ShardId;
use mqgate_core::shard::{AdminAnswer, AdminOp};
use mqgate_core::TopicView;
use mqgate_core::{
    Broker, CoreError, Declared, EndpointDecl, GroupInfo, MemberInfo, QueueInfo, Records, Result,
    RoutingOp,
};
use mqgate_store::{
    GroupName, MessageId, OffsetRange, QueueEntry, QueueId, QueueMessage, QueueOffset, QueueRef,
    StoredMessage, TopicConfig,
};

use super::codec::{decode_error, encode_error, put_bytes, put_opt_str, put_start, start, Reader};
use super::subject;

fn invalid(what: impl Into<String>) -> CoreError {
    CoreError::Invalid(format!("admin relay: {}", what.into()))
}

fn group(r: &mut Reader) -> Result<GroupName> {
    GroupName::new(r.string()?).map_err(|e| invalid(e.to_string()))
}

fn put_queue(out: &mut Vec<u8>, q: &QueueRef) {
    put_bytes(out, q.topic.as_str().as_bytes());
    out.put_u32(q.queue.0);
}

fn queue(r: &mut Reader) -> Result<QueueRef> {
    let topic = r.topic()?;
    Ok(QueueRef {
        topic,
        queue: QueueId(r.u32()?),
    })
}

fn encode_op(op: &AdminOp) -> Bytes {
    let mut out = Vec::new();
    match op {
        AdminOp::CreateTopic(t, q) => {
            out.put_u8(1);
            put_bytes(&mut out, t.as_str().as_bytes());
            match q {
                Some(q) => {
                    out.put_u8(1);
                    out.put_u32(*q);
                }
                None => out.put_u8(0),
            }
        }
        AdminOp::DeleteTopic(t) => {
            out.put_u8(2);
            put_bytes(&mut out, t.as_str().as_bytes());
        }
        AdminOp::GroupInfo(g) => {
            out.put_u8(3);
            put_bytes(&mut out, g.as_str().as_bytes());
        }
        AdminOp::ResetGroup(g, s) => {
            out.put_u8(4);
            put_bytes(&mut out, g.as_str().as_bytes());
            put_start(&mut out, *s);
        }
        AdminOp::DeleteGroup(g) => {
            out.put_u8(5);
            put_bytes(&mut out, g.as_str().as_bytes());
        }
        AdminOp::Routing(op) => {
            out.put_u8(6);
            put_bytes(&mut out, &op.encode());
        }
        AdminOp::DeclareEndpoint(d) => {
            out.put_u8(7);
            put_bytes(&mut out, d.topic.as_str().as_bytes());
            out.put_u32(d.queues);
            put_bytes(&mut out, d.group.as_str().as_bytes());
            put_bytes(&mut out, d.namespace.as_bytes());
            put_bytes(&mut out, &d.key);
            put_bytes(&mut out, &d.record);
        }
        AdminOp::EndpointRecord {
            topic,
            namespace,
            key,
        } => {
            out.put_u8(8);
            put_bytes(&mut out, topic.as_str().as_bytes());
            put_bytes(&mut out, namespace.as_bytes());
            put_bytes(&mut out, key);
        }
        AdminOp::DeleteEndpoint {
            vhost,
            topic,
            group,
            records,
        } => {
            out.put_u8(9);
            put_bytes(&mut out, vhost.as_bytes());
            put_bytes(&mut out, topic.as_str().as_bytes());
            put_bytes(&mut out, group.as_str().as_bytes());
            put_records(&mut out, records);
        }
        AdminOp::WriteRecords { topic, records } => {
            out.put_u8(12);
            put_bytes(&mut out, topic.as_str().as_bytes());
            put_records(&mut out, records);
        }
        AdminOp::Locate { topic, service } => {
            out.put_u8(10);
            put_bytes(&mut out, topic.as_str().as_bytes());
            put_bytes(&mut out, service.as_bytes());
        }
        AdminOp::ShardTopics(shard) => {
            out.put_u8(13);
            out.put_u16(*shard);
        }
        AdminOp::ShardGroups(shard) => {
            out.put_u8(14);
            out.put_u16(*shard);
        }
        AdminOp::TopicView(t) => {
            out.put_u8(15);
            put_bytes(&mut out, t.as_str().as_bytes());
        }
        AdminOp::Message(id) => {
            out.put_u8(16);
            out.put_u64(id.0);
        }
        AdminOp::ByKey { topic, key, limit } => {
            out.put_u8(17);
            put_bytes(&mut out, topic.as_str().as_bytes());
            put_bytes(&mut out, key.as_bytes());
            out.put_u32(*limit);
        }
        AdminOp::Peek { queue, from, limit } => {
            out.put_u8(18);
            put_queue(&mut out, queue);
            out.put_u64(from.0);
            out.put_u32(*limit);
        }
        AdminOp::ShardRecords {
            shard,
            namespace,
            prefix,
            after,
            limit,
        } => {
            out.put_u8(20);
            out.put_u16(*shard);
            put_bytes(&mut out, namespace.as_bytes());
            put_bytes(&mut out, prefix);
            put_opt_bytes(&mut out, after.as_ref());
            out.put_u32(*limit);
        }
        AdminOp::AdjustRefs { topic, delta } => {
            out.put_u8(21);
            put_bytes(&mut out, topic.as_str().as_bytes());
            out.put_i32(*delta);
        }
        AdminOp::ScheduleNamed {
            name,
            vhost,
            exchange,
            key,
            message,
            retain,
            due,
        } => {
            out.put_u8(22);
            put_bytes(&mut out, name.as_bytes());
            put_bytes(&mut out, vhost.as_bytes());
            put_bytes(&mut out, exchange.as_bytes());
            put_bytes(&mut out, key.as_bytes());
            // A message that cannot be encoded fails at the owner's decode: refused.
            put_bytes(&mut out, &message.encode().unwrap_or_default());
            put_opt_str(&mut out, retain.as_deref());
            out.put_u64(*due);
        }
        AdminOp::CancelScheduled(name) => {
            out.put_u8(19);
            put_bytes(&mut out, name.as_bytes());
        }
        AdminOp::FireScheduled(name) => {
            out.put_u8(23);
            put_bytes(&mut out, name.as_bytes());
        }
        AdminOp::RetainedPage { filter, after } => {
            out.put_u8(11);
            put_bytes(&mut out, filter.as_bytes());
            put_opt_str(&mut out, after.as_deref());
        }
    }
    Bytes::from(out)
}

fn put_records(out: &mut Vec<u8>, records: &Records) {
    let ops = records.clone().into_ops();
    out.put_u32(ops.len() as u32);
    for (ns, key, value) in ops {
        put_bytes(out, ns.as_bytes());
        put_bytes(out, &key);
        put_opt_bytes(out, value.as_ref());
    }
}

fn records(r: &mut Reader) -> Result<Records> {
    let n = r.count(9)?;
    let mut records = Records::new();
    for _ in 0..n {
        let ns = r.string()?;
        let key = r.bytes()?;
        match opt_bytes(r)? {
            Some(v) => records.put(&ns, key, v),
            None => records.delete(&ns, key),
        };
    }
    Ok(records)
}

/// A count, then as many of `items` as fit one answer (`RELAYED_READ_BYTES`; the first
/// always): the caller asks again from where it ended.
fn put_capped<T>(out: &mut Vec<u8>, items: &[T], put: impl Fn(&mut Vec<u8>, &T)) {
    let mut body = Vec::new();
    let mut n = 0u32;
    for item in items {
        let at = body.len();
        put(&mut body, item);
        if n > 0 && body.len() > mqgate_core::RELAYED_READ_BYTES {
            body.truncate(at);
            break;
        }
        n += 1;
    }
    out.put_u32(n);
    out.extend_from_slice(&body);
}

fn stored(r: &mut Reader) -> Result<StoredMessage> {
    mqgate_store::wire::decode(r.bytes()?).map_err(|e| invalid(format!("a message: {e}")))
}

fn put_opt_bytes(out: &mut Vec<u8>, b: Option<&Bytes>) {
    match b {
        Some(b) => {
            out.put_u8(1);
            put_bytes(out, b);
        }
        None => out.put_u8(0),
    }
}

fn opt_bytes(r: &mut Reader) -> Result<Option<Bytes>> {
    match r.u8()? {
        0 => Ok(None),
        1 => Ok(Some(r.bytes()?)),
        k => Err(invalid(format!("option tag {k}"))),
    }
}

fn decode_op(b: Bytes) -> Result<AdminOp> {
    let mut r = Reader(b);
    let op = match r.u8()? {
        1 => {
            let t = r.topic()?;
            let q = match r.u8()? {
                0 => None,
                1 => Some(r.u32()?),
                k => return Err(invalid(format!("option tag {k}"))),
            };
            AdminOp::CreateTopic(t, q)
        }
        2 => AdminOp::DeleteTopic(r.topic()?),
        3 => AdminOp::GroupInfo(group(&mut r)?),
        4 => {
            let g = group(&mut r)?;
            AdminOp::ResetGroup(g, start(&mut r)?)
        }
        5 => AdminOp::DeleteGroup(group(&mut r)?),
        6 => AdminOp::Routing(RoutingOp::decode(r.bytes()?)?),
        7 => AdminOp::DeclareEndpoint(EndpointDecl {
            topic: r.topic()?,
            queues: r.u32()?,
            group: group(&mut r)?,
            namespace: r.string()?,
            key: r.bytes()?,
            record: r.bytes()?,
        }),
        8 => AdminOp::EndpointRecord {
            topic: r.topic()?,
            namespace: r.string()?,
            key: r.bytes()?,
        },
        9 => {
            let vhost = r.string()?;
            let topic = r.topic()?;
            let group = group(&mut r)?;
            AdminOp::DeleteEndpoint {
                vhost,
                topic,
                group,
                records: records(&mut r)?,
            }
        }
        10 => AdminOp::Locate {
            topic: r.topic()?,
            service: r.string()?,
        },
        12 => AdminOp::WriteRecords {
            topic: r.topic()?,
            records: records(&mut r)?,
        },
        13 => AdminOp::ShardTopics(r.u16()?),
        14 => AdminOp::ShardGroups(r.u16()?),
        15 => AdminOp::TopicView(r.topic()?),
        16 => AdminOp::Message(MessageId(r.u64()?)),
        17 => AdminOp::ByKey {
            topic: r.topic()?,
            key: r.string()?,
            limit: r.u32()?,
        },
        18 => AdminOp::Peek {
            queue: queue(&mut r)?,
            from: QueueOffset(r.u64()?),
            limit: r.u32()?,
        },
        19 => AdminOp::CancelScheduled(r.string()?),
        23 => AdminOp::FireScheduled(r.string()?),
        22 => AdminOp::ScheduleNamed {
            name: r.string()?,
            vhost: r.string()?,
            exchange: r.string()?,
            key: r.string()?,
            message: Box::new(
                mqgate_store::Message::decode(r.bytes()?)
                    .map_err(|e| invalid(format!("a timer's message: {e}")))?,
            ),
            retain: r.opt_string()?,
            due: r.u64()?,
        },
        21 => AdminOp::AdjustRefs {
            topic: r.topic()?,
            delta: r.u32()? as i32,
        },
        20 => AdminOp::ShardRecords {
            shard: r.u16()?,
            namespace: r.string()?,
            prefix: r.bytes()?,
            after: opt_bytes(&mut r)?,
            limit: r.u32()?,
        },
        11 => AdminOp::RetainedPage {
            filter: r.string()?,
            after: r.opt_string()?,
        },
        k => return Err(invalid(format!("unknown operation {k}"))),
    };
    r.end()?;
    Ok(op)
}

fn encode_reply(r: &Result<AdminAnswer>) -> Bytes {
    let mut out = Vec::new();
    let a = match r {
        Ok(a) => a,
        Err(e) => {
            out.put_u8(1);
            encode_error(&mut out, e);
            return Bytes::from(out);
        }
    };
    out.put_u8(0);
    match a {
        AdminAnswer::Topic(t) => {
            out.put_u8(1);
            put_bytes(&mut out, t.name.as_str().as_bytes());
            out.put_u32(t.queue_count);
        }
        AdminAnswer::Deleted(d) => {
            out.put_u8(2);
            out.put_u8(u8::from(*d));
        }
        AdminAnswer::Group(g) => {
            out.put_u8(3);
            put_bytes(&mut out, g.name.as_str().as_bytes());
            out.put_u32(g.members.len() as u32);
            for m in &g.members {
                put_bytes(&mut out, m.id.as_bytes());
                out.put_u64(m.unacked as u64);
                out.put_u64(m.prefetch as u64);
                out.put_u32(m.queues.len() as u32);
                for q in &m.queues {
                    put_queue(&mut out, q);
                }
            }
            out.put_u32(g.queues.len() as u32);
            for q in &g.queues {
                put_queue(&mut out, &q.queue);
                put_opt_str(&mut out, q.member.as_deref());
                out.put_u64(q.committed);
                out.put_u64(q.next);
                out.put_u64(q.lag);
                out.put_u64(q.ready);
                out.put_u64(q.in_flight as u64);
            }
            out.put_u64(g.skipped);
        }
        AdminAnswer::Done => out.put_u8(4),
        AdminAnswer::Routed { results, position } => {
            out.put_u8(5);
            out.put_u64(*position);
            out.put_u32(results.len() as u32);
            for r in results {
                match r {
                    Ok(changed) => out.put_u8(u8::from(*changed)),
                    Err(e) => {
                        out.put_u8(2);
                        encode_error(&mut out, e);
                    }
                }
            }
        }
        AdminAnswer::Declared(Declared::Created) => out.put_u8(6),
        AdminAnswer::Declared(Declared::Exists(v)) => {
            out.put_u8(7);
            put_bytes(&mut out, v);
        }
        AdminAnswer::Record(v) => {
            out.put_u8(8);
            put_opt_bytes(&mut out, v.as_ref());
        }
        AdminAnswer::Topics(ts) => {
            out.put_u8(11);
            out.put_u32(ts.len() as u32);
            for t in ts {
                put_bytes(&mut out, t.config.name.as_str().as_bytes());
                out.put_u32(t.config.queue_count);
                out.put_u32(t.ranges.len() as u32);
                for r in &t.ranges {
                    out.put_u64(r.min.0);
                    out.put_u64(r.next.0);
                }
            }
        }
        AdminAnswer::Groups(gs) => {
            out.put_u8(12);
            out.put_u32(gs.len() as u32);
            for g in gs {
                put_bytes(&mut out, g.as_str().as_bytes());
            }
        }
        AdminAnswer::Count(n) => {
            out.put_u8(16);
            out.put_u64(*n);
        }
        AdminAnswer::Records(rs) => {
            out.put_u8(15);
            put_capped(&mut out, rs, |body, (k, v)| {
                put_bytes(body, k);
                put_bytes(body, v);
            });
        }
        AdminAnswer::Stored(ms) => {
            out.put_u8(13);
            put_capped(&mut out, ms, |body, m| {
                put_bytes(body, &mqgate_store::wire::encode(m))
            });
        }
        AdminAnswer::Queue(ms) => {
            out.put_u8(14);
            put_capped(&mut out, ms, |body, m| {
                let e = &m.entry;
                body.put_u64(e.offset.0);
                body.put_u64(e.id.0);
                body.put_u32(e.size);
                body.put_u64(e.tag_hash);
                body.put_u64(e.timestamp);
                put_bytes(body, &mqgate_store::wire::encode(&m.message));
            });
        }
        AdminAnswer::Located(a) => {
            out.put_u8(9);
            put_opt_str(&mut out, a.as_deref());
        }
        AdminAnswer::Retained { messages, next } => {
            out.put_u8(10);
            out.put_u32(messages.len() as u32);
            for (topic, m) in messages {
                put_bytes(&mut out, topic.as_bytes());
                // A message that cannot be encoded was stored encoded: never fails.
                put_bytes(&mut out, &m.encode().unwrap_or_default());
            }
            put_opt_str(&mut out, next.as_deref());
        }
    }
    Bytes::from(out)
}

fn size(v: u64) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX)
}

fn decode_reply(b: Bytes) -> Result<AdminAnswer> {
    let mut r = Reader(b);
    match r.u8()? {
        0 => {}
        1 => return Err(decode_error(&mut r)?),
        k => return Err(invalid(format!("unknown reply kind {k}"))),
    }
    let a = match r.u8()? {
        1 => {
            let name = r.topic()?;
            AdminAnswer::Topic(TopicConfig {
                name,
                queue_count: r.u32()?,
            })
        }
        2 => AdminAnswer::Deleted(r.u8()? != 0),
        3 => {
            let name = group(&mut r)?;
            let n = r.count(24)?;
            let mut members = Vec::with_capacity(n);
            for _ in 0..n {
                let id = r.string()?;
                let unacked = size(r.u64()?);
                let prefetch = size(r.u64()?);
                let k = r.count(8)?;
                let mut queues = Vec::with_capacity(k);
                for _ in 0..k {
                    queues.push(queue(&mut r)?);
                }
                members.push(MemberInfo {
                    id,
                    unacked,
                    prefetch,
                    queues,
                });
            }
            let n = r.count(49)?;
            let mut queues = Vec::with_capacity(n);
            for _ in 0..n {
                let q = queue(&mut r)?;
                queues.push(QueueInfo {
                    queue: q,
                    member: r.opt_string()?,
                    committed: r.u64()?,
                    next: r.u64()?,
                    lag: r.u64()?,
                    ready: r.u64()?,
                    in_flight: size(r.u64()?),
                });
            }
            AdminAnswer::Group(GroupInfo {
                name,
                members,
                queues,
                skipped: r.u64()?,
            })
        }
        4 => AdminAnswer::Done,
        5 => {
            let position = r.u64()?;
            let n = r.count(1)?;
            let mut results = Vec::with_capacity(n);
            for _ in 0..n {
                results.push(match r.u8()? {
                    0 => Ok(false),
                    1 => Ok(true),
                    2 => Err(decode_error(&mut r)?),
                    k => return Err(invalid(format!("result tag {k}"))),
                });
            }
            AdminAnswer::Routed { results, position }
        }
        6 => AdminAnswer::Declared(Declared::Created),
        7 => AdminAnswer::Declared(Declared::Exists(r.bytes()?)),
        8 => AdminAnswer::Record(opt_bytes(&mut r)?),
        9 => AdminAnswer::Located(r.opt_string()?),
        11 => {
            let n = r.count(12)?;
            let mut ts = Vec::with_capacity(n);
            for _ in 0..n {
                let name = r.topic()?;
                let queue_count = r.u32()?;
                let q = r.count(16)?;
                let mut ranges = Vec::with_capacity(q);
                for _ in 0..q {
                    ranges.push(OffsetRange {
                        min: QueueOffset(r.u64()?),
                        next: QueueOffset(r.u64()?),
                    });
                }
                ts.push(TopicView {
                    config: TopicConfig { name, queue_count },
                    ranges,
                });
            }
            AdminAnswer::Topics(ts)
        }
        16 => AdminAnswer::Count(r.u64()?),
        15 => {
            let n = r.count(8)?;
            let mut rs = Vec::with_capacity(n);
            for _ in 0..n {
                rs.push((r.bytes()?, r.bytes()?));
            }
            AdminAnswer::Records(rs)
        }
        12 => {
            let n = r.count(4)?;
            let mut gs = Vec::with_capacity(n);
            for _ in 0..n {
                gs.push(group(&mut r)?);
            }
            AdminAnswer::Groups(gs)
        }
        13 => {
            let n = r.count(4)?;
            let mut ms = Vec::with_capacity(n);
            for _ in 0..n {
                ms.push(stored(&mut r)?);
            }
            AdminAnswer::Stored(ms)
        }
        14 => {
            let n = r.count(40)?;
            let mut ms = Vec::with_capacity(n);
            for _ in 0..n {
                let entry = QueueEntry {
                    offset: QueueOffset(r.u64()?),
                    id: MessageId(r.u64()?),
                    size: r.u32()?,
                    tag_hash: r.u64()?,
                    timestamp: r.u64()?,
                };
                ms.push(QueueMessage {
                    entry,
                    message: std::sync::Arc::new(stored(&mut r)?),
                });
            }
            AdminAnswer::Queue(ms)
        }
        10 => {
            let n = r.count(8)?;
            let mut messages = Vec::with_capacity(n);
            for _ in 0..n {
                let topic = r.string()?;
                let m = mqgate_store::Message::decode(r.bytes()?)
                    .map_err(|e| invalid(format!("a retained message: {e}")))?;
                messages.push((topic, m));
            }
            AdminAnswer::Retained {
                messages,
                next: r.opt_string()?,
            }
        }
        k => return Err(invalid(format!("answer tag {k}"))),
    };
    r.end()?;
    Ok(a)
}

/// The owner's side: runs relayed operations for one shard while it owns it.
#[derive(Debug)]
pub struct AdminServer {
    _task: super::Serving,
}

impl AdminServer {
    /// Serve operations on shard `shard` of the cluster of `stream`.
    pub async fn start(
        client: async_nats::Client,
        stream: &str,
        shard: ShardId,
        broker: Broker,
    ) -> Result<Self> {
        // Each on its own: a slow one (a group stopping) holds up no other.
        let c = client.clone();
        let task = super::serve_each(&client, stream, shard, "adm", move |payload, reply_to| {
            let (broker, client) = (broker.clone(), c.clone());
            async move {
                let answer = match decode_op(payload) {
                    Ok(op) => broker.admin(op).await,
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "cluster: a malformed admin request; refused");
                        Err(e)
                    }
                };
                for part in super::split_parts(encode_reply(&answer), max_part(&client)) {
                    if client.publish(reply_to.clone(), part).await.is_err() {
                        break;
                    }
                }
            }
        })
        .await?;
        Ok(Self { _task: task })
    }
}

/// Room left in a NATS message for a part's framing.
const PART_SLACK: usize = 4096;

/// The most one NATS message of the relay carries (a larger request or answer goes in
/// parts).
fn max_part(client: &async_nats::Client) -> usize {
    client.server_info().max_payload.max(PART_SLACK * 2) - PART_SLACK
}

/// An answer as it came: its status (*no responders*) and its payload (whole).
type Reply = (Option<async_nats::StatusCode>, Bytes);

/// Requests waiting for their answer, by id.
type Waiting = Arc<parking_lot::Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Reply>>>>;

/// A request's place in [`Waiting`], given up when its caller is done or gone.
struct Pending(Waiting, u64);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// The caller's side: one reply inbox per gateway (requests matched to answers by the
/// last token of the reply subject; answers in parts put together).
#[derive(Debug, Clone)]
pub struct NatsAdmin {
    client: async_nats::Client,
    stream: String,
    timeout: Duration,
    inbox: Arc<tokio::sync::OnceCell<(String, Waiting)>>,
    next: Arc<AtomicU64>,
}

impl NatsAdmin {
    /// Operations on the shards of the cluster of `stream`, each answered within
    /// `timeout` (a shard owned by none is waited for up to 4 times that, at least
    /// 2 s).
    pub fn new(client: async_nats::Client, stream: &str, timeout: Duration) -> Self {
        Self {
            client,
            stream: stream.to_owned(),
            timeout,
            inbox: Arc::default(),
            next: Arc::new(AtomicU64::new(1)),
        }
    }

    async fn inbox(&self) -> Result<&(String, Waiting)> {
        self.inbox
            .get_or_try_init(|| async {
                use futures_util::StreamExt;
                let prefix = self.client.new_inbox();
                let mut sub = self
                    .client
                    .subscribe(format!("{prefix}.*"))
                    .await
                    .map_err(|e| invalid(format!("subscribe: {e}")))?;
                let waiting: Waiting = Arc::default();
                let w = Arc::downgrade(&waiting);
                tokio::spawn(async move {
                    let mut parted = super::Parted::default();
                    while let Some(msg) = sub.next().await {
                        let Some(w) = w.upgrade() else {
                            return;
                        };
                        let id = msg
                            .subject
                            .rsplit('.')
                            .next()
                            .and_then(|t| t.parse::<u64>().ok());
                        let Some(id) = id else {
                            continue;
                        };
                        let payload = if msg.payload.first() == Some(&super::PART) {
                            match parted.add(msg.subject.as_str(), &msg.payload) {
                                Some(whole) => whole,
                                None => continue,
                            }
                        } else {
                            msg.payload
                        };
                        let tx = w.lock().remove(&id);
                        if let Some(tx) = tx {
                            let _ = tx.send((msg.status, payload));
                        }
                    }
                });
                Ok((prefix, waiting))
            })
            .await
    }

    /// Run `op` on the owner of `shard`.
    pub async fn run(&self, shard: ShardId, op: AdminOp) -> Result<AdminAnswer> {
        let subject = subject(&self.stream, shard, "adm");
        let payload = encode_op(&op);
        let wait = self.timeout.saturating_mul(4).max(Duration::from_secs(2));
        let since = tokio::time::Instant::now();
        let (prefix, waiting) = self.inbox().await?;
        let max = max_part(&self.client);
        loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = tokio::sync::oneshot::channel();
            waiting.lock().insert(id, tx);
            let _pending = Pending(Arc::clone(waiting), id);
            let reply = format!("{prefix}.{id}");
            for part in super::split_parts(payload.clone(), max) {
                if let Err(e) = self
                    .client
                    .publish_with_reply(subject.clone(), reply.clone(), part)
                    .await
                {
                    return Err(CoreError::Store(mqgate_store::StoreError::Backend(
                        format!("admin relay {subject}: {e}"),
                    )));
                }
            }
            match tokio::time::timeout(self.timeout, rx).await {
                Ok(Ok((Some(async_nats::StatusCode::NO_RESPONDERS), _))) => {
                    if since.elapsed() >= wait {
                        return Err(CoreError::NotOwned(shard));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(Ok((_, answer))) => return decode_reply(answer),
                // Unanswered in time: it may or may not have run there (the caller's
                // error, as a failed store write is: internal, not the client's).
                _ => {
                    return Err(CoreError::Store(mqgate_store::StoreError::Backend(
                        format!("admin relay {subject}: no answer within {:?}", self.timeout),
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqgate_core::router::{Binding, Destination, ExchangeDef, ExchangeKind};
    use mqgate_core::StartPosition;
    use mqgate_store::TopicName;
    use proptest::prelude::*;

    fn t(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn binding(source: &str, key: &str) -> Binding {
        Binding {
            source: source.into(),
            destination: Destination::Topic(t("q")),
            key: key.into(),
            headers: None,
            mqtt: true,
            arguments: Bytes::from_static(b"args"),
        }
    }

    #[test]
    fn operations_and_answers_round_trip() {
        let g = GroupName::new("g").unwrap();
        for op in [
            AdminOp::CreateTopic(t("a"), Some(4)),
            AdminOp::CreateTopic(t("a"), None),
            AdminOp::DeleteTopic(t("b")),
            AdminOp::GroupInfo(g.clone()),
            AdminOp::ResetGroup(g.clone(), StartPosition::Timestamp(9)),
            AdminOp::DeleteGroup(g.clone()),
            AdminOp::Routing(RoutingOp::AddVhost("v".into())),
            AdminOp::Routing(RoutingOp::DeclareExchange("/".into(), {
                let mut d = ExchangeDef::new("x", ExchangeKind::Topic);
                d.alternate = Some("ae".into());
                d
            })),
            AdminOp::Routing(RoutingOp::DeleteExchange("/".into(), "x".into(), true)),
            AdminOp::Routing(RoutingOp::Bind(
                "/".into(),
                vec![binding("x", "a.*"), binding("amq.topic", "#")],
                false,
            )),
            AdminOp::Routing(RoutingOp::Unbind("/".into(), vec![binding("x", "a.*")])),
            AdminOp::Routing(RoutingOp::UnbindTopic("/".into(), t("q"))),
            AdminOp::DeclareEndpoint(EndpointDecl {
                topic: t("%AMQP%/q"),
                queues: 16,
                group: g.clone(),
                namespace: "amqp.queue".into(),
                key: Bytes::from_static(b"/\0q"),
                record: Bytes::from_static(b"\x02\x03args"),
            }),
            AdminOp::EndpointRecord {
                topic: t("%AMQP%/q"),
                namespace: "amqp.queue".into(),
                key: Bytes::from_static(b"/\0q"),
            },
            AdminOp::DeleteEndpoint {
                vhost: "/".into(),
                topic: t("%AMQP%/q"),
                group: g.clone(),
                records: {
                    let mut r = Records::new();
                    r.delete("amqp.queue", Bytes::from_static(b"/\0q"));
                    r.put("other", Bytes::from_static(b"k"), Bytes::from_static(b""));
                    r
                },
            },
            AdminOp::DeleteEndpoint {
                vhost: "v".into(),
                topic: t("x"),
                group: g.clone(),
                records: Records::new(),
            },
            AdminOp::WriteRecords {
                topic: t("%MQTT%c"),
                records: {
                    let mut r = Records::new();
                    r.put(
                        "mqtt.session",
                        Bytes::from_static(b"c"),
                        Bytes::from_static(b"rec"),
                    );
                    r
                },
            },
            AdminOp::Locate {
                topic: t("%MQTT%c"),
                service: "mqtt".into(),
            },
            AdminOp::ShardTopics(7),
            AdminOp::ShardGroups(0),
            AdminOp::TopicView(t("a")),
            AdminOp::Message(MessageId(7 << 44)),
            AdminOp::ByKey {
                topic: t("a"),
                key: "k".into(),
                limit: 10,
            },
            AdminOp::Peek {
                queue: QueueRef::new(t("a"), 3),
                from: QueueOffset(5),
                limit: 100,
            },
            AdminOp::CancelScheduled("mqtt.will/c".into()),
            AdminOp::FireScheduled("mqtt.will/c".into()),
            AdminOp::ScheduleNamed {
                name: "mqtt.will/c".into(),
                vhost: "/".into(),
                exchange: "amq.topic".into(),
                key: "a.b".into(),
                message: Box::new(mqgate_store::Message::new(
                    t("a/b"),
                    Bytes::from_static(b"w"),
                )),
                retain: Some("a/b".into()),
                due: 1_796_000_000_000,
            },
            AdminOp::AdjustRefs {
                topic: t("%SHARE%g/a"),
                delta: -1,
            },
            AdminOp::AdjustRefs {
                topic: t("%SHARE%g/a"),
                delta: 1,
            },
            AdminOp::ShardRecords {
                shard: 3,
                namespace: "amqp.queue".into(),
                prefix: Bytes::from_static(b"/\0"),
                after: Some(Bytes::from_static(b"/\0q")),
                limit: 100,
            },
            AdminOp::RetainedPage {
                filter: "a/#".into(),
                after: None,
            },
            AdminOp::RetainedPage {
                filter: "a/+".into(),
                after: Some("a/b".into()),
            },
        ] {
            assert_eq!(decode_op(encode_op(&op)).unwrap(), op);
        }
        let q = QueueRef {
            topic: t("q"),
            queue: QueueId(1),
        };
        for a in [
            AdminAnswer::Topic(TopicConfig {
                name: t("a"),
                queue_count: 4,
            }),
            AdminAnswer::Deleted(true),
            AdminAnswer::Done,
            AdminAnswer::Declared(Declared::Created),
            AdminAnswer::Declared(Declared::Exists(Bytes::from_static(b"rec"))),
            AdminAnswer::Declared(Declared::Exists(Bytes::new())),
            AdminAnswer::Record(None),
            AdminAnswer::Record(Some(Bytes::from_static(b"rec"))),
            AdminAnswer::Located(None),
            AdminAnswer::Topics(vec![TopicView {
                config: TopicConfig {
                    name: t("a"),
                    queue_count: 2,
                },
                ranges: vec![
                    OffsetRange::default(),
                    OffsetRange {
                        min: QueueOffset(3),
                        next: QueueOffset(9),
                    },
                ],
            }]),
            AdminAnswer::Groups(vec![g.clone()]),
            AdminAnswer::Count(3),
            AdminAnswer::Records(vec![(Bytes::from_static(b"k"), Bytes::from_static(b"v"))]),
            AdminAnswer::Stored(vec![mqgate_store::wire::decode(
                mqgate_store::wire::encode(&StoredMessage {
                    id: MessageId(5),
                    store_timestamp: 77,
                    size: 0,
                    message: mqgate_store::Message::new(t("a"), Bytes::from_static(b"m")),
                }),
            )
            .unwrap()]),
            AdminAnswer::Located(Some("10.0.0.7:1883".into())),
            AdminAnswer::Retained {
                messages: vec![],
                next: None,
            },
            AdminAnswer::Retained {
                messages: vec![(
                    "a/b".into(),
                    mqgate_store::Message::new(t("a/b"), Bytes::from_static(b"body")),
                )],
                next: Some("a/b".into()),
            },
            AdminAnswer::Group(GroupInfo {
                name: g.clone(),
                members: vec![MemberInfo {
                    id: "m".into(),
                    unacked: 3,
                    prefetch: 20,
                    queues: vec![q.clone()],
                }],
                queues: vec![QueueInfo {
                    queue: q.clone(),
                    member: Some("m".into()),
                    committed: 5,
                    next: 9,
                    lag: 4,
                    ready: 1,
                    in_flight: 3,
                }],
                skipped: 2,
            }),
        ] {
            let want = format!("{a:?}");
            let back = decode_reply(encode_reply(&Ok(a))).unwrap();
            assert_eq!(format!("{back:?}"), want);
        }
        let routed = AdminAnswer::Routed {
            results: vec![
                Ok(true),
                Ok(false),
                Err(CoreError::NoSuchExchange("x".into())),
            ],
            position: 77,
        };
        let back = decode_reply(encode_reply(&Ok(routed))).unwrap();
        let AdminAnswer::Routed { results, position } = back else {
            panic!("{back:?}");
        };
        assert_eq!(position, 77);
        assert!(matches!(
            results[..],
            [Ok(true), Ok(false), Err(CoreError::NoSuchExchange(ref x))] if x == "x"
        ));
        assert!(matches!(
            decode_reply(encode_reply(&Err(CoreError::NotOwned(3)))),
            Err(CoreError::NotOwned(3))
        ));
    }

    proptest! {
        #[test]
        fn garbage_is_an_error_not_a_panic(junk in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_op(Bytes::from(junk.clone()));
            let _ = decode_reply(Bytes::from(junk));
        }
    }
}

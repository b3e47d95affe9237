//! The publish relay: a gateway publishes into a shard another gateway owns
//! (`docs/design/sharding.md` section 4).
//!
//! The caller's [`mqgate_core::Broker::publish_submit`] plans each message where it is
//! (the shard of its destinations, or the home of a cross-shard one); a part for a
//! shard owned elsewhere comes here. [`NatsPublisher`] sends it on
//! `mqgate.<stream>.s.<NN>.pub` with a reply subject of its own inbox and returns at
//! once it is queued, so one connection's batches pipeline; the owner's
//! [`PublishServer`] submits each request to its broker as it arrives, in a task of
//! its own, answers `queued` once its write is queued and the answers once durable. A
//! publisher sends its next request only after `queued`, so its order holds (the
//! shard's writer keeps queue order), and a request whose cross-shard items wait for
//! a destination between owners holds up no other publisher's.
//!
//! Failure: no owner (*no responders*, or an owner that let the shard go and answers
//! `NotOwned`) fails the batch before anything was stored; no answer within the relay
//! timeout fails it without knowing. Either way nothing is acknowledged to the client
//! (AMQP basic.nack, MQTT no PUBACK), whose resend makes a duplicate at worst, never a
//! lost confirm.
//!
//! Request: `1` (layout), flags u8 (bit 0 durable), records u32 then per record: put
//! u8 (1 put, 0 delete), namespace, key, value (put only); items u32 then per item: the
//! message (u32 length, `mqgate_store::wire`), destination (tag u8: 1 topic: name,
//! queue?, sharding key?; 2 topics: count u32, names; 3 exchange: vhost, exchange,
//! key, headers: count u32, then name and value), delay (0 none, 1 level u8, 2 for:
//! ms u64, 3 at: ms u64), retained topic? Strings and byte strings: u32 length, bytes;
//! an optional value: u8 0/1 then the value.
//!
//! Reply: `0` answers: count u32, per answer tag u8 (0 nothing; 1 stored: id u64,
//! offsets: count u32, per offset topic, queue u32, offset u64; refused topics;
//! forwarded topics; 2 delayed: due u64, seq u64; 3 refused: topics); `1` error:
//! kind u8 (0 invalid, 1 not owned: shard u16, 2 no such exchange, 3 no such topic,
//! 4 conflict, 5 shutting down, 6 store), text.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use futures_util::StreamExt;
use mqgate_core::outbox::ShardId;
use mqgate_core::router::HeaderValue;
use mqgate_core::{
    Broker, CoreError, Delay, Destination, Outgoing, PublishBatch, Published, Records, Result,
    Submitted,
};
use mqgate_store::{MessageId, QueueId, QueueOffset, QueueRef, TimerKey};
use parking_lot::Mutex;
use tokio::sync::{mpsc, OnceCell};

use super::codec::{decode_error, encode_error, put_bytes, put_opt_str, put_topics, Reader};
use super::subject;

const LAYOUT: u8 = 1;
const REPLY_OK: u8 = 0;
const REPLY_ERR: u8 = 1;
/// Sent first: the owner has queued the batch's write (what a local submit returns
/// on); the answer follows once it is durable.
const REPLY_QUEUED: u8 = 2;

/// Room left in a request for its framing beyond the items.
const FRAME_SLACK: usize = 4096;

fn invalid(what: impl Into<String>) -> CoreError {
    CoreError::Invalid(format!("publish relay: {}", what.into()))
}

fn encode_header(out: &mut Vec<u8>, v: &HeaderValue) {
    match v {
        HeaderValue::Str(s) => {
            out.put_u8(1);
            put_bytes(out, s.as_bytes());
        }
        HeaderValue::Int(i) => {
            out.put_u8(2);
            out.put_i64(*i);
        }
        HeaderValue::Float(f) => {
            out.put_u8(3);
            out.put_f64(*f);
        }
        HeaderValue::Bool(b) => {
            out.put_u8(4);
            out.put_u8(u8::from(*b));
        }
        HeaderValue::Void => out.put_u8(5),
        HeaderValue::Other(b) => {
            out.put_u8(6);
            put_bytes(out, b);
        }
    }
}

fn decode_header(r: &mut Reader) -> Result<HeaderValue> {
    Ok(match r.u8()? {
        1 => HeaderValue::Str(r.string()?),
        2 => HeaderValue::Int(r.u64()? as i64),
        3 => HeaderValue::Float(f64::from_bits(r.u64()?)),
        4 => HeaderValue::Bool(r.u8()? != 0),
        5 => HeaderValue::Void,
        6 => HeaderValue::Other(r.bytes()?),
        k => return Err(invalid(format!("header value tag {k}"))),
    })
}

/// One item on its own (requests are cut between items).
fn encode_item(item: &Outgoing) -> Vec<u8> {
    let mut out = Vec::with_capacity(mqgate_store::wire::encoded_len(&item.message) + 64);
    let mut m = Vec::with_capacity(mqgate_store::wire::encoded_len(&item.message));
    mqgate_store::wire::encode_into(MessageId(0), 0, &item.message, &mut m);
    put_bytes(&mut out, &m);
    match &item.to {
        Destination::Topic {
            topic,
            queue,
            sharding_key,
        } => {
            out.put_u8(1);
            put_bytes(&mut out, topic.as_str().as_bytes());
            match queue {
                Some(q) => {
                    out.put_u8(1);
                    out.put_u32(q.0);
                }
                None => out.put_u8(0),
            }
            put_opt_str(&mut out, sharding_key.as_deref());
        }
        Destination::Topics(ts) => {
            out.put_u8(2);
            put_topics(&mut out, ts);
        }
        Destination::Exchange {
            vhost,
            exchange,
            key,
            headers,
        } => {
            out.put_u8(3);
            put_bytes(&mut out, vhost.as_bytes());
            put_bytes(&mut out, exchange.as_bytes());
            put_bytes(&mut out, key.as_bytes());
            out.put_u32(headers.len() as u32);
            for (name, v) in headers {
                put_bytes(&mut out, name.as_bytes());
                encode_header(&mut out, v);
            }
        }
    }
    match item.delay {
        None => out.put_u8(0),
        Some(Delay::Level(l)) => {
            out.put_u8(1);
            out.put_u8(l);
        }
        Some(Delay::For(d)) => {
            out.put_u8(2);
            out.put_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        }
        Some(Delay::At(at)) => {
            out.put_u8(3);
            out.put_u64(at);
        }
    }
    put_opt_str(&mut out, item.retain.as_deref());
    out
}

fn decode_item(r: &mut Reader) -> Result<Outgoing> {
    let stored = mqgate_store::wire::decode(r.bytes()?).map_err(|e| invalid(e.to_string()))?;
    let to = match r.u8()? {
        1 => Destination::Topic {
            topic: r.topic()?,
            queue: match r.u8()? {
                0 => None,
                1 => Some(QueueId(r.u32()?)),
                k => return Err(invalid(format!("option tag {k}"))),
            },
            sharding_key: r.opt_string()?,
        },
        2 => Destination::Topics(r.topics()?.into()),
        3 => {
            let vhost = r.string()?;
            let exchange = r.string()?;
            let key = r.string()?;
            let n = r.count(5)?;
            let mut headers = Vec::with_capacity(n);
            for _ in 0..n {
                headers.push((r.string()?, decode_header(r)?));
            }
            Destination::Exchange {
                vhost,
                exchange,
                key,
                headers,
            }
        }
        k => return Err(invalid(format!("destination tag {k}"))),
    };
    let delay = match r.u8()? {
        0 => None,
        1 => Some(Delay::Level(r.u8()?)),
        2 => Some(Delay::For(Duration::from_millis(r.u64()?))),
        3 => Some(Delay::At(r.u64()?)),
        k => return Err(invalid(format!("delay tag {k}"))),
    };
    let retain = r.opt_string()?;
    Ok(Outgoing {
        message: stored.message,
        to,
        delay,
        retain,
    })
}

fn encode_records(out: &mut Vec<u8>, records: Records) {
    let ops = records.into_ops();
    out.put_u32(ops.len() as u32);
    for (ns, key, value) in ops {
        out.put_u8(u8::from(value.is_some()));
        put_bytes(out, ns.as_bytes());
        put_bytes(out, &key);
        if let Some(v) = value {
            put_bytes(out, &v);
        }
    }
}

fn decode_records(r: &mut Reader) -> Result<Records> {
    let n = r.count(9)?;
    let mut records = Records::new();
    for _ in 0..n {
        let put = r.u8()?;
        let ns = r.string()?;
        let key = r.bytes()?;
        match put {
            1 => records.put(&ns, key, r.bytes()?),
            0 => records.delete(&ns, key),
            k => return Err(invalid(format!("record tag {k}"))),
        };
    }
    Ok(records)
}

/// `batch` as requests of at most `max` bytes each (records with the first), in order.
/// An item that alone exceeds `max` fails the batch.
fn encode_requests(batch: PublishBatch, max: usize) -> Result<Vec<(usize, Bytes)>> {
    let PublishBatch {
        items,
        records,
        durable,
    } = batch;
    let mut head = Vec::new();
    encode_records(&mut head, records);
    let mut requests = Vec::new();
    let mut cur: Vec<Vec<u8>> = Vec::new();
    let mut size = head.len();
    let finish = |records: &[u8], cur: &mut Vec<Vec<u8>>| {
        let len: usize = cur.iter().map(Vec::len).sum();
        let mut out = Vec::with_capacity(len + records.len() + 16);
        out.put_u8(LAYOUT);
        out.put_u8(u8::from(durable));
        out.extend_from_slice(records);
        out.put_u32(cur.len() as u32);
        for item in cur.iter() {
            out.extend_from_slice(item);
        }
        let n = cur.len();
        cur.clear();
        (n, Bytes::from(out))
    };
    let empty_records = {
        let mut e = Vec::new();
        encode_records(&mut e, Records::new());
        e
    };
    for item in &items {
        // A message larger than one request carries goes alone, in parts
        // (`relay::split_parts`).
        let one = encode_item(item);
        if !cur.is_empty() && size + one.len() + FRAME_SLACK > max {
            let records = if requests.is_empty() {
                &head
            } else {
                &empty_records
            };
            requests.push(finish(records, &mut cur));
            size = 0;
        }
        size += one.len();
        cur.push(one);
    }
    if !cur.is_empty() || requests.is_empty() {
        let records = if requests.is_empty() {
            &head
        } else {
            &empty_records
        };
        requests.push(finish(records, &mut cur));
    }
    Ok(requests)
}

fn decode_request(b: Bytes) -> Result<PublishBatch> {
    let mut r = Reader(b);
    let layout = r.u8()?;
    if layout != LAYOUT {
        return Err(invalid(format!("unknown layout {layout}")));
    }
    let durable = r.u8()? & 1 == 1;
    let records = decode_records(&mut r)?;
    let n = r.count(6)?;
    let mut items = Vec::with_capacity(n);
    for _ in 0..n {
        items.push(decode_item(&mut r)?);
    }
    r.end()?;
    Ok(PublishBatch {
        items,
        records,
        durable,
    })
}

fn encode_reply(r: &Result<Vec<Option<Published>>>) -> Bytes {
    let mut out = Vec::new();
    match r {
        Ok(answers) => {
            out.put_u8(REPLY_OK);
            out.put_u32(answers.len() as u32);
            for a in answers {
                match a {
                    None => out.put_u8(0),
                    Some(Published::Stored {
                        id,
                        offsets,
                        refused,
                        forwarded,
                    }) => {
                        out.put_u8(1);
                        out.put_u64(id.0);
                        out.put_u32(offsets.len() as u32);
                        for (q, o) in offsets {
                            put_bytes(&mut out, q.topic.as_str().as_bytes());
                            out.put_u32(q.queue.0);
                            out.put_u64(o.0);
                        }
                        put_topics(&mut out, refused);
                        put_topics(&mut out, forwarded);
                    }
                    Some(Published::Delayed { timer }) => {
                        out.put_u8(2);
                        out.put_u64(timer.due);
                        out.put_u64(timer.seq);
                    }
                    Some(Published::Refused { by }) => {
                        out.put_u8(3);
                        put_topics(&mut out, by);
                    }
                }
            }
        }
        Err(e) => {
            out.put_u8(REPLY_ERR);
            encode_error(&mut out, e);
        }
    }
    Bytes::from(out)
}

fn decode_reply(b: Bytes) -> Result<Vec<Option<Published>>> {
    let mut r = Reader(b);
    match r.u8()? {
        REPLY_OK => {}
        REPLY_ERR => return Err(decode_error(&mut r)?),
        k => return Err(invalid(format!("unknown reply kind {k}"))),
    }
    let n = r.count(1)?;
    let mut answers = Vec::with_capacity(n);
    for _ in 0..n {
        answers.push(match r.u8()? {
            0 => None,
            1 => {
                let id = MessageId(r.u64()?);
                let k = r.count(16)?;
                let mut offsets = Vec::with_capacity(k);
                for _ in 0..k {
                    let topic = r.topic()?;
                    let queue = QueueId(r.u32()?);
                    offsets.push((QueueRef { topic, queue }, QueueOffset(r.u64()?)));
                }
                Some(Published::Stored {
                    id,
                    offsets,
                    refused: r.topics()?,
                    forwarded: r.topics()?,
                })
            }
            2 => Some(Published::Delayed {
                timer: TimerKey {
                    due: r.u64()?,
                    seq: r.u64()?,
                },
            }),
            3 => Some(Published::Refused { by: r.topics()? }),
            k => return Err(invalid(format!("answer tag {k}"))),
        });
    }
    r.end()?;
    Ok(answers)
}

/// The owner's side: submits relayed batches for one shard to its broker while it owns
/// the shard (drop or [`PublishServer::stop`] when it is released).
#[derive(Debug)]
pub struct PublishServer {
    task: super::Serving,
}

impl PublishServer {
    /// Serve publishes into shard `shard` on the cluster of `stream`.
    pub async fn start(
        client: async_nats::Client,
        stream: &str,
        shard: ShardId,
        broker: Broker,
    ) -> Result<Self> {
        // Each request on its own: one whose cross-shard items wait for their
        // destinations (one between owners) holds up no other publisher. One
        // publisher's order needs no more than that: it sends its next request only
        // once this one is queued.
        let c = client.clone();
        let task = super::serve_each(&client, stream, shard, "pub", move |payload, reply_to| {
            let (client, broker) = (c.clone(), broker.clone());
            async move {
                    let submitted = match decode_request(payload) {
                        Ok(batch) => broker.publish_submit(batch).await,
                        Err(e) => {
                            tracing::warn!(shard, error = %e, "cluster: a malformed publish request; refused");
                            Err(e)
                        }
                    };
                    if submitted.is_ok() {
                        let _ = client
                            .publish(reply_to.clone(), Bytes::from_static(&[REPLY_QUEUED]))
                            .await;
                    }
                    let answer = match submitted {
                        Ok(s) => s.await,
                        Err(e) => Err(e),
                    };
                    if let Err(e) = client.publish(reply_to, encode_reply(&answer)).await {
                        tracing::debug!(shard, error = %e, "cluster: a publish answer was not sent");
                    }
            }
        })
        .await?;
        Ok(Self { task })
    }

    /// Stop serving (the shard is released).
    pub fn stop(&self) {
        self.task.0.abort();
    }
}

/// Removes its requests from the waiting map when dropped.
struct Forget {
    waiting: Waiting,
    ids: Vec<u64>,
}

impl Drop for Forget {
    fn drop(&mut self) {
        let mut w = self.waiting.lock();
        for id in &self.ids {
            w.remove(id);
        }
    }
}

/// Requests waiting for their replies (first `queued`, then the answer).
type Waiting = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<async_nats::Message>>>>;

/// The caller's side: one reply inbox per gateway, requests matched to answers by the
/// last token of the reply subject.
#[derive(Debug)]
pub struct NatsPublisher {
    client: async_nats::Client,
    stream: String,
    timeout: Duration,
    inbox: OnceCell<(String, Waiting)>,
    next: AtomicU64,
    /// How long a shard owned by none (between owners) is waited for.
    move_wait: Duration,
}

impl NatsPublisher {
    /// Publishes into the shards of the cluster of `stream`; a batch unanswered within
    /// `timeout` fails, one for a shard owned by none is sent again for up to 4 times
    /// `timeout` (at least 2 s: a takeover after a crash takes the lease's time to
    /// live).
    pub fn new(client: async_nats::Client, stream: &str, timeout: Duration) -> Self {
        Self {
            client,
            stream: stream.to_owned(),
            timeout,
            inbox: OnceCell::new(),
            next: AtomicU64::new(1),
            move_wait: timeout.saturating_mul(4).max(Duration::from_secs(2)),
        }
    }

    async fn inbox(&self) -> Result<&(String, Waiting)> {
        self.inbox
            .get_or_try_init(|| async {
                let prefix = self.client.new_inbox();
                let mut sub = self
                    .client
                    .subscribe(format!("{prefix}.*"))
                    .await
                    .map_err(|e| invalid(format!("subscribe: {e}")))?;
                let waiting: Waiting = Arc::default();
                let w = Arc::downgrade(&waiting);
                tokio::spawn(async move {
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
                        let last = msg.payload.first() != Some(&REPLY_QUEUED);
                        let tx = if last {
                            w.lock().remove(&id)
                        } else {
                            w.lock().get(&id).cloned()
                        };
                        if let Some(tx) = tx {
                            let _ = tx.send(msg);
                        }
                    }
                });
                Ok((prefix, waiting))
            })
            .await
    }

    /// Send `batch` to the owner of `shard` (in requests the server's payload limit
    /// allows); returns once the owner has queued its write, as a local submit does,
    /// so that whatever this publisher sends next, on any path, reaches each shard
    /// after it. The answers follow once the write is durable.
    pub async fn publish(&self, shard: ShardId, batch: PublishBatch) -> Result<Submitted> {
        let (prefix, waiting) = self.inbox().await?;
        let max = self.client.server_info().max_payload.max(FRAME_SLACK * 2);
        let subject = subject(&self.stream, shard, "pub");
        let timeout = self.timeout;
        let mut answers = Vec::new();
        // Whatever becomes of this call and of its answers (answered, failed, dropped
        // unpolled), the requests stop waiting when it is over.
        let mut guard = Forget {
            waiting: Arc::clone(waiting),
            ids: Vec::new(),
        };
        for (count, payload) in encode_requests(batch, max)? {
            let mut unowned_since: Option<tokio::time::Instant> = None;
            let first = loop {
                let id = self.next.fetch_add(1, Ordering::Relaxed);
                let (tx, mut rx) = mpsc::unbounded_channel();
                waiting.lock().insert(id, tx);
                guard.ids.push(id);
                for part in super::split_parts(payload.clone(), max - FRAME_SLACK) {
                    if let Err(e) = self
                        .client
                        .publish_with_reply(subject.clone(), format!("{prefix}.{id}"), part)
                        .await
                    {
                        return Err(invalid(format!("{subject}: {e}")));
                    }
                }
                let first = match tokio::time::timeout(timeout, rx.recv()).await {
                    Ok(Some(msg)) => msg,
                    _ => {
                        return Err(invalid(format!(
                            "shard {shard}'s owner did not take a batch within {timeout:?}"
                        )));
                    }
                };
                if first.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                    // Nobody received it: the shard is between owners (a move, a
                    // takeover). Sent again once one serves it; nothing after it was
                    // sent meanwhile, so order holds.
                    let since = *unowned_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= self.move_wait {
                        return Err(CoreError::NotOwned(shard));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                break (rx, first);
            };
            let (rx, first) = first;
            if first.payload.first() == Some(&REPLY_QUEUED) {
                answers.push((count, Err(rx)));
            } else {
                answers.push((count, Ok(first)));
            }
        }
        Ok(Submitted::new(async move {
            let _guard = guard;
            let mut out = Vec::new();
            for (count, answer) in answers {
                // The answer that came instead of `queued` (an error), or the one to
                // wait for.
                let msg = match answer {
                    Ok(msg) => msg,
                    Err(mut rx) => match tokio::time::timeout(timeout, rx.recv()).await {
                        Ok(Some(msg)) => msg,
                        _ => {
                            return Err(invalid(format!(
                                "shard {shard}'s owner did not answer within {timeout:?}"
                            )));
                        }
                    },
                };
                let part = decode_reply(msg.payload)?;
                if part.len() != count {
                    return Err(invalid(format!(
                        "{} answers to {count} messages",
                        part.len()
                    )));
                }
                out.extend(part);
            }
            Ok(out)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqgate_store::{Message, TopicName};
    use proptest::prelude::*;

    fn topic(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    fn item(body: Vec<u8>, kind: u8) -> Outgoing {
        let mut m = Message::new(topic("t"), Bytes::from(body));
        m.properties.push(("p".into(), Bytes::from_static(b"v")));
        let to = match kind % 3 {
            0 => Destination::Topic {
                topic: topic("orders"),
                queue: Some(QueueId(3)),
                sharding_key: Some("k".into()),
            },
            1 => Destination::Topics(vec![topic("a"), topic("b")].into()),
            _ => Destination::Exchange {
                vhost: "/".into(),
                exchange: "amq.headers".into(),
                key: "rk".into(),
                headers: vec![
                    ("s".into(), HeaderValue::Str("x".into())),
                    ("i".into(), HeaderValue::Int(-4)),
                    ("f".into(), HeaderValue::Float(0.5)),
                    ("b".into(), HeaderValue::Bool(true)),
                    ("v".into(), HeaderValue::Void),
                    ("o".into(), HeaderValue::Other(Bytes::from_static(b"\x01"))),
                ],
            },
        };
        Outgoing {
            message: m,
            to,
            delay: match kind % 4 {
                0 => None,
                1 => Some(Delay::Level(3)),
                2 => Some(Delay::For(Duration::from_millis(1500))),
                _ => Some(Delay::At(1_700_000_000_000)),
            },
            retain: kind.is_multiple_of(2).then(|| "a/b".to_owned()),
        }
    }

    fn same(a: &Outgoing, b: &Outgoing) -> bool {
        a.message == b.message
            && format!("{:?}", a.to) == format!("{:?}", b.to)
            && a.delay == b.delay
            && a.retain == b.retain
    }

    proptest! {
        #[test]
        fn batches_round_trip_in_requests_of_any_size(
            bodies in proptest::collection::vec(
                (proptest::collection::vec(any::<u8>(), 0..1500), any::<u8>()), 0..12),
            durable in any::<bool>(),
            max in 8200usize..10_000,
        ) {
            let mut b = PublishBatch::new();
            b.durable = durable;
            b.records.put("ns", Bytes::from_static(b"k"), Bytes::from_static(b"v"));
            b.records.delete("ns", Bytes::from_static(b"gone"));
            for (body, kind) in &bodies {
                b.items.push(item(body.clone(), *kind));
            }
            let sent = b.clone();
            let requests = encode_requests(b, max).unwrap();
            let mut items = Vec::new();
            for (i, (count, bytes)) in requests.into_iter().enumerate() {
                prop_assert!(bytes.len() <= max);
                let back = decode_request(bytes).unwrap();
                prop_assert_eq!(back.items.len(), count);
                prop_assert_eq!(back.durable, durable);
                // Records travel with the first request only.
                prop_assert_eq!(back.records.into_ops().len(), if i == 0 { 2 } else { 0 });
                items.extend(back.items);
            }
            prop_assert_eq!(items.len(), sent.items.len());
            for (a, b) in items.iter().zip(&sent.items) {
                prop_assert!(same(a, b), "{:?} != {:?}", a, b);
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(junk in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_request(Bytes::from(junk.clone()));
            let _ = decode_reply(Bytes::from(junk));
        }
    }

    #[test]
    fn answers_and_errors_round_trip() {
        let answers = vec![
            None,
            Some(Published::Stored {
                id: MessageId(5 << 44),
                offsets: vec![(
                    QueueRef {
                        topic: topic("q"),
                        queue: QueueId(2),
                    },
                    QueueOffset(9),
                )],
                refused: vec![topic("full")],
                forwarded: vec![topic("r1"), topic("r2")],
            }),
            Some(Published::Delayed {
                timer: TimerKey { due: 77, seq: 3 },
            }),
            Some(Published::Refused {
                by: vec![topic("x")],
            }),
        ];
        assert_eq!(
            decode_reply(encode_reply(&Ok(answers.clone()))).unwrap(),
            answers
        );
        for e in [
            CoreError::NotOwned(7),
            CoreError::NoSuchExchange("ex".into()),
            CoreError::NoSuchTopic("t".into()),
            CoreError::Conflict("c".into()),
            CoreError::ShuttingDown,
        ] {
            let back = decode_reply(encode_reply(&Err(e))).unwrap_err();
            assert!(!back.to_string().is_empty());
        }
        assert!(matches!(
            decode_reply(encode_reply(&Err(CoreError::NotOwned(7)))),
            Err(CoreError::NotOwned(7))
        ));
    }

    #[test]
    fn an_oversized_message_goes_alone_in_parts() {
        let mut b = PublishBatch::new();
        b.items.push(item(vec![1; 100], 1));
        b.items
            .push(item((0..30_000u32).map(|i| i as u8).collect(), 1));
        b.items.push(item(vec![2; 100], 1));
        let sent = b.clone();
        let requests = encode_requests(b, 10_000).unwrap();
        assert_eq!(
            requests.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            [1, 1, 1],
            "the large one alone"
        );
        let mut parted = crate::relay::Parted::default();
        let mut items = Vec::new();
        for (_, payload) in requests {
            let parts = crate::relay::split_parts(payload.clone(), 10_000 - FRAME_SLACK);
            assert!(parts.iter().all(|p| p.len() <= 10_000 - FRAME_SLACK));
            let whole = if parts.len() == 1 {
                parts[0].clone()
            } else {
                let mut whole = None;
                for p in &parts {
                    assert!(whole.is_none(), "complete before its last part");
                    whole = parted.add("_INBOX.x.1", p);
                }
                whole.expect("complete with its last part")
            };
            assert_eq!(whole, payload);
            items.extend(decode_request(whole).unwrap().items);
        }
        assert_eq!(items.len(), 3);
        for (a, b) in items.iter().zip(&sent.items) {
            assert!(same(a, b));
        }
        // A part out of order drops that request; the next one is whole again.
        let parts = crate::relay::split_parts(Bytes::from(vec![9u8; 25_000]), 5_000);
        assert!(parted.add("r", &parts[0]).is_none());
        assert!(parted.add("r", &parts[2]).is_none());
        assert!(parted.add("r", &parts[1]).is_none());
        let mut whole = None;
        for p in &parts {
            whole = parted.add("r", p);
        }
        assert_eq!(whole.unwrap().len(), 25_000);
    }
}

//! The forward relay: a home shard's forwarder reaches a destination shard owned by
//! another gateway (`mqgate_core::outbox`).
//!
//! Request (subject `mqgate.<stream>.s.<D>.fwd`): `1` next: source u16 BE; `2` apply:
//! source u16 BE, first u64 BE, count u32 BE, then per entry a length (u32 BE) and the
//! message in `mqgate_store::wire` form. Reply: `0` ok: next u64 BE, applied u32 BE; `1`
//! error: text.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BufMut, Bytes};
use futures_util::StreamExt;
use mqgate_core::outbox::{ForwardReply, ForwardReq, ForwardTarget, ShardId};
use mqgate_core::{CoreError, Result};

use super::subject;

const OP_NEXT: u8 = 1;
const OP_APPLY: u8 = 2;
const REPLY_OK: u8 = 0;
const REPLY_ERR: u8 = 1;

fn invalid(what: impl Into<String>) -> CoreError {
    CoreError::Invalid(format!("forward relay: {}", what.into()))
}

fn encode_apply(req: &ForwardReq) -> Bytes {
    let mut out = Vec::new();
    out.put_u8(OP_APPLY);
    out.put_u16(req.source);
    out.put_u64(req.first);
    out.put_u32(req.entries.len() as u32);
    for m in &req.entries {
        let mut one = Vec::with_capacity(mqgate_store::wire::encoded_len(&m.message));
        mqgate_store::wire::encode_into(m.id, m.store_timestamp, &m.message, &mut one);
        out.put_u32(one.len() as u32);
        out.extend_from_slice(&one);
    }
    Bytes::from(out)
}

/// A request as the owner reads it.
#[derive(Debug)]
enum Request {
    Next(ShardId),
    Apply(ForwardReq),
}

fn need(b: &Bytes, n: usize) -> Result<()> {
    if b.remaining() < n {
        return Err(invalid(format!("{n} bytes needed, {} left", b.remaining())));
    }
    Ok(())
}

fn decode_request(mut b: Bytes) -> Result<Request> {
    need(&b, 3)?;
    let op = b.get_u8();
    let source = b.get_u16();
    match op {
        OP_NEXT => Ok(Request::Next(source)),
        OP_APPLY => {
            need(&b, 12)?;
            let first = b.get_u64();
            let count = b.get_u32() as usize;
            let mut entries = Vec::with_capacity(count.min(4096));
            for _ in 0..count {
                need(&b, 4)?;
                let n = b.get_u32() as usize;
                need(&b, n)?;
                let m = mqgate_store::wire::decode(b.split_to(n))
                    .map_err(|e| invalid(e.to_string()))?;
                entries.push(Arc::new(m));
            }
            if b.has_remaining() {
                return Err(invalid(format!("{} trailing bytes", b.remaining())));
            }
            Ok(Request::Apply(ForwardReq {
                source,
                first,
                entries,
            }))
        }
        op => Err(invalid(format!("unknown operation {op}"))),
    }
}

fn encode_reply(r: &Result<ForwardReply>) -> Bytes {
    let mut out = Vec::new();
    match r {
        Ok(r) => {
            out.put_u8(REPLY_OK);
            out.put_u64(r.next);
            out.put_u32(r.applied as u32);
        }
        Err(e) => {
            out.put_u8(REPLY_ERR);
            out.extend_from_slice(e.to_string().as_bytes());
        }
    }
    Bytes::from(out)
}

fn decode_reply(mut b: Bytes) -> Result<ForwardReply> {
    need(&b, 1)?;
    match b.get_u8() {
        REPLY_OK => {
            need(&b, 12)?;
            Ok(ForwardReply {
                next: b.get_u64(),
                applied: b.get_u32() as usize,
            })
        }
        REPLY_ERR => Err(invalid(format!(
            "the destination's owner refused: {}",
            String::from_utf8_lossy(&b)
        ))),
        k => Err(invalid(format!("unknown reply kind {k}"))),
    }
}

pub use super::Faults;

/// The owner's side: serves a destination shard's inbox while it runs (drop or
/// [`ForwardServer::stop`] when the shard is released).
#[derive(Debug)]
pub struct ForwardServer {
    task: super::Serving,
}

impl ForwardServer {
    /// Serve `inbox` (of shard `shard`: its `Inbox`, or the broker's `inbox(shard)`,
    /// which also wakes the groups consuming what it applies) on the cluster of `stream`.
    pub async fn start(
        client: async_nats::Client,
        stream: &str,
        shard: ShardId,
        inbox: Arc<dyn ForwardTarget>,
        faults: Arc<Faults>,
    ) -> Result<Self> {
        let mut sub = super::owner_subscription(&client, stream, shard, "fwd").await?;
        let task = tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                let Some(reply_to) = msg.reply.clone() else {
                    continue;
                };
                let answer = match decode_request(msg.payload) {
                    Ok(Request::Next(source)) => inbox
                        .next(source)
                        .await
                        .map(|next| ForwardReply { next, applied: 0 }),
                    Ok(Request::Apply(req)) => inbox.apply(req).await,
                    Err(e) => {
                        tracing::warn!(shard, error = %e, "cluster: a malformed forward request; refused");
                        Err(e)
                    }
                };
                if faults.drop_this() {
                    continue;
                }
                let _ = client.publish(reply_to, encode_reply(&answer)).await;
            }
        });
        Ok(Self {
            task: super::Serving(task),
        })
    }

    /// Stop serving (the shard is released).
    pub fn stop(&self) {
        self.task.0.abort();
    }
}

/// A destination shard reached over NATS, wherever its owner is.
#[derive(Debug, Clone)]
pub struct NatsForwardTarget {
    client: async_nats::Client,
    subject: String,
    dest: ShardId,
    timeout: Duration,
}

impl NatsForwardTarget {
    /// Destination `dest` of the cluster of `stream`; a request unanswered within
    /// `timeout` is an error (the forwarder asks again).
    pub fn new(client: async_nats::Client, stream: &str, dest: ShardId, timeout: Duration) -> Self {
        Self {
            client,
            subject: subject(stream, dest, "fwd"),
            dest,
            timeout,
        }
    }

    async fn call(&self, payload: Bytes) -> Result<ForwardReply> {
        let req = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(self.timeout));
        let reply = self
            .client
            .send_request(self.subject.clone(), req)
            .await
            .map_err(|e| match e.kind() {
                // Nobody owns the shard now (a move, or a cluster starting).
                async_nats::RequestErrorKind::NoResponders => CoreError::NotOwned(self.dest),
                _ => invalid(format!("{}: {e}", self.subject)),
            })?;
        decode_reply(reply.payload)
    }
}

#[async_trait]
impl ForwardTarget for NatsForwardTarget {
    async fn next(&self, source: ShardId) -> Result<u64> {
        let mut p = Vec::with_capacity(3);
        p.put_u8(OP_NEXT);
        p.put_u16(source);
        Ok(self.call(Bytes::from(p)).await?.next)
    }

    async fn apply(&self, req: ForwardReq) -> Result<ForwardReply> {
        self.call(encode_apply(&req)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqgate_store::{Message, MessageId, StoredMessage, TopicName};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn apply_requests_round_trip(
            source in any::<u16>(),
            first in any::<u64>(),
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..8),
        ) {
            let entries: Vec<Arc<StoredMessage>> = bodies
                .into_iter()
                .enumerate()
                .map(|(i, b)| {
                    let mut m = Message::new(TopicName::new("t").unwrap(), Bytes::from(b));
                    m.properties.push(("core.fwd".into(), Bytes::from_static(b"x")));
                    Arc::new(StoredMessage {
                        id: MessageId(i as u64 + 7),
                        store_timestamp: 42,
                        size: mqgate_store::wire::encoded_len(&m) as u32 - 9,
                        message: m,
                    })
                })
                .collect();
            let req = ForwardReq { source, first, entries };
            match decode_request(encode_apply(&req)).unwrap() {
                Request::Apply(back) => {
                    prop_assert_eq!(back.source, req.source);
                    prop_assert_eq!(back.first, req.first);
                    prop_assert_eq!(back.entries.len(), req.entries.len());
                    for (a, b) in back.entries.iter().zip(&req.entries) {
                        prop_assert_eq!(&**a, &**b);
                    }
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(junk in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_request(Bytes::from(junk.clone()));
            let _ = decode_reply(Bytes::from(junk));
        }
    }

    #[test]
    fn replies_round_trip() {
        let ok = ForwardReply {
            next: 9,
            applied: 3,
        };
        assert_eq!(decode_reply(encode_reply(&Ok(ok))).unwrap(), ok);
        let err = decode_reply(encode_reply(&Err(CoreError::Invalid("no".into())))).unwrap_err();
        assert!(err.to_string().contains("no"), "{err}");
    }
}

//! The consume relay's encoding (see the module above for the layouts).

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes};
use mqgate_core::endpoint::{Overflow, Policy};
use mqgate_core::{
    AckToken, ConsumeMode, CoreError, Delivery, GroupSpec, MemberOptions, OnFailure, Result,
};
use mqgate_store::{GroupName, QueueId, QueueOffset, QueueRef};

use crate::relay::codec::{decode_error, encode_error, put_bytes, put_start, start, Reader};

pub(super) const OP_JOIN: u8 = 1;
pub(super) const OP_CMDS: u8 = 2;
pub(super) const REPLY_OK: u8 = 0;
pub(super) const REPLY_ERR: u8 = 1;
pub(super) const DLV_BATCH: u8 = 1;
pub(super) const DLV_ENDED: u8 = 2;
pub(super) fn invalid(what: impl Into<String>) -> CoreError {
    CoreError::Invalid(format!("consume relay: {}", what.into()))
}

pub(super) fn put_opt_u64(out: &mut Vec<u8>, v: Option<u64>) {
    match v {
        Some(v) => {
            out.put_u8(1);
            out.put_u64(v);
        }
        None => out.put_u8(0),
    }
}

pub(super) fn opt_u64(r: &mut Reader) -> Result<Option<u64>> {
    match r.u8()? {
        0 => Ok(None),
        1 => r.u64().map(Some),
        k => Err(invalid(format!("option tag {k}"))),
    }
}

/// `lazy_start` is not carried: a relayed group stores its start when it starts (the
/// default, always safe; the owner of an earlier version knows no other).
pub(super) fn encode_spec(out: &mut Vec<u8>, spec: &GroupSpec) {
    put_bytes(out, spec.name.as_str().as_bytes());
    crate::relay::codec::put_topics(out, &spec.topics);
    out.put_u8(match spec.mode {
        ConsumeMode::Clustering => 0,
        ConsumeMode::Shared => 1,
        ConsumeMode::Broadcast => 2,
    });
    out.put_u8(u8::from(spec.orderly));
    put_start(out, spec.start);
    out.put_u8(match spec.on_failure {
        OnFailure::Retry => 0,
        OnFailure::Discard => 1,
    });
    put_opt_u64(out, spec.max_reconsume_times.map(u64::from));
    let p = &spec.policy;
    put_opt_u64(out, p.message_ttl);
    put_opt_u64(out, p.delivery_limit.map(u64::from));
    put_opt_u64(out, p.max_length);
    put_opt_u64(out, p.max_length_bytes);
    out.put_u8(match p.overflow {
        Overflow::DropHead => 0,
        Overflow::RejectPublish => 1,
        Overflow::RejectPublishDlx => 2,
    });
}

pub(super) fn u32_of(v: Option<u64>) -> Result<Option<u32>> {
    v.map(|v| u32::try_from(v).map_err(|_| invalid("a count out of range")))
        .transpose()
}

pub(super) fn decode_spec(r: &mut Reader) -> Result<GroupSpec> {
    let name = GroupName::new(r.string()?).map_err(|e| invalid(e.to_string()))?;
    let topics = r.topics()?;
    let mode = match r.u8()? {
        0 => ConsumeMode::Clustering,
        1 => ConsumeMode::Shared,
        2 => ConsumeMode::Broadcast,
        k => return Err(invalid(format!("mode {k}"))),
    };
    let mut spec = GroupSpec::new(name, topics, mode);
    spec.orderly = r.u8()? != 0;
    spec.start = start(r)?;
    spec.on_failure = match r.u8()? {
        0 => OnFailure::Retry,
        1 => OnFailure::Discard,
        k => return Err(invalid(format!("on failure {k}"))),
    };
    spec.max_reconsume_times = u32_of(opt_u64(r)?)?;
    spec.policy = Policy {
        message_ttl: opt_u64(r)?,
        delivery_limit: u32_of(opt_u64(r)?)?,
        dead_letter: None,
        max_length: opt_u64(r)?,
        max_length_bytes: opt_u64(r)?,
        overflow: match r.u8()? {
            0 => Overflow::DropHead,
            1 => Overflow::RejectPublish,
            2 => Overflow::RejectPublishDlx,
            k => return Err(invalid(format!("overflow {k}"))),
        },
    };
    Ok(spec)
}

/// A member's credit pool stays in its process: the group on the far side gets the
/// member's prefetch capped by the pool's limit instead (as before pools; the AMQP
/// channel still holds its deliveries to the limit).
pub(super) fn encode_member(out: &mut Vec<u8>, m: &MemberOptions) {
    put_bytes(out, m.id.as_bytes());
    let prefetch = match &m.credit_pool {
        Some(pool) if m.prefetch == 0 => pool.limit(),
        Some(pool) => pool.capped(m.prefetch),
        None => m.prefetch,
    };
    out.put_u32(u32::try_from(prefetch).unwrap_or(u32::MAX));
    out.put_u8(u8::from(m.heartbeat));
    out.put_u8(u8::from(m.exact_prefetch));
    // Last, and only when set: an owner of an earlier version, which knows no
    // unbounded member, refuses the join (trailing bytes) rather than bound it.
    if m.unbounded {
        out.put_u8(1);
    }
}

/// The member, last in a join.
pub(super) fn decode_member(r: &mut Reader) -> Result<MemberOptions> {
    let mut m = MemberOptions::new(r.string()?, r.u32()? as usize);
    m.heartbeat = r.u8()? != 0;
    m.exact_prefetch = r.u8()? != 0;
    if r.0.has_remaining() {
        m.unbounded = r.u8()? != 0;
    }
    Ok(m)
}

pub(super) fn encode_join(deliver_to: &str, spec: &GroupSpec, member: &MemberOptions) -> Bytes {
    let mut out = vec![OP_JOIN];
    put_bytes(&mut out, deliver_to.as_bytes());
    encode_spec(&mut out, spec);
    encode_member(&mut out, member);
    Bytes::from(out)
}

pub(super) fn put_token(out: &mut Vec<u8>, t: &AckToken) {
    put_bytes(out, t.queue().topic.as_str().as_bytes());
    out.put_u32(t.queue().queue.0);
    out.put_u64(t.offset());
    out.put_u64(t.token());
}

pub(super) fn token(r: &mut Reader) -> Result<AckToken> {
    let topic = r.topic()?;
    let queue = QueueId(r.u32()?);
    Ok(AckToken::from_parts(
        QueueRef { topic, queue },
        r.u64()?,
        r.u64()?,
    ))
}

/// A nack: failed (the group's failure policy applies).
pub(super) const NACK_FAILED: u8 = 0;
/// A nack: deliver it again (AMQP requeue), counted as a delivery.
pub(super) const NACK_REQUEUE: u8 = 1;
/// Never reached the client: deliver it again, not counted ([`Consumer::release`]). An
/// owner of an earlier version reads it as a requeue (anything but 0 was one).
///
/// [`Consumer::release`]: mqgate_core::Consumer::release
pub(super) const NACK_RELEASE: u8 = 2;

/// What a member's gateway tells the owner, in one request.
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Cmds {
    pub(super) handle: u64,
    pub(super) received_through: u64,
    pub(super) lost: Vec<u64>,
    pub(super) acks: Vec<AckToken>,
    /// Each token with what to do with it (`NACK_*`).
    pub(super) nacks: Vec<(AckToken, u8)>,
    pub(super) prefetch: Option<u32>,
    pub(super) leave: bool,
    /// An unbounded member: deliveries its gateway has put in the consumer's mailbox
    /// that the consumer has not taken yet (last, only for such members) ...
    pub(super) waiting: Option<u32>,
    /// ... and whether it is bounded from now on (its channel's global basic.qos got a
    /// limit). Sent with `waiting`.
    pub(super) bounded: bool,
}

pub(super) fn encode_cmds(c: &Cmds) -> Bytes {
    let mut out = vec![OP_CMDS];
    out.put_u64(c.handle);
    out.put_u64(c.received_through);
    out.put_u32(c.lost.len() as u32);
    for s in &c.lost {
        out.put_u64(*s);
    }
    out.put_u32(c.acks.len() as u32);
    for t in &c.acks {
        put_token(&mut out, t);
    }
    out.put_u32(c.nacks.len() as u32);
    for (t, kind) in &c.nacks {
        put_token(&mut out, t);
        out.put_u8(*kind);
    }
    put_opt_u64(&mut out, c.prefetch.map(u64::from));
    out.put_u8(u8::from(c.leave));
    if c.waiting.is_some() || c.bounded {
        out.put_u32(c.waiting.unwrap_or(0));
        out.put_u8(u8::from(c.bounded));
    }
    Bytes::from(out)
}

pub(super) fn decode_cmds(r: &mut Reader) -> Result<Cmds> {
    let mut c = Cmds {
        handle: r.u64()?,
        received_through: r.u64()?,
        ..Cmds::default()
    };
    let n = r.count(8)?;
    for _ in 0..n {
        c.lost.push(r.u64()?);
    }
    let n = r.count(24)?;
    for _ in 0..n {
        c.acks.push(token(r)?);
    }
    let n = r.count(25)?;
    for _ in 0..n {
        let t = token(r)?;
        c.nacks.push((t, r.u8()?));
    }
    c.prefetch = u32_of(opt_u64(r)?)?;
    c.leave = r.u8()? != 0;
    if r.0.has_remaining() {
        c.waiting = Some(r.u32()?);
        c.bounded = r.u8()? != 0;
    }
    Ok(c)
}

/// A request as the owner reads it.
pub(super) enum Request {
    Join(String, Box<GroupSpec>, MemberOptions),
    Cmds(Cmds),
}

pub(super) fn decode_request(b: Bytes) -> Result<Request> {
    let mut r = Reader(b);
    let req = match r.u8()? {
        OP_JOIN => {
            let to = r.string()?;
            Request::Join(to, Box::new(decode_spec(&mut r)?), decode_member(&mut r)?)
        }
        OP_CMDS => Request::Cmds(decode_cmds(&mut r)?),
        op => return Err(invalid(format!("unknown operation {op}"))),
    };
    r.end()?;
    Ok(req)
}

pub(super) fn encode_reply(r: &Result<u64>) -> Bytes {
    let mut out = Vec::new();
    match r {
        Ok(v) => {
            out.put_u8(REPLY_OK);
            out.put_u64(*v);
        }
        Err(e) => {
            out.put_u8(REPLY_ERR);
            encode_error(&mut out, e);
        }
    }
    Bytes::from(out)
}

pub(super) fn decode_reply(b: Bytes) -> Result<u64> {
    let mut r = Reader(b);
    match r.u8()? {
        REPLY_OK => r.u64(),
        REPLY_ERR => Err(decode_error(&mut r)?),
        k => Err(invalid(format!("unknown reply kind {k}"))),
    }
}

pub(super) fn encode_batch(handle: u64, seq: u64, batch: &[Delivery]) -> Bytes {
    let mut out = vec![DLV_BATCH];
    out.put_u64(handle);
    out.put_u64(seq);
    out.put_u32(batch.len() as u32);
    for d in batch {
        put_bytes(&mut out, d.queue.topic.as_str().as_bytes());
        out.put_u32(d.queue.queue.0);
        out.put_u64(d.offset.0);
        out.put_u8(u8::from(d.redelivered));
        out.put_u32(d.delivery_count);
        out.put_u64(d.ack_token().token());
        let m = &d.message;
        let mut one = Vec::with_capacity(mqgate_store::wire::encoded_len(&m.message));
        mqgate_store::wire::encode_into(m.id, m.store_timestamp, &m.message, &mut one);
        put_bytes(&mut out, &one);
    }
    Bytes::from(out)
}

/// What the owner sends a member's gateway.
#[derive(Debug)]
pub(super) enum Dlv {
    Batch(u64, u64, Vec<Delivery>),
    /// The member ended on the owner: its handle, and whether for good (the group
    /// deleted, the member cut off) rather than because the shard moved.
    Ended(u64, bool),
}

pub(super) fn decode_dlv(b: Bytes) -> Result<Dlv> {
    let mut r = Reader(b);
    let d = match r.u8()? {
        DLV_BATCH => {
            let handle = r.u64()?;
            let seq = r.u64()?;
            let n = r.count(30)?;
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                let topic = r.topic()?;
                let queue = QueueRef {
                    topic,
                    queue: QueueId(r.u32()?),
                };
                let offset = QueueOffset(r.u64()?);
                let redelivered = r.u8()? != 0;
                let count = r.u32()?;
                let token = r.u64()?;
                let m =
                    mqgate_store::wire::decode(r.bytes()?).map_err(|e| invalid(e.to_string()))?;
                out.push(Delivery::relayed(
                    queue,
                    offset,
                    Arc::new(m),
                    redelivered,
                    count,
                    token,
                ));
            }
            Dlv::Batch(handle, seq, out)
        }
        DLV_ENDED => {
            let handle = r.u64()?;
            Dlv::Ended(handle, r.u8()? != 0)
        }
        k => return Err(invalid(format!("unknown delivery kind {k}"))),
    };
    r.end()?;
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mqgate_store::{Message, MessageId, StoredMessage, TopicName};
    use proptest::prelude::*;

    fn topic(s: &str) -> TopicName {
        TopicName::new(s).unwrap()
    }

    proptest! {
        #[test]
        fn commands_round_trip(
            handle in any::<u64>(),
            through in any::<u64>(),
            lost in proptest::collection::vec(any::<u64>(), 0..5),
            offsets in proptest::collection::vec((any::<u64>(), any::<u64>(), 0u8..3), 0..6),
            prefetch in proptest::option::of(any::<u32>()),
            leave in any::<bool>(),
            trailer in proptest::option::of((any::<u32>(), any::<bool>())),
        ) {
            let q = QueueRef { topic: topic("q"), queue: QueueId(3) };
            let c = Cmds {
                handle,
                received_through: through,
                lost,
                acks: offsets.iter().map(|(o, t, _)| AckToken::from_parts(q.clone(), *o, *t)).collect(),
                nacks: offsets.iter().map(|(o, t, r)| (AckToken::from_parts(q.clone(), *o, *t), *r)).collect(),
                prefetch,
                leave,
                waiting: trailer.map(|(w, _)| w),
                bounded: trailer.is_some_and(|(_, b)| b),
            };
            match decode_request(encode_cmds(&c)).unwrap() {
                Request::Cmds(back) => prop_assert_eq!(back, c),
                Request::Join(..) => prop_assert!(false),
            }
        }

        #[test]
        fn garbage_is_an_error_not_a_panic(junk in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_request(Bytes::from(junk.clone()));
            let _ = decode_reply(Bytes::from(junk.clone()));
            let _ = decode_dlv(Bytes::from(junk));
        }
    }

    #[test]
    fn joins_and_deliveries_round_trip() {
        let mut spec = GroupSpec::new(
            GroupName::new("g").unwrap(),
            vec![topic("a")],
            ConsumeMode::Shared,
        );
        spec.start = mqgate_core::StartPosition::Timestamp(77);
        spec.on_failure = OnFailure::Discard;
        spec.max_reconsume_times = Some(4);
        spec.policy.message_ttl = Some(1000);
        spec.policy.max_length = Some(5);
        spec.policy.overflow = Overflow::RejectPublishDlx;
        let mut m = MemberOptions::new("m-1", 20);
        m.heartbeat = true;
        for unbounded in [false, true] {
            m.unbounded = unbounded;
            match decode_request(encode_join("_INBOX.x", &spec, &m)).unwrap() {
                Request::Join(to, s, back) => {
                    assert_eq!(to, "_INBOX.x");
                    assert_eq!(format!("{s:?}"), format!("{spec:?}"));
                    assert_eq!(format!("{back:?}"), format!("{m:?}"));
                }
                Request::Cmds(_) => panic!("a join"),
            }
        }
        // A join of an earlier version (no unbounded byte) is a bounded member.
        m.unbounded = false;
        let mut old = encode_join("_INBOX.x", &spec, &m).to_vec();
        m.unbounded = true;
        assert_eq!(encode_join("_INBOX.x", &spec, &m).len(), old.len() + 1);
        old.push(1);
        match decode_request(Bytes::from(old)).unwrap() {
            Request::Join(_, _, back) => assert!(back.unbounded),
            Request::Cmds(_) => panic!("a join"),
        }
        let msg = Message::new(topic("a"), Bytes::from_static(b"body"));
        let d = Delivery::relayed(
            QueueRef {
                topic: topic("a"),
                queue: QueueId(1),
            },
            QueueOffset(9),
            Arc::new(StoredMessage {
                id: MessageId(3 << 44),
                store_timestamp: 5,
                size: mqgate_store::wire::encoded_len(&msg) as u32 - 9,
                message: msg,
            }),
            true,
            2,
            41,
        );
        match decode_dlv(encode_batch(7, 8, std::slice::from_ref(&d))).unwrap() {
            Dlv::Batch(7, 8, back) => {
                assert_eq!(back.len(), 1);
                assert_eq!(back[0].ack_token(), d.ack_token());
                assert_eq!(back[0].message, d.message);
                assert!(back[0].redelivered);
                assert_eq!(back[0].delivery_count, 2);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(decode_reply(encode_reply(&Ok(5))).unwrap(), 5);
    }
}

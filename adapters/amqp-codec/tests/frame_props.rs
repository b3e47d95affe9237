//! Property tests of AMQP framing: whatever bytes arrive, decoding never panics; frames
//! split at any boundary decode the same; frames over frame_max are refused from their
//! header alone; methods and content round-trip.

use amq_protocol::protocol::{basic, queue, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use bytes::BytesMut;
use mqgate_amqp_codec::frame::{self, Frame, FrameError};
use proptest::prelude::*;

fn short() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._\\-]{0,40}"
}

fn value() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        short().prop_map(|s| AMQPValue::LongString(LongString::from(s))),
        proptest::collection::vec(any::<u8>(), 0..20).prop_map(|b| AMQPValue::ByteArray(b.into())),
    ]
}

fn table() -> impl Strategy<Value = FieldTable> {
    proptest::collection::btree_map("[a-z\\-]{1,12}", value(), 0..6).prop_map(|m| {
        let mut t = FieldTable::default();
        for (k, v) in m {
            t.insert(ShortString::from(k), v);
        }
        t
    })
}

fn method() -> impl Strategy<Value = AMQPClass> {
    prop_oneof![
        (short(), short(), any::<bool>(), any::<bool>()).prop_map(|(e, k, m, i)| {
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: e.into(),
                routing_key: k.into(),
                mandatory: m,
                immediate: i,
            }))
        }),
        (any::<u64>(), any::<bool>()).prop_map(|(t, m)| {
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: t,
                multiple: m,
            }))
        }),
        (short(), any::<[bool; 5]>(), table()).prop_map(|(q, f, args)| {
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: q.into(),
                passive: f[0],
                durable: f[1],
                exclusive: f[2],
                auto_delete: f[3],
                nowait: f[4],
                arguments: args,
            }))
        }),
        (short(), short(), any::<[bool; 4]>(), table()).prop_map(|(q, tag, f, args)| {
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: q.into(),
                consumer_tag: tag.into(),
                no_local: f[0],
                no_ack: f[1],
                exclusive: f[2],
                nowait: f[3],
                arguments: args,
            }))
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), max in 0u32..20_000) {
        let mut b = BytesMut::from(&bytes[..]);
        for _ in 0..64 {
            match frame::decode(&mut b, max) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }

    #[test]
    fn frames_split_anywhere_decode_the_same(
        methods in proptest::collection::vec((1u16..100, method()), 1..6),
        body in proptest::collection::vec(any::<u8>(), 0..9000),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let mut wire = BytesMut::new();
        for (ch, m) in &methods {
            frame::put_method(&mut wire, *ch, m.clone());
        }
        let props = frame::encode_properties(&basic::AMQPProperties::default().with_delivery_mode(2));
        frame::put_content(&mut wire, 7, &props, &body, 4096);
        let whole = wire.freeze();
        let mut points: Vec<usize> = cuts.iter().map(|i| i.index(whole.len() + 1)).collect();
        points.push(whole.len());
        points.sort_unstable();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut from = 0;
        for p in points {
            buf.extend_from_slice(&whole[from..p]);
            from = p;
            while let Some(f) = frame::decode(&mut buf, 4096).unwrap() {
                got.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got.len(), methods.len() + 1 + body.len().div_ceil(4096 - 8));
        for (f, (ch, m)) in got.iter().zip(&methods) {
            prop_assert_eq!(f, &Frame::Method(*ch, Box::new(m.clone())));
        }
        let mut rebuilt = Vec::new();
        for f in &got[methods.len() + 1..] {
            let Frame::Body(7, b) = f else { panic!("body frame expected") };
            rebuilt.extend_from_slice(b);
        }
        prop_assert_eq!(rebuilt, body);
    }

    #[test]
    fn oversize_refused_from_the_header(size in 4089u32..u32::MAX, max in 4096u32..4097) {
        let mut b = BytesMut::new();
        b.extend_from_slice(&[frame::FRAME_BODY, 0, 1]);
        b.extend_from_slice(&size.to_be_bytes());
        let r = frame::decode(&mut b, max);
        let refused = matches!(r, Err(FrameError::TooLarge { .. }));
        prop_assert!(refused, "{:?}", r);
    }
}

/// A queue.declare frame whose arguments are `table` (a whole field table).
fn declare_frame(table: &[u8]) -> BytesMut {
    let mut payload = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    payload.extend_from_slice(table);
    let mut b = BytesMut::new();
    b.extend_from_slice(&[frame::FRAME_METHOD, 0, 1]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(&payload);
    b.extend_from_slice(&[frame::FRAME_END]);
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Field tables nested to any depth (tables or arrays between, thousands of levels:
    /// far past what overflowed the stack) never crash decoding: within the limit they
    /// parse, deeper they are refused with TooDeep (reply 502).
    #[test]
    fn nesting_is_refused_past_the_limit_never_crashes(depth in 1usize..4000, arrays in any::<bool>()) {
        let table = mqgate_amqp_codec::depth::nested(depth, arrays);
        let mut buf = declare_frame(&table);
        match frame::decode(&mut buf, 1 << 24) {
            Err(FrameError::TooDeep { .. }) => {
                prop_assert!(depth > mqgate_amqp_codec::depth::MAX_NESTING, "refused at depth {}", depth);
                prop_assert_eq!(FrameError::TooDeep { channel: 1, max: 32 }.reply_code(), 502);
            }
            Ok(Some(Frame::Method(1, _))) => {
                prop_assert!(depth <= mqgate_amqp_codec::depth::MAX_NESTING, "accepted depth {}", depth);
            }
            other => prop_assert!(false, "depth {}: {:?}", depth, other),
        }
    }
}

/// A short string's bytes: mostly UTF-8, sometimes not, any length a length octet allows.
fn short_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        short().prop_map(String::into_bytes),
        "\\PC{0,60}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    /// basic.publish is read by hand (frame.rs, `parse_publish`); whatever its payload,
    /// decoding it gives what amq-protocol's parser gives, and refuses what it refuses:
    /// bad UTF-8, a wrong length octet, bytes missing or left over, any bits set.
    #[test]
    fn publish_decodes_as_amq_protocol_does(
        ticket in any::<u16>(),
        exchange in short_bytes(),
        key in short_bytes(),
        bits in any::<u8>(),
        exchange_len in prop_oneof![Just(None), any::<u8>().prop_map(Some)],
        cut in prop_oneof![Just(None), any::<prop::sample::Index>().prop_map(Some)],
        extra in proptest::collection::vec(any::<u8>(), 0..3),
    ) {
        let mut payload = vec![0, 60, 0, 40];
        payload.extend_from_slice(&ticket.to_be_bytes());
        let exchange = &exchange[..exchange.len().min(255)];
        let key = &key[..key.len().min(255)];
        payload.push(exchange_len.unwrap_or(exchange.len() as u8));
        payload.extend_from_slice(exchange);
        payload.push(key.len() as u8);
        payload.extend_from_slice(key);
        payload.push(bits);
        payload.extend_from_slice(&extra);
        if let Some(cut) = cut {
            payload.truncate(cut.index(payload.len() + 1));
        }
        let generic = match amq_protocol::protocol::parse_class(&payload[..]) {
            Ok(([], m)) => Some(m),
            _ => None,
        };
        let mut b = BytesMut::new();
        b.extend_from_slice(&[frame::FRAME_METHOD, 0, 3]);
        b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        b.extend_from_slice(&payload);
        b.extend_from_slice(&[frame::FRAME_END]);
        match (frame::decode(&mut b, 1 << 20), generic) {
            (Ok(Some(Frame::Method(3, m))), Some(g)) => prop_assert_eq!(*m, g),
            (Err(FrameError::BadMethod { channel: 3, .. }), None) => {}
            (got, want) => prop_assert!(false, "decoded {:?}, amq-protocol {:?}", got, want),
        }
    }
}

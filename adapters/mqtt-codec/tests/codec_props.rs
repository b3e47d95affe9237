//! Property tests of the MQTT codec: every packet round-trips through encode and decode
//! on both versions; framing gives the same packets whatever the read boundaries;
//! arbitrary bytes never panic the decoder and never make it take more than it was given.

use bytes::{Bytes, BytesMut};
use mqgate_mqtt_codec as codec;
use mqgate_mqtt_codec::{
    Ack, AckKind, ConnAck, Connect, Disconnect, Packet, Properties, Publish, QoS, SubAck,
    SubOptions, Subscribe, UnsubAck, Unsubscribe, Version, Will,
};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 /é€_-]{0,12}"
}

fn topic() -> impl Strategy<Value = String> {
    "[a-z0-9/é$_-]{1,16}"
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn bin() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn user() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec((text(), text()), 0..3)
}

fn flag() -> impl Strategy<Value = Option<u8>> {
    proptest::option::of(0u8..=1)
}

fn nonzero16() -> impl Strategy<Value = Option<u16>> {
    proptest::option::of(1u16..)
}

fn publish_props() -> impl Strategy<Value = Properties> {
    (
        flag(),
        proptest::option::of(any::<u32>()),
        proptest::option::of(text()),
        proptest::option::of(topic()),
        proptest::option::of(bin()),
        proptest::collection::vec(1u32..268_435_455, 0..3),
        nonzero16(),
        user(),
    )
        .prop_map(|(pf, exp, ct, rt, cd, ids, alias, user)| Properties {
            payload_format: pf,
            message_expiry: exp,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            subscription_ids: ids,
            topic_alias: alias,
            user,
            ..Default::default()
        })
}

fn connect_props() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(any::<u32>()),
        nonzero16(),
        proptest::option::of(1u32..),
        proptest::option::of(any::<u16>()),
        flag(),
        flag(),
        user(),
    )
        .prop_map(|(se, rm, mps, tam, rpi, rri, user)| Properties {
            session_expiry: se,
            receive_maximum: rm,
            maximum_packet_size: mps,
            topic_alias_maximum: tam,
            request_problem_info: rpi,
            request_response_info: rri,
            user,
            ..Default::default()
        })
}

fn connack_props() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(text()),
        proptest::option::of(any::<u16>()),
        nonzero16(),
        proptest::option::of(0u8..=1),
        flag(),
        proptest::option::of(text()),
        (flag(), flag(), flag()),
        user(),
    )
        .prop_map(
            |(aci, ska, rm, mq, ra, rs, (wa, sa, sh), user)| Properties {
                assigned_client_id: aci,
                server_keep_alive: ska,
                receive_maximum: rm,
                maximum_qos: mq,
                retain_available: ra,
                reason_string: rs,
                wildcard_available: wa,
                sub_ids_available: sa,
                shared_available: sh,
                user,
                ..Default::default()
            },
        )
}

fn reason_props() -> impl Strategy<Value = Properties> {
    (proptest::option::of(text()), user()).prop_map(|(rs, user)| Properties {
        reason_string: rs,
        user,
        ..Default::default()
    })
}

fn v5_only(v5: bool, p: Properties) -> Properties {
    if v5 {
        p
    } else {
        Properties::default()
    }
}

fn version() -> impl Strategy<Value = Version> {
    prop_oneof![Just(Version::V31), Just(Version::V311), Just(Version::V5)]
}

/// A packet valid for `version`, in the form the decoder returns it.
fn packet(version: Version) -> BoxedStrategy<Packet> {
    let v5 = version.is_v5();
    let connect = (
        any::<bool>(),
        any::<u16>(),
        connect_props(),
        text(),
        proptest::option::of((
            topic(),
            bin(),
            qos(),
            any::<bool>(),
            publish_props(),
            proptest::option::of(any::<u32>()),
        )),
        proptest::option::of(text()),
        proptest::option::of(bin()),
    )
        .prop_map(move |(clean, ka, props, id, will, user, pass)| {
            let will = will.map(|(t, payload, qos, retain, mut p, delay)| {
                p.topic_alias = None;
                p.subscription_ids.clear();
                p.will_delay = delay;
                Will {
                    topic: t,
                    payload,
                    qos,
                    retain,
                    properties: v5_only(v5, p),
                }
            });
            let password = if !v5 && user.is_none() { None } else { pass };
            Packet::Connect(Box::new(Connect {
                version,
                clean_start: clean,
                keep_alive: ka,
                properties: v5_only(v5, props),
                client_id: id,
                will,
                username: user,
                password,
            }))
        });
    let connack = (any::<bool>(), any::<u8>(), connack_props()).prop_map(move |(sp, code, p)| {
        Packet::ConnAck(ConnAck {
            session_present: sp,
            code,
            properties: v5_only(v5, p),
        })
    });
    let publish = (
        any::<bool>(),
        qos(),
        any::<bool>(),
        topic(),
        1u16..,
        publish_props(),
        bin(),
    )
        .prop_map(move |(dup, qos, retain, topic, pkid, p, payload)| {
            let at_most_once = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !at_most_once,
                qos,
                retain,
                topic,
                pkid: if at_most_once { 0 } else { pkid },
                properties: v5_only(v5, p),
                payload,
            })
        });
    let ack = (
        prop_oneof![
            Just(AckKind::PubAck),
            Just(AckKind::PubRec),
            Just(AckKind::PubRel),
            Just(AckKind::PubComp)
        ],
        1u16..,
        any::<u8>(),
        reason_props(),
    )
        .prop_map(move |(kind, pkid, reason, p)| {
            Packet::Ack(Ack {
                kind,
                pkid,
                reason: if v5 { reason } else { 0 },
                properties: v5_only(v5, p),
            })
        });
    let sub_opts =
        (qos(), any::<bool>(), any::<bool>(), 0u8..=2).prop_map(move |(qos, nl, rap, rh)| {
            SubOptions {
                qos,
                no_local: nl && v5,
                retain_as_published: rap && v5,
                retain_handling: if v5 { rh } else { 0 },
            }
        });
    let subscribe = (
        1u16..,
        proptest::option::of(1u32..268_435_455),
        user(),
        proptest::collection::vec((topic(), sub_opts), 1..4),
    )
        .prop_map(move |(pkid, id, user, filters)| {
            let p = Properties {
                subscription_ids: id.into_iter().collect(),
                user,
                ..Default::default()
            };
            Packet::Subscribe(Subscribe {
                pkid,
                properties: v5_only(v5, p),
                filters,
            })
        });
    let suback = (
        any::<u16>(),
        reason_props(),
        proptest::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(move |(pkid, p, codes)| {
            Packet::SubAck(SubAck {
                pkid,
                properties: v5_only(v5, p),
                codes,
            })
        });
    let unsubscribe = (1u16.., user(), proptest::collection::vec(topic(), 1..4)).prop_map(
        move |(pkid, user, filters)| {
            let p = Properties {
                user,
                ..Default::default()
            };
            Packet::Unsubscribe(Unsubscribe {
                pkid,
                properties: v5_only(v5, p),
                filters,
            })
        },
    );
    let unsuback = (
        any::<u16>(),
        reason_props(),
        proptest::collection::vec(any::<u8>(), 0..4),
    )
        .prop_map(move |(pkid, p, codes)| {
            Packet::UnsubAck(UnsubAck {
                pkid,
                properties: v5_only(v5, p),
                codes: if v5 { codes } else { Vec::new() },
            })
        });
    let disconnect = (
        any::<u8>(),
        proptest::option::of(any::<u32>()),
        reason_props(),
    )
        .prop_map(move |(reason, se, mut p)| {
            p.session_expiry = se;
            Packet::Disconnect(Disconnect {
                reason: if v5 { reason } else { 0 },
                properties: v5_only(v5, p),
            })
        });
    let mut all = vec![
        connect.boxed(),
        connack.boxed(),
        publish.boxed(),
        ack.boxed(),
        subscribe.boxed(),
        suback.boxed(),
        unsubscribe.boxed(),
        unsuback.boxed(),
        Just(Packet::PingReq).boxed(),
        Just(Packet::PingResp).boxed(),
        disconnect.boxed(),
    ];
    if v5 {
        let auth = (
            any::<u8>(),
            proptest::option::of(text()),
            proptest::option::of(bin()),
            reason_props(),
        )
            .prop_map(|(reason, method, data, mut p)| {
                p.auth_method = method;
                p.auth_data = data;
                Packet::Auth(Disconnect {
                    reason,
                    properties: p,
                })
            });
        all.push(auth.boxed());
    }
    proptest::strategy::Union::new(all).boxed()
}

fn encode_all(packets: &[Packet], v: Version) -> BytesMut {
    let mut out = BytesMut::new();
    for p in packets {
        codec::encode(p, v, &mut out);
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn packets_round_trip((v, p) in version().prop_flat_map(|v| (Just(v), packet(v)))) {
        let mut buf = encode_all(std::slice::from_ref(&p), v);
        let decoded = codec::decode(&mut buf, Some(v), codec::MAX_PACKET_SIZE);
        prop_assert_eq!(decoded, Ok(Some(p)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn framing_ignores_read_boundaries(
        (v, packets) in version().prop_flat_map(|v| (Just(v), proptest::collection::vec(packet(v), 1..8))),
        cuts in proptest::collection::vec(1usize..64, 1..20),
    ) {
        let wire = encode_all(&packets, v).freeze();
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut cuts = cuts.into_iter().cycle();
        while pos < wire.len() {
            let n = cuts.next().unwrap().min(wire.len() - pos);
            buf.extend_from_slice(&wire[pos..pos + n]);
            pos += n;
            while let Some(p) = codec::decode(&mut buf, Some(v), codec::MAX_PACKET_SIZE).unwrap() {
                got.push(p);
            }
        }
        prop_assert_eq!(got, packets);
        prop_assert!(buf.is_empty());
    }

    /// A delivery encoded from borrowed parts (`encode_publish_within`, no packet of its
    /// own) is byte for byte the packet's encoding, fits a limit of exactly its length,
    /// and a limit one byte short writes nothing.
    #[test]
    fn publish_parts_encode_as_the_packet((v, p) in version().prop_flat_map(|v| (Just(v), packet(v)))) {
        if let Packet::Publish(publish) = &p {
            let whole = encode_all(std::slice::from_ref(&p), v);
            let mut parts = BytesMut::new();
            prop_assert!(codec::encode_publish_within(&publish.as_parts(), v.is_v5(), whole.len(), &mut parts));
            prop_assert_eq!(&parts[..], &whole[..]);
            let mut short = BytesMut::new();
            prop_assert!(!codec::encode_publish_within(&publish.as_parts(), v.is_v5(), whole.len() - 1, &mut short));
            prop_assert!(short.is_empty());
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300), v in proptest::option::of(version())) {
        let mut buf = BytesMut::from(&bytes[..]);
        let before = buf.len();
        match codec::decode(&mut buf, v, 256) {
            Ok(Some(_)) => prop_assert!(buf.len() < before),
            Ok(None) => prop_assert_eq!(buf.len(), before),
            Err(_) => {}
        }
    }

    #[test]
    fn oversize_refused_from_the_header(len in 257usize..10_000) {
        let mut header = BytesMut::new();
        codec::encode(&Packet::Publish(Publish {
            dup: false, qos: QoS::AtMostOnce, retain: false, topic: "t".into(), pkid: 0,
            properties: Properties::default(), payload: Bytes::from(vec![0u8; len]),
        }), Version::V311, &mut header);
        header.truncate(5); // only the fixed header has arrived
        let r = codec::decode(&mut header, Some(Version::V311), 256);
        prop_assert!(matches!(r, Err(codec::DecodeError::TooLarge { .. })), "{:?}", r);
    }
}

/// A packet may carry at most `MAX_USER_PROPERTIES` user properties; one more is refused
/// with reason 0x97 before it costs more memory.
#[test]
fn user_properties_are_capped() {
    for (n, ok) in [
        (codec::MAX_USER_PROPERTIES, true),
        (codec::MAX_USER_PROPERTIES + 1, false),
        (200_000, false),
    ] {
        let p = Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: "t".into(),
            pkid: 0,
            properties: Properties {
                user: vec![(String::new(), String::new()); n],
                ..Default::default()
            },
            payload: Bytes::new(),
        });
        let mut buf = BytesMut::new();
        codec::encode(&p, Version::V5, &mut buf);
        let got = codec::decode(&mut buf, Some(Version::V5), codec::MAX_PACKET_SIZE);
        if ok {
            assert_eq!(got, Ok(Some(p)), "{n} user properties");
        } else {
            let e = got.expect_err("refused");
            assert_eq!(e, codec::DecodeError::TooManyUserProperties);
            assert_eq!(e.reason_code(), 0x97);
        }
    }
}

/// PUBACK and its kin are written in place: the packet id, and on 5.0 a reason code only
/// when it is not success (MQTT 5.0, 3.4.2.1: it may be left out then).
#[test]
fn acks_written_in_place() {
    let ack = |kind, reason| {
        Packet::Ack(Ack {
            kind,
            pkid: 0x0107,
            reason,
            properties: Properties::default(),
        })
    };
    let bytes = |p: &Packet, v| encode_all(std::slice::from_ref(p), v).to_vec();
    assert_eq!(
        bytes(&ack(AckKind::PubAck, 0), Version::V311),
        [0x40, 2, 1, 7]
    );
    assert_eq!(
        bytes(&ack(AckKind::PubRel, 0), Version::V311),
        [0x62, 2, 1, 7]
    );
    assert_eq!(
        bytes(&ack(AckKind::PubAck, 0), Version::V5),
        [0x40, 2, 1, 7]
    );
    assert_eq!(
        bytes(&ack(AckKind::PubRec, 0x87), Version::V5),
        [0x50, 3, 1, 7, 0x87]
    );
    let mut with_props = ack(AckKind::PubComp, 0);
    if let Packet::Ack(a) = &mut with_props {
        a.properties.reason_string = Some("ok".into());
    }
    // Reason, then properties: length 2 + 1 + (1 + 1 + 2 + 2).
    assert_eq!(
        bytes(&with_props, Version::V5),
        [0x70, 9, 1, 7, 0, 5, 0x1F, 0, 2, b'o', b'k']
    );
}

//! The router's unit tests.

use super::*;

fn t(name: &str) -> TopicName {
    TopicName::new(name).unwrap()
}

fn bind(r: &Router, source: &str, dest: Destination, key: &str) {
    r.bind(
        DEFAULT_VHOST,
        Binding {
            source: source.into(),
            destination: dest,
            key: key.into(),
            headers: None,
            mqtt: false,
            arguments: Bytes::new(),
        },
    )
    .unwrap();
}

fn route(r: &Router, ex: &str, key: &str) -> Vec<String> {
    let mut v: Vec<String> = r
        .route(DEFAULT_VHOST, ex, key, &[])
        .unwrap()
        .topics
        .into_iter()
        .map(|t| t.to_string())
        .collect();
    v.sort();
    v
}

#[test]
fn exchange_types_route() {
    let r = Router::new();
    r.add_vhost(DEFAULT_VHOST);
    bind(&r, "amq.direct", Destination::Topic(t("q1")), "k");
    bind(&r, "amq.direct", Destination::Topic(t("q2")), "k");
    bind(&r, "amq.fanout", Destination::Topic(t("q3")), "ignored");
    bind(&r, "amq.topic", Destination::Topic(t("q4")), "a.*");
    bind(&r, "amq.topic", Destination::Topic(t("q4")), "#.b");
    assert_eq!(route(&r, "amq.direct", "k"), vec!["q1", "q2"]);
    assert!(route(&r, "amq.direct", "x").is_empty());
    assert_eq!(route(&r, "amq.fanout", "x"), vec!["q3"]);
    assert_eq!(
        route(&r, "amq.topic", "a.b"),
        vec!["q4"],
        "once, though two bindings match"
    );
    assert!(matches!(
        r.route(DEFAULT_VHOST, "nope", "", &[]),
        Err(CoreError::NoSuchExchange(_))
    ));
}

/// A destination's binding list turns from a vector into a set past eight bindings
/// and back to nothing: each binding is found, removed once, and stops routing.
#[test]
fn many_bindings_of_one_destination() {
    let r = Router::new();
    r.add_vhost(DEFAULT_VHOST);
    for i in 0..20 {
        bind(
            &r,
            "amq.direct",
            Destination::Topic(t("q")),
            &format!("k{i}"),
        );
    }
    bind(&r, "amq.direct", Destination::Topic(t("other")), "k3");
    assert_eq!(route(&r, "amq.direct", "k19"), vec!["q"]);
    let mut all = r.bindings(DEFAULT_VHOST, Some("amq.direct"));
    all.retain(|b| b.destination == Destination::Topic(t("q")));
    assert_eq!(all.len(), 20);
    for b in all.iter().filter(|b| b.key != "k3") {
        assert!(r.unbind(DEFAULT_VHOST, b).unwrap());
        assert!(!r.unbind(DEFAULT_VHOST, b).unwrap(), "removed once");
        assert!(route(&r, "amq.direct", &b.key).is_empty());
    }
    assert_eq!(route(&r, "amq.direct", "k3"), vec!["other", "q"]);
    let (removed, _) = r.unbind_topic(DEFAULT_VHOST, &t("q"));
    assert_eq!(removed.len(), 1);
    assert_eq!(route(&r, "amq.direct", "k3"), vec!["other"]);
    // And a few (the vector) go with their topic too.
    for i in 0..3 {
        bind(
            &r,
            "amq.direct",
            Destination::Topic(t("q")),
            &format!("k{i}"),
        );
    }
    assert_eq!(r.unbind_topic(DEFAULT_VHOST, &t("q")).0.len(), 3);
    assert!(route(&r, "amq.direct", "k1").is_empty());
}

/// Bindings differing only in arguments share one index entry: the route stays
/// while either is bound and goes with the last, on every exchange type, whether
/// the destination holds a few bindings (the vector) or many (the maps).
#[test]
fn bindings_differing_in_arguments_share_a_route() {
    for (exchange, many) in [
        ("amq.direct", false),
        ("amq.direct", true),
        ("amq.topic", false),
        ("amq.topic", true),
        ("amq.fanout", false),
        ("amq.fanout", true),
        ("amq.headers", false),
        ("amq.headers", true),
    ] {
        let r = Router::new();
        r.add_vhost(DEFAULT_VHOST);
        let headers = exchange == "amq.headers";
        let b = |key: &str, args: &str| Binding {
            source: exchange.into(),
            destination: Destination::Topic(t("q")),
            key: key.into(),
            headers: headers.then(|| HeaderMatch {
                all: true,
                headers: vec![("h".into(), HeaderValue::Str(key.into()))],
            }),
            mqtt: false,
            arguments: Bytes::from(args.to_owned()),
        };
        let others: Vec<Binding> = (0..if many { 12 } else { 2 })
            .map(|i| b(&format!("other{i}"), ""))
            .collect();
        for o in &others {
            assert!(r.bind(DEFAULT_VHOST, o.clone()).unwrap());
        }
        let (x, y) = (b("k", "x"), b("k", "y"));
        assert!(r.bind(DEFAULT_VHOST, x.clone()).unwrap());
        assert!(!r.bind(DEFAULT_VHOST, x.clone()).unwrap(), "bound once");
        assert!(r.bind(DEFAULT_VHOST, y.clone()).unwrap());
        let routes = || {
            let h = [("h".to_string(), HeaderValue::Str("k".into()))];
            !r.route(DEFAULT_VHOST, exchange, "k", &h)
                .unwrap()
                .topics
                .is_empty()
        };
        assert!(routes(), "{exchange} many={many}");
        let listed = r.bindings(DEFAULT_VHOST, Some(exchange));
        assert_eq!(listed.len(), others.len() + 2);
        assert!(listed.contains(&x) && listed.contains(&y));
        assert!(r.unbind(DEFAULT_VHOST, &x).unwrap());
        assert!(!r.unbind(DEFAULT_VHOST, &x).unwrap(), "removed once");
        assert!(routes(), "{exchange} many={many}: y still routes");
        assert!(r.unbind(DEFAULT_VHOST, &y).unwrap());
        if exchange == "amq.fanout" {
            // The others route a fanout's every message.
            assert!(routes());
            for o in &others {
                assert!(r.unbind(DEFAULT_VHOST, o).unwrap());
            }
        }
        assert!(
            !routes(),
            "{exchange} many={many}: the route went with the last"
        );
        // if-unused sees what is left: nothing on the fanout, the others elsewhere.
        assert_eq!(
            r.delete_exchange(DEFAULT_VHOST, exchange, true).is_ok(),
            exchange == "amq.fanout"
        );
    }
}

#[test]
fn mqtt_and_amqp_meet_on_amq_topic() {
    let r = Router::new();
    r.add_vhost(DEFAULT_VHOST);
    r.bind(
        DEFAULT_VHOST,
        Binding {
            source: "amq.topic".into(),
            destination: Destination::Topic(t("mqtt-session")),
            key: "sensors/+/temp".into(),
            headers: None,
            mqtt: true,
            arguments: Bytes::new(),
        },
    )
    .unwrap();
    bind(
        &r,
        "amq.topic",
        Destination::Topic(t("amqp-q")),
        "sensors.*.temp",
    );
    // An MQTT publish to sensors/k1/temp is the routing key sensors.k1.temp.
    let key = mqtt_to_amqp("sensors/k1/temp");
    assert_eq!(key, "sensors.k1.temp");
    assert_eq!(route(&r, "amq.topic", &key), vec!["amqp-q", "mqtt-session"]);
    assert_eq!(mqtt_to_amqp("a.b/c"), "a/b.c");
}

#[test]
fn headers_exchange() {
    let r = Router::new();
    r.add_vhost(DEFAULT_VHOST);
    let hb = |all, hs: Vec<(&str, HeaderValue)>, q: &str| Binding {
        source: "amq.headers".into(),
        destination: Destination::Topic(t(q)),
        key: String::new(),
        headers: Some(HeaderMatch {
            all,
            headers: hs.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }),
        mqtt: false,
        arguments: Bytes::from(q.to_string()),
    };
    r.bind(
        DEFAULT_VHOST,
        hb(
            true,
            vec![
                ("a", HeaderValue::Int(1)),
                ("b", HeaderValue::Str("x".into())),
            ],
            "all",
        ),
    )
    .unwrap();
    r.bind(
        DEFAULT_VHOST,
        hb(
            false,
            vec![("a", HeaderValue::Int(1)), ("c", HeaderValue::Void)],
            "any",
        ),
    )
    .unwrap();
    let h = |hs: Vec<(&str, HeaderValue)>| {
        hs.into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<Vec<_>>()
    };
    let got = |hs| {
        let mut v: Vec<String> = r
            .route(DEFAULT_VHOST, "amq.headers", "", &h(hs))
            .unwrap()
            .topics
            .iter()
            .map(|t| t.to_string())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        got(vec![
            ("a", HeaderValue::Int(1)),
            ("b", HeaderValue::Str("x".into()))
        ]),
        vec!["all", "any"]
    );
    assert_eq!(got(vec![("a", HeaderValue::Int(1))]), vec!["any"]);
    assert_eq!(got(vec![("c", HeaderValue::Bool(true))]), vec!["any"]);
    assert_eq!(
        got(vec![("a", HeaderValue::Str("1".into()))]),
        Vec::<String>::new(),
        "type matters"
    );
}

#[test]
fn exchange_to_exchange_alternate_and_cycles() {
    let r = Router::new();
    r.add_vhost(DEFAULT_VHOST);
    let mut ae = ExchangeDef::new("with-ae", ExchangeKind::Direct);
    ae.alternate = Some("amq.fanout".into());
    r.declare_exchange(DEFAULT_VHOST, ae).unwrap();
    bind(&r, "amq.fanout", Destination::Topic(t("unrouted")), "");
    bind(&r, "with-ae", Destination::Topic(t("routed")), "k");
    assert_eq!(route(&r, "with-ae", "k"), vec!["routed"]);
    assert_eq!(route(&r, "with-ae", "other"), vec!["unrouted"]);
    // e2e with a cycle: a -> b -> a
    r.declare_exchange(DEFAULT_VHOST, ExchangeDef::new("a", ExchangeKind::Fanout))
        .unwrap();
    r.declare_exchange(DEFAULT_VHOST, ExchangeDef::new("b", ExchangeKind::Fanout))
        .unwrap();
    bind(&r, "a", Destination::Exchange("b".into()), "");
    bind(&r, "b", Destination::Exchange("a".into()), "");
    bind(&r, "b", Destination::Topic(t("qb")), "");
    assert_eq!(route(&r, "a", "x"), vec!["qb"]);
    // Redeclare: equivalent is fine, different is a conflict.
    assert!(!r
        .declare_exchange(DEFAULT_VHOST, ExchangeDef::new("a", ExchangeKind::Fanout))
        .unwrap());
    assert!(matches!(
        r.declare_exchange(DEFAULT_VHOST, ExchangeDef::new("a", ExchangeKind::Topic)),
        Err(CoreError::Conflict(_))
    ));
    assert!(matches!(
        r.delete_exchange(DEFAULT_VHOST, "a", true),
        Err(CoreError::Conflict(_))
    ));
    assert!(r.delete_exchange(DEFAULT_VHOST, "a", false).unwrap());
    assert!(r
        .bindings(DEFAULT_VHOST, Some("b"))
        .iter()
        .all(|b| b.destination != Destination::Exchange("a".into())));
}

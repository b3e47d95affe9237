//! AMQP input an attacker controls: field tables nested thousands of levels deep (before
//! and after login), oversize frames before tune-ok, malformed PLAIN responses. Each
//! offender gets connection.close with a reply code; the broker and every other client go
//! on.
//!
//! Frames are written byte by byte here: the encoder real clients use recurses over
//! nested tables just like the parser the broker used to crash in.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::BasicProperties;
use mqgate_amqp::depth;
use mqgate_conformance::amqp::raw::{method, short, start_ok, Raw, EMPTY_TABLE};
use mqgate_conformance::amqp::{Backend, Target};

const WAIT: Duration = Duration::from_secs(5);

use mqgate_conformance::scenario;

scenario!(
    nested_client_properties_before_login,
    oversize_frame_before_tune,
    nested_amqplain_response,
    nested_arguments_and_headers_after_login,
    plain_with_a_fourth_field_is_refused,
);

/// The broker still serves: a fresh lapin client declares, publishes and gets.
async fn still_serves(t: &Target, what: &str) {
    let conn = t.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let q = mqgate_conformance::amqp::exclusive_queue(&ch).await;
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"alive",
        BasicProperties::default(),
    )
    .await
    .expect("publish");
    let got = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(m) = ch
                .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .expect("get")
            {
                return m.delivery.data.clone();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the broker stopped serving"));
    assert_eq!(got, b"alive", "{what}");
}

/// 1,500 levels of nested client properties aborted the process (depth 1,000 did not).
/// Within the 4,096-byte pre-login frame limit: 100 levels of tables, 600 of arrays.
async fn nested_client_properties_before_login(b: Backend) {
    let Some(t) = Target::mqgate_only(b).await else {
        return;
    };
    for (levels, arrays) in [(100, false), (600, true)] {
        let mut r = Raw::open(&t).await;
        let props = depth::nested(levels, arrays);
        assert!(props.len() < 4000, "fits the pre-login frame limit");
        r.send(1, 0, &start_ok(&props, "PLAIN", b"\0guest\0guest"))
            .await;
        assert_eq!(
            r.close_code().await,
            502,
            "{levels} levels (arrays: {arrays})"
        );
    }
    // A table as deep as real clients send is fine.
    let mut r = Raw::open(&t).await;
    r.send(
        1,
        0,
        &start_ok(&depth::nested(4, false), "PLAIN", b"\0guest\0guest"),
    )
    .await;
    let (_, _, tune) = r.frame().await.expect("tune");
    assert_eq!(&tune[..4], &[0, 10, 0, 30], "4 levels are accepted");
    still_serves(&t, "after nested client properties").await;
}

/// Before tune-ok a frame may be at most 4,096 bytes: 10 KB of client properties (which
/// at 1,500 levels used to crash the broker) are refused from the frame header.
async fn oversize_frame_before_tune(b: Backend) {
    let Some(t) = Target::mqgate_only(b).await else {
        return;
    };
    let mut r = Raw::open(&t).await;
    let props = depth::nested(1_500, false);
    assert!(props.len() > 4096);
    r.send(1, 0, &start_ok(&props, "PLAIN", b"\0guest\0guest"))
        .await;
    assert_eq!(r.close_code().await, 501, "frame over 4096 before tune");
    still_serves(&t, "after an oversize pre-login frame").await;
}

/// AMQPLAIN's response is a field table too, parsed before the login is checked.
async fn nested_amqplain_response(b: Backend) {
    let Some(t) = Target::mqgate_only(b).await else {
        return;
    };
    let mut r = Raw::open(&t).await;
    let table = depth::nested(400, true);
    // The response is the table's entries without its length.
    r.send(1, 0, &start_ok(&EMPTY_TABLE, "AMQPLAIN", &table[4..]))
        .await;
    assert_eq!(r.close_code().await, 502, "nested AMQPLAIN response");
    still_serves(&t, "after a nested AMQPLAIN response").await;
}

/// After login a frame may be up to frame_max: 3,000 levels of queue.declare arguments,
/// or of basic.publish headers, closed the whole process.
async fn nested_arguments_and_headers_after_login(b: Backend) {
    let Some(t) = Target::mqgate_only(b).await else {
        return;
    };
    // A bystander connected before and after: it must not notice.
    let bystander = t.connect().await;
    let bch = bystander.create_channel().await.expect("channel");
    let deep = depth::nested(3_000, false);
    assert!(deep.len() < 131_072 - 64);

    let mut r = Raw::login(&t).await;
    let mut a = 0u16.to_be_bytes().to_vec();
    short(&mut a, "deep-args");
    a.push(0);
    a.extend_from_slice(&deep);
    r.send(1, 1, &method(50, 10, &a)).await;
    assert_eq!(r.close_code().await, 502, "nested queue.declare arguments");

    let mut r = Raw::login(&t).await;
    let mut a = 0u16.to_be_bytes().to_vec();
    short(&mut a, "");
    short(&mut a, "nowhere");
    a.push(0);
    r.send(1, 1, &method(60, 40, &a)).await;
    let mut h = 60u16.to_be_bytes().to_vec();
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&0u64.to_be_bytes());
    h.extend_from_slice(&[0x20, 0]); // property flags: headers only
    h.extend_from_slice(&deep);
    r.send(2, 1, &h).await;
    assert_eq!(r.close_code().await, 502, "nested basic.publish headers");

    let mut r = Raw::login(&t).await;
    let mut a = 0u16.to_be_bytes().to_vec();
    short(&mut a, "q");
    short(&mut a, "ctag");
    a.push(0);
    a.extend_from_slice(&depth::nested(40, true));
    r.send(1, 1, &method(60, 20, &a)).await;
    assert_eq!(r.close_code().await, 502, "nested basic.consume arguments");

    // The bystander's channel still works.
    mqgate_conformance::amqp::exclusive_queue(&bch).await;
    still_serves(&t, "after nested arguments and headers").await;
}

/// RFC 4616: PLAIN is exactly authzid NUL user NUL password.
async fn plain_with_a_fourth_field_is_refused(b: Backend) {
    let Some(t) = Target::mqgate_only(b).await else {
        return;
    };
    let mut r = Raw::open(&t).await;
    r.send(
        1,
        0,
        &start_ok(&EMPTY_TABLE, "PLAIN", b"\0guest\0guest\0extra"),
    )
    .await;
    assert_eq!(r.close_code().await, 403, "PLAIN with a trailing field");
    still_serves(&t, "after a malformed PLAIN response").await;
}

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
use mqgate_conformance::amqp::{Backend, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);

use mqgate_conformance::scenario;

scenario!(
    nested_client_properties_before_login,
    oversize_frame_before_tune,
    nested_amqplain_response,
    nested_arguments_and_headers_after_login,
    plain_with_a_fourth_field_is_refused,
);

/// A raw AMQP connection: bytes out, frames (type, channel, payload) in.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

fn short(out: &mut Vec<u8>, v: &str) {
    out.push(v.len() as u8);
    out.extend_from_slice(v.as_bytes());
}

fn long(out: &mut Vec<u8>, v: &[u8]) {
    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
    out.extend_from_slice(v);
}

/// A method payload: class and method ids, then `args`.
fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    p
}

/// connection.start-ok with these client properties (a whole table), mechanism and
/// response.
fn start_ok(props: &[u8], mechanism: &str, response: &[u8]) -> Vec<u8> {
    let mut a = props.to_vec();
    short(&mut a, mechanism);
    long(&mut a, response);
    short(&mut a, "en_US");
    method(10, 11, &a)
}

const EMPTY_TABLE: [u8; 4] = [0, 0, 0, 0];

impl Raw {
    async fn open(t: &Target) -> Raw {
        let mut s = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .expect("tcp connect");
        s.write_all(b"AMQP\x00\x00\x09\x01").await.expect("header");
        let mut r = Raw { s, buf: Vec::new() };
        let (ty, _, p) = r.frame().await.expect("connection.start");
        assert_eq!((ty, &p[..4]), (1, &[0, 10, 0, 10][..]), "connection.start");
        r
    }

    async fn send(&mut self, ty: u8, ch: u16, payload: &[u8]) {
        let mut f = vec![ty];
        f.extend_from_slice(&ch.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        // The broker may close while a large frame is still being written.
        let _ = self.s.write_all(&f).await;
    }

    /// The next frame, or `None` when the socket closes first.
    async fn frame(&mut self) -> Option<(u8, u16, Vec<u8>)> {
        loop {
            if self.buf.len() >= 7 {
                let len = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() >= len + 8 {
                    let f: Vec<u8> = self.buf.drain(..len + 8).collect();
                    return Some((
                        f[0],
                        u16::from_be_bytes([f[1], f[2]]),
                        f[7..7 + len].to_vec(),
                    ));
                }
            }
            let mut b = [0u8; 8192];
            match tokio::time::timeout(WAIT, self.s.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&b[..n]),
                Ok(_) => return None,
                Err(_) => panic!("no frame from the broker within {WAIT:?}"),
            }
        }
    }

    /// Frames until connection.close; its reply code. Answers it with close-ok.
    async fn close_code(&mut self) -> u16 {
        while let Some((ty, _, p)) = self.frame().await {
            if ty == 1 && p[..4] == [0, 10, 0, 50] {
                self.send(1, 0, &method(10, 51, &[])).await;
                return u16::from_be_bytes([p[4], p[5]]);
            }
        }
        panic!("the socket closed without connection.close");
    }

    /// PLAIN guest/guest, tune-ok (frame_max 131072), open vhost `/`, channel 1.
    async fn login(t: &Target) -> Raw {
        let mut r = Raw::open(t).await;
        r.send(1, 0, &start_ok(&EMPTY_TABLE, "PLAIN", b"\0guest\0guest"))
            .await;
        let (_, _, tune) = r.frame().await.expect("connection.tune");
        assert_eq!(&tune[..4], &[0, 10, 0, 30], "connection.tune");
        let mut a = 16u16.to_be_bytes().to_vec();
        a.extend_from_slice(&131_072u32.to_be_bytes());
        a.extend_from_slice(&0u16.to_be_bytes());
        r.send(1, 0, &method(10, 31, &a)).await;
        let mut a = Vec::new();
        short(&mut a, "/");
        short(&mut a, "");
        a.push(0);
        r.send(1, 0, &method(10, 40, &a)).await;
        let (_, _, ok) = r.frame().await.expect("connection.open-ok");
        assert_eq!(&ok[..4], &[0, 10, 0, 41], "connection.open-ok");
        r.send(1, 1, &method(20, 10, &[0])).await;
        let (_, _, ok) = r.frame().await.expect("channel.open-ok");
        assert_eq!(&ok[..4], &[0, 20, 0, 11], "channel.open-ok");
        r
    }
}

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

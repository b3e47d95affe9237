//! The admin API under bad input and password guessing: bad requests get 400 / 404 with
//! the reason (never 500), and wrong credentials are answered later and later.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{http_get, Broker};

const GUEST: &str = "Z3Vlc3Q6Z3Vlc3Q="; // guest:guest
const WRONG: &str = "Z3Vlc3Q6bm9wZQ=="; // guest:nope

/// POST a JSON body: (status, body).
fn http_post(port: u16, path: &str, auth: &str, body: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Basic {auth}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

#[test]
fn bad_input_is_400_or_404_with_the_reason() {
    let b = Broker::start();
    let (status, body) = http_post(
        b.admin,
        "/api/topics",
        GUEST,
        r#"{"name":"huge","queues":100000000}"#,
    );
    assert_eq!(status, 400, "too many queues: {body}");
    assert!(body.contains("queues"), "the reason: {body}");
    let (status, body) = http_get(b.admin, "/api/topics/nosuch/queues/0/messages", Some(GUEST));
    assert_eq!(status, 404, "a range of an unknown topic: {body}");
    let (status, body) = http_post(b.admin, "/api/topics", GUEST, r#"{"name":"ok","queues":2}"#);
    assert_eq!(status, 200, "a sane request still works: {body}");
}

#[test]
fn wrong_passwords_are_answered_later_and_later() {
    let b = Broker::start();
    // No credentials at all (a browser's first request) is not a failure.
    let (status, _) = http_get(b.admin, "/api/overview", None);
    assert_eq!(status, 401);
    let mut took = Vec::new();
    for _ in 0..4 {
        let t = Instant::now();
        let (status, _) = http_get(b.admin, "/api/overview", Some(WRONG));
        assert_eq!(status, 401);
        took.push(t.elapsed());
    }
    // 200 ms, 400 ms, 800 ms, 1.6 s by default: each at least its delay.
    assert!(took[0] >= Duration::from_millis(200), "{took:?}");
    assert!(took[3] >= Duration::from_millis(1600), "{took:?}");
    // The right password from the same address is answered at once and resets it.
    let (status, _) = http_get(b.admin, "/api/overview", Some(GUEST));
    assert_eq!(status, 200);
    let t = Instant::now();
    let (status, _) = http_get(b.admin, "/api/overview", Some(WRONG));
    assert_eq!(status, 401);
    assert!(
        t.elapsed() < Duration::from_millis(1600),
        "reset after a success"
    );
}

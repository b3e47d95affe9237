//! The admin API under bad input and password guessing: bad requests get 400 / 404 with
//! the reason (never 500), and wrong credentials are answered later and later.

mod common;

use std::time::{Duration, Instant};

use common::{http, http_get, Broker};

const GUEST: &str = "Z3Vlc3Q6Z3Vlc3Q="; // guest:guest
const WRONG: &str = "Z3Vlc3Q6bm9wZQ=="; // guest:nope

/// POST a JSON body: (status, body).
fn http_post(port: u16, path: &str, auth: &str, body: &str) -> (u16, String) {
    http(port, "POST", path, Some(auth), Some(body))
}

#[test]
fn bad_input_is_400_or_404_with_the_reason() {
    let b = Broker::start();
    let (status, body) = http_post(
        b.admin,
        "/api/mqgate/topics",
        GUEST,
        r#"{"name":"huge","queues":100000000}"#,
    );
    assert_eq!(status, 400, "too many queues: {body}");
    assert!(body.contains("queues"), "the reason: {body}");
    let (status, body) = http_get(
        b.admin,
        "/api/mqgate/topics/nosuch/queues/0/messages",
        Some(GUEST),
    );
    assert_eq!(status, 404, "a range of an unknown topic: {body}");
    let (status, body) = http_post(
        b.admin,
        "/api/mqgate/topics",
        GUEST,
        r#"{"name":"ok","queues":2}"#,
    );
    assert_eq!(status, 200, "a sane request still works: {body}");
}

#[test]
fn wrong_passwords_are_answered_later_and_later() {
    let b = Broker::start();
    // No credentials at all (a browser's first request) is not a failure.
    let (status, _) = http_get(b.admin, "/api/mqgate/overview", None);
    assert_eq!(status, 401);
    let mut took = Vec::new();
    for _ in 0..4 {
        let t = Instant::now();
        let (status, _) = http_get(b.admin, "/api/mqgate/overview", Some(WRONG));
        assert_eq!(status, 401);
        took.push(t.elapsed());
    }
    // 200 ms, 400 ms, 800 ms, 1.6 s by default: each at least its delay.
    assert!(took[0] >= Duration::from_millis(200), "{took:?}");
    assert!(took[3] >= Duration::from_millis(1600), "{took:?}");
    // The right password from the same address is answered at once and resets it.
    let (status, _) = http_get(b.admin, "/api/mqgate/overview", Some(GUEST));
    assert_eq!(status, 200);
    let t = Instant::now();
    let (status, _) = http_get(b.admin, "/api/mqgate/overview", Some(WRONG));
    assert_eq!(status, 401);
    assert!(
        t.elapsed() < Duration::from_millis(1600),
        "reset after a success"
    );
}

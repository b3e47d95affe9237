//! AMQP scenarios a library client cannot express, written frame by frame: channel ids
//! and the channel limit, frames that follow the client's connection.close. Checked
//! against RabbitMQ 3.10 (`MQGATE_AMQP_URL`).

use std::time::Duration;

use mqgate_conformance::amqp::raw::{method, short, Raw};
use mqgate_conformance::amqp::{Backend, Target};
use mqgate_conformance::scenario;

scenario!(
    channel_ids_are_not_limited_by_channel_max,
    frames_after_connection_close_are_discarded,
);

/// channel.open on `ch`: the reply's class and method ids.
async fn open_channel(r: &mut Raw, ch: u16) -> (u16, [u8; 4], Vec<u8>) {
    r.send(1, ch, &method(20, 10, &[0])).await;
    let (_, got, p) = r.frame().await.expect("a reply to channel.open");
    (got, [p[0], p[1], p[2], p[3]], p)
}

/// RabbitMQ takes any channel id from 1 to 65535 and limits how many are open (the
/// negotiated channel_max): the next channel.open past it is connection.close 530.
async fn channel_ids_are_not_limited_by_channel_max(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let mut r = Raw::connect(&t, 3).await;
    for ch in [1000u16, 65535, 1] {
        let (got, ids, _) = open_channel(&mut r, ch).await;
        assert_eq!((got, ids), (ch, [0, 20, 0, 11]), "channel.open-ok on {ch}");
    }
    let (got, ids, p) = open_channel(&mut r, 2).await;
    assert_eq!(
        (got, ids),
        (0, [0, 10, 0, 50]),
        "connection.close past the limit"
    );
    let code = u16::from_be_bytes([p[4], p[5]]);
    assert_eq!(code, 530, "NOT_ALLOWED");
    let text = String::from_utf8_lossy(&p[7..7 + p[6] as usize]).into_owned();
    assert!(
        text.contains("channel_max") && text.contains('3'),
        "names the limit: {text}"
    );
}

/// The peer that sent connection.close closes the socket after close-ok: frames it sent
/// in between are discarded and its writes do not fail (Node's amqplib writes its
/// buffered channel frames after its connection.close).
async fn frames_after_connection_close_are_discarded(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let mut r = Raw::login(&t).await;
    let mut close = 200u16.to_be_bytes().to_vec();
    short(&mut close, "bye");
    close.extend_from_slice(&[0, 0, 0, 0]);
    r.send(1, 0, &method(10, 50, &close)).await;
    // A publish the client had buffered, sent after its close.
    let mut publish = vec![0, 0];
    short(&mut publish, "");
    short(&mut publish, "after.close");
    publish.push(0);
    r.send(1, 1, &method(60, 40, &publish)).await;
    let mut close_ok = false;
    while let Some((ty, ch, p)) = r.frame().await {
        if ty == 1 && ch == 0 && p[..4] == [0, 10, 0, 51] {
            close_ok = true;
            break;
        }
    }
    assert!(close_ok, "close-ok");
    for i in 0..3 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        r.try_send(1, 1, &method(60, 40, &publish))
            .await
            .unwrap_or_else(|e| panic!("write {i} after close-ok failed: {e}"));
    }
}

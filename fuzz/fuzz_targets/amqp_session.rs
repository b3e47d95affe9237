//! A whole AMQP connection: protocol header, a valid login (PLAIN guest/guest, tune-ok,
//! connection.open, channel 1 open), then fuzzed frames. The first input byte picks how
//! the rest is read: raw bytes, or frames the harness wraps (type, channel and payload
//! from the input; size and end octet added) so the fuzzer spends its time on methods,
//! not on framing. Nothing may panic, overflow a stack, or hang the broker.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqgate_amqp::{AmqpConfig, AmqpServer};

fn frame(out: &mut Vec<u8>, ty: u8, ch: u16, payload: &[u8]) {
    out.push(ty);
    out.extend_from_slice(&ch.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
}

fn method(out: &mut Vec<u8>, ch: u16, class: u16, id: u16, args: &[u8]) {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    frame(out, 1, ch, &p);
}

fn handshake() -> Vec<u8> {
    let mut h = b"AMQP\x00\x00\x09\x01".to_vec();
    // start-ok: empty client properties, PLAIN, \0guest\0guest, en_US
    let mut a = vec![0, 0, 0, 0, 5];
    a.extend_from_slice(b"PLAIN");
    a.extend_from_slice(&12u32.to_be_bytes());
    a.extend_from_slice(b"\0guest\0guest");
    a.push(5);
    a.extend_from_slice(b"en_US");
    method(&mut h, 0, 10, 11, &a);
    // tune-ok: channel_max 16, frame_max 131072, heartbeat 0
    method(&mut h, 0, 10, 31, &[0, 16, 0, 2, 0, 0, 0, 0]);
    // open "/"
    method(&mut h, 0, 10, 40, &[1, b'/', 0, 0]);
    method(&mut h, 1, 20, 10, &[0]);
    h
}

/// Frames from the input: [type % 4 → 1, 2, 3, 8][channel 0..3][len octet][payload].
fn framed(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while data.len() >= 3 {
        let ty = [1, 2, 3, 8][usize::from(data[0] % 4)];
        let ch = u16::from(data[1] % 4);
        let n = usize::from(data[2]).min(data.len() - 3);
        frame(&mut out, ty, ch, &data[3..3 + n]);
        data = &data[3 + n..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let bytes = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        framed(rest)
    };
    let chunks = mqgate_fuzz::chunks(&bytes);
    let chunks: Vec<&[u8]> = if mode & 2 == 0 {
        vec![&bytes[..]]
    } else {
        chunks
    };
    mqgate_fuzz::session(
        |stream| async move {
            let broker = mqgate_fuzz::broker().await;
            let server = AmqpServer::start(broker.clone(), AmqpConfig::default())
                .await
                .expect("amqp");
            server.serve_stream(stream, mqgate_fuzz::peer());
            let stop: mqgate_fuzz::Stop =
                Box::pin(async move { server.shutdown(std::time::Duration::ZERO).await });
            (broker, stop)
        },
        &handshake(),
        &chunks,
    );
});

//! Field tables nested to any depth, inside every frame that carries one: the fuzzer's
//! bytes become the innermost table's entries, wrapped in as many levels of tables and
//! arrays as the input says (up to 5,000: far past what overflowed the stack before
//! the depth check), placed in connection.start-ok, queue.declare, basic.consume or a
//! content header. Decoding must never crash, and must refuse exactly the frames nested
//! deeper than `MAX_NESTING`.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqgate_amqp_codec::depth::{self, MAX_NESTING};
use mqgate_amqp_codec::frame::{self, FrameError};

/// Wrap `inner` (a whole table) in `levels` more levels; `shape` picks table or array per
/// level. Every level's bytes come before the inner ones, so the sizes are worked out
/// inside out and the bytes written outside in, in linear time.
fn wrap(inner: Vec<u8>, levels: usize, shape: &[u8]) -> Vec<u8> {
    let array = |i: usize| shape.get(i % shape.len().max(1)).is_some_and(|b| b & 1 == 1);
    // sizes[i]: the size of the table at level i (0: the innermost).
    let mut sizes = vec![inner.len()];
    for i in 0..levels {
        let below = sizes[i];
        sizes.push(if array(i) { 12 + below } else { 7 + below });
    }
    let mut out = Vec::with_capacity(sizes[levels]);
    for i in (0..levels).rev() {
        let below = sizes[i];
        out.extend_from_slice(&((sizes[i + 1] - 4) as u32).to_be_bytes());
        if array(i) {
            // An entry holding an array that holds the inner table.
            out.extend_from_slice(&[1, b'a', b'A']);
            out.extend_from_slice(&((1 + below) as u32).to_be_bytes());
            out.push(b'F');
        } else {
            out.extend_from_slice(&[1, b't', b'F']);
        }
    }
    out.extend_from_slice(&inner);
    out
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let levels = usize::from(u16::from_be_bytes([data[0], data[1]])) % 5000;
    let place = data[2] % 4;
    let (shape, entries) = data[3..].split_at((data.len() - 3).min(8));
    let mut innermost = (entries.len() as u32).to_be_bytes().to_vec();
    innermost.extend_from_slice(entries);
    let table = wrap(innermost, levels, shape);
    let mut payload = Vec::new();
    let ty = if place == 3 { frame::FRAME_HEADER } else { frame::FRAME_METHOD };
    match place {
        0 => {
            payload.extend_from_slice(&[0, 10, 0, 11]);
            payload.extend_from_slice(&table);
            payload.extend_from_slice(b"\x05PLAIN\x00\x00\x00\x02\x00\x00\x05en_US");
        }
        1 => {
            payload.extend_from_slice(&[0, 50, 0, 10, 0, 0, 1, b'q', 0]);
            payload.extend_from_slice(&table);
        }
        2 => {
            payload.extend_from_slice(&[0, 60, 0, 20, 0, 0, 1, b'q', 1, b'c', 0]);
            payload.extend_from_slice(&table);
        }
        _ => {
            payload.extend_from_slice(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20, 0]);
            payload.extend_from_slice(&table);
        }
    }
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&[ty, 0, 1]);
    buf.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    buf.extend_from_slice(&payload);
    buf.extend_from_slice(&[frame::FRAME_END]);
    let too_deep = depth::table_ok(&table, MAX_NESTING).is_err();
    match frame::decode(&mut buf, 1 << 24) {
        Err(FrameError::TooDeep { .. }) => assert!(too_deep, "refused a table within the limit"),
        _ => assert!(!too_deep, "accepted a table nested deeper than {MAX_NESTING}"),
    }
});

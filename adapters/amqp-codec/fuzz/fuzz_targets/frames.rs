//! Arbitrary bytes through AMQP framing: decode must never panic, never take more than
//! it was given, and refuse frames over frame_max.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqgate_amqp_codec::frame;

fuzz_target!(|data: &[u8]| {
    let (max, rest) = match data.split_first() {
        Some((m, r)) => (4096 + (*m as u32) * 64, r),
        None => return,
    };
    let mut buf = BytesMut::from(rest);
    loop {
        let before = buf.len();
        match frame::decode(&mut buf, max) {
            Ok(Some(f)) => {
                assert!(buf.len() < before);
                if let frame::Frame::Body(_, b) = f {
                    assert!(b.len() + 8 <= max as usize);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
});

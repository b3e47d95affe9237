//! Feed arbitrary bytes to the MQTT framing and decoder, as a connection would: first
//! byte picks the version and the maximum packet size; then every packet decoded must
//! re-encode to something that decodes to the same packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqgate_mqtt_codec::{self as codec, Packet, Version};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let version = match mode % 4 {
        0 => None,
        1 => Some(Version::V311),
        2 => Some(Version::V5),
        _ => Some(Version::V31),
    };
    let max = if mode & 0x80 != 0 { 64 } else { codec::MAX_PACKET_SIZE };
    // Deliver the input in two reads, split where the mode says.
    let cut = usize::from(mode >> 2) % (rest.len() + 1);
    let mut buf = BytesMut::new();
    for chunk in [&rest[..cut], &rest[cut..]] {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match codec::decode(&mut buf, version, max) {
                Ok(Some(p)) => {
                    assert!(buf.len() < before);
                    let v = match (&p, version) {
                        (Packet::Connect(c), _) => c.version,
                        (_, Some(v)) => v,
                        (_, None) => unreachable!("only CONNECT decodes before the version is known"),
                    };
                    let mut again = BytesMut::new();
                    codec::encode(&p, v, &mut again);
                    let back = codec::decode(&mut again, Some(v), codec::MAX_PACKET_SIZE)
                        .expect("a decoded packet re-encodes validly")
                        .expect("whole");
                    assert_eq!(back, p);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

//! `mqgate_store::wire::decode` on arbitrary bytes: an error, never a panic; and what
//! decodes, encoded again, decodes to the same message.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = mqgate_store::wire::decode(Bytes::copy_from_slice(data)) {
        let again = mqgate_store::wire::decode(mqgate_store::wire::encode(&m)).expect("re-encoded");
        assert_eq!(again.id, m.id);
        assert_eq!(again.store_timestamp, m.store_timestamp);
        assert_eq!(again.message, m.message);
    }
});

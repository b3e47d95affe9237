//! Stored messages on the wire between gateways (the relays of issue 16: a message read
//! on a shard's owner and delivered by another gateway, or forwarded into another
//! shard). The same bytes as the commit-log record, behind a version byte and the id,
//! so nothing is re-encoded field by field and a body is one slice of the received
//! buffer after decoding.
//!
//! Layout: `1` (u8, this layout), id (u64 BE), record ([`crate::Store`]'s log record:
//! store timestamp, message fields, body).

use bytes::{BufMut, Bytes};

use crate::codec;
use crate::error::{Result, StoreError};
use crate::types::{Message, MessageId, Millis, StoredMessage};

const WIRE_VERSION: u8 = 1;
const PREFIX: usize = 9;

/// The encoded size of `m` stored under some id at some time.
pub fn encoded_len(m: &Message) -> usize {
    PREFIX + codec::encoded_len(m)
}

/// Append `m` (stored as `id` at `store_timestamp`) to `out`.
pub fn encode_into(id: MessageId, store_timestamp: Millis, m: &Message, out: &mut Vec<u8>) {
    out.reserve(encoded_len(m));
    out.put_u8(WIRE_VERSION);
    out.put_u64(id.0);
    codec::encode_message(m, store_timestamp, out);
}

/// `stored` encoded on its own.
pub fn encode(stored: &StoredMessage) -> Bytes {
    let mut out = Vec::with_capacity(encoded_len(&stored.message));
    encode_into(stored.id, stored.store_timestamp, &stored.message, &mut out);
    Bytes::from(out)
}

/// Decode what [`encode`] made; body and property values share `buf`. Anything else is
/// an error, never a panic. `size` is the record's size in the commit log, as the
/// store reports it.
pub fn decode(mut buf: Bytes) -> Result<StoredMessage> {
    if buf.len() < PREFIX {
        return Err(corrupt(format!("{} bytes", buf.len())));
    }
    if buf[0] != WIRE_VERSION {
        return Err(corrupt(format!("unknown layout {}", buf[0])));
    }
    let id = u64::from_be_bytes(buf[1..PREFIX].try_into().expect("8 bytes"));
    let record = buf.split_off(PREFIX);
    codec::decode_message(MessageId(id), record)
}

fn corrupt(detail: String) -> StoreError {
    StoreError::Corrupt {
        what: "wire message",
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::arb_message;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(m in arb_message(), ts in any::<u64>(), id in any::<u64>()) {
            let stored = StoredMessage {
                id: MessageId(id),
                store_timestamp: ts,
                size: codec::encoded_len(&m) as u32,
                message: m,
            };
            let bytes = encode(&stored);
            prop_assert_eq!(bytes.len(), encoded_len(&stored.message));
            prop_assert_eq!(decode(bytes).unwrap(), stored);
        }

        #[test]
        fn truncated_or_garbage_is_an_error_not_a_panic(
            m in arb_message(),
            cut in any::<prop::sample::Index>(),
            junk in proptest::collection::vec(any::<u8>(), 0..200),
        ) {
            let stored = StoredMessage { id: MessageId(1), store_timestamp: 2, size: 0, message: m };
            let bytes = encode(&stored);
            let cut = cut.index(bytes.len());
            prop_assert!(decode(bytes.slice(..cut)).is_err());
            let _ = decode(Bytes::from(junk));
        }
    }
}

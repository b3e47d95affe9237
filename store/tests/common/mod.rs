//! Helpers shared by the store's integration tests.

use bytes::Bytes;

/// Bytes that do not compress (RocksDB compresses table files), starting with `seed`,
/// different for every seed; at least 8 bytes.
pub(crate) fn body(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    v.extend_from_slice(&seed.to_le_bytes());
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len.max(8));
    Bytes::from(v)
}

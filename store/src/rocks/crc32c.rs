//! CRC-32C for RocksDB's WAL records, in hardware where the CPU has it, chosen at run time.
//!
//! RocksDB checksums every WAL record with CRC-32C (`rocksdb::crc32c::Extend`). Since
//! RocksDB 8 it picks the hardware instruction at *build* time only (`__SSE4_2__`), and
//! librocksdb-sys builds it with `-msse4.2` only when Rust's own target has SSE4.2, which
//! the default x86-64 target has not: the broker then spent 15-17 % of its CPU on 4 KiB
//! bodies in RocksDB's table-driven CRC. Building everything for a newer CPU would break
//! older ones, so the choice is made here, at run time:
//!
//! - the `mqgate` binary is linked with `--wrap` on RocksDB's `Extend` (see
//!   gateway/server/build.rs), so every call from RocksDB lands in
//!   [`__wrap__ZN7rocksdb6crc32c6ExtendEjPKcm`] below;
//! - that calls [`extend`], which uses SSE4.2's `crc32` instruction when the CPU reports
//!   it (`is_x86_feature_detected!`, cached by std after the first call) and a portable
//!   slicing-by-8 table otherwise.
//!
//! Both give the same CRC-32C (Castagnoli) as RocksDB's own code, so a store written
//! with one is read with the other (tests below check against RocksDB's function and the
//! RFC 3720 vectors). A binary built without the wrap (the tests, other platforms)
//! simply keeps RocksDB's own function; [`wrapped`] tells which one a process runs.

// One of the two modules of mqgate-store with `unsafe` (with `batch.rs`): a function
// RocksDB calls through a C pointer, and a CPU instruction behind a run-time feature
// check.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, Ordering};

/// The Castagnoli polynomial, reflected.
const POLY: u32 = 0x82f6_3b78;

/// Slicing-by-8 tables, built at compile time.
static TABLES: [[u32; 256]; 8] = tables();

const fn tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

/// Set once RocksDB has called through the wrap (see [`wrapped`]).
static WRAPPED: AtomicBool = AtomicBool::new(false);

/// Extend `crc` (a finished CRC-32C, 0 for none yet) over `data`, as RocksDB's
/// `crc32c::Extend` does.
pub fn extend(crc: u32, data: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if hardware() {
        // SAFETY: the CPU has SSE4.2, checked just above.
        return unsafe { extend_sse42(crc, data) };
    }
    extend_table(crc, data)
}

/// Whether this CPU computes CRC-32C in hardware.
pub fn hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("sse4.2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether RocksDB's checksums in this process have gone through [`extend`] (the binary
/// was linked with the wrap and RocksDB has written since it started).
pub fn wrapped() -> bool {
    WRAPPED.load(Ordering::Relaxed)
}

/// The portable path: slicing-by-8.
fn extend_table(crc: u32, data: &[u8]) -> u32 {
    let t = &TABLES;
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let lo = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) ^ c;
        let hi = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ t[0][((c ^ b as u32) & 0xff) as usize];
    }
    !c
}

/// Operators that append `n` zero bytes to a raw (not inverted) CRC-32C state, one
/// table per byte of the state: `shift(t, crc)` is the state after `n` zeros. They let
/// three streams be computed at once and joined (Mark Adler's method, as in
/// `crc32c_hw` of his crc32c.c and in RocksDB's `crc32c_3way`): the CRC of A ‖ B is
/// the state after A shifted over |B| zero bytes, xor the raw CRC of B alone.
#[cfg(target_arch = "x86_64")]
static SHIFT_SHORT: [[u32; 256]; 4] = zeros_tables(SHORT);
#[cfg(target_arch = "x86_64")]
static SHIFT_LONG: [[u32; 256]; 4] = zeros_tables(LONG);

/// Lengths of the three streams (powers of two: see [`zeros_op`]).
#[cfg(target_arch = "x86_64")]
const SHORT: usize = 256;
#[cfg(target_arch = "x86_64")]
const LONG: usize = 8192;

#[cfg(target_arch = "x86_64")]
/// A 32×32 matrix over GF(2) (column `i` is the image of bit `i`) times `vec`.
const fn gf2_times(mat: &[u32; 32], mut vec: u32) -> u32 {
    let mut sum = 0;
    let mut i = 0;
    while vec != 0 {
        if vec & 1 != 0 {
            sum ^= mat[i];
        }
        vec >>= 1;
        i += 1;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
const fn gf2_square(mat: &[u32; 32]) -> [u32; 32] {
    let mut sq = [0u32; 32];
    let mut n = 0;
    while n < 32 {
        sq[n] = gf2_times(mat, mat[n]);
        n += 1;
    }
    sq
}

#[cfg(target_arch = "x86_64")]
/// The operator that appends `len` zero bytes (`len` a power of two, at least 1).
const fn zeros_op(len: usize) -> [u32; 32] {
    // One zero bit.
    let mut one = [0u32; 32];
    one[0] = POLY;
    let mut row = 1u32;
    let mut n = 1;
    while n < 32 {
        one[n] = row;
        row <<= 1;
        n += 1;
    }
    // Squared three times: one zero byte; then once per doubling of the length.
    let mut op = gf2_square(&gf2_square(&gf2_square(&one)));
    let mut l = len;
    while l > 1 {
        op = gf2_square(&op);
        l >>= 1;
    }
    op
}

#[cfg(target_arch = "x86_64")]
const fn zeros_tables(len: usize) -> [[u32; 256]; 4] {
    let op = zeros_op(len);
    let mut t = [[0u32; 256]; 4];
    let mut n = 0;
    while n < 256 {
        let v = n as u32;
        t[0][n] = gf2_times(&op, v);
        t[1][n] = gf2_times(&op, v << 8);
        t[2][n] = gf2_times(&op, v << 16);
        t[3][n] = gf2_times(&op, v << 24);
        n += 1;
    }
    t
}

/// The raw state `crc` followed by the table's number of zero bytes.
#[cfg(target_arch = "x86_64")]
fn shift(t: &[[u32; 256]; 4], crc: u32) -> u32 {
    t[0][(crc & 0xff) as usize]
        ^ t[1][((crc >> 8) & 0xff) as usize]
        ^ t[2][((crc >> 16) & 0xff) as usize]
        ^ t[3][(crc >> 24) as usize]
}

/// The hardware path: SSE4.2's `crc32`, 8 bytes at a time, in three independent
/// streams over blocks of 3 × 8 KiB and then 3 × 256 bytes (the instruction takes
/// three cycles but starts one every cycle, so one stream leaves two thirds of it
/// idle), joined with [`shift`]; what is left, one stream. One stream already took
/// RocksDB's checksums from 17 % to 2.5-3 % of the broker's CPU on 4 KiB messages
/// (bench/RESULTS.md); three take a third of that.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse4.2")]
unsafe fn extend_sse42(crc: u32, data: &[u8]) -> u32 {
    use std::arch::x86_64::{_mm_crc32_u64, _mm_crc32_u8};
    /// The little-endian word at `p + at`.
    ///
    /// # Safety
    /// `p + at .. p + at + 8` is readable.
    #[inline(always)]
    unsafe fn word(p: *const u8, at: usize) -> u64 {
        // SAFETY: the caller's.
        u64::from_le(unsafe { p.add(at).cast::<u64>().read_unaligned() })
    }
    let mut c = u64::from(!crc);
    let mut rest = data;
    for (len, table) in [(LONG, &SHIFT_LONG), (SHORT, &SHIFT_SHORT)] {
        while rest.len() >= 3 * len {
            let (block, tail) = rest.split_at(3 * len);
            let (mut c1, mut c2) = (0u64, 0u64);
            let p = block.as_ptr();
            let mut at = 0;
            while at < len {
                // SAFETY: `at + 8 <= len` and `block` is `3 * len` bytes.
                unsafe {
                    c = _mm_crc32_u64(c, word(p, at));
                    c1 = _mm_crc32_u64(c1, word(p, len + at));
                    c2 = _mm_crc32_u64(c2, word(p, 2 * len + at));
                }
                at += 8;
            }
            let joined = shift(table, c as u32) ^ c1 as u32;
            c = u64::from(shift(table, joined) ^ c2 as u32);
            rest = tail;
        }
    }
    let mut chunks = rest.chunks_exact(8);
    for b in &mut chunks {
        c = _mm_crc32_u64(c, u64::from_le_bytes(b.try_into().expect("8 bytes")));
    }
    let mut c = c as u32;
    for &b in chunks.remainder() {
        c = _mm_crc32_u8(c, b);
    }
    !c
}

/// What RocksDB calls, by way of the linker's `--wrap=_ZN7rocksdb6crc32c6ExtendEjPKcm`
/// (`rocksdb::crc32c::Extend(uint32_t, const char*, size_t)`, a plain function with the
/// C calling convention).
///
/// # Safety
/// `data` points at `n` readable bytes (or `n` is 0), as in RocksDB's contract.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[no_mangle]
pub unsafe extern "C" fn __wrap__ZN7rocksdb6crc32c6ExtendEjPKcm(
    crc: u32,
    data: *const u8,
    n: usize,
) -> u32 {
    if !WRAPPED.load(Ordering::Relaxed) {
        WRAPPED.store(true, Ordering::Relaxed);
    }
    let data = if n == 0 {
        &[][..]
    } else {
        // SAFETY: RocksDB passes a buffer of `n` bytes.
        unsafe { std::slice::from_raw_parts(data, n) }
    };
    extend(crc, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    extern "C" {
        /// RocksDB's own function (the tests are not linked with the wrap).
        #[link_name = "_ZN7rocksdb6crc32c6ExtendEjPKcm"]
        fn rocksdb_extend(crc: u32, data: *const u8, n: usize) -> u32;
    }

    /// RFC 3720, B.4.
    #[test]
    fn known_vectors() {
        let zeros = [0u8; 32];
        let ones = [0xffu8; 32];
        let up: Vec<u8> = (0..32).collect();
        let down: Vec<u8> = (0..32).rev().collect();
        for f in [extend, extend_table] {
            assert_eq!(f(0, &zeros), 0x8a91_36aa);
            assert_eq!(f(0, &ones), 0x62a8_ab43);
            assert_eq!(f(0, &up), 0x46dd_794e);
            assert_eq!(f(0, &down), 0x113f_db5c);
            assert_eq!(f(0, b"123456789"), 0xe306_9283);
            assert_eq!(f(0, b""), 0);
        }
    }

    #[test]
    fn extending_in_pieces_is_one_pass() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let whole = extend(0, &data);
        for cut in [0, 1, 7, 8, 9, 4095, 4096, 9999, 10_000] {
            let (a, b) = data.split_at(cut);
            assert_eq!(extend(extend(0, a), b), whole, "cut at {cut}");
            assert_eq!(extend_table(extend_table(0, a), b), whole, "cut at {cut}");
        }
    }

    /// The three-stream path (blocks of 3 × 256 bytes and 3 × 8 KiB, joined by the
    /// shift tables) against the one-byte-at-a-time definition's table form, across
    /// every block boundary and over WAL records of up to 32 KiB and more.
    #[test]
    fn three_streams_join_right_at_every_block_boundary() {
        let data: Vec<u8> = (0..80_000u32)
            .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
            .collect();
        let mut lens: Vec<usize> = vec![0, 1, 8, 255, 256, 257];
        for k in 1..4 {
            for base in [3 * 256 * k, 3 * 8192 * k] {
                lens.extend([base - 9, base - 1, base, base + 1, base + 7, base + 8]);
            }
        }
        lens.extend([4096, 4096 + 40, 32_768, 65_536, 69_999]);
        for start in [0, 1, 3, 8] {
            for &len in &lens {
                let s = &data[start..start + len];
                for seed in [0u32, 0x1234_5678] {
                    assert_eq!(
                        extend(seed, s),
                        extend_table(seed, s),
                        "start {start} len {len}"
                    );
                }
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn hardware_and_table_agree(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..20_000),
            seed in proptest::num::u32::ANY,
            cut in 0usize..20_000,
        ) {
            let cut = cut.min(data.len());
            let (a, b) = data.split_at(cut);
            let whole = extend_table(seed, &data);
            proptest::prop_assert_eq!(extend(seed, &data), whole);
            proptest::prop_assert_eq!(extend(extend(seed, a), b), whole);
        }
    }

    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    #[test]
    fn same_as_rocksdb_for_every_length_and_alignment() {
        let data: Vec<u8> = (0..5000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for start in 0..9 {
            for len in (0..300).chain([767, 768, 769, 1000, 1536, 4096, 4097, 4990]) {
                let Some(s) = data.get(start..start + len) else {
                    continue;
                };
                for seed in [0u32, 0xdead_beef] {
                    // SAFETY: `s` is `len` readable bytes.
                    let theirs = unsafe { rocksdb_extend(seed, s.as_ptr(), s.len()) };
                    assert_eq!(extend(seed, s), theirs, "start {start} len {len}");
                    assert_eq!(extend_table(seed, s), theirs, "start {start} len {len}");
                    // SAFETY: as above.
                    let wrapped = unsafe {
                        __wrap__ZN7rocksdb6crc32c6ExtendEjPKcm(seed, s.as_ptr(), s.len())
                    };
                    assert_eq!(wrapped, theirs);
                }
            }
        }
    }
}

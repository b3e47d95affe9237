//! Links the `mqgate` binary so that RocksDB's CRC-32C goes through mqgate-store's
//! replacement, which picks the CPU's CRC instruction at run time (see
//! store/src/rocks/crc32c.rs for why RocksDB's own choice, made at build time, is not
//! enough). Only for x86-64 Linux with GNU ld-compatible linkers; elsewhere the binary
//! keeps RocksDB's function.
fn main() {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if arch == "x86_64" && os == "linux" {
        println!("cargo:rustc-link-arg-bins=-Wl,--wrap=_ZN7rocksdb6crc32c6ExtendEjPKcm");
    }
    println!("cargo:rerun-if-changed=build.rs");
}

//! glibc's allocator, which only RocksDB's C++ code uses here (Rust code uses mimalloc):
//! told to keep the memory RocksDB frees, so a new memtable reuses the last one's pages.
//!
//! A memtable's arena is allocated in 8 MiB blocks and freed at once after its flush.
//! glibc's default thresholds move with what was last freed: some blocks were mapped and
//! unmapped each time, others given back by trimming the heap, and every page of the
//! next memtable was faulted in again, zeroed by the kernel (from 0.2 to 0.8 page faults
//! per 4 KiB message from run to run, 3 % of the broker's CPU in a profile). With fixed
//! thresholds the blocks come from glibc's heaps and stay there: RocksDB's memory is
//! bounded by its caps anyway (memtables by the write-buffer manager, blocks by the
//! cache), so what is kept is at most what the last burst used.

// The one module of the binary with `unsafe`: the call into glibc below.
#![allow(unsafe_code)]

/// Fixed allocation thresholds for glibc's malloc (not under `--small`, whose point is
/// to give memory back).
pub(crate) fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets glibc's allocator parameters; it takes the allocator's
    // lock itself, and is called before RocksDB is opened.
    unsafe {
        // Blocks below 32 MiB (glibc's largest dynamic threshold) come from the heap,
        // not their own mapping, so freeing one never unmaps it.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        // Free memory at the top of a heap is kept up to 1 GiB instead of trimmed.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Turn transparent huge pages off for this process (and what it starts), unless
/// `runtime.transparent_huge_pages` keeps them: see that setting. Linux only; elsewhere,
/// or on a kernel without the call, a warning and nothing else.
pub(crate) fn transparent_huge_pages(keep: bool) {
    if keep {
        return;
    }
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        tracing::warn!(error = %e, "runtime: could not turn transparent huge pages off");
    }
}

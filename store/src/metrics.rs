//! The store's metric names (recorded through the `metrics` facade; the binary installs
//! the Prometheus exporter and describes them).

/// Seconds one group-commit write takes (the append, without the sync).
pub const APPEND_SECONDS: &str = "mqgate_store_append_seconds";
/// Seconds one WAL sync takes (per batch under every-batch, per period under periodic).
pub const FSYNC_SECONDS: &str = "mqgate_store_fsync_seconds";
/// 1 while writes fail (a full disk, no file handles), 0 once the store has recovered.
pub const DEGRADED: &str = "mqgate_store_degraded";
/// Writes and WAL syncs that failed.
pub const ERRORS_TOTAL: &str = "mqgate_store_errors_total";

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
/// Records the jetstream backend appended to the replicated log.
pub const REPLICATION_RECORDS: &str = "mqgate_replication_records_total";
/// 1 while the replicated log takes no writes (no quorum, no server): writers wait.
pub const REPLICATION_BLOCKED: &str = "mqgate_replication_blocked";
/// Times this node stopped being the log's writer (fenced, lease lost, view failed).
pub const REPLICATION_STEP_DOWNS: &str = "mqgate_replication_step_downs_total";

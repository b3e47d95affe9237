//! Store health: a failed write or WAL sync marks RocksStore degraded, and the recovery
//! thread (`mqgate-store-recovery`) brings it back with backoff once the cause is gone.

use super::*;
use rocksdb::WriteOptions;

/// Whether writes work. A failed RocksDB write or WAL sync (a full disk, no file handles)
/// marks the store degraded: the first failure of a period is logged once, writes are
/// refused without touching RocksDB, and the recovery thread ([`recovery_loop`]) retries
/// with backoff until a probe write works again.
#[derive(Debug, Default)]
pub(super) struct Health {
    /// Set while degraded: the writer's fast check.
    degraded: AtomicBool,
    /// Failed writes and syncs since open.
    errors: AtomicU64,
    state: Mutex<HealthState>,
    /// Wakes the recovery thread (a failure, or closing).
    pub(super) wake: Condvar,
}

#[derive(Debug, Default)]
struct HealthState {
    current: Option<Degraded>,
    last: Option<Degraded>,
}

impl Health {
    /// A write or sync failed with `e`.
    pub(super) fn failed(&self, what: &str, e: &StoreError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::ERRORS_TOTAL).increment(1);
        let mut st = self.state.lock();
        if st.current.is_some() {
            return;
        }
        let reason = match e {
            StoreError::Backend(m) => format!("{what} failed: {m}"),
            other => format!("{what} failed: {other}"),
        };
        tracing::warn!(
            %reason,
            "store: degraded: writes are refused (publishes nacked) until it recovers by \
             itself; retrying with backoff"
        );
        st.current = Some(Degraded {
            reason,
            since: now_millis(),
            until: None,
        });
        self.degraded.store(true, Ordering::Release);
        metrics::gauge!(crate::metrics::DEGRADED).set(1.0);
        self.wake.notify_all();
    }

    /// Writes work again.
    pub(super) fn recovered(&self, how: &str) {
        let mut st = self.state.lock();
        let Some(mut d) = st.current.take() else {
            return;
        };
        let now = now_millis();
        d.until = Some(now);
        tracing::info!(
            reason = %d.reason,
            degraded_ms = now.saturating_sub(d.since),
            how,
            "store: recovered: writes work again"
        );
        st.last = Some(d);
        self.degraded.store(false, Ordering::Release);
        metrics::gauge!(crate::metrics::DEGRADED).set(0.0);
    }

    /// `Err` (why) while degraded.
    pub(super) fn check(&self) -> Result<()> {
        if !self.degraded.load(Ordering::Acquire) {
            return Ok(());
        }
        match &self.state.lock().current {
            Some(d) => Err(StoreError::Backend(format!(
                "store degraded, writes refused until it recovers: {}",
                d.reason
            ))),
            None => Ok(()),
        }
    }

    pub(super) fn report(&self) -> StoreHealth {
        let st = self.state.lock();
        StoreHealth {
            degraded: st.current.clone(),
            last_degraded: st.last.clone(),
            errors: self.errors.load(Ordering::Relaxed),
        }
    }
}

/// The recovery thread. While the store is healthy it watches RocksDB's background
/// error count (a flush or compaction that failed, which no writer is told about) every
/// 250 ms; when one appears it probes with a write, and a write refused with it (or a
/// group commit stuck for 5 s behind it) marks the store degraded. While degraded it
/// tries to resume with backoff (100 ms, doubling to 5 s) until that works.
///
/// RocksDB keeps a background error after a failed write (every later write fails with
/// it) and the Rust binding has no `DB::Resume()`, so resuming means: check that the
/// cause is gone (a file can be written and synced in the data folder), try a probe
/// write on the open handle (the error may not have stuck, or RocksDB resumed by
/// itself), and otherwise reopen the handle once there is room for it. Reopening
/// replays the WAL, so everything RocksDB took before the error is there again; the
/// in-memory queue ends, counters and tail cache are kept (ids and offsets never go
/// back).
pub(super) fn recovery_loop(shared: &Shared) {
    const FIRST: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(5);
    const WATCH: Duration = Duration::from_millis(250);
    const STUCK_MS: u64 = 5_000;
    let mut bg_seen = shared.background_errors();
    let mut suspect = false;
    loop {
        // Healthy: watch.
        loop {
            {
                let mut st = shared.health.state.lock();
                if st.current.is_some() {
                    break;
                }
                if shared.stopping.load(Ordering::Acquire) {
                    return;
                }
                shared.health.wake.wait_for(&mut st, WATCH);
                if st.current.is_some() {
                    break;
                }
            }
            if shared.stopping.load(Ordering::Acquire) {
                return;
            }
            let bg = shared.background_errors();
            if bg > bg_seen {
                bg_seen = bg;
                suspect = true;
            }
            if !suspect {
                continue;
            }
            let Ok(db) = shared.db() else { continue };
            match probe_write(&db) {
                Ok(()) => suspect = false,
                // Stalled (RocksDB stops writes while it cannot flush or compact): only
                // a failure once a group commit has waited that long.
                Err(e) if e.kind() == rocksdb::ErrorKind::Incomplete => {
                    let since = shared.writing_since.load(Ordering::Acquire);
                    if since != 0 && now_millis().saturating_sub(since) > STUCK_MS {
                        let e = StoreError::Backend(format!(
                            "writes stalled behind a RocksDB background error: {}",
                            e.into_string()
                        ));
                        shared.health.failed("background flush or compaction", &e);
                    }
                }
                Err(e) => shared
                    .health
                    .failed("background flush or compaction", &backend(e)),
            }
        }
        // A view of an external log cannot reopen its handle (its WAL is off: the
        // memtables would be lost): it stops writing, and a restart replays the log.
        if let Some(log) = &shared.config.external_log {
            let reason = shared
                .health
                .report()
                .degraded
                .map_or_else(|| "unknown".to_string(), |d| d.reason);
            log.poison(&format!("the local view failed: {reason}"));
            return;
        }
        // Degraded: resume with backoff.
        let mut backoff = FIRST;
        let mut attempts = 0u32;
        loop {
            // Sleep in short steps, so closing the store is not held up.
            let until = std::time::Instant::now() + backoff;
            while std::time::Instant::now() < until {
                if shared.stopping.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20).min(backoff));
            }
            attempts += 1;
            match try_resume(shared) {
                Ok(how) => {
                    suspect = false;
                    bg_seen = shared.background_errors();
                    shared.health.recovered(how);
                    break;
                }
                Err(e) => {
                    // A line on the first attempt and each one at the longest backoff.
                    if backoff >= MAX || attempts <= 1 {
                        tracing::info!(error = %e, attempts, "store: still degraded");
                    } else {
                        tracing::debug!(error = %e, attempts, "store: still degraded");
                    }
                    backoff = (backoff * 2).min(MAX);
                }
            }
        }
    }
}

/// One attempt to make writes work again; `Ok(how)` when they do.
fn try_resume(s: &Shared) -> std::result::Result<&'static str, String> {
    probe_folder(&s.config.path)?;
    if let Ok(db) = s.db() {
        if probe_write(&db).is_ok() {
            return Ok("the open handle takes writes again");
        }
    }
    // A reopen replays the WAL and flushes what it held to table files: it needs about
    // that much room. Until there is, the old handle stays (reads keep working).
    room_to_reopen(&s.config.path)?;
    if let Ok(db) = s.db() {
        // Shutting the old handle down releases a group commit stuck in a write stall
        // (it fails; its writers are answered with the error), so it lets go of the
        // handle; the handle takes no more writes.
        db.cancel_all_background_work(true);
    }
    // Closing waits for readers; RocksDB's LOCK is released before the new open.
    let mut slot = s.db.write();
    *slot = None;
    let db = open_db(&s.config, &s.log_min).map_err(|e| format!("reopen: {e}"))?;
    let db = slot.insert(db);
    let cf = db
        .cf_handle(CF_META)
        .expect("column family created at open");
    let mut wb = rocksdb::WriteBatch::default();
    wb.put_cf(cf, PROBE_KEY, now_millis().to_be_bytes());
    db.write(wb)
        .and_then(|()| db.flush_wal(true))
        .map_err(|e| format!("probe write after reopen: {}", e.into_string()))?;
    Ok("reopened the RocksDB handle")
}

/// A key in `meta` that only recovery probes write (never the header: a probe must not
/// race the writer's counters).
const PROBE_KEY: &[u8] = b"probe";

/// A probe write (never waiting in a write stall: `Incomplete` then) and WAL sync on the
/// open handle.
fn probe_write(db: &Db<'_>) -> std::result::Result<(), rocksdb::Error> {
    let mut wb = rocksdb::WriteBatch::default();
    wb.put_cf(db.cf(CF_META), PROBE_KEY, now_millis().to_be_bytes());
    let mut wo = WriteOptions::default();
    wo.set_no_slowdown(true);
    db.write_opt(wb, &wo)?;
    db.flush_wal(true)
}

/// Whether the data folder has room for a reopen: the WAL's size, plus 4 MiB.
#[cfg(unix)]
fn room_to_reopen(path: &Path) -> std::result::Result<(), String> {
    let wal: u64 = std::fs::read_dir(path)
        .map_err(|e| format!("data folder {}: {e}", path.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let st = rustix::fs::statvfs(path).map_err(|e| format!("statvfs {}: {e}", path.display()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let need = wal + (4 << 20);
    if free < need {
        return Err(format!(
            "{free} bytes free in {}; reopening needs about {need} (the WAL, flushed at open)",
            path.display()
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn room_to_reopen(_path: &Path) -> std::result::Result<(), String> {
    Ok(())
}

/// Whether the data folder takes a file again: one is created, 1 MiB written and
/// synced, then removed (a full disk, no file handles: this fails).
fn probe_folder(path: &Path) -> std::result::Result<(), String> {
    use std::io::Write as _;
    let probe = path.join("mqgate-recovery-probe");
    let r = std::fs::File::create(&probe).and_then(|mut f| {
        f.write_all(&vec![0u8; 1 << 20])?;
        f.sync_all()
    });
    let _ = std::fs::remove_file(&probe);
    r.map_err(|e| format!("data folder {}: {e}", path.display()))
}

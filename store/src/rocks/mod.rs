//! [`RocksStore`]: the store on RocksDB, the default backend.
//!
//! # Layout (one column family per kind of data)
//! | CF        | key                                   | value                       |
//! |-----------|---------------------------------------|-----------------------------|
//! | `log`     | id (u64 BE)                           | commit-log record           |
//! | `cq`      | topic uid (u64 BE), queue (u32 BE), offset (u64 BE) | 28-byte entry |
//! | `keys`    | topic, 0, key, 0, id (u64 BE)         | empty                       |
//! | `offsets` | group, 0, topic, 0, queue (u32 BE)    | offset (u64 LE)             |
//! | `kv`      | namespace, 0, key                     | value                       |
//! | `timers`  | due (u64 BE), seq (u64 BE)            | payload                     |
//! | `meta`    | `hdr`; `t/`topic; `q/`uid queue       | header; uid+count; min      |
//!
//! Big-endian keys sort numerically, so a queue is one contiguous key range and the
//! commit log and timers are in id and time order.
//!
//! # Writes: one writer at a time, group commit
//! Every mutation goes through one channel to one writer thread, or, while that thread
//! is idle and nothing is queued, a small batch is written on its caller's thread under
//! the same lock (`Writer::write_inline`: no thread hand-off for a lone publish). The
//! writer thread drains what is
//! waiting (up to [`RocksConfig::max_batch_bytes`]), turns all of it into one RocksDB
//! `WriteBatch` together with the updated header (next id, log size, counts), writes
//! it, publishes the new queue ends to readers (readable before durable, see
//! [`Store::write_notify`]), and under [`FsyncPolicy::EveryBatch`] hands the writers'
//! answers to the sync thread, which fsyncs the WAL once for every group handed over
//! so far and only then answers them, while the writer goes on with the next group.
//! Whoever holds the writer's lock is the only writer: it assigns ids and offsets from
//! the writer's state, so offsets are dense and unique by construction.
//!
//! # Invariants
//! - The header in `meta` is written in the same RocksDB batch as the data it counts,
//!   so after a crash it matches the data exactly.
//! - A queue's `next` in memory never runs ahead of what RocksDB holds: it is published
//!   after the write returns (possibly before the WAL is synced; the writers are only
//!   answered after).
//! - A queue's entries point at increasing ids (each append takes a new id), so
//!   retention finds a queue's first live entry by binary search.
//! - Every queue-changing truncation also records the queue's min in `meta`, so an empty
//!   queue restarts at the right offset.

mod batch;
pub mod crc32c;
mod health;
mod keys;
mod read;
mod record;
mod recovery;
mod writer;

use health::{recovery_loop, Health};
use keys::{Header, CF_META};
use read::{TailCache, Tier};
use recovery::{open_db, recover};
use writer::{periodic_fsync, sync_loop, Request, Writer};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use parking_lot::{Condvar, MappedRwLockReadGuard, Mutex, RwLock, RwLockReadGuard};
use rocksdb::{ColumnFamily, DB};
use tokio::sync::{mpsc, oneshot};

use crate::error::{Result, StoreError};
use crate::store::{
    Degraded, FsyncPolicy, KvChange, Retention, RetentionReport, Store, StoreHealth, StoreStats,
    WriteBatch, WriteReceipt,
};
use crate::types::{
    now_millis, GroupName, MessageId, Millis, OffsetRange, QueueMessage, QueueOffset, QueueRef,
    ReadLimits, StoredMessage, TimerKey, TopicConfig, TopicName,
};

/// How a [`RocksStore`] is opened.
#[derive(Clone, Debug)]
pub struct RocksConfig {
    /// The data folder (created when missing).
    pub path: PathBuf,
    /// When writes are made durable.
    pub fsync: FsyncPolicy,
    /// What [`Store::enforce_retention`] deletes.
    pub retention: Retention,
    /// RocksDB's block cache (data, index and filter blocks), in bytes.
    pub block_cache_bytes: usize,
    /// The memtable budget for all column families together, in bytes.
    pub write_buffer_bytes: usize,
    /// Log records (message bodies with their headers) of at least this many bytes go to
    /// RocksDB's blob files when flushed, so that table files hold only their keys and
    /// compactions never copy the bodies again (0, the default: no blob files). It pays
    /// where a deep backlog is compacted; at the tail it costs (bench/RESULTS.md: RocksDB
    /// writes each blob on its own at flush, 4 KiB transient 16-20 -> 23-28 µs/msg).
    pub blob_min_bytes: u64,
    /// The largest group-commit batch, in bytes of records.
    pub max_batch_bytes: usize,
    /// Recently appended messages kept decoded for readers at the tail, in bytes.
    pub tail_cache_bytes: usize,
    /// Table files RocksDB keeps open at once (-1: all of them). The binary bounds it
    /// below the file handles it reserves for the store, so client sockets can never
    /// take the handle RocksDB needs for its next file.
    pub max_open_files: i32,
    /// A log outside RocksDB that holds every write before RocksDB does (the jetstream
    /// backend); RocksDB is then a local view with its own WAL off. `None`: RocksDB's
    /// WAL is the log, synced under `fsync`.
    pub external_log: Option<Arc<dyn ExternalLog>>,
    /// The first id a fresh store gives (messages and timers); a store whose ids are
    /// already past it goes on from where it is. Shards of one cluster start theirs at
    /// `shard << 44` so that an id names its shard and ids are unique across shards.
    pub id_base: u64,
    /// A block cache and memtable budget shared with the other stores of this process
    /// (one per shard): `block_cache_bytes` and `write_buffer_bytes` are then ignored.
    pub shared: Option<SharedResources>,
}

/// RocksDB's block cache and write-buffer manager, shared by several stores of one
/// process (a gateway owning several shards), so the memory they take together is
/// bounded by one budget rather than one per store.
#[derive(Clone)]
pub struct SharedResources {
    pub(crate) cache: rocksdb::Cache,
    pub(crate) write_buffers: rocksdb::WriteBufferManager,
    cache_bytes: usize,
    write_buffer_bytes: usize,
}

impl SharedResources {
    /// One block cache of `cache_bytes` and one memtable budget of `write_buffer_bytes`
    /// for every store opened with them.
    pub fn new(cache_bytes: usize, write_buffer_bytes: usize) -> Self {
        Self {
            cache: rocksdb::Cache::new_lru_cache(cache_bytes),
            // No stall, as for a store of its own (see `recovery::open_db_as`).
            write_buffers: rocksdb::WriteBufferManager::new_write_buffer_manager(
                write_buffer_bytes,
                false,
            ),
            cache_bytes,
            write_buffer_bytes,
        }
    }

    /// The block cache's capacity in bytes.
    pub fn cache_bytes(&self) -> usize {
        self.cache_bytes
    }

    /// The memtable budget in bytes.
    pub fn write_buffer_bytes(&self) -> usize {
        self.write_buffer_bytes
    }

    /// Bytes the shared memtables use now, all stores together.
    pub fn write_buffer_usage(&self) -> usize {
        self.write_buffers.get_usage()
    }
}

impl std::fmt::Debug for SharedResources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedResources")
            .field("cache_bytes", &self.cache_bytes)
            .field("write_buffer_bytes", &self.write_buffer_bytes)
            .finish()
    }
}

/// How [`ExternalLog::take_over`] applies a record: its sequence, the first message id
/// it appends (if any), its bytes.
pub type ApplyRecord<'a> = &'a mut dyn FnMut(u64, Option<u64>, &[u8]) -> Result<()>;

/// A write-ahead log outside RocksDB, replicated elsewhere (`crate::jetstream`).
///
/// A record is the bytes of one RocksDB write batch, as the writer built it; applying
/// the records in order to an empty database gives the same database. Each record is
/// appended, and durable on the log, before it is applied to the local view, and the
/// view stores the sequence of the last record it applied in the same RocksDB batch
/// (`meta/extlog`), so after a crash of the view (its WAL is off) the log says what
/// is missing.
pub trait ExternalLog: Send + Sync + std::fmt::Debug + 'static {
    /// At open, before anything is served: hand every record after `applied` to
    /// `apply` in order, then fence the log so that from now on only this process
    /// appends to it. Returns the sequence of the last record (the fence's).
    /// `apply` takes the record's sequence, the first message id it appends (if it
    /// appends any) and its bytes.
    fn take_over(&self, applied: u64, apply: ApplyRecord<'_>) -> Result<u64>;

    /// Append one record after every earlier one and return its sequence; `first_id`:
    /// the first message id the record appends, if any (readers get it back). Blocks
    /// until the log holds it durably (a quorum has it); while the log is unreachable
    /// it waits (writers see back-pressure). An error means this process may not append
    /// again (another one owns the log, or the store is closing).
    fn append(&self, record: &[u8], first_id: Option<u64>) -> Result<u64>;

    /// Drop the records below `seq`: everything they held that is still live has been
    /// copied forward into a later record (retention's checkpoint).
    fn purge_below(&self, seq: u64) -> Result<()>;

    /// The local view failed to apply a record the log holds: this process must stop
    /// writing (a restart replays the record from the log).
    fn poison(&self, reason: &str);

    /// The store is closing: a blocked `append` gives up.
    fn close(&self);
}

impl RocksConfig {
    /// Defaults for a data folder: fsync every batch, no retention, 128 MiB cache.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            fsync: FsyncPolicy::EveryBatch,
            retention: Retention::default(),
            block_cache_bytes: 128 << 20,
            write_buffer_bytes: 128 << 20,
            blob_min_bytes: 0,
            max_batch_bytes: 4 << 20,
            tail_cache_bytes: 32 << 20,
            max_open_files: -1,
            external_log: None,
            id_base: 0,
            shared: None,
        }
    }
}

/// The store on RocksDB. See the module documentation for the layout and the writer.
#[derive(Debug)]
pub struct RocksStore {
    /// What readers share with the writer thread.
    shared: Arc<Shared>,
    /// The writer thread's inbox; `None` once closing.
    tx: Option<mpsc::Sender<Request>>,
    /// The writer's state, locked by whichever thread writes: the writer thread, or a
    /// caller writing inline (`None` with an external log, whose appends are network
    /// round trips that no caller's thread should wait on).
    inline: Option<Arc<Mutex<Writer>>>,
    /// The writer and (under a periodic policy) the fsync thread, joined on drop.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    /// The database; `None` only while reopening it after an I/O error has failed
    /// (reads fail then too, until an attempt works).
    db: RwLock<Option<DB>>,
    config: RocksConfig,
    /// Topic name -> its uid and queues. Written only under the writer's lock.
    topics: RwLock<HashMap<TopicName, Arc<TopicState>>>,
    /// Counters, written only under the writer's lock.
    next_seq: AtomicU64,
    log_bytes: AtomicU64,
    messages: AtomicU64,
    timers: AtomicU64,
    /// The lowest id retention has not deleted: key-index entries below it are dropped
    /// by a compaction filter.
    log_min: Arc<AtomicU64>,
    /// Retention keeps ids from this one on ([`Store::set_retention_floor`]; `u64::MAX`:
    /// no floor).
    retention_floor: AtomicU64,
    /// Decoded recent messages, ids increasing.
    tail: RwLock<TailCache>,
    /// Tells the fsync and recovery threads to stop.
    stopping: AtomicBool,
    /// Whether writes work; the recovery thread waits on it.
    health: Health,
    /// When the writer's current RocksDB write began (ms; 0: none running), so a write
    /// stuck behind a background error is noticed.
    writing_since: AtomicU64,
    /// Group commits handed to the sync thread and not yet synced (every-batch policy):
    /// while none are, an idle writer syncs its own group instead of waking that thread.
    sync_pending: AtomicUsize,
    /// Requests sent to the writer thread and not yet carried out: while any are, a
    /// write is queued behind them rather than carried out on its caller's thread.
    queued: AtomicUsize,
    /// When the writer thread last wrote a group ([`Shared::clock_micros`]).
    thread_wrote_at: AtomicU64,
    /// The origin of [`Shared::clock_micros`].
    opened: std::time::Instant,
    /// With an external log: the last record written or replayed (0: none).
    log_position: AtomicU64,
    /// Consumer reads that had to read a file, run on the blocking pool.
    cold_reads: AtomicU64,
}

impl Shared {
    /// Microseconds since the store opened (monotonic).
    fn clock_micros(&self) -> u64 {
        self.opened.elapsed().as_micros() as u64
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("path", &self.config.path)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct TopicState {
    uid: u64,
    queues: Vec<Arc<QueueState>>,
}

#[derive(Debug, Default)]
struct QueueState {
    min: AtomicU64,
    next: AtomicU64,
    /// The entries a consumer at the tail has yet to read, while one is there
    /// (`read.rs`, [`read::Recent`]).
    recent: read::RecentSlot,
}

/// A read that has to go to the table files, on tokio's blocking pool: a slow disk then
/// holds a blocking thread, not an async worker every other connection needs. Inline
/// outside a runtime. Counted in `StoreStats::cold_reads`.
async fn off_worker<T: Send + 'static>(
    shared: &Shared,
    read: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    shared.cold_reads.fetch_add(1, Ordering::Relaxed);
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => rt
            .spawn_blocking(read)
            .await
            .map_err(|e| StoreError::Backend(format!("a read from disk did not finish: {e}")))?,
        Err(_) => read(),
    }
}

fn backend(e: rocksdb::Error) -> StoreError {
    StoreError::Backend(e.into_string())
}
/// The open database, read-locked: a reopen after an I/O error waits until it is
/// dropped (readers hold it for one call, never across an `.await`).
struct Db<'a>(MappedRwLockReadGuard<'a, DB>);

impl std::ops::Deref for Db<'_> {
    type Target = DB;

    fn deref(&self) -> &DB {
        &self.0
    }
}

impl Db<'_> {
    fn cf(&self, name: &str) -> &ColumnFamily {
        self.0
            .cf_handle(name)
            .expect("column family created at open")
    }

    /// The entries of column family `cf` under the NUL-terminated `prefix`, in key order.
    fn prefix_iter(&self, cf: &str, prefix: &[u8]) -> rocksdb::DBIteratorWithThreadMode<'_, DB> {
        self.iterator_cf_opt(
            self.cf(cf),
            keys::prefix_range(prefix),
            rocksdb::IteratorMode::Start,
        )
    }
}

impl Shared {
    /// RocksDB's count of failed flushes and compactions since the handle opened
    /// (monotonic across reopens is not needed: it is compared with the last value).
    fn background_errors(&self) -> u64 {
        self.db()
            .ok()
            .and_then(|db| db.property_int_value("rocksdb.background-errors").ok())
            .flatten()
            .unwrap_or(0)
    }

    /// The database, or an error while a reopen after an I/O error has not worked yet.
    fn db(&self) -> Result<Db<'_>> {
        // Recursive: a reader may hold it already, and must not wait behind a reopen.
        RwLockReadGuard::try_map(self.db.read_recursive(), Option::as_ref)
            .map(Db)
            .map_err(|_| StoreError::Backend("the store is reopening after an I/O error".into()))
    }

    fn header(&self) -> Header {
        Header {
            next_seq: self.next_seq.load(Ordering::Acquire),
            log_bytes: self.log_bytes.load(Ordering::Acquire),
            messages: self.messages.load(Ordering::Acquire),
            timers: self.timers.load(Ordering::Acquire),
        }
    }

    fn topic_state(&self, name: &TopicName) -> Option<Arc<TopicState>> {
        self.topics.read().get(name).cloned()
    }

    fn queue_state(&self, q: &QueueRef) -> Result<(u64, Arc<QueueState>)> {
        let topics = self.topics.read();
        let t = topics
            .get(&q.topic)
            .ok_or_else(|| StoreError::UnknownQueue(q.clone()))?;
        let qs = t
            .queues
            .get(q.queue.0 as usize)
            .ok_or_else(|| StoreError::UnknownQueue(q.clone()))?;
        Ok((t.uid, Arc::clone(qs)))
    }
}

impl RocksStore {
    /// Open (or create) the store in `config.path`. Recovers the queue ends and counters
    /// from what is on disk.
    pub fn open(config: RocksConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.path)
            .map_err(|e| StoreError::Backend(format!("create {}: {e}", config.path.display())))?;
        let log_min = Arc::new(AtomicU64::new(0));
        let db = open_db(&config, &log_min)?;

        let shared = Shared {
            db: RwLock::new(Some(db)),
            config: config.clone(),
            topics: RwLock::default(),
            next_seq: AtomicU64::new(0),
            log_bytes: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            timers: AtomicU64::new(0),
            log_min,
            retention_floor: AtomicU64::new(u64::MAX),
            tail: RwLock::default(),
            stopping: AtomicBool::new(false),
            health: Health::default(),
            writing_since: AtomicU64::new(0),
            sync_pending: AtomicUsize::new(0),
            queued: AtomicUsize::new(0),
            thread_wrote_at: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            log_position: AtomicU64::new(0),
            cold_reads: AtomicU64::new(0),
        };
        let log_seq = match &config.external_log {
            Some(log) => Some(replay_external_log(&shared, log.as_ref())?),
            None => None,
        };
        shared
            .log_position
            .store(log_seq.unwrap_or(0), Ordering::Release);
        recover(&shared)?;
        let shared = Arc::new(shared);
        metrics::gauge!(crate::metrics::DEGRADED).set(0.0);

        let (tx, rx) = mpsc::channel(1024);
        let mut threads = Vec::new();
        let writer_shared = Arc::clone(&shared);
        let mut syncer = None;
        let mut syncer_thread = None;
        // With an external log, the log's quorum is the durability: no WAL, no syncs.
        let local_wal = config.external_log.is_none();
        if local_wal && matches!(config.fsync, FsyncPolicy::EveryBatch) {
            let (stx, srx) = std::sync::mpsc::channel();
            let s = Arc::clone(&shared);
            syncer = Some(stx);
            syncer_thread = Some(
                std::thread::Builder::new()
                    .name("mqgate-store-sync".into())
                    .spawn(move || sync_loop(&s, srx))
                    .map_err(|e| StoreError::Backend(format!("spawn syncer: {e}")))?,
            );
        }
        let writer = Arc::new(Mutex::new(Writer::new(writer_shared, syncer, log_seq)));
        let inline = local_wal.then(|| Arc::clone(&writer));
        threads.push(
            std::thread::Builder::new()
                .name("mqgate-store-writer".into())
                .spawn(move || Writer::run(&writer, rx))
                .map_err(|e| StoreError::Backend(format!("spawn writer: {e}")))?,
        );
        // Joined after the writer, whose end closes its channel.
        threads.extend(syncer_thread);
        if let (true, FsyncPolicy::Periodic { interval }) = (local_wal, config.fsync) {
            let s = Arc::clone(&shared);
            threads.push(
                std::thread::Builder::new()
                    .name("mqgate-store-fsync".into())
                    .spawn(move || periodic_fsync(&s, interval))
                    .map_err(|e| StoreError::Backend(format!("spawn fsync: {e}")))?,
            );
        }
        let s = Arc::clone(&shared);
        threads.push(
            std::thread::Builder::new()
                .name("mqgate-store-recovery".into())
                .spawn(move || recovery_loop(&s))
                .map_err(|e| StoreError::Backend(format!("spawn recovery: {e}")))?,
        );
        Ok(Self {
            shared,
            tx: Some(tx),
            inline,
            threads: Mutex::new(threads),
        })
    }

    /// The data folder.
    pub fn path(&self) -> &Path {
        &self.shared.config.path
    }

    /// The keyed-area changes in `record`, the bytes of a RocksDB write batch made by a
    /// store of this layout (a record of the jetstream backend's log).
    pub fn kv_changes(&self, record: &[u8]) -> Result<Vec<KvChange>> {
        let db = self.shared.db()?;
        Ok(record::kv_changes(record, record::kv_cf_id(&db)))
    }
}
/// The sequence of the last external-log record applied to `db` (0: none). A folder
/// that holds a store not made from the log is refused: its column families may be
/// numbered differently from the writer's, and the records name them by number.
fn applied_seq(db: &DB) -> Result<u64> {
    let meta = db
        .cf_handle(CF_META)
        .expect("column family created at open");
    match db.get_cf(meta, keys::LOG_SEQ_KEY).map_err(backend)? {
        Some(v) => keys::be_u64(&v),
        None if db
            .get_cf(meta, keys::HEADER_KEY)
            .map_err(backend)?
            .is_some() =>
        {
            Err(StoreError::Invalid(
                "this folder holds a store that was not made from the replicated log; \
                 give the jetstream backend's view a folder of its own"
                    .into(),
            ))
        }
        None => Ok(0),
    }
}

/// Add to a record's batch what the view keeps about it: the sequence of the last
/// record applied and, for a record with appends, the index entry retention looks up.
fn mark_applied(wb: &mut batch::Batch, meta: &ColumnFamily, seq: u64, first_id: Option<u64>) {
    wb.put_cf(meta, keys::LOG_SEQ_KEY, seq.to_be_bytes());
    if let Some(id) = first_id {
        wb.put_cf(meta, keys::log_index_key(id), seq.to_be_bytes());
    }
}

/// Apply one external-log record to `db` (WAL off), with its sequence (and, for a
/// record with appends, the index entry retention looks up).
fn apply_record(db: &DB, seq: u64, first_id: Option<u64>, record: &[u8]) -> Result<()> {
    let meta = db
        .cf_handle(CF_META)
        .expect("column family created at open");
    let mut wb = batch::Batch::from_data(record);
    mark_applied(&mut wb, meta, seq, first_id);
    wb.write(db, true).map_err(StoreError::Backend)
}

/// Bring the view up to date with the external log and fence it (see
/// [`ExternalLog::take_over`]); returns the log's last sequence.
fn replay_external_log(shared: &Shared, log: &dyn ExternalLog) -> Result<u64> {
    let db = shared.db()?;
    let applied = applied_seq(&db)?;
    let mut records = 0u64;
    let last = log.take_over(applied, &mut |seq, first_id, record| {
        records += 1;
        apply_record(&db, seq, first_id, record)
    })?;
    tracing::info!(
        from = applied,
        to = last,
        records,
        "store: the view caught up with the replicated log"
    );
    Ok(last)
}

/// A RocksDB folder opened only to apply an external log's records: a standby's view,
/// tailing the log until this node may write it.
#[cfg_attr(not(feature = "jetstream"), allow(dead_code))]
pub(crate) struct View {
    db: DB,
    /// The keyed area's column-family number in records.
    kv_cf: u32,
}

#[cfg_attr(not(feature = "jetstream"), allow(dead_code))]
impl View {
    pub(crate) fn open(config: &RocksConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.path)
            .map_err(|e| StoreError::Backend(format!("create {}: {e}", config.path.display())))?;
        let db = recovery::open_db_as(config, &Arc::new(AtomicU64::new(0)), true)?;
        applied_seq(&db)?;
        let kv_cf = record::kv_cf_id(&db);
        Ok(Self { db, kv_cf })
    }

    /// The keyed-area changes a record of the log carries.
    pub(crate) fn kv_changes(&self, record: &[u8]) -> Vec<KvChange> {
        record::kv_changes(record, self.kv_cf)
    }

    pub(crate) fn applied(&self) -> Result<u64> {
        applied_seq(&self.db)
    }

    pub(crate) fn apply(&self, seq: u64, first_id: Option<u64>, record: &[u8]) -> Result<()> {
        apply_record(&self.db, seq, first_id, record)
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // Its WAL is off: what is not flushed would be read from the log again.
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "store: flushing the standby view failed");
        }
    }
}

impl RocksStore {
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queue a request for the writer thread, counted until it is carried out.
    async fn send(&self, req: Request) -> Result<()> {
        let tx = self.tx.as_ref().ok_or(StoreError::Closed)?;
        self.shared.queued.fetch_add(1, Ordering::AcqRel);
        tx.send(req).await.map_err(|_| {
            self.shared.queued.fetch_sub(1, Ordering::AcqRel);
            StoreError::Closed
        })
    }

    /// A write: on this thread when the writer is idle, else queued for it. The receiver
    /// answers once the batch is durable.
    async fn submit(
        &self,
        batch: WriteBatch,
        visible: Option<crate::OnVisible>,
    ) -> Result<oneshot::Receiver<Result<WriteReceipt>>> {
        let (batch, visible) = match &self.inline {
            Some(w) => match Writer::write_inline(w, &self.shared, batch, visible) {
                Ok(rx) => return Ok(rx),
                Err(back) => back,
            },
            None => (batch, visible),
        };
        let (tx, rx) = oneshot::channel();
        self.send(Request::Write(batch, tx, visible)).await?;
        Ok(rx)
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        self.tx.take();
        // The writer holds the sync thread's sender: the last reference goes with the
        // writer thread, which then ends the sync thread.
        self.inline.take();
        if let Some(log) = &self.shared.config.external_log {
            log.close();
        }
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.health.wake.notify_all();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        match self.shared.db() {
            // The view's WAL is off: flush its memtables, so the next open replays
            // little from the log.
            Ok(db) if self.shared.config.external_log.is_some() => {
                if let Err(e) = db.flush() {
                    tracing::warn!(error = %e, "store: final flush of the view failed");
                }
            }
            Ok(db) => {
                if let Err(e) = db.flush_wal(true) {
                    tracing::warn!(error = %e, "store: final WAL sync failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "store: closed without a final WAL sync"),
        }
    }
}

#[async_trait]
impl Store for RocksStore {
    fn answers_wait(&self) -> bool {
        let c = &self.shared.config;
        c.external_log.is_some() || matches!(c.fsync, FsyncPolicy::EveryBatch)
    }

    async fn create_topic(&self, name: &TopicName, queue_count: u32) -> Result<TopicConfig> {
        let name = name.clone();
        self.request(|tx| Request::CreateTopic(name, queue_count, tx))
            .await
    }

    async fn delete_topic(&self, name: &TopicName) -> Result<bool> {
        let name = name.clone();
        self.request(|tx| Request::DeleteTopic(name, tx)).await
    }

    fn topic(&self, name: &TopicName) -> Option<TopicConfig> {
        self.shared.topic_state(name).map(|t| TopicConfig {
            name: name.clone(),
            queue_count: t.queues.len() as u32,
        })
    }

    fn topics(&self) -> Vec<TopicConfig> {
        let mut v: Vec<TopicConfig> = self
            .shared
            .topics
            .read()
            .iter()
            .map(|(n, t)| TopicConfig {
                name: n.clone(),
                queue_count: t.queues.len() as u32,
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    async fn write(&self, batch: WriteBatch) -> Result<WriteReceipt> {
        if batch.is_empty() {
            return Ok(WriteReceipt::default());
        }
        let rx = self.submit(batch, None).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn write_notify(
        &self,
        batch: WriteBatch,
        visible: oneshot::Sender<()>,
    ) -> Result<WriteReceipt> {
        if batch.is_empty() {
            let _ = visible.send(());
            return Ok(WriteReceipt::default());
        }
        let visible: crate::OnVisible = Box::new(move || {
            let _ = visible.send(());
        });
        let rx = self.submit(batch, Some(visible)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn write_queued(
        &self,
        batch: WriteBatch,
        visible: crate::OnVisible,
    ) -> Result<crate::QueuedWrite> {
        if batch.is_empty() {
            visible();
            return Ok(Box::pin(std::future::ready(Ok(WriteReceipt::default()))));
        }
        let rx = self.submit(batch, Some(visible)).await?;
        Ok(Box::pin(async move {
            rx.await.map_err(|_| StoreError::Closed)?
        }))
    }

    fn queue_range(&self, queue: &QueueRef) -> Result<OffsetRange> {
        self.read_queue_range(queue)
    }

    async fn read(
        &self,
        queue: &QueueRef,
        from: QueueOffset,
        limits: ReadLimits,
    ) -> Result<Vec<QueueMessage>> {
        let shared = Arc::clone(&self.shared);
        let Some(entries) = shared.queue_entries(queue, from, limits, Tier::Cached)? else {
            let queue = queue.clone();
            return off_worker(&self.shared, move || {
                shared.read_queue(&queue, from, limits)
            })
            .await;
        };
        let ids: Vec<u64> = entries.iter().map(|e| e.id.0).collect();
        if let Some(messages) = shared.messages_in(&ids, Tier::Cached)? {
            return Ok(read::joined(entries, messages));
        }
        // The entries were in memory, some records are not: only those are read again.
        off_worker(&self.shared, move || {
            Ok(read::joined(entries, shared.messages(&ids)?))
        })
        .await
    }

    async fn offset_for_timestamp(
        &self,
        queue: &QueueRef,
        timestamp: Millis,
    ) -> Result<QueueOffset> {
        self.read_offset_for_timestamp(queue, timestamp)
    }

    async fn message(&self, id: MessageId) -> Result<Option<Arc<StoredMessage>>> {
        if let Some(mut got) = self.shared.messages_in(&[id.0], Tier::Cached)? {
            return Ok(got.pop().flatten());
        }
        let shared = Arc::clone(&self.shared);
        off_worker(&self.shared, move || {
            Ok(shared.messages(&[id.0])?.pop().flatten())
        })
        .await
    }

    async fn messages_by_key(
        &self,
        topic: &TopicName,
        key: &str,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>> {
        self.read_messages_by_key(topic, key, limit)
    }

    async fn committed_offset(
        &self,
        group: &GroupName,
        queue: &QueueRef,
    ) -> Result<Option<QueueOffset>> {
        self.read_committed_offset(group, queue)
    }

    async fn committed_offsets(&self, group: &GroupName) -> Result<Vec<(QueueRef, QueueOffset)>> {
        self.read_committed_offsets(group)
    }

    async fn groups(&self) -> Result<Vec<GroupName>> {
        self.read_groups()
    }

    async fn groups_on_topic(&self, topic: &TopicName) -> Result<Vec<GroupName>> {
        self.read_groups_on_topic(topic)
    }

    async fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        self.read_kv(namespace, key)
    }

    async fn kv_scan(
        &self,
        namespace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        self.read_kv_scan(namespace, prefix, after, limit)
    }

    async fn timers_due(
        &self,
        until: Millis,
        after: Option<TimerKey>,
        limit: usize,
    ) -> Result<Vec<(TimerKey, Bytes)>> {
        self.read_timers_due(until, after, limit)
    }

    async fn next_timer(&self) -> Result<Option<TimerKey>> {
        self.read_next_timer()
    }

    async fn enforce_retention(&self, now: Millis) -> Result<RetentionReport> {
        match self.retention_cutoff(now)? {
            None => Ok(RetentionReport::default()),
            Some(below) => self.request(|tx| Request::TrimLog(below, tx)).await,
        }
    }

    fn set_retention_floor(&self, floor: Option<MessageId>) {
        self.shared
            .retention_floor
            .store(floor.map_or(u64::MAX, |f| f.0), Ordering::Release);
    }

    fn health(&self) -> StoreHealth {
        self.shared.health.report()
    }

    fn log_position(&self) -> Option<u64> {
        self.shared
            .config
            .external_log
            .is_some()
            .then(|| self.shared.log_position.load(Ordering::Acquire))
    }

    fn stats(&self) -> StoreStats {
        let h = self.shared.header();
        StoreStats {
            messages: h.messages,
            log_bytes: h.log_bytes,
            timers: h.timers,
            topics: self.shared.topics.read().len() as u64,
            cold_reads: self.shared.cold_reads.load(Ordering::Relaxed),
        }
    }

    async fn flush(&self) -> Result<()> {
        let db = self.shared.db()?;
        db.flush_wal(true).map_err(|e| {
            let e = backend(e);
            self.shared.health.failed("WAL sync", &e);
            e
        })
    }
}

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
//! # Writes: one writer thread, group commit
//! Every mutation goes through one channel to one writer thread. It drains what is
//! waiting (up to [`RocksConfig::max_batch_bytes`]), turns all of it into one RocksDB
//! `WriteBatch` together with the updated header (next id, log size, counts), writes
//! it, publishes the new queue ends to readers (readable before durable, see
//! [`Store::write_notify`]), and under [`FsyncPolicy::EveryBatch`] hands the writers'
//! answers to the sync thread, which fsyncs the WAL once for every group handed over
//! so far and only then answers them, while the writer goes on with the next group.
//! Being the only writer, it assigns ids and offsets without locks: offsets are dense
//! and unique by construction.
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

mod health;

use health::{recovery_loop, Health};

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::{BufMut, Bytes};
use parking_lot::{Condvar, MappedRwLockReadGuard, Mutex, RwLock, RwLockReadGuard};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DBCompressionType, Direction,
    IteratorMode, Options, ReadOptions, WriteBufferManager, WriteOptions, DB,
};
use tokio::sync::{mpsc, oneshot};

use crate::codec;
use crate::error::{Result, StoreError};
use crate::store::{
    Appended, Degraded, FsyncPolicy, Retention, RetentionReport, Store, StoreHealth, StoreStats,
    WriteBatch, WriteOp, WriteReceipt,
};
use crate::types::{
    now_millis, tag_hash, GroupName, MessageId, Millis, OffsetRange, QueueEntry, QueueId,
    QueueMessage, QueueOffset, QueueRef, ReadLimits, StoredMessage, TimerKey, TopicConfig,
    TopicName,
};

const CF_LOG: &str = "log";
const CF_CQ: &str = "cq";
const CF_KEYS: &str = "keys";
const CF_OFFSETS: &str = "offsets";
/// (topic, 0, group) for every group with an offset on a topic: deleting a topic finds
/// its offsets without scanning every group's.
const CF_OFFSET_TOPICS: &str = "offset_topics";
const CF_KV: &str = "kv";
const CF_TIMERS: &str = "timers";
const CF_META: &str = "meta";
const HEADER_KEY: &[u8] = b"hdr";

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
    /// The largest group-commit batch, in bytes of records.
    pub max_batch_bytes: usize,
    /// Recently appended messages kept decoded for readers at the tail, in bytes.
    pub tail_cache_bytes: usize,
    /// Table files RocksDB keeps open at once (-1: all of them). The binary bounds it
    /// below the file handles it reserves for the store, so client sockets can never
    /// take the handle RocksDB needs for its next file.
    pub max_open_files: i32,
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
            max_batch_bytes: 4 << 20,
            tail_cache_bytes: 32 << 20,
            max_open_files: -1,
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
    /// The writer and (under a periodic policy) the fsync thread, joined on drop.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    /// The database; `None` only while reopening it after an I/O error has failed
    /// (reads fail then too, until an attempt works).
    db: RwLock<Option<DB>>,
    config: RocksConfig,
    /// Topic name -> its uid and queues. Written only by the writer thread.
    topics: RwLock<HashMap<TopicName, Arc<TopicState>>>,
    /// Counters, written only by the writer thread.
    next_seq: AtomicU64,
    log_bytes: AtomicU64,
    messages: AtomicU64,
    timers: AtomicU64,
    /// The lowest id retention has not deleted: key-index entries below it are dropped
    /// by a compaction filter.
    log_min: Arc<AtomicU64>,
    /// Decoded recent messages, ids increasing.
    tail: RwLock<TailCache>,
    /// Tells the fsync and recovery threads to stop.
    stopping: AtomicBool,
    /// Whether writes work; the recovery thread waits on it.
    health: Health,
    /// When the writer's current RocksDB write began (ms; 0: none running), so a write
    /// stuck behind a background error is noticed.
    writing_since: AtomicU64,
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
}

#[derive(Debug, Default)]
struct TailCache {
    messages: VecDeque<Arc<StoredMessage>>,
    bytes: usize,
}

impl TailCache {
    fn get(&self, id: u64) -> Option<Arc<StoredMessage>> {
        let i = self.messages.partition_point(|m| m.id.0 < id);
        self.messages.get(i).filter(|m| m.id.0 == id).cloned()
    }
}

/// A writer to answer, with what to answer once its write is durable.
type Answer = (oneshot::Sender<Result<WriteReceipt>>, Result<WriteReceipt>);

type Grouped = (
    WriteBatch,
    oneshot::Sender<Result<WriteReceipt>>,
    Option<oneshot::Sender<()>>,
);

enum Request {
    /// A batch, who waits for it to be durable, and who to tell once it is readable.
    Write(
        WriteBatch,
        oneshot::Sender<Result<WriteReceipt>>,
        Option<oneshot::Sender<()>>,
    ),
    CreateTopic(TopicName, u32, oneshot::Sender<Result<TopicConfig>>),
    DeleteTopic(TopicName, oneshot::Sender<Result<bool>>),
    /// Delete the commit log below this id (and what pointed into it).
    TrimLog(u64, oneshot::Sender<Result<RetentionReport>>),
}

fn backend(e: rocksdb::Error) -> StoreError {
    StoreError::Backend(e.into_string())
}

/// The same backend error again, for one more waiting writer.
fn again(e: &StoreError) -> StoreError {
    match e {
        StoreError::Backend(m) => StoreError::Backend(m.clone()),
        other => StoreError::Backend(other.to_string()),
    }
}

fn cq_key(uid: u64, queue: u32, offset: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..8].copy_from_slice(&uid.to_be_bytes());
    k[8..12].copy_from_slice(&queue.to_be_bytes());
    k[12..].copy_from_slice(&offset.to_be_bytes());
    k
}

fn key_index_prefix(topic: &TopicName, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.as_str().len() + key.len() + 10);
    k.extend_from_slice(topic.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k
}

fn offsets_key(group: &GroupName, queue: &QueueRef) -> Vec<u8> {
    let mut k = offsets_prefix(group, Some(&queue.topic));
    k.put_u32(queue.queue.0);
    k
}

fn offset_topic_key(topic: &str, group: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + group.len() + 1);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(group);
    k
}

/// The topic of an offsets key (group, 0, topic, 0, queue as 4 bytes).
fn offsets_key_topic(k: &[u8]) -> Option<&[u8]> {
    let sep = k.iter().position(|b| *b == 0)?;
    (k.len() >= sep + 6).then(|| &k[sep + 1..k.len() - 5])
}

fn offsets_prefix(group: &GroupName, topic: Option<&TopicName>) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    k.extend_from_slice(group.as_str().as_bytes());
    k.push(0);
    if let Some(t) = topic {
        k.extend_from_slice(t.as_str().as_bytes());
        k.push(0);
    }
    k
}

fn kv_key(namespace: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(namespace.len() + 1 + key.len());
    k.extend_from_slice(namespace.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

fn timer_key(k: &TimerKey) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&k.due.to_be_bytes());
    out[8..].copy_from_slice(&k.seq.to_be_bytes());
    out
}

fn decode_timer_key(k: &[u8]) -> Result<TimerKey> {
    if k.len() != 16 {
        return Err(StoreError::Corrupt {
            what: "timer key",
            detail: format!("{} bytes", k.len()),
        });
    }
    Ok(TimerKey {
        due: u64::from_be_bytes(k[..8].try_into().expect("8 bytes")),
        seq: u64::from_be_bytes(k[8..].try_into().expect("8 bytes")),
    })
}

fn topic_meta_key(name: &TopicName) -> Vec<u8> {
    let mut k = b"t/".to_vec();
    k.extend_from_slice(name.as_str().as_bytes());
    k
}

fn queue_meta_key(uid: u64, queue: u32) -> Vec<u8> {
    let mut k = b"q/".to_vec();
    k.put_u64(uid);
    k.put_u32(queue);
    k
}

fn be_u64(v: &[u8]) -> Result<u64> {
    v.get(..8)
        .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| StoreError::Corrupt {
            what: "meta",
            detail: format!("{} bytes where 8 were expected", v.len()),
        })
}

/// The counters persisted with every batch.
#[derive(Clone, Copy, Debug, Default)]
struct Header {
    next_seq: u64,
    log_bytes: u64,
    messages: u64,
    timers: u64,
}

impl Header {
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out[..8].copy_from_slice(&self.next_seq.to_be_bytes());
        out[8..16].copy_from_slice(&self.log_bytes.to_be_bytes());
        out[16..24].copy_from_slice(&self.messages.to_be_bytes());
        out[24..].copy_from_slice(&self.timers.to_be_bytes());
        out
    }

    fn decode(v: &[u8]) -> Result<Self> {
        if v.len() != 32 {
            return Err(StoreError::Corrupt {
                what: "header",
                detail: format!("{} bytes", v.len()),
            });
        }
        Ok(Self {
            next_seq: be_u64(&v[..8])?,
            log_bytes: be_u64(&v[8..16])?,
            messages: be_u64(&v[16..24])?,
            timers: be_u64(&v[24..])?,
        })
    }
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

    fn entry_at(&self, uid: u64, queue: u32, offset: u64) -> Result<Option<QueueEntry>> {
        let db = self.db()?;
        let entry = db
            .get_pinned_cf(db.cf(CF_CQ), cq_key(uid, queue, offset))
            .map_err(backend)?
            .map(|v| codec::decode_entry(QueueOffset(offset), &v))
            .transpose();
        entry
    }

    /// Messages by id, from the tail cache or the log, `None` where retention took them.
    fn messages(&self, ids: &[u64]) -> Result<Vec<Option<Arc<StoredMessage>>>> {
        let mut out: Vec<Option<Arc<StoredMessage>>> = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        {
            let tail = self.tail.read();
            for (i, id) in ids.iter().enumerate() {
                let m = tail.get(*id);
                if m.is_none() {
                    missing.push(i);
                }
                out.push(m);
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let db = self.db()?;
        let log = db.cf(CF_LOG);
        let keys: Vec<_> = missing
            .iter()
            .map(|&i| (log, ids[i].to_be_bytes()))
            .collect();
        for (&i, got) in missing.iter().zip(db.multi_get_cf(keys)) {
            if let Some(v) = got.map_err(backend)? {
                out[i] = Some(Arc::new(codec::decode_message(
                    MessageId(ids[i]),
                    Bytes::from(v),
                )?));
            }
        }
        Ok(out)
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
            tail: RwLock::default(),
            stopping: AtomicBool::new(false),
            health: Health::default(),
            writing_since: AtomicU64::new(0),
        };
        recover(&shared)?;
        let shared = Arc::new(shared);
        metrics::gauge!(crate::metrics::DEGRADED).set(0.0);

        let (tx, rx) = mpsc::channel(1024);
        let mut threads = Vec::new();
        let writer_shared = Arc::clone(&shared);
        let mut syncer = None;
        let mut syncer_thread = None;
        if matches!(config.fsync, FsyncPolicy::EveryBatch) {
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
        threads.push(
            std::thread::Builder::new()
                .name("mqgate-store-writer".into())
                .spawn(move || Writer::new(writer_shared, syncer).run(rx))
                .map_err(|e| StoreError::Backend(format!("spawn writer: {e}")))?,
        );
        // Joined after the writer, whose end closes its channel.
        threads.extend(syncer_thread);
        if let FsyncPolicy::Periodic { interval } = config.fsync {
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
            threads: Mutex::new(threads),
        })
    }

    /// The data folder.
    pub fn path(&self) -> &Path {
        &self.shared.config.path
    }
}

/// Open RocksDB in `config.path` with mqgate's options (at open, and again to recover
/// from an I/O error). `log_min` feeds the key index's compaction filter.
fn open_db(config: &RocksConfig, log_min: &Arc<AtomicU64>) -> Result<DB> {
    let cache = Cache::new_lru_cache(config.block_cache_bytes);
    // No stall: a writer stalled by the write-buffer manager waits for a flush, and a
    // flush that cannot run (a full disk) would hold it forever; RocksDB's own write
    // stalls (too many memtables) give up on a background error or a shutdown.
    let wbm = WriteBufferManager::new_write_buffer_manager(config.write_buffer_bytes, false);

    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_max_background_jobs(2);
    db_opts.set_write_buffer_manager(&wbm);
    db_opts.set_max_total_wal_size(256 << 20);
    db_opts.set_bytes_per_sync(1 << 20);
    db_opts.set_wal_bytes_per_sync(1 << 20);
    db_opts.set_keep_log_file_num(4);
    db_opts.set_max_open_files(config.max_open_files);

    let cf_opts = |write_buffer: usize, compress: bool| {
        let mut o = Options::default();
        let mut b = BlockBasedOptions::default();
        b.set_block_cache(&cache);
        b.set_cache_index_and_filter_blocks(true);
        b.set_pin_l0_filter_and_index_blocks_in_cache(true);
        b.set_block_size(16 << 10);
        o.set_block_based_table_factory(&b);
        o.set_write_buffer_size(write_buffer);
        o.set_max_write_buffer_number(3);
        o.set_target_file_size_base(64 << 20);
        o.set_compression_type(if compress {
            DBCompressionType::Lz4
        } else {
            DBCompressionType::None
        });
        o
    };
    let mut keys_opts = cf_opts(16 << 20, true);
    let filter_min = Arc::clone(log_min);
    keys_opts.set_compaction_filter(
        "mqgate-dead-keys",
        move |_lvl: u32, key: &[u8], _v: &[u8]| {
            // The last 8 bytes of a key-index key are the message id.
            match key.len().checked_sub(8).map(|at| &key[at..]) {
                Some(id)
                    if u64::from_be_bytes(id.try_into().expect("8 bytes"))
                        < filter_min.load(Ordering::Relaxed) =>
                {
                    rocksdb::compaction_filter::Decision::Remove
                }
                _ => rocksdb::compaction_filter::Decision::Keep,
            }
        },
    );
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_LOG, cf_opts(64 << 20, true)),
        ColumnFamilyDescriptor::new(CF_CQ, cf_opts(32 << 20, true)),
        ColumnFamilyDescriptor::new(CF_KEYS, keys_opts),
        ColumnFamilyDescriptor::new(CF_OFFSETS, cf_opts(4 << 20, false)),
        ColumnFamilyDescriptor::new(CF_OFFSET_TOPICS, cf_opts(4 << 20, false)),
        ColumnFamilyDescriptor::new(CF_KV, cf_opts(8 << 20, true)),
        ColumnFamilyDescriptor::new(CF_TIMERS, cf_opts(16 << 20, true)),
        ColumnFamilyDescriptor::new(CF_META, cf_opts(4 << 20, false)),
    ];
    DB::open_cf_descriptors(&db_opts, &config.path, cfs).map_err(backend)
}

impl RocksStore {
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T>>) -> Request,
    ) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(make(tx))
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// The first id at or after which the log must be kept under `retention` at `now`,
    /// found by walking the oldest records (their sizes and store timestamps).
    fn retention_cutoff(&self, now: Millis) -> Result<Option<u64>> {
        let Retention { max_age, max_bytes } = self.shared.config.retention;
        let age_cutoff = max_age.map(|a| now.saturating_sub(a.as_millis() as u64));
        let mut excess = max_bytes.map_or(0, |b| {
            self.shared
                .log_bytes
                .load(Ordering::Acquire)
                .saturating_sub(b)
        });
        if age_cutoff.is_none() && excess == 0 {
            return Ok(None);
        }
        let mut cutoff = None;
        let db = self.shared.db()?;
        let it = db.iterator_cf(db.cf(CF_LOG), IteratorMode::Start);
        // Bounded per pass so a huge backlog is trimmed in steps, not in one long stall.
        for item in it.take(1_000_000) {
            let (k, v) = item.map_err(backend)?;
            let ts = v
                .get(2..10)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
            let old = age_cutoff.is_some_and(|c| ts < c);
            if !old && excess == 0 {
                return Ok(Some(be_u64(&k)?));
            }
            excess = excess.saturating_sub(v.len() as u64);
            cutoff = Some(be_u64(&k)? + 1);
        }
        Ok(cutoff)
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        self.tx.take();
        self.shared.stopping.store(true, Ordering::Release);
        self.shared.health.wake.notify_all();
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        match self.shared.db() {
            Ok(db) => {
                if let Err(e) = db.flush_wal(true) {
                    tracing::warn!(error = %e, "store: final WAL sync failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "store: closed without a final WAL sync"),
        }
    }
}
/// The every-batch policy's fsync: take every group written so far, sync the WAL once,
/// answer them all. While it syncs, the writer goes on writing the next groups.
fn sync_loop(shared: &Shared, rx: std::sync::mpsc::Receiver<Vec<Answer>>) {
    while let Ok(mut answers) = rx.recv() {
        while let Ok(more) = rx.try_recv() {
            answers.extend(more);
        }
        let synced = std::time::Instant::now();
        if let Err(e) = shared
            .db()
            .and_then(|db| db.flush_wal(true).map_err(backend))
        {
            shared.health.failed("WAL sync", &e);
            Writer::fail(answers, e);
            continue;
        }
        metrics::histogram!(crate::metrics::FSYNC_SECONDS).record(synced.elapsed());
        for (done, r) in answers {
            let _ = done.send(r);
        }
    }
}

fn periodic_fsync(shared: &Shared, interval: Duration) {
    let step = interval.min(Duration::from_millis(50));
    let mut waited = Duration::ZERO;
    while !shared.stopping.load(Ordering::Acquire) {
        std::thread::sleep(step);
        waited += step;
        if waited >= interval {
            waited = Duration::ZERO;
            let synced = std::time::Instant::now();
            if let Err(e) = shared
                .db()
                .and_then(|db| db.flush_wal(true).map_err(backend))
            {
                tracing::error!(error = %e, "store: periodic WAL sync failed");
                shared.health.failed("periodic WAL sync", &e);
            }
            metrics::histogram!(crate::metrics::FSYNC_SECONDS).record(synced.elapsed());
        }
    }
}

/// Rebuild the in-memory state from disk.
/// Stores written before the reverse offset entries existed get them once, at open.
fn backfill_offset_topics(s: &Shared) -> Result<()> {
    let db = s.db()?;
    let mut rev = db.raw_iterator_cf(db.cf(CF_OFFSET_TOPICS));
    rev.seek_to_first();
    if rev.valid() {
        return Ok(());
    }
    rev.status().map_err(backend)?;
    let mut wb = rocksdb::WriteBatch::default();
    for item in db.iterator_cf(db.cf(CF_OFFSETS), IteratorMode::Start) {
        let (k, _) = item.map_err(backend)?;
        let (Some(sep), Some(topic)) = (k.iter().position(|b| *b == 0), offsets_key_topic(&k))
        else {
            continue;
        };
        let topic = String::from_utf8_lossy(topic).into_owned();
        wb.put_cf(
            db.cf(CF_OFFSET_TOPICS),
            offset_topic_key(&topic, &k[..sep]),
            [],
        );
    }
    if !wb.is_empty() {
        db.write(wb).map_err(backend)?;
    }
    Ok(())
}

fn recover(s: &Shared) -> Result<()> {
    backfill_offset_topics(s)?;
    let db = s.db()?;
    let meta = db.cf(CF_META);
    let header = match db.get_cf(meta, HEADER_KEY).map_err(backend)? {
        Some(v) => Header::decode(&v)?,
        None => Header::default(),
    };
    s.next_seq.store(header.next_seq, Ordering::Release);
    s.log_bytes.store(header.log_bytes, Ordering::Release);
    s.messages.store(header.messages, Ordering::Release);
    s.timers.store(header.timers, Ordering::Release);
    let first_log = db
        .iterator_cf(db.cf(CF_LOG), IteratorMode::Start)
        .next()
        .transpose()
        .map_err(backend)?
        .map(|(k, _)| be_u64(&k))
        .transpose()?
        .unwrap_or(header.next_seq);
    s.log_min.store(first_log, Ordering::Release);

    let mut topics = HashMap::new();
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(b"t/".to_vec());
    ro.set_iterate_upper_bound(b"t0".to_vec());
    for item in db.iterator_cf_opt(meta, ro, IteratorMode::Start) {
        let (k, v) = item.map_err(backend)?;
        let name = std::str::from_utf8(&k[2..])
            .map_err(|_| StoreError::Corrupt {
                what: "topic meta",
                detail: "name is not UTF-8".into(),
            })
            .and_then(TopicName::new)?;
        if v.len() != 12 {
            return Err(StoreError::Corrupt {
                what: "topic meta",
                detail: format!("{} bytes", v.len()),
            });
        }
        let uid = be_u64(&v[..8])?;
        let count = u32::from_be_bytes(v[8..12].try_into().expect("4 bytes"));
        let mut queues = Vec::with_capacity(count as usize);
        for q in 0..count {
            queues.push(Arc::new(recover_queue(s, uid, q)?));
        }
        topics.insert(name, Arc::new(TopicState { uid, queues }));
    }
    *s.topics.write() = topics;
    Ok(())
}

fn recover_queue(s: &Shared, uid: u64, queue: u32) -> Result<QueueState> {
    let db = s.db()?;
    let cq = db.cf(CF_CQ);
    let persisted_min = db
        .get_cf(db.cf(CF_META), queue_meta_key(uid, queue))
        .map_err(backend)?
        .map(|v| be_u64(&v))
        .transpose()?
        .unwrap_or(0);
    let mut it = db.raw_iterator_cf(cq);
    it.seek(cq_key(uid, queue, 0));
    let first = match it.key() {
        Some(k) if k.len() == 20 && k[..12] == cq_key(uid, queue, 0)[..12] => {
            Some(be_u64(&k[12..])?)
        }
        _ => None,
    };
    it.status().map_err(backend)?;
    let (min, next) = match first {
        None => (persisted_min, persisted_min),
        Some(first) => {
            it.seek_for_prev(cq_key(uid, queue, u64::MAX));
            let last = match it.key() {
                Some(k) => be_u64(&k[12..])?,
                None => first,
            };
            it.status().map_err(backend)?;
            (first.max(persisted_min), last + 1)
        }
    };
    Ok(QueueState {
        min: AtomicU64::new(min),
        next: AtomicU64::new(next.max(min)),
    })
}

/// The writer thread: the only code that mutates the database and the shared counters.
struct Writer {
    s: Arc<Shared>,
    /// Under the every-batch policy: the syncer thread, which fsyncs the WAL and only
    /// then answers the writers of the groups written before the sync began.
    syncer: Option<std::sync::mpsc::Sender<Vec<Answer>>>,
    /// Reused encode buffer.
    buf: Vec<u8>,
    /// Timestamp of the last batch: store timestamps never go back.
    last_ts: Millis,
}

/// What a group batch will change once written.
#[derive(Default)]
struct Pending {
    header: Header,
    /// (uid, queue) -> (state, new min, new next)
    queues: HashMap<(u64, u32), (Arc<QueueState>, u64, u64)>,
    tail: Vec<Arc<StoredMessage>>,
    /// Timers put and deleted in this group (so deletes count right before the write).
    timers_put: HashSet<TimerKey>,
    timers_deleted: HashSet<TimerKey>,
    log_min: Option<u64>,
}

impl Writer {
    fn new(s: Arc<Shared>, syncer: Option<std::sync::mpsc::Sender<Vec<Answer>>>) -> Self {
        Self {
            s,
            syncer,
            buf: Vec::with_capacity(64 << 10),
            last_ts: 0,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut group: Vec<Grouped> = Vec::new();
            let mut group_bytes = 0usize;
            let mut next = Some(first);
            while let Some(req) = next.take() {
                match req {
                    Request::Write(batch, done, visible) => {
                        group_bytes += batch_size(&batch);
                        group.push((batch, done, visible));
                    }
                    other => {
                        self.commit_group(std::mem::take(&mut group));
                        group_bytes = 0;
                        self.admin(other);
                    }
                }
                if group_bytes < self.s.config.max_batch_bytes {
                    next = rx.try_recv().ok();
                }
            }
            self.commit_group(group);
        }
    }

    fn admin(&mut self, req: Request) {
        // Degraded: refused like writes (see `commit_group`).
        if let Err(e) = self.s.health.check() {
            match req {
                Request::Write(..) => unreachable!("writes are grouped"),
                Request::CreateTopic(_, _, done) => drop(done.send(Err(e))),
                Request::DeleteTopic(_, done) => drop(done.send(Err(e))),
                Request::TrimLog(_, done) => drop(done.send(Err(e))),
            }
            return;
        }
        match req {
            Request::Write(..) => unreachable!("writes are grouped"),
            Request::CreateTopic(name, count, done) => {
                let _ = done.send(self.create_topic(name, count));
            }
            Request::DeleteTopic(name, done) => {
                let _ = done.send(self.delete_topic(&name));
            }
            Request::TrimLog(below, done) => {
                let _ = done.send(self.trim_log(below));
            }
        }
    }

    fn write_options(&self) -> WriteOptions {
        // Never synced here: the every-batch policy syncs the WAL right after.
        WriteOptions::default()
    }

    /// One RocksDB write outside a group commit (topics, retention); a failure marks
    /// the store degraded.
    fn write_raw(&self, db: &Db<'_>, wb: rocksdb::WriteBatch) -> Result<()> {
        db.write_opt(wb, &self.write_options()).map_err(|e| {
            let e = backend(e);
            self.s.health.failed("write", &e);
            e
        })
    }

    fn commit_group(&mut self, group: Vec<Grouped>) {
        if group.is_empty() {
            return;
        }
        let s = Arc::clone(&self.s);
        // Degraded (a write or sync failed and the store has not recovered yet): refused
        // without touching RocksDB; the recovery thread says when writes work again.
        let db = match s.health.check().and_then(|()| s.db()) {
            Ok(db) => db,
            Err(e) => {
                for (_, done, _) in group {
                    let _ = done.send(Err(again(&e)));
                }
                return;
            }
        };
        let now = now_millis().max(self.last_ts);
        self.last_ts = now;
        let topics = s.topics.read();
        let mut wb = rocksdb::WriteBatch::default();
        let mut pending = Pending {
            header: s.header(),
            ..Pending::default()
        };
        let mut answers = Vec::with_capacity(group.len());
        let sync = group.iter().any(|(b, _, _)| !b.no_sync);
        let mut visible = Vec::new();
        for (batch, done, vis) in group {
            match self.stage(&topics, &mut wb, &mut pending, batch, now) {
                Ok(receipt) => {
                    answers.push((done, Ok(receipt)));
                    visible.extend(vis);
                }
                Err(e) => {
                    let _ = done.send(Err(e));
                }
            }
        }
        drop(topics);
        if answers.is_empty() {
            return;
        }
        wb.put_cf(db.cf(CF_META), HEADER_KEY, pending.header.encode());
        let started = std::time::Instant::now();
        s.writing_since
            .store(now_millis().max(1), Ordering::Release);
        let written = db.write_opt(wb, &self.write_options());
        s.writing_since.store(0, Ordering::Release);
        if let Err(e) = written {
            let e = backend(e);
            s.health.failed("write", &e);
            return Self::fail(answers, e);
        }
        metrics::histogram!(crate::metrics::APPEND_SECONDS).record(started.elapsed());
        // Readable before durable: consumers may be handed the batch while its fsync
        // runs (a crash then loses what no writer was told is stored: the writers
        // resend, at least once). Writers are answered only after the sync.
        self.publish(pending);
        for v in visible {
            let _ = v.send(());
        }
        // The sync runs on its own thread while this one writes the next group; the
        // writers are answered once a sync that began after their write is done.
        let answers = match (&self.syncer, sync) {
            (Some(syncer), true) => match syncer.send(answers) {
                Ok(()) => return,
                // The sync thread is gone (it only ends with the writer, so it
                // panicked): sync here rather than answer anything unsynced.
                Err(back) => {
                    if let Err(e) = db.flush_wal(true) {
                        let e = backend(e);
                        s.health.failed("WAL sync", &e);
                        return Self::fail(back.0, e);
                    }
                    back.0
                }
            },
            _ => answers,
        };
        for (done, r) in answers {
            let _ = done.send(r);
        }
    }

    fn fail(answers: Vec<Answer>, e: StoreError) {
        tracing::error!(error = %e, "store: group commit failed");
        for (done, _) in answers {
            let _ = done.send(Err(again(&e)));
        }
    }

    /// Make a written batch visible: queue ends, counters, tail cache.
    fn publish(&self, p: Pending) {
        let s = &self.s;
        for (state, min, next) in p.queues.into_values() {
            state.min.store(min, Ordering::Release);
            state.next.store(next, Ordering::Release);
        }
        s.next_seq.store(p.header.next_seq, Ordering::Release);
        s.log_bytes.store(p.header.log_bytes, Ordering::Release);
        s.messages.store(p.header.messages, Ordering::Release);
        s.timers.store(p.header.timers, Ordering::Release);
        if let Some(m) = p.log_min {
            s.log_min.store(m, Ordering::Release);
        }
        if !p.tail.is_empty() && s.config.tail_cache_bytes > 0 {
            let mut tail = s.tail.write();
            for m in p.tail {
                tail.bytes += m.size as usize;
                tail.messages.push_back(m);
            }
            while tail.bytes > s.config.tail_cache_bytes {
                match tail.messages.pop_front() {
                    Some(m) => tail.bytes -= m.size as usize,
                    None => break,
                }
            }
        }
    }

    fn resolve(
        topics: &HashMap<TopicName, Arc<TopicState>>,
        pending: &mut Pending,
        q: &QueueRef,
    ) -> Result<(u64, u32)> {
        let t = topics
            .get(&q.topic)
            .ok_or_else(|| StoreError::UnknownQueue(q.clone()))?;
        let state = t
            .queues
            .get(q.queue.0 as usize)
            .ok_or_else(|| StoreError::UnknownQueue(q.clone()))?;
        pending.queues.entry((t.uid, q.queue.0)).or_insert_with(|| {
            (
                Arc::clone(state),
                state.min.load(Ordering::Acquire),
                state.next.load(Ordering::Acquire),
            )
        });
        Ok((t.uid, q.queue.0))
    }

    /// Add one client batch to the group, or refuse it whole without touching the group.
    fn stage(
        &mut self,
        topics: &HashMap<TopicName, Arc<TopicState>>,
        wb: &mut rocksdb::WriteBatch,
        pending: &mut Pending,
        batch: WriteBatch,
        now: Millis,
    ) -> Result<WriteReceipt> {
        let s = Arc::clone(&self.s);
        let db = s.db()?;
        // Validate first: a refused batch leaves no trace, and applying cannot fail.
        let mut timers_on_disk = HashSet::new();
        for op in &batch.ops {
            match op {
                WriteOp::Append { message, queues } => {
                    codec::validate(message)?;
                    for q in queues {
                        Self::resolve(topics, pending, q)?;
                    }
                }
                WriteOp::Truncate { queue, .. } => {
                    Self::resolve(topics, pending, queue)?;
                }
                WriteOp::KvPut { namespace, .. } | WriteOp::KvDelete { namespace, .. }
                    if namespace.contains('\0') =>
                {
                    return Err(StoreError::Invalid(
                        "a kv namespace may not contain NUL".into(),
                    ));
                }
                // Look on disk now, so applying below cannot fail half-way.
                WriteOp::TimerDelete { key }
                    if !pending.timers_put.contains(key)
                        && !pending.timers_deleted.contains(key) =>
                {
                    let on_disk = db.get_pinned_cf(db.cf(CF_TIMERS), timer_key(key));
                    if on_disk.map_err(backend)?.is_some() {
                        timers_on_disk.insert(*key);
                    }
                }
                _ => {}
            }
        }
        let mut receipt = WriteReceipt::default();
        for op in batch.ops {
            match op {
                WriteOp::Append { message, queues } => {
                    let id = pending.header.next_seq;
                    pending.header.next_seq += 1;
                    self.buf.clear();
                    codec::encode_message(&message, now, &mut self.buf);
                    let size = self.buf.len() as u32;
                    wb.put_cf(db.cf(CF_LOG), id.to_be_bytes(), &self.buf);
                    for k in &message.keys {
                        let mut key = key_index_prefix(&message.topic, k);
                        key.put_u64(id);
                        wb.put_cf(db.cf(CF_KEYS), key, []);
                    }
                    let entry = |offset| QueueEntry {
                        offset: QueueOffset(offset),
                        id: MessageId(id),
                        size,
                        tag_hash: tag_hash(message.tags.as_deref()),
                        timestamp: now,
                    };
                    let mut offsets = Vec::with_capacity(queues.len());
                    for q in queues {
                        let (uid, qid) = Self::resolve(topics, pending, &q).expect("validated");
                        let slot = pending.queues.get_mut(&(uid, qid)).expect("resolved");
                        let offset = slot.2;
                        slot.2 += 1;
                        wb.put_cf(
                            db.cf(CF_CQ),
                            cq_key(uid, qid, offset),
                            codec::encode_entry(&entry(offset)),
                        );
                        offsets.push((q, QueueOffset(offset)));
                    }
                    pending.header.log_bytes += u64::from(size);
                    pending.header.messages += 1;
                    receipt.appended.push(Appended {
                        id: MessageId(id),
                        store_timestamp: now,
                        offsets,
                    });
                    pending.tail.push(Arc::new(StoredMessage {
                        id: MessageId(id),
                        store_timestamp: now,
                        size,
                        message,
                    }));
                }
                WriteOp::CommitOffset {
                    group,
                    queue,
                    offset,
                } => {
                    wb.put_cf(
                        db.cf(CF_OFFSETS),
                        offsets_key(&group, &queue),
                        offset.0.to_le_bytes(),
                    );
                    wb.put_cf(
                        db.cf(CF_OFFSET_TOPICS),
                        offset_topic_key(queue.topic.as_str(), group.as_str().as_bytes()),
                        [],
                    );
                }
                WriteOp::DeleteOffsets { group, topic } => {
                    let prefix = offsets_prefix(&group, topic.as_ref());
                    // The reverse entries: of one topic, or of every topic the group has.
                    let topics: Vec<Vec<u8>> = match &topic {
                        Some(t) => vec![t.as_str().as_bytes().to_vec()],
                        None => {
                            let mut ts: Vec<Vec<u8>> = Vec::new();
                            let it = db.iterator_cf_opt(
                                db.cf(CF_OFFSETS),
                                prefix_range(&prefix),
                                IteratorMode::Start,
                            );
                            for item in it {
                                let (k, _) = item.map_err(backend)?;
                                if let Some(t) = offsets_key_topic(&k) {
                                    if ts.last().is_none_or(|l| l.as_slice() != t) {
                                        ts.push(t.to_vec());
                                    }
                                }
                            }
                            ts
                        }
                    };
                    for t in topics {
                        let t = String::from_utf8_lossy(&t).into_owned();
                        wb.delete_cf(
                            db.cf(CF_OFFSET_TOPICS),
                            offset_topic_key(&t, group.as_str().as_bytes()),
                        );
                    }
                    let end = nul_prefix_end(&prefix);
                    wb.delete_range_cf(db.cf(CF_OFFSETS), prefix, end);
                }
                WriteOp::Truncate { queue, before } => {
                    let (uid, qid) = Self::resolve(topics, pending, &queue).expect("validated");
                    let slot = pending.queues.get_mut(&(uid, qid)).expect("resolved");
                    let new_min = before.0.clamp(slot.1, slot.2);
                    if new_min > slot.1 {
                        wb.delete_range_cf(
                            db.cf(CF_CQ),
                            cq_key(uid, qid, slot.1),
                            cq_key(uid, qid, new_min),
                        );
                        wb.put_cf(
                            db.cf(CF_META),
                            queue_meta_key(uid, qid),
                            new_min.to_be_bytes(),
                        );
                        slot.1 = new_min;
                    }
                }
                WriteOp::KvPut {
                    namespace,
                    key,
                    value,
                } => wb.put_cf(db.cf(CF_KV), kv_key(&namespace, &key), value),
                WriteOp::KvDelete { namespace, key } => {
                    wb.delete_cf(db.cf(CF_KV), kv_key(&namespace, &key))
                }
                WriteOp::TimerPut { due, payload } => {
                    let key = TimerKey {
                        due,
                        seq: pending.header.next_seq,
                    };
                    pending.header.next_seq += 1;
                    pending.header.timers += 1;
                    pending.timers_put.insert(key);
                    pending.timers_deleted.remove(&key);
                    wb.put_cf(db.cf(CF_TIMERS), timer_key(&key), payload);
                    receipt.timers.push(key);
                }
                WriteOp::TimerDelete { key } => {
                    let exists = pending.timers_put.remove(&key) || timers_on_disk.remove(&key);
                    if exists {
                        pending.timers_deleted.insert(key);
                        debug_assert!(pending.header.timers > 0, "timer count out of step");
                        pending.header.timers = pending.header.timers.saturating_sub(1);
                        wb.delete_cf(db.cf(CF_TIMERS), timer_key(&key));
                    }
                }
            }
        }
        Ok(receipt)
    }

    fn create_topic(&mut self, name: TopicName, count: u32) -> Result<TopicConfig> {
        crate::check_queue_count(count)?;
        let s = Arc::clone(&self.s);
        let db = s.db()?;
        let existing = s.topic_state(&name);
        let (uid, mut queues) = match &existing {
            Some(t) if (t.queues.len() as u32) > count => {
                return Err(StoreError::Invalid(format!(
                    "topic {name} has {} queues; the count can grow but not shrink to {count}",
                    t.queues.len()
                )))
            }
            Some(t) if t.queues.len() as u32 == count => {
                return Ok(TopicConfig {
                    name,
                    queue_count: count,
                })
            }
            Some(t) => (t.uid, t.queues.clone()),
            None => (s.next_seq.load(Ordering::Acquire), Vec::new()),
        };
        let mut header = s.header();
        if existing.is_none() {
            header.next_seq += 1;
        }
        // No offset cleanup here: `delete_topic` removes a topic's offsets in the same
        // batch that removes the topic, and offsets committed before a topic exists are
        // kept, as the model (and MemoryStore) keep them. Scanning every group's offsets
        // here made each new topic cost O(all offsets).
        let mut wb = rocksdb::WriteBatch::default();
        let mut v = Vec::with_capacity(12);
        v.put_u64(uid);
        v.put_u32(count);
        wb.put_cf(db.cf(CF_META), topic_meta_key(&name), v);
        wb.put_cf(db.cf(CF_META), HEADER_KEY, header.encode());
        self.write_raw(&db, wb)?;
        s.next_seq.store(header.next_seq, Ordering::Release);
        queues.resize_with(count as usize, Default::default);
        s.topics
            .write()
            .insert(name.clone(), Arc::new(TopicState { uid, queues }));
        Ok(TopicConfig {
            name,
            queue_count: count,
        })
    }

    fn delete_topic(&mut self, name: &TopicName) -> Result<bool> {
        let s = Arc::clone(&self.s);
        let db = s.db()?;
        let mut wb = rocksdb::WriteBatch::default();
        // Offsets go even when the topic does not exist: none may outlive it.
        self.delete_topic_offsets(&mut wb, name)?;
        let Some(t) = s.topic_state(name) else {
            self.write_raw(&db, wb)?;
            return Ok(false);
        };
        wb.delete_range_cf(db.cf(CF_CQ), cq_key(t.uid, 0, 0), cq_key(t.uid + 1, 0, 0));
        for q in 0..t.queues.len() as u32 {
            wb.delete_cf(db.cf(CF_META), queue_meta_key(t.uid, q));
        }
        wb.delete_cf(db.cf(CF_META), topic_meta_key(name));
        self.write_raw(&db, wb)?;
        s.topics.write().remove(name);
        Ok(true)
    }

    /// Every group's committed offsets on topic `name`, found through the reverse
    /// entries (topic, 0, group): the cost is the groups on this topic, not all groups.
    fn delete_topic_offsets(&self, wb: &mut rocksdb::WriteBatch, name: &TopicName) -> Result<()> {
        let db = self.s.db()?;
        let mut prefix = name.as_str().as_bytes().to_vec();
        prefix.push(0);
        let it = db.iterator_cf_opt(
            db.cf(CF_OFFSET_TOPICS),
            prefix_range(&prefix),
            IteratorMode::Start,
        );
        for item in it {
            let (k, _) = item.map_err(backend)?;
            let group = &k[prefix.len()..];
            let mut fwd = group.to_vec();
            fwd.push(0);
            fwd.extend_from_slice(&prefix);
            let end = nul_prefix_end(&fwd);
            wb.delete_range_cf(db.cf(CF_OFFSETS), fwd, end);
            wb.delete_cf(db.cf(CF_OFFSET_TOPICS), &k);
        }
        Ok(())
    }

    /// Delete the commit log below `below`, then every queue entry that pointed there.
    fn trim_log(&mut self, below: u64) -> Result<RetentionReport> {
        let s = Arc::clone(&self.s);
        let db = s.db()?;
        let mut report = RetentionReport::default();
        let log_min = s.log_min.load(Ordering::Acquire);
        if below <= log_min {
            return Ok(report);
        }
        // Count what goes (sizes are the values' lengths).
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(below.to_be_bytes().to_vec());
        for item in db.iterator_cf_opt(db.cf(CF_LOG), ro, IteratorMode::Start) {
            let (_, v) = item.map_err(backend)?;
            report.messages_deleted += 1;
            report.bytes_deleted += v.len() as u64;
        }
        let mut header = s.header();
        header.messages -= report.messages_deleted.min(header.messages);
        header.log_bytes -= report.bytes_deleted.min(header.log_bytes);
        let mut wb = rocksdb::WriteBatch::default();
        wb.delete_range_cf(db.cf(CF_LOG), 0u64.to_be_bytes(), below.to_be_bytes());
        let mut moved = Vec::new();
        let topics: Vec<Arc<TopicState>> = s.topics.read().values().cloned().collect();
        for t in topics {
            for (qid, q) in t.queues.iter().enumerate() {
                let qid = qid as u32;
                let (min, next) = (
                    q.min.load(Ordering::Acquire),
                    q.next.load(Ordering::Acquire),
                );
                // Entries point at increasing ids: binary search the first live one.
                let (mut lo, mut hi) = (min, next);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    match s.entry_at(t.uid, qid, mid)? {
                        Some(e) if e.id.0 >= below => hi = mid,
                        _ => lo = mid + 1,
                    }
                }
                if lo > min {
                    wb.delete_range_cf(
                        db.cf(CF_CQ),
                        cq_key(t.uid, qid, min),
                        cq_key(t.uid, qid, lo),
                    );
                    wb.put_cf(db.cf(CF_META), queue_meta_key(t.uid, qid), lo.to_be_bytes());
                    report.entries_deleted += lo - min;
                    moved.push((Arc::clone(q), lo));
                }
            }
        }
        wb.put_cf(db.cf(CF_META), HEADER_KEY, header.encode());
        self.write_raw(&db, wb)?;
        for (q, lo) in moved {
            q.min.store(lo, Ordering::Release);
        }
        s.messages.store(header.messages, Ordering::Release);
        s.log_bytes.store(header.log_bytes, Ordering::Release);
        s.log_min.store(below, Ordering::Release);
        {
            let mut tail = s.tail.write();
            while tail.messages.front().is_some_and(|m| m.id.0 < below) {
                let m = tail.messages.pop_front().expect("front exists");
                tail.bytes -= m.size as usize;
            }
        }
        // Hand whole dead files back to the file system at once.
        let _ = db.delete_file_in_range_cf(db.cf(CF_LOG), 0u64.to_be_bytes(), below.to_be_bytes());
        Ok(report)
    }
}

fn batch_size(b: &WriteBatch) -> usize {
    b.ops
        .iter()
        .map(|op| match op {
            WriteOp::Append { message, queues } => message.body.len() + 64 + 28 * queues.len(),
            WriteOp::KvPut { value, .. } => value.len() + 32,
            WriteOp::TimerPut { payload, .. } => payload.len() + 16,
            _ => 32,
        })
        .sum()
}

#[async_trait]
impl Store for RocksStore {
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
        self.request(|tx| Request::Write(batch, tx, None)).await
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
        self.request(|tx| Request::Write(batch, tx, Some(visible)))
            .await
    }

    fn queue_range(&self, queue: &QueueRef) -> Result<OffsetRange> {
        let (_, q) = self.shared.queue_state(queue)?;
        // Read next first: min can only catch up to it, never pass it.
        let next = q.next.load(Ordering::Acquire);
        let min = q.min.load(Ordering::Acquire).min(next);
        Ok(OffsetRange {
            min: QueueOffset(min),
            next: QueueOffset(next),
        })
    }

    async fn read(
        &self,
        queue: &QueueRef,
        from: QueueOffset,
        limits: ReadLimits,
    ) -> Result<Vec<QueueMessage>> {
        let s = &self.shared;
        let db = s.db()?;
        let (uid, q) = s.queue_state(queue)?;
        let next = q.next.load(Ordering::Acquire);
        let start = from.0.max(q.min.load(Ordering::Acquire));
        if start >= next || limits.max_count == 0 {
            return Ok(Vec::new());
        }
        let qid = queue.queue.0;
        let end = next.min(start.saturating_add(limits.max_count as u64));
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(cq_key(uid, qid, start).to_vec());
        ro.set_iterate_upper_bound(cq_key(uid, qid, end).to_vec());
        let mut entries = Vec::with_capacity((end - start) as usize);
        let mut bytes = 0usize;
        for item in db.iterator_cf_opt(db.cf(CF_CQ), ro, IteratorMode::Start) {
            let (k, v) = item.map_err(backend)?;
            let e = codec::decode_entry(QueueOffset(be_u64(&k[12..])?), &v)?;
            if !entries.is_empty() && bytes + e.size as usize > limits.max_bytes {
                break;
            }
            bytes += e.size as usize;
            entries.push(e);
        }
        let ids: Vec<u64> = entries.iter().map(|e| e.id.0).collect();
        Ok(entries
            .into_iter()
            .zip(s.messages(&ids)?)
            .filter_map(|(entry, m)| m.map(|message| QueueMessage { entry, message }))
            .collect())
    }

    async fn offset_for_timestamp(
        &self,
        queue: &QueueRef,
        timestamp: Millis,
    ) -> Result<QueueOffset> {
        let s = &self.shared;
        let (uid, q) = s.queue_state(queue)?;
        let (mut lo, mut hi) = (
            q.min.load(Ordering::Acquire),
            q.next.load(Ordering::Acquire),
        );
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match s.entry_at(uid, queue.queue.0, mid)? {
                Some(e) if e.timestamp >= timestamp => hi = mid,
                // Missing: truncated under us; everything at or below it is gone too.
                _ => lo = mid + 1,
            }
        }
        Ok(QueueOffset(lo))
    }

    async fn message(&self, id: MessageId) -> Result<Option<Arc<StoredMessage>>> {
        Ok(self.shared.messages(&[id.0])?.pop().flatten())
    }

    async fn messages_by_key(
        &self,
        topic: &TopicName,
        key: &str,
        limit: usize,
    ) -> Result<Vec<Arc<StoredMessage>>> {
        let s = &self.shared;
        let db = s.db()?;
        let prefix = key_index_prefix(topic, key);
        let ro = prefix_range(&prefix);
        let log_min = s.log_min.load(Ordering::Acquire);
        let mut out = Vec::new();
        let mut it = db.iterator_cf_opt(db.cf(CF_KEYS), ro, IteratorMode::Start);
        while out.len() < limit {
            let mut ids = Vec::new();
            for item in it.by_ref() {
                let (k, _) = item.map_err(backend)?;
                let id = be_u64(&k[prefix.len()..])?;
                if id >= log_min {
                    ids.push(id);
                }
                if ids.len() >= limit - out.len() {
                    break;
                }
            }
            if ids.is_empty() {
                break;
            }
            out.extend(s.messages(&ids)?.into_iter().flatten());
        }
        Ok(out)
    }

    async fn committed_offset(
        &self,
        group: &GroupName,
        queue: &QueueRef,
    ) -> Result<Option<QueueOffset>> {
        let s = &self.shared;
        let db = s.db()?;
        let offset = db
            .get_pinned_cf(db.cf(CF_OFFSETS), offsets_key(group, queue))
            .map_err(backend)?
            .map(|v| decode_offset(&v))
            .transpose();
        offset
    }

    async fn committed_offsets(&self, group: &GroupName) -> Result<Vec<(QueueRef, QueueOffset)>> {
        let s = &self.shared;
        let db = s.db()?;
        let prefix = offsets_prefix(group, None);
        let ro = prefix_range(&prefix);
        let mut out = Vec::new();
        for item in db.iterator_cf_opt(db.cf(CF_OFFSETS), ro, IteratorMode::Start) {
            let (k, v) = item.map_err(backend)?;
            let rest = &k[prefix.len()..];
            let corrupt = || StoreError::Corrupt {
                what: "offset key",
                detail: format!("{k:?}"),
            };
            if rest.len() < 5 {
                return Err(corrupt());
            }
            let topic = std::str::from_utf8(&rest[..rest.len() - 5]).map_err(|_| corrupt())?;
            let queue = u32::from_be_bytes(rest[rest.len() - 4..].try_into().expect("4 bytes"));
            out.push((
                QueueRef {
                    topic: TopicName::new(topic)?,
                    queue: QueueId(queue),
                },
                decode_offset(&v)?,
            ));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    async fn groups(&self) -> Result<Vec<GroupName>> {
        let s = &self.shared;
        let db = s.db()?;
        let mut out = Vec::new();
        let mut it = db.raw_iterator_cf(db.cf(CF_OFFSETS));
        it.seek_to_first();
        while let Some(k) = it.key() {
            let sep = k.iter().position(|b| *b == 0).unwrap_or(k.len());
            let name = std::str::from_utf8(&k[..sep]).map_err(|_| StoreError::Corrupt {
                what: "offset key",
                detail: "group is not UTF-8".into(),
            })?;
            let group = GroupName::new(name)?;
            let mut skip = k[..sep].to_vec();
            skip.push(1);
            out.push(group);
            it.seek(&skip);
        }
        it.status().map_err(backend)?;
        Ok(out)
    }

    async fn kv_get(&self, namespace: &str, key: &[u8]) -> Result<Option<Bytes>> {
        let s = &self.shared;
        let db = s.db()?;
        Ok(db
            .get_cf(db.cf(CF_KV), kv_key(namespace, key))
            .map_err(backend)?
            .map(Bytes::from))
    }

    async fn kv_scan(
        &self,
        namespace: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<(Bytes, Bytes)>> {
        let s = &self.shared;
        let db = s.db()?;
        let full_prefix = kv_key(namespace, prefix);
        let ns_len = namespace.len() + 1;
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(full_prefix.clone());
        if let Some(upper) = prefix_successor(&full_prefix) {
            ro.set_iterate_upper_bound(upper);
        }
        let mut it = db.raw_iterator_cf_opt(db.cf(CF_KV), ro);
        match after {
            Some(a) if a >= prefix => {
                let k = kv_key(namespace, a);
                it.seek(&k);
                if it.key() == Some(&k[..]) {
                    it.next();
                }
            }
            _ => it.seek(&full_prefix),
        }
        let mut out = Vec::new();
        while out.len() < limit {
            let (Some(k), Some(v)) = (it.key(), it.value()) else {
                break;
            };
            out.push((
                Bytes::copy_from_slice(&k[ns_len..]),
                Bytes::copy_from_slice(v),
            ));
            it.next();
        }
        it.status().map_err(backend)?;
        Ok(out)
    }

    async fn timers_due(
        &self,
        until: Millis,
        after: Option<TimerKey>,
        limit: usize,
    ) -> Result<Vec<(TimerKey, Bytes)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let s = &self.shared;
        let db = s.db()?;
        let mut ro = ReadOptions::default();
        if let Some(a) = after {
            ro.set_iterate_lower_bound(timer_key(&a).to_vec());
        }
        if let Some(end) = until.checked_add(1) {
            ro.set_iterate_upper_bound(end.to_be_bytes().to_vec());
        }
        let mut out = Vec::new();
        for item in db.iterator_cf_opt(db.cf(CF_TIMERS), ro, IteratorMode::Start) {
            let (k, v) = item.map_err(backend)?;
            let key = decode_timer_key(&k)?;
            if after.is_some_and(|a| key <= a) {
                continue;
            }
            out.push((key, Bytes::from(v.into_vec())));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    async fn next_timer(&self) -> Result<Option<TimerKey>> {
        let s = &self.shared;
        let db = s.db()?;
        let first = db
            .iterator_cf(
                db.cf(CF_TIMERS),
                IteratorMode::From(&[], Direction::Forward),
            )
            .next()
            .transpose()
            .map_err(backend)?
            .map(|(k, _)| decode_timer_key(&k))
            .transpose();
        first
    }

    async fn enforce_retention(&self, now: Millis) -> Result<RetentionReport> {
        match self.retention_cutoff(now)? {
            None => Ok(RetentionReport::default()),
            Some(below) => self.request(|tx| Request::TrimLog(below, tx)).await,
        }
    }

    fn health(&self) -> StoreHealth {
        self.shared.health.report()
    }

    fn stats(&self) -> StoreStats {
        let h = self.shared.header();
        StoreStats {
            messages: h.messages,
            log_bytes: h.log_bytes,
            timers: h.timers,
            topics: self.shared.topics.read().len() as u64,
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

fn decode_offset(v: &[u8]) -> Result<QueueOffset> {
    v.try_into()
        .map(|b| QueueOffset(u64::from_le_bytes(b)))
        .map_err(|_| StoreError::Corrupt {
            what: "offset",
            detail: format!("{} bytes", v.len()),
        })
}

/// The end of the key range of a prefix that ends in its NUL separator: the same bytes
/// with the NUL raised to 1, so every key `prefix ++ anything` sorts below it.
fn nul_prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    *end.last_mut().expect("prefix ends in NUL") = 1;
    end
}

/// Read options bounding an iterator to the keys under a NUL-terminated prefix.
fn prefix_range(prefix: &[u8]) -> ReadOptions {
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(prefix.to_vec());
    ro.set_iterate_upper_bound(nul_prefix_end(prefix));
    ro
}

/// The smallest key greater than every key starting with `prefix`.
fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut v = prefix.to_vec();
    while let Some(last) = v.pop() {
        if last < u8::MAX {
            v.push(last + 1);
            return Some(v);
        }
    }
    None
}

//! Opening RocksDB, and rebuilding the in-memory state from disk at start (with the
//! one-time backfills older stores need).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DBCompressionType, IteratorMode, Options,
    ReadOptions, WriteBufferManager, DB,
};

use super::keys::{
    be_u64, cq_key, offset_topic_key, offsets_key_topic, queue_meta_key, Header, CF_CQ, CF_KEYS,
    CF_KV, CF_LOG, CF_META, CF_OFFSETS, CF_OFFSET_TOPICS, CF_TIMERS, HEADER_KEY,
};
use super::{backend, QueueState, RocksConfig, Shared, TopicState};
use crate::error::{Result, StoreError};
use crate::types::TopicName;

/// Open RocksDB in `config.path` with mqgate's options (at open, and again to recover
/// from an I/O error). `log_min` feeds the key index's compaction filter.
pub(super) fn open_db(config: &RocksConfig, log_min: &Arc<AtomicU64>) -> Result<DB> {
    open_db_as(config, log_min, config.external_log.is_some())
}

/// [`open_db`]; `view`: a view of an external log (see `set_atomic_flush` below).
pub(super) fn open_db_as(config: &RocksConfig, log_min: &Arc<AtomicU64>, view: bool) -> Result<DB> {
    let (cache, wbm) = match &config.shared {
        Some(r) => (r.cache.clone(), r.write_buffers.clone()),
        // No stall: a writer stalled by the write-buffer manager waits for a flush, and a
        // flush that cannot run (a full disk) would hold it forever; RocksDB's own write
        // stalls (too many memtables) give up on a background error or a shutdown.
        None => (
            Cache::new_lru_cache(config.block_cache_bytes),
            WriteBufferManager::new_write_buffer_manager(config.write_buffer_bytes, false),
        ),
    };

    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    db_opts.set_max_background_jobs(2);
    db_opts.set_write_buffer_manager(&wbm);
    db_opts.set_max_total_wal_size(256 << 20);
    db_opts.set_bytes_per_sync(1 << 20);
    // RocksDB's background range sync of the WAL smooths a periodic fsync. Under the
    // every-batch policy a durable batch syncs its own WAL before anyone is answered,
    // and a transient batch (`no_sync`) is made durable by the next synced one, so it
    // only costs a `sync_file_range` per MiB (2 % of the broker's CPU on 4 KiB
    // transient messages).
    db_opts.set_wal_bytes_per_sync(match config.fsync {
        crate::FsyncPolicy::EveryBatch => 0,
        crate::FsyncPolicy::Periodic { .. } => 1 << 20,
    });
    // A WAL whose memtables are flushed is kept for reuse instead of deleted: deleting
    // it evicted its pages from the page cache and the next WAL faulted new ones in and
    // allocated their blocks (4 % of the broker's CPU on 4 KiB messages). RocksDB marks
    // reused records with the file's number, so recovery stops at the old ones. Not in
    // a view of an external log: it writes without a WAL, which RocksDB refuses
    // alongside recycling.
    if !view {
        db_opts.set_recycle_log_file_num(4);
    }
    db_opts.set_keep_log_file_num(4);
    db_opts.set_max_open_files(config.max_open_files);
    // A view of an external log writes without a WAL: flushing every column family
    // together keeps what survives a crash a consistent prefix of the log.
    db_opts.set_atomic_flush(view);

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
    let mut log_opts = cf_opts(64 << 20, true);
    if config.blob_min_bytes > 0 {
        // Large bodies leave the table files at flush: the table keeps the key and a
        // pointer, so neither the flush (block building, LZ4) nor later compactions copy
        // the body again. Not compressed: bodies are often compressed already, and a
        // broker's CPU per message matters more than their disk space here. The log is
        // appended in key order and trimmed from its start, so a blob file is dropped
        // as soon as the table files that point into it are (no blob GC needed, but on
        // in case a compaction rewrites a range).
        log_opts.set_enable_blob_files(true);
        log_opts.set_min_blob_size(config.blob_min_bytes);
        log_opts.set_blob_file_size(256 << 20);
        log_opts.set_blob_compression_type(DBCompressionType::None);
        log_opts.set_enable_blob_gc(true);
        log_opts.set_blob_cache(&cache);
    }
    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_LOG, log_opts),
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

pub(super) fn recover(s: &Shared) -> Result<()> {
    backfill_offset_topics(s)?;
    let db = s.db()?;
    let meta = db.cf(CF_META);
    let header = match db.get_cf(meta, HEADER_KEY).map_err(backend)? {
        Some(v) => Header::decode(&v)?,
        None => Header::default(),
    };
    // A fresh store starts at its base; one past it goes on.
    let header = Header {
        next_seq: header.next_seq.max(s.config.id_base),
        ..header
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

    let topic_keys = || {
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(b"t/".to_vec());
        ro.set_iterate_upper_bound(b"t0".to_vec());
        ro
    };
    // Counted first (keys only, fast) so a long recovery can say how far it is.
    let total = db
        .iterator_cf_opt(meta, topic_keys(), IteratorMode::Start)
        .count() as u64;
    let mut progress = Progress::new(total, PROGRESS_EVERY);
    let mut topics = HashMap::new();
    for item in db.iterator_cf_opt(meta, topic_keys(), IteratorMode::Start) {
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
        if let Some(line) = progress.tick() {
            tracing::info!("{line}");
        }
    }
    if let Some(line) = progress.finish() {
        tracing::info!("{line}");
    }
    *s.topics.write() = topics;
    Ok(())
}

/// How often a long recovery reports progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Progress lines for an operator waiting on a recovery at start: "recovering: N of M
/// topics" every `every`, and how long it took, once it took longer than `every`.
struct Progress {
    total: u64,
    done: u64,
    started: std::time::Instant,
    last: std::time::Instant,
    every: std::time::Duration,
}

impl Progress {
    fn new(total: u64, every: std::time::Duration) -> Self {
        let now = std::time::Instant::now();
        Self {
            total,
            done: 0,
            started: now,
            last: now,
            every,
        }
    }

    /// One more topic recovered: a line to log, when one is due.
    fn tick(&mut self) -> Option<String> {
        self.done += 1;
        if self.last.elapsed() < self.every || self.done == self.total {
            return None;
        }
        self.last = std::time::Instant::now();
        Some(format!(
            "store: recovering: {} of {} topics ({}%)",
            self.done,
            self.total,
            self.done * 100 / self.total.max(1)
        ))
    }

    /// The closing line, when the recovery was long enough to report.
    fn finish(&self) -> Option<String> {
        let took = self.started.elapsed();
        (took >= self.every).then(|| {
            format!(
                "store: recovered {} topics in {:.1} s",
                self.done,
                took.as_secs_f64()
            )
        })
    }
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
        recent: Default::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::Progress;
    use std::time::Duration;

    #[test]
    fn progress_reports_n_of_m_when_due() {
        let mut p = Progress::new(3, Duration::ZERO);
        assert_eq!(
            p.tick().as_deref(),
            Some("store: recovering: 1 of 3 topics (33%)")
        );
        assert_eq!(
            p.tick().as_deref(),
            Some("store: recovering: 2 of 3 topics (66%)")
        );
        // The last one is said by the closing line.
        assert_eq!(p.tick(), None);
        assert!(p
            .finish()
            .unwrap()
            .starts_with("store: recovered 3 topics in "));
        // A quick recovery says nothing.
        let mut quick = Progress::new(2, Duration::from_secs(3600));
        assert_eq!(quick.tick(), None);
        assert_eq!(quick.finish(), None);
    }
}

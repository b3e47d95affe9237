//! The writer thread (group commit, topic changes, retention's deletes) and the threads
//! that sync the WAL.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BufMut;
use parking_lot::Mutex;
use rocksdb::{IteratorMode, ReadOptions};
use tokio::sync::{mpsc, oneshot};

use super::batch::Batch;
use super::keys::{
    cq_key, key_index_prefix, kv_key, log_index_key, nul_prefix_end, offset_topic_key, offsets_key,
    offsets_key_topic, offsets_prefix, queue_meta_key, timer_key, topic_meta_key, Header, CF_CQ,
    CF_KEYS, CF_KV, CF_LOG, CF_META, CF_OFFSETS, CF_OFFSET_TOPICS, CF_TIMERS, HEADER_KEY,
    LOG_INDEX_PREFIX, LOG_SEQ_KEY,
};
use super::{backend, Db, QueueState, Shared, TopicState};
use crate::codec;
use crate::error::{Result, StoreError};
use crate::store::{Appended, RetentionReport, WriteBatch, WriteOp, WriteReceipt};
use crate::types::{
    now_millis, tag_hash, MessageId, Millis, QueueEntry, QueueOffset, QueueRef, StoredMessage,
    TimerKey, TopicConfig, TopicName,
};

/// Batches larger than this go to the writer thread even when it is idle: writing them
/// takes long enough that the caller's thread is better off reading on while another
/// core writes.
const INLINE_MAX_BYTES: usize = 8 << 10;

/// Writes are carried out inline only once the writer thread has had nothing to do for
/// this long: under load it groups them, on another core.
const INLINE_AFTER_IDLE_MICROS: u64 = 1_000;

/// How long an answer of [`write_held_back`] is trusted (asked for every inline write,
/// its two properties were 1.5 % of the CPU at 5,000 lone QoS 1 messages a second); a
/// stall beginning meanwhile holds an inline write, as one between check and write did.
const HELD_BACK_RECHECK_MICROS: u64 = 10_000;

/// Whether RocksDB delays or stops writes now (a flush or compaction is behind).
fn write_held_back(db: &Db<'_>) -> bool {
    let int = |name| db.property_int_value(name).ok().flatten().unwrap_or(0);
    int("rocksdb.is-write-stopped") != 0 || int("rocksdb.actual-delayed-write-rate") != 0
}

/// A writer to answer, with what to answer once its write is durable.
type Answer = (oneshot::Sender<Result<WriteReceipt>>, Result<WriteReceipt>);

type Grouped = (
    WriteBatch,
    oneshot::Sender<Result<WriteReceipt>>,
    Option<crate::OnVisible>,
);

pub(super) enum Request {
    /// A batch, who waits for it to be durable, and who to tell once it is readable.
    Write(
        WriteBatch,
        oneshot::Sender<Result<WriteReceipt>>,
        Option<crate::OnVisible>,
    ),
    CreateTopic(TopicName, u32, oneshot::Sender<Result<TopicConfig>>),
    DeleteTopic(TopicName, oneshot::Sender<Result<bool>>),
    /// Delete the commit log below this id (and what pointed into it).
    TrimLog(u64, oneshot::Sender<Result<RetentionReport>>),
}

/// The same backend error again, for one more waiting writer.
fn again(e: &StoreError) -> StoreError {
    match e {
        StoreError::Backend(m) => StoreError::Backend(m.clone()),
        other => StoreError::Backend(other.to_string()),
    }
}

/// The every-batch policy's fsync: take every group written so far, sync the WAL once,
/// answer them all. While it syncs, the writer goes on writing the next groups.
pub(super) fn sync_loop(shared: &Shared, rx: std::sync::mpsc::Receiver<Vec<Answer>>) {
    while let Ok(mut answers) = rx.recv() {
        let mut batches = 1;
        while let Ok(more) = rx.try_recv() {
            answers.extend(more);
            batches += 1;
        }
        let started = std::time::Instant::now();
        let synced = shared
            .db()
            .and_then(|db| db.flush_wal(true).map_err(backend));
        answer_after_sync(shared, synced, started, answers);
        shared.sync_pending.fetch_sub(batches, Ordering::AcqRel);
    }
}

/// After a WAL sync: answer the writers of everything written before it began (a failed
/// sync fails them all and marks the store degraded).
fn answer_after_sync(
    shared: &Shared,
    synced: Result<()>,
    started: std::time::Instant,
    answers: Vec<Answer>,
) {
    if let Err(e) = synced {
        shared.health.failed("WAL sync", &e);
        return Writer::fail(answers, e);
    }
    metrics::histogram!(crate::metrics::FSYNC_SECONDS).record(started.elapsed());
    for (done, r) in answers {
        let _ = done.send(r);
    }
}

pub(super) fn periodic_fsync(shared: &Shared, interval: Duration) {
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

/// The writer thread: the only code that mutates the database and the shared counters.
pub(super) struct Writer {
    s: Arc<Shared>,
    /// Under the every-batch policy: the syncer thread, which fsyncs the WAL and only
    /// then answers the writers of the groups written before the sync began.
    syncer: Option<std::sync::mpsc::Sender<Vec<Answer>>>,
    /// Reused encode buffer.
    buf: Vec<u8>,
    /// The queues of a client batch's appends, resolved once (reused).
    resolved: Vec<(u64, u32)>,
    /// Timestamp of the last batch: store timestamps never go back.
    last_ts: Millis,
    /// With an external log: the sequence of the last record (appended and applied).
    log_seq: Option<u64>,
    /// The last answer of [`write_held_back`] and when it was asked
    /// ([`Shared::clock_micros`]; `None`: never).
    held_back: Option<(u64, bool)>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("last_ts", &self.last_ts)
            .field("log_seq", &self.log_seq)
            .finish_non_exhaustive()
    }
}

/// What a group batch will change once written.
#[derive(Default)]
struct Pending {
    header: Header,
    /// (uid, queue) -> the queue's changes in this group
    queues: HashMap<(u64, u32), Slot>,
    tail: Vec<Arc<StoredMessage>>,
    /// Timers put and deleted in this group (so deletes count right before the write).
    timers_put: HashSet<TimerKey>,
    timers_deleted: HashSet<TimerKey>,
    log_min: Option<u64>,
}

/// One queue's changes in a group commit.
struct Slot {
    state: Arc<QueueState>,
    min: u64,
    next: u64,
    /// Its new entries, kept while a consumer reads at its tail (`read::Recent`).
    recent: Option<Vec<QueueEntry>>,
}

impl Writer {
    pub(super) fn new(
        s: Arc<Shared>,
        syncer: Option<std::sync::mpsc::Sender<Vec<Answer>>>,
        log_seq: Option<u64>,
    ) -> Self {
        Self {
            s,
            syncer,
            buf: Vec::with_capacity(64 << 10),
            resolved: Vec::new(),
            last_ts: 0,
            log_seq,
            held_back: None,
        }
    }

    /// The writer thread: carries out what reaches it through the channel, holding the
    /// writer's lock from taking the first request until the group is written, so a
    /// write carried out on its caller's thread ([`Writer::write_inline`]) never
    /// passes one queued before it.
    pub(super) fn run(writer: &Mutex<Writer>, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.blocking_recv() {
            let mut w = writer.lock();
            let mut taken = 1;
            let mut group: Vec<Grouped> = Vec::new();
            let mut group_bytes = 0usize;
            let mut next = Some(first);
            // Whether the queue was found empty (not the group full) when it closed.
            let mut drained = false;
            while let Some(req) = next.take() {
                match req {
                    Request::Write(batch, done, visible) => {
                        group_bytes += batch_size(&batch);
                        group.push((batch, done, visible));
                    }
                    other => {
                        w.commit_group(std::mem::take(&mut group), false);
                        group_bytes = 0;
                        w.admin(other);
                    }
                }
                if group_bytes < w.s.config.max_batch_bytes {
                    next = rx.try_recv().ok();
                    taken += usize::from(next.is_some());
                    drained = next.is_none();
                }
            }
            w.commit_group(group, drained);
            w.s.queued.fetch_sub(taken, Ordering::AcqRel);
            w.s.thread_wrote_at
                .store(w.s.clock_micros(), Ordering::Release);
        }
    }

    /// Write `batch` on the caller's thread when nothing is queued for the writer
    /// thread and it is not writing: no thread hand-off. Under the every-batch policy the
    /// answer still waits for the sync thread; otherwise it is ready on return. The
    /// batch comes back when it has to be queued instead.
    pub(super) fn write_inline(
        writer: &Mutex<Writer>,
        s: &Shared,
        batch: WriteBatch,
        visible: Option<crate::OnVisible>,
    ) -> std::result::Result<
        oneshot::Receiver<Result<WriteReceipt>>,
        (WriteBatch, Option<crate::OnVisible>),
    > {
        // Under load (the writer thread wrote in the last millisecond), or for a large
        // batch, the writer thread writes while the caller's thread reads on.
        if s.queued.load(Ordering::Acquire) != 0
            || batch_size(&batch) > INLINE_MAX_BYTES
            || s.clock_micros()
                .saturating_sub(s.thread_wrote_at.load(Ordering::Acquire))
                < INLINE_AFTER_IDLE_MICROS
        {
            return Err((batch, visible));
        }
        let Some(mut w) = writer.try_lock() else {
            return Err((batch, visible));
        };
        // Checked again under the lock: what the thread took is counted until written.
        if s.queued.load(Ordering::Acquire) != 0 {
            return Err((batch, visible));
        }
        // Never on a caller's thread while RocksDB holds writes back (too many memtables
        // or level-0 files): that wait is the writer thread's.
        let now = s.clock_micros();
        let held_back = match w.held_back {
            Some((at, held)) if now.saturating_sub(at) < HELD_BACK_RECHECK_MICROS => held,
            _ => {
                let held = s.db().map_or(true, |db| write_held_back(&db));
                w.held_back = Some((now, held));
                held
            }
        };
        if held_back {
            return Err((batch, visible));
        }
        let (tx, rx) = oneshot::channel();
        w.commit_group(vec![(batch, tx, visible)], false);
        Ok(rx)
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

    /// Write one RocksDB batch (never synced here: the every-batch policy syncs the WAL
    /// right after): with an external log, append it there first (durable once that
    /// returns) and then apply it here, with the record's sequence, without RocksDB's WAL
    /// (the log is the WAL). `first_id`: the first message id the batch appends, if any.
    fn write_db(&mut self, db: &Db<'_>, mut wb: Batch, first_id: Option<u64>) -> Result<()> {
        let Some(log) = self.s.config.external_log.clone() else {
            return wb.write(db, false).map_err(StoreError::Backend);
        };
        let seq = log.append(wb.data(), first_id)?;
        super::mark_applied(&mut wb, db.cf(CF_META), seq, first_id);
        wb.write(db, true).map_err(|e| {
            log.poison(&format!("the view could not apply record {seq}: {e}"));
            StoreError::Backend(e)
        })?;
        self.log_seq = Some(seq);
        self.s
            .log_position
            .store(seq, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// One RocksDB write outside a group commit (topics, retention); a failure marks
    /// the store degraded.
    fn write_raw(&mut self, db: &Db<'_>, wb: Batch) -> Result<()> {
        self.write_db(db, wb, None)
            .inspect_err(|e| self.failed("write", e))
    }

    /// A failed write marks the store degraded; not with an external log, whose
    /// failure ends this process's turn as the writer (the log says so itself).
    fn failed(&self, what: &str, e: &StoreError) {
        if self.s.config.external_log.is_none() {
            self.s.health.failed(what, e);
        }
    }

    /// Write one group commit. `idle`: nothing else is queued behind it.
    fn commit_group(&mut self, group: Vec<Grouped>, idle: bool) {
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
        // Sized once: grown by doubling, RocksDB's batch (a std::string) copied
        // everything already in it again, 2 % of the broker's CPU on 4 KiB messages.
        let mut wb = Batch::with_capacity_bytes(
            BATCH_REP_HEADER + group.iter().map(|(b, _, _)| rep_bytes(b)).sum::<usize>(),
        );
        let mut pending = Pending {
            header: s.header(),
            ..Pending::default()
        };
        let mut answers = Vec::with_capacity(group.len());
        let sync = group.iter().any(|(b, _, _)| !b.no_sync);
        // Only an external log indexes its records by first message id.
        let appends = s.config.external_log.is_some()
            && group
                .iter()
                .any(|(b, _, _)| b.ops.iter().any(|op| matches!(op, WriteOp::Append { .. })));
        let first_id = appends.then_some(pending.header.next_seq);
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
        let written = self.write_db(&db, wb, first_id);
        s.writing_since.store(0, Ordering::Release);
        if let Err(e) = written {
            self.failed("write", &e);
            return Self::fail(answers, e);
        }
        metrics::histogram!(crate::metrics::APPEND_SECONDS).record(started.elapsed());
        // Readable before durable: consumers may be handed the batch while its fsync
        // runs (a crash then loses what no writer was told is stored: the writers
        // resend, at least once). Writers are answered only after the sync.
        self.publish(pending);
        for v in visible {
            v();
        }
        // The sync runs on its own thread while this one writes the next group; the
        // writers are answered once a sync that began after their write is done. A lone
        // group (nothing queued behind it, no sync running) is synced here: waking the
        // sync thread for it would cost two thread switches and win nothing.
        // With an external log, durable already.
        let sync = sync && self.log_seq.is_none();
        if sync && self.syncer.is_some() && idle && s.sync_pending.load(Ordering::Acquire) == 0 {
            let started = std::time::Instant::now();
            let synced = db.flush_wal(true).map_err(backend);
            return answer_after_sync(&s, synced, started, answers);
        }
        let answers = match (&self.syncer, sync) {
            (Some(syncer), true) => match Self::hand_to_syncer(&s, syncer, answers) {
                Ok(()) => return,
                // The sync thread is gone (it only ends with the writer, so it
                // panicked): sync here rather than answer anything unsynced.
                Err(back) => {
                    s.sync_pending.fetch_sub(1, Ordering::AcqRel);
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

    /// Hand a group's answers to the sync thread, counted as pending until it syncs.
    fn hand_to_syncer(
        s: &Shared,
        syncer: &std::sync::mpsc::Sender<Vec<Answer>>,
        answers: Vec<Answer>,
    ) -> std::result::Result<(), std::sync::mpsc::SendError<Vec<Answer>>> {
        s.sync_pending.fetch_add(1, Ordering::AcqRel);
        syncer.send(answers)
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
        for slot in p.queues.into_values() {
            if let Some(entries) = &slot.recent {
                // Before the end moves: a read up to it finds them.
                slot.state.recent.append(entries);
            }
            slot.state.min.store(slot.min, Ordering::Release);
            slot.state.next.store(slot.next, Ordering::Release);
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
        pending
            .queues
            .entry((t.uid, q.queue.0))
            .or_insert_with(|| Slot {
                state: Arc::clone(state),
                min: state.min.load(Ordering::Acquire),
                next: state.next.load(Ordering::Acquire),
                recent: state.recent.armed().then(Vec::new),
            });
        Ok((t.uid, q.queue.0))
    }

    /// Add one client batch to the group, or refuse it whole without touching the group.
    fn stage(
        &mut self,
        topics: &HashMap<TopicName, Arc<TopicState>>,
        wb: &mut Batch,
        pending: &mut Pending,
        batch: WriteBatch,
        now: Millis,
    ) -> Result<WriteReceipt> {
        let s = Arc::clone(&self.s);
        let db = s.db()?;
        // Validate first: a refused batch leaves no trace, and applying cannot fail.
        self.resolved.clear();
        let mut last: Option<(&QueueRef, (u64, u32))> = None;
        let mut timers_on_disk = HashSet::new();
        for op in &batch.ops {
            match op {
                WriteOp::Append { message, queues } => {
                    codec::validate(message)?;
                    for q in queues {
                        // A batch mostly appends to one queue: looked up once per run.
                        let at = match last {
                            Some((l, at)) if l == q => at,
                            _ => Self::resolve(topics, pending, q)?,
                        };
                        last = Some((q, at));
                        self.resolved.push(at);
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
        receipt.appended.reserve(batch.ops.len());
        pending.tail.reserve(batch.ops.len());
        // Looked up once a batch, not once a message (each a search by name).
        let (cf_log, cf_cq, cf_keys) = (db.cf(CF_LOG), db.cf(CF_CQ), db.cf(CF_KEYS));
        // The appends' queues, in the order validated above.
        let mut resolved = 0;
        for op in batch.ops {
            match op {
                WriteOp::Append { message, queues } => {
                    let id = pending.header.next_seq;
                    pending.header.next_seq += 1;
                    self.buf.clear();
                    codec::encode_head(&message, now, &mut self.buf);
                    let size = (self.buf.len() + message.body.len()) as u32;
                    wb.put_parts_cf(cf_log, &id.to_be_bytes(), &[&self.buf, &message.body]);
                    for k in &message.keys {
                        let mut key = key_index_prefix(&message.topic, k);
                        key.put_u64(id);
                        wb.put_cf(cf_keys, key, []);
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
                        let (uid, qid) = self.resolved[resolved];
                        resolved += 1;
                        let slot = pending.queues.get_mut(&(uid, qid)).expect("resolved");
                        let offset = slot.next;
                        slot.next += 1;
                        let e = entry(offset);
                        wb.put_cf(cf_cq, cq_key(uid, qid, offset), codec::encode_entry(&e));
                        if let Some(recent) = &mut slot.recent {
                            recent.push(e);
                        }
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
                    // No offsets outlive their topic: what a group that lived on across
                    // the topic's deletion commits for it (acks, a member leaving) before
                    // a topic of that name exists again is left out, not carried over.
                    if !topics.contains_key(&queue.topic) {
                        continue;
                    }
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
                            let it = db.prefix_iter(CF_OFFSETS, &prefix);
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
                    let new_min = before.0.clamp(slot.min, slot.next);
                    if new_min > slot.min {
                        wb.delete_range_cf(
                            db.cf(CF_CQ),
                            cq_key(uid, qid, slot.min),
                            cq_key(uid, qid, new_min),
                        );
                        wb.put_cf(
                            db.cf(CF_META),
                            queue_meta_key(uid, qid),
                            new_min.to_be_bytes(),
                        );
                        slot.min = new_min;
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
        // batch that removes the topic, and a commit on a topic that does not exist is
        // left out (`stage`), so none are waiting. Scanning every group's offsets here
        // made each new topic cost O(all offsets).
        let mut wb = Batch::default();
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
        let mut wb = Batch::default();
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
    fn delete_topic_offsets(&self, wb: &mut Batch, name: &TopicName) -> Result<()> {
        let db = self.s.db()?;
        let mut prefix = name.as_str().as_bytes().to_vec();
        prefix.push(0);
        let it = db.prefix_iter(CF_OFFSET_TOPICS, &prefix);
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
        let mut wb = Batch::default();
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
        if s.config.external_log.is_some() {
            self.compact_external_log(&db, below)?;
        }
        Ok(report)
    }

    /// With an external log, after retention deleted the messages below `below`: the
    /// records before the one holding message `below` hold nothing live but state
    /// (offsets, keyed area, timers, topics and queue minimums, counters). Copy that
    /// state forward into one checkpoint record, then drop those records from the log.
    /// A node that rebuilds its view replays from the oldest kept record: what it
    /// replays before the checkpoint is overwritten by it, or deleted later in the log
    /// as it was here.
    fn compact_external_log(&mut self, db: &Db<'_>, below: u64) -> Result<()> {
        let Some(log) = self.s.config.external_log.clone() else {
            return Ok(());
        };
        // The record whose first append is the greatest id <= `below` holds `below`.
        let seek = log_index_key(below);
        let mut keep = None;
        let mut stale = Vec::new();
        for item in db.iterator_cf(
            db.cf(CF_META),
            IteratorMode::From(&seek, rocksdb::Direction::Reverse),
        ) {
            let (k, v) = item.map_err(backend)?;
            if !k.starts_with(LOG_INDEX_PREFIX) {
                break;
            }
            if keep.is_none() {
                keep = Some(super::keys::be_u64(&v)?);
            } else {
                stale.push(k);
            }
        }
        let Some(keep) = keep else {
            return Ok(());
        };
        let mut wb = Batch::default();
        for cf in [CF_OFFSETS, CF_OFFSET_TOPICS, CF_KV, CF_TIMERS, CF_META] {
            for item in db.iterator_cf(db.cf(cf), IteratorMode::Start) {
                let (k, v) = item.map_err(backend)?;
                if cf == CF_META && (&*k == LOG_SEQ_KEY || k.starts_with(LOG_INDEX_PREFIX)) {
                    continue;
                }
                wb.put_cf(db.cf(cf), k, v);
            }
        }
        // Index entries of records about to go.
        for k in stale {
            wb.delete_cf(db.cf(CF_META), k);
        }
        self.write_raw(db, wb)?;
        log.purge_below(keep)
    }
}

/// RocksDB's batch header (sequence and count) and the store header's own record.
const BATCH_REP_HEADER: usize = 12 + 64;

/// About what `stage` puts into RocksDB's batch for `b` (each record: a type byte, the
/// column family's id, the key's and the value's lengths as varints, then both), never
/// less for appends, which are what a batch is mostly made of.
fn rep_bytes(b: &WriteBatch) -> usize {
    const RECORD: usize = 1 + 5 + 5 + 5;
    b.ops
        .iter()
        .map(|op| match op {
            WriteOp::Append { message, queues } => {
                let topic = message.topic.as_str().len();
                RECORD
                    + 8
                    + codec::encoded_len(message)
                    + message
                        .keys
                        .iter()
                        .map(|k| RECORD + topic + k.len() + 2 + 8)
                        .sum::<usize>()
                    + queues.len() * (RECORD + 20 + codec::ENTRY_LEN)
            }
            WriteOp::KvPut {
                namespace,
                key,
                value,
            } => RECORD + namespace.len() + key.len() + 2 + value.len(),
            WriteOp::TimerPut { payload, .. } => RECORD + 16 + payload.len(),
            _ => 2 * RECORD + 128,
        })
        .sum()
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

//! The log on JetStream as `RocksStore`'s writer sees it ([`JsLog`]), and the ordered
//! read of the stream that views apply ([`Tail`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, DeliverPolicy},
    context::PublishErrorKind,
    message::PublishMessage,
    stream,
};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use tokio::runtime::Handle;
use tokio::sync::watch;

use super::{nats, Role, HDR_FENCE, HDR_FIRST_ID, HDR_HANDOVER, HDR_MSG_ID, HDR_PART};
use crate::error::{Result, StoreError};
use crate::rocks::{ApplyRecord, ExternalLog, View};

/// An ordered read of the stream from a sequence, reassembling split records.
pub(super) struct Tail {
    msgs: pull::Ordered,
    pub(super) applied: u64,
    partial: Vec<u8>,
    parts_seen: u32,
}

impl Tail {
    pub(super) async fn start(stream: &stream::Stream, from: u64) -> Result<Self> {
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(|e| nats("read the log", e))?;
        let msgs = consumer
            .messages()
            .await
            .map_err(|e| nats("read the log", e))?;
        Ok(Self {
            msgs,
            applied: from.saturating_sub(1),
            partial: Vec::new(),
            parts_seen: 0,
        })
    }

    /// Apply records until `last` is applied (or seen: an incomplete record at the end
    /// is not applied), or until `deadline`.
    pub(super) async fn apply_until<A: Apply + ?Sized>(
        &mut self,
        view: &A,
        last: Option<u64>,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<()> {
        let mut seen = self.applied;
        loop {
            if last.is_some_and(|l| seen >= l) {
                return Ok(());
            }
            let next = match deadline {
                Some(d) => match tokio::time::timeout_at(d, self.msgs.next()).await {
                    Ok(n) => n,
                    Err(_) => return Ok(()),
                },
                None => self.msgs.next().await,
            };
            let m = match next {
                Some(Ok(m)) => m,
                Some(Err(e)) => return Err(nats("read the log", e)),
                None => return Err(nats("read the log", "the consumer ended")),
            };
            let seq = m
                .info()
                .map_err(|e| nats("read the log", e))?
                .stream_sequence;
            seen = seq;
            let part = m
                .headers
                .as_ref()
                .and_then(|h| h.get(HDR_PART))
                .and_then(|v| parse_part(v.as_str()));
            let first_id = m
                .headers
                .as_ref()
                .and_then(|h| h.get(HDR_FIRST_ID))
                .and_then(|v| v.as_str().parse::<u64>().ok());
            match part {
                None => {
                    // A whole record (an incomplete split one before it is dropped:
                    // its writer died between the parts).
                    self.partial.clear();
                    self.parts_seen = 0;
                    view.apply(seq, first_id, &m.payload)?;
                    self.applied = seq;
                }
                Some((i, n)) => {
                    if i == 1 {
                        self.partial.clear();
                        self.parts_seen = 0;
                    }
                    if i != self.parts_seen + 1 {
                        // A part without its predecessors: the rest of a dropped record.
                        continue;
                    }
                    self.partial.extend_from_slice(&m.payload);
                    self.parts_seen = i;
                    if i == n {
                        let record = std::mem::take(&mut self.partial);
                        self.parts_seen = 0;
                        view.apply(seq, first_id, &record)?;
                        self.applied = seq;
                    }
                }
            }
        }
    }
}

fn parse_part(v: &str) -> Option<(u32, u32)> {
    let (i, n) = v.split_once('/')?;
    Some((i.parse().ok()?, n.parse().ok()?))
}

/// Where records are applied.
pub(super) trait Apply {
    fn apply(&self, seq: u64, first_id: Option<u64>, record: &[u8]) -> Result<()>;
}

impl Apply for View {
    fn apply(&self, seq: u64, first_id: Option<u64>, record: &[u8]) -> Result<()> {
        View::apply(self, seq, first_id, record)
    }
}

struct ApplyFn<'a>(Mutex<ApplyRecord<'a>>);

impl Apply for ApplyFn<'_> {
    fn apply(&self, seq: u64, first_id: Option<u64>, record: &[u8]) -> Result<()> {
        (self.0.lock())(seq, first_id, record)
    }
}

/// The log on JetStream, as [`RocksStore`]'s writer sees it.
#[derive(Debug)]
pub(super) struct JsLog {
    pub(super) rt: Handle,
    pub(super) js: jetstream::Context,
    pub(super) stream: stream::Stream,
    pub(super) subject: String,
    pub(super) node: String,
    pub(super) epoch: u64,
    /// The last sequence appended (or applied at take-over).
    pub(super) last: Mutex<u64>,
    /// The largest part of a split record.
    pub(super) part_bytes: usize,
    pub(super) role: Arc<watch::Sender<Role>>,
    pub(super) closing: AtomicBool,
    /// Notified when the store closes: wakes a store thread waiting for NATS.
    pub(super) closed: tokio::sync::Notify,
    pub(super) lost: AtomicBool,
    /// `last`, readable without waiting for an append in progress.
    pub(super) tip: AtomicU64,
}

/// How one publish ended.
enum Published {
    Stored,
    /// The stream's last sequence was not the expected one, and the record there is
    /// not this one: another writer appended.
    Conflict,
}

impl JsLog {
    pub(super) fn lose(&self, reason: String) {
        if !self.lost.swap(true, Ordering::AcqRel) {
            tracing::error!(node = %self.node, epoch = self.epoch, %reason, "replication: stepping down; this node no longer writes the log");
            metrics::counter!(crate::metrics::REPLICATION_STEP_DOWNS).increment(1);
            self.role.send_replace(Role::SteppedDown { reason });
        }
    }

    /// Run `fut` to its end here, on a store thread (never a runtime worker), or until
    /// the store closes. Only the runtime's workers drive its sockets and timers, and
    /// the thread that closes the store may be one of them, joining this thread (the
    /// last handle on the store let go on a worker: a runtime with one worker, or one
    /// being dropped): an answer awaited without end would then never come, and
    /// neither thread would end. So closing the store ([`ExternalLog::close`]) wakes
    /// this wait directly (a waker unparks this thread, no worker needed) and it gives
    /// the answer up: [`StoreError::Closed`]. Nobody waits for that write any more
    /// (the store's last handle is gone); it is not confirmed, and the next owner reads
    /// the stream as it is.
    fn wait<F: std::future::Future>(&self, fut: F) -> Result<F::Output> {
        self.rt.block_on(async {
            let closed = self.closed.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.closing.load(Ordering::Acquire) {
                return Err(StoreError::Closed);
            }
            tokio::select! {
                biased;
                v = fut => Ok(v),
                () = closed => {
                    tracing::warn!(node = %self.node, "replication: closing without NATS's answer to a write in progress (not confirmed; the next owner reads the stream as it is)");
                    Err(StoreError::Closed)
                }
            }
        })
    }

    fn check(&self) -> Result<()> {
        if self.lost.load(Ordering::Acquire) {
            return Err(StoreError::Backend(
                "this node no longer owns the replicated log (stepped down)".into(),
            ));
        }
        if self.closing.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// Publish one stream message as sequence `seq`, retrying while the servers are
    /// unavailable (the same message id: a retry of a publish that did land is
    /// deduplicated, or recognised by its id).
    fn publish(&self, seq: u64, payload: Bytes, headers: &[(&str, String)]) -> Result<Published> {
        let id = format!("{}.{}.{}", self.node, self.epoch, seq);
        let mut backoff = Duration::from_millis(20);
        let mut unavailable_since: Option<std::time::Instant> = None;
        loop {
            self.check()?;
            let msg = self.message(seq, payload.clone(), headers);
            let r = self.wait(async {
                let ack = self.js.send_publish(self.subject.clone(), msg).await?;
                ack.await
            })?;
            match r {
                Ok(ack) if ack.sequence == seq => {
                    if let Some(since) = unavailable_since {
                        metrics::gauge!(crate::metrics::REPLICATION_BLOCKED).set(0.0);
                        tracing::info!(
                            waited_ms = since.elapsed().as_millis() as u64,
                            "replication: the log takes writes again"
                        );
                    }
                    return Ok(Published::Stored);
                }
                Ok(ack) => {
                    return Err(StoreError::Backend(format!(
                        "NATS JetStream stored record {seq} as {} (the stream changed under this writer)",
                        ack.sequence
                    )));
                }
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => {
                    return if self.holds(seq, &id)? {
                        Ok(Published::Stored)
                    } else {
                        Ok(Published::Conflict)
                    };
                }
                Err(e) => {
                    if unavailable_since.is_none() {
                        unavailable_since = Some(std::time::Instant::now());
                        metrics::gauge!(crate::metrics::REPLICATION_BLOCKED).set(1.0);
                        tracing::warn!(error = %e, seq, "replication: the log does not take writes (no quorum or no server); writers wait");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
    }

    /// The stream message for sequence `seq`.
    fn message(&self, seq: u64, payload: Bytes, headers: &[(&str, String)]) -> PublishMessage {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, v.as_str());
        }
        PublishMessage::build()
            .payload(payload)
            .headers(h)
            .expected_last_sequence(seq - 1)
            .message_id(format!("{}.{}.{}", self.node, self.epoch, seq))
    }

    /// Publish the parts of a split record all at once (each still expecting its
    /// predecessor's sequence), then await their acknowledgements in order: one round
    /// trip to the quorum instead of one per part. Returns how many, from the first,
    /// are stored; the rest go through [`JsLog::publish`] one by one.
    fn publish_parts(&self, base: u64, parts: &[(Bytes, Vec<(&str, String)>)]) -> usize {
        self.wait(async {
            let mut acks = Vec::with_capacity(parts.len());
            for (i, (payload, headers)) in parts.iter().enumerate() {
                let msg = self.message(base + 1 + i as u64, payload.clone(), headers);
                match self.js.send_publish(self.subject.clone(), msg).await {
                    Ok(ack) => acks.push(ack),
                    Err(_) => break,
                }
            }
            let mut stored = 0;
            for (i, ack) in acks.into_iter().enumerate() {
                match ack.await {
                    Ok(a) if a.sequence == base + 1 + i as u64 => stored += 1,
                    _ => break,
                }
            }
            stored
        })
        .unwrap_or(0)
    }

    /// Whether the stream's record `seq` is the one with message id `id`.
    fn holds(&self, seq: u64, id: &str) -> Result<bool> {
        let mut backoff = Duration::from_millis(20);
        for _ in 0..50 {
            self.check()?;
            match self.wait(self.stream.get_raw_message(seq))? {
                Ok(m) => {
                    return Ok(m.headers.get(HDR_MSG_ID).is_some_and(|v| v.as_str() == id));
                }
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                    return Ok(false)
                }
                Err(_) => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(500));
                }
            }
        }
        Err(nats("check who appended a record", "no answer"))
    }

    fn fence(&self, last: u64) -> Result<Published> {
        let empty = Bytes::copy_from_slice(rocksdb::WriteBatch::default().data());
        self.publish(
            last + 1,
            empty,
            &[(HDR_FENCE, format!("{}/{}", self.node, self.epoch))],
        )
    }
}

impl JsLog {
    /// Append the hand-over record (an empty batch naming `to`) after every earlier
    /// record, then refuse further appends: the log is the successor's. Fenced like any
    /// append: if another node appended meanwhile, this node steps down instead.
    pub(super) fn hand_over(&self, to: Option<&str>) -> Result<u64> {
        let mut last = self.last.lock();
        let seq = *last + 1;
        let empty = Bytes::copy_from_slice(rocksdb::WriteBatch::default().data());
        let header = format!("{}/{} {}", self.node, self.epoch, to.unwrap_or("-"));
        match self.publish(seq, empty, &[(HDR_HANDOVER, header)])? {
            Published::Stored => {
                *last = seq;
                self.tip.store(seq, Ordering::Release);
                // Held under `last`: no append of the store's writer slips in after it.
                self.closing.store(true, Ordering::Release);
                Ok(seq)
            }
            Published::Conflict => {
                self.lose(format!(
                    "another node appended record {seq}: the log was fenced before the hand-over"
                ));
                Err(StoreError::Backend(
                    "this node no longer owns the replicated log (fenced)".into(),
                ))
            }
        }
    }
}

impl ExternalLog for JsLog {
    fn take_over(&self, applied: u64, apply: ApplyRecord<'_>) -> Result<u64> {
        let apply = ApplyFn(Mutex::new(apply));
        let mut applied = applied;
        loop {
            self.check()?;
            let mut stream = self.stream.clone();
            let (first, last) = self
                .rt
                .block_on(stream.info())
                .map(|i| (i.state.first_sequence, i.state.last_sequence))
                .map_err(|e| nats("read the stream's state", e))?;
            if applied + 1 < first && last > 0 {
                return Err(StoreError::Backend(format!(
                    "the view has the log up to {applied} but the stream starts at {first}: \
                     remove the view's folder and start again to rebuild it"
                )));
            }
            if last > applied {
                applied = self.rt.block_on(async {
                    let mut t = Tail::start(&stream, applied + 1).await?;
                    t.apply_until(&apply, Some(last), None).await?;
                    Ok::<_, StoreError>(t.applied.max(applied))
                })?;
            }
            // Records seen but not applied (an incomplete split record) count too:
            // the fence goes after the stream's last sequence.
            let tip = last.max(applied);
            match self.fence(tip)? {
                Published::Stored => {
                    let fence = tip + 1;
                    apply.apply(fence, None, rocksdb::WriteBatch::default().data())?;
                    *self.last.lock() = fence;
                    self.tip.store(fence, Ordering::Release);
                    tracing::info!(node = %self.node, epoch = self.epoch, fence, "replication: the log is fenced; this node is its only writer");
                    return Ok(fence);
                }
                // The old owner appended after the catch-up: catch up again.
                Published::Conflict => continue,
            }
        }
    }

    fn append(&self, record: &[u8], first_id: Option<u64>) -> Result<u64> {
        let mut last = self.last.lock();
        let parts: Vec<&[u8]> = if record.is_empty() {
            vec![record]
        } else {
            record.chunks(self.part_bytes).collect()
        };
        let n = parts.len();
        let parts: Vec<(Bytes, Vec<(&str, String)>)> = parts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut headers = Vec::new();
                if n > 1 {
                    headers.push((HDR_PART, format!("{}/{n}", i + 1)));
                }
                if let Some(id) = first_id {
                    headers.push((HDR_FIRST_ID, id.to_string()));
                }
                (Bytes::copy_from_slice(p), headers)
            })
            .collect();
        let base = *last;
        let pipelined = if n > 1 {
            self.publish_parts(base, &parts)
        } else {
            0
        };
        let mut seq = base + pipelined as u64;
        *last = seq;
        self.tip.store(seq, Ordering::Release);
        for (payload, headers) in parts.into_iter().skip(pipelined) {
            seq += 1;
            match self.publish(seq, payload, &headers) {
                Ok(Published::Stored) => {}
                Ok(Published::Conflict) => {
                    self.lose(format!(
                        "another node appended record {seq}: the log is fenced against this one"
                    ));
                    return Err(StoreError::Backend(
                        "this node no longer owns the replicated log (fenced)".into(),
                    ));
                }
                // Parts already stored are dropped by readers (incomplete); this
                // node appends nothing more (it stepped down or is closing).
                Err(e) => return Err(e),
            }
            *last = seq;
            self.tip.store(seq, Ordering::Release);
        }
        metrics::counter!(crate::metrics::REPLICATION_RECORDS).increment(1);
        Ok(seq)
    }

    fn purge_below(&self, seq: u64) -> Result<()> {
        self.check()?;
        let purged = self
            .wait(std::future::IntoFuture::into_future(
                self.stream.purge().sequence(seq),
            ))?
            .map_err(|e| nats("purge the log below the retention checkpoint", e))?;
        tracing::info!(
            below = seq,
            records = purged.purged,
            "replication: records before the retention checkpoint purged from the log"
        );
        Ok(())
    }

    fn poison(&self, reason: &str) {
        self.lose(reason.to_string());
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.closed.notify_waiters();
    }
}

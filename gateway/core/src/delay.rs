//! The delay scheduler: releases due timers into their topics.
//!
//! # Delayed message state machine
//! ```text
//!  publish with delay ──> Pending (a timer in the store: due time, route, whole message)
//!  Pending ──(due; one store batch: append to the routed queues + delete the timer)──> Released
//!  crash while Pending ──> still Pending after restart, released late by at most the downtime
//! ```
//! The scheduler keeps a cursor (the last timer it released) so it never rescans released
//! ones; a timer added before the cursor (a short delay while long ones are being
//! released) rewinds it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Weak;
use std::time::Duration;

use bytes::{BufMut, Bytes};
use mqgate_store::{Message, Millis, QueueRef, TimerKey, TopicName, WriteBatch};
use tokio::sync::Notify;

use crate::broker::{Broker, ShardCore};
use crate::error::{CoreError, Result};
use crate::router::HeaderValue;
use crate::wire::{get_headers, put_headers, put_str, Reader};

pub(crate) async fn run(inner: Weak<ShardCore>) {
    let mut cursor: Option<TimerKey> = None;
    loop {
        let Some(b) = inner.upgrade() else { return };
        if let Some(rewind) = b.delay_rewind() {
            if cursor.is_some_and(|c| rewind <= c.due) {
                cursor = None;
            }
        }
        match b.release_due(cursor).await {
            Ok((n, last)) => {
                cursor = last;
                if n >= b.config.release_batch {
                    continue;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "core: releasing delayed messages failed; retrying");
                drop(b);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        let next = match b.store.timers_due(u64::MAX, cursor, 1).await {
            Ok(v) => v.first().map(|(k, _)| k.due),
            Err(e) => {
                tracing::error!(error = %e, "core: reading timers failed");
                Some(b.clock.now() + 100)
            }
        };
        let clock = std::sync::Arc::clone(&b.clock);
        tokio::select! {
            _ = clock.sleep_until(next.unwrap_or(u64::MAX)), if next.is_some() => {}
            _ = b.delay_woken() => {}
        }
    }
}

/// The scheduler's state in the core.
#[derive(Debug)]
pub(crate) struct DelayState {
    /// Wakes the scheduler when a timer earlier than its current wait is added.
    pub(crate) wake: Notify,
    /// The earliest due time the scheduler may have skipped past (u64::MAX: none).
    pub(crate) rewind: AtomicU64,
    /// Delayed messages released by this process.
    pub(crate) released: AtomicU64,
    /// Generations of named timers (unique across restarts: seeded with the time in µs).
    pub(crate) next_generation: AtomicU64,
    /// Held by a release from reading named timers' names until its batch is written,
    /// and by schedule/cancel of a named timer: a schedule that replaces a name while
    /// the old timer is being released is never lost, and a cancel that returns `true`
    /// did stop its timer.
    pub(crate) named: tokio::sync::Mutex<()>,
}

impl DelayState {
    pub(crate) fn new() -> Self {
        Self {
            wake: Notify::new(),
            rewind: AtomicU64::new(u64::MAX),
            released: AtomicU64::new(0),
            next_generation: AtomicU64::new(mqgate_store::now_millis().saturating_mul(1000)),
            named: tokio::sync::Mutex::new(()),
        }
    }
}

/// A route resolved when a delayed message is released (so bindings made during the
/// delay count, as with RabbitMQ's delayed exchange and EMQX's `$delayed`).
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Route {
    Topic {
        topic: TopicName,
        queue: Option<u32>,
        sharding_key: Option<String>,
    },
    Exchange {
        vhost: String,
        exchange: String,
        key: String,
        headers: Vec<(String, HeaderValue)>,
    },
}

/// Keyed-area namespace of named timers: name -> the generation of its current timer
/// (u64 BE), then, for timers scheduled through [`ShardCore::schedule_named`] since it
/// was added, its due time (u64 BE, ms), so [`ShardCore::fire_named`] can find it.
const NS_SCHEDULED: &str = "core.scheduled";

/// The value of a named timer's [`NS_SCHEDULED`] entry.
fn scheduled_value(generation: u64, due: Millis) -> Vec<u8> {
    let mut v = Vec::with_capacity(16);
    v.extend_from_slice(&generation.to_be_bytes());
    v.extend_from_slice(&due.to_be_bytes());
    v
}
/// Keyed-area namespace indexing delayed messages with keys, for cancelling by key:
/// `topic \0 key \0 generation (u64 BE)` -> nothing. The message's timer is named
/// [`DELAYED_PREFIX`] + generation; cancelling deletes that name, so the timer releases
/// into nothing.
const NS_DELAYED_KEYS: &str = "core.delayed.keys";
/// Name prefix of the timers of delayed messages with keys.
const DELAYED_PREFIX: &str = "delayed/";

fn delayed_key_prefix(topic: &str, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(topic.len() + key.len() + 10);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    k
}

fn delayed_key_entry(topic: &str, key: &str, generation: u64) -> Vec<u8> {
    let mut k = delayed_key_prefix(topic, key);
    k.extend_from_slice(&generation.to_be_bytes());
    k
}

/// A pending timer as the admin API lists it.
#[derive(Clone, Debug)]
pub struct DelayedInfo {
    /// Its id (`due-seq`): what [`Broker::cancel_delayed`] takes.
    pub id: TimerKey,
    /// What it is: `delayed` (a delayed publish), `retry` (a failed message waiting for
    /// its next attempt) or `scheduled` (a named timer: an MQTT 5 delayed will).
    pub kind: &'static str,
    /// The message's address (MQTT topic, AMQP exchange, RocketMQ topic).
    pub topic: String,
    /// Where it goes when released: a topic, or `exchange/routing key` of a vhost.
    pub route: String,
    /// Its keys.
    pub keys: Vec<String>,
    /// Its producer group.
    pub producer_group: String,
    /// Its body size.
    pub size: usize,
    /// When it was published.
    pub born_timestamp: Millis,
}

/// A page of pending timers and where the next page starts.
#[derive(Clone, Debug, Default)]
pub struct DelayedPage {
    /// The timers, in due order.
    pub timers: Vec<DelayedInfo>,
    /// Pass as `after` for the next page; `None` when there is no more.
    pub next: Option<TimerKey>,
}

/// Stage a delayed message with keys as a cancellable timer: its name and key index
/// entries go in `batch` with it.
pub(crate) fn stage_keyed(
    inner: &ShardCore,
    due: Millis,
    retain: Option<&str>,
    route: &Route,
    message: &Message,
    batch: &mut WriteBatch,
) -> Result<()> {
    let generation = inner.delay.next_generation.fetch_add(1, Ordering::Relaxed);
    let name = format!("{DELAYED_PREFIX}{generation}");
    let payload = encode_named_timer(Some((&name, generation)), retain, route, message)?;
    batch.timer_put(due, payload);
    batch.kv_put(
        NS_SCHEDULED,
        name.into_bytes(),
        generation.to_be_bytes().to_vec(),
    );
    for k in &message.keys {
        batch.kv_put(
            NS_DELAYED_KEYS,
            delayed_key_entry(message.topic.as_str(), k, generation),
            Vec::new(),
        );
    }
    Ok(())
}

/// Remove a keyed delayed message's index entries (released, cancelled, or found
/// cancelled at release).
fn unindex(batch: &mut WriteBatch, name: &str, generation: u64, message: &Message) {
    if name.starts_with(DELAYED_PREFIX) {
        for k in &message.keys {
            batch.kv_delete(
                NS_DELAYED_KEYS,
                delayed_key_entry(message.topic.as_str(), k, generation),
            );
        }
    }
}

fn describe(route: &Route) -> String {
    match route {
        Route::Topic { topic, .. } => topic.to_string(),
        Route::Exchange {
            vhost,
            exchange,
            key,
            ..
        } => format!("{vhost}:{exchange}/{key}"),
    }
}

const ROUTE_TOPIC: u8 = 1;

const ROUTE_EXCHANGE: u8 = 2;

pub(crate) fn encode_timer(route: &Route, message: &Message) -> Result<Vec<u8>> {
    encode_named_timer(None, None, route, message)
}

/// A timer's payload: version 1 `[1][route][message]`; version 2, for a named
/// (cancellable) timer or one that sets a retained message when released,
/// `[2][name][generation u64][retain topic][route][message]` ("" for none).
pub(crate) fn encode_named_timer(
    name: Option<(&str, u64)>,
    retain: Option<&str>,
    route: &Route,
    message: &Message,
) -> Result<Vec<u8>> {
    let body = message.encode()?;
    let mut out = Vec::with_capacity(body.len() + 64);
    if name.is_none() && retain.is_none() {
        out.put_u8(1);
    } else {
        let (n, generation) = name.unwrap_or(("", 0));
        out.put_u8(2);
        put_str(&mut out, n);
        out.put_u64_le(generation);
        put_str(&mut out, retain.unwrap_or(""));
    }
    match route {
        Route::Topic {
            topic,
            queue,
            sharding_key,
        } => {
            out.put_u8(ROUTE_TOPIC);
            put_str(&mut out, topic.as_str());
            out.put_u64_le(queue.map_or(u64::MAX, u64::from));
            put_str(&mut out, sharding_key.as_deref().unwrap_or(""));
            out.put_u8(u8::from(sharding_key.is_some()));
        }
        Route::Exchange {
            vhost,
            exchange,
            key,
            headers,
        } => {
            out.put_u8(ROUTE_EXCHANGE);
            put_str(&mut out, vhost);
            put_str(&mut out, exchange);
            put_str(&mut out, key);
            put_headers(&mut out, headers);
        }
    }
    out.extend_from_slice(&body);
    Ok(out)
}

/// A decoded timer payload.
#[derive(Debug, PartialEq)]
struct DecodedTimer {
    /// Named timers: the name and generation.
    name: Option<(String, u64)>,
    /// The retained topic it sets when released.
    retain: Option<String>,
    route: Route,
    message: Message,
}

fn decode_timer(payload: Bytes) -> Result<DecodedTimer> {
    let mut r = Reader(payload);
    let (name, retain) = match r.u8()? {
        1 => (None, None),
        2 => {
            let name = r.string()?;
            let generation = r.u64()?;
            let retain = r.string()?;
            (
                (!name.is_empty()).then_some((name, generation)),
                (!retain.is_empty()).then_some(retain),
            )
        }
        _ => return Err(CoreError::Invalid("unknown timer payload version".into())),
    };
    let route = match r.u8()? {
        ROUTE_TOPIC => {
            let topic = TopicName::new(r.string()?)?;
            let q = r.u64()?;
            let key = r.string()?;
            let has_key = r.u8()? == 1;
            Route::Topic {
                topic,
                queue: u32::try_from(q).ok(),
                sharding_key: has_key.then_some(key),
            }
        }
        ROUTE_EXCHANGE => {
            let vhost = r.string()?;
            let exchange = r.string()?;
            let key = r.string()?;
            let headers = get_headers(&mut r)?;
            Route::Exchange {
                vhost,
                exchange,
                key,
                headers,
            }
        }
        k => return Err(CoreError::Invalid(format!("unknown route kind {k}"))),
    };
    Ok(DecodedTimer {
        name,
        retain,
        route,
        message: Message::decode(r.rest())?,
    })
}

impl Broker {
    /// Publish `message` through `exchange` of `vhost` at `due` (ms), under `name`: a
    /// later schedule with the same name replaces it and [`Broker::cancel_scheduled`]
    /// withdraws it. Stored as a timer, it survives restarts (MQTT 5 delayed wills).
    /// Routing happens when it fires; with `retain`, it also becomes that MQTT topic's
    /// retained message then, in the same write.
    #[allow(clippy::too_many_arguments)]
    pub async fn schedule_named(
        &self,
        name: &str,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        message: Message,
        retain: Option<&str>,
        due: Millis,
    ) -> Result<()> {
        let route = Route::Exchange {
            vhost: vhost.to_owned(),
            exchange: exchange.to_owned(),
            key: routing_key.to_owned(),
            headers: Vec::new(),
        };
        // Named timers live in shard 0, wherever it is owned.
        let meta = match self.inner.meta() {
            Ok(meta) => meta,
            Err(e) => {
                return self
                    .or_relay(
                        Err(e),
                        || crate::shard::AdminOp::ScheduleNamed {
                            name: name.to_owned(),
                            vhost: vhost.to_owned(),
                            exchange: exchange.to_owned(),
                            key: routing_key.to_owned(),
                            message: Box::new(message),
                            retain: retain.map(str::to_owned),
                            due,
                        },
                        |a| matches!(a, crate::shard::AdminAnswer::Done).then_some(()),
                    )
                    .await;
            }
        };
        meta.schedule_named(name, due, &route, retain, message)
            .await
    }

    /// Withdraw what [`Broker::schedule_named`] scheduled under `name` (if it has not
    /// fired yet); whether something was pending.
    pub async fn cancel_scheduled(&self, name: &str) -> Result<bool> {
        // Named timers live in shard 0, wherever it is owned.
        let local = match self.inner.meta() {
            Ok(meta) => return meta.cancel_named(name).await,
            Err(e) => Err(e),
        };
        self.or_relay(
            local,
            || crate::shard::AdminOp::CancelScheduled(name.to_owned()),
            |a| match a {
                crate::shard::AdminAnswer::Deleted(d) => Some(d),
                _ => None,
            },
        )
        .await
    }

    /// Release what [`Broker::schedule_named`] scheduled under `name` now instead of at
    /// its due time (an MQTT 5 delayed will whose session ended before its delay did:
    /// 3.1.3.2.2); whether something was pending. A time to live its message was given
    /// counting from the due time (`props::EXPIRES_AT`) moves earlier by as much. A
    /// timer scheduled before due times were kept with names is left to its time.
    pub async fn fire_scheduled(&self, name: &str) -> Result<bool> {
        // Named timers live in shard 0, wherever it is owned.
        let local = match self.inner.meta() {
            Ok(meta) => return meta.fire_named(name).await,
            Err(e) => Err(e),
        };
        self.or_relay(
            local,
            || crate::shard::AdminOp::FireScheduled(name.to_owned()),
            |a| match a {
                crate::shard::AdminAnswer::Deleted(d) => Some(d),
                _ => None,
            },
        )
        .await
    }

    /// Pending timers in due order, after `after`, at most `limit` of them, only those
    /// whose message has address `topic` and/or key `key` when given. Cancelled timers
    /// (still in the index until due) are left out. Scans at most `10 * limit + 1,000`
    /// timers per call (per shard): page on with [`DelayedPage::next`].
    pub async fn delayed(
        &self,
        after: Option<TimerKey>,
        limit: usize,
        topic: Option<&str>,
        key: Option<&str>,
    ) -> Result<DelayedPage> {
        if !self.inner.sharded() {
            return self.inner.meta()?.delayed(after, limit, topic, key).await;
        }
        // Each shard's page, merged. A shard with more to scan has looked only up to
        // its `next`: the merged page holds the timers up to the lowest such point.
        let limit = limit.clamp(1, 1_000);
        let mut timers = Vec::new();
        let mut frontier: Option<TimerKey> = None;
        for shard in self.inner.owned() {
            let page = shard.delayed(after, limit, topic, key).await?;
            if let Some(n) = page.next {
                frontier = Some(frontier.map_or(n, |f| f.min(n)));
            }
            timers.extend(page.timers);
        }
        timers.sort_by_key(|t| t.id);
        if let Some(f) = frontier {
            timers.retain(|t| t.id <= f);
        }
        let more = frontier.is_some() || timers.len() > limit;
        timers.truncate(limit);
        let next = match (more, timers.len() == limit) {
            (false, _) => None,
            (true, true) => timers.last().map(|t| t.id),
            (true, false) => frontier,
        };
        Ok(DelayedPage { timers, next })
    }

    /// Cancel one pending timer by its id: the delayed message is never delivered.
    /// Whether it was pending.
    pub async fn cancel_delayed(&self, id: TimerKey) -> Result<bool> {
        for shard in self.inner.owned() {
            if shard.cancel_delayed(id).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Cancel every pending delayed message published to `topic` (its address: MQTT
    /// topic, AMQP exchange) with key `key`; how many were pending.
    pub async fn cancel_delayed_by_key(&self, topic: &str, key: &str) -> Result<u64> {
        let mut n = 0;
        for shard in self.inner.owned() {
            n += shard.cancel_delayed_by_key(topic, key).await?;
        }
        Ok(n)
    }

    /// Delayed messages still pending.
    pub fn delayed_pending(&self) -> u64 {
        self.inner
            .owned()
            .iter()
            .map(|s| s.store.stats().timers)
            .sum()
    }

    /// Delayed messages released so far by this process.
    pub fn delayed_released(&self) -> u64 {
        self.inner
            .owned()
            .iter()
            .map(|s| s.delay.released.load(Ordering::Relaxed))
            .sum()
    }
}

impl ShardCore {
    /// Pending timers in due order, after `after`, at most `limit` of them, only those
    /// whose message has address `topic` and/or key `key` when given. Cancelled timers
    /// (still in the index until due) are left out. Scans at most `10 * limit + 1,000`
    /// timers per call: page on with [`DelayedPage::next`].
    pub(crate) async fn delayed(
        &self,
        after: Option<TimerKey>,
        limit: usize,
        topic: Option<&str>,
        key: Option<&str>,
    ) -> Result<DelayedPage> {
        let limit = limit.clamp(1, 1_000);
        let budget = 10 * limit + 1_000;
        let store = &self.store;
        let mut page = DelayedPage::default();
        let mut cursor = after;
        let mut scanned = 0;
        while scanned < budget {
            let chunk = store.timers_due(u64::MAX, cursor, 256).await?;
            if chunk.is_empty() {
                return Ok(page);
            }
            for (k, payload) in chunk {
                scanned += 1;
                cursor = Some(k);
                let Ok(t) = decode_timer(payload) else {
                    continue;
                };
                let m = &t.message;
                if topic.is_some_and(|x| x != m.topic.as_str())
                    || key.is_some_and(|x| !m.keys.iter().any(|mk| mk == x))
                {
                    continue;
                }
                let kind = match &t.name {
                    Some((name, generation)) => {
                        if !self.is_current(name, *generation).await? {
                            continue;
                        }
                        if name.starts_with(DELAYED_PREFIX) {
                            "delayed"
                        } else {
                            "scheduled"
                        }
                    }
                    None if matches!(&t.route, Route::Topic { topic, .. } if topic.as_str().starts_with("%RETRY%")) => {
                        "retry"
                    }
                    None => "delayed",
                };
                page.timers.push(DelayedInfo {
                    id: k,
                    kind,
                    topic: m.topic.to_string(),
                    route: describe(&t.route),
                    keys: m.keys.clone(),
                    producer_group: m.producer_group.to_string(),
                    size: m.body.len(),
                    born_timestamp: m.born_timestamp,
                });
                if page.timers.len() == limit {
                    page.next = Some(k);
                    return Ok(page);
                }
            }
        }
        page.next = cursor;
        Ok(page)
    }

    /// Cancel one pending timer by its id: the delayed message is never delivered.
    /// Whether it was pending.
    pub(crate) async fn cancel_delayed(&self, id: TimerKey) -> Result<bool> {
        let inner = self;
        // Held against the scheduler: a cancel that returns true did stop its timer.
        let _named = inner.delay.named.lock().await;
        let before = if id.seq > 0 {
            Some(TimerKey {
                due: id.due,
                seq: id.seq - 1,
            })
        } else {
            id.due
                .checked_sub(1)
                .map(|due| TimerKey { due, seq: u64::MAX })
        };
        let found = inner.store.timers_due(id.due, before, 1).await?;
        let Some((k, payload)) = found.into_iter().next().filter(|(k, _)| *k == id) else {
            return Ok(false);
        };
        let mut batch = WriteBatch::new();
        batch.timer_delete(k);
        let mut live = true;
        if let Ok(DecodedTimer {
            name: Some((name, generation)),
            message,
            ..
        }) = decode_timer(payload)
        {
            live = inner.is_current(&name, generation).await?;
            if live {
                batch.kv_delete(NS_SCHEDULED, name.clone().into_bytes());
            }
            unindex(&mut batch, &name, generation, &message);
        }
        inner.store.write(batch).await?;
        Ok(live)
    }

    /// Cancel every pending delayed message published to `topic` (its address: MQTT
    /// topic, AMQP exchange) with key `key`; how many were pending.
    pub(crate) async fn cancel_delayed_by_key(&self, topic: &str, key: &str) -> Result<u64> {
        let inner = self;
        let _named = inner.delay.named.lock().await;
        let prefix = delayed_key_prefix(topic, key);
        let mut cancelled = 0;
        loop {
            let entries = inner
                .store
                .kv_scan(NS_DELAYED_KEYS, &prefix, None, 1_000)
                .await?;
            if entries.is_empty() {
                return Ok(cancelled);
            }
            let mut batch = WriteBatch::new();
            for (k, _) in entries {
                let Some(generation) = k
                    .len()
                    .checked_sub(8)
                    .and_then(|at| <[u8; 8]>::try_from(&k[at..]).ok())
                    .map(u64::from_be_bytes)
                else {
                    batch.kv_delete(NS_DELAYED_KEYS, k);
                    continue;
                };
                let name = format!("{DELAYED_PREFIX}{generation}");
                if inner.is_current(&name, generation).await? {
                    batch.kv_delete(NS_SCHEDULED, name.into_bytes());
                    cancelled += 1;
                }
                batch.kv_delete(NS_DELAYED_KEYS, k);
            }
            inner.store.write(batch).await?;
        }
    }

    /// A timer due at `due` was written: the scheduler may have to wake earlier.
    pub(crate) fn timer_added(&self, due: Millis) {
        self.delay.rewind.fetch_min(due, Ordering::AcqRel);
        self.delay.wake.notify_one();
    }

    /// Schedule a publish through an exchange at `due` under `name` (one store batch: the
    /// timer and its name). A later schedule under the same name replaces it, and
    /// [`ShardCore::cancel_named`] withdraws it; it survives restarts.
    pub(crate) async fn schedule_named(
        &self,
        name: &str,
        due: Millis,
        route: &Route,
        retain: Option<&str>,
        mut message: Message,
    ) -> Result<()> {
        self.stamp(&mut message);
        let _named = self.delay.named.lock().await;
        let generation = self.delay.next_generation.fetch_add(1, Ordering::Relaxed);
        let payload = encode_named_timer(Some((name, generation)), retain, route, &message)?;
        let mut batch = WriteBatch::new();
        batch.timer_put(due, payload);
        batch.kv_put(
            NS_SCHEDULED,
            name.as_bytes().to_vec(),
            scheduled_value(generation, due),
        );
        self.store.write(batch).await?;
        self.timer_added(due);
        Ok(())
    }

    /// [`Broker::fire_scheduled`] on shard 0: the timer is moved to now (one batch:
    /// the old timer deleted, the same generation put due now), and the scheduler
    /// releases it as any due timer.
    pub(crate) async fn fire_named(&self, name: &str) -> Result<bool> {
        let _named = self.delay.named.lock().await;
        let Some(current) = self.store.kv_get(NS_SCHEDULED, name.as_bytes()).await? else {
            return Ok(false);
        };
        let (Some(generation), Some(due)) = (
            current.get(..8).and_then(|g| <[u8; 8]>::try_from(g).ok()),
            current.get(8..16).and_then(|d| <[u8; 8]>::try_from(d).ok()),
        ) else {
            return Ok(true);
        };
        let (generation, due) = (u64::from_be_bytes(generation), u64::from_be_bytes(due));
        let now = self.clock.now();
        if due <= now {
            return Ok(true);
        }
        // Every timer due at exactly `due`, a page at a time, until ours.
        let mut after = due.checked_sub(1).map(|d| TimerKey {
            due: d,
            seq: u64::MAX,
        });
        loop {
            let found = self.store.timers_due(due, after, 256).await?;
            let Some(last) = found.last().map(|(k, _)| *k) else {
                tracing::warn!(timer = %name, "core: a named timer to fire now was not found; it fires when due");
                return Ok(true);
            };
            after = Some(last);
            for (key, payload) in found {
                let Ok(DecodedTimer {
                    name: Some((n, g)),
                    retain,
                    route,
                    mut message,
                }) = decode_timer(payload)
                else {
                    continue;
                };
                if n != name || g != generation {
                    continue;
                }
                crate::props::update_u64(&mut message.properties, crate::props::EXPIRES_AT, |at| {
                    at.saturating_sub(due - now)
                });
                let payload = encode_named_timer(
                    Some((name, generation)),
                    retain.as_deref(),
                    &route,
                    &message,
                )?;
                let mut batch = WriteBatch::new();
                batch.timer_delete(key);
                batch.timer_put(now, payload);
                batch.kv_put(
                    NS_SCHEDULED,
                    name.as_bytes().to_vec(),
                    scheduled_value(generation, now),
                );
                self.store.write(batch).await?;
                self.timer_added(now);
                return Ok(true);
            }
        }
    }

    /// Whether `generation` is still the current timer under `name` (not cancelled, not
    /// replaced, not yet released).
    async fn is_current(&self, name: &str, generation: u64) -> Result<bool> {
        let current = self.store.kv_get(NS_SCHEDULED, name.as_bytes()).await?;
        Ok(current.as_deref().and_then(|v| v.get(..8)) == Some(&generation.to_be_bytes()[..]))
    }

    /// Withdraw the timer scheduled under `name`; whether there was one. Its timer stays
    /// in the index and releases into nothing.
    pub(crate) async fn cancel_named(&self, name: &str) -> Result<bool> {
        let _named = self.delay.named.lock().await;
        if self
            .store
            .kv_get(NS_SCHEDULED, name.as_bytes())
            .await?
            .is_none()
        {
            return Ok(false);
        }
        let mut batch = WriteBatch::new();
        batch.kv_delete(NS_SCHEDULED, name.as_bytes().to_vec());
        self.store.write(batch).await?;
        Ok(true)
    }

    /// Release the due timers: one store batch appends each message into its route's
    /// queues and deletes its timer, so a crash leaves each either pending or released.
    pub(crate) async fn release_due(
        &self,
        after: Option<TimerKey>,
    ) -> Result<(usize, Option<TimerKey>)> {
        // Held from reading the due timers until their batch is written: a cancel
        // either comes first (the timer is gone or its name withdrawn) or finds it
        // released.
        let _named = self.delay.named.lock().await;
        let now = self.clock.now();
        let due = self
            .store
            .timers_due(now, after, self.config.release_batch)
            .await?;
        if due.is_empty() {
            return Ok((0, after));
        }
        let last = due.last().map(|(k, _)| *k);
        let mut batch = WriteBatch::new();
        let mut woken = Vec::new();
        let mut count = 0;
        let mut staged = Vec::new();
        for (key, payload) in due {
            batch.timer_delete(key);
            let DecodedTimer {
                name,
                retain,
                route,
                mut message,
            } = match decode_timer(payload) {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(timer = ?key, error = %e, "core: dropping undecodable timer");
                    continue;
                }
            };
            if let Some((name, generation)) = name {
                // A named timer fires only if it is still the current one under its
                // name (not cancelled, not replaced); its name and key index entries
                // go with it.
                unindex(&mut batch, &name, generation, &message);
                if !self.is_current(&name, generation).await? {
                    continue;
                }
                batch.kv_delete(NS_SCHEDULED, name.into_bytes());
            }
            message.deliver_at = Some(key.due);
            let (queues, remote) = match self.resolve(&route, &message).await {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(timer = ?key, error = %e, "core: delayed message has nowhere to go");
                    Default::default()
                }
            };
            for q in &queues {
                woken.push(q.topic.clone());
            }
            woken.extend(remote.values().flatten().cloned());
            if let Some(topic) = retain {
                staged.extend(self.retained.stage(&topic, &message, &mut batch));
            }
            crate::outbox::stage(&mut batch, message, queues, &remote);
            count += 1;
        }
        self.store.write(batch).await?;
        staged.iter_mut().for_each(crate::retained::Staged::confirm);
        drop(staged);
        self.delay
            .released
            .fetch_add(count as u64, Ordering::Relaxed);
        woken.sort();
        woken.dedup();
        for t in woken {
            self.wake_topic(&t);
        }
        Ok((count, last))
    }

    /// Where a released message goes: queues of this shard, and topics of others
    /// (reached through this shard's outboxes).
    async fn resolve(
        &self,
        route: &Route,
        message: &Message,
    ) -> Result<(Vec<QueueRef>, crate::publish::Remote)> {
        match route {
            Route::Topic {
                topic,
                queue,
                sharding_key,
            } => {
                let h = self.topic_handle(topic).await?;
                let q = h.select(
                    queue.filter(|q| *q < h.queue_count()),
                    sharding_key.as_deref(),
                )?;
                Ok((vec![QueueRef::new(topic.clone(), q)], Default::default()))
            }
            Route::Exchange {
                vhost,
                exchange,
                key,
                headers,
            } => {
                let routed = self.router.route(vhost, exchange, key, headers)?;
                let (local, remote) = self.split_topics(routed.topics);
                let mut out = Vec::with_capacity(local.len());
                for t in local {
                    let h = self.topic_handle(&t).await?;
                    out.push(QueueRef::new(t, h.select_for(message)?));
                }
                Ok((out, remote))
            }
        }
    }

    pub(crate) fn delay_rewind(&self) -> Option<Millis> {
        let v = self.delay.rewind.swap(u64::MAX, Ordering::AcqRel);
        (v != u64::MAX).then_some(v)
    }

    pub(crate) async fn delay_woken(&self) {
        self.delay.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_payload_round_trips() {
        let mut m = Message::new(TopicName::new("t").unwrap(), "body");
        m.keys = vec!["k".into()];
        for route in [
            Route::Topic {
                topic: TopicName::new("t").unwrap(),
                queue: Some(3),
                sharding_key: Some("key".into()),
            },
            Route::Topic {
                topic: TopicName::new("t").unwrap(),
                queue: None,
                sharding_key: None,
            },
            Route::Exchange {
                vhost: "/".into(),
                exchange: "x".into(),
                key: "a.b".into(),
                headers: vec![
                    ("s".into(), HeaderValue::Str("v".into())),
                    ("i".into(), HeaderValue::Int(-5)),
                    ("f".into(), HeaderValue::Float(1.5)),
                    ("b".into(), HeaderValue::Bool(true)),
                    ("v".into(), HeaderValue::Void),
                    ("o".into(), HeaderValue::Other(Bytes::from_static(b"x"))),
                ],
            },
        ] {
            let enc = encode_timer(&route, &m).unwrap();
            let d = decode_timer(Bytes::from(enc.clone())).unwrap();
            assert_eq!((d.name, d.retain), (None, None));
            assert_eq!(d.route, route);
            let back = d.message;
            let named = encode_named_timer(Some(("will/c1", 7)), Some("a/b"), &route, &m).unwrap();
            let d = decode_timer(Bytes::from(named)).unwrap();
            assert_eq!(d.name, Some(("will/c1".to_owned(), 7)));
            assert_eq!(d.retain.as_deref(), Some("a/b"));
            assert_eq!((d.route, d.message), (route.clone(), m.clone()));
            assert_eq!(back, m);
            for cut in 0..enc.len() {
                assert!(decode_timer(Bytes::copy_from_slice(&enc[..cut])).is_err());
            }
        }
    }
}

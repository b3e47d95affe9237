//! Retained messages (MQTT's, set by any publish that asks for it: a retained publish,
//! a delayed one when it is released, a will). The core owns them, so a retained
//! message is written in the same store batch as its publish. Bodies live in the store's keyed area ([`NS_RETAINED`], key: the
//! topic name); memory holds only an index for filter matching (topic → size and
//! expiry, persisted in [`NS_RETAINED_INDEX`] in the same batch as the body, so a
//! start reads the index, never the bodies) and an LRU cache of bodies bounded by
//! `retained_cache_messages` and `retained_cache_bytes`. A subscription that matches a
//! body not cached reads it from the store.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use mqgate_store::{Message, Millis, Store, WriteBatch};
use parking_lot::{Mutex, RwLock};

use crate::props;

/// Keyed-area namespace of retained bodies (key: the MQTT topic name).
pub const NS_RETAINED: &str = "mqtt.retained";

/// Keyed-area namespace of the retained index (key: topic name; value: encoded size
/// and expiry of the body under the same key in [`NS_RETAINED`]).
pub const NS_RETAINED_INDEX: &str = "mqtt.retained.index";
/// Keyed-area namespace of the adapter's own bookkeeping.
const NS_META: &str = "mqtt.meta";
/// Present once [`NS_RETAINED_INDEX`] covers every retained message (stores written
/// before the index existed are indexed once, at start).
const META_INDEXED: &[u8] = b"retained.indexed";

/// What memory keeps of one retained message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Encoded size of the body (what it costs in the cache).
    size: u32,
    /// When it expires (5.0 Message Expiry), ms since the epoch.
    expires_at: Option<Millis>,
    /// Which setting of the topic this is (not stored): a body read from the store is
    /// cached only if the topic was not set again meanwhile.
    version: u64,
}

impl Entry {
    fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(12);
        b.put_u32(self.size);
        b.put_u64(self.expires_at.unwrap_or(0));
        b.freeze()
    }

    fn decode(mut v: &[u8], version: u64) -> Option<Self> {
        if v.len() != 12 {
            return None;
        }
        let size = v.get_u32();
        let at = v.get_u64();
        Some(Self {
            size,
            expires_at: (at > 0).then_some(at),
            version,
        })
    }

    fn of(m: &Message, size: usize, version: u64) -> Self {
        Self {
            size: size.min(u32::MAX as usize) as u32,
            expires_at: props::get_u64(&m.properties, props::EXPIRES_AT),
            version,
        }
    }

    fn live(&self, now: Millis) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }
}

/// A retained message set (or cleared) whose batch is being stored: until it is
/// dropped, readers take the new body from memory rather than from the store, where it
/// may not be yet. [`Staged::confirm`] it once the write has succeeded; dropped without
/// that (the write failed, or never happened), the setting is undone in memory unless a
/// newer one was staged since, so memory never shows what the store does not hold.
#[derive(Debug)]
pub(crate) struct Staged<'a> {
    retained: &'a Retained,
    topic: String,
    version: u64,
    /// The index entry before this setting.
    prev: Option<Entry>,
    confirmed: bool,
}

impl Staged<'_> {
    /// The write holding this setting succeeded.
    pub(crate) fn confirm(&mut self) {
        self.confirmed = true;
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        let r = self.retained;
        let mut index = r.index.write();
        let mut cache = r.cache.lock();
        let mut u = r.unsettled.lock();
        if u.get(&self.topic).is_none_or(|x| x.0 != self.version) {
            return;
        }
        u.remove(&self.topic);
        if !self.confirmed {
            match self.prev {
                Some(e) => {
                    index.insert(self.topic.clone(), e);
                }
                None => {
                    index.remove(&self.topic);
                }
            }
            cache.remove(&self.topic);
        }
    }
}

/// How many retained messages there are and what the cache holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetainedStats {
    /// Retained messages (topics with one).
    pub messages: u64,
    /// Bodies in the cache.
    pub cached_messages: u64,
    /// Encoded bytes of the bodies in the cache.
    pub cached_bytes: u64,
}

/// A setting being written: its version and body (`None`: cleared).
type Unsettled = (u64, Option<Arc<Message>>);

/// The retained messages: index in memory, bodies in the store, some cached.
pub struct Retained {
    store: Arc<dyn Store>,
    index: RwLock<BTreeMap<String, Entry>>,
    cache: Mutex<Lru>,
    /// Topics whose latest setting is being written: version and body (`None`: cleared).
    unsettled: Mutex<HashMap<String, Unsettled>>,
    versions: AtomicU64,
}

impl Retained {
    /// Read the index (never the bodies; a store from before the index is indexed once,
    /// one page of bodies at a time).
    pub(crate) async fn load(
        store: Arc<dyn Store>,
        cache_messages: usize,
        cache_bytes: usize,
    ) -> crate::Result<Self> {
        let mut index = BTreeMap::new();
        let mut version = 0;
        let indexed = store.kv_get(NS_META, META_INDEXED).await?.is_some();
        let ns = if indexed {
            NS_RETAINED_INDEX
        } else {
            NS_RETAINED
        };
        let mut after: Option<Bytes> = None;
        loop {
            let page = store.kv_scan(ns, b"", after.as_deref(), 1024).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            let mut fill = WriteBatch::new();
            for (k, v) in page {
                let Ok(topic) = String::from_utf8(k.to_vec()) else {
                    continue;
                };
                version += 1;
                let entry = if indexed {
                    Entry::decode(&v, version)
                } else {
                    let size = v.len();
                    Message::decode(v)
                        .ok()
                        .map(|m| Entry::of(&m, size, version))
                };
                let Some(entry) = entry else {
                    tracing::warn!(%topic, "unreadable retained message; ignored");
                    continue;
                };
                if !indexed {
                    fill.kv_put(NS_RETAINED_INDEX, k, entry.encode());
                }
                index.insert(topic, entry);
            }
            if !fill.is_empty() {
                store.write(fill).await?;
            }
        }
        if !indexed {
            let mut b = WriteBatch::new();
            b.kv_put(NS_META, Bytes::from_static(META_INDEXED), Bytes::new());
            store.write(b).await?;
        }
        Ok(Self {
            store,
            index: RwLock::new(index),
            cache: Mutex::new(Lru::new(cache_messages, cache_bytes)),
            unsettled: Mutex::default(),
            versions: AtomicU64::new(version + 1),
        })
    }

    /// No retained messages, over an empty in-memory store: what a gateway that does
    /// not own shard 0 (where they live) shows.
    pub(crate) fn empty(cache_messages: usize, cache_bytes: usize) -> Self {
        Self {
            store: Arc::new(mqgate_store::MemoryStore::new()),
            index: RwLock::default(),
            cache: Mutex::new(Lru::new(cache_messages, cache_bytes)),
            unsettled: Mutex::default(),
            versions: AtomicU64::new(1),
        }
    }

    /// Set (or, with an empty body, clear) `topic`'s retained message: visible at once
    /// (a subscriber that sees the publish live also finds it retained), stored with
    /// `batch`; keep the returned guard until `batch` is written.
    pub(crate) fn stage(
        &self,
        topic: &str,
        message: &Message,
        batch: &mut WriteBatch,
    ) -> Option<Staged<'_>> {
        let key = Bytes::copy_from_slice(topic.as_bytes());
        let version = self.versions.fetch_add(1, Ordering::Relaxed);
        let set = if message.body.is_empty() {
            batch.kv_delete(NS_RETAINED, key.clone());
            batch.kv_delete(NS_RETAINED_INDEX, key);
            None
        } else {
            let enc = message.encode().ok()?;
            let entry = Entry::of(message, enc.len(), version);
            batch.kv_put(NS_RETAINED, key.clone(), enc);
            batch.kv_put(NS_RETAINED_INDEX, key, entry.encode());
            Some((entry, Arc::new(message.clone())))
        };
        let prev;
        {
            let mut index = self.index.write();
            let mut cache = self.cache.lock();
            prev = index.get(topic).copied();
            match &set {
                Some((entry, m)) => {
                    index.insert(topic.to_owned(), *entry);
                    cache.insert(topic.to_owned(), Arc::clone(m), entry.size as usize);
                }
                None => {
                    index.remove(topic);
                    cache.remove(topic);
                }
            }
            self.unsettled
                .lock()
                .insert(topic.to_owned(), (version, set.map(|(_, m)| m)));
        }
        Some(Staged {
            retained: self,
            topic: topic.to_owned(),
            version,
            prev,
            confirmed: false,
        })
    }

    /// The live (not expired) retained topics matching `filter`, from the index only.
    pub fn matching(&self, filter: &str, now: Millis) -> Vec<(String, Entry)> {
        let map = self.index.read();
        match filter.find(['+', '#']) {
            None => map
                .get(filter)
                .filter(|e| e.live(now))
                .map(|e| vec![(filter.to_owned(), *e)])
                .unwrap_or_default(),
            Some(i) => {
                let prefix = &filter[..i];
                map.range(prefix.to_owned()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .filter(|(k, e)| filter_matches(filter, k) && e.live(now))
                    .map(|(k, e)| (k.clone(), *e))
                    .collect()
            }
        }
    }

    /// The live retained topics matching `filter` after `after` (in key order), looking
    /// at no more than `scan` index entries; and where to go on from (`None`: done).
    fn matching_page(
        &self,
        filter: &str,
        after: Option<&str>,
        now: Millis,
        scan: usize,
    ) -> (Vec<(String, Entry)>, Option<String>) {
        let Some(i) = filter.find(['+', '#']) else {
            let found = match after {
                None => self.matching(filter, now),
                Some(_) => Vec::new(),
            };
            return (found, None);
        };
        let prefix = &filter[..i];
        let from = match after {
            Some(a) => Bound::Excluded(a.to_owned()),
            None => Bound::Included(prefix.to_owned()),
        };
        let map = self.index.read();
        let mut found = Vec::new();
        let mut last: Option<&String> = None;
        for (scanned, (k, e)) in map
            .range((from, Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .enumerate()
        {
            if scanned == scan {
                // Go on after the last key looked at.
                return (found, last.cloned());
            }
            last = Some(k);
            if filter_matches(filter, k) && e.live(now) {
                found.push((k.clone(), *e));
            }
        }
        (found, None)
    }

    /// The body of `topic`'s retained message (`entry` from [`Retained::matching`]):
    /// from the cache, else read from the store and cached. `None`: cleared meanwhile,
    /// or unreadable.
    pub async fn body(&self, topic: &str, entry: Entry) -> Option<Arc<Message>> {
        if let Some(m) = self.cache.lock().get(topic) {
            return Some(m);
        }
        if let Some((_, m)) = self.unsettled.lock().get(topic) {
            return m.clone();
        }
        let v = match self.store.kv_get(NS_RETAINED, topic.as_bytes()).await {
            Ok(Some(v)) => v,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(%topic, error = %e, "reading a retained message failed");
                return None;
            }
        };
        let m = Arc::new(Message::decode(v).ok()?);
        // Cache it only if it is still the topic's current message.
        let index = self.index.read();
        if index.get(topic).is_some_and(|e| e.version == entry.version) {
            self.cache
                .lock()
                .insert(topic.to_owned(), Arc::clone(&m), entry.size as usize);
        }
        Some(m)
    }

    /// How many there are and what the cache holds.
    pub fn stats(&self) -> RetainedStats {
        let messages = self.index.read().len() as u64;
        let c = self.cache.lock();
        RetainedStats {
            messages,
            cached_messages: c.map.len() as u64,
            cached_bytes: c.bytes as u64,
        }
    }
}

impl std::fmt::Debug for Retained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Retained")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Whether MQTT topic filter `filter` matches topic `topic` (`$` topics only by filters
/// that name their first level).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// The retained messages still to send for one new subscription: where in the index to
/// go on from and the page read from it. A connection sends them as its output buffer
/// drains, so a subscription matching many messages holds one page, not all of them.
#[derive(Debug)]
pub struct RetainedCursor {
    pub(crate) filter: String,
    /// The next page starts after this key (`None`: at the first one).
    pub(crate) after: Option<String>,
    ready: VecDeque<(String, Entry)>,
    /// Messages read from shard 0's owner on another gateway (`locate.rs`).
    pub(crate) fetched: VecDeque<(String, Arc<Message>)>,
    pub(crate) done: bool,
}

impl RetainedCursor {
    /// The retained messages matching `filter`, from the first.
    pub fn new(filter: &str) -> Self {
        Self::after(filter, None)
    }

    /// The retained messages matching `filter` after the topic `after`.
    pub(crate) fn after(filter: &str, after: Option<String>) -> Self {
        Self {
            filter: filter.to_owned(),
            after,
            ready: VecDeque::new(),
            fetched: VecDeque::new(),
            done: false,
        }
    }

    /// The next matching topic, reading the index a page at a time (`None`: all sent).
    pub fn next(&mut self, r: &Retained, now: Millis) -> Option<(String, Entry)> {
        loop {
            if let Some(x) = self.ready.pop_front() {
                return Some(x);
            }
            if self.done {
                return None;
            }
            let (page, next) = r.matching_page(&self.filter, self.after.as_deref(), now, 1024);
            self.ready = page.into();
            self.done = next.is_none();
            self.after = next;
        }
    }
}

/// Bodies by topic, least recently used evicted first, within a count and a byte bound.
#[derive(Debug)]
struct Lru {
    /// Topic → (body, its size, its last use).
    map: HashMap<String, (Arc<Message>, usize, u64)>,
    /// Last use → topic.
    order: BTreeMap<u64, String>,
    tick: u64,
    bytes: usize,
    max_messages: usize,
    max_bytes: usize,
}

impl Lru {
    fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            max_messages,
            max_bytes,
        }
    }

    fn get(&mut self, topic: &str) -> Option<Arc<Message>> {
        self.tick += 1;
        let (m, _, used) = self.map.get_mut(topic)?;
        let old = std::mem::replace(used, self.tick);
        let m = Arc::clone(m);
        if let Some(t) = self.order.remove(&old) {
            self.order.insert(self.tick, t);
        }
        Some(m)
    }

    fn insert(&mut self, topic: String, m: Arc<Message>, size: usize) {
        self.remove(&topic);
        if self.max_messages == 0 || size > self.max_bytes {
            return;
        }
        while self.map.len() >= self.max_messages || self.bytes + size > self.max_bytes {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some((_, s, _)) = self.map.remove(&oldest) {
                self.bytes -= s;
            }
        }
        self.tick += 1;
        self.order.insert(self.tick, topic.clone());
        self.map.insert(topic, (m, size, self.tick));
        self.bytes += size;
    }

    fn remove(&mut self, topic: &str) {
        if let Some((_, size, used)) = self.map.remove(topic) {
            self.order.remove(&used);
            self.bytes -= size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Arc<Message> {
        let topic = mqgate_store::TopicName::new("t").expect("topic");
        Arc::new(Message::new(topic, vec![0u8; n]))
    }

    #[tokio::test]
    async fn a_store_from_before_the_index_is_indexed_once() {
        let store: Arc<dyn Store> = Arc::new(mqgate_store::MemoryStore::new());
        let mut b = WriteBatch::new();
        for t in ["old/1", "old/2"] {
            let m = msg(100);
            b.kv_put(
                NS_RETAINED,
                t.as_bytes().to_vec(),
                m.encode().expect("encode"),
            );
        }
        store.write(b).await.expect("write");
        let r = Retained::load(Arc::clone(&store), 10, 1000)
            .await
            .expect("load");
        assert_eq!(r.stats().messages, 2);
        assert_eq!(r.stats().cached_messages, 0, "no body kept");
        assert!(store
            .kv_get(NS_META, META_INDEXED)
            .await
            .expect("get")
            .is_some());
        let idx = store
            .kv_scan(NS_RETAINED_INDEX, b"", None, 10)
            .await
            .expect("scan");
        assert_eq!(idx.len(), 2);
        // The next start reads the index only.
        let r = Retained::load(Arc::clone(&store), 10, 1000)
            .await
            .expect("load");
        let (topic, entry) = r.matching("old/2", 0).pop().expect("indexed");
        let body = r.body(&topic, entry).await.expect("body");
        assert_eq!(body.body.len(), 100);
        assert_eq!(r.stats().cached_messages, 1, "read on demand, then cached");
    }

    #[test]
    fn pending_pages_through_the_index_in_order() {
        let r = Retained {
            store: Arc::new(mqgate_store::MemoryStore::new()),
            index: RwLock::new(BTreeMap::new()),
            cache: Mutex::new(Lru::new(10, 1000)),
            unsettled: Mutex::default(),
            versions: AtomicU64::new(1),
        };
        {
            let mut idx = r.index.write();
            for i in 0..2500 {
                let e = Entry {
                    size: 1,
                    expires_at: (i % 7 == 0).then_some(5),
                    version: i,
                };
                idx.insert(format!("a/{i:05}/x"), e);
                idx.insert(format!("a/{i:05}/y"), e);
            }
            idx.insert(
                "b/1/x".into(),
                Entry {
                    size: 1,
                    expires_at: None,
                    version: 0,
                },
            );
        }
        let mut p = RetainedCursor::new("a/+/x");
        let mut got = Vec::new();
        while let Some((t, _)) = p.next(&r, 10) {
            got.push(t);
        }
        let want: Vec<String> = (0..2500)
            .filter(|i| i % 7 != 0)
            .map(|i| format!("a/{i:05}/x"))
            .collect();
        assert_eq!(got, want, "every live match once, in order, across pages");
        let mut p = RetainedCursor::new("b/1/x");
        assert_eq!(p.next(&r, 10).map(|x| x.0), Some("b/1/x".to_owned()));
        assert!(p.next(&r, 10).is_none());
    }

    #[test]
    fn lru_stays_within_both_bounds_and_evicts_the_least_recent() {
        let mut c = Lru::new(3, 100);
        for t in ["a", "b", "c"] {
            c.insert(t.into(), msg(10), 10);
        }
        assert!(c.get("a").is_some());
        c.insert("d".into(), msg(10), 10);
        assert!(c.get("b").is_none(), "b was the least recently used");
        assert_eq!(c.map.len(), 3);
        c.insert("e".into(), msg(90), 90);
        assert!(c.bytes <= 100 && c.map.len() <= 3);
        assert!(c.get("e").is_some());
        c.insert("big".into(), msg(101), 101);
        assert!(c.get("big").is_none(), "larger than the whole cache");
        c.remove("e");
        assert_eq!(c.bytes, c.map.values().map(|v| v.1).sum::<usize>());
        assert_eq!(c.order.len(), c.map.len());
    }
}

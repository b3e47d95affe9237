//! The endpoints the core manages: every consumable thing a protocol declares (an AMQP
//! queue, an MQTT session, a shared subscription) is registered here with its group
//! (and the policies in its [`GroupSpec`]), the virtual host of its bindings, its durable
//! records, and how long it may stay unused.
//!
//! # Endpoint state machine
//! ```text
//!  declare_endpoint ──> Declared (topic, group offsets, records: one batch)
//!  register_endpoint ──> Managed: unused since registration (or the time given)
//!  Managed ──endpoint_in_use(true)──> InUse (n users: consumers, a connected client)
//!  InUse ──endpoint_in_use(false), last user──> Managed, unused since now
//!  Managed ──touch_endpoint──> Managed, unused since now (AMQP declare, basic.get)
//!  Managed, unused for idle_expiry ──sweep──> Expired: bindings, group, topic, records
//!        deleted; EndpointEvent::Expired sent to the adapters (they drop their handles)
//!  Managed/InUse ──delete_endpoint / delete_group──> gone
//! ```
//! The sweep runs every `expiry_interval`; it also settles expired messages at the head
//! of endpoints with a message TTL (see [`crate::endpoint`]), consumed or not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use mqgate_store::{GroupName, Millis, QueueRef, TopicName};
use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;

use crate::broker::ShardCore;
use crate::group::GroupSpec;
use crate::publish::Records;

/// An endpoint as the core manages it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// Its group: name, topics, mode and policies.
    pub spec: GroupSpec,
    /// The virtual host its bindings are in.
    pub vhost: String,
    /// Its durable records (namespace, key): handed to the adapter and deleted with it
    /// when it expires.
    pub records: Vec<(String, Bytes)>,
    /// Deleted after this long unused (ms): AMQP `x-expires`, MQTT session expiry.
    pub idle_expiry: Option<u64>,
    /// The gateway run it dies with, if transient (an AMQP exclusive or non-durable
    /// queue): deleted, once unused, when that run is gone ([`crate::Run`]).
    pub owner: Option<crate::Run>,
}

impl Endpoint {
    /// An endpoint of vhost `/` with no records that never expires unused.
    pub fn new(spec: GroupSpec) -> Self {
        Self {
            spec,
            vhost: crate::router::DEFAULT_VHOST.to_owned(),
            records: Vec::new(),
            idle_expiry: None,
            owner: None,
        }
    }
}

impl From<GroupSpec> for Endpoint {
    fn from(spec: GroupSpec) -> Self {
        Self::new(spec)
    }
}

/// What the core did to an endpoint on its own.
#[derive(Clone, Debug)]
pub enum EndpointEvent {
    /// Unused for its `idle_expiry`, or transient and its declaring gateway run gone:
    /// deleted with its records.
    Expired {
        /// Its group name.
        group: GroupName,
        /// Its records as they were (namespace, key, value if it existed).
        records: Vec<(String, Bytes, Option<Bytes>)>,
    },
}

#[derive(Debug)]
struct Entry {
    endpoint: Endpoint,
    users: usize,
    idle_since: Millis,
    /// The sweep is deleting it: uses are refused until it is gone.
    expiring: bool,
}

/// The registry (one per broker).
#[derive(Debug)]
pub(crate) struct Registry {
    map: Mutex<HashMap<GroupName, Entry>>,
    /// Topics of endpoints with a length limit → the endpoint's group (the publish path
    /// looks here, lock-free when empty).
    limited: RwLock<HashMap<TopicName, GroupSpec>>,
    any_limited: AtomicBool,
    events: broadcast::Sender<EndpointEvent>,
    /// Woken when an expiring endpoint is gone (or its deletion failed).
    settled: tokio::sync::Notify,
    /// Endpoints without a message TTL whose queue heads the expiry sweep found carrying
    /// no expiry, by the committed offsets it found them at: only a head expires
    /// (RabbitMQ's rule), so until those offsets move (a consumer took the head) there is
    /// nothing to look at, and no group is started for it.
    quiet_heads: Mutex<HashMap<GroupName, Vec<u64>>>,
}

impl Registry {
    pub(crate) fn new(events: broadcast::Sender<EndpointEvent>) -> Self {
        Self {
            map: Mutex::default(),
            limited: RwLock::default(),
            any_limited: AtomicBool::new(false),
            events,
            settled: tokio::sync::Notify::new(),
            quiet_heads: Mutex::default(),
        }
    }

    /// Stop managing `group` (an endpoint the sweep is deleting stays until it is gone).
    pub(crate) fn forget(&self, group: &GroupName) {
        self.quiet_heads.lock().remove(group);
        let mut map = self.map.lock();
        if map.get(group).is_some_and(|e| !e.expiring) {
            if let Some(e) = map.remove(group) {
                self.unlimit(&e.endpoint.spec);
            }
        }
    }

    fn expiring(&self, group: &GroupName) -> bool {
        self.map.lock().get(group).is_some_and(|e| e.expiring)
    }

    /// Wait until `group` is not being expired.
    async fn settled(&self, group: &GroupName) {
        loop {
            let woken = self.settled.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if !self.expiring(group) {
                return;
            }
            woken.await;
        }
    }

    fn unlimit(&self, spec: &GroupSpec) {
        if !spec.policy.limited() {
            return;
        }
        let mut l = self.limited.write();
        for t in &spec.topics {
            if l.get(t).is_some_and(|s| s.name == spec.name) {
                l.remove(t);
            }
        }
        self.any_limited.store(!l.is_empty(), Ordering::Release);
    }

    fn limit(&self, spec: &GroupSpec) {
        if !spec.policy.limited() {
            return;
        }
        let mut l = self.limited.write();
        for t in &spec.topics {
            l.insert(t.clone(), spec.clone());
        }
        self.any_limited.store(true, Ordering::Release);
    }

    /// The endpoint with a length limit consuming `topic`, if any.
    pub(crate) fn limits_for(&self, topic: &TopicName) -> Option<GroupSpec> {
        if !self.any_limited.load(Ordering::Acquire) {
            return None;
        }
        self.limited.read().get(topic).cloned()
    }

    /// Whether any endpoint has a length limit.
    pub(crate) fn any_limited(&self) -> bool {
        self.any_limited.load(Ordering::Acquire)
    }
}

impl crate::Broker {
    /// Manage an endpoint: its policies apply with or without members (expired messages
    /// at its head are settled on time), and it is deleted once unused for its
    /// `idle_expiry`. Unused since `idle_since` (now when `None`). Replaces an earlier
    /// registration of the same group, keeping its users.
    pub fn register_endpoint_since(
        &self,
        endpoint: impl Into<Endpoint>,
        idle_since: Option<Millis>,
    ) {
        let endpoint = endpoint.into();
        let now = self.now();
        let id = self
            .inner
            .placement
            .place_group(&endpoint.spec.name, &endpoint.spec.topics);
        let Ok(shard) = self.inner.shard(id) else {
            tracing::warn!(group = %endpoint.spec.name, shard = id, "core: an endpoint of a shard owned elsewhere is not managed here");
            return;
        };
        let registry = &shard.endpoints;
        let mut map = registry.map.lock();
        if map.get(&endpoint.spec.name).is_some_and(|e| e.expiring) {
            // Being deleted: a registration after the deletion (a redeclare) makes a new one.
            return;
        }
        let users = map.get(&endpoint.spec.name).map_or(0, |e| e.users);
        if let Some(old) = map.get(&endpoint.spec.name) {
            registry.unlimit(&old.endpoint.spec);
        }
        registry.limit(&endpoint.spec);
        map.insert(
            endpoint.spec.name.clone(),
            Entry {
                endpoint,
                users,
                idle_since: idle_since.unwrap_or(now),
                expiring: false,
            },
        );
    }

    /// [`Broker::register_endpoint_since`] now.
    pub fn register_endpoint(&self, endpoint: impl Into<Endpoint>) {
        self.register_endpoint_since(endpoint, None);
    }

    /// Stop managing an endpoint (it is not deleted).
    pub fn forget_endpoint(&self, group: &GroupName) {
        if let Ok(shard) = self.inner.of_group(group) {
            shard.endpoints.forget(group);
        }
    }

    /// Take an endpoint back from the core's management (an MQTT client reconnecting to
    /// its session): waits while the sweep is deleting it, so the caller then sees it
    /// either whole or gone, never half deleted.
    pub async fn claim_endpoint(&self, group: &GroupName) {
        if let Ok(shard) = self.inner.of_group(group) {
            shard.endpoints.settled(group).await;
            shard.endpoints.forget(group);
        }
    }

    /// The group spec of the endpoint registered as `group` in a shard owned here
    /// (with its policies, dead-letter target included), if any.
    pub fn endpoint_spec(&self, group: &GroupName) -> Option<GroupSpec> {
        let shard = self.inner.of_group(group).ok()?;
        let map = shard.endpoints.map.lock();
        map.get(group).map(|e| e.endpoint.spec.clone())
    }

    /// Wait until the sweep is not deleting `group` (it is then whole or gone).
    pub async fn endpoint_settled(&self, group: &GroupName) {
        if let Ok(shard) = self.inner.of_group(group) {
            shard.endpoints.settled(group).await;
        }
    }

    /// One more (`true`) or one fewer (`false`) user of an endpoint: a consumer, a
    /// connected client. Unused from when the last one goes. `false` when a new use is
    /// refused because the sweep is deleting the endpoint (the caller treats it as gone).
    pub fn endpoint_in_use(&self, group: &GroupName, in_use: bool) -> bool {
        let now = self.now();
        let Ok(shard) = self.inner.of_group(group) else {
            return true;
        };
        if let Some(e) = shard.endpoints.map.lock().get_mut(group) {
            if in_use {
                if e.expiring {
                    return false;
                }
                e.users += 1;
            } else {
                e.users = e.users.saturating_sub(1);
                if e.users == 0 {
                    e.idle_since = now;
                }
            }
        }
        true
    }

    /// Since when a managed endpoint has had no user (ms since the epoch); `None` while
    /// it is in use or not managed.
    pub fn endpoint_idle_since(&self, group: &GroupName) -> Option<Millis> {
        self.inner
            .of_group(group)
            .ok()?
            .endpoints
            .map
            .lock()
            .get(group)
            .filter(|e| e.users == 0)
            .map(|e| e.idle_since)
    }

    /// The endpoint was used just now (AMQP: declared again, basic.get). `false` when
    /// the sweep is deleting it (the caller treats it as gone).
    pub fn touch_endpoint(&self, group: &GroupName) -> bool {
        let now = self.now();
        let Ok(shard) = self.inner.of_group(group) else {
            return true;
        };
        if let Some(e) = shard.endpoints.map.lock().get_mut(group) {
            if e.expiring {
                return false;
            }
            e.idle_since = now;
        }
        true
    }

    /// What the core does to endpoints on its own (expiry), for adapters to follow.
    pub fn endpoint_events(&self) -> broadcast::Receiver<EndpointEvent> {
        self.inner.endpoint_events.subscribe()
    }

    /// Sweep the registered endpoints now (the core does it every `expiry_interval`):
    /// expired messages at their heads, endpoints unused for their `idle_expiry`.
    pub async fn expire_endpoints(&self) {
        for shard in self.inner.owned() {
            shard.expire_endpoints().await;
        }
    }
}

/// Sweep the endpoints every `expiry_interval`.
pub(crate) async fn run(inner: std::sync::Weak<ShardCore>) {
    loop {
        let Some(interval) = inner.upgrade().map(|i| i.config.expiry_interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(i) = inner.upgrade() else { return };
        i.expire_endpoints().await;
    }
}

impl ShardCore {
    async fn expire_endpoints(self: &Arc<Self>) {
        self.expire_idle().await;
        self.expire_messages().await;
    }

    /// Delete the endpoints unused for their `idle_expiry`, and the unused transient
    /// ones whose declaring gateway run is gone (`runs.rs`).
    async fn expire_idle(self: &Arc<Self>) {
        let now = self.clock.now();
        let Some(broker) = self.broker() else {
            return;
        };
        // The runs owning transient endpoints here, judged once per sweep (outside the
        // map's lock).
        let owners: std::collections::HashSet<crate::Run> = {
            let map = self.endpoints.map.lock();
            map.values()
                .filter(|e| e.users == 0 && !e.expiring)
                .filter_map(|e| e.endpoint.owner.clone())
                .collect()
        };
        let gone: std::collections::HashSet<crate::Run> =
            owners.into_iter().filter(|r| broker.run_gone(r)).collect();
        // Marked first: from here uses are refused (`endpoint_in_use` and
        // `touch_endpoint` answer false, `claim_endpoint` waits) until it is gone.
        let expired: Vec<(Endpoint, bool)> = {
            let mut map = self.endpoints.map.lock();
            map.values_mut()
                .filter_map(|e| {
                    if e.expiring || e.users > 0 {
                        return None;
                    }
                    let idle = e
                        .endpoint
                        .idle_expiry
                        .is_some_and(|ms| e.idle_since.saturating_add(ms) <= now);
                    let orphan = e.endpoint.owner.as_ref().is_some_and(|r| gone.contains(r));
                    (idle || orphan).then(|| {
                        e.expiring = true;
                        (e.endpoint.clone(), !idle)
                    })
                })
                .collect()
        };
        for (ep, orphan) in expired {
            if orphan {
                let owner = ep.owner.as_ref().expect("an orphan has an owner");
                tracing::info!(group = %ep.spec.name, node = %owner.node, run = owner.id, "core: a transient endpoint whose gateway is gone; deleted");
            } else {
                tracing::info!(group = %ep.spec.name, "core: endpoint unused for its expiry; deleted");
            }
            let mut records = Vec::with_capacity(ep.records.len());
            let mut delete = Records::new();
            for (ns, key) in &ep.records {
                let value = match broker.record(ns, key).await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(group = %ep.spec.name, error = %e, "core: reading an expired endpoint's record");
                        None
                    }
                };
                delete.delete(ns, key.clone());
                records.push((ns.clone(), key.clone(), value));
            }
            let mut first = true;
            let mut failed = false;
            for topic in &ep.spec.topics {
                let recs = if first {
                    std::mem::take(&mut delete)
                } else {
                    Records::new()
                };
                first = false;
                if let Err(e) = broker
                    .delete_endpoint(&ep.vhost, topic, &ep.spec.name, recs)
                    .await
                {
                    tracing::warn!(group = %ep.spec.name, error = %e, "core: deleting an expired endpoint failed; the next sweep tries again");
                    failed = true;
                }
            }
            {
                let mut map = self.endpoints.map.lock();
                if failed {
                    if let Some(e) = map.get_mut(&ep.spec.name) {
                        e.expiring = false;
                    }
                } else if let Some(e) = map.remove(&ep.spec.name) {
                    self.endpoints.unlimit(&e.endpoint.spec);
                }
            }
            self.endpoints.settled.notify_waiters();
            if failed {
                continue;
            }
            let _ = self.endpoints.events.send(EndpointEvent::Expired {
                group: ep.spec.name.clone(),
                records,
            });
        }
    }

    /// Settle expired messages at the head of endpoints with a message TTL, or with a
    /// dead-letter target (where a message's own expiry, AMQP's `expiration`, is what
    /// moves it on: the "wait queue" of a delayed retry, which nobody consumes), by their
    /// group (started for the purpose when it has no members and something is waiting).
    async fn expire_messages(self: &Arc<Self>) {
        let specs: Vec<GroupSpec> = self
            .endpoints
            .map
            .lock()
            .values()
            .filter(|e| {
                let p = &e.endpoint.spec.policy;
                p.message_ttl.is_some() || p.dead_letter.is_some()
            })
            .map(|e| e.endpoint.spec.clone())
            .collect();
        for spec in specs {
            let live = self
                .groups
                .lock()
                .get(&spec.name)
                .filter(|h| h.is_alive())
                .cloned();
            let (handle, marks) = match live {
                Some(h) => (h, None),
                None => {
                    let Some(marks) = self.waiting(&spec).await else {
                        self.endpoints.quiet_heads.lock().remove(&spec.name);
                        continue;
                    };
                    // Without a TTL only a message's own expiry can move a head on: none
                    // at the heads found last time, and the same heads now.
                    let marks = match spec.policy.message_ttl {
                        Some(_) => None,
                        None if self.endpoints.quiet_heads.lock().get(&spec.name)
                            == Some(&marks) =>
                        {
                            continue
                        }
                        None => Some(marks),
                    };
                    let watched = match self.watch_topics(&spec).await {
                        Ok(w) => w,
                        Err(e) => {
                            tracing::warn!(group = %spec.name, error = %e, "core: expiry sweep");
                            continue;
                        }
                    };
                    match self.group_handle(&spec, &watched) {
                        Ok(h) => (h, marks),
                        Err(_) => continue,
                    }
                }
            };
            let pending = handle.expire().await;
            if let Some(m) = marks {
                let mut quiet = self.endpoints.quiet_heads.lock();
                if pending {
                    quiet.remove(&spec.name);
                } else {
                    quiet.insert(spec.name.clone(), m);
                }
            }
        }
    }

    /// The committed offsets of a group without an actor, queue by queue, when messages
    /// wait past them or held below them (`group::held_at_rest`: unacknowledged when
    /// its last actor ended) (`None`: nothing waits).
    async fn waiting(&self, spec: &GroupSpec) -> Option<Vec<u64>> {
        let mut marks = Vec::new();
        let mut waiting = false;
        for t in &spec.topics {
            let Some(cfg) = self.store.topic(t) else {
                continue;
            };
            for q in 0..cfg.queue_count {
                let queue = QueueRef::new(t.clone(), q);
                let Ok(range) = self.store.queue_range(&queue) else {
                    continue;
                };
                let committed = match self.store.committed_offset(&spec.name, &queue).await {
                    Ok(Some(o)) => o.0,
                    _ => range.min.0,
                }
                .max(range.min.0);
                waiting |= range.next.0 > committed
                    || crate::group::held_at_rest(&*self.store, &spec.name, &queue, committed)
                        .await
                        > 0;
                marks.push(committed);
            }
        }
        waiting.then_some(marks)
    }
}

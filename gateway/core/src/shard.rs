//! Several shards in one gateway (issue 16, `docs/design/sharding.md` section 2).
//!
//! A sharded broker holds one [`ShardCore`] per shard, each over its own store. Where
//! things live:
//!
//! - a topic: the shard [`shard_of`] its name proposes, unless the topic already
//!   exists in another shard (each shard's store lists its own topics; the placement
//!   remembers them), so a topic never moves;
//! - a consumer group: the shard of its first topic; its `%RETRY%` and `%DLQ%` topics
//!   follow it (they are created by the group, in its shard);
//! - routing state (vhosts, exchanges, durable bindings), retained messages, named
//!   timers and records that no endpoint anchors: shard 0, the gateway's *meta* shard;
//! - an endpoint's records: with its topic (one write with its group's offsets).
//!
//! A publish whose destinations lie in several shards commits in one of them (its
//! home) with an outbox entry per other destination shard (`outbox.rs`); the
//! forwarder tasks here move those entries to each destination's inbox, exactly once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use mqgate_store::{GroupName, TopicName};
use parking_lot::RwLock;
use tokio::sync::{watch, Notify};

pub use crate::admin::{AdminAnswer, AdminOp};
use crate::broker::{ShardCore, ShardSet};
use crate::error::{CoreError, Result};
pub use crate::outbox::ShardId;
use crate::outbox::{ForwardReply, ForwardReq, ForwardTarget, Forwarder};
use crate::publish::{Destination, Outgoing, PublishBatch, Published, Remote, Submitted};

/// The most shards a broker may have: message ids name their shard in their top bits
/// (`shard << 44`) and stay below 2^53 for JSON clients.
pub const MAX_SHARDS: u16 = 512;

/// The bit position of the shard in a message id (`RocksConfig::id_base`).
pub const ID_SHARD_SHIFT: u32 = 44;

/// FNV-1a (64-bit): stable across builds and platforms, unlike std's hasher.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// SplitMix64's finaliser: spreads FNV's weak low bits over the whole word, so that
/// `% shards` and score comparisons see well-mixed values.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The shard a new topic named `topic` goes to, among `shards` (1..=MAX_SHARDS):
/// `splitmix64(fnv1a(topic)) % shards`.
pub fn shard_of(topic: &str, shards: u16) -> ShardId {
    assert!(
        (1..=MAX_SHARDS).contains(&shards),
        "a broker has 1..={MAX_SHARDS} shards, not {shards}"
    );
    (splitmix64(fnv1a(topic.as_bytes())) % u64::from(shards)) as ShardId
}

/// `<prefix>-<n>` for the first `n` landing in each of `shards` shards, by shard: names
/// that spread one per shard (tests and benchmarks of cross-shard paths).
pub fn one_name_per_shard(prefix: &str, shards: u16) -> Vec<String> {
    let mut by: BTreeMap<ShardId, String> = BTreeMap::new();
    for n in 0u64.. {
        let name = format!("{prefix}-{n}");
        by.entry(shard_of(&name, shards)).or_insert(name);
        if by.len() == usize::from(shards) {
            break;
        }
    }
    by.into_values().collect()
}

/// The shard whose store assigned message id `id` (ids start at `shard << 44`).
pub fn shard_of_id(id: u64) -> ShardId {
    (id >> ID_SHARD_SHIFT) as ShardId
}

/// Which shard holds each topic and group of a sharded broker: what the shards' stores
/// hold, else the hash of the name (a group: the shard of its first topic).
#[derive(Debug)]
pub(crate) struct Placement {
    shards: u16,
    topics: RwLock<HashMap<TopicName, ShardId>>,
    groups: RwLock<HashMap<GroupName, ShardId>>,
}

impl Placement {
    pub(crate) fn new(shards: u16) -> Self {
        assert!((1..=MAX_SHARDS).contains(&shards));
        Self {
            shards,
            topics: RwLock::default(),
            groups: RwLock::default(),
        }
    }

    /// The shard of `topic`: where it is, else where it would be created.
    pub(crate) fn topic(&self, topic: &TopicName) -> ShardId {
        if self.shards == 1 {
            return 0;
        }
        if let Some(s) = self.topics.read().get(topic) {
            return *s;
        }
        let name = topic.as_str();
        if let Some(g) = name
            .strip_prefix("%RETRY%")
            .or_else(|| name.strip_prefix("%DLQ%"))
        {
            return self.group_named(g);
        }
        shard_of(name, self.shards)
    }

    /// The shard of the group named `g` when known; else the shard a topic of that
    /// name would have (AMQP queues and MQTT sessions name their group as their topic).
    pub(crate) fn group_named(&self, g: &str) -> ShardId {
        if self.shards == 1 {
            return 0;
        }
        if let Ok(name) = GroupName::new(g) {
            if let Some(s) = self.groups.read().get(&name) {
                return *s;
            }
        }
        // One read of the map: a second read taken while the first is held waits
        // behind a queued writer, which waits for the first (parking_lot's locks are
        // fair): both threads stop.
        let known = TopicName::new(g)
            .ok()
            .and_then(|t| self.topics.read().get(&t).copied());
        known.unwrap_or_else(|| shard_of(g, self.shards))
    }

    /// The shard of a group.
    pub(crate) fn group(&self, g: &GroupName) -> ShardId {
        self.group_named(g.as_str())
    }

    /// The shard of `g`, when it is known here (not derived from its name).
    pub(crate) fn known_group(&self, g: &GroupName) -> Option<ShardId> {
        if self.shards == 1 {
            return Some(0);
        }
        self.groups.read().get(g).copied()
    }

    /// The shard of a group consuming `topics` (its first topic's), recorded.
    pub(crate) fn place_group(&self, g: &GroupName, topics: &[TopicName]) -> ShardId {
        if self.shards == 1 {
            return 0;
        }
        if let Some(s) = self.groups.read().get(g) {
            return *s;
        }
        let s = topics
            .first()
            .map_or_else(|| self.group(g), |t| self.topic(t));
        *self.groups.write().entry(g.clone()).or_insert(s)
    }

    /// `topic` exists in `shard`.
    pub(crate) fn topic_is_in(&self, topic: &TopicName, shard: ShardId) {
        if self.shards > 1 {
            self.topics.write().insert(topic.clone(), shard);
        }
    }

    /// `topic` was deleted: a new one of that name goes where the hash says.
    pub(crate) fn topic_gone(&self, topic: &TopicName) {
        if self.shards > 1 {
            self.topics.write().remove(topic);
        }
    }

    /// `group` has offsets in `shard`.
    pub(crate) fn group_is_in(&self, group: &GroupName, shard: ShardId) {
        if self.shards > 1 {
            self.groups.write().insert(group.clone(), shard);
        }
    }

    /// `group` was deleted.
    pub(crate) fn group_gone(&self, group: &GroupName) {
        if self.shards > 1 {
            self.groups.write().remove(group);
        }
    }
}

/// One forwarding route (home H to destination D) of a sharded broker in one process:
/// the task's wake-up and D's mark for H as last seen (what a publisher waits on to
/// keep its order, see `Broker::publish_submit`).
#[derive(Debug)]
pub(crate) struct Route {
    pub(crate) kick: Notify,
    pub(crate) mark: watch::Sender<u64>,
}

impl Route {
    pub(crate) fn new() -> Self {
        Self {
            kick: Notify::new(),
            mark: watch::channel(0).0,
        }
    }
}

/// How a gateway reaches the shards other gateways own (the cluster's relays).
#[async_trait]
pub trait ClusterLink: Send + Sync + std::fmt::Debug {
    /// This gateway's node id.
    fn node(&self) -> String {
        String::new()
    }

    /// The runs of the live gateways as their heartbeats say now (`None` while not
    /// known): an endpoint declared by a run missing from them for their grace is
    /// deleted ([`crate::Run`]).
    fn live_runs(&self) -> Option<crate::LiveRuns> {
        None
    }

    /// Shard `dest`'s inbox, wherever it is owned now.
    fn forward_target(&self, dest: ShardId) -> Arc<dyn ForwardTarget>;

    /// Submit `batch` to the gateway owning `shard` (the publish relay): every item's
    /// destinations lie in that shard, or it is an item for shard 0's routing (an
    /// exchange, a retained setting, a named timer). Batches submitted one after
    /// another by one caller reach the owner, and are stored, in that order; the
    /// [`Submitted`] resolves once the owner answered (after its write is durable). A
    /// batch nobody answers in time fails: it may or may not have been stored, so
    /// nothing is acknowledged and the client's resend makes a duplicate at worst.
    async fn publish(&self, shard: ShardId, batch: PublishBatch) -> Result<Submitted> {
        let _ = batch;
        Err(CoreError::NotOwned(shard))
    }

    /// Join group `spec` (which lives in `shard`) on the gateway owning it, as a member
    /// here (the consume relay): deliveries come over the relay, with credit as the
    /// member's prefetch; acks go back. A delivery lost on the way is delivered
    /// again, never lost; when the shard moves, the member joins its next owner.
    async fn subscribe(
        &self,
        shard: ShardId,
        spec: crate::GroupSpec,
        member: crate::MemberOptions,
    ) -> Result<crate::Consumer> {
        let _ = (spec, member);
        Err(CoreError::NotOwned(shard))
    }

    /// Run `op` (about `shard`) on the gateway owning it (the admin relay).
    async fn admin(&self, shard: ShardId, op: AdminOp) -> Result<AdminAnswer> {
        let _ = op;
        Err(CoreError::NotOwned(shard))
    }

    /// Record that group `group` lives in shard `proposed`, unless the cluster already
    /// has it elsewhere: the shard it lives in. Every gateway learns it
    /// ([`crate::Broker::learn_group_placement`]), so the group, its `%RETRY%` and
    /// `%DLQ%` topics are found by name on any of them. Only asked for a group whose
    /// shard is not the one its name hashes to (AMQP queues and MQTT sessions name
    /// their group after their topic: nothing to record).
    async fn record_group(&self, group: &GroupName, proposed: ShardId) -> Result<ShardId> {
        let _ = group;
        Ok(proposed)
    }

    /// On shard 0's owner, after a routing change written at log position `position`:
    /// wait (bounded) until every live gateway's router has applied it, so that what a
    /// client does next, through any gateway, routes with it (a binding, then a publish
    /// or a dead letter routed elsewhere).
    async fn routing_barrier(&self, position: u64) {
        let _ = position;
    }

    /// Group `group` was deleted: forget where it lived.
    async fn forget_group(&self, group: &GroupName) -> Result<()> {
        let _ = group;
        Ok(())
    }
}

/// A destination shard owned in this process: its inbox, and its core to wake the
/// groups consuming what was applied.
pub(crate) struct LocalTarget {
    dest: Weak<ShardCore>,
    id: ShardId,
}

impl LocalTarget {
    pub(crate) fn new(dest: &Arc<ShardCore>) -> Self {
        Self {
            dest: Arc::downgrade(dest),
            id: dest.id,
        }
    }

    /// The destination's core while it is attached (a detached shard's store belongs
    /// to its next owner).
    fn core(&self) -> Result<Arc<ShardCore>> {
        self.dest
            .upgrade()
            .filter(|d| {
                d.shard_set()
                    .and_then(|set| set.local(d.id))
                    .is_some_and(|now| Arc::ptr_eq(&now, d))
            })
            .ok_or(CoreError::NotOwned(self.id))
    }
}

#[async_trait]
impl ForwardTarget for LocalTarget {
    async fn next(&self, source: ShardId) -> Result<u64> {
        self.core()?.inbox.next_for(source).await
    }

    async fn apply(&self, req: ForwardReq) -> Result<ForwardReply> {
        let d = self.core()?;
        let source = req.source;
        let (reply, touched) = d.inbox.apply_touched(req).await?;
        if reply.applied > 0 {
            d.forwarded_in
                .fetch_add(reply.applied as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(source, dest = d.id, applied = reply.applied, topics = ?touched, "core: forwarded");
        }
        for t in &touched {
            d.wake_topic(t);
        }
        Ok(reply)
    }
}

/// Forward home's outbox entries for `dest` while home is attached: after every kick
/// (a write that staged some, the destination attached here) and every second
/// (entries left by a failure, by a previous owner, or for a shard owned nowhere yet).
/// The destination is looked up each round: in this process, else through the
/// cluster's link.
pub(crate) async fn forward(home: Weak<ShardCore>, dest: ShardId, route: Arc<Route>) {
    // Woken by the timer rather than a write: drop every forwarded entry.
    let mut idle = false;
    loop {
        let Some(h) = home.upgrade() else {
            return;
        };
        let Some(set) = h.shard_set() else {
            return;
        };
        let target = set.target(dest);
        drop(set);
        let trim = std::mem::take(&mut idle);
        if let Some(target) = target {
            let fwd = Forwarder::new(h.id, dest, Arc::clone(&h.store), target);
            match fwd.drain_to(trim).await {
                Ok(mark) => {
                    route.mark.send_if_modified(|m| {
                        let moved = mark > *m;
                        *m = (*m).max(mark);
                        moved
                    });
                }
                Err(CoreError::NotOwned(_)) => {
                    tracing::debug!(
                        home = h.id,
                        dest,
                        "core: forwarding waits for the destination's owner"
                    );
                    drop(h);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(home = h.id, dest, error = %e, "core: forwarding failed; retrying");
                    drop(h);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            }
        }
        drop(h);
        idle = tokio::select! {
            () = route.kick.notified() => false,
            () = tokio::time::sleep(Duration::from_secs(1)) => true,
        };
    }
}

/// A message of a run with one home: its index in the batch, itself, its destinations
/// in other shards.
type RunItem = (usize, Outgoing, Remote);

/// A stored message's answer naming the topics of other shards it was forwarded to.
fn with_forwarded(a: Published, remote: Remote) -> Published {
    match a {
        Published::Stored {
            id,
            offsets,
            refused,
            ..
        } => Published::Stored {
            id,
            offsets,
            refused,
            forwarded: remote.into_values().flatten().collect(),
        },
        other => other,
    }
}

/// Where one message of a sharded publish goes.
enum Planned {
    /// Nowhere (routed to no topic, no retained setting): answered `None`.
    Nowhere,
    /// Every destination in one shard (or a timer there): that shard's own path.
    One(ShardId, Outgoing),
    /// Destinations in several shards: stored in the home, forwarded to the others.
    Split(ShardId, Outgoing, Remote),
}

impl ShardSet {
    /// Shard `dest`'s inbox: here, else through the cluster's link (none: the shard
    /// is nowhere to be reached now).
    pub(crate) fn target(&self, dest: ShardId) -> Option<Arc<dyn ForwardTarget>> {
        match self.local(dest) {
            Some(d) => Some(Arc::new(LocalTarget::new(&d))),
            None => self.link.as_ref().map(|l| l.forward_target(dest)),
        }
    }

    /// Whether this gateway routes exchange publishes itself: it holds the routing
    /// state (shard 0, or a broker that is not part of a cluster), or follows it and
    /// has caught up (`meta.rs`). Otherwise they go to shard 0's owner as they are.
    fn routes_here(&self) -> bool {
        self.link.is_none() || self.local(0).is_some() || self.meta_follow.ready()
    }

    /// Submit a part whose destinations all lie in shard `s`: here, or through the
    /// cluster's publish relay to its owner.
    async fn part_submit(&self, s: ShardId, pb: PublishBatch) -> Result<Submitted> {
        match (self.local(s), &self.link) {
            (Some(local), _) => local.publish_submit(pb).await,
            (None, Some(link)) => link.publish(s, pb).await,
            (None, None) => Err(CoreError::NotOwned(s)),
        }
    }

    /// Wait until `dest` has applied home `h`'s outbox entry at `offset`: told by
    /// `h`'s forwarder, or, once `h` has moved to another gateway (whose forwarder
    /// goes on from the log), asked of the destination.
    async fn applied(&self, h: &Arc<ShardCore>, dest: ShardId, offset: u64) {
        let mut rx = h.routes[usize::from(dest)].mark.subscribe();
        loop {
            if *rx.borrow_and_update() > offset
                || self.closed.load(std::sync::atomic::Ordering::Acquire)
            {
                return;
            }
            tokio::select! {
                _ = rx.changed() => continue,
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            let moved = !self.local(h.id).is_some_and(|now| Arc::ptr_eq(&now, h));
            if moved {
                if let Some(t) = self.target(dest) {
                    if t.next(h.id).await.is_ok_and(|m| m > offset) {
                        return;
                    }
                }
            }
        }
    }

    /// [`crate::Broker::publish_batch`].
    pub(crate) async fn publish_batch(
        self: &Arc<Self>,
        b: PublishBatch,
    ) -> Result<Vec<Option<Published>>> {
        self.publish_submit(b).await?.await
    }

    /// [`crate::Broker::publish_submit`]. With one shard: that shard's path. Sharded:
    /// each message goes to the shard of its destinations; one whose destinations lie
    /// in several shards is stored once in its home (the shard holding most of them;
    /// shard 0 for a retained setting) with an outbox entry per other shard. To keep a
    /// publisher's order into every queue, such a message is written, and forwarded,
    /// before anything after it in the batch is submitted: what came before it is
    /// queued in each shard first, and what follows reaches each shard after it.
    pub(crate) async fn publish_submit(self: &Arc<Self>, b: PublishBatch) -> Result<Submitted> {
        if !self.sharded() {
            return self.part_submit(0, b).await;
        }
        let PublishBatch {
            items,
            records,
            durable,
        } = b;
        let n = items.len();
        let mut slots: Vec<Option<Published>> = vec![None; n];
        let mut pending: Vec<(Vec<usize>, Submitted)> = Vec::new();
        let mut parts: BTreeMap<ShardId, (Vec<usize>, PublishBatch)> = BTreeMap::new();
        let new_part = || {
            let mut pb = PublishBatch::new();
            pb.durable = durable;
            (Vec::new(), pb)
        };
        if !records.is_empty() {
            // Records given with a publish go with shard 0's part of it.
            parts.entry(0).or_insert_with(new_part).1.records = records;
        }
        // Consecutive messages with the same home are stored in one write and waited
        // for together (their outbox entries travel in the same requests).
        let mut run: Option<(ShardId, Vec<RunItem>)> = None;
        for (i, item) in items.into_iter().enumerate() {
            match self.plan_here(item)? {
                Planned::Nowhere => {}
                Planned::One(0, item)
                    if matches!(item.to, Destination::Exchange { .. }) && !self.routes_here() =>
                {
                    // Routed by shard 0's owner, into shards unknown here: what came
                    // before it is queued first, and it is queued in its destinations
                    // (the relay answers `queued` then) before anything after it.
                    if let Some((home, items)) = run.take() {
                        for (i, a) in self.publish_run(home, items, durable).await? {
                            slots[i] = a;
                        }
                    }
                    for (s, (idx, pb)) in std::mem::take(&mut parts) {
                        pending.push((idx, self.part_submit(s, pb).await?));
                    }
                    let (_, mut pb) = new_part();
                    pb.items.push(item);
                    pending.push((vec![i], self.part_submit(0, pb).await?));
                }
                Planned::One(s, item) => {
                    if let Some((home, items)) = run.take() {
                        for (i, a) in self.publish_run(home, items, durable).await? {
                            slots[i] = a;
                        }
                    }
                    let (idx, pb) = parts.entry(s).or_insert_with(new_part);
                    idx.push(i);
                    pb.items.push(item);
                }
                Planned::Split(home, item, remote) => {
                    match &mut run {
                        Some((h, items)) if *h == home => {
                            items.push((i, item, remote));
                            continue;
                        }
                        _ => {}
                    }
                    if let Some((home, items)) = run.take() {
                        for (i, a) in self.publish_run(home, items, durable).await? {
                            slots[i] = a;
                        }
                    }
                    for (s, (idx, pb)) in std::mem::take(&mut parts) {
                        pending.push((idx, self.part_submit(s, pb).await?));
                    }
                    run = Some((home, vec![(i, item, remote)]));
                }
            }
        }
        if let Some((home, items)) = run.take() {
            for (i, a) in self.publish_run(home, items, durable).await? {
                slots[i] = a;
            }
        }
        for (s, (idx, pb)) in parts {
            pending.push((idx, self.part_submit(s, pb).await?));
        }
        Ok(Submitted::boxed(Box::pin(async move {
            for (idx, sub) in pending {
                for (i, a) in idx.into_iter().zip(sub.await?) {
                    slots[i] = a;
                }
            }
            Ok(slots)
        })))
    }

    /// Store messages of one home in one write with their outbox entries, and wait
    /// until every destination has applied them; the answers by batch index. A home
    /// owned by another gateway: the run goes to it whole, through the publish relay
    /// (it stores and forwards them, and answers once they are applied). A home
    /// detached since it was planned: each message on its own, planned again.
    async fn publish_run(
        self: &Arc<Self>,
        home: ShardId,
        items: Vec<RunItem>,
        durable: bool,
    ) -> Result<Vec<(usize, Option<Published>)>> {
        if let (None, Some(link)) = (self.local(home), &self.link) {
            let mut pb = PublishBatch::new();
            pb.durable = durable;
            let mut idx = Vec::with_capacity(items.len());
            for (i, mut item, remote) in items {
                if let Destination::Topics(local) = &mut item.to {
                    local.extend(remote.into_values().flatten());
                }
                idx.push(i);
                pb.items.push(item);
            }
            let answers = link.publish(home, pb).await?.await?;
            return Ok(idx.into_iter().zip(answers).collect());
        }
        let Some(h) = self.local(home) else {
            let mut out = Vec::with_capacity(items.len());
            for (i, item, remote) in items {
                out.push((i, self.publish_split(home, item, remote, durable).await?));
            }
            return Ok(out);
        };
        let mut pb = PublishBatch::new();
        pb.durable = durable;
        let mut idx = Vec::with_capacity(items.len());
        let mut remotes = Vec::with_capacity(items.len());
        let mut dests = std::collections::BTreeSet::new();
        for (i, item, remote) in items {
            idx.push(i);
            dests.extend(remote.keys().copied());
            remotes.push(remote);
            pb.items.push(item);
        }
        let answers = h.submit_planned(pb, remotes.clone()).await?.await?;
        for d in dests {
            let next = h.store.queue_range(&crate::outbox::outbox_ref(d))?.next.0;
            if next > 0 {
                self.applied(&h, d, next - 1).await;
            }
        }
        Ok(idx
            .into_iter()
            .zip(answers.into_iter().zip(remotes))
            .map(|(i, (a, remote))| (i, a.map(|a| with_forwarded(a, remote))))
            .collect())
    }

    /// Store a message in its home `home` with outbox entries for `remote`, and wait
    /// until every destination has applied it (see [`ShardSet::publish_submit`]). A
    /// home detached since it was planned (a move racing the publish) is planned again.
    async fn publish_split(
        self: &Arc<Self>,
        mut home: ShardId,
        mut item: Outgoing,
        mut remote: Remote,
        durable: bool,
    ) -> Result<Option<Published>> {
        let mut tries = 0;
        let h = loop {
            if let Some(h) = self.local(home) {
                break h;
            }
            tries += 1;
            if tries > 3 {
                return Err(CoreError::NotOwned(home));
            }
            if let Destination::Topics(local) = &mut item.to {
                local.extend(std::mem::take(&mut remote).into_values().flatten());
            }
            match self.plan(item)? {
                Planned::Nowhere => return Ok(None),
                Planned::One(s, one) => {
                    let mut pb = PublishBatch::new();
                    pb.durable = durable;
                    pb.items.push(one);
                    return Ok(self
                        .shard(s)?
                        .publish_submit(pb)
                        .await?
                        .await?
                        .pop()
                        .flatten());
                }
                Planned::Split(h2, i2, r2) => (home, item, remote) = (h2, i2, r2),
            }
        };
        let mut pb = PublishBatch::new();
        pb.durable = durable;
        pb.items.push(item);
        let answer = h
            .submit_planned(pb, vec![remote.clone()])
            .await?
            .await?
            .pop()
            .flatten();
        if matches!(answer, Some(Published::Stored { .. })) {
            for d in remote.keys() {
                let next = h.store.queue_range(&crate::outbox::outbox_ref(*d))?.next.0;
                if next > 0 {
                    self.applied(&h, *d, next - 1).await;
                }
            }
        }
        Ok(answer.map(|a| with_forwarded(a, remote)))
    }

    /// [`ShardSet::plan`], planned again when a shard it picked was detached in the
    /// meantime (a move racing the publish).
    fn plan_here(&self, item: Outgoing) -> Result<Planned> {
        let mut planned = self.plan(item)?;
        if self.link.is_some() {
            // A gateway of a cluster relays to whichever gateway owns the shard now.
            return Ok(planned);
        }
        for _ in 0..3 {
            let (s, item) = match planned {
                Planned::One(s, item) if self.local(s).is_none() => (s, item),
                Planned::Split(s, mut item, remote) if self.local(s).is_none() => {
                    // The destinations as the plan found them.
                    if let Destination::Topics(local) = &mut item.to {
                        local.extend(remote.into_values().flatten());
                    }
                    (s, item)
                }
                done => return Ok(done),
            };
            tracing::debug!(
                shard = s,
                "core: a shard moved while a publish was planned; again"
            );
            planned = self.plan(item)?;
        }
        Ok(planned)
    }

    /// Where `item` goes (see [`ShardSet::publish_submit`]).
    fn plan(&self, mut item: Outgoing) -> Result<Planned> {
        let p = &self.placement;
        if item.delay.is_some() && self.due(item.delay).is_none() {
            // Due now: routed now.
            item.delay = None;
        }
        if item.delay.is_some() {
            // A timer: in its topic's shard; through an exchange (routed at release)
            // or with a retained setting, in shard 0.
            let s = match (&item.to, &item.retain) {
                (Destination::Topic { topic, .. }, None) => p.topic(topic),
                (Destination::Topics(ts), None) if ts.len() == 1 => p.topic(&ts[0]),
                _ => 0,
            };
            return Ok(Planned::One(s, item));
        }
        let topics = match &item.to {
            Destination::Topic { topic, .. } => {
                let s = p.topic(topic);
                if item.retain.is_none() || s == 0 {
                    return Ok(Planned::One(s, item));
                }
                vec![topic.clone()]
            }
            Destination::Topics(ts) => ts.to_vec(),
            Destination::Exchange { .. } if !self.routes_here() => {
                // Routed by the gateway holding the routing state.
                return Ok(Planned::One(0, item));
            }
            Destination::Exchange {
                vhost,
                exchange,
                key,
                headers,
            } => self.router.route(vhost, exchange, key, headers)?.topics,
        };
        let mut by: Remote = BTreeMap::new();
        for t in topics {
            by.entry(p.topic(&t)).or_default().push(t);
        }
        let home = if item.retain.is_some() {
            0
        } else {
            // The shard holding most destinations, among those owned here if any
            // (ties: the lowest).
            let here = by.keys().any(|s| self.local(*s).is_some());
            match by
                .iter()
                .filter(|(s, _)| !here || self.local(**s).is_some())
                .max_by(|a, b| a.1.len().cmp(&b.1.len()).then(b.0.cmp(a.0)))
            {
                Some((s, _)) => *s,
                None => return Ok(Planned::Nowhere),
            }
        };
        let local = by.remove(&home).unwrap_or_default();
        item.to = Destination::Topics(local.into());
        if by.is_empty() {
            return Ok(Planned::One(home, item));
        }
        Ok(Planned::Split(home, item, by))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_values() {
        // Pinned: a change here moves every topic not yet created.
        let got: Vec<ShardId> = ["orders", "amq.topic", "%MQTT%client-1", ""]
            .iter()
            .map(|t| shard_of(t, 16))
            .collect();
        assert_eq!(got, vec![6, 0, 3, 0]);
        assert_eq!(shard_of("anything", 1), 0);
    }

    #[test]
    fn retry_and_dlq_topics_follow_their_group() {
        let p = Placement::new(8);
        let g = GroupName::new("g1").unwrap();
        let t = TopicName::new("orders").unwrap();
        let s = p.place_group(&g, std::slice::from_ref(&t));
        assert_eq!(s, shard_of("orders", 8));
        assert_eq!(p.topic(&TopicName::new("%RETRY%g1").unwrap()), s);
        assert_eq!(p.topic(&TopicName::new("%DLQ%g1").unwrap()), s);
        // An AMQP queue's group is named as its topic: same shard, known or not.
        let q = "%AMQP%/jobs";
        assert_eq!(
            p.topic(&TopicName::new(format!("%RETRY%{q}")).unwrap()),
            p.topic(&TopicName::new(q).unwrap())
        );
        // A topic that exists elsewhere stays there.
        p.topic_is_in(&t, (s + 1) % 8);
        assert_eq!(p.topic(&t), (s + 1) % 8);
    }
}

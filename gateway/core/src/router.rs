//! Routing: RabbitMQ's exchanges and bindings, per virtual host, resolving a publish to
//! the topics that should index it. AMQP declares exchanges and binds queues; MQTT binds
//! each subscription to `amq.topic` of the default vhost with its filter (RabbitMQ's MQTT
//! convention), so a publish from either protocol reaches subscribers of both.
//!
//! Cost of a route: a direct exchange is one hash lookup, a topic exchange walks a
//! [`TopicTrie`] (cost grows with matches, not with bindings), fanout lists its bindings
//! (all of which match), headers exchanges check their own bindings.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use mqgate_store::TopicName;
use parking_lot::RwLock;

use crate::error::{CoreError, Result};
use crate::trie::{Syntax, TopicTrie};

mod bound;
mod memo;

use self::bound::{match_of, Bound, DestBindings};
use self::memo::Changing;
pub use self::memo::RouteMemo;

/// The default virtual host.
pub const DEFAULT_VHOST: &str = "/";

/// Bindings added or removed per hold of a vhost's write lock by the batch operations
/// ([`Router::bind_many`], [`Router::unbind_many`], [`Router::unbind_topic`]): a few
/// hundred microseconds, so publishes routed in between never wait long.
pub const LOCK_CHUNK: usize = 512;

/// The exchange types.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum ExchangeKind {
    /// Routing key equals binding key.
    Direct,
    /// Every binding.
    Fanout,
    /// Binding key is a pattern (`*`, `#`).
    Topic,
    /// Binding arguments match message headers (`x-match` all/any).
    Headers,
}

impl ExchangeKind {
    /// The AMQP name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }

    /// Parse an AMQP type name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => ExchangeKind::Direct,
            "fanout" => ExchangeKind::Fanout,
            "topic" => ExchangeKind::Topic,
            "headers" => ExchangeKind::Headers,
            _ => return None,
        })
    }
}

/// An exchange's definition.
#[derive(Clone, PartialEq, Debug)]
pub struct ExchangeDef {
    /// Its name within its vhost (`""` is the default exchange).
    pub name: String,
    /// Its type.
    pub kind: ExchangeKind,
    /// Survives restarts.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Clients may not publish to it directly.
    pub internal: bool,
    /// Where messages go that it routes nowhere.
    pub alternate: Option<String>,
    /// The adapter's encoding of the declare arguments (for equivalence checks).
    pub arguments: Bytes,
}

impl ExchangeDef {
    /// A durable, non-internal exchange of `kind` with no arguments.
    pub fn new(name: impl Into<String>, kind: ExchangeKind) -> Self {
        Self {
            name: name.into(),
            kind,
            durable: true,
            auto_delete: false,
            internal: false,
            alternate: None,
            arguments: Bytes::new(),
        }
    }
}

/// Where a binding delivers.
#[derive(Clone, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Destination {
    /// A topic (an AMQP queue, an MQTT session's queue, a RocketMQ topic).
    Topic(TopicName),
    /// Another exchange of the same vhost.
    Exchange(String),
}

/// A header value, as compared by a headers exchange (type and value must both match).
#[derive(Clone, PartialEq, Debug)]
pub enum HeaderValue {
    /// Text.
    Str(String),
    /// Any integer type.
    Int(i64),
    /// Any float type.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// Void: matches on presence alone.
    Void,
    /// Anything else, in the adapter's encoding.
    Other(Bytes),
}

/// The match rule of a headers binding.
#[derive(Clone, PartialEq, Debug)]
pub struct HeaderMatch {
    /// `x-match: all` (else any).
    pub all: bool,
    /// The headers to match (without `x-match`; without the other `x-` arguments too
    /// but in the `any-with-x` / `all-with-x` modes).
    pub headers: Vec<(String, HeaderValue)>,
}

impl HeaderMatch {
    fn matches(&self, message: &[(String, HeaderValue)]) -> bool {
        let hit = |(k, v): &(String, HeaderValue)| {
            message
                .iter()
                .any(|(mk, mv)| mk == k && (*v == HeaderValue::Void || mv == v))
        };
        if self.all {
            self.headers.iter().all(hit)
        } else {
            self.headers.iter().any(hit)
        }
    }
}

/// A binding from an exchange to a destination.
#[derive(Clone, PartialEq, Debug)]
pub struct Binding {
    /// The source exchange.
    pub source: String,
    /// The destination.
    pub destination: Destination,
    /// The binding key (a pattern on topic exchanges; an MQTT filter when `mqtt`).
    pub key: String,
    /// For headers exchanges.
    pub headers: Option<HeaderMatch>,
    /// The key is an MQTT filter (`/`, `+`, `#`, the `$` rule), not an AMQP pattern.
    pub mqtt: bool,
    /// The adapter's encoding of the bind arguments (bindings differing only here are
    /// distinct, as in RabbitMQ).
    pub arguments: Bytes,
}

/// Convert an MQTT topic name to an AMQP routing key: `/` and `.` swap (RabbitMQ's MQTT
/// plugin convention).
pub fn mqtt_to_amqp(topic: &str) -> String {
    topic
        .chars()
        .map(|c| match c {
            '/' => '.',
            '.' => '/',
            c => c,
        })
        .collect()
}

/// The inverse of [`mqtt_to_amqp`].
pub fn amqp_to_mqtt(key: &str) -> String {
    mqtt_to_amqp(key)
}

#[derive(Debug)]
enum Index {
    Direct(HashMap<String, Vec<Destination>>),
    Fanout(Vec<Destination>),
    Topic {
        amqp: TopicTrie<Destination>,
        mqtt: TopicTrie<Destination>,
    },
    Headers(Vec<(HeaderMatch, Destination)>),
}

#[derive(Debug)]
struct Exchange {
    def: ExchangeDef,
    /// Every binding, under its destination: one map, so a binding is stored once, a
    /// deleted queue's bindings are found without a scan, and adding or dropping one
    /// costs O(1) (O(bindings of that destination) up to [`DestBindings::FEW`]).
    by_dest: HashMap<Destination, DestBindings>,
    /// How many bindings it has.
    count: usize,
    index: Index,
}

impl Exchange {
    fn new(def: ExchangeDef) -> Self {
        let index = match def.kind {
            ExchangeKind::Direct => Index::Direct(HashMap::new()),
            ExchangeKind::Fanout => Index::Fanout(Vec::new()),
            ExchangeKind::Topic => Index::Topic {
                amqp: TopicTrie::new(Syntax::Amqp),
                mqtt: TopicTrie::new(Syntax::Mqtt),
            },
            ExchangeKind::Headers => Index::Headers(Vec::new()),
        };
        Self {
            def,
            by_dest: HashMap::new(),
            count: 0,
            index,
        }
    }

    fn add(&mut self, b: Binding) -> bool {
        let kind = self.def.kind;
        let dest = self
            .by_dest
            .entry(b.destination.clone())
            .or_insert_with(|| DestBindings::Few(Vec::new()));
        if dest.contains(&b) {
            return false;
        }
        // Bindings differing only in arguments route alike: index the route once.
        let routed_already = dest.add(Bound::of(&b), kind);
        self.count += 1;
        if !routed_already {
            match &mut self.index {
                Index::Direct(map) => map.entry(b.key).or_default().push(b.destination),
                Index::Fanout(v) => v.push(b.destination),
                Index::Topic { amqp, mqtt } => {
                    if b.mqtt {
                        mqtt.insert(&b.key, b.destination);
                    } else {
                        amqp.insert(&b.key, b.destination);
                    }
                }
                Index::Headers(v) => v.push((match_of(b.headers.as_ref()), b.destination)),
            }
        }
        true
    }

    /// Remove the binding identified like `b` (destination, key, arguments, syntax).
    fn remove(&mut self, b: &Binding) -> Option<Binding> {
        let kind = self.def.kind;
        let dest = &b.destination;
        let bindings = self.by_dest.get_mut(dest)?;
        let (gone, still_routed) = bindings.remove(b, kind)?;
        if bindings.len() == 0 {
            self.by_dest.remove(dest);
        }
        self.count -= 1;
        if !still_routed {
            match &mut self.index {
                Index::Direct(map) => {
                    if let Some(v) = map.get_mut(&*gone.key) {
                        v.retain(|d| d != dest);
                        if v.is_empty() {
                            map.remove(&*gone.key);
                        }
                    }
                }
                Index::Fanout(v) => v.retain(|d| d != dest),
                Index::Topic { amqp, mqtt } => {
                    if gone.mqtt {
                        mqtt.remove(&gone.key, dest);
                    } else {
                        amqp.remove(&gone.key, dest);
                    }
                }
                Index::Headers(v) => {
                    let m = gone.header_match();
                    v.retain(|(hm, d)| !(d == dest && *hm == m));
                }
            }
        }
        Some(gone.binding(&self.def.name, dest))
    }

    /// Every binding, as [`Binding`]s.
    fn bindings(&self) -> Vec<Binding> {
        self.by_dest
            .iter()
            .flat_map(|(d, bs)| bs.each().map(|b| b.binding(&self.def.name, d)))
            .collect()
    }

    /// Remove bindings to `dest`, at most `limit` of them; returns them.
    fn remove_dest(&mut self, dest: &Destination, limit: usize) -> Vec<Binding> {
        let doomed: Vec<Binding> = match self.by_dest.get(dest) {
            Some(bs) => bs
                .each()
                .take(limit)
                .map(|b| b.binding(&self.def.name, dest))
                .collect(),
            None => return Vec::new(),
        };
        doomed.iter().filter_map(|b| self.remove(b)).collect()
    }

    fn route_into(&self, key: &str, headers: &[(String, HeaderValue)], out: &mut Vec<Destination>) {
        match &self.index {
            Index::Direct(map) => {
                if let Some(d) = map.get(key) {
                    out.extend(d.iter().cloned());
                }
            }
            Index::Fanout(v) => out.extend(v.iter().cloned()),
            Index::Topic { amqp, mqtt } => {
                amqp.matches(key, out);
                if !mqtt.is_empty() {
                    mqtt.matches(&amqp_to_mqtt(key), out);
                }
            }
            Index::Headers(v) => out.extend(
                v.iter()
                    .filter(|(m, _)| m.matches(headers))
                    .map(|(_, d)| d.clone()),
            ),
        }
    }
}

#[derive(Debug, Default)]
struct VHost {
    exchanges: HashMap<String, Exchange>,
}

/// The routing tables of every vhost.
#[derive(Debug, Default)]
pub struct Router {
    vhosts: RwLock<HashMap<String, Arc<RwLock<VHost>>>>,
    /// Moved by every change of any vhost's tables (after the change, before the
    /// method returns): a publisher that routed under generation `g` and still reads
    /// `g` may reuse its answer ([`Router::generation`], [`Router::route_stable`]).
    generation: AtomicU64,
}

/// The standard exchanges every vhost has (RabbitMQ's set).
pub fn standard_exchanges() -> Vec<ExchangeDef> {
    vec![
        ExchangeDef::new("", ExchangeKind::Direct),
        ExchangeDef::new("amq.direct", ExchangeKind::Direct),
        ExchangeDef::new("amq.fanout", ExchangeKind::Fanout),
        ExchangeDef::new("amq.topic", ExchangeKind::Topic),
        ExchangeDef::new("amq.headers", ExchangeKind::Headers),
        ExchangeDef::new("amq.match", ExchangeKind::Headers),
    ]
}

/// Where a routed publish goes.
#[derive(Debug, Default, PartialEq)]
pub struct Routed {
    /// The topics, each once.
    pub topics: Vec<TopicName>,
}

impl Router {
    /// A router with no vhosts.
    pub fn new() -> Self {
        Self::default()
    }

    /// Take `other`'s whole state in one step (a route sees the old state or the new).
    pub(crate) fn replace(&self, other: Router) {
        *self.vhosts.write() = other.vhosts.into_inner();
        self.changed();
    }

    /// Note a change of the tables (see `generation`).
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// A vhost's tables for writing: the generation moves once the guard is let go.
    fn write<'a>(&'a self, v: &'a RwLock<VHost>) -> Changing<'a> {
        Changing::new(v, &self.generation)
    }

    /// The tables' generation: read it before routing; an answer from
    /// [`Router::route_stable`] marked stable stays right for the same exchange and key
    /// while this reads the same.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn vhost(&self, vhost: &str) -> Result<Arc<RwLock<VHost>>> {
        self.vhosts
            .read()
            .get(vhost)
            .cloned()
            .ok_or_else(|| CoreError::NoSuchExchange(format!("vhost {vhost}")))
    }

    /// Create a vhost with the standard exchanges (no-op if it exists).
    pub fn add_vhost(&self, vhost: &str) {
        let mut vhosts = self.vhosts.write();
        vhosts.entry(vhost.to_owned()).or_insert_with(|| {
            let mut v = VHost::default();
            for def in standard_exchanges() {
                v.exchanges.insert(def.name.clone(), Exchange::new(def));
            }
            Arc::new(RwLock::new(v))
        });
        drop(vhosts);
        self.changed();
    }

    /// Remove a vhost and everything in it.
    pub fn remove_vhost(&self, vhost: &str) -> bool {
        let removed = self.vhosts.write().remove(vhost).is_some();
        self.changed();
        removed
    }

    /// The vhosts, sorted.
    pub fn vhosts(&self) -> Vec<String> {
        let mut v: Vec<String> = self.vhosts.read().keys().cloned().collect();
        v.sort();
        v
    }

    /// Declare an exchange. Returns `Ok(true)` if created, `Ok(false)` if an equivalent one
    /// exists; a different one with the same name is a [`CoreError::Conflict`].
    pub fn declare_exchange(&self, vhost: &str, def: ExchangeDef) -> Result<bool> {
        let v = self.vhost(vhost)?;
        let mut v = self.write(&v);
        if let Some(existing) = v.exchanges.get(&def.name) {
            let e = &existing.def;
            if e.kind != def.kind
                || e.durable != def.durable
                || e.auto_delete != def.auto_delete
                || e.internal != def.internal
                || e.arguments != def.arguments
            {
                return Err(CoreError::Conflict(format!(
                    "exchange '{}' in vhost '{vhost}' exists with other properties",
                    def.name
                )));
            }
            return Ok(false);
        }
        v.exchanges.insert(def.name.clone(), Exchange::new(def));
        Ok(true)
    }

    /// An exchange's definition.
    pub fn exchange(&self, vhost: &str, name: &str) -> Option<ExchangeDef> {
        let v = self.vhost(vhost).ok()?;
        let v = v.read();
        v.exchanges.get(name).map(|e| e.def.clone())
    }

    /// Whether the exchange is internal (`None`: no such exchange), without copying its
    /// definition (a publish asks this every time).
    pub fn exchange_internal(&self, vhost: &str, name: &str) -> Option<bool> {
        let v = self.vhost(vhost).ok()?;
        let v = v.read();
        v.exchanges.get(name).map(|e| e.def.internal)
    }

    /// Every exchange of a vhost, sorted by name.
    pub fn exchanges(&self, vhost: &str) -> Vec<ExchangeDef> {
        let Ok(v) = self.vhost(vhost) else {
            return Vec::new();
        };
        let v = v.read();
        let mut out: Vec<ExchangeDef> = v.exchanges.values().map(|e| e.def.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Delete an exchange, its bindings and bindings to it. With `if_unused`, refuse
    /// ([`CoreError::Conflict`]) while it has bindings. Returns whether it existed.
    pub fn delete_exchange(&self, vhost: &str, name: &str, if_unused: bool) -> Result<bool> {
        let v = self.vhost(vhost)?;
        let mut v = self.write(&v);
        match v.exchanges.get(name) {
            None => return Ok(false),
            Some(e) if if_unused && e.count > 0 => {
                return Err(CoreError::Conflict(format!("exchange '{name}' in use")))
            }
            Some(_) => {}
        }
        v.exchanges.remove(name);
        let dest = Destination::Exchange(name.to_owned());
        for e in v.exchanges.values_mut() {
            e.remove_dest(&dest, usize::MAX);
        }
        Ok(true)
    }

    /// Add a binding. Returns whether it was new.
    pub fn bind(&self, vhost: &str, binding: Binding) -> Result<bool> {
        let v = self.vhost(vhost)?;
        let mut v = self.write(&v);
        Self::bind_locked(&mut v, binding)
    }

    /// Add bindings (an MQTT SUBSCRIBE's filters, stored bindings at start): per
    /// binding, whether it was new, or why it could not be added. Each costs O(1) plus
    /// a trie insert; the vhost's write lock is taken per [`LOCK_CHUNK`] bindings, so
    /// routing in between never waits for more than one chunk.
    pub fn bind_many(&self, vhost: &str, bindings: &[Binding]) -> Result<Vec<Result<bool>>> {
        let v = self.vhost(vhost)?;
        let mut out = Vec::with_capacity(bindings.len());
        for chunk in bindings.chunks(LOCK_CHUNK) {
            let mut v = self.write(&v);
            for b in chunk {
                out.push(Self::bind_locked(&mut v, b.clone()));
            }
        }
        Ok(out)
    }

    fn bind_locked(v: &mut VHost, binding: Binding) -> Result<bool> {
        if let Destination::Exchange(d) = &binding.destination {
            if !v.exchanges.contains_key(d) {
                return Err(CoreError::NoSuchExchange(d.clone()));
            }
        }
        let e = v
            .exchanges
            .get_mut(&binding.source)
            .ok_or_else(|| CoreError::NoSuchExchange(binding.source.clone()))?;
        Ok(e.add(binding))
    }

    /// Remove a binding (matched by source, destination, key and arguments). Returns
    /// whether it existed. An auto-delete exchange left without bindings is deleted.
    pub fn unbind(&self, vhost: &str, binding: &Binding) -> Result<bool> {
        let v = self.vhost(vhost)?;
        let mut v = self.write(&v);
        Self::unbind_locked(&mut v, binding)
    }

    /// Remove bindings (an MQTT UNSUBSCRIBE's filters): per binding, whether it
    /// existed, or why it could not be removed. Like [`Router::bind_many`], O(1) each
    /// and the write lock taken per [`LOCK_CHUNK`].
    pub fn unbind_many(&self, vhost: &str, bindings: &[Binding]) -> Result<Vec<Result<bool>>> {
        let v = self.vhost(vhost)?;
        let mut out = Vec::with_capacity(bindings.len());
        for chunk in bindings.chunks(LOCK_CHUNK) {
            let mut v = self.write(&v);
            for b in chunk {
                out.push(Self::unbind_locked(&mut v, b));
            }
        }
        Ok(out)
    }

    fn unbind_locked(v: &mut VHost, binding: &Binding) -> Result<bool> {
        let e = v
            .exchanges
            .get_mut(&binding.source)
            .ok_or_else(|| CoreError::NoSuchExchange(binding.source.clone()))?;
        let removed = e.remove(binding).is_some();
        if removed && e.def.auto_delete && e.count == 0 {
            v.exchanges.remove(&binding.source);
        }
        Ok(removed)
    }

    /// Remove every binding to `topic` in `vhost` (its queue was deleted). Returns the
    /// removed bindings and the auto-delete exchanges this left empty (deleted too).
    /// Costs what the topic had, not what the vhost has, and takes the write lock per
    /// [`LOCK_CHUNK`] bindings (an MQTT session can have many).
    pub fn unbind_topic(&self, vhost: &str, topic: &TopicName) -> (Vec<Binding>, Vec<String>) {
        let Ok(v) = self.vhost(vhost) else {
            return (Vec::new(), Vec::new());
        };
        let dest = Destination::Topic(topic.clone());
        let mut removed = Vec::new();
        let mut emptied = Vec::new();
        loop {
            let mut v = self.write(&v);
            let mut budget = LOCK_CHUNK;
            let mut now_empty = Vec::new();
            for e in v.exchanges.values_mut() {
                if budget == 0 {
                    break;
                }
                if e.by_dest.contains_key(&dest) {
                    let gone = e.remove_dest(&dest, budget);
                    budget -= gone.len();
                    removed.extend(gone);
                    if e.def.auto_delete && e.count == 0 {
                        now_empty.push(e.def.name.clone());
                    }
                }
            }
            for name in &now_empty {
                v.exchanges.remove(name);
            }
            emptied.extend(now_empty);
            if budget > 0 {
                break;
            }
        }
        (removed, emptied)
    }

    /// The bindings whose source is `exchange` (all exchanges when `None`).
    pub fn bindings(&self, vhost: &str, exchange: Option<&str>) -> Vec<Binding> {
        let Ok(v) = self.vhost(vhost) else {
            return Vec::new();
        };
        let v = v.read();
        v.exchanges
            .values()
            .filter(|e| exchange.is_none_or(|x| x == e.def.name))
            .flat_map(|e| {
                let mut b = e.bindings();
                b.sort_by(|x, y| (&x.destination, &x.key).cmp(&(&y.destination, &y.key)));
                b
            })
            .collect()
    }

    /// Resolve a publish to `exchange` with `key` and `headers` to its topics: follows
    /// exchange-to-exchange bindings (each exchange once) and alternate exchanges.
    pub fn route(
        &self,
        vhost: &str,
        exchange: &str,
        key: &str,
        headers: &[(String, HeaderValue)],
    ) -> Result<Routed> {
        self.route_stable(vhost, exchange, key, headers)
            .map(|(routed, _)| routed)
    }

    /// [`Router::route`], and whether the answer depends only on the exchange and the
    /// key (the first exchange is not a headers exchange and its bindings lead to queues
    /// only): such an answer can be reused for the same exchange and key while
    /// [`Router::generation`] (read before this call) stays the same.
    pub fn route_stable(
        &self,
        vhost: &str,
        exchange: &str,
        key: &str,
        headers: &[(String, HeaderValue)],
    ) -> Result<(Routed, bool)> {
        let v = self.vhost(vhost)?;
        let v = v.read();
        let Some(first) = v.exchanges.get(exchange) else {
            return Err(CoreError::NoSuchExchange(exchange.to_owned()));
        };
        let stable = first.def.kind != ExchangeKind::Headers;
        // The usual case, bindings to queues only: no walk of the exchange graph (its
        // sets and names cost a publish seven allocations and three hashes).
        let mut dests = Vec::new();
        first.route_into(key, headers, &mut dests);
        if !dests.is_empty() && dests.iter().all(|d| matches!(d, Destination::Topic(_))) {
            let mut topics: Vec<TopicName> = Vec::with_capacity(dests.len());
            if dests.len() <= 16 {
                for d in dests {
                    if let Destination::Topic(t) = d {
                        if !topics.contains(&t) {
                            topics.push(t);
                        }
                    }
                }
            } else {
                let mut seen = HashSet::with_capacity(dests.len());
                for d in dests {
                    if let Destination::Topic(t) = d {
                        if seen.insert(t.clone()) {
                            topics.push(t);
                        }
                    }
                }
            }
            return Ok((Routed { topics }, stable));
        }
        let mut topics = Vec::new();
        let mut seen_topics = HashSet::new();
        let mut visited = HashSet::new();
        let mut pending = vec![exchange.to_owned()];
        while let Some(name) = pending.pop() {
            if !visited.insert(name.clone()) {
                continue;
            }
            let Some(e) = v.exchanges.get(&name) else {
                continue;
            };
            dests.clear();
            e.route_into(key, headers, &mut dests);
            let mut routed_any = false;
            for d in dests.drain(..) {
                routed_any = true;
                match d {
                    Destination::Topic(t) => {
                        if seen_topics.insert(t.clone()) {
                            topics.push(t);
                        }
                    }
                    Destination::Exchange(x) => pending.push(x),
                }
            }
            if !routed_any {
                if let Some(ae) = &e.def.alternate {
                    pending.push(ae.clone());
                }
            }
        }
        Ok((Routed { topics }, false))
    }
}

#[cfg(test)]
mod tests;

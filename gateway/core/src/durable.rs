//! Durable routing state in the store's keyed area: vhosts, durable exchanges and durable
//! bindings survive restarts. [`crate::Broker`] writes here as it changes the router, and
//! reloads everything at start.
//!
//! | namespace       | key                                   | value            |
//! |-----------------|---------------------------------------|------------------|
//! | `core.vhost`    | vhost                                 | empty            |
//! | `core.exchange` | vhost, 0, exchange name               | definition       |
//! | `core.binding`  | vhost, 0, binding identity            | header match     |

use bytes::{BufMut, Bytes};
use mqgate_store::{KvChange, Store, TopicName, WriteBatch};

use crate::error::{CoreError, Result};
use crate::router::{Binding, Destination, ExchangeDef, ExchangeKind, HeaderMatch, Router};
use crate::wire::{get_headers, put_bytes, put_headers, put_str, Reader};

const NS_VHOST: &str = "core.vhost";
const NS_EXCHANGE: &str = "core.exchange";
const NS_BINDING: &str = "core.binding";
const NS_EXCHANGE_T: &str = "core.exchange.t";
const NS_BINDING_T: &str = "core.binding.t";

fn exchange_ns(durable: bool) -> &'static str {
    if durable {
        NS_EXCHANGE
    } else {
        NS_EXCHANGE_T
    }
}

fn binding_ns(durable: bool) -> &'static str {
    if durable {
        NS_BINDING
    } else {
        NS_BINDING_T
    }
}

fn vhost_prefix(vhost: &str) -> Vec<u8> {
    let mut k = vhost.as_bytes().to_vec();
    k.push(0);
    k
}

fn exchange_key(vhost: &str, name: &str) -> Vec<u8> {
    let mut k = vhost_prefix(vhost);
    k.extend_from_slice(name.as_bytes());
    k
}

fn encode_exchange(def: &ExchangeDef) -> Vec<u8> {
    let mut out = Vec::new();
    out.put_u8(match def.kind {
        ExchangeKind::Direct => 1,
        ExchangeKind::Fanout => 2,
        ExchangeKind::Topic => 3,
        ExchangeKind::Headers => 4,
    });
    out.put_u8(
        u8::from(def.durable) | u8::from(def.auto_delete) << 1 | u8::from(def.internal) << 2,
    );
    out.put_u8(u8::from(def.alternate.is_some()));
    put_str(&mut out, def.alternate.as_deref().unwrap_or(""));
    put_bytes(&mut out, &def.arguments);
    out
}

fn decode_exchange(name: String, v: Bytes) -> Result<ExchangeDef> {
    let mut r = Reader(v);
    let kind = match r.u8()? {
        1 => ExchangeKind::Direct,
        2 => ExchangeKind::Fanout,
        3 => ExchangeKind::Topic,
        4 => ExchangeKind::Headers,
        k => return Err(CoreError::Invalid(format!("unknown exchange kind {k}"))),
    };
    let flags = r.u8()?;
    let has_alternate = r.u8()? == 1;
    let alternate = r.string()?;
    Ok(ExchangeDef {
        name,
        kind,
        durable: flags & 1 != 0,
        auto_delete: flags & 2 != 0,
        internal: flags & 4 != 0,
        alternate: has_alternate.then_some(alternate),
        arguments: r.bytes()?,
    })
}

/// The key of a binding: everything that tells two bindings apart.
fn binding_key(vhost: &str, b: &Binding) -> Vec<u8> {
    let mut k = vhost_prefix(vhost);
    put_str(&mut k, &b.source);
    match &b.destination {
        Destination::Topic(t) => {
            k.put_u8(1);
            put_str(&mut k, t.as_str());
        }
        Destination::Exchange(x) => {
            k.put_u8(2);
            put_str(&mut k, x);
        }
    }
    put_str(&mut k, &b.key);
    k.put_u8(u8::from(b.mqtt));
    put_bytes(&mut k, &b.arguments);
    k
}

fn binding_value(b: &Binding) -> Vec<u8> {
    let mut v = Vec::new();
    match &b.headers {
        None => v.put_u8(0),
        Some(h) => {
            v.put_u8(if h.all { 1 } else { 2 });
            put_headers(&mut v, &h.headers);
        }
    }
    v
}

fn decode_binding(key_after_vhost: Bytes, value: Bytes) -> Result<Binding> {
    let mut r = Reader(key_after_vhost);
    let source = r.string()?;
    let destination = match r.u8()? {
        1 => Destination::Topic(TopicName::new(r.string()?)?),
        2 => Destination::Exchange(r.string()?),
        d => return Err(CoreError::Invalid(format!("unknown destination kind {d}"))),
    };
    let key = r.string()?;
    let mqtt = r.u8()? == 1;
    let arguments = r.bytes()?;
    let mut v = Reader(value);
    let headers = match v.u8()? {
        0 => None,
        m => Some(HeaderMatch {
            all: m == 1,
            headers: get_headers(&mut v)?,
        }),
    };
    Ok(Binding {
        source,
        destination,
        key,
        headers,
        mqtt,
        arguments,
    })
}

/// Scan a whole namespace (in pages).
async fn scan_all(store: &dyn Store, ns: &str, prefix: &[u8]) -> Result<Vec<(Bytes, Bytes)>> {
    let mut out: Vec<(Bytes, Bytes)> = Vec::new();
    loop {
        let after = out.last().map(|(k, _)| k.clone());
        let page = store.kv_scan(ns, prefix, after.as_deref(), 1024).await?;
        let done = page.len() < 1024;
        out.extend(page);
        if done {
            return Ok(out);
        }
    }
}

/// Rebuild the router from the store.
pub(crate) async fn load(store: &dyn Store, router: &Router) -> Result<()> {
    for (k, _) in scan_all(store, NS_VHOST, b"").await? {
        router.add_vhost(&String::from_utf8_lossy(&k));
    }
    let mut exchanges = 0;
    let mut stored = scan_all(store, NS_EXCHANGE, b"").await?;
    stored.extend(scan_all(store, NS_EXCHANGE_T, b"").await?);
    for (k, v) in stored {
        let Some(sep) = k.iter().position(|b| *b == 0) else {
            continue;
        };
        let vhost = String::from_utf8_lossy(&k[..sep]).into_owned();
        let name = String::from_utf8_lossy(&k[sep + 1..]).into_owned();
        router.add_vhost(&vhost);
        let def = decode_exchange(name, v)?;
        if let Err(e) = router.declare_exchange(&vhost, def) {
            tracing::warn!(vhost, error = %e, "core: stored exchange conflicts; keeping the built-in one");
        } else {
            exchanges += 1;
        }
    }
    // Keys are ordered by vhost: each vhost's bindings go in with one batched call
    // (linear in the bindings, whatever a destination has).
    let mut bindings = 0;
    let mut pending: Vec<Binding> = Vec::new();
    let mut pending_vhost = String::new();
    let mut flush = |vhost: &str, pending: &mut Vec<Binding>| {
        if pending.is_empty() {
            return;
        }
        match router.bind_many(vhost, pending) {
            Ok(results) => {
                for r in results {
                    match r {
                        Ok(_) => bindings += 1,
                        Err(e) => {
                            tracing::warn!(vhost, error = %e, "core: stored binding has no exchange; skipped")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(vhost, error = %e, "core: stored bindings of an unknown vhost; skipped")
            }
        }
        pending.clear();
    };
    // Each namespace is ordered by vhost; a vhost's bindings may come in two runs.
    let mut stored = scan_all(store, NS_BINDING, b"").await?;
    stored.extend(scan_all(store, NS_BINDING_T, b"").await?);
    for (k, v) in stored {
        let Some(sep) = k.iter().position(|b| *b == 0) else {
            continue;
        };
        let vhost = String::from_utf8_lossy(&k[..sep]);
        if vhost != pending_vhost {
            flush(&pending_vhost, &mut pending);
            pending_vhost = vhost.into_owned();
        }
        pending.push(decode_binding(k.slice(sep + 1..), v)?);
    }
    flush(&pending_vhost, &mut pending);
    if exchanges + bindings > 0 {
        tracing::info!(exchanges, bindings, "core: routing state recovered");
    }
    Ok(())
}

/// Where a change goes when a record's changes are applied together: vhosts, then
/// exchanges, then bindings put; bindings, then exchanges, then vhosts deleted (a
/// checkpoint of the log rewrites the keyed area in key order, where bindings come
/// before their exchanges). `None`: not routing state.
pub(crate) fn apply_rank(change: &KvChange) -> Option<u8> {
    let kind = match change.namespace.as_str() {
        NS_VHOST => 0,
        NS_EXCHANGE | NS_EXCHANGE_T => 1,
        NS_BINDING | NS_BINDING_T => 2,
        _ => return None,
    };
    Some(match change.value {
        Some(_) => kind,
        None => 5 - kind,
    })
}

/// Apply one stored change of the routing state to `router`, as [`load`] would have
/// loaded it: how a gateway that follows another's log (the meta stream of a cluster,
/// `docs/design/sharding.md` section 3) keeps its router equal to the writer's.
/// Returns whether the change was one of routing state (other namespaces are ignored).
/// A change that no longer applies (a binding whose exchange went in an earlier change,
/// a delete of something already gone) is skipped as the writer's own router skipped
/// it; only undecodable values are errors.
pub fn apply_change(router: &Router, change: &KvChange) -> Result<bool> {
    let split = |k: &Bytes| -> Option<(String, Bytes)> {
        let sep = k.iter().position(|b| *b == 0)?;
        Some((
            String::from_utf8_lossy(&k[..sep]).into_owned(),
            k.slice(sep + 1..),
        ))
    };
    match change.namespace.as_str() {
        NS_VHOST => {
            let vhost = String::from_utf8_lossy(&change.key).into_owned();
            match change.value {
                Some(_) => router.add_vhost(&vhost),
                None => {
                    router.remove_vhost(&vhost);
                }
            }
        }
        NS_EXCHANGE | NS_EXCHANGE_T => {
            let Some((vhost, name)) = split(&change.key) else {
                return Ok(true);
            };
            let name = String::from_utf8_lossy(&name).into_owned();
            match &change.value {
                Some(v) => {
                    router.add_vhost(&vhost);
                    let def = decode_exchange(name, v.clone())?;
                    if let Err(e) = router.declare_exchange(&vhost, def) {
                        tracing::warn!(vhost, error = %e, "core: a followed exchange conflicts with this router's; kept this one");
                    }
                }
                None => {
                    let _ = router.delete_exchange(&vhost, &name, false);
                }
            }
        }
        NS_BINDING | NS_BINDING_T => {
            let Some((vhost, rest)) = split(&change.key) else {
                return Ok(true);
            };
            match &change.value {
                Some(v) => {
                    let b = decode_binding(rest, v.clone())?;
                    if let Err(e) = router.bind(&vhost, b) {
                        tracing::debug!(vhost, error = %e, "core: a followed binding does not apply (its exchange is gone)");
                    }
                }
                None => {
                    // The value is not in a delete: the key is the binding's identity,
                    // and the match it carried does not take part in it.
                    let b = decode_binding(rest, Bytes::from_static(&[0]))?;
                    let _ = router.unbind(&vhost, &b);
                }
            }
        }
        _ => return Ok(false),
    }
    Ok(true)
}

pub(crate) fn put_vhost(batch: &mut WriteBatch, vhost: &str) {
    batch.kv_put(
        NS_VHOST,
        Bytes::copy_from_slice(vhost.as_bytes()),
        Bytes::new(),
    );
}

/// Store an exchange: a durable one, or (`def.durable` false) a transient one in a
/// cluster's routing log.
pub(crate) fn put_exchange(batch: &mut WriteBatch, vhost: &str, def: &ExchangeDef) {
    batch.kv_put(
        exchange_ns(def.durable),
        exchange_key(vhost, &def.name),
        encode_exchange(def),
    );
}

/// Store a binding: durable, or transient (a cluster's routing log).
pub(crate) fn put_binding(batch: &mut WriteBatch, vhost: &str, b: &Binding, durable: bool) {
    batch.kv_put(binding_ns(durable), binding_key(vhost, b), binding_value(b));
}

/// Delete an exchange's record, durable or transient (deleting a key that was never
/// stored is harmless).
pub(crate) fn delete_exchange(batch: &mut WriteBatch, vhost: &str, name: &str) {
    for durable in [true, false] {
        batch.kv_delete(exchange_ns(durable), exchange_key(vhost, name));
    }
}

/// Delete a binding's record, durable or transient.
pub(crate) fn delete_binding(batch: &mut WriteBatch, vhost: &str, b: &Binding) {
    for durable in [true, false] {
        batch.kv_delete(binding_ns(durable), binding_key(vhost, b));
    }
}

/// Make the stored state of `vhost` match the router after a removal: exchanges and
/// bindings the router no longer has are deleted (auto-delete and cascades included).
pub(crate) async fn prune(store: &dyn Store, router: &Router, vhost: &str) -> Result<()> {
    let prefix = vhost_prefix(vhost);
    let mut batch = WriteBatch::new();
    let live_exchanges = router.exchanges(vhost);
    for ns in [NS_EXCHANGE, NS_EXCHANGE_T] {
        for (k, _) in scan_all(store, ns, &prefix).await? {
            let name = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if !live_exchanges.iter().any(|e| e.name == name) {
                batch.kv_delete(ns, k);
            }
        }
    }
    // By stored key (a binding's identity): one hash look-up per stored binding.
    let live_bindings: std::collections::HashSet<Vec<u8>> = router
        .bindings(vhost, None)
        .iter()
        .map(|b| binding_key(vhost, b))
        .collect();
    for ns in [NS_BINDING, NS_BINDING_T] {
        for (k, _) in scan_all(store, ns, &prefix).await? {
            if !live_bindings.contains(k.as_ref()) {
                batch.kv_delete(ns, k);
            }
        }
    }
    if !batch.is_empty() {
        store.write(batch).await?;
    }
    Ok(())
}

/// A change of the routing state, as the cluster's admin relay carries it to shard
/// 0's owner (the one writer of routing state): what [`crate::Broker`]'s method of the
/// same name does there.
#[derive(Clone, Debug, PartialEq)]
pub enum RoutingOp {
    /// [`crate::Broker::add_vhost`].
    AddVhost(String),
    /// [`crate::Broker::declare_exchange`].
    DeclareExchange(String, ExchangeDef),
    /// [`crate::Broker::delete_exchange`]: vhost, name, if unused.
    DeleteExchange(String, String, bool),
    /// [`crate::Broker::bind_many`] (and [`crate::Broker::bind`]): vhost, bindings,
    /// durable.
    Bind(String, Vec<Binding>, bool),
    /// [`crate::Broker::unbind_many`] (and [`crate::Broker::unbind`]).
    Unbind(String, Vec<Binding>),
    /// [`crate::Broker::unbind_topic`].
    UnbindTopic(String, TopicName),
}

/// A binding's identity and match, without a vhost.
fn put_binding_wire(out: &mut Vec<u8>, b: &Binding) {
    put_bytes(out, &binding_key("", b)[1..]);
    put_bytes(out, &binding_value(b));
}

impl RoutingOp {
    /// Its encoding (the admin relay carries it as it is).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            RoutingOp::AddVhost(v) => {
                out.put_u8(1);
                put_str(&mut out, v);
            }
            RoutingOp::DeclareExchange(v, def) => {
                out.put_u8(2);
                put_str(&mut out, v);
                put_str(&mut out, &def.name);
                put_bytes(&mut out, &encode_exchange(def));
            }
            RoutingOp::DeleteExchange(v, name, if_unused) => {
                out.put_u8(3);
                put_str(&mut out, v);
                put_str(&mut out, name);
                out.put_u8(u8::from(*if_unused));
            }
            RoutingOp::Bind(v, bindings, durable) => {
                out.put_u8(4);
                put_str(&mut out, v);
                out.put_u8(u8::from(*durable));
                out.put_u32_le(bindings.len() as u32);
                for b in bindings {
                    put_binding_wire(&mut out, b);
                }
            }
            RoutingOp::Unbind(v, bindings) => {
                out.put_u8(5);
                put_str(&mut out, v);
                out.put_u32_le(bindings.len() as u32);
                for b in bindings {
                    put_binding_wire(&mut out, b);
                }
            }
            RoutingOp::UnbindTopic(v, t) => {
                out.put_u8(6);
                put_str(&mut out, v);
                put_str(&mut out, t.as_str());
            }
        }
        out
    }

    /// What [`RoutingOp::encode`] wrote; garbage is an error.
    pub fn decode(b: Bytes) -> Result<Self> {
        let mut r = Reader(b);
        let bindings = |r: &mut Reader| -> Result<Vec<Binding>> {
            let n = r.u32()? as usize;
            // Each takes at least 8 bytes: no allocation larger than the input.
            let mut out = Vec::with_capacity(n.min(r.0.len() / 8));
            for _ in 0..n {
                let key = r.bytes()?;
                let value = r.bytes()?;
                out.push(decode_binding(key, value)?);
            }
            Ok(out)
        };
        let op = match r.u8()? {
            1 => RoutingOp::AddVhost(r.string()?),
            2 => {
                let v = r.string()?;
                let name = r.string()?;
                RoutingOp::DeclareExchange(v, decode_exchange(name, r.bytes()?)?)
            }
            3 => {
                let v = r.string()?;
                let name = r.string()?;
                RoutingOp::DeleteExchange(v, name, r.u8()? != 0)
            }
            4 => {
                let v = r.string()?;
                let durable = r.u8()? != 0;
                RoutingOp::Bind(v, bindings(&mut r)?, durable)
            }
            5 => {
                let v = r.string()?;
                RoutingOp::Unbind(v, bindings(&mut r)?)
            }
            6 => {
                let v = r.string()?;
                RoutingOp::UnbindTopic(v, TopicName::new(r.string()?)?)
            }
            k => return Err(CoreError::Invalid(format!("unknown routing change {k}"))),
        };
        if !r.0.is_empty() {
            return Err(CoreError::Invalid(
                "trailing bytes after a routing change".into(),
            ));
        }
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::HeaderValue;

    #[test]
    fn a_record_in_key_order_applies_exchanges_before_their_bindings() {
        // A checkpoint of the log rewrites the keyed area in key order: bindings,
        // transient bindings, exchanges, transient exchanges, vhosts.
        let q = TopicName::new("q").unwrap();
        let b = Binding {
            source: "x".into(),
            destination: Destination::Topic(q.clone()),
            key: "k".into(),
            headers: None,
            mqtt: false,
            arguments: Bytes::new(),
        };
        let mut def = ExchangeDef::new("x", ExchangeKind::Direct);
        def.durable = true;
        let put = |ns: &str, k: Vec<u8>, v: Vec<u8>| KvChange {
            namespace: ns.into(),
            key: Bytes::from(k),
            value: Some(Bytes::from(v)),
        };
        let mut changes = [
            put(NS_BINDING, binding_key("v", &b), binding_value(&b)),
            put(NS_EXCHANGE, exchange_key("v", "x"), encode_exchange(&def)),
            put(NS_VHOST, b"v".to_vec(), Vec::new()),
            KvChange {
                namespace: NS_BINDING_T.into(),
                key: Bytes::from(binding_key("v", &b)),
                value: None,
            },
            put("amqp.queue", b"k".to_vec(), Vec::new()),
        ];
        changes.sort_by_key(|c| apply_rank(c).unwrap_or(u8::MAX));
        let ranks: Vec<Option<u8>> = changes.iter().map(apply_rank).collect();
        assert_eq!(ranks, [Some(0), Some(1), Some(2), Some(3), None]);
        let router = Router::new();
        for c in &changes[..3] {
            assert!(apply_change(&router, c).unwrap());
        }
        let routed = router.route("v", "x", "k", &[]).unwrap();
        assert_eq!(routed.topics, vec![q]);
    }

    #[test]
    fn definitions_round_trip() {
        let mut def = ExchangeDef::new("x", ExchangeKind::Headers);
        def.auto_delete = true;
        def.internal = true;
        def.alternate = Some("ae".into());
        def.arguments = Bytes::from_static(b"args");
        let back = decode_exchange("x".into(), Bytes::from(encode_exchange(&def))).unwrap();
        assert_eq!(back, def);
        let b = Binding {
            source: "x".into(),
            destination: Destination::Topic(TopicName::new("q").unwrap()),
            key: "k".into(),
            headers: Some(HeaderMatch {
                all: false,
                headers: vec![("a".into(), HeaderValue::Int(1))],
            }),
            mqtt: true,
            arguments: Bytes::from_static(b"a"),
        };
        let key = binding_key("/", &b);
        let back =
            decode_binding(Bytes::from(key).slice(2..), Bytes::from(binding_value(&b))).unwrap();
        assert_eq!(back, b);
    }
}

//! Endpoints declared once, wherever a client asks (issue 16).
//!
//! An endpoint's declaration record (an AMQP queue's `amqp.queue` entry) is its
//! authority, and it lives with the endpoint's topic, in the topic's shard:
//! - [`Broker::declare_endpoint_once`] runs on the gateway owning that shard (the admin
//!   relay carries it there from any other), one declaration at a time per shard: the
//!   first declaration of a name creates the endpoint (topic, group offsets and record in
//!   one write), every later one gets the record as it is, and the adapter checks it is
//!   equivalent (AMQP: 406 otherwise). Two gateways declaring one queue at once make one
//!   queue, and a declaration never resets an existing queue's offsets.
//! - [`Broker::endpoint_record`] reads it from there (a gateway that has not seen the
//!   endpoint yet);
//! - [`Broker::delete_endpoint`] runs there too (`endpoint.rs`).
//!
//! The core manages an endpoint (TTL sweeps, length limits, dead letters, idle expiry)
//! on the gateway owning its shard. An adapter supplies an [`EndpointKind`] per record
//! namespace, which turns a record back into the [`Endpoint`] it declares; the core
//! registers the endpoints of a shard's records when the kind is added, when an
//! endpoint is declared, and when a shard is attached (a moved shard's endpoints are
//! managed by its next owner from the moment it owns them).

use std::sync::Arc;

use bytes::Bytes;
use mqgate_store::{GroupName, TopicName};

use crate::broker::ShardCore;
use crate::endpoints::Endpoint;
use crate::error::{CoreError, Result};
use crate::publish::Records;
use crate::shard::{AdminAnswer, AdminOp};

/// Turns an adapter's declaration records back into endpoints.
pub trait EndpointKind: Send + Sync + std::fmt::Debug {
    /// The keyed-area namespace of the records.
    fn namespace(&self) -> &str;

    /// The endpoint record `key` → `value` declares (managed as unused from now);
    /// `None` when the record is not one to manage (unreadable).
    fn endpoint(&self, key: &[u8], value: &[u8]) -> Option<Endpoint>;

    /// Since when the endpoint the record declares has been unused, if the record
    /// says (an MQTT session's disconnection); `None`: from now.
    fn unused_since(&self, key: &[u8], value: &[u8]) -> Option<mqgate_store::Millis> {
        let _ = (key, value);
        None
    }
}

/// An endpoint to declare once: its storage and its record.
#[derive(Clone, Debug, PartialEq)]
pub struct EndpointDecl {
    /// Its topic.
    pub topic: TopicName,
    /// The topic's queue count.
    pub queues: u32,
    /// Its group (offsets start at the topic's end).
    pub group: GroupName,
    /// The namespace of its record.
    pub namespace: String,
    /// The record's key.
    pub key: Bytes,
    /// The record.
    pub record: Bytes,
}

/// What [`Broker::declare_endpoint_once`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Declared {
    /// It was created with the record given.
    Created,
    /// It existed: its record as it is (nothing was changed).
    Exists(Bytes),
}

/// Keyed-area namespace of holder counts ([`Broker::adjust_refs`]; key: the topic,
/// value: the count, u64 big-endian).
pub const NS_REFS: &str = "core.refs";

/// Records read per page when registering a shard's endpoints.
const PAGE: usize = 1024;

impl crate::Broker {
    /// Whether this broker is one gateway of a cluster (shards come and go; work on
    /// the others' goes over the cluster's relays).
    pub fn clustered(&self) -> bool {
        self.inner.link.is_some()
    }

    /// Manage the endpoints `kind`'s records declare: those of the shards owned now at
    /// once, those declared or attached later as they come.
    pub async fn add_endpoint_kind(&self, kind: Arc<dyn EndpointKind>) -> Result<()> {
        self.inner.kinds.write().push(Arc::clone(&kind));
        for shard in self.inner.owned() {
            self.register_kind(&shard, &*kind).await?;
        }
        Ok(())
    }

    /// Register the endpoints of every kind's records in `shard` (just attached).
    pub(crate) async fn register_endpoints_of(&self, shard: &Arc<ShardCore>) -> Result<()> {
        let kinds = self.inner.kinds.read().clone();
        for kind in kinds {
            self.register_kind(shard, &*kind).await?;
        }
        Ok(())
    }

    async fn register_kind(&self, shard: &Arc<ShardCore>, kind: &dyn EndpointKind) -> Result<()> {
        let mut after: Option<Bytes> = None;
        let mut n = 0usize;
        loop {
            let page = shard
                .store
                .kv_scan(kind.namespace(), b"", after.as_deref(), PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            after = Some(last.0.clone());
            for (k, v) in &page {
                if let Some(e) = kind.endpoint(k, v) {
                    self.register_endpoint_since(e, kind.unused_since(k, v));
                    n += 1;
                }
            }
        }
        if n > 0 {
            tracing::debug!(
                shard = shard.id,
                namespace = kind.namespace(),
                endpoints = n,
                "core: endpoints of the shard managed here"
            );
        }
        Ok(())
    }

    /// Declare an endpoint unless its record exists: on the gateway owning its topic's
    /// shard, one declaration at a time per shard (see the module's notes). The
    /// endpoint is managed there from now on (its [`EndpointKind`]). An existing one is
    /// used just now (its idle time restarts).
    pub async fn declare_endpoint_once(&self, decl: EndpointDecl) -> Result<Declared> {
        let id = self.inner.placement.topic(&decl.topic);
        let Some(shard) = self.inner.local(id) else {
            let Some(link) = &self.inner.link else {
                return Err(CoreError::NotOwned(id));
            };
            return match link.admin(id, AdminOp::DeclareEndpoint(decl)).await? {
                AdminAnswer::Declared(d) => Ok(d),
                other => Err(CoreError::Store(mqgate_store::StoreError::Backend(
                    format!("the admin relay answered a declaration with {other:?}"),
                ))),
            };
        };
        let _turn = shard.declares.lock().await;
        if let Some(v) = shard.store.kv_get(&decl.namespace, &decl.key).await? {
            if self.touch_endpoint(&decl.group) {
                return Ok(Declared::Exists(v));
            }
            // The sweep is deleting it (unused for its idle expiry) right now: declared
            // anew once it is gone, as if it had gone a moment earlier.
            self.endpoint_settled(&decl.group).await;
            if let Some(v) = shard.store.kv_get(&decl.namespace, &decl.key).await? {
                return Ok(Declared::Exists(v));
            }
        }
        let mut records = crate::Records::new();
        records.put(&decl.namespace, decl.key.clone(), decl.record.clone());
        self.declare_endpoint(&decl.topic, decl.queues, &decl.group, records)
            .await?;
        let kind = self
            .inner
            .kinds
            .read()
            .iter()
            .find(|k| k.namespace() == decl.namespace)
            .cloned();
        if let Some(e) = kind.and_then(|k| k.endpoint(&decl.key, &decl.record)) {
            self.register_endpoint(e);
        }
        Ok(Declared::Created)
    }

    /// The declaration record `key` of `namespace` kept with `topic` (in its shard,
    /// wherever that is owned).
    pub async fn endpoint_record(
        &self,
        topic: &TopicName,
        namespace: &str,
        key: &[u8],
    ) -> Result<Option<Bytes>> {
        let id = self.inner.placement.topic(topic);
        match (self.inner.local(id), &self.inner.link) {
            (Some(shard), _) => Ok(shard.store.kv_get(namespace, key).await?),
            (None, Some(link)) => {
                let op = AdminOp::EndpointRecord {
                    topic: topic.clone(),
                    namespace: namespace.to_owned(),
                    key: Bytes::copy_from_slice(key),
                };
                match link.admin(id, op).await? {
                    AdminAnswer::Record(r) => Ok(r),
                    other => Err(CoreError::Store(mqgate_store::StoreError::Backend(
                        format!("the admin relay answered a record read with {other:?}"),
                    ))),
                }
            }
            (None, None) => Err(CoreError::NotOwned(id)),
        }
    }

    /// Change the count of holders of `topic` by `delta` (an MQTT shared subscription:
    /// how many sessions, on any gateway, hold it), on the gateway owning its shard, one
    /// change at a time per shard, the count durable in the shard ([`NS_REFS`]) before
    /// this returns. Returns the count after the change (never below 0). The holder
    /// that takes it to 0 releases what the count guards.
    pub async fn adjust_refs(&self, topic: &TopicName, delta: i32) -> Result<u64> {
        let id = self.inner.placement.topic(topic);
        let Some(shard) = self.inner.local(id) else {
            let Some(link) = &self.inner.link else {
                return Err(CoreError::NotOwned(id));
            };
            let op = AdminOp::AdjustRefs {
                topic: topic.clone(),
                delta,
            };
            return match link.admin(id, op).await? {
                AdminAnswer::Count(n) => Ok(n),
                other => Err(CoreError::Invalid(format!(
                    "the admin relay answered a reference count with {other:?}"
                ))),
            };
        };
        let _turn = shard.declares.lock().await;
        let key = topic.as_str().as_bytes();
        let now = match shard.store.kv_get(NS_REFS, key).await? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v[..].try_into().expect("8 bytes")),
            _ => 0,
        };
        let next = if delta >= 0 {
            now.saturating_add(u64::from(delta.unsigned_abs()))
        } else {
            now.saturating_sub(u64::from(delta.unsigned_abs()))
        };
        let mut batch = mqgate_store::WriteBatch::new();
        let mut records = Records::new();
        if next == 0 {
            records.delete(NS_REFS, Bytes::copy_from_slice(key));
        } else {
            records.put(
                NS_REFS,
                Bytes::copy_from_slice(key),
                Bytes::copy_from_slice(&next.to_be_bytes()),
            );
        }
        records.apply(&mut batch);
        shard.store.write(batch).await?;
        Ok(next)
    }

    /// Write `records`, kept with `topic` (in its shard, wherever that is owned): an
    /// endpoint's records that change while it lives (an MQTT session's).
    pub async fn write_endpoint_records(&self, topic: &TopicName, records: Records) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let id = self.inner.placement.topic(topic);
        match (self.inner.local(id), &self.inner.link) {
            (Some(shard), _) => {
                let mut batch = mqgate_store::WriteBatch::new();
                records.apply(&mut batch);
                shard.store.write(batch).await?;
                Ok(())
            }
            (None, Some(link)) => {
                let op = AdminOp::WriteRecords {
                    topic: topic.clone(),
                    records,
                };
                match link.admin(id, op).await? {
                    AdminAnswer::Done => Ok(()),
                    other => Err(CoreError::Store(mqgate_store::StoreError::Backend(
                        format!("the admin relay answered a record write with {other:?}"),
                    ))),
                }
            }
            (None, None) => Err(CoreError::NotOwned(id)),
        }
    }
}

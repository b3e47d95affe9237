//! Changes of the routing state ([`crate::Broker`]'s half of `router.rs`): the router
//! in memory, the durable part in the store (`durable.rs`). In a cluster they run on
//! shard 0's owner (`meta.rs`): elsewhere each is relayed there first.

use mqgate_store::{TopicName, WriteBatch};

use crate::error::Result;
use crate::router::{Binding, ExchangeDef};

impl crate::Broker {
    /// Create a virtual host (with the standard exchanges); it survives restarts.
    pub async fn add_vhost(&self, vhost: &str) -> Result<()> {
        if let Some(r) = self
            .relay_routing(|| crate::RoutingOp::AddVhost(vhost.into()))
            .await?
        {
            return crate::meta::first(r).map(drop);
        }
        let _turn = self.routing_turn().await;
        self.inner.router.add_vhost(vhost);
        let mut batch = WriteBatch::new();
        crate::durable::put_vhost(&mut batch, vhost);
        self.inner.meta()?.store.write(batch).await?;
        drop(_turn);
        self.routing_written().await;
        Ok(())
    }

    /// Declare an exchange (see [`Router::declare_exchange`]); a durable one survives
    /// restarts.
    pub async fn declare_exchange(&self, vhost: &str, def: ExchangeDef) -> Result<bool> {
        if let Some(r) = self
            .relay_routing(|| crate::RoutingOp::DeclareExchange(vhost.into(), def.clone()))
            .await?
        {
            return crate::meta::first(r);
        }
        let _turn = self.routing_turn().await;
        let created = self.inner.router.declare_exchange(vhost, def.clone())?;
        // A cluster's routing log has transient exchanges too (`durable.rs`).
        if created && (def.durable || self.inner.link.is_some()) {
            let mut batch = WriteBatch::new();
            crate::durable::put_exchange(&mut batch, vhost, &def);
            self.inner.meta()?.store.write(batch).await?;
            drop(_turn);
            self.routing_written().await;
        }
        Ok(created)
    }

    /// Delete an exchange with its bindings and the bindings to it, stored ones included.
    pub async fn delete_exchange(&self, vhost: &str, name: &str, if_unused: bool) -> Result<bool> {
        if let Some(r) = self
            .relay_routing(|| {
                crate::RoutingOp::DeleteExchange(vhost.into(), name.into(), if_unused)
            })
            .await?
        {
            return crate::meta::first(r);
        }
        let _turn = self.routing_turn().await;
        let existed = self.inner.router.delete_exchange(vhost, name, if_unused)?;
        if existed {
            crate::durable::prune(&*self.inner.meta()?.store, &self.inner.router, vhost).await?;
            drop(_turn);
            self.routing_written().await;
        }
        Ok(existed)
    }

    /// Add a binding; with `durable` (its exchange and destination are durable) it
    /// survives restarts.
    pub async fn bind(&self, vhost: &str, binding: Binding, durable: bool) -> Result<bool> {
        if let Some(r) = self
            .relay_routing(|| crate::RoutingOp::Bind(vhost.into(), vec![binding.clone()], durable))
            .await?
        {
            return crate::meta::first(r);
        }
        let _turn = self.routing_turn().await;
        let new = self.inner.router.bind(vhost, binding.clone())?;
        if new && (durable || self.inner.link.is_some()) {
            let mut batch = WriteBatch::new();
            crate::durable::put_binding(&mut batch, vhost, &binding, durable);
            self.inner.meta()?.store.write(batch).await?;
            drop(_turn);
            self.routing_written().await;
        }
        Ok(new)
    }

    /// Add many bindings in one go (an MQTT SUBSCRIBE's filters): the router takes its
    /// lock per [`crate::router::LOCK_CHUNK`] bindings and, with `durable`, the new ones
    /// are stored in one write. Per binding: whether it was new, or why it could not be
    /// added; `Err` if the store write failed (the router keeps them, as with
    /// [`Broker::bind`]).
    pub async fn bind_many(
        &self,
        vhost: &str,
        bindings: Vec<Binding>,
        durable: bool,
    ) -> Result<Vec<Result<bool>>> {
        if let Some(r) = self
            .relay_routing(|| crate::RoutingOp::Bind(vhost.into(), bindings.clone(), durable))
            .await?
        {
            return Ok(r);
        }
        let _turn = self.routing_turn().await;
        let results = self.inner.router.bind_many(vhost, &bindings)?;
        if durable || self.inner.link.is_some() {
            let mut batch = WriteBatch::new();
            for (b, r) in bindings.iter().zip(&results) {
                if matches!(r, Ok(true)) {
                    crate::durable::put_binding(&mut batch, vhost, b, durable);
                }
            }
            if !batch.is_empty() {
                self.inner.meta()?.store.write(batch).await?;
                drop(_turn);
                self.routing_written().await;
            }
        }
        Ok(results)
    }

    /// Remove many bindings in one go (an MQTT UNSUBSCRIBE's filters), stored ones in
    /// one write. Per binding: whether it existed, or why it could not be removed.
    pub async fn unbind_many(
        &self,
        vhost: &str,
        bindings: &[Binding],
    ) -> Result<Vec<Result<bool>>> {
        if let Some(r) = self
            .relay_routing(|| crate::RoutingOp::Unbind(vhost.into(), bindings.to_vec()))
            .await?
        {
            return Ok(r);
        }
        let _turn = self.routing_turn().await;
        let results = self.inner.router.unbind_many(vhost, bindings)?;
        let mut batch = WriteBatch::new();
        let mut sources = std::collections::HashSet::new();
        for (b, r) in bindings.iter().zip(&results) {
            if matches!(r, Ok(true)) {
                crate::durable::delete_binding(&mut batch, vhost, b);
                sources.insert(b.source.as_str());
            }
        }
        if !batch.is_empty() {
            self.inner.meta()?.store.write(batch).await?;
        }
        // An auto-delete exchange left empty went with its last binding.
        if sources
            .iter()
            .any(|x| self.inner.router.exchange(vhost, x).is_none())
        {
            crate::durable::prune(&*self.inner.meta()?.store, &self.inner.router, vhost).await?;
        }
        Ok(results)
    }

    /// Remove a binding (and an auto-delete exchange it leaves empty), stored ones too.
    pub async fn unbind(&self, vhost: &str, binding: &Binding) -> Result<bool> {
        if let Some(r) = self
            .relay_routing(|| crate::RoutingOp::Unbind(vhost.into(), vec![binding.clone()]))
            .await?
        {
            return crate::meta::first(r);
        }
        let _turn = self.routing_turn().await;
        let removed = self.inner.router.unbind(vhost, binding)?;
        if removed {
            let mut batch = WriteBatch::new();
            crate::durable::delete_binding(&mut batch, vhost, binding);
            self.inner.meta()?.store.write(batch).await?;
            if self.inner.router.exchange(vhost, &binding.source).is_none() {
                crate::durable::prune(&*self.inner.meta()?.store, &self.inner.router, vhost)
                    .await?;
            }
        }
        Ok(removed)
    }

    /// Remove every binding to `topic` (its queue was deleted), stored ones too.
    pub async fn unbind_topic(&self, vhost: &str, topic: &TopicName) -> Result<()> {
        if let Some(r) = self
            .relay_routing(|| crate::RoutingOp::UnbindTopic(vhost.into(), topic.clone()))
            .await?
        {
            return crate::meta::first(r).map(drop);
        }
        let _turn = self.routing_turn().await;
        let (removed, emptied) = self.inner.router.unbind_topic(vhost, topic);
        if removed.is_empty() && emptied.is_empty() {
            return Ok(());
        }
        // Delete exactly what went (deleting a key that was never stored is harmless).
        let mut batch = WriteBatch::new();
        for b in &removed {
            crate::durable::delete_binding(&mut batch, vhost, b);
        }
        for name in &emptied {
            crate::durable::delete_exchange(&mut batch, vhost, name);
        }
        self.inner.meta()?.store.write(batch).await?;
        Ok(())
    }

    /// After a routing change written here as shard 0's owner in a cluster: every live
    /// gateway's router has it when this returns (bounded: see
    /// `ClusterLink::routing_barrier`), before the change is answered.
    async fn routing_written(&self) {
        if let (Some(link), Some(meta)) = (&self.inner.link, self.inner.local(0)) {
            if let Some(position) = meta.store.log_position() {
                link.routing_barrier(position).await;
            }
        }
    }
}

//! Core operations another gateway runs for this one (issue 16): what travels over the
//! admin relay ([`AdminOp`], [`AdminAnswer`]), and [`crate::Broker::admin`], which runs an
//! operation here when this gateway owns its shard, else sends it to the owner.

use mqgate_store::{GroupName, TopicName};

use crate::broker::ShardSet;
use crate::error::{CoreError, Result};
use crate::shard::{shard_of_id, ShardId};

/// A core operation on a shard another gateway owns (the admin relay): what
/// [`crate::Broker`]'s method of the same name does there.
#[derive(Clone, Debug, PartialEq)]
pub enum AdminOp {
    /// [`crate::Broker::create_topic`].
    CreateTopic(TopicName, Option<u32>),
    /// [`crate::Broker::delete_topic`].
    DeleteTopic(TopicName),
    /// [`crate::Broker::group_info`].
    GroupInfo(GroupName),
    /// [`crate::Broker::reset_group`].
    ResetGroup(GroupName, crate::StartPosition),
    /// [`crate::Broker::delete_group`].
    DeleteGroup(GroupName),
    /// A change of the routing state, run by shard 0's owner (`meta.rs`).
    Routing(crate::RoutingOp),
    /// [`crate::Broker::declare_endpoint_once`].
    DeclareEndpoint(crate::EndpointDecl),
    /// [`crate::Broker::endpoint_record`].
    EndpointRecord {
        /// The endpoint's topic (where the record is).
        topic: TopicName,
        /// The record's namespace.
        namespace: String,
        /// Its key.
        key: bytes::Bytes,
    },
    /// [`crate::Broker::delete_endpoint`].
    DeleteEndpoint {
        /// The virtual host of its bindings.
        vhost: String,
        /// Its topic.
        topic: TopicName,
        /// Its group.
        group: GroupName,
        /// Its records' changes.
        records: crate::Records,
    },
    /// [`crate::Broker::adjust_refs`].
    AdjustRefs {
        /// The topic.
        topic: TopicName,
        /// The change.
        delta: i32,
    },
    /// [`crate::Broker::write_endpoint_records`].
    WriteRecords {
        /// The topic they are kept with.
        topic: TopicName,
        /// The changes.
        records: crate::Records,
    },
    /// The address the owner of `topic`'s shard advertises for `service`
    /// ([`crate::Broker::locate`]).
    Locate {
        /// The topic.
        topic: TopicName,
        /// The service ("mqtt").
        service: String,
    },
    /// The topics of shard `.0` with their queues' offsets (`views.rs`).
    ShardTopics(ShardId),
    /// The consumer groups of shard `.0`.
    ShardGroups(ShardId),
    /// [`crate::Broker::topic_view`].
    TopicView(TopicName),
    /// One shard's part of [`crate::Broker::records_everywhere`].
    ShardRecords {
        /// The shard.
        shard: ShardId,
        /// The namespace.
        namespace: String,
        /// Keys start with this.
        prefix: bytes::Bytes,
        /// After this key.
        after: Option<bytes::Bytes>,
        /// At most this many.
        limit: u32,
    },
    /// [`crate::Broker::message`].
    Message(mqgate_store::MessageId),
    /// [`crate::Broker::messages_by_key`].
    ByKey {
        /// The topic.
        topic: TopicName,
        /// The key.
        key: String,
        /// At most this many.
        limit: u32,
    },
    /// [`crate::Broker::peek`].
    Peek {
        /// The queue.
        queue: mqgate_store::QueueRef,
        /// From this offset.
        from: mqgate_store::QueueOffset,
        /// At most this many.
        limit: u32,
    },
    /// [`crate::Broker::schedule_named`] (named timers live in shard 0).
    ScheduleNamed {
        /// The timer's name.
        name: String,
        /// The virtual host of the exchange.
        vhost: String,
        /// The exchange it is published through when due.
        exchange: String,
        /// Its routing key.
        key: String,
        /// The message.
        message: Box<mqgate_store::Message>,
        /// The MQTT topic to retain it under, if any.
        retain: Option<String>,
        /// When, in ms since the epoch.
        due: mqgate_store::Millis,
    },
    /// [`crate::Broker::cancel_scheduled`] (named timers live in shard 0).
    CancelScheduled(String),
    /// [`crate::Broker::fire_scheduled`] (named timers live in shard 0).
    FireScheduled(String),
    /// A page of the retained messages matching `filter` after the topic `after`, read
    /// on shard 0's owner ([`crate::Broker::retained_next`]).
    RetainedPage {
        /// The MQTT topic filter.
        filter: String,
        /// Where the page starts (after this topic).
        after: Option<String>,
    },
}

/// What an [`AdminOp`] answered.
#[derive(Debug)]
pub enum AdminAnswer {
    /// The topic as it is now.
    Topic(mqgate_store::TopicConfig),
    /// Whether it existed.
    Deleted(bool),
    /// The group's members, offsets and lag.
    Group(crate::GroupInfo),
    /// Done.
    Done,
    /// What a declaration did.
    Declared(crate::Declared),
    /// A record, if it exists.
    Record(Option<bytes::Bytes>),
    /// The address advertised for a service, if any.
    Located(Option<String>),
    /// Topics with their queues' offsets.
    Topics(Vec<crate::views::TopicView>),
    /// Consumer groups.
    Groups(Vec<GroupName>),
    /// Records (key, value).
    Records(Vec<(bytes::Bytes, bytes::Bytes)>),
    /// A count.
    Count(u64),
    /// Stored messages.
    Stored(Vec<mqgate_store::StoredMessage>),
    /// A page of a queue.
    Queue(Vec<mqgate_store::QueueMessage>),
    /// Retained messages (topic, message), and where the next page starts (`None`:
    /// none left).
    Retained {
        /// The page.
        messages: Vec<(String, mqgate_store::Message)>,
        /// The last topic of the page when more may follow.
        next: Option<String>,
    },
    /// A routing change's result per thing changed, and shard 0's log position once
    /// it was written (what the caller's follower must reach).
    Routed {
        /// Per binding (one for a change of one thing): whether it changed anything.
        results: Vec<Result<bool>>,
        /// The log position.
        position: u64,
    },
}

impl AdminOp {
    /// The shard the operation is about, as `set` places it.
    pub(crate) fn shard(&self, set: &ShardSet) -> ShardId {
        match self {
            AdminOp::CreateTopic(t, _) | AdminOp::DeleteTopic(t) => set.placement.topic(t),
            AdminOp::GroupInfo(g) | AdminOp::ResetGroup(g, _) | AdminOp::DeleteGroup(g) => {
                set.placement.group(g)
            }
            AdminOp::Routing(_) => 0,
            AdminOp::DeclareEndpoint(d) => set.placement.topic(&d.topic),
            AdminOp::EndpointRecord { topic, .. }
            | AdminOp::DeleteEndpoint { topic, .. }
            | AdminOp::Locate { topic, .. }
            | AdminOp::WriteRecords { topic, .. }
            | AdminOp::AdjustRefs { topic, .. } => set.placement.topic(topic),
            AdminOp::RetainedPage { .. }
            | AdminOp::CancelScheduled(_)
            | AdminOp::FireScheduled(_)
            | AdminOp::ScheduleNamed { .. } => 0,
            AdminOp::ShardTopics(s)
            | AdminOp::ShardGroups(s)
            | AdminOp::ShardRecords { shard: s, .. } => *s,
            AdminOp::TopicView(t) | AdminOp::ByKey { topic: t, .. } => set.placement.topic(t),
            AdminOp::Peek { queue, .. } => set.placement.topic(&queue.topic),
            AdminOp::Message(id) => shard_of_id(id.0),
        }
    }
}

impl crate::Broker {
    /// Run `op` here (on the gateway owning its shard: what the admin relay's server
    /// calls), or, on a shard owned elsewhere, through the cluster's admin relay.
    pub async fn admin(&self, op: AdminOp) -> Result<AdminAnswer> {
        let shard = op.shard(&self.inner);
        if self.inner.local(shard).is_none() {
            if let Some(link) = &self.inner.link {
                return link.admin(shard, op).await;
            }
            return Err(CoreError::NotOwned(shard));
        }
        Ok(match op {
            AdminOp::CreateTopic(t, q) => AdminAnswer::Topic(self.create_topic(&t, q).await?),
            AdminOp::DeleteTopic(t) => AdminAnswer::Deleted(self.delete_topic(&t).await?),
            AdminOp::GroupInfo(g) => AdminAnswer::Group(self.group_info(&g).await?),
            AdminOp::ResetGroup(g, to) => {
                self.reset_group(&g, to).await?;
                AdminAnswer::Done
            }
            AdminOp::DeleteGroup(g) => {
                self.delete_group(&g).await?;
                AdminAnswer::Done
            }
            AdminOp::Routing(op) => self.run_routing(op).await?,
            AdminOp::DeclareEndpoint(d) => {
                AdminAnswer::Declared(self.declare_endpoint_once(d).await?)
            }
            AdminOp::EndpointRecord {
                topic,
                namespace,
                key,
            } => AdminAnswer::Record(self.endpoint_record(&topic, &namespace, &key).await?),
            AdminOp::DeleteEndpoint {
                vhost,
                topic,
                group,
                records,
            } => {
                self.delete_endpoint(&vhost, &topic, &group, records)
                    .await?;
                AdminAnswer::Done
            }
            AdminOp::AdjustRefs { topic, delta } => {
                AdminAnswer::Count(self.adjust_refs(&topic, delta).await?)
            }
            AdminOp::WriteRecords { topic, records } => {
                self.write_endpoint_records(&topic, records).await?;
                AdminAnswer::Done
            }
            AdminOp::Locate { service, .. } => AdminAnswer::Located(self.advertised(&service)),
            AdminOp::ShardTopics(s) => AdminAnswer::Topics(self.local_topic_views(s)?),
            AdminOp::ShardGroups(s) => AdminAnswer::Groups(self.local_groups(s).await?),
            AdminOp::ShardRecords {
                shard,
                namespace,
                prefix,
                after,
                limit,
            } => AdminAnswer::Records(
                self.local_records(shard, &namespace, &prefix, after.as_deref(), limit as usize)
                    .await?,
            ),
            AdminOp::TopicView(t) => {
                AdminAnswer::Topics(self.local_topic_view(&t)?.into_iter().collect())
            }
            AdminOp::Message(id) => AdminAnswer::Stored(
                self.message(id)
                    .await?
                    .map(|m| mqgate_store::StoredMessage::clone(&m))
                    .into_iter()
                    .collect(),
            ),
            AdminOp::ByKey { topic, key, limit } => AdminAnswer::Stored(
                self.messages_by_key(&topic, &key, limit as usize)
                    .await?
                    .iter()
                    .map(|m| mqgate_store::StoredMessage::clone(m))
                    .collect(),
            ),
            AdminOp::Peek { queue, from, limit } => {
                let limits = mqgate_store::ReadLimits {
                    max_count: limit as usize,
                    max_bytes: crate::views::RELAYED_READ_BYTES,
                };
                match self.peek(&queue, from, limits).await {
                    Ok(m) => AdminAnswer::Queue(m),
                    Err(CoreError::Store(mqgate_store::StoreError::UnknownTopic(t))) => {
                        return Err(CoreError::NoSuchTopic(t.to_string()))
                    }
                    Err(e) => return Err(e),
                }
            }
            AdminOp::ScheduleNamed {
                name,
                vhost,
                exchange,
                key,
                message,
                retain,
                due,
            } => {
                self.schedule_named(
                    &name,
                    &vhost,
                    &exchange,
                    &key,
                    *message,
                    retain.as_deref(),
                    due,
                )
                .await?;
                AdminAnswer::Done
            }
            AdminOp::CancelScheduled(name) => {
                AdminAnswer::Deleted(self.cancel_scheduled(&name).await?)
            }
            AdminOp::FireScheduled(name) => AdminAnswer::Deleted(self.fire_scheduled(&name).await?),
            AdminOp::RetainedPage { filter, after } => {
                let (messages, next) = self.retained_page(&filter, after).await?;
                AdminAnswer::Retained { messages, next }
            }
        })
    }

    /// `op` through the admin relay when `local` failed because another gateway owns
    /// the shard; `local`'s result otherwise.
    pub(crate) async fn or_relay<T>(
        &self,
        local: Result<T>,
        op: impl FnOnce() -> AdminOp,
        answer: impl FnOnce(AdminAnswer) -> Option<T>,
    ) -> Result<T> {
        match (local, &self.inner.link) {
            (Err(CoreError::NotOwned(s)), Some(link)) => {
                let op = op();
                let what = format!("{op:?}");
                answer(link.admin(s, op).await?).ok_or_else(|| {
                    CoreError::Invalid(format!("the admin relay answered {what} with another kind"))
                })
            }
            (r, _) => r,
        }
    }
}

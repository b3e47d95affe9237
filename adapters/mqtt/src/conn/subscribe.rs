//! SUBSCRIBE and UNSUBSCRIBE: plain and shared subscriptions, and the subscriptions of
//! a resumed session.

use std::collections::HashSet;

use bytes::Bytes;
use mqgate_core::acl::Access;
use mqgate_core::router::{Binding, Destination, DEFAULT_VHOST};
use mqgate_core::{ConsumeMode, GroupSpec, MemberOptions, OnFailure, StartPosition};
use mqgate_store::TopicName;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Conn, End, SharedSub};
use crate::codec::{reason, Packet, Properties, SubAck, Subscribe, UnsubAck, Unsubscribe};
use crate::server::MQTT_EXCHANGE;
use crate::session::{session_topic, shared_topic, Subscription};
use crate::topic;

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    pub(super) async fn on_subscribe(&mut self, s: Subscribe) -> Result<(), End> {
        let v5 = self.v5();
        let quota = if v5 { reason::QUOTA_EXCEEDED } else { 0x80 };
        let max_filters = self.shared.cfg.max_filters_per_subscribe;
        if max_filters > 0 && s.filters.len() > max_filters {
            // Refused whole: a SUBACK still answers every filter (MQTT-3.8.4-5/6), none
            // is subscribed, and the connection stays up.
            tracing::warn!(
                client = %self.client_id,
                filters = s.filters.len(),
                max = max_filters,
                "MQTT: SUBSCRIBE refused: more filters than limits.mqtt_max_filters_per_subscribe"
            );
            self.send(&Packet::SubAck(SubAck {
                pkid: s.pkid,
                properties: Properties::default(),
                codes: vec![quota; s.filters.len()],
            }));
            return Ok(());
        }
        let max_subs = self.shared.cfg.max_subscriptions_per_session;
        let sub_id = s.properties.subscription_ids.first().copied();
        let stream_offset = s
            .properties
            .user
            .iter()
            .find(|(k, _)| k == "x-stream-offset")
            .map(|(_, v)| v.clone());
        // `x-orderly: true` (and `x-queues: N`) on a shared subscription: per-key strict
        // order with competing members (RocketMQ's orderly consumption).
        let orderly = orderly_queues(&s.properties.user);
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut retained_to_send = Vec::new();
        // Plain subscriptions are bound together after the loop (one router update,
        // one store write): (place in `codes`, subscription, existed before).
        let mut plain: Vec<(usize, Subscription, bool)> = Vec::new();
        // Plain filters this packet adds (not yet in the record).
        let mut adding: HashSet<String> = HashSet::new();
        let mut over_quota = 0usize;
        for (filter, opts) in s.filters {
            let shared = topic::parse_shared(&filter);
            let inner = match &shared {
                Ok(Some((_, f))) => *f,
                Ok(None) => filter.as_str(),
                Err(topic::BadForm) => "",
            };
            if shared.is_err() || !topic::valid_filter(inner) {
                codes.push(if v5 {
                    reason::TOPIC_FILTER_INVALID
                } else {
                    0x80
                });
                continue;
            }
            if matches!(shared, Ok(Some(_))) && opts.no_local {
                return Err(self
                    .protocol_error(reason::PROTOCOL_ERROR, "no local on a shared subscription"));
            }
            if !self.shared.cfg.allowed(
                self.user.as_deref(),
                &self.client_id,
                Access::Subscribe,
                inner,
            ) {
                tracing::info!(client = %self.client_id, %filter, "MQTT: subscription not authorized");
                codes.push(if v5 { reason::NOT_AUTHORIZED } else { 0x80 });
                continue;
            }
            let existed = self
                .sub_index
                .find(&self.record.subscriptions, &filter)
                .is_some()
                || adding.contains(&filter);
            if !existed
                && max_subs > 0
                && self.record.subscriptions.len() + adding.len() >= max_subs
            {
                over_quota += 1;
                codes.push(quota);
                continue;
            }
            let sub = Subscription {
                filter: filter.clone(),
                options: opts,
                id: sub_id,
            };
            let Ok(Some((name, f))) = shared else {
                if !existed {
                    adding.insert(filter);
                }
                plain.push((codes.len(), sub, existed));
                codes.push(opts.qos as u8);
                continue;
            };
            let (name, f) = (name.to_owned(), f.to_owned());
            let r = self
                .subscribe_shared(&sub, &name, &f, existed, stream_offset.as_deref(), orderly)
                .await;
            if let Err(e) = r {
                tracing::warn!(client = %self.client_id, %filter, error = %e, "MQTT: subscribe failed");
                codes.push(if v5 { reason::UNSPECIFIED_ERROR } else { 0x80 });
                continue;
            }
            self.upsert_subscription(sub);
            codes.push(opts.qos as u8);
        }
        if over_quota > 0 {
            tracing::warn!(
                client = %self.client_id,
                refused = over_quota,
                max = max_subs,
                "MQTT: subscriptions refused: the session holds limits.mqtt_max_subscriptions_per_session"
            );
        }
        if !plain.is_empty() {
            let topic = session_topic(&self.client_id);
            let bindings: Vec<Binding> = plain
                .iter()
                .map(|(_, sub, _)| self.binding(&sub.filter, topic.clone()))
                .collect();
            let outcome: Vec<Result<(), String>> = match self
                .shared
                .broker
                .bind_many(DEFAULT_VHOST, bindings, self.persistent())
                .await
            {
                Ok(results) => results
                    .into_iter()
                    .map(|r| r.map(|_| ()).map_err(|e| e.to_string()))
                    .collect(),
                Err(e) => vec![Err(e.to_string()); plain.len()],
            };
            for ((slot, sub, existed), r) in plain.into_iter().zip(outcome) {
                if let Err(e) = r {
                    tracing::warn!(client = %self.client_id, filter = %sub.filter, error = %e, "MQTT: subscribe failed");
                    codes[slot] = if v5 { reason::UNSPECIFIED_ERROR } else { 0x80 };
                    continue;
                }
                let send_retained = match sub.options.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
                if send_retained {
                    retained_to_send.push(sub.clone());
                }
                self.upsert_subscription(sub);
            }
        }
        self.send(&Packet::SubAck(SubAck {
            pkid: s.pkid,
            properties: Properties::default(),
            codes,
        }));
        if self.keeps_record() {
            self.save_record().await;
        }
        // Sent by the main loop as the output buffer drains (`send_retained`).
        if !retained_to_send.is_empty() {
            self.rare()
                .retained_todo
                .extend(retained_to_send.into_iter().map(super::RetainedTodo::new));
        }
        Ok(())
    }

    /// Add `sub` to the session, or replace the one with its filter.
    fn upsert_subscription(&mut self, sub: Subscription) {
        match self.sub_index.find(&self.record.subscriptions, &sub.filter) {
            Some(i) => self.record.subscriptions[i] = sub,
            None => self.sub_index.push(&mut self.record.subscriptions, sub),
        }
    }

    /// Take the subscription with `filter` out of the session; whether it had one.
    fn remove_subscription(&mut self, filter: &str) -> bool {
        self.sub_index
            .remove(&mut self.record.subscriptions, filter)
    }

    fn binding(&self, filter: &str, destination: TopicName) -> Binding {
        Binding {
            source: MQTT_EXCHANGE.to_owned(),
            destination: Destination::Topic(destination),
            key: filter.to_owned(),
            headers: None,
            mqtt: true,
            arguments: Bytes::new(),
        }
    }

    async fn subscribe_shared(
        &mut self,
        sub: &Subscription,
        name: &str,
        filter: &str,
        existed: bool,
        stream_offset: Option<&str>,
        orderly: Option<u32>,
    ) -> mqgate_core::Result<()> {
        let Some((topic, group)) = shared_topic(name, filter) else {
            return Err(mqgate_core::CoreError::Invalid(
                "shared subscription name too long".into(),
            ));
        };
        if !existed {
            self.join_shared(sub, filter, topic.clone(), group.clone(), orderly)
                .await?;
            self.shared.hold_shared(topic, filter).await;
        } else if let Some(s) = self
            .rare()
            .shared_subs
            .values_mut()
            .find(|s| s.filter == sub.filter)
        {
            s.options = sub.options;
            s.id = sub.id;
        }
        if let Some(pos) = stream_offset {
            // The words mean what they mean in AMQP (the core's); a number is a
            // timestamp in ms.
            let pos = StartPosition::from_stream_offset_word(pos)
                .or_else(|| pos.trim().parse::<u64>().ok().map(StartPosition::Timestamp));
            if let Some(pos) = pos {
                self.shared.broker.reset_group(&group, pos).await?;
            }
        }
        Ok(())
    }

    /// Make sure a shared subscription's topic exists and is bound with `filter`, and
    /// join its group as a member. The topic says what the group is: one queue, a
    /// plain shared group (each message to any member); several (created by a first
    /// subscriber asking for `orderly` queues, or by an operator with `mqgate topics
    /// create`), an orderly group (the members split the queues, one message in flight
    /// per queue, a message's queue chosen by its `x-sharding-key` or else its topic).
    async fn join_shared(
        &mut self,
        sub: &Subscription,
        filter: &str,
        topic: TopicName,
        group: mqgate_store::GroupName,
        orderly: Option<u32>,
    ) -> mqgate_core::Result<()> {
        let queues = match self.shared.broker.topic(&topic) {
            Some(c) if orderly.is_some() && c.queue_count == 1 => {
                return Err(mqgate_core::CoreError::Invalid(
                    "this shared subscription exists without x-orderly".into(),
                ))
            }
            Some(c) => c.queue_count,
            None => {
                let n = orderly.unwrap_or(1);
                self.shared.broker.create_topic(&topic, Some(n)).await?;
                n
            }
        };
        let orderly = queues > 1;
        let b = self.binding(filter, topic.clone());
        self.shared.broker.bind(DEFAULT_VHOST, b, true).await?;
        let consumer = self
            .shared
            .broker
            .subscribe(
                GroupSpec {
                    start: StartPosition::Last,
                    on_failure: OnFailure::Retry,
                    orderly,
                    ..GroupSpec::new(
                        group,
                        vec![topic],
                        if orderly {
                            ConsumeMode::Clustering
                        } else {
                            ConsumeMode::Shared
                        },
                    )
                },
                MemberOptions::new(self.client_id.clone(), usize::from(self.send_quota)),
            )
            .await?;
        let rare = self.rare();
        rare.next_shared += 1;
        let id = rare.next_shared;
        rare.shared_subs.insert(
            id,
            SharedSub {
                filter: sub.filter.clone(),
                options: sub.options,
                id: sub.id,
                consumer,
            },
        );
        Ok(())
    }

    /// Rejoin what a resumed session subscribed to: shared subscriptions one by one,
    /// plain ones in one batch (their bindings are usually there already: durable).
    pub(super) async fn restore_subscriptions(&mut self) {
        let topic = session_topic(&self.client_id);
        let mut plain = Vec::new();
        for s in self.record.subscriptions.clone() {
            if let Err(e) = self.restore_subscription(&s, &topic, &mut plain).await {
                tracing::warn!(client = %self.client_id, filter = %s.filter, error = %e, "MQTT: restoring a subscription failed");
            }
        }
        if plain.is_empty() {
            return;
        }
        let persistent = self.persistent();
        match self
            .shared
            .broker
            .bind_many(DEFAULT_VHOST, plain.clone(), persistent)
            .await
        {
            Ok(results) => {
                for (b, r) in plain.iter().zip(results) {
                    if let Err(e) = r {
                        tracing::warn!(client = %self.client_id, filter = %b.key, error = %e, "MQTT: restoring a subscription failed");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(client = %self.client_id, error = %e, "MQTT: restoring the subscriptions failed")
            }
        }
    }

    /// Rejoin one shared subscription, or add a plain one's binding to `plain`.
    async fn restore_subscription(
        &mut self,
        s: &Subscription,
        session: &TopicName,
        plain: &mut Vec<Binding>,
    ) -> mqgate_core::Result<()> {
        match topic::parse_shared(&s.filter) {
            Ok(Some((name, f))) => {
                let (name, f) = (name.to_owned(), f.to_owned());
                // The session still holds its reference: join without counting again.
                let (topic, group) = shared_topic(&name, &f).ok_or_else(|| {
                    mqgate_core::CoreError::Invalid("bad shared subscription".into())
                })?;
                self.join_shared(s, &f, topic, group, None).await
            }
            _ => {
                plain.push(self.binding(&s.filter, session.clone()));
                Ok(())
            }
        }
    }

    pub(super) async fn on_unsubscribe(&mut self, u: Unsubscribe) {
        let mut codes = Vec::with_capacity(u.filters.len());
        let session = session_topic(&self.client_id);
        // Plain subscriptions are unbound together (one router update, one write).
        let mut unbind = Vec::new();
        for filter in u.filters {
            if !self.remove_subscription(&filter) {
                codes.push(reason::NO_SUBSCRIPTION_EXISTED);
                continue;
            }
            match topic::parse_shared(&filter) {
                Ok(Some((name, f))) => {
                    let (name, f) = (name.to_owned(), f.to_owned());
                    self.rare().shared_subs.retain(|_, s| s.filter != filter);
                    self.shared.release_shared(&name, &f).await;
                }
                _ => unbind.push(self.binding(&filter, session.clone())),
            }
            codes.push(reason::SUCCESS);
        }
        if !unbind.is_empty() {
            match self.shared.broker.unbind_many(DEFAULT_VHOST, &unbind).await {
                Ok(results) => {
                    for (b, r) in unbind.iter().zip(results) {
                        if let Err(e) = r {
                            tracing::warn!(client = %self.client_id, filter = %b.key, error = %e, "MQTT: unbind failed");
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(client = %self.client_id, error = %e, "MQTT: unbind failed")
                }
            }
        }
        self.send(&Packet::UnsubAck(UnsubAck {
            pkid: u.pkid,
            properties: Properties::default(),
            codes,
        }));
        if self.keeps_record() {
            self.save_record().await;
        }
    }
}

/// The queues an orderly shared subscription asks for: `x-orderly: true` gives 16 (or
/// `x-queues`, 1 to 1024); `None` when it does not ask.
fn orderly_queues(user: &[(String, String)]) -> Option<u32> {
    let on = user
        .iter()
        .any(|(k, v)| k == "x-orderly" && v.trim().eq_ignore_ascii_case("true"));
    if !on {
        return None;
    }
    let n = user
        .iter()
        .find(|(k, _)| k == "x-queues")
        .and_then(|(_, v)| v.trim().parse::<u32>().ok())
        .filter(|n| (2..=1024).contains(n))
        .unwrap_or(16);
    Some(n)
}

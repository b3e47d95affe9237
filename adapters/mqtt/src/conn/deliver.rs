//! Outbound deliveries: polling the consumers, retained messages of new subscriptions,
//! packet ids, and the acknowledgements of outbound flows.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::task::Poll;

use mqgate_core::router::amqp_to_mqtt;
use mqgate_core::{props, Consumer, Delivery};
use mqgate_store::Message;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Conn, End, Inflight, Source, Stage, DELIVERY_BURST, OUT_HIGH_WATER};
use crate::codec::{self, reason, Ack, AckKind, Properties, PublishRef, QoS};
use crate::session::Subscription;
use crate::topic;

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// Deliver what is ready now (direct QoS 0 and the consumers), up to a burst each,
    /// within the client's window and the output high-water mark.
    pub(super) fn deliver_burst(&mut self) {
        if self.retained_pending() {
            // Retained messages of new subscriptions go first.
            return;
        }
        for _ in 0..DELIVERY_BURST {
            if self.output.len() >= OUT_HIGH_WATER {
                break;
            }
            match self.direct_rx.try_recv() {
                Some(m) => self.deliver_direct(&m),
                None => break,
            }
        }
        for _ in 0..DELIVERY_BURST {
            if self.inflight.len() >= usize::from(self.send_quota)
                || self.output.len() >= OUT_HIGH_WATER
            {
                break;
            }
            match try_deliveries(&mut self.session, self.rare.as_deref_mut()) {
                Some((src, d)) => self.deliver(src, d),
                None => break,
            }
        }
    }

    /// Send retained messages of new subscriptions until the output buffer or the
    /// client's window is full; bodies not in the retained cache are read from the store.
    /// (In a cluster, read from the gateway owning shard 0 when that is another one.)
    pub(super) async fn send_retained(&mut self) {
        let broker = self.shared.broker.clone();
        while self.output.len() < OUT_HIGH_WATER
            && self.inflight.len() < usize::from(self.send_quota)
        {
            let Some(mut pending) = self.rare().retained_todo.pop_front() else {
                // All sent: the queue goes too, and what holds it if nothing else is
                // there (an idle session keeps none: a SUBSCRIBE queues a look-up for
                // retained messages whether or not there are any).
                self.rare().retained_todo = std::collections::VecDeque::new();
                if self.rare.as_ref().is_some_and(|r| r.unused()) {
                    self.rare = None;
                }
                return;
            };
            let Some((topic, m)) = broker.retained_next(&mut pending.cursor).await else {
                continue;
            };
            self.deliver_retained(&topic, &m, &pending.sub);
            self.rare().retained_todo.push_front(pending);
        }
    }

    pub(super) async fn on_ack(&mut self, a: Ack) -> Result<(), End> {
        match a.kind {
            AckKind::PubRel => {
                let known = self
                    .publishing
                    .as_mut()
                    .is_some_and(|p| p.inbound_qos2.remove(&a.pkid));
                let code = if known || !self.v5() {
                    reason::SUCCESS
                } else {
                    reason::PACKET_ID_NOT_FOUND
                };
                self.ack(AckKind::PubComp, a.pkid, code);
                if known && self.persistent() {
                    self.record_inbound_qos2();
                }
            }
            AckKind::PubAck | AckKind::PubRec => {
                let want = if a.kind == AckKind::PubAck {
                    Stage::PubAck
                } else {
                    Stage::PubRec
                };
                match self.inflight.get(&a.pkid) {
                    Some(f) if f.stage == want => {}
                    // An ack for nothing in flight (a resend after our restart): ignore.
                    _ => return Ok(()),
                }
                let f = self.inflight.remove(&a.pkid).expect("checked");
                let failed = a.reason >= 0x80;
                if let Some(src) = f.source {
                    self.settle(src, failed);
                }
                if a.kind == AckKind::PubRec && !failed {
                    self.inflight.insert(
                        a.pkid,
                        Inflight {
                            source: None,
                            stage: Stage::PubComp,
                        },
                    );
                    self.ack(AckKind::PubRel, a.pkid, reason::SUCCESS);
                    if self.persistent() {
                        self.record.pubrel.push(a.pkid);
                    }
                }
            }
            AckKind::PubComp => {
                if let Some(f) = self.inflight.get(&a.pkid) {
                    if f.stage == Stage::PubComp {
                        self.inflight.remove(&a.pkid);
                        self.record.pubrel.retain(|p| *p != a.pkid);
                    }
                }
            }
        }
        Ok(())
    }

    /// Settle a delivery with the group it came from. A failed consumption (5.0 reason
    /// >= 0x80) of a shared subscription goes through the group's retry ladder.
    fn settle(&mut self, src: Source, failed: bool) {
        if !failed {
            self.shared.stats.acked.fetch_add(1, Ordering::Relaxed);
        }
        match src {
            Source::Session(t) => {
                if let Some(c) = &self.session {
                    c.ack(t);
                }
            }
            Source::Shared(id, t) => {
                if let Some(s) = self.shared_sub(id) {
                    if failed {
                        s.consumer.nack(t, false);
                    } else {
                        s.consumer.ack(t);
                    }
                }
            }
            Source::Retained => {}
        }
    }

    // -----------------------------------------------------------------------------------
    // Outgoing

    fn alloc_pkid(&mut self, preferred: Option<u16>) -> Option<u16> {
        if let Some(p) = preferred {
            if !self.inflight.contains_key(&p) {
                return Some(p);
            }
        }
        for _ in 0..u16::MAX {
            let id = self.next_pkid;
            self.next_pkid = if id == u16::MAX { 1 } else { id + 1 };
            if !self.inflight.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// A delivery from the session's group or a shared subscription's group.
    pub(super) fn deliver(&mut self, src: DeliverySource, d: Delivery) {
        let m = &d.message.message;
        let topic = mqtt_topic(m);
        if !self.may_read(&topic) {
            // Settled, so it does not hold the queue; never sent.
            match src {
                DeliverySource::Session => {
                    if let Some(c) = &self.session {
                        c.ack(d.ack_token());
                    }
                }
                DeliverySource::Shared(id) => {
                    if let Some(s) = self.shared_sub(id) {
                        s.consumer.ack(d.ack_token());
                    }
                }
            }
            return;
        }
        let (qos_cap, retain_ok, sub_ids, shared_id) = match src {
            DeliverySource::Session => {
                match self.matching(m, &topic) {
                    Some((q, rap, ids)) => (q, rap, ids, None),
                    None => {
                        // No subscription wants it any more (unsubscribed, or no local).
                        if let Some(c) = &self.session {
                            c.ack(d.ack_token());
                        }
                        return;
                    }
                }
            }
            DeliverySource::Shared(id) => match self.shared_sub(id) {
                Some(s) => (
                    s.options.qos,
                    s.options.retain_as_published,
                    s.id.into_iter().collect(),
                    Some(id),
                ),
                None => return,
            },
        };
        let source = match shared_id {
            Some(id) => Source::Shared(id, d.ack_token()),
            None => Source::Session(d.ack_token()),
        };
        let preferred = shared_id
            .is_none()
            .then(|| (d.offset.0 % 65_535) as u16 + 1);
        let retain = retain_ok && props::get(&m.properties, props::MQTT_RETAIN).is_some();
        self.emit(
            m,
            &topic,
            qos_cap,
            retain,
            d.redelivered,
            d.reconsume_count(),
            sub_ids,
            Some(source),
            preferred,
        );
    }

    /// The session's plain subscriptions that want a message on `topic` (no-local ones
    /// skip the session's own publishes): the highest granted QoS, whether any keeps
    /// the retain flag, and every subscription identifier. `None`: no subscription
    /// wants it (any more).
    fn matching(&self, m: &Message, topic: &str) -> Option<(QoS, bool, Vec<u32>)> {
        let from_self = props::get(&m.properties, props::MQTT_FROM)
            .is_some_and(|f| f.as_ref() == self.client_id.as_bytes());
        let mut best: Option<QoS> = None;
        let mut rap = false;
        let mut ids = Vec::new();
        for s in &self.record.subscriptions {
            if s.filter.starts_with("$share/") || (s.options.no_local && from_self) {
                continue;
            }
            if topic::matches(&s.filter, topic) {
                best = Some(best.map_or(s.options.qos, |b| b.max(s.options.qos)));
                rap |= s.options.retain_as_published;
                ids.extend(s.id);
            }
        }
        best.map(|q| (q, rap, ids))
    }

    /// A QoS 0 message handed over directly (never stored).
    pub(super) fn deliver_direct(&mut self, m: &Message) {
        let topic = mqtt_topic(m);
        if !self.may_read(&topic) {
            return;
        }
        if let Some((_, rap, ids)) = self.matching(m, &topic) {
            let retain = rap && props::get(&m.properties, props::MQTT_RETAIN).is_some();
            self.emit(
                m,
                &topic,
                QoS::AtMostOnce,
                retain,
                false,
                0,
                ids,
                None,
                None,
            );
        }
    }

    fn deliver_retained(&mut self, topic: &str, m: &Message, sub: &Subscription) {
        if !self.may_read(topic) {
            return;
        }
        let ids = sub.id.into_iter().collect();
        self.emit(
            m,
            topic,
            sub.options.qos,
            true,
            false,
            0,
            ids,
            Some(Source::Retained),
            None,
        );
    }

    /// Build and queue one PUBLISH: QoS is the lower of the message's and `qos_cap`;
    /// expired messages and messages over the client's maximum packet size are dropped
    /// (and settled). Written from the message's topic and body as they are: nothing is
    /// allocated for a delivery but what its 5.0 properties need.
    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        m: &Message,
        topic: &str,
        qos_cap: QoS,
        retain: bool,
        dup: bool,
        tried: u32,
        sub_ids: Vec<u32>,
        source: Option<Source>,
        preferred: Option<u16>,
    ) {
        let msg_qos = props::get(&m.properties, props::MQTT_QOS)
            .and_then(|v| v.first().copied())
            .and_then(QoS::from_u8)
            .unwrap_or(QoS::ExactlyOnce);
        let qos = msg_qos.min(qos_cap);
        let now = self.shared.now();
        let mut properties = Properties::default();
        if let Some(at) = props::get_u64(&m.properties, props::EXPIRES_AT) {
            if at <= now {
                if let Some(s) = source {
                    self.settle(s, false);
                }
                return;
            }
            properties.message_expiry = Some(((at - now).div_ceil(1000)) as u32);
        }
        if self.v5() {
            for (k, v) in &m.properties {
                match k.as_ref() {
                    props::PAYLOAD_FORMAT => properties.payload_format = v.first().copied(),
                    props::CONTENT_TYPE => {
                        properties.content_type = Some(String::from_utf8_lossy(v).into_owned())
                    }
                    props::REPLY_TO => {
                        properties.response_topic = Some(String::from_utf8_lossy(v).into_owned())
                    }
                    props::CORRELATION_ID => properties.correlation_data = Some(v.clone()),
                    k if k.starts_with(props::USER_PREFIX) => properties.user.push((
                        k[props::USER_PREFIX.len()..].to_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    )),
                    _ => {}
                }
            }
            if tried > 0 {
                // How many times it was tried before (RocketMQ's reconsume times).
                properties
                    .user
                    .push(("x-delivery-count".to_owned(), tried.to_string()));
            }
            properties.subscription_ids = sub_ids;
        } else {
            properties = Properties::default();
        }
        let pkid = if qos == QoS::AtMostOnce {
            0
        } else {
            match self.alloc_pkid(preferred) {
                Some(id) => id,
                None => {
                    if let Some(s) = source {
                        self.settle(s, false);
                    }
                    return;
                }
            }
        };
        let dup = dup && qos != QoS::AtMostOnce;
        if dup {
            self.shared
                .stats
                .redelivered
                .fetch_add(1, Ordering::Relaxed);
        }
        let mut topic_out = topic;
        // A new alias is taken only once its packet is written: a delivery dropped for
        // its size must not leave the client an alias it never saw.
        let mut new_alias = None;
        if self.v5() && self.client_alias_max > 0 {
            let max = usize::from(self.client_alias_max);
            let aliases = &self.rare().aliases_out;
            if let Some(&a) = aliases.get(topic) {
                properties.topic_alias = Some(a);
                topic_out = "";
            } else if aliases.len() < max {
                let a = aliases.len() as u16 + 1;
                properties.topic_alias = Some(a);
                new_alias = Some(a);
            }
        }
        let publish = PublishRef {
            dup,
            qos,
            retain,
            topic: topic_out,
            pkid,
            properties: &properties,
            payload: &m.body,
        };
        let v5 = self.v5();
        if !codec::encode_publish_within(
            &publish,
            v5,
            self.client_max_packet as usize,
            &mut self.output.out,
        ) {
            tracing::debug!(client = %self.client_id, "MQTT: message over the client's maximum packet size; dropped");
            if let Some(s) = source {
                self.settle(s, false);
            }
            return;
        }
        if let Some(a) = new_alias {
            self.rare().aliases_out.insert(topic.to_owned(), a);
        }
        self.shared
            .stats
            .publishes_out
            .fetch_add(1, Ordering::Relaxed);
        match (qos, source) {
            (QoS::AtMostOnce, Some(s)) => self.settle(s, false),
            (QoS::AtMostOnce, None) => {}
            (q, source) => {
                let stage = if q == QoS::AtLeastOnce {
                    Stage::PubAck
                } else {
                    Stage::PubRec
                };
                self.inflight.insert(pkid, Inflight { source, stage });
            }
        }
    }
}

/// Which consumer a delivery came from.
#[derive(Clone, Copy, Debug)]
pub(super) enum DeliverySource {
    Session,
    Shared(u32),
}

/// The MQTT topic a message is delivered on: its AMQP routing key when it came through
/// AMQP, else the topic it was published to.
fn mqtt_topic(m: &Message) -> Cow<'_, str> {
    match props::get(&m.properties, props::AMQP_ROUTING_KEY) {
        Some(rk) => Cow::Owned(amqp_to_mqtt(&String::from_utf8_lossy(rk))),
        None => Cow::Borrowed(m.topic.as_str()),
    }
}

/// The next delivery of the session's consumers (a poll: the connection's loop holds
/// no future for it).
pub(super) fn poll_deliveries(
    session: &mut Option<Consumer>,
    rare: Option<&mut super::Rare>,
    cx: &mut std::task::Context<'_>,
) -> Poll<(DeliverySource, Delivery)> {
    if let Some(c) = session {
        if let Poll::Ready(Some(d)) = c.poll_recv(cx) {
            return Poll::Ready((DeliverySource::Session, d));
        }
    }
    for (id, s) in rare.into_iter().flat_map(|r| r.shared_subs.iter_mut()) {
        if let Poll::Ready(Some(d)) = s.consumer.poll_recv(cx) {
            return Poll::Ready((DeliverySource::Shared(*id), d));
        }
    }
    Poll::Pending
}

fn try_deliveries(
    session: &mut Option<Consumer>,
    rare: Option<&mut super::Rare>,
) -> Option<(DeliverySource, Delivery)> {
    if let Some(c) = session {
        if let Some(d) = c.try_recv() {
            return Some((DeliverySource::Session, d));
        }
    }
    for (id, s) in rare.into_iter().flat_map(|r| r.shared_subs.iter_mut()) {
        if let Some(d) = s.consumer.try_recv() {
            return Some((DeliverySource::Shared(*id), d));
        }
    }
    None
}

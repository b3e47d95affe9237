//! Inbound PUBLISH (QoS 0, 1 and 2): topic aliases, checks, batching and storing, and
//! the acknowledgements of inbound flows.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use mqgate_core::acl::Access;
use mqgate_core::{props, Delay};
use mqgate_store::{Message, TopicName};
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Conn, End, PubAcks};
use crate::codec::{reason, Ack, AckKind, Packet, Properties, Publish, QoS};
use crate::server::Outbound;
use crate::session::session_topic;
use crate::topic;

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    /// The publishing state, made at the first PUBLISH.
    pub(super) fn publishing(&mut self) -> &mut super::Publishing {
        let shared = &self.shared;
        self.publishing
            .get_or_insert_with(|| Box::new(super::Publishing::new(shared)))
    }

    pub(super) fn on_publish(
        &mut self,
        mut p: Publish,
        batch: &mut Vec<(Outbound, u16, QoS)>,
    ) -> Result<(), End> {
        self.publishing();
        self.shared
            .stats
            .publishes_in
            .fetch_add(1, Ordering::Relaxed);
        // Topic alias (5.0).
        if let Some(alias) = p.properties.topic_alias.take() {
            if alias == 0 || alias > self.shared.cfg.topic_alias_maximum {
                return Err(
                    self.protocol_error(reason::TOPIC_ALIAS_INVALID, "topic alias out of range")
                );
            }
            if p.topic.is_empty() {
                match self.publishing().aliases_in.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => {
                        return Err(
                            self.protocol_error(reason::PROTOCOL_ERROR, "unknown topic alias")
                        )
                    }
                }
            } else {
                self.publishing().aliases_in.insert(alias, p.topic.clone());
            }
        }
        if p.topic.is_empty() {
            return Err(self.protocol_error(reason::TOPIC_NAME_INVALID, "empty topic name"));
        }
        // A QoS 2 packet id already received and not released. A resend (DUP set: a
        // re-delivery must set it, MQTT-3.3.1-1) is a duplicate: PUBREC again, stored
        // once, and not counted against the receive maximum a second time. Without DUP
        // the sender is done with that id, so this is a new message: it had our PUBCOMP
        // (the release is saved with the session at its end, so a broker crash can keep
        // a released id), or a client restarted without its state numbers from 1 again.
        // Mosquitto tells the two apart the same way in effect (a reused id with another
        // message is a new one), and never drops it.
        if p.qos == QoS::ExactlyOnce && self.publishing().inbound_qos2.contains(&p.pkid) {
            if p.dup {
                self.ack(AckKind::PubRec, p.pkid, reason::SUCCESS);
                return Ok(());
            }
            tracing::debug!(client = %self.client_id, pkid = p.pkid, "MQTT: QoS 2 packet id reused without DUP: a new message");
            self.publishing().inbound_qos2.remove(&p.pkid);
        }
        if p.qos != QoS::AtMostOnce {
            // 5.0 told the client its receive maximum, so what waits in the store
            // pipeline counts; a 3.1.1 client was told no limit (only what one read
            // brings is counted, as a bound on the batch).
            let v5 = self.v5();
            let state = self.publishing();
            let queued = if v5 { state.acks_pending } else { 0 };
            let pending = state.inbound_qos2.len()
                + queued
                + batch.iter().filter(|b| b.2 != QoS::AtMostOnce).count();
            if pending >= usize::from(self.shared.cfg.receive_maximum) {
                return Err(self
                    .protocol_error(reason::RECEIVE_MAXIMUM_EXCEEDED, "receive maximum exceeded"));
            }
        }
        if p.properties.payload_format == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            return Err(self.protocol_error(reason::PAYLOAD_FORMAT_INVALID, "payload is not UTF-8"));
        }
        // `$delayed/<seconds>/<topic>` and the x-delay / x-deliver-at user properties.
        let mut delay = None;
        let topic_name = match topic::parse_delayed(&p.topic) {
            Ok(Some((secs, t))) => {
                delay = Some(Delay::For(Duration::from_secs(secs)));
                t.to_owned()
            }
            // The packet's own, moved (it is not read again).
            Ok(None) => std::mem::take(&mut p.topic),
            Err(topic::BadForm) => {
                return Err(self.protocol_error(reason::TOPIC_NAME_INVALID, "bad $delayed topic"))
            }
        };
        for (k, v) in &p.properties.user {
            match k.as_str() {
                "x-delay" => {
                    if let Ok(ms) = v.trim().parse::<u64>() {
                        delay = Some(Delay::For(Duration::from_millis(ms)));
                    }
                }
                "x-deliver-at" => {
                    if let Ok(at) = v.trim().parse::<u64>() {
                        delay = Some(Delay::At(at));
                    }
                }
                _ => {}
            }
        }
        if !self
            .shared
            .acl
            .check_topic(self.subject(), Access::Publish, &topic_name)
        {
            tracing::info!(client = %self.client_id, topic = %topic_name, "MQTT: publish not authorized; dropped");
            match p.qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.ack(AckKind::PubAck, p.pkid, reason::NOT_AUTHORIZED),
                QoS::ExactlyOnce => self.ack(AckKind::PubRec, p.pkid, reason::NOT_AUTHORIZED),
            }
            return Ok(());
        }
        let names = self.publishing.as_deref_mut().map(|p| &mut p.names);
        let message = to_message(
            &self.shared,
            &self.client_id,
            self.rare.as_deref(),
            names,
            &topic_name,
            (p.qos, p.retain),
            p.payload,
            &p.properties,
        );
        batch.push((
            Outbound {
                topic: topic_name,
                qos: p.qos,
                retain: p.retain,
                message,
                delay,
            },
            p.pkid,
            p.qos,
        ));
        Ok(())
    }

    /// Store a batch of publishes: routed here, queued on the store behind the
    /// connection's earlier writes, and acknowledged (`acknowledge`) once durable, in
    /// order. Waits for the oldest write first when the pipeline is full.
    pub(super) async fn flush_publishes(
        &mut self,
        batch: Vec<(Outbound, u16, QoS)>,
    ) -> Result<(), End> {
        let mut acks = Vec::with_capacity(batch.len());
        let mut items = Vec::with_capacity(batch.len());
        for (o, pkid, qos) in batch {
            acks.push((pkid, qos));
            items.push(o);
        }
        // Until `acknowledge` answers them.
        let answered_later = acks.iter().any(|a| a.1 != QoS::AtMostOnce);
        self.publishing().acks_pending += acks.iter().filter(|a| a.1 != QoS::AtMostOnce).count();
        let own = session_topic(&self.client_id);
        let memo = self.publishing.as_deref_mut().map(|p| &mut p.route);
        let (matched, stored) = match self.shared.route_batch(items, Some(&own), memo).await {
            Ok(r) => r,
            Err(e) => return self.acknowledge((acks, Vec::new()), Err(e)).await,
        };
        if stored.items.is_empty() && self.publishing().writes.is_empty() {
            // Nothing to store (QoS 0 handed over, or nothing matched): answered now.
            return self.acknowledge((acks, matched), Ok(Vec::new())).await;
        }
        if answered_later {
            // Answered once durable: the client's next publish is not held for our ACK
            // meanwhile (`sockio`, "Answers that wait on a sync").
            self.input.ack_now();
        }
        while self.publishing().writes.must_drain() {
            let (t, r) = self.publishing().writes.next().await;
            self.acknowledge(t, r).await?;
        }
        let submitted = self
            .publishing()
            .writes
            .submit(stored, (acks, matched))
            .await;
        if let Err((t, e)) = submitted {
            return self.acknowledge(t, Err(e)).await;
        }
        Ok(())
    }

    /// Wait for every write in flight and acknowledge it.
    pub(super) async fn settle_writes(&mut self) -> Result<(), End> {
        while super::Publishing::writing(&self.publishing) {
            let (t, r) = self.publishing().writes.next().await;
            self.acknowledge(t, r).await?;
        }
        Ok(())
    }

    /// A batch's write is done (or failed): PUBACK / PUBREC each QoS 1 and 2 publish
    /// of it, in order.
    pub(super) async fn acknowledge(
        &mut self,
        (acks, matched): PubAcks,
        stored: mqgate_core::Result<Vec<Option<mqgate_core::Published>>>,
    ) -> Result<(), End> {
        let answered = acks.iter().filter(|a| a.1 != QoS::AtMostOnce).count();
        let state = self.publishing();
        state.acks_pending = state.acks_pending.saturating_sub(answered);
        match stored {
            Ok(_) => {}
            Err(e) if self.v5() => {
                // 5.0 says which messages failed: PUBACK / PUBREC 0x80 for each (a
                // PUBREC >= 0x80 ends that QoS 2 flow), and the connection goes on; the
                // client may publish them again (the store recovers by itself).
                tracing::warn!(client = %self.client_id, error = %e, "MQTT: storing publishes failed; answered 0x80");
                for (pkid, qos) in acks {
                    match qos {
                        QoS::AtMostOnce => {}
                        QoS::AtLeastOnce => {
                            self.ack(AckKind::PubAck, pkid, reason::UNSPECIFIED_ERROR)
                        }
                        QoS::ExactlyOnce => {
                            self.ack(AckKind::PubRec, pkid, reason::UNSPECIFIED_ERROR)
                        }
                    }
                }
                return Ok(());
            }
            Err(e) => {
                tracing::error!(client = %self.client_id, error = %e, "MQTT: storing publishes failed");
                // 3.1.1 has no failure code: nothing is acknowledged and the connection
                // closes; the client resends after reconnecting.
                return Err(End::Server(
                    reason::UNSPECIFIED_ERROR,
                    "store failure".into(),
                ));
            }
        }
        let mut qos2_added = false;
        for ((pkid, qos), matched) in acks.into_iter().zip(matched) {
            let counter = if matched {
                &self.shared.stats.routed
            } else {
                &self.shared.stats.unroutable
            };
            counter.fetch_add(1, Ordering::Relaxed);
            let code = if matched || !self.v5() {
                reason::SUCCESS
            } else {
                reason::NO_MATCHING_SUBSCRIBERS
            };
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => self.ack(AckKind::PubAck, pkid, code),
                QoS::ExactlyOnce => {
                    self.publishing().inbound_qos2.insert(pkid);
                    qos2_added = true;
                    self.ack(AckKind::PubRec, pkid, code)
                }
            }
        }
        if qos2_added && self.persistent() {
            self.save_record().await;
        }
        Ok(())
    }

    pub(super) fn ack(&mut self, kind: AckKind, pkid: u16, code: u8) {
        let mut properties = Properties::default();
        if code >= 0x80 && self.v5() && self.problem_info {
            properties.reason_string = Some(reason_text(code).to_owned());
        }
        self.send(&Packet::Ack(Ack {
            kind,
            pkid,
            reason: code,
            properties,
        }));
    }
}

/// The reason string sent with a failure code (5.0, when the client asks for problem
/// information).
fn reason_text(code: u8) -> &'static str {
    match code {
        reason::NOT_AUTHORIZED => "not authorized by the broker's access rules",
        reason::PACKET_ID_NOT_FOUND => "no such packet identifier in flight",
        reason::TOPIC_NAME_INVALID => "invalid topic name",
        reason::QUOTA_EXCEEDED => "quota exceeded",
        reason::PAYLOAD_FORMAT_INVALID => "payload is not UTF-8 as its format indicator says",
        _ => "unspecified error",
    }
}

/// The names a publishing connection's messages carry, kept from its last publish: the
/// topic's name (an allocation a message) and the client id as a property.
#[derive(Debug, Default)]
pub(super) struct PublishNames {
    topic: Option<TopicName>,
    from: Bytes,
}

impl PublishNames {
    fn get(&mut self, topic: &str, client_id: &str) -> (TopicName, Bytes) {
        let name = match &self.topic {
            Some(t) if t.as_str() == topic => t.clone(),
            _ => {
                let t = topic_name(topic);
                self.topic = Some(t.clone());
                t
            }
        };
        if self.from.is_empty() {
            self.from = Bytes::copy_from_slice(client_id.as_bytes());
        }
        (name, self.from.clone())
    }
}

fn topic_name(topic: &str) -> TopicName {
    TopicName::new(topic).unwrap_or_else(|_| TopicName::new("?").expect("valid"))
}

/// Build the core message of a PUBLISH (or a will); `names`: the connection's, reused
/// while they repeat (none for a will).
#[allow(clippy::too_many_arguments)]
pub(super) fn to_message(
    shared: &crate::server::Shared,
    client_id: &str,
    rare: Option<&super::Rare>,
    names: Option<&mut PublishNames>,
    topic: &str,
    (qos, retain): (QoS, bool),
    payload: Bytes,
    pp: &Properties,
) -> Message {
    let (name, from) = match names {
        Some(n) => n.get(topic, client_id),
        None => (
            topic_name(topic),
            Bytes::copy_from_slice(client_id.as_bytes()),
        ),
    };
    // Copy the payload out of the read buffer, so the buffer is not kept alive.
    let mut m = Message::born_at(name, Bytes::copy_from_slice(&payload), shared.now());
    m.producer_group = match rare.and_then(|r| r.producer_group.as_deref()) {
        Some(g) => g.to_owned().into(),
        None => "mqtt".into(),
    };
    let p = &mut m.properties;
    // Sized once: QoS, the sender, then what is there.
    p.reserve_exact(
        2 + usize::from(retain)
            + usize::from(pp.payload_format.is_some())
            + usize::from(pp.message_expiry.is_some_and(|e| e > 0))
            + usize::from(pp.content_type.is_some())
            + usize::from(pp.response_topic.is_some())
            + usize::from(pp.correlation_data.is_some())
            + pp.user.len(),
    );
    const QOS_BYTES: [&[u8]; 3] = [&[0], &[1], &[2]];
    p.push((
        props::MQTT_QOS.into(),
        Bytes::from_static(QOS_BYTES[qos as usize]),
    ));
    if retain {
        p.push((props::MQTT_RETAIN.into(), Bytes::from_static(&[1])));
    }
    p.push((props::MQTT_FROM.into(), from));
    if let Some(f) = pp.payload_format {
        p.push((props::PAYLOAD_FORMAT.into(), Bytes::copy_from_slice(&[f])));
    }
    // An interval of 0 is no expiry, as Mosquitto takes it (not "expired at once").
    if let Some(e) = pp.message_expiry.filter(|e| *e > 0) {
        let at = m.born_timestamp + u64::from(e) * 1000;
        p.push((
            props::EXPIRES_AT.into(),
            Bytes::copy_from_slice(&at.to_be_bytes()),
        ));
    }
    if let Some(ct) = &pp.content_type {
        p.push((
            props::CONTENT_TYPE.into(),
            Bytes::copy_from_slice(ct.as_bytes()),
        ));
    }
    if let Some(rt) = &pp.response_topic {
        p.push((
            props::REPLY_TO.into(),
            Bytes::copy_from_slice(rt.as_bytes()),
        ));
    }
    if let Some(cd) = &pp.correlation_data {
        p.push((props::CORRELATION_ID.into(), cd.clone()));
    }
    for (k, v) in &pp.user {
        p.push((
            format!("{}{k}", props::USER_PREFIX).into(),
            Bytes::copy_from_slice(v.as_bytes()),
        ));
    }
    m
}

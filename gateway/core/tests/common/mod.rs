//! What the core's test files share.
#![allow(dead_code)]

use bytes::Bytes;
use mqgate_core::props::EXPIRES_AT;
use mqgate_core::{DeadLetter, DeadLetterFormat, DeathReason};
use mqgate_store::{Message, Millis, StoredMessage, TopicName};

/// The dead-letter copy of the tests: copies the message to the target exchange's
/// address, records the reason in `death` and the endpoint in `death-queue`, drops the
/// per-message expiry (as RabbitMQ does), and routes it with the target's routing key
/// or `dead`.
#[derive(Debug)]
pub(crate) struct Tagging;

impl DeadLetterFormat for Tagging {
    fn copy(
        &self,
        original: &StoredMessage,
        target: &DeadLetter,
        reason: DeathReason,
        _now: Millis,
    ) -> (Message, String) {
        let mut m = original.message.clone();
        m.topic = TopicName::new(&target.exchange).unwrap();
        m.properties.retain(|(k, _)| k != EXPIRES_AT);
        m.properties.push((
            "death".into(),
            Bytes::from_static(reason.as_str().as_bytes()),
        ));
        m.properties
            .push(("death-queue".into(), Bytes::from(target.endpoint.clone())));
        let key = target.routing_key.clone().unwrap_or_else(|| "dead".into());
        (m, key)
    }
}

/// Wait until group `g` counts `n` deliveries in flight (the acks before it applied).
pub(crate) async fn settled_to(b: &mqgate_core::Broker, g: &mqgate_store::GroupName, n: usize) {
    for _ in 0..500 {
        let info = b.group_info(g).await.unwrap();
        if info.queues.iter().map(|q| q.in_flight).sum::<usize>() == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{g}: {n} in flight expected, the acks were not applied");
}

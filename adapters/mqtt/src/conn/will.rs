//! The will message: published when the connection ends without a normal DISCONNECT,
//! at once or after its delay. A delayed will is a named core timer
//! (`mqtt.will/<client id>`, with its retained setting), so it survives a restart; the
//! client's return to its session cancels it, and a return with Clean Start (its
//! session ends) releases it at once.

use mqgate_core::props;
use mqgate_core::router::{mqtt_to_amqp, DEFAULT_VHOST};
use tokio::io::{AsyncRead, AsyncWrite};

use super::Conn;
use crate::codec::Will;
use crate::server::{Outbound, MQTT_EXCHANGE};

/// The name of a client's delayed will among the core's timers.
pub(crate) fn will_timer(client_id: &str) -> String {
    format!("mqtt.will/{client_id}")
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    pub(super) async fn schedule_will(&mut self, will: Will, delay_secs: u32) {
        let shared = &self.shared;
        let client_id = self.client_id.clone();
        let mut message = super::publish::to_message(
            shared,
            &client_id,
            self.rare.as_deref(),
            None,
            &will.topic,
            (will.qos, will.retain),
            will.payload.clone(),
            &will.properties,
        );
        // A delayed will's Message Expiry Interval counts from when it is published, not
        // from the disconnect (5.0 3.1.3.2.4), as Mosquitto does.
        if delay_secs > 0 {
            props::update_u64(&mut message.properties, props::EXPIRES_AT, |at| {
                at + u64::from(delay_secs) * 1000
            });
        }
        let out = Outbound {
            topic: will.topic.clone(),
            qos: will.qos,
            retain: will.retain,
            message,
            delay: None,
        };
        if delay_secs == 0 {
            if let Err(e) = shared.publish_batch(vec![out], None).await {
                tracing::warn!(client = %client_id, error = %e, "MQTT: publishing a will failed");
            }
            return;
        }
        let due = shared.now() + u64::from(delay_secs) * 1000;
        let retain = out.retain.then_some(out.topic.as_str());
        if let Err(e) = shared
            .broker
            .schedule_named(
                &will_timer(&client_id),
                DEFAULT_VHOST,
                MQTT_EXCHANGE,
                &mqtt_to_amqp(&out.topic),
                out.message.clone(),
                retain,
                due,
            )
            .await
        {
            tracing::warn!(client = %client_id, error = %e, "MQTT: scheduling a will failed");
        }
    }
}

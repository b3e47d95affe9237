//! The will message: published when the connection ends without a normal DISCONNECT,
//! at once or after its delay.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::Conn;
use crate::codec::Will;
use crate::server::{Outbound, PendingWill};

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    pub(super) fn schedule_will(&self, will: Will, delay_secs: u32) {
        let shared = Arc::clone(&self.shared);
        let client_id = self.client_id.clone();
        let message = self.to_message(
            &will.topic,
            will.qos,
            will.retain,
            will.payload.clone(),
            &will.properties,
        );
        let out = Outbound {
            topic: will.topic.clone(),
            qos: will.qos,
            retain: will.retain,
            message,
            delay: None,
        };
        if delay_secs == 0 {
            tokio::spawn(async move {
                if let Err(e) = shared.publish_batch(vec![out], None).await {
                    tracing::warn!(client = %client_id, error = %e, "MQTT: publishing a will failed");
                }
            });
            return;
        }
        let (fire, fired) = tokio::sync::oneshot::channel::<()>();
        let s2 = Arc::clone(&shared);
        let id2 = client_id.clone();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(u64::from(delay_secs))) => {}
                _ = fired => {}
            }
            s2.wills.lock().remove(&id2);
            if let Err(e) = s2.publish_batch(vec![out], None).await {
                tracing::warn!(client = %id2, error = %e, "MQTT: publishing a will failed");
            }
        });
        shared
            .wills
            .lock()
            .insert(client_id, PendingWill { task, fire });
    }
}

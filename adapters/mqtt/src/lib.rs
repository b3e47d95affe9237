//! mqgate's MQTT adapter: MQTT 3.1.1 and 5.0 clients, unchanged, over the broker core.
//!
//! - [`codec`]: an I/O-free codec for both versions, with framing and the wire checks.
//! - [`MqttServer`]: sessions (clean and persistent, takeover, expiry), QoS 0/1/2 both
//!   ways, retained messages, wills, shared subscriptions as consumer groups, topic
//!   aliases, and the RocketMQ features through MQTT's own means (`$delayed/`,
//!   `x-delay`, failed-consumption reason codes, `x-stream-offset` replay).
//!
//! How MQTT maps onto the core is described in ARCHITECTURE.md.

pub use mqgate_mqtt_codec as codec;
mod config;
mod conn;
mod keepalive;
mod qos0;
mod server;
pub mod session;
pub mod topic;

pub use config::{Access, AclDefault, AclRule, MqttConfig};
pub use mqgate_core::retained::NS_RETAINED_INDEX;
pub use mqgate_core::RetainedStats;
pub use server::{MqttServer, MqttStats, MQTT_EXCHANGE};

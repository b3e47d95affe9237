//! mqgate's broker core: RocketMQ's model as one core every protocol adapter calls.
//!
//! - [`Broker`]: topics (auto-created, round robin or sharding-key queue selection),
//!   publishing straight to a topic or through an exchange ([`Router`]), delayed
//!   publishing, producer-group accounting, retention.
//! - Consumer groups ([`GroupSpec`], [`Consumer`]): clustering, shared and broadcast
//!   consumption with per-message acks, orderly consumption, rebalancing, replay.
//! - Retry and DLQ ([`retry`]) and the delay scheduler, built on the store's timers.
//!
//! Adapters never touch a storage backend: they hold a [`Broker`].

pub mod acl;
mod admin;
pub mod auth;
mod broker;
mod catalog;
pub mod clock;
pub mod config;
mod delay;
mod durable;
pub mod endpoint;
mod endpoints;
mod error;
mod group;
mod inspect;
mod limits;
mod locate;
pub mod login;
pub mod mailbox;
mod memory;
mod meta;
pub mod net;
pub mod outbox;
mod pipeline;
pub mod props;
pub mod publish;
pub mod retained;
pub mod retry;
pub mod router;
mod routing;
mod runs;
pub mod shard;
pub mod sockio;
mod topics;
pub mod trie;
mod views;
mod wire;

pub use acl::{Access, AclDefault, AclRule, Subject, TopicAcl};
pub use auth::{Password, UserAccount, Users};
pub use broker::Broker;
pub use catalog::{Declared, EndpointDecl, EndpointKind, NS_REFS};
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::CoreConfig;
pub use delay::{DelayedInfo, DelayedPage};
pub use durable::apply_change as apply_routing_change;
pub use durable::RoutingOp;
pub use endpoint::{DeadLetter, DeadLetterFormat, DeathReason, Policy};
pub use endpoints::{Endpoint, EndpointEvent};
pub use error::{CoreError, Result};
pub use group::{
    AckToken, ConsumeMode, Consumer, CreditPool, Delivery, Drain, GroupInfo, GroupSpec, Left,
    MemberInfo, MemberOptions, OnFailure, QueueInfo, RemoteControl, StartPosition,
};
pub use locate::{Located, ShardEvent};
pub use login::{LoginThrottle, LoginThrottleConfig};
pub use pipeline::Pipeline;
pub use publish::{Delay, Publish, Published};
pub use publish::{Destination, Outgoing, PublishBatch, Records, Submitted, TopicList};
pub use retained::{Retained, RetainedCursor, RetainedStats};
pub use router::Router;
pub use runs::{LiveRuns, Run};
pub use topics::ProducerStat;
pub use views::{Gathered, TopicView, RELAYED_READ_BYTES};

/// One client connection, as the admin API lists it (every protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// Its id within its protocol (AMQP: a number; MQTT: the client id).
    pub id: String,
    /// `amqp` or `mqtt`.
    pub protocol: &'static str,
    /// The peer's address.
    pub peer: String,
    /// The user it logged in as.
    pub user: Option<String>,
    /// AMQP: the vhost; MQTT: the protocol version.
    pub detail: String,
    /// When it connected (ms since the epoch).
    pub connected_at: mqgate_store::Millis,
    /// What the client said about itself: AMQP's client properties with text values
    /// (product, version, platform, connection_name...), in the order sent.
    pub client: Box<[(String, String)]>,
}

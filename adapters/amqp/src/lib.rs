//! mqgate's AMQP 0-9-1 adapter: existing AMQP clients (lapin, pika, the RabbitMQ Java,
//! .NET and Go clients) connect unchanged and get RabbitMQ's behaviour over the core's
//! log model. Frames go through `amq-protocol` (the codec lapin uses) with mqgate's own
//! framing ([`frame`]); queues are core topics consumed by core groups ([`queue`]).

pub mod config;
mod conn;
pub mod convert;
pub mod direct;
pub mod queue;
mod server;

pub use mqgate_amqp_codec::{depth, frame, reply};

pub use config::{AmqpConfig, Permission, RetryPolicy};
pub use direct::{Direct, DirectError, GetAck, GotMessage};
pub use server::{AmqpServer, AmqpStats, ConsumerView, QueueView};

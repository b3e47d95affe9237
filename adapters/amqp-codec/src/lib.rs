//! AMQP 0-9-1 framing for mqgate, with no broker dependencies (so it can be fuzzed on
//! its own): [`frame`] reads and writes frames over `amq-protocol`'s method and property
//! codecs; [`reply`] holds the reply codes. Re-exports `amq-protocol` as [`amq`].

pub use amq_protocol as amq;

pub mod depth;
pub mod frame;
pub mod reply;

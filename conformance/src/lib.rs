//! Shared harness of the conformance suites (see conformance/README.md).
pub mod amqp;
pub mod mqtt;

//! Shared harness of the conformance suites (see conformance/README.md).
pub mod mqtt;

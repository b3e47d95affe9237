//! Shared harness of the conformance suites (see conformance/README.md).
pub mod amqp;
pub mod mqtt;

/// One test module per scenario, running it once on each backend: `scenario!(a, b)` makes
/// `a::memory`, `a::rocks`, `b::memory`, `b::rocks`, each calling `a(Backend)` on a
/// two-thread runtime.
#[macro_export]
macro_rules! scenario {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name($crate::mqtt::Backend::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rocks() {
                super::$name($crate::mqtt::Backend::Rocks).await
            }
        }
    )*};
}

/// [`scenario!`] plus a third variant, `jetstream`, on the replicated backend (a 3-node
/// NATS cluster shared by the test process): for the protocol suites.
#[macro_export]
macro_rules! scenario_replicated {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() {
                super::$name($crate::mqtt::Backend::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rocks() {
                super::$name($crate::mqtt::Backend::Rocks).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jetstream() {
                super::$name($crate::mqtt::Backend::JetStream).await
            }
        }
    )*};
}

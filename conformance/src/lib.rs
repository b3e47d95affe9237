//! Shared harness of the conformance suites (see conformance/README.md).
pub mod amqp;
pub mod cluster;
pub mod mqtt;
pub mod watchdog;

/// One test module per scenario, running it once on each backend: `scenario!(a, b)` makes
/// `a::memory`, `a::rocks`, `b::memory`, `b::rocks`, each calling `a(Backend)` on a
/// two-thread runtime, bounded by [`watchdog::LIMIT`].
#[macro_export]
macro_rules! scenario {
    ($($name:ident),* $(,)?) => {
        $crate::scenario_on!([memory = Memory, rocks = Rocks] $($name),*);
    };
}

/// [`scenario!`] plus the variants `jetstream`, on the replicated backend (a 3-node
/// NATS cluster shared by the test process), and `shards`, a broker over 8 shards in
/// one process: for the protocol suites.
#[macro_export]
macro_rules! scenario_replicated {
    ($($name:ident),* $(,)?) => {
        $crate::scenario_on!([memory = Memory, rocks = Rocks, jetstream = JetStream, shards = Shards] $($name),*);
    };
}

/// [`scenario_replicated!`] plus the variant `cluster`: three gateways of one sharded
/// cluster, clients spread over them (`cluster.rs`; standard scenarios, the others
/// skip it).
#[macro_export]
macro_rules! scenario_clustered {
    ($($name:ident),* $(,)?) => {
        $crate::scenario_on!([memory = Memory, rocks = Rocks, jetstream = JetStream, shards = Shards, cluster = Cluster] $($name),*);
    };
}

/// `scenario_on!([variant = Backend, ...] a, b)`: a module per scenario, a test per
/// variant.
#[doc(hidden)]
#[macro_export]
macro_rules! scenario_on {
    ($variants:tt $($name:ident),* $(,)?) => {$(
        $crate::scenario_module!($name $variants);
    )*};
}

#[doc(hidden)]
#[macro_export]
macro_rules! scenario_module {
    ($name:ident [$($variant:ident = $backend:ident),*]) => {
        mod $name {
            $(
                #[test]
                fn $variant() {
                    // Declared first, dropped last: the runtime's shutdown is watched too.
                    let _watch = $crate::watchdog::watch(concat!(
                        module_path!(),
                        "::",
                        stringify!($variant)
                    ));
                    tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("a test runtime")
                        .block_on(super::$name($crate::mqtt::Backend::$backend))
                }
            )*
        }
    };
}

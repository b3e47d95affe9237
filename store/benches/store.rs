//! Store benchmarks: the append hot path (concurrent producers, group commit) and
//! sequential queue reads, on both backends.
//!
//! `cargo bench -p mqgate-store --bench store` (release build of RocksDB: slow the first
//! time). Filter with criterion's usual argument, e.g. `-- append/rocks_every_batch`.
//!
//! - `append/<backend>/<body>`: 8 producer tasks on a 2-worker multi-thread runtime,
//!   each writing batches of 64 messages into a topic with 8 queues (producer `p`
//!   writes queue `p`). One iteration is one round of 8 batches: 512 messages.
//!   Backends: `memory`, `rocks_every_batch` (fsync per group commit) and
//!   `rocks_periodic_100ms`. Each Rocks variant gets a fresh data folder (which keeps
//!   growing over its samples, as a broker's would); the memory store is fresh for
//!   every sample (it would otherwise hold gigabytes).
//! - `read/<variant>`: read one pre-filled queue (200k messages of 128 B) from start
//!   to end in `ReadLimits::count(256)` batches, wrapping around. One iteration is one
//!   read call of 256 messages. `rocks_tail` is read right after filling, with a tail
//!   cache that holds the whole queue; `rocks_cold` reopens the same folder with
//!   `tail_cache_bytes = 0`, so every message is fetched from RocksDB and decoded
//!   (RocksDB's own block cache is still warm: this is "not in the decoded tail
//!   cache", not "from disk").
//! - `crc32c/<bytes>`: the CRC-32C every WAL record pays (`mqgate_store::crc32c::extend`,
//!   which the `mqgate` binary puts under RocksDB): a 128 B, a 4 KiB and a 32 KiB
//!   record (a WAL block's most).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mqgate_store::{
    FsyncPolicy, MemoryStore, Message, QueueOffset, QueueRef, ReadLimits, RocksConfig, RocksStore,
    Store, TopicName, WriteBatch,
};
use tokio::runtime::Runtime;

const PRODUCERS: usize = 8;
const QUEUES: u32 = 8;
const BATCH: usize = 64;
/// Messages per `append` iteration: one batch from each producer.
const PER_ITER: u64 = (PRODUCERS * BATCH) as u64;

const READ_FILL: u64 = 200_000;
const READ_BODY: usize = 128;
const READ_BATCH: usize = 256;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn body(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i * 31 + 7) as u8).collect::<Vec<u8>>())
}

fn rocks_config(dir: &std::path::Path, fsync: FsyncPolicy) -> RocksConfig {
    let mut c = RocksConfig::new(dir);
    c.fsync = fsync;
    c
}

/// `iters` rounds of one 64-message batch from each of the 8 producers, concurrently.
async fn append_round(
    store: Arc<dyn Store>,
    topic: TopicName,
    body: Bytes,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(PRODUCERS);
    for p in 0..PRODUCERS {
        let store = Arc::clone(&store);
        let queue = QueueRef::new(topic.clone(), p as u32 % QUEUES);
        let topic = topic.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..iters {
                let mut batch = WriteBatch::new();
                batch.ops.reserve(BATCH);
                for _ in 0..BATCH {
                    batch.append(
                        Message::new(topic.clone(), body.clone()),
                        vec![queue.clone()],
                    );
                }
                let receipt = store.write(batch).await.expect("append");
                black_box(receipt);
            }
        }));
    }
    for t in tasks {
        t.await.expect("producer task");
    }
    start.elapsed()
}

fn bench_append(c: &mut Criterion) {
    let rt = runtime();
    let topic = TopicName::new("bench").expect("topic");
    let mut group = c.benchmark_group("append");
    group.throughput(Throughput::Elements(PER_ITER));

    for size in [128usize, 4096] {
        let body = body(size);
        let label = format!("{size}B");

        // A fresh store per sample: the memory store keeps everything, so one store for
        // the whole run would grow by gigabytes. Creating and dropping it is not timed.
        group.bench_function(BenchmarkId::new("memory", &label), |b| {
            b.iter_custom(|iters| {
                let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
                rt.block_on(store.create_topic(&topic, QUEUES))
                    .expect("create topic");
                let took = rt.block_on(append_round(
                    Arc::clone(&store),
                    topic.clone(),
                    body.clone(),
                    iters,
                ));
                drop(store);
                took
            });
        });

        for (name, fsync) in [
            ("rocks_every_batch", FsyncPolicy::EveryBatch),
            (
                "rocks_periodic_100ms",
                FsyncPolicy::Periodic {
                    interval: Duration::from_millis(100),
                },
            ),
        ] {
            let dir = tempfile::tempdir().expect("tempdir");
            let store: Arc<dyn Store> =
                Arc::new(RocksStore::open(rocks_config(dir.path(), fsync)).expect("open rocks"));
            rt.block_on(store.create_topic(&topic, QUEUES))
                .expect("create topic");
            group.bench_function(BenchmarkId::new(name, &label), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(append_round(
                        Arc::clone(&store),
                        topic.clone(),
                        body.clone(),
                        iters,
                    ))
                });
            });
            drop(store); // joins the writer before the folder goes
            drop(dir);
        }
    }
    group.finish();
}

/// Fill queue 0 of `topic` with [`READ_FILL`] messages.
async fn fill(store: &dyn Store, topic: &TopicName) {
    store.create_topic(topic, 1).await.expect("create topic");
    let queue = QueueRef::new(topic.clone(), 0);
    let body = body(READ_BODY);
    let mut written = 0;
    while written < READ_FILL {
        let n = 1024.min(READ_FILL - written);
        let mut batch = WriteBatch::new();
        for _ in 0..n {
            batch.append(
                Message::new(topic.clone(), body.clone()),
                vec![queue.clone()],
            );
        }
        store.write(batch).await.expect("fill");
        written += n;
    }
    store.flush().await.expect("flush");
}

/// Read `iters` batches of [`READ_BATCH`] sequentially from `*cursor`, wrapping at the end.
async fn read_batches(
    store: &dyn Store,
    queue: &QueueRef,
    cursor: &mut u64,
    iters: u64,
) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        let got = store
            .read(queue, QueueOffset(*cursor), ReadLimits::count(READ_BATCH))
            .await
            .expect("read");
        *cursor = match got.last() {
            Some(m) if m.entry.offset.0 + 1 < READ_FILL => m.entry.offset.0 + 1,
            _ => 0,
        };
        black_box(got);
    }
    start.elapsed()
}

fn bench_read_one(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    rt: &Runtime,
    name: &str,
    store: &dyn Store,
    topic: &TopicName,
) {
    let queue = QueueRef::new(topic.clone(), 0);
    assert_eq!(store.queue_range(&queue).expect("range").next.0, READ_FILL);
    let mut cursor = 0u64;
    group.bench_function(name, |b| {
        b.iter_custom(|iters| rt.block_on(read_batches(store, &queue, &mut cursor, iters)));
    });
}

fn bench_read(c: &mut Criterion) {
    let rt = runtime();
    let topic = TopicName::new("bench-read").expect("topic");
    let mut group = c.benchmark_group("read");
    group.throughput(Throughput::Elements(READ_BATCH as u64));

    {
        let store = MemoryStore::new();
        rt.block_on(fill(&store, &topic));
        bench_read_one(&mut group, &rt, "memory", &store, &topic);
    }

    let dir = tempfile::tempdir().expect("tempdir");
    let periodic = FsyncPolicy::Periodic {
        interval: Duration::from_millis(100),
    };
    {
        // A tail cache that holds the whole queue (~40 MB of records).
        let mut config = rocks_config(dir.path(), periodic);
        config.tail_cache_bytes = 256 << 20;
        let store = RocksStore::open(config).expect("open rocks");
        rt.block_on(fill(&store, &topic));
        bench_read_one(&mut group, &rt, "rocks_tail", &store, &topic);
    }
    {
        // Same data, reopened with no tail cache: every message comes from RocksDB.
        let mut config = rocks_config(dir.path(), periodic);
        config.tail_cache_bytes = 0;
        let store = RocksStore::open(config).expect("reopen rocks");
        bench_read_one(&mut group, &rt, "rocks_cold", &store, &topic);
    }
    group.finish();
}

fn bench_crc(c: &mut Criterion) {
    let mut group = c.benchmark_group("crc32c");
    for len in [128usize, 4096, 32 << 10] {
        let data = body(len);
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(len), &data, |b, d| {
            b.iter(|| mqgate_store::crc32c::extend(0, black_box(d)))
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_append, bench_read, bench_crc
}
criterion_main!(benches);

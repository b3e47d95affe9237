//! A consumer's read that needs the table files (the messages are no longer in the
//! memtables or the block cache) is retried off the async worker, on tokio's blocking
//! pool, and returns the same messages in the same order as any other read; reads the
//! store's memory can answer are not counted as cold.

mod common;
use common::body;
use std::path::Path;
use std::time::{Duration, Instant};

use mqgate_store::{
    Message, MessageId, QueueOffset, QueueRef, ReadLimits, RocksConfig, RocksStore, Store,
    TopicName, WriteBatch,
};

const MESSAGES: u64 = 3000;
const LEN: usize = 1024;

fn config(dir: &Path) -> RocksConfig {
    let mut c = RocksConfig::new(dir);
    // Every message read goes to RocksDB (no tail cache), which flushes often and
    // caches little.
    c.tail_cache_bytes = 0;
    c.write_buffer_bytes = 1 << 20;
    c.block_cache_bytes = 1 << 20;
    c
}

/// Every message of the queue, in order, against what was written.
async fn read_all(store: &RocksStore, q: &QueueRef) {
    let mut at = QueueOffset(0);
    let mut seen = 0u64;
    while seen < MESSAGES {
        let read = store
            .read(q, at, ReadLimits::count(200))
            .await
            .expect("read");
        assert!(!read.is_empty(), "nothing read at {at:?}");
        for m in &read {
            assert_eq!(m.entry.offset.0, seen, "in order, no gap");
            assert_eq!(m.message.message.body, body(seen, LEN), "message {seen}");
            seen += 1;
        }
        at = QueueOffset(seen);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn reads_from_the_files_run_off_the_worker_and_return_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let t = TopicName::new("cold").unwrap();
    let q = QueueRef::new(t.clone(), 0);
    let mut ids = Vec::new();
    {
        let store = RocksStore::open(config(&data)).expect("open");
        store.create_topic(&t, 1).await.unwrap();
        for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(100) {
            let mut b = WriteBatch::new();
            for &i in chunk {
                b.append(Message::new(t.clone(), body(i, LEN)), vec![q.clone()]);
            }
            let receipt = store.write(b).await.expect("write");
            ids.extend(receipt.appended.iter().map(|a| a.id));
        }
        // RocksDB flushes in the background once the memtables pass their budget: wait
        // until the first messages are in a table file.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_dir(&data)
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".sst"))
        {
            assert!(Instant::now() < deadline, "no table file after 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // Reopened: the block cache is empty, so the first reads need the table files.
    let store = RocksStore::open(config(&data)).expect("reopen");
    assert_eq!(store.stats().cold_reads, 0);
    read_all(&store, &q).await;
    let cold = store.stats().cold_reads;
    assert!(cold > 0, "the old messages came from the table files");
    // A message by id, from wherever it is.
    let first: MessageId = ids[0];
    let m = store.message(first).await.expect("message").expect("kept");
    assert_eq!(m.message.body, body(0, LEN));

    // What the store holds in memory is read on the worker: a message written now (in
    // the memtable) is read without a cold read.
    let mut b = WriteBatch::new();
    b.append(
        Message::new(t.clone(), body(MESSAGES, LEN)),
        vec![q.clone()],
    );
    store.write(b).await.expect("write");
    let before = store.stats().cold_reads;
    let read = store
        .read(&q, QueueOffset(MESSAGES), ReadLimits::count(10))
        .await
        .expect("read");
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].message.message.body, body(MESSAGES, LEN));
    assert_eq!(
        store.stats().cold_reads,
        before,
        "a memtable read is not cold"
    );
}

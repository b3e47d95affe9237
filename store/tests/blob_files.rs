//! Large messages in RocksDB's blob files (`RocksConfig::blob_min_bytes`): flushed out
//! of the table files, read back the same before and after a restart, mixed with small
//! ones that stay inline, and gone from the disk once retention trims them.

mod common;
use common::body;
use std::path::Path;
use std::time::{Duration, Instant};

use mqgate_store::{
    Message, QueueOffset, QueueRef, ReadLimits, Retention, RocksConfig, RocksStore, Store,
    TopicName, WriteBatch,
};

/// Message `i`: 4 KiB, except every fifth, which is 100 bytes (below the threshold).
fn len_of(i: u64) -> usize {
    if i.is_multiple_of(5) {
        100
    } else {
        4096
    }
}

/// (count, total bytes) of the blob files in `dir`.
fn blob_files(dir: &Path) -> (usize, u64) {
    std::fs::read_dir(dir)
        .expect("read the data folder")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".blob"))
        .fold((0, 0), |(n, b), e| {
            (n + 1, b + e.metadata().map(|m| m.len()).unwrap_or(0))
        })
}

fn config(dir: &Path, retention: Retention) -> RocksConfig {
    let mut c = RocksConfig::new(dir);
    // Small memtables: RocksDB flushes several times while the test writes.
    c.write_buffer_bytes = 2 << 20;
    c.blob_min_bytes = 1024;
    c.retention = retention;
    c
}

const QUEUES: u32 = 4;
const MESSAGES: u64 = 4000;

/// Every message of every queue, in order, against what was written.
async fn check_all(store: &RocksStore, t: &TopicName, from: u64) {
    let mut seen = 0u64;
    for queue in 0..QUEUES {
        let q = QueueRef::new(t.clone(), queue);
        let range = store.queue_range(&q).expect("range");
        let mut at = range.min;
        while at < range.next {
            let read = store
                .read(&q, at, ReadLimits::count(500))
                .await
                .expect("read");
            assert!(!read.is_empty(), "queue {queue} at {at:?}: nothing read");
            for m in &read {
                // Message i went to queue i % QUEUES at offset i / QUEUES.
                let i = m.entry.offset.0 * u64::from(QUEUES) + u64::from(queue);
                assert!(i >= from, "message {i} should have been trimmed");
                assert_eq!(
                    m.message.message.body,
                    body(i, len_of(i)),
                    "message {i}'s body"
                );
                seen += 1;
            }
            at = QueueOffset(read.last().expect("one").entry.offset.0 + 1);
        }
    }
    assert_eq!(seen, MESSAGES - from, "every message from {from} on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_live_in_blob_files_and_go_with_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let t = TopicName::new("blobs").unwrap();
    {
        let store = RocksStore::open(config(&data, Retention::default())).expect("open");
        store.create_topic(&t, QUEUES).await.unwrap();
        for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(50) {
            let mut b = WriteBatch::new();
            for &i in chunk {
                b.append(
                    Message::new(t.clone(), body(i, len_of(i))),
                    vec![QueueRef::new(t.clone(), (i % u64::from(QUEUES)) as u32)],
                );
            }
            store.write(b).await.expect("write");
        }
        // RocksDB flushes in the background once the memtables pass their budget.
        let deadline = Instant::now() + Duration::from_secs(30);
        while blob_files(&data).0 == 0 {
            assert!(Instant::now() < deadline, "no blob file after 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        check_all(&store, &t, 0).await;
    }

    // After a restart (the WAL's tail is flushed too): everything, from blob files and
    // table files alike.
    let (files, bytes) = blob_files(&data);
    assert!(
        bytes > MESSAGES * 4096 / 2,
        "most bodies are in blob files: {files} files, {bytes} bytes"
    );
    let keep = 10 * 4200;
    let store = RocksStore::open(config(
        &data,
        Retention {
            max_age: None,
            max_bytes: Some(keep),
        },
    ))
    .expect("reopen");
    check_all(&store, &t, 0).await;

    // Retention keeps the newest ~10 messages; the blob files of the rest go away.
    let report = store
        .enforce_retention(mqgate_store::now_millis())
        .await
        .expect("retention");
    assert!(report.messages_deleted >= MESSAGES - 20, "{report:?}");
    let from = MESSAGES - store.stats().messages;
    check_all(&store, &t, from).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (files_now, bytes_now) = blob_files(&data);
        if bytes_now < bytes / 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "blob files not removed after retention: {files_now} files, {bytes_now} bytes \
             (before: {files} files, {bytes} bytes)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(store);
    let store = RocksStore::open(config(&data, Retention::default())).expect("reopen");
    check_all(&store, &t, from).await;
}

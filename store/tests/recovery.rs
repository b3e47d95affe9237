//! [`RocksStore`] after a full disk: writes fail and the store says it is degraded; once
//! space is freed it resumes by itself, without a restart, and everything it
//! acknowledged (before and after) is there.
//!
//! The data folder is a small tmpfs the test mounts (tests run as root here and in CI);
//! where mounting is not allowed the test prints `skipped: ...` and passes. The mount is
//! undone by a guard, even when the test fails.

mod common;
use common::body;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mqgate_store::{
    Message, QueueOffset, QueueRef, ReadLimits, RocksConfig, RocksStore, Store, TopicName,
    WriteBatch,
};

/// A tmpfs mounted on a temporary folder; unmounted (lazily) when dropped.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Self {
            path: dir.path().to_path_buf(),
            _dir: dir,
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

async fn put(store: &RocksStore, q: &QueueRef, seed: u64, len: usize) -> Result<u64, String> {
    let mut b = WriteBatch::new();
    b.append(
        Message::new(q.topic.clone(), body(seed, len)),
        vec![q.clone()],
    );
    let r = store.write(b).await.map_err(|e| e.to_string())?;
    Ok(r.appended[0].offsets[0].1 .0)
}

fn fill(path: &Path, bytes: usize) {
    std::fs::write(path, vec![0x5a; bytes]).expect("write the filler file");
}

/// Small memtables: RocksDB flushes while the disk fills, and the flush is what hits
/// the full disk (a background error: every later write fails with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_in_a_flush_degrades_the_store_and_freed_space_resumes_writes() {
    full_disk_round("32m", 8 << 20, Some(4 << 20)).await;
}

/// Default memtables: the WAL append is what hits the full disk. Enough is freed for
/// RocksDB to replay and flush the WAL when the handle is reopened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_full_in_a_wal_append_degrades_the_store_and_freed_space_resumes_writes() {
    full_disk_round("40m", 24 << 20, None).await;
}

/// Fill a tmpfs of `size` holding a `filler` file of that many bytes until a write
/// fails, check the store is degraded, remove the filler, and check it resumes and
/// lost nothing it acknowledged.
async fn full_disk_round(size: &str, filler_bytes: usize, write_buffer: Option<usize>) {
    let fs = match Tmpfs::mount(size) {
        Ok(fs) => fs,
        Err(e) => {
            println!("skipped: cannot mount a tmpfs ({e})");
            return;
        }
    };
    let filler = fs.path.join("filler");
    fill(&filler, filler_bytes);
    let config = || {
        let mut c = RocksConfig::new(fs.path.join("db"));
        if let Some(w) = write_buffer {
            c.write_buffer_bytes = w;
        }
        c
    };
    let store = RocksStore::open(config()).expect("open");
    assert!(store.health().is_ok(), "healthy at open");
    let t = TopicName::new("full").unwrap();
    store.create_topic(&t, 1).await.unwrap();
    let q = QueueRef::new(t.clone(), 0);

    // Write until the disk is full.
    let mut acked: Vec<(u64, u64, usize)> = Vec::new(); // (offset, seed, len)
    let mut seed = 0u64;
    let err = loop {
        seed += 1;
        match put(&store, &q, seed, 16 << 10).await {
            Ok(off) => acked.push((off, seed, 16 << 10)),
            Err(e) => break e,
        }
        assert!(seed < 5_000, "the disk never filled up");
    };
    println!("{} writes acknowledged, then: {err}", acked.len());
    assert!(!acked.is_empty());

    // Degraded, with the reason; writes keep failing while the disk is full.
    let h = store.health();
    let d = h.degraded.clone().expect("degraded after a failed write");
    assert!(h.errors >= 1);
    println!("degraded: {} (since {})", d.reason, d.since);
    tokio::time::sleep(Duration::from_millis(700)).await;
    seed += 1;
    assert!(
        put(&store, &q, seed, 100).await.is_err(),
        "a write succeeded on a full disk"
    );
    assert!(store.health().degraded.is_some(), "still degraded");

    // Reads keep working meanwhile.
    let first = store
        .read(&q, QueueOffset(0), ReadLimits::count(1))
        .await
        .expect("reads work while degraded");
    assert_eq!(first.len(), 1);

    // Free the space: writes work again within a few seconds, without reopening.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let off = loop {
        seed += 1;
        match put(&store, &q, seed, 16 << 10).await {
            Ok(off) => break off,
            Err(e) => {
                assert!(
                    freed.elapsed() < Duration::from_secs(10),
                    "still failing 10 s after space was freed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    println!("writes resumed {:?} after space was freed", freed.elapsed());
    acked.push((off, seed, 16 << 10));
    for _ in 0..20 {
        seed += 1;
        let off = put(&store, &q, seed, 16 << 10)
            .await
            .expect("write after recovery");
        acked.push((off, seed, 16 << 10));
    }
    let h = store.health();
    assert!(h.is_ok(), "healthy after recovery: {h:?}");
    let last = h.last_degraded.expect("the degraded period is remembered");
    assert_eq!(last.reason, d.reason);
    assert_eq!(last.since, d.since);
    assert!(last.until.is_some_and(|u| u >= last.since));

    // Every acknowledged write is readable, at its offset, intact.
    let mut found = std::collections::HashMap::new();
    let mut from = 0u64;
    loop {
        let page = store
            .read(&q, QueueOffset(from), ReadLimits::count(256))
            .await
            .unwrap();
        let Some(l) = page.last() else { break };
        from = l.entry.offset.0 + 1;
        for m in page {
            found.insert(m.entry.offset.0, m.message.message.body.clone());
        }
    }
    for (off, seed, len) in &acked {
        let got = found
            .get(off)
            .unwrap_or_else(|| panic!("acknowledged offset {off} is gone"));
        assert_eq!(got, &body(*seed, *len), "offset {off} changed");
    }
    // Offsets keep increasing; none was given twice.
    let mut offs: Vec<u64> = acked.iter().map(|a| a.0).collect();
    let n = offs.len();
    offs.dedup();
    assert_eq!(offs.len(), n);
    assert!(acked.windows(2).all(|w| w[0].0 < w[1].0));

    // And all of it survives a restart.
    drop(store);
    let store = RocksStore::open(config()).expect("reopen");
    for (off, seed, len) in acked.iter().rev().take(30) {
        let m = store
            .read(&q, QueueOffset(*off), ReadLimits::count(1))
            .await
            .unwrap();
        assert_eq!(m[0].entry.offset.0, *off);
        assert_eq!(m[0].message.message.body, body(*seed, *len));
    }
    drop(store);
}

//! Reads at a queue's tail are served from memory (`rocks/read.rs`, `Recent`) once a
//! reader has caught up; they must return exactly what a read of RocksDB returns. Three
//! readers (one keeping up, one a little behind, one replaying from earlier offsets)
//! read two queues while a writer appends groups of every size, some to both queues,
//! some more than the in-memory run holds, and retention truncates the queues' starts.
//! Every read is checked against what was appended: offsets in order from the reader's
//! position (raised to the queue's start), the right bodies, within its limits, and
//! stopped only by a limit or the queue's end. Then the store is reopened (nothing in
//! memory) and every queue read again whole.

mod common;
use common::body;

use mqgate_store::{
    Message, QueueOffset, QueueRef, ReadLimits, RocksConfig, RocksStore, Store, TopicName,
    WriteBatch,
};

/// A small deterministic generator (xorshift), so a failure replays.
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

async fn check_read(
    store: &RocksStore,
    queue: &QueueRef,
    from: u64,
    limits: ReadLimits,
    bodies: &[bytes::Bytes],
) -> u64 {
    let got = store
        .read(queue, QueueOffset(from), limits)
        .await
        .expect("read");
    let range = store.queue_range(queue).expect("range");
    let start = from.max(range.min.0);
    let mut bytes = 0usize;
    for (i, m) in got.iter().enumerate() {
        let offset = start + i as u64;
        assert_eq!(
            m.entry.offset.0, offset,
            "{queue:?} read from {from}: in order"
        );
        assert_eq!(
            m.message.message.body, bodies[offset as usize],
            "{queue:?} offset {offset}"
        );
        bytes += m.entry.size as usize;
    }
    assert!(got.len() <= limits.max_count, "count limit");
    if got.len() > 1 {
        assert!(bytes <= limits.max_bytes, "byte limit");
    }
    let end = start + got.len() as u64;
    let appended = bodies.len() as u64;
    if limits.max_bytes == usize::MAX && got.len() < limits.max_count {
        assert_eq!(
            end,
            appended.max(start),
            "{queue:?} read from {from} stopped short of the end"
        );
    }
    end
}

#[tokio::test(flavor = "current_thread")]
async fn reads_at_the_tail_from_memory_match_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let t = TopicName::new("tail").unwrap();
    let queues = [QueueRef::new(t.clone(), 0), QueueRef::new(t.clone(), 1)];
    // What each queue holds, by offset.
    let mut bodies: [Vec<bytes::Bytes>; 2] = [Vec::new(), Vec::new()];
    let mut seq = 0u64;
    {
        let store = RocksStore::open(RocksConfig::new(&data)).expect("open");
        store.create_topic(&t, 2).await.unwrap();
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        // Per queue: the reader at the tail, one behind, one replaying.
        let mut cursors = [[0u64; 3]; 2];
        for step in 0..3000 {
            match rng.next(10) {
                // Append a group: mostly small, sometimes more than the run keeps;
                // a quarter of them one record into both queues.
                0..=4 => {
                    let n = if rng.next(20) == 0 {
                        300
                    } else {
                        1 + rng.next(12)
                    };
                    let both = rng.next(4) == 0;
                    let q = rng.next(2) as usize;
                    let mut b = WriteBatch::new();
                    for _ in 0..n {
                        seq += 1;
                        let body = body(seq, 16 + (seq % 7) as usize * 40);
                        let to: Vec<usize> = if both { vec![0, 1] } else { vec![q] };
                        for &i in &to {
                            bodies[i].push(body.clone());
                        }
                        b.append(
                            Message::new(t.clone(), body),
                            to.iter().map(|&i| queues[i].clone()).collect::<Vec<_>>(),
                        );
                    }
                    store.write(b).await.expect("write");
                }
                // Retention: a queue's start moves up (to about where its slower
                // reader is, as a group's commits would have it).
                5 if step % 7 == 0 => {
                    let q = rng.next(2) as usize;
                    let below = cursors[q][1].saturating_sub(rng.next(50));
                    let mut b = WriteBatch::new();
                    b.truncate(queues[q].clone(), QueueOffset(below));
                    store.write(b).await.expect("truncate");
                }
                // A read by one of the readers.
                _ => {
                    let q = rng.next(2) as usize;
                    let r = rng.next(3) as usize;
                    let limits = ReadLimits {
                        max_count: 1 + rng.next(64) as usize,
                        max_bytes: if rng.next(3) == 0 {
                            1 + rng.next(2000) as usize
                        } else {
                            usize::MAX
                        },
                    };
                    let from = match r {
                        2 if rng.next(4) == 0 => rng.next(bodies[q].len() as u64 + 1),
                        _ => cursors[q][r],
                    };
                    let end = check_read(&store, &queues[q], from, limits, &bodies[q]).await;
                    cursors[q][r] = end.max(from);
                }
            }
        }
        // Every queue to its end, from where each reader stands.
        for (q, queue) in queues.iter().enumerate() {
            for &cursor in &cursors[q] {
                let mut at = cursor;
                while at < bodies[q].len() as u64 {
                    at = check_read(&store, queue, at, ReadLimits::count(100), &bodies[q]).await;
                }
            }
        }
    }
    // Reopened: nothing in memory, every offset from the files.
    let store = RocksStore::open(RocksConfig::new(&data)).expect("reopen");
    for (q, queue) in queues.iter().enumerate() {
        let mut at = store.queue_range(queue).unwrap().min.0;
        while at < bodies[q].len() as u64 {
            at = check_read(&store, queue, at, ReadLimits::count(500), &bodies[q]).await;
        }
    }
}

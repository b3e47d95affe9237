//! Crash test for [`RocksStore`]: a child process appends under `FsyncPolicy::EveryBatch`
//! and reports every acknowledged message on stdout; the parent SIGKILLs it at a random
//! moment, reopens the store and checks that every acknowledged message survived, intact
//! and where the receipt said it was.
//!
//! Self re-exec: [`crash_child`] is `#[ignore]`d and does nothing unless
//! `MQGATE_CRASH_DIR` is set; [`crash_rounds`] runs this same test binary again with
//! libtest's arguments (`--ignored --exact crash_child`), which works under both
//! `cargo test` and `cargo nextest run`.
//!
//! Child protocol (stdout, one line each, `\n`-terminated):
//! - `READY` once the store is open and the topic exists;
//! - `DURABLE <queue> <offset> <seq> <body_len>` for each message of a batch, after
//!   `Store::write` returned `Ok` for that batch.
//!
//! A sequence number is `round << 48 | task << 40 | counter`: unique across rounds and
//! increasing per writer task. A message's body starts with its seq (u64 LE) and the
//! rest is derived from the seq, so any message found in the store can be checked on
//! its own. Its key names its batch (`b<first seq hex>n<len>`), which lets the parent
//! check that every batch is in the store whole or not at all.
//!
//! Odd rounds write under a 1 MiB memtable budget, so the WAL switches files many times
//! and flushed WAL files are reused (their old records still in them) when the kill lands.
//!
//! Rounds: at least 6 (default 8) against one data folder; every fourth round kills the
//! child 0..150 ms after spawn (usually while it opens and recovers the store), the
//! others 150..=900 ms after it printed `READY`. After each round the parent checks
//! every queue in full (dense from 0, bodies intact, per-task order, whole batches,
//! header counters, key index on a sample), every acknowledged message of every round
//! against that scan, and reads this round's acknowledged messages (and a sample of the
//! earlier ones) one by one at their offsets.
//!
//! Knobs (parent): `MQGATE_CRASH_ROUNDS` (default 8, at least 6), `MQGATE_CRASH_SEED`
//! (the kill delays), `MQGATE_CRASH_FULL_READS=1` (re-read every acknowledged message of
//! every round one by one, not a sample).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use mqgate_store::{
    FsyncPolicy, Message, QueueOffset, QueueRef, ReadLimits, RocksConfig, RocksStore, Store,
    TopicName, WriteBatch,
};

const DIR_VAR: &str = "MQGATE_CRASH_DIR";
const ROUND_VAR: &str = "MQGATE_CRASH_ROUND";
const TOPIC: &str = "crash";
const QUEUES: u32 = 4;
const WRITERS: u64 = 4;
/// A child that is never killed stops by itself after this long.
const CHILD_MAX_RUN: Duration = Duration::from_secs(120);
/// How long the parent waits for a child's `READY`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// About how many messages acknowledged in earlier rounds are re-read one by one.
const OLD_READ_SAMPLE: u64 = 2000;

// ---------------------------------------------------------------------------------------
// Deterministic data

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn make_seq(round: u64, task: u64, counter: u64) -> u64 {
    (round << 48) | (task << 40) | counter
}

fn seq_round(seq: u64) -> u64 {
    seq >> 48
}

fn seq_task(seq: u64) -> u64 {
    (seq >> 40) & 0xFF
}

fn seq_queue(seq: u64) -> u32 {
    (seq % u64::from(QUEUES)) as u32
}

/// 128..=2048 bytes.
fn body_len(seq: u64) -> usize {
    128 + (splitmix64(seq ^ 0xB0D1_1E55) % 1921) as usize
}

fn body(seq: u64) -> Vec<u8> {
    let len = body_len(seq);
    let mut out = Vec::with_capacity(len + 8);
    out.extend_from_slice(&seq.to_le_bytes());
    let mut state = seq;
    while out.len() < len {
        state = splitmix64(state);
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn batch_key(first_seq: u64, len: u64) -> String {
    format!("b{first_seq:x}n{len}")
}

fn parse_batch_key(key: &str) -> Option<(u64, u64)> {
    let rest = key.strip_prefix('b')?;
    let (first, len) = rest.split_once('n')?;
    Some((u64::from_str_radix(first, 16).ok()?, len.parse().ok()?))
}

fn topic() -> TopicName {
    TopicName::new(TOPIC).expect("valid topic name")
}

/// A small xorshift64* generator: enough randomness for batch sizes and kill times.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> Self {
        Self(splitmix64(seed) | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-ish in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

// ---------------------------------------------------------------------------------------
// Child

/// The child side. Does nothing unless `MQGATE_CRASH_DIR` is set (so `--ignored` runs
/// of the whole suite are harmless); then appends until it is killed.
#[test]
#[ignore = "child process of crash_rounds; does nothing on its own"]
fn crash_child() {
    let Some(dir) = std::env::var_os(DIR_VAR) else {
        return;
    };
    let round: u64 = std::env::var(ROUND_VAR)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    assert!(round < 1 << 15, "round {round} does not fit in the seq");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let mut config = RocksConfig::new(Path::new(&dir));
        assert_eq!(config.fsync, FsyncPolicy::EveryBatch);
        if round % 2 == 1 {
            // Odd rounds: a memtable budget this small flushes every few hundred
            // batches, so the WAL switches files many times a round and RocksDB reuses
            // the flushed ones (`recycle_log_file_num`): the kill lands in a reused file
            // whose old records are still there after the new ones.
            config.write_buffer_bytes = 1 << 20;
        }
        let store = Arc::new(RocksStore::open(config).expect("open store in child"));
        store
            .create_topic(&topic(), QUEUES)
            .await
            .expect("create topic in child");
        // libtest has already written "test crash_child ... " without a newline: start
        // a fresh line so READY is a line of its own.
        emit(&[String::new(), "READY".to_string()]);

        let mut tasks = Vec::new();
        for task in 0..WRITERS {
            let store = Arc::clone(&store);
            tasks.push(tokio::spawn(
                async move { writer(&store, round, task).await },
            ));
        }
        // Never returns in practice: the parent kills us. Stop on our own after a while
        // so a parent that died without killing us does not leave us running forever.
        tokio::time::sleep(CHILD_MAX_RUN).await;
        for t in &tasks {
            assert!(!t.is_finished(), "a writer task stopped early");
        }
        std::process::exit(3);
    });
}

async fn writer(store: &RocksStore, round: u64, task: u64) {
    let topic = topic();
    let mut rng = XorShift::new(make_seq(round, task, 0) ^ 0x5EED);
    let mut counter = 0u64;
    loop {
        let n = rng.range(1, 32);
        let first = make_seq(round, task, counter);
        let key = batch_key(first, n);
        let mut batch = WriteBatch::new();
        for i in 0..n {
            let seq = first + i;
            let mut m = Message::new(topic.clone(), Bytes::from(body(seq)));
            m.keys = vec![key.clone()];
            batch.append(m, vec![QueueRef::new(topic.clone(), seq_queue(seq))]);
        }
        let receipt = match store.write(batch).await {
            Ok(r) => r,
            Err(e) => panic!("write of batch {key} failed: {e}"),
        };
        assert_eq!(receipt.appended.len() as u64, n, "receipt for batch {key}");
        let lines: Vec<String> = receipt
            .appended
            .iter()
            .enumerate()
            .map(|(i, a)| {
                let seq = first + i as u64;
                assert_eq!(a.offsets.len(), 1);
                let (q, offset) = &a.offsets[0];
                assert_eq!(q.queue.0, seq_queue(seq));
                format!(
                    "DURABLE {} {} {} {}",
                    q.queue.0,
                    offset.0,
                    seq,
                    body_len(seq)
                )
            })
            .collect();
        emit(&lines);
        counter += n;
    }
}

/// Write whole lines to stdout and flush, under one lock so lines never interleave.
fn emit(lines: &[String]) {
    let mut out = std::io::stdout().lock();
    for l in lines {
        writeln!(out, "{l}").expect("stdout");
    }
    out.flush().expect("stdout flush");
}

// ---------------------------------------------------------------------------------------
// Parent

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Durable {
    queue: u32,
    offset: u64,
    seq: u64,
    body_len: usize,
}

fn parse_durable(line: &str) -> Option<Durable> {
    let mut f = line.split_ascii_whitespace();
    if f.next()? != "DURABLE" {
        return None;
    }
    let d = Durable {
        queue: f.next()?.parse().ok()?,
        offset: f.next()?.parse().ok()?,
        seq: f.next()?.parse().ok()?,
        body_len: f.next()?.parse().ok()?,
    };
    f.next().is_none().then_some(d)
}

/// Kills the child if the parent panics before it does.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct RoundOutcome {
    durable: Vec<Durable>,
    saw_ready: bool,
    killed_after: Duration,
}

/// Spawn a child for `round`, kill it after `delay` (measured from its `READY`, or from
/// the spawn when `early`), and collect the durable lines it reported.
fn run_child(dir: &Path, round: u64, delay: Duration, early: bool) -> RoundOutcome {
    let exe = std::env::current_exe().expect("current test binary");
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "crash_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env(DIR_VAR, dir)
        .env(ROUND_VAR, round.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let mut guard = KillOnDrop(Some(child));

    // Only complete lines count: a SIGKILL can cut the last one short.
    let (tx, rx) = mpsc::channel::<String>();
    let out_reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) if line.ends_with('\n') => {
                    if tx.send(line.trim_end().to_string()).is_err() {
                        break;
                    }
                }
                Ok(_) => break, // torn last line
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    let mut lines = Vec::new();
    let start = Instant::now();
    let mut saw_ready = false;
    if !early {
        while !saw_ready {
            let left = READY_TIMEOUT.saturating_sub(start.elapsed());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    saw_ready |= l == "READY";
                    lines.push(l);
                }
                Err(_) => break, // timeout, or the child exited: reported below
            }
        }
    }
    let from = Instant::now();
    if saw_ready || early {
        std::thread::sleep(delay);
    }
    let killed_after = from.elapsed();
    let mut child = guard.0.take().expect("child");
    let exited_on_its_own = child.try_wait().expect("try_wait").is_some();
    let _ = child.kill(); // SIGKILL on Unix
    let status = child.wait().expect("wait for child");
    lines.extend(rx.iter());
    out_reader.join().expect("stdout reader");
    let stderr_text = err_reader.join().expect("stderr reader");

    if exited_on_its_own || (!early && !saw_ready) {
        let tail = &lines[lines.len().saturating_sub(40)..];
        panic!(
            "round {round}: child {} before being killed (status {status}); \
             ready: {saw_ready}\n--- child stdout (last {} of {} lines) ---\n{}\n\
             --- child stderr ---\n{stderr_text}",
            if exited_on_its_own {
                "exited"
            } else {
                "never became ready"
            },
            tail.len(),
            lines.len(),
            tail.join("\n"),
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "round {round}: child was not ended by SIGKILL ({status})\n{stderr_text}"
        );
    }
    saw_ready |= lines.iter().any(|l| l == "READY");
    let durable = lines.iter().filter_map(|l| parse_durable(l)).collect();
    RoundOutcome {
        durable,
        saw_ready,
        killed_after,
    }
}

/// What a verification pass saw.
#[derive(Debug, Default)]
struct Verified {
    messages_in_store: u64,
    durable_checked: u64,
    read_one_by_one: u64,
    batches_checked: u64,
}

/// Reopen the store and check it against everything every child reported so far.
/// `reported[new_from..]` came from the child of this round.
fn verify(dir: &Path, reported: &[Durable], new_from: usize, round: u64) -> Verified {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let store = RocksStore::open(RocksConfig::new(dir)).expect("reopen after crash");
        let t = topic();
        let Some(cfg) = store.topic(&t) else {
            assert!(
                reported.is_empty(),
                "round {round}: topic missing but {} messages were acknowledged",
                reported.len()
            );
            return Verified::default();
        };
        assert_eq!(cfg.queue_count, QUEUES, "round {round}: queue count");

        let mut v = Verified::default();
        // (queue, offset) -> seq, for every message in the store.
        let mut at: HashMap<(u32, u64), u64> = HashMap::new();
        let mut seqs: HashSet<u64> = HashSet::new();
        let mut batches: BTreeMap<u64, u64> = BTreeMap::new();
        let mut log_bytes = 0u64;
        for qid in 0..QUEUES {
            let q = QueueRef::new(t.clone(), qid);
            let range = store.queue_range(&q).expect("queue range");
            assert_eq!(
                range.min.0, 0,
                "round {round}: {q} min moved without truncation"
            );
            let mut last_seq_of_task: HashMap<u64, u64> = HashMap::new();
            let mut last_id = None;
            let mut last_ts = 0;
            let mut next = 0u64;
            while next < range.next.0 {
                let got = store
                    .read(&q, QueueOffset(next), ReadLimits::count(256))
                    .await
                    .expect("read");
                assert!(
                    !got.is_empty(),
                    "round {round}: {q}: read at {next} returned nothing below next {}",
                    range.next.0
                );
                for m in got {
                    let off = m.entry.offset.0;
                    assert_eq!(
                        off, next,
                        "round {round}: {q}: offsets not dense (gap at {next})"
                    );
                    next += 1;
                    assert_eq!(
                        m.entry.id, m.message.id,
                        "round {round}: {q}@{off}: entry/message id"
                    );
                    if let Some(prev) = last_id {
                        assert!(
                            m.entry.id > prev,
                            "round {round}: {q}@{off}: ids not increasing"
                        );
                    }
                    last_id = Some(m.entry.id);
                    assert!(
                        m.entry.timestamp >= last_ts,
                        "round {round}: {q}@{off}: timestamp went back"
                    );
                    last_ts = m.entry.timestamp;
                    assert_eq!(
                        m.entry.size, m.message.size,
                        "round {round}: {q}@{off}: size"
                    );
                    log_bytes += u64::from(m.message.size);

                    let b = &m.message.message.body;
                    assert!(
                        b.len() >= 8,
                        "round {round}: {q}@{off}: body of {} bytes",
                        b.len()
                    );
                    let seq = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
                    assert!(
                        seq_round(seq) <= round && seq_task(seq) < WRITERS,
                        "round {round}: {q}@{off}: impossible seq {seq:#x}"
                    );
                    assert_eq!(
                        seq_queue(seq),
                        qid,
                        "round {round}: seq {seq:#x} in the wrong queue {q}"
                    );
                    assert!(
                        b[..] == body(seq)[..],
                        "round {round}: {q}@{off}: body of seq {seq:#x} is corrupt ({} bytes)",
                        b.len()
                    );
                    assert!(seqs.insert(seq), "round {round}: seq {seq:#x} stored twice");
                    at.insert((qid, off), seq);

                    let task = seq_task(seq);
                    if let Some(prev) = last_seq_of_task.insert(task, seq) {
                        assert!(
                            seq > prev,
                            "round {round}: {q}@{off}: task {task} seq {seq:#x} after {prev:#x}"
                        );
                    }
                    let keys = &m.message.message.keys;
                    assert_eq!(keys.len(), 1, "round {round}: {q}@{off}: keys {keys:?}");
                    let (first, len) = parse_batch_key(&keys[0])
                        .unwrap_or_else(|| panic!("round {round}: bad key {:?}", keys[0]));
                    assert!(
                        (first..first + len).contains(&seq),
                        "round {round}: seq {seq:#x} is not in its batch {}",
                        keys[0]
                    );
                    batches.insert(first, len);
                }
            }
            assert_eq!(next, range.next.0);
        }
        v.messages_in_store = seqs.len() as u64;

        // The header is written with the data: its counters must match exactly.
        let stats = store.stats();
        assert_eq!(
            stats.messages, v.messages_in_store,
            "round {round}: stats.messages"
        );
        assert_eq!(stats.log_bytes, log_bytes, "round {round}: stats.log_bytes");

        // Batches are atomic: every batch present is present whole.
        for (&first, &len) in &batches {
            for s in first..first + len {
                assert!(
                    seqs.contains(&s),
                    "round {round}: batch {} is torn: seq {s:#x} missing",
                    batch_key(first, len)
                );
            }
        }
        // The key index survived too (checked on a bounded sample: it is slow in debug).
        for (&first, &len) in batches.iter().rev().take(200) {
            let key = batch_key(first, len);
            let found = store.messages_by_key(&t, &key, 64).await.expect("by key");
            assert_eq!(
                found.len() as u64,
                len,
                "round {round}: key index for batch {key}"
            );
        }
        v.batches_checked = batches.len() as u64;

        // Every acknowledged message, of every round so far, is where its receipt said
        // (against the full scan above, which read every offset of every queue).
        for d in reported {
            assert_eq!(
                at.get(&(d.queue, d.offset)),
                Some(&d.seq),
                "round {round}: LOST durable message {d:?}"
            );
            v.durable_checked += 1;
        }
        // And read on its own at its offset, as a consumer would: every message
        // acknowledged in this round, and a sample of the earlier ones (a read costs
        // ~150 us in a debug build, so reading them all again each round is quadratic;
        // MQGATE_CRASH_FULL_READS=1 reads them all).
        let full = std::env::var_os("MQGATE_CRASH_FULL_READS").is_some();
        let mut rng = XorShift::new(round ^ reported.len() as u64);
        let single = reported.iter().enumerate().filter(|(i, _)| {
            full || *i >= new_from
                || rng
                    .next()
                    .is_multiple_of(new_from as u64 / OLD_READ_SAMPLE + 1)
        });
        for (_, d) in single {
            let q = QueueRef::new(t.clone(), d.queue);
            let got = store
                .read(&q, QueueOffset(d.offset), ReadLimits::count(1))
                .await
                .expect("read one");
            assert_eq!(got.len(), 1, "round {round}: LOST durable message {d:?}");
            let m = &got[0];
            assert_eq!(
                m.entry.offset.0, d.offset,
                "round {round}: {d:?} read at wrong offset"
            );
            assert_eq!(
                m.message.message.body.len(),
                d.body_len,
                "round {round}: {d:?} length"
            );
            assert!(
                m.message.message.body[..] == body(d.seq)[..],
                "round {round}: CORRUPT durable message {d:?}"
            );
            v.read_one_by_one += 1;
        }
        drop(store); // releases RocksDB's lock before the next child opens it
        v
    })
}

#[test]
fn crash_rounds() {
    let rounds: u64 = std::env::var("MQGATE_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8)
        .max(6);
    let seed: u64 = std::env::var("MQGATE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            let t = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            t ^ u64::from(std::process::id()).rotate_left(32)
        });
    println!("crash test: {rounds} rounds, seed {seed} (MQGATE_CRASH_SEED to repeat the choices)");
    let mut rng = XorShift::new(seed);
    let dir = tempfile::tempdir().expect("tempdir");

    let mut reported: Vec<Durable> = Vec::new();
    let mut last = Verified::default();
    let mut total_read_one = 0u64;
    for round in 0..rounds {
        // Every fourth round (never the first) kills the child early, usually while it
        // is still opening and recovering the store; the others once it is writing.
        let early = round % 4 == 3;
        let delay = if early {
            Duration::from_millis(rng.range(0, 150))
        } else {
            Duration::from_millis(rng.range(150, 900))
        };
        let out = run_child(dir.path(), round, delay, early);
        for d in &out.durable {
            assert_eq!(
                seq_round(d.seq),
                round,
                "a child reported another round's seq"
            );
        }
        let new = out.durable.len();
        let new_from = reported.len();
        reported.extend(out.durable);
        let started = Instant::now();
        last = verify(dir.path(), &reported, new_from, round);
        println!(
            "round {round}: {} kill after {:?} (ready: {}), {new} newly acknowledged, \
             {} acknowledged in all ({} re-read one by one), {} messages / {} batches \
             in the store; verified in {:?}",
            if early { "early" } else { "late" },
            out.killed_after,
            out.saw_ready,
            reported.len(),
            last.read_one_by_one,
            last.messages_in_store,
            last.batches_checked,
            started.elapsed(),
        );
        assert_eq!(last.durable_checked, reported.len() as u64);
        total_read_one += last.read_one_by_one;
    }
    assert!(
        !reported.is_empty(),
        "no child acknowledged anything: the test checked nothing"
    );
    println!(
        "crash test summary: rounds {rounds}, durable messages checked {} \
         ({total_read_one} single-offset reads over all rounds), messages in store {}, lost 0",
        reported.len(),
        last.messages_in_store
    );
}

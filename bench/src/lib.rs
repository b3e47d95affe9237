//! Shared pieces of mqgate's benchmark tools: percentiles, process CPU time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The `p`-th percentile (0..=100) of sorted `v`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// CPU time (user + system) a process has used, from /proc (Linux).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    let mut total = one_process_cpu(pid)?;
    // A broker made of several processes (mqgate on the jetstream backend and its NATS
    // servers): `BENCH_EXTRA_PIDS=1,2,3` adds theirs (bench/compare.sh sets it).
    if let Ok(extra) = std::env::var("BENCH_EXTRA_PIDS") {
        for p in extra.split(',').filter_map(|p| p.trim().parse().ok()) {
            total += one_process_cpu(p)?;
        }
    }
    Some(total)
}

fn one_process_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // SAFETY-free: the clock tick is 100 Hz on every Linux this runs on.
    let ticks = 100;
    Some(Duration::from_millis((utime + stime) * 1000 / ticks))
}

/// CPU time (user + system) of this process so far, to the microsecond (the /proc
/// figures [`process_cpu`] reads tick at 10 ms: too coarse for a run of a fraction of
/// a second).
#[allow(unsafe_code)]
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// CPU time of this process's children named `comm` (from /proc, 10 ms ticks).
pub fn children_cpu(comm: &str) -> Duration {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    let mut total = Duration::ZERO;
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let rest: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // state, ppid, ...
        if &stat[open + 1..close] == comm && rest.get(1).and_then(|p| p.parse().ok()) == Some(me) {
            total += one_process_cpu(pid).unwrap_or_default();
        }
    }
    total
}

/// Resident set size of a process, in bytes.
pub fn process_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        0.0
    } else {
        v[v.len() / 2]
    }
}

/// One measured round of a pub/sub benchmark.
#[derive(Debug, Clone)]
pub struct Round {
    /// Deliveries per second.
    pub rate: f64,
    /// Latency percentiles.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// 99.9th percentile.
    pub p999: Duration,
    /// Broker CPU time per delivery, µs (when its pid was given).
    pub cpu_us: Option<f64>,
    /// Messages never delivered.
    pub lost: u64,
    /// Messages delivered more than once.
    pub dup: u64,
    /// The consumers' delivery rate over the publisher's confirmed rate (1.0: no
    /// backlog was left when the publisher finished), where the scenario measures it.
    pub kept_up: Option<f64>,
    /// Time the machine's virtual CPUs were ready to run but the host ran something
    /// else (`steal` in /proc/stat) during the round, ms, summed over CPUs; 0 on a
    /// machine of its own. A VM throttled by its host stalls every thread at once,
    /// which shows in the latency tail and in no process's CPU time.
    pub steal_ms: Option<f64>,
}

/// The machine's stolen CPU time so far (`steal` of /proc/stat's `cpu` line).
pub fn machine_steal() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal, in USER_HZ (100 on Linux).
    let ticks: u64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

impl Round {
    /// A round from its sorted latencies and counts.
    pub fn new(
        rate: f64,
        sorted_latencies: &[Duration],
        cpu_us: Option<f64>,
        lost: u64,
        dup: u64,
    ) -> Self {
        Self {
            rate,
            p50: percentile(sorted_latencies, 50.0),
            p99: percentile(sorted_latencies, 99.0),
            p999: percentile(sorted_latencies, 99.9),
            cpu_us,
            lost,
            dup,
            kept_up: None,
            steal_ms: None,
        }
    }

    /// Note the machine's stolen CPU time since `since` (a [`machine_steal`] reading
    /// taken as the round began).
    pub fn steal_since(mut self, since: Option<Duration>) -> Self {
        self.steal_ms = machine_steal()
            .zip(since)
            .map(|(now, then)| now.saturating_sub(then).as_secs_f64() * 1e3);
        self
    }

    /// Print it as round `n`; `unit` names what is counted (`msg`, `delivery`).
    pub fn print(&self, n: usize, unit: &str) {
        println!(
            "round {n}: {:.0} {unit}/s, p50 {:?}, p99 {:?}, p99.9 {:?}, broker CPU {} µs/{unit}, lost {}, dup {}, stolen {} ms",
            self.rate,
            self.p50,
            self.p99,
            self.p999,
            self.cpu_us.map(|c| format!("{c:.1}")).unwrap_or("-".into()),
            self.lost,
            self.dup,
            self.steal_ms.map(|s| format!("{s:.0}")).unwrap_or("-".into()),
        );
    }
}

/// Print the medians of `rounds` (and the total lost and duplicated).
pub fn print_medians(rounds: &[Round], unit: &str) {
    let us = |f: fn(&Round) -> Duration| -> Vec<f64> {
        rounds.iter().map(|r| f(r).as_secs_f64() * 1e6).collect()
    };
    let mut rates: Vec<f64> = rounds.iter().map(|r| r.rate).collect();
    let mut cpus: Vec<f64> = rounds.iter().filter_map(|r| r.cpu_us).collect();
    let lost: u64 = rounds.iter().map(|r| r.lost).sum();
    let dup: u64 = rounds.iter().map(|r| r.dup).sum();
    let (rate, p50, p99, p999, cpu) = (
        median(&mut rates),
        median(&mut us(|r| r.p50)),
        median(&mut us(|r| r.p99)),
        median(&mut us(|r| r.p999)),
        median(&mut cpus),
    );
    println!(
        "median: {rate:.0} {unit}/s, p50 {p50:.0} µs, p99 {p99:.0} µs, p99.9 {p999:.0} µs, broker CPU {cpu:.1} µs/{unit}; lost {lost}, duplicated {dup}"
    );
    let mut kept: Vec<f64> = rounds.iter().filter_map(|r| r.kept_up).collect();
    let kept_up = if kept.is_empty() {
        String::new()
    } else {
        format!(" kept_up={:.2}", median(&mut kept))
    };
    let mut stolen: Vec<f64> = rounds.iter().filter_map(|r| r.steal_ms).collect();
    let steal = if stolen.is_empty() {
        String::new()
    } else {
        format!(" steal_ms={:.0}", median(&mut stolen))
    };
    // For scripts (bench/compare.sh): one line, key=value.
    println!(
        "RESULT rate={rate:.0} p50_us={p50:.0} p99_us={p99:.0} p999_us={p999:.0} cpu_us={cpu:.2} lost={lost} dup={dup}{kept_up}{steal}"
    );
}

/// Microseconds since the Unix epoch (the send timestamp put in every payload).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// Random bytes to cut bodies from: each message gets a different slice, so no two
/// bodies within 256 of each other share bytes and neither a block compressor nor its
/// window finds repeats (zeros compress to nothing, which real payloads do not).
#[derive(Debug)]
pub struct RandomPool {
    bytes: Vec<u8>,
    stride: usize,
}

/// A pool for bodies of `size` bytes.
pub fn random_pool(size: usize) -> RandomPool {
    let stride = size + 3;
    let len = stride * 256 + size;
    let bytes = (0..len.div_ceil(8) as u64)
        .flat_map(|i| mqgate_core::shard::splitmix64(i).to_le_bytes())
        .take(len)
        .collect();
    RandomPool { bytes, stride }
}

impl RandomPool {
    /// Fill `body` with message `seq`'s slice of the pool.
    pub fn fill(&self, body: &mut [u8], seq: u64) {
        let at = (seq % 256) as usize * self.stride;
        body.copy_from_slice(&self.bytes[at..at + body.len()]);
    }
}

/// Write the sequence number and the send timestamp at the head of a payload.
pub fn stamp(payload: &mut [u8], seq: u64) {
    payload[0..8].copy_from_slice(&seq.to_be_bytes());
    payload[8..16].copy_from_slice(&now_us().to_be_bytes());
}

/// What one receiver got: latencies, distinct messages, duplicates (from the sequence
/// number and send timestamp that `stamp` put in each payload).
#[derive(Debug)]
pub struct Receipts {
    /// End-to-end latency of every delivery.
    pub latencies: Vec<Duration>,
    seen: Vec<bool>,
    /// Distinct messages received.
    pub got: u64,
    /// Deliveries of a message already received.
    pub dup: u64,
}

impl Receipts {
    /// A receiver expecting sequence numbers `0..total`.
    pub fn new(total: u64) -> Self {
        Self {
            latencies: Vec::with_capacity(total as usize),
            seen: vec![false; total as usize],
            got: 0,
            dup: 0,
        }
    }

    /// Record one delivered payload.
    pub fn record(&mut self, payload: &[u8]) {
        let seq = u64::from_be_bytes(payload[0..8].try_into().expect("8 bytes"));
        let sent = u64::from_be_bytes(payload[8..16].try_into().expect("8 bytes"));
        self.latencies
            .push(Duration::from_micros(now_us().saturating_sub(sent)));
        if std::mem::replace(&mut self.seen[seq as usize], true) {
            self.dup += 1;
        } else {
            self.got += 1;
        }
    }

    /// Latencies, distinct, duplicates.
    pub fn into_parts(self) -> (Vec<Duration>, u64, u64) {
        (self.latencies, self.got, self.dup)
    }
}

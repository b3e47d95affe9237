//! Counters and rates as RabbitMQ's `message_stats` and `*_details.rate` show them.
//!
//! Counts are read live. Rates come from samples a background task takes every
//! [`INTERVAL`] (RabbitMQ's default `collect_statistics_interval` is 5 s): the change
//! between the last two samples per second. It samples only while the management API
//! is being read (within 10 minutes of the last request): after a pause, rates are 0
//! until two new samples are in. Per queue: `publish` is the messages its
//! log has taken (the log's next offset), `ack` the offsets its group has settled,
//! `deliver_get` those plus the ones in flight; the messages counts come from the group
//! (ready, unacknowledged).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mqgate_amqp::QueueView;
use mqgate_store::QueueRef;
use parking_lot::Mutex;

use crate::admin::AdminState;

/// How often the sampler runs.
pub(crate) const INTERVAL: Duration = Duration::from_secs(5);

/// One queue's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct QueueCounters {
    pub(crate) messages: u64,
    pub(crate) ready: u64,
    pub(crate) unacked: u64,
    pub(crate) publish: u64,
    pub(crate) ack: u64,
    pub(crate) deliver_get: u64,
}

impl QueueCounters {
    pub(crate) fn add(&mut self, o: &QueueCounters) {
        self.messages += o.messages;
        self.ready += o.ready;
        self.unacked += o.unacked;
        self.publish += o.publish;
        self.ack += o.ack;
        self.deliver_get += o.deliver_get;
    }
}

/// The broker's message counters (every protocol).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Global {
    pub(crate) publish: u64,
    pub(crate) deliver_get: u64,
    pub(crate) ack: u64,
    pub(crate) redeliver: u64,
    pub(crate) unroutable: u64,
}

/// Rates per second, same fields.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct QueueRates {
    pub(crate) messages: f64,
    pub(crate) ready: f64,
    pub(crate) unacked: f64,
    pub(crate) publish: f64,
    pub(crate) ack: f64,
    pub(crate) deliver_get: f64,
}

/// Global rates per second.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct GlobalRates {
    pub(crate) publish: f64,
    pub(crate) deliver_get: f64,
    pub(crate) ack: f64,
    pub(crate) redeliver: f64,
    pub(crate) unroutable: f64,
}

#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    global: Global,
    queues: HashMap<(String, String), QueueCounters>,
}

/// The last two samples.
#[derive(Debug, Default)]
pub(crate) struct Rates {
    samples: Mutex<(Option<Sample>, Option<Sample>)>,
    /// When the management API was last used: sampling (a group query per queue) runs
    /// only while someone reads it.
    last_used: Mutex<Option<Instant>>,
    /// Wakes the sampler when the API is read after a pause (the first sample at once).
    woken: tokio::sync::Notify,
}

/// Sampling stops this long after the management API was last used.
const IDLE_AFTER: Duration = Duration::from_secs(600);

fn per_sec(new: u64, old: u64, secs: f64) -> f64 {
    (new as f64 - old as f64) / secs
}

impl Rates {
    /// The broker's counters now.
    pub(crate) fn global_now(&self, s: &AdminState) -> Global {
        let a = s.amqp.stats();
        let m = s.mqtt.stats();
        let r = Ordering::Relaxed;
        Global {
            publish: a.published.load(r) + m.publishes_in.load(r),
            deliver_get: a.delivered.load(r) + m.publishes_out.load(r),
            ack: a.acked.load(r),
            redeliver: a.redelivered.load(r),
            unroutable: a.unroutable.load(r),
        }
    }

    /// A queue's counters now.
    pub(crate) async fn queue_now(&self, s: &AdminState, q: &QueueView) -> QueueCounters {
        let mut c = QueueCounters::default();
        if let Ok(info) = s.broker.group_info(&q.group).await {
            for qi in &info.queues {
                c.ready += qi.ready;
                c.unacked += qi.in_flight as u64;
                c.ack += qi.consumed();
                c.publish += qi.next;
            }
        } else if let Some(t) = s.broker.topic(&q.topic) {
            for n in 0..t.queue_count {
                if let Ok(r) = s.broker.queue_range(&QueueRef::new(q.topic.clone(), n)) {
                    c.publish += r.next.0;
                }
            }
        }
        c.messages = c.ready + c.unacked;
        c.deliver_get = c.ack + c.unacked;
        c
    }

    /// The management API is in use: sample (again).
    pub(crate) fn touch(&self) {
        let was = self.last_used.lock().replace(Instant::now());
        if was.is_none_or(|t| t.elapsed() >= IDLE_AFTER) {
            self.woken.notify_one();
        }
    }

    /// Whether anyone read the management API in the last [`IDLE_AFTER`]; when not,
    /// the old samples are dropped (a rate over a stale pair would be wrong).
    fn in_use(&self) -> bool {
        let used = self
            .last_used
            .lock()
            .is_some_and(|t| t.elapsed() < IDLE_AFTER);
        if !used {
            *self.samples.lock() = (None, None);
        }
        used
    }

    /// Take a sample (the background task calls this every [`INTERVAL`]).
    pub(crate) async fn sample(&self, s: &AdminState) {
        let mut queues = HashMap::new();
        for q in s.amqp.queues() {
            let c = self.queue_now(s, &q).await;
            queues.insert((q.vhost, q.name), c);
        }
        let sample = Sample {
            at: Instant::now(),
            global: self.global_now(s),
            queues,
        };
        let mut g = self.samples.lock();
        g.0 = g.1.take();
        g.1 = Some(sample);
    }

    fn with<T: Default>(&self, f: impl FnOnce(&Sample, &Sample, f64) -> T) -> T {
        let g = self.samples.lock();
        match (&g.0, &g.1) {
            (Some(old), Some(new)) => {
                let secs = new.at.duration_since(old.at).as_secs_f64();
                if secs > 0.0 {
                    f(old, new, secs)
                } else {
                    T::default()
                }
            }
            _ => T::default(),
        }
    }

    /// The broker's rates over the last sampling interval.
    pub(crate) fn global_rates(&self) -> GlobalRates {
        self.with(|o, n, secs| GlobalRates {
            publish: per_sec(n.global.publish, o.global.publish, secs),
            deliver_get: per_sec(n.global.deliver_get, o.global.deliver_get, secs),
            ack: per_sec(n.global.ack, o.global.ack, secs),
            redeliver: per_sec(n.global.redeliver, o.global.redeliver, secs),
            unroutable: per_sec(n.global.unroutable, o.global.unroutable, secs),
        })
    }

    fn rates(o: &QueueCounters, n: &QueueCounters, secs: f64) -> QueueRates {
        QueueRates {
            messages: per_sec(n.messages, o.messages, secs),
            ready: per_sec(n.ready, o.ready, secs),
            unacked: per_sec(n.unacked, o.unacked, secs),
            // Offsets only grow; a queue deleted and declared again starts over.
            publish: per_sec(n.publish, o.publish, secs).max(0.0),
            ack: per_sec(n.ack, o.ack, secs).max(0.0),
            deliver_get: per_sec(n.deliver_get, o.deliver_get, secs).max(0.0),
        }
    }

    /// A queue's rates over the last sampling interval (0 until it was in two samples).
    pub(crate) fn queue_rates(&self, vhost: &str, name: &str) -> QueueRates {
        let key = (vhost.to_owned(), name.to_owned());
        self.with(
            |o, n, secs| match (o.queues.get(&key), n.queues.get(&key)) {
                (Some(a), Some(b)) => Self::rates(a, b, secs),
                _ => QueueRates::default(),
            },
        )
    }

    /// The rates of every queue's totals (queues in both samples).
    pub(crate) fn total_queue_rates(&self) -> QueueRates {
        self.with(|o, n, secs| {
            let (mut a, mut b) = (QueueCounters::default(), QueueCounters::default());
            for (k, nb) in &n.queues {
                if let Some(oa) = o.queues.get(k) {
                    a.add(oa);
                    b.add(nb);
                }
            }
            Self::rates(&a, &b, secs)
        })
    }
}

/// Sample every [`INTERVAL`] until `stop`.
pub(crate) fn spawn_sampler(s: AdminState, mut stop: tokio::sync::watch::Receiver<bool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopped = tokio::select! {
                _ = tick.tick() => false,
                () = s.rates.woken.notified() => { tick.reset(); false }
                r = stop.wait_for(|v| *v) => { drop(r); true }
            };
            if stopped {
                return;
            }
            if s.rates.in_use() {
                s.rates.sample(&s).await;
            }
        }
    });
}

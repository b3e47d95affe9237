//! Prometheus metrics: the `metrics` facade with `metrics-exporter-prometheus`, rendered
//! on the admin listener's `/metrics`. Hot paths only bump atomics the adapters and the
//! core already keep; a scrape reads them (and the store's counters, the groups' offsets)
//! and sets the series, so scraping costs the hot path nothing. The store records its
//! append and fsync latency histograms itself. METRICS.md lists every series.

use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKindMask;
use mqgate_amqp::AmqpServer;
use mqgate_core::Broker;
use mqgate_mqtt::MqttServer;

use crate::settings::MetricsSettings;

/// Every series mqgate exports: name, kind, unit, help. METRICS.md is checked against it.
pub(crate) const SERIES: &[(&str, &str, &str, &str)] = &[
    ("mqgate_build_info", "gauge", "", "Always 1; the version is a label."),
    ("mqgate_connections", "gauge", "", "Open client connections, by protocol."),
    ("mqgate_amqp_channels", "gauge", "", "Open AMQP channels."),
    ("mqgate_mqtt_sessions", "gauge", "", "MQTT sessions kept: connected plus disconnected persistent ones."),
    ("mqgate_messages_received_total", "counter", "", "Messages published by clients, by protocol."),
    ("mqgate_messages_routed_total", "counter", "", "Published messages stored for at least one queue or subscriber, by protocol."),
    ("mqgate_messages_unroutable_total", "counter", "", "Published messages that matched nothing, by protocol."),
    ("mqgate_messages_delivered_total", "counter", "", "Messages sent to consumers and subscribers, by protocol."),
    ("mqgate_messages_acked_total", "counter", "", "Deliveries acknowledged (or sent without acknowledgement), by protocol."),
    ("mqgate_messages_redelivered_total", "counter", "", "Deliveries sent again (AMQP redelivered, MQTT DUP), by protocol."),
    ("mqgate_received_bytes_total", "counter", "bytes", "Bytes read from clients, by protocol."),
    ("mqgate_sent_bytes_total", "counter", "bytes", "Bytes written to clients, by protocol."),
    ("mqgate_protocol_errors_total", "counter", "", "Connections closed for malformed input or a protocol violation, by protocol."),
    ("mqgate_mqtt_qos0_dropped_total", "counter", "", "MQTT QoS 0 messages not delivered to a connected subscriber whose queue stayed full for limits.mqtt_qos0_max_wait."),
    ("mqgate_topic_messages_published_total", "counter", "", "Messages published per topic: the address written to (MQTT topic, AMQP exchange), once per message (the busiest; the rest summed as topic=\"_other\")."),
    ("mqgate_producer_messages_published_total", "counter", "", "Messages published per topic by each producer group (x-producer-group; the busiest pairs, the rest as \"_other\")."),
    ("mqgate_group_lag_messages", "gauge", "", "Messages not yet consumed per consumer group (the most lagging; the rest summed as group=\"_other\")."),
    ("mqgate_group_consumed_messages_total", "counter", "", "Messages a consumer group has consumed (its committed offsets, summed over its queues)."),
    ("mqgate_delayed_messages_pending", "gauge", "", "Delayed messages (and retries) waiting for their time."),
    ("mqgate_groups_parked", "gauge", "", "Consumer groups whose actor is parked: idle, without a task until a message or a command comes."),
    ("mqgate_delayed_messages_released_total", "counter", "", "Delayed messages released by this process."),
    ("mqgate_flow_waits_total", "counter", "", "Publishes held back until consumers caught up (limits.max_consumer_lag)."),
    ("mqgate_retries_total", "counter", "", "Failed consumptions scheduled for a retry by this process."),
    ("mqgate_dead_lettered_total", "counter", "", "Messages moved to a dead-letter queue by this process."),
    ("mqgate_store_messages", "gauge", "", "Messages in the commit log."),
    ("mqgate_store_size_bytes", "gauge", "bytes", "Encoded size of the commit log."),
    ("mqgate_store_topics", "gauge", "", "Topics in the store."),
    ("mqgate_store_append_seconds", "histogram", "seconds", "Time of one group-commit append to the store."),
    ("mqgate_store_fsync_seconds", "histogram", "seconds", "Time of one write-ahead-log sync."),
    ("mqgate_store_cold_reads_total", "counter", "", "Consumer reads that had to read the store's files (not in its memtables or block cache), run off the async workers."),
    ("mqgate_store_degraded", "gauge", "", "1 while the store cannot write (a full disk, no file handles) and retries, 0 once it has recovered."),
    ("mqgate_store_errors_total", "counter", "", "Store writes and WAL syncs that failed."),
    ("mqgate_replication_records_total", "counter", "", "Records this node appended to the replicated log (store.backend = jetstream)."),
    ("mqgate_replication_blocked", "gauge", "", "1 while the replicated log takes no writes (no quorum, no NATS server): writers wait."),
    ("mqgate_replication_step_downs_total", "counter", "", "Times this node stopped writing the replicated log (fenced, lease lost, view failed)."),
    ("mqgate_sockets_open", "gauge", "", "Client sockets open, every listener, handshaking or established."),
    ("mqgate_runtime_connections", "gauge", "", "Client sockets open on each per-core runtime (runtime.scheduler = per-core), by runtime."),
    ("mqgate_handshakes_pending", "gauge", "", "Connections still in their handshake, by protocol (capped by limits.max_pending_handshakes)."),
    ("mqgate_process_resident_memory_bytes", "gauge", "bytes", "Resident memory of the broker process."),
    ("mqgate_memory_blocked", "gauge", "", "1 while publishers are blocked (memory above limits.memory_high_watermark), else 0."),
    ("mqgate_mqtt_retained_messages", "gauge", "", "MQTT retained messages (their bodies are in the store)."),
    ("mqgate_mqtt_retained_cache_messages", "gauge", "", "MQTT retained message bodies cached in memory."),
    ("mqgate_mqtt_retained_cache_bytes", "gauge", "bytes", "Bytes of the MQTT retained message bodies cached in memory."),
    ("mqgate_process_cpu_seconds_total", "counter", "seconds", "CPU time (user and system) of the broker process."),
];

/// Install the recorder (once per process) and describe every series.
pub(crate) fn install() -> anyhow::Result<PrometheusHandle> {
    let buckets = [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0,
    ];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        // Topics and groups that leave the top N stop being set and disappear.
        .idle_timeout(
            MetricKindMask::COUNTER | MetricKindMask::GAUGE,
            Some(Duration::from_secs(300)),
        )
        .install_recorder()?;
    for (name, kind, unit, help) in SERIES {
        let unit = match *unit {
            "bytes" => Some(Unit::Bytes),
            "seconds" => Some(Unit::Seconds),
            _ => None,
        };
        match (*kind, unit) {
            ("counter", Some(u)) => describe_counter!(*name, u, *help),
            ("counter", None) => describe_counter!(*name, *help),
            ("gauge", Some(u)) => describe_gauge!(*name, u, *help),
            ("gauge", None) => describe_gauge!(*name, *help),
            (_, Some(u)) => describe_histogram!(*name, u, *help),
            (_, None) => describe_histogram!(*name, *help),
        }
    }
    // The store's replication series exist from the start (0 unless the store is
    // replicated), so a dashboard or alert finds them on every backend.
    metrics::counter!(mqgate_store::metrics::REPLICATION_RECORDS).increment(0);
    metrics::counter!(mqgate_store::metrics::REPLICATION_STEP_DOWNS).increment(0);
    metrics::gauge!(mqgate_store::metrics::REPLICATION_BLOCKED).set(0.0);
    Ok(handle)
}

/// What a scrape reads.
#[derive(Clone, Debug)]
pub(crate) struct Collector {
    pub(crate) handle: PrometheusHandle,
    pub(crate) broker: Broker,
    pub(crate) mqtt: MqttServer,
    pub(crate) amqp: AmqpServer,
    pub(crate) cfg: MetricsSettings,
}

fn set_counter(name: &'static str, labels: &[(&'static str, String)], v: u64) {
    metrics::counter!(name, labels).absolute(v);
}

fn set_gauge(name: &'static str, labels: &[(&'static str, String)], v: f64) {
    metrics::gauge!(name, labels).set(v);
}

impl Collector {
    /// Read every source, then render the exposition text.
    pub(crate) async fn render(&self) -> String {
        self.collect().await;
        self.handle.run_upkeep();
        self.handle.render()
    }

    async fn collect(&self) {
        set_gauge(
            "mqgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION").to_owned())],
            1.0,
        );
        let a = self.amqp.stats();
        let m = self.mqtt.stats();
        let l = |p: &str| [("protocol", p.to_owned())];
        let r = Ordering::Relaxed;
        set_gauge(
            "mqgate_connections",
            &l("amqp"),
            a.open_connections() as f64,
        );
        set_gauge(
            "mqgate_connections",
            &l("mqtt"),
            m.open_connections() as f64,
        );
        set_gauge("mqgate_amqp_channels", &[], a.channels.load(r) as f64);
        set_gauge(
            "mqgate_mqtt_sessions",
            &[],
            self.mqtt.session_count() as f64,
        );
        for (name, amqp, mqtt) in [
            (
                "mqgate_messages_received_total",
                &a.published,
                &m.publishes_in,
            ),
            ("mqgate_messages_routed_total", &a.routed, &m.routed),
            (
                "mqgate_messages_unroutable_total",
                &a.unroutable,
                &m.unroutable,
            ),
            (
                "mqgate_messages_delivered_total",
                &a.delivered,
                &m.publishes_out,
            ),
            ("mqgate_messages_acked_total", &a.acked, &m.acked),
            (
                "mqgate_messages_redelivered_total",
                &a.redelivered,
                &m.redelivered,
            ),
            ("mqgate_received_bytes_total", &a.bytes_in, &m.bytes_in),
            ("mqgate_sent_bytes_total", &a.bytes_out, &m.bytes_out),
            (
                "mqgate_protocol_errors_total",
                &a.protocol_errors,
                &m.protocol_errors,
            ),
        ] {
            set_counter(name, &l("amqp"), amqp.load(r));
            set_counter(name, &l("mqtt"), mqtt.load(r));
        }
        let b = &self.broker;
        set_gauge(
            "mqgate_delayed_messages_pending",
            &[],
            b.delayed_pending() as f64,
        );
        set_gauge("mqgate_groups_parked", &[], b.groups_parked() as f64);
        set_counter(
            "mqgate_delayed_messages_released_total",
            &[],
            b.delayed_released(),
        );
        set_counter("mqgate_flow_waits_total", &[], b.flow_waits());
        set_counter(
            "mqgate_mqtt_qos0_dropped_total",
            &[],
            m.qos0_dropped.load(r),
        );
        set_counter("mqgate_retries_total", &[], b.retries());
        set_counter("mqgate_dead_lettered_total", &[], b.dead_lettered());
        let st = b.store_stats();
        set_gauge("mqgate_store_messages", &[], st.messages as f64);
        set_gauge("mqgate_store_size_bytes", &[], st.log_bytes as f64);
        set_gauge("mqgate_store_topics", &[], st.topics as f64);
        set_counter("mqgate_store_cold_reads_total", &[], st.cold_reads);
        let health = b.store_health();
        set_gauge(
            "mqgate_store_degraded",
            &[],
            f64::from(u8::from(!health.is_ok())),
        );
        set_counter("mqgate_store_errors_total", &[], health.errors);
        set_gauge(
            "mqgate_sockets_open",
            &[],
            mqgate_core::net::open_sockets() as f64,
        );
        for (i, n) in mqgate_core::net::runtime_connections()
            .into_iter()
            .enumerate()
        {
            set_gauge(
                "mqgate_runtime_connections",
                &[("runtime", i.to_string())],
                n as f64,
            );
        }
        set_gauge(
            "mqgate_handshakes_pending",
            &l("amqp"),
            self.amqp.pending_handshakes() as f64,
        );
        set_gauge(
            "mqgate_handshakes_pending",
            &l("mqtt"),
            self.mqtt.pending_handshakes() as f64,
        );
        if let Some(rss) = process_rss() {
            set_gauge("mqgate_process_resident_memory_bytes", &[], rss as f64);
        }
        set_gauge(
            "mqgate_memory_blocked",
            &[],
            f64::from(u8::from(b.is_memory_blocked())),
        );
        let rs = self.mqtt.retained_stats();
        set_gauge("mqgate_mqtt_retained_messages", &[], rs.messages as f64);
        set_gauge(
            "mqgate_mqtt_retained_cache_messages",
            &[],
            rs.cached_messages as f64,
        );
        set_gauge(
            "mqgate_mqtt_retained_cache_bytes",
            &[],
            rs.cached_bytes as f64,
        );
        if let Some(cpu) = process_cpu_seconds() {
            metrics::counter!("mqgate_process_cpu_seconds_total").absolute(cpu as u64);
        }
        if self.cfg.per_topic {
            self.topics();
            self.groups().await;
        }
    }

    /// Per-topic publish counters: the `max_topics` busiest, the rest as `_other`.
    fn topics(&self) {
        let mut per: std::collections::HashMap<String, u64> = Default::default();
        let mut by_producer: Vec<(String, String, u64)> = Vec::new();
        for s in self.broker.producer_stats() {
            *per.entry(s.topic.to_string()).or_default() += s.messages;
            by_producer.push((s.topic.to_string(), s.producer_group, s.messages));
        }
        // Per (topic, producer group): the busiest `max_topics` pairs, the rest summed.
        by_producer.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| (&a.0, &a.1).cmp(&(&b.0, &b.1))));
        let rest: u64 = by_producer
            .iter()
            .skip(self.cfg.max_topics)
            .map(|x| x.2)
            .sum();
        for (t, g, n) in by_producer.into_iter().take(self.cfg.max_topics) {
            set_counter(
                "mqgate_producer_messages_published_total",
                &[("topic", t), ("producer_group", g)],
                n,
            );
        }
        if rest > 0 {
            set_counter(
                "mqgate_producer_messages_published_total",
                &[
                    ("topic", "_other".into()),
                    ("producer_group", "_other".into()),
                ],
                rest,
            );
        }
        let mut v: Vec<(String, u64)> = per.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let other: u64 = v.iter().skip(self.cfg.max_topics).map(|x| x.1).sum();
        for (t, n) in v.into_iter().take(self.cfg.max_topics) {
            set_counter("mqgate_topic_messages_published_total", &[("topic", t)], n);
        }
        if other > 0 {
            set_counter(
                "mqgate_topic_messages_published_total",
                &[("topic", "_other".into())],
                other,
            );
        }
    }

    /// Per-group lag and consumed counts (MQTT sessions' own groups are left out: one per
    /// client). Lag is `next - committed` per queue: O(queues), whatever the backlog.
    async fn groups(&self) {
        let Ok(groups) = self.broker.groups().await else {
            return;
        };
        let mut rows = Vec::new();
        for g in groups {
            if g.as_str().starts_with("%MQTT%") {
                continue;
            }
            let Ok(info) = self.broker.group_info(&g).await else {
                continue;
            };
            let lag: u64 = info.queues.iter().map(|q| q.lag).sum();
            let consumed: u64 = info.queues.iter().map(|q| q.consumed()).sum();
            rows.push((g.to_string(), lag, consumed));
        }
        rows.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let (mut other_lag, mut other_consumed) = (0, 0);
        for (i, (g, lag, consumed)) in rows.into_iter().enumerate() {
            if i >= self.cfg.max_groups {
                other_lag += lag;
                other_consumed += consumed;
                continue;
            }
            set_gauge(
                "mqgate_group_lag_messages",
                &[("group", g.clone())],
                lag as f64,
            );
            set_counter(
                "mqgate_group_consumed_messages_total",
                &[("group", g)],
                consumed,
            );
        }
        if other_lag + other_consumed > 0 {
            set_gauge(
                "mqgate_group_lag_messages",
                &[("group", "_other".into())],
                other_lag as f64,
            );
            set_counter(
                "mqgate_group_consumed_messages_total",
                &[("group", "_other".into())],
                other_consumed,
            );
        }
    }
}

pub(crate) fn process_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

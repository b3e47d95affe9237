//! Policies whose effect and bookkeeping must be one store write, checked by SIGKILLing
//! the real `mqgate` binary at the worst moment and restarting it on the same data:
//!
//! - a rejected message's dead-letter copy and the commit past it (no message lost, in
//!   its queue or in the dead-letter queue, whenever the kill lands);
//! - an MQTT 5 will with a Will Delay Interval (a named core timer: it survives a
//!   restart, fires once, and a returning client still cancels it);
//! - a retained MQTT publish and its retained record (both or neither survive).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::Node;
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, ConnectReturnCode, LastWill, LastWillProperties, Packet, Publish,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

// ---------------------------------------------------------------------------------------
// An MQTT 5 client (rumqttc) whose event loop runs in a task and never reconnects
// ---------------------------------------------------------------------------------------

struct Mqtt5 {
    client: AsyncClient,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    task: JoinHandle<()>,
}

struct Mqtt5Options<'a> {
    id: &'a str,
    clean_start: bool,
    session_expiry: Option<u32>,
    will: Option<LastWill>,
}

impl Mqtt5 {
    /// Connect and wait for a successful CONNACK: (client, session present).
    async fn connect(port: u16, o: Mqtt5Options<'_>) -> (Self, bool) {
        let mut opts = MqttOptions::new(o.id, "127.0.0.1", port);
        opts.set_clean_start(o.clean_start);
        opts.set_keep_alive(Duration::from_secs(30));
        if let Some(expiry) = o.session_expiry {
            let mut p = ConnectProperties::new();
            p.session_expiry_interval = Some(expiry);
            opts.set_connect_properties(p);
        }
        if let Some(w) = o.will {
            opts.set_last_will(w);
        }
        let (client, mut el) = AsyncClient::new(opts, 2000);
        let (tx, events) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(ev) => {
                        if tx.send(Ok(ev)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                        return; // no reconnection
                    }
                }
            }
        });
        let mut c = Self {
            client,
            events,
            task,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, c.events.recv()).await {
                Ok(Some(Ok(Event::Incoming(Packet::ConnAck(a))))) => {
                    assert_eq!(a.code, ConnectReturnCode::Success, "CONNACK of {}", o.id);
                    return (c, a.session_present);
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => panic!("{}: connection failed: {e}", o.id),
                Ok(None) => panic!("{}: event loop ended", o.id),
                Err(_) => panic!("{}: no CONNACK within 10 s", o.id),
            }
        }
    }

    /// The next event within `within`; `None` on timeout, `Some(Err)` when the
    /// connection is gone.
    async fn next(&mut self, within: Duration) -> Option<Result<Event, String>> {
        match tokio::time::timeout(within, self.events.recv()).await {
            Ok(Some(ev)) => Some(ev),
            Ok(None) => Some(Err("event loop ended".into())),
            Err(_) => None,
        }
    }

    /// Subscribe at QoS 1 and wait for a SUBACK granting it.
    async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("SUBSCRIBE queued");
        loop {
            match self.next(Duration::from_secs(10)).await {
                Some(Ok(Event::Incoming(Packet::SubAck(a)))) => {
                    assert_eq!(a.return_codes.len(), 1);
                    assert!(
                        matches!(
                            a.return_codes[0],
                            rumqttc::v5::mqttbytes::v5::SubscribeReasonCode::Success(
                                QoS::AtLeastOnce
                            )
                        ),
                        "SUBACK for {filter}: {:?}",
                        a.return_codes
                    );
                    return;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("subscribing {filter}: {e}"),
                None => panic!("no SUBACK for {filter}"),
            }
        }
    }

    /// A normal DISCONNECT (reason 0: no will), then the socket is closed.
    async fn disconnect(mut self) {
        self.client.disconnect().await.expect("DISCONNECT queued");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect))) => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("disconnecting: {e}"),
                None => panic!("DISCONNECT not sent within 5 s"),
            }
        }
        // Let the packet leave before the socket is dropped.
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.task.abort();
        let _ = self.task.await;
    }

    /// Close the TCP connection without DISCONNECT: the event loop (which owns the
    /// socket) is dropped.
    async fn drop_connection(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Every PUBLISH received (acknowledged by rumqttc) until nothing came for `idle`,
    /// or `max` has passed. Panics if the connection breaks.
    async fn collect(&mut self, idle: Duration, max: Duration) -> Vec<Publish> {
        let deadline = Instant::now() + max;
        let mut got = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return got;
            }
            match self.next(idle.min(left)).await {
                Some(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(p),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("connection lost while collecting: {e}"),
                None => return got,
            }
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------------------
// 1. Dead-lettering: the copy and the commit past it are one write
// ---------------------------------------------------------------------------------------

const DL_MESSAGES: usize = 300;
const DL_PREFETCH: u16 = 50;

/// Publish `DL_MESSAGES` confirmed messages to `q` (dead-lettering to fanout `dlx`, bound
/// to `q.dead`), reject them one after the other with requeue=false, SIGKILL the broker
/// after `kill_after` rejects, restart it, and check that no message is lost.
async fn dead_letter_round(kill_after: usize) {
    let mut b = Node::start_temp();
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable_q = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "dlx".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare("q.dead".into(), durable_q, FieldTable::default())
        .await
        .unwrap();
    ch.queue_bind(
        "q.dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("dlx".into()),
    );
    ch.queue_declare("q".into(), durable_q, args).await.unwrap();

    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirms = Vec::with_capacity(DL_MESSAGES);
    for i in 0..DL_MESSAGES {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "q".into(),
                BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap(),
        );
    }
    for (i, c) in confirms.into_iter().enumerate() {
        let c = tokio::time::timeout(Duration::from_secs(20), c)
            .await
            .unwrap_or_else(|_| panic!("no confirm for message {i}"))
            .unwrap();
        assert!(c.is_ack(), "message {i} nacked");
    }

    // Reject as fast as possible; SIGKILL once `kill_after` rejects are sent.
    let rch = conn.create_channel().await.unwrap();
    rch.basic_qos(DL_PREFETCH, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = rch
        .basic_consume(
            "q".into(),
            "rejecter".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut rejected = 0;
    while rejected < kill_after {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("no delivery after {rejected} rejects"))
            .expect("consumer open")
            .expect("delivery");
        d.acker
            .reject(BasicRejectOptions { requeue: false })
            .await
            .unwrap();
        rejected += 1;
    }
    b.sigkill();
    drop(consumer);
    drop(conn);
    b.restart();

    // Drain both queues, acking everything.
    let conn = lapin::Connection::connect(&b.amqp_url(), Default::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
    let consume = |queue: &'static str| {
        let ch = ch.clone();
        async move {
            ch.basic_consume(
                queue.into(),
                format!("drain-{queue}").as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap()
        }
    };
    let mut main = consume("q").await;
    let mut dead = consume("q.dead").await;
    let mut in_main = BTreeSet::new();
    let mut in_dead = BTreeSet::new();
    let (mut n_main, mut n_dead) = (0usize, 0usize);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let all_there = |a: &BTreeSet<usize>, b: &BTreeSet<usize>| a.union(b).count() == DL_MESSAGES;
    while !all_there(&in_main, &in_dead) {
        let (d, from_dead) = tokio::select! {
            d = main.next() => (d, false),
            d = dead.next() => (d, true),
            _ = tokio::time::sleep_until(deadline) => break,
        };
        let d = d.expect("consumer open").expect("delivery");
        let seq: usize = text(&d.data).parse().expect("a sequence number");
        assert!(seq < DL_MESSAGES, "unexpected body {seq}");
        if from_dead {
            in_dead.insert(seq);
            n_dead += 1;
        } else {
            in_main.insert(seq);
            n_main += 1;
        }
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
    }
    let missing: Vec<usize> = (0..DL_MESSAGES)
        .filter(|s| !in_main.contains(s) && !in_dead.contains(s))
        .collect();
    println!(
        "kill after {kill_after} rejects: q gave {n_main} ({} distinct), q.dead gave {n_dead} \
         ({} distinct), {} in both",
        in_main.len(),
        in_dead.len(),
        in_main.intersection(&in_dead).count()
    );
    assert!(
        missing.is_empty(),
        "kill after {kill_after} rejects: {} confirmed messages are in neither q nor q.dead: \
         {missing:?}",
        missing.len()
    );
    // More than a prefetch window was rejected: the broker had handled rejects (it sent
    // further deliveries) before the kill, so their dead-letter copies must be there.
    if kill_after > usize::from(DL_PREFETCH) {
        assert!(
            !in_dead.is_empty(),
            "kill after {kill_after} rejects: nothing reached q.dead"
        );
    }
    let _ = conn.close(200, "bye".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_survive_sigkill_between_reject_and_append() {
    let started = Instant::now();
    for kill_after in [30, 100, 200] {
        dead_letter_round(kill_after).await;
    }
    println!("took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// 2. Delayed wills are core timers: they survive a restart, and a return cancels them
// ---------------------------------------------------------------------------------------

const SESSION_EXPIRY: u32 = 300;

/// A persistent session `s` subscribed to `will/#` at QoS 1, left disconnected.
async fn persistent_subscriber(port: u16, id: &str, filter: &str) {
    let (mut s, _) = Mqtt5::connect(
        port,
        Mqtt5Options {
            id,
            clean_start: false,
            session_expiry: Some(SESSION_EXPIRY),
            will: None,
        },
    )
    .await;
    s.subscribe(filter).await;
    s.disconnect().await;
}

/// Client `w` with a delayed will on `will/w` connects, and its TCP connection drops
/// without DISCONNECT; the broker is SIGKILLed within the delay and restarted. Returns
/// when the connection was dropped.
async fn will_dropped_then_restart(b: &mut Node, delay: u32) -> Instant {
    let will = LastWill::new(
        "will/w",
        "w is gone",
        QoS::AtLeastOnce,
        false,
        Some(LastWillProperties {
            delay_interval: Some(delay),
            payload_format_indicator: None,
            message_expiry_interval: None,
            content_type: None,
            response_topic: None,
            correlation_data: None,
            user_properties: Vec::new(),
        }),
    );
    let (w, _) = Mqtt5::connect(
        b.mqtt,
        Mqtt5Options {
            id: "w",
            clean_start: true,
            session_expiry: Some(SESSION_EXPIRY),
            will: Some(will),
        },
    )
    .await;
    // Let the session settle, then cut the socket.
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.drop_connection().await;
    let dropped = Instant::now();
    // The broker sees the socket close and schedules the will.
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.sigkill();
    assert!(
        dropped.elapsed() < Duration::from_secs(1),
        "the kill came too late"
    );
    b.restart();
    println!("broker back {:?} after the drop", dropped.elapsed());
    dropped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delayed_will_fires_after_a_restart_during_its_delay() {
    const DELAY: u32 = 3;
    let started = Instant::now();
    let mut b = Node::start_temp();
    persistent_subscriber(b.mqtt, "s", "will/#").await;
    let dropped = will_dropped_then_restart(&mut b, DELAY).await;

    let (mut s, present) = Mqtt5::connect(
        b.mqtt,
        Mqtt5Options {
            id: "s",
            clean_start: false,
            session_expiry: Some(SESSION_EXPIRY),
            will: None,
        },
    )
    .await;
    assert!(present, "the subscriber's session survived the restart");
    let reconnected = Instant::now();
    // The will, within 15 s.
    let deadline = reconnected + Duration::from_secs(15);
    let first = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match s.next(left).await {
            Some(Ok(Event::Incoming(Packet::Publish(p)))) => break p,
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("subscriber connection lost: {e}"),
            None => panic!(
                "no will within 15 s of reconnecting ({:?} after the drop; delay {DELAY} s)",
                dropped.elapsed()
            ),
        }
    };
    let fired = dropped.elapsed();
    println!("will received {fired:?} after the drop");
    assert_eq!(text(&first.topic), "will/w");
    assert_eq!(text(&first.payload), "w is gone");
    assert!(
        fired >= Duration::from_secs(u64::from(DELAY)) - Duration::from_millis(200),
        "the will came {fired:?} after the drop, before its {DELAY} s delay"
    );
    // Exactly once: nothing more for a while.
    let more = s
        .collect(Duration::from_secs(3), Duration::from_secs(3))
        .await;
    assert!(
        more.is_empty(),
        "the will was delivered again: {:?}",
        more.iter()
            .map(|p| (text(&p.topic), text(&p.payload)))
            .collect::<Vec<_>>()
    );
    s.disconnect().await;
    println!("took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_returning_client_cancels_its_delayed_will_across_a_restart() {
    const DELAY: u32 = 3;
    let started = Instant::now();
    let mut b = Node::start_temp();
    persistent_subscriber(b.mqtt, "s", "will/#").await;
    let dropped = will_dropped_then_restart(&mut b, DELAY).await;

    // W returns to its session before the delay ends.
    let (w, present) = Mqtt5::connect(
        b.mqtt,
        Mqtt5Options {
            id: "w",
            clean_start: false,
            session_expiry: Some(SESSION_EXPIRY),
            will: None,
        },
    )
    .await;
    let returned = dropped.elapsed();
    println!("w returned {returned:?} after the drop");
    assert!(present, "w's session survived the restart");
    assert!(
        returned < Duration::from_secs(u64::from(DELAY)),
        "w came back {returned:?} after the drop, not within its {DELAY} s will delay: \
         the test proves nothing"
    );
    let (mut s, present) = Mqtt5::connect(
        b.mqtt,
        Mqtt5Options {
            id: "s",
            clean_start: false,
            session_expiry: Some(SESSION_EXPIRY),
            will: None,
        },
    )
    .await;
    assert!(present, "the subscriber's session survived the restart");
    // Nothing until delay + 3 s after the drop.
    let until = dropped + Duration::from_secs(u64::from(DELAY) + 3);
    let window = until.saturating_duration_since(Instant::now());
    let got = s.collect(window, window).await;
    assert!(
        got.is_empty(),
        "the will was published although w returned within its delay: {:?}",
        got.iter()
            .map(|p| (text(&p.topic), text(&p.payload)))
            .collect::<Vec<_>>()
    );
    w.disconnect().await;
    s.disconnect().await;
    println!("took {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// 3. A retained publish and its retained record are one write
// ---------------------------------------------------------------------------------------

const TOPICS: u64 = 10;
const PACED: u64 = 40;
const BURST: u64 = 200;

/// How far the publisher got: PUBLISHes written to the socket, PUBACKs received.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    sent: u64,
    acked: u64,
}

/// When the broker is killed.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// Once this many PUBLISHes were written to the socket.
    Sent(u64),
    /// Once this many PUBACKs came.
    Acked(u64),
}

impl KillAt {
    fn reached(self, p: Progress) -> bool {
        match self {
            KillAt::Sent(n) => p.sent >= n,
            KillAt::Acked(n) => p.acked >= n,
        }
    }
}

/// Publish retained QoS 1 messages to `r/0`..`r/9` round robin, payload = a counter:
/// `PACED` one at a time (each PUBACK awaited), then `BURST` in flight at once, over and
/// over, until the connection breaks. The publisher SIGKILLs the broker (`pid`) itself,
/// the moment its progress reaches `kill_at`, and returns its progress then.
async fn retained_publisher(port: u16, kill_at: KillAt, pid: u32) -> Progress {
    let (mut p, _) = Mqtt5::connect(
        port,
        Mqtt5Options {
            id: "pub",
            clean_start: true,
            session_expiry: None,
            will: None,
        },
    )
    .await;
    let mut progress = Progress::default();
    let mut seq = 0u64;
    // Wait for `n` PUBACKs, counting what is sent meanwhile. `Err(progress)` once the
    // broker is killed.
    async fn wait_acks(
        p: &mut Mqtt5,
        n: u64,
        progress: &mut Progress,
        kill_at: KillAt,
        pid: u32,
    ) -> Result<(), Progress> {
        let mut seen = 0;
        while seen < n {
            match p.next(Duration::from_secs(10)).await {
                Some(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                    assert_eq!(a.reason, rumqttc::v5::mqttbytes::v5::PubAckReason::Success);
                    seen += 1;
                    progress.acked += 1;
                }
                Some(Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_)))) => progress.sent += 1,
                Some(Ok(_)) => continue,
                Some(Err(e)) => panic!("publisher: connection lost before the kill: {e}"),
                None => panic!("publisher: no PUBACK within 10 s ({progress:?})"),
            }
            if kill_at.reached(*progress) {
                let pid = rustix::process::Pid::from_raw(pid as i32).expect("a pid");
                rustix::process::kill_process(pid, rustix::process::Signal::KILL)
                    .expect("SIGKILL mqgate");
                return Err(*progress);
            }
        }
        Ok(())
    }
    loop {
        for _ in 0..PACED {
            let topic = format!("r/{}", seq % TOPICS);
            p.client
                .publish(topic, QoS::AtLeastOnce, true, seq.to_string())
                .await
                .expect("PUBLISH queued");
            seq += 1;
            if let Err(at) = wait_acks(&mut p, 1, &mut progress, kill_at, pid).await {
                return at;
            }
        }
        for _ in 0..BURST {
            let topic = format!("r/{}", seq % TOPICS);
            p.client
                .publish(topic, QoS::AtLeastOnce, true, seq.to_string())
                .await
                .expect("PUBLISH queued");
            seq += 1;
        }
        if let Err(at) = wait_acks(&mut p, BURST, &mut progress, kill_at, pid).await {
            return at;
        }
    }
}

async fn retained_round(kill_at: KillAt) {
    let mut b = Node::start_temp();
    persistent_subscriber(b.mqtt, "rs", "r/#").await;

    let publisher = tokio::spawn(retained_publisher(b.mqtt, kill_at, b.pid()));
    let at_kill = tokio::time::timeout(Duration::from_secs(30), publisher)
        .await
        .expect("the publisher reached its kill point within 30 s")
        .expect("publisher");
    // Reap it (it is dead already), and start again.
    b.sigkill();
    b.restart();

    // The retained message of each topic, seen by a fresh clean subscriber.
    let (mut fresh, _) = Mqtt5::connect(
        b.mqtt,
        Mqtt5Options {
            id: "fresh",
            clean_start: true,
            session_expiry: None,
            will: None,
        },
    )
    .await;
    fresh.subscribe("r/#").await;
    let mut retained: BTreeMap<String, String> = BTreeMap::new();
    for p in fresh
        .collect(Duration::from_secs(2), Duration::from_secs(2))
        .await
    {
        assert!(
            p.retain,
            "a live message on {} with nobody publishing",
            text(&p.topic)
        );
        let prev = retained.insert(text(&p.topic), text(&p.payload));
        assert!(
            prev.is_none(),
            "two retained messages for {}",
            text(&p.topic)
        );
    }
    fresh.disconnect().await;

    // S's backlog: the last message per topic.
    let (mut s, present) = Mqtt5::connect(
        b.mqtt,
        Mqtt5Options {
            id: "rs",
            clean_start: false,
            session_expiry: Some(SESSION_EXPIRY),
            will: None,
        },
    )
    .await;
    assert!(present, "the subscriber's session survived the restart");
    let backlog = s
        .collect(Duration::from_secs(2), Duration::from_secs(30))
        .await;
    s.disconnect().await;
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut highest: BTreeMap<String, u64> = BTreeMap::new();
    for p in &backlog {
        let topic = text(&p.topic);
        let n: u64 = text(&p.payload).parse().expect("a counter");
        assert_eq!(
            format!("r/{}", n % TOPICS),
            topic,
            "payload {n} on the wrong topic"
        );
        last.insert(topic.clone(), n);
        let h = highest.entry(topic).or_insert(n);
        *h = (*h).max(n);
    }
    println!(
        "kill at {kill_at:?} ({at_kill:?} when killed): S got {} messages; retained {:?}; \
         last in S {:?}",
        backlog.len(),
        retained,
        last
    );
    assert_eq!(last, highest, "S received a topic's messages out of order");
    for t in 0..TOPICS {
        let topic = format!("r/{t}");
        let r = retained
            .get(&topic)
            .map(|s| s.parse::<u64>().expect("a counter"));
        let l = last.get(&topic).copied();
        assert_eq!(
            r, l,
            "kill at {kill_at:?}: {topic}: retained message {r:?} but the last message stored \
             for the subscriber is {l:?} (the publish and its retained record are one write)"
        );
    }
    // Everything acknowledged before the kill was stored.
    let stored: u64 = last.values().map(|&n| n + 1).max().unwrap_or(0);
    assert!(
        stored >= at_kill.acked,
        "kill at {kill_at:?}: {} publishes acknowledged, only {stored} stored",
        at_kill.acked
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retained_and_its_publish_are_one_write() {
    let started = Instant::now();
    // Publishes 0..40 are paced, 40..240 a burst, 240..280 paced, 280..480 a burst.
    // Killed: paced, with one publish on its way; in the first burst once 100 of its
    // PUBLISHes are on the wire (rumqttc writes them in a few flushes: about 200 in
    // flight); in the first burst once 100 are acknowledged; the same in the second.
    for kill_at in [
        KillAt::Sent(21),
        KillAt::Sent(140),
        KillAt::Acked(140),
        KillAt::Acked(380),
    ] {
        retained_round(kill_at).await;
    }
    println!("took {:?}", started.elapsed());
}

//! AMQP 0-9-1 conformance: the behaviours of the AMQP adapter through a real client
//! (lapin) and, for what real clients never send, a raw-frame client on amq-protocol.
//!
//! Each scenario runs on an in-process mqgate on both backends, or, with
//! `MQGATE_AMQP_URL=amqp://guest:guest@host:port/%2f`, once against that broker.
//! Scenarios that need mqgate (its extensions) are skipped there.
//!
//! Reply codes asserted are the ones RabbitMQ 3.10 sends (see conformance/README.md).

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::protocol::{self, AMQPClass};
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, Consumer, ExchangeKind};
use mqgate_conformance::amqp::{Backend, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(5);
const QUIET: Duration = Duration::from_millis(400);

use mqgate_conformance::scenario_clustered as scenario;

// ---------------------------------------------------------------------------------------
// Helpers over lapin.

/// A name unique to this run (an external broker keeps what earlier runs left).
fn uniq(base: &str) -> String {
    static RUN: OnceLock<u64> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let n = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_nanos() as u64;
        n ^ u64::from(std::process::id())
    });
    format!("{base}.{:x}", run & 0xff_ffff_ffff)
}

fn s(v: &str) -> ShortString {
    v.into()
}

fn ls(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v))
}

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(s(k), v.clone());
    }
    t
}

fn no_args() -> FieldTable {
    FieldTable::default()
}

/// The AMQP reply code of a protocol error (a channel or connection exception).
fn code(e: &lapin::Error) -> u16 {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_id(),
        other => panic!("expected an AMQP exception, got {other:?}"),
    }
}

fn text(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => p.get_message().to_string(),
        other => format!("{other:?}"),
    }
}

#[track_caller]
fn expect_code<T: std::fmt::Debug>(r: lapin::Result<T>, want: u16, what: &str) {
    match r {
        Ok(v) => panic!("{what}: expected a {want} exception, got Ok({v:?})"),
        Err(e) => assert_eq!(code(&e), want, "{what}: {e}"),
    }
}

/// A channel with publisher confirms on.
async fn chan(conn: &Connection) -> Channel {
    let ch = conn.create_channel().await.expect("channel.open");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    ch
}

/// A channel without confirms.
async fn plain(conn: &Connection) -> Channel {
    conn.create_channel().await.expect("channel.open")
}

/// The connection still works: a new channel declares a server-named queue.
async fn alive(conn: &Connection, what: &str) {
    let ch = conn
        .create_channel()
        .await
        .unwrap_or_else(|e| panic!("{what}: the connection no longer works: {e}"));
    ch.queue_declare(
        s(""),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .unwrap_or_else(|e| panic!("{what}: the connection no longer works: {e}"));
    let _ = ch.close(200, s("bye")).await;
}

async fn declare(ch: &Channel, name: &str, args: FieldTable) -> lapin::Queue {
    ch.queue_declare(s(name), QueueDeclareOptions::default(), args)
        .await
        .unwrap_or_else(|e| panic!("declare {name}: {e}"))
}

async fn declare_with(
    ch: &Channel,
    name: &str,
    opts: QueueDeclareOptions,
    args: FieldTable,
) -> lapin::Queue {
    ch.queue_declare(s(name), opts, args)
        .await
        .unwrap_or_else(|e| panic!("declare {name}: {e}"))
}

async fn exchange(ch: &Channel, name: &str, kind: ExchangeKind, args: FieldTable) {
    ch.exchange_declare(s(name), kind, ExchangeDeclareOptions::default(), args)
        .await
        .unwrap_or_else(|e| panic!("declare exchange {name}: {e}"));
}

async fn bind(ch: &Channel, q: &str, ex: &str, key: &str, args: FieldTable) {
    ch.queue_bind(s(q), s(ex), s(key), QueueBindOptions::default(), args)
        .await
        .unwrap_or_else(|e| panic!("bind {q} to {ex} with {key}: {e}"));
}

async fn delete_queue(conn: &Connection, q: &str) {
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch.queue_delete(s(q), QueueDeleteOptions::default()).await;
        let _ = ch.close(200, s("bye")).await;
    }
}

async fn delete_exchange(conn: &Connection, e: &str) {
    if let Ok(ch) = conn.create_channel().await {
        let _ = ch
            .exchange_delete(s(e), ExchangeDeleteOptions::default())
            .await;
        let _ = ch.close(200, s("bye")).await;
    }
}

/// Publish and wait for the broker's confirm (the channel is in confirm mode, or not:
/// then nothing is awaited beyond the write).
async fn publish_props(
    ch: &Channel,
    ex: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) -> Confirmation {
    ch.basic_publish(s(ex), s(key), BasicPublishOptions::default(), body, props)
        .await
        .unwrap_or_else(|e| panic!("publish to {ex:?}/{key:?}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("confirm of a publish to {ex:?}/{key:?}: {e}"))
}

async fn publish(ch: &Channel, ex: &str, key: &str, body: &str) {
    let c = publish_props(ch, ex, key, body.as_bytes(), BasicProperties::default()).await;
    assert!(
        matches!(c, Confirmation::Ack(None) | Confirmation::NotRequested),
        "publish of {body:?} to {ex:?}/{key:?}: {c:?}"
    );
}

/// Publish on a confirm-mode channel and expect the channel closed with `want`.
async fn publish_refused(ch: &Channel, ex: &str, key: &str, body: &[u8], want: u16, what: &str) {
    let r = ch
        .basic_publish(
            s(ex),
            s(key),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .expect("publish write");
    expect_code(r.await, want, what);
}

async fn consume(ch: &Channel, q: &str, tag: &str, no_ack: bool) -> Consumer {
    consume_args(ch, q, tag, no_ack, no_args()).await
}

async fn consume_args(
    ch: &Channel,
    q: &str,
    tag: &str,
    no_ack: bool,
    args: FieldTable,
) -> Consumer {
    ch.basic_consume(
        s(q),
        s(tag),
        BasicConsumeOptions {
            no_ack,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap_or_else(|e| panic!("consume {q}: {e}"))
}

async fn next(c: &mut Consumer, what: &str) -> Delivery {
    match tokio::time::timeout(WAIT, c.next()).await {
        Err(_) => panic!("{what}: nothing delivered within 5 s"),
        Ok(None) => panic!("{what}: the consumer ended"),
        Ok(Some(Err(e))) => panic!("{what}: {e}"),
        Ok(Some(Ok(d))) => d,
    }
}

fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

async fn bodies(c: &mut Consumer, n: usize, what: &str) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(body(&next(c, what).await));
    }
    out
}

async fn quiet(c: &mut Consumer, what: &str) {
    if let Ok(Some(d)) = tokio::time::timeout(QUIET, c.next()).await {
        panic!(
            "{what}: unexpected delivery {:?}",
            d.map(|d| body(&d)).map_err(|e| e.to_string())
        );
    }
}

async fn get(ch: &Channel, q: &str) -> Option<lapin::message::BasicGetMessage> {
    ch.basic_get(s(q), BasicGetOptions { no_ack: true })
        .await
        .unwrap_or_else(|e| panic!("get {q}: {e}"))
}

async fn get_body(ch: &Channel, q: &str) -> Option<String> {
    get(ch, q).await.map(|m| body(&m.delivery))
}

/// Whether a queue exists (a passive declare on a throwaway channel).
async fn queue_exists(conn: &Connection, q: &str) -> bool {
    let ch = plain(conn).await;
    let r = ch
        .queue_declare(
            s(q),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await;
    match r {
        Ok(_) => {
            let _ = ch.close(200, s("bye")).await;
            true
        }
        // 405: it exists, exclusive to another connection (one that may be closing).
        Err(e) if code(&e) == 405 => true,
        Err(e) => {
            assert_eq!(code(&e), 404, "passive declare of {q}: {e}");
            false
        }
    }
}

async fn exchange_exists(conn: &Connection, e: &str) -> bool {
    let ch = plain(conn).await;
    let r = ch
        .exchange_declare(
            s(e),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await;
    match r {
        Ok(()) => {
            let _ = ch.close(200, s("bye")).await;
            true
        }
        Err(err) => {
            assert_eq!(code(&err), 404, "passive declare of exchange {e}: {err}");
            false
        }
    }
}

/// Poll until `f` says true (within 5 s).
macro_rules! eventually {
    ($what:expr, $cond:expr) => {{
        let deadline = Instant::now() + WAIT;
        loop {
            if $cond {
                break;
            }
            if Instant::now() > deadline {
                panic!("{}: not within 5 s", $what);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }};
}

/// Publish `m<i>` for each `i` of `range` to queue `q`, all in flight at once (a burst),
/// then wait for every confirm.
async fn publish_burst(ch: &Channel, q: &str, range: std::ops::Range<usize>) {
    let mut confirms = Vec::new();
    for i in range {
        confirms.push(
            ch.basic_publish(
                s(""),
                s(q),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        assert!(matches!(c.await.expect("confirm"), Confirmation::Ack(None)));
    }
}

async fn count(ch: &Channel, q: &str) -> u32 {
    ch.queue_declare(
        s(q),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .unwrap_or_else(|e| panic!("passive declare {q}: {e}"))
    .message_count()
}

fn as_str(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(l) => String::from_utf8_lossy(l.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        other => panic!("expected a string, got {other:?}"),
    }
}

fn as_int(v: &AMQPValue) -> i64 {
    match v {
        AMQPValue::ShortShortInt(i) => i64::from(*i),
        AMQPValue::ShortShortUInt(i) => i64::from(*i),
        AMQPValue::ShortInt(i) => i64::from(*i),
        AMQPValue::ShortUInt(i) => i64::from(*i),
        AMQPValue::LongInt(i) => i64::from(*i),
        AMQPValue::LongUInt(i) => i64::from(*i),
        AMQPValue::LongLongInt(i) => *i,
        other => panic!("expected an integer, got {other:?}"),
    }
}

fn header<'a>(d: &'a Delivery, k: &str) -> Option<&'a AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(k))
}

// ---------------------------------------------------------------------------------------
// Raw-frame client (amq-protocol's codec from lapin) for what real clients never send.

const HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

#[derive(Debug)]
#[allow(dead_code)] // read through Debug in failure messages
enum Frame {
    Method(u16, AMQPClass),
    Header(u16, Vec<u8>),
    Body(u16, Vec<u8>),
    Heartbeat(u16),
}

#[derive(Debug, PartialEq)]
enum End {
    Closed,
    Timeout,
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

fn conn_method(m: protocol::connection::AMQPMethod) -> AMQPClass {
    AMQPClass::Connection(m)
}

fn caps() -> FieldTable {
    let c = table(&[("authentication_failure_close", AMQPValue::Boolean(true))]);
    table(&[("capabilities", AMQPValue::FieldTable(c))])
}

fn encode(m: &AMQPClass) -> Vec<u8> {
    protocol::gen_class(m)(Vec::new().into())
        .expect("encode method")
        .write
}

fn decode(p: &[u8]) -> AMQPClass {
    protocol::parse_class(p)
        .map(|(_, c)| c)
        .expect("decode method")
}

/// A content header frame payload for class basic with no properties.
fn content_header(size: u64) -> Vec<u8> {
    let mut h = vec![0, 60, 0, 0];
    h.extend_from_slice(&size.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h
}

fn publish_method(ex: &str, key: &str) -> AMQPClass {
    AMQPClass::Basic(protocol::basic::AMQPMethod::Publish(
        protocol::basic::Publish {
            exchange: s(ex),
            routing_key: s(key),
            ..Default::default()
        },
    ))
}

impl Raw {
    async fn tcp(t: &Target) -> Raw {
        let s = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .expect("tcp connect");
        s.set_nodelay(true).expect("nodelay");
        Raw { s, buf: Vec::new() }
    }

    async fn write(&mut self, b: &[u8]) {
        let _ = self.s.write_all(b).await;
    }

    async fn frame(&mut self, typ: u8, ch: u16, payload: &[u8]) {
        let mut f = vec![typ];
        f.extend_from_slice(&ch.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        self.write(&f).await;
    }

    async fn method(&mut self, ch: u16, m: AMQPClass) {
        let p = encode(&m);
        self.frame(1, ch, &p).await;
    }

    async fn fill(&mut self, n: usize, within: Duration) -> Result<(), End> {
        let deadline = tokio::time::Instant::now() + within;
        while self.buf.len() < n {
            let mut b = vec![0u8; 65536];
            match tokio::time::timeout_at(deadline, self.s.read(&mut b)).await {
                Err(_) => return Err(End::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(End::Closed),
                Ok(Ok(k)) => self.buf.extend_from_slice(&b[..k]),
            }
        }
        Ok(())
    }

    async fn bytes(&mut self, n: usize, within: Duration) -> Result<Vec<u8>, End> {
        self.fill(n, within).await?;
        Ok(self.buf.drain(..n).collect())
    }

    async fn next(&mut self, within: Duration) -> Result<Frame, End> {
        self.fill(7, within).await?;
        let typ = self.buf[0];
        let ch = u16::from_be_bytes([self.buf[1], self.buf[2]]);
        let len = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]]) as usize;
        self.fill(8 + len, within).await?;
        let f: Vec<u8> = self.buf.drain(..8 + len).collect();
        assert_eq!(f[7 + len], 0xCE, "frame end octet from the server");
        let p = f[7..7 + len].to_vec();
        Ok(match typ {
            1 => Frame::Method(ch, decode(&p)),
            2 => Frame::Header(ch, p),
            3 => Frame::Body(ch, p),
            8 => Frame::Heartbeat(ch),
            other => panic!("unknown frame type {other} from the server"),
        })
    }

    async fn next_method(&mut self, within: Duration) -> Result<(u16, AMQPClass), End> {
        loop {
            match self.next(within).await? {
                Frame::Method(ch, m) => return Ok((ch, m)),
                Frame::Heartbeat(_) => {}
                other => panic!("expected a method, got {other:?}"),
            }
        }
    }

    /// Header, start (returned), start-ok with this mechanism and response.
    async fn start(
        t: &Target,
        mechanism: &str,
        response: Vec<u8>,
    ) -> (Raw, protocol::connection::Start) {
        let mut r = Raw::tcp(t).await;
        r.write(HEADER).await;
        let start = match r.next_method(WAIT).await.expect("connection.start") {
            (0, AMQPClass::Connection(protocol::connection::AMQPMethod::Start(st))) => st,
            other => panic!("expected connection.start, got {other:?}"),
        };
        r.method(
            0,
            conn_method(protocol::connection::AMQPMethod::StartOk(
                protocol::connection::StartOk {
                    client_properties: caps(),
                    mechanism: s(mechanism),
                    response: LongString::from(response),
                    locale: s("en_US"),
                },
            )),
        )
        .await;
        (r, start)
    }

    /// After start-ok: tune (answered with this heartbeat), open. Err: the close.
    async fn finish(
        mut self,
        vhost: &str,
        heartbeat: u16,
    ) -> Result<(Raw, protocol::connection::Tune), (u16, String)> {
        let tune = match self.next_method(WAIT).await.expect("tune or close").1 {
            AMQPClass::Connection(protocol::connection::AMQPMethod::Tune(tune)) => tune,
            AMQPClass::Connection(protocol::connection::AMQPMethod::Close(c)) => {
                return Err((c.reply_code, c.reply_text.to_string()))
            }
            other => panic!("expected connection.tune, got {other:?}"),
        };
        self.method(
            0,
            conn_method(protocol::connection::AMQPMethod::TuneOk(
                protocol::connection::TuneOk {
                    channel_max: 16,
                    frame_max: 4096,
                    heartbeat,
                },
            )),
        )
        .await;
        self.method(
            0,
            conn_method(protocol::connection::AMQPMethod::Open(
                protocol::connection::Open {
                    virtual_host: s(vhost),
                },
            )),
        )
        .await;
        match self.next_method(WAIT).await.expect("open-ok or close").1 {
            AMQPClass::Connection(protocol::connection::AMQPMethod::OpenOk(_)) => Ok((self, tune)),
            AMQPClass::Connection(protocol::connection::AMQPMethod::Close(c)) => {
                Err((c.reply_code, c.reply_text.to_string()))
            }
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
    }

    /// PLAIN login, frame_max 4096, no heartbeats.
    async fn login(t: &Target, user: &str, pass: &str, vhost: &str) -> Result<Raw, (u16, String)> {
        let (r, _) = Raw::start(t, "PLAIN", format!("\0{user}\0{pass}").into_bytes()).await;
        r.finish(vhost, 0).await.map(|(r, _)| r)
    }

    async fn guest(t: &Target) -> Raw {
        Raw::login(t, "guest", "guest", "/")
            .await
            .unwrap_or_else(|e| panic!("raw login: {e:?}"))
    }

    async fn open_channel(&mut self, ch: u16) {
        self.method(
            ch,
            AMQPClass::Channel(protocol::channel::AMQPMethod::Open(
                protocol::channel::Open {},
            )),
        )
        .await;
        match self.next_method(WAIT).await {
            Ok((c, AMQPClass::Channel(protocol::channel::AMQPMethod::OpenOk(_)))) if c == ch => {}
            other => panic!("expected channel.open-ok on {ch}, got {other:?}"),
        }
    }

    /// The next methods until a connection.close: its code and text (close-ok sent back);
    /// then the server closes the socket.
    async fn expect_connection_close(&mut self, what: &str) -> (u16, String) {
        loop {
            match self.next(WAIT).await {
                Ok(Frame::Method(
                    0,
                    AMQPClass::Connection(protocol::connection::AMQPMethod::Close(c)),
                )) => {
                    self.method(
                        0,
                        conn_method(protocol::connection::AMQPMethod::CloseOk(
                            protocol::connection::CloseOk {},
                        )),
                    )
                    .await;
                    loop {
                        match self.next(WAIT).await {
                            Err(End::Closed) => break,
                            Err(End::Timeout) => {
                                panic!("{what}: socket still open 5 s after close-ok")
                            }
                            Ok(_) => {}
                        }
                    }
                    return (c.reply_code, c.reply_text.to_string());
                }
                Ok(Frame::Heartbeat(_)) => {}
                Ok(other) => panic!("{what}: expected connection.close, got {other:?}"),
                Err(e) => panic!("{what}: expected connection.close, got {e:?}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Connection

/// A wrong protocol header gets the 0-9-1 header back, then the socket is closed.
async fn protocol_header_mismatch(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    for h in [
        &b"AMQP\x00\x00\x0a\x00"[..],
        b"AMQP\x00\x01\x00\x00",
        b"GET / HT",
    ] {
        let mut r = Raw::tcp(&t).await;
        r.write(h).await;
        let back = r.bytes(8, WAIT).await;
        assert_eq!(back.as_deref(), Ok(HEADER), "header sent back for {h:?}");
        assert_eq!(
            r.bytes(1, WAIT).await,
            Err(End::Closed),
            "closed after the header for {h:?}"
        );
    }
}

/// PLAIN (lapin and raw) and AMQPLAIN (raw) logins.
async fn login_plain_and_amqplain(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    alive(&conn, "lapin PLAIN").await;
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;

    // AMQPLAIN: a field table without its length prefix.
    let mut amqplain = Vec::new();
    for (k, v) in [("LOGIN", "guest"), ("PASSWORD", "guest")] {
        amqplain.push(k.len() as u8);
        amqplain.extend_from_slice(k.as_bytes());
        amqplain.push(b'S');
        amqplain.extend_from_slice(&(v.len() as u32).to_be_bytes());
        amqplain.extend_from_slice(v.as_bytes());
    }
    let (r2, start) = Raw::start(&t, "AMQPLAIN", amqplain).await;
    let mechs = String::from_utf8_lossy(start.mechanisms.as_bytes()).into_owned();
    let mechs: Vec<&str> = mechs.split(' ').collect();
    assert!(mechs.contains(&"PLAIN"), "mechanisms {mechs:?}");
    assert!(mechs.contains(&"AMQPLAIN"), "mechanisms {mechs:?}");
    let (mut r2, _) = r2.finish("/", 0).await.expect("AMQPLAIN login");
    r2.open_channel(1).await;
}

/// A bad password: connection.close 403 (the client announced
/// authentication_failure_close); lapin gets an error too.
async fn bad_password(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let e = Raw::login(&t, "guest", "wrong", "/")
        .await
        .err()
        .expect("login with a bad password refused");
    assert_eq!(e.0, 403, "{e:?}");
    let e = Raw::login(&t, "nobody", "guest", "/")
        .await
        .err()
        .expect("login of an unknown user refused");
    assert_eq!(e.0, 403, "{e:?}");
    let r = Connection::connect(
        &t.url_for("guest", "wrong", "/"),
        lapin::ConnectionProperties::default(),
    )
    .await;
    assert!(r.is_err(), "lapin login with a bad password succeeded");
}

/// connection.start: version 0-9, capabilities.
async fn server_properties(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let (_r, start) = Raw::start(&t, "PLAIN", b"\0guest\0guest".to_vec()).await;
    assert_eq!((start.version_major, start.version_minor), (0, 9));
    let caps = match start.server_properties.inner().get("capabilities") {
        Some(AMQPValue::FieldTable(c)) => c.clone(),
        other => panic!("capabilities: {other:?}"),
    };
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
    ] {
        assert_eq!(
            caps.inner().get(cap),
            Some(&AMQPValue::Boolean(true)),
            "capability {cap} in {caps:?}"
        );
    }
    let locales = String::from_utf8_lossy(start.locales.as_bytes()).into_owned();
    assert!(locales.contains("en_US"), "locales {locales:?}");
}

/// Tune values; a 1 s heartbeat: the server sends heartbeats, and closes a silent client.
async fn tune_and_heartbeats(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let (r, _) = Raw::start(&t, "PLAIN", b"\0guest\0guest".to_vec()).await;
    let (mut r, tune) = r.finish("/", 1).await.expect("login");
    assert!(
        tune.frame_max == 0 || tune.frame_max >= 4096,
        "frame_max {}",
        tune.frame_max
    );
    assert!(
        tune.channel_max == 0 || tune.channel_max >= 1,
        "channel_max {}",
        tune.channel_max
    );
    // Phase 1: we send heartbeats; the server must too, and keep the connection.
    let mut seen = 0;
    let until = Instant::now() + Duration::from_millis(2500);
    while Instant::now() < until {
        r.frame(8, 0, &[]).await;
        match r.next(Duration::from_millis(250)).await {
            Ok(Frame::Heartbeat(0)) => seen += 1,
            Ok(other) => panic!("unexpected frame with heartbeats on: {other:?}"),
            Err(End::Timeout) => {}
            Err(End::Closed) => panic!("closed although the client sends heartbeats"),
        }
    }
    assert!(seen >= 1, "no heartbeat from the server in 2.5 s");
    // Phase 2: silence; the server gives up within a few heartbeat intervals.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match r.next(Duration::from_secs(1)).await {
            Err(End::Closed) => break,
            Ok(Frame::Method(
                0,
                AMQPClass::Connection(protocol::connection::AMQPMethod::Close(_)),
            )) => break,
            Ok(_) | Err(End::Timeout) => {}
        }
        assert!(
            Instant::now() < deadline,
            "a silent client not closed within 10 s (heartbeat 1 s)"
        );
    }
}

/// Unknown vhost: 530; the limited user on vhost `other`: 530.
async fn vhost_access(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let e = Raw::login(&t, "guest", "guest", "no-such-vhost")
        .await
        .err()
        .expect("unknown vhost refused");
    assert_eq!(e.0, 530, "{e:?}");
    let e = Raw::login(&t, "limited", "limited", "other")
        .await
        .err()
        .expect("limited on vhost other refused");
    assert_eq!(e.0, 530, "{e:?}");
    // guest on `other` is fine, and `other` is a separate namespace.
    let conn = Connection::connect(
        &t.url_for("guest", "guest", "other"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("guest on vhost other");
    let q = uniq("vhost.q");
    let ch = chan(&conn).await;
    declare(&ch, &q, no_args()).await;
    publish(&ch, "", &q, "in other").await;
    let root = t.connect().await;
    assert!(
        !queue_exists(&root, &q).await,
        "{q} of vhost other seen in /"
    );
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some("in other"));
    delete_queue(&conn, &q).await;
}

/// The limited user: configure only `^limited\.`: declaring `other.q` is 403 on the
/// channel, `limited.q` works on the same connection.
async fn limited_user_permissions(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = Connection::connect(
        &t.url_for("limited", "limited", "/"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("limited on /");
    let ch = plain(&conn).await;
    let other = uniq("other.q");
    expect_code(
        ch.queue_declare(s(&other), QueueDeclareOptions::default(), no_args())
            .await,
        403,
        "limited declares other.q",
    );
    let ch = chan(&conn).await;
    let q = uniq("limited.q");
    let ex = uniq("limited.x");
    declare(&ch, &q, no_args()).await;
    exchange(&ch, &ex, ExchangeKind::Direct, no_args()).await;
    bind(&ch, &q, &ex, "k", no_args()).await;
    publish(&ch, &ex, "k", "mine").await;
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some("mine"));
    // Write is `^limited\.` too: publishing to the default exchange is refused.
    let ch2 = chan(&conn).await;
    publish_refused(
        &ch2,
        "",
        &q,
        b"x",
        403,
        "publish to the default exchange as limited",
    )
    .await;
    ch.exchange_delete(s(&ex), ExchangeDeleteOptions::default())
        .await
        .expect("delete limited.x");
    ch.queue_delete(s(&q), QueueDeleteOptions::default())
        .await
        .expect("delete limited.q");
    // The connection still works (the limited user can declare `limited.*` only).
    let ch = plain(&conn).await;
    let q2 = uniq("limited.after");
    declare_with(
        &ch,
        &q2,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        no_args(),
    )
    .await;
}

/// Client close handshake (raw: close, close-ok, socket closed; lapin close).
async fn close_handshake(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    r.method(
        1,
        AMQPClass::Channel(protocol::channel::AMQPMethod::Close(
            protocol::channel::Close {
                reply_code: 200,
                reply_text: s("bye"),
                class_id: 0,
                method_id: 0,
            },
        )),
    )
    .await;
    match r.next_method(WAIT).await {
        Ok((1, AMQPClass::Channel(protocol::channel::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected channel.close-ok, got {other:?}"),
    }
    r.method(
        0,
        conn_method(protocol::connection::AMQPMethod::Close(
            protocol::connection::Close {
                reply_code: 200,
                reply_text: s("bye"),
                class_id: 0,
                method_id: 0,
            },
        )),
    )
    .await;
    match r.next_method(WAIT).await {
        Ok((0, AMQPClass::Connection(protocol::connection::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected connection.close-ok, got {other:?}"),
    }
    // The client closes the socket now (RabbitMQ leaves that to the client); nothing
    // more may come from the server.
    assert!(
        r.next(QUIET).await.is_err(),
        "a frame after connection.close-ok"
    );
    let conn = t.connect().await;
    conn.close(200, s("bye")).await.expect("lapin close");
}

// ---------------------------------------------------------------------------------------
// Channels

/// Several channels; closing one leaves the others; channel.flow active=true.
async fn channels_open_close_flow(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let a = chan(&conn).await;
    let b = chan(&conn).await;
    let c = plain(&conn).await;
    assert_ne!(a.id(), b.id());
    let q = uniq("chan.q");
    declare(&a, &q, no_args()).await;
    b.close(200, s("bye")).await.expect("channel.close");
    publish(&a, "", &q, "after close").await;
    let active = c
        .channel_flow(ChannelFlowOptions { active: true })
        .await
        .expect("channel.flow");
    assert!(active, "flow-ok active");
    assert_eq!(get_body(&c, &q).await.as_deref(), Some("after close"));
    a.queue_delete(s(&q), QueueDeleteOptions::default())
        .await
        .expect("delete");
}

/// A second channel.open on an open channel: connection exception 504.
async fn channel_reopen(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    r.method(
        1,
        AMQPClass::Channel(protocol::channel::AMQPMethod::Open(
            protocol::channel::Open {},
        )),
    )
    .await;
    let (code, text) = r.expect_connection_close("second channel.open").await;
    assert_eq!(code, 504, "{text}");
    alive(&t.connect().await, "a new connection").await;
}

/// A method on a channel never opened: connection exception 504.
async fn method_on_unopened_channel(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let mut r = Raw::guest(&t).await;
    r.method(
        5,
        AMQPClass::Queue(protocol::queue::AMQPMethod::Declare(Default::default())),
    )
    .await;
    let (code, text) = r
        .expect_connection_close("queue.declare on channel 5")
        .await;
    assert_eq!(code, 504, "{text}");
    alive(&t.connect().await, "a new connection").await;
}

/// RabbitMQ 3 dropped basic.publish `immediate`: connection.close 540 "immediate=true".
async fn publish_immediate_is_not_implemented(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    r.method(
        1,
        AMQPClass::Basic(protocol::basic::AMQPMethod::Publish(
            protocol::basic::Publish {
                exchange: s(""),
                routing_key: s("nowhere"),
                immediate: true,
                ..Default::default()
            },
        )),
    )
    .await;
    r.frame(2, 1, &content_header(0)).await;
    let (code, text) = r.expect_connection_close("publish with immediate").await;
    assert_eq!(code, 540, "{text}");
    assert!(text.contains("immediate=true"), "{text}");
    alive(&t.connect().await, "a new connection").await;
}

/// The default exchange cannot be declared, not even passively: channel.close 403.
async fn default_exchange_cannot_be_declared(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    expect_code(
        ch.exchange_declare(
            "".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await,
        403,
        "passive declare of the default exchange",
    );
    alive(&conn, "the connection").await;
}

// ---------------------------------------------------------------------------------------
// Exchanges

/// Direct, fanout and the default exchange route as they should.
async fn direct_fanout_default(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let (d, f) = (uniq("dfd.direct"), uniq("dfd.fanout"));
    let (q1, q2) = (uniq("dfd.q1"), uniq("dfd.q2"));
    exchange(&ch, &d, ExchangeKind::Direct, no_args()).await;
    exchange(&ch, &f, ExchangeKind::Fanout, no_args()).await;
    for q in [&q1, &q2] {
        declare(&ch, q, no_args()).await;
        bind(&ch, q, &f, "ignored", no_args()).await;
    }
    bind(&ch, &q1, &d, "k1", no_args()).await;
    bind(&ch, &q2, &d, "k2", no_args()).await;
    publish(&ch, &d, "k1", "direct k1").await;
    publish(&ch, &d, "k2", "direct k2").await;
    publish(&ch, &d, "nobody", "direct nobody").await;
    publish(&ch, &f, "whatever", "fanout").await;
    publish(&ch, "", &q1, "default").await;
    let mut got1 = Vec::new();
    while let Some(b) = get_body(&ch, &q1).await {
        got1.push(b);
    }
    let mut got2 = Vec::new();
    while let Some(b) = get_body(&ch, &q2).await {
        got2.push(b);
    }
    assert_eq!(got1, ["direct k1", "fanout", "default"]);
    assert_eq!(got2, ["direct k2", "fanout"]);
    for q in [&q1, &q2] {
        delete_queue(&conn, q).await;
    }
    delete_exchange(&conn, &d).await;
    delete_exchange(&conn, &f).await;
}

/// Topic exchange: `*` matches one word, `#` zero or more.
async fn topic_wildcards(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let ex = uniq("topic.x");
    exchange(&ch, &ex, ExchangeKind::Topic, no_args()).await;
    let patterns = ["a.*.c", "a.#", "#", "*.b", "a.#.c"];
    let mut qs = Vec::new();
    for (i, p) in patterns.iter().enumerate() {
        let q = uniq(&format!("topic.q{i}"));
        declare(&ch, &q, no_args()).await;
        bind(&ch, &q, &ex, p, no_args()).await;
        qs.push(q);
    }
    for key in ["a.b.c", "a", "a.b", "a.x.y.c", "x.b", "b", ""] {
        publish(&ch, &ex, key, key).await;
    }
    let want: [&[&str]; 5] = [
        &["a.b.c"],
        &["a.b.c", "a", "a.b", "a.x.y.c"],
        &["a.b.c", "a", "a.b", "a.x.y.c", "x.b", "b", ""],
        &["a.b", "x.b"],
        &["a.b.c", "a.x.y.c"],
    ];
    for ((q, p), w) in qs.iter().zip(patterns).zip(want) {
        let mut got = Vec::new();
        while let Some(b) = get_body(&ch, q).await {
            got.push(b);
        }
        assert_eq!(got, w, "binding {p}");
        delete_queue(&conn, q).await;
    }
    delete_exchange(&conn, &ex).await;
}

/// Headers exchange: x-match all and any.
async fn headers_exchange(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let ex = uniq("hdr.x");
    exchange(&ch, &ex, ExchangeKind::Headers, no_args()).await;
    let (qall, qany) = (uniq("hdr.all"), uniq("hdr.any"));
    declare(&ch, &qall, no_args()).await;
    declare(&ch, &qany, no_args()).await;
    bind(
        &ch,
        &qall,
        &ex,
        "",
        table(&[("x-match", ls("all")), ("a", ls("1")), ("b", ls("2"))]),
    )
    .await;
    bind(
        &ch,
        &qany,
        &ex,
        "",
        table(&[("x-match", ls("any")), ("a", ls("1")), ("b", ls("2"))]),
    )
    .await;
    let cases: [(&str, FieldTable); 4] = [
        (
            "both",
            table(&[("a", ls("1")), ("b", ls("2")), ("c", ls("3"))]),
        ),
        ("a only", table(&[("a", ls("1"))])),
        ("a wrong", table(&[("a", ls("9")), ("b", ls("2"))])),
        ("none", table(&[("c", ls("3"))])),
    ];
    for (name, h) in cases {
        let c = publish_props(
            &ch,
            &ex,
            "",
            name.as_bytes(),
            BasicProperties::default().with_headers(h),
        )
        .await;
        assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
    }
    let mut all = Vec::new();
    while let Some(b) = get_body(&ch, &qall).await {
        all.push(b);
    }
    let mut any = Vec::new();
    while let Some(b) = get_body(&ch, &qany).await {
        any.push(b);
    }
    assert_eq!(all, ["both"], "x-match all");
    assert_eq!(any, ["both", "a only", "a wrong"], "x-match any");
    delete_queue(&conn, &qall).await;
    delete_queue(&conn, &qany).await;
    delete_exchange(&conn, &ex).await;
}

/// `x-match: any-with-x` / `all-with-x` (RabbitMQ 3.10): `x-` headers are matched too.
async fn headers_exchange_with_x(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let ex = uniq("hdrx.x");
    exchange(&ch, &ex, ExchangeKind::Headers, no_args()).await;
    let (qany, qall, qplain) = (uniq("hdrx.any"), uniq("hdrx.all"), uniq("hdrx.plain"));
    for q in [&qany, &qall, &qplain] {
        declare(&ch, q, no_args()).await;
    }
    let binding = |mode: &str| {
        table(&[
            ("x-match", ls(mode)),
            ("x-tenant", ls("a")),
            ("kind", ls("k")),
        ])
    };
    bind(&ch, &qany, &ex, "", binding("any-with-x")).await;
    bind(&ch, &qall, &ex, "", binding("all-with-x")).await;
    // The plain mode leaves `x-tenant` out: `kind` alone decides.
    bind(&ch, &qplain, &ex, "", binding("all")).await;
    let cases: [(&str, FieldTable); 4] = [
        ("tenant", table(&[("x-tenant", ls("a"))])),
        ("both", table(&[("x-tenant", ls("a")), ("kind", ls("k"))])),
        ("kind", table(&[("kind", ls("k"))])),
        ("other tenant", table(&[("x-tenant", ls("b"))])),
    ];
    for (name, h) in cases {
        publish_props(
            &ch,
            &ex,
            "",
            name.as_bytes(),
            BasicProperties::default().with_headers(h),
        )
        .await;
    }
    let mut got = Vec::new();
    for q in [&qany, &qall, &qplain] {
        let mut bodies = Vec::new();
        while let Some(b) = get_body(&ch, q).await {
            bodies.push(b);
        }
        got.push(bodies);
    }
    assert_eq!(got[0], ["tenant", "both", "kind"], "any-with-x");
    assert_eq!(got[1], ["both"], "all-with-x");
    assert_eq!(got[2], ["both", "kind"], "all, without x- headers");
    for q in [&qany, &qall, &qplain] {
        delete_queue(&conn, q).await;
    }
    delete_exchange(&conn, &ex).await;
}

/// The amq.* exchanges exist with their types, and route.
async fn amq_exchanges(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        ch.exchange_declare(
            s(name),
            kind,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .unwrap_or_else(|e| panic!("passive declare {name}: {e}"));
        // Redeclaring with the same type and durable=true is fine too.
        ch.exchange_declare(
            s(name),
            match name {
                "amq.direct" => ExchangeKind::Direct,
                "amq.fanout" => ExchangeKind::Fanout,
                "amq.topic" => ExchangeKind::Topic,
                _ => ExchangeKind::Headers,
            },
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .unwrap_or_else(|e| panic!("redeclare {name}: {e}"));
    }
    let q = uniq("amqx.q");
    declare(&ch, &q, no_args()).await;
    bind(&ch, &q, "amq.direct", &q, no_args()).await;
    bind(&ch, &q, "amq.fanout", "", no_args()).await;
    bind(&ch, &q, "amq.topic", "amqx.#", no_args()).await;
    publish(&ch, "amq.direct", &q, "direct").await;
    publish(&ch, "amq.fanout", "", "fanout").await;
    publish(&ch, "amq.topic", "amqx.z", "topic").await;
    let mut got = Vec::new();
    while let Some(b) = get_body(&ch, &q).await {
        got.push(b);
    }
    assert_eq!(got, ["direct", "fanout", "topic"]);
    delete_queue(&conn, &q).await;
}

/// Exchange exceptions: passive missing 404, other type 406, amq.foo 403, internal
/// publish 403, delete if-unused when bound 406; the connection keeps working.
async fn exchange_errors(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let missing = uniq("exerr.missing");
    let ch = plain(&conn).await;
    expect_code(
        ch.exchange_declare(
            s(&missing),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await,
        404,
        "passive declare of a missing exchange",
    );
    alive(&conn, "after 404").await;

    let ex = uniq("exerr.x");
    let ch = plain(&conn).await;
    exchange(&ch, &ex, ExchangeKind::Direct, no_args()).await;
    expect_code(
        ch.exchange_declare(
            s(&ex),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            no_args(),
        )
        .await,
        406,
        "redeclare with another type",
    );
    alive(&conn, "after 406").await;

    let ch = plain(&conn).await;
    expect_code(
        ch.exchange_declare(
            s("amq.foo"),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            no_args(),
        )
        .await,
        403,
        "declare amq.foo",
    );
    alive(&conn, "after 403 on amq.foo").await;

    let internal = uniq("exerr.internal");
    let ch = chan(&conn).await;
    ch.exchange_declare(
        s(&internal),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .expect("declare internal");
    publish_refused(
        &ch,
        &internal,
        "",
        b"x",
        403,
        "publish to an internal exchange",
    )
    .await;
    alive(&conn, "after 403 on internal").await;

    let ch = plain(&conn).await;
    let q = uniq("exerr.q");
    declare(&ch, &q, no_args()).await;
    bind(&ch, &q, &ex, "k", no_args()).await;
    expect_code(
        ch.exchange_delete(
            s(&ex),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await,
        406,
        "delete if-unused of a bound exchange",
    );
    alive(&conn, "after 406 on delete").await;
    assert!(
        exchange_exists(&conn, &ex).await,
        "exchange deleted by a refused delete"
    );
    delete_queue(&conn, &q).await;
    delete_exchange(&conn, &ex).await;
    delete_exchange(&conn, &internal).await;
}

/// A connection that keeps publishing to one exchange with one routing key sees every
/// change of the routing tables made meanwhile (mqgate reuses a connection's last route
/// and its checks while the tables are unchanged): a queue bound later gets the next
/// message, an unbound one no longer does, a deleted exchange is 404, and one
/// redeclared internal is 403. Publishes are paced by their confirms.
async fn publisher_sees_routing_changes(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let admin = plain(&conn).await;
    let ex = uniq("reroute.x");
    let (q1, q2) = (uniq("reroute.q1"), uniq("reroute.q2"));
    exchange(&admin, &ex, ExchangeKind::Direct, no_args()).await;
    declare(&admin, &q1, no_args()).await;
    declare(&admin, &q2, no_args()).await;
    bind(&admin, &q1, &ex, "k", no_args()).await;
    let ch = chan(&conn).await;
    publish(&ch, &ex, "k", "1").await;
    publish(&ch, &ex, "k", "2").await;
    bind(&admin, &q2, &ex, "k", no_args()).await;
    publish(&ch, &ex, "k", "3").await;
    admin
        .queue_unbind(s(&q1), s(&ex), s("k"), no_args())
        .await
        .expect("unbind");
    publish(&ch, &ex, "k", "4").await;
    // The default exchange, twice, then the first exchange again.
    publish(&ch, "", &q1, "5").await;
    publish(&ch, "", &q1, "6").await;
    publish(&ch, &ex, "k", "7").await;
    let mut got = (Vec::new(), Vec::new());
    while let Some(b) = get_body(&admin, &q1).await {
        got.0.push(b);
    }
    while let Some(b) = get_body(&admin, &q2).await {
        got.1.push(b);
    }
    assert_eq!(got.0, ["1", "2", "3", "5", "6"], "{q1}");
    assert_eq!(got.1, ["3", "4", "7"], "{q2}");

    // Deleted: the next publish to it closes the channel with 404.
    delete_exchange(&conn, &ex).await;
    publish_refused(&ch, &ex, "k", b"8", 404, "publish to a deleted exchange").await;

    // Declared again, published to, then deleted and declared internal: 403.
    let admin = plain(&conn).await;
    exchange(&admin, &ex, ExchangeKind::Direct, no_args()).await;
    bind(&admin, &q2, &ex, "k", no_args()).await;
    let ch = chan(&conn).await;
    publish(&ch, &ex, "k", "9").await;
    assert_eq!(get_body(&admin, &q2).await.as_deref(), Some("9"));
    delete_exchange(&conn, &ex).await;
    admin
        .exchange_declare(
            s(&ex),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                internal: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .expect("declare internal");
    bind(&admin, &q2, &ex, "k", no_args()).await;
    publish_refused(
        &ch,
        &ex,
        "k",
        b"10",
        403,
        "publish to an exchange redeclared internal",
    )
    .await;
    assert_eq!(get_body(&admin, &q2).await, None, "{q2} after the 403");
    alive(&conn, "after the 403").await;
    delete_queue(&conn, &q1).await;
    delete_queue(&conn, &q2).await;
    delete_exchange(&conn, &ex).await;
}

/// exchange.bind: messages flow source → destination → queue; exchange.unbind stops it.
async fn exchange_to_exchange(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let (src, dst) = (uniq("e2e.src"), uniq("e2e.dst"));
    exchange(&ch, &src, ExchangeKind::Topic, no_args()).await;
    exchange(&ch, &dst, ExchangeKind::Fanout, no_args()).await;
    ch.exchange_bind(
        s(&dst),
        s(&src),
        s("a.*"),
        ExchangeBindOptions::default(),
        no_args(),
    )
    .await
    .expect("exchange.bind");
    let q = uniq("e2e.q");
    declare(&ch, &q, no_args()).await;
    bind(&ch, &q, &dst, "", no_args()).await;
    publish(&ch, &src, "a.b", "through").await;
    publish(&ch, &src, "b.b", "filtered").await;
    ch.exchange_unbind(
        s(&dst),
        s(&src),
        s("a.*"),
        ExchangeUnbindOptions::default(),
        no_args(),
    )
    .await
    .expect("exchange.unbind");
    publish(&ch, &src, "a.b", "after unbind").await;
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some("through"));
    assert_eq!(get_body(&ch, &q).await, None);
    delete_queue(&conn, &q).await;
    delete_exchange(&conn, &src).await;
    delete_exchange(&conn, &dst).await;
}

/// alternate-exchange gets what the exchange cannot route.
async fn alternate_exchange(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let (ae, main) = (uniq("ae.alt"), uniq("ae.main"));
    let (qa, qm) = (uniq("ae.qalt"), uniq("ae.qmain"));
    exchange(&ch, &ae, ExchangeKind::Fanout, no_args()).await;
    exchange(
        &ch,
        &main,
        ExchangeKind::Direct,
        table(&[("alternate-exchange", ls(&ae))]),
    )
    .await;
    declare(&ch, &qa, no_args()).await;
    declare(&ch, &qm, no_args()).await;
    bind(&ch, &qa, &ae, "", no_args()).await;
    bind(&ch, &qm, &main, "k", no_args()).await;
    publish(&ch, &main, "k", "routed").await;
    // Mandatory: the alternate exchange routed it, so no basic.return.
    let c = ch
        .basic_publish(
            s(&main),
            s("other"),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"unroutable",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
    assert_eq!(get_body(&ch, &qm).await.as_deref(), Some("routed"));
    assert_eq!(get_body(&ch, &qm).await, None);
    assert_eq!(get_body(&ch, &qa).await.as_deref(), Some("unroutable"));
    assert_eq!(get_body(&ch, &qa).await, None);
    delete_queue(&conn, &qa).await;
    delete_queue(&conn, &qm).await;
    delete_exchange(&conn, &main).await;
    delete_exchange(&conn, &ae).await;
}

/// An auto-delete exchange goes when its last binding goes.
async fn auto_delete_exchange(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let ex = uniq("adx.x");
    ch.exchange_declare(
        s(&ex),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .expect("declare auto-delete exchange");
    let (q1, q2) = (uniq("adx.q1"), uniq("adx.q2"));
    declare(&ch, &q1, no_args()).await;
    declare(&ch, &q2, no_args()).await;
    bind(&ch, &q1, &ex, "k", no_args()).await;
    bind(&ch, &q2, &ex, "k", no_args()).await;
    ch.queue_unbind(s(&q1), s(&ex), s("k"), no_args())
        .await
        .expect("unbind");
    assert!(
        exchange_exists(&conn, &ex).await,
        "gone with a binding left"
    );
    ch.queue_unbind(s(&q2), s(&ex), s("k"), no_args())
        .await
        .expect("unbind");
    eventually!(
        "auto-delete exchange deleted",
        !exchange_exists(&conn, &ex).await
    );
    delete_queue(&conn, &q1).await;
    delete_queue(&conn, &q2).await;
}

// ---------------------------------------------------------------------------------------
// Queues

/// A redeclare compares arguments as RabbitMQ does: an integer by its value whatever its
/// width (one client sends `x-message-ttl` as a 32-bit 'I', another as a 64-bit 'l'), but
/// another value is still refused with 406.
async fn redeclare_integer_widths(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("qwidth");
    declare(
        &ch,
        &q,
        table(&[("x-message-ttl", AMQPValue::LongInt(60_000))]),
    )
    .await;
    declare(
        &ch,
        &q,
        table(&[("x-message-ttl", AMQPValue::LongLongInt(60_000))]),
    )
    .await;
    declare(
        &ch,
        &q,
        table(&[("x-message-ttl", AMQPValue::ShortUInt(60_000))]),
    )
    .await;
    let e = ch
        .queue_declare(
            s(&q),
            QueueDeclareOptions::default(),
            table(&[("x-message-ttl", AMQPValue::LongLongInt(60_001))]),
        )
        .await
        .expect_err("another value is refused");
    assert_eq!(code(&e), 406, "{e}");
    delete_queue(&conn, &q).await;
}

/// passive (missing: 404), durable, server-named, counts in declare-ok.
async fn queue_declare_kinds(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let missing = uniq("qdk.missing");
    assert!(!queue_exists(&conn, &missing).await);
    alive(&conn, "after passive 404").await;

    let named = declare_with(
        &ch,
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        no_args(),
    )
    .await;
    assert!(
        named.name().as_str().starts_with("amq.gen-"),
        "server-named queue {}",
        named.name()
    );

    let q = uniq("qdk.durable");
    let d = declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        no_args(),
    )
    .await;
    assert_eq!((d.message_count(), d.consumer_count()), (0, 0));
    for i in 0..3 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let d = declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        no_args(),
    )
    .await;
    assert_eq!((d.message_count(), d.consumer_count()), (3, 0), "redeclare");
    let cch = plain(&conn).await;
    cch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut c = consume(&cch, &q, "qdk", false).await;
    let _first = next(&mut c, "first of three").await;
    let p = ch
        .queue_declare(
            s(&q),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .expect("passive");
    assert_eq!(
        (p.message_count(), p.consumer_count()),
        (2, 1),
        "ready messages and consumers with one unacked"
    );
    // Redeclaring with different durability is 406.
    let ch2 = plain(&conn).await;
    expect_code(
        ch2.queue_declare(s(&q), QueueDeclareOptions::default(), no_args())
            .await,
        406,
        "redeclare a durable queue as transient",
    );
    alive(&conn, "after 406").await;
    drop(c);
    delete_queue(&conn, &q).await;
}

/// An exclusive queue: another connection gets 405 (declare, consume, passive).
async fn exclusive_queue(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let owner = t.connect().await;
    let ch = chan(&owner).await;
    let q = uniq("excl.q");
    declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        no_args(),
    )
    .await;
    let other = t.connect().await;
    let och = plain(&other).await;
    expect_code(
        och.queue_declare(
            s(&q),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await,
        405,
        "declare of another connection's exclusive queue",
    );
    let och = plain(&other).await;
    expect_code(
        och.basic_consume(s(&q), s(""), BasicConsumeOptions::default(), no_args())
            .await
            .map(|_| ()),
        405,
        "consume from another connection's exclusive queue",
    );
    alive(&other, "after 405").await;
    // Redeclared without the exclusive flag, by its own connection too: RabbitMQ 3.10
    // closes the channel with 405 RESOURCE_LOCKED (not 406).
    let own = plain(&owner).await;
    expect_code(
        own.queue_declare(s(&q), QueueDeclareOptions::default(), no_args())
            .await,
        405,
        "non-exclusive redeclare of an exclusive queue by its own connection",
    );
    alive(&owner, "after 405").await;
    publish(&ch, "", &q, "mine").await;
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some("mine"));
    owner.close(200, s("bye")).await.expect("close");
    eventually!(
        "exclusive queue deleted with its connection",
        !queue_exists(&other, &q).await
    );
}

/// An auto-delete queue goes when its last consumer cancels.
async fn auto_delete_queue(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("adq.q");
    declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        no_args(),
    )
    .await;
    let c1 = consume(&ch, &q, "c1", true).await;
    let c2 = consume(&ch, &q, "c2", true).await;
    ch.basic_cancel(s("c1"), BasicCancelOptions::default())
        .await
        .expect("cancel c1");
    assert!(queue_exists(&conn, &q).await, "gone with a consumer left");
    ch.basic_cancel(s("c2"), BasicCancelOptions::default())
        .await
        .expect("cancel c2");
    eventually!("auto-delete queue deleted", !queue_exists(&conn, &q).await);
    drop((c1, c2));
}

/// bind/unbind; purge returns the count.
async fn bind_unbind_purge(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let ex = uniq("bup.x");
    let q = uniq("bup.q");
    exchange(&ch, &ex, ExchangeKind::Direct, no_args()).await;
    declare(&ch, &q, no_args()).await;
    bind(&ch, &q, &ex, "k", no_args()).await;
    for i in 0..3 {
        publish(&ch, &ex, "k", &format!("m{i}")).await;
    }
    ch.queue_unbind(s(&q), s(&ex), s("k"), no_args())
        .await
        .expect("unbind");
    publish(&ch, &ex, "k", "after unbind").await;
    let n = ch
        .queue_purge(s(&q), QueuePurgeOptions::default())
        .await
        .expect("purge");
    assert_eq!(n, 3, "purge-ok message count");
    assert_eq!(get_body(&ch, &q).await, None);
    let n = ch
        .queue_delete(s(&q), QueueDeleteOptions::default())
        .await
        .expect("delete");
    assert_eq!(n, 0, "delete-ok message count");
    delete_exchange(&conn, &ex).await;
}

/// queue.purge drops the ready messages only: a delivery in hand stays unacknowledged
/// (prefetch still counts it) and a requeue brings it back, as on RabbitMQ; it used to
/// be forgotten, so the requeue lost it and the prefetch let the next one through.
async fn purge_keeps_unacked(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("purgeu.q");
    declare(&ch, &q, no_args()).await;
    publish(&ch, "", &q, "held").await;
    let cch = plain(&conn).await;
    cch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut c = consume(&cch, &q, "holder", false).await;
    let held = next(&mut c, "the held one").await;
    assert_eq!(body(&held), "held");
    publish(&ch, "", &q, "ready 1").await;
    publish(&ch, "", &q, "ready 2").await;
    let n = ch
        .queue_purge(s(&q), QueuePurgeOptions::default())
        .await
        .expect("purge");
    assert_eq!(n, 2, "the ready ones");
    publish(&ch, "", &q, "after").await;
    match tokio::time::timeout(QUIET, c.next()).await {
        Err(_) => {}
        other => panic!("prefetch 1 still holds the unacked one: {other:?}"),
    }
    held.acker
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .expect("nack");
    let again = next(&mut c, "the requeued one").await;
    assert_eq!(body(&again), "held", "back, not lost");
    assert!(again.redelivered);
    again
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    let last = next(&mut c, "the one after the purge").await;
    assert_eq!(body(&last), "after");
    last.acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    delete_queue(&conn, &q).await;
}

/// A purge with a delivery unacknowledged: its consumer leaves without acking, the
/// broker restarts, and the purged messages stay purged (the delivery in hand may come
/// back, as on RabbitMQ; the committed offset had stayed behind it, which brought back
/// every message the purge dropped).
async fn purge_stays_purged_across_restart(backend: Backend) {
    let Some(mut t) = Target::standard(backend).await else {
        return;
    };
    if !t.durable() {
        eprintln!("skipped: the broker does not keep state across a suite restart");
        return;
    }
    let q = uniq("purger.q");
    {
        let conn = t.connect().await;
        let ch = chan(&conn).await;
        declare_with(
            &ch,
            &q,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            no_args(),
        )
        .await;
        for i in 0..5 {
            let c = publish_props(
                &ch,
                "",
                &q,
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await;
            assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
        }
        let cch = plain(&conn).await;
        cch.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut c = consume(&cch, &q, "holder", false).await;
        let held = next(&mut c, "the held one").await;
        assert_eq!(body(&held), "m0");
        let n = ch
            .queue_purge(s(&q), QueuePurgeOptions::default())
            .await
            .expect("purge");
        assert_eq!(n, 4, "the ready ones");
        conn.close(200, s("bye")).await.expect("close");
    }
    t.restart().await;
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let mut got = Vec::new();
    while let Some(b) = get_body(&ch, &q).await {
        got.push(b);
    }
    assert!(
        got.iter().all(|b| b == "m0"),
        "only the one in hand may come back: {got:?}"
    );
    delete_queue(&conn, &q).await;
}

/// queue.delete if-unused with a consumer / if-empty with messages: 406.
async fn queue_delete_conditions(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("qdc.q");
    declare(&ch, &q, no_args()).await;
    publish(&ch, "", &q, "m").await;
    let dch = plain(&conn).await;
    expect_code(
        dch.queue_delete(
            s(&q),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await,
        406,
        "delete if-empty of a queue with a message",
    );
    let cch = plain(&conn).await;
    let c = consume(&cch, &q, "qdc", false).await;
    let dch = plain(&conn).await;
    expect_code(
        dch.queue_delete(
            s(&q),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await,
        406,
        "delete if-unused of a queue with a consumer",
    );
    alive(&conn, "after 406").await;
    assert!(queue_exists(&conn, &q).await);
    drop(c);
    let n = ch
        .queue_delete(s(&q), QueueDeleteOptions::default())
        .await
        .expect("delete");
    assert!(n <= 1, "delete-ok count {n}");
}

/// A message's own `expiration` on a queue nobody consumes (the "wait queue" of a
/// delayed retry: per-message TTL, then the dead-letter exchange sends it on) is
/// dead-lettered on time, as RabbitMQ does; it used to wait there for ever.
async fn per_message_ttl_without_consumers(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let (wait, work) = (uniq("pmttl.wait"), uniq("pmttl.work"));
    declare(&ch, &work, no_args()).await;
    declare(
        &ch,
        &wait,
        table(&[
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls(&work)),
        ]),
    )
    .await;
    let c = publish_props(
        &ch,
        "",
        &wait,
        b"retry me",
        BasicProperties::default().with_expiration("200".into()),
    )
    .await;
    assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
    let mut c = consume(&ch, &work, "pmttl", true).await;
    let d = next(&mut c, "dead-lettered when its own TTL ran out").await;
    assert_eq!(body(&d), "retry me");
    assert_eq!(count(&ch, &wait).await, 0, "nothing left waiting");
    drop(c);
    delete_queue(&conn, &wait).await;
    delete_queue(&conn, &work).await;
}

/// A time to live of 0 (`expiration "0"`, `x-message-ttl 0`): delivered if a consumer
/// can take it at once, else expired (RabbitMQ: "expire upon reaching a queue unless
/// they can be delivered to a consumer immediately"; it never delivered before).
async fn ttl_zero_delivers_now_or_never(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let zero = || BasicProperties::default().with_expiration("0".into());
    let (msg_ttl, q_ttl) = (uniq("ttl0.msg"), uniq("ttl0.q"));
    declare(&ch, &msg_ttl, no_args()).await;
    declare(
        &ch,
        &q_ttl,
        table(&[("x-message-ttl", AMQPValue::LongInt(0))]),
    )
    .await;
    for q in [&msg_ttl, &q_ttl] {
        let props = if q == &msg_ttl {
            zero()
        } else {
            BasicProperties::default()
        };
        // A consumer waiting with credit: delivered.
        let cch = plain(&conn).await;
        let mut c = consume(&cch, q, "now", false).await;
        let r = publish_props(&ch, "", q, b"now", props.clone()).await;
        assert!(matches!(r, Confirmation::Ack(None)), "{r:?}");
        let d = next(&mut c, "taken at once by a waiting consumer").await;
        assert_eq!(body(&d), "now");
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        cch.basic_cancel("now".into(), BasicCancelOptions::default())
            .await
            .expect("cancel");
        drop(c);
        // Its only consumer full (prefetch 1, one unacked): expired, never delivered.
        let full = plain(&conn).await;
        full.basic_qos(1, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut f = consume(&full, q, "full", false).await;
        publish(&ch, "", q, "fills it").await;
        let held = next(&mut f, "the consumer's one").await;
        assert_eq!(body(&held), "fills it");
        publish_props(&ch, "", q, b"never", props.clone()).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        held.acker
            .ack(BasicAckOptions::default())
            .await
            .expect("ack");
        quiet(&mut f, "expired while no consumer could take it").await;
        // Nobody consuming: expired.
        full.basic_cancel("full".into(), BasicCancelOptions::default())
            .await
            .expect("cancel");
        drop(f);
        publish_props(&ch, "", q, b"never either", props).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut late = consume(&chan(&conn).await, q, "late", true).await;
        quiet(&mut late, "expired with no consumer").await;
        drop(late);
    }
    delete_queue(&conn, &msg_ttl).await;
    delete_queue(&conn, &q_ttl).await;
}

/// x-message-ttl: expired messages are not delivered; with a DLX they are
/// dead-lettered with reason `expired`.
async fn message_ttl(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("ttl.q");
    declare(
        &ch,
        &q,
        table(&[("x-message-ttl", AMQPValue::LongInt(100))]),
    )
    .await;
    publish(&ch, "", &q, "short lived").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get_body(&ch, &q).await, None, "expired message delivered");

    let (qd, dlq) = (uniq("ttl.qd"), uniq("ttl.dlq"));
    declare(&ch, &dlq, no_args()).await;
    declare(
        &ch,
        &qd,
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(100)),
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls(&dlq)),
        ]),
    )
    .await;
    publish(&ch, "", &qd, "expires").await;
    let mut c = consume(&ch, &dlq, "ttl", true).await;
    let d = next(&mut c, "dead-lettered on expiry").await;
    assert_eq!(body(&d), "expires");
    let death = match header(&d, "x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice()[0].clone(),
        other => panic!("x-death: {other:?}"),
    };
    let AMQPValue::FieldTable(death) = death else {
        panic!("x-death entry {death:?}")
    };
    assert_eq!(as_str(&death.inner()["reason"]), "expired");
    assert_eq!(as_str(&death.inner()["queue"]), qd);
    assert_eq!(get_body(&ch, &qd).await, None);
    drop(c);
    for q in [&q, &qd, &dlq] {
        delete_queue(&conn, q).await;
    }
}

/// x-expires: an unused queue is deleted.
async fn queue_expires(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("exp.q");
    declare(&ch, &q, table(&[("x-expires", AMQPValue::LongInt(300))])).await;
    assert!(queue_exists(&conn, &q).await);
    // A passive declare is a use (it restarts the expiry): look less often than 300 ms.
    let deadline = Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(800)).await;
        if !queue_exists(&conn, &q).await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "x-expires queue not deleted within 5 s"
        );
    }
}

/// x-max-length (drop-head), x-max-length-bytes (drop-head), reject-publish → nack.
async fn max_length(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("maxlen.q");
    declare(&ch, &q, table(&[("x-max-length", AMQPValue::LongInt(2))])).await;
    for b in ["m1", "m2", "m3"] {
        publish(&ch, "", &q, b).await;
    }
    assert_eq!(count(&ch, &q).await, 2);
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some("m2"));
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some("m3"));

    let qb = uniq("maxbytes.q");
    declare(
        &ch,
        &qb,
        table(&[
            ("x-max-length-bytes", AMQPValue::LongInt(10)),
            ("x-overflow", ls("drop-head")),
        ]),
    )
    .await;
    for b in ["aaaaa", "bbbbb", "ccccc"] {
        publish(&ch, "", &qb, b).await;
    }
    assert_eq!(get_body(&ch, &qb).await.as_deref(), Some("bbbbb"));
    assert_eq!(get_body(&ch, &qb).await.as_deref(), Some("ccccc"));
    assert_eq!(get_body(&ch, &qb).await, None);

    let qr = uniq("maxrej.q");
    declare(
        &ch,
        &qr,
        table(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", ls("reject-publish")),
        ]),
    )
    .await;
    let c1 = publish_props(&ch, "", &qr, b"first", BasicProperties::default()).await;
    assert!(matches!(c1, Confirmation::Ack(None)), "first: {c1:?}");
    let c2 = publish_props(&ch, "", &qr, b"second", BasicProperties::default()).await;
    assert!(
        c2.is_nack(),
        "second over x-max-length with reject-publish: {c2:?}"
    );
    assert_eq!(get_body(&ch, &qr).await.as_deref(), Some("first"));
    assert_eq!(get_body(&ch, &qr).await, None);
    for q in [&q, &qb, &qr] {
        delete_queue(&conn, q).await;
    }
}

/// The reason of a dead-lettered message's newest x-death entry.
fn death_reason(d: &Delivery) -> String {
    let deaths = match header(d, "x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        other => panic!("x-death: {other:?}"),
    };
    let AMQPValue::FieldTable(x) = &deaths[0] else {
        panic!("x-death entry {:?}", deaths[0])
    };
    as_str(&x.inner()["reason"])
}

/// Length limits with a dead-letter exchange: drop-head dead-letters the dropped head
/// (reason `maxlen`, oldest first); reject-publish-dlx nacks the publish and
/// dead-letters it; plain reject-publish does not dead-letter.
async fn max_length_dead_letters(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let dlx = uniq("maxlen.dlx");
    let dead = uniq("maxlen.dead");
    exchange(&ch, &dlx, ExchangeKind::Fanout, no_args()).await;
    declare(&ch, &dead, no_args()).await;
    bind(&ch, &dead, &dlx, "", no_args()).await;

    let q = uniq("maxlen.head");
    declare(
        &ch,
        &q,
        table(&[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", ls(&dlx)),
        ]),
    )
    .await;
    for b in ["h0", "h1", "h2", "h3", "h4"] {
        publish(&ch, "", &q, b).await;
    }
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some("h3"));
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some("h4"));
    assert_eq!(get_body(&ch, &q).await, None);
    let mut dc = consume(&ch, &dead, "dead", true).await;
    for want in ["h0", "h1", "h2"] {
        let d = next(&mut dc, "dropped head dead-lettered").await;
        assert_eq!(body(&d), want, "dead-lettered oldest first");
        assert_eq!(death_reason(&d), "maxlen");
    }

    let qr = uniq("maxlen.rejdlx");
    declare(
        &ch,
        &qr,
        table(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", ls("reject-publish-dlx")),
            ("x-dead-letter-exchange", ls(&dlx)),
        ]),
    )
    .await;
    let c1 = publish_props(&ch, "", &qr, b"kept", BasicProperties::default()).await;
    assert!(matches!(c1, Confirmation::Ack(None)), "first: {c1:?}");
    let c2 = publish_props(&ch, "", &qr, b"refused", BasicProperties::default()).await;
    assert!(
        c2.is_nack(),
        "over the limit with reject-publish-dlx: {c2:?}"
    );
    let d = next(&mut dc, "refused publish dead-lettered").await;
    assert_eq!(body(&d), "refused");
    assert_eq!(death_reason(&d), "maxlen");
    assert_eq!(get_body(&ch, &qr).await.as_deref(), Some("kept"));

    let qp = uniq("maxlen.rej");
    declare(
        &ch,
        &qp,
        table(&[
            ("x-max-length", AMQPValue::LongInt(1)),
            ("x-overflow", ls("reject-publish")),
            ("x-dead-letter-exchange", ls(&dlx)),
        ]),
    )
    .await;
    publish(&ch, "", &qp, "kept").await;
    let c = publish_props(&ch, "", &qp, b"refused", BasicProperties::default()).await;
    assert!(c.is_nack(), "over the limit with reject-publish: {c:?}");
    // Nothing more reaches the dead-letter queue.
    publish(&ch, &dlx, "", "marker").await;
    let m = next(&mut dc, "marker").await;
    assert_eq!(
        body(&m),
        "marker",
        "reject-publish dead-lettered its refusal"
    );
    for q in [&q, &qr, &qp, &dead] {
        delete_queue(&conn, q).await;
    }
}

/// message_count is exact right after acks, nacks and requeues: two messages taken
/// with basic.get and nacked together (multiple, requeue) count as ready at once, on
/// another channel of the same connection, without waiting.
async fn counts_are_exact_after_requeue(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("count.requeue");
    declare(&ch, &q, no_args()).await;
    for b in ["c0", "c1", "c2"] {
        publish(&ch, "", &q, b).await;
    }
    let gch = plain(&conn).await;
    let mut last = None;
    for want in ["c0", "c1"] {
        let m = gch
            .basic_get(s(&q), BasicGetOptions { no_ack: false })
            .await
            .expect("get")
            .expect("a message");
        assert_eq!(String::from_utf8_lossy(&m.delivery.data), want);
        last = Some(m);
    }
    assert_eq!(count(&ch, &q).await, 1, "two taken, one ready");
    last.expect("taken")
        .delivery
        .acker
        .nack(BasicNackOptions {
            multiple: true,
            requeue: true,
        })
        .await
        .expect("nack");
    assert_eq!(count(&ch, &q).await, 3, "both requeued: three ready");
    let m = gch
        .basic_get(s(&q), BasicGetOptions { no_ack: false })
        .await
        .expect("get")
        .expect("a message");
    m.delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    assert_eq!(count(&ch, &q).await, 2, "one acked: two ready");
    delete_queue(&conn, &q).await;
}

/// drop-head drops ready messages only: an unacknowledged delivery does not count
/// towards x-max-length and is not dropped (its ack still counts).
async fn max_length_keeps_unacked(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("maxlen.unacked");
    declare(&ch, &q, table(&[("x-max-length", AMQPValue::LongInt(2))])).await;
    publish(&ch, "", &q, "u0").await;
    let cch = plain(&conn).await;
    cch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut c = consume(&cch, &q, "held", false).await;
    let held = next(&mut c, "first delivery").await;
    assert_eq!(body(&held), "u0");
    for b in ["u1", "u2", "u3"] {
        publish(&ch, "", &q, b).await;
    }
    // Ready: u2, u3 (u1 dropped); u0 is in flight and kept.
    held.acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    let mut rest = Vec::new();
    for _ in 0..2 {
        let d = next(&mut c, "the ready messages").await;
        rest.push(body(&d));
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_eq!(rest, ["u2", "u3"]);
    delete_queue(&conn, &q).await;
}

/// A rejected message goes to x-dead-letter-exchange with x-dead-letter-routing-key and
/// an x-death header.
/// Dead-letter cycles: a message that would come back to a queue it died in, with no
/// rejection on the way, is dropped for that queue, as RabbitMQ does (it went round for
/// ever); with a rejection in the cycle (the delayed-retry pattern) it goes on.
async fn dead_letter_cycles(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let expiring_to = |target: &str| {
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(100)),
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls(target)),
        ])
    };
    // A queue whose expired messages go back to itself.
    let own = uniq("dlc.self");
    declare(&ch, &own, expiring_to(&own)).await;
    // Two queues whose expired messages go to each other.
    let (a, b) = (uniq("dlc.a"), uniq("dlc.b"));
    declare(&ch, &a, expiring_to(&b)).await;
    declare(&ch, &b, expiring_to(&a)).await;
    publish(&ch, "", &own, "round").await;
    publish(&ch, "", &a, "and round").await;
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    for _ in 0..2 {
        for q in [&own, &a, &b] {
            assert_eq!(count(&ch, q).await, 0, "{q}: dropped, not going round");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // A work queue whose rejects wait in a queue that expires them back to it.
    let (work, wait) = (uniq("dlc.work"), uniq("dlc.wait"));
    declare(
        &ch,
        &work,
        table(&[
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls(&wait)),
        ]),
    )
    .await;
    declare(&ch, &wait, expiring_to(&work)).await;
    publish(&ch, "", &work, "retry me").await;
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &work, "retry", false).await;
    for round in 1..=3 {
        let d = next(&mut c, "delivered again after its wait").await;
        assert_eq!(body(&d), "retry me");
        if round < 3 {
            d.acker
                .reject(BasicRejectOptions { requeue: false })
                .await
                .expect("reject");
        } else {
            let deaths = match header(&d, "x-death") {
                Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
                other => panic!("x-death: {other:?}"),
            };
            assert_eq!(deaths.len(), 2, "rejected from work, expired from wait");
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        }
    }
    drop(c);
    for q in [&own, &a, &b, &work, &wait] {
        delete_queue(&conn, q).await;
    }
}

async fn dead_letter_x_death(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let dlx = uniq("dlx.x");
    let (q, dlq) = (uniq("dlx.q"), uniq("dlx.dlq"));
    exchange(&ch, &dlx, ExchangeKind::Direct, no_args()).await;
    declare(&ch, &dlq, no_args()).await;
    bind(&ch, &dlq, &dlx, "dead", no_args()).await;
    declare(
        &ch,
        &q,
        table(&[
            ("x-dead-letter-exchange", ls(&dlx)),
            ("x-dead-letter-routing-key", ls("dead")),
        ]),
    )
    .await;
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    publish(&ch, "", &q, "poison").await;
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "dlx", false).await;
    let d = next(&mut c, "first delivery").await;
    d.acker
        .nack(BasicNackOptions {
            requeue: false,
            ..Default::default()
        })
        .await
        .expect("nack");
    let mut dc = consume(&ch, &dlq, "dlq", true).await;
    let dead = next(&mut dc, "dead-lettered").await;
    assert_eq!(body(&dead), "poison");
    assert_eq!(dead.routing_key.as_str(), "dead");
    assert_eq!(dead.exchange.as_str(), dlx);
    let deaths = match header(&dead, "x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        other => panic!("x-death: {other:?}"),
    };
    assert_eq!(deaths.len(), 1, "{deaths:?}");
    let AMQPValue::FieldTable(x) = &deaths[0] else {
        panic!("x-death entry {:?}", deaths[0])
    };
    let x = x.inner();
    assert_eq!(as_int(&x["count"]), 1, "count");
    assert_eq!(as_str(&x["reason"]), "rejected", "reason");
    assert_eq!(as_str(&x["queue"]), q, "queue");
    assert_eq!(
        as_str(&x["exchange"]),
        "",
        "exchange (published to the default)"
    );
    match &x["routing-keys"] {
        AMQPValue::FieldArray(a) => {
            let keys: Vec<String> = a.as_slice().iter().map(as_str).collect();
            assert_eq!(keys, std::slice::from_ref(&q), "routing-keys");
        }
        other => panic!("routing-keys {other:?}"),
    }
    match &x["time"] {
        AMQPValue::Timestamp(ts) => assert!(
            *ts + 60 >= before && *ts <= before + 60,
            "time {ts} vs {before}"
        ),
        other => panic!("time {other:?}"),
    }
    if let Some(v) = header(&dead, "x-first-death-reason") {
        assert_eq!(as_str(v), "rejected");
    }
    drop((c, dc));
    for q in [&q, &dlq] {
        delete_queue(&conn, q).await;
    }
    delete_exchange(&conn, &dlx).await;
}

/// x-single-active-consumer: only the first consumer gets messages until it cancels.
async fn single_active_consumer(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("sac.q");
    declare(
        &ch,
        &q,
        table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await;
    let (cha, chb) = (plain(&conn).await, plain(&conn).await);
    let mut a = consume(&cha, &q, "a", true).await;
    let mut b = consume(&chb, &q, "b", true).await;
    for i in 0..4 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    assert_eq!(
        bodies(&mut a, 4, "active consumer").await,
        ["m0", "m1", "m2", "m3"]
    );
    quiet(&mut b, "the waiting consumer").await;
    cha.basic_cancel(s("a"), BasicCancelOptions::default())
        .await
        .expect("cancel a");
    publish(&ch, "", &q, "m4").await;
    assert_eq!(bodies(&mut b, 1, "next active consumer").await, ["m4"]);
    drop((a, b));
    delete_queue(&conn, &q).await;
}

/// A consumer cancelled while the broker still held deliveries for it that were never
/// written to its socket (large bodies: the connection pulls the next one only as the
/// output drains): those go back uncounted, so with `x-delivery-limit: 0` each message
/// still reaches a client once. They used to count as deliveries, and the limit dropped
/// them unseen. On RabbitMQ's quorum queue every message arrives once too.
async fn cancel_gives_back_what_was_never_sent(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("cancelback.q");
    // A quorum queue: RabbitMQ takes x-delivery-limit only there.
    declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[
            ("x-queue-type", ls("quorum")),
            ("x-delivery-limit", AMQPValue::LongInt(0)),
        ]),
    )
    .await;
    let big = vec![b'.'; 512 * 1024];
    const N: usize = 20;
    for _ in 0..N {
        let c = publish_props(&ch, "", &q, &big, BasicProperties::default()).await;
        assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
    }
    let cch = plain(&conn).await;
    cch.basic_qos(50, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut c = consume(&cch, &q, "big", false).await;
    let first = next(&mut c, "the first").await;
    cch.basic_cancel(s("big"), BasicCancelOptions::default())
        .await
        .expect("cancel");
    let mut got = 1;
    first
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    // What was sent before the cancel-ok.
    while let Ok(Some(Ok(d))) = tokio::time::timeout(QUIET, c.next()).await {
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        got += 1;
    }
    // The rest, once each. Released messages go back to the group as commands of
    // their own (across gateways, over the relay), so a get may come before them: wait
    // for them, a while (a member's leave that crosses gateways can take the relay's
    // timeouts, ~10 s, to give back what was in transit).
    let deadline = Instant::now() + Duration::from_secs(30);
    while got < N && Instant::now() < deadline {
        match ch
            .basic_get(s(&q), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
        {
            Some(m) => {
                assert_eq!(m.delivery.data.len(), big.len());
                got += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert_eq!(got, N, "every message reached a client once");
    assert!(get(&ch, &q).await.is_none(), "and only once");
    delete_queue(&conn, &q).await;
}

/// A consumer that never sent basic.qos is sent everything, however much it holds
/// unacked (RabbitMQ: no prefetch is no limit): 2,000 messages published before it
/// consumes and 1,000 more published one by one while it holds them all arrive before
/// its first ack, in order, and one ack with multiple=true settles them. mqgate held such
/// a consumer to 1,024 unacked, so a consumer acking once per 2,000 waited for ever.
/// In a cluster of gateways too, wherever its queue lives (the consume relay carries it).
async fn no_qos_sends_everything(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("noqos.q");
    declare(&ch, &q, no_args()).await;
    const BURST: usize = 2_000;
    const PACED: usize = 1_000;
    publish_burst(&ch, &q, 0..BURST).await;
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "all", false).await;
    let paced = {
        let ch = ch.clone();
        let q = q.clone();
        tokio::spawn(async move {
            for i in BURST..BURST + PACED {
                publish(&ch, "", &q, &format!("m{i}")).await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let mut last = None;
    for i in 0..BURST + PACED {
        let d = next(&mut c, &format!("delivery {i}, none acked yet")).await;
        assert_eq!(body(&d), format!("m{i}"));
        last = Some(d);
    }
    paced.await.expect("the paced publisher");
    last.expect("deliveries")
        .acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .expect("ack");
    quiet(&mut c, "everything acked").await;
    assert_eq!(count(&ch, &q).await, 0, "one multiple ack settled them all");
    cch.close(200, s("bye")).await.expect("close");
    assert_eq!(count(&ch, &q).await, 0, "nothing came back at close");
    delete_queue(&conn, &q).await;
}

/// basic.qos above 2,048 (any short is allowed; RabbitMQ honours it): a consumer that
/// acks once, with multiple=true, after 2,500 deliveries is sent those 2,500 before its
/// first ack and not one more; the ack lets the rest through.
async fn large_prefetch_honoured(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("prefetch.large");
    declare(&ch, &q, no_args()).await;
    const N: usize = 2_500;
    publish_burst(&ch, &q, 0..N + 10).await;
    let cch = plain(&conn).await;
    cch.basic_qos(N as u16, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut c = consume(&cch, &q, "large", false).await;
    let mut last = None;
    for i in 0..N {
        let d = next(&mut c, &format!("delivery {i} of the prefetch")).await;
        assert_eq!(body(&d), format!("m{i}"));
        last = Some(d);
    }
    quiet(&mut c, "the prefetch is full").await;
    last.expect("deliveries")
        .acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .expect("ack");
    let rest = bodies(&mut c, 10, "after the multiple ack").await;
    assert_eq!(
        rest,
        (N..N + 10).map(|i| format!("m{i}")).collect::<Vec<_>>()
    );
    delete_queue(&conn, &q).await;
}

/// x-delivery-limit (a quorum queue on RabbitMQ): after the limit, the message is
/// dead-lettered instead of redelivered.
async fn delivery_limit(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let (q, dlq) = (uniq("dlim.q"), uniq("dlim.dlq"));
    declare(&ch, &dlq, no_args()).await;
    declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[
            ("x-queue-type", ls("quorum")),
            ("x-delivery-limit", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", ls("")),
            ("x-dead-letter-routing-key", ls(&dlq)),
        ]),
    )
    .await;
    publish(&ch, "", &q, "flaky").await;
    let cch = plain(&conn).await;
    cch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut c = consume(&cch, &q, "dlim", false).await;
    let mut deliveries = 0;
    let mut dc = consume(&ch, &dlq, "dlim-dlq", true).await;
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), c.next()).await {
            Ok(Some(Ok(d))) => {
                deliveries += 1;
                assert_eq!(d.redelivered, deliveries > 1, "redelivered flag");
                assert!(deliveries <= 5, "redelivered past the limit");
                d.acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
                    .expect("nack");
            }
            Ok(other) => panic!("consumer: {other:?}"),
            Err(_) => break,
        }
    }
    assert_eq!(deliveries, 3, "deliveries with x-delivery-limit 2");
    assert_eq!(
        body(&next(&mut dc, "dead-lettered after the limit").await),
        "flaky"
    );
    drop((c, dc));
    delete_queue(&conn, &q).await;
    delete_queue(&conn, &dlq).await;
}

/// x-max-priority: RabbitMQ declares a priority queue (higher priority first); mqgate
/// refuses it with a 406 that names priority. Either passes.
async fn max_priority(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("prio.q");
    match ch
        .queue_declare(
            s(&q),
            QueueDeclareOptions::default(),
            table(&[("x-max-priority", AMQPValue::LongInt(10))]),
        )
        .await
    {
        Ok(_) => {
            for (b, p) in [("low", 1u8), ("high", 9)] {
                publish_props(
                    &ch,
                    "",
                    &q,
                    b.as_bytes(),
                    BasicProperties::default().with_priority(p),
                )
                .await;
            }
            assert_eq!(get_body(&ch, &q).await.as_deref(), Some("high"));
            assert_eq!(get_body(&ch, &q).await.as_deref(), Some("low"));
            delete_queue(&conn, &q).await;
        }
        Err(e) => {
            assert_eq!(code(&e), 406, "{e}");
            assert!(
                text(&e).to_lowercase().contains("priority"),
                "406 text {:?}",
                text(&e)
            );
            alive(&conn, "after a refused priority queue").await;
        }
    }
}

/// A durable queue and persistent messages survive a restart; transient messages and
/// transient queues do not (RocksDB only).
async fn durable_survives_restart(backend: Backend) {
    let Some(mut t) = Target::standard(backend).await else {
        return;
    };
    if !t.durable() {
        eprintln!("skipped: the broker does not keep state across a suite restart");
        return;
    }
    let (dq, tq) = (uniq("dur.q"), uniq("dur.transient"));
    {
        let conn = t.connect().await;
        let ch = chan(&conn).await;
        declare_with(
            &ch,
            &dq,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            no_args(),
        )
        .await;
        declare(&ch, &tq, no_args()).await;
        for (b, mode) in [("persistent", 2u8), ("transient", 1)] {
            let c = publish_props(
                &ch,
                "",
                &dq,
                b.as_bytes(),
                BasicProperties::default().with_delivery_mode(mode),
            )
            .await;
            assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
        }
        publish(&ch, "", &tq, "in a transient queue").await;
        conn.close(200, s("bye")).await.expect("close");
    }
    t.restart().await;
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    assert!(queue_exists(&conn, &dq).await, "durable queue lost");
    assert!(!queue_exists(&conn, &tq).await, "transient queue kept");
    let m = get(&ch, &dq).await.expect("persistent message lost");
    assert_eq!(body(&m.delivery), "persistent");
    assert_eq!(m.delivery.properties.delivery_mode(), &Some(2));
    assert_eq!(get_body(&ch, &dq).await, None, "transient message kept");
}

// ---------------------------------------------------------------------------------------
// Basic

/// mandatory publish with no route: basic.return 312 NO_ROUTE (then the confirm).
async fn mandatory_return(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let key = uniq("mandatory.nowhere");
    let c = ch
        .basic_publish(
            s(""),
            s(&key),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default().with_message_id(s("m-1")),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    let Confirmation::Ack(Some(ret)) = c else {
        panic!("expected an ack with a returned message, got {c:?}")
    };
    assert_eq!(ret.reply_code, 312, "{}", ret.reply_text);
    assert_eq!(ret.delivery.data, b"lost");
    assert_eq!(ret.delivery.routing_key.as_str(), key);
    assert_eq!(ret.delivery.properties.message_id(), &Some(s("m-1")));
    // Not mandatory: silently dropped, plain ack.
    publish(&ch, "", &key, "dropped").await;
}

/// no-ack consumption empties the queue without acks.
async fn consume_no_ack(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("noack.q");
    declare(&ch, &q, no_args()).await;
    for i in 0..3 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "noack", true).await;
    assert_eq!(bodies(&mut c, 3, "no-ack").await, ["m0", "m1", "m2"]);
    cch.close(200, s("bye")).await.expect("close");
    drop(c);
    assert_eq!(count(&ch, &q).await, 0, "no-ack deliveries came back");
    delete_queue(&conn, &q).await;
}

/// An exclusive consumer: a second consumer gets 403; the connection keeps working.
async fn exclusive_consumer(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("exclc.q");
    declare(&ch, &q, no_args()).await;
    let c = ch
        .basic_consume(
            s(&q),
            s("only"),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .expect("exclusive consume");
    let ch2 = plain(&conn).await;
    expect_code(
        ch2.basic_consume(s(&q), s(""), BasicConsumeOptions::default(), no_args())
            .await
            .map(|_| ()),
        403,
        "second consumer on an exclusively consumed queue",
    );
    alive(&conn, "after 403").await;
    // An exclusive consume where any consumer exists: 403 too.
    let q2 = uniq("exclc2.q");
    declare(&ch, &q2, no_args()).await;
    let _plain = ch
        .basic_consume(
            s(&q2),
            s("shared"),
            BasicConsumeOptions::default(),
            no_args(),
        )
        .await
        .expect("plain consume");
    let ch3 = plain(&conn).await;
    expect_code(
        ch3.basic_consume(
            s(&q2),
            s(""),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            no_args(),
        )
        .await
        .map(|_| ()),
        403,
        "exclusive consume of a queue that has a consumer",
    );
    alive(&conn, "after the second 403").await;
    drop(c);
    delete_queue(&conn, &q).await;
    delete_queue(&conn, &q2).await;
}

/// Server-generated consumer tags; cancel stops deliveries.
async fn consumer_tags_and_cancel(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("ctag.q");
    declare(&ch, &q, no_args()).await;
    let cch = plain(&conn).await;
    let mut c1 = consume(&cch, &q, "", true).await;
    let c2 = consume(&cch, &q, "", true).await;
    let (t1, t2) = (c1.tag(), c2.tag());
    assert!(t1.as_str().starts_with("amq.ctag-"), "tag {t1}");
    assert_ne!(t1, t2, "generated tags differ");
    cch.basic_cancel(t2.clone(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    publish(&ch, "", &q, "one").await;
    publish(&ch, "", &q, "two").await;
    assert_eq!(
        bodies(&mut c1, 2, "remaining consumer").await,
        ["one", "two"]
    );
    cch.basic_cancel(t1, BasicCancelOptions::default())
        .await
        .expect("cancel");
    publish(&ch, "", &q, "three").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some("three"));
    drop((c1, c2));
    delete_queue(&conn, &q).await;
}

/// basic.cancel from the server when the queue is deleted (consumer_cancel_notify).
async fn cancel_notify_on_delete(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("cnotify.q");
    declare(&ch, &q, no_args()).await;
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "watch", true).await;
    ch.queue_delete(s(&q), QueueDeleteOptions::default())
        .await
        .expect("delete");
    match tokio::time::timeout(WAIT, c.next()).await {
        Ok(None) => {}
        other => panic!("expected the consumer to be cancelled, got {other:?}"),
    }
    // The consumer's channel is still open.
    cch.queue_declare(
        s(""),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .expect("channel still open after a server cancel");
}

/// A delivery in hand when its queue is deleted (the server's basic.cancel) is still
/// acked as usual: RabbitMQ takes the ack; a 406 "unknown delivery tag" would close the
/// channel under a worker finishing its job.
async fn ack_after_server_cancel(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("ackcancel.q");
    declare(&ch, &q, no_args()).await;
    publish(&ch, "", &q, "job").await;
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "worker", false).await;
    let d = next(&mut c, "the job").await;
    assert_eq!(body(&d), "job");
    ch.queue_delete(s(&q), QueueDeleteOptions::default())
        .await
        .expect("delete");
    match tokio::time::timeout(WAIT, c.next()).await {
        Ok(None) => {}
        other => panic!("expected the consumer to be cancelled, got {other:?}"),
    }
    d.acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack after the cancel");
    cch.queue_declare(
        s(""),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        no_args(),
    )
    .await
    .expect("the channel is still open after acking the cancelled consumer's delivery");
}

/// basic.get: message_count in get-ok; get-empty.
async fn get_and_get_empty(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("get.q");
    declare(&ch, &q, no_args()).await;
    assert!(get(&ch, &q).await.is_none(), "get-empty");
    for i in 0..3 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let m = get(&ch, &q).await.expect("get-ok");
    assert_eq!((body(&m.delivery).as_str(), m.message_count), ("m0", 2));
    assert!(!m.delivery.redelivered);
    // Without no-ack, then rejected with requeue: back, redelivered.
    let m = ch
        .basic_get(s(&q), BasicGetOptions { no_ack: false })
        .await
        .expect("get")
        .expect("get-ok");
    assert_eq!((body(&m.delivery).as_str(), m.message_count), ("m1", 1));
    m.delivery
        .acker
        .reject(BasicRejectOptions { requeue: true })
        .await
        .expect("reject");
    let m = get(&ch, &q).await.expect("get-ok");
    assert_eq!(body(&m.delivery), "m1");
    assert!(m.delivery.redelivered, "redelivered after a requeue");
    let m = get(&ch, &q).await.expect("get-ok");
    assert_eq!((body(&m.delivery).as_str(), m.message_count), ("m2", 0));
    assert!(get(&ch, &q).await.is_none(), "get-empty");
    delete_queue(&conn, &q).await;
}

/// ack multiple, nack requeue (redelivered), reject without requeue (dropped), nack
/// multiple.
async fn ack_nack_reject(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("anr.q");
    declare(&ch, &q, no_args()).await;
    for i in 0..6 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "anr", false).await;
    let mut ds = Vec::new();
    for i in 0..6 {
        let d = next(&mut c, "first round").await;
        assert_eq!(body(&d), format!("m{i}"));
        assert!(!d.redelivered);
        ds.push(d);
    }
    // ack m0..m1 at once
    cch.basic_ack(ds[1].delivery_tag, BasicAckOptions { multiple: true })
        .await
        .expect("ack multiple");
    // nack m2 with requeue
    ds[2]
        .acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .expect("nack");
    let d = next(&mut c, "redelivery after nack").await;
    assert_eq!(body(&d), "m2");
    assert!(d.redelivered, "redelivered flag after nack requeue");
    // reject m3 without requeue: gone
    ds[3]
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    // nack m4, m5 and the redelivered m2 at once, requeue
    cch.basic_nack(
        ds[5].delivery_tag.max(d.delivery_tag),
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .await
    .expect("nack multiple");
    let mut again = Vec::new();
    for _ in 0..3 {
        let d = next(&mut c, "redelivery after nack multiple").await;
        assert!(d.redelivered, "redelivered flag on {}", body(&d));
        again.push(body(&d));
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    again.sort();
    assert_eq!(again, ["m2", "m4", "m5"]);
    quiet(&mut c, "after everything was acked or dropped").await;
    drop(c);
    delete_queue(&conn, &q).await;
}

/// basic.recover requeue=true: unacked messages come again, redelivered.
async fn recover(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("recover.q");
    declare(&ch, &q, no_args()).await;
    publish(&ch, "", &q, "again").await;
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "rec", false).await;
    let d = next(&mut c, "first").await;
    assert!(!d.redelivered);
    cch.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .expect("recover");
    let d = next(&mut c, "after recover").await;
    assert_eq!(body(&d), "again");
    assert!(d.redelivered, "redelivered after recover");
    d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    quiet(&mut c, "after ack").await;
    drop(c);
    delete_queue(&conn, &q).await;
}

/// basic.qos prefetch 2 per consumer: exactly 2 until an ack.
async fn qos_prefetch_per_consumer(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("qos.q");
    declare(&ch, &q, no_args()).await;
    for i in 0..5 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let cch = plain(&conn).await;
    cch.basic_qos(2, BasicQosOptions { global: false })
        .await
        .expect("qos");
    let mut c = consume(&cch, &q, "qos", false).await;
    let a = next(&mut c, "1st").await;
    let _b = next(&mut c, "2nd").await;
    quiet(&mut c, "a third with prefetch 2").await;
    a.acker.ack(BasicAckOptions::default()).await.expect("ack");
    let cnext = next(&mut c, "3rd after an ack").await;
    assert_eq!(body(&cnext), "m2");
    quiet(&mut c, "a fourth with prefetch 2").await;
    drop(c);
    delete_queue(&conn, &q).await;
}

/// A channel-wide prefetch (`global`) holds back only what that channel may take: a
/// consumer with `basic.qos(1, global)` and one message unacked leaves the rest of the
/// queue to the other consumers (its member in the queue's group used to hold up to the
/// default 1,024, in flight to nobody).
async fn qos_global_leaves_the_rest_to_others(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("qosgo.q");
    declare(&ch, &q, no_args()).await;
    let slow = plain(&conn).await;
    slow.basic_qos(1, BasicQosOptions { global: true })
        .await
        .expect("qos global");
    let mut a = consume(&slow, &q, "slow", false).await;
    let other = t.connect().await;
    let fast = plain(&other).await;
    fast.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut b = consume(&fast, &q, "fast", false).await;
    for i in 0..10 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let held = next(&mut a, "the slow consumer's one").await;
    let mut got = 0;
    while got < 9 {
        let d = next(&mut b, "the others, to the fast consumer").await;
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        got += 1;
    }
    held.acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    delete_queue(&conn, &q).await;
}

/// A channel-wide prefetch is one limit for the channel's consumers of every queue:
/// with `basic.qos(2, global)` over two queues, the channel takes 2 messages in all and
/// leaves the other 8 to another connection's consumer (each of its consumers used to
/// hold up to 2 of its own queue, 4 in all, 2 of them in flight to nobody). Not in a
/// cluster of gateways: a consumer whose queue's group lives on another gateway gets the
/// limit as its own prefetch, not a share of one (ARCHITECTURE.md, "Prefetch").
async fn qos_global_shared_across_queues(backend: Backend) {
    if backend == Backend::Cluster {
        eprintln!("skipped: a channel's global prefetch is shared only by groups on its gateway");
        return;
    }
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let (q1, q2) = (uniq("qosgs.q1"), uniq("qosgs.q2"));
    for q in [&q1, &q2] {
        declare(&ch, q, no_args()).await;
    }
    let slow = plain(&conn).await;
    slow.basic_qos(2, BasicQosOptions { global: true })
        .await
        .expect("qos global");
    let mut s1 = consume(&slow, &q1, "s1", false).await;
    let mut s2 = consume(&slow, &q2, "s2", false).await;
    let other = t.connect().await;
    let fast = plain(&other).await;
    fast.basic_qos(100, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut f1 = consume(&fast, &q1, "f1", false).await;
    let mut f2 = consume(&fast, &q2, "f2", false).await;
    for i in 0..5 {
        for q in [&q1, &q2] {
            publish(&ch, "", q, &format!("{q}-{i}")).await;
        }
    }
    let (mut to_slow, mut to_fast) = (Vec::new(), 0);
    // Until both sides have what they should, and then a quiet spell in which nothing
    // more may come: the channel's deliveries may arrive after the other connection's
    // eighth (waiting for `to_fast` alone made this test flaky).
    let deadline = Instant::now() + WAIT;
    let mut quiet_until = None;
    loop {
        let now = Instant::now();
        if to_fast >= 8 && to_slow.len() >= 2 {
            let until = *quiet_until.get_or_insert(now + QUIET);
            if now >= until {
                break;
            }
        } else if now >= deadline {
            break;
        }
        tokio::select! {
            Some(Ok(d)) = s1.next() => to_slow.push(d),
            Some(Ok(d)) = s2.next() => to_slow.push(d),
            Some(Ok(d)) = f1.next() => {
                d.acker.ack(BasicAckOptions::default()).await.expect("ack");
                to_fast += 1;
            }
            Some(Ok(d)) = f2.next() => {
                d.acker.ack(BasicAckOptions::default()).await.expect("ack");
                to_fast += 1;
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    assert_eq!(
        to_fast, 8,
        "the other connection gets all the channel does not take"
    );
    assert_eq!(to_slow.len(), 2, "the channel's 2, over both queues");
    for d in to_slow {
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    delete_queue(&conn, &q1).await;
    delete_queue(&conn, &q2).await;
}

/// A consumer that sent no basic.qos holds any number unacked until its channel gets a
/// global one: then the limit holds it. In a cluster this checks the consume relay's
/// member turning bounded (its channel's credit pool stays on its gateway).
async fn qos_global_after_an_unlimited_consume(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("qosgu.q");
    declare(&ch, &q, no_args()).await;
    for i in 0..5 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "any", false).await;
    let mut held = Vec::new();
    for i in 0..5 {
        let d = next(&mut c, &format!("delivery {i} without qos")).await;
        assert_eq!(body(&d), format!("m{i}"));
        held.push(d);
    }
    cch.basic_qos(2, BasicQosOptions { global: true })
        .await
        .expect("qos global");
    for d in held {
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    for i in 5..10 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let first = next(&mut c, "1st under the global limit").await;
    let second = next(&mut c, "2nd under the global limit").await;
    assert_eq!((body(&first), body(&second)), ("m5".into(), "m6".into()));
    quiet(&mut c, "a third with a global prefetch of 2").await;
    first
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    assert_eq!(body(&next(&mut c, "3rd once one is acked").await), "m7");
    second
        .acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .expect("ack");
    cch.close(200, s("bye")).await.expect("close");
    delete_queue(&conn, &q).await;
}

/// A channel-wide prefetch changed after basic.consume applies to the consumers already
/// there, raised (Celery raises it while it holds ETA tasks, to take new work) or
/// lowered.
async fn qos_global_changed_after_consume(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("qosgc.q");
    declare(&ch, &q, no_args()).await;
    for i in 0..6 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let cch = plain(&conn).await;
    cch.basic_qos(2, BasicQosOptions { global: true })
        .await
        .expect("qos global");
    let mut c = consume(&cch, &q, "eta", false).await;
    let mut held = vec![next(&mut c, "1st").await, next(&mut c, "2nd").await];
    quiet(&mut c, "a third with a global prefetch of 2").await;
    cch.basic_qos(3, BasicQosOptions { global: true })
        .await
        .expect("qos global raised");
    held.push(next(&mut c, "3rd once the limit is raised to 3").await);
    quiet(&mut c, "a fourth with a global prefetch of 3").await;
    cch.basic_qos(1, BasicQosOptions { global: true })
        .await
        .expect("qos global lowered");
    for d in held {
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let d = next(&mut c, "one after the acks, the limit lowered to 1").await;
    assert_eq!(body(&d), "m3");
    quiet(&mut c, "a second with a global prefetch of 1").await;
    d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    assert_eq!(body(&next(&mut c, "the next").await), "m4");
    drop(c);
    delete_queue(&conn, &q).await;
}

/// A global basic.qos after a consumer was cancelled (still holding an unacked message)
/// gives the cancelled consumer nothing: the rest of the queue goes to the consumer of
/// another connection (it was sent into the cancelled one's mailbox, in flight to
/// nobody).
async fn qos_global_skips_cancelled_consumers(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("qosgx.q");
    declare(&ch, &q, no_args()).await;
    let gone = plain(&conn).await;
    gone.basic_qos(1, BasicQosOptions { global: true })
        .await
        .expect("qos global");
    let mut c = consume(&gone, &q, "gone", false).await;
    publish(&ch, "", &q, "held").await;
    let held = next(&mut c, "the one it holds").await;
    gone.basic_cancel("gone".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    gone.basic_qos(10, BasicQosOptions { global: true })
        .await
        .expect("qos global raised");
    let other = t.connect().await;
    let taker = plain(&other).await;
    let mut d = consume(&taker, &q, "taker", false).await;
    for i in 0..5 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    for i in 0..5 {
        let m = next(&mut d, "to the live consumer").await;
        assert_eq!(body(&m), format!("m{i}"));
        m.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    held.acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    delete_queue(&conn, &q).await;
}

/// basic.qos global=true: one limit shared by the channel's consumers (RabbitMQ 3.x).
async fn qos_global_per_channel(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let (q1, q2) = (uniq("qosg.q1"), uniq("qosg.q2"));
    for q in [&q1, &q2] {
        declare(&ch, q, no_args()).await;
        for i in 0..3 {
            publish(&ch, "", q, &format!("{q}-{i}")).await;
        }
    }
    let cch = plain(&conn).await;
    cch.basic_qos(3, BasicQosOptions { global: true })
        .await
        .expect("qos global");
    let mut c1 = consume(&cch, &q1, "g1", false).await;
    let mut c2 = consume(&cch, &q2, "g2", false).await;
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut last = None;
    while Instant::now() < deadline {
        tokio::select! {
            Some(Ok(d)) = c1.next() => { got += 1; last = Some(d); }
            Some(Ok(d)) = c2.next() => { got += 1; last = Some(d); }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    assert_eq!(
        got, 3,
        "deliveries with a channel-wide prefetch of 3 over 6 messages"
    );
    last.expect("a delivery")
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    let more = tokio::select! {
        Some(Ok(d)) = c1.next() => d,
        Some(Ok(d)) = c2.next() => d,
        () = tokio::time::sleep(WAIT) => panic!("nothing after an ack"),
    };
    drop(more);
    drop((c1, c2));
    delete_queue(&conn, &q1).await;
    delete_queue(&conn, &q2).await;
}

fn rich_headers() -> FieldTable {
    let nested = table(&[("inner", ls("deep")), ("n", AMQPValue::LongInt(-7))]);
    let mut arr = FieldArray::default();
    arr.push(ls("one"));
    arr.push(AMQPValue::LongInt(2));
    arr.push(AMQPValue::Boolean(false));
    arr.push(AMQPValue::FieldTable(table(&[("k", ls("v"))])));
    table(&[
        ("string", ls("héllo")),
        ("nested", AMQPValue::FieldTable(nested)),
        ("array", AMQPValue::FieldArray(arr)),
        ("true", AMQPValue::Boolean(true)),
        ("false", AMQPValue::Boolean(false)),
        ("byte", AMQPValue::ShortShortInt(-5)),
        ("short", AMQPValue::ShortInt(-300)),
        ("int", AMQPValue::LongInt(-70000)),
        ("long", AMQPValue::LongLongInt(-5_000_000_000)),
        ("float", AMQPValue::Float(1.5)),
        ("double", AMQPValue::Double(-2.25)),
        ("timestamp", AMQPValue::Timestamp(1_700_000_000)),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 255])),
        ),
        ("void", AMQPValue::Void),
    ])
}

/// Every basic property and a rich headers table round-trip exactly (consume and get).
async fn properties_round_trip(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("props.q");
    declare(&ch, &q, no_args()).await;
    let props = BasicProperties::default()
        .with_content_type(s("application/json"))
        .with_content_encoding(s("gzip"))
        .with_headers(rich_headers())
        .with_delivery_mode(2)
        .with_priority(5)
        .with_correlation_id(s("corr-1"))
        .with_reply_to(s("reply.here"))
        .with_expiration(s("60000"))
        .with_message_id(s("msg-1"))
        .with_timestamp(1_700_000_123)
        .with_type(s("order.created"))
        .with_user_id(s("guest"))
        .with_app_id(s("conformance"))
        .with_cluster_id(s("cluster-a"));
    let payload: Vec<u8> = (0..=255u8).collect();
    for _ in 0..2 {
        let c = publish_props(&ch, "", &q, &payload, props.clone()).await;
        assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
    }
    let m = get(&ch, &q).await.expect("get-ok");
    assert_eq!(m.delivery.data, payload);
    assert_eq!(m.delivery.properties, props, "properties via basic.get");
    let mut c = consume(&ch, &q, "props", true).await;
    let d = next(&mut c, "consumed").await;
    assert_eq!(d.data, payload);
    assert_eq!(d.properties, props, "properties via basic.deliver");
    // An empty body and no properties at all.
    publish_props(&ch, "", &q, b"", BasicProperties::default()).await;
    let d = next(&mut c, "empty").await;
    assert!(d.data.is_empty());
    assert_eq!(d.properties, BasicProperties::default());
    drop(c);
    delete_queue(&conn, &q).await;
}

/// Publisher confirms: one at a time, then many in flight (possibly acked with multiple).
async fn publisher_confirms(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("confirms.q");
    declare(&ch, &q, no_args()).await;
    for i in 0..5 {
        let c = publish_props(
            &ch,
            "",
            &q,
            format!("one-{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await;
        assert!(matches!(c, Confirmation::Ack(None)), "{c:?}");
    }
    let mut pending = Vec::new();
    for i in 0..200 {
        pending.push(
            ch.basic_publish(
                s(""),
                s(&q),
                BasicPublishOptions::default(),
                format!("many-{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .expect("publish"),
        );
    }
    for (i, p) in pending.into_iter().enumerate() {
        let c = tokio::time::timeout(WAIT, p)
            .await
            .unwrap_or_else(|_| panic!("confirm {i} not within 5 s"))
            .expect("confirm");
        assert!(matches!(c, Confirmation::Ack(None)), "confirm {i}: {c:?}");
    }
    ch.wait_for_confirms().await.expect("wait_for_confirms");
    assert_eq!(count(&ch, &q).await, 205);
    // Confirms to an unroutable exchange target: ack too (nothing to store).
    publish(&ch, "amq.direct", &uniq("nobody"), "unroutable").await;
    delete_queue(&conn, &q).await;
}

/// Bodies of every shape come back byte for byte, in order: empty, small, one large
/// frame (kept as read, not copied), and many frames (lapin splits a body over
/// frame_max), on a durable queue with confirms and a consumer reading them back.
async fn bodies_of_every_size(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("bodies.q");
    declare(&ch, &q, no_args()).await;
    let sizes = [0usize, 1, 100, 1023, 1024, 4096, 60_000, 300_000, 1_000_003];
    let payload =
        |i: usize, n: usize| -> Vec<u8> { (0..n).map(|j| (j * 31 + i * 7) as u8).collect() };
    let mut pending = Vec::new();
    for (i, n) in sizes.iter().enumerate() {
        pending.push(
            ch.basic_publish(
                s(""),
                s(&q),
                BasicPublishOptions::default(),
                &payload(i, *n),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
    }
    for p in pending {
        let c = tokio::time::timeout(WAIT, p)
            .await
            .expect("confirm in time");
        assert!(matches!(c, Ok(Confirmation::Ack(None))), "{c:?}");
    }
    let mut c = consume(&ch, &q, "bodies", true).await;
    for (i, n) in sizes.iter().enumerate() {
        let d = next(&mut c, "a body").await;
        assert_eq!(d.data.len(), *n, "body {i}: length");
        assert!(d.data == payload(i, *n), "body {i} of {n} bytes differs");
    }
    drop(c);
    delete_queue(&conn, &q).await;
}

/// Publishes not yet confirmed (several store writes in flight on the connection), in a
/// burst and then paced: a method on the same channel right behind them counts them
/// all, every confirm is an ack, in order, and a consumer gets them in publish order.
async fn publishes_in_flight_then_a_method_sees_them(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("inflight.q");
    declare(&ch, &q, no_args()).await;
    let (burst, paced) = (3_000usize, 200usize);
    let mut pending = Vec::new();
    for i in 0..burst + paced {
        if i >= burst {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        pending.push(
            ch.basic_publish(
                s(""),
                s(&q),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
    }
    // Not one confirm awaited yet: the count must still see every publish.
    assert_eq!(
        count(&ch, &q).await as usize,
        burst + paced,
        "message count right behind the publishes"
    );
    for (i, p) in pending.into_iter().enumerate() {
        let c = tokio::time::timeout(WAIT, p)
            .await
            .unwrap_or_else(|_| panic!("confirm {i} in time"));
        assert!(
            matches!(c, Ok(Confirmation::Ack(None))),
            "confirm {i}: {c:?}"
        );
    }
    let mut c = consume(&ch, &q, "inflight", true).await;
    for i in 0..burst + paced {
        let d = next(&mut c, "a publish").await;
        assert_eq!(body(&d), format!("m{i}"), "publish order");
    }
    drop(c);
    delete_queue(&conn, &q).await;
}

/// tx: rolled-back publishes never arrive, committed ones do.
async fn tx_commit_rollback(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("tx.q");
    declare(&ch, &q, no_args()).await;
    let tx = plain(&conn).await;
    tx.tx_select().await.expect("tx.select");
    publish(&tx, "", &q, "rolled back").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count(&ch, &q).await, 0, "uncommitted publish visible");
    tx.tx_rollback().await.expect("tx.rollback");
    publish(&tx, "", &q, "committed 1").await;
    publish(&tx, "", &q, "committed 2").await;
    tx.tx_commit().await.expect("tx.commit");
    let mut got = Vec::new();
    while let Some(b) = get_body(&ch, &q).await {
        got.push(b);
    }
    assert_eq!(got, ["committed 1", "committed 2"]);
    delete_queue(&conn, &q).await;
}

/// tx: a publish to a missing exchange closes the channel with 404 at once, as RabbitMQ
/// does, and the transaction's earlier publishes are never stored (they used to be, by
/// the commit that failed on the later one).
async fn tx_publish_to_missing_exchange(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("txmiss.q");
    declare(&ch, &q, no_args()).await;
    let tx = plain(&conn).await;
    tx.tx_select().await.expect("tx.select");
    publish(&tx, "", &q, "before").await;
    let _ = tx
        .basic_publish(
            s(&uniq("txmiss.nowhere")),
            s("k"),
            BasicPublishOptions::default(),
            b"to nowhere",
            BasicProperties::default(),
        )
        .await;
    // The 404 may close the channel before the commit is sent (the client then refuses
    // it), or answer the commit.
    let e = tx.tx_commit().await.expect_err("the channel is closed");
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => assert_eq!(p.get_id(), 404, "{e}"),
        _ => assert!(!tx.status().connected(), "{e}"),
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count(&ch, &q).await, 0, "nothing of the transaction stored");
    delete_queue(&conn, &q).await;
}

/// tx: acks in a rolled-back transaction are not applied: the message is redelivered
/// once the channel closes.
async fn tx_rollback_acks(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("txack.q");
    declare(&ch, &q, no_args()).await;
    publish(&ch, "", &q, "keep me").await;
    publish(&ch, "", &q, "ack me").await;
    let tx = plain(&conn).await;
    tx.tx_select().await.expect("tx.select");
    let mut c = consume(&tx, &q, "txc", false).await;
    let a = next(&mut c, "first").await;
    let b = next(&mut c, "second").await;
    a.acker.ack(BasicAckOptions::default()).await.expect("ack");
    tx.tx_rollback().await.expect("tx.rollback");
    b.acker.ack(BasicAckOptions::default()).await.expect("ack");
    tx.tx_commit().await.expect("tx.commit");
    tx.close(200, s("bye")).await.expect("close");
    drop(c);
    let m = get(&ch, &q)
        .await
        .expect("the rolled-back ack's message is back");
    assert_eq!(body(&m.delivery), "keep me");
    assert!(m.delivery.redelivered, "redelivered");
    assert_eq!(
        get_body(&ch, &q).await,
        None,
        "the committed ack was applied"
    );
    delete_queue(&conn, &q).await;
}

// ---------------------------------------------------------------------------------------
// mqgate extensions

/// `x-delayed-message` exchange, `x-delay: 1500`: delivered after about 1.5 s.
async fn delayed_message_exchange(backend: Backend) {
    let Some(t) = Target::mqgate_only(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let ex = uniq("delayed.x");
    let q = uniq("delayed.q");
    exchange(
        &ch,
        &ex,
        ExchangeKind::Custom("x-delayed-message".into()),
        table(&[("x-delayed-type", ls("direct"))]),
    )
    .await;
    declare(&ch, &q, no_args()).await;
    bind(&ch, &q, &ex, "k", no_args()).await;
    let mut c = consume(&ch, &q, "delayed", true).await;
    let t0 = Instant::now();
    let conf = publish_props(
        &ch,
        &ex,
        "k",
        b"later",
        BasicProperties::default().with_headers(table(&[("x-delay", AMQPValue::LongInt(1500))])),
    )
    .await;
    assert!(matches!(conf, Confirmation::Ack(_)), "{conf:?}");
    publish(&ch, &ex, "k", "now").await;
    assert_eq!(body(&next(&mut c, "undelayed").await), "now");
    quiet(&mut c, "the delayed message at once").await;
    assert_eq!(body(&next(&mut c, "delayed").await), "later");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(1) && took <= Duration::from_secs(5),
        "delayed by {took:?}"
    );
    // A time to live counts from the release, as the plugin's queues apply it on
    // arrival: delayed 800 ms with an expiration of 600, and consumed 300 ms after its
    // release, it is still there.
    let later = uniq("delayed.q2");
    declare(&ch, &later, no_args()).await;
    bind(&ch, &later, &ex, "k2", no_args()).await;
    publish_props(
        &ch,
        &ex,
        "k2",
        b"fresh on release",
        BasicProperties::default()
            .with_expiration("600".into())
            .with_headers(table(&[("x-delay", AMQPValue::LongInt(800))])),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut c2 = consume(&ch, &later, "after", true).await;
    assert_eq!(
        body(
            &next(
                &mut c2,
                "delayed past its TTL, its TTL counted from the release"
            )
            .await
        ),
        "fresh on release"
    );
}

/// `x-retry-policy: rocketmq`: a nacked message is not redelivered at once (the
/// ladder's first delay is 10 s).
async fn rocketmq_retry_policy(backend: Backend) {
    let Some(t) = Target::mqgate_only(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("rmq.q");
    declare(&ch, &q, table(&[("x-retry-policy", ls("rocketmq"))])).await;
    let pending_before = t.broker().map(|b| b.delayed_pending()).unwrap_or(0);
    publish(&ch, "", &q, "retry me").await;
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "rmq", false).await;
    let d = next(&mut c, "first delivery").await;
    d.acker
        .nack(BasicNackOptions {
            requeue: false,
            ..Default::default()
        })
        .await
        .expect("nack");
    quiet(&mut c, "redelivery within the first retry delay").await;
    // The retry copy waits in the delay scheduler for the ladder's first step (10 s);
    // `amqp_mqgate.rs` runs the whole ladder with short delays.
    let pending = t.broker().map(|b| b.delayed_pending()).unwrap_or(0);
    assert_eq!(pending, pending_before + 1, "one retry copy scheduled");
}

/// Consumer argument `x-stream-offset: first` on a classic queue replays acked messages.
async fn replay_classic_queue(backend: Backend) {
    let Some(t) = Target::mqgate_only(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("replay.q");
    declare(&ch, &q, no_args()).await;
    for i in 0..3 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    let cch = plain(&conn).await;
    let mut c = consume(&cch, &q, "live", false).await;
    for i in 0..3 {
        let d = next(&mut c, "live").await;
        assert_eq!(body(&d), format!("m{i}"));
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    cch.basic_cancel(s("live"), BasicCancelOptions::default())
        .await
        .expect("cancel");
    drop(c);
    let rch = plain(&conn).await;
    let mut r = consume_args(
        &rch,
        &q,
        "replay",
        false,
        table(&[("x-stream-offset", ls("first"))]),
    )
    .await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = next(&mut r, "replayed").await;
        got.push(body(&d));
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    assert_eq!(got, ["m0", "m1", "m2"]);
}

// ---------------------------------------------------------------------------------------
// Streams

/// A stream queue: offsets first / next / numeric / timestamp; every consumer gets
/// every message.
async fn stream_offsets(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("stream.q");
    declare_with(
        &ch,
        &q,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&[("x-queue-type", ls("stream"))]),
    )
    .await;
    for i in 0..5 {
        publish(&ch, "", &q, &format!("m{i}")).await;
    }
    async fn reader(conn: &Connection, q: &str, offset: AMQPValue) -> (Channel, Consumer) {
        let ch = plain(conn).await;
        ch.basic_qos(100, BasicQosOptions::default())
            .await
            .expect("qos");
        let c = consume_args(&ch, q, "", false, table(&[("x-stream-offset", offset)])).await;
        (ch, c)
    }
    async fn read(c: &mut Consumer, n: usize, what: &str) -> Vec<String> {
        let mut out = Vec::new();
        for _ in 0..n {
            let d = next(c, what).await;
            out.push(body(&d));
            d.acker.ack(BasicAckOptions::default()).await.expect("ack");
        }
        out
    }
    let (_c1, mut first) = reader(&conn, &q, ls("first")).await;
    let (_c2, mut first2) = reader(&conn, &q, ls("first")).await;
    let (_c3, mut next_) = reader(&conn, &q, ls("next")).await;
    let (_c4, mut at2) = reader(&conn, &q, AMQPValue::LongLongInt(2)).await;
    let past = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        - 3600;
    let (_c5, mut ts) = reader(&conn, &q, AMQPValue::Timestamp(past)).await;
    let all: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    assert_eq!(read(&mut first, 5, "first").await, all);
    assert_eq!(read(&mut first2, 5, "first, second consumer").await, all);
    assert_eq!(read(&mut at2, 3, "offset 2").await, ["m2", "m3", "m4"]);
    assert_eq!(read(&mut ts, 5, "timestamp an hour ago").await, all);
    quiet(&mut next_, "next: nothing old").await;
    publish(&ch, "", &q, "m5").await;
    assert_eq!(read(&mut next_, 1, "next").await, ["m5"]);
    assert_eq!(read(&mut first, 1, "first, live").await, ["m5"]);
    assert_eq!(read(&mut first2, 1, "first2, live").await, ["m5"]);
    // Consuming a stream without a prefetch is refused by RabbitMQ (406); acks are
    // required (no-ack consume refused).
    drop((first, first2, next_, at2, ts));
    delete_queue(&conn, &q).await;
}

// ---------------------------------------------------------------------------------------
// Cross-protocol

struct Mqtt {
    client: rumqttc::AsyncClient,
    rx: tokio::sync::mpsc::UnboundedReceiver<rumqttc::Event>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Mqtt {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Mqtt {
    async fn connect(host: &str, port: u16, id: &str) -> Mqtt {
        let mut o = rumqttc::MqttOptions::new(id, host, port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_credentials("guest", "guest");
        let (client, mut el) = rumqttc::AsyncClient::new(o, 16);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(ev) = el.poll().await {
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
        let mut m = Mqtt { client, rx, task };
        m.wait_for("CONNACK", |ev| {
            matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))
        })
        .await;
        m
    }

    async fn wait_for(
        &mut self,
        what: &str,
        f: impl Fn(&rumqttc::Event) -> bool,
    ) -> rumqttc::Event {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(ev)) if f(&ev) => return ev,
                Ok(Some(_)) => {}
                _ => panic!("MQTT: no {what} within 5 s"),
            }
        }
    }
}

/// MQTT publish to `a/b/c` reaches an AMQP queue bound to amq.topic with `a.b.c`.
async fn mqtt_to_amqp(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let Some((host, port)) = t.mqtt_addr() else {
        eprintln!("skipped: no MQTT listener (set MQGATE_MQTT_ADDR)");
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq("m2a.q");
    let word = uniq("m2a").replace('.', "");
    declare(&ch, &q, no_args()).await;
    bind(&ch, &q, "amq.topic", &format!("{word}.b.c"), no_args()).await;
    let mut c = consume(&ch, &q, "m2a", true).await;
    let mut m = Mqtt::connect(&host, port, &uniq("m2a-pub")).await;
    m.client
        .publish(
            format!("{word}/b/c"),
            rumqttc::QoS::AtLeastOnce,
            false,
            b"from mqtt".to_vec(),
        )
        .await
        .expect("mqtt publish");
    m.wait_for("PUBACK", |ev| {
        matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))
    })
    .await;
    let d = next(&mut c, "from MQTT").await;
    assert_eq!(d.data, b"from mqtt");
    assert_eq!(d.routing_key.as_str(), format!("{word}.b.c"));
    assert_eq!(d.exchange.as_str(), "amq.topic");
    drop(c);
    delete_queue(&conn, &q).await;
}

/// AMQP publish to amq.topic with key `x.y` reaches an MQTT subscriber of `x/y`.
async fn amqp_to_mqtt(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let Some((host, port)) = t.mqtt_addr() else {
        eprintln!("skipped: no MQTT listener (set MQGATE_MQTT_ADDR)");
        return;
    };
    let word = uniq("a2m").replace('.', "");
    let mut m = Mqtt::connect(&host, port, &uniq("a2m-sub")).await;
    m.client
        .subscribe(format!("{word}/y"), rumqttc::QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    m.wait_for("SUBACK", |ev| {
        matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)))
    })
    .await;
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    publish(&ch, "amq.topic", &format!("{word}.y"), "from amqp").await;
    let ev = m
        .wait_for("PUBLISH", |ev| {
            matches!(ev, rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)))
        })
        .await;
    let rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) = ev else {
        unreachable!()
    };
    assert_eq!(p.topic, format!("{word}/y"));
    assert_eq!(&p.payload[..], b"from amqp");
}

// ---------------------------------------------------------------------------------------
// Fan-out

/// A fanout exchange with 10 bound queues: each gets the message.
async fn fanout_ten_queues(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let ex = uniq("fan10.x");
    exchange(&ch, &ex, ExchangeKind::Fanout, no_args()).await;
    let mut qs = Vec::new();
    for i in 0..10 {
        let q = uniq(&format!("fan10.q{i}"));
        declare(&ch, &q, no_args()).await;
        bind(&ch, &q, &ex, "", no_args()).await;
        qs.push(q);
    }
    publish(&ch, &ex, "", "to all").await;
    for q in &qs {
        assert_eq!(get_body(&ch, q).await.as_deref(), Some("to all"), "{q}");
        assert_eq!(get_body(&ch, q).await, None, "{q}");
        delete_queue(&conn, q).await;
    }
    delete_exchange(&conn, &ex).await;
}

// ---------------------------------------------------------------------------------------
// Bad input (raw client)

/// Put a message in a fresh queue before the bad input.
async fn before_bad_input(t: &Target, base: &str) -> String {
    let conn = t.connect().await;
    let ch = chan(&conn).await;
    let q = uniq(base);
    declare(&ch, &q, no_args()).await;
    publish(&ch, "", &q, "kept").await;
    conn.close(200, s("bye")).await.expect("close");
    q
}

/// After: a new connection works and the message is still there.
async fn after_bad_input(t: &Target, q: &str) {
    let conn = t.connect().await;
    alive(&conn, "a new connection after bad input").await;
    let ch = chan(&conn).await;
    assert_eq!(
        get_body(&ch, q).await.as_deref(),
        Some("kept"),
        "message published before"
    );
    delete_queue(&conn, q).await;
}

/// A frame over the negotiated frame_max (4096): connection.close 501.
async fn frame_too_large(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let q = before_bad_input(&t, "bad.framemax").await;
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    r.method(1, publish_method("", &q)).await;
    r.frame(2, 1, &content_header(10_000)).await;
    r.frame(3, 1, &vec![b'x'; 10_000]).await;
    let (code, text) = r.expect_connection_close("frame over frame_max").await;
    assert_eq!(code, 501, "{text}");
    after_bad_input(&t, &q).await;
}

/// A content body frame with no header before it: 505.
async fn body_without_header(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let q = before_bad_input(&t, "bad.body").await;
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    r.frame(3, 1, b"hello").await;
    let (code, text) = r.expect_connection_close("body without header").await;
    assert_eq!(code, 505, "{text}");
    // Also after a publish method: body where the header should be.
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    r.method(1, publish_method("", &q)).await;
    r.frame(3, 1, b"hello").await;
    let (code, text) = r.expect_connection_close("body instead of header").await;
    assert_eq!(code, 505, "{text}");
    after_bad_input(&t, &q).await;
}

/// A method frame while a content header is expected: 505.
async fn method_while_content_expected(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let q = before_bad_input(&t, "bad.midcontent").await;
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    r.method(1, publish_method("", &q)).await;
    r.method(1, publish_method("", &q)).await;
    let (code, text) = r.expect_connection_close("method instead of header").await;
    assert_eq!(code, 505, "{text}");
    // And while the body is expected.
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    r.method(1, publish_method("", &q)).await;
    r.frame(2, 1, &content_header(5)).await;
    r.method(1, publish_method("", &q)).await;
    let (code, text) = r.expect_connection_close("method instead of body").await;
    assert_eq!(code, 505, "{text}");
    after_bad_input(&t, &q).await;
}

/// A method whose arguments run past the payload: RabbitMQ sends 501 (FRAME_ERROR,
/// "cannot decode"); an unknown method id: 540 or 503.
async fn malformed_method(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let q = before_bad_input(&t, "bad.malformed").await;
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    // queue.declare whose short string claims 200 octets and has 1.
    r.frame(1, 1, &[0, 50, 0, 10, 0, 0, 200, b'a']).await;
    let (code, text) = r.expect_connection_close("truncated queue.declare").await;
    assert_eq!(code, 501, "{text}");
    after_bad_input(&t, &q).await;
}

/// A frame whose end octet is not 0xCE: 501.
async fn bad_frame_end(backend: Backend) {
    let Some(t) = Target::standard(backend).await else {
        return;
    };
    let q = before_bad_input(&t, "bad.frameend").await;
    let mut r = Raw::guest(&t).await;
    r.open_channel(1).await;
    let p = encode(&AMQPClass::Channel(protocol::channel::AMQPMethod::Open(
        protocol::channel::Open {},
    )));
    let mut f = vec![1, 0, 2];
    f.extend_from_slice(&(p.len() as u32).to_be_bytes());
    f.extend_from_slice(&p);
    f.push(0x00);
    r.write(&f).await;
    let (code, text) = r.expect_connection_close("bad frame end").await;
    assert_eq!(code, 501, "{text}");
    after_bad_input(&t, &q).await;
}

scenario!(
    protocol_header_mismatch,
    login_plain_and_amqplain,
    bad_password,
    server_properties,
    tune_and_heartbeats,
    vhost_access,
    limited_user_permissions,
    close_handshake,
    channels_open_close_flow,
    channel_reopen,
    method_on_unopened_channel,
    publish_immediate_is_not_implemented,
    default_exchange_cannot_be_declared,
    direct_fanout_default,
    topic_wildcards,
    headers_exchange,
    headers_exchange_with_x,
    amq_exchanges,
    exchange_errors,
    publisher_sees_routing_changes,
    exchange_to_exchange,
    alternate_exchange,
    auto_delete_exchange,
    queue_declare_kinds,
    redeclare_integer_widths,
    exclusive_queue,
    auto_delete_queue,
    bind_unbind_purge,
    purge_keeps_unacked,
    purge_stays_purged_across_restart,
    queue_delete_conditions,
    message_ttl,
    per_message_ttl_without_consumers,
    ttl_zero_delivers_now_or_never,
    queue_expires,
    max_length,
    max_length_dead_letters,
    max_length_keeps_unacked,
    counts_are_exact_after_requeue,
    dead_letter_x_death,
    dead_letter_cycles,
    single_active_consumer,
    delivery_limit,
    cancel_gives_back_what_was_never_sent,
    large_prefetch_honoured,
    no_qos_sends_everything,
    max_priority,
    durable_survives_restart,
    mandatory_return,
    consume_no_ack,
    exclusive_consumer,
    consumer_tags_and_cancel,
    cancel_notify_on_delete,
    ack_after_server_cancel,
    get_and_get_empty,
    ack_nack_reject,
    recover,
    qos_prefetch_per_consumer,
    qos_global_per_channel,
    qos_global_leaves_the_rest_to_others,
    qos_global_shared_across_queues,
    qos_global_changed_after_consume,
    qos_global_after_an_unlimited_consume,
    qos_global_skips_cancelled_consumers,
    properties_round_trip,
    publisher_confirms,
    bodies_of_every_size,
    publishes_in_flight_then_a_method_sees_them,
    tx_commit_rollback,
    tx_publish_to_missing_exchange,
    tx_rollback_acks,
    delayed_message_exchange,
    rocketmq_retry_policy,
    replay_classic_queue,
    stream_offsets,
    mqtt_to_amqp,
    amqp_to_mqtt,
    fanout_ten_queues,
    frame_too_large,
    body_without_header,
    method_while_content_expected,
    malformed_method,
    bad_frame_end,
);

//! The socket side of a protocol connection, the same for AMQP and MQTT: the read room,
//! the output buffer and its high-water marks, and the write arm. Each connection task
//! selects over [`Input::read_some`] and [`Output::write_some`] (they borrow different
//! halves, so both can be armed in one `select!`) next to its protocol's own arms
//! (deliveries, heartbeats, kicks).
//!
//! - **Read room.** The room offered to one read starts at [`MIN_READ`] and doubles while
//!   reads fill half of it, up to [`MAX_READ`], so a busy publisher's reads take everything
//!   it sent and every publish in them is stored in one write (a consumed `BytesMut`
//!   otherwise offers reads of a few bytes, and each publish costs a write and an fsync
//!   of its own). It halves while reads are small. At the smallest room with nothing
//!   pending, a read lands in a buffer on the polling thread's stack and only what
//!   arrived is copied to the heap: an idle connection holds no read buffer at all (as
//!   Mosquitto reads into one buffer per worker). A drained buffer is given back
//!   ([`Input::settle`]).
//! - **Output.** Deliveries are pulled only while the unsent output is under
//!   [`OUT_HIGH_WATER`]; reading stops past [`OUT_HARD_LIMIT`] (a client that floods
//!   without reading is pushed back by TCP). A drained output buffer a burst made big is
//!   given back.
//! - **Shared bodies.** A large body goes out as the `Bytes` it is stored in
//!   ([`Output::put_shared`]): what was encoded before it is frozen off the buffer, and
//!   both wait in order ahead of it; one vectored write (`writev`) sends them all. A
//!   4 KiB body is then never copied in user space on its way out (it was 2-3 % of the
//!   broker's CPU on 4 KiB AMQP deliveries). Small ones are still copied: a copy of a
//!   few hundred bytes costs less than another slice to write.
//! - **Answers that wait on a sync.** Many clients leave Nagle's algorithm on (rumqttc
//!   has no switch for it): their kernel holds a small segment while an earlier one is
//!   unacknowledged. The broker's kernel delays its ACK to send it with the answer, and
//!   a QoS 1 publish's answer waits for the fsync, so the client's next publish sat in
//!   its kernel for the rest of that sync (median 380 µs of a 555 µs end-to-end latency
//!   at 5,000 publishes/s). A connection whose answers will wait on a write asks for the
//!   ACK at once ([`Input::ack_now`], `TCP_QUICKACK`): at most one setsockopt and one
//!   bare ACK per read that carried such publishes.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Instant;

/// Stop pulling deliveries past this much unsent output.
pub const OUT_HIGH_WATER: usize = 256 * 1024;
/// Stop reading past this much unsent output.
pub const OUT_HARD_LIMIT: usize = 4 * 1024 * 1024;
/// Deliveries taken per wake-up before the loop looks at its socket again.
pub const DELIVERY_BURST: usize = 256;
/// Slices handed to one vectored write at most.
const MAX_IOV: usize = 64;
/// The smallest room offered to one read.
pub const MIN_READ: usize = 2 * 1024;
/// The largest room offered to one read.
pub const MAX_READ: usize = 64 * 1024;

/// A connection's own deadline timer (AMQP's heartbeats), boxed and made only once there
/// is a deadline. Set to a deadline, it is moved on only when it fires and the deadline
/// has moved since: a busy connection does not take a timer in and out of the runtime's
/// wheel on every turn of its loop, as a `sleep_until` made per `select!` does.
#[derive(Debug, Default)]
pub struct Timer(Option<Pin<Box<tokio::time::Sleep>>>);

/// Resolves when `deadline` passes (never when it is `None`), timed by `timer`: a
/// `select!` arm that holds no timer of its own.
pub fn expired(
    timer: &mut Timer,
    deadline: Option<Instant>,
) -> impl std::future::Future<Output = ()> + '_ {
    std::future::poll_fn(move |cx| {
        let Some(deadline) = deadline else {
            return Poll::Pending;
        };
        let sleep = timer
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            ready!(std::future::Future::poll(sleep.as_mut(), cx));
            if sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            // Fired at a deadline the connection has moved on since: wait for the
            // current one.
            sleep.as_mut().reset(deadline);
        }
    })
}

/// The reading half of a connection and what it read but has not handled.
#[derive(Debug)]
pub struct Input<R> {
    /// The socket's read half.
    pub rd: R,
    /// Read, not yet decoded.
    pub buf: BytesMut,
    /// When something was last read.
    pub last: Instant,
    /// The room offered to the next read (at most [`MAX_READ`]). A `u32`, so that it and
    /// `quick` take the 8 bytes it took alone as a `usize`: an idle MQTT connection's
    /// state stays one 512-byte allocation (ARCHITECTURE.md, "What an idle MQTT
    /// connection costs").
    room: u32,
    /// The TCP socket under `rd`, to ACK what was read at once ([`Input::ack_now`]).
    quick: Option<QuickAck>,
}

/// A TCP connection's socket, for one thing only: to have its kernel acknowledge at once
/// what it received (`TCP_QUICKACK`) when the answer will be late (see the module's
/// documentation). It is the caller's to pair it with the stream it came from (an
/// [`Input`] over that stream's read half, which keeps the socket open); paired with
/// another, it would ACK that other socket early, or fail, and nothing worse. Linux
/// only: elsewhere it does nothing.
#[derive(Clone, Copy, Debug)]
pub struct QuickAck(
    /// The descriptor plus one, and [`ACKED`] once [`Input::ack_now`] ran since the last
    /// read (4 bytes, and `Option<QuickAck>` too).
    #[cfg(target_os = "linux")]
    std::num::NonZeroU32,
);

/// [`QuickAck`]'s flag: asked since the last read (descriptors stay below 2^30 on Linux).
#[cfg(target_os = "linux")]
const ACKED: u32 = 1 << 31;

impl QuickAck {
    /// The socket of `tcp` (`None` for a descriptor out of range, which Linux never gives).
    pub fn of(tcp: &tokio::net::TcpStream) -> Option<Self> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            u32::try_from(tcp.as_raw_fd())
                .ok()
                .and_then(|fd| fd.checked_add(1))
                .filter(|v| v & ACKED == 0)
                .and_then(std::num::NonZeroU32::new)
                .map(Self)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = tcp;
            Some(Self())
        }
    }

    /// Whether it was asked since the last read.
    fn acked(self) -> bool {
        #[cfg(target_os = "linux")]
        {
            self.0.get() & ACKED != 0
        }
        #[cfg(not(target_os = "linux"))]
        {
            false
        }
    }

    /// The same socket, with the flag of [`QuickAck::acked`] set or cleared.
    fn with_acked(self, acked: bool) -> Self {
        #[cfg(target_os = "linux")]
        {
            let v = if acked {
                self.0.get() | ACKED
            } else {
                self.0.get() & !ACKED
            };
            std::num::NonZeroU32::new(v).map_or(self, Self)
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = acked;
            self
        }
    }

    /// ACK now what arrived, and the next segments until the kernel sees answers again.
    #[allow(unsafe_code)]
    fn now(self) {
        #[cfg(target_os = "linux")]
        {
            let fd = ((self.0.get() & !ACKED) - 1) as std::os::fd::RawFd;
            let one: libc::c_int = 1;
            // SAFETY: setsockopt reads `one`, a c_int alive across the call, and touches
            // nothing else of this process. The descriptor is the connection's socket,
            // kept open by the read half its `Input` owns; were it ever stale, the call
            // would fail or ACK another socket early, which is harmless.
            let _ = unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_QUICKACK,
                    std::ptr::from_ref(&one).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
        }
    }
}

impl<R: AsyncRead + Unpin> Input<R> {
    /// `buf`: what the handshake read beyond its own packets.
    pub fn new(rd: R, buf: BytesMut) -> Self {
        Self {
            rd,
            buf,
            last: Instant::now(),
            room: MIN_READ as u32,
            quick: None,
        }
    }

    /// The TCP socket under `rd`, when there is one, for [`Input::ack_now`].
    pub fn set_quick_ack(&mut self, quick: Option<QuickAck>) {
        self.quick = quick;
    }

    /// Have the kernel ACK at once what was read: call when what was read will be
    /// answered only once a write is durable (a client with Nagle's algorithm on holds
    /// its next small segment until then otherwise). Once a read; nothing on a stream
    /// that is not plain TCP.
    pub fn ack_now(&mut self) {
        if let Some(q) = self.quick.filter(|q| !q.acked()) {
            q.now();
            self.quick = Some(q.with_acked(true));
        }
    }

    /// The room offered to the next read.
    fn room(&self) -> usize {
        self.room as usize
    }

    /// Whether the next read goes through the stack: nothing pending, smallest room.
    fn idle(&self) -> bool {
        self.buf.is_empty() && self.room() == MIN_READ
    }

    /// Make room for the next read (call before arming [`Input::read_some`]).
    pub fn prepare(&mut self) {
        if !self.idle() && self.buf.capacity() - self.buf.len() < self.room() / 2 {
            self.buf.reserve(self.room());
        }
    }

    /// Read what the socket has; `Ok(0)`: the peer closed.
    pub async fn read_some(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_read_some(cx)).await
    }

    /// [`Input::read_some`] as a poll (a connection loop that polls its sources itself
    /// keeps no future for it).
    pub fn poll_read_some(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let n = if self.idle() {
            // The buffer lives only while the read is polled, never across the wait.
            let mut space = [MaybeUninit::<u8>::uninit(); MIN_READ];
            let mut read = ReadBuf::uninit(&mut space);
            ready!(Pin::new(&mut self.rd).poll_read(cx, &mut read))?;
            self.buf.extend_from_slice(read.filled());
            read.filled().len()
        } else {
            // Into the buffer's spare room (what `AsyncReadExt::read_buf` does; a full
            // buffer gets 64 bytes more).
            ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut self.rd),
                cx,
                &mut self.buf
            ))?
        };
        if n > 0 {
            self.quick = self.quick.map(|q| q.with_acked(false));
            let room = if n >= self.room() / 2 {
                (self.room() * 2).min(MAX_READ)
            } else {
                (self.room() / 2).max(MIN_READ)
            };
            self.room = room as u32;
            self.last = Instant::now();
        }
        Poll::Ready(Ok(n))
    }

    /// After the input was handled: give back a drained buffer a burst made big, or any
    /// drained buffer once reads are small again (the next one goes through the stack).
    pub fn settle(&mut self) {
        if self.buf.is_empty() && (self.buf.capacity() > 2 * self.room() || self.room() == MIN_READ)
        {
            self.buf = BytesMut::new();
        }
    }
}

/// The writing half of a connection and its unsent output.
#[derive(Debug)]
pub struct Output<W> {
    /// The socket's write half.
    pub wr: W,
    /// Encoded, not yet written; after everything in `shared`.
    pub out: BytesMut,
    /// When something was last written.
    pub last: Instant,
    /// Output written before `out`: shared bodies and what was encoded before each.
    /// Made by the first [`Output::put_shared`] (MQTT connections never make it).
    shared: Option<Box<Shared>>,
}

#[derive(Debug, Default)]
struct Shared {
    parts: VecDeque<Bytes>,
    bytes: usize,
}

impl<W: AsyncWrite + Unpin> Output<W> {
    /// An empty output.
    pub fn new(wr: W) -> Self {
        Self::with_buffer(wr, BytesMut::new())
    }

    /// An output that goes on from `out` (its unsent bytes, its room).
    pub fn with_buffer(wr: W, out: BytesMut) -> Self {
        Self {
            wr,
            out,
            last: Instant::now(),
            shared: None,
        }
    }

    /// Unsent bytes.
    pub fn len(&self) -> usize {
        self.shared.as_ref().map_or(0, |s| s.bytes) + self.out.len()
    }

    /// Whether everything has been written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether there is something to write (arm [`Output::write_some`]).
    pub fn pending(&self) -> bool {
        !self.is_empty()
    }

    /// Whether to pull more deliveries.
    pub fn may_deliver(&self) -> bool {
        self.len() < OUT_HIGH_WATER
    }

    /// Whether to read more input.
    pub fn may_read(&self) -> bool {
        self.len() < OUT_HARD_LIMIT
    }

    /// Queue `bytes` after everything encoded so far, without copying it; encoding
    /// goes on into `out` after it.
    pub fn put_shared(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        let shared = self.shared.get_or_insert_with(Box::default);
        if !self.out.is_empty() {
            let head = self.out.split().freeze();
            shared.bytes += head.len();
            shared.parts.push_back(head);
        }
        shared.bytes += bytes.len();
        shared.parts.push_back(bytes);
    }

    /// Write some of the output; `Ok(0)`: the peer is gone.
    pub async fn write_some(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_write_some(cx)).await
    }

    /// [`Output::write_some`] as a poll.
    pub fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let n = match self.shared.as_deref_mut() {
            Some(shared) if shared.bytes > 0 => {
                let mut iov = [IoSlice::new(&[]); MAX_IOV];
                let mut k = 0;
                for part in shared.parts.iter().take(MAX_IOV) {
                    iov[k] = IoSlice::new(part);
                    k += 1;
                }
                if k < MAX_IOV && !self.out.is_empty() {
                    iov[k] = IoSlice::new(&self.out);
                    k += 1;
                }
                let n = ready!(Pin::new(&mut self.wr).poll_write_vectored(cx, &iov[..k]))?;
                let mut left = n;
                while left > 0 {
                    let Some(part) = shared.parts.front_mut() else {
                        break;
                    };
                    let take = left.min(part.len());
                    part.advance(take);
                    shared.bytes -= take;
                    left -= take;
                    if part.is_empty() {
                        shared.parts.pop_front();
                    }
                }
                self.out.advance(left);
                n
            }
            _ => {
                let n = ready!(Pin::new(&mut self.wr).poll_write(cx, &self.out))?;
                self.out.advance(n);
                n
            }
        };
        if n > 0 {
            self.last = Instant::now();
            if self.out.is_empty() && self.out.capacity() > OUT_HIGH_WATER {
                self.out = BytesMut::new();
            }
        }
        Poll::Ready(Ok(n))
    }

    /// Write everything unsent (a connection's last words), then flush.
    pub async fn write_all_pending(&mut self) -> std::io::Result<()> {
        if let Some(shared) = self.shared.as_deref_mut() {
            while let Some(part) = shared.parts.pop_front() {
                shared.bytes -= part.len();
                self.wr.write_all(&part).await?;
            }
        }
        if !self.out.is_empty() {
            self.wr.write_all(&self.out).await?;
            self.out.clear();
        }
        // TLS and WebSocket streams hold what was written until flushed.
        self.wr.flush().await
    }

    /// Write everything left and shut the write half down (the connection ends).
    pub async fn close(&mut self) {
        let _ = self.write_all_pending().await;
        let _ = self.wr.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn ack_now_takes_a_tcp_socket_out_of_delayed_acks() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (rd, _wr) = server.into_split();
        let quick = QuickAck::of(rd.as_ref()).unwrap();
        let mut input = Input::new(rd, BytesMut::new());
        let quickack = |i: &Input<tokio::net::tcp::OwnedReadHalf>| {
            socket2::SockRef::from(i.rd.as_ref())
                .tcp_quickack()
                .unwrap()
        };
        // As a request-answer connection's kernel does: ACKs wait for the answers.
        socket2::SockRef::from(input.rd.as_ref())
            .set_tcp_quickack(false)
            .unwrap();
        assert!(!quickack(&input));
        input.ack_now();
        assert!(!quickack(&input), "no socket given: nothing done");
        input.set_quick_ack(Some(quick));
        assert_eq!(std::mem::size_of::<Option<QuickAck>>(), 4);
        client.write_all(b"PUBLISH").await.unwrap();
        read_all(&mut input, 7).await;
        input.ack_now();
        assert!(quickack(&input), "ACKs go out at once again");
        // Once a read: a second batch of the same read asks nothing more.
        socket2::SockRef::from(input.rd.as_ref())
            .set_tcp_quickack(false)
            .unwrap();
        input.ack_now();
        assert!(!quickack(&input), "one setsockopt a read");
        client.write_all(b"PUBLISH").await.unwrap();
        read_all(&mut input, 7).await;
        input.ack_now();
        assert!(quickack(&input), "the next read is ACKed at once");
    }

    /// Read until `n` bytes arrived, then drop them as a connection that handled them.
    #[cfg(target_os = "linux")]
    async fn read_all(input: &mut Input<tokio::net::tcp::OwnedReadHalf>, n: usize) {
        while input.buf.len() < n {
            input.prepare();
            assert!(input.read_some().await.unwrap() > 0);
        }
        input.buf.clear();
        input.settle();
    }

    #[tokio::test]
    async fn an_idle_input_holds_no_read_buffer() {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let mut input = Input::new(server, BytesMut::new());
        for round in 0..3u8 {
            input.prepare();
            assert_eq!(
                input.buf.capacity(),
                0,
                "round {round}: nothing reserved while idle"
            );
            client.write_all(&[round; 10]).await.unwrap();
            assert_eq!(input.read_some().await.unwrap(), 10);
            assert_eq!(&input.buf[..], &[round; 10]);
            input.buf.advance(10);
            input.settle();
            assert_eq!(
                input.buf.capacity(),
                0,
                "round {round}: drained buffer given back"
            );
        }
    }

    #[tokio::test]
    async fn a_burst_grows_the_room_and_every_byte_arrives_in_order() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut input = Input::new(server, BytesMut::new());
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                client.write_all(&sent).await.unwrap();
                client
            })
        };
        let mut got = Vec::new();
        let mut largest_room = 0;
        while got.len() < sent.len() {
            input.prepare();
            let n = input.read_some().await.unwrap();
            assert!(n > 0);
            largest_room = largest_room.max(input.room());
            got.extend_from_slice(&input.buf.split());
            input.settle();
        }
        drop(writer.await.unwrap());
        assert_eq!(got, sent);
        assert!(largest_room > MIN_READ, "full reads doubled the room");
    }

    /// Shared bodies and encoded bytes around them reach the peer in the order they
    /// were queued, through partial writes and more parts than one vectored write
    /// takes; `len` counts both, and the last words are written whole.
    async fn shared_bodies_in_order<W, R>(wr: W, mut rd: R)
    where
        W: AsyncWrite + Unpin,
        R: AsyncRead + Unpin + Send + 'static,
    {
        let mut out = Output::new(wr);
        let mut want = Vec::new();
        for i in 0..300u32 {
            let head = format!("<{i}>");
            out.out.extend_from_slice(head.as_bytes());
            want.extend_from_slice(head.as_bytes());
            if i % 3 != 0 {
                let body = Bytes::from(vec![(i % 251) as u8; 1000 + i as usize]);
                want.extend_from_slice(&body);
                out.put_shared(body);
            }
        }
        out.out.extend_from_slice(b"end");
        want.extend_from_slice(b"end");
        assert_eq!(out.len(), want.len());
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut rd, &mut got)
                .await
                .unwrap();
            got
        });
        let mut writes = 0;
        while out.len() > want.len() / 2 {
            assert!(out.write_some().await.unwrap() > 0);
            writes += 1;
        }
        assert!(writes > 1, "more than one write");
        out.put_shared(Bytes::from_static(b"-tail-"));
        out.out.extend_from_slice(b"!");
        want.extend_from_slice(b"-tail-!");
        out.close().await;
        assert_eq!(out.len(), 0);
        drop(out);
        assert_eq!(reader.await.unwrap(), want);
    }

    #[tokio::test]
    async fn shared_bodies_go_out_in_order_through_a_pipe() {
        // A small pipe: partial writes, one slice at a time (no vectored writes).
        let (client, server) = tokio::io::duplex(1000);
        shared_bodies_in_order(client, server).await;
    }

    #[tokio::test]
    async fn shared_bodies_go_out_in_order_through_tcp() {
        // writev on a real socket, over 64 slices at once pending.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (server, _) = accepted.unwrap();
        shared_bodies_in_order(client.unwrap(), server).await;
    }

    #[tokio::test]
    async fn a_partial_frame_stays_buffered_between_reads() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut input = Input::new(server, BytesMut::new());
        client.write_all(b"hel").await.unwrap();
        input.prepare();
        input.read_some().await.unwrap();
        input.settle();
        assert_eq!(&input.buf[..], b"hel", "undecoded bytes are kept");
        client.write_all(b"lo").await.unwrap();
        input.prepare();
        input.read_some().await.unwrap();
        assert_eq!(&input.buf[..], b"hello");
        drop(client);
        input.buf.clear();
        input.settle();
        assert_eq!(input.read_some().await.unwrap(), 0, "end of stream");
    }
}

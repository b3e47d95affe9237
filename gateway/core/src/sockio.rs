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

use bytes::{Buf, BytesMut};
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
    room: usize,
}

impl<R: AsyncRead + Unpin> Input<R> {
    /// `buf`: what the handshake read beyond its own packets.
    pub fn new(rd: R, buf: BytesMut) -> Self {
        Self {
            rd,
            buf,
            last: Instant::now(),
            room: MIN_READ,
        }
    }

    /// Whether the next read goes through the stack: nothing pending, smallest room.
    fn idle(&self) -> bool {
        self.buf.is_empty() && self.room == MIN_READ
    }

    /// Make room for the next read (call before arming [`Input::read_some`]).
    pub fn prepare(&mut self) {
        if !self.idle() && self.buf.capacity() - self.buf.len() < self.room / 2 {
            self.buf.reserve(self.room);
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
            self.room = if n >= self.room / 2 {
                (self.room * 2).min(MAX_READ)
            } else {
                (self.room / 2).max(MIN_READ)
            };
            self.last = Instant::now();
        }
        Poll::Ready(Ok(n))
    }

    /// After the input was handled: give back a drained buffer a burst made big, or any
    /// drained buffer once reads are small again (the next one goes through the stack).
    pub fn settle(&mut self) {
        if self.buf.is_empty() && (self.buf.capacity() > 2 * self.room || self.room == MIN_READ) {
            self.buf = BytesMut::new();
        }
    }
}

/// The writing half of a connection and its unsent output.
#[derive(Debug)]
pub struct Output<W> {
    /// The socket's write half.
    pub wr: W,
    /// Encoded, not yet written.
    pub out: BytesMut,
    /// When something was last written.
    pub last: Instant,
}

impl<W: AsyncWrite + Unpin> Output<W> {
    /// An empty output.
    pub fn new(wr: W) -> Self {
        Self {
            wr,
            out: BytesMut::new(),
            last: Instant::now(),
        }
    }

    /// Whether there is something to write (arm [`Output::write_some`]).
    pub fn pending(&self) -> bool {
        !self.out.is_empty()
    }

    /// Whether to pull more deliveries.
    pub fn may_deliver(&self) -> bool {
        self.out.len() < OUT_HIGH_WATER
    }

    /// Whether to read more input.
    pub fn may_read(&self) -> bool {
        self.out.len() < OUT_HARD_LIMIT
    }

    /// Write some of the output; `Ok(0)`: the peer is gone.
    pub async fn write_some(&mut self) -> std::io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_write_some(cx)).await
    }

    /// [`Output::write_some`] as a poll.
    pub fn poll_write_some(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.wr).poll_write(cx, &self.out))?;
        if n > 0 {
            self.out.advance(n);
            self.last = Instant::now();
            if self.out.is_empty() && self.out.capacity() > OUT_HIGH_WATER {
                self.out = BytesMut::new();
            }
        }
        Poll::Ready(Ok(n))
    }

    /// Write everything left and shut the write half down (the connection ends).
    pub async fn close(&mut self) {
        let _ = self.wr.write_all(&self.out).await;
        self.out.clear();
        let _ = self.wr.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

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
            largest_room = largest_room.max(input.room);
            got.extend_from_slice(&input.buf.split());
            input.settle();
        }
        drop(writer.await.unwrap());
        assert_eq!(got, sent);
        assert!(largest_room > MIN_READ, "full reads doubled the room");
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

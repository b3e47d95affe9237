//! A raw AMQP 0-9-1 client for scenarios a library client cannot express (nesting,
//! oversize frames, channel ids, frames after connection.close): frames are written byte
//! by byte.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Target;

const WAIT: Duration = Duration::from_secs(5);

/// A raw AMQP connection: bytes out, frames (type, channel, payload) in.
#[derive(Debug)]
pub struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

/// A short string.
pub fn short(out: &mut Vec<u8>, v: &str) {
    out.push(v.len() as u8);
    out.extend_from_slice(v.as_bytes());
}

/// A long string.
pub fn long(out: &mut Vec<u8>, v: &[u8]) {
    out.extend_from_slice(&(v.len() as u32).to_be_bytes());
    out.extend_from_slice(v);
}

/// A method payload: class and method ids, then `args`.
pub fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    p
}

/// connection.start-ok with these client properties (a whole table), mechanism and
/// response.
pub fn start_ok(props: &[u8], mechanism: &str, response: &[u8]) -> Vec<u8> {
    let mut a = props.to_vec();
    short(&mut a, mechanism);
    long(&mut a, response);
    short(&mut a, "en_US");
    method(10, 11, &a)
}

/// An empty field table.
pub const EMPTY_TABLE: [u8; 4] = [0, 0, 0, 0];

impl Raw {
    /// Connect and read connection.start.
    pub async fn open(t: &Target) -> Raw {
        let mut s = TcpStream::connect((t.host.as_str(), t.port))
            .await
            .expect("tcp connect");
        s.write_all(b"AMQP\x00\x00\x09\x01").await.expect("header");
        let mut r = Raw { s, buf: Vec::new() };
        let (ty, _, p) = r.frame().await.expect("connection.start");
        assert_eq!((ty, &p[..4]), (1, &[0, 10, 0, 10][..]), "connection.start");
        r
    }

    /// Send one frame.
    pub async fn send(&mut self, ty: u8, ch: u16, payload: &[u8]) {
        // The broker may close while a large frame is still being written.
        let _ = self.try_send(ty, ch, payload).await;
    }

    /// Send one frame; the socket's error if the write fails (the peer closed).
    pub async fn try_send(&mut self, ty: u8, ch: u16, payload: &[u8]) -> std::io::Result<()> {
        let mut f = vec![ty];
        f.extend_from_slice(&ch.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        self.s.write_all(&f).await
    }

    /// The next frame, or `None` when the socket closes first.
    pub async fn frame(&mut self) -> Option<(u8, u16, Vec<u8>)> {
        loop {
            if self.buf.len() >= 7 {
                let len = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() >= len + 8 {
                    let f: Vec<u8> = self.buf.drain(..len + 8).collect();
                    return Some((
                        f[0],
                        u16::from_be_bytes([f[1], f[2]]),
                        f[7..7 + len].to_vec(),
                    ));
                }
            }
            let mut b = [0u8; 8192];
            match tokio::time::timeout(WAIT, self.s.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&b[..n]),
                Ok(_) => return None,
                Err(_) => panic!("no frame from the broker within {WAIT:?}"),
            }
        }
    }

    /// Frames until connection.close; its reply code. Answers it with close-ok.
    pub async fn close_code(&mut self) -> u16 {
        while let Some((ty, _, p)) = self.frame().await {
            if ty == 1 && p[..4] == [0, 10, 0, 50] {
                self.send(1, 0, &method(10, 51, &[])).await;
                return u16::from_be_bytes([p[4], p[5]]);
            }
        }
        panic!("the socket closed without connection.close");
    }

    /// PLAIN guest/guest, tune-ok (frame_max 131072), open vhost `/`, channel 1.
    pub async fn login(t: &Target) -> Raw {
        let mut r = Raw::connect(t, 16).await;
        r.send(1, 1, &method(20, 10, &[0])).await;
        let (_, _, ok) = r.frame().await.expect("channel.open-ok");
        assert_eq!(&ok[..4], &[0, 20, 0, 11], "channel.open-ok");
        r
    }

    /// PLAIN guest/guest, tune-ok with `channel_max` (frame_max 131072), open vhost `/`;
    /// no channel open.
    pub async fn connect(t: &Target, channel_max: u16) -> Raw {
        let mut r = Raw::open(t).await;
        r.send(1, 0, &start_ok(&EMPTY_TABLE, "PLAIN", b"\0guest\0guest"))
            .await;
        let (_, _, tune) = r.frame().await.expect("connection.tune");
        assert_eq!(&tune[..4], &[0, 10, 0, 30], "connection.tune");
        let mut a = channel_max.to_be_bytes().to_vec();
        a.extend_from_slice(&131_072u32.to_be_bytes());
        a.extend_from_slice(&0u16.to_be_bytes());
        r.send(1, 0, &method(10, 31, &a)).await;
        let mut a = Vec::new();
        short(&mut a, "/");
        short(&mut a, "");
        a.push(0);
        r.send(1, 0, &method(10, 40, &a)).await;
        let (_, _, ok) = r.frame().await.expect("connection.open-ok");
        assert_eq!(&ok[..4], &[0, 10, 0, 41], "connection.open-ok");
        r
    }
}

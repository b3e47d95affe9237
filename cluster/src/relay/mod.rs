//! Relays over core NATS between gateways (`docs/design/sharding.md` section 4).
//!
//! A shard's owner serves requests about it on `mqgate.<stream>.s.<NN>.<op>` in the
//! queue group `owner` while it owns the shard, so a request for a shard nobody owns
//! fails fast with *no responders*, and a request that meets an old owner after a move
//! is answered by its fenced store (an error), never as if it had been applied.
//! What a lost request or reply costs differs by relay: a forward is idempotent (the
//! destination's marks), so it is asked again, never lost nor applied twice; a publish
//! with no answer in time fails unacknowledged (the client's resend may duplicate it);
//! a lost delivery batch is delivered again; an admin operation with nobody serving
//! the shard is asked again (each is idempotent).

pub mod admin;
pub(crate) mod codec;
pub mod consume;
pub mod forward;
pub mod publish;

/// The subject of operation `op` on `shard` in the cluster of `stream`.
pub fn subject(stream: &str, shard: u16, op: &str) -> String {
    format!("mqgate.{stream}.s.{shard:02}.{op}")
}

/// Faults a test injects into a relay server: drop every `n`-th message it would send
/// (a forward reply, a delivery batch), as a message lost on the way looks; fail
/// starts of a shard's servers.
#[derive(Debug, Default)]
pub struct Faults {
    /// Drop every this many (0: none).
    pub drop_every: std::sync::atomic::AtomicU64,
    seen: std::sync::atomic::AtomicU64,
    /// Dropped so far.
    pub dropped: std::sync::atomic::AtomicU64,
    /// Fail this many starts of a shard's relay servers (as a NATS subscription that
    /// fails would).
    pub fail_starts: std::sync::atomic::AtomicU64,
}

impl Faults {
    /// Whether this start of a shard's relay servers fails (counts one down).
    pub(crate) fn fail_start(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.fail_starts
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    pub(crate) fn drop_this(&self) -> bool {
        use std::sync::atomic::Ordering;
        let every = self.drop_every.load(Ordering::Relaxed);
        if every == 0 {
            return false;
        }
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_multiple_of(every) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

/// The owner's subscription to operation `op` of `shard`, in queue group `owner`, in
/// place on the server when this returns.
pub(crate) async fn owner_subscription(
    client: &async_nats::Client,
    stream: &str,
    shard: u16,
    op: &str,
) -> mqgate_core::Result<async_nats::Subscriber> {
    let invalid = |what: String| mqgate_core::CoreError::Invalid(format!("relay {op}: {what}"));
    let sub = client
        .queue_subscribe(subject(stream, shard, op), "owner".into())
        .await
        .map_err(|e| invalid(format!("subscribe: {e}")))?;
    client
        .flush()
        .await
        .map_err(|e| invalid(format!("flush: {e}")))?;
    Ok(sub)
}

/// Serve operation `op` of `shard` as its owner: each request that has a reply subject
/// is handled by `handle(payload, reply_to)` in a task of its own, so a slow one holds
/// up no other. The serving task stops when the returned [`Serving`] is dropped.
pub(crate) async fn serve_each<F, Fut>(
    client: &async_nats::Client,
    stream: &str,
    shard: u16,
    op: &str,
    handle: F,
) -> mqgate_core::Result<Serving>
where
    F: Fn(bytes::Bytes, async_nats::Subject) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use futures_util::StreamExt;
    let mut sub = owner_subscription(client, stream, shard, op).await?;
    Ok(Serving(tokio::spawn(async move {
        let mut parted = Parted::default();
        while let Some(msg) = sub.next().await {
            let Some(reply_to) = msg.reply else {
                continue;
            };
            let payload = if msg.payload.first() == Some(&PART) {
                match parted.add(&reply_to, &msg.payload) {
                    Some(whole) => whole,
                    None => continue,
                }
            } else {
                msg.payload
            };
            tokio::spawn(handle(payload, reply_to));
        }
    })))
}

/// The first byte of a part of a relay message NATS cannot carry in one message (a
/// large message in a publish request or a delivery batch): `0xF0`, index u32, count
/// u32, a slice of the message. Parts go in order on one subject (a request's with
/// one reply subject); the receiver takes the message once the last is in.
pub(crate) const PART: u8 = 0xF0;
const PART_HEAD: usize = 9;
/// The most a message sent in parts may be (a message is at most 128 MiB).
const MAX_PARTED: usize = 512 << 20;

/// `payload` as NATS messages of at most `max` bytes: itself when it fits, else parts.
pub(crate) fn split_parts(payload: bytes::Bytes, max: usize) -> Vec<bytes::Bytes> {
    use bytes::BufMut;
    if payload.len() <= max {
        return vec![payload];
    }
    let chunk = max.saturating_sub(PART_HEAD).max(1);
    let count = payload.len().div_ceil(chunk);
    (0..count)
        .map(|i| {
            let part = &payload[i * chunk..((i + 1) * chunk).min(payload.len())];
            let mut out = Vec::with_capacity(PART_HEAD + part.len());
            out.put_u8(PART);
            out.put_u32(i as u32);
            out.put_u32(count as u32);
            out.extend_from_slice(part);
            bytes::Bytes::from(out)
        })
        .collect()
}

/// Messages arriving in parts, by key (a request's reply subject; one key for a
/// member's deliveries). One whose parts stop coming (its sender gave up, or a part
/// was lost) is dropped after a minute, or at once when a part comes out of order: a
/// request's sender hears nothing and fails it (not confirmed); a delivery batch is
/// lost, and delivered again like any lost batch.
#[derive(Default)]
pub(crate) struct Parted {
    open: std::collections::HashMap<String, (std::time::Instant, u32, u32, Vec<u8>)>,
}

impl Parted {
    /// Part `b` of the message keyed `reply`: the whole message once complete.
    pub(crate) fn add(&mut self, reply: &str, b: &[u8]) -> Option<bytes::Bytes> {
        let now = std::time::Instant::now();
        self.open
            .retain(|_, (at, ..)| now.duration_since(*at) < std::time::Duration::from_secs(60));
        if b.len() < PART_HEAD || b[0] != PART {
            return None;
        }
        let index = u32::from_be_bytes(b[1..5].try_into().expect("4 bytes"));
        let count = u32::from_be_bytes(b[5..9].try_into().expect("4 bytes"));
        let body = &b[PART_HEAD..];
        if index == 0 {
            self.open.insert(
                reply.to_owned(),
                (now, 0, count, Vec::with_capacity(body.len())),
            );
        }
        let (at, next, want, buf) = self.open.get_mut(reply)?;
        if index != *next || count != *want || buf.len() + body.len() > MAX_PARTED {
            self.open.remove(reply);
            return None;
        }
        *at = now;
        *next += 1;
        buf.extend_from_slice(body);
        if *next < *want {
            return None;
        }
        self.open
            .remove(reply)
            .map(|(.., buf)| bytes::Bytes::from(buf))
    }
}

/// A relay server's task: stopped when dropped (the shard is released).
#[derive(Debug)]
pub(crate) struct Serving(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

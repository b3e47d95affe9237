//! A connected session's direct QoS 0 queue: messages handed over without being stored,
//! bounded by count (`qos0_queue`) and by bytes (`qos0_queue_bytes`).
//!
//! A publisher that finds the queue full waits for room, so a subscriber that reads
//! slowly slows it down rather than losing messages. The wait goes on while the session
//! makes progress: every `qos0_max_wait` window (at least [`MIN_STUCK_WINDOW`]) it
//! must take at least [`progress_floor`] messages. A session that does not (its client stopped reading)
//! is marked **stuck**: from then on its QoS 0 messages are refused at once (the caller
//! drops and counts them) and nobody waits for it again, until the session has drained
//! its queue below half (count and bytes).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mqgate_core::mailbox;
use mqgate_store::{Message, TopicName};
use tokio::sync::Notify;
use tokio::time::Instant;

/// What a queue took of one message, in bytes: body, topic and properties (what a
/// queued message keeps alive), plus a fixed overhead.
fn cost(m: &Message) -> usize {
    let props: usize = m.properties.iter().map(|(k, v)| k.len() + v.len()).sum();
    m.body.len() + m.topic.as_str().len() + props + 64
}

#[derive(Debug)]
struct State {
    /// The session topic, for the log.
    session: TopicName,
    max_messages: usize,
    max_bytes: usize,
    bytes: AtomicUsize,
    /// Messages queued.
    queued: AtomicUsize,
    stuck: AtomicBool,
    /// Messages the session has taken so far (its progress).
    taken: AtomicU64,
    /// Publishers waiting for room: the receiver wakes them only when there are any.
    waiting: AtomicUsize,
    room: Notify,
}

/// The publishers' side (cloned into the live-session map).
#[derive(Clone, Debug)]
pub(crate) struct Qos0Tx {
    tx: mailbox::Sender<Arc<Message>>,
    state: Arc<State>,
}

/// The session's side, drained by its connection task.
#[derive(Debug)]
pub(crate) struct Qos0Rx {
    rx: mailbox::Receiver<Arc<Message>>,
    state: Arc<State>,
}

/// The answer to an offer of one message.
#[derive(Debug)]
pub(crate) enum Offer {
    /// Queued.
    Queued,
    /// No room now: the message back, to wait with or drop.
    Full(Arc<Message>),
    /// The session is stuck or gone: drop it without waiting.
    Refused,
}

/// A queue for `session` holding at most `max_messages` messages and `max_bytes`
/// bytes (one message over `max_bytes` still fits an empty queue).
pub(crate) fn queue(session: TopicName, max_messages: usize, max_bytes: usize) -> (Qos0Tx, Qos0Rx) {
    let max_messages = max_messages.max(1);
    // A mailbox (bounded here by `queued`): an idle session's queue holds no buffer.
    let (tx, rx) = mailbox::channel();
    let state = Arc::new(State {
        session,
        max_messages,
        max_bytes: max_bytes.max(1),
        bytes: AtomicUsize::new(0),
        queued: AtomicUsize::new(0),
        stuck: AtomicBool::new(false),
        taken: AtomicU64::new(0),
        waiting: AtomicUsize::new(0),
        room: Notify::new(),
    });
    (
        Qos0Tx {
            tx,
            state: Arc::clone(&state),
        },
        Qos0Rx { rx, state },
    )
}

impl Qos0Tx {
    /// No room: the message back, unless the session is gone (then nobody waits).
    fn full(&self, m: Arc<Message>) -> Offer {
        if self.tx.is_closed() {
            Offer::Refused
        } else {
            Offer::Full(m)
        }
    }

    /// Queue `m` if there is room now.
    pub(crate) fn try_send(&self, m: Arc<Message>) -> Offer {
        let s = &*self.state;
        if s.stuck.load(Ordering::Acquire) {
            return Offer::Refused;
        }
        let size = cost(&m);
        let before = s.bytes.fetch_add(size, Ordering::AcqRel);
        if before > 0 && before + size > s.max_bytes {
            s.bytes.fetch_sub(size, Ordering::AcqRel);
            return self.full(m);
        }
        if s.queued.fetch_add(1, Ordering::AcqRel) >= s.max_messages {
            s.queued.fetch_sub(1, Ordering::AcqRel);
            s.bytes.fetch_sub(size, Ordering::AcqRel);
            return self.full(m);
        }
        match self.tx.send(m) {
            Ok(()) => Offer::Queued,
            Err(_) => {
                s.queued.fetch_sub(1, Ordering::AcqRel);
                s.bytes.fetch_sub(size, Ordering::AcqRel);
                Offer::Refused
            }
        }
    }

    /// Queue `m`, waiting for room while the session makes progress: it must take at
    /// least [`progress_floor`] messages in every `window` the wait lasts. Returns
    /// whether it was queued. A session that makes no such progress in a whole window
    /// is marked stuck (and later offers are refused at once).
    pub(crate) async fn send_by(&self, m: Arc<Message>, window: Duration) -> bool {
        let window = window.max(MIN_STUCK_WINDOW);
        let s = &*self.state;
        let mut m = match self.try_send(m) {
            Offer::Queued => return true,
            Offer::Refused => return false,
            Offer::Full(m) => m,
        };
        s.waiting.fetch_add(1, Ordering::SeqCst);
        let floor = progress_floor(s.max_messages);
        let mut taken_at_start = s.taken.load(Ordering::Acquire);
        let mut deadline = Instant::now() + window;
        let queued = loop {
            let notified = s.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Room may have come between the last try and the registration.
            m = match self.try_send(m) {
                Offer::Queued => break true,
                Offer::Refused => break false,
                Offer::Full(m) => m,
            };
            if tokio::time::timeout_at(deadline, notified).await.is_ok() {
                continue;
            }
            let taken = s.taken.load(Ordering::Acquire);
            if taken.wrapping_sub(taken_at_start) >= floor {
                // Slow but reading: the publisher keeps waiting.
                taken_at_start = taken;
                deadline = Instant::now() + window;
                continue;
            }
            // One more look: the deadline and the room may have come together.
            match self.try_send(m) {
                Offer::Queued => break true,
                Offer::Refused => break false,
                Offer::Full(_) => {}
            }
            if !s.stuck.swap(true, Ordering::AcqRel) {
                tracing::warn!(
                    session = %s.session,
                    "MQTT: QoS 0 subscriber stuck (queue full, nothing taken for qos0_max_wait); its QoS 0 messages are dropped until it drains"
                );
            }
            break false;
        };
        s.waiting.fetch_sub(1, Ordering::SeqCst);
        queued
    }
}

/// The shortest window without progress that marks a session stuck, whatever
/// `qos0_max_wait` says: a scheduling hiccup of a reading client is not a stuck one.
pub(crate) const MIN_STUCK_WINDOW: Duration = Duration::from_millis(250);

/// Messages a session must take per `qos0_max_wait` window to count as reading while
/// a publisher waits for it: 1/64 of its queue (at least one).
fn progress_floor(max_messages: usize) -> u64 {
    (max_messages as u64 / 64).max(1)
}

impl Qos0Rx {
    /// The next message (`None`: every sender is gone). A poll, not an `async fn`:
    /// its future holds only the reference.
    #[cfg(test)]
    pub(crate) fn recv(&mut self) -> impl std::future::Future<Output = Option<Arc<Message>>> + '_ {
        std::future::poll_fn(move |cx| self.poll_recv(cx))
    }

    /// [`Qos0Rx::recv`] as a poll.
    pub(crate) fn poll_recv(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Arc<Message>>> {
        let m = std::task::ready!(self.rx.poll_recv(cx));
        if let Some(m) = &m {
            self.took(m);
        }
        std::task::Poll::Ready(m)
    }

    /// The next message if one is queued.
    pub(crate) fn try_recv(&mut self) -> Option<Arc<Message>> {
        let m = self.rx.try_recv()?;
        self.took(&m);
        Some(m)
    }

    fn took(&self, m: &Message) {
        let s = &*self.state;
        let bytes = s.bytes.fetch_sub(cost(m), Ordering::AcqRel) - cost(m);
        let queued = s.queued.fetch_sub(1, Ordering::AcqRel) - 1;
        s.taken.fetch_add(1, Ordering::AcqRel);
        if s.stuck.load(Ordering::Acquire)
            && queued <= s.max_messages / 2
            && bytes <= s.max_bytes / 2
            && s.stuck.swap(false, Ordering::AcqRel)
        {
            tracing::info!(session = %s.session, "MQTT: QoS 0 subscriber drained its queue; no longer stuck");
        }
        if s.waiting.load(Ordering::SeqCst) > 0 {
            s.room.notify_waiters();
        }
    }
}

impl Drop for Qos0Rx {
    fn drop(&mut self) {
        // Waiting publishers see the queue closed at once.
        self.rx.close();
        self.state.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> Arc<Message> {
        Arc::new(Message::new(TopicName::new("t").unwrap(), vec![0u8; n]))
    }

    #[tokio::test]
    async fn bounded_by_count_and_bytes_stuck_until_drained() {
        let (tx, mut rx) = queue(TopicName::new("%MQTT%c").unwrap(), 4, 4096);
        assert!(matches!(tx.try_send(msg(1000)), Offer::Queued));
        assert!(matches!(tx.try_send(msg(1000)), Offer::Queued));
        assert!(matches!(tx.try_send(msg(1000)), Offer::Queued));
        assert!(
            matches!(tx.try_send(msg(1000)), Offer::Full(_)),
            "bytes bound before the count"
        );
        assert!(matches!(tx.try_send(msg(10)), Offer::Queued));
        assert!(
            !tx.send_by(msg(10), Duration::from_millis(1)).await,
            "full for a whole window without progress"
        );
        assert!(
            matches!(tx.try_send(msg(10)), Offer::Refused),
            "stuck: refused at once"
        );
        rx.try_recv().unwrap();
        assert!(
            matches!(tx.try_send(msg(10)), Offer::Refused),
            "still above half"
        );
        rx.try_recv().unwrap();
        assert!(
            matches!(tx.try_send(msg(10)), Offer::Queued),
            "drained below half"
        );
        // A waiting publisher gets room as soon as the receiver takes a message.
        assert!(matches!(tx.try_send(msg(1000)), Offer::Queued));
        assert!(matches!(tx.try_send(msg(1000)), Offer::Full(_)));
        let tx2 = tx.clone();
        let waiter =
            tokio::spawn(async move { tx2.send_by(msg(1000), Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        rx.recv().await.unwrap();
        assert!(waiter.await.unwrap());
        drop(rx);
        assert!(matches!(tx.try_send(msg(1)), Offer::Refused), "gone");
    }

    #[tokio::test]
    async fn a_slow_reader_slows_the_publisher_without_losses() {
        let (tx, mut rx) = queue(TopicName::new("%MQTT%slow").unwrap(), 4, 1 << 20);
        let reader = tokio::spawn(async move {
            let mut n = 0;
            while rx.recv().await.is_some() {
                n += 1;
                if n == 40 {
                    return n;
                }
                // Slower than the window, in total; never a whole window idle.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            n
        });
        for _ in 0..40 {
            assert!(tx.send_by(msg(100), Duration::from_millis(1)).await);
        }
        assert_eq!(reader.await.unwrap(), 40);
    }
}

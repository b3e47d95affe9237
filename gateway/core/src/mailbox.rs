//! An unbounded many-to-one channel that allocates nothing until it carries a message
//! and gives its buffer back once drained: the group actors' command channels, their
//! members' delivery channels, and the MQTT adapter's per-connection queues. An idle MQTT
//! session holds several, so what an empty
//! channel costs is paid per connection: tokio's unbounded channel allocates a block of
//! 32 slots and two cache-padded halves up front (about 2.8 KiB for a command channel),
//! this one about 100 bytes.
//!
//! A mutex guards the queue. Senders and the receiver are usually on different worker
//! threads, each holds the lock only to push or pop, and a waker is woken outside it.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

struct State<T> {
    queue: VecDeque<T>,
    waker: Option<Waker>,
    senders: usize,
    receiver: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
}

/// The sending half; clone it for more senders.
pub struct Sender<T>(Arc<Shared<T>>);

/// The receiving half: `None` once every sender is gone and the queue is empty.
pub struct Receiver<T>(Arc<Shared<T>>);

/// A new, empty channel (no allocation but the shared header).
pub fn channel<T>() -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            senders: 1,
            receiver: true,
        }),
    });
    (Sender(Arc::clone(&shared)), Receiver(shared))
}

impl<T> Sender<T> {
    /// Queue `value`; `Err(value)` when the receiver is gone.
    pub fn send(&self, value: T) -> Result<(), T> {
        let waker = {
            let mut s = self.0.state.lock();
            if !s.receiver {
                return Err(value);
            }
            s.queue.push_back(value);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Whether the receiver is gone.
    pub fn is_closed(&self) -> bool {
        !self.0.state.lock().receiver
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.0.state.lock().senders += 1;
        Sender(Arc::clone(&self.0))
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let waker = {
            let mut s = self.0.state.lock();
            s.senders -= 1;
            if s.senders == 0 {
                s.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl<T> Receiver<T> {
    fn pop(s: &mut State<T>) -> Option<T> {
        let v = s.queue.pop_front();
        // A drained queue gives its buffer back: most channels are idle most of the time.
        if s.queue.is_empty() && s.queue.capacity() > 0 {
            s.queue = VecDeque::new();
        }
        v
    }

    /// The next message, waiting for one; `None` once every sender is gone.
    pub async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll for the next message.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let mut s = self.0.state.lock();
        if let Some(v) = Self::pop(&mut s) {
            return Poll::Ready(Some(v));
        }
        if s.senders == 0 {
            return Poll::Ready(None);
        }
        match &mut s.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            slot => *slot = Some(cx.waker().clone()),
        }
        Poll::Pending
    }

    /// A message if one is queued now.
    pub fn try_recv(&mut self) -> Option<T> {
        Self::pop(&mut self.0.state.lock())
    }

    /// Leave `waker` to be woken by the next send (or by the last sender going), unless
    /// a message is queued or every sender is gone already (`false`): a receiver that
    /// parks its task instead of awaiting (the group actors, `group/park.rs`).
    pub fn park(&mut self, waker: Waker) -> bool {
        let mut s = self.0.state.lock();
        if !s.queue.is_empty() || s.senders == 0 {
            return false;
        }
        s.waker = Some(waker);
        true
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.0.state.lock().queue.is_empty()
    }

    /// Refuse further sends; what is queued can still be received.
    pub fn close(&mut self) {
        self.0.state.lock().receiver = false;
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        // Queued messages are dropped outside the lock (their own drops may send).
        let queued = {
            let mut s = self.0.state.lock();
            s.receiver = false;
            s.waker = None;
            std::mem::take(&mut s.queue)
        };
        drop(queued);
    }
}

impl<T> std::fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mailbox::Sender")
    }
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("mailbox::Receiver")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn messages_arrive_in_order_and_the_end_is_seen() {
        let (tx, mut rx) = channel();
        let tx2 = tx.clone();
        for i in 0..100 {
            tx.send(i).unwrap();
        }
        drop(tx);
        tx2.send(100).unwrap();
        drop(tx2);
        let mut got = Vec::new();
        while let Some(v) = rx.recv().await {
            got.push(v);
        }
        assert_eq!(got, (0..=100).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_waiting_receiver_is_woken_by_a_send_from_another_task() {
        let (tx, mut rx) = channel();
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send("hello").unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        });
        assert_eq!(rx.recv().await, Some("hello"));
        assert_eq!(
            rx.recv().await,
            None,
            "the last sender's drop ends the stream"
        );
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn a_send_after_the_receiver_is_gone_is_refused() {
        let (tx, rx) = channel();
        assert!(!tx.is_closed());
        drop(rx);
        assert!(tx.is_closed());
        assert_eq!(tx.send(7), Err(7));
    }

    #[test]
    fn an_empty_channel_holds_no_buffer_and_a_drained_one_gives_it_back() {
        let (tx, mut rx) = channel::<u64>();
        assert_eq!(rx.0.state.lock().queue.capacity(), 0);
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        assert!(rx.0.state.lock().queue.capacity() >= 1000);
        while rx.try_recv().is_some() {}
        assert!(rx.is_empty());
        assert_eq!(rx.0.state.lock().queue.capacity(), 0);
    }

    #[test]
    fn many_senders_on_many_threads_lose_nothing() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, mut rx) = channel::<(u32, u32)>();
            let mut tasks = Vec::new();
            for t in 0..4u32 {
                let tx = tx.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..10_000u32 {
                        tx.send((t, i)).unwrap();
                        if i % 1000 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                }));
            }
            drop(tx);
            let mut next = [0u32; 4];
            while let Some((t, i)) = rx.recv().await {
                assert_eq!(next[t as usize], i, "per-sender order");
                next[t as usize] += 1;
            }
            assert_eq!(next, [10_000; 4]);
            for t in tasks {
                t.await.unwrap();
            }
        });
    }
}

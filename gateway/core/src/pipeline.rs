//! A publisher's pipeline: store writes in flight, answered in submission order
//! (`docs`: ARCHITECTURE.md, "Hot path of a publish").

use std::sync::Arc;

use crate::error::Result;
use crate::publish::{PublishBatch, Published, Submitted};

/// A publisher's store writes in flight, answered in the order they were submitted
/// ([`crate::Broker::publish_pipeline`]). A connection submits what it read in one go
/// and reads on while the write syncs; it takes the answers with [`Pipeline::next`]
/// (in a `select!`) and acknowledges each batch only then. Each batch carries the
/// caller's `T` (what to acknowledge).
pub struct Pipeline<T> {
    inner: Arc<crate::broker::ShardSet>,
    depth: usize,
    inflight: std::collections::VecDeque<(T, Submitted)>,
}

impl<T> std::fmt::Debug for Pipeline<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("depth", &self.depth)
            .field("inflight", &self.inflight.len())
            .finish()
    }
}

impl<T> Pipeline<T> {
    /// Nothing in flight.
    pub fn is_empty(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Batches in flight.
    pub fn len(&self) -> usize {
        self.inflight.len()
    }

    /// Whether [`Pipeline::next`] must be awaited before the next
    /// [`Pipeline::submit`]: the pipeline is full, or an endpoint with a length limit
    /// exists (its check counts what is stored, so earlier writes land first).
    pub fn must_drain(&self) -> bool {
        !self.inflight.is_empty() && (self.inflight.len() >= self.depth || self.inner.any_limited())
    }

    /// Route and queue `batch` for its store write, behind the batches already in
    /// flight. Call only when [`Pipeline::must_drain`] is false. An error (the batch
    /// was not queued) comes back with its `T`.
    pub async fn submit(
        &mut self,
        batch: PublishBatch,
        tag: T,
    ) -> std::result::Result<(), (T, crate::CoreError)> {
        match self.inner.publish_submit(batch).await {
            Ok(s) => {
                self.inflight.push_back((tag, s));
                Ok(())
            }
            Err(e) => Err((tag, e)),
        }
    }

    /// The oldest batch's answers once it is durable, with its `T`; pending forever
    /// when nothing is in flight. Cancel-safe: a batch is taken only when answered.
    pub async fn next(&mut self) -> (T, Result<Vec<Option<Published>>>) {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Pipeline::next`] as a poll.
    pub fn poll_next(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<(T, Result<Vec<Option<Published>>>)> {
        let Some((_, s)) = self.inflight.front_mut() else {
            return std::task::Poll::Pending;
        };
        let r = std::task::ready!(std::future::Future::poll(std::pin::Pin::new(s), cx));
        let (tag, _) = self.inflight.pop_front().expect("front was there");
        std::task::Poll::Ready((tag, r))
    }
}

impl crate::Broker {
    /// A publisher's [`Pipeline`]: at most `depth` batches in flight (1: each batch is
    /// durable before the next is routed).
    pub fn publish_pipeline<T>(&self, depth: usize) -> Pipeline<T> {
        Pipeline {
            inner: Arc::clone(&self.inner),
            depth: depth.max(1),
            inflight: std::collections::VecDeque::new(),
        }
    }
}

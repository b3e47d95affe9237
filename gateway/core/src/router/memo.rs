//! The router's generation at work: the write guard that moves it after a change of a
//! vhost's tables, and a publisher's memo of its last stable route, reused while the
//! generation stays the same (`Router::generation`, `Router::route_stable`).

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};

use mqgate_store::TopicName;

use crate::TopicList;
use parking_lot::{RwLock, RwLockWriteGuard};

use super::VHost;

/// A vhost's tables held for writing; the router's generation moves when it is let go.
pub(super) struct Changing<'a> {
    guard: RwLockWriteGuard<'a, VHost>,
    generation: &'a AtomicU64,
}

impl<'a> Changing<'a> {
    pub(super) fn new(v: &'a RwLock<VHost>, generation: &'a AtomicU64) -> Self {
        Self {
            guard: v.write(),
            generation,
        }
    }
}

impl Deref for Changing<'_> {
    type Target = VHost;
    fn deref(&self) -> &VHost {
        &self.guard
    }
}

impl DerefMut for Changing<'_> {
    fn deref_mut(&mut self) -> &mut VHost {
        &mut self.guard
    }
}

impl Drop for Changing<'_> {
    fn drop(&mut self) {
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// A publisher's last stable route for one routing key ([`Router::route_stable`]),
/// reused while the key and [`Router::generation`] are the same (an MQTT connection
/// mostly publishes to one topic: the conversion of its name, two look-ups under locks
/// and the trie's walk, a publish).
#[derive(Debug, Default)]
pub struct RouteMemo {
    key: String,
    /// The router's generation it was made under, and the topics.
    routed: Option<(u64, TopicList)>,
}

impl RouteMemo {
    /// The topics `key` routed to, if it was routed under this `generation`.
    pub fn get(&self, key: &str, generation: u64) -> Option<TopicList> {
        match &self.routed {
            Some((g, topics)) if *g == generation && self.key == key => Some(topics.clone()),
            _ => None,
        }
    }

    /// `key` routed to `topics` under `generation`, a stable answer.
    pub fn remember(&mut self, key: &str, generation: u64, topics: &[TopicName]) {
        key.clone_into(&mut self.key);
        self.routed = Some((generation, topics.iter().cloned().collect()));
    }
}

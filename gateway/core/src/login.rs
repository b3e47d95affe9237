//! Slowing down password guessing: every protocol and the admin API answer a failed
//! login only after a delay that doubles with each recent failure from the same source
//! address or for the same user name (whichever has more), up to a maximum. A success
//! answers at once and forgets the source's failures.
//!
//! The delay is served by the failing connection's own task (an async sleep), so it
//! never holds up anyone else; parallel guessing is then bounded by the connection
//! limits (`limits.max_pending_handshakes`) divided by the delay.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// How failed logins are slowed down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoginThrottleConfig {
    /// The delay after the first recent failure (0: no delay at all).
    pub failure_delay: Duration,
    /// The longest delay.
    pub max_delay: Duration,
    /// Failures older than this are forgotten.
    pub window: Duration,
}

impl Default for LoginThrottleConfig {
    fn default() -> Self {
        Self {
            failure_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(5),
            window: Duration::from_secs(60),
        }
    }
}

/// The most sources and users remembered; past it the oldest half is forgotten.
const MAX_TRACKED: usize = 65_536;

#[derive(Clone, Copy, Debug)]
struct Failures {
    count: u32,
    last: Instant,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Key {
    Source(IpAddr),
    User(String),
}

/// Recent login failures per source address and per user name.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    cfg: LoginThrottleConfig,
    failures: Mutex<HashMap<Key, Failures>>,
}

impl LoginThrottle {
    /// A throttle with these settings.
    pub fn new(cfg: LoginThrottleConfig) -> Self {
        Self {
            cfg,
            failures: Mutex::default(),
        }
    }

    /// Record a failed login from `source` as `user` and return how long to wait
    /// before answering it.
    pub fn failed(&self, source: IpAddr, user: Option<&str>) -> Duration {
        if self.cfg.failure_delay.is_zero() {
            return Duration::ZERO;
        }
        let now = Instant::now();
        let mut map = self.failures.lock();
        if map.len() >= MAX_TRACKED {
            let mut ages: Vec<Instant> = map.values().map(|f| f.last).collect();
            ages.sort_unstable();
            let cut = ages[ages.len() / 2];
            map.retain(|_, f| f.last > cut);
        }
        let mut bump = |key: Key| {
            let f = map.entry(key).or_insert(Failures {
                count: 0,
                last: now,
            });
            if now.duration_since(f.last) > self.cfg.window {
                f.count = 0;
            }
            f.count = f.count.saturating_add(1);
            f.last = now;
            f.count
        };
        let mut n = bump(Key::Source(source));
        if let Some(u) = user {
            n = n.max(bump(Key::User(u.to_owned())));
        }
        let factor = 1u32 << (n - 1).min(16);
        self.cfg
            .failure_delay
            .saturating_mul(factor)
            .min(self.cfg.max_delay)
    }

    /// Record a failed login and wait its delay ([`LoginThrottle::failed`]); the caller
    /// refuses the login after. Only the failing connection's own task waits.
    pub async fn refuse_later(&self, source: IpAddr, user: Option<&str>) {
        tokio::time::sleep(self.failed(source, user)).await;
    }

    /// A successful login from `source`: its failures are forgotten (the user's are
    /// kept: a guesser elsewhere may still be at work on that name).
    pub fn succeeded(&self, source: IpAddr) {
        let mut map = self.failures.lock();
        if !map.is_empty() {
            map.remove(&Key::Source(source));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[tokio::test(start_paused = true)]
    async fn delays_double_per_source_and_user_and_reset() {
        let t = LoginThrottle::new(LoginThrottleConfig {
            failure_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            window: Duration::from_secs(60),
        });
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(t.failed(ip(1), Some("a"))), 100);
        assert_eq!(ms(t.failed(ip(1), Some("b"))), 200);
        assert_eq!(ms(t.failed(ip(1), None)), 400);
        assert_eq!(ms(t.failed(ip(1), None)), 800);
        assert_eq!(ms(t.failed(ip(1), None)), 1000, "capped");
        // Another source guessing user "a" is slowed by the user's count.
        assert_eq!(ms(t.failed(ip(2), Some("a"))), 200);
        t.succeeded(ip(1));
        assert_eq!(ms(t.failed(ip(1), None)), 100, "success forgets the source");
        tokio::time::advance(Duration::from_secs(61)).await;
        assert_eq!(
            ms(t.failed(ip(2), Some("a"))),
            100,
            "old failures forgotten"
        );
    }

    #[test]
    fn zero_delay_turns_it_off() {
        let t = LoginThrottle::new(LoginThrottleConfig {
            failure_delay: Duration::ZERO,
            ..Default::default()
        });
        for _ in 0..10 {
            assert_eq!(t.failed(ip(1), Some("a")), Duration::ZERO);
        }
    }
}

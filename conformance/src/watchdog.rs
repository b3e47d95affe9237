//! A bound on every scenario: one that runs longer than [`LIMIT`] (its runtime's
//! shutdown included) is named on stderr and the test process ends with a failure, so
//! a hang costs minutes and says where it is, instead of holding CI until its own
//! time limit with nothing printed but "has been running for over 60 seconds".
//!
//! `MQGATE_TEST_LIMIT_SECS` sets the limit (for a debugger, a large one).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long one scenario may run, its runtime's shutdown included.
pub const LIMIT: Duration = Duration::from_secs(600);

struct Running {
    next: u64,
    tests: HashMap<u64, (&'static str, Instant)>,
}

fn running() -> &'static Mutex<Running> {
    static RUNNING: OnceLock<Mutex<Running>> = OnceLock::new();
    RUNNING.get_or_init(|| {
        let limit = std::env::var("MQGATE_TEST_LIMIT_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .map_or(LIMIT, Duration::from_secs);
        std::thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_secs(1));
                let over: Vec<_> = running()
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .tests
                    .values()
                    .filter(|(_, since)| since.elapsed() > limit)
                    .map(|(name, _)| *name)
                    .collect();
                if !over.is_empty() {
                    // To the process's stderr itself: `eprintln!` in a thread a test
                    // started is captured with that test's output, and lost at exit.
                    use std::io::Write;
                    let mut err = std::io::stderr().lock();
                    for name in over {
                        let _ = writeln!(
                            err,
                            "\ntest watchdog: {name} has run for over {} s (a hang): ending the test process",
                            limit.as_secs()
                        );
                    }
                    std::process::exit(101);
                }
            })
            .expect("start the test watchdog");
        Mutex::new(Running {
            next: 0,
            tests: HashMap::new(),
        })
    })
}

/// Watched until dropped.
#[must_use = "the test is watched until this is dropped"]
#[derive(Debug)]
pub struct Watch(u64);

/// Watch the test `name` until the returned guard is dropped.
pub fn watch(name: &'static str) -> Watch {
    let mut r = running()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let id = r.next;
    r.next += 1;
    r.tests.insert(id, (name, Instant::now()));
    Watch(id)
}

impl Drop for Watch {
    fn drop(&mut self) {
        running()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .tests
            .remove(&self.0);
    }
}

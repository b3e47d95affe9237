//! The accept loop every listener shares (AMQP, MQTT, TLS, WebSocket), and admission:
//!
//! - **File handles.** Every accepted socket is counted process-wide ([`open_sockets`])
//!   and refused at once (closed, a rate-limited warning) when the count reaches the
//!   socket budget ([`set_socket_budget`]: the fd limit less the handles reserved for the
//!   store), so a connection flood cannot take the file handles RocksDB needs for its
//!   next WAL or table file.
//! - **Handshakes and connections** ([`ConnGate`], one per adapter): a socket counts as
//!   *pending* from the moment the adapter gets it until its handshake succeeds, and
//!   pending ones are capped on their own: at the cap a new socket evicts the oldest
//!   pending one (which is closed), so silent sockets cannot lock real clients out, whose
//!   handshakes take milliseconds. Only past its handshake does a connection count
//!   against the connection limit, taken with one atomic `fetch_add` (undone on
//!   refusal), so the limit holds exactly under any race.
//! - **Sweeps** ([`sweep_every`]): the timer of a periodic look over an adapter's
//!   connections (MQTT's keep alive), so that adapters run no timers of their own.
//! - **Placement** ([`set_connection_runtimes`]): with one single-threaded runtime per
//!   core, each accepted socket is moved to the runtime with the fewest open
//!   connections (ties in turn) and served there from start to end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

/// Client sockets open now (accepted by [`accept_loop`], not yet closed).
static SOCKETS: AtomicUsize = AtomicUsize::new(0);
/// The most client sockets at once (`usize::MAX`: no budget).
static SOCKET_BUDGET: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Cap the client sockets the accept loops keep open at once, over every listener:
/// the process's file-handle limit less what the store and the process itself need.
pub fn set_socket_budget(max: usize) {
    SOCKET_BUDGET.store(max, Ordering::Relaxed);
}

/// The socket budget ([`set_socket_budget`]; `usize::MAX` when none was set).
pub fn socket_budget() -> usize {
    SOCKET_BUDGET.load(Ordering::Relaxed)
}

/// Client sockets open now, over every listener (handshaking or established).
pub fn open_sockets() -> usize {
    SOCKETS.load(Ordering::Relaxed)
}

/// One socket counted in [`open_sockets`]: the count drops when this drops.
#[derive(Debug)]
struct SocketSlot(());

impl SocketSlot {
    /// Count one more socket, or `None` when the budget is used up.
    fn take() -> Option<Self> {
        let before = SOCKETS.fetch_add(1, Ordering::AcqRel);
        if before >= SOCKET_BUDGET.load(Ordering::Relaxed) {
            SOCKETS.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Self(()))
    }
}

impl Drop for SocketSlot {
    fn drop(&mut self) {
        SOCKETS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An accepted stream, counted against the socket budget (and its runtime's open
/// connections, [`set_connection_runtimes`]) until it is dropped. It reads and writes as
/// the stream it wraps.
#[derive(Debug)]
pub struct Counted<S> {
    inner: S,
    _slot: SocketSlot,
    _home: Option<HomeSlot>,
}

impl<S> Counted<S> {
    /// The wrapped stream.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Lets one log line through per interval and counts the ones held back, so a flood
/// of refusals costs one line a second, not one per socket.
#[derive(Debug)]
pub struct LogLimiter {
    interval_ms: u64,
    last_ms: AtomicU64,
    held: AtomicU64,
}

impl LogLimiter {
    /// At most one line per `interval`.
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval_ms: interval.as_millis() as u64,
            last_ms: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(lines held back since the last one)` when a line may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.interval_ms
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::AcqRel));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// Call `sweep` every `period` until `stop` turns true or `sweep` returns false (its
/// owner is gone): the timer of a sweep over an adapter's connections, one task for all
/// of them instead of a timer per connection. A late tick is not made up for.
pub fn sweep_every<F>(
    period: Duration,
    mut stop: watch::Receiver<bool>,
    mut sweep: F,
) -> JoinHandle<()>
where
    F: FnMut() -> bool + Send + 'static,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                r = stop.changed() => if r.is_err() || *stop.borrow() { return },
                _ = tick.tick() => {}
            }
            if !sweep() {
                return;
            }
        }
    })
}

static BUDGET_LOG: LogLimiter = LogLimiter::new(Duration::from_secs(1));

/// The runtimes connections are spread over ([`set_connection_runtimes`]).
static HOMES: std::sync::OnceLock<Homes> = std::sync::OnceLock::new();

thread_local! {
    /// The index in [`HOMES`] of the runtime this thread runs (`usize::MAX`: none).
    static HOME: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Single-threaded runtimes and the connections open on each.
#[derive(Debug)]
struct Homes {
    handles: Vec<tokio::runtime::Handle>,
    open: Vec<AtomicUsize>,
    /// Where the search for the least loaded starts next (ties go round).
    next: AtomicUsize,
}

impl Homes {
    /// The runtime with the fewest open connections (the first such from a start that
    /// moves on each time), counted as holding one more until the slot is dropped.
    fn place(&self) -> (usize, HomeSlot) {
        let n = self.handles.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let i = (0..n)
            .map(|k| (start + k) % n)
            .min_by_key(|&i| self.open[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.open[i].fetch_add(1, Ordering::AcqRel);
        (i, HomeSlot(i))
    }
}

/// One connection open on runtime `.0` of [`HOMES`].
#[derive(Debug)]
struct HomeSlot(usize);

impl Drop for HomeSlot {
    fn drop(&mut self) {
        if let Some(h) = HOMES.get() {
            h.open[self.0].fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Spread accepted connections over these runtimes: each a single thread (one per core)
/// that runs its connections' tasks, and the tasks they start, from start to end. A new
/// connection goes to the runtime with the fewest open (ties in turn), so threads whose
/// connections closed take the next ones. Set once, before the first listener opens;
/// without it (tests, the work-stealing runtime) a connection runs on the runtime that
/// accepted it.
pub fn set_connection_runtimes(handles: Vec<tokio::runtime::Handle>) {
    let open = handles.iter().map(|_| AtomicUsize::new(0)).collect();
    let _ = HOMES.set(Homes {
        handles,
        open,
        next: AtomicUsize::new(0),
    });
}

/// This thread runs the runtime at `index` of [`set_connection_runtimes`]'s list.
pub fn set_home(index: usize) {
    HOME.with(|h| h.set(index));
}

/// The connections open on each of [`set_connection_runtimes`]'s runtimes, in its
/// order (empty without them).
pub fn runtime_connections() -> Vec<usize> {
    HOMES.get().map_or_else(Vec::new, |h| {
        h.open.iter().map(|o| o.load(Ordering::Relaxed)).collect()
    })
}

/// Serve `tcp` on `rt`, another thread's runtime: taken out of this runtime's poller
/// and registered with that one's, so its readiness wakes that thread, never this one.
fn hand_over<F>(
    what: &'static str,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: SocketSlot,
    home: HomeSlot,
    rt: &tokio::runtime::Handle,
    on_accept: &Arc<F>,
) where
    F: Fn(Counted<TcpStream>, SocketAddr) + Send + Sync + 'static,
{
    let std = match tcp.into_std() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "{what}: socket not handed over");
            return;
        }
    };
    let on_accept = Arc::clone(on_accept);
    rt.spawn(async move {
        match TcpStream::from_std(std) {
            Ok(tcp) => {
                let counted = Counted {
                    inner: tcp,
                    _slot: slot,
                    _home: Some(home),
                };
                on_accept(counted, peer);
            }
            Err(e) => tracing::warn!(%peer, error = %e, "{what}: socket not taken over"),
        }
    });
}

/// Accept TCP connections (no Nagle delay) until `stop` changes, handing each to
/// `on_accept`, counted against the socket budget; a socket over the budget is closed at
/// once. An accept error (out of file descriptors) is logged and retried after a pause
/// instead of ending the listener. With [`set_connection_runtimes`], `on_accept` runs
/// on the connection's runtime, its socket registered with that runtime's poller.
pub fn accept_loop<F>(
    what: &'static str,
    listener: TcpListener,
    mut stop: watch::Receiver<bool>,
    on_accept: F,
) -> JoinHandle<()>
where
    F: Fn(Counted<TcpStream>, SocketAddr) + Send + Sync + 'static,
{
    let on_accept = Arc::new(on_accept);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                r = listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let Some(slot) = SocketSlot::take() else {
                            if let Some(held) = BUDGET_LOG.allow() {
                                tracing::warn!(
                                    %peer,
                                    open = open_sockets(),
                                    budget = socket_budget(),
                                    refused_since_last_line = held,
                                    "{what}: connection refused: the socket budget \
                                     (fd limit less limits.reserved_fds) is used up"
                                );
                            }
                            drop(tcp);
                            continue;
                        };
                        let _ = tcp.set_nodelay(true);
                        let placed = HOMES.get().filter(|h| h.handles.len() > 1).map(|h| {
                            let (i, held) = h.place();
                            (i, &h.handles[i], held)
                        });
                        match placed {
                            Some((i, rt, held)) if HOME.with(|h| h.get()) != i => {
                                hand_over(what, tcp, peer, slot, held, rt, &on_accept);
                            }
                            placed => {
                                let home = placed.map(|(_, _, held)| held);
                                on_accept(Counted { inner: tcp, _slot: slot, _home: home }, peer);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "{what} accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
    })
}

/// Admission of one adapter's connections: at most `max_pending` handshakes at once
/// (the oldest is evicted for a new one), and at most `max_open` connections past their
/// handshake (0: no limit, for either).
#[derive(Debug)]
pub struct ConnGate {
    what: &'static str,
    max_open: usize,
    max_pending: usize,
    open: AtomicUsize,
    pending: AtomicUsize,
    /// Pending handshakes, oldest first, each with what evicts it.
    waiting: parking_lot::Mutex<BTreeMap<u64, Arc<Notify>>>,
    next_id: AtomicU64,
    log: LogLimiter,
    evict_log: LogLimiter,
}

impl ConnGate {
    /// A gate for the `what` listener with these limits (0: none).
    pub fn new(what: &'static str, max_open: usize, max_pending: usize) -> Arc<Self> {
        Arc::new(Self {
            what,
            max_open,
            max_pending,
            open: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            waiting: parking_lot::Mutex::new(BTreeMap::new()),
            next_id: AtomicU64::new(0),
            log: LogLimiter::new(Duration::from_secs(1)),
            evict_log: LogLimiter::new(Duration::from_secs(1)),
        })
    }

    /// A new socket starts its handshake, counted as pending. When `max_pending`
    /// handshakes are running already, the oldest of them is evicted (its
    /// [`Pending::evicted`] completes and its connection closes): a real client's
    /// handshake takes milliseconds, a silent socket's never ends.
    pub fn begin(self: &Arc<Self>, peer: SocketAddr) -> Pending {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        let before = self.pending.fetch_add(1, Ordering::AcqRel);
        let mut waiting = self.waiting.lock();
        if self.max_pending > 0 && before >= self.max_pending {
            if let Some((_, oldest)) = waiting.pop_first() {
                // Stores a permit: the evicted task sees it at its next look.
                oldest.notify_one();
                if let Some(held) = self.evict_log.allow() {
                    tracing::warn!(
                        %peer,
                        max = self.max_pending,
                        evicted_since_last_line = held,
                        "{}: limits.max_pending_handshakes reached: the oldest pending \
                         handshake is closed for a new connection",
                        self.what
                    );
                }
            }
        }
        waiting.insert(id, Arc::clone(&notify));
        drop(waiting);
        Pending {
            gate: Arc::clone(self),
            id,
            notify,
        }
    }

    /// Connections past their handshake, open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Handshakes running now.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// The connection limit (0: none).
    pub fn max_open(&self) -> usize {
        self.max_open
    }

    /// The pending-handshake limit (0: none).
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }

    /// Whether a refusal may be logged now (at most one line a second), with how many
    /// were held back since the last line.
    pub fn log_refusal(&self) -> Option<u64> {
        self.log.allow()
    }
}

/// A handshake in progress, counted by its [`ConnGate`] until dropped or admitted.
#[derive(Debug)]
pub struct Pending {
    gate: Arc<ConnGate>,
    id: u64,
    notify: Arc<Notify>,
}

/// Completes when a [`Pending`] handshake is evicted for a newer one.
#[derive(Clone, Debug)]
pub struct Eviction(Arc<Notify>);

impl Eviction {
    /// Wait until the handshake is evicted (forever, if it never is).
    pub async fn wait(&self) {
        self.0.notified().await;
    }
}

impl Pending {
    /// What tells this handshake it was evicted (race the handshake against it).
    pub fn eviction(&self) -> Eviction {
        Eviction(Arc::clone(&self.notify))
    }

    /// The handshake succeeded: the connection counts as open from now on, or, when
    /// `max_open` connections are open already, it is refused (`Err`) and counts as
    /// nothing; the caller answers with its protocol's refusal and closes.
    pub fn admit(self) -> Result<Admitted, ConnLimitReached> {
        let gate = Arc::clone(&self.gate);
        let before = gate.open.fetch_add(1, Ordering::AcqRel);
        if gate.max_open > 0 && before >= gate.max_open {
            gate.open.fetch_sub(1, Ordering::AcqRel);
            return Err(ConnLimitReached { max: gate.max_open });
        }
        // `self` drops here: no longer pending.
        Ok(Admitted(gate))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.gate.waiting.lock().remove(&self.id);
        self.gate.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An open connection, counted by its [`ConnGate`] until dropped.
#[derive(Debug)]
pub struct Admitted(Arc<ConnGate>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// [`Pending::admit`] refused: this many connections are open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnLimitReached {
    /// The limit.
    pub max: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    #[tokio::test]
    async fn the_gate_evicts_the_oldest_pending_handshake_at_the_cap() {
        let gate = ConnGate::new("test", 0, 2);
        let first = gate.begin(peer());
        let evicted = first.eviction();
        let _second = gate.begin(peer());
        let _third = gate.begin(peer());
        tokio::time::timeout(Duration::from_secs(1), evicted.wait())
            .await
            .expect("the oldest was evicted");
        drop(first);
        assert_eq!(gate.pending(), 2);
    }

    #[test]
    fn the_gate_admits_exactly_max_open() {
        let gate = ConnGate::new("test", 2, 0);
        let p: Vec<Pending> = (0..3).map(|_| gate.begin(peer())).collect();
        assert_eq!(gate.pending(), 3);
        let mut admitted = Vec::new();
        let mut refused = 0;
        for t in p {
            match t.admit() {
                Ok(a) => admitted.push(a),
                Err(e) => {
                    assert_eq!(e.max, 2);
                    refused += 1;
                }
            }
        }
        assert_eq!((admitted.len(), refused), (2, 1));
        assert_eq!((gate.open(), gate.pending()), (2, 0));
        drop(admitted);
        assert_eq!(gate.open(), 0);
    }

    #[test]
    fn the_log_limiter_lets_one_line_through_per_interval() {
        let l = LogLimiter::new(Duration::from_secs(60));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
    }
}

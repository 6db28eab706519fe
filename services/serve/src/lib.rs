//! The servers' connection limits, shared by the aggregator's REST and gRPC ports and the agent's local API.
//!
//! A connection is *busy* while a request (an HTTP request, or a gRPC call with its stream) is in flight on it, and
//! *idle* otherwise, from its accept on. Bytes do not count: HTTP/2 pings and a slowloris trickle keep a socket
//! active without making it useful. The invariants:
//!
//! - at most `max_connections` connections are open per server. At the cap, a new connection takes the place of the
//!   idle connection that has been idle the longest (one that never sent a request first); while every connection
//!   is busy it waits in the listen queue, so a flood of idle sockets cannot keep a client out and the process never
//!   runs out of file descriptors;
//! - a connection idle for `idle_timeout` is closed (kept-alive, never used, or stuck before its first request);
//! - on HTTP/1, a request's headers must arrive within `header_read_timeout` of the connection's start or of the
//!   end of the previous request (hyper's own timer).
//!
//! [`http::serve`] runs an HTTP server (HTTP/1 and HTTP/2) with these limits and a graceful shutdown;
//! [`grpc::incoming`] and [`grpc::InFlightLayer`] give tonic's server the same limits. Both serve TLS when given a
//! [`tls::ServerTls`] (`http::serve_with_tls`, `grpc::incoming_with_tls`): the handshake runs on the admitted
//! connection, so every limit above holds for it, and it has a deadline of its own.
//!
//! Also here, as the one crate of I/O plumbing both services share: [`fsutil`], the atomic file writer of the
//! agent's state and export files and of the aggregator's `report` command.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

pub mod fsutil;
pub mod grpc;
pub mod http;
mod in_flight;
#[cfg(feature = "test-pki")]
pub mod test_pki;
pub mod tls;

pub use in_flight::{InFlight, InFlightBody};

/// How long the accept loop waits for an evicted connection to close before it looks for another one to evict.
const EVICTION_WAIT: Duration = Duration::from_millis(100);

/// A server's connection limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

/// The open connections of one server, and the cap on them.
#[derive(Clone)]
pub struct ConnectionLimit {
    inner: Arc<LimitInner>,
}

struct LimitInner {
    limits: ConnectionLimits,
    permits: Arc<Semaphore>,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    next_id: AtomicU64,
}

/// What one connection is doing, shared by its socket ([`TrackedIo`]) and its requests ([`InFlight`]).
#[derive(Debug)]
pub struct Activity {
    state: Mutex<ActivityState>,
    /// The connection's task, woken when it must look at its state again (evicted, or no longer busy).
    waker: AtomicWaker,
}

#[derive(Debug)]
struct ActivityState {
    in_flight: usize,
    /// Requests begun so far: a connection that never sent one is evicted first.
    requests: u64,
    idle_since: Instant,
    evicted: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these locks (plain field updates), so a poisoned one is still consistent.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Activity {
    fn new() -> Self {
        Activity {
            state: Mutex::new(ActivityState {
                in_flight: 0,
                requests: 0,
                idle_since: Instant::now(),
                evicted: false,
            }),
            waker: AtomicWaker::new(),
        }
    }

    /// Marks a request in flight until the returned guard is dropped.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        {
            let mut state = lock(&self.state);
            state.in_flight += 1;
            state.requests += 1;
        }
        InFlight::new(Arc::clone(self))
    }

    fn end_request(&self) {
        let now_idle = {
            let mut state = lock(&self.state);
            state.in_flight = state.in_flight.saturating_sub(1);
            if state.in_flight == 0 {
                state.idle_since = Instant::now();
            }
            state.in_flight == 0
        };
        if now_idle {
            // The idle timer starts now: the connection's task arms it at its next read.
            self.waker.wake();
        }
    }
}

impl ConnectionLimit {
    pub fn new(limits: ConnectionLimits) -> Self {
        ConnectionLimit {
            inner: Arc::new(LimitInner {
                limits,
                permits: Arc::new(Semaphore::new(limits.max_connections.max(1))),
                open: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(0),
            }),
        }
    }

    /// Admits one accepted connection: at once below the cap, else after an idle connection was closed to make room
    /// (or a busy one finished). Cancel-safe: dropping the future admits nothing.
    pub async fn admit<T>(&self, io: T) -> TrackedIo<T> {
        let permit = loop {
            if let Ok(permit) = Arc::clone(&self.inner.permits).try_acquire_owned() {
                break permit;
            }
            self.evict_longest_idle();
            // The semaphore is never closed, so `acquire_owned` only ends with a permit.
            if let Ok(Ok(permit)) = tokio::time::timeout(
                EVICTION_WAIT,
                Arc::clone(&self.inner.permits).acquire_owned(),
            )
            .await
            {
                break permit;
            }
        };
        let activity = Arc::new(Activity::new());
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.open).insert(id, Arc::clone(&activity));
        let idle_timeout = self.inner.limits.idle_timeout;
        TrackedIo {
            io,
            activity,
            idle_timeout,
            sleep: Box::pin(tokio::time::sleep(idle_timeout)),
            armed_for: None,
            _registration: Registration {
                limit: Arc::clone(&self.inner),
                id,
                _permit: permit,
            },
        }
    }

    /// Marks the connection idle the longest (preferring one that never sent a request) to be closed.
    fn evict_longest_idle(&self) {
        let open = lock(&self.inner.open);
        let candidate = open
            .values()
            .filter_map(|activity| {
                let state = lock(&activity.state);
                (state.in_flight == 0 && !state.evicted)
                    .then(|| ((state.requests > 0, state.idle_since), Arc::clone(activity)))
            })
            .min_by_key(|(key, _)| *key);
        drop(open);
        if let Some((_, activity)) = candidate {
            lock(&activity.state).evicted = true;
            activity.waker.wake();
            tracing::debug!("connection cap reached: closing the longest-idle connection");
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.inner.open).len()
    }
}

/// Frees the connection's place when its socket is dropped.
struct Registration {
    limit: Arc<LimitInner>,
    id: u64,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.limit.open).remove(&self.id);
    }
}

/// An admitted connection's socket. A read that would wait ends the connection instead (an error hyper reports
/// and closes on) once the connection has been idle for the idle timeout or was evicted while idle.
pub struct TrackedIo<T> {
    io: T,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    sleep: Pin<Box<Sleep>>,
    armed_for: Option<Instant>,
    _registration: Registration,
}

impl<T> TrackedIo<T> {
    /// The connection's activity, for its requests to mark themselves in flight.
    pub fn activity(&self) -> Arc<Activity> {
        Arc::clone(&self.activity)
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    /// `Ready(error)` when the connection must end now; otherwise arms the waker for when it may have to.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        self.activity.waker.register(cx.waker());
        let (in_flight, evicted, idle_since) = {
            let state = lock(&self.activity.state);
            (state.in_flight, state.evicted, state.idle_since)
        };
        if in_flight > 0 {
            // Busy: the end of the last request wakes this task.
            return Poll::Pending;
        }
        if evicted {
            return Poll::Ready(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "closed to make room for a new connection (connection cap)",
            ));
        }
        let deadline = idle_since + self.idle_timeout;
        if self.armed_for != Some(deadline) {
            self.sleep.as_mut().reset(deadline);
            self.armed_for = Some(deadline);
        }
        match self.sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "closed after the idle timeout",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for TrackedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Pending => this.poll_idle(cx).map(Err),
            ready => ready,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for TrackedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts the next connection. Errors of one connection (reset before the accept) are skipped; others (out of
/// file descriptors) are logged and retried after a pause, so that the loop never spins.
pub async fn accept(listener: &tokio::net::TcpListener) -> tokio::net::TcpStream {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                // Small answers go out at once rather than after Nagle's delay.
                let _ = stream.set_nodelay(true);
                return stream;
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot accept a connection; retrying in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// What the servers' tests need to watch a connection being closed (feature `test-support`), shared by the
/// aggregator's and the agent's tests so that both hold their ports to the same checks.
#[cfg(feature = "test-support")]
pub mod testing {
    use std::path::PathBuf;
    use std::time::{Duration, Instant};

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    /// The Python interpreter of the compatibility tests (`LICENSE_SYNC_TEST_PYTHON`, set by `scripts/test.sh` to
    /// the virtualenv it fills; else `python3`) if it can import every one of `modules`. Otherwise `test` is
    /// reported `SKIPPED` with the reason and `None` returned, or, under `LICENSE_SYNC_REQUIRE_ALL_TESTS` (CI), it
    /// panics: nothing may be skipped there.
    pub fn python_with(test: &str, modules: &[&str]) -> Option<PathBuf> {
        let python =
            std::env::var("LICENSE_SYNC_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
        let imports = format!("import {}", modules.join(", "));
        let reason = match std::process::Command::new(&python)
            .args(["-c", &imports])
            .output()
        {
            Ok(probe) if probe.status.success() => return Some(PathBuf::from(python)),
            Ok(_) => format!(
                "{python} cannot `{imports}`; run scripts/test.sh, which installs them into target/test-venv"
            ),
            Err(err) => format!("cannot run {python}: {err}"),
        };
        if std::env::var_os("LICENSE_SYNC_REQUIRE_ALL_TESTS").is_some() {
            panic!("LICENSE_SYNC_REQUIRE_ALL_TESTS is set but {test} cannot run: {reason}");
        }
        eprintln!("SKIPPED {test}: {reason}");
        None
    }

    /// Reads until the peer closes the connection (EOF or reset) and returns how long that took, or `None` if it
    /// was still open after `within`.
    pub async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
        let started = Instant::now();
        let mut buffer = [0u8; 4096];
        loop {
            match tokio::time::timeout_at((started + within).into(), stream.read(&mut buffer)).await
            {
                Err(_) => return None,
                Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
                Ok(Ok(_)) => continue,
            }
        }
    }

    /// Opens `idle` connections that send nothing, waits for the server to take them, then opens `late` more:
    /// the clients of a cap test. Returns both sets (dropping them closes them).
    pub async fn idle_then_late(
        address: std::net::SocketAddr,
        idle: usize,
        late: usize,
    ) -> (Vec<TcpStream>, Vec<TcpStream>) {
        let mut first = Vec::new();
        for _ in 0..idle {
            first.push(TcpStream::connect(address).await.expect("connect"));
        }
        // An accept of a silent socket shows nothing outside the server: give it time to take the first ones.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut then = Vec::new();
        for _ in 0..late {
            then.push(TcpStream::connect(address).await.expect("connect"));
        }
        (first, then)
    }

    /// How many of `streams` the server closes within 500 ms each.
    pub async fn count_closed(streams: &mut [TcpStream]) -> usize {
        let mut closed = 0;
        for stream in streams {
            if closed_within(stream, Duration::from_millis(500))
                .await
                .is_some()
            {
                closed += 1;
            }
        }
        closed
    }

    /// A slowloris client: sends a request line, then one header line every 100 ms and never the blank line
    /// that ends them. Returns how long the server took to cut it, or `None` if it still had not after 10 s.
    pub async fn slowloris(stream: &mut TcpStream) -> Option<Duration> {
        if stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n")
            .await
            .is_err()
        {
            return Some(Duration::ZERO);
        }
        let started = Instant::now();
        for line in 0..100 {
            if stream
                .write_all(format!("X-Slow-{line}: still coming\r\n").as_bytes())
                .await
                .is_err()
            {
                return Some(started.elapsed());
            }
            if let Some(after) = closed_within(stream, Duration::from_millis(100)).await {
                return Some(started.elapsed().max(after));
            }
        }
        None
    }
}

//! An HTTP server (HTTP/1.1 and HTTP/2, in cleartext as `axum::serve` or over TLS) with the connection limits of the
//! crate, the HTTP/1 header-read timeout, the TLS handshake timeout and bounded HTTP/2 connections, and a graceful
//! shutdown: on the signal it stops accepting, closes idle connections, lets requests in flight finish and returns
//! when every connection is closed.

use std::future::Future;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::tls::ServerTls;
use crate::{ConnectionLimit, ConnectionLimits};

/// HTTP/2 streams one connection may have open: a client needing more opens another connection, which the cap
/// counts; one connection cannot make the server hold an unbounded number of requests.
const HTTP2_MAX_CONCURRENT_STREAMS: u32 = 64;
/// Largest header block, on both versions (tokens and cookies fit many times over).
const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Streams a client may open and reset at once before the connection is closed (the "rapid reset" attack).
const HTTP2_MAX_PENDING_RESETS: usize = 20;
/// Pings on HTTP/2 connections find dead peers of long requests.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(60);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// The limits of an HTTP server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    pub connections: ConnectionLimits,
    /// HTTP/1: time allowed for a request's headers, from the connection's start or the previous request's end.
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes, then shuts down gracefully.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    serve_with_tls(listener, router, limits, None, shutdown).await;
}

/// [`serve`], over TLS when `tls` is set. Each handshake runs in its connection's task, within the handshake
/// timeout, so a client that never finishes one holds only its own (capped, evictable) connection.
pub async fn serve_with_tls(
    listener: TcpListener,
    router: Router,
    limits: HttpLimits,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()>,
) {
    let limit = ConnectionLimit::new(limits.connections);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_RESETS)
        .keep_alive_interval(HTTP2_KEEPALIVE_INTERVAL)
        .keep_alive_timeout(HTTP2_KEEPALIVE_TIMEOUT);
    let graceful = GracefulShutdown::new();
    // Tells connections still in their TLS handshake to give up, so that they do not hold up the shutdown.
    let (stopping, stopping_seen) = tokio::sync::watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            stream = crate::accept(&listener) => stream,
        };
        // The peer's address for handlers (axum's `ConnectInfo`), e.g. to count failed logins per address.
        let peer = stream.peer_addr().ok();
        let io = tokio::select! {
            () = &mut shutdown => break,
            io = limit.admit(stream) => io,
        };
        let activity = io.activity();
        let router = router.clone();
        let service = hyper::service::service_fn(move |request: http::Request<Incoming>| {
            let in_flight = activity.begin_request();
            let mut request = request.map(axum::body::Body::new);
            if let Some(peer) = peer {
                request
                    .extensions_mut()
                    .insert(axum::extract::ConnectInfo(peer));
            }
            let answer = router.clone().oneshot(request);
            async move {
                let response = answer.await?;
                Ok::<_, std::convert::Infallible>(
                    response.map(|body| in_flight.hold_until_sent(body)),
                )
            }
        });
        // Watched from before the handshake: the graceful shutdown also waits for connections still in one.
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        let mut stopping_seen = stopping_seen.clone();
        tokio::spawn(async move {
            let io = tokio::select! {
                io = crate::tls::handshake(tls.as_ref(), io) => io,
                _ = stopping_seen.wait_for(|stopping| *stopping) => return,
            };
            let io = match io {
                Ok(io) => io,
                Err(error) => {
                    tracing::debug!(%error, "TLS handshake failed");
                    return;
                }
            };
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned();
            if let Err(error) = watcher.watch(connection).await {
                // Idle and header timeouts, evictions and clients going away end up here: not worth more.
                tracing::debug!(error = %error, "HTTP connection ended");
            }
        });
    }
    // Closes the listening socket at once, so new clients are refused rather than queued during the drain.
    drop(listener);
    let _ = stopping.send(true);
    graceful.shutdown().await;
}

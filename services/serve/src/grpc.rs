//! The connection limits for tonic's server: [`incoming`] is the stream of admitted connections to pass to
//! `serve_with_incoming_shutdown` ([`incoming_with_tls`] after their TLS handshake), and [`InFlightLayer`] marks each
//! call in flight on its connection (found through the connection info tonic puts in the request's extensions), so
//! that a connection with no call open is idle. The same connection info carries the client's certificate chain
//! ([`GrpcConnection::peer_certificates`]), since tonic's `Request::peer_certs` only knows tonic's own TLS.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use futures::future::BoxFuture;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::tls::{MaybeTls, ServerTls};
use crate::{Activity, ConnectionLimit, ConnectionLimits, InFlightBody, TrackedIo};

/// An admitted gRPC connection, after its TLS handshake if the server has TLS.
pub struct GrpcIo {
    io: MaybeTls<TrackedIo<TcpStream>>,
    peer_certificates: Option<Arc<[CertificateDer<'static>]>>,
}

/// What tonic puts in each request's extensions: for [`InFlightLayer`], and the client's address and certificates.
#[derive(Clone, Debug)]
pub struct GrpcConnection {
    activity: Arc<Activity>,
    pub tcp: TcpConnectInfo,
    /// The certificate chain the client presented in its TLS handshake (leaf first), verified against the server's
    /// client CA; `None` in plain text or when the client presented none.
    pub peer_certificates: Option<Arc<[CertificateDer<'static>]>>,
}

impl Connected for GrpcIo {
    type ConnectInfo = GrpcConnection;

    fn connect_info(&self) -> GrpcConnection {
        GrpcConnection {
            activity: self.io.get_ref().activity(),
            tcp: self.io.get_ref().get_ref().connect_info(),
            peer_certificates: self.peer_certificates.clone(),
        }
    }
}

impl AsyncRead for GrpcIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GrpcIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The connections of `listener`, each admitted under `limits`. The stream never ends: tonic stops reading it at
/// its shutdown signal and drops it, which closes the listening socket.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
) -> impl Stream<Item = Result<GrpcIo, std::io::Error>> {
    let limit = ConnectionLimit::new(limits);
    futures::stream::unfold((listener, limit), |(listener, limit)| async move {
        let stream = crate::accept(&listener).await;
        let io = limit.admit(stream).await;
        Some((
            Ok(GrpcIo {
                io: MaybeTls::Plain(io),
                peer_certificates: None,
            }),
            (listener, limit),
        ))
    })
}

/// [`incoming`] over TLS: each admitted connection is handed on after its handshake, which runs in a task of its
/// own within the handshake timeout, so that a client stalling its handshake delays no other. The accept loop
/// stops (and the listening socket closes) when tonic drops the stream.
pub fn incoming_with_tls(
    listener: TcpListener,
    limits: ConnectionLimits,
    tls: ServerTls,
) -> impl Stream<Item = Result<GrpcIo, std::io::Error>> {
    let (handed_on, receiver) = mpsc::channel::<GrpcIo>(16);
    tokio::spawn(async move {
        let limit = ConnectionLimit::new(limits);
        loop {
            let stream = tokio::select! {
                () = handed_on.closed() => break,
                stream = crate::accept(&listener) => stream,
            };
            let io = tokio::select! {
                () = handed_on.closed() => break,
                io = limit.admit(stream) => io,
            };
            let handed_on = handed_on.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                // A server that stopped (the stream was dropped) needs no more handshakes.
                let handshake = tokio::select! {
                    handshake = tls.accept(io) => handshake,
                    () = handed_on.closed() => return,
                };
                match handshake {
                    Ok(stream) => {
                        let io = MaybeTls::Tls(Box::new(stream));
                        let peer_certificates = io.peer_certificates();
                        // A closed channel means the server stopped: the connection is dropped with it.
                        let _ = handed_on
                            .send(GrpcIo {
                                io,
                                peer_certificates,
                            })
                            .await;
                    }
                    Err(error) => tracing::debug!(%error, "TLS handshake failed"),
                }
            });
        }
    });
    futures::stream::unfold(receiver, |mut receiver| async move {
        let io = receiver.recv().await?;
        Some((Ok(io), receiver))
    })
}

/// Marks each gRPC call in flight on its connection until its response stream ends.
#[derive(Clone, Copy, Debug, Default)]
pub struct InFlightLayer;

impl<S> tower::Layer<S> for InFlightLayer {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> InFlightService<S> {
        InFlightService { inner }
    }
}

#[derive(Clone, Debug)]
pub struct InFlightService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for InFlightService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<MaybeInFlight<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        // Absent only when the server is not fed by `incoming` (then there is no limit to keep).
        let in_flight = request
            .extensions()
            .get::<GrpcConnection>()
            .map(|connection| connection.activity.begin_request());
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|body| match in_flight {
                Some(in_flight) => MaybeInFlight::Held(in_flight.hold_until_sent(body)),
                None => MaybeInFlight::Untracked(body),
            }))
        })
    }
}

/// A response body, held in flight when its connection is tracked.
#[derive(Debug)]
pub enum MaybeInFlight<B> {
    Held(InFlightBody<B>),
    Untracked(B),
}

impl<B: http_body::Body + Unpin> http_body::Body for MaybeInFlight<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        match self.get_mut() {
            MaybeInFlight::Held(body) => std::pin::Pin::new(body).poll_frame(cx),
            MaybeInFlight::Untracked(body) => std::pin::Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            MaybeInFlight::Held(body) => body.is_end_stream(),
            MaybeInFlight::Untracked(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            MaybeInFlight::Held(body) => body.size_hint(),
            MaybeInFlight::Untracked(body) => body.size_hint(),
        }
    }
}

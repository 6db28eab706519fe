//! Binds the gRPC and HTTP listeners and runs both until shutdown, each under its connection limits (a cap on open
//! connections, idle and header-read timeouts: `license_sync_serve`) so that idle or slow clients cannot exhaust the
//! process's file descriptors. With `tls_cert_path` both ports serve TLS (`crate::tls`), reloaded from the files
//! while running; without it they speak plain text, for a TLS-terminating ingress in front.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use license_sync_proto::v1::FILE_DESCRIPTOR_SET;
use license_sync_proto::v1::agent_control_server::AgentControlServer;
use license_sync_proto::v1::enrollment_server::EnrollmentServer;
use license_sync_proto::v1::snapshot_ingest_server::SnapshotIngestServer;
use license_sync_serve::ConnectionLimits;
use license_sync_serve::http::HttpLimits;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::trace::TraceLayer;

use crate::app::App;
use crate::config::AggregatorConfig;
use crate::control::{ControlService, EnrollmentService};
use crate::ingest::IngestService;
use crate::tls::AggregatorTls;
use crate::{rest, store};

/// A running aggregator. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub app: Arc<App>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish, and waits for both servers.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        self.wait().await
    }

    /// Waits until both servers have stopped.
    pub async fn wait(self) -> anyhow::Result<()> {
        for task in self.tasks {
            task.await.context("server task panicked")??;
        }
        Ok(())
    }

    pub fn stop_handle(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Streams a client may open and reset at once before its connection is closed.
const GRPC_MAX_PENDING_RESETS: usize = 20;
/// Largest header block of a call: a credential, a trace context and tonic's own headers fit many times over.
const GRPC_MAX_HEADER_LIST_BYTES: u32 = 64 * 1024;

async fn stopped(mut stop: watch::Receiver<bool>) {
    // Ends when `true` is sent or the sender is gone.
    let _ = stop.wait_for(|stop| *stop).await;
}

pub async fn start(config: AggregatorConfig) -> anyhow::Result<RunningServer> {
    // First: a certificate that cannot be served is refused before anything listens.
    let tls = AggregatorTls::start(&config)?;
    let tls_reload_interval = Duration::from_secs(config.tls_reload_interval_secs);
    let store =
        store::open_with_max_connections(&config.database_url, config.database_max_connections)
            .await
            .map_err(|err| anyhow::anyhow!("{err}"))?;
    let grpc_listener = TcpListener::bind(config.grpc_listen)
        .await
        .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_listen))?;
    let http_listener = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen for HTTP on {}", config.http_listen))?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let max_message_bytes = config.max_message_bytes;
    let http_limits = HttpLimits {
        connections: ConnectionLimits {
            max_connections: config.http_max_connections,
            idle_timeout: Duration::from_secs(config.http_idle_timeout_secs),
        },
        header_read_timeout: Duration::from_millis(config.http_header_read_timeout_ms),
    };
    let grpc_limits = ConnectionLimits {
        max_connections: config.grpc_max_connections,
        idle_timeout: Duration::from_secs(config.grpc_idle_timeout_secs),
    };
    let grpc_max_concurrent_streams = config.grpc_max_concurrent_streams;
    let app = App::new(store, config);
    let (stop, stop_rx) = watch::channel(false);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SnapshotIngestServer<IngestService>>()
        .await;
    health_reporter
        .set_serving::<EnrollmentServer<EnrollmentService>>()
        .await;
    health_reporter
        .set_serving::<AgentControlServer<ControlService>>()
        .await;
    // Reflection v1, and v1alpha beside it for the clients that only speak that (Python's `grpcio-reflection`,
    // older `grpcurl`). Both list the same services, both reflection versions among them.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
    };
    let reflection = reflection_builder()
        .build_v1()
        .context("building gRPC reflection v1")?;
    let reflection_v1alpha = reflection_builder()
        .build_v1alpha()
        .context("building gRPC reflection v1alpha")?;
    let ingest = SnapshotIngestServer::new(IngestService::new(Arc::clone(&app)))
        .max_decoding_message_size(max_message_bytes);
    let enrollment = EnrollmentServer::new(EnrollmentService::new(Arc::clone(&app)));
    // Control streams end when `stop` turns true, so that the graceful shutdown below can finish.
    let control = AgentControlServer::new(ControlService::new(Arc::clone(&app), stop_rx.clone()));
    // No total timeout here: control streams and uploads are long-lived by design (ingest bounds its own streams).
    let grpc = tonic::transport::Server::builder()
        // Long-lived control streams: find dead peers (a half-open TCP connection) without waiting for the OS.
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        // What one connection can make the server hold: streams, reset streams (the "rapid reset" attack), headers.
        .max_concurrent_streams(grpc_max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(GRPC_MAX_PENDING_RESETS))
        .http2_max_header_list_size(GRPC_MAX_HEADER_LIST_BYTES)
        .layer(app.metrics.grpc_layer())
        // A connection is idle (and closed after `grpc_idle_timeout_secs`) while no call is open on it.
        .layer(license_sync_serve::grpc::InFlightLayer)
        // Marks request bodies cut in transport, so that ingest counts a crashed agent's stream as cancelled.
        .layer(tower::util::MapRequestLayer::new(
            crate::ingest::watch_for_cuts,
        ))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_v1alpha)
        .add_service(ingest)
        .add_service(enrollment)
        .add_service(control);
    let grpc_stop = stopped(stop_rx.clone());
    let grpc_task = match &tls {
        Some(tls) => {
            let incoming = license_sync_serve::grpc::incoming_with_tls(
                grpc_listener,
                grpc_limits,
                tls.grpc.clone(),
            );
            let grpc = grpc.serve_with_incoming_shutdown(incoming, grpc_stop);
            tokio::spawn(async move { grpc.await.context("gRPC server failed") })
        }
        None => {
            let incoming = license_sync_serve::grpc::incoming(grpc_listener, grpc_limits);
            let grpc = grpc.serve_with_incoming_shutdown(incoming, grpc_stop);
            tokio::spawn(async move { grpc.await.context("gRPC server failed") })
        }
    };

    // Request logs name the path only: a query string is the caller's input and may hold an email address (e.g. an
    // owner asking for `license-explanations?account=<an address>`).
    let router = rest::router(Arc::clone(&app)).layer(TraceLayer::new_for_http().make_span_with(
        |request: &axum::http::Request<axum::body::Body>| {
            tracing::debug_span!(
                "request",
                method = %request.method(),
                path = request.uri().path(),
                version = ?request.version()
            )
        },
    ));
    let http_stop = stop_rx.clone();
    let http_tls = tls.as_ref().map(|tls| tls.http.clone());
    let http_task = tokio::spawn(async move {
        license_sync_serve::http::serve_with_tls(
            http_listener,
            router,
            http_limits,
            http_tls,
            stopped(http_stop),
        )
        .await;
        Ok(())
    });
    if let Some(tls) = tls {
        tokio::spawn(tls.watch_files(
            tls_reload_interval,
            Arc::clone(&app.metrics),
            stop_rx.clone(),
        ));
    }

    Ok(RunningServer {
        grpc_addr,
        http_addr,
        app,
        stop,
        tasks: vec![grpc_task, http_task],
    })
}

//! A minimal OTLP/gRPC trace receiver (the collector's `TraceService.Export`), built from the opentelemetry-proto
//! definitions: it keeps every span it is sent, so that a test can look at what the binaries exported.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// One received span, flattened: ids in lower-case hex (the parent is empty for a root span).
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    /// The `service.name` resource attribute of the process that sent it.
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// `SPAN_KIND_*` as its protobuf number (2 server, 3 client).
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    pub resource: BTreeMap<String, String>,
    /// The span status code (0 unset, 1 ok, 2 error).
    pub status_code: i32,
}

#[derive(Default)]
struct Received {
    spans: Vec<ReceivedSpan>,
    /// Every request as the receiver decoded it, for tests that scan the whole payload.
    raw: String,
    requests: u64,
}

#[derive(Clone)]
struct Receiver {
    received: Arc<Mutex<Received>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let mut received = self
            .received
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        received.requests += 1;
        let _ = writeln!(received.raw, "{request:?}");
        for resource_spans in request.resource_spans {
            let resource = attributes(
                resource_spans
                    .resource
                    .as_ref()
                    .map(|resource| resource.attributes.as_slice())
                    .unwrap_or_default(),
            );
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for scope_spans in resource_spans.scope_spans {
                for span in scope_spans.spans {
                    received.spans.push(ReceivedSpan {
                        service: service.clone(),
                        name: span.name,
                        trace_id: hex(&span.trace_id),
                        span_id: hex(&span.span_id),
                        parent_span_id: hex(&span.parent_span_id),
                        kind: span.kind,
                        attributes: attributes(&span.attributes),
                        resource: resource.clone(),
                        status_code: span.status.map_or(0, |status| status.code),
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn attributes(pairs: &[KeyValue]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|pair| (pair.key.clone(), value_text(pair.value.as_ref())))
        .collect()
}

fn value_text(value: Option<&AnyValue>) -> String {
    match value.and_then(|value| value.value.as_ref()) {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(any_value::Value::IntValue(number)) => number.to_string(),
        Some(any_value::Value::BoolValue(flag)) => flag.to_string(),
        Some(any_value::Value::DoubleValue(number)) => number.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

/// The receiver, serving on `127.0.0.1:0` from its own runtime until dropped.
pub struct OtlpReceiver {
    pub addr: SocketAddr,
    tls: bool,
    received: Arc<Mutex<Received>>,
    // Dropping the runtime stops the server.
    _runtime: tokio::runtime::Runtime,
}

impl OtlpReceiver {
    pub fn start() -> Result<Self> {
        Self::serve(None)
    }

    /// Over TLS, with this certificate and key (PEM): the endpoint is then `https://…`.
    pub fn start_tls(certificate: &[u8], key: &[u8]) -> Result<Self> {
        Self::serve(Some(tonic::transport::Identity::from_pem(certificate, key)))
    }

    fn serve(identity: Option<tonic::transport::Identity>) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Received::default()));
        let service = TraceServiceServer::new(Receiver {
            received: received.clone(),
        });
        let mut server = tonic::transport::Server::builder();
        let tls = identity.is_some();
        if let Some(identity) = identity {
            server =
                server.tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?;
        }
        runtime.spawn(
            server
                .add_service(service)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok(OtlpReceiver {
            addr,
            tls,
            received,
            _runtime: runtime,
        })
    }

    /// `http://127.0.0.1:PORT` (`https://localhost:PORT` over TLS), for `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.received
            .lock()
            .map(|received| received.spans.clone())
            .unwrap_or_default()
    }

    /// Export requests received so far.
    pub fn requests(&self) -> u64 {
        self.received
            .lock()
            .map(|received| received.requests)
            .unwrap_or_default()
    }

    /// Every request received, decoded and printed (`Debug`): attributes, events and resources included.
    pub fn raw(&self) -> String {
        self.received
            .lock()
            .map(|received| received.raw.clone())
            .unwrap_or_default()
    }

    /// Waits until `done` holds for the spans received so far; returns them, or what arrived when time ran out.
    pub fn wait_for(
        &self,
        timeout: Duration,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Result<Vec<ReceivedSpan>> {
        let mut last = Vec::new();
        crate::eventually(timeout, || {
            last = self.spans();
            done(&last).then_some(())
        })
        .with_context(|| {
            format!(
                "the expected spans did not arrive within {timeout:?}; received:\n{}",
                span_tree(&last)
            )
        })?;
        Ok(last)
    }
}

/// The spans as an indented tree (children under their parent, in arrival order), one per line:
/// `service name {attributes}`. A span whose parent was not received is shown as a root, with its parent id.
pub fn span_tree(spans: &[ReceivedSpan]) -> String {
    fn walk(spans: &[ReceivedSpan], parent: &str, depth: usize, out: &mut String) {
        for span in spans.iter().filter(|span| span.parent_span_id == parent) {
            let attributes: Vec<String> = span
                .attributes
                .iter()
                .filter(|(key, _)| !key.starts_with("code.") && key.as_str() != "busy_ns")
                .filter(|(key, _)| key.as_str() != "idle_ns" && key.as_str() != "target")
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            let _ = writeln!(
                out,
                "{}{} [{}] {{{}}}",
                "  ".repeat(depth),
                span.name,
                span.service,
                attributes.join(", ")
            );
            walk(spans, &span.span_id, depth + 1, out);
        }
    }
    let mut out = String::new();
    let known: Vec<&str> = spans.iter().map(|span| span.span_id.as_str()).collect();
    let mut roots: Vec<&str> = Vec::new();
    for span in spans {
        let parent = span.parent_span_id.as_str();
        if !known.contains(&parent) && !roots.contains(&parent) {
            roots.push(parent);
        }
    }
    for root in roots {
        if !root.is_empty() {
            let _ = writeln!(out, "(parent {root} not received)");
        }
        walk(spans, root, 0, &mut out);
    }
    out
}

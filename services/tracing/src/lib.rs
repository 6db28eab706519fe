//! Logs and OpenTelemetry traces for the license-sync binaries.
//!
//! [`init`] installs one `tracing` subscriber with two layers:
//!
//! - the **log** layer: human text or JSON on stderr, filtered by `RUST_LOG` (default `info`);
//! - the **trace** layer (`tracing-opentelemetry`), only when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set: it turns the spans of our own crates into OpenTelemetry spans and
//!   exports them over OTLP/gRPC with a batch processor. Without either variable no exporter, no layer and no
//!   connection exist.
//!
//! The OpenTelemetry SDK reads the standard variables itself: `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`
//! (the resource), `OTEL_TRACES_SAMPLER`/`_ARG`, `OTEL_BSP_*` (batching), `OTEL_EXPORTER_OTLP_*` (endpoint, headers,
//! timeout, compression), `OTEL_SPAN_*_LIMIT`. This crate adds the default service name, `OTEL_SDK_DISABLED`,
//! `OTEL_TRACES_EXPORTER=none` and `OTEL_EXPORTER_OTLP_CERTIFICATE` (a CA for an `https://` collector).
//!
//! The W3C trace context (`traceparent`, `tracestate`) crosses gRPC calls as request metadata: the caller injects
//! it with [`inject_context`], the server makes its span a child of it with [`set_remote_parent`]. The global
//! propagator is [`TraceContextPropagator`].
//!
//! Span attributes follow the logs' rule: ids, hostnames and counts, never an email address or a token.

use std::time::Duration;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{KeyValue, global};
use opentelemetry_otlp::WithTonicConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::{EnvResourceDetector, TelemetryResourceDetector};
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::metadata::{KeyRef, MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::{Certificate, ClientTlsConfig};
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{EnvFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer, Registry};

/// The crates whose spans become OpenTelemetry spans. Library spans (hyper, h2, tonic, sqlx) stay out: they would
/// multiply the volume, and the exporter's own gRPC calls would otherwise be traced and exported in a loop.
const TRACED_CRATES: [&str; 4] = [
    "license_sync_agent",
    "license_sync_aggregator",
    "license_sync_core",
    "license_sync_tracing",
];

/// How long the exit waits for the last spans to be exported. A collector that is down must not hold a one-shot
/// command for the whole export timeout.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What [`init`] needs to know about the binary.
#[derive(Debug, Clone)]
pub struct Options {
    /// `service.name` unless `OTEL_SERVICE_NAME` or `service.name` in `OTEL_RESOURCE_ATTRIBUTES` says otherwise.
    pub service_name: &'static str,
    /// `service.version`.
    pub service_version: &'static str,
    pub format: LogFormat,
    /// JSON only: put the event's fields at the top level of each line instead of under `fields`.
    pub flatten_json: bool,
    /// Colours in text logs.
    pub ansi: bool,
    /// Whether this run may export traces at all (an administration command has nothing worth tracing).
    pub traces: bool,
}

/// Why traces are or are not exported; decided from the environment alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportDecision {
    /// Export over OTLP/gRPC; the variable that names the endpoint.
    Otlp { endpoint_variable: &'static str },
    /// No exporter; why.
    Off(&'static str),
}

/// Decides from the environment (`get` reads a variable) whether to export traces.
pub fn export_decision(get: &dyn Fn(&str) -> Option<String>) -> ExportDecision {
    let set = |name: &str| get(name).is_some_and(|value| !value.trim().is_empty());
    if get("OTEL_SDK_DISABLED").is_some_and(|value| value.trim().eq_ignore_ascii_case("true")) {
        return ExportDecision::Off("OTEL_SDK_DISABLED=true");
    }
    match get("OTEL_TRACES_EXPORTER").map(|value| value.trim().to_ascii_lowercase()) {
        None => {}
        Some(value) if value.is_empty() || value == "otlp" => {}
        Some(value) if value == "none" => return ExportDecision::Off("OTEL_TRACES_EXPORTER=none"),
        Some(_) => {
            return ExportDecision::Off(
                "OTEL_TRACES_EXPORTER names an exporter other than otlp, the only one built in",
            );
        }
    }
    if set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
        ExportDecision::Otlp {
            endpoint_variable: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        }
    } else if set("OTEL_EXPORTER_OTLP_ENDPOINT") {
        ExportDecision::Otlp {
            endpoint_variable: "OTEL_EXPORTER_OTLP_ENDPOINT",
        }
    } else {
        ExportDecision::Off(
            "neither OTEL_EXPORTER_OTLP_ENDPOINT nor OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set",
        )
    }
}

/// The service name to set over what the resource detectors found: `OTEL_SERVICE_NAME` wins, then `service.name`
/// in `OTEL_RESOURCE_ATTRIBUTES` (already in the detected resource, so `None`), then the binary's default.
pub fn service_name_override(
    default: &'static str,
    get: &dyn Fn(&str) -> Option<String>,
) -> Option<String> {
    if let Some(name) = get("OTEL_SERVICE_NAME").filter(|name| !name.trim().is_empty()) {
        return Some(name);
    }
    let in_attributes = get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|attributes| {
        attributes.split(',').any(|pair| {
            pair.split_once('=')
                .is_some_and(|(key, _)| key.trim() == "service.name")
        })
    });
    (!in_attributes).then(|| default.to_owned())
}

/// The running process's telemetry: shut it down before exiting so that the last spans are exported.
#[must_use = "dropping the guard shuts the exporter down; keep it until the end of main"]
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports the spans still queued and stops the exporter (at most a few seconds). Blocks the calling thread,
    /// and the export needs the Tokio runtime's workers: call it from outside the runtime (after `block_on`), or
    /// from `spawn_blocking`. Spans still open at this point are lost.
    pub fn shutdown(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
        {
            tracing::warn!(%error, "could not export the last trace spans");
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Installs the global subscriber (logs, and traces when configured) and the W3C trace-context propagator.
///
/// Call it inside a Tokio runtime: the OTLP exporter's gRPC channel is created on it (it connects lazily, at the
/// first export). A failure to build the exporter is logged and the process runs without traces: telemetry never
/// stops license sync.
pub fn init(options: &Options) -> Telemetry {
    global::set_text_map_propagator(TraceContextPropagator::new());
    let decision = if options.traces {
        export_decision(&env_var)
    } else {
        ExportDecision::Off("this command exports no traces")
    };
    let (provider, exporter_error) = match decision {
        ExportDecision::Otlp { .. } => match tracer_provider(options) {
            Ok(provider) => (Some(provider), None),
            Err(error) => (None, Some(error)),
        },
        ExportDecision::Off(_) => (None, None),
    };

    let log_filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let log_layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(options.ansi);
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = Vec::new();
    layers.push(match options.format {
        LogFormat::Text => log_layer.with_filter(log_filter).boxed(),
        LogFormat::Json => log_layer
            .json()
            .flatten_event(options.flatten_json)
            .with_filter(log_filter)
            .boxed(),
    });
    if let Some(provider) = &provider {
        let tracer = provider.tracer(options.service_name);
        let traced = Targets::new().with_targets(TRACED_CRATES.map(|target| (target, Level::INFO)));
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                // The thread of a Tokio worker says nothing about a sync.
                .with_threads(false)
                .with_filter(traced)
                .boxed(),
        );
    }
    if let Err(error) = tracing_subscriber::registry().with(layers).try_init() {
        // Only when something installed a subscriber first (a test harness); keep it.
        eprintln!("license-sync: logging was already set up: {error}");
    }

    match (&decision, &exporter_error) {
        (ExportDecision::Otlp { endpoint_variable }, None) => tracing::info!(
            endpoint_variable,
            protocol = "grpc",
            "exporting trace spans over OTLP"
        ),
        (ExportDecision::Otlp { endpoint_variable }, Some(error)) => tracing::warn!(
            endpoint_variable,
            %error,
            "cannot set up the OTLP trace exporter; running without traces"
        ),
        (ExportDecision::Off(reason), _) => {
            tracing::debug!(reason, "trace spans are not exported")
        }
    }
    if provider.is_some() {
        for variable in [
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ] {
            if let Some(protocol) = env_var(variable).filter(|value| value.trim() != "grpc") {
                tracing::warn!(
                    variable,
                    protocol,
                    "only OTLP over gRPC is built in; the variable is ignored and spans are sent over gRPC"
                );
            }
        }
    }
    Telemetry { provider }
}

fn tracer_provider(options: &Options) -> Result<SdkTracerProvider, String> {
    // The endpoint, headers, timeout and compression come from the OTEL_EXPORTER_OTLP_* variables.
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_tls_config(tls_config()?)
        .build()
        .map_err(|error| error.to_string())?;
    // Detectors first, then our default underneath them: OTEL_RESOURCE_ATTRIBUTES may override service.version.
    let mut resource = Resource::builder_empty()
        .with_attributes([
            KeyValue::new("service.name", options.service_name),
            KeyValue::new("service.version", options.service_version),
        ])
        .with_detectors(&[
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ]);
    if let Some(name) = service_name_override(options.service_name, &env_var) {
        resource = resource.with_service_name(name);
    }
    // The sampler (OTEL_TRACES_SAMPLER) and the batch settings (OTEL_BSP_*) are read by the SDK's defaults.
    Ok(SdkTracerProvider::builder()
        .with_resource(resource.build())
        .with_batch_exporter(exporter)
        .build())
}

/// TLS for an `https://` collector (a plain `http://` endpoint ignores it): the Mozilla roots, plus the CA of
/// `OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE` or `OTEL_EXPORTER_OTLP_CERTIFICATE` (PEM), which the SDK does not read
/// itself. Without roots the exporter's default TLS would trust no server at all.
fn tls_config() -> Result<ClientTlsConfig, String> {
    let tls = ClientTlsConfig::new().with_webpki_roots();
    let certificate = [
        "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
        "OTEL_EXPORTER_OTLP_CERTIFICATE",
    ]
    .into_iter()
    .find_map(|variable| {
        env_var(variable)
            .filter(|path| !path.trim().is_empty())
            .map(|path| (variable, path))
    });
    match certificate {
        None => Ok(tls),
        Some((variable, path)) => {
            let pem = std::fs::read(&path)
                .map_err(|error| format!("cannot read {variable} ({path}): {error}"))?;
            Ok(tls.ca_certificate(Certificate::from_pem(pem)))
        }
    }
}

/// Writes W3C trace-context entries into gRPC request metadata.
pub struct MetadataInjector<'a>(pub &'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        // The propagator only writes `traceparent`/`tracestate`, which are valid ASCII metadata; anything else is
        // dropped rather than failing the call.
        if let (Ok(key), Ok(value)) = (
            MetadataKey::from_bytes(key.as_bytes()),
            MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}

/// Reads W3C trace-context entries from gRPC request metadata.
pub struct MetadataExtractor<'a>(pub &'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts the trace context of `span` into outgoing request metadata, so that the server's spans join its trace.
/// Writes nothing when traces are not exported (the span has no OpenTelemetry context then).
pub fn inject_context(span: &tracing::Span, metadata: &mut MetadataMap) {
    let context = span.context();
    global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&context, &mut MetadataInjector(metadata));
    });
}

/// Makes `span` a child of the caller's span named in the request metadata. Call it before the span is first
/// entered. Without incoming context, or without traces, it changes nothing.
pub fn set_remote_parent(span: &tracing::Span, metadata: &MetadataMap) {
    let parent = global::get_text_map_propagator(|propagator| {
        propagator.extract(&MetadataExtractor(metadata))
    });
    // Fails only when no trace layer is installed (traces off) or the span is disabled: nothing to join then.
    let _ = span.set_parent(parent);
}

/// Marks `span` failed, with a stable label of what went wrong (an error kind such as `aggregator_unavailable`) as
/// its status and `error.type`. Never pass a message: messages may quote input.
pub fn record_failure(span: &tracing::Span, kind: &str) {
    span.set_status(opentelemetry::trace::Status::error(kind.to_owned()));
    span.set_attribute("error.type", kind.to_owned());
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use opentelemetry::Context;
    use opentelemetry::propagation::TextMapPropagator as _;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    };

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        move |name| vars.get(name).cloned()
    }

    #[test]
    fn exports_only_when_an_endpoint_is_set() {
        assert!(matches!(export_decision(&env(&[])), ExportDecision::Off(_)));
        assert!(matches!(
            export_decision(&env(&[
                ("OTEL_SERVICE_NAME", "x"),
                ("OTEL_BSP_SCHEDULE_DELAY", "100"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", " ")
            ])),
            ExportDecision::Off(_)
        ));
        assert_eq!(
            export_decision(&env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")])),
            ExportDecision::Otlp {
                endpoint_variable: "OTEL_EXPORTER_OTLP_ENDPOINT"
            }
        );
        assert_eq!(
            export_decision(&env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317")
            ])),
            ExportDecision::Otlp {
                endpoint_variable: "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
            }
        );
        for (name, value) in [
            ("OTEL_SDK_DISABLED", "TRUE"),
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_TRACES_EXPORTER", "zipkin"),
        ] {
            assert!(
                matches!(
                    export_decision(&env(&[
                        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                        (name, value)
                    ])),
                    ExportDecision::Off(_)
                ),
                "{name}={value}"
            );
        }
        assert!(matches!(
            export_decision(&env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
                ("OTEL_TRACES_EXPORTER", "otlp"),
                ("OTEL_SDK_DISABLED", "false")
            ])),
            ExportDecision::Otlp { .. }
        ));
    }

    #[test]
    fn the_default_service_name_yields_to_the_standard_variables() {
        assert_eq!(
            service_name_override("license-sync-agent", &env(&[])).as_deref(),
            Some("license-sync-agent")
        );
        assert_eq!(
            service_name_override(
                "license-sync-agent",
                &env(&[("OTEL_RESOURCE_ATTRIBUTES", "team=a, service.name = fleet")])
            ),
            None,
            "the resource detector already holds service.name"
        );
        assert_eq!(
            service_name_override(
                "license-sync-agent",
                &env(&[
                    ("OTEL_RESOURCE_ATTRIBUTES", "service.name=fleet"),
                    ("OTEL_SERVICE_NAME", "agent-7")
                ])
            )
            .as_deref(),
            Some("agent-7")
        );
        assert_eq!(
            service_name_override(
                "license-sync-agent",
                &env(&[("OTEL_RESOURCE_ATTRIBUTES", "service.namespace=x")])
            )
            .as_deref(),
            Some("license-sync-agent")
        );
    }

    #[test]
    fn trace_context_round_trips_through_grpc_metadata() {
        let propagator = TraceContextPropagator::new();
        let sent = SpanContext::new(
            TraceId::from(0x0af7651916cd43dd8448eb211c80319c_u128),
            SpanId::from(0xb7ad6b7169203331_u64),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "value")]).expect("valid trace state"),
        );
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", MetadataValue::from_static("Bearer x"));
        propagator.inject_context(
            &Context::new().with_remote_span_context(sent.clone()),
            &mut MetadataInjector(&mut metadata),
        );
        assert_eq!(
            metadata
                .get("traceparent")
                .and_then(|value| value.to_str().ok()),
            Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        );
        assert!(MetadataExtractor(&metadata).keys().contains(&"tracestate"));
        let received = propagator.extract(&MetadataExtractor(&metadata));
        let received = received.span().span_context().clone();
        assert_eq!(received.trace_id(), sent.trace_id());
        assert_eq!(received.span_id(), sent.span_id());
        assert!(received.is_remote() && received.is_sampled());
        assert_eq!(received.trace_state().header(), "vendor=value");
    }

    #[test]
    fn without_a_trace_layer_nothing_is_injected() {
        global::set_text_map_propagator(TraceContextPropagator::new());
        let span = tracing::info_span!("test.span");
        let mut metadata = MetadataMap::new();
        inject_context(&span, &mut metadata);
        assert!(metadata.is_empty());
        // And extracting into a span without the layer is harmless.
        set_remote_parent(&span, &metadata);
    }
}

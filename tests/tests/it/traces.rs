//! OpenTelemetry traces end to end: the real aggregator and agent export over OTLP/gRPC to a receiver inside the
//! test (`license_sync_e2e::otlp`), and one sync is one trace from the agent to the aggregator.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use license_sync_e2e::otlp::{OtlpReceiver, ReceivedSpan, span_tree};
use license_sync_e2e::{Aggregator, SidecarAgent, SidecarOptions, agent_with_env};
use serde_json::Value;

const USERS: &str = "\
id,login,email,suspended?
1,mona,mona@traces.example,false
2,hubot,hubot@traces.example,false
3,gone,gone@traces.example,true
";

const WAIT: Duration = Duration::from_secs(30);

const AGENT_SPANS: [&str; 5] = [
    "agent.sync",
    "agent.aggregator_connect",
    "agent.source_fetch",
    "agent.snapshot_build",
    "agent.snapshot_stream",
];

const AGGREGATOR_SPANS: [&str; 5] = [
    "aggregator.ingest",
    "aggregator.receive",
    "aggregator.validate",
    "aggregator.commit",
    "aggregator.merge",
];

/// The OTel variables of both processes: export to the receiver, in batches every 100 ms.
fn otel_env(receiver: &OtlpReceiver) -> Vec<(String, String)> {
    vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), receiver.endpoint()),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
        (
            "OTEL_RESOURCE_ATTRIBUTES".into(),
            "deployment.environment.name=e2e".into(),
        ),
    ]
}

fn borrowed(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// An enterprise `acme` and one instance; returns the instance's server id and credential.
pub(crate) fn enterprise_with_instance(
    aggregator: &Aggregator,
    hostname: &str,
) -> (String, String) {
    aggregator
        .admin(&["enterprise", "create", "--slug", "acme", "--seats", "10"])
        .expect("enterprise");
    let server_id = uuid::Uuid::new_v4().to_string();
    let credential = aggregator
        .admin(&[
            "instance",
            "add",
            "--enterprise",
            "acme",
            "--server-id",
            &server_id,
            "--hostname",
            hostname,
        ])
        .expect("instance credential");
    (server_id, credential)
}

/// A one-shot agent configuration reading `USERS` from a file.
fn write_agent_config(
    dir: &Path,
    aggregator: &Aggregator,
    server_id: &str,
    hostname: &str,
    credential: &str,
) -> String {
    std::fs::write(dir.join("users.csv"), USERS).expect("csv");
    std::fs::write(dir.join("credential"), credential).expect("credential");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[instance]\nserver_id = {server_id:?}\nhostname = {hostname:?}\nghes_version = \"3.14.2\"\n\n\
             [source]\nkind = \"file\"\npath = {:?}\n\n\
             [aggregator]\nendpoint = {:?}\ncredential_file = {:?}\nbatch_size = 2\n",
            dir.join("users.csv"),
            aggregator.grpc_url,
            dir.join("credential"),
        ),
    )
    .expect("config");
    config.to_string_lossy().into_owned()
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str) -> Vec<&'a ReceivedSpan> {
    spans.iter().filter(|span| span.name == name).collect()
}

fn one<'a>(spans: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found = named(spans, name);
    assert_eq!(
        found.len(),
        1,
        "expected one {name} span:\n{}",
        span_tree(spans)
    );
    found[0]
}

fn has_all(spans: &[ReceivedSpan], names: &[&str]) -> bool {
    names
        .iter()
        .all(|name| spans.iter().any(|span| span.name == *name))
}

fn assert_child(spans: &[ReceivedSpan], child: &ReceivedSpan, parent: &ReceivedSpan) {
    assert_eq!(
        child.parent_span_id,
        parent.span_id,
        "{} should be a child of {}:\n{}",
        child.name,
        parent.name,
        span_tree(spans)
    );
}

/// No email address of the scenario, no credential or token, in any attribute, event or resource.
fn assert_no_secrets(payload: &str, secrets: &[&str]) {
    assert!(
        !payload.contains("@traces.example"),
        "an email address was exported: {}",
        payload
            .find("@traces.example")
            .map(|at| &payload[at.saturating_sub(200)..(at + 50).min(payload.len())])
            .unwrap_or_default()
    );
    for secret in secrets {
        assert!(!payload.contains(secret), "a secret was exported");
    }
}

#[test]
fn one_sync_is_one_trace_from_the_agent_to_the_aggregator() {
    let receiver = OtlpReceiver::start().expect("OTLP receiver");
    let env = otel_env(&receiver);
    let aggregator = Aggregator::start_with_env(&borrowed(&env)).expect("aggregator starts");
    let hostname = "ghes-traced.test";
    let (server_id, credential) = enterprise_with_instance(&aggregator, hostname);
    let config = write_agent_config(
        aggregator.dir.path(),
        &aggregator,
        &server_id,
        hostname,
        &credential,
    );

    let output = agent_with_env(&["sync", "--config", &config], &borrowed(&env)).expect("agent");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let receipt: Value = serde_json::from_slice(&output.stdout).expect("receipt");
    let sync_id = receipt["sync_id"].as_str().expect("sync id");

    // The agent exported before it exited (it flushes at exit); the aggregator exports in its next batch.
    let spans = receiver
        .wait_for(WAIT, |spans| {
            has_all(spans, &AGENT_SPANS) && has_all(spans, &AGGREGATOR_SPANS)
        })
        .expect("spans of both services");
    println!("spans of one sync, as received:\n{}", span_tree(&spans));

    // Each service names itself; OTEL_RESOURCE_ATTRIBUTES reaches the resource of both.
    for span in &spans {
        let expected = if span.name.starts_with("agent.") {
            "license-sync-agent"
        } else {
            "license-sync-aggregator"
        };
        assert_eq!(span.service, expected, "{}", span.name);
        assert_eq!(
            span.resource
                .get("deployment.environment.name")
                .map(String::as_str),
            Some("e2e")
        );
        assert!(span.resource.contains_key("service.version"));
    }
    let services: BTreeSet<&str> = spans.iter().map(|span| span.service.as_str()).collect();
    assert_eq!(services.len(), 2, "{services:?}");

    // One trace.
    let traces: BTreeSet<&str> = spans.iter().map(|span| span.trace_id.as_str()).collect();
    assert_eq!(traces.len(), 1, "one trace id:\n{}", span_tree(&spans));

    // The tree: the agent's root, its children; the aggregator's ingest under the agent's stream.
    let sync = one(&spans, "agent.sync");
    assert!(sync.parent_span_id.is_empty(), "agent.sync is the root");
    assert_eq!(sync.attributes["trigger"], "cli");
    assert_eq!(sync.attributes["sync_id"], sync_id);
    assert_eq!(sync.attributes["server_id"], server_id);
    assert_eq!(sync.attributes["hostname"], hostname);
    assert_eq!(sync.attributes["users"], "3");
    assert_eq!(sync.attributes["outcome"], "committed");
    for name in [
        "agent.aggregator_connect",
        "agent.source_fetch",
        "agent.snapshot_build",
        "agent.snapshot_stream",
    ] {
        assert_child(&spans, one(&spans, name), sync);
    }
    let fetch = one(&spans, "agent.source_fetch");
    assert_eq!(fetch.attributes["source"], "file");
    assert_eq!(fetch.attributes["rows_read"], "3");
    let stream = one(&spans, "agent.snapshot_stream");
    assert_eq!(stream.kind, 3, "client");
    let ingest = one(&spans, "aggregator.ingest");
    assert_eq!(ingest.kind, 2, "server");
    assert_child(&spans, ingest, stream);
    assert_eq!(ingest.attributes["sync_id"], sync_id);
    assert_eq!(ingest.attributes["server_id"], server_id);
    assert_eq!(ingest.attributes["users"], "3");
    assert_eq!(ingest.attributes["duplicate"], "false");
    for name in [
        "aggregator.receive",
        "aggregator.validate",
        "aggregator.commit",
        "aggregator.merge",
    ] {
        assert_child(&spans, one(&spans, name), ingest);
    }
    assert!(
        spans.iter().all(|span| span.status_code != 2),
        "no span failed:\n{}",
        span_tree(&spans)
    );
    assert_no_secrets(&receiver.raw(), &[&credential]);
}

#[test]
fn each_sidecar_sync_is_its_own_trace() {
    let receiver = OtlpReceiver::start().expect("OTLP receiver");
    let env = otel_env(&receiver);
    let aggregator = Aggregator::start_with_env(&borrowed(&env)).expect("aggregator starts");
    aggregator
        .admin(&["enterprise", "create", "--slug", "acme", "--seats", "10"])
        .expect("enterprise");
    let enrollment = aggregator
        .admin(&["enrollment-token", "create", "--enterprise", "acme"])
        .expect("enrollment token");
    let mut options = SidecarOptions::new(&aggregator.grpc_url, "ghes-sidecar-traced.test", USERS);
    options.env = env.clone();
    let agent = SidecarAgent::start(options).expect("agent starts");
    agent.connect(&enrollment).expect("connect");
    let (code, body) = agent.set_enabled(true).expect("enable");
    assert_eq!(code, 200, "{body}");
    // Enabling runs the first scheduled sync; then a Sync now.
    agent
        .wait_status(WAIT, |status| {
            status["counters"]["jobs_committed"].as_u64() == Some(1)
        })
        .expect("the scheduled sync is committed");
    let (code, body) = agent.sync_now().expect("sync now");
    assert_eq!(code, 202, "{body}");
    let job_id = body["job_id"].as_str().expect("job id").to_owned();
    agent
        .wait_job(&job_id, WAIT, |job| job["state"] == "committed")
        .expect("the Sync now is committed");

    let spans = receiver
        .wait_for(WAIT, |spans| {
            named(spans, "agent.sync").len() == 2
                && named(spans, "aggregator.ingest").len() == 2
                && named(spans, "aggregator.merge").len() == 2
        })
        .expect("two syncs");
    println!("spans of two sidecar syncs:\n{}", span_tree(&spans));

    let roots = named(&spans, "agent.sync");
    let triggers: BTreeSet<&str> = roots
        .iter()
        .map(|span| span.attributes["trigger"].as_str())
        .collect();
    assert_eq!(triggers, BTreeSet::from(["local", "schedule"]));
    assert_ne!(roots[0].trace_id, roots[1].trace_id, "one trace per sync");
    for root in roots {
        assert!(root.parent_span_id.is_empty());
        assert_eq!(root.attributes["outcome"], "committed");
        let in_trace: Vec<ReceivedSpan> = spans
            .iter()
            .filter(|span| span.trace_id == root.trace_id)
            .cloned()
            .collect();
        assert!(
            has_all(&in_trace, &AGENT_SPANS) && has_all(&in_trace, &AGGREGATOR_SPANS),
            "{}",
            span_tree(&in_trace)
        );
        // Delivery runs in another task than the job's read: the stream still hangs under the job's span.
        let stream = one(&in_trace, "agent.snapshot_stream");
        assert_child(&in_trace, stream, root);
        assert_child(&in_trace, one(&in_trace, "aggregator.ingest"), stream);
        if root.attributes["trigger"] == "local" {
            assert_eq!(root.attributes["job_id"], job_id);
        }
    }
    assert_no_secrets(&receiver.raw(), &[&enrollment, agent.owner_token(), "lsi_"]);
}

#[test]
fn spans_reach_a_collector_over_tls_with_its_ca() {
    let fixtures =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/agent/tests/fixtures/tls");
    let read = |name: &str| std::fs::read(fixtures.join(name)).expect("TLS fixture");
    let receiver =
        OtlpReceiver::start_tls(&read("server.pem"), &read("server.key")).expect("TLS receiver");
    let aggregator = Aggregator::start().expect("aggregator starts");
    let hostname = "ghes-tls-traced.test";
    let (server_id, credential) = enterprise_with_instance(&aggregator, hostname);
    let config = write_agent_config(
        aggregator.dir.path(),
        &aggregator,
        &server_id,
        hostname,
        &credential,
    );
    let ca = fixtures.join("ca.pem");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint()),
        (
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
            ca.to_string_lossy().into_owned(),
        ),
        ("OTEL_SERVICE_NAME", "agent-over-tls".to_owned()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let output = agent_with_env(&["sync", "--config", &config], &env).expect("agent");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The agent flushed before exiting: the spans are there already, or within a moment.
    let spans = receiver
        .wait_for(Duration::from_secs(10), |spans| {
            has_all(spans, &AGENT_SPANS)
        })
        .expect("the agent's spans over TLS");
    assert!(spans.iter().all(|span| span.service == "agent-over-tls"));
}

/// Listeners on the default OTLP/gRPC address (`localhost:4317`), where an exporter installed by mistake would
/// send; `None` for an address that is taken on this machine.
fn default_collector_listeners() -> Vec<TcpListener> {
    ["127.0.0.1:4317", "[::1]:4317"]
        .iter()
        .filter_map(|addr| TcpListener::bind(addr).ok())
        .collect()
}

#[test]
fn without_an_endpoint_nothing_is_exported() {
    let listeners = default_collector_listeners();
    if listeners.is_empty() {
        println!("port 4317 is taken here: only the logs are checked");
    }
    // Everything but the endpoint (empty is unset, whatever the test's own environment holds): a short batch delay
    // would show an exporter within the test.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
        ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ("OTEL_SERVICE_NAME", "should-not-matter"),
        ("RUST_LOG", "info,license_sync_tracing=debug"),
    ];
    let mut aggregator = Aggregator::start_with_env(&env).expect("aggregator starts");
    let hostname = "ghes-untraced.test";
    let (server_id, credential) = enterprise_with_instance(&aggregator, hostname);
    let config = write_agent_config(
        aggregator.dir.path(),
        &aggregator,
        &server_id,
        hostname,
        &credential,
    );
    let output = agent_with_env(&["sync", "--config", &config], &env).expect("agent");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let receipt: Value = serde_json::from_slice(&output.stdout).expect("receipt");
    assert_eq!(receipt["users_accepted"], 3);
    // Several batch delays pass while the aggregator keeps running.
    std::thread::sleep(Duration::from_millis(500));
    let stopped = aggregator
        .process
        .as_mut()
        .expect("running")
        .terminate(Duration::from_secs(15))
        .expect("terminate");
    assert!(
        stopped.is_some_and(|status| status.success()),
        "{stopped:?}"
    );

    for (who, log) in [
        (
            "agent",
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ),
        ("aggregator", aggregator.log()),
    ] {
        assert!(
            log.contains("trace spans are not exported"),
            "{who} says why it exports nothing:\n{log}"
        );
        assert!(
            !log.contains("exporting trace spans"),
            "{who} set up an exporter:\n{log}"
        );
    }
    for listener in listeners {
        listener.set_nonblocking(true).expect("non-blocking");
        // A connection attempt would be waiting in the backlog, accepted or not by then.
        match listener.accept() {
            Ok((_, peer)) => panic!(
                "something connected to the default collector address {:?} from {peer}",
                listener.local_addr()
            ),
            Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::WouldBlock),
        }
    }
}

//! `/metrics` of the aggregator and of the agent sidecar, end to end with real processes: after a sync the values
//! agree with the REST answers; a second aggregator on the same database reports the same database gauges (they are
//! read at scrape time) but its own event counters; labels are bounded. Then a real Prometheus scrapes both.
//!
//! The Prometheus test needs the `prometheus` binary (Debian package `prometheus`; or set
//! `LICENSE_SYNC_TEST_PROMETHEUS` to its path). Without it the test prints `SKIPPED`, unless
//! `LICENSE_SYNC_REQUIRE_ALL_TESTS` is set (CI), where it fails.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use license_sync_e2e::metrics::Exposition;
use license_sync_e2e::{Aggregator, Process, SidecarAgent, SidecarOptions, binary, eventually};
use serde_json::Value;
use time::OffsetDateTime;

/// Two active accounts, one dormant, one suspended, a built-in one, and a row the reader skips (bad boolean).
const USERS: &str = "\
id,login,email,suspended?,dormant?
1,mona,mona@example.com,false,false
2,hubot,hubot@example.com,false,false
3,sleepy,sleepy@example.com,false,true
4,gone,gone@example.com,true,false
5,ghost,ghost@example.com,false,false
6,broken,broken@example.com,maybe,false
";

/// People consuming a license in [`USERS`]: mona, hubot, sleepy.
const CONSUMED: f64 = 3.0;
const PURCHASED: i64 = 2;
const HOSTNAME: &str = "ghes-metrics.example.com";
const WAIT: Duration = Duration::from_secs(30);

/// The aggregator with one enterprise (`acme`) and an owner's REST token.
struct Cloud {
    aggregator: Aggregator,
    token: String,
    http: reqwest::blocking::Client,
}

impl Cloud {
    fn start() -> Cloud {
        let aggregator = Aggregator::start().expect("aggregator starts");
        aggregator
            .admin(&[
                "enterprise",
                "create",
                "--slug",
                "acme",
                "--seats",
                &PURCHASED.to_string(),
            ])
            .expect("enterprise");
        let token = aggregator
            .admin(&["token", "create", "--enterprise", "acme", "--name", "owner"])
            .expect("owner token");
        Cloud {
            aggregator,
            token,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
        }
    }

    fn rest(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.aggregator.http_url))
            .bearer_auth(&self.token);
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        let response = request.send().expect("REST call");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    fn enrollment_token(&self) -> String {
        let (status, body) = self.rest("POST", "/enterprises/acme/enrollment-tokens", None);
        assert_eq!(status, 201, "{body}");
        body["token"].as_str().expect("token").to_owned()
    }

    /// `total_seats_consumed` as the REST API reports it.
    fn consumed(&self) -> f64 {
        let (status, body) = self.rest("GET", "/enterprises/acme/consumed-licenses", None);
        assert_eq!(status, 200, "{body}");
        body["total_seats_consumed"]
            .as_f64()
            .expect("total_seats_consumed")
    }
}

/// `GET {base}/metrics`, checked for the OpenMetrics content type and end marker.
fn scrape(http: &reqwest::blocking::Client, base: &str) -> Exposition {
    let response = http
        .get(format!("{base}/metrics"))
        .send()
        .expect("GET /metrics");
    assert_eq!(response.status().as_u16(), 200, "GET {base}/metrics");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8",
        "content type of {base}/metrics"
    );
    let text = response.text().expect("metrics body");
    assert!(text.ends_with("# EOF\n"), "no end marker:\n{text}");
    Exposition::parse(&text).unwrap_or_else(|error| panic!("{error:#}\n{text}"))
}

/// Every metric that `deploy/` (alerts, dashboard) may use, listed in `deploy/metrics.txt`, is declared by one of the
/// services with that type: a renamed metric cannot silently break an alert.
fn assert_deploy_metrics_are_served(http: &reqwest::blocking::Client, bases: &[&str]) {
    let mut declared = std::collections::HashSet::new();
    for base in bases {
        let text = http
            .get(format!("{base}/metrics"))
            .send()
            .and_then(|response| response.text())
            .expect("GET /metrics");
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ")
                && let Some((name, kind)) = rest.split_once(' ')
            {
                declared.insert((name.to_owned(), kind.to_owned()));
            }
        }
    }
    let listed = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/metrics.txt"),
    )
    .expect("read deploy/metrics.txt");
    let mut missing = Vec::new();
    for line in listed.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, kind) = line.split_once(' ').unwrap_or((line, ""));
        let kind = kind.trim();
        // OpenMetrics declares a counter's family without its `_total` suffix.
        let family = match kind {
            "counter" => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        if !declared.contains(&(family.to_owned(), kind.to_owned())) {
            missing.push(format!("{name} ({kind})"));
        }
    }
    assert!(
        missing.is_empty(),
        "deploy/metrics.txt lists metrics no service declares: {missing:?}"
    );
}

/// The one sample named `name` with `labels`; fails the test when there is none.
fn value(exposition: &Exposition, name: &str, labels: &[(&str, &str)]) -> f64 {
    exposition
        .value(name, labels)
        .expect("at most one sample")
        .unwrap_or_else(|| panic!("no sample {name} {labels:?} in {exposition:#?}"))
}

/// No label value is an email address or a raw request path.
fn assert_bounded_labels(exposition: &Exposition, what: &str) {
    assert!(!exposition.samples.is_empty(), "{what}: no samples");
    for sample in &exposition.samples {
        for (key, label) in &sample.labels {
            assert!(
                !label.contains('@'),
                "{what}: label {key}={label:?} of {} holds an '@'",
                sample.name
            );
        }
        if let Some(route) = sample.labels.get("route") {
            assert!(
                route == "unmatched" || !route.contains("acme"),
                "{what}: route label {route:?} is a raw path, not a template"
            );
        }
    }
}

/// A sidecar agent reading [`USERS`], connected to the cloud's aggregator; license sync still disabled.
fn connected_agent(cloud: &Cloud) -> SidecarAgent {
    let agent = SidecarAgent::start(SidecarOptions::new(
        &cloud.aggregator.grpc_url,
        HOSTNAME,
        USERS,
    ))
    .expect("agent starts");
    let connected = agent
        .connect(&cloud.enrollment_token())
        .expect("connect the agent");
    assert_eq!(connected["connection"]["connected"], true, "{connected}");
    agent
}

/// Enables license sync and waits for the first scheduled sync (right after enabling) to be committed.
fn enable_and_sync(agent: &SidecarAgent) {
    let (status, body) = agent.set_enabled(true).expect("enable");
    assert_eq!(status, 200, "{body}");
    agent
        .wait_status(WAIT, |status| {
            status["current_job"].is_null() && status["last_sync"]["result"] == "committed"
        })
        .expect("the first scheduled sync commits");
}

/// A second aggregator process on the first one's SQLite database; returns it and its HTTP base URL.
fn replica_of(aggregator: &Aggregator) -> (Process, String) {
    let mut command = Command::new(binary("license-sync-aggregator"));
    command
        .arg("serve")
        .env(
            "LICENSE_SYNC_AGGREGATOR_DATABASE_URL",
            Aggregator::database_url(aggregator.dir.path()),
        )
        .env("LICENSE_SYNC_AGGREGATOR_GRPC_LISTEN", "127.0.0.1:0")
        .env("LICENSE_SYNC_AGGREGATOR_HTTP_LISTEN", "127.0.0.1:0")
        .env("RUST_LOG", "info");
    let (process, ready) = Process::spawn(command, aggregator.dir.path().join("replica.log"))
        .expect("the replica starts");
    let http = format!(
        "http://{}",
        ready["http"].as_str().expect("the replica's HTTP address")
    );
    (process, http)
}

#[test]
fn metrics_agree_with_the_rest_answers_after_a_sync() {
    let started = OffsetDateTime::now_utc().unix_timestamp() as f64;
    let cloud = Cloud::start();
    let agent = connected_agent(&cloud);
    enable_and_sync(&agent);
    let http = &cloud.http;
    let aggregator_url = cloud.aggregator.http_url.clone();

    // An upload that is not a usage file: refused by validation.
    let (status, body) = cloud.rest("POST", "/enterprises/acme/server-usage", Some("{}"));
    assert_eq!(status, 422, "{body}");

    let consumed = cloud.consumed();
    assert_eq!(consumed, CONSUMED, "the REST answer itself");
    let metrics = scrape(http, &aggregator_url);
    let acme = [("enterprise", "acme")];
    assert_eq!(
        value(&metrics, "license_sync_seats_consumed", &acme),
        consumed
    );
    assert_eq!(
        value(&metrics, "license_sync_seats_purchased", &acme),
        PURCHASED as f64
    );
    assert_eq!(
        value(&metrics, "license_sync_seats_overage", &acme),
        CONSUMED - PURCHASED as f64
    );
    for (state, expected) in [
        ("active", 2.0),
        ("dormant", 1.0),
        ("suspended", 1.0),
        ("built_in", 1.0),
    ] {
        assert_eq!(
            value(
                &metrics,
                "license_sync_instance_users",
                &[
                    ("enterprise", "acme"),
                    ("hostname", HOSTNAME),
                    ("state", state)
                ]
            ),
            expected,
            "{state} accounts"
        );
    }
    let last_sync = value(
        &metrics,
        "license_sync_instance_last_sync_timestamp_seconds",
        &[("enterprise", "acme"), ("hostname", HOSTNAME)],
    );
    let now = OffsetDateTime::now_utc().unix_timestamp() as f64;
    assert!(
        (started - 2.0..=now + 2.0).contains(&last_sync),
        "last sync {last_sync} not within this test ({started}..{now})"
    );
    assert_eq!(value(&metrics, "license_sync_instances_stale", &acme), 0.0);
    assert_eq!(
        value(
            &metrics,
            "license_sync_syncs_total",
            &[("via", "stream"), ("result", "applied")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "license_sync_sync_duration_seconds_count",
            &[("via", "stream")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "license_sync_rows_rejected_total",
            &[("reason", "malformed_file")]
        ),
        1.0
    );
    assert!(value(&metrics, "license_sync_merge_duration_seconds_count", &[]) >= 1.0);
    // The route label is the template, never the path with the enterprise in it.
    assert!(
        value(
            &metrics,
            "license_sync_http_requests_total",
            &[
                ("route", "/enterprises/{enterprise}/consumed-licenses"),
                ("method", "GET"),
                ("status", "200")
            ]
        ) >= 1.0
    );
    assert_eq!(
        value(
            &metrics,
            "license_sync_http_requests_total",
            &[
                ("route", "/enterprises/{enterprise}/server-usage"),
                ("method", "POST"),
                ("status", "422")
            ]
        ),
        1.0
    );
    assert!(
        value(
            &metrics,
            "license_sync_http_request_duration_seconds_count",
            &[
                ("route", "/enterprises/{enterprise}/consumed-licenses"),
                ("method", "GET")
            ]
        ) >= 1.0
    );
    let upload = [
        ("method", "/licensesync.v1.SnapshotIngest/UploadSnapshot"),
        ("code", "OK"),
    ];
    assert_eq!(
        value(&metrics, "license_sync_grpc_requests_total", &upload),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "license_sync_grpc_request_duration_seconds_count",
            &[("method", "/licensesync.v1.SnapshotIngest/UploadSnapshot")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "license_sync_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_bounded_labels(&metrics, "aggregator");

    // An unmatched path is counted without its raw path.
    let response = http
        .get(format!("{aggregator_url}/no/such/mona@example.com"))
        .send()
        .expect("GET");
    assert_eq!(response.status().as_u16(), 404);
    let metrics = scrape(http, &aggregator_url);
    assert_eq!(
        value(
            &metrics,
            "license_sync_http_requests_total",
            &[("route", "unmatched"), ("status", "404")]
        ),
        1.0
    );
    assert_bounded_labels(&metrics, "aggregator");

    // A replica that committed nothing reports the database as it is, and only its own events.
    let (_replica, replica_url) = replica_of(&cloud.aggregator);
    let replica = scrape(http, &replica_url);
    assert_eq!(
        value(&replica, "license_sync_seats_consumed", &acme),
        consumed
    );
    assert_eq!(
        value(
            &replica,
            "license_sync_instance_users",
            &[
                ("enterprise", "acme"),
                ("hostname", HOSTNAME),
                ("state", "active")
            ]
        ),
        2.0
    );
    assert_eq!(
        value(
            &replica,
            "license_sync_instance_last_sync_timestamp_seconds",
            &[("enterprise", "acme"), ("hostname", HOSTNAME)],
        ),
        last_sync
    );
    assert_eq!(
        value(
            &replica,
            "license_sync_syncs_total",
            &[("via", "stream"), ("result", "applied")]
        ),
        0.0
    );

    // The agent.
    let agent_metrics = scrape(http, &agent.api);
    assert_deploy_metrics_are_served(http, &[&aggregator_url, &agent.api]);
    let schedule_success = [("trigger", "schedule"), ("result", "success")];
    assert_eq!(
        value(
            &agent_metrics,
            "license_sync_agent_sync_attempts_total",
            &schedule_success
        ),
        1.0
    );
    let last_success = value(
        &agent_metrics,
        "license_sync_agent_last_success_timestamp_seconds",
        &[],
    );
    assert!(
        (started - 2.0..=now + 2.0).contains(&last_success),
        "agent's last success {last_success} not within this test"
    );
    assert!(
        value(
            &agent_metrics,
            "license_sync_agent_next_sync_timestamp_seconds",
            &[]
        ) > now,
        "the next scheduled sync is in the future"
    );
    assert_eq!(
        value(&agent_metrics, "license_sync_agent_pending_snapshots", &[]),
        0.0
    );
    assert_eq!(
        value(&agent_metrics, "license_sync_agent_sync_enabled", &[]),
        1.0
    );
    assert_eq!(
        value(
            &agent_metrics,
            "license_sync_agent_source_fetch_duration_seconds_count",
            &[]
        ),
        1.0
    );
    assert_eq!(
        value(
            &agent_metrics,
            "license_sync_agent_rows_skipped_total",
            &[("reason", "invalid_boolean")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &agent_metrics,
            "license_sync_agent_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
    assert_bounded_labels(&agent_metrics, "agent");
    eventually(WAIT, || {
        let metrics = scrape(http, &agent.api);
        (value(&metrics, "license_sync_agent_connected", &[]) == 1.0).then_some(())
    })
    .expect("the agent reports its control stream connected");

    // Sync now: one more attempt, by its own trigger, and one more applied snapshot.
    let (status, body) = agent.sync_now().expect("sync now");
    assert_eq!(status, 202, "{body}");
    let job = body["job_id"].as_str().expect("job id").to_owned();
    agent
        .wait_job(&job, WAIT, |job| job["state"] == "committed")
        .expect("the Sync now job commits");
    let agent_metrics = scrape(http, &agent.api);
    assert_eq!(
        value(
            &agent_metrics,
            "license_sync_agent_sync_attempts_total",
            &[("trigger", "sync_now"), ("result", "success")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &agent_metrics,
            "license_sync_agent_sync_attempts_total",
            &schedule_success
        ),
        1.0
    );
    assert_eq!(
        value(
            &agent_metrics,
            "license_sync_agent_rows_skipped_total",
            &[("reason", "invalid_boolean")]
        ),
        2.0
    );
    let metrics = scrape(http, &aggregator_url);
    assert_eq!(
        value(
            &metrics,
            "license_sync_syncs_total",
            &[("via", "stream"), ("result", "applied")]
        ),
        2.0
    );
    assert_eq!(
        value(&metrics, "license_sync_seats_consumed", &acme),
        consumed
    );
}

/// The `prometheus` binary: `LICENSE_SYNC_TEST_PROMETHEUS`, else the first on `PATH`.
fn prometheus_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("LICENSE_SYNC_TEST_PROMETHEUS") {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("prometheus"))
        .find(|candidate| candidate.is_file())
}

/// A free TCP port on 127.0.0.1 (bound, then released for Prometheus to take).
fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A Prometheus server scraping the given targets every second, with its storage in a temporary directory; killed
/// when dropped.
struct Prometheus {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
    http: reqwest::blocking::Client,
}

impl Prometheus {
    /// `targets`: (job name, `host:port`).
    fn start(binary: &PathBuf, targets: &[(&str, &str)]) -> Result<Prometheus> {
        let dir = tempfile::tempdir()?;
        let mut config = String::from(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n",
        );
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            ));
        }
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config)?;
        let port = free_port()?;
        let log = std::fs::File::create(dir.path().join("prometheus.log"))?;
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let mut prometheus = Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = prometheus.child.try_wait()? {
                bail!("prometheus exited ({status}):\n{}", prometheus.log());
            }
            let ready = prometheus
                .http
                .get(format!("{}/-/ready", prometheus.url))
                .send()
                .is_ok_and(|response| response.status().is_success());
            if ready {
                return Ok(prometheus);
            }
            if Instant::now() > deadline {
                bail!("prometheus not ready within 60 s:\n{}", prometheus.log());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query; the `data.result` vector.
    fn query(&self, query: &str) -> Result<Vec<Value>> {
        let body: Value = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", query)])
            .send()?
            .json()?;
        if body["status"] != "success" {
            bail!("query {query:?} failed: {body}");
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The value of each series of an instant query, keyed by the label `key`.
    fn values_by(&self, query: &str, key: &str) -> Vec<(String, f64)> {
        self.query(query)
            .unwrap_or_default()
            .iter()
            .filter_map(|series| {
                let label = series["metric"][key]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let value = series["value"][1].as_str()?.parse().ok()?;
                Some((label, value))
            })
            .collect()
    }

    /// Polls `query` until its series, keyed by `key`, are exactly `expected`; fails with the last answer after 60 s.
    fn wait_for(&self, query: &str, key: &str, expected: &[(&str, f64)]) {
        let mut expected: Vec<(String, f64)> = expected
            .iter()
            .map(|(label, value)| ((*label).to_owned(), *value))
            .collect();
        expected.sort_by(|a, b| a.0.cmp(&b.0));
        let mut last = Vec::new();
        let found = eventually(Duration::from_secs(60), || {
            last = self.values_by(query, key);
            last.sort_by(|a, b| a.0.cmp(&b.0));
            (last == expected).then_some(())
        });
        if found.is_none() {
            panic!(
                "Prometheus never answered {query:?} with {expected:?}; last answer {last:?}\nits log:\n{}",
                self.log()
            );
        }
        eprintln!("prometheus answered {query:?}: {last:?}");
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_both_services() {
    let Some(prometheus_path) = prometheus_binary() else {
        if std::env::var_os("LICENSE_SYNC_REQUIRE_ALL_TESTS").is_some() {
            panic!(
                "LICENSE_SYNC_REQUIRE_ALL_TESTS is set but there is no `prometheus` binary on PATH \
                 (apt-get install prometheus, or set LICENSE_SYNC_TEST_PROMETHEUS)"
            );
        }
        eprintln!(
            "SKIPPED prometheus_scrapes_both_services: no `prometheus` binary on PATH \
             (apt-get install prometheus, or set LICENSE_SYNC_TEST_PROMETHEUS)"
        );
        return;
    };
    let cloud = Cloud::start();
    let agent = connected_agent(&cloud);
    let aggregator_target = cloud.aggregator.http_url.trim_start_matches("http://");
    let agent_target = agent.api.trim_start_matches("http://");
    let prometheus = Prometheus::start(
        &prometheus_path,
        &[("aggregator", aggregator_target), ("agent", agent_target)],
    )
    .expect("prometheus starts");
    prometheus.wait_for("up", "job", &[("aggregator", 1.0), ("agent", 1.0)]);
    // Before the first sync: nothing consumed yet.
    prometheus.wait_for(
        "license_sync_seats_consumed",
        "enterprise",
        &[("acme", 0.0)],
    );

    enable_and_sync(&agent);
    let consumed = cloud.consumed();
    assert_eq!(consumed, CONSUMED);
    prometheus.wait_for(
        "license_sync_seats_consumed",
        "enterprise",
        &[("acme", consumed)],
    );
    prometheus.wait_for(
        "license_sync_agent_sync_attempts_total{trigger=\"schedule\",result=\"success\"}",
        "trigger",
        &[("schedule", 1.0)],
    );
    prometheus.wait_for(
        "license_sync_instance_users{state=\"active\"}",
        "hostname",
        &[(HOSTNAME, 2.0)],
    );
    prometheus.wait_for(
        "license_sync_build_info",
        "version",
        &[(env!("CARGO_PKG_VERSION"), 1.0)],
    );
    prometheus.wait_for("up", "job", &[("aggregator", 1.0), ("agent", 1.0)]);
}

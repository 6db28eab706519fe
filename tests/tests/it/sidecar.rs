//! The agent as a long-running sidecar (`license-sync-agent run`), end to end with real processes: the aggregator,
//! agents with their own state directories and local APIs, and the GHES simulator. Covers enrollment and
//! enabling, the schedule, Sync now (local and from the cloud), and the delivery guarantees under faults: the
//! aggregator down, the agent killed with a pending snapshot, a revoked credential.
//!
//! Every wait polls with a deadline; the only fixed sleeps are the windows in which something must NOT happen.

use std::collections::HashSet;
use std::time::Duration;

use license_sync_e2e::{
    AgentSource, Aggregator, GhesSim, SidecarAgent, SidecarOptions, TcpProxy, eventually,
};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const USERS: &str = "\
id,login,email,suspended?
1,mona,mona@example.com,false
2,hubot,hubot@example.com,false
3,gone,gone@example.com,true
";

const WAIT: Duration = Duration::from_secs(20);

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
            .admin(&["enterprise", "create", "--slug", "acme", "--seats", "10"])
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

    fn rest(&self, method: &str, path: &str) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let response = self
            .http
            .request(method, format!("{}{path}", self.aggregator.http_url))
            .bearer_auth(&self.token)
            .send()
            .expect("REST call");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// A new one-time enrollment token, from the REST API.
    fn enrollment_token(&self) -> String {
        let (status, body) = self.rest("POST", "/enterprises/acme/enrollment-tokens");
        assert_eq!(status, 201, "{body}");
        let token = body["token"].as_str().expect("token").to_owned();
        assert!(token.starts_with("lse_"), "{token}");
        token
    }

    fn instance(&self, server_id: &str) -> Option<Value> {
        let (status, body) = self.rest("GET", "/enterprises/acme/license-sync-status");
        assert_eq!(status, 200, "{body}");
        body["server_instances"]
            .as_array()?
            .iter()
            .find(|instance| instance["server_id"] == server_id)
            .cloned()
    }

    fn wait_instance(&self, server_id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        eventually(WAIT, || {
            last = self.instance(server_id)?;
            done(&last).then(|| last.clone())
        })
        .unwrap_or_else(|| {
            panic!("the aggregator's status of {server_id} did not get there: {last:#}")
        })
    }

    fn options(&self, hostname: &str) -> SidecarOptions {
        SidecarOptions::new(&self.aggregator.grpc_url, hostname, USERS)
    }
}

fn time(value: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(value.as_str().unwrap_or_default(), &Rfc3339)
        .unwrap_or_else(|_| panic!("not an RFC 3339 time: {value}"))
}

/// Connects the agent with a fresh enrollment token, enables license sync and waits until the first scheduled sync
/// (right after enabling) is committed, so that a test starts from a quiet, synced agent.
fn connect_enable_and_settle(cloud: &Cloud, agent: &SidecarAgent) {
    let connected = agent
        .connect(&cloud.enrollment_token())
        .expect("connect the agent");
    assert_eq!(connected["connection"]["connected"], true, "{connected}");
    let (status, body) = agent.set_enabled(true).expect("enable");
    assert_eq!(status, 200, "{body}");
    agent
        .wait_status(WAIT, |status| {
            status["current_job"].is_null() && status["last_sync"]["result"] == "committed"
        })
        .expect("the first scheduled sync commits");
}

fn job_id(body: &Value) -> String {
    body["job_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no job id in {body}"))
        .to_owned()
}

fn assert_no_secrets_in(log: &str, agent: &SidecarAgent) {
    assert!(!log.contains(agent.owner_token()), "the owner token leaked");
    // Messages may name the prefixes (`lse_…`), never a whole token or credential.
    for prefix in ["lsi_", "lse_"] {
        for (index, _) in log.match_indices(prefix) {
            let next = log[index + prefix.len()..].chars().next();
            assert!(
                !next.is_some_and(|c| c.is_ascii_alphanumeric()),
                "a {prefix} secret leaked: {}",
                &log[index.saturating_sub(80)..(index + 20).min(log.len())]
            );
        }
    }
    assert!(!log.contains("@example.com"), "an email leaked");
}

#[test]
fn enabling_needs_a_connection_and_the_owner_credential() {
    let cloud = Cloud::start();
    let mut agent = SidecarAgent::start(cloud.options("ghes-enable.test")).expect("agent starts");

    let status = agent.status().expect("status");
    assert_eq!(status["license_sync_enabled"], false, "disabled by default");

    // Not connected: refused, and the message says to connect first (the seed page's order of steps).
    let (code, body) = agent.set_enabled(true).expect("enable");
    assert_eq!(code, 409, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("connect first"), "{message}");
    let connection = agent.get("/api/v1/connection").expect("connection");
    assert_eq!(connection["connected"], false);
    assert_eq!(connection["error"]["kind"], "not_enrolled", "{connection}");

    // Owner-only: no token or a wrong one is a 401.
    let (code, _) = agent
        .request(
            "PUT",
            "/api/v1/settings",
            false,
            Some(&json!({"license_sync_enabled": true})),
        )
        .expect("request");
    assert_eq!(code, 401);
    let wrong = reqwest::blocking::Client::new()
        .put(format!("{}/api/v1/settings", agent.api))
        .bearer_auth("owner-not-the-right-one-at-all")
        .json(&json!({"license_sync_enabled": true}))
        .send()
        .expect("request");
    assert_eq!(wrong.status(), 401);
    let (code, _) = agent
        .request("POST", "/api/v1/sync-now", false, None)
        .expect("request");
    assert_eq!(code, 401);

    // Connect with the CLI (the enrollment token in a file), while the agent runs: it picks the credential up.
    let token_file = agent.dir.path().join("enrollment-token");
    std::fs::write(&token_file, cloud.enrollment_token()).expect("token file");
    let output = std::process::Command::new(license_sync_e2e::binary("license-sync-agent"))
        .args(["enroll", "--config"])
        .arg(&agent.config)
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .expect("enroll");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let enrolled: Value = serde_json::from_slice(&output.stdout).expect("JSON line");
    assert_eq!(enrolled["enterprise"], "acme");
    assert_eq!(enrolled["server_id"], agent.server_id.as_str());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(agent.state_dir().join("credential.json"))
            .expect("credential file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the credential file is private");
    }
    agent
        .wait_status(WAIT, |status| status["connected"] == true)
        .expect("the control stream connects with the enrolled credential");

    // Enable with the owner credential, through the CLI.
    let output = agent.cli(&["enable"]).expect("enable");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let settings: Value = serde_json::from_slice(&output.stdout).expect("JSON line");
    assert_eq!(settings["license_sync_enabled"], true);

    // The first scheduled sync runs right after enabling; the aggregator sees the agent and its setting.
    let instance = cloud.wait_instance(&agent.server_id, |instance| {
        instance["last_sync"]["status"] == "success"
            && instance["agent_connected"] == true
            && instance["agent_sync_enabled"] == true
    });
    assert_eq!(instance["user_count"], 3, "{instance}");
    assert_eq!(instance["arrival"], "connect");
    let output = agent.cli(&["status"]).expect("status");
    let status: Value = serde_json::from_slice(&output.stdout).expect("JSON line");
    assert_eq!(status["license_sync_enabled"], true);
    assert_eq!(status["connected"], true);
    assert!(status["next_sync"]["at"].is_string(), "{status}");

    // Disabling reaches the aggregator through the heartbeats.
    let output = agent.cli(&["disable"]).expect("disable");
    assert!(output.status.success());
    cloud.wait_instance(&agent.server_id, |instance| {
        instance["agent_sync_enabled"] == false
    });

    // SIGTERM: a graceful stop with exit code 0.
    let mut process = agent.process.take().expect("running");
    let exit = process
        .terminate(Duration::from_secs(15))
        .expect("terminate");
    assert!(
        exit.is_some_and(|status| status.success()),
        "{exit:?}\n{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("stopped"), "{log}");
    assert_no_secrets_in(&log, &agent);
    // And the settings survived the stop.
    agent.restart().expect("restart");
    assert_eq!(
        agent.get("/api/v1/settings").expect("settings")["license_sync_enabled"],
        false
    );
}

#[test]
fn a_disabled_agent_never_sends() {
    let cloud = Cloud::start();
    let mut options = cloud.options("ghes-disabled.test");
    options.sync_interval_secs = 1;
    let agent = SidecarAgent::start(options).expect("agent starts");
    let connected = agent.connect(&cloud.enrollment_token()).expect("connect");
    assert_eq!(connected["connection"]["connected"], true);

    let (code, body) = agent.sync_now().expect("sync now");
    assert_eq!(code, 409, "{body}");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("disabled")),
        "{body}"
    );
    let output = agent.cli(&["sync-now"]).expect("CLI sync-now");
    assert_eq!(output.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&output.stderr).contains("disabled"));

    // Several schedule periods pass: nothing is scheduled, nothing is sent. This window stays a fixed sleep: a
    // disabled scheduler has no timer whose passing could be observed (it only waits for a settings change), and
    // the shortest interval is one second, so only real time shows that no period fires.
    std::thread::sleep(Duration::from_millis(2_500));
    let status = agent.status().expect("status");
    assert!(status["next_sync"].is_null(), "{status}");
    assert!(status["current_job"].is_null());
    assert_eq!(status["pending_deliveries"], 0);
    assert_eq!(status["counters"]["delivery_attempts"]["committed"], 0);
    let jobs = agent.get("/api/v1/jobs").expect("jobs");
    assert_eq!(jobs["jobs"], json!([]));
    let instance = cloud.instance(&agent.server_id).expect("enrolled instance");
    assert_eq!(instance["last_sync"]["status"], "pending", "{instance}");
    assert!(instance["last_success_date"].is_null(), "{instance}");
}

#[test]
fn scheduled_syncs_run_on_time_with_jitter_inside_its_bound() {
    let cloud = Cloud::start();
    let mut options = cloud.options("ghes-schedule.test");
    options.sync_interval_secs = 2;
    options.sync_jitter_secs = 1;
    let agent = SidecarAgent::start(options).expect("agent starts");
    agent.connect(&cloud.enrollment_token()).expect("connect");
    let (code, settings) = agent.set_enabled(true).expect("enable");
    assert_eq!(code, 200, "{settings}");
    let anchor = time(&settings["enabled_at"]);

    let scheduled = |jobs: &Value| -> Vec<Value> {
        jobs["jobs"]
            .as_array()
            .map(|jobs| {
                jobs.iter()
                    .filter(|job| job["trigger"] == "schedule")
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    };
    let jobs = eventually(Duration::from_secs(15), || {
        let jobs = agent.get("/api/v1/jobs").ok()?;
        let done = scheduled(&jobs)
            .iter()
            .filter(|job| job["state"] == "committed")
            .count();
        (done >= 3).then_some(jobs)
    })
    .expect("three scheduled syncs within 15 s");

    let mut jobs = scheduled(&jobs);
    jobs.reverse(); // oldest first
    let interval = time::Duration::seconds(2);
    let jitter = time::Duration::seconds(1);
    // The scheduler wakes at the due time; allow for process scheduling on a busy machine.
    let slack = time::Duration::milliseconds(600);
    for (index, job) in jobs.iter().enumerate() {
        let slot = job["slot"].as_u64().expect("slot");
        assert_eq!(slot, index as u64, "consecutive slots: {jobs:#?}");
        let start = anchor + interval * slot as i32;
        let started = time(&job["created_at"]);
        assert!(
            started >= start && started <= start + jitter + slack,
            "slot {slot} started at {started}, outside [{start}, {start} + 1 s]"
        );
    }
    // The status announces the next slot inside its window too.
    let status = agent.status().expect("status");
    let next = &status["next_sync"];
    let slot = next["slot"].as_u64().expect("next slot");
    let at = time(&next["at"]);
    let start = anchor + interval * slot as i32;
    assert!(at >= start && at <= start + jitter, "{status:#}");
    cloud.wait_instance(&agent.server_id, |instance| {
        instance["last_sync"]["status"] == "success"
    });
}

#[test]
fn sync_now_returns_a_job_whose_states_progress_and_concurrent_requests_coalesce() {
    let cloud = Cloud::start();
    let csv = cloud.aggregator.dir.path().join("sim.csv");
    std::fs::write(&csv, USERS).expect("csv");
    // The simulator answers 202 three times before serving the report: reading takes a while.
    let sim = GhesSim::start(&csv, "sim-token", 3, cloud.aggregator.dir.path()).expect("simulator");
    let mut options = cloud.options("ghes-now.test");
    options.source = AgentSource::Ghes {
        url: sim.url.clone(),
        token: "sim-token".into(),
    };
    let agent = SidecarAgent::start(options).expect("agent starts");
    connect_enable_and_settle(&cloud, &agent);
    // Make the next read slow again.
    reqwest::blocking::Client::new()
        .post(format!("{}/_sim/invalidate", sim.url))
        .send()
        .expect("invalidate");

    let answers: Vec<(u16, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..6)
            .map(|_| scope.spawn(|| agent.sync_now().expect("sync now")))
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("thread"))
            .collect()
    });
    let ids: HashSet<String> = answers
        .iter()
        .map(|(code, body)| {
            assert_eq!(*code, 202, "{body}");
            job_id(body)
        })
        .collect();
    assert_eq!(ids.len(), 1, "concurrent requests coalesce: {answers:#?}");
    assert_eq!(
        answers
            .iter()
            .filter(|(_, body)| body["joined"] == false)
            .count(),
        1
    );
    let id = job_id(&answers[0].1);

    // Follow the job: reading, then committed (sending is too quick to be seen reliably).
    let mut seen = Vec::new();
    let job = eventually(WAIT, || {
        let job = agent.get(&format!("/api/v1/jobs/{id}")).ok()?;
        let state = job["state"].as_str().unwrap_or_default().to_owned();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        (state == "committed" || state == "failed").then_some(job)
    })
    .expect("the job finishes");
    assert_eq!(job["state"], "committed", "{job:#}");
    assert!(seen.contains(&"reading".to_owned()), "{seen:?}");
    let order = ["queued", "reading", "sending", "committed"];
    let positions: Vec<usize> = seen
        .iter()
        .map(|state| order.iter().position(|s| s == state).expect("known state"))
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert_eq!(job["joined"], 5);
    assert_eq!(job["trigger"], "local");
    assert_eq!(job["users"], 3);
    assert_eq!(job["receipt"]["duplicate"], false);
    assert!(job["sync_id"].is_string());

    // The CLI starts the next job and reads it back.
    let output = agent.cli(&["sync-now"]).expect("CLI sync-now");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).expect("JSON line");
    let second = job_id(&answer);
    assert_ne!(second, id);
    agent
        .wait_job(&second, WAIT, |job| job["state"] == "committed")
        .expect("the second job commits");
    let output = agent.cli(&["jobs", "--id", &second]).expect("CLI jobs");
    let listed: Value = serde_json::from_slice(&output.stdout).expect("JSON line");
    assert_eq!(listed["id"], second.as_str());
    let instance = cloud.wait_instance(&agent.server_id, |instance| {
        instance["last_sync"]["status"] == "success"
    });
    assert_eq!(instance["user_count"], 3);
}

#[test]
fn a_cloud_sync_now_reaches_the_targeted_agent_only() {
    let cloud = Cloud::start();
    let a = SidecarAgent::start(cloud.options("ghes-a.test")).expect("agent a");
    let b = SidecarAgent::start(cloud.options("ghes-b.test")).expect("agent b");
    connect_enable_and_settle(&cloud, &a);
    connect_enable_and_settle(&cloud, &b);
    for agent in [&a, &b] {
        cloud.wait_instance(&agent.server_id, |instance| {
            instance["agent_connected"] == true
        });
    }

    let (code, request) = cloud.rest(
        "POST",
        &format!("/enterprises/acme/instances/{}/sync-now", a.server_id),
    );
    assert_eq!(code, 202, "{request}");
    let request_id = request["request_id"]
        .as_str()
        .expect("request id")
        .to_owned();
    let path = format!(
        "/enterprises/acme/instances/{}/sync-requests/{request_id}",
        a.server_id
    );
    let acked = eventually(WAIT, || {
        let (code, body) = cloud.rest("GET", &path);
        (code == 200 && body["job_id"].is_string()).then_some(body)
    })
    .expect("the agent acknowledges the request with its job id");
    let id = job_id(&acked);
    let job = a
        .wait_job(&id, WAIT, |job| job["state"] == "committed")
        .expect("the requested job commits");
    assert_eq!(job["trigger"], "cloud");
    assert_eq!(job["cloud_request_ids"], json!([request_id]));

    // The other agent ran nothing but its first scheduled sync.
    let jobs = b.get("/api/v1/jobs").expect("jobs of b");
    let triggers: Vec<&str> = jobs["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .map(|job| job["trigger"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(triggers, ["schedule"], "{jobs:#}");
    assert_eq!(
        b.status().expect("status of b")["counters"]["jobs_started"]["cloud"],
        0
    );
}

#[test]
fn with_the_aggregator_down_the_snapshot_stays_pending_and_is_delivered_once_it_is_back() {
    let mut cloud = Cloud::start();
    let agent = SidecarAgent::start(cloud.options("ghes-down.test")).expect("agent starts");
    connect_enable_and_settle(&cloud, &agent);

    cloud.aggregator.stop();
    let (code, body) = agent.sync_now().expect("sync now");
    assert_eq!(code, 202, "{body}");
    let id = job_id(&body);
    let job = agent
        .wait_job(&id, WAIT, |job| job["attempts"].as_u64() >= Some(2))
        .expect("the job keeps retrying");
    assert_eq!(job["state"], "sending", "{job:#}");
    assert_eq!(
        job["last_error"]["kind"], "aggregator_unavailable",
        "{job:#}"
    );
    assert_eq!(agent.snapshot_files("pending").len(), 1);
    let status = agent.status().expect("status");
    assert_eq!(status["pending_deliveries"], 1);
    assert_eq!(status["connected"], false);

    cloud
        .aggregator
        .restart_on_same_ports()
        .expect("the aggregator comes back on its ports");
    let job = agent
        .wait_job(&id, WAIT, |job| job["state"] == "committed")
        .expect("delivered once the aggregator is back");
    assert_eq!(job["receipt"]["duplicate"], false);
    assert!(agent.snapshot_files("pending").is_empty());
    let instance = cloud.wait_instance(&agent.server_id, |instance| {
        instance["last_sync"]["status"] == "success"
            && instance["generated_at"].is_string()
            && time(&instance["generated_at"]) == time(&job["generated_at"])
    });
    assert_eq!(instance["user_count"], 3);
    let status = agent.status().expect("status");
    assert_eq!(
        status["counters"]["delivery_attempts"]["committed"], 2,
        "{status:#}"
    );
    assert_eq!(status["counters"]["delivery_attempts"]["duplicate"], 0);
    // The control stream reconnects too.
    agent
        .wait_status(WAIT, |status| status["connected"] == true)
        .expect("the control stream is back");
}

#[test]
fn an_agent_killed_with_a_pending_snapshot_delivers_it_exactly_once_after_restart() {
    let mut cloud = Cloud::start();
    let mut agent = SidecarAgent::start(cloud.options("ghes-kill.test")).expect("agent starts");
    connect_enable_and_settle(&cloud, &agent);

    cloud.aggregator.stop();
    let (_, body) = agent.sync_now().expect("sync now");
    let id = job_id(&body);
    let job = agent
        .wait_job(&id, WAIT, |job| {
            job["state"] == "sending" && job["attempts"].as_u64() >= Some(1)
        })
        .expect("the snapshot is pending");
    let sync_id = job["sync_id"].as_str().expect("sync id").to_owned();
    let generated_at = time(&job["generated_at"]);
    let pending = agent.snapshot_files("pending");
    assert_eq!(pending.len(), 1);
    assert!(pending[0].to_string_lossy().contains(&sync_id));
    let saved = std::fs::read(&pending[0]).expect("read the pending snapshot");

    agent.kill(); // SIGKILL: no cleanup at all
    cloud
        .aggregator
        .restart_on_same_ports()
        .expect("the aggregator comes back");
    agent
        .restart()
        .expect("the agent restarts on its state directory");
    let status = agent
        .wait_status(WAIT, |status| {
            status["pending_deliveries"] == 0 && status["last_sync"]["sync_id"] == sync_id.as_str()
        })
        .expect("the pending snapshot is delivered after the restart");
    assert_eq!(status["last_sync"]["result"], "committed");
    assert_eq!(status["last_sync"]["duplicate"], false, "{status:#}");
    let instance = cloud.wait_instance(&agent.server_id, |instance| {
        instance["last_sync"]["status"] == "success"
            && instance["generated_at"].is_string()
            && time(&instance["generated_at"]) == generated_at
    });
    assert_eq!(instance["user_count"], 3);

    // As if the agent had died after the aggregator's commit but before removing the file: the same snapshot is
    // sent again, acknowledged as a duplicate, and nothing changes on the aggregator.
    std::fs::write(&pending[0], saved).expect("put the snapshot back");
    agent.kill();
    agent.restart().expect("the agent restarts again");
    let status = agent
        .wait_status(WAIT, |status| {
            status["pending_deliveries"] == 0
                && status["counters"]["delivery_attempts"]["duplicate"] == 1
        })
        .expect("the re-sent snapshot is acknowledged");
    assert_eq!(status["last_sync"]["duplicate"], true, "{status:#}");
    assert_eq!(status["last_sync"]["sync_id"], sync_id.as_str());
    let after = cloud.instance(&agent.server_id).expect("instance");
    assert_eq!(after["last_sync"], instance["last_sync"], "applied once");
    assert_eq!(after["user_count"], 3);
    assert_eq!(after["generated_at"], instance["generated_at"]);
}

#[test]
fn a_revoked_credential_is_reported_and_causes_no_retry_storm() {
    let cloud = Cloud::start();
    let proxy =
        TcpProxy::start(cloud.aggregator.grpc_addr().expect("grpc address")).expect("proxy");
    let mut options = cloud.options("ghes-revoked.test");
    options.endpoint = format!("http://{}", proxy.addr);
    options.retry_initial_ms = 50;
    options.retry_max_ms = 200;
    let agent = SidecarAgent::start(options).expect("agent starts");
    connect_enable_and_settle(&cloud, &agent);
    agent
        .wait_status(WAIT, |status| status["connected"] == true)
        .expect("connected");

    // Revoke: retiring the instance makes its credential stop working.
    let (code, body) = cloud.rest(
        "DELETE",
        &format!("/enterprises/acme/instances/{}", agent.server_id),
    );
    assert_eq!(code, 204, "{body}");
    let (code, body) = agent.sync_now().expect("sync now");
    assert_eq!(code, 202, "{body}");
    let id = job_id(&body);
    let job = agent
        .wait_job(&id, WAIT, |job| job["state"] == "failed")
        .expect("the job fails");
    assert_eq!(job["error"]["kind"], "aggregator_credentials", "{job:#}");
    let message = job["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("re-enroll"), "{message}");
    let status = agent
        .wait_status(WAIT, |status| {
            status["connection"]["state"] == "credential_refused"
        })
        .expect("the status says the credential was refused");
    assert_eq!(status["connected"], false);
    assert_eq!(status["pending_deliveries"], 0);
    assert_eq!(status["failed_deliveries"], 1, "{status:#}");
    assert_eq!(
        status["recent_failures"][0]["error"]["kind"],
        "aggregator_credentials"
    );
    assert_eq!(agent.snapshot_files("failed").len(), 1);
    assert!(agent.snapshot_files("pending").is_empty());

    // No retry storm: with retries configured at 50–200 ms, the aggregator sees at most a couple of attempts after
    // the refusal (a control-stream reconnect that learns of it, at most). Instead of a long window, wait for the
    // sign that the control stream has learnt of the refusal and parked until a new enrollment (its next attempt is
    // `AUTH_RETRY`, 15 minutes, away), then watch one more second: a loop retrying every 50–200 ms would connect 5+
    // times in it. Connections made while waiting count too.
    let before = proxy.connections();
    agent
        .wait_status(WAIT, |status| {
            status["connection"]["next_attempt_at"]
                .as_str()
                .and_then(|at| OffsetDateTime::parse(at, &Rfc3339).ok())
                .is_some_and(|at| at > OffsetDateTime::now_utc() + time::Duration::minutes(10))
        })
        .expect("the control stream waits for a new enrollment");
    std::thread::sleep(Duration::from_secs(1));
    let during = proxy.connections() - before;
    assert!(during <= 2, "{during} connections after the refusal");
    let log = agent.log();
    assert_eq!(
        log.matches("the snapshot cannot be delivered").count(),
        1,
        "reported once:\n{log}"
    );
    assert_no_secrets_in(&log, &agent);
}

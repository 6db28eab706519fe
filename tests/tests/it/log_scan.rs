//! No email address and no token or credential in any log: the whole product runs one scenario with debug logs for
//! our crates (text and JSON, traces exported too), every process's stdout and stderr is kept, and all of it is
//! scanned for every address of the scenario and every secret it used.
//!
//! The scenario touches everything that handles an address or a secret: the GHES report read over basic auth
//! (with rows the reader skips), one-shot syncs with good and bad credentials, `check` and `export`, a sidecar
//! enrolled with an enrollment token and a refused one, Sync now (local and from the cloud), cloud members import
//! (valid and malformed), usage upload (applied and refused), every read endpoint, a wrong REST token, and the web
//! console (sign-in by link and by token, every page, a search for an address, Sync now, upload, sign-out). The
//! administration commands' stdout is left out: printing the new token there, once, is their job.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use license_sync_e2e::otlp::OtlpReceiver;
use license_sync_e2e::{
    AgentSource, Aggregator, GhesSim, SidecarAgent, SidecarOptions, agent_with_env, binary,
};
use serde_json::{Value, json};

/// Every address of the scenario is in this domain (any case), so one search finds them all; the invalid
/// "address" without `@` holds it too.
const DOMAIN: &str = "leakscan.example";

const GHES_CSV: &str = "\
created_at,id,login,email,role,suspended?,last_logged_ip,repos,ssh_keys,org_memberships,dormant?,last_active,raw_login,2fa_enabled?
2020-01-01T00:00:00Z,1,mona,Mona@LeakScan.Example,Site admin,false,10.0.0.1,3,1,2,false,2024-01-01T00:00:00Z,mona,true
2020-01-02T00:00:00Z,2,hubot,hubot@leakscan.example,Normal user,no,10.0.0.2,0,0,1,no,2024-01-02T00:00:00Z,hubot,false
2020-01-03T00:00:00Z,3,gone,gone@leakscan.example,Normal user,YES,10.0.0.3,0,0,0,no,,gone,false
2020-01-04T00:00:00Z,x4,broken-id,broken-id@leakscan.example,Normal user,false,,0,0,0,false,,broken-id,false
2020-01-05T00:00:00Z,5,broken-flag,broken-flag@leakscan.example,Normal user,maybe,,0,0,0,false,,broken-flag,false
2020-01-06T00:00:00Z,6,weird,weird.leakscan.example,Normal user,false,,0,0,0,false,,weird,false
2020-01-07T00:00:00Z,6,twin,twin@leakscan.example,Normal user,false,,0,0,0,false,,twin,false
2020-01-08T00:00:00Z,8,shifted,shifted@leakscan.example,Normal user,shifted@leakscan.example,,0,0,0,false,,shifted,false
";

const FILE_CSV: &str = "\
id,login,email,suspended?
10,mona,  mona@leakscan.example ,false
11,carol,carol@leakscan.example,false
12,dave,dave@leakscan.example,0
";

const SIM_TOKEN: &str = "ghes-sim-token-leakscan-0123456789";
const WRONG_REST_TOKEN: &str = "lst_wrong-rest-token-leakscan";
const WRONG_CREDENTIAL: &str = "lsi_wrong-credential-leakscan";
const WRONG_ENROLLMENT: &str = "lse_wrong-enrollment-leakscan";

const WAIT: Duration = Duration::from_secs(30);

/// `RUST_LOG` of every process: debug for our crates, and for the HTTP request spans.
const DEBUG_LOGS: &str = "info,license_sync_agent=debug,license_sync_aggregator=debug,license_sync_core=debug,\
license_sync_tracing=debug,ghes_sim=debug,tower_http=debug";

fn cloud_members() -> Value {
    json!([
        {"id": 100, "login": "monalisa", "name": "Mona Lisa", "verified_emails": ["mona@leakscan.example"],
         "consumes_license": true},
        {"id": 200, "login": "carol-cloud", "verified_emails": [],
         "identity": {"name_id": "carol", "emails": ["Carol@LeakScan.example"]}, "consumes_license": true},
        {"id": 300, "login": "billing", "verified_emails": ["billing@leakscan.example"], "consumes_license": false}
    ])
}

/// Runs a one-shot command and keeps its stdout and stderr under `logs/`.
fn keep(logs: &Path, name: &str, output: Output) -> Output {
    std::fs::write(logs.join(format!("{name}.stdout")), &output.stdout).expect("keep stdout");
    std::fs::write(logs.join(format!("{name}.stderr")), &output.stderr).expect("keep stderr");
    output
}

/// An administration command; its stderr is kept (its stdout is the secret it creates).
fn admin(aggregator: &Aggregator, logs: &Path, name: &str, args: &[&str]) -> String {
    let output = std::process::Command::new(binary("license-sync-aggregator"))
        .args(args)
        .env(
            "LICENSE_SYNC_AGGREGATOR_DATABASE_URL",
            Aggregator::database_url(aggregator.dir.path()),
        )
        .env("RUST_LOG", DEBUG_LOGS)
        .output()
        .expect("admin command");
    std::fs::write(logs.join(format!("admin-{name}.stderr")), &output.stderr).expect("keep");
    assert!(
        output.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout)
        .expect("utf-8")
        .trim()
        .to_owned()
}

struct Rest {
    base: String,
    token: String,
    http: reqwest::blocking::Client,
}

impl Rest {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        self.call_with(&self.token, method, path, body.map(Value::to_string))
    }

    fn call_with(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body);
        }
        let response = request.send().expect("REST call");
        let status = response.status().as_u16();
        let text = response.text().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

/// The secrets the console walk used, for the scan.
struct ConsoleSecrets {
    link_token: String,
    link_session: String,
    token_session: String,
    csrf_token: String,
}

/// A browser on the console: follows no redirect, sends the session cookie it was given.
struct ConsoleBrowser {
    http: reqwest::blocking::Client,
    base: String,
    cookie: Option<String>,
}

impl ConsoleBrowser {
    fn send(&mut self, request: reqwest::blocking::RequestBuilder) -> (u16, String) {
        let request = match &self.cookie {
            Some(cookie) => request.header("cookie", cookie),
            None => request,
        };
        let response = request.send().expect("console request");
        if let Some(cookie) = response
            .headers()
            .get("set-cookie")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.split(';').next())
        {
            self.cookie = Some(cookie.to_owned());
        }
        let status = response.status().as_u16();
        (status, response.text().unwrap_or_default())
    }

    fn get(&mut self, path: &str) -> (u16, String) {
        let request = self.http.get(format!("{}{path}", self.base));
        self.send(request)
    }

    fn post(&mut self, path: &str, form: &[(&str, &str)]) -> (u16, String) {
        let request = self.http.post(format!("{}{path}", self.base)).form(form);
        self.send(request)
    }

    fn session(&self) -> String {
        let cookie = self.cookie.as_deref().expect("a session cookie");
        cookie.split_once('=').expect("name=value").1.to_owned()
    }
}

fn csrf_of(page: &str) -> String {
    let marker = "name=\"csrf-token\" content=\"";
    let start = page.find(marker).expect("a signed-in page") + marker.len();
    page[start..start + 64].to_owned()
}

fn walk_console(
    aggregator: &Aggregator,
    logs: &Path,
    rest_token: &str,
    server_id: &str,
    usage_file: &str,
) -> ConsoleSecrets {
    let browser = || ConsoleBrowser {
        http: reqwest::blocking::Client::builder()
            .timeout(WAIT)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("client"),
        base: aggregator.http_url.clone(),
        cookie: None,
    };
    let printed = admin(
        aggregator,
        logs,
        "console-link",
        &["console-link", "--enterprise", "acme"],
    );
    let link_token = printed
        .split("token=")
        .nth(1)
        .expect("a sign-in link")
        .trim()
        .to_owned();
    let mut by_link = browser();
    let link = format!("/console/sign-in/link?token={link_token}");
    assert_eq!(by_link.get(&link).0, 303);
    let link_session = by_link.session();
    assert_eq!(browser().get(&link).0, 401, "a link works once");

    let mut console = browser();
    assert_eq!(console.get("/console/sign-in").0, 200);
    assert_eq!(
        console
            .post("/console/sign-in", &[("token", WRONG_REST_TOKEN)])
            .0,
        401
    );
    assert_eq!(
        console.post("/console/sign-in", &[("token", rest_token)]).0,
        303
    );
    let token_session = console.session();
    let (status, overview) = console.get("/console/acme/");
    assert_eq!(status, 200, "{overview}");
    let csrf_token = csrf_of(&overview);
    for path in [
        "/console/acme/?days=30".to_owned(),
        "/console/acme/instances".to_owned(),
        "/console/acme/people".to_owned(),
        "/console/acme/people?q=mona%40leakscan.example&filter=both".to_owned(),
        "/console/acme/people/cloud:100".to_owned(),
        "/console/acme/compare?a=cloud:100&b=cloud:200".to_owned(),
        "/console/acme/duplicates".to_owned(),
        "/console/acme/upload".to_owned(),
        "/console/acme/downloads".to_owned(),
    ] {
        let (status, page) = console.get(&path);
        assert_eq!(status, 200, "{path}: {page}");
    }
    // A search for an address finds its person: the address is on the page, never in a log.
    let (_, found) = console.get("/console/acme/people?q=MONA%40leakscan.example");
    assert!(found.contains("data-person-id=\"cloud:100\""), "{found}");
    let (status, page) = console.post(
        &format!("/console/acme/instances/{server_id}/sync-now"),
        &[("csrf_token", &csrf_token)],
    );
    assert_eq!(status, 303, "{page}");
    assert_eq!(
        console
            .post(
                "/console/acme/enrollment-tokens",
                &[("csrf_token", &csrf_token)]
            )
            .0,
        201
    );
    let form = reqwest::blocking::multipart::Form::new()
        .text("csrf_token", csrf_token.clone())
        .part(
            "file",
            reqwest::blocking::multipart::Part::bytes(
                usage_file.replace("carol@", "CaRoL@").into_bytes(),
            )
            .file_name("usage.json"),
        );
    let request = console
        .http
        .post(format!("{}/console/acme/upload", console.base))
        .multipart(form);
    let (status, page) = console.send(request);
    assert!((200..500).contains(&status), "{status} {page}");
    assert!(page.contains("id=\"upload-result\""), "{page}");
    assert_eq!(
        console
            .post("/console/sign-out", &[("csrf_token", &csrf_token)])
            .0,
        303
    );
    ConsoleSecrets {
        link_token,
        link_session,
        token_session,
        csrf_token,
    }
}

/// One instance of the one-shot agent: its configuration reads a CSV file or the GHES simulator.
fn agent_config(
    dir: &Path,
    name: &str,
    server_id: &str,
    aggregator: &Aggregator,
    credential: &str,
    source: &str,
) -> String {
    let credential_file = dir.join(format!("{name}.credential"));
    std::fs::write(&credential_file, credential).expect("credential");
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[instance]\nserver_id = {server_id:?}\nhostname = \"{name}.test\"\nghes_version = \"3.14.2\"\n\n\
             [source]\n{source}\n\
             [aggregator]\nendpoint = {:?}\ncredential_file = {credential_file:?}\nbatch_size = 2\n",
            aggregator.grpc_url
        ),
    )
    .expect("config");
    config.to_string_lossy().into_owned()
}

/// Every file of `dirs` (recursively) that holds a process's output, with its path, for the scan.
fn outputs(dirs: &[&Path]) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, found: &mut Vec<(PathBuf, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, found);
            } else if path
                .extension()
                .is_some_and(|ext| ext == "log" || ext == "stdout" || ext == "stderr")
            {
                found.push((
                    path.clone(),
                    String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned(),
                ));
            }
        }
    }
    let mut found = Vec::new();
    for dir in dirs {
        walk(dir, &mut found);
    }
    found
}

/// Fails with the file and the surrounding text of the first occurrence of `needle` (case-insensitive).
fn assert_absent(files: &[(PathBuf, String)], needle: &str, what: &str) {
    let needle = needle.to_lowercase();
    for (path, text) in files {
        let lower = text.to_lowercase();
        if let Some(at) = lower.find(&needle) {
            let start = lower[..at]
                .char_indices()
                .rev()
                .nth(200)
                .map_or(0, |(index, _)| index);
            let end = (at + needle.len() + 100).min(text.len());
            panic!(
                "{what} in {}:\n…{}…",
                path.display(),
                text.get(start..end).unwrap_or(&text[at..])
            );
        }
    }
}

#[test]
fn no_email_address_or_secret_reaches_any_log() {
    let logs_dir = tempfile::tempdir().expect("temp dir");
    let logs = logs_dir.path();
    let receiver = OtlpReceiver::start().expect("OTLP receiver");
    let otel_endpoint = receiver.endpoint();
    let env = [
        ("RUST_LOG", DEBUG_LOGS),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otel_endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let aggregator_env = [
        env[0],
        env[1],
        env[2],
        ("LICENSE_SYNC_AGGREGATOR_LOG_FORMAT", "json"),
    ];
    let mut aggregator = Aggregator::start_with_env(&aggregator_env).expect("aggregator starts");

    // Owner side: enterprise, REST token, members (with addresses), credentials and enrollment tokens.
    admin(
        &aggregator,
        logs,
        "enterprise",
        &["enterprise", "create", "--slug", "acme", "--seats", "3"],
    );
    let rest_token = admin(
        &aggregator,
        logs,
        "token",
        &["token", "create", "--enterprise", "acme", "--name", "owner"],
    );
    let rest = Rest {
        base: aggregator.http_url.clone(),
        token: rest_token.clone(),
        http: reqwest::blocking::Client::builder()
            .timeout(WAIT)
            .build()
            .expect("client"),
    };
    let (status, body) = rest.call(
        "PUT",
        "/enterprises/acme/cloud-members",
        Some(&cloud_members()),
    );
    assert_eq!(status, 200, "{body}");
    // A malformed import whose wrong value is an address: the refusal names the position, not the value.
    let (status, body) = rest.call(
        "PUT",
        "/enterprises/acme/cloud-members",
        Some(&json!([{"id": "typo@leakscan.example", "login": "x"}])),
    );
    assert_eq!(status, 422, "{body}");
    let (status, body) = rest.call_with(
        WRONG_REST_TOKEN,
        "GET",
        "/enterprises/acme/consumed-licenses",
        None,
    );
    assert_eq!(status, 401, "{body}");

    let dir = aggregator.dir.path().to_path_buf();
    std::fs::write(dir.join("ghes.csv"), GHES_CSV).expect("csv");
    std::fs::write(dir.join("file.csv"), FILE_CSV).expect("csv");
    let sim = GhesSim::start(&dir.join("ghes.csv"), SIM_TOKEN, 1, logs).expect("simulator");

    // One-shot agents: GHES over basic auth (JSON logs), a CSV file (text logs).
    let mut credentials = Vec::new();
    let mut configs = Vec::new();
    for (name, source) in [
        (
            "ghes-leakscan-a",
            format!(
                "kind = \"ghes\"\nurl = {:?}\nusername = \"site-admin\"\ntoken = {SIM_TOKEN:?}\n\
                 poll_initial_ms = 50\npoll_max_ms = 200\nreport_deadline_secs = 30\n",
                sim.url
            ),
        ),
        (
            "ghes-leakscan-b",
            format!("kind = \"file\"\npath = {:?}\n", dir.join("file.csv")),
        ),
    ] {
        let server_id = uuid::Uuid::new_v4().to_string();
        let credential = admin(
            &aggregator,
            logs,
            &format!("instance-{name}"),
            &[
                "instance",
                "add",
                "--enterprise",
                "acme",
                "--server-id",
                &server_id,
                "--hostname",
                &format!("{name}.test"),
            ],
        );
        let config = agent_config(&dir, name, &server_id, &aggregator, &credential, &source);
        credentials.push(credential);
        configs.push(config);
    }
    let output = keep(
        logs,
        "sync-ghes-json",
        agent_with_env(
            &["--log-format", "json", "sync", "--config", &configs[0]],
            &env,
        )
        .expect("agent"),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = keep(
        logs,
        "sync-file-text",
        agent_with_env(&["sync", "--config", &configs[1]], &env).expect("agent"),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = keep(
        logs,
        "check",
        agent_with_env(&["check", "--config", &configs[0]], &env).expect("agent"),
    );
    assert!(output.status.success());
    let usage_file = logs.join("usage-file.json");
    let output = keep(
        logs,
        "export",
        agent_with_env(
            &[
                "--log-format",
                "json",
                "export",
                "--config",
                &configs[1],
                "--output",
                usage_file.to_str().expect("utf-8"),
                "--unencrypted",
            ],
            &env,
        )
        .expect("agent"),
    );
    assert!(output.status.success());
    // A wrong credential: refused, and the refusal does not repeat it.
    let wrong = agent_config(
        &dir,
        "ghes-leakscan-wrong",
        &uuid::Uuid::new_v4().to_string(),
        &aggregator,
        WRONG_CREDENTIAL,
        &format!("kind = \"file\"\npath = {:?}\n", dir.join("file.csv")),
    );
    let output = keep(
        logs,
        "sync-wrong-credential",
        agent_with_env(&["--log-format", "json", "sync", "--config", &wrong], &env).expect("agent"),
    );
    assert_eq!(output.status.code(), Some(5), "{output:?}");

    // Manual upload: applied once, then refused as older than what is stored (after a newer sync).
    let upload = std::fs::read_to_string(&usage_file).expect("usage file");
    let (status, body) = rest.call_with(
        &rest_token,
        "POST",
        "/enterprises/acme/server-usage",
        Some(upload.clone()),
    );
    assert!(status == 201 || status == 409, "{status} {body}");
    let output = keep(
        logs,
        "sync-file-again",
        agent_with_env(&["sync", "--config", &configs[1]], &env).expect("agent"),
    );
    assert!(output.status.success());
    let (status, body) = rest.call_with(
        &rest_token,
        "POST",
        "/enterprises/acme/server-usage",
        Some(upload.replace("carol@", "CAROL@")),
    );
    assert!(status >= 400, "{status} {body}");

    // The sidecar: a refused enrollment token, then a good one; enabled; Sync now locally and from the cloud.
    let enrollment = admin(
        &aggregator,
        logs,
        "enrollment-token",
        &["enrollment-token", "create", "--enterprise", "acme"],
    );
    let (status, body) = rest.call("POST", "/enterprises/acme/enrollment-tokens", None);
    assert_eq!(status, 201, "{body}");
    let rest_enrollment = body["token"].as_str().expect("token").to_owned();
    let mut options = SidecarOptions::new(&aggregator.grpc_url, "ghes-leakscan-c.test", "");
    options.source = AgentSource::Ghes {
        url: sim.url.clone(),
        token: SIM_TOKEN.to_owned(),
    };
    options.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut sidecar = SidecarAgent::start(options).expect("sidecar starts");
    assert!(sidecar.connect(WRONG_ENROLLMENT).is_err());
    sidecar.connect(&enrollment).expect("connect");
    let (status, body) = sidecar.set_enabled(true).expect("enable");
    assert_eq!(status, 200, "{body}");
    sidecar
        .wait_status(WAIT, |status| {
            status["counters"]["jobs_committed"].as_u64() >= Some(1)
        })
        .expect("the first scheduled sync");
    let output = keep(
        logs,
        "cli-sync-now",
        sidecar.cli(&["sync-now"]).expect("CLI sync-now"),
    );
    assert!(output.status.success(), "{output:?}");
    let job: Value = serde_json::from_slice(&output.stdout).expect("JSON line");
    sidecar
        .wait_job(job["job_id"].as_str().expect("job id"), WAIT, |job| {
            job["state"] == "committed"
        })
        .expect("the local Sync now");
    let output = keep(
        logs,
        "cli-status",
        sidecar.cli(&["status"]).expect("status"),
    );
    assert!(output.status.success());
    let server_id = sidecar.server_id.clone();
    let (status, body) = rest.call(
        "POST",
        &format!("/enterprises/acme/instances/{server_id}/sync-now"),
        None,
    );
    assert_eq!(status, 202, "{body}");
    let request_id = body["request_id"].as_str().expect("request id").to_owned();
    sidecar
        .wait_status(WAIT, |status| {
            status["counters"]["jobs_started"]["cloud"].as_u64() == Some(1)
                && status["current_job"].is_null()
        })
        .expect("the cloud's Sync now ran");
    let enrolled: Value = serde_json::from_str(
        &std::fs::read_to_string(sidecar.state_dir().join("credential.json")).expect("credential"),
    )
    .expect("JSON");
    let sidecar_credential = enrolled["credential"]
        .as_str()
        .expect("the enrolled credential")
        .to_owned();

    // Every read endpoint.
    for path in [
        "/enterprises/acme/consumed-licenses?per_page=2".to_owned(),
        "/enterprises/acme/consumed-licenses?per_page=2&page=2".to_owned(),
        "/enterprises/acme/license-sync-status".to_owned(),
        "/enterprises/acme/license-explanations?account=github.com:monalisa".to_owned(),
        "/enterprises/acme/license-explanations?account=ghes-leakscan-a.test:1&other=ghes-leakscan-b.test:11"
            .to_owned(),
        "/enterprises/acme/usage-history".to_owned(),
        "/enterprises/acme/likely-duplicates".to_owned(),
        format!("/enterprises/acme/instances/{server_id}/sync-requests/{request_id}"),
    ] {
        let (status, body) = rest.call("GET", &path, None);
        assert_eq!(status, 200, "{path}: {body}");
    }
    // The web console: a wrong token, a sign-in link (used, then refused), a token sign-in, every page (a search
    // for an address among them), Sync now, an upload and sign-out.
    let console = walk_console(&aggregator, logs, &rest_token, &server_id, &upload);

    // An owner who types an address where an account is expected: refused, and the address is not logged (the
    // request logs carry the path, not the query).
    let (status, body) = rest.call(
        "GET",
        "/enterprises/acme/license-explanations?account=mona@leakscan.example",
        None,
    );
    assert!((400..500).contains(&status), "{status} {body}");
    let (status, consumed) = rest.call("GET", "/enterprises/acme/consumed-licenses", None);
    assert_eq!(status, 200);
    assert!(
        consumed.to_string().to_lowercase().contains(DOMAIN),
        "the scenario's addresses are in the data: {consumed}"
    );

    // Graceful stops, so that shutdown logs are part of the scan.
    let stopped = sidecar
        .process
        .as_mut()
        .expect("running")
        .terminate(WAIT)
        .expect("stop the sidecar");
    assert!(stopped.is_some_and(|status| status.success()));
    let stopped = aggregator
        .process
        .as_mut()
        .expect("running")
        .terminate(WAIT)
        .expect("stop the aggregator");
    assert!(stopped.is_some_and(|status| status.success()));
    drop(sim);

    let files = outputs(&[logs, aggregator.dir.path(), sidecar.dir.path()]);
    let all: String = files.iter().map(|(_, text)| text.as_str()).collect();
    // The scan looked at real logs: debug events of ours, JSON and text, from every kind of process.
    assert!(all.contains("snapshot committed"), "aggregator logs");
    assert!(
        all.contains("the aggregator committed the snapshot"),
        "agent logs"
    );
    assert!(
        all.contains("skipped a row of all_users.csv"),
        "agent warnings"
    );
    assert!(all.contains("\"level\":\"DEBUG\""), "JSON debug logs");
    assert!(all.contains(" DEBUG "), "text debug logs");
    for (path, text) in &files {
        let name = path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned());
        if name.is_some_and(|name| name.starts_with("aggregator-") && name.ends_with(".log")) {
            for line in text.lines() {
                serde_json::from_str::<Value>(line)
                    .unwrap_or_else(|_| panic!("not a JSON log line: {line}"));
            }
        }
    }
    assert!(receiver.requests() > 0, "spans were exported as well");

    assert_absent(&files, DOMAIN, "an email address");
    let secrets = [
        ("the REST token", rest_token.as_str()),
        ("an instance credential", credentials[0].as_str()),
        ("an instance credential", credentials[1].as_str()),
        (
            "the sidecar's enrolled credential",
            sidecar_credential.as_str(),
        ),
        ("the CLI enrollment token", enrollment.as_str()),
        ("the REST enrollment token", rest_enrollment.as_str()),
        ("the owner token", sidecar.owner_token()),
        ("the GHES site-admin token", SIM_TOKEN),
        ("a wrong REST token", WRONG_REST_TOKEN),
        ("a wrong credential", WRONG_CREDENTIAL),
        ("a wrong enrollment token", WRONG_ENROLLMENT),
        (
            "the console sign-in link token",
            console.link_token.as_str(),
        ),
        ("a console session id", console.link_session.as_str()),
        ("a console session id", console.token_session.as_str()),
        ("a console CSRF token", console.csrf_token.as_str()),
    ];
    for (what, secret) in secrets {
        assert_absent(&files, secret, what);
    }
    // The exported spans follow the same rule.
    let exported = vec![(PathBuf::from("<OTLP export>"), receiver.raw())];
    assert_absent(&exported, DOMAIN, "an email address");
    for (what, secret) in secrets {
        assert_absent(&exported, secret, what);
    }
}

//! The core sync path end to end, with real processes on loopback: a GHES simulator, agents, the aggregator.
//!
//! Test data (people who consume a license are marked *):
//! - ghes-a (through the simulator, answering 202 first): mona* (cloud monalisa), hubot*, gone (suspended),
//!   ghost (built-in), sleepy* (dormant), and a row with a bad `suspended?` value (skipped).
//! - ghes-b (CSV file, reordered columns): mona (same person as ghes-a's), hubot-b (same email as hubot, other
//!   case), carol* (cloud carol-cloud by SCIM email), weird* (invalid email, its own person).
//! - ghes-c (CSV file): dave*, and another "mona"* whose email differs (a likely duplicate).
//! - cloud: monalisa* (verified mona@), carol-cloud (identity only), billing (does not consume), erin*.
//!
//! So 8 people consume: monalisa, hubot, sleepy, carol-cloud, weird, dave, mona (ghes-c), erin.

use std::path::{Path, PathBuf};
use std::time::Duration;

use license_sync_e2e::{Aggregator, GhesSim, agent, agent_json, eventually};
use serde_json::{Value, json};

const SIM_TOKEN: &str = "ghes-site-admin-token-e2e";

const GHES_A: &str = "\
created_at,id,login,email,role,suspended?,last_logged_ip,repos,ssh_keys,org_memberships,dormant?,last_active,raw_login,2fa_enabled?
2020-01-01T00:00:00Z,1,mona,Mona@Example.com,Site admin,false,10.0.0.1,3,1,2,false,2024-01-01T00:00:00Z,mona,true
2020-01-02T00:00:00Z,2,hubot,hubot@example.com,Normal user,no,10.0.0.2,0,0,1,no,2024-01-02T00:00:00Z,hubot,false
2020-01-03T00:00:00Z,3,gone,gone@example.com,Normal user,YES,10.0.0.3,0,0,0,no,,gone,false
2020-01-04T00:00:00Z,4,ghost,ghost@example.com,Normal user,false,,0,0,0,false,,ghost,false
2020-01-05T00:00:00Z,5,sleepy,sleepy@example.com,Normal user,0,10.0.0.5,1,0,0,1,2023-01-01T00:00:00Z,sleepy,false
2020-01-06T00:00:00Z,6,broken,broken@example.com,Normal user,maybe,10.0.0.6,0,0,0,false,,broken,false
";

const GHES_B: &str = "\
id,email,login,suspended?,dormant?
10,mona@example.com,mona,0,0
11, HUBOT@example.com ,hubot-b,0,0
12,carol@example.com,carol,0,0
13,not-an-email,weird,0,0
";

const GHES_C: &str = "\
id,login,email,suspended?
21,dave,dave@example.com,false
22,mona,mona.lisa@corp.example,false
";

fn cloud_members() -> Value {
    json!([
        {"id": 100, "login": "monalisa", "name": "Mona Lisa", "verified_emails": ["mona@example.com"],
         "consumes_license": true, "member_roles": ["org1:Owner"], "enterprise_roles": ["owner"],
         "two_factor_auth": true},
        {"id": 200, "login": "carol-cloud", "verified_emails": [],
         "identity": {"name_id": "carol", "emails": ["Carol@Example.com"]}, "consumes_license": true},
        {"id": 300, "login": "billing", "verified_emails": ["billing@example.com"], "consumes_license": false},
        {"id": 400, "login": "erin", "verified_emails": ["erin@example.com"], "consumes_license": true}
    ])
}

/// One GHES instance: its id, its CSV and the agent configuration that reads it.
struct Instance {
    server_id: String,
    hostname: String,
    csv: PathBuf,
    config: PathBuf,
}

impl Instance {
    fn new(dir: &Path, hostname: &str, csv: &str) -> Instance {
        let csv_path = dir.join(format!("{hostname}.csv"));
        std::fs::write(&csv_path, csv).expect("write csv");
        Instance {
            server_id: uuid::Uuid::new_v4().to_string(),
            hostname: hostname.to_owned(),
            csv: csv_path,
            config: dir.join(format!("{hostname}.toml")),
        }
    }

    /// Writes the agent configuration: a file source, or the GHES simulator when `ghes_url` is given.
    fn configure(&self, aggregator: &Aggregator, credential: &str, ghes: Option<(&str, &str)>) {
        let credential_file = self.config.with_extension("credential");
        std::fs::write(&credential_file, credential).expect("write credential");
        let source = match ghes {
            None => format!("kind = \"file\"\npath = {:?}\n", self.csv),
            Some((url, token)) => format!(
                "kind = \"ghes\"\nurl = {url:?}\nusername = \"site-admin\"\ntoken = {token:?}\n\
                 poll_initial_ms = 50\npoll_max_ms = 200\nreport_deadline_secs = 30\n"
            ),
        };
        let config = format!(
            "[instance]\nserver_id = {:?}\nhostname = {:?}\nghes_version = \"3.14.2\"\n\n[source]\n{source}\n\
             [aggregator]\nendpoint = {:?}\ncredential_file = {:?}\nbatch_size = 2\n",
            self.server_id, self.hostname, aggregator.grpc_url, credential_file
        );
        std::fs::write(&self.config, config).expect("write config");
    }

    fn sync(&self) -> Value {
        agent_json(&[
            "sync",
            "--config",
            self.config.to_str().expect("utf-8 path"),
        ])
        .expect("agent sync")
    }
}

struct Setup {
    aggregator: Aggregator,
    token: String,
    instances: Vec<Instance>,
    sim: GhesSim,
    http: reqwest::blocking::Client,
}

impl Setup {
    fn get(&self, path: &str) -> reqwest::blocking::Response {
        self.http
            .get(format!("{}{path}", self.aggregator.http_url))
            .bearer_auth(&self.token)
            .send()
            .expect("GET")
    }

    fn consumed(&self) -> Value {
        let response = self.get("/enterprises/acme/consumed-licenses?per_page=100");
        assert_eq!(response.status(), 200);
        response.json().expect("json")
    }

    fn status(&self) -> Value {
        let response = self.get("/enterprises/acme/license-sync-status");
        assert_eq!(response.status(), 200);
        response.json().expect("json")
    }

    fn instance_status(&self, hostname: &str) -> Value {
        self.status()["server_instances"]
            .as_array()
            .expect("array")
            .iter()
            .find(|i| i["hostname"] == hostname)
            .cloned()
            .unwrap_or_else(|| panic!("no status for {hostname}"))
    }
}

/// Starts everything and syncs the three instances.
fn setup() -> Setup {
    let aggregator = Aggregator::start().expect("aggregator starts");
    aggregator
        .admin(&[
            "enterprise",
            "create",
            "--slug",
            "acme",
            "--name",
            "Acme",
            "--seats",
            "5",
        ])
        .expect("create enterprise");
    let token = aggregator
        .admin(&["token", "create", "--enterprise", "acme", "--name", "owner"])
        .expect("token");
    let dir = aggregator.dir.path().to_path_buf();
    let instances = vec![
        Instance::new(&dir, "ghes-a.test", GHES_A),
        Instance::new(&dir, "ghes-b.test", GHES_B),
        Instance::new(&dir, "ghes-c.test", GHES_C),
    ];
    let sim = GhesSim::start(&instances[0].csv, SIM_TOKEN, 2, &dir).expect("simulator starts");
    for (index, instance) in instances.iter().enumerate() {
        let credential = aggregator
            .admin(&[
                "instance",
                "add",
                "--enterprise",
                "acme",
                "--server-id",
                &instance.server_id,
                "--hostname",
                &instance.hostname,
            ])
            .expect("instance credential");
        let ghes = (index == 0).then_some((sim.url.as_str(), SIM_TOKEN));
        instance.configure(&aggregator, &credential, ghes);
    }
    let http = reqwest::blocking::Client::new();
    let members = http
        .put(format!(
            "{}/enterprises/acme/cloud-members",
            aggregator.http_url
        ))
        .bearer_auth(&token)
        .json(&cloud_members())
        .send()
        .expect("import members");
    assert_eq!(
        members.status(),
        200,
        "{}",
        members.text().unwrap_or_default()
    );
    let setup = Setup {
        aggregator,
        token,
        instances,
        sim,
        http,
    };
    for instance in &setup.instances {
        let receipt = instance.sync();
        assert_eq!(receipt["duplicate"], false);
    }
    setup
}

fn logins(consumed: &Value) -> Vec<String> {
    consumed["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| {
            let login = u["github_com_login"].as_str().unwrap_or_default();
            if login.is_empty() {
                u["enterprise_server_user_ids"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            } else {
                login.to_owned()
            }
        })
        .collect()
}

fn user_with_server_id<'a>(consumed: &'a Value, id: &str) -> &'a Value {
    consumed["users"]
        .as_array()
        .expect("users")
        .iter()
        .find(|u| {
            u["enterprise_server_user_ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|i| i == id))
        })
        .unwrap_or_else(|| panic!("no person holds {id}"))
}

#[test]
fn three_agents_merge_into_people_and_report_status() {
    let setup = setup();

    // The simulator answered 202 before the report was ready, and the agent polled until it was.
    let stats: Value = reqwest::blocking::get(format!("{}/_sim/stats", setup.sim.url))
        .expect("stats")
        .json()
        .expect("json");
    assert!(stats["report_202"].as_u64() >= Some(2), "{stats}");

    let consumed = setup.consumed();
    assert_eq!(consumed["total_seats_consumed"], 8, "{consumed:#}");
    assert_eq!(consumed["total_seats_purchased"], 5);
    assert_eq!(consumed["total_seats_overage"], 3);
    assert_eq!(consumed["users"].as_array().map(Vec::len), Some(8));

    let mona = user_with_server_id(&consumed, "ghes-a.test:1");
    assert_eq!(mona["github_com_login"], "monalisa");
    assert_eq!(mona["total_user_accounts"], 3);
    assert_eq!(
        mona["enterprise_server_user_ids"],
        json!(["ghes-a.test:1", "ghes-b.test:10"])
    );
    assert_eq!(mona["github_com_member_roles"], json!(["org1:Owner"]));
    assert_eq!(mona["github_com_profile"], "https://github.com/monalisa");
    let hubot = user_with_server_id(&consumed, "ghes-b.test:11");
    assert_eq!(hubot["github_com_user"], false);
    assert_eq!(hubot["github_com_login"], "");
    assert_eq!(hubot["github_com_profile"], "");
    assert_eq!(hubot["github_com_member_roles"], json!([]));
    assert_eq!(hubot["total_user_accounts"], 2);
    let carol = user_with_server_id(&consumed, "ghes-b.test:12");
    assert_eq!(carol["github_com_login"], "carol-cloud");
    // The suspended, built-in and skipped accounts consume nothing.
    for absent in ["ghes-a.test:3", "ghes-a.test:4", "ghes-a.test:6"] {
        assert!(
            !consumed.to_string().contains(&format!("\"{absent}\"")),
            "{absent} listed"
        );
    }

    let status = setup.status();
    let instances = status["server_instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 3);
    for instance in instances {
        assert_eq!(instance["last_sync"]["status"], "success", "{instance}");
        assert_eq!(instance["last_sync"]["error"], "");
        assert_eq!(instance["arrival"], "connect");
        assert_eq!(instance["stale"], false);
    }
    let a = setup.instance_status("ghes-a.test");
    assert_eq!(a["user_count"], 5, "the bad row was skipped: {a}");
    assert_eq!(a["rows_skipped"], 1);
    assert_eq!(a["server_id"], setup.instances[0].server_id.as_str());

    // Explanations: why one license, and why two.
    let explained: Value = setup
        .get("/enterprises/acme/license-explanations?account=ghes-b.test:10")
        .json()
        .expect("json");
    assert_eq!(explained["explanation"]["person_id"], "cloud:100");
    assert_eq!(
        explained["explanation"]["accounts"][1]["rule"]["rule"],
        "verified_email"
    );
    let two: Value = setup
        .get("/enterprises/acme/license-explanations?account=ghes-a.test:1&other=ghes-c.test:22")
        .json()
        .expect("json");
    assert_eq!(two["same_person"], false);
    assert_eq!(two["licenses"], 2);
    let duplicates: Value = setup
        .get("/enterprises/acme/likely-duplicates")
        .json()
        .expect("json");
    assert!(
        duplicates["likely_duplicates"]
            .as_array()
            .expect("list")
            .iter()
            .any(|d| d["reason"] == "same_login" && d["value"] == "mona"),
        "{duplicates}"
    );

    // Today's usage is in the history, with the day's maximum and per-instance counts.
    let history: Value = setup
        .get("/enterprises/acme/usage-history")
        .json()
        .expect("json");
    let today = history["days"]
        .as_array()
        .and_then(|days| days.last())
        .cloned()
        .expect("today");
    assert_eq!(today["consumed"], 8, "{history}");
    assert_eq!(today["purchased"], 5);
    assert_eq!(today["overage"], 3);
    assert!(today["max_consumed"].as_i64() >= Some(8));
    assert_eq!(history["max_consumed"], today["max_consumed"]);
    let ghes_a = today["instances"]
        .as_array()
        .and_then(|all| all.iter().find(|i| i["hostname"] == "ghes-a.test"))
        .expect("ghes-a usage");
    assert_eq!(
        (ghes_a["accounts"].as_i64(), ghes_a["consuming"].as_i64()),
        (Some(5), Some(3))
    );
    assert_eq!(
        setup
            .get("/enterprises/acme/usage-history?since=2026-13-01")
            .status(),
        422
    );

    // No email address or token in the aggregator's log.
    let log = setup.aggregator.log();
    assert!(
        !log.contains("@example.com") && !log.contains("@corp.example"),
        "email in log:\n{log}"
    );
    assert!(
        !log.contains(&setup.token) && !log.contains("lsi_"),
        "token in log"
    );
}

#[test]
fn pagination_is_stable_with_link_headers_and_a_short_last_page() {
    let setup = setup();
    let all = logins(&setup.consumed());
    let mut seen = Vec::new();
    let mut url = format!(
        "{}/enterprises/acme/consumed-licenses?per_page=3",
        setup.aggregator.http_url
    );
    let mut pages = 0;
    loop {
        let response = setup
            .http
            .get(&url)
            .bearer_auth(&setup.token)
            .send()
            .expect("page");
        assert_eq!(response.status(), 200);
        let link = response
            .headers()
            .get("link")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let page: Value = response.json().expect("json");
        assert_eq!(page["total_seats_consumed"], 8, "totals on every page");
        seen.extend(logins(&page));
        pages += 1;
        let next = link
            .split(", ")
            .find(|part| part.ends_with("rel=\"next\""))
            .map(|part| {
                part.trim_start_matches('<')
                    .split('>')
                    .next()
                    .unwrap_or_default()
                    .to_owned()
            });
        match next {
            Some(next) => {
                assert!(link.contains("rel=\"last\""), "{link}");
                url = next;
            }
            None => {
                assert!(
                    link.contains("rel=\"prev\"") && link.contains("rel=\"first\""),
                    "{link}"
                );
                assert_eq!(
                    page["users"].as_array().map(Vec::len),
                    Some(2),
                    "short last page"
                );
                break;
            }
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        seen, all,
        "pages together hold every consuming person once, in order"
    );

    // GitHub-style errors.
    let response = setup
        .http
        .get(format!(
            "{}/enterprises/acme/consumed-licenses?per_page=abc",
            setup.aggregator.http_url
        ))
        .bearer_auth(&setup.token)
        .send()
        .expect("request");
    assert_eq!(response.status(), 422);
    let body: Value = response.json().expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("per_page"))
    );
    assert!(body["documentation_url"].is_string());
    let anonymous = setup
        .http
        .get(format!(
            "{}/enterprises/acme/consumed-licenses",
            setup.aggregator.http_url
        ))
        .send()
        .expect("request");
    assert_eq!(anonymous.status(), 401);
    let bad = setup
        .http
        .get(format!(
            "{}/enterprises/acme/consumed-licenses",
            setup.aggregator.http_url
        ))
        .header("authorization", "token lst_not-a-real-token")
        .send()
        .expect("request");
    assert_eq!(bad.status(), 401);
    assert_eq!(
        setup.get("/enterprises/other/consumed-licenses").status(),
        404
    );
}

#[test]
fn resync_replaces_upload_adds_and_older_or_foreign_snapshots_change_nothing() {
    let setup = setup();
    let c = &setup.instances[2];

    // An export taken now is older than the sync that follows it.
    let old_export = setup.aggregator.dir.path().join("ghes-c-old.json");
    let summary = agent_json(&[
        "export",
        "--config",
        c.config.to_str().expect("utf-8"),
        "--output",
        old_export.to_str().expect("utf-8"),
        "--unencrypted",
    ])
    .expect("export");
    assert_eq!(summary["users"], 2, "{summary}");
    std::thread::sleep(Duration::from_millis(1100));

    // Re-sync ghes-c without dave: the snapshot replaces the previous one.
    std::fs::write(
        &c.csv,
        "id,login,email,suspended?\n22,mona,mona.lisa@corp.example,false\n",
    )
    .expect("csv");
    let receipt = c.sync();
    assert_eq!(receipt["users_accepted"], 1);
    let consumed = setup.consumed();
    assert_eq!(consumed["total_seats_consumed"], 7);
    assert!(!consumed.to_string().contains("ghes-c.test:21"));

    // The older export is refused over REST, and nothing changes.
    let upload = |path: &Path| {
        setup
            .http
            .post(format!(
                "{}/enterprises/acme/server-usage",
                setup.aggregator.http_url
            ))
            .bearer_auth(&setup.token)
            .body(std::fs::read(path).expect("read export"))
            .send()
            .expect("upload")
    };
    let refused = upload(&old_export);
    assert_eq!(refused.status(), 409);
    let body: Value = refused.json().expect("json");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("newer")),
        "{body}"
    );
    assert_eq!(setup.consumed()["total_seats_consumed"], 7);
    let c_status = setup.instance_status("ghes-c.test");
    assert_eq!(c_status["last_sync"]["status"], "failed");
    assert_eq!(c_status["user_count"], 1);

    // "Add server usage": an instance without a connection uploads its export.
    let dir = setup.aggregator.dir.path();
    let d = Instance::new(
        dir,
        "ghes-d.test",
        "id,login,email,suspended?\n1,frank,frank@example.com,false\n",
    );
    d.configure(&setup.aggregator, "unused", None);
    let export = dir.join("ghes-d.json");
    agent_json(&[
        "export",
        "--config",
        d.config.to_str().expect("utf-8"),
        "--output",
        export.to_str().expect("utf-8"),
        "--unencrypted",
    ])
    .expect("export");
    // An upload does not create its instance: refused until an owner adds it, and nothing is counted.
    let unknown = upload(&export);
    assert_eq!(unknown.status(), 404);
    assert!(
        unknown.text().expect("body").contains("instance add"),
        "the refusal says how to add the instance"
    );
    assert_eq!(setup.consumed()["total_seats_consumed"], 7);
    setup
        .aggregator
        .admin(&[
            "instance",
            "add",
            "--enterprise",
            "acme",
            "--server-id",
            &d.server_id,
            "--hostname",
            &d.hostname,
        ])
        .expect("instance add");
    let created = upload(&export);
    assert_eq!(created.status(), 201);
    assert_eq!(setup.consumed()["total_seats_consumed"], 8);
    assert_eq!(setup.instance_status("ghes-d.test")["arrival"], "upload");
    // The same file again is acknowledged, not applied twice.
    let again = upload(&export);
    assert_eq!(again.status(), 200);
    assert_eq!(again.json::<Value>().expect("json")["duplicate"], true);

    // A tampered file is refused with the reason.
    let mut tampered: Value =
        serde_json::from_slice(&std::fs::read(&export).expect("read")).expect("json");
    tampered["users"][0]["suspended"] = json!(true);
    tampered["sync_id"] = json!(uuid::Uuid::new_v4().to_string());
    let response = setup
        .http
        .post(format!(
            "{}/enterprises/acme/server-usage",
            setup.aggregator.http_url
        ))
        .bearer_auth(&setup.token)
        .json(&tampered)
        .send()
        .expect("upload");
    assert_eq!(response.status(), 422);
    assert!(response.text().expect("body").contains("digest"));

    // A wrong instance credential is refused and changes nothing.
    let b = &setup.instances[1];
    b.configure(&setup.aggregator, "lsi_wrong-credential", None);
    let output =
        agent(&["sync", "--config", b.config.to_str().expect("utf-8")]).expect("run agent");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("credential"), "{stderr}");
    assert!(
        !stderr.contains("lsi_wrong-credential"),
        "the credential is never printed: {stderr}"
    );
    assert_eq!(setup.consumed()["total_seats_consumed"], 8);

    // The simulator refuses a wrong site-admin token with 401; the agent says so and sends nothing.
    let a = &setup.instances[0];
    let credential = setup
        .aggregator
        .admin(&[
            "instance",
            "add",
            "--enterprise",
            "acme",
            "--server-id",
            &a.server_id,
            "--hostname",
            &a.hostname,
        ])
        .expect("rotate credential");
    a.configure(
        &setup.aggregator,
        &credential,
        Some((&setup.sim.url, "wrong-ghes-token")),
    );
    let output =
        agent(&["sync", "--config", a.config.to_str().expect("utf-8")]).expect("run agent");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("401") || stderr.to_lowercase().contains("credential"),
        "{stderr}"
    );
    assert!(!stderr.contains("wrong-ghes-token"));
    assert_eq!(setup.consumed()["total_seats_consumed"], 8);
}

#[test]
fn retiring_an_instance_stops_its_users_counting() {
    let setup = setup();
    let c = &setup.instances[2];
    let response = setup
        .http
        .delete(format!(
            "{}/enterprises/acme/instances/{}",
            setup.aggregator.http_url, c.server_id
        ))
        .bearer_auth(&setup.token)
        .send()
        .expect("retire");
    assert_eq!(response.status(), 204);
    assert_eq!(setup.consumed()["total_seats_consumed"], 6);
    assert_eq!(
        setup.status()["server_instances"].as_array().map(Vec::len),
        Some(2)
    );
    // Its credential no longer works.
    let output =
        agent(&["sync", "--config", c.config.to_str().expect("utf-8")]).expect("run agent");
    assert!(!output.status.success());
}

#[test]
fn the_aggregator_keeps_everything_across_a_restart() {
    let mut setup = setup();
    let before = setup.consumed();
    setup.aggregator.restart().expect("restart");
    assert_eq!(setup.consumed(), before);
    // Agents reach the new port after reconfiguration and sync again.
    let b = &setup.instances[1];
    let credential = setup
        .aggregator
        .admin(&[
            "instance",
            "add",
            "--enterprise",
            "acme",
            "--server-id",
            &b.server_id,
            "--hostname",
            &b.hostname,
        ])
        .expect("credential");
    b.configure(&setup.aggregator, &credential, None);
    assert_eq!(b.sync()["users_accepted"], 4);
    assert!(
        eventually(Duration::from_secs(5), || (setup.consumed() == before)
            .then_some(()))
        .is_some()
    );
}

#[test]
fn pygithub_reads_consumed_licenses_across_pages() {
    let Some(python) = license_sync_serve::testing::python_with(
        "pygithub_reads_consumed_licenses_across_pages",
        &["github"],
    ) else {
        return;
    };
    let setup = setup();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/pygithub_consumed_licenses.py");
    let output = std::process::Command::new(python)
        .arg(script)
        .args([&setup.aggregator.http_url, &setup.token, "acme", "3"])
        .output()
        .expect("run PyGithub");
    assert!(
        output.status.success(),
        "PyGithub failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: Value = serde_json::from_slice(&output.stdout).expect("json from the script");
    let rest = setup.consumed();
    assert_eq!(read["total_seats_consumed"], 8);
    assert_eq!(read["total_seats_purchased"], 5);
    // Three pages of 3, 3 and 2, followed through the Link header: every person once, in the REST order.
    let users = read["users"].as_array().expect("users");
    assert_eq!(users.len(), 8);
    for (from_pygithub, from_rest) in users.iter().zip(rest["users"].as_array().expect("users")) {
        assert_eq!(
            from_pygithub["github_com_login"],
            from_rest["github_com_login"]
        );
        assert_eq!(
            from_pygithub["enterprise_server_user_ids"],
            from_rest["enterprise_server_user_ids"]
        );
        assert_eq!(
            from_pygithub["total_user_accounts"],
            from_rest["total_user_accounts"]
        );
        assert_eq!(from_pygithub["license_type"], "enterprise");
    }
    let mona = users
        .iter()
        .find(|u| u["github_com_login"] == "monalisa")
        .expect("monalisa");
    // The same address in two spellings is listed once, as first seen.
    assert_eq!(
        mona["enterprise_server_primary_emails"],
        json!(["Mona@Example.com"])
    );
}

//! Encrypted usage files end to end (issue 11), with the real binaries on loopback: `enterprise keygen`, the key
//! handed to an agent at enrollment or in its configuration, `export` encrypting to it, the upload decrypting with
//! the enterprise's keys (old ones too, after a rotation), and the refusals that store nothing.

use std::path::{Path, PathBuf};

use license_sync_e2e::{Aggregator, SidecarAgent, SidecarOptions, agent, agent_json};
use serde_json::Value;

const USERS_CSV: &str = "id,login,email,suspended?\n1,frank-the-user,frank.secret@corp.example,false\n\
                         2,grace-the-user,grace.secret@corp.example,false\n";
/// What must not be readable in an encrypted file.
const SECRETS: [&str; 5] = [
    "frank-the-user",
    "grace-the-user",
    "frank.secret@corp.example",
    "grace.secret@corp.example",
    "corp.example",
];

struct World {
    aggregator: Aggregator,
    token: String,
    http: reqwest::blocking::Client,
    dir: PathBuf,
    server_id: String,
    config: PathBuf,
}

impl World {
    fn start() -> World {
        let aggregator = Aggregator::start().expect("aggregator starts");
        for slug in ["acme", "globex"] {
            aggregator
                .admin(&["enterprise", "create", "--slug", slug, "--seats", "5"])
                .expect("create enterprise");
        }
        let token = aggregator
            .admin(&["token", "create", "--enterprise", "acme", "--name", "owner"])
            .expect("token");
        let dir = aggregator.dir.path().to_path_buf();
        let server_id = uuid::Uuid::new_v4().to_string();
        aggregator
            .admin(&[
                "instance",
                "add",
                "--enterprise",
                "acme",
                "--server-id",
                &server_id,
                "--hostname",
                "ghes-e.test",
            ])
            .expect("instance add");
        let csv = dir.join("ghes-e.csv");
        std::fs::write(&csv, USERS_CSV).expect("csv");
        World {
            aggregator,
            token,
            http: reqwest::blocking::Client::new(),
            config: dir.join("ghes-e.toml"),
            dir,
            server_id,
        }
        .configured(None, &csv)
    }

    /// Writes the agent's configuration (an air-gapped agent: no aggregator section), with `export.recipient`.
    fn configured(self, recipient: Option<&str>, csv: &Path) -> World {
        let export = recipient
            .map(|key| format!("\n[export]\nrecipient = {key:?}\n"))
            .unwrap_or_default();
        std::fs::write(
            &self.config,
            format!(
                "[instance]\nserver_id = {:?}\nhostname = \"ghes-e.test\"\nghes_version = \"3.14.2\"\n\n\
                 [source]\nkind = \"file\"\npath = {csv:?}\n{export}",
                self.server_id
            ),
        )
        .expect("config");
        self
    }

    fn set_recipient(self, recipient: Option<&str>) -> World {
        let csv = self.dir.join("ghes-e.csv");
        self.configured(recipient, &csv)
    }

    fn keygen(&self, enterprise: &str) -> String {
        let key = self
            .aggregator
            .admin(&["enterprise", "keygen", "--enterprise", enterprise])
            .expect("keygen");
        assert!(key.starts_with("age1"), "{key}");
        key
    }

    fn export(&self, name: &str, extra: &[&str]) -> (PathBuf, Value) {
        let path = self.dir.join(name);
        let mut args = vec![
            "export",
            "--config",
            self.config.to_str().expect("utf-8"),
            "--output",
            path.to_str().expect("utf-8"),
        ];
        args.extend_from_slice(extra);
        let summary = agent_json(&args).expect("export");
        (path, summary)
    }

    fn upload(&self, path: &Path) -> (u16, Value) {
        let response = self
            .http
            .post(format!(
                "{}/enterprises/acme/server-usage",
                self.aggregator.http_url
            ))
            .bearer_auth(&self.token)
            .body(std::fs::read(path).expect("read export"))
            .send()
            .expect("upload");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    fn get(&self, path: &str) -> (u16, Value) {
        let response = self
            .http
            .get(format!("{}{path}", self.aggregator.http_url))
            .bearer_auth(&self.token)
            .send()
            .expect("GET");
        let status = response.status().as_u16();
        (status, response.json().unwrap_or(Value::Null))
    }

    /// The instance's stored user count and the last sync's status.
    fn instance(&self) -> (i64, String) {
        let (status, body) = self.get("/enterprises/acme/license-sync-status");
        assert_eq!(status, 200, "{body}");
        let instance = &body["server_instances"][0];
        (
            instance["user_count"].as_i64().unwrap_or(-1),
            instance["last_sync"]["status"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    }
}

fn assert_unreadable(path: &Path) {
    let bytes = std::fs::read(path).expect("read export");
    assert!(bytes.starts_with(b"age-encryption.org/v1\n"), "an age file");
    for secret in SECRETS {
        assert!(
            !bytes
                .windows(secret.len())
                .any(|window| window.eq_ignore_ascii_case(secret.as_bytes())),
            "{secret:?} is readable in {}",
            path.display()
        );
    }
}

#[test]
fn an_encrypted_export_uploads_and_a_file_for_another_enterprise_changes_nothing() {
    let world = World::start();

    // Without a key the export refuses, and writes nothing.
    let refused_path = world.dir.join("refused.json.age");
    let output = agent(&[
        "export",
        "--config",
        world.config.to_str().expect("utf-8"),
        "--output",
        refused_path.to_str().expect("utf-8"),
    ])
    .expect("run agent");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("export.recipient") && stderr.contains("--unencrypted"),
        "{stderr}"
    );
    assert!(!refused_path.exists());
    assert_eq!(world.get("/enterprises/acme/usage-file-key").0, 404);

    let acme_key = world.keygen("acme");
    let globex_key = world.keygen("globex");
    let (status, body) = world.get("/enterprises/acme/usage-file-key");
    assert_eq!(
        (status, body["public_key"].as_str()),
        (200, Some(acme_key.as_str()))
    );

    // Encrypted to another enterprise's key: 422 that says what to do, nothing stored.
    let world = world.set_recipient(Some(&globex_key));
    let (foreign, _) = world.export("foreign.json.age", &[]);
    assert_unreadable(&foreign);
    let (status, body) = world.upload(&foreign);
    assert_eq!(status, 422, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("not one of enterprise acme's"),
        "{message}"
    );
    assert!(message.contains("usage-file-key"), "{message}");
    assert_eq!(world.instance().0, 0, "nothing stored");

    // A damaged file: 422, nothing stored.
    let world = world.set_recipient(Some(&acme_key));
    let (good, summary) = world.export("ghes-e.json.age", &[]);
    assert_eq!(summary["encrypted"], true, "{summary}");
    assert_eq!(summary["recipient_source"], "config", "{summary}");
    assert_unreadable(&good);
    let mut damaged = std::fs::read(&good).expect("read");
    let last = damaged.len() - 1;
    damaged[last] ^= 0x01;
    let damaged_path = world.dir.join("damaged.json.age");
    std::fs::write(&damaged_path, damaged).expect("write");
    let (status, body) = world.upload(&damaged_path);
    assert_eq!(status, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("damaged"),
        "{body}"
    );
    assert_eq!(world.instance().0, 0, "nothing stored");

    // The good file is applied, once.
    let (status, body) = world.upload(&good);
    assert_eq!(status, 201, "{body}");
    assert_eq!(world.instance(), (2, "success".to_owned()));
    let (_, consumed) = world.get("/enterprises/acme/consumed-licenses");
    assert_eq!(consumed["total_seats_consumed"], 2, "{consumed}");
    assert_eq!(world.upload(&good).0, 200, "a duplicate");

    // A plain file, written on purpose, is still accepted.
    let (plain, summary) = world.export("plain.json", &["--unencrypted"]);
    assert_eq!(summary["encrypted"], false, "{summary}");
    let text = std::fs::read_to_string(&plain).expect("plain JSON");
    assert!(text.contains("frank.secret@corp.example"));
    assert_eq!(world.upload(&plain).0, 201);
}

#[test]
fn after_a_rotation_files_encrypted_to_the_old_key_still_upload() {
    let world = World::start();
    let old_key = world.keygen("acme");
    let world = world.set_recipient(Some(&old_key));
    let (before, _) = world.export("before.json.age", &[]);

    let new_key = world.keygen("acme");
    assert_ne!(new_key, old_key);
    let (_, body) = world.get("/enterprises/acme/usage-file-key");
    assert_eq!(
        body["public_key"].as_str(),
        Some(new_key.as_str()),
        "the newest key is handed out"
    );

    let (status, body) = world.upload(&before);
    assert_eq!(status, 201, "the old key still decrypts: {body}");
    let world = world.set_recipient(Some(&new_key));
    let (after, _) = world.export("after.json.age", &[]);
    let (status, body) = world.upload(&after);
    assert_eq!(status, 201, "{body}");
}

#[test]
fn an_enrolled_agent_encrypts_to_the_key_it_got_at_enrollment() {
    let aggregator = Aggregator::start().expect("aggregator starts");
    aggregator
        .admin(&["enterprise", "create", "--slug", "acme", "--seats", "5"])
        .expect("create enterprise");
    let token = aggregator
        .admin(&["token", "create", "--enterprise", "acme", "--name", "owner"])
        .expect("token");
    let key = aggregator
        .admin(&["enterprise", "keygen", "--enterprise", "acme"])
        .expect("keygen");
    let agent = SidecarAgent::start(SidecarOptions::new(
        &aggregator.grpc_url,
        "ghes-s.test",
        USERS_CSV,
    ))
    .expect("agent starts");
    let enrollment = aggregator
        .admin(&["enrollment-token", "create", "--enterprise", "acme"])
        .expect("enrollment token");
    agent.connect(&enrollment).expect("enrolls");
    let credential: Value = serde_json::from_slice(
        &std::fs::read(agent.state_dir().join("credential.json")).expect("credential.json"),
    )
    .expect("JSON");
    assert_eq!(
        credential["usage_file_recipient"].as_str(),
        Some(key.as_str())
    );

    let output = agent.dir.path().join("usage.json.age");
    let summary = agent_json(&[
        "export",
        "--config",
        agent.config.to_str().expect("utf-8"),
        "--output",
        output.to_str().expect("utf-8"),
    ])
    .expect("export");
    assert_eq!(
        summary["recipient"].as_str(),
        Some(key.as_str()),
        "{summary}"
    );
    assert_eq!(summary["recipient_source"], "enrolled", "{summary}");
    assert_unreadable(&output);
    let http = reqwest::blocking::Client::new();
    let response = http
        .post(format!(
            "{}/enterprises/acme/server-usage",
            aggregator.http_url
        ))
        .bearer_auth(&token)
        .body(std::fs::read(&output).expect("read"))
        .send()
        .expect("upload");
    assert_eq!(response.status(), 201);
    // 201 is sent after the commit: the users are there now.
    let status: Value = http
        .get(format!(
            "{}/enterprises/acme/license-sync-status",
            aggregator.http_url
        ))
        .bearer_auth(&token)
        .send()
        .expect("status")
        .json()
        .expect("JSON");
    assert_eq!(status["server_instances"][0]["user_count"], 2, "{status}");
}

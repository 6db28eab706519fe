//! The CSV license report from the command line, with the real binaries: `license-sync-aggregator report` writes
//! the bytes the running server's `consumed-licenses.csv` answers, from the store alone, as a private file that is
//! replaced whole.

use license_sync_e2e::{Aggregator, agent_json};

const USERS_CSV: &str = "id,login,email,suspended?\n1,mona,mona@corp.example,false\n\
                         2,=cmd,formula@corp.example,false\n3,\"lisa, da vinci\",lisa@corp.example,false\n";
const MEMBERS_JSON: &str = r#"[
  {"id": 7, "login": "mona-cloud", "name": "Mona \"the\" Octocat", "verified_emails": ["mona@corp.example"],
   "consumes_license": true, "member_roles": ["acme:Owner", "labs:Member"], "two_factor_auth": true},
  {"id": 8, "login": "hubot", "name": "@hubot\nrobot", "consumes_license": true}
]"#;

#[test]
fn the_report_command_writes_the_bytes_the_server_answers() {
    let aggregator = Aggregator::start().expect("aggregator starts");
    aggregator
        .admin(&["enterprise", "create", "--slug", "acme", "--seats", "5"])
        .expect("create enterprise");
    let token = aggregator
        .admin(&["token", "create", "--enterprise", "acme", "--name", "owner"])
        .expect("token");
    let dir = aggregator.dir.path().to_path_buf();
    let members = dir.join("members.json");
    std::fs::write(&members, MEMBERS_JSON).expect("members file");
    aggregator
        .admin(&[
            "members",
            "import",
            "--enterprise",
            "acme",
            "--file",
            members.to_str().expect("utf-8"),
        ])
        .expect("members import");
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
            "ghes-r.test",
        ])
        .expect("instance add");
    let csv = dir.join("ghes-r.csv");
    std::fs::write(&csv, USERS_CSV).expect("csv");
    let config = dir.join("ghes-r.toml");
    std::fs::write(
        &config,
        format!(
            "[instance]\nserver_id = {server_id:?}\nhostname = \"ghes-r.test\"\nghes_version = \"3.14.2\"\n\n\
             [source]\nkind = \"file\"\npath = {csv:?}\n"
        ),
    )
    .expect("agent config");
    let usage = dir.join("usage.json");
    agent_json(&[
        "export",
        "--config",
        config.to_str().expect("utf-8"),
        "--output",
        usage.to_str().expect("utf-8"),
        "--unencrypted",
    ])
    .expect("export");
    let http = reqwest::blocking::Client::new();
    let uploaded = http
        .post(format!(
            "{}/enterprises/acme/server-usage",
            aggregator.http_url
        ))
        .bearer_auth(&token)
        .body(std::fs::read(&usage).expect("usage file"))
        .send()
        .expect("upload");
    assert!(uploaded.status().is_success(), "{:?}", uploaded.text());

    let served = http
        .get(format!(
            "{}/enterprises/acme/consumed-licenses.csv",
            aggregator.http_url
        ))
        .bearer_auth(&token)
        .send()
        .expect("GET the report");
    assert_eq!(served.status(), 200);
    let served = served.bytes().expect("body").to_vec();
    let served_text = String::from_utf8(served.clone()).expect("UTF-8");
    // The header, four people (mona merged with her cloud account, the two other GHES users, hubot), and the
    // newline inside hubot's quoted name.
    assert_eq!(served_text.lines().count(), 1 + 4 + 1, "{served_text}");
    assert!(served_text.contains("\"'@hubot\nrobot\""), "{served_text}");

    let output = dir.join("reports").join("acme.csv");
    std::fs::create_dir_all(output.parent().expect("a parent")).expect("reports dir");
    std::fs::write(&output, "an older report").expect("old file");
    aggregator
        .admin(&[
            "report",
            "--enterprise",
            "acme",
            "--output",
            output.to_str().expect("utf-8"),
        ])
        .expect("report");
    let written = std::fs::read(&output).expect("the report file");
    assert_eq!(String::from_utf8_lossy(&written), served_text);
    assert_eq!(written, served);
    let names: Vec<_> = std::fs::read_dir(output.parent().expect("a parent"))
        .expect("list")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name())
        .collect();
    assert_eq!(names, ["acme.csv"], "no temporary file left");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&output)
            .expect("metadata")
            .permissions()
            .mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "readable by its owner only: it holds emails"
        );
    }

    let missing = aggregator.admin(&[
        "report",
        "--enterprise",
        "nobody",
        "--output",
        output.to_str().expect("utf-8"),
    ]);
    let message = format!("{:#}", missing.expect_err("no such enterprise"));
    assert!(message.contains("no enterprise \"nobody\""), "{message}");
    assert_eq!(
        std::fs::read(&output).expect("kept"),
        written,
        "left as it was"
    );
}

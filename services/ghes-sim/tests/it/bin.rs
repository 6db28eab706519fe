//! The `ghes-sim` binary announces its port as one JSON line and serves.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};

#[test]
fn prints_the_listening_address_then_serves() {
    let mut csv = tempfile::NamedTempFile::new().expect("temp file");
    csv.write_all(b"id,login,email,suspended?\n1,mona,mona@example.com,false\n")
        .expect("write");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ghes-sim"))
        .args(["--listen", "127.0.0.1:0", "--pending-polls", "0", "--csv"])
        .arg(csv.path())
        .env("GHES_SIM_TOKEN", "bin-token")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn ghes-sim");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read line");
    let announced: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    let addr = announced["listening"].as_str().expect("address").to_owned();

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let status = runtime.block_on(async {
        reqwest::Client::new()
            .get(format!("http://{addr}/stafftools/reports/all_users.csv"))
            .basic_auth("site-admin", Some("bin-token"))
            .send()
            .await
            .expect("request")
            .status()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, reqwest::StatusCode::OK);
}

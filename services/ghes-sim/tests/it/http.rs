//! The simulator over real HTTP, as the agent sees it.

use std::io::Write as _;

use license_sync_ghes_sim::{SimConfig, SimHandle, SimStats, start};
use reqwest::StatusCode;

const CSV: &str = "created_at,id,login,email,role,suspended?\n\
2020-01-01T00:00:00Z,1,mona,mona@example.com,site_admin,false\n\
2020-01-01T00:00:00Z,2,hubot,hubot@example.com,user,true\n\
2020-01-01T00:00:00Z,3,octo,octo@example.com,user,false\n";

async fn sim(config: impl FnOnce(&mut SimConfig)) -> (SimHandle, tempfile::NamedTempFile) {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(CSV.as_bytes()).expect("write CSV");
    let mut sim_config = SimConfig::new(file.path());
    config(&mut sim_config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let handle = start(listener, sim_config).await.expect("start");
    (handle, file)
}

fn report_url(handle: &SimHandle) -> String {
    format!("{}/stafftools/reports/all_users.csv", handle.base_url())
}

async fn stats(client: &reqwest::Client, handle: &SimHandle) -> SimStats {
    client
        .get(format!("{}/_sim/stats", handle.base_url()))
        .send()
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats JSON")
}

#[tokio::test]
async fn bad_or_missing_credentials_get_github_style_401() {
    let (handle, _file) = sim(|_| {}).await;
    let client = reqwest::Client::new();

    let wrong = client
        .get(report_url(&handle))
        .basic_auth("site-admin", Some("wrong"))
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = wrong.json().await.expect("JSON body");
    assert_eq!(body["message"], "Bad credentials");
    assert_eq!(
        body["documentation_url"],
        "https://docs.github.com/enterprise-server/rest"
    );

    let missing = client
        .get(report_url(&handle))
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), StatusCode::UNAUTHORIZED);

    // The report only takes basic auth, even with the right token.
    let token_scheme = client
        .get(report_url(&handle))
        .header("authorization", "token ghes-sim-token")
        .send()
        .await
        .expect("request");
    assert_eq!(token_scheme.status(), StatusCode::UNAUTHORIZED);

    let stats = stats(&client, &handle).await;
    assert_eq!(stats.unauthorized, 3);
    assert_eq!(stats.report_200, 0);
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn report_answers_202_until_built_then_200_and_again_after_invalidate() {
    let (handle, file) = sim(|config| config.pending_polls = 2).await;
    let client = reqwest::Client::new();
    let get = || {
        client
            .get(report_url(&handle))
            .basic_auth("site-admin", Some("ghes-sim-token"))
            .send()
    };

    assert_eq!(get().await.expect("1st").status(), StatusCode::ACCEPTED);
    assert_eq!(get().await.expect("2nd").status(), StatusCode::ACCEPTED);
    let ok = get().await.expect("3rd");
    assert_eq!(ok.status(), StatusCode::OK);
    assert_eq!(
        ok.headers().get("content-type").expect("content type"),
        "text/csv"
    );
    assert_eq!(ok.text().await.expect("body"), CSV);

    // The file is re-read at every 200.
    std::fs::write(file.path(), "login\nchanged\n").expect("rewrite");
    assert_eq!(
        get().await.expect("4th").text().await.expect("body"),
        "login\nchanged\n"
    );

    let invalidated = client
        .post(format!("{}/_sim/invalidate", handle.base_url()))
        .send()
        .await
        .expect("invalidate");
    assert!(invalidated.status().is_success());
    assert_eq!(get().await.expect("5th").status(), StatusCode::ACCEPTED);

    let stats = stats(&client, &handle).await;
    assert_eq!(
        (stats.report_requests, stats.report_202, stats.report_200),
        (5, 3, 2)
    );
    assert_eq!(handle.stats(), stats);
    handle.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn fail_first_injects_503_before_the_report() {
    let (handle, _file) = sim(|config| {
        config.fail_first = 2;
        config.pending_polls = 0;
    })
    .await;
    let client = reqwest::Client::new();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = client
            .get(report_url(&handle))
            .basic_auth("site-admin", Some("ghes-sim-token"))
            .send()
            .await
            .expect("request");
        statuses.push(response.status());
    }
    assert_eq!(
        statuses,
        [
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::OK
        ]
    );
    assert_eq!(handle.stats().report_503, 2);
}

#[tokio::test]
async fn license_and_meta_look_like_ghes() {
    let (handle, _file) = sim(|config| config.version = "3.15.1".into()).await;
    let client = reqwest::Client::new();
    let license: serde_json::Value = client
        .get(format!(
            "{}/api/v3/enterprise/settings/license",
            handle.base_url()
        ))
        .header("authorization", "token ghes-sim-token")
        .send()
        .await
        .expect("license")
        .error_for_status()
        .expect("200")
        .json()
        .await
        .expect("JSON");
    assert_eq!(license["seats"], 1000);
    assert_eq!(license["seats_used"], 2, "hubot is suspended");
    assert_eq!(license["seats_available"], 998);
    assert_eq!(license["kind"], "standard");
    assert_eq!(license["days_until_expiration"], 365);
    let expire_at = license["expire_at"].as_str().expect("string");
    assert!(
        expire_at.len() == "2027/02/06 12:41:52 +0000".len() && expire_at.contains('/'),
        "{expire_at}"
    );

    let bearer = client
        .get(format!(
            "{}/api/v3/enterprise/settings/license",
            handle.base_url()
        ))
        .bearer_auth("ghes-sim-token")
        .send()
        .await
        .expect("license");
    assert_eq!(bearer.status(), StatusCode::OK);
    let unauthorized = client
        .get(format!(
            "{}/api/v3/enterprise/settings/license",
            handle.base_url()
        ))
        .bearer_auth("nope")
        .send()
        .await
        .expect("license");
    assert_eq!(unauthorized.status(), StatusCode::UNAUTHORIZED);

    let meta: serde_json::Value = client
        .get(format!("{}/api/v3/meta", handle.base_url()))
        .send()
        .await
        .expect("meta")
        .json()
        .await
        .expect("JSON");
    assert_eq!(meta["installed_version"], "3.15.1");
}

#[tokio::test]
async fn unlimited_license_and_configured_seats_used() {
    let (handle, _file) = sim(|config| {
        config.license_seats = None;
        config.license_seats_used = Some(42);
    })
    .await;
    let license: serde_json::Value = reqwest::Client::new()
        .get(format!(
            "{}/api/v3/enterprise/settings/license",
            handle.base_url()
        ))
        .basic_auth("site-admin", Some("ghes-sim-token"))
        .send()
        .await
        .expect("license")
        .json()
        .await
        .expect("JSON");
    assert_eq!(license["seats"], "unlimited");
    assert_eq!(license["seats_used"], 42);
}

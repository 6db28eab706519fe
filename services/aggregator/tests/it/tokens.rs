//! REST token lifecycle and the failed-authentication limit, over real HTTP and gRPC against the real server on
//! `127.0.0.1:0`: scopes on every route of the router's own table, expiry, revocation within the cache window, the
//! CLI's `token create/list/revoke` (no secret listed, last use shown), the metrics token, and the per-address
//! limit on refused credentials (REST, enrollment, instance credentials) that never throttles a valid credential.

use std::process::Command;
use std::time::{Duration, Instant};

use license_sync_aggregator::admin;
use license_sync_aggregator::config::MetricsToken;
use license_sync_aggregator::store::{NewApiToken, TokenScope};
use license_sync_aggregator::tokens;
use reqwest::Method;
use serde_json::Value;
use time::OffsetDateTime;
use tonic::Code;
use uuid::Uuid;

use crate::control::{Harness, PATIENCE};

const WRITE_METHODS: [Method; 4] = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE];

async fn read_token(harness: &Harness, name: &str) -> String {
    let new = NewApiToken {
        name,
        scope: TokenScope::Read,
        expires_at: None,
    };
    admin::issue_api_token(
        &harness.server().app.store,
        "acme",
        &new,
        OffsetDateTime::now_utc(),
    )
    .await
    .expect("read token")
    .1
}

/// A path of the template with its segments filled: the enterprise `acme`, fresh ids for the others.
fn concrete(template: &str) -> String {
    template
        .replace("{enterprise}", "acme")
        .replace("{server_id}", &Uuid::new_v4().to_string())
        .replace("{request_id}", &Uuid::new_v4().to_string())
}

#[tokio::test]
async fn every_route_of_the_router_takes_read_tokens_for_gets_and_admin_tokens_for_changes() {
    let harness = Harness::start(|_| {}).await;
    let reader = read_token(&harness, "dashboards").await;
    let mut write_routes = 0;
    for template in license_sync_aggregator::rest::route_paths() {
        let path = concrete(&template);
        let enterprise_route = template.contains("{enterprise}");
        // GraphQL is POSTed but only reads (the viewer's login): any live token, 401 without one.
        if template.ends_with("graphql") {
            let query = r#"{"query": "query { viewer { login } }"}"#;
            let (status, body) = harness
                .rest(Method::POST, &path, Some(&reader), Some(query))
                .await;
            assert_eq!(status, 200, "POST {template} with a read token: {body}");
            assert_eq!(body["data"]["viewer"]["login"], "dashboards", "{body}");
            let (status, _) = harness.rest(Method::POST, &path, None, Some(query)).await;
            assert_eq!(status, 401, "POST {template} without a token");
            continue;
        }
        let (get_status, get_body) = harness.rest(Method::GET, &path, Some(&reader), None).await;
        let mut covered = get_status != 405;
        if enterprise_route && covered {
            assert!(
                ![401, 403].contains(&get_status),
                "GET {template} with a read token: {get_status} {get_body}"
            );
            let (status, _) = harness.rest(Method::GET, &path, None, None).await;
            assert_eq!(status, 401, "GET {template} without a token");
        }
        for method in WRITE_METHODS {
            let (status, body) = harness
                .rest(method.clone(), &path, Some(&reader), None)
                .await;
            if status == 405 {
                continue;
            }
            assert!(
                enterprise_route,
                "{method} {template} is served outside an enterprise"
            );
            assert_eq!(status, 403, "{method} {template} with a read token: {body}");
            let message = body["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("`admin` scope"),
                "{method} {template}: {body}"
            );
            assert!(body["documentation_url"].is_string(), "{body}");
            let (status, body) = harness.rest(method.clone(), &path, None, None).await;
            assert_eq!(status, 401, "{method} {template} without a token: {body}");
            // The admin token gets past the scope check (to whatever the handler answers to an empty body).
            let (status, body) = harness
                .rest(method.clone(), &path, Some(&harness.owner_token), None)
                .await;
            assert!(
                ![401, 403].contains(&status),
                "{method} {template} with the admin token: {status} {body}"
            );
            covered = true;
            write_routes += 1;
        }
        assert!(covered, "{template} answered 405 to every method");
    }
    // Upload, members import, retire, enrollment token, Sync now.
    assert!(write_routes >= 5, "only {write_routes} write routes found");
    harness.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_is_refused_with_401_saying_so_without_echoing_it() {
    let harness = Harness::start(|_| {}).await;
    let store = &harness.server().app.store;
    let enterprise = admin::enterprise(store, "acme").await.expect("acme");
    let token = tokens::generate(tokens::API_TOKEN_PREFIX);
    let now = OffsetDateTime::now_utc();
    // Straight into the store: the CLI refuses an expiry in the past.
    let expired = NewApiToken {
        name: "expired",
        scope: TokenScope::Admin,
        expires_at: Some(now - time::Duration::minutes(1)),
    };
    store
        .create_api_token(enterprise.id, &tokens::sha256_hex(&token), &expired, now)
        .await
        .expect("stored");
    let (status, body) = get_licenses(&harness, &token).await;
    assert_eq!(status, 401, "{body}");
    let message = body["message"].as_str().expect("message");
    assert!(message.contains("expired at"), "{message}");
    assert!(!message.contains(&token), "{message}");
    harness.shutdown().await;
}

#[tokio::test]
async fn a_revoked_token_is_refused_by_every_replica_within_the_cache_window() {
    let harness = Harness::start(|config| config.api_token_cache_secs = 1).await;
    // A second replica on the same database, with its own token cache.
    let replica =
        license_sync_aggregator::server::start(harness.server().app.config.as_ref().clone())
            .await
            .expect("second replica");
    let replica_base = format!("http://{}", replica.http_addr);
    let token = read_token(&harness, "soon revoked").await;
    let path = "/enterprises/acme/license-sync-status";
    let http = reqwest::Client::new();
    let bases = [harness.base.clone(), replica_base];
    let status_at = |base: &str| http.get(format!("{base}{path}")).bearer_auth(&token).send();
    // Both replicas check the token, and cache it.
    for base in &bases {
        let status = status_at(base).await.expect("request").status();
        assert_eq!(status, 200, "{base}");
    }
    let store = &harness.server().app.store;
    let enterprise = admin::enterprise(store, "acme").await.expect("acme");
    let revoked_at = Instant::now();
    store
        .revoke_api_token(
            enterprise.id,
            license_sync_aggregator::store::TokenSelector::Name("soon revoked"),
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("revoked");
    for base in &bases {
        loop {
            let status = status_at(base).await.expect("request").status();
            if status == 401 {
                break;
            }
            assert_eq!(status, 200, "{base}");
            assert!(
                revoked_at.elapsed() < PATIENCE,
                "{base}: the revoked token still works"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The caches trust a check for 1 s; the margin is for a slow machine, far below PATIENCE.
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "refused everywhere only after {:?}",
        revoked_at.elapsed()
    );
    replica.shutdown().await.expect("replica stops");
    harness.shutdown().await;
}

async fn get_licenses(harness: &Harness, token: &str) -> (u16, Value) {
    harness
        .rest(
            Method::GET,
            "/enterprises/acme/consumed-licenses",
            Some(token),
            None,
        )
        .await
}

fn cli(harness: &Harness, args: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_license-sync-aggregator"))
        .args(args)
        .env(
            "LICENSE_SYNC_AGGREGATOR_DATABASE_URL",
            &harness.server().app.config.database_url,
        )
        .output()
        .expect("the CLI runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn listed(harness: &Harness) -> Vec<Value> {
    let (ok, stdout, stderr) = cli(harness, &["token", "list", "--enterprise", "acme"]);
    assert!(ok, "{stderr}");
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect()
}

#[tokio::test]
async fn the_cli_creates_lists_and_revokes_tokens_and_the_list_shows_the_last_use_but_no_secret() {
    let harness = Harness::start(|config| config.api_token_cache_secs = 0).await;
    let create = |more: &[&str]| {
        let mut args = vec!["token", "create", "--enterprise", "acme"];
        args.extend_from_slice(more);
        cli(&harness, &args)
    };
    let (ok, stdout, stderr) = create(&[
        "--name",
        "grafana",
        "--scope",
        "read",
        "--expires-in-days",
        "7",
    ]);
    assert!(ok, "{stderr}");
    let token = stdout.trim().to_owned();
    assert!(token.starts_with("lst_"), "{stdout}");
    assert!(stderr.contains("scope read"), "{stderr}");
    let (ok, _, stderr) = create(&["--name", "grafana"]);
    assert!(!ok && stderr.contains("\"grafana\""), "{stderr}");
    let (ok, _, stderr) = create(&["--name", "x", "--expires-at", "2001-01-01"]);
    assert!(!ok && stderr.contains("not in the future"), "{stderr}");

    let (status, body) = get_licenses(&harness, &token).await;
    assert_eq!(status, 200, "{body}");
    // The use is written in the background: wait for it in the list.
    let deadline = Instant::now() + PATIENCE;
    let grafana = loop {
        let tokens = listed(&harness);
        let grafana = tokens
            .into_iter()
            .find(|token| token["name"] == "grafana")
            .expect("listed");
        if grafana["last_used_at"].is_string() {
            break grafana;
        }
        assert!(Instant::now() < deadline, "no last use recorded: {grafana}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(grafana["scope"], "read");
    assert!(grafana["expires_at"].is_string(), "{grafana}");
    assert!(grafana["revoked_at"].is_null(), "{grafana}");
    let (ok, stdout, _) = cli(&harness, &["token", "list", "--enterprise", "acme"]);
    assert!(ok);
    let hash = tokens::sha256_hex(&token);
    assert!(
        !stdout.contains(&token) && !stdout.contains(&hash),
        "{stdout}"
    );
    // The same list over REST, for a read token, without the secret either.
    let (status, body) = harness
        .rest(
            Method::GET,
            "/enterprises/acme/api-tokens",
            Some(&token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let text = body.to_string();
    assert!(text.contains("\"grafana\"") && !text.contains(&token) && !text.contains(&hash));

    let revoke = [
        "token",
        "revoke",
        "--enterprise",
        "acme",
        "--name",
        "grafana",
    ];
    let (ok, _, stderr) = cli(&harness, &revoke);
    assert!(ok, "{stderr}");
    // No cache: refused at once.
    let (status, _) = get_licenses(&harness, &token).await;
    assert_eq!(status, 401);
    let (ok, _, stderr) = cli(&harness, &revoke);
    assert!(!ok && stderr.contains("no live REST token"), "{stderr}");
    let revoked = listed(&harness)
        .into_iter()
        .find(|token| token["name"] == "grafana")
        .expect("still listed");
    assert!(revoked["revoked_at"].is_string(), "{revoked}");
    harness.shutdown().await;
}

async fn get_metrics(harness: &Harness, token: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(format!("{}/metrics", harness.base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("scrape")
}

/// The value of one sample line (`name{labels} value`) of a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

#[tokio::test]
async fn with_a_metrics_token_the_metrics_need_it() {
    let secret = "scrape-secret-0123456789";
    let harness = Harness::start(|config| {
        config.metrics_token = Some(MetricsToken::new(secret));
    })
    .await;
    let missing = get_metrics(&harness, None).await;
    assert_eq!(missing.status(), 401);
    assert_eq!(
        missing
            .headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let wrong = get_metrics(&harness, Some("scrape-secret-0123456788")).await;
    assert_eq!(wrong.status(), 401);
    let right = get_metrics(&harness, Some(secret)).await;
    assert_eq!(right.status(), 200);
    let text = right.text().await.expect("text");
    assert_eq!(
        sample(
            &text,
            "license_sync_auth_failures_total{surface=\"metrics\"}"
        ),
        Some(1.0),
        "only the wrong token counts as a failure"
    );
    harness.shutdown().await;

    // Off by default.
    let open = Harness::start(|_| {}).await;
    assert_eq!(get_metrics(&open, None).await.status(), 200);
    open.shutdown().await;
}

#[tokio::test]
async fn refused_credentials_from_one_address_are_throttled_but_valid_ones_never_are() {
    const ALLOWED: u32 = 3;
    let harness = Harness::start(|config| config.auth_failures_per_minute = ALLOWED).await;
    let path = "/enterprises/acme/consumed-licenses";
    let credential = harness.enrolled(Uuid::new_v4(), "ghes.example.com").await;
    for attempt in 1..=ALLOWED {
        let (status, body) = harness
            .rest(Method::GET, path, Some("lst_guessed"), None)
            .await;
        assert_eq!(status, 401, "attempt {attempt}: {body}");
    }
    let throttled = reqwest::Client::new()
        .get(format!("{}{path}", harness.base))
        .bearer_auth("lst_guessed")
        .send()
        .await
        .expect("request");
    assert_eq!(throttled.status(), 429);
    let retry_after: u64 = throttled
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .expect("Retry-After in seconds");
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    let body: Value = throttled.json().await.expect("JSON");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("too many failed authentications")),
        "{body}"
    );

    // The same address with valid credentials: let in, on every surface.
    let (status, body) = harness
        .rest(Method::GET, path, Some(&harness.owner_token), None)
        .await;
    assert_eq!(status, 200, "{body}");
    harness
        .check_connection(&credential)
        .await
        .expect("a valid credential is never throttled");
    let enrollment_token = harness.enrollment_token().await;
    harness
        .enroll(&enrollment_token, Uuid::new_v4(), "ghes2.example.com")
        .await
        .expect("a valid enrollment token is never throttled");

    // Refused credentials on gRPC from the throttled address: RESOURCE_EXHAUSTED with retry-after.
    let bad_enroll = harness
        .enroll("lse_guessed", Uuid::new_v4(), "ghes3.example.com")
        .await
        .expect_err("bad enrollment token");
    assert_eq!(bad_enroll.code(), Code::ResourceExhausted, "{bad_enroll:?}");
    assert!(bad_enroll.metadata().get("retry-after").is_some());
    let bad_credential = harness
        .check_connection("lsi_guessed")
        .await
        .expect_err("bad credential");
    assert_eq!(
        bad_credential.code(),
        Code::ResourceExhausted,
        "{bad_credential:?}"
    );

    let text = get_metrics(&harness, None)
        .await
        .text()
        .await
        .expect("text");
    let count =
        |family: &str, surface: &str| sample(&text, &format!("{family}{{surface=\"{surface}\"}}"));
    let failures = "license_sync_auth_failures_total";
    let throttled = "license_sync_auth_throttled_total";
    // Successful authentications never count.
    assert_eq!(count(failures, "rest"), Some(f64::from(ALLOWED + 1)));
    assert_eq!(count(throttled, "rest"), Some(1.0));
    assert_eq!(count(failures, "enroll"), Some(1.0));
    assert_eq!(count(throttled, "enroll"), Some(1.0));
    assert_eq!(count(failures, "instance_credential"), Some(1.0));
    assert_eq!(count(throttled, "instance_credential"), Some(1.0));
    harness.shutdown().await;
}

#[tokio::test]
async fn below_the_limit_a_refused_credential_is_the_plain_refusal() {
    let harness = Harness::start(|_| {}).await;
    let refused = harness
        .check_connection("lsi_unknown")
        .await
        .expect_err("bad credential");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = harness
        .enroll("lse_unknown", Uuid::new_v4(), "ghes.example.com")
        .await
        .expect_err("bad token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    harness.shutdown().await;
}

/// Migration 0006 on a database with tokens made before it: they become `admin` without expiry, and descriptions
/// repeated within an enterprise (the old default "owner token") get the token's id appended, so that names are
/// unique; a description used once, or once per enterprise, stays the name.
#[tokio::test]
async fn tokens_made_before_scopes_become_admin_with_unique_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("old.db").display());
    let all = sqlx::migrate!("./migrations/sqlite");
    let before_scopes = sqlx::migrate::Migrator {
        migrations: all
            .migrations
            .iter()
            .filter(|migration| migration.version < 6)
            .cloned()
            .collect::<Vec<_>>()
            .into(),
        ..sqlx::migrate!("./migrations/sqlite")
    };
    let options = url
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .expect("url")
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options).await.expect("pool");
    before_scopes.run(&pool).await.expect("migrations 1-5");
    sqlx::query(
        "INSERT INTO enterprises (id, slug, name, seats_purchased, created_at) \
         VALUES (1, 'acme', 'Acme', 1, 0), (2, 'other', 'Other', 1, 0)",
    )
    .execute(&pool)
    .await
    .expect("enterprises");
    sqlx::query(
        "INSERT INTO api_tokens (id, enterprise_id, token_sha256, description, created_at) VALUES \
         (1, 1, 'h1', 'owner token', 0), (2, 1, 'h2', 'owner token', 0), (3, 1, 'h3', 'ci', 0), \
         (4, 2, 'h4', 'owner token', 0)",
    )
    .execute(&pool)
    .await
    .expect("old tokens");
    pool.close().await;

    let store = license_sync_aggregator::store::open(&url)
        .await
        .expect("migrated");
    let describe = |tokens: Vec<license_sync_aggregator::store::ApiToken>| {
        tokens
            .into_iter()
            .map(|token| (token.name, token.scope, token.expires_at))
            .collect::<Vec<_>>()
    };
    let acme = describe(store.list_api_tokens(1).await.expect("list"));
    assert_eq!(
        acme,
        [
            ("owner token #1".to_owned(), TokenScope::Admin, None),
            ("owner token #2".to_owned(), TokenScope::Admin, None),
            ("ci".to_owned(), TokenScope::Admin, None),
        ]
    );
    let other = describe(store.list_api_tokens(2).await.expect("list"));
    assert_eq!(other, [("owner token".to_owned(), TokenScope::Admin, None)]);
}

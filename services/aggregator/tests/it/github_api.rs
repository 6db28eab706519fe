//! The REST API as GitHub Enterprise clients see it: the same routes under `/api/v3`, the API root and `/user`
//! that `gh auth status` asks, `Link` URLs that keep the prefix, scheme and host the client used (or a proxy's
//! forwarded ones, or `public_url`), and metrics that count an alias under its route's own template.

use license_sync_core::model::{ServerUser, UserRole};
use reqwest::Method;
use serde_json::Value;
use uuid::Uuid;

use crate::control::{Harness, snapshot};

/// `acme` with three people on one instance, so that `per_page=1` makes three pages.
async fn harness_with_people(
    configure: impl FnOnce(&mut license_sync_aggregator::config::AggregatorConfig),
) -> Harness {
    let harness = Harness::start(configure).await;
    let server_id = Uuid::new_v4();
    let credential = harness.enrolled(server_id, "ghes.test").await;
    let mut snap = snapshot(server_id, "ghes.test");
    snap.users = (1..=3)
        .map(|id| ServerUser {
            id,
            login: format!("user{id}"),
            email: format!("user{id}@example.com"),
            role: UserRole::User,
            suspended: false,
            dormant: false,
            created_at: None,
            last_active: None,
            two_factor_enabled: None,
        })
        .collect();
    harness.upload(&credential, &snap).await.expect("synced");
    harness
}

/// The `Link` header of a GET of `path` with the owner token and `headers`.
async fn link_of(harness: &Harness, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request = reqwest::Client::new()
        .get(format!("{}{path}", harness.base))
        .bearer_auth(&harness.owner_token);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("HTTP request");
    assert_eq!(response.status(), 200, "GET {path}");
    response
        .headers()
        .get("link")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_api_is_served_under_api_v3_with_links_that_keep_the_prefix_the_scheme_and_the_host() {
    let harness = harness_with_people(|_| {}).await;
    let host = harness.base.trim_start_matches("http://").to_owned();

    let (status, prefixed) = harness
        .owner_get("/api/v3/enterprises/acme/consumed-licenses")
        .await;
    assert_eq!(status, 200, "{prefixed}");
    let (_, unprefixed) = harness
        .owner_get("/enterprises/acme/consumed-licenses")
        .await;
    assert_eq!(prefixed, unprefixed, "the alias answers the same");
    assert_eq!(prefixed["total_seats_consumed"], 3);

    let path = "/api/v3/enterprises/acme/consumed-licenses?per_page=1";
    let link = link_of(&harness, path, &[]).await;
    assert!(
        link.contains(&format!(
            "<http://{host}/api/v3/enterprises/acme/consumed-licenses?per_page=1&page=2>; rel=\"next\""
        )),
        "{link}"
    );
    let link = link_of(
        &harness,
        "/enterprises/acme/consumed-licenses?per_page=1",
        &[],
    )
    .await;
    assert!(
        link.contains(&format!(
            "<http://{host}/enterprises/acme/consumed-licenses?per_page=1&page=2>"
        )),
        "without the prefix, links have none: {link}"
    );
    // Behind a proxy: its scheme and host, the client's prefix.
    let forwarded = [
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "licenses.example.com, inner.proxy"),
    ];
    let link = link_of(&harness, path, &forwarded).await;
    assert!(
        link.contains(
            "<https://licenses.example.com/api/v3/enterprises/acme/consumed-licenses?per_page=1&page=3>; rel=\"last\""
        ),
        "{link}"
    );
    // A forwarded "host" that is not one is ignored, not copied into the header.
    let link = link_of(
        &harness,
        path,
        &[("x-forwarded-host", "evil>; rel=\"next\"")],
    )
    .await;
    assert!(link.contains(&format!("<http://{host}/api/v3/")), "{link}");
    assert!(!link.contains("evil"), "{link}");

    // The alias is counted under the route's own template, beside the unprefixed request.
    let metrics = harness.metrics().await;
    let series = "license_sync_http_requests_total{route=\"/enterprises/{enterprise}/consumed-licenses\",method=\"GET\",status=\"200\"}";
    let count: f64 = metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{series} missing from:\n{metrics}"));
    assert_eq!(
        count, 6.0,
        "two direct GETs and four of `link_of`: {metrics}"
    );
    assert!(!metrics.contains("route=\"/api/v3"), "{metrics}");
    harness.shutdown().await;
}

#[tokio::test]
async fn public_url_wins_over_forwarded_headers_and_keeps_the_clients_prefix() {
    let harness = harness_with_people(|config| {
        config.public_url = Some("https://licenses.example.com/".into());
    })
    .await;
    let forwarded = [
        ("x-forwarded-proto", "http"),
        ("x-forwarded-host", "elsewhere.test"),
    ];
    let link = link_of(
        &harness,
        "/api/v3/enterprises/acme/consumed-licenses?per_page=2",
        &forwarded,
    )
    .await;
    assert_eq!(
        link,
        "<https://licenses.example.com/api/v3/enterprises/acme/consumed-licenses?per_page=2&page=2>; rel=\"next\", \
         <https://licenses.example.com/api/v3/enterprises/acme/consumed-licenses?per_page=2&page=2>; rel=\"last\""
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn the_api_root_and_user_answer_like_github_for_good_bad_and_missing_tokens() {
    let harness = Harness::start(|_| {}).await;
    let host = harness.base.trim_start_matches("http://").to_owned();
    for root in ["/", "/api/v3", "/api/v3/"] {
        let (status, body) = harness.rest(Method::GET, root, None, None).await;
        assert_eq!(status, 200, "GET {root} without a token: {body}");
        let (status, body) = harness.owner_get(root).await;
        assert_eq!(status, 200, "GET {root}: {body}");
        let prefix = if root == "/" { "" } else { "/api/v3" };
        assert_eq!(
            body["current_user_url"],
            format!("http://{host}{prefix}/user"),
            "{body}"
        );
        assert_eq!(
            body["enterprise_consumed_licenses_url"],
            format!(
                "http://{host}{prefix}/enterprises/{{enterprise}}/consumed-licenses{{?per_page,page}}"
            ),
        );
        let (status, body) = harness
            .rest(Method::GET, root, Some("lst_not-a-token"), None)
            .await;
        assert_eq!(status, 401, "GET {root} with a bad token: {body}");
        assert_eq!(body["message"], "Bad credentials", "{body}");
        assert!(body["documentation_url"].is_string(), "{body}");
    }

    let (status, user) = harness.owner_get("/api/v3/user").await;
    assert_eq!(status, 200, "{user}");
    // The harness's owner token is named "test".
    assert_eq!(user["login"], "test", "{user}");
    assert_eq!(user["type"], "User", "{user}");
    assert!(user["id"].is_i64(), "{user}");
    assert_eq!(user["license_sync"]["enterprise"], "acme", "{user}");
    assert_eq!(user["license_sync"]["scope"], "admin", "{user}");
    let (status, body) = harness.rest(Method::GET, "/api/v3/user", None, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["message"], "Requires authentication", "{body}");
    let (status, body) = harness
        .rest(Method::GET, "/user", Some("lst_not-a-token"), None)
        .await;
    assert_eq!(
        (status, &body["message"]),
        (401, &Value::from("Bad credentials"))
    );

    // GraphQL: the viewer's login; any other query is a GraphQL error saying what is served.
    let (status, body) = harness
        .rest(
            Method::POST,
            "/api/graphql",
            Some(&harness.owner_token),
            Some(r#"{"query":"query UserCurrent{viewer{login}}"}"#),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["viewer"]["login"], "test", "{body}");
    let (status, body) = harness
        .rest(
            Method::POST,
            "/api/graphql",
            Some(&harness.owner_token),
            Some(r#"{"query":"{ repository(owner: \"a\", name: \"b\") { id } }"}"#),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let message = body["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(message.contains("viewer { login }"), "{body}");
    harness.shutdown().await;
}

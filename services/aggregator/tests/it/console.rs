//! The web console over real HTTP (`/console/…` on the aggregator's HTTP port), with a cookie-keeping client that
//! does not follow redirects, so that every 303 and cookie is asserted: sign-in with tokens and one-time links, the
//! cookie's flags, sign-out and a session's end, CSRF on every change, 404 across enterprises, each page's contract
//! elements and figures for seeded data, search and pagination, Sync now, uploads, and a session opened on one
//! replica accepted by another sharing the store.

use std::sync::Arc;

use license_sync_aggregator::app::App;
use license_sync_aggregator::console::issue_console_link;
use license_sync_aggregator::server;
use license_sync_aggregator::store::{Arrival, Instance, NewApiToken, TokenScope, TokenSelector};
use license_sync_core::model::SourceReport;
use license_sync_core::snapshot::{Snapshot, SnapshotMeta, UsageFile};
use reqwest::StatusCode;
use reqwest::header::{LOCATION, SET_COOKIE};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::control::Harness;
use crate::store_suite::user;

const HOSTNAME: &str = "ghes-1.example.com";

/// A browser: keeps cookies, follows no redirect.
fn browser() -> reqwest::Client {
    reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

struct Page {
    status: StatusCode,
    location: Option<String>,
    set_cookie: Vec<String>,
    body: String,
}

async fn read(response: reqwest::Response) -> Page {
    let status = response.status();
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let set_cookie = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::to_owned)
        .collect();
    let body = response.text().await.expect("body");
    Page {
        status,
        location,
        set_cookie,
        body,
    }
}

async fn get(client: &reqwest::Client, base: &str, path: &str) -> Page {
    read(
        client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("GET"),
    )
    .await
}

async fn post_form(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    form: &[(&str, &str)],
) -> Page {
    read(
        client
            .post(format!("{base}{path}"))
            .form(form)
            .send()
            .await
            .expect("POST"),
    )
    .await
}

async fn sign_in(client: &reqwest::Client, base: &str, token: &str) -> Page {
    post_form(client, base, "/console/sign-in", &[("token", token)]).await
}

/// The page's CSRF token (`meta[name=csrf-token]`).
fn csrf(body: &str) -> String {
    let marker = "name=\"csrf-token\" content=\"";
    let start = body.find(marker).expect("csrf meta") + marker.len();
    body[start..start + 64].to_owned()
}

/// The text right after the opening tag of the element with this id (up to the next tag).
fn text_of<'b>(body: &'b str, id: &str) -> &'b str {
    let marker = format!("id=\"{id}\"");
    let at = body
        .find(&marker)
        .unwrap_or_else(|| panic!("#{id} in the page"));
    let open_end = at + body[at..].find('>').expect("tag end") + 1;
    let close = open_end + body[open_end..].find('<').expect("next tag");
    &body[open_end..close]
}

/// The opening tag of the element with this id.
fn tag_of<'b>(body: &'b str, id: &str) -> &'b str {
    let marker = format!("id=\"{id}\"");
    let at = body
        .find(&marker)
        .unwrap_or_else(|| panic!("#{id} in the page"));
    let start = body[..at].rfind('<').expect("tag start");
    let end = at + body[at..].find('>').expect("tag end");
    &body[start..=end]
}

fn count(body: &str, needle: &str) -> usize {
    body.matches(needle).count()
}

fn snapshot_of(server_id: Uuid, users: usize) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::new_v4(),
            instance: license_sync_core::model::InstanceIdentity {
                server_id,
                hostname: HOSTNAME.to_owned(),
                ghes_version: "3.14.2".into(),
            },
            generated_at: OffsetDateTime::now_utc() - time::Duration::minutes(1),
            license: None,
            source_report: SourceReport::default(),
        },
        users: (1..=users as i64)
            .map(|id| user(id, &format!("user{id}")))
            .collect(),
    }
}

/// Enrolls an instance of `acme` and commits a snapshot of `users` users through the app (so the view has it).
async fn seeded(app: &Arc<App>, users: usize) -> Instance {
    let server_id = Uuid::new_v4();
    let (instance, _) =
        license_sync_aggregator::admin::add_instance(&app.store, "acme", server_id, HOSTNAME)
            .await
            .expect("instance");
    app.commit_snapshot(
        &instance,
        snapshot_of(server_id, users),
        Arrival::Connect,
        None,
    )
    .await
    .expect("commit");
    instance
}

/// Every signed-in page's frame: the navigation, the sign-out form and the CSRF token.
fn assert_signed_in_frame(page: &Page, path: &str) {
    assert_eq!(page.status, StatusCode::OK, "{path}: {}", page.body);
    for element in [
        "id=\"console-nav\"",
        "id=\"sign-out\"",
        "id=\"sign-out-submit\"",
        "name=\"csrf-token\"",
        "name=\"csrf_token\"",
    ] {
        assert!(page.body.contains(element), "{path}: {element}");
    }
    for link in [
        "",
        "instances",
        "people",
        "duplicates",
        "upload",
        "downloads",
    ] {
        assert!(
            page.body
                .contains(&format!("href=\"/console/acme/{link}\"")),
            "{path}: nav link {link:?}"
        );
    }
    assert_eq!(count(&page.body, "<h1"), 1, "{path}: one h1");
}

#[tokio::test]
async fn a_token_signs_in_with_a_strict_cookie_and_bad_or_revoked_tokens_are_refused() {
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    let store = &harness.server().app.store;
    let client = browser();

    // Browsers asking for `/` go to the console; API clients keep the JSON 404.
    let root = read(
        client
            .get(format!("{base}/"))
            .header("accept", "text/html,application/xhtml+xml")
            .send()
            .await
            .expect("GET /"),
    )
    .await;
    assert_eq!(root.status, StatusCode::SEE_OTHER);
    assert_eq!(root.location.as_deref(), Some("/console/"));
    // Other clients get GitHub's API root, as `gh` expects.
    let api_root = get(&client, base, "/").await;
    assert_eq!(api_root.status, StatusCode::OK);
    assert!(
        api_root.body.contains("\"current_user_url\""),
        "{}",
        api_root.body
    );

    let home = get(&client, base, "/console/").await;
    assert_eq!(home.status, StatusCode::SEE_OTHER);
    assert_eq!(home.location.as_deref(), Some("/console/sign-in"));
    let form = get(&client, base, "/console/sign-in").await;
    assert_eq!(form.status, StatusCode::OK);
    for element in [
        "id=\"sign-in\"",
        "action=\"/console/sign-in\"",
        "id=\"token\"",
        "type=\"password\"",
        "for=\"token\"",
        "id=\"sign-in-submit\"",
    ] {
        assert!(form.body.contains(element), "{element}");
    }
    // Pages without a session go to the sign-in page.
    let overview = get(&client, base, "/console/acme/").await;
    assert_eq!(overview.location.as_deref(), Some("/console/sign-in"));

    let unknown = sign_in(&client, base, "lst_not-a-token").await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    assert!(text_of(&unknown.body, "sign-in-error").contains("Bad credentials"));
    assert!(unknown.set_cookie.is_empty());
    let revoked = license_sync_aggregator::admin::create_api_token(store, "acme", "revoked")
        .await
        .expect("token");
    let acme = store
        .enterprise_by_slug("acme")
        .await
        .expect("read")
        .expect("acme");
    store
        .revoke_api_token(
            acme.id,
            TokenSelector::Name("revoked"),
            OffsetDateTime::now_utc(),
        )
        .await
        .expect("revoke");
    let refused = sign_in(&client, base, &revoked).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert!(refused.body.contains("id=\"sign-in-error\""));
    assert!(
        !refused.body.contains(&revoked),
        "the token is never echoed"
    );
    let now = OffsetDateTime::now_utc();
    let (_, expired) = license_sync_aggregator::admin::issue_api_token(
        store,
        "acme",
        &NewApiToken {
            name: "expired",
            scope: TokenScope::Admin,
            expires_at: Some(now - time::Duration::minutes(1)),
        },
        now - time::Duration::hours(1),
    )
    .await
    .expect("token");
    let refused = sign_in(&client, base, &expired).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    // The refusal is a heading, the reason as a sentence, then what to do: no run-on text.
    let reason = text_of(&refused.body, "sign-in-error");
    assert!(
        reason.starts_with("Bad credentials: ") && reason.contains("expired at"),
        "{reason}"
    );
    assert!(text_of(&refused.body, "sign-in-hint").contains("not expired"));

    let signed = sign_in(&client, base, &harness.owner_token).await;
    assert_eq!(signed.status, StatusCode::SEE_OTHER, "{}", signed.body);
    assert_eq!(signed.location.as_deref(), Some("/console/acme/"));
    let cookie = signed.set_cookie.first().expect("a session cookie");
    for flag in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=43200",
    ] {
        assert!(cookie.contains(flag), "{flag} in {cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    assert!(!cookie.contains(&harness.owner_token), "{cookie}");
    let home = get(&client, base, "/console/").await;
    assert_eq!(home.location.as_deref(), Some("/console/acme/"));
    let slashless = get(&client, base, "/console/acme").await;
    assert_eq!(slashless.location.as_deref(), Some("/console/acme/"));
    let unknown_page = get(&client, base, "/console/acme/nothing-here").await;
    assert_eq!(unknown_page.status, StatusCode::NOT_FOUND);
    assert!(unknown_page.body.starts_with("<!DOCTYPE html>"));
    let overview = get(&client, base, "/console/acme/").await;
    assert_signed_in_frame(&overview, "/console/acme/");

    // Behind an HTTPS ingress the cookie is Secure.
    let behind_tls = read(
        browser()
            .post(format!("{base}/console/sign-in"))
            .header("x-forwarded-proto", "https")
            .form(&[("token", harness.owner_token.as_str())])
            .send()
            .await
            .expect("POST"),
    )
    .await;
    assert!(
        behind_tls
            .set_cookie
            .iter()
            .any(|cookie| cookie.contains("; Secure")),
        "{:?}",
        behind_tls.set_cookie
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn refused_sign_ins_are_limited_per_address_like_rest_authentication() {
    let harness = Harness::start(|config| config.auth_failures_per_minute = 2).await;
    let base = &harness.base;
    let client = browser();
    for _ in 0..2 {
        assert_eq!(
            sign_in(&client, base, "lst_guess").await.status,
            StatusCode::UNAUTHORIZED
        );
    }
    let throttled = sign_in(&client, base, "lst_guess").await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    // Shown as a sentence under the refusal's heading.
    assert!(
        text_of(&throttled.body, "sign-in-error").starts_with("Too many failed authentications")
    );
    let link = get(&client, base, "/console/sign-in/link?token=lsl_guess").await;
    assert_eq!(
        link.status,
        StatusCode::TOO_MANY_REQUESTS,
        "links count too"
    );
    // A valid token is always let in.
    assert_eq!(
        sign_in(&client, base, &harness.owner_token).await.status,
        StatusCode::SEE_OTHER
    );
    assert!(
        harness
            .metrics()
            .await
            .contains("license_sync_auth_failures_total{surface=\"console\"}")
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn a_sign_in_link_works_once_and_not_after_its_expiry() {
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    let store = &harness.server().app.store;
    let acme = store
        .enterprise_by_slug("acme")
        .await
        .expect("read")
        .expect("acme");
    let link = issue_console_link(store, &acme, None).await.expect("link");
    let url = link.url(base);
    assert!(
        url.starts_with(&format!("{base}/console/sign-in/link?token=lsl_")),
        "{url}"
    );
    let client = browser();
    let opened = read(client.get(&url).send().await.expect("GET link")).await;
    assert_eq!(opened.status, StatusCode::SEE_OTHER, "{}", opened.body);
    assert_eq!(opened.location.as_deref(), Some("/console/acme/"));
    assert!(opened.set_cookie.iter().any(|c| c.contains("HttpOnly")));
    assert_signed_in_frame(&get(&client, base, "/console/acme/").await, "overview");

    let again = read(browser().get(&url).send().await.expect("GET link")).await;
    assert_eq!(again.status, StatusCode::UNAUTHORIZED);
    assert!(text_of(&again.body, "sign-in-error").contains("used already"));
    assert!(again.set_cookie.is_empty());

    let expired = "lsl_expiredexpiredexpired";
    let now = OffsetDateTime::now_utc();
    store
        .create_console_link(
            acme.id,
            &license_sync_aggregator::tokens::sha256_hex(expired),
            now - time::Duration::seconds(1),
            now - time::Duration::minutes(15),
        )
        .await
        .expect("link");
    let late = get(
        &browser(),
        base,
        &format!("/console/sign-in/link?token={expired}"),
    )
    .await;
    assert_eq!(late.status, StatusCode::UNAUTHORIZED);
    assert!(late.set_cookie.is_empty());
    harness.shutdown().await;
}

#[tokio::test]
async fn sign_out_needs_its_csrf_token_and_ends_the_session_as_does_the_token_expiring() {
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    let client = browser();
    sign_in(&client, base, &harness.owner_token).await;
    let overview = get(&client, base, "/console/acme/").await;
    let token = csrf(&overview.body);

    let forged = post_form(&client, base, "/console/sign-out", &[]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(text_of(&forged.body, "error-message").contains("nothing was changed"));
    // A signed-in refusal keeps the navigation, so that it is not a dead end.
    assert!(forged.body.contains("id=\"console-nav\""));
    assert!(
        !forged.body.contains("aria-current"),
        "no page of the navigation is current"
    );
    let wrong = post_form(
        &client,
        base,
        "/console/sign-out",
        &[("csrf_token", &"0".repeat(64))],
    )
    .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    assert_eq!(
        get(&client, base, "/console/acme/").await.status,
        StatusCode::OK
    );

    let out = post_form(
        &client,
        base,
        "/console/sign-out",
        &[("csrf_token", &token)],
    )
    .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(out.location.as_deref(), Some("/console/sign-in"));
    assert!(out.set_cookie.iter().any(|c| c.contains("Max-Age=0")));
    let after = get(&client, base, "/console/acme/").await;
    assert_eq!(after.location.as_deref(), Some("/console/sign-in"));

    // A session lives no longer than the token it was opened with.
    let store = &harness.server().app.store;
    let now = OffsetDateTime::now_utc();
    let (_, short) = license_sync_aggregator::admin::issue_api_token(
        store,
        "acme",
        &NewApiToken {
            name: "short",
            scope: TokenScope::Admin,
            expires_at: Some(now + time::Duration::seconds(2)),
        },
        now,
    )
    .await
    .expect("token");
    let client = browser();
    assert_eq!(
        sign_in(&client, base, &short).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(
        get(&client, base, "/console/acme/").await.status,
        StatusCode::OK
    );
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let ended = get(&client, base, "/console/acme/").await;
    assert_eq!(ended.location.as_deref(), Some("/console/sign-in"));
    harness.shutdown().await;
}

#[tokio::test]
async fn changes_without_the_right_csrf_token_or_by_a_read_session_are_refused_and_change_nothing()
{
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    let app = &harness.server().app;
    let instance = seeded(app, 3).await;
    let client = browser();
    sign_in(&client, base, &harness.owner_token).await;
    let retire = format!("/console/acme/instances/{}/retire", instance.server_id);
    let confirm = get(&client, base, &retire).await;
    assert_signed_in_frame(&confirm, &retire);
    assert!(confirm.body.contains("id=\"confirm-retire\""));
    let token = csrf(&confirm.body);
    for form in [vec![], vec![("csrf_token", "f".repeat(64))]] {
        let form: Vec<(&str, &str)> = form.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let refused = post_form(&client, base, &retire, &form).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
        let sync = format!("/console/acme/instances/{}/sync-now", instance.server_id);
        assert_eq!(
            post_form(&client, base, &sync, &form).await.status,
            StatusCode::FORBIDDEN
        );
    }
    let still = app
        .store
        .instance_by_server_id(instance.enterprise_id, instance.server_id)
        .await
        .expect("read")
        .expect("instance");
    assert!(still.retired_at.is_none(), "nothing was retired");

    // A `read` token's session may look, not change.
    let now = OffsetDateTime::now_utc();
    let (_, reader) = license_sync_aggregator::admin::issue_api_token(
        &app.store,
        "acme",
        &NewApiToken {
            name: "reader",
            scope: TokenScope::Read,
            expires_at: None,
        },
        now,
    )
    .await
    .expect("token");
    let reading = browser();
    sign_in(&reading, base, &reader).await;
    let page = get(&reading, base, &retire).await;
    assert!(page.body.contains("id=\"read-only-notice\""));
    assert!(!confirm.body.contains("id=\"read-only-notice\""));
    let refused = post_form(
        &reading,
        base,
        &retire,
        &[("csrf_token", &csrf(&page.body))],
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert!(text_of(&refused.body, "error-message").contains("`read` token"));

    let retired = post_form(&client, base, &retire, &[("csrf_token", &token)]).await;
    assert_eq!(retired.status, StatusCode::SEE_OTHER, "{}", retired.body);
    let listed = get(&client, base, "/console/acme/instances").await;
    assert!(!listed.body.contains(&instance.server_id.to_string()));
    harness.shutdown().await;
}

#[tokio::test]
async fn a_session_of_one_enterprise_gets_404_on_another_enterprises_pages() {
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    license_sync_aggregator::admin::create_enterprise(
        &harness.server().app.store,
        "other",
        "Other",
        5,
    )
    .await
    .expect("enterprise");
    let client = browser();
    sign_in(&client, base, &harness.owner_token).await;
    for path in [
        "/console/other/",
        "/console/other/instances",
        "/console/other/people",
        "/console/other/downloads/consumed-licenses.csv",
        "/console/nobody/",
        "/console/acme/people/no-such-person",
        "/console/acme/no-such-page",
    ] {
        let page = get(&client, base, path).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}");
        assert!(
            page.body.starts_with("<!DOCTYPE html>"),
            "{path}: an HTML page"
        );
        // Signed in: the error page has the navigation of the session's own enterprise.
        assert!(
            page.body.contains("id=\"console-nav\""),
            "{path}: the navigation"
        );
        assert!(
            page.body.contains("href=\"/console/acme/people\""),
            "{path}"
        );
        assert!(!page.body.contains("/console/other/people"), "{path}");
    }
    // Signed out, the same page has no navigation: there is no session to show.
    let signed_out = get(&browser(), base, "/console/acme/no-such-page").await;
    assert_eq!(signed_out.status, StatusCode::NOT_FOUND);
    assert!(!signed_out.body.contains("id=\"console-nav\""));
    assert!(signed_out.body.contains("Back to the console"));
    // Changes too, even with the session's own CSRF token.
    let token = csrf(&get(&client, base, "/console/acme/").await.body);
    let changed = post_form(
        &client,
        base,
        &format!("/console/other/instances/{}/sync-now", Uuid::new_v4()),
        &[("csrf_token", &token)],
    )
    .await;
    assert_eq!(changed.status, StatusCode::NOT_FOUND);
    harness.shutdown().await;
}

#[tokio::test]
async fn every_page_renders_its_contract_elements_and_the_seeded_figures() {
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    let app = &harness.server().app;
    let acme = app
        .store
        .enterprise_by_slug("acme")
        .await
        .expect("read")
        .expect("acme");
    app.store
        .set_seats_purchased(acme.id, 2)
        .await
        .expect("seats");
    let instance = seeded(app, 3).await;
    let client = browser();
    sign_in(&client, base, &harness.owner_token).await;

    let overview = get(&client, base, "/console/acme/").await;
    assert_signed_in_frame(&overview, "overview");
    assert_eq!(text_of(&overview.body, "consumed"), "3");
    assert_eq!(text_of(&overview.body, "purchased"), "2");
    assert_eq!(text_of(&overview.body, "overage"), "1");
    assert!(tag_of(&overview.body, "overage").contains("over"));
    let peak_at = overview.body.find("id=\"peak\"").expect("#peak");
    let today = license_sync_aggregator::time_format::utc_date(OffsetDateTime::now_utc());
    assert!(
        overview.body[peak_at..peak_at + 200].contains(">3<"),
        "peak count"
    );
    assert!(
        overview.body[peak_at..peak_at + 200].contains(&today),
        "peak date"
    );
    assert!(overview.body.contains("<svg id=\"usage-chart\""));
    // One day of history: a short line per series with its value written, as a polyline of one point draws nothing.
    assert!(overview.body.contains("<line class=\"series-consumed\""));
    assert!(overview.body.contains(">3 consumed</text>"));
    assert!(overview.body.contains(">2 purchased</text>"));
    assert!(overview.body.contains("id=\"instance-usage\""));
    assert!(overview.body.contains(&format!(
        "<th scope=\"row\">{HOSTNAME}</th><td>3</td><td>3</td>"
    )));
    let short = get(&client, base, "/console/acme/?days=7").await;
    assert!(short.body.contains("last 7 days"));
    assert_eq!(
        get(&client, base, "/console/acme/?days=0").await.status,
        StatusCode::UNPROCESSABLE_ENTITY
    );

    let instances = get(&client, base, "/console/acme/instances").await;
    assert_signed_in_frame(&instances, "instances");
    assert!(instances.body.contains("id=\"instances\""));
    assert!(
        instances
            .body
            .contains(&format!("data-server-id=\"{}\"", instance.server_id))
    );
    assert!(
        instances
            .body
            .contains("<span class=\"sync-state\">GitHub Connect server usage synced</span>")
    );
    assert!(instances.body.contains(&format!(
        "action=\"/console/acme/instances/{}/sync-now\"",
        instance.server_id
    )));
    assert!(instances.body.contains("class=\"sync-now\""));
    assert!(instances.body.contains("class=\"retire\""));
    assert!(
        instances
            .body
            .contains("<span class=\"user-count\">3</span> users")
    );
    // Dates read as `2026-12-03 12:34 UTC`, with the exact RFC 3339 time in `datetime`.
    let marker = "<span class=\"last-sync-date\"><time class=\"moment\" datetime=\"";
    let at = instances
        .body
        .find(marker)
        .expect("the last sync as a <time>")
        + marker.len();
    let (exact, rest) = instances.body[at..].split_once("\">").expect("datetime");
    let shown = &rest[..rest.find('<').expect("</time>")];
    let parsed = OffsetDateTime::parse(exact, &time::format_description::well_known::Rfc3339)
        .expect("datetime is RFC 3339");
    assert_eq!(
        shown,
        format!(
            "{} {:02}:{:02} UTC",
            license_sync_aggregator::time_format::utc_date(parsed),
            parsed.hour(),
            parsed.minute()
        )
    );
    assert!(instances.body.contains("id=\"create-enrollment-token\""));
    let created = post_form(
        &client,
        base,
        "/console/acme/enrollment-tokens",
        &[
            ("csrf_token", &csrf(&instances.body)),
            ("expires_in_hours", "2"),
        ],
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    assert!(tag_of(&created.body, "enrollment-token").contains("value=\"lse_"));

    let people = get(&client, base, "/console/acme/people").await;
    assert_signed_in_frame(&people, "people");
    for element in [
        "id=\"people-search\"",
        "id=\"q\"",
        "id=\"filter\"",
        "id=\"people\"",
        "id=\"compare-form\"",
    ] {
        assert!(people.body.contains(element), "{element}");
    }
    assert_eq!(text_of(&people.body, "people-total"), "3");
    assert_eq!(count(&people.body, "data-person-id="), 3);
    let first = format!("server:{HOSTNAME}:1");
    assert!(
        people
            .body
            .contains(&format!("href=\"/console/acme/people/{first}\""))
    );
    assert!(
        people
            .body
            .contains(&format!("name=\"compare\" value=\"{first}\""))
    );
    assert!(people.body.contains("user1@example.com"));

    let person = get(&client, base, &format!("/console/acme/people/{first}")).await;
    assert_signed_in_frame(&person, "person");
    assert!(person.body.contains("id=\"explanation\""));
    assert!(
        person
            .body
            .contains(&format!("class=\"account\" data-account=\"{HOSTNAME}:1\""))
    );
    assert!(person.body.contains("Consumes a license"));
    assert!(person.body.contains("unmatched"));
    let missing = get(&client, base, "/console/acme/people/server:nowhere:9").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    let second = format!("server:{HOSTNAME}:2");
    for query in [
        format!("a={first}&b={second}"),
        format!("compare={first}&compare={second}"),
    ] {
        let compared = get(&client, base, &format!("/console/acme/compare?{query}")).await;
        assert_signed_in_frame(&compared, "compare");
        assert!(tag_of(&compared.body, "comparison").contains("data-licenses=\"2\""));
        assert!(
            compared
                .body
                .contains(&format!("data-account=\"{HOSTNAME}:2\""))
        );
    }
    let one = get(&client, base, &format!("/console/acme/compare?a={first}")).await;
    assert_eq!(one.status, StatusCode::UNPROCESSABLE_ENTITY);

    let duplicates = get(&client, base, "/console/acme/duplicates").await;
    assert_signed_in_frame(&duplicates, "duplicates");
    assert!(duplicates.body.contains("id=\"duplicates\""));

    let upload = get(&client, base, "/console/acme/upload").await;
    assert_signed_in_frame(&upload, "upload");
    assert!(upload.body.contains("id=\"upload\""));
    assert!(upload.body.contains("enctype=\"multipart/form-data\""));
    assert!(tag_of(&upload.body, "usage-file").contains("name=\"file\""));

    let downloads = get(&client, base, "/console/acme/downloads").await;
    assert_signed_in_frame(&downloads, "downloads");
    assert!(
        tag_of(&downloads.body, "download-csv")
            .contains("href=\"/console/acme/downloads/consumed-licenses.csv\"")
    );
    let csv = get(
        &client,
        base,
        "/console/acme/downloads/consumed-licenses.csv",
    )
    .await;
    assert_eq!(csv.status, StatusCode::OK);
    // The REST report's bytes, with the session in place of the token.
    let rest_csv = reqwest::Client::new()
        .get(format!("{base}/enterprises/acme/consumed-licenses.csv"))
        .bearer_auth(&harness.owner_token)
        .send()
        .await
        .expect("GET the REST report")
        .text()
        .await
        .expect("the REST report");
    assert_eq!(csv.body, rest_csv);
    assert!(csv.body.starts_with("GitHub com login,"), "{}", csv.body);
    assert_eq!(
        csv.body.lines().count(),
        1 + 3,
        "a header and the 3 consuming people"
    );
    assert_eq!(
        get(
            &browser(),
            base,
            "/console/acme/downloads/consumed-licenses.csv"
        )
        .await
        .location
        .as_deref(),
        Some("/console/sign-in"),
        "the report needs a session"
    );

    // The assets are served from the binary; the pages go through the HTTP metrics, labelled by route template.
    let css = get(&browser(), base, "/console/assets/console.css").await;
    assert_eq!(css.status, StatusCode::OK);
    assert!(css.body.contains(":focus-visible"));
    let metrics = harness.metrics().await;
    assert!(
        metrics.contains("route=\"/console/{enterprise}/people/{person_id}\""),
        "{metrics}"
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn people_are_searched_filtered_and_paginated_on_the_server() {
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    seeded(&harness.server().app, 120).await;
    let client = browser();
    sign_in(&client, base, &harness.owner_token).await;

    let first = get(&client, base, "/console/acme/people").await;
    assert_eq!(text_of(&first.body, "people-total"), "120");
    assert_eq!(count(&first.body, "data-person-id="), 50);
    assert!(
        first
            .body
            .contains("rel=\"next\" href=\"/console/acme/people?page=2\"")
    );
    assert!(!first.body.contains("rel=\"prev\""));
    let last = get(&client, base, "/console/acme/people?page=3").await;
    assert_eq!(count(&last.body, "data-person-id="), 20);
    assert!(last.body.contains("rel=\"prev\""));
    assert!(!last.body.contains("rel=\"next\""));

    for (query, expected) in [
        ("q=USER11", 11),
        ("q=user7%40example.com", 1),
        (&format!("q={HOSTNAME}:42") as &str, 1),
        ("q=nobody", 0),
        ("filter=server", 120),
        ("filter=cloud", 0),
        ("filter=both", 0),
        ("q=user11&filter=server", 11),
    ] {
        let page = get(&client, base, &format!("/console/acme/people?{query}")).await;
        assert_eq!(page.status, StatusCode::OK, "{query}");
        assert_eq!(
            text_of(&page.body, "people-total"),
            expected.to_string(),
            "{query}"
        );
        assert_eq!(
            count(&page.body, "data-person-id="),
            expected.min(50),
            "{query}"
        );
    }
    // The search and filter carry over to the next page's link.
    let many = get(&client, base, "/console/acme/people?q=user&filter=server").await;
    assert!(
        many.body
            .contains("href=\"/console/acme/people?q=user&amp;filter=server&amp;page=2\""),
        "next link"
    );
    // Cloud members: one joins user5's account (by verified email), one has no server account.
    let members = serde_json::json!([
        {"id": 501, "login": "user5-cloud", "name": "Five Cloud", "verified_emails": ["user5@example.com"],
         "consumes_license": true},
        {"id": 900, "login": "zz-cloud-only", "name": "Only Clouds", "verified_emails": ["zz@cloud.example"],
         "consumes_license": true}
    ]);
    let (status, body) = harness
        .rest(
            reqwest::Method::PUT,
            "/enterprises/acme/cloud-members",
            Some(&harness.owner_token),
            Some(&members.to_string()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for (query, expected) in [
        ("", 121),
        ("filter=both", 1),
        ("filter=cloud", 1),
        ("filter=server", 119),
        ("q=only%20clouds", 1),
        ("q=five&filter=both", 1),
        ("q=five&filter=server", 0),
    ] {
        let page = get(&client, base, &format!("/console/acme/people?{query}")).await;
        assert_eq!(
            text_of(&page.body, "people-total"),
            expected.to_string(),
            "{query}"
        );
    }
    let both = get(&client, base, "/console/acme/people?filter=both").await;
    assert!(both.body.contains("data-person-id=\"cloud:501\""));
    let explained = get(&client, base, "/console/acme/people/cloud:501").await;
    assert!(
        explained
            .body
            .contains(&format!("data-account=\"{HOSTNAME}:5\""))
    );
    assert!(explained.body.contains("verified email"));

    let bad = get(&client, base, "/console/acme/people?filter=everyone").await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(bad.body.contains("all, server, cloud, both, ambiguous"));
    harness.shutdown().await;
}

#[tokio::test]
async fn sync_now_creates_a_request_visible_over_rest_and_shown_on_the_page() {
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    let instance = seeded(&harness.server().app, 2).await;
    let client = browser();
    sign_in(&client, base, &harness.owner_token).await;
    let page = get(&client, base, "/console/acme/instances").await;
    let pressed = post_form(
        &client,
        base,
        &format!("/console/acme/instances/{}/sync-now", instance.server_id),
        &[("csrf_token", &csrf(&page.body))],
    )
    .await;
    assert_eq!(pressed.status, StatusCode::SEE_OTHER, "{}", pressed.body);
    let location = pressed.location.expect("redirect");
    let request_id = location
        .split("request_id=")
        .nth(1)
        .and_then(|rest| rest.split(['&', '#']).next())
        .expect("request id")
        .to_owned();
    let (status, request) = harness
        .rest(
            reqwest::Method::GET,
            &format!(
                "/enterprises/acme/instances/{}/sync-requests/{request_id}",
                instance.server_id
            ),
            Some(&harness.owner_token),
            None,
        )
        .await;
    assert_eq!(status, 200, "{request}");
    assert_eq!(request["state"], "queued");
    let shown = get(&client, base, &location).await;
    assert!(
        shown.body.contains("data-state=\"queued\""),
        "{}",
        shown.body
    );
    assert!(shown.body.contains("class=\"sync-request-state\""));
    let polled = get(
        &client,
        base,
        &format!(
            "/console/acme/instances/{}/sync-requests/{request_id}",
            instance.server_id
        ),
    )
    .await;
    let polled: serde_json::Value = serde_json::from_str(&polled.body).expect("JSON");
    assert_eq!(polled["state"], "queued");
    assert_eq!(polled["waiting"], true);
    harness.shutdown().await;
}

#[tokio::test]
async fn an_upload_is_applied_then_already_applied_and_a_bad_file_says_what_is_wrong() {
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    let app = &harness.server().app;
    let instance = seeded(app, 1).await;
    let client = browser();
    sign_in(&client, base, &harness.owner_token).await;
    let token = csrf(&get(&client, base, "/console/acme/upload").await.body);
    let file = serde_json::to_vec(&UsageFile::from_snapshot(snapshot_of(
        instance.server_id,
        4,
    )))
    .expect("json");
    let upload = |bytes: Vec<u8>, token: String| {
        let client = client.clone();
        async move {
            let form = reqwest::multipart::Form::new()
                .text("csrf_token", token)
                .part(
                    "file",
                    reqwest::multipart::Part::bytes(bytes).file_name("usage.json"),
                );
            read(
                client
                    .post(format!("{base}/console/acme/upload"))
                    .multipart(form)
                    .send()
                    .await
                    .expect("upload"),
            )
            .await
        }
    };
    let applied = upload(file.clone(), token.clone()).await;
    assert_eq!(applied.status, StatusCode::CREATED, "{}", applied.body);
    assert!(tag_of(&applied.body, "upload-result").contains("applied"));
    let view = app
        .views
        .merged_view(instance.enterprise_id)
        .await
        .expect("view");
    assert_eq!(view.people.total_seats_consumed(), 4);
    drop(view);
    let again = upload(file.clone(), token.clone()).await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(tag_of(&again.body, "upload-result").contains("already-applied"));
    let bad = upload(b"{\"format\": 1".to_vec(), token.clone()).await;
    assert_eq!(bad.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(tag_of(&bad.body, "upload-result").contains("error"));
    // The console speaks of the file the owner chose, not of a request body as REST does.
    let said = text_of(&bad.body, "upload-error-message");
    assert!(
        said.starts_with("This file is not a usage file exported by `license-sync-agent export`: it is not even JSON"),
        "{said}"
    );
    assert!(
        said.contains("line 1, column 12") && said.contains("upload it again"),
        "{said}"
    );
    assert!(!said.contains("the body"), "{said}");
    let forged = upload(file.clone(), "0".repeat(64)).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    // The raw file as the body, with the token in a header (scripts), takes the same path.
    let raw = |token: &str| {
        client
            .post(format!("{base}/console/acme/upload"))
            .header("content-type", "application/octet-stream")
            .header("x-csrf-token", token)
            .body(file.clone())
            .send()
    };
    let raw_again = read(raw(&token).await.expect("raw upload")).await;
    assert_eq!(raw_again.status, StatusCode::OK, "{}", raw_again.body);
    assert!(tag_of(&raw_again.body, "upload-result").contains("already-applied"));
    let raw_forged = read(raw("nope").await.expect("raw upload")).await;
    assert_eq!(raw_forged.status, StatusCode::FORBIDDEN);
    harness.shutdown().await;
}

#[tokio::test]
async fn a_session_opened_on_one_replica_is_accepted_by_another_sharing_the_store() {
    sessions_are_shared_by_replicas(Harness::start(|_| {}).await).await;
}

#[cfg(feature = "postgres")]
#[tokio::test]
async fn a_session_opened_on_one_replica_is_accepted_by_another_sharing_postgresql() {
    let Some((url, _schema)) = crate::store_suite::postgres_schema_url().await else {
        return;
    };
    sessions_are_shared_by_replicas(Harness::start(|config| config.database_url = url).await).await;
}

/// Signs in on the harness's server and uses the session on a second server over the same database.
async fn sessions_are_shared_by_replicas(harness: Harness) {
    let mut config = (*harness.server().app.config).clone();
    config.grpc_listen = "127.0.0.1:0".parse().expect("address");
    config.http_listen = "127.0.0.1:0".parse().expect("address");
    let replica = server::start(config).await.expect("second replica");
    let replica_base = format!("http://{}", replica.http_addr);
    let client = browser();
    let signed = sign_in(&client, &harness.base, &harness.owner_token).await;
    let cookie = signed.set_cookie[0]
        .split(';')
        .next()
        .expect("name=value")
        .to_owned();
    let page = get(&client, &replica_base, "/console/acme/people").await;
    assert_signed_in_frame(&page, "people on the replica");
    // Signing out on the replica ends it on the first one too.
    let out = post_form(
        &client,
        &replica_base,
        "/console/sign-out",
        &[("csrf_token", &csrf(&page.body))],
    )
    .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    // The browser dropped the cookie (Max-Age=0); a saved copy of it is refused by the first replica as well.
    let ended = read(
        browser()
            .get(format!("{}/console/acme/", harness.base))
            .header("cookie", &cookie)
            .send()
            .await
            .expect("GET"),
    )
    .await;
    assert_eq!(ended.location.as_deref(), Some("/console/sign-in"));
    replica.shutdown().await.expect("replica stops");
    harness.shutdown().await;
}

#[tokio::test]
async fn a_commit_rebuilds_the_people_search_and_duplicates_that_were_read_before() {
    let harness = Harness::start(|_| {}).await;
    let base = &harness.base;
    let app = &harness.server().app;
    let instance = seeded(app, 3).await;
    let acme = app
        .store
        .enterprise_by_slug("acme")
        .await
        .expect("store")
        .expect("acme");
    let client = browser();
    sign_in(&client, base, &harness.owner_token).await;
    // Read both once: from now on they are rebuilt for each new generation this process commits.
    let search = get(&client, base, "/console/acme/people?q=user").await;
    assert_eq!(search.status, StatusCode::OK, "{}", search.body);
    let duplicates = get(&client, base, "/console/acme/duplicates").await;
    assert_eq!(duplicates.status, StatusCode::OK, "{}", duplicates.body);

    app.commit_snapshot(
        &instance,
        snapshot_of(instance.server_id, 5),
        Arrival::Connect,
        None,
    )
    .await
    .expect("second commit");
    let generation = app
        .store
        .enterprise_generation(acme.id)
        .await
        .expect("generation");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while app
        .views
        .cached_people_search(acme.id, generation)
        .is_none()
        || app
            .views
            .cached_likely_duplicates(acme.id, generation)
            .is_none()
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no people search and likely duplicates of generation {generation} were built without a reader"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

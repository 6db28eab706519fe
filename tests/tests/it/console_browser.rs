//! The owner's console in a real browser: headless Chromium over WebDriver (one chromedriver and one session per
//! test) against the real aggregator binary with sample data, through the URL and element contract of the console
//! (ids and classes such as `#consumed`, `form.sync-now`, `#upload-result`). Each test checks what a person sees
//! against what the REST API answers for the same data, and saves a screenshot of every page it visits under
//! `target/console-screenshots/` for a person to look at.
//!
//! Sample data (people who consume a license are marked *), for the enterprise `acme` with 3 seats:
//! - ghes-a.test: mona* (the cloud's monalisa by email), hubot*, carol*.
//! - ghes-b.test: mona (the same person as ghes-a's, same email), dave*.
//! - ghes-c.test: another mona* with another email (a likely duplicate of monalisa: same login).
//! - cloud: monalisa* (verified mona@example.com), erin*, billing (does not consume).
//!
//! So 6 people consume and the overage is 3. A second enterprise, `globex`, exists to show that one enterprise's
//! session never sees the other's pages. The Sync now test adds a sidecar agent reading the GHES simulator; the
//! upload test an air-gapped instance's export; the pagination test 120 more people.
//!
//! Every page a test visits is checked by a small accessibility audit (one `h1`, heading order, labels, contrast)
//! as its screenshot is saved.
//!
//! Without Chromium or chromedriver the tests print `SKIPPED …`, and fail under `LICENSE_SYNC_REQUIRE_ALL_TESTS`.

mod harness;

use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::Browser;
use license_sync_e2e::{
    AgentSource, Aggregator, GhesSim, SidecarAgent, SidecarOptions, agent_json, eventually,
};
use serde_json::{Value, json};

const SEATS: &str = "3";

/// The site-admin token the GHES simulator of the Sync now test accepts.
const SIM_TOKEN: &str = "ghes-site-admin-token-browser";

const GHES_A: &str = "\
id,login,email,suspended?
1,mona,Mona@Example.com,false
2,hubot,hubot@example.com,false
3,carol,carol@example.com,false
";

const GHES_B: &str = "\
id,login,email,suspended?
10,mona,mona@example.com,false
11,dave,dave@example.com,false
";

const GHES_C: &str = "\
id,login,email,suspended?
21,mona,mona.lisa@corp.example,false
";

/// The usage file uploaded through the console (an air-gapped instance's export).
const GHES_E: &str = "\
id,login,email,suspended?
31,frank,frank@example.com,false
32,grace,grace@example.com,false
";

fn cloud_members() -> Value {
    json!([
        {"id": 100, "login": "monalisa", "name": "Mona Lisa", "verified_emails": ["mona@example.com"],
         "consumes_license": true},
        {"id": 400, "login": "erin", "name": "Erin", "verified_emails": ["erin@example.com"],
         "consumes_license": true},
        {"id": 300, "login": "billing", "verified_emails": ["billing@example.com"], "consumes_license": false}
    ])
}

/// The aggregator with the sample data, its owners' REST tokens and a REST client.
struct World {
    aggregator: Aggregator,
    token: String,
    globex_token: String,
    http: reqwest::blocking::Client,
    /// Hostname → server id of the seeded instances.
    instances: Vec<(String, String)>,
}

impl World {
    fn start() -> World {
        // Debug logs with the HTTP request spans, so that a test can check what the console's requests log.
        let aggregator = Aggregator::start_with_env(&[(
            "RUST_LOG",
            "info,license_sync_aggregator=debug,tower_http=debug",
        )])
        .expect("aggregator starts");
        for (slug, seats) in [("acme", SEATS), ("globex", "5")] {
            aggregator
                .admin(&["enterprise", "create", "--slug", slug, "--seats", seats])
                .expect("create enterprise");
        }
        let token = aggregator
            .admin(&["token", "create", "--enterprise", "acme", "--name", "owner"])
            .expect("acme token");
        let globex_token = aggregator
            .admin(&[
                "token",
                "create",
                "--enterprise",
                "globex",
                "--name",
                "owner",
            ])
            .expect("globex token");
        let mut world = World {
            aggregator,
            token,
            globex_token,
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("http client"),
            instances: Vec::new(),
        };
        for (hostname, csv) in [
            ("ghes-a.test", GHES_A),
            ("ghes-b.test", GHES_B),
            ("ghes-c.test", GHES_C),
        ] {
            let config = world.add_instance(hostname, csv, true);
            let receipt = agent_json(&["sync", "--config", path_str(&config)]).expect("agent sync");
            assert_eq!(receipt["duplicate"], false, "{receipt}");
        }
        let members = world
            .http
            .put(world.url("/enterprises/acme/cloud-members"))
            .bearer_auth(&world.token)
            .json(&cloud_members())
            .send()
            .expect("import members");
        assert_eq!(members.status(), 200);
        world
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.aggregator.http_url)
    }

    /// Registers an instance of `acme` and writes an agent configuration reading `csv`; with `connected` the agent
    /// sends to this aggregator with the instance's credential, without it the agent is air-gapped (export only).
    fn add_instance(&mut self, hostname: &str, csv: &str, connected: bool) -> PathBuf {
        let server_id = uuid::Uuid::new_v4().to_string();
        let credential = self
            .aggregator
            .admin(&[
                "instance",
                "add",
                "--enterprise",
                "acme",
                "--server-id",
                &server_id,
                "--hostname",
                hostname,
            ])
            .expect("instance add");
        let dir = self.aggregator.dir.path();
        let csv_path = dir.join(format!("{hostname}.csv"));
        std::fs::write(&csv_path, csv).expect("write csv");
        let credential_path = dir.join(format!("{hostname}.credential"));
        std::fs::write(&credential_path, credential).expect("write credential");
        let aggregator = if connected {
            format!(
                "\n[aggregator]\nendpoint = {:?}\ncredential_file = {credential_path:?}\n",
                self.aggregator.grpc_url
            )
        } else {
            String::new()
        };
        let config = dir.join(format!("{hostname}.toml"));
        std::fs::write(
            &config,
            format!(
                "[instance]\nserver_id = {server_id:?}\nhostname = {hostname:?}\nghes_version = \"3.14.2\"\n\n\
                 [source]\nkind = \"file\"\npath = {csv_path:?}\n{aggregator}"
            ),
        )
        .expect("write config");
        self.instances.push((hostname.to_owned(), server_id));
        config
    }

    fn server_id(&self, hostname: &str) -> &str {
        self.instances
            .iter()
            .find(|(name, _)| name == hostname)
            .map(|(_, id)| id.as_str())
            .unwrap_or_else(|| panic!("no instance {hostname}"))
    }

    /// A REST GET with acme's token that must answer 200.
    fn rest(&self, path: &str) -> Value {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()
            .expect("REST GET");
        let status = response.status();
        let body = response.text().unwrap_or_default();
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).expect("JSON")
    }

    fn consumed(&self) -> Value {
        self.rest("/enterprises/acme/consumed-licenses?per_page=100")
    }

    /// The person id of the person holding an account, from the REST explanation.
    fn person_id(&self, account: &str) -> String {
        let body = self.rest(&format!(
            "/enterprises/acme/license-explanations?account={account}"
        ));
        body["explanation"]["person_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no person id in {body}"))
            .to_owned()
    }

    /// The instances of the REST status, by server id.
    fn instance_status(&self, server_id: &str) -> Option<Value> {
        self.rest("/enterprises/acme/license-sync-status")["server_instances"]
            .as_array()?
            .iter()
            .find(|instance| instance["server_id"] == server_id)
            .cloned()
    }

    /// A browser at the sign-in page, signed in with acme's token through the form; `None` when the browser is
    /// missing (the test is skipped).
    fn signed_in_browser(&self, test: &str) -> Option<Browser> {
        let browser = Browser::start(test, &self.aggregator.http_url)?;
        sign_in(&browser, &self.token);
        assert_eq!(browser.path(), "/console/acme/", "{}", browser.body_text());
        Some(browser)
    }
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Fills and submits the sign-in form with the mouse.
fn sign_in(browser: &Browser, token: &str) {
    browser.goto("/console/sign-in");
    browser.type_into("form#sign-in input#token[name=token]", token);
    browser.click_and_load("button#sign-in-submit");
}

/// The first number in a text ("6 licenses" → 6).
fn number(text: &str) -> i64 {
    let digits: String = text
        .chars()
        .skip_while(|c| !c.is_ascii_digit())
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number in {text:?}"))
}

/// A CSS attribute selector's quoted value.
fn quoted(value: &str) -> String {
    format!("{value:?}")
}

/// Saves the page's screenshot and asserts that the accessibility audit finds nothing on it.
fn check_page(browser: &Browser, name: &str) {
    browser.screenshot(name);
    let problems = browser.accessibility_problems();
    assert!(
        problems.is_empty(),
        "accessibility of {name} ({}):\n{}",
        browser.path(),
        problems.join("\n")
    );
}

#[test]
fn the_harness_drives_chromium_against_the_aggregator() {
    let world = World::start();
    let Some(browser) = Browser::start(
        "the_harness_drives_chromium_against_the_aggregator",
        &world.aggregator.http_url,
    ) else {
        return;
    };
    // Pages every aggregator serves, whatever the console's state: readiness as text, and a JSON 404.
    browser.goto("/readyz");
    assert_eq!(browser.status(), 200);
    assert!(!browser.body_text().trim().is_empty());
    browser.goto("/no-such-page");
    assert_eq!(
        browser.status(),
        404,
        "the status is read from the navigation"
    );
    assert!(
        browser.body_text().contains("Not Found"),
        "{}",
        browser.body_text()
    );
    browser.screenshot("not-a-page");

    // The accessibility audit finds each kind of problem it looks for.
    browser.execute(
        "document.body.innerHTML = '<h1>One</h1><h1>Two</h1><h3>Skipped</h3><input name=unlabelled>\
         <label>Named <input name=labelled></label>\
         <p style=\"color: #aaaaaa; background: #ffffff\">faint</p><p style=\"color: #595959\">dark enough</p>';",
        vec![],
    );
    let problems = browser.accessibility_problems().join("\n");
    for expected in [
        "2 h1 elements",
        "heading H3 \"Skipped\" follows h1",
        "input[name=unlabelled] has no label",
        "of \"faint\"",
    ] {
        assert!(problems.contains(expected), "{expected:?} in:\n{problems}");
    }
    for fine in ["[name=labelled]", "dark enough"] {
        assert!(
            !problems.contains(fine),
            "{fine:?} is no problem:\n{problems}"
        );
    }
    assert!(
        harness::screenshot_dir().join("not-a-page.png").exists(),
        "the screenshot was saved"
    );
}

#[test]
fn signing_in_with_the_token_form_shows_the_overview_with_the_rest_totals() {
    let world = World::start();
    let Some(browser) = Browser::start(
        "signing_in_with_the_token_form_shows_the_overview_with_the_rest_totals",
        &world.aggregator.http_url,
    ) else {
        return;
    };
    // A browser opening the aggregator's root lands in the console; without a session, on its sign-in page.
    browser.goto("/");
    browser.until("the sign-in page", |b| {
        (b.path() == "/console/sign-in").then_some(())
    });
    let label = browser.execute(
        "const input = document.querySelector('input#token'); \
         return input && input.labels && input.labels.length ? input.labels[0].textContent : '';",
        vec![],
    );
    assert!(
        label.as_str().is_some_and(|text| !text.trim().is_empty()),
        "the token input has a label"
    );
    assert_eq!(
        browser.attr("input#token", "type").as_deref(),
        Some("password")
    );
    check_page(&browser, "sign-in");

    sign_in(&browser, &world.token);
    assert_eq!(browser.path(), "/console/acme/", "{}", browser.body_text());
    // The session cookie is HttpOnly: the page's scripts cannot read it.
    let script_cookies = browser.execute("return document.cookie;", vec![]);
    assert_eq!(script_cookies, json!(""), "no cookie readable by scripts");
    assert!(
        !browser.cookie_names().is_empty(),
        "a session cookie is set"
    );

    let consumed = world.consumed();
    assert_eq!(consumed["total_seats_consumed"], 6, "{consumed:#}");
    assert_eq!(
        number(&browser.text("#consumed")),
        consumed["total_seats_consumed"].as_i64().expect("consumed")
    );
    assert_eq!(
        number(&browser.text("#purchased")),
        consumed["total_seats_purchased"]
            .as_i64()
            .expect("purchased")
    );
    assert_eq!(
        number(&browser.text("#overage")),
        consumed["total_seats_overage"].as_i64().expect("overage")
    );
    let overage_class = browser.attr("#overage", "class").unwrap_or_default();
    assert!(
        overage_class
            .split_whitespace()
            .any(|class| class == "over"),
        "the overage is highlighted: class {overage_class:?}"
    );
    // Today's count is the period's highest so far.
    assert_eq!(number(&browser.text("#peak")), 6);
    browser.wait("svg#usage-chart");
    let rows = browser.all("table#instance-usage tbody tr");
    assert_eq!(rows.len(), 3, "a row per instance");
    let table = browser.text("table#instance-usage");
    for hostname in ["ghes-a.test", "ghes-b.test", "ghes-c.test"] {
        assert!(table.contains(hostname), "{hostname} in {table}");
    }
    // Six pages in the navigation, one heading of the first level.
    assert!(browser.all("nav#console-nav a").len() >= 6);
    assert_eq!(browser.all("h1").len(), 1);
    browser.wait("meta[name=csrf-token]");
    check_page(&browser, "overview");

    // With a session, the console's root leads to the overview.
    browser.goto("/console/");
    browser.until("the overview", |b| {
        (b.path() == "/console/acme/").then_some(())
    });

    // Signing out ends the session: the overview sends to the sign-in page again.
    browser.click_and_load("form#sign-out button#sign-out-submit");
    browser.goto("/console/acme/");
    browser.until("the sign-in page after signing out", |b| {
        (b.path() == "/console/sign-in").then_some(())
    });
}

#[test]
fn every_page_of_the_navigation_loads_and_passes_the_audit() {
    let world = World::start();
    let Some(browser) =
        world.signed_in_browser("every_page_of_the_navigation_loads_and_passes_the_audit")
    else {
        return;
    };
    let links: Vec<String> = browser
        .all("nav#console-nav a")
        .iter()
        .filter_map(|link| browser.element_attr(link, "href"))
        .collect();
    let expected = [
        "/console/acme/",
        "/console/acme/instances",
        "/console/acme/people",
        "/console/acme/duplicates",
        "/console/acme/upload",
        "/console/acme/downloads",
    ];
    for path in expected {
        assert!(
            links.iter().any(|href| href.ends_with(path)),
            "the navigation links {path}: {links:?}"
        );
    }
    for path in expected {
        browser.click_and_load(&format!("nav#console-nav a[href$={}]", quoted(path)));
        assert_eq!(browser.path(), path);
        assert_eq!(browser.status(), 200, "{path}");
        browser.wait("meta[name=csrf-token]");
        browser.wait("form#sign-out input[name=csrf_token]");
        let name = match path.trim_end_matches('/').rsplit('/').next() {
            Some("acme") | None => "overview",
            Some(page) => page,
        };
        check_page(&browser, name);
    }
    // The downloads page links the CSV at the contract's address.
    let href = browser
        .attr("a#download-csv", "href")
        .expect("the download link has an href");
    assert!(
        href.ends_with("/console/acme/downloads/consumed-licenses.csv"),
        "{href}"
    );
}

#[test]
fn the_sign_in_form_works_with_the_keyboard_only() {
    let world = World::start();
    let Some(browser) = Browser::start(
        "the_sign_in_form_works_with_the_keyboard_only",
        &world.aggregator.http_url,
    ) else {
        return;
    };
    browser.goto("/console/sign-in");
    browser.wait("form#sign-in");
    // Tab from the top of the page until the token field has the focus; a handful of links may come first.
    let tab = fantoccini::key::Key::Tab.to_string();
    let mut presses = 0;
    while browser.focused_id() != "token" {
        assert!(
            presses < 15,
            "Tab never reached the token field (focus on {:?})",
            browser.focused_id()
        );
        browser.press(&tab);
        presses += 1;
    }
    browser.press(&world.token);
    browser.press(&tab);
    assert_eq!(
        browser.focused_id(),
        "sign-in-submit",
        "Tab goes from the token to the button"
    );
    // The focus is visible: the button draws an outline (or a box shadow) while it has the focus.
    let focus_ring = browser.execute(
        "const style = getComputedStyle(document.activeElement); \
         return [style.outlineStyle, style.outlineWidth, style.boxShadow];",
        vec![],
    );
    let visible = (focus_ring[0] != "none" && focus_ring[1] != "0px") || focus_ring[2] != "none";
    assert!(visible, "the focused button shows its focus: {focus_ring}");
    check_page(&browser, "sign-in-keyboard-focus");
    let enter = fantoccini::key::Key::Enter.to_string();
    browser.navigating(|b| b.press(&enter));
    assert_eq!(browser.path(), "/console/acme/", "{}", browser.body_text());
    browser.wait("#consumed");
}

#[test]
fn a_console_link_signs_in_once() {
    let world = World::start();
    let Some(browser) = Browser::start("a_console_link_signs_in_once", &world.aggregator.http_url)
    else {
        return;
    };
    let link = world
        .aggregator
        .admin(&["console-link", "--enterprise", "acme"])
        .expect("console link");
    // The printed link names the configured address; the path and its token are what the browser follows here.
    let path = &link[link
        .find("/console/")
        .unwrap_or_else(|| panic!("a console link: {link}"))..];
    assert!(path.starts_with("/console/sign-in/link?token="), "{path}");
    browser.goto(path);
    assert_eq!(browser.path(), "/console/acme/", "{}", browser.body_text());
    browser.wait("#consumed");

    // Signed out, the same link is refused: it was for one use.
    browser.click_and_load("form#sign-out button#sign-out-submit");
    browser.goto(path);
    assert!(
        browser.path() != "/console/acme/" && !browser.exists("#consumed"),
        "a used link signs in no more: {}",
        browser.path()
    );
    assert!(
        !browser.text("#sign-in-error").trim().is_empty(),
        "the refusal says why"
    );
    check_page(&browser, "console-link-used");
    browser.goto("/console/acme/");
    browser.until("the sign-in page", |b| {
        (b.path() == "/console/sign-in").then_some(())
    });
}

#[test]
fn a_bad_token_is_refused_with_a_message_and_no_session() {
    let world = World::start();
    let Some(browser) = Browser::start(
        "a_bad_token_is_refused_with_a_message_and_no_session",
        &world.aggregator.http_url,
    ) else {
        return;
    };
    sign_in(&browser, "lsr_not-a-token-of-this-aggregator");
    assert_eq!(browser.status(), 401);
    let error = browser.text("#sign-in-error");
    assert!(!error.trim().is_empty(), "the refusal says why");
    assert!(
        !error.contains("lsr_not-a-token"),
        "the message does not echo the token: {error}"
    );
    browser.wait("form#sign-in input#token");
    check_page(&browser, "sign-in-error");
    // Still no session: the overview sends to the sign-in page.
    browser.goto("/console/acme/");
    browser.until("the sign-in page", |b| {
        (b.path() == "/console/sign-in").then_some(())
    });
}

#[test]
fn people_can_be_searched_explained_and_compared() {
    let world = World::start();
    let Some(browser) = world.signed_in_browser("people_can_be_searched_explained_and_compared")
    else {
        return;
    };
    let consumed = world.consumed();
    browser.goto("/console/acme/people");
    assert_eq!(
        number(&browser.text("#people-total")),
        consumed["users"]
            .as_array()
            .map(Vec::len)
            .unwrap_or_default() as i64
    );
    assert_eq!(browser.all("table#people tr[data-person-id]").len(), 6);
    check_page(&browser, "people");

    // Search with the form: one person, dave.
    let dave = world.person_id("ghes-b.test:11");
    browser.type_into("form#people-search input#q[name=q]", "dave");
    browser.navigating(|b| {
        b.press(&fantoccini::key::Key::Enter.to_string());
    });
    assert!(browser.path().contains("q=dave"), "{}", browser.path());
    assert_eq!(number(&browser.text("#people-total")), 1);
    let rows = browser.all("table#people tr[data-person-id]");
    assert_eq!(rows.len(), 1);
    assert_eq!(
        browser.element_attr(&rows[0], "data-person-id").as_deref(),
        Some(dave.as_str())
    );
    check_page(&browser, "people-search");

    // The filter: only monalisa has accounts on a server and in the cloud.
    let monalisa = world.person_id("github.com:monalisa");
    browser.goto("/console/acme/people");
    browser
        .run(
            browser
                .wait("form#people-search select#filter[name=filter]")
                .select_by_value("both"),
        )
        .expect("choose a filter");
    browser.navigating(|b| {
        b.execute(
            "document.querySelector('form#people-search').requestSubmit();",
            vec![],
        );
    });
    assert!(browser.path().contains("filter=both"), "{}", browser.path());
    assert_eq!(number(&browser.text("#people-total")), 1);
    let rows = browser.all("table#people tr[data-person-id]");
    assert_eq!(
        rows.iter()
            .map(|row| browser
                .element_attr(row, "data-person-id")
                .unwrap_or_default())
            .collect::<Vec<_>>(),
        std::slice::from_ref(&monalisa)
    );
    check_page(&browser, "people-filter-both");

    // Back to dave's row, and its explanation: one account, on ghes-b, which consumes.
    browser.goto("/console/acme/people?q=dave");
    browser.click_and_load(&format!("tr[data-person-id={}] a.explain", quoted(&dave)));
    assert_eq!(
        browser.path(),
        format!("/console/acme/people/{dave}"),
        "the explanation's URL"
    );
    let accounts = browser.all("#explanation li.account");
    assert_eq!(accounts.len(), 1);
    assert_eq!(
        browser
            .element_attr(&accounts[0], "data-account")
            .as_deref(),
        Some("ghes-b.test:11")
    );
    check_page(&browser, "person");

    // Monalisa is one person of three accounts; the explanation lists them all.
    browser.goto(&format!("/console/acme/people/{monalisa}"));
    for account in ["ghes-a.test:1", "ghes-b.test:10", "github.com:monalisa"] {
        browser.wait(&format!(
            "#explanation li.account[data-account={}]",
            quoted(account)
        ));
    }

    // Searching by host:id finds the other mona; the two monas are compared from the people table.
    let other_mona = world.person_id("ghes-c.test:21");
    browser.goto("/console/acme/people?q=mona");
    browser.wait("table#people");
    for person in [&monalisa, &other_mona] {
        browser.click(&format!(
            "form#compare-form input[name=compare][value={}]",
            quoted(person)
        ));
    }
    browser.navigating(|b| {
        b.execute(
            "document.querySelector('form#compare-form').requestSubmit();",
            vec![],
        );
    });
    assert!(
        browser.path().starts_with("/console/acme/compare?"),
        "{}",
        browser.path()
    );
    let comparison = browser.text("#comparison");
    for account in ["ghes-a.test:1", "ghes-c.test:21"] {
        assert!(
            browser.exists(&format!("li.account[data-account={}]", quoted(account)))
                || comparison.contains(account),
            "{account} in the comparison: {comparison}"
        );
    }
    check_page(&browser, "compare");

    // host:id search.
    browser.goto("/console/acme/people?q=ghes-c.test%3A21");
    assert_eq!(number(&browser.text("#people-total")), 1);
    assert!(browser.exists(&format!("tr[data-person-id={}]", quoted(&other_mona))));

    // An address search, typed into the form: found, and the address is in no log line of the aggregator (its
    // request log carries paths, never query strings), nor is the token the browser signed in with.
    browser.goto("/console/acme/people");
    browser.type_into("form#people-search input#q", "Carol@Example.COM");
    browser.navigating(|b| b.press(&fantoccini::key::Key::Enter.to_string()));
    assert_eq!(number(&browser.text("#people-total")), 1);
    let log = world.aggregator.log().to_lowercase();
    assert!(
        log.contains("/console/acme/people"),
        "the request log has the path"
    );
    for secret in [
        "carol@example.com",
        "carol%40example.com",
        &world.token.to_lowercase(),
    ] {
        assert!(!log.contains(secret), "{secret} is in the aggregator's log");
    }

    // The likely duplicates: the two monas, linked to their comparison.
    browser.goto("/console/acme/duplicates");
    let rest_duplicates = world.rest("/enterprises/acme/likely-duplicates");
    let table = browser.text("table#duplicates");
    assert!(table.contains("mona"), "{table}");
    let links = browser.all("table#duplicates a.compare");
    assert_eq!(
        links.len(),
        rest_duplicates["likely_duplicates"]
            .as_array()
            .or_else(|| rest_duplicates.as_array())
            .map(Vec::len)
            .unwrap_or(1)
            .max(1),
        "a comparison link per pair: {rest_duplicates}"
    );
    check_page(&browser, "duplicates");
    browser.click_and_load("table#duplicates a.compare");
    browser.wait("#comparison");
}

#[test]
fn the_people_pages_follow_next_and_prev_links() {
    let mut world = World::start();
    // 120 more people: with the sample's 6, three pages of 50, 50 and 26.
    let mut csv = String::from("id,login,email,suspended?\n");
    for id in 1..=120 {
        csv.push_str(&format!("{id},user{id:03},user{id:03}@example.com,false\n"));
    }
    let config = world.add_instance("ghes-big.test", &csv, true);
    agent_json(&["sync", "--config", path_str(&config)]).expect("agent sync");
    let consumed = world.consumed()["total_seats_consumed"].as_i64();
    assert_eq!(consumed, Some(126));
    let Some(browser) = world.signed_in_browser("the_people_pages_follow_next_and_prev_links")
    else {
        return;
    };
    let page_ids = |browser: &Browser| -> Vec<String> {
        browser
            .all("table#people tr[data-person-id]")
            .iter()
            .filter_map(|row| browser.element_attr(row, "data-person-id"))
            .collect()
    };
    browser.goto("/console/acme/people");
    assert_eq!(number(&browser.text("#people-total")), 126);
    assert!(!browser.exists("a[rel=prev]"), "no page before the first");
    let mut pages = vec![page_ids(&browser)];
    while browser.exists("a[rel=next]") {
        assert!(pages.len() < 5, "more pages than 126 people make");
        browser.click_and_load("a[rel=next]");
        pages.push(page_ids(&browser));
    }
    check_page(&browser, "people-last-page");
    let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
    assert_eq!(sizes, [50, 50, 26]);
    let mut all: Vec<&String> = pages.iter().flatten().collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 126, "every person on exactly one page");
    // Back one page: the same people as on the way forward.
    browser.click_and_load("a[rel=prev]");
    assert!(browser.path().contains("page=2"), "{}", browser.path());
    assert_eq!(page_ids(&browser), pages[1]);
    // A search narrows the pages: "user01" matches user010 to user019 (logins and addresses).
    browser.goto("/console/acme/people?q=user01");
    assert_eq!(number(&browser.text("#people-total")), 10);
    assert!(!browser.exists("a[rel=next]"));
}

#[test]
fn sync_now_on_an_instance_with_a_connected_agent_is_accepted_and_its_job_commits() {
    let world = World::start();
    let Some(browser) = world.signed_in_browser(
        "sync_now_on_an_instance_with_a_connected_agent_is_accepted_and_its_job_commits",
    ) else {
        return;
    };
    // A sidecar agent reading the GHES simulator (which answers 202 twice before each report, as GHES does while
    // it prepares one), enrolled and enabled, with its control stream connected.
    let sim_csv = world.aggregator.dir.path().join("ghes-live.csv");
    std::fs::write(&sim_csv, GHES_A).expect("write the simulator's users");
    let sim = GhesSim::start(&sim_csv, SIM_TOKEN, 2, world.aggregator.dir.path())
        .expect("the simulator starts");
    let mut options = SidecarOptions::new(&world.aggregator.grpc_url, "ghes-live.test", GHES_A);
    options.source = AgentSource::Ghes {
        url: sim.url.clone(),
        token: SIM_TOKEN.to_owned(),
    };
    let agent = SidecarAgent::start(options).expect("agent starts");
    let enrollment = world
        .http
        .post(world.url("/enterprises/acme/enrollment-tokens"))
        .bearer_auth(&world.token)
        .send()
        .expect("enrollment token");
    assert_eq!(enrollment.status(), 201);
    let enrollment: Value = enrollment.json().expect("JSON");
    agent
        .connect(enrollment["token"].as_str().expect("token"))
        .expect("connect the agent");
    let (status, body) = agent.set_enabled(true).expect("enable");
    assert_eq!(status, 200, "{body}");
    eventually(harness::WAIT, || {
        let instance = world.instance_status(&agent.server_id)?;
        (instance["agent_connected"] == true && instance["last_sync"]["status"] == "success")
            .then_some(())
    })
    .expect("the agent connects and its first sync lands");

    browser.goto("/console/acme/instances");
    let row = format!(
        "table#instances tr[data-server-id={}]",
        quoted(&agent.server_id)
    );
    let state = browser.text(&format!("{row} .sync-state"));
    assert!(
        state.contains("GitHub Connect server usage synced"),
        "an agent's instance: {state}"
    );
    // The one-shot instances' rows say the same words for their state as GitHub does.
    let other = browser.text(&format!(
        "table#instances tr[data-server-id={}] .sync-state",
        quoted(world.server_id("ghes-a.test"))
    ));
    assert!(!other.trim().is_empty());
    check_page(&browser, "instances");

    let jobs_before = agent.get("/api/v1/jobs").expect("jobs")["jobs"]
        .as_array()
        .map(Vec::len)
        .unwrap_or_default();
    browser.click_and_load(&format!("{row} form.sync-now button"));
    // The state as the REST sync-request resource names it, followed by the page's poll until the agent answers:
    // `queued` → `delivered` → `accepted` (the agent started a job) or `refused`/`expired`.
    let state_element = format!("{row} .sync-request-state");
    let mut seen = vec![browser.text(&state_element)];
    let answered = browser.until("the agent to accept the Sync now request", |b| {
        let state = b.text(&state_element).trim().to_owned();
        if seen.last() != Some(&state) {
            seen.push(state.clone());
        }
        ["accepted", "refused", "expired"]
            .contains(&state.as_str())
            .then_some(state)
    });
    eprintln!("the Sync now request's states as the page showed them: {seen:?}");
    assert_eq!(answered, "accepted", "the states shown: {seen:?}");
    for state in &seen {
        assert!(
            ["queued", "delivered", "accepted"].contains(&state.trim()),
            "a state of the REST resource: {seen:?}"
        );
    }
    // The same request over REST, and the job it started commits on the agent.
    let path = browser.path();
    let request_id = path
        .split(['?', '&'])
        .find_map(|pair| pair.strip_prefix("request_id="))
        .unwrap_or_else(|| panic!("no request id in {path}"));
    let request = world.rest(&format!(
        "/enterprises/acme/instances/{}/sync-requests/{request_id}",
        agent.server_id
    ));
    assert_eq!(request["state"], "accepted", "{request}");
    let job_id = request["job_id"].as_str().expect("job id");
    let job = agent
        .wait_job(job_id, harness::WAIT, |job| job["state"] == "committed")
        .expect("the requested job commits");
    assert_eq!(job["trigger"], "cloud", "{job}");
    check_page(&browser, "instances-sync-now");
    assert!(
        agent.get("/api/v1/jobs").expect("jobs")["jobs"]
            .as_array()
            .map(Vec::len)
            .unwrap_or_default()
            > jobs_before,
        "a new job ran"
    );
}

#[test]
fn without_javascript_the_instances_page_shows_the_sync_request_state_on_reload() {
    let world = World::start();
    let test = "without_javascript_the_instances_page_shows_the_sync_request_state_on_reload";
    let Some(browser) = Browser::start_without_javascript(test, &world.aggregator.http_url) else {
        return;
    };
    // The page's own scripts are off: the console's poll cannot run. Probed on a page outside the console, whose
    // Content-Security-Policy would refuse the inline probe anyway.
    browser.goto("/no-such-page");
    let scripts_run = browser.execute(
        "const probe = document.createElement('script'); \
         probe.textContent = 'window.__pageScriptsRun = true;'; \
         document.head.appendChild(probe); \
         return window.__pageScriptsRun === true;",
        vec![],
    );
    assert_eq!(scripts_run, json!(false), "page scripts are blocked");
    sign_in(&browser, &world.token);
    assert_eq!(browser.path(), "/console/acme/");
    check_page(&browser, "overview-without-javascript");

    // No agent is connected to ghes-a: the request waits in `queued`, and each reload shows it.
    let server_id = world.server_id("ghes-a.test");
    browser.goto("/console/acme/instances");
    let row = format!("table#instances tr[data-server-id={}]", quoted(server_id));
    browser.click_and_load(&format!("{row} form.sync-now button"));
    let state = browser.text(&format!("{row} .sync-request-state"));
    assert_eq!(state.trim(), "queued");
    let reloaded = browser.path();
    browser.goto(&reloaded);
    assert_eq!(
        browser.text(&format!("{row} .sync-request-state")).trim(),
        "queued",
        "the state shown again on reload"
    );
    check_page(&browser, "instances-without-javascript");
}

#[test]
fn an_uploaded_usage_file_is_applied_then_already_applied_and_a_corrupt_one_is_an_error() {
    let mut world = World::start();
    let Some(browser) = world.signed_in_browser(
        "an_uploaded_usage_file_is_applied_then_already_applied_and_a_corrupt_one_is_an_error",
    ) else {
        return;
    };
    let config = world.add_instance("ghes-e.test", GHES_E, false);
    let export = world.aggregator.dir.path().join("ghes-e-usage.json");
    let summary = agent_json(&[
        "export",
        "--config",
        path_str(&config),
        "--output",
        path_str(&export),
        "--unencrypted",
    ])
    .expect("export");
    assert_eq!(summary["encrypted"], false, "{summary}");
    let before = world.consumed()["total_seats_consumed"].clone();

    let upload = |file: &Path| {
        browser.goto("/console/acme/upload");
        browser.type_into(
            "form#upload input#usage-file[name=file][type=file]",
            path_str(file),
        );
        browser.navigating(|b| {
            b.execute(
                "document.querySelector('form#upload').requestSubmit();",
                vec![],
            );
        });
        let result = browser.wait("#upload-result");
        let class = browser.element_attr(&result, "class").unwrap_or_default();
        (class, browser.element_text(&result))
    };

    let (class, text) = upload(&export);
    assert!(has_class(&class, "applied"), "{class:?}: {text}");
    check_page(&browser, "upload-applied");
    let server_id = world.server_id("ghes-e.test").to_owned();
    let instance = world.instance_status(&server_id).expect("ghes-e's status");
    assert_eq!(instance["user_count"], 2, "{instance}");
    assert_eq!(
        world.consumed()["total_seats_consumed"],
        before.as_i64().expect("consumed") + 2
    );

    let (class, text) = upload(&export);
    assert!(has_class(&class, "already-applied"), "{class:?}: {text}");
    check_page(&browser, "upload-already-applied");

    let corrupt = world.aggregator.dir.path().join("corrupt.json");
    std::fs::write(
        &corrupt,
        b"{\"format\": \"license-sync-usage\", \"users\": [",
    )
    .expect("write");
    let (class, text) = upload(&corrupt);
    assert!(has_class(&class, "error"), "{class:?}: {text}");
    assert!(text.len() > 10, "the error says what was wrong: {text:?}");
    check_page(&browser, "upload-error");
    assert_eq!(
        world.instance_status(&server_id).expect("status")["user_count"],
        2,
        "the corrupt file changed nothing"
    );
}

fn has_class(classes: &str, wanted: &str) -> bool {
    classes.split_whitespace().any(|class| class == wanted)
}

#[test]
fn the_downloaded_csv_matches_the_api_row_by_row() {
    let world = World::start();
    let Some(browser) = world.signed_in_browser("the_downloaded_csv_matches_the_api_row_by_row")
    else {
        return;
    };
    browser.goto("/console/acme/downloads");
    let href = browser
        .attr("a#download-csv", "href")
        .expect("the link has an href");
    assert!(
        href.ends_with("/console/acme/downloads/consumed-licenses.csv"),
        "{href}"
    );
    check_page(&browser, "downloads");
    // The file as the browser gets it, with the session cookie (a download would land outside the page).
    let fetched = browser.execute(
        "return fetch(arguments[0], {credentials: 'same-origin'}) \
           .then(r => r.text().then(body => ({status: r.status, type: r.headers.get('content-type'), body})));",
        vec![json!(href)],
    );
    assert_eq!(fetched["status"], 200, "{fetched}");
    assert!(
        fetched["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("text/csv")),
        "{fetched}"
    );
    let body = fetched["body"].as_str().expect("CSV text");

    // The same bytes as the REST report.
    let rest_csv = world
        .http
        .get(world.url("/enterprises/acme/consumed-licenses.csv"))
        .bearer_auth(&world.token)
        .send()
        .expect("REST CSV")
        .text()
        .expect("CSV text");
    assert_eq!(body, rest_csv);

    // Row by row against the JSON API: one row per consuming person, in its order, naming the person.
    let rows: Vec<Vec<String>> = csv::Reader::from_reader(body.as_bytes())
        .records()
        .map(|record| {
            record
                .expect("a CSV record")
                .iter()
                .map(str::to_owned)
                .collect()
        })
        .collect();
    let users = world.consumed()["users"]
        .as_array()
        .cloned()
        .expect("users");
    assert_eq!(rows.len(), users.len(), "{body}");
    for (row, user) in rows.iter().zip(&users) {
        let login = user["github_com_login"].as_str().unwrap_or_default();
        let names = if login.is_empty() {
            user["enterprise_server_primary_emails"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        } else {
            vec![login.to_owned()]
        };
        assert!(
            names
                .iter()
                .any(|name| row.iter().any(|cell| cell.contains(name.as_str()))),
            "row {row:?} names {names:?}"
        );
    }
}

#[test]
fn a_form_posted_without_its_csrf_token_is_refused_and_changes_nothing() {
    let world = World::start();
    let Some(browser) = world
        .signed_in_browser("a_form_posted_without_its_csrf_token_is_refused_and_changes_nothing")
    else {
        return;
    };
    // Retiring an instance, at its confirmation step, with the hidden CSRF input removed.
    let server_id = world.server_id("ghes-c.test");
    browser.goto("/console/acme/instances");
    let row = format!("table#instances tr[data-server-id={}]", quoted(server_id));
    browser.navigating(|b| {
        b.execute(
            &format!(
                "document.querySelector('{} form.retire').requestSubmit();",
                row.replace('\'', "\\'")
            ),
            vec![],
        );
    });
    browser.wait("button#confirm-retire");
    check_page(&browser, "retire-confirm");
    let removed = browser.execute(
        "const form = document.querySelector('button#confirm-retire').form; \
         const inputs = form.querySelectorAll('input[name=csrf_token]'); \
         inputs.forEach(input => input.remove()); \
         return inputs.length;",
        vec![],
    );
    assert_eq!(
        removed,
        json!(1),
        "the confirmation form carried its CSRF token"
    );
    browser.click_and_load("button#confirm-retire");
    assert_eq!(browser.status(), 403, "{}", browser.body_text());
    assert!(!browser.body_text().trim().is_empty(), "a page says why");
    check_page(&browser, "csrf-refused");
    assert!(
        world.instance_status(server_id).is_some(),
        "the instance is still there"
    );

    // Signing out without the token is refused too: the session still works.
    browser.goto("/console/acme/");
    browser.execute(
        "document.querySelectorAll('form#sign-out input[name=csrf_token]').forEach(i => i.remove());",
        vec![],
    );
    browser.click_and_load("form#sign-out button#sign-out-submit");
    assert_eq!(browser.status(), 403);
    browser.goto("/console/acme/");
    browser.wait("#consumed");
    assert_eq!(browser.path(), "/console/acme/");

    // With its token, the same confirmation retires the instance.
    browser.goto("/console/acme/instances");
    browser.navigating(|b| {
        b.execute(
            &format!(
                "document.querySelector('{} form.retire').requestSubmit();",
                row.replace('\'', "\\'")
            ),
            vec![],
        );
    });
    browser.click_and_load("button#confirm-retire");
    assert!(browser.status() < 400, "{}", browser.body_text());
    assert!(
        eventually(harness::WAIT, || world
            .instance_status(server_id)
            .is_none()
            .then_some(()))
        .is_some(),
        "the instance is retired"
    );
}

#[test]
fn another_enterprises_pages_answer_404() {
    let world = World::start();
    let Some(browser) = world.signed_in_browser("another_enterprises_pages_answer_404") else {
        return;
    };
    let person = world.person_id("ghes-b.test:11");
    for path in [
        "/console/globex/".to_owned(),
        "/console/globex/instances".to_owned(),
        "/console/globex/people".to_owned(),
        format!("/console/globex/people/{person}"),
        "/console/globex/duplicates".to_owned(),
        "/console/globex/upload".to_owned(),
        "/console/globex/downloads".to_owned(),
        "/console/no-such-enterprise/".to_owned(),
    ] {
        browser.goto(&path);
        assert_eq!(browser.status(), 404, "{path}: {}", browser.body_text());
        assert!(
            !browser.exists("#consumed") && !browser.exists("table#people"),
            "{path} shows no enterprise data"
        );
    }
    check_page(&browser, "not-found");
    // globex's own owner sees globex's console, and acme's is a 404 for them.
    let globex = Browser::start(
        "another_enterprises_pages_answer_404",
        &world.aggregator.http_url,
    )
    .expect("a second browser");
    sign_in(&globex, &world.globex_token);
    assert_eq!(globex.path(), "/console/globex/");
    globex.goto("/console/acme/people");
    assert_eq!(globex.status(), 404);
}

#[test]
fn an_enrollment_token_is_shown_once() {
    let world = World::start();
    let Some(browser) = world.signed_in_browser("an_enrollment_token_is_shown_once") else {
        return;
    };
    browser.goto("/console/acme/instances");
    browser.click_and_load("form#create-enrollment-token button");
    // Shown in a read-only input (to copy from) or as text.
    let token = browser
        .attr("#enrollment-token", "value")
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| browser.text("#enrollment-token"));
    assert!(token.trim().starts_with("lse_"), "{token}");
    check_page(&browser, "enrollment-token");
    // Reloading the instances page does not show it again.
    browser.goto("/console/acme/instances");
    browser.wait("table#instances");
    assert!(!browser.body_text().contains(token.trim()));
}

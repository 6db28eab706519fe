//! The OpenAPI document against the real server on `127.0.0.1:0`: it is served without a token; every routed
//! method is documented and every documented one routed; it passes a standard validator (`openapi-spec-validator`,
//! when Python has it); and the real answers of every endpoint, errors included, match the schema the document gives
//! for their status, with no undocumented field. The answers of GitHub's two endpoints also match GitHub's published
//! schemas (`tests/fixtures/github/`), and our schemas of them declare every field GitHub's do, with a compatible
//! type.

use std::collections::BTreeMap;
use std::path::PathBuf;

use license_sync_aggregator::config::MetricsToken;
use license_sync_aggregator::rest::{API_V3_PREFIX, openapi_document, route_paths};
use license_sync_aggregator::store::{NewApiToken, TokenScope};
use license_sync_core::model::{InstanceIdentity, ServerUser, SourceReport, UserRole};
use license_sync_core::snapshot::{Snapshot, SnapshotMeta, UsageFile};
use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::control::Harness;

const METRICS_TOKEN: &str = "scrape-secret-for-the-openapi-test";

/// Stands in for each `{parameter}` of a path template.
fn concrete(template: &str, values: &[(&str, String)]) -> String {
    values
        .iter()
        .fold(template.to_owned(), |path, (name, value)| {
            path.replace(&format!("{{{name}}}"), value)
        })
}

/// One answer of the server, as a client sees it.
#[derive(Debug)]
struct Answer {
    method: Method,
    template: &'static str,
    status: u16,
    /// Without parameters (`application/json`), empty for an answer without a body.
    content_type: String,
    body: Vec<u8>,
}

async fn call(
    harness: &Harness,
    method: Method,
    template: &'static str,
    path: &str,
    token: Option<&str>,
    body: Option<String>,
) -> Answer {
    let mut request =
        reqwest::Client::new().request(method.clone(), format!("{}{path}", harness.base));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    let response = request.send().await.expect("HTTP request");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .map(|value| {
            value
                .split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
        .unwrap_or_default();
    let body = response.bytes().await.expect("body").to_vec();
    Answer {
        method,
        template,
        status,
        content_type,
        body,
    }
}

/// `$ref` (`#/components/...`) resolved within the document.
fn resolve<'d>(document: &'d Value, value: &'d Value) -> &'d Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(reference) => document
            .pointer(reference.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("dangling $ref {reference}")),
        None => value,
    }
}

/// JSON pointer escaping (RFC 6901) of one path segment.
fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The document as a JSON Schema resource in which an object schema takes no field it does not declare: every
/// component schema with `properties` or `allOf` gets `unevaluatedProperties: false`, except those that are parts
/// of another's `allOf` (2020-12's `unevaluatedProperties` sees through `allOf` and `$ref` at the outer level only).
fn strict(document: &Value) -> Value {
    fn parts_of_all_of(value: &Value, parts: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                if let Some(Value::Array(all_of)) = map.get("allOf") {
                    for part in all_of {
                        if let Some(reference) = part.get("$ref").and_then(Value::as_str) {
                            parts.push(reference.rsplit('/').next().unwrap_or_default().to_owned());
                        }
                    }
                }
                map.values().for_each(|value| parts_of_all_of(value, parts));
            }
            Value::Array(values) => values
                .iter()
                .for_each(|value| parts_of_all_of(value, parts)),
            _ => {}
        }
    }
    let mut strict = document.clone();
    let mut parts = Vec::new();
    parts_of_all_of(document, &mut parts);
    let schemas = strict["components"]["schemas"]
        .as_object_mut()
        .expect("components.schemas");
    for (name, schema) in schemas.iter_mut() {
        let is_object = schema.get("properties").is_some() || schema.get("allOf").is_some();
        if is_object && !parts.contains(name) {
            schema["unevaluatedProperties"] = json!(false);
        }
    }
    strict
}

/// Checks each answer against its operation's response for its status: documented, of a documented content type,
/// and (JSON) valid against the schema. Returns every problem, not only the first.
fn problems(document: &Value, answers: &[Answer]) -> Vec<String> {
    let strict = strict(document);
    let mut problems = Vec::new();
    for answer in answers {
        let what = format!("{} {} → {}", answer.method, answer.template, answer.status);
        let operation_pointer = format!(
            "/paths/{}/{}",
            escape(answer.template),
            answer.method.as_str().to_lowercase()
        );
        let Some(operation) = document.pointer(&operation_pointer) else {
            problems.push(format!("{what}: the operation is not in the document"));
            continue;
        };
        let Some(response) = operation["responses"].get(answer.status.to_string()) else {
            problems.push(format!("{what}: the status is not documented"));
            continue;
        };
        let response = resolve(document, response);
        let Some(content) = response.get("content").and_then(Value::as_object) else {
            if !answer.body.is_empty() {
                problems.push(format!("{what}: a body, where the document has none"));
            }
            continue;
        };
        let Some(media) = content.get(&answer.content_type) else {
            problems.push(format!(
                "{what}: content type {:?}, documented {:?}",
                answer.content_type,
                content.keys().collect::<Vec<_>>()
            ));
            continue;
        };
        if answer.content_type != "application/json" {
            continue;
        }
        let body: Value = match serde_json::from_slice(&answer.body) {
            Ok(body) => body,
            Err(error) => {
                problems.push(format!("{what}: not JSON ({error})"));
                continue;
            }
        };
        let schema_pointer = match media["schema"].get("$ref").and_then(Value::as_str) {
            Some(reference) => reference.to_owned(),
            // As a URI fragment: the template's braces percent-encoded.
            None => format!(
                "#{operation_pointer}/responses/{}/content/{}/schema",
                answer.status,
                escape(&answer.content_type)
            )
            .replace('{', "%7B")
            .replace('}', "%7D"),
        };
        let mut root = strict.clone();
        root["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
        root["$ref"] = json!(schema_pointer);
        let validator = jsonschema::options()
            .should_validate_formats(true)
            .build(&root)
            .unwrap_or_else(|error| {
                panic!("{what}: the schema {schema_pointer} compiles: {error}")
            });
        for error in validator.iter_errors(&body) {
            problems.push(format!(
                "{what}: {error} at {} (schema {schema_pointer})",
                error.instance_path()
            ));
        }
    }
    problems
}

/// The document the code describes, as a value.
fn described_document() -> Value {
    serde_json::from_str(&openapi_document().expect("serialises")).expect("JSON")
}

fn served_document(answer: &Answer) -> Value {
    assert_eq!(answer.status, 200);
    assert_eq!(answer.content_type, "application/json");
    serde_json::from_slice(&answer.body).expect("the document is JSON")
}

#[tokio::test]
async fn the_document_is_served_without_a_token_as_the_code_describes_it() {
    let harness = Harness::start(|_| {}).await;
    let first = call(
        &harness,
        Method::GET,
        "/openapi.json",
        "/openapi.json",
        None,
        None,
    )
    .await;
    let second = call(
        &harness,
        Method::GET,
        "/openapi.json",
        "/openapi.json",
        None,
        None,
    )
    .await;
    let document = served_document(&first);
    assert_eq!(first.body, second.body, "the same document every time");
    assert_eq!(document["openapi"], "3.1.0");
    let described = openapi_document().expect("serialises");
    assert_eq!(
        first.body,
        described.as_bytes(),
        "served as the code describes it"
    );
    let scheme = &document["components"]["securitySchemes"]["github_token"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    harness.shutdown().await;
}

/// Both directions at the method level: a method the router answers (anything but 405) is documented, and a
/// documented one is answered. Without a token, so an enterprise route answers 401 without running its handler.
#[tokio::test]
async fn every_routed_method_is_documented_and_every_documented_one_routed() {
    let harness = Harness::start(|_| {}).await;
    let document = served_document(
        &call(
            &harness,
            Method::GET,
            "/openapi.json",
            "/openapi.json",
            None,
            None,
        )
        .await,
    );
    let values = [
        ("enterprise", "acme".to_owned()),
        ("server_id", Uuid::new_v4().to_string()),
        ("request_id", Uuid::new_v4().to_string()),
    ];
    let mut mismatches = Vec::new();
    // Leaked: `call` keeps each template for the answer it reports (a test process, a few dozen strings).
    let route_paths: &'static [String] = Vec::leak(route_paths());
    for template in route_paths.iter().map(String::as_str) {
        let path = concrete(template, &values);
        for method in [
            Method::GET,
            Method::PUT,
            Method::POST,
            Method::DELETE,
            Method::PATCH,
        ] {
            let documented = document
                .pointer(&format!(
                    "/paths/{}/{}",
                    escape(template),
                    method.as_str().to_lowercase()
                ))
                .is_some();
            let answer = call(&harness, method.clone(), template, &path, None, None).await;
            let routed = answer.status != 405;
            if routed != documented {
                mismatches.push(format!(
                    "{method} {template}: answered {}, documented: {documented}",
                    answer.status
                ));
            }
            if documented && template.contains("{enterprise}") && answer.status != 401 {
                mismatches.push(format!(
                    "{method} {template}: answered {} without a token",
                    answer.status
                ));
            }
        }
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
    harness.shutdown().await;
}

/// A snapshot of `users` (id, login, email) on `hostname`, generated `age` ago.
fn snapshot(
    server_id: Uuid,
    hostname: &str,
    users: &[(i64, &str, &str)],
    age: time::Duration,
) -> Snapshot {
    Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::new_v4(),
            instance: InstanceIdentity {
                server_id,
                hostname: hostname.to_owned(),
                ghes_version: "3.14.2".into(),
            },
            generated_at: OffsetDateTime::now_utc() - age,
            license: None,
            source_report: SourceReport::default(),
        },
        users: users
            .iter()
            .map(|&(id, login, email)| ServerUser {
                id,
                login: login.to_owned(),
                email: email.to_owned(),
                role: UserRole::User,
                suspended: false,
                dormant: false,
                created_at: None,
                last_active: None,
                two_factor_enabled: Some(true),
            })
            .collect(),
    }
}

fn usage_file(snapshot: Snapshot) -> String {
    serde_json::to_string(&UsageFile::from_snapshot(snapshot)).expect("usage file JSON")
}

fn json_body(answer: &Answer) -> Value {
    serde_json::from_slice(&answer.body)
        .unwrap_or_else(|error| panic!("{} {}: not JSON: {error}", answer.method, answer.template))
}

#[tokio::test]
async fn every_answer_matches_the_documented_schema_of_its_status() {
    // One refused token is enough to be throttled, for the 429; every other call has a valid token. Bodies over
    // 64 KiB are refused, for the 413s. The metrics need their token, for their 401.
    let harness = Harness::start(|config| {
        config.auth_failures_per_minute = 1;
        config.max_upload_bytes = 64 * 1024;
        config.metrics_token = Some(MetricsToken::new(METRICS_TOKEN));
    })
    .await;
    let owner = harness.owner_token.clone();
    let store = &harness.server().app.store;
    let (_, reader) = license_sync_aggregator::admin::issue_api_token(
        store,
        "acme",
        &NewApiToken {
            name: "reader",
            scope: TokenScope::Read,
            expires_at: None,
        },
        OffsetDateTime::now_utc(),
    )
    .await
    .expect("read token");
    let document = served_document(
        &call(
            &harness,
            Method::GET,
            "/openapi.json",
            "/openapi.json",
            None,
            None,
        )
        .await,
    );
    let server_id = Uuid::new_v4();
    let hostname = "ghes-1.example.com";
    harness.enrolled(server_id, hostname).await;
    let ids = [
        ("enterprise", "acme".to_owned()),
        ("server_id", server_id.to_string()),
    ];
    let mut answers = Vec::new();
    macro_rules! call {
        ($method:expr, $template:expr, $path:expr, $token:expr, $body:expr) => {{
            let path: &str = &$path;
            let answer = call(&harness, $method, $template, path, $token, $body).await;
            answers.push(answer);
            answers.last().expect("just pushed")
        }};
        ($method:expr, $template:expr, $token:expr) => {
            call!($method, $template, concrete($template, &ids), $token, None)
        };
    }
    let expect = |answer: &Answer, status: u16| {
        assert_eq!(
            answer.status,
            status,
            "{} {}: {}",
            answer.method,
            answer.template,
            String::from_utf8_lossy(&answer.body)
        );
    };

    let members = json!([
        {"id": 100, "login": "monalisa", "name": "Mona Lisa", "verified_emails": ["mona@example.com"],
         "consumes_license": true, "member_roles": ["org1:Owner"], "enterprise_roles": ["owner"],
         "identity": {"name_id": "mona", "emails": ["mona@example.com"]}, "two_factor_auth": true},
        {"id": 200, "login": "billing", "verified_emails": [], "consumes_license": false}
    ]);
    let members_path = "/enterprises/{enterprise}/cloud-members";
    let answer = call!(
        Method::PUT,
        members_path,
        concrete(members_path, &ids),
        Some(&owner),
        Some(members.to_string())
    );
    expect(answer, 200);
    let answer = call!(
        Method::PUT,
        members_path,
        concrete(members_path, &ids),
        Some(&owner),
        Some("[{\"id\": 1}]".into())
    );
    expect(answer, 422);
    let answer = call!(
        Method::PUT,
        members_path,
        concrete(members_path, &ids),
        Some(&reader),
        Some("[]".into())
    );
    expect(answer, 403);
    let oversized = format!("[{}]", " ".repeat(70 * 1024));
    let answer = call!(
        Method::PUT,
        members_path,
        concrete(members_path, &ids),
        Some(&owner),
        Some(oversized.clone())
    );
    expect(answer, 413);

    // Two accounts of one person (by the verified email), a server-only person, and a second "mona" login: a
    // likely duplicate.
    let users = [
        (1, "mona", "mona@example.com"),
        (2, "hubot", "hubot@example.com"),
        (3, "mona2", "Mona@Example.com"),
        (4, "monalisa", "other@example.com"),
    ];
    let upload_path = "/enterprises/{enterprise}/server-usage";
    let fresh = usage_file(snapshot(
        server_id,
        hostname,
        &users,
        time::Duration::minutes(1),
    ));
    let answer = call!(
        Method::POST,
        upload_path,
        concrete(upload_path, &ids),
        Some(&owner),
        Some(fresh.clone())
    );
    expect(answer, 201);
    let answer = call!(
        Method::POST,
        upload_path,
        concrete(upload_path, &ids),
        Some(&owner),
        Some(fresh)
    );
    expect(answer, 200);
    let older = usage_file(snapshot(
        server_id,
        hostname,
        &users,
        time::Duration::hours(1),
    ));
    let answer = call!(
        Method::POST,
        upload_path,
        concrete(upload_path, &ids),
        Some(&owner),
        Some(older)
    );
    expect(answer, 409);
    let unknown = usage_file(snapshot(
        Uuid::new_v4(),
        "ghes-9.example.com",
        &users,
        time::Duration::minutes(1),
    ));
    let answer = call!(
        Method::POST,
        upload_path,
        concrete(upload_path, &ids),
        Some(&owner),
        Some(unknown)
    );
    expect(answer, 404);
    let answer = call!(
        Method::POST,
        upload_path,
        concrete(upload_path, &ids),
        Some(&owner),
        Some("{\"format\": 1}".into())
    );
    expect(answer, 422);
    let answer = call!(
        Method::POST,
        upload_path,
        concrete(upload_path, &ids),
        Some(&owner),
        Some(oversized)
    );
    expect(answer, 413);
    let answer = call!(
        Method::POST,
        upload_path,
        concrete(upload_path, &ids),
        Some(&reader),
        Some("{}".into())
    );
    expect(answer, 403);

    let consumed_path = "/enterprises/{enterprise}/consumed-licenses";
    let consumed = call!(
        Method::GET,
        consumed_path,
        concrete(consumed_path, &ids) + "?per_page=2",
        Some(&reader),
        None
    );
    expect(consumed, 200);
    let consumed_body = json_body(consumed);
    assert_eq!(consumed_body["total_seats_consumed"], 3, "{consumed_body}");
    let answer = call!(
        Method::GET,
        consumed_path,
        concrete(consumed_path, &ids) + "?per_page=0",
        Some(&owner),
        None
    );
    expect(answer, 422);
    // A parameter given twice: GitHub's 422 too, not axum's plain-text 400.
    let answer = call!(
        Method::GET,
        consumed_path,
        concrete(consumed_path, &ids) + "?per_page=1&per_page=2",
        Some(&owner),
        None
    );
    expect(answer, 422);
    let answer = call!(
        Method::GET,
        consumed_path,
        "/enterprises/other/consumed-licenses",
        Some(&owner),
        None
    );
    expect(answer, 404);
    let answer = call!(Method::GET, consumed_path, None);
    expect(answer, 401);

    let status_path = "/enterprises/{enterprise}/license-sync-status";
    let status = call!(Method::GET, status_path, Some(&owner));
    expect(status, 200);
    let status_body = json_body(status);
    assert_eq!(status_body["server_instances"][0]["hostname"], hostname);

    let key_path = "/enterprises/{enterprise}/usage-file-key";
    expect(call!(Method::GET, key_path, Some(&owner)), 404);
    let acme = license_sync_aggregator::admin::enterprise(store, "acme")
        .await
        .expect("acme");
    license_sync_aggregator::usage_keys::generate(store, &acme)
        .await
        .expect("usage-file key");
    expect(call!(Method::GET, key_path, Some(&owner)), 200);

    let tokens_path = "/enterprises/{enterprise}/enrollment-tokens";
    let tokens = concrete(tokens_path, &ids);
    expect(
        call!(
            Method::POST,
            tokens_path,
            tokens.clone(),
            Some(&owner),
            None
        ),
        201,
    );
    expect(
        call!(
            Method::POST,
            tokens_path,
            tokens.clone(),
            Some(&owner),
            Some("{\"expires_in_hours\": 2}".into())
        ),
        201,
    );
    expect(
        call!(
            Method::POST,
            tokens_path,
            tokens.clone(),
            Some(&owner),
            Some("{\"hours\": 2}".into())
        ),
        422,
    );
    expect(
        call!(
            Method::POST,
            tokens_path,
            tokens.clone(),
            Some(&owner),
            Some(" ".repeat(70 * 1024))
        ),
        413,
    );

    let sync_now_path = "/enterprises/{enterprise}/instances/{server_id}/sync-now";
    let sync_now = call!(Method::POST, sync_now_path, Some(&owner));
    expect(sync_now, 202);
    let request_id = json_body(sync_now)["request_id"]
        .as_str()
        .expect("request_id")
        .to_owned();
    expect(
        call!(
            Method::POST,
            sync_now_path,
            concrete(sync_now_path, &[ids[0].clone(), ("server_id", "x".into())]),
            Some(&owner),
            None
        ),
        422,
    );
    expect(
        call!(
            Method::POST,
            sync_now_path,
            concrete(
                sync_now_path,
                &[ids[0].clone(), ("server_id", Uuid::new_v4().to_string())]
            ),
            Some(&owner),
            None
        ),
        404,
    );
    let request_path = "/enterprises/{enterprise}/instances/{server_id}/sync-requests/{request_id}";
    let with_request = [ids[0].clone(), ids[1].clone(), ("request_id", request_id)];
    expect(
        call!(
            Method::GET,
            request_path,
            concrete(request_path, &with_request),
            Some(&owner),
            None
        ),
        200,
    );
    let bad_request_id = [
        ids[0].clone(),
        ids[1].clone(),
        ("request_id", "x".to_owned()),
    ];
    expect(
        call!(
            Method::GET,
            request_path,
            concrete(request_path, &bad_request_id),
            Some(&owner),
            None
        ),
        422,
    );
    let unknown_request = [
        ids[0].clone(),
        ids[1].clone(),
        ("request_id", Uuid::new_v4().to_string()),
    ];
    expect(
        call!(
            Method::GET,
            request_path,
            concrete(request_path, &unknown_request),
            Some(&owner),
            None
        ),
        404,
    );

    let explain_path = "/enterprises/{enterprise}/license-explanations";
    let explain = concrete(explain_path, &ids);
    let account = format!("{hostname}:1");
    expect(
        call!(
            Method::GET,
            explain_path,
            format!("{explain}?account={account}"),
            Some(&owner),
            None
        ),
        200,
    );
    expect(
        call!(
            Method::GET,
            explain_path,
            format!("{explain}?account={account}&other={hostname}:2"),
            Some(&owner),
            None
        ),
        200,
    );
    expect(
        call!(
            Method::GET,
            explain_path,
            format!("{explain}?account=github.com:billing&other={hostname}:1"),
            Some(&owner),
            None
        ),
        200,
    );
    expect(
        call!(
            Method::GET,
            explain_path,
            explain.clone(),
            Some(&owner),
            None
        ),
        422,
    );
    expect(
        call!(
            Method::GET,
            explain_path,
            format!("{explain}?account=nowhere:9"),
            Some(&owner),
            None
        ),
        404,
    );

    let history_path = "/enterprises/{enterprise}/usage-history";
    let history = call!(Method::GET, history_path, Some(&owner));
    expect(history, 200);
    assert!(
        !json_body(history)["days"]
            .as_array()
            .expect("days")
            .is_empty(),
        "today is recorded"
    );
    let since_after_until = concrete(history_path, &ids) + "?since=2024-02-01&until=2024-01-01";
    expect(
        call!(
            Method::GET,
            history_path,
            since_after_until,
            Some(&owner),
            None
        ),
        422,
    );

    let duplicates_path = "/enterprises/{enterprise}/likely-duplicates";
    let duplicates = call!(Method::GET, duplicates_path, Some(&owner));
    expect(duplicates, 200);
    assert!(
        !json_body(duplicates)["likely_duplicates"]
            .as_array()
            .expect("likely_duplicates")
            .is_empty(),
        "the two monas"
    );

    expect(
        call!(
            Method::GET,
            "/enterprises/{enterprise}/api-tokens",
            Some(&owner)
        ),
        200,
    );
    expect(call!(Method::GET, "/healthz", None), 200);
    expect(call!(Method::GET, "/readyz", None), 200);
    expect(call!(Method::GET, "/metrics", Some(METRICS_TOKEN)), 200);
    expect(call!(Method::GET, "/metrics", None), 401);
    expect(call!(Method::GET, "/openapi.json", None), 200);
    expect(
        call!(
            Method::GET,
            "/enterprises/{enterprise}/consumed-licenses.csv",
            Some(&owner)
        ),
        200,
    );
    expect(call!(Method::GET, "/", None), 200);
    expect(call!(Method::GET, "/user", Some(&reader)), 200);
    expect(call!(Method::GET, "/user", None), 401);
    let graphql = |query: &str| Some(json!({ "query": query }).to_string());
    expect(
        call!(
            Method::POST,
            "/graphql",
            "/graphql",
            Some(&reader),
            graphql("query UserCurrent{viewer{login}}")
        ),
        200,
    );
    expect(
        call!(
            Method::POST,
            "/graphql",
            "/graphql",
            Some(&reader),
            graphql("{ enterprise { id } }")
        ),
        200,
    );
    expect(
        call!(
            Method::POST,
            "/graphql",
            "/graphql",
            None,
            graphql("{viewer{login}}")
        ),
        401,
    );
    expect(
        call!(
            Method::POST,
            "/graphql",
            "/graphql",
            Some(&reader),
            Some("not json".to_owned())
        ),
        422,
    );
    expect(
        call!(
            Method::POST,
            "/graphql",
            "/graphql",
            Some(&reader),
            graphql(&"x".repeat(70 * 1024))
        ),
        413,
    );

    let retire_path = "/enterprises/{enterprise}/instances/{server_id}";
    expect(call!(Method::DELETE, retire_path, Some(&reader)), 403);
    expect(call!(Method::DELETE, retire_path, Some(&owner)), 204);
    expect(call!(Method::DELETE, retire_path, Some(&owner)), 404);
    expect(
        call!(
            Method::DELETE,
            retire_path,
            concrete(retire_path, &[ids[0].clone(), ("server_id", "x".into())]),
            Some(&owner),
            None
        ),
        422,
    );

    // Last: a bad token (at the API root, whose only refusal it is), then this address is throttled.
    expect(call!(Method::GET, "/", Some("lst_not_a_token")), 401);
    let throttled = call!(Method::GET, status_path, Some("lst_not_a_token"));
    expect(throttled, 429);

    let problems = problems(&document, &answers);
    assert!(problems.is_empty(), "{problems:#?}");

    // Every documented answer of every operation has been seen once at least, but the shared ones (`$ref`s, seen on
    // some routes: a healthy test server cannot be made to answer 500, 503 or 507), and two a healthy server with only
    // its API cannot be made to give: a Sync now for an active instance without a credential (the storage suite
    // covers that refusal) and an unready store (the store-fault tests cover it).
    let seen: Vec<(String, String, String)> = answers
        .iter()
        .map(|answer| {
            (
                answer.template.to_owned(),
                answer.method.as_str().to_lowercase(),
                answer.status.to_string(),
            )
        })
        .collect();
    let mut unseen = Vec::new();
    let paths = document["paths"].as_object().expect("paths");
    for (template, item) in paths {
        // An alias (a documented path under a prefix) is the same handler: its original is covered.
        if paths.keys().any(|other| {
            other != template
                && (template.ends_with(other.as_str())
                    || (other == "/" && template == API_V3_PREFIX))
        }) {
            continue;
        }
        for (method, operation) in item.as_object().expect("path item") {
            for status in operation["responses"]
                .as_object()
                .expect("responses")
                .keys()
            {
                let shared = operation["responses"][status].get("$ref").is_some();
                let unproducible = (template.ends_with("/sync-now") && status == "409")
                    || (template == "/readyz" && status == "503");
                let key = (template.clone(), method.clone(), status.clone());
                // Throttled metrics scrapes: one throttled address is enough for the test, and it is the REST one.
                let metrics_throttled = template == "/metrics" && status == "429";
                if !(shared || unproducible || metrics_throttled || seen.contains(&key)) {
                    unseen.push(format!("{method} {template} → {status}"));
                }
            }
        }
    }
    assert!(
        unseen.is_empty(),
        "documented answers no test call made: {unseen:#?}"
    );

    // GitHub's own schemas of the two mirrored endpoints.
    for (schema_file, body) in [
        ("consumed-licenses.schema.json", &consumed_body),
        ("license-sync-status.schema.json", &status_body),
    ] {
        let schema = github_schema(schema_file);
        let validator = jsonschema::validator_for(&schema).expect("GitHub's schema compiles");
        let errors: Vec<String> = validator
            .iter_errors(body)
            .map(|error| format!("{error} at {}", error.instance_path()))
            .collect();
        assert!(errors.is_empty(), "{schema_file}: {errors:#?}\n{body}");
    }
    harness.shutdown().await;
}

fn github_schema(file: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/github")
        .join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_json::from_str(&text).expect("fixture JSON")
}

/// The JSON types a schema allows (`type`, a `oneOf` of `type`s, or a `$ref`'s), for comparing ours with GitHub's.
fn types_of(document: &Value, schema: &Value) -> Vec<String> {
    let schema = resolve(document, schema);
    let mut types: Vec<String> = match &schema["type"] {
        Value::String(name) => vec![name.clone()],
        Value::Array(names) => names
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => schema["oneOf"]
            .as_array()
            .map(|variants| {
                variants
                    .iter()
                    .flat_map(|variant| types_of(document, variant))
                    .collect()
            })
            .unwrap_or_else(|| {
                if schema.get("enum").is_some() {
                    vec!["string".to_owned()]
                } else {
                    Vec::new()
                }
            }),
    };
    types.sort();
    types.dedup();
    types
}

/// Every property GitHub's schema declares (at each level) is declared by ours, with types GitHub's allows, so that a
/// client generated from either reads our answers.
#[test]
fn our_schemas_of_githubs_endpoints_declare_githubs_fields_with_compatible_types() {
    let document = described_document();
    fn compare(
        document: &Value,
        ours: &Value,
        github: &Value,
        at: &str,
        problems: &mut Vec<String>,
    ) {
        let ours = resolve(document, ours);
        if let Some(properties) = github["properties"].as_object() {
            for (name, github_property) in properties {
                let Some(our_property) = ours["properties"].get(name) else {
                    problems.push(format!("{at}.{name}: not in our schema"));
                    continue;
                };
                compare(
                    document,
                    our_property,
                    github_property,
                    &format!("{at}.{name}"),
                    problems,
                );
            }
        }
        if let Some(github_types) = github["type"]
            .as_str()
            .map(|name| vec![name.to_owned()])
            .or_else(|| {
                github["type"].as_array().map(|names| {
                    names
                        .iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
            })
        {
            let our_types = types_of(document, ours);
            let compatible = our_types.iter().all(|name| {
                github_types.contains(name)
                    || (name == "integer" && github_types.iter().any(|t| t == "number"))
            });
            if our_types.is_empty() || !compatible {
                problems.push(format!(
                    "{at}: ours {our_types:?}, GitHub's {github_types:?}"
                ));
            }
        }
        if github.get("items").is_some() {
            compare(
                document,
                &resolve(document, ours)["items"],
                &github["items"],
                &format!("{at}[]"),
                problems,
            );
        }
    }
    let mut problems = Vec::new();
    let operations: BTreeMap<&str, &str> = [
        (
            "consumed-licenses.schema.json",
            "/enterprises/{enterprise}/consumed-licenses",
        ),
        (
            "license-sync-status.schema.json",
            "/enterprises/{enterprise}/license-sync-status",
        ),
    ]
    .into_iter()
    .collect();
    for (file, path) in operations {
        let ours = document
            .pointer(&format!(
                "/paths/{}/get/responses/200/content/application~1json/schema",
                escape(path)
            ))
            .unwrap_or_else(|| panic!("{path}: no 200 JSON schema"));
        compare(&document, ours, &github_schema(file), path, &mut problems);
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[tokio::test]
async fn the_served_document_passes_openapi_spec_validator() {
    let Some(python) = license_sync_serve::testing::python_with(
        "the_served_document_passes_openapi_spec_validator",
        &["openapi_spec_validator"],
    ) else {
        return;
    };
    let harness = Harness::start(|_| {}).await;
    let answer = call(
        &harness,
        Method::GET,
        "/openapi.json",
        "/openapi.json",
        None,
        None,
    )
    .await;
    served_document(&answer);
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &answer.body).expect("write the document");
    // The 3.1 validator by name, so that a document claiming another version fails rather than being checked
    // against that version's rules.
    let script = "import json, sys\n\
                  from openapi_spec_validator import validate, OpenAPIV31SpecValidator\n\
                  validate(json.load(open(sys.argv[1])), cls=OpenAPIV31SpecValidator)\n\
                  print('valid')\n";
    let output = std::process::Command::new(python)
        .args(["-c", script])
        .arg(&file)
        .output()
        .expect("run openapi-spec-validator");
    assert!(
        output.status.success(),
        "openapi-spec-validator refused the document: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "valid");
    harness.shutdown().await;
}

/// The check above can fail: an undocumented field, a wrong type, an undocumented status and a wrong content type
/// are each reported.
#[test]
fn the_answer_check_reports_undocumented_fields_wrong_types_statuses_and_content_types() {
    let document = described_document();
    let answer = |status: u16, content_type: &str, body: Value| Answer {
        method: Method::GET,
        template: "/enterprises/{enterprise}/usage-file-key",
        status,
        content_type: content_type.to_owned(),
        body: serde_json::to_vec(&body).expect("JSON"),
    };
    let good = json!({"public_key": "age1x", "created_at": "2024-01-01T00:00:00Z"});
    assert!(problems(&document, &[answer(200, "application/json", good.clone())]).is_empty());
    let mut extra = good.clone();
    extra["secret"] = json!("x");
    let cases = [
        answer(200, "application/json", extra),
        answer(
            200,
            "application/json",
            json!({"public_key": 1, "created_at": "x"}),
        ),
        answer(418, "application/json", good.clone()),
        answer(200, "text/plain", good),
        answer(404, "application/json", json!({"message": "Not Found"})),
    ];
    for case in cases {
        let found = problems(&document, std::slice::from_ref(&case));
        assert!(!found.is_empty(), "{case:?} passed");
    }
}

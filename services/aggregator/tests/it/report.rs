//! The CSV license report over real HTTP against the real server on `127.0.0.1:0`: the same people as the paged
//! `consumed-licenses` JSON, row by row, under GitHub's column names; the API's authentication; and streaming: a
//! commit made while a large report is being read is neither blocked by it nor missed by its later rows.

use license_sync_core::model::{ServerUser, UserRole};
use license_sync_core::snapshot::Snapshot;
use license_sync_proto::convert::{server_user, snapshot_header};
use license_sync_proto::v1::snapshot_chunk::Chunk;
use license_sync_proto::v1::snapshot_ingest_client::SnapshotIngestClient;
use license_sync_proto::v1::{SnapshotChunk, SnapshotTrailer, UserBatch};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::control::{Harness, PATIENCE, bearer, snapshot};
use crate::ingest::instance;

fn user(id: i64, login: &str, email: &str) -> ServerUser {
    ServerUser {
        id,
        login: login.to_owned(),
        email: email.to_owned(),
        role: UserRole::User,
        suspended: false,
        dormant: false,
        created_at: None,
        last_active: None,
        two_factor_enabled: None,
    }
}

/// Uploads `users` as the instance's snapshot, in batches of 5 000 (one message would pass `max_message_bytes`).
async fn upload(
    harness: &Harness,
    (server_id, credential): &(Uuid, String),
    hostname: &str,
    users: Vec<ServerUser>,
) {
    let mut snapshot: Snapshot = snapshot(*server_id, hostname);
    snapshot.users = users;
    let mut chunks = vec![SnapshotChunk {
        chunk: Some(Chunk::Header(snapshot_header(&snapshot.meta))),
    }];
    chunks.extend(snapshot.users.chunks(5_000).map(|batch| SnapshotChunk {
        chunk: Some(Chunk::Users(UserBatch {
            users: batch.iter().map(server_user).collect(),
        })),
    }));
    chunks.push(SnapshotChunk {
        chunk: Some(Chunk::Trailer(SnapshotTrailer {
            user_count: snapshot.users.len() as u64,
            users_sha256: snapshot.digest().to_vec(),
        })),
    });
    let mut client = SnapshotIngestClient::connect(harness.grpc_url().to_owned())
        .await
        .expect("connect");
    let mut request = tonic::Request::new(futures::stream::iter(chunks));
    request
        .metadata_mut()
        .insert("authorization", bearer(credential));
    client.upload_snapshot(request).await.expect("committed");
}

async fn csv_response(harness: &Harness, slug: &str, token: Option<&str>) -> reqwest::Response {
    let mut request = reqwest::Client::new().get(format!(
        "{}/enterprises/{slug}/consumed-licenses.csv",
        harness.base
    ));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.expect("HTTP request")
}

fn records(bytes: &[u8]) -> Vec<Vec<String>> {
    csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(bytes)
        .records()
        .map(|record| {
            record
                .expect("a CSV record")
                .iter()
                .map(str::to_owned)
                .collect()
        })
        .collect()
}

/// Every user of every `consumed-licenses` page, in page order.
async fn paged_users(harness: &Harness, per_page: usize) -> Vec<Value> {
    let mut users = Vec::new();
    for page in 1.. {
        let (status, body) = harness
            .owner_get(&format!(
                "/enterprises/acme/consumed-licenses?per_page={per_page}&page={page}"
            ))
            .await;
        assert_eq!(status, 200, "{body}");
        let page_users = body["users"].as_array().expect("users").clone();
        if page_users.is_empty() {
            break;
        }
        users.extend(page_users);
    }
    users
}

/// What the report's cells must be for one JSON user, by an independent reading of the rules in README: lists
/// joined with ", ", booleans as true/false, GitHub's capitalised license type, no-data columns empty, and a
/// leading `'` on a cell that a spreadsheet would run as a formula.
fn expected_cells(user: &Value) -> Vec<String> {
    let text = |key: &str| match &user[key] {
        Value::String(text) => text.clone(),
        Value::Bool(value) => value.to_string(),
        Value::Number(number) => number.to_string(),
        Value::Array(items) => items
            .iter()
            .map(|item| item.as_str().expect("a string item"))
            .collect::<Vec<_>>()
            .join(", "),
        Value::Null => String::new(),
        other => panic!("{key}: {other}"),
    };
    let license_type = match user["license_type"].as_str() {
        Some("enterprise") => "Enterprise".to_owned(),
        other => panic!("license type {other:?}"),
    };
    let none = String::new;
    [
        text("github_com_login"),
        text("github_com_name"),
        text("enterprise_server_user_ids"),
        text("github_com_user"),
        text("enterprise_server_user"),
        text("visual_studio_subscription_user"),
        license_type,
        text("github_com_profile"),
        text("github_com_member_roles"),
        text("github_com_enterprise_roles"),
        text("github_com_verified_domain_emails"),
        text("github_com_saml_name_id"),
        text("github_com_orgs_with_pending_invites"),
        text("github_com_two_factor_auth"),
        none(),
        none(),
        none(),
        none(),
        none(),
        none(),
        none(),
        text("enterprise_server_primary_emails"),
        none(),
        none(),
        none(),
        text("visual_studio_license_status"),
        text("visual_studio_subscription_email"),
        text("total_user_accounts"),
        text("person_id"),
        text("ambiguous"),
    ]
    .into_iter()
    .map(|cell| {
        if cell.starts_with(['=', '+', '-', '@', '\t', '\r']) {
            format!("'{cell}")
        } else {
            cell
        }
    })
    .collect()
}

#[tokio::test]
async fn the_csv_report_holds_the_paged_json_users_row_by_row_under_githubs_columns() {
    let harness = Harness::start(|_| {}).await;
    let store = &harness.server().app.store;
    license_sync_aggregator::admin::create_enterprise(store, "globex", "Globex", 1)
        .await
        .expect("enterprise");
    let globex_token = license_sync_aggregator::admin::create_api_token(store, "globex", "other")
        .await
        .expect("token");
    let mut members: Vec<Value> = (1..=30)
        .map(|id| {
            json!({
                "id": id,
                "login": format!("cloud{id:02}"),
                "name": format!("Cloud Person {id}"),
                "verified_emails": [format!("person{id}@example.com")],
                "consumes_license": true,
                "member_roles": ["acme:Member", format!("team{}:Owner", id % 3)],
                "enterprise_roles": ["Member"],
                "two_factor_auth": id % 2 == 0,
            })
        })
        .collect();
    // Names anyone can choose: a formula, a comma, quotes and a newline.
    members[0]["name"] = json!("=HYPERLINK(\"http://evil.example\",\"x\")");
    members[1]["name"] = json!("Lisa, \"Mona\"\nda Vinci");
    members[2]["name"] = json!("@admin");
    members[3]["login"] = json!("-dash");
    let (status, body) = harness
        .rest(
            reqwest::Method::PUT,
            "/enterprises/acme/cloud-members",
            Some(&harness.owner_token),
            Some(&Value::Array(members).to_string()),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Two instances: people matched to cloud members, merged across instances, and server-only ones.
    let first = instance(&harness, "ghes-a.example").await;
    let second = instance(&harness, "ghes-b.example").await;
    let users_a: Vec<ServerUser> = (1..=40)
        .map(|id| {
            user(
                id,
                &format!("a-user{id}"),
                &format!("person{id}@example.com"),
            )
        })
        .collect();
    let mut users_b: Vec<ServerUser> = (20..=60)
        .map(|id| {
            user(
                id + 100,
                &format!("b-user{id}"),
                &format!("person{id}@example.com"),
            )
        })
        .collect();
    users_b.push(user(1000, "+plus", "plus@example.com"));
    upload(&harness, &first, "ghes-a.example", users_a).await;
    upload(&harness, &second, "ghes-b.example", users_b).await;

    let response = csv_response(&harness, "acme", Some(&harness.owner_token)).await;
    assert_eq!(response.status(), 200);
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(header("content-type"), "text/csv; charset=utf-8");
    let today = license_sync_aggregator::time_format::utc_date(time::OffsetDateTime::now_utc());
    assert_eq!(
        header("content-disposition"),
        format!("attachment; filename=\"acme-consumed-licenses-{today}.csv\"")
    );
    let bytes = response.bytes().await.expect("body");
    let rows = records(&bytes);
    assert_eq!(rows[0][0], "GitHub com login");
    assert_eq!(rows[0].len(), 30);

    let users = paged_users(&harness, 7).await;
    assert_eq!(
        users.len(),
        61,
        "30 cloud members with 60 GHES people, one server-only extra"
    );
    assert_eq!(rows.len() - 1, users.len(), "one row per consuming person");
    for (position, (row, user)) in rows[1..].iter().zip(&users).enumerate() {
        assert_eq!(*row, expected_cells(user), "row {}", position + 1);
    }
    let name_column = 1;
    assert!(
        rows.iter()
            .any(|row| row[name_column] == "'=HYPERLINK(\"http://evil.example\",\"x\")"),
        "the formula is neutralised"
    );
    assert!(
        rows.iter()
            .any(|row| row[name_column] == "Lisa, \"Mona\"\nda Vinci")
    );

    // The API's authentication: no token is a 401, another enterprise's token a 404.
    assert_eq!(csv_response(&harness, "acme", None).await.status(), 401);
    assert_eq!(
        csv_response(&harness, "acme", Some(&globex_token))
            .await
            .status(),
        404
    );
    harness.shutdown().await;
}

#[tokio::test]
async fn a_commit_during_a_large_report_is_not_blocked_and_reaches_its_later_rows() {
    const PEOPLE: i64 = 100_000;
    let harness = Harness::start(|_| {}).await;
    let big = instance(&harness, "ghes-big.example").await;
    let late = instance(&harness, "ghes-late.example").await;
    let users: Vec<ServerUser> = (1..=PEOPLE)
        .map(|id| {
            user(
                id,
                &format!("user{id:06}"),
                &format!("user{id}@example.com"),
            )
        })
        .collect();
    upload(&harness, &big, "ghes-big.example", users).await;

    let mut response = csv_response(&harness, "acme", Some(&harness.owner_token)).await;
    assert_eq!(response.status(), 200);
    let mut body = response
        .chunk()
        .await
        .expect("a first part")
        .expect("not the end")
        .to_vec();
    // 12.3 MB in all, more than loopback buffers while the client does not read (the server's send buffer is at most
    // `tcp_wmem`'s 4 MB by default; the receive buffer grows only with reads): the server is still writing the
    // report. A commit now must go through (no read guard is held while the client is not reading) and be visible
    // at once. A report written whole before it was sent fails the row count below (checked by hand).
    let late_users: Vec<ServerUser> = (1..=3)
        .map(|id| {
            user(
                id,
                &format!("zzz-late{id}"),
                &format!("late{id}@example.com"),
            )
        })
        .collect();
    tokio::time::timeout(
        PATIENCE,
        upload(&harness, &late, "ghes-late.example", late_users),
    )
    .await
    .expect("the commit is not blocked by the open report");
    let (status, page) = tokio::time::timeout(
        PATIENCE,
        harness.owner_get("/enterprises/acme/consumed-licenses?per_page=1"),
    )
    .await
    .expect("the JSON is answered while the report is open");
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["total_seats_consumed"], PEOPLE + 3);

    while let Some(chunk) = response.chunk().await.expect("the rest of the body") {
        body.extend_from_slice(&chunk);
    }
    let rows = records(&body);
    let ids: Vec<&str> = rows[1..].iter().map(|row| row[28].as_str()).collect();
    assert_eq!(
        ids.len(),
        PEOPLE as usize + 3,
        "every person once, the late ones too: the rows after the commit were written after it"
    );
    assert_eq!(ids.last(), Some(&"server:ghes-late.example:3"));
    let mut distinct = ids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), ids.len(), "nobody twice");
    harness.shutdown().await;
}

//! The peak heap of parsing a members import and a usage file (plain or encrypted), against the body's size (issue
//! 11, item 9): each must stay within 2× the body. A binary of its own because its global allocator (the `cap` crate's
//! counting allocator around the system one) counts every thread of the process: sharing it with other tests would count
//! their bytes too. Bytes are counted exactly, so the bound does not depend on the machine or on time.
//!
//! The peak is the allocator's high-water mark, which cannot be reset: each case builds its body first with an
//! exactly sized buffer, then checks that its parse set a new high-water mark (so the figure is its own), and the
//! cases run from the smallest peak to the largest. The old parses (an untagged enum, a `Value` then the struct)
//! are measured in the same run as the baseline.

use std::alloc::System;

use license_sync_core::model::{
    CloudMember, ExternalIdentity, MembersImport, ServerUser, UserRole,
};
use license_sync_core::snapshot::{Snapshot, SnapshotDigest, SnapshotMeta, UsageFile};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

#[global_allocator]
static ALLOCATOR: cap::Cap<System> = cap::Cap::new(System, usize::MAX);

/// What the aggregator may hold, on top of the body itself, while it parses one.
const MAX_PEAK_OVER_BODY: f64 = 2.0;

/// A member as the loadgen enterprise has them: one in ten matched by identity, the others by a verified email.
fn member(index: usize) -> CloudMember {
    let address = format!("person{index}@corp.example");
    let by_identity = index.is_multiple_of(10);
    CloudMember {
        id: 1_000_000 + index as i64,
        login: format!("cloud-{index}"),
        name: Some(format!("Person {index}")),
        verified_emails: if by_identity {
            Vec::new()
        } else {
            vec![address.clone()]
        },
        identity: by_identity.then(|| ExternalIdentity {
            name_id: Some(format!("person{index}")),
            emails: vec![address],
            ..ExternalIdentity::default()
        }),
        consumes_license: !index.is_multiple_of(20),
        member_roles: vec!["org1:Member".to_owned()],
        enterprise_roles: Vec::new(),
        orgs_with_pending_invites: Vec::new(),
        two_factor_auth: Some(true),
        visual_studio_subscription_user: false,
    }
}

/// A user as the agent exports them.
fn user(index: usize) -> ServerUser {
    ServerUser {
        id: index as i64 + 1,
        login: format!("user{index}"),
        email: format!("user{index}@corp.example"),
        role: UserRole::User,
        suspended: index.is_multiple_of(25),
        dormant: index.is_multiple_of(7),
        created_at: Some(OffsetDateTime::UNIX_EPOCH + time::Duration::days(18_000)),
        last_active: Some(OffsetDateTime::UNIX_EPOCH + time::Duration::days(20_000)),
        two_factor_enabled: Some(true),
    }
}

/// `head`, the items `0..count` as a JSON array's elements, `tail`: written into a buffer of exactly its size, so
/// that building the body does not peak higher than the body (a doubling buffer would leave up to 2× behind).
fn json_body<T: Serialize>(head: &str, count: usize, item: fn(usize) -> T, tail: &str) -> Vec<u8> {
    let mut scratch = Vec::new();
    let mut length = head.len() + tail.len() + count.saturating_sub(1);
    for index in 0..count {
        scratch.clear();
        serde_json::to_writer(&mut scratch, &item(index)).expect("serialize");
        length += scratch.len();
    }
    drop(scratch);
    let mut body = Vec::with_capacity(length);
    body.extend_from_slice(head.as_bytes());
    for index in 0..count {
        if index > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, &item(index)).expect("serialize");
    }
    body.extend_from_slice(tail.as_bytes());
    assert_eq!(body.len(), length, "the body was sized exactly");
    body
}

/// A usage file of `users` users, as `license-sync-agent export` writes it.
fn usage_body(users: usize) -> Vec<u8> {
    let (head, tail) = usage_head_and_tail(users);
    json_body(&head, users, user, tail)
}

/// The same usage file encrypted to `key`, streamed user by user into a buffer sized for the ciphertext, so that
/// building it never holds the plaintext (age adds a header and 16 bytes per 64 KiB chunk).
fn encrypted_usage_body(users: usize, key: &age::x25519::Recipient) -> Vec<u8> {
    use std::io::Write as _;
    let (head, tail) = usage_head_and_tail(users);
    let mut plaintext_length = head.len() + tail.len() + users.saturating_sub(1);
    let mut scratch = Vec::new();
    for index in 0..users {
        scratch.clear();
        serde_json::to_writer(&mut scratch, &user(index)).expect("serialize");
        plaintext_length += scratch.len();
    }
    drop(scratch);
    let capacity = plaintext_length + 16 * (plaintext_length / 65_536 + 1) + 1024;
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(key as &dyn age::Recipient)).expect("key");
    let mut writer = encryptor
        .wrap_output(Vec::with_capacity(capacity))
        .expect("encrypt");
    writer.write_all(head.as_bytes()).expect("write");
    for index in 0..users {
        if index > 0 {
            writer.write_all(b",").expect("write");
        }
        serde_json::to_writer(&mut writer, &user(index)).expect("serialize");
    }
    writer.write_all(tail.as_bytes()).expect("write");
    let body = writer.finish().expect("finish");
    assert!(body.len() <= capacity, "the ciphertext was sized ahead");
    body
}

/// The usage file's JSON before and after its users.
fn usage_head_and_tail(users: usize) -> (String, &'static str) {
    let mut digest = SnapshotDigest::default();
    for index in 0..users {
        digest.update(&user(index));
    }
    let mut file = UsageFile::from_snapshot(Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::from_u128(1),
            instance: license_sync_core::model::InstanceIdentity {
                server_id: Uuid::from_u128(2),
                hostname: "ghes.example.com".to_owned(),
                ghes_version: "3.14.0".to_owned(),
            },
            generated_at: OffsetDateTime::UNIX_EPOCH,
            license: None,
            source_report: Default::default(),
        },
        users: Vec::new(),
    });
    file.user_count = users as u64;
    file.users_sha256 = hex::encode(digest.finish());
    let header = serde_json::to_string(&file).expect("serialize");
    let head = header
        .strip_suffix("[]}")
        .expect("the users are the usage file's last field");
    (format!("{head}["), "]}")
}

/// The members body before issue 11: an untagged enum, which buffers the whole body before trying each shape.
#[derive(Deserialize)]
#[serde(untagged)]
enum UntaggedMembers {
    List(Vec<CloudMember>),
    Wrapped { members: Vec<CloudMember> },
}

/// The usage upload before issue 11: a `Value` for the format check, then the struct.
fn usage_file_parsed_twice(body: &[u8]) -> UsageFile {
    let value: serde_json::Value = serde_json::from_slice(body).expect("JSON");
    assert_eq!(value["format"], UsageFile::FORMAT);
    drop(value);
    serde_json::from_slice(body).expect("usage file")
}

/// The heap the parse of `body` holds at its peak, over the body's size; `parse` returns how many rows it read.
fn peak_over_body(case: &str, body: Vec<u8>, rows: usize, parse: impl Fn(&[u8]) -> usize) -> f64 {
    let before = ALLOCATOR.allocated();
    let high_water_before = ALLOCATOR.max_allocated();
    assert_eq!(parse(&body), rows, "{case}: every row parsed");
    let peak = ALLOCATOR.max_allocated();
    assert!(
        peak > high_water_before,
        "{case}: the parse did not set a new high-water mark ({peak} bytes), so its peak is unknown: \
         order the cases from the smallest peak to the largest"
    );
    let ratio = (peak - before) as f64 / body.len() as f64;
    println!(
        "{case:<40} body {:6.1} MiB  peak over the body {:6.1} MiB  = {ratio:.2}× the body",
        body.len() as f64 / (1024.0 * 1024.0),
        (peak - before) as f64 / (1024.0 * 1024.0),
    );
    ratio
}

#[test]
fn json_bodies_are_parsed_within_twice_their_size() {
    const USERS: usize = 40_000;
    const MEMBERS: usize = 30_000;
    let parse_usage = |body: &[u8]| UsageFile::from_json(body).expect("usage file").users.len();
    let parse_members = |body: &[u8]| {
        serde_json::from_slice::<MembersImport>(body)
            .expect("members")
            .0
            .len()
    };
    let key = age::x25519::Identity::generate();
    let keys = [key.clone()];
    // 10 % more users than the plain case, so that its peak (ciphertext plus the parsed users) is the next high.
    let encrypted_users = USERS * 11 / 10;
    let after = [
        peak_over_body("usage file", usage_body(USERS), USERS, parse_usage),
        peak_over_body(
            "usage file, encrypted",
            encrypted_usage_body(encrypted_users, &key.to_public()),
            encrypted_users,
            |body: &[u8]| {
                license_sync_core::encrypted_usage_file::read_encrypted(body, &keys)
                    .expect("decrypts")
                    .users
                    .len()
            },
        ),
        peak_over_body(
            "members, an array",
            json_body("[", MEMBERS, member, "]"),
            MEMBERS,
            parse_members,
        ),
        peak_over_body(
            "members, {\"members\": [...]}",
            json_body("{\"members\":[", MEMBERS * 3 / 2, member, "]}"),
            MEMBERS * 3 / 2,
            parse_members,
        ),
    ];
    let before = [
        peak_over_body(
            "before: usage file, a Value then the struct",
            usage_body(USERS),
            USERS,
            |body| usage_file_parsed_twice(body).users.len(),
        ),
        peak_over_body(
            "before: members, an untagged enum",
            json_body("[", MEMBERS * 3 / 2, member, "]"),
            MEMBERS * 3 / 2,
            |body| match serde_json::from_slice::<UntaggedMembers>(body).expect("members") {
                UntaggedMembers::List(members) | UntaggedMembers::Wrapped { members } => {
                    members.len()
                }
            },
        ),
    ];
    println!("before: {before:.2?}, after: {after:.2?} (peak heap over the body's size)");
    for ratio in after {
        assert!(
            ratio <= MAX_PEAK_OVER_BODY,
            "a parse held {ratio:.2}× its body, over {MAX_PEAK_OVER_BODY}×"
        );
    }
}

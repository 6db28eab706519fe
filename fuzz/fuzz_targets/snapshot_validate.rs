//! Snapshot validation and the export → upload round trip. For any snapshot: `validate` does not panic, and a snapshot
//! written as a usage file and read back is the same snapshot with the same digest (what an owner uploads is exactly
//! what the agent read), so the file format loses nothing the digest covers.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use license_sync_core::model::{InstanceIdentity, ServerUser, SourceReport, UserRole};
use license_sync_core::snapshot::{Snapshot, SnapshotLimits, SnapshotMeta, UsageFile};
use time::OffsetDateTime;
use uuid::Uuid;

#[derive(Arbitrary, Debug)]
struct Input {
    sync_id: u128,
    server_id: u128,
    hostname: String,
    ghes_version: String,
    generated_at: i32,
    rows_read: u64,
    rows_skipped: u64,
    users: Vec<User>,
}

#[derive(Arbitrary, Debug)]
struct User {
    id: i64,
    login: String,
    email: String,
    site_admin: bool,
    suspended: bool,
    dormant: bool,
    created_at: Option<i32>,
    last_active: Option<i32>,
    two_factor_enabled: Option<bool>,
}

fn time(seconds: i32) -> OffsetDateTime {
    // i32 seconds stay inside RFC 3339's years, so serialisation cannot be what fails.
    OffsetDateTime::from_unix_timestamp(i64::from(seconds)).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fuzz_target!(|input: Input| {
    let snapshot = Snapshot {
        meta: SnapshotMeta {
            sync_id: Uuid::from_u128(input.sync_id),
            instance: InstanceIdentity {
                server_id: Uuid::from_u128(input.server_id),
                hostname: input.hostname,
                ghes_version: input.ghes_version,
            },
            generated_at: time(input.generated_at),
            license: None,
            source_report: SourceReport {
                rows_read: input.rows_read,
                rows_skipped: input.rows_skipped,
            },
        },
        users: input
            .users
            .into_iter()
            .map(|user| ServerUser {
                id: user.id,
                login: user.login,
                email: user.email,
                role: if user.site_admin { UserRole::SiteAdmin } else { UserRole::User },
                suspended: user.suspended,
                dormant: user.dormant,
                created_at: user.created_at.map(time),
                last_active: user.last_active.map(time),
                two_factor_enabled: user.two_factor_enabled,
            })
            .collect(),
    };
    let _ = snapshot.validate(&SnapshotLimits::default(), OffsetDateTime::now_utc());

    let digest = snapshot.digest();
    let users = snapshot.users.clone();
    let bytes = serde_json::to_vec(&UsageFile::from_snapshot(snapshot)).expect("a usage file serialises");
    let file: UsageFile = serde_json::from_slice(&bytes).expect("a written usage file parses");
    let read_back = file.into_snapshot().expect("a written usage file passes its own count and digest");
    assert_eq!(read_back.digest(), digest);
    assert_eq!(read_back.users, users);
});

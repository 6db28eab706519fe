//! Conversions between the domain types of `license-sync-core` and the `licensesync.v1` wire types.
//!
//! Core → proto is infallible. Proto → core returns a [`ConvertError`] naming the field that is wrong, because the
//! aggregator turns it into an `INVALID_ARGUMENT` answer that the agent's operator has to act on.

use license_sync_core::model::{
    InstanceIdentity, InstanceLicense, ServerUser, SourceReport, UserRole,
};
use license_sync_core::snapshot::SnapshotMeta;
use prost_types::Timestamp;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::v1;

/// Why a wire message cannot become a domain value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    #[error("`{field}` is not a valid UUID: {value:?}")]
    InvalidUuid { field: &'static str, value: String },
    #[error("`{field}` is missing")]
    MissingField { field: &'static str },
    #[error("`{field}` is not a valid timestamp (seconds {seconds}, nanos {nanos}): out of range")]
    TimestampOutOfRange {
        field: &'static str,
        seconds: i64,
        nanos: i32,
    },
    #[error(
        "`{field}` has an unknown user role value {value}: expected USER_ROLE_USER or USER_ROLE_SITE_ADMIN"
    )]
    UnknownRole { field: &'static str, value: i32 },
}

/// A point in time as a protobuf `Timestamp` (nanosecond precision is kept).
pub fn timestamp(time: OffsetDateTime) -> Timestamp {
    let nanos = time.unix_timestamp_nanos();
    // `OffsetDateTime` spans ±9999 years, well within i64 seconds, so these casts cannot truncate.
    let seconds = nanos.div_euclid(1_000_000_000) as i64;
    let nanos = nanos.rem_euclid(1_000_000_000) as i32;
    Timestamp { seconds, nanos }
}

/// A protobuf `Timestamp` as a UTC `OffsetDateTime`; `field` names it in the error.
pub fn offset_date_time(
    timestamp: &Timestamp,
    field: &'static str,
) -> Result<OffsetDateTime, ConvertError> {
    let out_of_range = || ConvertError::TimestampOutOfRange {
        field,
        seconds: timestamp.seconds,
        nanos: timestamp.nanos,
    };
    if !(0..1_000_000_000).contains(&timestamp.nanos) {
        return Err(out_of_range());
    }
    let total = i128::from(timestamp.seconds) * 1_000_000_000 + i128::from(timestamp.nanos);
    OffsetDateTime::from_unix_timestamp_nanos(total).map_err(|_| out_of_range())
}

/// An optional wire timestamp; absent stays absent.
pub fn optional_offset_date_time(
    timestamp: Option<&Timestamp>,
    field: &'static str,
) -> Result<Option<OffsetDateTime>, ConvertError> {
    timestamp
        .map(|timestamp| offset_date_time(timestamp, field))
        .transpose()
}

pub fn user_role(role: UserRole) -> v1::UserRole {
    match role {
        UserRole::User => v1::UserRole::User,
        UserRole::SiteAdmin => v1::UserRole::SiteAdmin,
    }
}

/// The role of a wire user. `USER_ROLE_UNSPECIFIED` and unknown values are refused: every row must say its role.
pub fn user_role_from_proto(value: i32, field: &'static str) -> Result<UserRole, ConvertError> {
    match v1::UserRole::try_from(value) {
        Ok(v1::UserRole::User) => Ok(UserRole::User),
        Ok(v1::UserRole::SiteAdmin) => Ok(UserRole::SiteAdmin),
        Ok(v1::UserRole::Unspecified) | Err(_) => Err(ConvertError::UnknownRole { field, value }),
    }
}

pub fn server_user(user: &ServerUser) -> v1::ServerUser {
    v1::ServerUser {
        id: user.id,
        login: user.login.clone(),
        email: user.email.clone(),
        role: user_role(user.role).into(),
        suspended: user.suspended,
        dormant: user.dormant,
        created_at: user.created_at.map(timestamp),
        last_active: user.last_active.map(timestamp),
        two_factor_enabled: user.two_factor_enabled,
    }
}

pub fn server_user_from_proto(user: v1::ServerUser) -> Result<ServerUser, ConvertError> {
    Ok(ServerUser {
        id: user.id,
        role: user_role_from_proto(user.role, "users[].role")?,
        created_at: optional_offset_date_time(user.created_at.as_ref(), "users[].created_at")?,
        last_active: optional_offset_date_time(user.last_active.as_ref(), "users[].last_active")?,
        login: user.login,
        email: user.email,
        suspended: user.suspended,
        dormant: user.dormant,
        two_factor_enabled: user.two_factor_enabled,
    })
}

pub fn instance_license(license: &InstanceLicense) -> v1::InstanceLicense {
    v1::InstanceLicense {
        seats: license.seats,
        seats_used: license.seats_used,
        kind: license.kind.clone(),
        expires_at: license.expires_at.map(timestamp),
    }
}

pub fn instance_license_from_proto(
    license: v1::InstanceLicense,
) -> Result<InstanceLicense, ConvertError> {
    Ok(InstanceLicense {
        seats: license.seats,
        seats_used: license.seats_used,
        expires_at: optional_offset_date_time(
            license.expires_at.as_ref(),
            "header.license.expires_at",
        )?,
        kind: license.kind,
    })
}

pub fn source_report(report: SourceReport) -> v1::SourceReport {
    v1::SourceReport {
        rows_read: report.rows_read,
        rows_skipped: report.rows_skipped,
    }
}

pub fn source_report_from_proto(report: v1::SourceReport) -> SourceReport {
    SourceReport {
        rows_read: report.rows_read,
        rows_skipped: report.rows_skipped,
    }
}

/// The stream's first message, from everything about a snapshot except its users.
pub fn snapshot_header(meta: &SnapshotMeta) -> v1::SnapshotHeader {
    v1::SnapshotHeader {
        sync_id: meta.sync_id.to_string(),
        server_id: meta.instance.server_id.to_string(),
        hostname: meta.instance.hostname.clone(),
        ghes_version: meta.instance.ghes_version.clone(),
        generated_at: Some(timestamp(meta.generated_at)),
        license: meta.license.as_ref().map(instance_license),
        source_report: Some(source_report(meta.source_report)),
    }
}

fn uuid(value: &str, field: &'static str) -> Result<Uuid, ConvertError> {
    Uuid::parse_str(value.trim()).map_err(|_| ConvertError::InvalidUuid {
        field,
        value: value.to_owned(),
    })
}

/// The snapshot's metadata from a stream header. `generated_at` is required (ordering depends on it); a missing
/// source report reads as zero rows.
pub fn snapshot_meta_from_proto(header: v1::SnapshotHeader) -> Result<SnapshotMeta, ConvertError> {
    let generated_at = header
        .generated_at
        .as_ref()
        .ok_or(ConvertError::MissingField {
            field: "header.generated_at",
        })?;
    Ok(SnapshotMeta {
        sync_id: uuid(&header.sync_id, "header.sync_id")?,
        instance: InstanceIdentity {
            server_id: uuid(&header.server_id, "header.server_id")?,
            hostname: header.hostname,
            ghes_version: header.ghes_version,
        },
        generated_at: offset_date_time(generated_at, "header.generated_at")?,
        license: header
            .license
            .map(instance_license_from_proto)
            .transpose()?,
        source_report: header
            .source_report
            .map(source_report_from_proto)
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn user() -> ServerUser {
        ServerUser {
            id: 42,
            login: "mona".into(),
            email: "Mona@Example.com".into(),
            role: UserRole::SiteAdmin,
            suspended: false,
            dormant: true,
            created_at: Some(datetime!(2020-02-03 04:05:06.789 UTC)),
            last_active: None,
            two_factor_enabled: Some(true),
        }
    }

    fn meta() -> SnapshotMeta {
        SnapshotMeta {
            sync_id: Uuid::now_v7(),
            instance: InstanceIdentity {
                server_id: Uuid::from_u128(0x6f1c_0000_0000_4000_8000_0000_0000_0001),
                hostname: "ghes-1.example.com".into(),
                ghes_version: "3.14.2".into(),
            },
            generated_at: datetime!(2025-11-28 13:00:00 UTC),
            license: Some(InstanceLicense {
                seats: None,
                seats_used: 12,
                kind: "standard".into(),
                expires_at: Some(datetime!(2027-02-06 18:41:52 UTC)),
            }),
            source_report: SourceReport {
                rows_read: 14,
                rows_skipped: 2,
            },
        }
    }

    #[test]
    fn server_user_round_trips() {
        let original = user();
        let wire = server_user(&original);
        assert_eq!(wire.role, v1::UserRole::SiteAdmin as i32);
        assert_eq!(server_user_from_proto(wire), Ok(original));

        let mut plain = user();
        plain.role = UserRole::User;
        plain.created_at = None;
        plain.two_factor_enabled = None;
        assert_eq!(server_user_from_proto(server_user(&plain)), Ok(plain));
    }

    #[test]
    fn snapshot_meta_round_trips() {
        let original = meta();
        assert_eq!(
            snapshot_meta_from_proto(snapshot_header(&original)),
            Ok(original)
        );
        let mut unlicensed = meta();
        unlicensed.license = None;
        assert_eq!(
            snapshot_meta_from_proto(snapshot_header(&unlicensed)),
            Ok(unlicensed)
        );
    }

    #[test]
    fn timestamps_round_trip_before_and_after_the_epoch() {
        for time in [
            datetime!(1969-12-31 23:59:59.5 UTC),
            OffsetDateTime::UNIX_EPOCH,
            datetime!(2038-01-19 03:14:08.000000001 UTC),
        ] {
            let wire = timestamp(time);
            assert!((0..1_000_000_000).contains(&wire.nanos));
            assert_eq!(offset_date_time(&wire, "t"), Ok(time));
        }
        assert_eq!(
            timestamp(datetime!(1969-12-31 23:59:59.5 UTC)),
            Timestamp {
                seconds: -1,
                nanos: 500_000_000
            }
        );
    }

    #[test]
    fn bad_headers_are_refused_with_the_field_name() {
        let mut bad_sync_id = snapshot_header(&meta());
        bad_sync_id.sync_id = "not-a-uuid".into();
        let error = snapshot_meta_from_proto(bad_sync_id).expect_err("bad uuid");
        assert!(matches!(
            error,
            ConvertError::InvalidUuid {
                field: "header.sync_id",
                ..
            }
        ));
        assert!(error.to_string().contains("not-a-uuid"));

        let mut bad_server_id = snapshot_header(&meta());
        bad_server_id.server_id = String::new();
        assert!(matches!(
            snapshot_meta_from_proto(bad_server_id),
            Err(ConvertError::InvalidUuid {
                field: "header.server_id",
                ..
            })
        ));

        let mut no_time = snapshot_header(&meta());
        no_time.generated_at = None;
        assert_eq!(
            snapshot_meta_from_proto(no_time),
            Err(ConvertError::MissingField {
                field: "header.generated_at"
            })
        );

        let mut far_future = snapshot_header(&meta());
        far_future.generated_at = Some(Timestamp {
            seconds: i64::MAX,
            nanos: 0,
        });
        assert!(matches!(
            snapshot_meta_from_proto(far_future),
            Err(ConvertError::TimestampOutOfRange {
                field: "header.generated_at",
                ..
            })
        ));

        let mut bad_nanos = snapshot_header(&meta());
        bad_nanos.generated_at = Some(Timestamp {
            seconds: 0,
            nanos: -1,
        });
        assert!(snapshot_meta_from_proto(bad_nanos).is_err());
    }

    #[test]
    fn unspecified_or_unknown_roles_are_refused() {
        let mut wire = server_user(&user());
        wire.role = v1::UserRole::Unspecified as i32;
        assert!(matches!(
            server_user_from_proto(wire.clone()),
            Err(ConvertError::UnknownRole { value: 0, .. })
        ));
        wire.role = 99;
        assert!(matches!(
            server_user_from_proto(wire),
            Err(ConvertError::UnknownRole { value: 99, .. })
        ));
    }

    #[test]
    fn missing_source_report_reads_as_zero_rows() {
        let mut header = snapshot_header(&meta());
        header.source_report = None;
        let meta = snapshot_meta_from_proto(header).expect("valid");
        assert_eq!(meta.source_report, SourceReport::default());
    }
}

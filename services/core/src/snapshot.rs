//! A full snapshot of one GHES instance: its identity, when it was read, and every user row.
//!
//! The same snapshot travels as a gRPC stream or as an exported usage file; both end in
//! [`Snapshot::validate`] on the aggregator, so the rules below hold whichever way it arrives.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::{InstanceIdentity, InstanceLicense, ServerUser, SourceReport};

/// Everything about a snapshot except its users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotMeta {
    /// Unique per snapshot; a retry reuses it so that the aggregator applies the snapshot once.
    pub sync_id: Uuid,
    #[serde(flatten)]
    pub instance: InstanceIdentity,
    #[serde(with = "time::serde::rfc3339")]
    pub generated_at: OffsetDateTime,
    #[serde(default)]
    pub license: Option<InstanceLicense>,
    #[serde(default)]
    pub source_report: SourceReport,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub meta: SnapshotMeta,
    pub users: Vec<ServerUser>,
}

/// Limits the aggregator enforces on one snapshot.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotLimits {
    pub max_users: usize,
}

impl Default for SnapshotLimits {
    fn default() -> Self {
        SnapshotLimits {
            max_users: 2_000_000,
        }
    }
}

/// Longest login accepted, in characters. GitHub allows 39, but GHES keeps LDAP and SAML user names (normalised,
/// sometimes with a domain) that can be longer; 100 leaves room for those and still bounds what one row holds.
pub const MAX_LOGIN_CHARS: usize = 100;
/// Longest email address accepted, in characters: RFC 5321's 64-character local part, `@` and 255-character domain.
pub const MAX_EMAIL_CHARS: usize = 320;
/// Longest hostname accepted, in characters: the DNS limit on a name.
pub const MAX_HOSTNAME_CHARS: usize = 253;
/// Longest GHES version accepted (`3.14.2`, with room for pre-release and build suffixes).
pub const MAX_GHES_VERSION_CHARS: usize = 64;
/// Longest license kind accepted (`enterprise`, `trial`, …: a short word).
pub const MAX_LICENSE_KIND_CHARS: usize = 64;
/// Most characters of a refused value an error shows: enough to recognise it, never the whole of an oversized one.
pub const SHOWN_CHARS: usize = 64;

/// At most [`SHOWN_CHARS`] characters of `text`, with `…` when cut.
pub fn shown_prefix(text: &str) -> String {
    match text.char_indices().nth(SHOWN_CHARS) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Where a refused field is: the header, or a user row (1-based, in the order sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldPlace {
    Header,
    UserRow(usize),
}

impl std::fmt::Display for FieldPlace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldPlace::Header => f.write_str("the snapshot header"),
            FieldPlace::UserRow(row) => write!(f, "user row {row}"),
        }
    }
}

/// Why a snapshot was refused. Each message says what was wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "the snapshot's hostname is empty: set the instance hostname in the agent's configuration"
    )]
    EmptyHostname,
    /// The hostname (at most [`SHOWN_CHARS`] of it) with spaces, control characters or over [`MAX_HOSTNAME_CHARS`].
    #[error(
        "the hostname {0:?} is not a host name (at most {MAX_HOSTNAME_CHARS} characters, no spaces or control \
         characters): fix `instance.hostname` in the agent's configuration"
    )]
    InvalidHostname(String),
    /// A text field over its limit. `shown` is a bounded prefix of the value, or `None` for an email address
    /// (errors are logged, and logs never carry an address).
    #[error(
        "{place}: `{field}` has {chars} characters, over the limit of {max}{}; fix the value at the source \
         (GHES) or leave the account out of the snapshot",
        shown.as_ref().map(|shown| format!(" ({shown:?})")).unwrap_or_default()
    )]
    FieldTooLong {
        place: FieldPlace,
        field: &'static str,
        chars: usize,
        max: usize,
        shown: Option<String>,
    },
    #[error("the snapshot's server_id is the nil UUID: configure the instance's real server id")]
    NilServerId,
    #[error(
        "generated_at {generated_at} is more than 5 minutes in the future: check the agent host's clock"
    )]
    GeneratedInFuture { generated_at: String },
    #[error(
        "user id {id} appears more than once in the snapshot (rows {first} and {second}): each GHES account must appear once"
    )]
    DuplicateUserId {
        id: i64,
        first: usize,
        second: usize,
    },
    #[error("user row {row} (id {id}) has an empty login")]
    EmptyLogin { row: usize, id: i64 },
    #[error(
        "the snapshot has {count} users, over the limit of {max}: raise `max_snapshot_users` if this is expected"
    )]
    TooManyUsers { count: usize, max: usize },
    #[error(
        "the snapshot declares {declared} users but {received} were received: the transfer was incomplete, send it again"
    )]
    CountMismatch { declared: u64, received: u64 },
    #[error(
        "the snapshot's digest does not match its users: the data was altered or truncated in transit, send it again"
    )]
    DigestMismatch,
}

impl Snapshot {
    /// Checks everything that can be checked without the stored state.
    pub fn validate(
        &self,
        limits: &SnapshotLimits,
        now: OffsetDateTime,
    ) -> Result<(), SnapshotError> {
        self.meta.validate(now)?;
        validate_users(&self.users, limits)
    }

    pub fn digest(&self) -> [u8; 32] {
        let mut digest = SnapshotDigest::default();
        for user in &self.users {
            digest.update(user);
        }
        digest.finish()
    }
}

/// The one hostname rule, for snapshots (streamed or uploaded) and enrollment alike: not empty, at most
/// [`MAX_HOSTNAME_CHARS`] characters, no whitespace or control characters. Callers that accept surrounding spaces
/// (enrollment) trim first.
pub fn validate_hostname(hostname: &str) -> Result<&str, SnapshotError> {
    if hostname.trim().is_empty() {
        return Err(SnapshotError::EmptyHostname);
    }
    if hostname.chars().count() > MAX_HOSTNAME_CHARS
        || hostname
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(SnapshotError::InvalidHostname(shown_prefix(hostname)));
    }
    Ok(hostname)
}

/// `value` has at most `max` characters. `show` says whether a prefix of the value may appear in the error.
fn check_length(
    place: FieldPlace,
    field: &'static str,
    value: &str,
    max: usize,
    show: bool,
) -> Result<(), SnapshotError> {
    // Bytes bound characters from above: most values are decided without counting.
    if value.len() <= max {
        return Ok(());
    }
    let chars = value.chars().count();
    if chars <= max {
        return Ok(());
    }
    Err(SnapshotError::FieldTooLong {
        place,
        field,
        chars,
        max,
        shown: show.then(|| shown_prefix(value)),
    })
}

/// The length limits of one user row (`row` is 1-based), checked as each batch arrives so that an oversized row
/// is refused before the rest of the stream is held.
pub fn validate_user_fields(row: usize, user: &ServerUser) -> Result<(), SnapshotError> {
    let place = FieldPlace::UserRow(row);
    check_length(place, "login", &user.login, MAX_LOGIN_CHARS, true)?;
    check_length(place, "email", &user.email, MAX_EMAIL_CHARS, false)
}

impl SnapshotMeta {
    pub fn validate(&self, now: OffsetDateTime) -> Result<(), SnapshotError> {
        validate_hostname(&self.instance.hostname)?;
        let header = FieldPlace::Header;
        check_length(
            header,
            "ghes_version",
            &self.instance.ghes_version,
            MAX_GHES_VERSION_CHARS,
            true,
        )?;
        if let Some(license) = &self.license {
            check_length(
                header,
                "license.kind",
                &license.kind,
                MAX_LICENSE_KIND_CHARS,
                true,
            )?;
        }
        if self.instance.server_id.is_nil() {
            return Err(SnapshotError::NilServerId);
        }
        if self.generated_at > now + time::Duration::minutes(5) {
            return Err(SnapshotError::GeneratedInFuture {
                generated_at: self
                    .generated_at
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
            });
        }
        Ok(())
    }
}

/// Checks the user rows: the count limit, unique ids, non-empty logins and field lengths.
pub fn validate_users(users: &[ServerUser], limits: &SnapshotLimits) -> Result<(), SnapshotError> {
    if users.len() > limits.max_users {
        return Err(SnapshotError::TooManyUsers {
            count: users.len(),
            max: limits.max_users,
        });
    }
    let mut first_row_of_id: HashMap<i64, usize> = HashMap::with_capacity(users.len());
    for (index, user) in users.iter().enumerate() {
        let row = index + 1;
        if let Some(first) = first_row_of_id.insert(user.id, row) {
            return Err(SnapshotError::DuplicateUserId {
                id: user.id,
                first,
                second: row,
            });
        }
        if user.login.trim().is_empty() {
            return Err(SnapshotError::EmptyLogin { row, id: user.id });
        }
        validate_user_fields(row, user)?;
    }
    Ok(())
}

/// SHA-256 over the users of a snapshot, in order.
///
/// Each field is written in a fixed order with a length prefix, so the digest does not depend on how the users
/// were encoded on the wire (protobuf batches or JSON).
#[derive(Default)]
pub struct SnapshotDigest {
    hasher: Sha256,
}

impl SnapshotDigest {
    pub fn update(&mut self, user: &ServerUser) {
        let hasher = &mut self.hasher;
        hasher.update(user.id.to_le_bytes());
        for text in [user.login.as_str(), user.email.as_str(), user.role.as_str()] {
            hasher.update((text.len() as u64).to_le_bytes());
            hasher.update(text.as_bytes());
        }
        hasher.update([
            u8::from(user.suspended),
            u8::from(user.dormant),
            match user.two_factor_enabled {
                None => 0,
                Some(false) => 1,
                Some(true) => 2,
            },
        ]);
        for time in [user.created_at, user.last_active] {
            match time {
                None => hasher.update([0u8]),
                Some(time) => {
                    hasher.update([1u8]);
                    hasher.update(time.unix_timestamp().to_le_bytes());
                }
            }
        }
    }

    pub fn finish(self) -> [u8; 32] {
        self.hasher.finalize().into()
    }
}

/// The exported usage file (SPEC §6): what an owner uploads by hand when the agent cannot reach the aggregator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UsageFile {
    /// Always [`UsageFile::FORMAT`]; lets the upload endpoint reject other JSON with a clear message.
    pub format: String,
    #[serde(flatten)]
    pub meta: SnapshotMeta,
    pub user_count: u64,
    /// Hex SHA-256 of the users ([`SnapshotDigest`]); detects a truncated or edited file.
    pub users_sha256: String,
    pub users: Vec<ServerUser>,
}

impl UsageFileParseError {
    /// At most the first [`SHOWN_CHARS`] characters of the format are kept: the error is shown to whoever sent the
    /// body.
    fn unsupported(format: String) -> Self {
        Self::UnsupportedFormat(shown_prefix(&format))
    }
}

/// Reads the string `format` field of a JSON body (the last one, as a JSON object read into a map keeps) and skips
/// everything else without building it. `Body` is the top-level value, `Field` the value of a `format` key; any
/// other shape answers `None`, as `Value::get("format")` followed by `as_str` did.
#[derive(Clone, Copy)]
enum FormatOf {
    Body,
    Field,
}

impl<'de> serde::de::DeserializeSeed<'de> for FormatOf {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Option<String>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for FormatOf {
    type Value = Option<String>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(
        self,
        mut map: A,
    ) -> Result<Option<String>, A::Error> {
        let mut format = None;
        while let Some(key) = map.next_key::<FormatKey>()? {
            match (self, key) {
                (FormatOf::Body, FormatKey::Format) => {
                    format = map.next_value_seed(FormatOf::Field)?
                }
                _ => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        Ok(format)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(
        self,
        mut seq: A,
    ) -> Result<Option<String>, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Option<String>, E> {
        Ok(match self {
            FormatOf::Body => None,
            FormatOf::Field => Some(text.to_owned()),
        })
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Option<String>, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Option<String>, E> {
        Ok(None)
    }
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum FormatKey {
    Format,
    #[serde(other)]
    Other,
}

/// Why a body is not a usage file.
#[derive(Debug, thiserror::Error)]
pub enum UsageFileParseError {
    /// Not JSON, or not the fields and types of a usage file (the error has the position).
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// JSON without a string `format` field: probably not a usage file at all.
    #[error("the body has no \"format\" field")]
    NoFormat,
    /// A `format` other than [`UsageFile::FORMAT`].
    #[error("unsupported usage file format {0:?}; this aggregator reads {format:?}", format = UsageFile::FORMAT)]
    UnsupportedFormat(String),
}

impl UsageFile {
    pub const FORMAT: &'static str = "license-sync-usage/v1";

    pub fn from_snapshot(snapshot: Snapshot) -> Self {
        let digest = snapshot.digest();
        UsageFile {
            format: Self::FORMAT.to_owned(),
            meta: snapshot.meta,
            user_count: snapshot.users.len() as u64,
            users_sha256: hex::encode(digest),
            users: snapshot.users,
        }
    }

    /// Reads a usage file from JSON in one pass straight into the struct, so the parse holds little more than the
    /// file's users (parsing a `Value` first for the format check held about 4× the body, `tests/json_memory.rs`).
    /// Only when that fails is the body read again, without building anything, for its `format`: a body that is
    /// not JSON, or JSON of another kind, is told as such rather than by the first field it lacks.
    pub fn from_json(json: &[u8]) -> Result<Self, UsageFileParseError> {
        match serde_json::from_slice::<UsageFile>(json) {
            Ok(file) => file.checked_format(),
            Err(error) => Err(Self::refusal(
                error,
                Some(serde_json::Deserializer::from_slice(json)),
            )),
        }
    }

    /// [`UsageFile::from_json`] over a reader (the plaintext of an encrypted file): one pass into the struct, and
    /// only when that fails a second pass over `reread()` (the same bytes again) for the `format`. An I/O error of
    /// the reader is a [`UsageFileParseError::Json`] whose `is_io()` is true.
    pub fn from_reader<R: std::io::Read>(
        reader: R,
        reread: impl FnOnce() -> Option<R>,
    ) -> Result<Self, UsageFileParseError> {
        match serde_json::from_reader::<_, UsageFile>(reader) {
            Ok(file) => file.checked_format(),
            Err(error) if error.is_io() => Err(UsageFileParseError::Json(error)),
            Err(error) => Err(Self::refusal(
                error,
                reread().map(serde_json::Deserializer::from_reader),
            )),
        }
    }

    fn checked_format(self) -> Result<Self, UsageFileParseError> {
        if self.format == Self::FORMAT {
            Ok(self)
        } else {
            Err(UsageFileParseError::unsupported(self.format))
        }
    }

    /// Why a body that did not parse as a usage file is not one: not JSON, JSON without a `format`, another
    /// format, or (the format being ours) the first error of the struct parse. `body` reads the same bytes again,
    /// building nothing but the format.
    fn refusal<'de, R: serde_json::de::Read<'de>>(
        error: serde_json::Error,
        body: Option<serde_json::Deserializer<R>>,
    ) -> UsageFileParseError {
        let Some(mut body) = body else {
            return UsageFileParseError::Json(error);
        };
        let format = serde::de::DeserializeSeed::deserialize(FormatOf::Body, &mut body)
            .and_then(|format| body.end().map(|()| format));
        match format {
            Err(not_json) => UsageFileParseError::Json(not_json),
            Ok(None) => UsageFileParseError::NoFormat,
            Ok(Some(format)) if format != Self::FORMAT => UsageFileParseError::unsupported(format),
            Ok(Some(_)) => UsageFileParseError::Json(error),
        }
    }

    /// Checks the declared count and digest, and returns the snapshot the file carries.
    pub fn into_snapshot(self) -> Result<Snapshot, SnapshotError> {
        let snapshot = Snapshot {
            meta: self.meta,
            users: self.users,
        };
        let received = snapshot.users.len() as u64;
        if received != self.user_count {
            return Err(SnapshotError::CountMismatch {
                declared: self.user_count,
                received,
            });
        }
        if hex::encode(snapshot.digest()) != self.users_sha256.to_ascii_lowercase() {
            return Err(SnapshotError::DigestMismatch);
        }
        Ok(snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::UserRole;

    /// The worked example of the digest in `proto/licensesync/v1/ingest.proto` (`SnapshotTrailer.users_sha256`),
    /// which clients written from the `.proto` alone follow: the text and this implementation must agree.
    #[test]
    fn the_digest_is_the_one_the_proto_documents() {
        let user = ServerUser {
            id: 1,
            login: "mona".into(),
            email: "m@x".into(),
            role: UserRole::User,
            suspended: false,
            dormant: false,
            created_at: None,
            last_active: Some(
                OffsetDateTime::from_unix_timestamp(1_700_000_000).expect("a valid time")
                    + time::Duration::milliseconds(250),
            ),
            two_factor_enabled: None,
        };
        let mut digest = SnapshotDigest::default();
        digest.update(&user);
        let proto = include_str!("../../../proto/licensesync/v1/ingest.proto");
        let documented = hex::encode(digest.finish());
        assert_eq!(
            documented,
            "3816c458408d51299156b96eb5c0a4b71b118552f696667e1d33278aad07ed2e"
        );
        assert!(
            proto.contains(&documented),
            "the .proto shows another digest"
        );
        let empty = SnapshotDigest::default().finish();
        assert_eq!(
            empty.as_slice(),
            Sha256::digest(b"").as_slice(),
            "no users: the empty input"
        );
    }

    fn user(id: i64, login: &str) -> ServerUser {
        ServerUser {
            id,
            login: login.to_owned(),
            email: format!("{login}@example.com"),
            role: UserRole::User,
            suspended: false,
            dormant: false,
            created_at: None,
            last_active: None,
            two_factor_enabled: None,
        }
    }

    fn snapshot(users: Vec<ServerUser>) -> Snapshot {
        Snapshot {
            meta: SnapshotMeta {
                sync_id: Uuid::from_u128(1),
                instance: InstanceIdentity {
                    server_id: Uuid::from_u128(2),
                    hostname: "ghes.example.com".into(),
                    ghes_version: "3.14.0".into(),
                },
                generated_at: OffsetDateTime::UNIX_EPOCH,
                license: None,
                source_report: SourceReport::default(),
            },
            users,
        }
    }

    #[test]
    fn duplicate_user_ids_are_refused_with_both_rows() {
        let snap = snapshot(vec![user(1, "a"), user(2, "b"), user(1, "c")]);
        let err = snap
            .validate(&SnapshotLimits::default(), OffsetDateTime::now_utc())
            .expect_err("duplicate");
        assert_eq!(
            err,
            SnapshotError::DuplicateUserId {
                id: 1,
                first: 1,
                second: 3
            }
        );
    }

    #[test]
    fn oversized_fields_are_refused_with_field_limit_row_and_a_bounded_prefix() {
        let mut long_login = user(2, "b");
        long_login.login = "l".repeat(MAX_LOGIN_CHARS + 1);
        let error = snapshot(vec![user(1, "a"), long_login])
            .validate(&SnapshotLimits::default(), OffsetDateTime::now_utc())
            .expect_err("login too long");
        let message = error.to_string();
        assert!(
            matches!(
                &error,
                SnapshotError::FieldTooLong {
                    place: FieldPlace::UserRow(2),
                    field: "login",
                    chars: 101,
                    max: 100,
                    ..
                }
            ),
            "{error:?}"
        );
        assert!(
            message.starts_with("user row 2: `login` has 101 characters, over the limit of 100"),
            "{message}"
        );
        assert!(
            !message.contains(&"l".repeat(SHOWN_CHARS + 1)),
            "a bounded prefix: {message}"
        );
        // At the limit, in characters (not bytes): 100 two-byte characters pass.
        let mut at_limit = user(1, "a");
        at_limit.login = "é".repeat(MAX_LOGIN_CHARS);
        assert_eq!(validate_user_fields(1, &at_limit), Ok(()));

        let mut long_email = user(1, "a");
        long_email.email = format!("{}@example.com", "e".repeat(MAX_EMAIL_CHARS));
        let error = validate_user_fields(7, &long_email).expect_err("email too long");
        let message = error.to_string();
        assert!(message.contains("user row 7: `email`"), "{message}");
        assert!(
            !message.contains("@example.com") && !message.contains("eeee"),
            "no address shown: {message}"
        );

        let mut header = snapshot(vec![]);
        header.meta.instance.ghes_version = "9".repeat(MAX_GHES_VERSION_CHARS + 1);
        let message = header
            .meta
            .validate(OffsetDateTime::now_utc())
            .expect_err("version")
            .to_string();
        assert!(
            message.starts_with("the snapshot header: `ghes_version` has 65"),
            "{message}"
        );
        let mut header = snapshot(vec![]);
        header.meta.license = Some(InstanceLicense {
            seats: None,
            seats_used: 0,
            kind: "k".repeat(MAX_LICENSE_KIND_CHARS + 1),
            expires_at: None,
        });
        assert!(matches!(
            header.meta.validate(OffsetDateTime::now_utc()),
            Err(SnapshotError::FieldTooLong {
                field: "license.kind",
                ..
            })
        ));
    }

    #[test]
    fn hostnames_follow_one_rule_and_errors_show_a_bounded_prefix() {
        assert_eq!(
            validate_hostname("ghes.example.com"),
            Ok("ghes.example.com")
        );
        assert_eq!(
            validate_hostname(&"h".repeat(MAX_HOSTNAME_CHARS)).map(str::len),
            Ok(253)
        );
        for empty in ["", "   "] {
            assert_eq!(validate_hostname(empty), Err(SnapshotError::EmptyHostname));
        }
        for bad in ["ghes 1", "ghes\u{7}", " ghes"] {
            assert!(
                matches!(
                    validate_hostname(bad),
                    Err(SnapshotError::InvalidHostname(_))
                ),
                "{bad:?}"
            );
        }
        let huge = "h".repeat(5_000_000);
        let error = validate_hostname(&huge).expect_err("too long");
        let SnapshotError::InvalidHostname(shown) = &error else {
            panic!("{error:?}");
        };
        assert_eq!(shown.chars().count(), SHOWN_CHARS + 1);
        assert!(error.to_string().len() < 400, "{error}");
        let mut snap = snapshot(vec![]);
        snap.meta.instance.hostname = huge;
        assert_eq!(snap.meta.validate(OffsetDateTime::now_utc()), Err(error));
    }

    #[test]
    fn too_many_users_and_future_snapshots_are_refused() {
        let snap = snapshot(vec![user(1, "a"), user(2, "b")]);
        let limits = SnapshotLimits { max_users: 1 };
        assert!(matches!(
            snap.validate(&limits, OffsetDateTime::now_utc()),
            Err(SnapshotError::TooManyUsers { count: 2, max: 1 })
        ));
        let mut future = snapshot(vec![]);
        future.meta.generated_at = OffsetDateTime::now_utc() + time::Duration::hours(1);
        assert!(matches!(
            future.validate(&SnapshotLimits::default(), OffsetDateTime::now_utc()),
            Err(SnapshotError::GeneratedInFuture { .. })
        ));
    }

    #[test]
    fn digest_changes_with_any_field_and_with_order() {
        let base = snapshot(vec![user(1, "a"), user(2, "b")]).digest();
        let reordered = snapshot(vec![user(2, "b"), user(1, "a")]).digest();
        assert_ne!(base, reordered);
        let mut suspended = user(2, "b");
        suspended.suspended = true;
        assert_ne!(base, snapshot(vec![user(1, "a"), suspended]).digest());
        // Length prefixes keep ("ab","c") apart from ("a","bc").
        let mut shifted_a = user(1, "ab");
        shifted_a.email = "c".into();
        let mut shifted_b = user(1, "a");
        shifted_b.email = "bc".into();
        assert_ne!(
            snapshot(vec![shifted_a]).digest(),
            snapshot(vec![shifted_b]).digest()
        );
    }

    #[test]
    fn a_usage_file_is_read_in_one_pass_and_other_bodies_are_told_apart() {
        let file = UsageFile::from_snapshot(snapshot(vec![user(1, "a")]));
        let json = serde_json::to_vec(&file).expect("serialize");
        assert_eq!(UsageFile::from_json(&json).expect("a usage file"), file);

        let error = |body: &str| UsageFile::from_json(body.as_bytes()).expect_err(body);
        for not_json in ["{\"format\": ", "[1, 2", "{} trailing"] {
            assert!(
                matches!(error(not_json), UsageFileParseError::Json(e) if e.is_syntax() || e.is_eof()),
                "{not_json}"
            );
        }
        for no_format in ["{}", "[]", "\"text\"", "{\"format\": 1, \"users\": []}"] {
            assert!(
                matches!(error(no_format), UsageFileParseError::NoFormat),
                "{no_format}"
            );
        }
        assert!(matches!(
            error("{\"format\": \"other/v2\", \"users\": [{}]}"),
            UsageFileParseError::UnsupportedFormat(format) if format == "other/v2"
        ));
        let long = format!("{{\"format\": \"{}\"}}", "x".repeat(1000));
        let UsageFileParseError::UnsupportedFormat(shown) = error(&long) else {
            panic!("an unsupported format");
        };
        assert_eq!(shown.chars().count(), 65, "a bounded prefix: {shown}");
        // The right format but a field missing: the struct's own error, with its position.
        let missing = String::from_utf8(json)
            .expect("utf-8")
            .replace("\"user_count\":1,", "");
        assert!(matches!(error(&missing), UsageFileParseError::Json(e) if e.is_data()));
    }

    #[test]
    fn usage_file_round_trips_and_detects_tampering() {
        let file = UsageFile::from_snapshot(snapshot(vec![user(1, "a"), user(2, "b")]));
        let json = serde_json::to_string(&file).expect("serialize");
        let parsed: UsageFile = serde_json::from_str(&json).expect("parse");
        assert_eq!(
            parsed.clone().into_snapshot().expect("valid").users.len(),
            2
        );

        let mut truncated = parsed.clone();
        truncated.users.pop();
        assert!(matches!(
            truncated.into_snapshot(),
            Err(SnapshotError::CountMismatch {
                declared: 2,
                received: 1
            })
        ));
        let mut edited = parsed;
        edited.users[0].suspended = true;
        assert_eq!(edited.into_snapshot(), Err(SnapshotError::DigestMismatch));
    }
}

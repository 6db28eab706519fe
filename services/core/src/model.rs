//! Domain types shared by the agent and the aggregator.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// A GHES account's role, from the `role` column of `all_users.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum UserRole {
    #[default]
    User,
    SiteAdmin,
}

impl UserRole {
    pub fn as_str(self) -> &'static str {
        match self {
            UserRole::User => "user",
            UserRole::SiteAdmin => "site_admin",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "user" => Some(UserRole::User),
            "site_admin" => Some(UserRole::SiteAdmin),
            _ => None,
        }
    }
}

/// Built-in GHES accounts that never consume a license (SPEC §3).
pub const BUILT_IN_LOGINS: [&str; 2] = ["ghost", "scim-admin"];

/// One account of a GHES instance, as read from its `all_users.csv` report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ServerUser {
    /// The account's id on its instance (unique per instance).
    pub id: i64,
    pub login: String,
    /// The primary email as GHES reports it (trimmed, not normalised).
    pub email: String,
    #[serde(default)]
    pub role: UserRole,
    pub suspended: bool,
    #[serde(default)]
    pub dormant: bool,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_active: Option<OffsetDateTime>,
    #[serde(default)]
    pub two_factor_enabled: Option<bool>,
}

/// Why a GHES account does or does not consume a license (SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerConsumption {
    Active,
    Dormant,
    Suspended,
    BuiltIn,
}

impl ServerConsumption {
    pub fn consumes(self) -> bool {
        matches!(self, ServerConsumption::Active | ServerConsumption::Dormant)
    }
}

impl ServerUser {
    /// Active or dormant accounts consume a license; suspended and built-in (`ghost`, `scim-admin`) do not.
    pub fn consumption(&self) -> ServerConsumption {
        consumption_of(&self.login, self.suspended, self.dormant)
    }
}

/// SPEC §3 for one GHES account: built-in logins never consume, then suspension wins over dormancy.
pub fn consumption_of(login: &str, suspended: bool, dormant: bool) -> ServerConsumption {
    if BUILT_IN_LOGINS
        .iter()
        .any(|builtin| login.eq_ignore_ascii_case(builtin))
    {
        ServerConsumption::BuiltIn
    } else if suspended {
        ServerConsumption::Suspended
    } else if dormant {
        ServerConsumption::Dormant
    } else {
        ServerConsumption::Active
    }
}

/// Who a GHES instance is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceIdentity {
    pub server_id: Uuid,
    pub hostname: String,
    #[serde(default)]
    pub ghes_version: String,
}

/// The GHES license as `GET /api/v3/enterprise/settings/license` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceLicense {
    /// `None` for unlimited-seat licenses.
    pub seats: Option<i64>,
    pub seats_used: i64,
    pub kind: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
}

/// What the agent's reader saw while building a snapshot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SourceReport {
    pub rows_read: u64,
    pub rows_skipped: u64,
}

/// SAML/SCIM identity attributes linked to a cloud member (SPEC §4.3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExternalIdentity {
    #[serde(default)]
    pub name_id: Option<String>,
    /// The `emailaddress` claim.
    #[serde(default)]
    pub emailaddress: Option<String>,
    /// The `name` claim.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// Every value of the SCIM `emails` attribute.
    #[serde(default, deserialize_with = "compact_strings")]
    pub emails: Vec<String>,
}

/// A member of the enterprise in the cloud, as imported by an owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CloudMember {
    /// The cloud user id. Ties between cloud members go to the lowest id.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub id: i64,
    #[cfg_attr(feature = "openapi", schema(min_length = 1))]
    pub login: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Verified email addresses of the account (SPEC §4.4).
    #[serde(default, deserialize_with = "compact_strings")]
    pub verified_emails: Vec<String>,
    #[serde(default)]
    pub identity: Option<ExternalIdentity>,
    /// Whether this member consumes a license by itself: members, organization owners, outside collaborators on
    /// private repositories and pending invitations do; billing managers and guests do not (SPEC §3).
    pub consumes_license: bool,
    /// `org:Role` pairs, as GitHub's `github_com_member_roles`.
    #[serde(default, deserialize_with = "compact_strings")]
    pub member_roles: Vec<String>,
    #[serde(default, deserialize_with = "compact_strings")]
    pub enterprise_roles: Vec<String>,
    #[serde(default, deserialize_with = "compact_strings")]
    pub orgs_with_pending_invites: Vec<String>,
    #[serde(default)]
    pub two_factor_auth: Option<bool>,
    #[serde(default)]
    pub visual_studio_subscription_user: bool,
}

/// The body of a cloud members import: a JSON array of members, or an object `{"members": [...]}`.
///
/// Deserialized in one pass straight into the members: the shape is told by the first token (`[` or `{`), so
/// nothing is buffered. An untagged enum buffered the whole body as serde's `Content` before trying each shape,
/// which held about 6× the body (`tests/json_memory.rs`). Other keys of the object are ignored, as before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersImport(pub Vec<CloudMember>);

impl<'de> Deserialize<'de> for MembersImport {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer
            .deserialize_any(MembersVisitor { wrapped: true })
            .map(MembersImport)
    }
}

/// Reads the members array, or (`wrapped`) an object holding it under `members`.
#[derive(Clone, Copy)]
struct MembersVisitor {
    wrapped: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for MembersVisitor {
    type Value = Vec<CloudMember>;

    fn deserialize<D: serde::Deserializer<'de>>(
        self,
        deserializer: D,
    ) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> serde::de::Visitor<'de> for MembersVisitor {
    type Value = Vec<CloudMember>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str(if self.wrapped {
            "an array of cloud members or an object {\"members\": [...]}"
        } else {
            "an array of cloud members"
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::new();
        while let Some(member) = seq.next_element()? {
            if members.len() == members.capacity() {
                // A quarter more, not double: a member is about as large in memory as in JSON, so a doubled
                // vector's spare half alone could cost up to the body's size again.
                members.reserve_exact(members.len() / 4 + 64);
            }
            members.push(member);
        }
        Ok(members)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        #[derive(Deserialize)]
        #[serde(field_identifier, rename_all = "snake_case")]
        enum Key {
            Members,
            #[serde(other)]
            Other,
        }
        if !self.wrapped {
            return Err(serde::de::Error::invalid_type(
                serde::de::Unexpected::Map,
                &self,
            ));
        }
        let mut members = None;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Members if members.is_some() => {
                    return Err(serde::de::Error::duplicate_field("members"));
                }
                Key::Members => {
                    members = Some(map.next_value_seed(MembersVisitor { wrapped: false })?);
                }
                Key::Other => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
        }
        members.ok_or_else(|| serde::de::Error::missing_field("members"))
    }
}

/// A list of strings without spare capacity: serde's `Vec` starts at four elements, and most of a member's lists
/// (emails, roles) hold one, which tripled the heap of those lists in a large import.
fn compact_strings<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Vec<String>, D::Error> {
    let mut strings = Vec::<String>::deserialize(deserializer)?;
    strings.shrink_to_fit();
    Ok(strings)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(json: &str) -> Result<Vec<CloudMember>, serde_json::Error> {
        serde_json::from_str::<MembersImport>(json).map(|MembersImport(members)| members)
    }

    #[test]
    fn a_members_import_is_an_array_or_an_object_holding_one() {
        let member = r#"{"id": 7, "login": "mona", "consumes_license": true, "verified_emails": ["m@x.example"]}"#;
        let list = import(&format!("[{member}]")).expect("array");
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].verified_emails.capacity(), 1, "no spare capacity");
        let wrapped = import(&format!(
            r#"{{"note": {{"a": [1]}}, "members": [{member}]}}"#
        ))
        .expect("object; other keys are ignored");
        assert_eq!(wrapped, list);
        assert!(import("[]").expect("empty").is_empty());
        for refused in [
            r#"{"other": []}"#,
            r#"{"members": [], "members": []}"#,
            r#"{"members": {"members": []}}"#,
            r#""members""#,
        ] {
            let error = import(refused).expect_err(refused);
            assert!(error.is_data(), "{refused}: {error}");
        }
    }

    #[test]
    fn a_bad_member_is_reported_where_it_is_not_at_the_end_of_the_body() {
        let body = "[\n{\"id\": 1, \"login\": \"a\", \"consumes_license\": true},\n{\"id\": 2},\n{\"id\": 3, \"login\": \"c\", \"consumes_license\": true}\n]";
        let error = import(body).expect_err("the second member has no login");
        assert!(error.is_data(), "{error}");
        assert_eq!(error.line(), 3, "{error}");
    }
}

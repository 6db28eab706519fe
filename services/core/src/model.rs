//! Domain types shared by the agent and the aggregator.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

/// A GHES account's role, from the `role` column of `all_users.csv`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
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
pub struct InstanceIdentity {
    pub server_id: Uuid,
    pub hostname: String,
    #[serde(default)]
    pub ghes_version: String,
}

/// The GHES license as `GET /api/v3/enterprise/settings/license` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
pub struct SourceReport {
    pub rows_read: u64,
    pub rows_skipped: u64,
}

/// SAML/SCIM identity attributes linked to a cloud member (SPEC §4.3).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    #[serde(default)]
    pub emails: Vec<String>,
}

/// A member of the enterprise in the cloud, as imported by an owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudMember {
    /// The cloud user id. Ties between cloud members go to the lowest id.
    pub id: i64,
    pub login: String,
    #[serde(default)]
    pub name: Option<String>,
    /// Verified email addresses of the account (SPEC §4.4).
    #[serde(default)]
    pub verified_emails: Vec<String>,
    #[serde(default)]
    pub identity: Option<ExternalIdentity>,
    /// Whether this member consumes a license by itself: members, organization owners, outside collaborators on
    /// private repositories and pending invitations do; billing managers and guests do not (SPEC §3).
    pub consumes_license: bool,
    /// `org:Role` pairs, as GitHub's `github_com_member_roles`.
    #[serde(default)]
    pub member_roles: Vec<String>,
    #[serde(default)]
    pub enterprise_roles: Vec<String>,
    #[serde(default)]
    pub orgs_with_pending_invites: Vec<String>,
    #[serde(default)]
    pub two_factor_auth: Option<bool>,
    #[serde(default)]
    pub visual_studio_subscription_user: bool,
}

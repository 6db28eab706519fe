//! One user of a `consumed-licenses` page: its shape in GitHub's schema ([`ConsumedUser`], borrowed from the merged
//! view) and its JSON, written by hand for speed.
//!
//! A page is 100 users of 21 fields each; with `#[derive(Serialize)]`, serde_json spends most of a request escaping
//! the same long, constant key names, one call per field. Here every key is a pre-escaped byte literal and only the
//! values go through serde_json (so their escaping is exactly serde_json's). The derived `Serialize` of
//! [`ConsumedUser`] stays the reference: the test below checks both give the same bytes.

use license_sync_core::cloud::StrList;
use license_sync_core::merge::{Person, PersonId};
use serde::Serialize;

use crate::view::MergedView;

/// One entry of `users` in GitHub's "Enterprise Consumed Licenses" schema. Borrows from the merged view: a page is
/// serialised straight from it, without copying every string first.
#[derive(Debug, Serialize)]
pub(super) struct ConsumedUser<'a> {
    github_com_login: &'a str,
    github_com_name: Option<&'a str>,
    enterprise_server_user_ids: ServerUserIds<'a>,
    github_com_user: bool,
    enterprise_server_user: Option<bool>,
    visual_studio_subscription_user: bool,
    license_type: &'static str,
    github_com_profile: Option<Profile<'a>>,
    github_com_member_roles: Strings<'a>,
    github_com_enterprise_roles: Strings<'a>,
    github_com_verified_domain_emails: Strings<'a>,
    github_com_saml_name_id: Option<&'a str>,
    github_com_orgs_with_pending_invites: Strings<'a>,
    github_com_two_factor_auth: Option<bool>,
    enterprise_server_emails: &'a [&'a str],
    /// The name PyGithub's `NamedEnterpriseUser` reads; same content as `enterprise_server_emails`.
    enterprise_server_primary_emails: &'a [&'a str],
    visual_studio_license_status: Option<&'static str>,
    visual_studio_subscription_email: Option<&'static str>,
    total_user_accounts: usize,
    /// Ours: the person's stable id, for `license-explanations?person=`.
    person_id: PersonId<'a>,
    /// Ours: a tie rule decided which cloud member this person's GHES account joined.
    ambiguous: bool,
}

/// `<hostname>:<user id>` of each of a person's GHES accounts, written straight into the page.
struct ServerUserIds<'a> {
    view: &'a MergedView,
    person: &'a Person,
}

impl std::fmt::Debug for ServerUserIds<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerUserIds")
            .field("person", self.person)
            .finish_non_exhaustive()
    }
}

impl Serialize for ServerUserIds<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let instances = self.view.people.instance_slots();
        serializer.collect_seq(self.person.server_accounts.iter().map(|link| {
            let instance = &instances[link.account.instance as usize];
            AccountId {
                hostname: &instance.hostname,
                user_id: instance.users.id(link.account.user as usize),
            }
        }))
    }
}

struct AccountId<'a> {
    hostname: &'a str,
    user_id: i64,
}

impl Serialize for AccountId<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&format_args!("{}:{}", self.hostname, self.user_id))
    }
}

/// `<cloud web URL>/<login>`, or an empty string for a person without a cloud account (GitHub's example).
#[derive(Debug)]
struct Profile<'a> {
    base_url: &'a str,
    login: Option<&'a str>,
}

impl Serialize for Profile<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.login {
            Some(login) => serializer.collect_str(&format_args!("{}/{login}", self.base_url)),
            None => serializer.serialize_str(""),
        }
    }
}

/// A cloud member's list, or an empty one for a person without a cloud account: always a JSON array.
#[derive(Debug)]
struct Strings<'a>(Option<StrList<'a>>);

impl Serialize for Strings<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Some(list) => list.serialize(serializer),
            None => serializer.collect_seq(std::iter::empty::<&str>()),
        }
    }
}

/// The distinct primary emails of a person's GHES accounts (case-insensitive), as GHES reports them.
pub(crate) fn server_emails<'v>(view: &'v MergedView, person: &Person) -> Vec<&'v str> {
    let mut emails: Vec<&str> = Vec::new();
    for link in &person.server_accounts {
        let instance = &view.people.instance_slots()[link.account.instance as usize];
        let email = instance.users.email(link.account.user as usize).trim();
        if !email.is_empty() && !emails.iter().any(|known| known.eq_ignore_ascii_case(email)) {
            emails.push(email);
        }
    }
    emails
}

pub(super) fn consumed_user<'a>(
    view: &'a MergedView,
    person: &'a Person,
    server_emails: &'a [&'a str],
    cloud_web_url: &'a str,
) -> ConsumedUser<'a> {
    let member = person
        .cloud_member
        .and_then(|index| view.people.cloud_members().get(index as usize));
    // GitHub's own example gives empty strings, not nulls, for a server-only person; clients expect that.
    let text = |value: Option<&'a str>| Some(value.unwrap_or_default());
    ConsumedUser {
        github_com_login: member.map(|m| m.login).unwrap_or_default(),
        github_com_name: text(member.and_then(|m| m.name)),
        enterprise_server_user_ids: ServerUserIds { view, person },
        github_com_user: member.is_some(),
        enterprise_server_user: Some(!person.server_accounts.is_empty()),
        visual_studio_subscription_user: member.is_some_and(|m| m.visual_studio_subscription_user),
        license_type: "enterprise",
        github_com_profile: Some(Profile {
            base_url: cloud_web_url.trim_end_matches('/'),
            login: member.map(|m| m.login),
        }),
        github_com_member_roles: Strings(member.map(|m| m.member_roles)),
        github_com_enterprise_roles: Strings(member.map(|m| m.enterprise_roles)),
        github_com_verified_domain_emails: Strings(member.map(|m| m.verified_emails)),
        github_com_saml_name_id: text(member.and_then(|m| m.saml_name_id)),
        github_com_orgs_with_pending_invites: Strings(member.map(|m| m.orgs_with_pending_invites)),
        github_com_two_factor_auth: member.and_then(|m| m.two_factor_auth),
        enterprise_server_primary_emails: server_emails,
        enterprise_server_emails: server_emails,
        visual_studio_license_status: Some(""),
        visual_studio_subscription_email: Some(""),
        total_user_accounts: person.total_user_accounts(),
        person_id: view.people.person_id(person),
        ambiguous: person.ambiguous(),
    }
}

/// Appends one user as a JSON object, byte-for-byte what `serde_json::to_writer(out, user)` writes.
pub(super) fn write_consumed_user(
    out: &mut Vec<u8>,
    user: &ConsumedUser<'_>,
) -> Result<(), serde_json::Error> {
    fn value(out: &mut Vec<u8>, value: &impl Serialize) -> Result<(), serde_json::Error> {
        serde_json::to_writer(&mut *out, value)
    }
    fn boolean(out: &mut Vec<u8>, value: bool) {
        out.extend_from_slice(if value { b"true" } else { b"false" });
    }
    fn optional_boolean(out: &mut Vec<u8>, value: Option<bool>) {
        match value {
            Some(value) => boolean(out, value),
            None => out.extend_from_slice(b"null"),
        }
    }
    out.extend_from_slice(b"{\"github_com_login\":");
    value(out, &user.github_com_login)?;
    out.extend_from_slice(b",\"github_com_name\":");
    value(out, &user.github_com_name)?;
    out.extend_from_slice(b",\"enterprise_server_user_ids\":");
    value(out, &user.enterprise_server_user_ids)?;
    out.extend_from_slice(b",\"github_com_user\":");
    boolean(out, user.github_com_user);
    out.extend_from_slice(b",\"enterprise_server_user\":");
    optional_boolean(out, user.enterprise_server_user);
    out.extend_from_slice(b",\"visual_studio_subscription_user\":");
    boolean(out, user.visual_studio_subscription_user);
    out.extend_from_slice(b",\"license_type\":");
    value(out, &user.license_type)?;
    out.extend_from_slice(b",\"github_com_profile\":");
    value(out, &user.github_com_profile)?;
    out.extend_from_slice(b",\"github_com_member_roles\":");
    value(out, &user.github_com_member_roles)?;
    out.extend_from_slice(b",\"github_com_enterprise_roles\":");
    value(out, &user.github_com_enterprise_roles)?;
    out.extend_from_slice(b",\"github_com_verified_domain_emails\":");
    value(out, &user.github_com_verified_domain_emails)?;
    out.extend_from_slice(b",\"github_com_saml_name_id\":");
    value(out, &user.github_com_saml_name_id)?;
    out.extend_from_slice(b",\"github_com_orgs_with_pending_invites\":");
    value(out, &user.github_com_orgs_with_pending_invites)?;
    out.extend_from_slice(b",\"github_com_two_factor_auth\":");
    optional_boolean(out, user.github_com_two_factor_auth);
    out.extend_from_slice(b",\"enterprise_server_emails\":");
    value(out, &user.enterprise_server_emails)?;
    out.extend_from_slice(b",\"enterprise_server_primary_emails\":");
    value(out, &user.enterprise_server_primary_emails)?;
    out.extend_from_slice(b",\"visual_studio_license_status\":");
    value(out, &user.visual_studio_license_status)?;
    out.extend_from_slice(b",\"visual_studio_subscription_email\":");
    value(out, &user.visual_studio_subscription_email)?;
    out.extend_from_slice(b",\"total_user_accounts\":");
    value(out, &user.total_user_accounts)?;
    out.extend_from_slice(b",\"person_id\":");
    value(out, &user.person_id)?;
    out.extend_from_slice(b",\"ambiguous\":");
    boolean(out, user.ambiguous);
    out.push(b'}');
    Ok(())
}

#[cfg(test)]
mod tests {
    use license_sync_core::accounts::Accounts;
    use license_sync_core::cloud::CloudDirectory;
    use license_sync_core::incremental::{InstanceChange, PeopleIndex};
    use license_sync_core::model::{CloudMember, ExternalIdentity, ServerUser, UserRole};

    use super::*;
    use crate::view::MergedView;

    fn user(id: i64, login: &str, email: &str) -> ServerUser {
        ServerUser {
            id,
            login: login.to_owned(),
            email: email.to_owned(),
            role: UserRole::User,
            suspended: false,
            dormant: id % 2 == 0,
            created_at: None,
            last_active: None,
            two_factor_enabled: None,
        }
    }

    #[test]
    fn the_hand_written_page_equals_the_derived_serialisation() {
        // Values that need escaping, non-ASCII text, empty and absent fields, several accounts and a tie.
        let awkward = CloudMember {
            id: 7,
            login: "quote\"back\\slash".to_owned(),
            name: Some("Zoë \u{1} Tab\there".to_owned()),
            verified_emails: vec!["mona@example.com".to_owned()],
            identity: Some(ExternalIdentity {
                name_id: Some("</script>\u{7f}".to_owned()),
                ..ExternalIdentity::default()
            }),
            consumes_license: true,
            member_roles: vec!["org:Owner".to_owned(), "org2:Member\n".to_owned()],
            enterprise_roles: vec![String::new()],
            orgs_with_pending_invites: vec!["ünïcode".to_owned()],
            two_factor_auth: Some(false),
            visual_studio_subscription_user: true,
        };
        let tied = CloudMember {
            id: 9,
            login: "tied".to_owned(),
            name: None,
            verified_emails: vec!["mona@example.com".to_owned()],
            identity: None,
            consumes_license: false,
            member_roles: Vec::new(),
            enterprise_roles: Vec::new(),
            orgs_with_pending_invites: Vec::new(),
            two_factor_auth: None,
            visual_studio_subscription_user: false,
        };
        let mut people = PeopleIndex::new(CloudDirectory::from_members(&[awkward, tied]));
        let accounts = |users: &[ServerUser]| Accounts::from_users(users).expect("small");
        people.apply([
            InstanceChange::Upsert {
                key: 1,
                hostname: "ghes-\"a\".example".to_owned(),
                users: accounts(&[
                    user(1, "mona", "Mona@Example.com"),
                    user(2, "solo\\", "solo\u{2}@example.com"),
                    user(3, "bad", "no-at-sign"),
                ]),
            },
            InstanceChange::Upsert {
                key: 2,
                hostname: "ghes-b.example".to_owned(),
                users: accounts(&[user(10, "mona2", "mona@example.com")]),
            },
        ]);
        let view = MergedView {
            generation: 1,
            seats_purchased: 3,
            people,
        };
        let persons: Vec<_> = view
            .people
            .consuming()
            .iter()
            .filter_map(|&slot| view.people.person(slot))
            .collect();
        assert!(persons.len() >= 3, "{}", persons.len());
        for person in persons {
            let emails = server_emails(&view, person);
            let user = consumed_user(&view, person, &emails, "https://github.com/");
            let mut fast = Vec::new();
            write_consumed_user(&mut fast, &user).expect("writes");
            let reference = serde_json::to_vec(&user).expect("serialises");
            assert_eq!(
                String::from_utf8_lossy(&fast),
                String::from_utf8_lossy(&reference)
            );
        }
    }
}

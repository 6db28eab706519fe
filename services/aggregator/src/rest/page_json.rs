//! The `consumed-licenses` page body, written by hand for speed.
//!
//! A page is 100 users of 21 fields each; with `#[derive(Serialize)]`, serde_json spends most of a request escaping
//! the same long, constant key names, one call per field. Here every key is a pre-escaped byte literal and only the
//! values go through serde_json (so their escaping is exactly serde_json's). The derived `Serialize` of
//! [`ConsumedUser`] stays the reference: the test below checks both give the same bytes.

use serde::Serialize;

use super::ConsumedUser;

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
    use crate::rest::{consumed_user, server_emails};
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

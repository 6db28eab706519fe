//! Validation of an import of cloud members: the rules a list must meet before it replaces an enterprise's members.

use std::collections::HashSet;

use crate::model::CloudMember;

/// Why a list of cloud members cannot be imported. Entries are numbered from 1, in the order given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MembersError {
    #[error("member {entry}: `id` must be a positive cloud user id")]
    InvalidId { entry: usize },
    #[error("member {entry} (id {id}): `login` is empty")]
    EmptyLogin { entry: usize, id: i64 },
    #[error("member {entry}: id {id} appears more than once; each cloud account must appear once")]
    DuplicateId { entry: usize, id: i64 },
    #[error("member {entry}: login {login:?} appears more than once")]
    DuplicateLogin { entry: usize, login: String },
}

/// Each member has a positive id and a login, and appears once (by id, and by login case-insensitively, as GitHub
/// logins are).
pub fn validate_members(members: &[CloudMember]) -> Result<(), MembersError> {
    let mut ids = HashSet::with_capacity(members.len());
    let mut logins = HashSet::with_capacity(members.len());
    for (index, member) in members.iter().enumerate() {
        let entry = index + 1;
        if member.id <= 0 {
            return Err(MembersError::InvalidId { entry });
        }
        if member.login.trim().is_empty() {
            return Err(MembersError::EmptyLogin {
                entry,
                id: member.id,
            });
        }
        if !ids.insert(member.id) {
            return Err(MembersError::DuplicateId {
                entry,
                id: member.id,
            });
        }
        if !logins.insert(member.login.to_lowercase()) {
            return Err(MembersError::DuplicateLogin {
                entry,
                login: member.login.clone(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member as an import gives it: only the required fields.
    fn member(id: i64, login: &str) -> CloudMember {
        serde_json::from_value(
            serde_json::json!({"id": id, "login": login, "consumes_license": true}),
        )
        .expect("a cloud member")
    }

    #[test]
    fn a_list_of_distinct_members_is_valid() {
        assert_eq!(validate_members(&[]), Ok(()));
        assert_eq!(
            validate_members(&[member(1, "mona"), member(2, "octocat")]),
            Ok(())
        );
    }

    #[test]
    fn each_rule_names_the_entry_that_breaks_it() {
        let cases = [
            (
                vec![member(1, "mona"), member(0, "zero")],
                "member 2: `id` must be a positive cloud user id",
            ),
            (vec![member(5, "  ")], "member 1 (id 5): `login` is empty"),
            (
                vec![member(1, "mona"), member(1, "other")],
                "member 2: id 1 appears more than once; each cloud account must appear once",
            ),
            (
                vec![member(1, "mona"), member(2, "Mona")],
                "member 2: login \"Mona\" appears more than once",
            ),
        ];
        for (members, message) in cases {
            let error = validate_members(&members).expect_err(message);
            assert_eq!(error.to_string(), message);
        }
    }
}

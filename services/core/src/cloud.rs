//! [`CloudMembers`]: the enterprise's cloud members as the merged view keeps them in memory.
//!
//! A [`CloudMember`] as imported is about 280 bytes of fields plus a heap allocation per string and per list (400–
//! 500 bytes for a typical member). The view only needs what the merge and the REST answers read: here every string
//! of a member sits in one shared buffer, and a member costs its id, a flag byte, three list lengths and one offset
//! per string. The identity attributes other than the SAML NameID only feed the matching index and are not kept.

use serde::ser::{Serialize, SerializeSeq, Serializer};

use crate::merge::CloudIndex;
use crate::model::CloudMember;

/// An enterprise's cloud members ready for the merge: their compact table and their match index. Built one member
/// at a time ([`CloudDirectoryBuilder`]), so that a store can stream members in without holding them all as
/// [`CloudMember`]s first.
#[derive(Default)]
pub struct CloudDirectory {
    pub(crate) members: CloudMembers,
    pub(crate) index: CloudIndex,
}

impl CloudDirectory {
    pub fn from_members(members: &[CloudMember]) -> Self {
        let mut builder = CloudDirectory::builder();
        for member in members {
            builder.push(member);
        }
        builder.finish()
    }

    pub fn builder() -> CloudDirectoryBuilder {
        CloudDirectoryBuilder {
            directory: CloudDirectory::default(),
        }
    }

    pub fn members(&self) -> &CloudMembers {
        &self.members
    }
}

impl std::fmt::Debug for CloudDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudDirectory")
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// Builds a [`CloudDirectory`] member by member, in the order [`crate::merge::Person::cloud_member`] will index.
pub struct CloudDirectoryBuilder {
    directory: CloudDirectory,
}

impl CloudDirectoryBuilder {
    pub fn push(&mut self, member: &CloudMember) {
        self.directory.index.push(member);
        self.directory.members.push(member);
    }

    pub fn finish(mut self) -> CloudDirectory {
        self.directory.members.finish();
        self.directory.index.shrink_to_fit();
        self.directory
    }
}

/// Cloud members in import order; [`crate::merge::Person::cloud_member`] indexes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudMembers {
    ids: Vec<i64>,
    flags: Vec<u8>,
    /// Lengths of the `verified_emails`, `member_roles` and `enterprise_roles` lists of each member; the rest of its
    /// strings are its `orgs_with_pending_invites`.
    list_lengths: Vec<[u32; 3]>,
    /// Index into `string_ends` of each member's first string (its login), then one more entry that closes the
    /// last member: always one entry more than members.
    first_string: Vec<usize>,
    /// Where each string ends in `text` (the previous string's end is where it starts).
    string_ends: Vec<usize>,
    text: String,
}

const CONSUMES_LICENSE: u8 = 1;
const VISUAL_STUDIO: u8 = 2;
const HAS_NAME: u8 = 4;
const HAS_SAML_NAME_ID: u8 = 8;
const TWO_FACTOR_KNOWN: u8 = 16;
const TWO_FACTOR_ENABLED: u8 = 32;

/// One cloud member, borrowed from its [`CloudMembers`].
#[derive(Debug, Clone, Copy)]
pub struct CloudMemberRef<'a> {
    pub id: i64,
    pub login: &'a str,
    pub name: Option<&'a str>,
    /// The SAML NameID of its linked identity, if any.
    pub saml_name_id: Option<&'a str>,
    pub consumes_license: bool,
    pub two_factor_auth: Option<bool>,
    pub visual_studio_subscription_user: bool,
    pub verified_emails: StrList<'a>,
    pub member_roles: StrList<'a>,
    pub enterprise_roles: StrList<'a>,
    pub orgs_with_pending_invites: StrList<'a>,
}

/// A list of strings of one member; serialises as a JSON array.
#[derive(Debug, Clone, Copy)]
pub struct StrList<'a> {
    members: &'a CloudMembers,
    /// Range of `string_ends` indexes.
    first: usize,
    end: usize,
}

impl Default for CloudMembers {
    fn default() -> Self {
        CloudMembers {
            ids: Vec::new(),
            flags: Vec::new(),
            list_lengths: Vec::new(),
            first_string: vec![0],
            string_ends: Vec::new(),
            text: String::new(),
        }
    }
}

impl<'a> StrList<'a> {
    pub fn iter(self) -> impl ExactSizeIterator<Item = &'a str> + 'a {
        let members = self.members;
        (self.first..self.end).map(move |index| members.string(index))
    }

    pub fn len(&self) -> usize {
        self.end - self.first
    }

    pub fn is_empty(&self) -> bool {
        self.first == self.end
    }
}

impl Serialize for StrList<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.len()))?;
        for text in self.iter() {
            seq.serialize_element(text)?;
        }
        seq.end()
    }
}

impl CloudMembers {
    pub fn from_members(members: &[CloudMember]) -> Self {
        let mut table = CloudMembers::default();
        for member in members {
            table.push(member);
        }
        table.finish();
        table
    }

    fn push(&mut self, member: &CloudMember) {
        let saml_name_id = member
            .identity
            .as_ref()
            .and_then(|identity| identity.name_id.as_deref());
        let flag = |set: bool, bit: u8| if set { bit } else { 0 };
        self.ids.push(member.id);
        self.flags.push(
            flag(member.consumes_license, CONSUMES_LICENSE)
                | flag(member.visual_studio_subscription_user, VISUAL_STUDIO)
                | flag(member.name.is_some(), HAS_NAME)
                | flag(saml_name_id.is_some(), HAS_SAML_NAME_ID)
                | flag(member.two_factor_auth.is_some(), TWO_FACTOR_KNOWN)
                | flag(member.two_factor_auth == Some(true), TWO_FACTOR_ENABLED),
        );
        let length = |list: &[String]| u32::try_from(list.len()).unwrap_or(u32::MAX);
        self.list_lengths.push([
            length(&member.verified_emails),
            length(&member.member_roles),
            length(&member.enterprise_roles),
        ]);
        let singles = [
            Some(member.login.as_str()),
            member.name.as_deref(),
            saml_name_id,
        ];
        let lists = [
            &member.verified_emails,
            &member.member_roles,
            &member.enterprise_roles,
            &member.orgs_with_pending_invites,
        ];
        for text in singles
            .into_iter()
            .flatten()
            .chain(lists.into_iter().flatten().map(String::as_str))
        {
            self.text.push_str(text);
            self.string_ends.push(self.text.len());
        }
        // Closes this member; the next one starts there.
        self.first_string.push(self.string_ends.len());
    }

    /// Gives back the spare capacity once every member is in.
    fn finish(&mut self) {
        self.ids.shrink_to_fit();
        self.flags.shrink_to_fit();
        self.list_lengths.shrink_to_fit();
        self.first_string.shrink_to_fit();
        self.string_ends.shrink_to_fit();
        self.text.shrink_to_fit();
    }

    fn string(&self, index: usize) -> &str {
        let start = match index {
            0 => 0,
            _ => self.string_ends[index - 1],
        };
        &self.text[start..self.string_ends[index]]
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn get(&self, index: usize) -> Option<CloudMemberRef<'_>> {
        let id = *self.ids.get(index)?;
        let flags = self.flags[index];
        let mut next = self.first_string[index];
        let mut single = |present: bool| {
            present.then(|| {
                next += 1;
                self.string(next - 1)
            })
        };
        let login = single(true).unwrap_or_default();
        let name = single(flags & HAS_NAME != 0);
        let saml_name_id = single(flags & HAS_SAML_NAME_ID != 0);
        let [verified, roles, enterprise_roles] = self.list_lengths[index].map(|n| n as usize);
        let mut list = |length: usize| {
            let first = next;
            next += length;
            StrList {
                members: self,
                first,
                end: next,
            }
        };
        let verified_emails = list(verified);
        let member_roles = list(roles);
        let enterprise_roles = list(enterprise_roles);
        let orgs_with_pending_invites = StrList {
            members: self,
            first: next,
            end: self.first_string[index + 1],
        };
        Some(CloudMemberRef {
            id,
            login,
            name,
            saml_name_id,
            consumes_license: flags & CONSUMES_LICENSE != 0,
            two_factor_auth: (flags & TWO_FACTOR_KNOWN != 0)
                .then_some(flags & TWO_FACTOR_ENABLED != 0),
            visual_studio_subscription_user: flags & VISUAL_STUDIO != 0,
            verified_emails,
            member_roles,
            enterprise_roles,
            orgs_with_pending_invites,
        })
    }

    /// Member `index`. Like slice indexing, an index out of range is a bug of the caller and panics.
    pub fn at(&self, index: usize) -> CloudMemberRef<'_> {
        match self.get(index) {
            Some(member) => member,
            None => panic!(
                "cloud member index {index} out of range for {} members",
                self.len()
            ),
        }
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = CloudMemberRef<'_>> + '_ {
        (0..self.len()).map(|index| self.at(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ExternalIdentity;

    fn member(id: i64) -> CloudMember {
        CloudMember {
            id,
            login: format!("login-{id}"),
            name: None,
            verified_emails: Vec::new(),
            identity: None,
            consumes_license: false,
            member_roles: Vec::new(),
            enterprise_roles: Vec::new(),
            orgs_with_pending_invites: Vec::new(),
            two_factor_auth: None,
            visual_studio_subscription_user: false,
        }
    }

    fn strings(list: StrList<'_>) -> Vec<String> {
        list.iter().map(str::to_owned).collect()
    }

    #[test]
    fn every_field_the_view_reads_round_trips() {
        let full = CloudMember {
            name: Some("Mona Lisa".into()),
            verified_emails: vec!["a@example.com".into(), "b@example.com".into()],
            identity: Some(ExternalIdentity {
                name_id: Some("mona@saml".into()),
                username: Some("not kept".into()),
                ..ExternalIdentity::default()
            }),
            consumes_license: true,
            member_roles: vec!["org1:Owner".into()],
            enterprise_roles: vec!["owner".into(), "billing_manager".into()],
            orgs_with_pending_invites: vec!["org2".into(), "org3".into()],
            two_factor_auth: Some(false),
            visual_studio_subscription_user: true,
            ..member(7)
        };
        let mut empty_strings = member(8);
        empty_strings.name = Some(String::new());
        empty_strings.member_roles = vec![String::new()];
        empty_strings.two_factor_auth = Some(true);
        let members = [full.clone(), member(9), empty_strings.clone()];
        let table = CloudMembers::from_members(&members);
        assert_eq!(table.len(), 3);

        let read = table.at(0);
        assert_eq!(read.id, 7);
        assert_eq!(read.login, "login-7");
        assert_eq!(read.name, Some("Mona Lisa"));
        assert_eq!(read.saml_name_id, Some("mona@saml"));
        assert!(read.consumes_license && read.visual_studio_subscription_user);
        assert_eq!(read.two_factor_auth, Some(false));
        assert_eq!(strings(read.verified_emails), full.verified_emails);
        assert_eq!(strings(read.member_roles), full.member_roles);
        assert_eq!(strings(read.enterprise_roles), full.enterprise_roles);
        assert_eq!(
            strings(read.orgs_with_pending_invites),
            full.orgs_with_pending_invites
        );
        assert_eq!(
            serde_json::to_string(&read.enterprise_roles).expect("serialises"),
            r#"["owner","billing_manager"]"#
        );

        let bare = table.at(1);
        assert_eq!(
            (bare.login, bare.name, bare.saml_name_id),
            ("login-9", None, None)
        );
        assert_eq!(bare.two_factor_auth, None);
        assert!(bare.verified_emails.is_empty() && bare.orgs_with_pending_invites.is_empty());

        // Present-but-empty strings stay present.
        let empty = table.at(2);
        assert_eq!(empty.name, Some(""));
        assert_eq!(strings(empty.member_roles), [""]);
        assert_eq!(empty.two_factor_auth, Some(true));
        assert!(table.get(3).is_none());
    }
}

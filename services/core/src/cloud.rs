//! [`CloudMembers`]: the enterprise's cloud members as the merged view keeps them in memory, and `CloudIndex`: the
//! index that finds the cloud member a normalised email matches (by an [`IdentityAttribute`], else by a verified
//! email; the rules are in [`crate::merge`]).
//!
//! A [`CloudMember`] as imported is about 280 bytes of fields plus a heap allocation per string and per list (400–
//! 500 bytes for a typical member). The view only needs what the merge and the REST answers read: here every string
//! of a member sits in one shared buffer, and a member costs its id, a flag byte, three list lengths and one offset
//! per string. The identity attributes other than the SAML NameID only feed the matching index and are not kept.

use std::collections::HashMap;

use serde::Serialize;
use serde::ser::{SerializeSeq, Serializer};
use smallvec::SmallVec;

use crate::email::{EmailKey, email_key, normalize_email, normalize_text};
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

/// Which identity attribute matched (SPEC §4.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum IdentityAttribute {
    NameId,
    EmailaddressClaim,
    NameClaim,
    Username,
    ScimEmail,
}

impl IdentityAttribute {
    pub fn describe(self) -> &'static str {
        match self {
            IdentityAttribute::NameId => "SAML NameID",
            IdentityAttribute::EmailaddressClaim => "SAML emailaddress claim",
            IdentityAttribute::NameClaim => "SAML name claim",
            IdentityAttribute::Username => "SCIM username",
            IdentityAttribute::ScimEmail => "SCIM emails value",
        }
    }
}

/// How an email matched the cloud side.
pub(crate) struct CloudMatch {
    pub(crate) winner: u32,
    /// The identity attribute that matched, or `None` for a verified email.
    pub(crate) attribute: Option<IdentityAttribute>,
    pub(crate) tied_candidates: Box<[u32]>,
}

/// One cloud member an email can match: by an identity attribute, or (`None`) by a verified email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    member: u32,
    attribute: Option<IdentityAttribute>,
}

/// Normalised identity attributes and verified emails → the cloud members they belong to. Keys are 128 bits of the
/// text's SHA-256 ([`EmailKey`]) rather than the text: one entry per address of every member adds up.
#[derive(Default)]
pub(crate) struct CloudIndex {
    /// Cloud id of each member, for the lowest-id tie rule.
    ids: Vec<i64>,
    /// Almost every address belongs to one member: that one candidate is kept inline.
    candidates: HashMap<EmailKey, SmallVec<[Candidate; 1]>>,
}

impl CloudIndex {
    /// Adds the next member (its index is the number of members pushed before it).
    pub(crate) fn push(&mut self, member: &CloudMember) {
        let candidates = &mut self.candidates;
        let index = self.ids.len() as u32;
        self.ids.push(member.id);
        {
            if let Some(external) = &member.identity {
                let singles = [
                    (&external.name_id, IdentityAttribute::NameId),
                    (&external.emailaddress, IdentityAttribute::EmailaddressClaim),
                    (&external.name, IdentityAttribute::NameClaim),
                    (&external.username, IdentityAttribute::Username),
                ];
                let values = singles
                    .into_iter()
                    .filter_map(|(value, attribute)| value.as_deref().map(|v| (v, attribute)))
                    .chain(
                        external
                            .emails
                            .iter()
                            .map(|email| (email.as_str(), IdentityAttribute::ScimEmail)),
                    );
                for (value, attribute) in values {
                    let key = normalize_text(value);
                    if key.is_empty() {
                        continue;
                    }
                    let entries = candidates.entry(email_key(&key)).or_default();
                    // One entry per member and value: the first attribute in the documented order names the match.
                    if !entries
                        .iter()
                        .any(|entry| entry.member == index && entry.attribute.is_some())
                    {
                        entries.push(Candidate {
                            member: index,
                            attribute: Some(attribute),
                        });
                    }
                }
            }
            for email in &member.verified_emails {
                if let Ok(email) = normalize_email(email) {
                    let entries = candidates.entry(email_key(email.as_str())).or_default();
                    let verified = Candidate {
                        member: index,
                        attribute: None,
                    };
                    if !entries.contains(&verified) {
                        entries.push(verified);
                    }
                }
            }
        }
    }

    /// Gives back the spare capacity once every member is in.
    pub(crate) fn shrink_to_fit(&mut self) {
        self.ids.shrink_to_fit();
        self.candidates.shrink_to_fit();
    }

    fn lowest_id(&self, candidates: impl Iterator<Item = u32>) -> Option<u32> {
        candidates.min_by_key(|&index| (self.ids[index as usize], index))
    }

    /// The cloud member a normalised email (given by its [`email_key`]) matches, if any.
    pub(crate) fn find(&self, email: &EmailKey) -> Option<CloudMatch> {
        let entries = self.candidates.get(email)?;
        let by_identity = || entries.iter().filter(|entry| entry.attribute.is_some());
        let (winner, attribute) = match self.lowest_id(by_identity().map(|entry| entry.member)) {
            Some(winner) => {
                let attribute = by_identity()
                    .find(|entry| entry.member == winner)
                    .and_then(|entry| entry.attribute)?;
                (winner, Some(attribute))
            }
            None => (
                self.lowest_id(entries.iter().map(|entry| entry.member))?,
                None,
            ),
        };
        let tied_candidates = if entries.len() > 1 {
            let mut members: Vec<u32> = entries.iter().map(|entry| entry.member).collect();
            members.sort_by_key(|&index| (self.ids[index as usize], index));
            members.dedup();
            members.into_boxed_slice()
        } else {
            Box::default()
        };
        Some(CloudMatch {
            winner,
            attribute,
            // A member matched both by identity and by a verified email is one candidate, not a tie.
            tied_candidates: if tied_candidates.len() > 1 {
                tied_candidates
            } else {
                Box::default()
            },
        })
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

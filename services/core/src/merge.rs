//! The unique-user merge engine (SPEC §3–4): turns the accounts of every GHES instance and the enterprise's cloud
//! members into people, each person consuming at most one license.
//!
//! The rules, in the order they apply to a GHES account:
//! 1. Its **primary email** is normalised ([`crate::email`]). An invalid address matches nothing: the account is its
//!    own person ([`MatchRule::InvalidEmail`]).
//! 2. The email is compared with the SAML/SCIM identity attributes of the cloud members (NameID, `emailaddress` and
//!    `name` claims, `username`, every SCIM `emails` value), normalised the same way ([`MatchRule::Identity`]).
//! 3. Without an identity match, with the cloud members' **verified** emails ([`MatchRule::VerifiedEmail`]).
//! 4. Accounts that match no cloud member join the other unmatched accounts with the same normalised email, across
//!    instances ([`MatchRule::SamePrimaryEmail`]); alone, they are their own person ([`MatchRule::Unmatched`]).
//!
//! Ties: an identity match beats a verified-email match; among candidates of the same tier the lowest cloud user id
//! wins. Whenever an email matched more than one cloud member (at either tier) the link records every candidate, and
//! the person is flagged ambiguous so an owner can fix the data.
//!
//! Every cloud member is a person of its own (two cloud accounts are two people even if they share an address).
//!
//! The result does not depend on the order of the inputs' rows beyond the documented ties: people are sorted by a
//! stable key (login, then person id) and accounts within a person by (hostname, user id).

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, hash_map::Entry};
use std::fmt;

use serde::Serialize;
use smallvec::SmallVec;

use crate::accounts::{Account, Accounts};
pub use crate::cloud::IdentityAttribute;
use crate::cloud::{CloudDirectory, CloudMembers};
use crate::email::{InvalidEmail, email_key, normalize_email, normalize_text};
use crate::model::{CloudMember, ServerConsumption};

/// The accounts of one GHES instance, as stored from its latest snapshot.
#[derive(Debug, Clone)]
pub struct InstanceUsers {
    pub hostname: String,
    pub users: Accounts,
}

/// Points at one GHES account of the merge input: `instances[instance].users[user]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountRef {
    pub instance: u32,
    pub user: u32,
}

/// Why a GHES account belongs to its person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum MatchRule {
    /// Its primary email equals an identity attribute of the person's cloud member.
    Identity { attribute: IdentityAttribute },
    /// Its primary email equals a verified email of the person's cloud member.
    VerifiedEmail,
    /// It matched no cloud member and shares its primary email with the person's other GHES accounts.
    SamePrimaryEmail,
    /// It matched no cloud member and no other account has its primary email.
    Unmatched,
    /// Its primary email is not a usable address, so it matches nothing.
    InvalidEmail { reason: InvalidEmailReason },
}

impl MatchRule {
    /// The rule of a match with a cloud member: by an identity attribute, or (`None`) by a verified email.
    pub(crate) fn of_cloud_match(attribute: Option<IdentityAttribute>) -> Self {
        match attribute {
            Some(attribute) => MatchRule::Identity { attribute },
            None => MatchRule::VerifiedEmail,
        }
    }
}

/// [`InvalidEmail`] in a serialisable form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum InvalidEmailReason {
    Empty,
    MissingAt,
    SeveralAt,
    EmptyLocalPart,
    EmptyDomain,
}

impl From<InvalidEmail> for InvalidEmailReason {
    fn from(value: InvalidEmail) -> Self {
        match value {
            InvalidEmail::Empty => InvalidEmailReason::Empty,
            InvalidEmail::MissingAt => InvalidEmailReason::MissingAt,
            InvalidEmail::SeveralAt => InvalidEmailReason::SeveralAt,
            InvalidEmail::EmptyLocalPart => InvalidEmailReason::EmptyLocalPart,
            InvalidEmail::EmptyDomain => InvalidEmailReason::EmptyDomain,
        }
    }
}

impl InvalidEmailReason {
    pub fn describe(self) -> &'static str {
        match self {
            InvalidEmailReason::Empty => "the primary email is empty",
            InvalidEmailReason::MissingAt => "the primary email has no '@'",
            InvalidEmailReason::SeveralAt => "the primary email has more than one '@'",
            InvalidEmailReason::EmptyLocalPart => "the primary email has nothing before the '@'",
            InvalidEmailReason::EmptyDomain => "the primary email has nothing after the '@'",
        }
    }
}

/// One GHES account of a person and the rule that put it there. 12 bytes: there is one per account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLink {
    pub account: AccountRef,
    pub rule: MatchRule,
    /// The email matched more than one cloud member and a tie rule decided. The candidates are in the merge's
    /// [`Ties`], kept apart because almost no account has any.
    pub tied: bool,
}

/// Every cloud member an account's email matched (indexes into the cloud input, by ascending cloud id), for the
/// accounts whose [`ServerLink::tied`] is set.
pub type Ties = HashMap<AccountRef, Box<[u32]>>;

/// A person's accounts: one in most cases, kept inline so that such a person needs no allocation of its own.
pub type ServerLinks = SmallVec<[ServerLink; 1]>;

/// One person: at most one cloud member plus any number of GHES accounts. Its id is derived from its accounts
/// ([`person_id`]) rather than stored: there are as many people as accounts, nearly.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Person {
    /// Index into the cloud input.
    pub cloud_member: Option<u32>,
    /// Sorted by (hostname, user id).
    pub server_accounts: ServerLinks,
    pub consumes_license: bool,
}

/// A person's stable identifier: `cloud:<cloud id>`, or `server:<hostname>:<user id>` of its first GHES account.
/// Displays as that string, and orders as it does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersonId<'a> {
    Cloud(i64),
    Server {
        hostname: &'a str,
        user_id: i64,
    },
    /// A person with neither (only a freed slot of the incremental index).
    Empty,
}

impl fmt::Display for PersonId<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PersonId::Cloud(id) => write!(f, "cloud:{id}"),
            PersonId::Server { hostname, user_id } => write!(f, "server:{hostname}:{user_id}"),
            PersonId::Empty => f.write_str("empty"),
        }
    }
}

impl Serialize for PersonId<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl PartialEq<str> for PersonId<'_> {
    fn eq(&self, other: &str) -> bool {
        match self {
            PersonId::Cloud(id) => other
                .strip_prefix("cloud:")
                .is_some_and(|rest| rest == id.to_string()),
            PersonId::Server { hostname, user_id } => other
                .strip_prefix("server:")
                .and_then(|rest| rest.strip_prefix(hostname))
                .and_then(|rest| rest.strip_prefix(':'))
                .is_some_and(|rest| rest == user_id.to_string()),
            PersonId::Empty => other == "empty",
        }
    }
}

impl PartialEq<&str> for PersonId<'_> {
    fn eq(&self, other: &&str) -> bool {
        self == *other
    }
}

impl PersonId<'_> {
    /// The order of the id strings (so `cloud:10` sorts before `cloud:9`, as GitHub-style string ids do). Only
    /// reached when two people's logins tie, so formatting both is cheap enough.
    pub fn cmp_as_text(&self, other: &PersonId<'_>) -> Ordering {
        if self == other {
            return Ordering::Equal;
        }
        self.to_string().cmp(&other.to_string())
    }
}

/// The id of a person of this merge input.
pub fn person_id<'a>(
    person: &Person,
    instances: &'a [InstanceUsers],
    cloud: &CloudMembers,
) -> PersonId<'a> {
    match (person.cloud_member, person.server_accounts.first()) {
        (Some(member), _) => PersonId::Cloud(cloud.at(member as usize).id),
        (None, Some(first)) => PersonId::Server {
            hostname: &instances[first.account.instance as usize].hostname,
            user_id: instances[first.account.instance as usize]
                .users
                .id(first.account.user as usize),
        },
        (None, None) => PersonId::Empty,
    }
}

/// The login a person is named and sorted by: its cloud member's, or its first account's.
pub(crate) fn person_login<'a>(
    person: &Person,
    instances: &'a [InstanceUsers],
    cloud: &'a CloudMembers,
) -> &'a str {
    match (person.cloud_member, person.server_accounts.first()) {
        (Some(member), _) => cloud.at(member as usize).login,
        (None, Some(first)) => instances[first.account.instance as usize]
            .users
            .login(first.account.user as usize),
        (None, None) => "",
    }
}

/// GitHub's page order: by login compared case-insensitively (Unicode lower case), then by id.
pub(crate) fn compare_people(
    a: &Person,
    b: &Person,
    instances: &[InstanceUsers],
    cloud: &CloudMembers,
) -> Ordering {
    compare_logins(
        person_login(a, instances, cloud),
        person_login(b, instances, cloud),
    )
    .then_with(|| person_id(a, instances, cloud).cmp_as_text(&person_id(b, instances, cloud)))
}

/// `a.to_lowercase().cmp(&b.to_lowercase())` without allocating for ASCII logins (GitHub's are all ASCII).
pub(crate) fn compare_logins(a: &str, b: &str) -> Ordering {
    if a.is_ascii() && b.is_ascii() {
        a.bytes()
            .map(|byte| byte.to_ascii_lowercase())
            .cmp(b.bytes().map(|byte| byte.to_ascii_lowercase()))
    } else {
        a.to_lowercase().cmp(&b.to_lowercase())
    }
}

impl Person {
    /// True when one of its accounts matched several cloud members and a tie rule decided.
    pub fn ambiguous(&self) -> bool {
        self.server_accounts.iter().any(|link| link.tied)
    }

    /// Cloud account (if any) plus GHES accounts: GitHub's `total_user_accounts`.
    pub fn total_user_accounts(&self) -> usize {
        usize::from(self.cloud_member.is_some()) + self.server_accounts.len()
    }

    /// How many of its accounts were merged by a shared primary email alone (for [`MergeStats`]).
    pub(crate) fn merged_by_primary_email(&self) -> u64 {
        if self.cloud_member.is_none() && self.server_accounts.len() > 1 {
            self.server_accounts.len() as u64
        } else {
            0
        }
    }
}

/// Why separate people are probably one human (SPEC §4.8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", content = "value", rename_all = "snake_case")]
pub enum DuplicateReason {
    /// The same login (case-insensitive) on several instances or in the cloud.
    SameLogin(String),
    /// The same display name (normalised) on several cloud accounts.
    SameName(String),
}

/// License-consuming people that share a login or a display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LikelyDuplicate {
    #[serde(flatten)]
    pub reason: DuplicateReason,
    /// Person ids, sorted.
    pub people: Vec<String>,
}

/// Counts that summarise a merge, for status pages and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MergeStats {
    pub server_accounts: u64,
    pub cloud_members: u64,
    pub people: u64,
    pub consuming_people: u64,
    pub matched_by_identity: u64,
    pub matched_by_verified_email: u64,
    pub merged_by_primary_email: u64,
    pub invalid_emails: u64,
    pub ambiguous_accounts: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Merged {
    /// Every person, sorted by (login, id).
    pub people: Vec<Person>,
    /// Indexes into `people` of those who consume a license, in the same order.
    pub consuming: Vec<u32>,
    pub likely_duplicates: Vec<LikelyDuplicate>,
    pub stats: MergeStats,
    pub ties: Ties,
    /// The cloud members, as [`Person::cloud_member`] indexes them.
    pub cloud: CloudMembers,
    /// Where each GHES account ended: `person_of_account[instance][user]` is an index into `people`.
    person_of_account: Vec<Vec<u32>>,
    person_of_cloud_member: Vec<u32>,
}

impl Merged {
    /// `total_seats_consumed`: people with at least one license-consuming account.
    pub fn total_seats_consumed(&self) -> u64 {
        self.consuming.len() as u64
    }

    pub fn person_of_account(&self, account: AccountRef) -> Option<&Person> {
        let index = *self
            .person_of_account
            .get(account.instance as usize)?
            .get(account.user as usize)?;
        self.people.get(index as usize)
    }

    pub fn person_of_cloud_member(&self, cloud_index: u32) -> Option<&Person> {
        let index = *self.person_of_cloud_member.get(cloud_index as usize)?;
        self.people.get(index as usize)
    }

    pub fn person_by_id(&self, id: &str, instances: &[InstanceUsers]) -> Option<&Person> {
        self.people
            .iter()
            .find(|person| person_id(person, instances, &self.cloud) == id)
    }
}

/// A person being built, before sorting.
pub(crate) struct Draft {
    pub(crate) cloud_member: Option<u32>,
    pub(crate) links: ServerLinks,
}

/// Merges every instance's accounts with the cloud members into people.
pub fn merge(instances: &[InstanceUsers], cloud_input: &[CloudMember]) -> Merged {
    let CloudDirectory {
        members: cloud_table,
        index,
    } = CloudDirectory::from_members(cloud_input);
    let cloud = &cloud_table;
    let mut stats = MergeStats {
        cloud_members: cloud.len() as u64,
        ..MergeStats::default()
    };

    // Every cloud member is a person; drafts[i] for i < cloud.len() is cloud member i.
    let mut drafts: Vec<Draft> = (0..cloud.len() as u32)
        .map(|member| Draft {
            cloud_member: Some(member),
            links: ServerLinks::new(),
        })
        .collect();
    // Unmatched accounts by normalised email → draft index.
    let mut server_only_by_email: HashMap<String, u32> = HashMap::new();
    let mut ties = Ties::new();

    for (instance_index, instance) in instances.iter().enumerate() {
        for (user_index, user) in instance.users.iter().enumerate() {
            stats.server_accounts += 1;
            let account = AccountRef {
                instance: instance_index as u32,
                user: user_index as u32,
            };
            let email = match normalize_email(user.email) {
                Ok(email) => email,
                Err(invalid) => {
                    stats.invalid_emails += 1;
                    drafts.push(Draft {
                        cloud_member: None,
                        links: smallvec::smallvec![ServerLink {
                            account,
                            rule: MatchRule::InvalidEmail {
                                reason: invalid.into(),
                            },
                            tied: false,
                        }],
                    });
                    continue;
                }
            };
            if let Some(found) = index.find(&email_key(email.as_str())) {
                let rule = MatchRule::of_cloud_match(found.attribute);
                match rule {
                    MatchRule::Identity { .. } => stats.matched_by_identity += 1,
                    _ => stats.matched_by_verified_email += 1,
                }
                let tied = !found.tied_candidates.is_empty();
                if tied {
                    stats.ambiguous_accounts += 1;
                    ties.insert(account, found.tied_candidates);
                }
                drafts[found.winner as usize].links.push(ServerLink {
                    account,
                    rule,
                    tied,
                });
                continue;
            }
            let link = ServerLink {
                account,
                rule: MatchRule::Unmatched,
                tied: false,
            };
            match server_only_by_email.entry(email.as_str().to_owned()) {
                Entry::Occupied(existing) => drafts[*existing.get() as usize].links.push(link),
                Entry::Vacant(slot) => {
                    slot.insert(drafts.len() as u32);
                    drafts.push(Draft {
                        cloud_member: None,
                        links: smallvec::smallvec![link],
                    });
                }
            }
        }
    }

    let mut people: Vec<Person> = drafts
        .into_iter()
        .map(|draft| finish_person(draft, instances, cloud))
        .collect();
    stats.merged_by_primary_email = people
        .iter()
        .map(|person| person.merged_by_primary_email())
        .sum();
    people.sort_by(|a, b| compare_people(a, b, instances, cloud));

    let mut person_of_account: Vec<Vec<u32>> = instances
        .iter()
        .map(|instance| vec![0; instance.users.len()])
        .collect();
    let mut person_of_cloud_member = vec![0; cloud.len()];
    let mut consuming = Vec::new();
    for (position, person) in people.iter().enumerate() {
        let position = position as u32;
        if let Some(member) = person.cloud_member {
            person_of_cloud_member[member as usize] = position;
        }
        for link in &person.server_accounts {
            person_of_account[link.account.instance as usize][link.account.user as usize] =
                position;
        }
        if person.consumes_license {
            consuming.push(position);
        }
    }
    stats.people = people.len() as u64;
    stats.consuming_people = consuming.len() as u64;

    let likely_duplicates = find_likely_duplicates(&people, &consuming, instances, cloud);
    Merged {
        people,
        consuming,
        likely_duplicates,
        stats,
        ties,
        cloud: cloud_table,
        person_of_account,
        person_of_cloud_member,
    }
}

pub(crate) fn server_user(instances: &[InstanceUsers], account: AccountRef) -> Account<'_> {
    instances[account.instance as usize]
        .users
        .at(account.user as usize)
}

/// Sorts a draft's accounts and decides whether the person consumes a license.
pub(crate) fn finish_person(
    mut draft: Draft,
    instances: &[InstanceUsers],
    cloud: &CloudMembers,
) -> Person {
    draft.links.sort_by(|a, b| {
        let host_a = &instances[a.account.instance as usize].hostname;
        let host_b = &instances[b.account.instance as usize].hostname;
        host_a.cmp(host_b).then_with(|| {
            let id = |account: AccountRef| {
                instances[account.instance as usize]
                    .users
                    .id(account.user as usize)
            };
            id(a.account).cmp(&id(b.account))
        })
    });
    // A group of unmatched accounts shares one email: several are merged by it, a single one is unmatched. The
    // incremental index re-finishes groups that shrank, so the rule is set both ways.
    if draft.cloud_member.is_none() {
        let shared = draft.links.len() > 1;
        for link in &mut draft.links {
            match link.rule {
                MatchRule::Unmatched if shared => link.rule = MatchRule::SamePrimaryEmail,
                MatchRule::SamePrimaryEmail if !shared => link.rule = MatchRule::Unmatched,
                _ => {}
            }
        }
    }
    let member = draft.cloud_member.map(|index| cloud.at(index as usize));
    let consumes_license = member.is_some_and(|member| member.consumes_license)
        || draft.links.iter().any(|link| {
            server_user(instances, link.account)
                .consumption()
                .consumes()
        });
    // Most people have one account, which stays inline; more go to a heap buffer of exactly their size.
    draft.links.shrink_to_fit();
    Person {
        cloud_member: draft.cloud_member,
        server_accounts: draft.links,
        consumes_license,
    }
}

pub(crate) fn find_likely_duplicates<People>(
    people: &People,
    consuming: &[u32],
    instances: &[InstanceUsers],
    cloud: &CloudMembers,
) -> Vec<LikelyDuplicate>
where
    People: std::ops::Index<usize, Output = Person> + ?Sized,
{
    // Positions are visited in increasing order, so each list stays sorted; pushing only when the last entry
    // differs keeps one entry per person.
    fn add(map: &mut HashMap<String, Vec<u32>>, key: String, position: u32) {
        let positions = map.entry(key).or_default();
        if positions.last() != Some(&position) {
            positions.push(position);
        }
    }
    let mut by_login: HashMap<String, Vec<u32>> = HashMap::new();
    let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
    for &position in consuming {
        let person = &people[position as usize];
        if let Some(member) = person.cloud_member.map(|index| cloud.at(index as usize)) {
            add(&mut by_login, member.login.to_lowercase(), position);
            if let Some(name) = member.name.map(normalize_text)
                && !name.is_empty()
            {
                add(&mut by_name, name, position);
            }
        }
        for link in &person.server_accounts {
            let user = server_user(instances, link.account);
            if user.consumption() == ServerConsumption::BuiltIn {
                continue;
            }
            add(&mut by_login, user.login.to_lowercase(), position);
        }
    }
    let to_ids = |positions: Vec<u32>| -> Vec<String> {
        let mut ids: Vec<String> = positions
            .into_iter()
            .map(|position| person_id(&people[position as usize], instances, cloud).to_string())
            .collect();
        ids.sort();
        ids
    };
    let mut duplicates: Vec<LikelyDuplicate> = by_login
        .into_iter()
        .filter(|(_, positions)| positions.len() > 1)
        .map(|(login, positions)| LikelyDuplicate {
            reason: DuplicateReason::SameLogin(login),
            people: to_ids(positions),
        })
        .chain(
            by_name
                .into_iter()
                .filter(|(_, positions)| positions.len() > 1)
                .map(|(name, positions)| LikelyDuplicate {
                    reason: DuplicateReason::SameName(name),
                    people: to_ids(positions),
                }),
        )
        .collect();
    duplicates.sort_by(|a, b| {
        let key = |d: &LikelyDuplicate| match &d.reason {
            DuplicateReason::SameLogin(value) => (0, value.clone()),
            DuplicateReason::SameName(value) => (1, value.clone()),
        };
        key(a).cmp(&key(b))
    });
    duplicates
}

/// The answer to "why is this one license?" for one person.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Explanation {
    pub person_id: String,
    pub consumes_license: bool,
    pub ambiguous: bool,
    pub total_user_accounts: usize,
    pub summary: String,
    pub accounts: Vec<AccountExplanation>,
}

#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccountExplanation {
    /// `github.com:<login>` for the cloud account, `<hostname>:<user id>` for a GHES account.
    pub account: String,
    pub login: String,
    pub consumes_license: bool,
    /// Why it does or does not consume (`active`, `dormant`, `suspended`, `built_in`, `cloud_member`,
    /// `cloud_non_consuming`).
    pub consumption: &'static str,
    /// The matching rule, absent for the cloud account itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<MatchRule>,
    pub detail: String,
    /// Other cloud members the email also matched, when a tie rule decided.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tied_with: Vec<String>,
}

/// Explains one person: which accounts it joins, by which rule, and which of them consume.
pub fn explain(
    person: &Person,
    instances: &[InstanceUsers],
    cloud: &CloudMembers,
    ties: &Ties,
) -> Explanation {
    let member = person.cloud_member.map(|index| cloud.at(index as usize));
    let mut accounts = Vec::with_capacity(person.total_user_accounts());
    if let Some(member) = member {
        accounts.push(AccountExplanation {
            account: format!("github.com:{}", member.login),
            login: member.login.to_owned(),
            consumes_license: member.consumes_license,
            consumption: if member.consumes_license {
                "cloud_member"
            } else {
                "cloud_non_consuming"
            },
            rule: None,
            detail: format!(
                "cloud member {} (id {}){}",
                member.login,
                member.id,
                if member.consumes_license {
                    ""
                } else {
                    "; its role does not consume a license by itself"
                }
            ),
            tied_with: Vec::new(),
        });
    }
    for link in &person.server_accounts {
        let user = server_user(instances, link.account);
        let hostname = &instances[link.account.instance as usize].hostname;
        let consumption = user.consumption();
        let cloud_name = || {
            member
                .map(|m| format!("{} (id {})", m.login, m.id))
                .unwrap_or_default()
        };
        let detail = match link.rule {
            MatchRule::Identity { attribute } => format!(
                "primary email equals the {} of cloud member {}",
                attribute.describe(),
                cloud_name()
            ),
            MatchRule::VerifiedEmail => format!(
                "primary email equals a verified email of cloud member {}",
                cloud_name()
            ),
            MatchRule::SamePrimaryEmail => {
                "matches no cloud member; same primary email as the other GHES accounts of this person"
                    .to_owned()
            }
            MatchRule::Unmatched => {
                "matches no cloud member and no other GHES account has its primary email".to_owned()
            }
            MatchRule::InvalidEmail { reason } => {
                format!("{}, so it cannot be matched and counts on its own", reason.describe())
            }
        };
        let tied_with = match ties.get(&link.account).filter(|_| link.tied) {
            None => Vec::new(),
            Some(candidates) => candidates
                .iter()
                .filter(|&&index| Some(index) != person.cloud_member)
                .map(|&index| {
                    let other = cloud.at(index as usize);
                    format!("{} (id {})", other.login, other.id)
                })
                .collect(),
        };
        accounts.push(AccountExplanation {
            account: format!("{hostname}:{}", user.id),
            login: user.login.to_owned(),
            consumes_license: consumption.consumes(),
            consumption: match consumption {
                ServerConsumption::Active => "active",
                ServerConsumption::Dormant => "dormant",
                ServerConsumption::Suspended => "suspended",
                ServerConsumption::BuiltIn => "built_in",
            },
            rule: Some(link.rule),
            detail,
            tied_with,
        });
    }
    let consuming_accounts = accounts.iter().filter(|a| a.consumes_license).count();
    let plural =
        |count: usize, one: &'static str, many: &'static str| if count == 1 { one } else { many };
    let summary = match (person.consumes_license, accounts.len()) {
        (true, 1) => {
            "One license: this person has one account, and it consumes the license.".to_owned()
        }
        (true, total) => format!(
            "One license: {total} {} to this person, {consuming_accounts} of them {} a license, and all count once.",
            plural(total, "account belongs", "accounts belong"),
            plural(consuming_accounts, "consumes", "consume"),
        ),
        (false, 1) => "No license: this person's one account does not consume one.".to_owned(),
        (false, total) => {
            format!("No license: none of this person's {total} accounts consumes one.")
        }
    };
    Explanation {
        person_id: person_id(person, instances, cloud).to_string(),
        consumes_license: person.consumes_license,
        ambiguous: person.ambiguous(),
        total_user_accounts: person.total_user_accounts(),
        summary,
        accounts,
    }
}

/// The answer to "why are these two licenses?": why two accounts were not merged into one person.
pub fn explain_separation(
    a: (&Person, &str),
    b: (&Person, &str),
    instances: &[InstanceUsers],
    cloud: &CloudMembers,
) -> Vec<String> {
    let (person_a, label_a) = a;
    let (person_b, label_b) = b;
    let id_a = person_id(person_a, instances, cloud);
    if id_a == person_id(person_b, instances, cloud) {
        return vec![format!(
            "{label_a} and {label_b} are the same person ({id_a})."
        )];
    }
    let mut reasons = Vec::new();
    if let (Some(_), Some(_)) = (person_a.cloud_member, person_b.cloud_member) {
        reasons.push(
            "they belong to two different cloud accounts, and every cloud account is its own person"
                .to_owned(),
        );
    }
    // Valid normalised primary emails of a person's GHES accounts, and the reasons of the invalid ones.
    let emails = |person: &Person| -> (BTreeSet<String>, Vec<InvalidEmailReason>) {
        let mut valid = BTreeSet::new();
        let mut invalid = Vec::new();
        for link in &person.server_accounts {
            match normalize_email(server_user(instances, link.account).email) {
                Ok(email) => {
                    valid.insert(email.as_str().to_owned());
                }
                Err(reason) => invalid.push(reason.into()),
            }
        }
        (valid, invalid)
    };
    let ((emails_a, invalid_a), (emails_b, invalid_b)) = (emails(person_a), emails(person_b));
    for (label, invalid) in [(label_a, &invalid_a), (label_b, &invalid_b)] {
        for reason in invalid {
            reasons.push(format!(
                "{label}: {}, so it matches nothing",
                reason.describe()
            ));
        }
    }
    if !emails_a.is_empty() && !emails_b.is_empty() && emails_a.is_disjoint(&emails_b) {
        reasons.push(
            "their GHES accounts have different primary emails (after trimming, NFC and lower-casing)"
                .to_owned(),
        );
    }
    let cloud_emails = |person: &Person| -> BTreeSet<String> {
        person
            .cloud_member
            .map(|index| cloud.at(index as usize))
            .into_iter()
            .flat_map(|member| member.verified_emails.iter())
            .filter_map(|email| normalize_email(email).ok())
            .map(|email| email.as_str().to_owned())
            .collect()
    };
    for (label, person, other_emails) in [
        (label_a, person_a, &emails_b),
        (label_b, person_b, &emails_a),
    ] {
        if person.cloud_member.is_some() {
            let verified = cloud_emails(person);
            let overlap = other_emails.iter().any(|e| verified.contains(e));
            reasons.push(if overlap {
                format!(
                    "a primary email of the other person is also a verified email of {label}'s cloud account, but a tie rule (identity first, then lowest cloud id) gave that account to another cloud member"
                )
            } else {
                format!(
                    "no primary email of the other person equals a verified email or identity attribute of {label}'s cloud account"
                )
            });
        }
    }
    if reasons.is_empty() {
        reasons.push("no matching rule connects them".to_owned());
    }
    reasons
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ExternalIdentity, ServerUser, UserRole};

    fn user(id: i64, login: &str, email: &str) -> ServerUser {
        ServerUser {
            id,
            login: login.to_owned(),
            email: email.to_owned(),
            role: UserRole::User,
            suspended: false,
            dormant: false,
            created_at: None,
            last_active: None,
            two_factor_enabled: None,
        }
    }

    fn instance(hostname: &str, users: Vec<ServerUser>) -> InstanceUsers {
        InstanceUsers {
            hostname: hostname.to_owned(),
            users: Accounts::from_users(&users).expect("a small table"),
        }
    }

    fn id(person: &Person, instances: &[InstanceUsers], cloud: &[CloudMember]) -> String {
        person_id(person, instances, &CloudMembers::from_members(cloud)).to_string()
    }

    fn member(id: i64, login: &str, verified: &[&str]) -> CloudMember {
        CloudMember {
            id,
            login: login.to_owned(),
            name: None,
            verified_emails: verified.iter().map(|e| (*e).to_owned()).collect(),
            identity: None,
            consumes_license: true,
            member_roles: Vec::new(),
            enterprise_roles: Vec::new(),
            orgs_with_pending_invites: Vec::new(),
            two_factor_auth: None,
            visual_studio_subscription_user: false,
        }
    }

    fn person_of(merged: &Merged, instance: u32, user: u32) -> &Person {
        merged
            .person_of_account(AccountRef { instance, user })
            .expect("account is in a person")
    }

    #[test]
    fn same_person_on_three_instances_and_the_cloud_is_one_license() {
        let instances = vec![
            instance("ghes-1", vec![user(1, "mona", "Mona@Example.com")]),
            instance("ghes-2", vec![user(7, "mlisa", " mona@example.COM ")]),
            instance("ghes-3", vec![user(3, "mona", "mona@example.com")]),
        ];
        let cloud = vec![member(42, "monalisa", &["mona@example.com"])];
        let merged = merge(&instances, &cloud);
        assert_eq!(merged.total_seats_consumed(), 1);
        assert_eq!(merged.people.len(), 1);
        let person = &merged.people[0];
        assert_eq!(id(person, &instances, &cloud), "cloud:42");
        assert_eq!(person.total_user_accounts(), 4);
        assert!(
            person
                .server_accounts
                .iter()
                .all(|link| link.rule == MatchRule::VerifiedEmail)
        );
    }

    #[test]
    fn server_accounts_without_cloud_match_merge_across_instances_by_primary_email() {
        let instances = vec![
            instance("ghes-1", vec![user(1, "hubot", "hubot@example.com")]),
            instance("ghes-2", vec![user(2, "hubot2", "HUBOT@example.com")]),
        ];
        let merged = merge(&instances, &[]);
        assert_eq!(merged.total_seats_consumed(), 1);
        let person = person_of(&merged, 0, 0);
        assert_eq!(id(person, &instances, &[]), "server:ghes-1:1");
        assert_eq!(person.server_accounts.len(), 2);
        assert!(
            person
                .server_accounts
                .iter()
                .all(|link| link.rule == MatchRule::SamePrimaryEmail)
        );
    }

    #[test]
    fn a_lone_unmatched_account_is_its_own_person() {
        let merged = merge(
            &[instance("h", vec![user(5, "solo", "solo@example.com")])],
            &[],
        );
        assert_eq!(merged.total_seats_consumed(), 1);
        assert_eq!(
            merged.people[0].server_accounts[0].rule,
            MatchRule::Unmatched
        );
    }

    #[test]
    fn an_invalid_email_matches_nothing_even_when_equal_to_another() {
        let instances = vec![
            instance("ghes-1", vec![user(1, "a", "not-an-email")]),
            instance("ghes-2", vec![user(1, "b", "not-an-email")]),
        ];
        let cloud = vec![member(1, "a", &["not-an-email"])];
        let merged = merge(&instances, &cloud);
        // Two server people plus the cloud member: nothing merged.
        assert_eq!(merged.people.len(), 3);
        assert_eq!(merged.stats.invalid_emails, 2);
        assert_eq!(
            person_of(&merged, 0, 0).server_accounts[0].rule,
            MatchRule::InvalidEmail {
                reason: InvalidEmailReason::MissingAt
            }
        );
    }

    #[test]
    fn only_the_primary_email_is_the_server_key() {
        // The cloud member's login equals the server login, but emails differ: no merge.
        let instances = vec![instance("h", vec![user(1, "mona", "mona@corp.example")])];
        let cloud = vec![member(1, "mona", &["mona@home.example"])];
        let merged = merge(&instances, &cloud);
        assert_eq!(merged.total_seats_consumed(), 2);
        assert_eq!(merged.likely_duplicates.len(), 1);
        assert_eq!(
            merged.likely_duplicates[0].reason,
            DuplicateReason::SameLogin("mona".into())
        );
        assert_eq!(
            merged.likely_duplicates[0].people,
            vec!["cloud:1".to_owned(), "server:h:1".to_owned()]
        );
    }

    #[test]
    fn each_identity_attribute_matches() {
        let cases = [
            (
                ExternalIdentity {
                    name_id: Some("Mona@Example.com".into()),
                    ..Default::default()
                },
                IdentityAttribute::NameId,
            ),
            (
                ExternalIdentity {
                    emailaddress: Some("mona@example.com".into()),
                    ..Default::default()
                },
                IdentityAttribute::EmailaddressClaim,
            ),
            (
                ExternalIdentity {
                    name: Some("MONA@example.com".into()),
                    ..Default::default()
                },
                IdentityAttribute::NameClaim,
            ),
            (
                ExternalIdentity {
                    username: Some("mona@example.com ".into()),
                    ..Default::default()
                },
                IdentityAttribute::Username,
            ),
            (
                ExternalIdentity {
                    emails: vec!["other@example.com".into(), "mona@example.com".into()],
                    ..Default::default()
                },
                IdentityAttribute::ScimEmail,
            ),
        ];
        for (identity, attribute) in cases {
            let mut cloud_member = member(9, "mona-cloud", &[]);
            cloud_member.identity = Some(identity);
            let merged = merge(
                &[instance("h", vec![user(1, "mona", "mona@example.com")])],
                &[cloud_member],
            );
            assert_eq!(merged.total_seats_consumed(), 1, "{attribute:?}");
            assert_eq!(
                person_of(&merged, 0, 0).server_accounts[0].rule,
                MatchRule::Identity { attribute }
            );
        }
    }

    #[test]
    fn identity_match_beats_verified_email_match_even_with_a_higher_id() {
        let mut by_identity = member(500, "saml-mona", &[]);
        by_identity.identity = Some(ExternalIdentity {
            name_id: Some("mona@example.com".into()),
            ..Default::default()
        });
        let by_verified = member(3, "mona-verified", &["mona@example.com"]);
        let cloud = vec![by_verified, by_identity];
        let instances = [instance("h", vec![user(1, "m", "mona@example.com")])];
        let merged = merge(&instances, &cloud);
        let person = person_of(&merged, 0, 0);
        assert_eq!(id(person, &instances, &cloud), "cloud:500");
        assert!(person.ambiguous());
        // Candidates are listed by ascending cloud id.
        let link = person.server_accounts[0];
        assert!(link.tied);
        assert_eq!(*merged.ties[&link.account], [0, 1]);
    }

    #[test]
    fn among_equal_matches_the_lowest_cloud_id_wins_and_is_flagged_ambiguous() {
        let cloud = vec![
            member(30, "c", &["shared@example.com"]),
            member(10, "a", &["shared@example.com"]),
            member(20, "b", &["shared@example.com"]),
        ];
        let instances = [instance("h", vec![user(1, "x", "shared@example.com")])];
        let merged = merge(&instances, &cloud);
        let person = person_of(&merged, 0, 0);
        assert_eq!(id(person, &instances, &cloud), "cloud:10");
        assert!(person.ambiguous());
        assert_eq!(merged.stats.ambiguous_accounts, 1);
        // Three cloud members, each its own person; the server account joins one of them.
        assert_eq!(merged.total_seats_consumed(), 3);
        let explanation = explain(person, &instances, &merged.cloud, &merged.ties);
        assert_eq!(
            explanation.accounts[1].tied_with,
            vec!["b (id 20)", "c (id 30)"]
        );
    }

    #[test]
    fn among_identity_matches_the_lowest_cloud_id_wins() {
        let mut high = member(8, "high", &[]);
        high.identity = Some(ExternalIdentity {
            username: Some("dup@example.com".into()),
            ..Default::default()
        });
        let mut low = member(2, "low", &[]);
        low.identity = Some(ExternalIdentity {
            emails: vec!["dup@example.com".into()],
            ..Default::default()
        });
        let instances = [instance("h", vec![user(1, "x", "dup@example.com")])];
        let cloud = [high, low];
        let merged = merge(&instances, &cloud);
        let person = person_of(&merged, 0, 0);
        assert_eq!(id(person, &instances, &cloud), "cloud:2");
        assert_eq!(
            person.server_accounts[0].rule,
            MatchRule::Identity {
                attribute: IdentityAttribute::ScimEmail
            }
        );
    }

    #[test]
    fn unverified_addresses_are_not_used() {
        // Only `verified_emails` is compared; a member without it does not match.
        let merged = merge(
            &[instance("h", vec![user(1, "x", "x@example.com")])],
            &[member(1, "x-cloud", &[])],
        );
        assert_eq!(merged.total_seats_consumed(), 2);
    }

    #[test]
    fn suspended_and_built_in_accounts_do_not_consume_but_dormant_do() {
        let mut suspended = user(1, "gone", "gone@example.com");
        suspended.suspended = true;
        let mut dormant = user(2, "sleepy", "sleepy@example.com");
        dormant.dormant = true;
        let ghost = user(3, "ghost", "ghost@example.com");
        let scim = user(4, "scim-admin", "scim@example.com");
        let instances = [instance("h", vec![suspended, dormant, ghost, scim])];
        let merged = merge(&instances, &[]);
        assert_eq!(merged.people.len(), 4);
        assert_eq!(merged.total_seats_consumed(), 1);
        let consuming = &merged.people[merged.consuming[0] as usize];
        assert_eq!(id(consuming, &instances, &[]), "server:h:2");
    }

    #[test]
    fn a_suspended_account_merged_with_an_active_one_still_counts_once() {
        let mut suspended = user(1, "a", "a@example.com");
        suspended.suspended = true;
        let merged = merge(
            &[
                instance("h1", vec![suspended]),
                instance("h2", vec![user(9, "a", "a@example.com")]),
            ],
            &[],
        );
        assert_eq!(merged.people.len(), 1);
        assert_eq!(merged.total_seats_consumed(), 1);
        assert_eq!(merged.people[0].total_user_accounts(), 2);
    }

    #[test]
    fn cloud_members_consume_per_their_flag() {
        let mut billing = member(1, "billing", &["billing@example.com"]);
        billing.consumes_license = false;
        let merged = merge(&[], &[billing.clone(), member(2, "dev", &[])]);
        assert_eq!(merged.total_seats_consumed(), 1);
        // A non-consuming cloud member with an active GHES account consumes through that account.
        let merged = merge(
            &[instance(
                "h",
                vec![user(1, "billing", "billing@example.com")],
            )],
            &[billing],
        );
        assert_eq!(merged.total_seats_consumed(), 1);
        assert_eq!(merged.people.len(), 1);
    }

    #[test]
    fn people_are_sorted_by_login_then_id_independent_of_input_order() {
        let h1 = vec![
            user(1, "zed", "z@example.com"),
            user(2, "amy", "a@example.com"),
        ];
        let a = vec![
            instance("h1", h1.clone()),
            instance("h2", vec![user(1, "Bob", "b@example.com")]),
        ];
        let b = vec![
            instance("h2", vec![user(1, "Bob", "b@example.com")]),
            instance("h1", h1.into_iter().rev().collect()),
        ];
        let ids = |instances: &[InstanceUsers]| {
            merge(instances, &[])
                .people
                .iter()
                .map(|p| id(p, instances, &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(&a), vec!["server:h1:2", "server:h2:1", "server:h1:1"]);
        assert_eq!(ids(&b), ids(&a));
    }

    #[test]
    fn the_first_account_names_a_server_only_person_regardless_of_input_order() {
        let first = vec![
            instance("b-host", vec![user(5, "x", "x@example.com")]),
            instance("a-host", vec![user(9, "x", "x@example.com")]),
        ];
        let merged = merge(&first, &[]);
        assert_eq!(id(&merged.people[0], &first, &[]), "server:a-host:9");
    }

    #[test]
    fn likely_duplicates_by_shared_cloud_name() {
        let mut one = member(1, "jdoe", &[]);
        one.name = Some("Jane Doe".into());
        let mut two = member(2, "jane-d", &[]);
        two.name = Some(" jane doe".into());
        let merged = merge(&[], &[one, two]);
        assert_eq!(
            merged.likely_duplicates,
            vec![LikelyDuplicate {
                reason: DuplicateReason::SameName("jane doe".into()),
                people: vec!["cloud:1".into(), "cloud:2".into()],
            }]
        );
    }

    #[test]
    fn explanation_names_every_account_and_rule() {
        let instances = vec![
            instance("ghes-1", vec![user(1, "mona", "mona@example.com")]),
            instance("ghes-2", vec![user(2, "mona", "mona@example.com")]),
        ];
        let merged = merge(&instances, &[]);
        let explanation = explain(&merged.people[0], &instances, &merged.cloud, &merged.ties);
        assert_eq!(explanation.total_user_accounts, 2);
        assert_eq!(explanation.accounts[0].account, "ghes-1:1");
        assert_eq!(explanation.accounts[1].account, "ghes-2:2");
        assert_eq!(
            explanation.summary,
            "One license: 2 accounts belong to this person, 2 of them consume a license, and all count once."
        );
        let alone = merge(&instances[..1], &[]);
        let single = explain(&alone.people[0], &instances[..1], &alone.cloud, &alone.ties);
        assert_eq!(
            single.summary,
            "One license: this person has one account, and it consumes the license."
        );
        let json = serde_json::to_value(&explanation).expect("serialize");
        assert_eq!(json["accounts"][0]["rule"]["rule"], "same_primary_email");
    }

    #[test]
    fn separation_is_explained_by_different_emails() {
        let instances = vec![
            instance("ghes-1", vec![user(1, "mona", "mona@example.com")]),
            instance("ghes-2", vec![user(2, "mona", "mona@example.org")]),
        ];
        let merged = merge(&instances, &[]);
        let reasons = explain_separation(
            (person_of(&merged, 0, 0), "ghes-1:1"),
            (person_of(&merged, 1, 0), "ghes-2:2"),
            &instances,
            &merged.cloud,
        );
        assert!(
            reasons
                .iter()
                .any(|r| r.contains("different primary emails")),
            "{reasons:?}"
        );
    }
}

//! The merge kept up to date: [`PeopleIndex`] holds an enterprise's people and applies one instance's new snapshot
//! (or its removal) by touching only the people that instance's accounts left or joined.
//!
//! Why it is exact: under the rules of [`crate::merge`] an account's person depends only on its own primary email
//! and the cloud members (a cloud winner, a group of unmatched accounts sharing the email, or itself when the email
//! is invalid). Replacing an instance therefore changes only the people that held its old accounts or receive its
//! new ones; every other person is untouched. Those "dirty" people are finished again with the same code the full
//! merge uses ([`crate::merge::finish_person`]), and the property test at the bottom checks the whole state against
//! [`crate::merge::merge`] after random sequences of changes.
//!
//! Cost of a change: proportional to the accounts of the changed instance and the people they touch, plus one
//! linear pass over the consuming list (copying `u32`s) to keep it sorted. A change of cloud members rebuilds
//! everything: imports of cloud members are rare and touch most people anyway.

use std::cmp::Ordering;
use std::collections::HashMap;

use crate::accounts::Accounts;
use crate::cloud::{CloudDirectory, CloudIndex, CloudMembers};
use crate::email::{EmailKey, email_key, normalize_email};
use crate::merge::{
    AccountRef, Draft, InstanceUsers, LikelyDuplicate, MatchRule, MergeStats, Person, PersonId,
    ServerLink, ServerLinks, Ties, compare_logins, compare_people, find_likely_duplicates,
    finish_person, person_id, person_login,
};

/// The caller's stable key for an instance (the store's instance id).
pub type InstanceKey = i64;

/// One change of an enterprise's accounts.
#[derive(Debug, Clone)]
pub enum InstanceChange {
    /// The instance's latest snapshot replaces whatever it had.
    Upsert {
        key: InstanceKey,
        hostname: String,
        users: Accounts,
    },
    /// The instance is gone (retired): its accounts leave their people.
    Remove { key: InstanceKey },
}

/// An enterprise's accounts merged into people, updated in place one instance at a time.
pub struct PeopleIndex {
    cloud: CloudMembers,
    cloud_index: CloudIndex,
    /// Instance slots, indexed by [`AccountRef::instance`]. A removed instance leaves an empty slot for reuse.
    instances: Vec<InstanceUsers>,
    instance_keys: Vec<Option<InstanceKey>>,
    slot_of_instance: HashMap<InstanceKey, u32>,
    free_instance_slots: Vec<u32>,
    /// `person_of_account[slot][user]`: the person slot of each account.
    person_of_account: Vec<Vec<u32>>,
    /// Accounts of each instance slot that consume a license on their own (for usage history).
    consuming_accounts: Vec<u64>,
    /// Person slots. Slot `i < cloud.len()` is cloud member `i`; a free slot has no cloud member and no accounts.
    /// A person stores neither its id nor its sort key: both derive from its first account or cloud member.
    people: Slab<Person>,
    free_people: Vec<u32>,
    /// The cloud candidates of the (few) accounts whose email matched several cloud members.
    ties: Ties,
    /// Groups of accounts that matched no cloud member, by normalised primary email.
    person_of_email: HashMap<EmailKey, u32>,
    /// Person slots that consume a license, sorted by (login, id) as GitHub pages them.
    consuming: Vec<u32>,
    stats: MergeStats,
}

/// Where a walk of the consuming people in their order stands: the sort key (login, id) of the last person it
/// passed. Owned, so that it outlives the view it was taken from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumingCursor {
    login: String,
    id: String,
}

/// A growable array in fixed-size chunks. At a million people a `Vec<Person>` is tens of megabytes, and growing it
/// reallocates: old and new buffers are both resident while it copies, a spike of up to three times its size in the
/// middle of a sync. Chunks are allocated once at their full size and never move.
struct Slab<T> {
    chunks: Vec<Vec<T>>,
    len: usize,
}

const SLAB_CHUNK: usize = 1 << 14;

impl<T> Default for Slab<T> {
    fn default() -> Self {
        Slab {
            chunks: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slab<T> {
    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, value: T) {
        if self.len.is_multiple_of(SLAB_CHUNK) {
            self.chunks.push(Vec::with_capacity(SLAB_CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(value);
            self.len += 1;
        }
    }

    fn get(&self, index: usize) -> Option<&T> {
        self.chunks.get(index / SLAB_CHUNK)?.get(index % SLAB_CHUNK)
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.chunks.iter().flatten()
    }
}

impl<T> std::ops::Index<usize> for Slab<T> {
    type Output = T;

    fn index(&self, index: usize) -> &T {
        &self.chunks[index / SLAB_CHUNK][index % SLAB_CHUNK]
    }
}

impl<T> std::ops::IndexMut<usize> for Slab<T> {
    fn index_mut(&mut self, index: usize) -> &mut T {
        &mut self.chunks[index / SLAB_CHUNK][index % SLAB_CHUNK]
    }
}

/// The people touched by one batch of changes, and what they contributed before it.
#[derive(Default)]
struct Touched {
    people: Vec<u32>,
    /// Parallel to the people slab while a batch runs: whether a slot is already in `people`.
    marked: Vec<bool>,
    /// Unmatched-email groups that lost accounts, with their email: removed from the email map if left empty.
    shrunk_groups: Vec<(u32, EmailKey)>,
}

impl PeopleIndex {
    /// The people of the cloud members alone, with no instance yet.
    pub fn new(cloud: CloudDirectory) -> Self {
        let CloudDirectory {
            members: cloud,
            index: cloud_index,
        } = cloud;
        let mut index = PeopleIndex {
            cloud_index,
            instances: Vec::new(),
            instance_keys: Vec::new(),
            slot_of_instance: HashMap::new(),
            free_instance_slots: Vec::new(),
            person_of_account: Vec::new(),
            consuming_accounts: Vec::new(),
            people: Slab::default(),
            free_people: Vec::new(),
            ties: Ties::new(),
            person_of_email: HashMap::new(),
            consuming: Vec::new(),
            stats: MergeStats {
                cloud_members: cloud.len() as u64,
                ..MergeStats::default()
            },
            cloud,
        };
        let mut touched = Touched::default();
        for member in 0..index.cloud.len() as u32 {
            index.people.push(Person::default());
            // Marked while still empty, so that it has nothing to take out of the statistics.
            index.mark(&mut touched, member);
            index.people[member as usize].cloud_member = Some(member);
        }
        index.finish(touched);
        index
    }

    /// Builds the index of a whole enterprise in one batch.
    pub fn build(
        cloud: CloudDirectory,
        instances: impl IntoIterator<Item = (InstanceKey, InstanceUsers)>,
    ) -> Self {
        let mut index = PeopleIndex::new(cloud);
        index.apply(
            instances
                .into_iter()
                .map(|(key, instance)| InstanceChange::Upsert {
                    key,
                    hostname: instance.hostname,
                    users: instance.users,
                }),
        );
        index
    }

    /// Applies a batch of instance changes; the people touched are finished once, at the end.
    pub fn apply(&mut self, changes: impl IntoIterator<Item = InstanceChange>) {
        let mut touched = Touched::default();
        for change in changes {
            match change {
                InstanceChange::Upsert {
                    key,
                    hostname,
                    users,
                } => {
                    let slot = self.instance_slot(key);
                    self.detach(slot, &mut touched);
                    self.instances[slot as usize].hostname = hostname;
                    self.attach(slot, users, &mut touched);
                }
                InstanceChange::Remove { key } => {
                    if let Some(slot) = self.slot_of_instance.remove(&key) {
                        self.detach(slot, &mut touched);
                        self.instances[slot as usize].hostname.clear();
                        self.instance_keys[slot as usize] = None;
                        self.free_instance_slots.push(slot);
                    }
                }
            }
        }
        self.finish(touched);
    }

    /// Replaces the cloud members. Every account may match differently, so the index is rebuilt.
    pub fn replace_cloud_members(&mut self, cloud: CloudDirectory) {
        let instances: Vec<(InstanceKey, InstanceUsers)> = self
            .instance_keys
            .iter()
            .zip(std::mem::take(&mut self.instances))
            .filter_map(|(key, instance)| key.map(|key| (key, instance)))
            .collect();
        *self = PeopleIndex::build(cloud, instances);
    }

    /// `total_seats_consumed`: people with at least one license-consuming account.
    pub fn total_seats_consumed(&self) -> u64 {
        self.consuming.len() as u64
    }

    /// Person slots that consume a license, sorted by (login, id).
    pub fn consuming(&self) -> &[u32] {
        &self.consuming
    }

    pub fn person(&self, slot: u32) -> Option<&Person> {
        self.people
            .get(slot as usize)
            .filter(|person| is_live(person))
    }

    /// Every live person, in no particular order.
    pub fn people(&self) -> impl Iterator<Item = &Person> {
        self.people.iter().filter(|person| is_live(person))
    }

    pub fn stats(&self) -> MergeStats {
        self.stats
    }

    pub fn cloud_members(&self) -> &CloudMembers {
        &self.cloud
    }

    /// The instance slots that [`AccountRef::instance`] indexes (removed instances are empty slots).
    pub fn instance_slots(&self) -> &[InstanceUsers] {
        &self.instances
    }

    /// The instances present, with their keys and how many of their accounts consume a license on their own.
    pub fn instances(&self) -> impl Iterator<Item = (InstanceKey, &InstanceUsers, u64)> {
        self.instance_keys
            .iter()
            .zip(&self.instances)
            .zip(&self.consuming_accounts)
            .filter_map(|((key, instance), consuming)| key.map(|key| (key, instance, *consuming)))
    }

    pub fn has_instance(&self, key: InstanceKey) -> bool {
        self.slot_of_instance.contains_key(&key)
    }

    pub fn person_of_account(&self, account: AccountRef) -> Option<&Person> {
        let slot = *self
            .person_of_account
            .get(account.instance as usize)?
            .get(account.user as usize)?;
        self.person(slot)
    }

    pub fn person_of_cloud_member(&self, cloud_index: u32) -> Option<&Person> {
        // Cloud member i is person slot i.
        self.person(cloud_index)
            .filter(|_| (cloud_index as usize) < self.cloud.len())
    }

    /// The account `<hostname>:<user id>` (hostname compared case-insensitively).
    pub fn find_account(&self, hostname: &str, user_id: i64) -> Option<AccountRef> {
        self.instances().find_map(|(key, instance, _)| {
            if !instance.hostname.eq_ignore_ascii_case(hostname) {
                return None;
            }
            let slot = *self.slot_of_instance.get(&key)?;
            let user = instance.users.position_of_id(user_id)?;
            Some(AccountRef {
                instance: slot,
                user: user as u32,
            })
        })
    }

    /// The cloud member with this login (case-insensitive), as an index into [`Self::cloud_members`].
    pub fn find_cloud_member(&self, login: &str) -> Option<u32> {
        self.cloud
            .iter()
            .position(|member| member.login.eq_ignore_ascii_case(login))
            .map(|index| index as u32)
    }

    /// The person with this id (`cloud:<id>` or `server:<hostname>:<user id>`).
    pub fn person_by_id(&self, id: &str) -> Option<&Person> {
        let person = if let Some(cloud_id) = id.strip_prefix("cloud:") {
            let cloud_id: i64 = cloud_id.parse().ok()?;
            let index = self.cloud.iter().position(|member| member.id == cloud_id)?;
            self.person_of_cloud_member(index as u32)
        } else {
            let (hostname, user_id) = id.strip_prefix("server:")?.rsplit_once(':')?;
            self.person_of_account(self.find_account(hostname, user_id.parse().ok()?)?)
        }?;
        // An account's person is named after its first account, which may be another one.
        (self.person_id(person) == id).then_some(person)
    }

    /// A person's stable id (`cloud:<id>` or `server:<hostname>:<user id>`).
    pub fn person_id(&self, person: &Person) -> PersonId<'_> {
        person_id(person, &self.instances, &self.cloud)
    }

    /// The cloud candidates of accounts whose email matched more than one cloud member.
    pub fn ties(&self) -> &Ties {
        &self.ties
    }

    /// License-consuming people that share a login or a display name. Computed on demand: it is a report.
    pub fn likely_duplicates(&self) -> Vec<LikelyDuplicate> {
        find_likely_duplicates(&self.people, &self.consuming, &self.instances, &self.cloud)
    }

    /// The sort key of a person, to resume a walk of [`Self::consuming`] after it with [`Self::consuming_after`].
    pub fn consuming_cursor(&self, person: &Person) -> ConsumingCursor {
        ConsumingCursor {
            login: person_login(person, &self.instances, &self.cloud).to_owned(),
            id: self.person_id(person).to_string(),
        }
    }

    /// The position in [`Self::consuming`] of the first person that sorts after `cursor`. A walk that resumes
    /// here neither repeats nor skips anyone present both before and after a change of the people in between
    /// (positions do not survive a change: a person added or removed ahead of the walk shifts them).
    pub fn consuming_after(&self, cursor: &ConsumingCursor) -> usize {
        self.consuming.partition_point(|&slot| {
            let person = &self.people[slot as usize];
            let order = compare_logins(
                person_login(person, &self.instances, &self.cloud),
                &cursor.login,
            )
            // The same text order as `PersonId::cmp_as_text`, which `compare_people` breaks ties with.
            .then_with(|| self.person_id(person).to_string().cmp(&cursor.id));
            order != Ordering::Greater
        })
    }

    fn instance_slot(&mut self, key: InstanceKey) -> u32 {
        if let Some(&slot) = self.slot_of_instance.get(&key) {
            return slot;
        }
        let slot = self.free_instance_slots.pop().unwrap_or_else(|| {
            self.instances.push(InstanceUsers {
                hostname: String::new(),
                users: Accounts::new(),
            });
            self.instance_keys.push(None);
            self.person_of_account.push(Vec::new());
            self.consuming_accounts.push(0);
            (self.instances.len() - 1) as u32
        });
        self.instance_keys[slot as usize] = Some(key);
        self.slot_of_instance.insert(key, slot);
        slot
    }

    fn allocate_person(&mut self) -> u32 {
        if let Some(slot) = self.free_people.pop() {
            return slot;
        }
        self.people.push(Person::default());
        (self.people.len() - 1) as u32
    }

    /// Records that a person changes in this batch, and takes its contribution out of the statistics.
    fn mark(&mut self, touched: &mut Touched, slot: u32) {
        let index = slot as usize;
        if touched.marked.len() <= index {
            touched
                .marked
                .resize(self.people.len().max(index + 1), false);
        }
        if std::mem::replace(&mut touched.marked[index], true) {
            return;
        }
        touched.people.push(slot);
        let person = &self.people[index];
        if is_live(person) {
            self.stats.people -= 1;
            self.stats.consuming_people -= u64::from(person.consumes_license);
            self.stats.merged_by_primary_email -= person.merged_by_primary_email();
        }
    }

    /// Takes an instance's accounts out of their people.
    fn detach(&mut self, slot: u32, touched: &mut Touched) {
        let mut affected = std::mem::take(&mut self.person_of_account[slot as usize]);
        affected.sort_unstable();
        affected.dedup();
        for &owner in &affected {
            self.mark(touched, owner);
        }
        for owner in affected {
            let person = &mut self.people[owner as usize];
            let mut removed_email = None;
            let mut kept = ServerLinks::with_capacity(person.server_accounts.len());
            for link in std::mem::take(&mut person.server_accounts) {
                if link.account.instance != slot {
                    kept.push(link);
                    continue;
                }
                apply_link_stats(&mut self.stats, &link, Sign::Minus);
                if link.tied {
                    self.ties.remove(&link.account);
                }
                if removed_email.is_none()
                    && matches!(
                        link.rule,
                        MatchRule::Unmatched | MatchRule::SamePrimaryEmail
                    )
                {
                    removed_email = Some(link.account.user);
                }
            }
            person.server_accounts = kept;
            if person.cloud_member.is_none()
                && person.server_accounts.is_empty()
                && let Some(user) = removed_email
                && let Ok(email) =
                    normalize_email(self.instances[slot as usize].users.at(user as usize).email)
            {
                touched
                    .shrunk_groups
                    .push((owner, email_key(email.as_str())));
            }
        }
        self.instances[slot as usize].users = Accounts::new();
        self.consuming_accounts[slot as usize] = 0;
    }

    /// Puts an instance's new accounts into their people (the same rules as [`crate::merge::merge`]).
    fn attach(&mut self, slot: u32, users: Accounts, touched: &mut Touched) {
        let mut owners = Vec::with_capacity(users.len());
        let mut consuming_accounts = 0;
        for (user_index, user) in users.iter().enumerate() {
            consuming_accounts += u64::from(user.consumption().consumes());
            let account = AccountRef {
                instance: slot,
                user: user_index as u32,
            };
            let (owner, link) = match normalize_email(user.email) {
                Err(invalid) => (
                    self.allocate_person(),
                    ServerLink {
                        account,
                        rule: MatchRule::InvalidEmail {
                            reason: invalid.into(),
                        },
                        tied: false,
                    },
                ),
                Ok(email) => {
                    let key = email_key(email.as_str());
                    match self.cloud_index.find(&key) {
                        Some(found) => {
                            let tied = !found.tied_candidates.is_empty();
                            if tied {
                                self.ties.insert(account, found.tied_candidates);
                            }
                            let link = ServerLink {
                                account,
                                rule: MatchRule::of_cloud_match(found.attribute),
                                tied,
                            };
                            (found.winner, link)
                        }
                        None => {
                            let owner = match self.person_of_email.get(&key) {
                                Some(&owner) => owner,
                                None => {
                                    let owner = self.allocate_person();
                                    self.person_of_email.insert(key, owner);
                                    owner
                                }
                            };
                            let link = ServerLink {
                                account,
                                rule: MatchRule::Unmatched,
                                tied: false,
                            };
                            (owner, link)
                        }
                    }
                }
            };
            self.mark(touched, owner);
            apply_link_stats(&mut self.stats, &link, Sign::Plus);
            self.people[owner as usize].server_accounts.push(link);
            owners.push(owner);
        }
        self.instances[slot as usize].users = users;
        self.person_of_account[slot as usize] = owners;
        self.consuming_accounts[slot as usize] = consuming_accounts;
    }

    /// Finishes every touched person, frees the empty ones and re-sorts the consuming list.
    fn finish(&mut self, touched: Touched) {
        for (owner, email) in touched.shrunk_groups {
            let person = &self.people[owner as usize];
            if !is_live(person) && self.person_of_email.get(&email) == Some(&owner) {
                self.person_of_email.remove(&email);
            }
        }
        let mut newly_consuming = Vec::new();
        for &slot in &touched.people {
            let index = slot as usize;
            let person = std::mem::take(&mut self.people[index]);
            if !is_live(&person) {
                self.free_people.push(slot);
                continue;
            }
            let draft = Draft {
                cloud_member: person.cloud_member,
                links: person.server_accounts,
            };
            let finished = finish_person(draft, &self.instances, &self.cloud);
            self.stats.people += 1;
            self.stats.consuming_people += u64::from(finished.consumes_license);
            self.stats.merged_by_primary_email += finished.merged_by_primary_email();
            if finished.consumes_license {
                newly_consuming.push(slot);
            }
            self.people[index] = finished;
        }

        let previous = std::mem::take(&mut self.consuming);
        let order = |a: &u32, b: &u32| self.compare_people(*a, *b);
        newly_consuming.sort_by(order);
        let mut merged = Vec::with_capacity(previous.len() + newly_consuming.len());
        let mut added = newly_consuming.into_iter().peekable();
        for slot in previous {
            if touched.marked.get(slot as usize).copied().unwrap_or(false) {
                continue;
            }
            while let Some(next) = added.next_if(|next| order(next, &slot) == Ordering::Less) {
                merged.push(next);
            }
            merged.push(slot);
        }
        merged.extend(added);
        self.consuming = merged;
    }

    fn compare_people(&self, a: u32, b: u32) -> Ordering {
        compare_people(
            &self.people[a as usize],
            &self.people[b as usize],
            &self.instances,
            &self.cloud,
        )
    }
}

fn is_live(person: &Person) -> bool {
    person.cloud_member.is_some() || !person.server_accounts.is_empty()
}

#[derive(Clone, Copy)]
enum Sign {
    Plus,
    Minus,
}

/// The statistics one GHES account contributes, whichever person holds it.
fn apply_link_stats(stats: &mut MergeStats, link: &ServerLink, sign: Sign) {
    let apply = |counter: &mut u64, applies: bool| {
        if applies {
            match sign {
                Sign::Plus => *counter += 1,
                Sign::Minus => *counter -= 1,
            }
        }
    };
    apply(&mut stats.server_accounts, true);
    apply(
        &mut stats.matched_by_identity,
        matches!(link.rule, MatchRule::Identity { .. }),
    );
    apply(
        &mut stats.matched_by_verified_email,
        link.rule == MatchRule::VerifiedEmail,
    );
    apply(
        &mut stats.invalid_emails,
        matches!(link.rule, MatchRule::InvalidEmail { .. }),
    );
    apply(&mut stats.ambiguous_accounts, link.tied);
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::merge::{Merged, merge};
    use crate::model::{CloudMember, ExternalIdentity, ServerUser, UserRole};

    /// Everything a reader of the merge can observe, independent of slot and instance numbering.
    #[derive(Debug, PartialEq)]
    struct Observed {
        /// Every person in (login, id) order: id, cloud id, accounts as (hostname, user id, rule, tied cloud ids).
        people: Vec<ObservedPerson>,
        consuming: Vec<String>,
        stats: MergeStats,
        likely_duplicates: Vec<LikelyDuplicate>,
    }

    type ObservedAccount = (String, i64, MatchRule, Vec<i64>);

    #[derive(Debug, PartialEq)]
    struct ObservedPerson {
        id: String,
        cloud_id: Option<i64>,
        accounts: Vec<ObservedAccount>,
        consumes_license: bool,
    }

    fn observe_person(
        person: &Person,
        instances: &[InstanceUsers],
        cloud: &CloudMembers,
        ties: &Ties,
    ) -> ObservedPerson {
        ObservedPerson {
            id: person_id(person, instances, cloud).to_string(),
            cloud_id: person.cloud_member.map(|index| cloud.at(index as usize).id),
            accounts: person
                .server_accounts
                .iter()
                .map(|link| {
                    let instance = &instances[link.account.instance as usize];
                    (
                        instance.hostname.clone(),
                        instance.users.at(link.account.user as usize).id,
                        link.rule,
                        ties.get(&link.account)
                            .filter(|_| link.tied)
                            .into_iter()
                            .flatten()
                            .map(|&index| cloud.at(index as usize).id)
                            .collect(),
                    )
                })
                .collect(),
            consumes_license: person.consumes_license,
        }
    }

    fn observe_full(merged: &Merged, instances: &[InstanceUsers]) -> Observed {
        let cloud = &merged.cloud;
        Observed {
            people: merged
                .people
                .iter()
                .map(|person| observe_person(person, instances, cloud, &merged.ties))
                .collect(),
            consuming: merged
                .consuming
                .iter()
                .map(|&position| {
                    person_id(&merged.people[position as usize], instances, cloud).to_string()
                })
                .collect(),
            stats: merged.stats,
            likely_duplicates: merged.likely_duplicates.clone(),
        }
    }

    fn observe_index(index: &PeopleIndex) -> Observed {
        let mut slots: Vec<u32> = (0..index.people.len() as u32)
            .filter(|&slot| index.person(slot).is_some())
            .collect();
        slots.sort_by(|a, b| index.compare_people(*a, *b));
        let person = |slot: u32| &index.people[slot as usize];
        Observed {
            people: slots
                .iter()
                .map(|&slot| {
                    observe_person(person(slot), &index.instances, &index.cloud, &index.ties)
                })
                .collect(),
            consuming: index
                .consuming()
                .iter()
                .map(|&slot| index.person_id(person(slot)).to_string())
                .collect(),
            stats: index.stats(),
            likely_duplicates: index.likely_duplicates(),
        }
    }

    /// Few distinct values, so that random data collides: shared emails, case and space variants, invalid ones.
    const EMAILS: [&str; 10] = [
        "mona@example.com",
        " MONA@example.com",
        "hubot@example.com",
        "octo@example.org",
        "Octo@Example.org ",
        "cat@example.net",
        "no-at-sign",
        "",
        "two@@example.com",
        "dog@example.net",
    ];
    const LOGINS: [&str; 6] = ["mona", "Mona", "hubot", "octocat", "ghost", "cat"];
    const NAMES: [&str; 2] = ["Mona Lisa", "Hu Bot"];

    fn email() -> impl Strategy<Value = String> {
        prop::sample::select(&EMAILS[..]).prop_map(str::to_owned)
    }

    fn users() -> impl Strategy<Value = Vec<ServerUser>> {
        let user = (
            prop::sample::select(&LOGINS[..]),
            email(),
            any::<bool>(),
            any::<bool>(),
        );
        (prop::collection::vec(user, 0..8), 1..4i64).prop_map(|(users, stride)| {
            users
                .into_iter()
                .enumerate()
                .map(|(index, (login, email, suspended, dormant))| ServerUser {
                    // Unique on the instance; the same ids recur on other instances.
                    id: (index as i64 + 1) * stride,
                    login: login.to_owned(),
                    email,
                    role: UserRole::User,
                    suspended,
                    dormant,
                    created_at: None,
                    last_active: None,
                    two_factor_enabled: None,
                })
                .collect()
        })
    }

    fn cloud() -> impl Strategy<Value = Vec<CloudMember>> {
        let identity = (
            prop::option::of(email()),
            prop::option::of(email()),
            prop::collection::vec(email(), 0..2),
        )
            .prop_map(|(name_id, username, emails)| ExternalIdentity {
                name_id,
                emailaddress: None,
                name: None,
                username,
                emails,
            });
        let member = (
            prop::sample::select(&LOGINS[..]),
            prop::option::of(prop::sample::select(&NAMES[..])),
            prop::collection::vec(email(), 0..3),
            prop::option::of(identity),
            any::<bool>(),
        );
        prop::collection::vec(member, 0..5).prop_map(|members| {
            members
                .into_iter()
                .enumerate()
                // Descending ids, so the lowest-id tie rule does not simply follow the input order.
                .map(
                    |(index, (login, name, verified, identity, consumes))| CloudMember {
                        id: 100 - index as i64 * 7,
                        login: format!("{login}-cloud"),
                        name: name.map(str::to_owned),
                        verified_emails: verified,
                        identity,
                        consumes_license: consumes,
                        member_roles: Vec::new(),
                        enterprise_roles: Vec::new(),
                        orgs_with_pending_invites: Vec::new(),
                        two_factor_auth: None,
                        visual_studio_subscription_user: false,
                    },
                )
                .collect()
        })
    }

    #[derive(Debug, Clone)]
    enum Step {
        Upsert {
            key: i64,
            renamed: bool,
            users: Vec<ServerUser>,
        },
        Remove {
            key: i64,
        },
        Cloud(Vec<CloudMember>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..4i64, any::<bool>(), users())
                .prop_map(|(key, renamed, users)| Step::Upsert { key, renamed, users }),
            2 => (0..4i64).prop_map(|key| Step::Remove { key }),
            1 => cloud().prop_map(Step::Cloud),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// After any sequence of batches of changes, the index equals a full merge of the resulting state.
        #[test]
        fn incremental_updates_equal_a_full_merge(
            initial_cloud in cloud(),
            batches in prop::collection::vec(prop::collection::vec(step(), 1..4), 1..8),
        ) {
            let mut current_cloud = initial_cloud.clone();
            let mut current: BTreeMap<i64, InstanceUsers> = BTreeMap::new();
            let mut index = PeopleIndex::new(CloudDirectory::from_members(&initial_cloud));
            for batch in batches {
                let mut changes = Vec::new();
                let mut new_cloud = None;
                for step in batch {
                    match step {
                        Step::Upsert { key, renamed, users } => {
                            // Distinct hostnames per instance; a rename changes every account's sort position.
                            let hostname = if renamed { format!("GHES-{key}.corp") } else { format!("ghes-{key}") };
                            let users = Accounts::from_users(&users).expect("a small table");
                            current.insert(key, InstanceUsers { hostname: hostname.clone(), users: users.clone() });
                            changes.push(InstanceChange::Upsert { key, hostname, users });
                        }
                        Step::Remove { key } => {
                            current.remove(&key);
                            changes.push(InstanceChange::Remove { key });
                        }
                        Step::Cloud(cloud) => new_cloud = Some(cloud),
                    }
                }
                index.apply(changes);
                if let Some(cloud) = new_cloud {
                    current_cloud = cloud.clone();
                    index.replace_cloud_members(CloudDirectory::from_members(&cloud));
                }
                let instances: Vec<InstanceUsers> = current.values().cloned().collect();
                let full = merge(&instances, &current_cloud);
                prop_assert_eq!(observe_index(&index), observe_full(&full, &instances));
                prop_assert_eq!(index.total_seats_consumed(), full.total_seats_consumed());
                for person in index.people() {
                    let id = index.person_id(person).to_string();
                    prop_assert_eq!(index.person_by_id(&id).map(|p| index.person_id(p).to_string()), Some(id));
                }
            }
        }
    }

    #[test]
    fn the_slab_indexes_across_chunks() {
        let mut slab = Slab::default();
        let count = 2 * SLAB_CHUNK + 5;
        for value in 0..count {
            slab.push(value);
        }
        assert_eq!(slab.len(), count);
        assert_eq!(slab[SLAB_CHUNK - 1], SLAB_CHUNK - 1);
        assert_eq!(slab[SLAB_CHUNK], SLAB_CHUNK);
        slab[2 * SLAB_CHUNK + 4] = 7;
        assert_eq!(slab.get(2 * SLAB_CHUNK + 4), Some(&7));
        assert_eq!(slab.get(count), None);
        assert_eq!(slab.iter().count(), count);
        assert_eq!(slab.chunks.len(), 3);
    }

    #[test]
    fn removing_the_last_account_of_a_group_frees_it_and_a_new_one_takes_the_email() {
        let user = |id: i64, email: &str| ServerUser {
            id,
            login: format!("user{id}"),
            email: email.to_owned(),
            role: UserRole::User,
            suspended: false,
            dormant: false,
            created_at: None,
            last_active: None,
            two_factor_enabled: None,
        };
        let mut index = PeopleIndex::new(CloudDirectory::default());
        index.apply([
            InstanceChange::Upsert {
                key: 1,
                hostname: "a".into(),
                users: Accounts::from_users(&[user(1, "x@example.com")]).expect("a small table"),
            },
            InstanceChange::Upsert {
                key: 2,
                hostname: "b".into(),
                users: Accounts::from_users(&[user(2, "X@example.com")]).expect("a small table"),
            },
        ]);
        assert_eq!(index.total_seats_consumed(), 1);
        assert_eq!(index.stats().merged_by_primary_email, 2);
        index.apply([InstanceChange::Remove { key: 1 }]);
        let people: Vec<&Person> = index.people().collect();
        assert_eq!(people.len(), 1);
        assert_eq!(index.person_id(people[0]), "server:b:2");
        assert_eq!(people[0].server_accounts[0].rule, MatchRule::Unmatched);
        index.apply([InstanceChange::Remove { key: 2 }]);
        assert_eq!(index.people().count(), 0);
        assert!(index.person_of_email.is_empty());
        index.apply([InstanceChange::Upsert {
            key: 3,
            hostname: "c".into(),
            users: Accounts::from_users(&[user(5, "x@example.com")]).expect("a small table"),
        }]);
        assert_eq!(index.total_seats_consumed(), 1);
        assert_eq!(
            index
                .person_by_id("server:c:5")
                .map(|p| p.server_accounts.len()),
            Some(1)
        );
    }

    #[test]
    fn a_walk_resumed_after_its_cursor_neither_repeats_nor_skips_people_across_a_change() {
        let user = |id: i64, login: &str| ServerUser {
            id,
            login: login.to_owned(),
            email: format!("user{id}@example.com"),
            role: UserRole::User,
            suspended: false,
            dormant: false,
            created_at: None,
            last_active: None,
            two_factor_enabled: None,
        };
        let instance = |key: i64, users: &[ServerUser]| InstanceChange::Upsert {
            key,
            hostname: format!("ghes-{key}"),
            users: Accounts::from_users(users).expect("a small table"),
        };
        let ids = |index: &PeopleIndex, slots: &[u32]| -> Vec<String> {
            slots
                .iter()
                .filter_map(|&slot| index.person(slot))
                .map(|person| index.person_id(person).to_string())
                .collect()
        };
        let mut index = PeopleIndex::new(CloudDirectory::default());
        // Two people share the login `dup`: the id breaks the tie.
        index.apply([
            instance(1, &[user(1, "b"), user(2, "dup"), user(3, "f")]),
            instance(2, &[user(4, "dup"), user(5, "h")]),
        ]);
        let first = index.consuming()[..2].to_vec();
        assert_eq!(ids(&index, &first), ["server:ghes-1:1", "server:ghes-1:2"]);
        let person = index.person(first[1]).expect("live");
        let cursor = index.consuming_cursor(person);
        // Someone sorting before the cursor arrives and someone after it leaves: positions shift, the key holds.
        index.apply([instance(2, &[user(4, "dup")]), instance(3, &[user(6, "a")])]);
        let rest = index.consuming()[index.consuming_after(&cursor)..].to_vec();
        assert_eq!(ids(&index, &rest), ["server:ghes-2:4", "server:ghes-1:3"]);
        let last = index.person(*rest.last().expect("one")).expect("live");
        assert_eq!(
            index.consuming_after(&index.consuming_cursor(last)),
            index.consuming().len()
        );
    }
}

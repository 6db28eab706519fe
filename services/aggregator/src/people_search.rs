//! The console's people search: one lower-cased haystack of every consuming person's logins, name, emails and
//! `host:id` account references, built once per merged-view generation (and only when someone searches), so that a
//! search over a million accounts is one substring scan of one string rather than a million small lower-casings.
//! Positions are indexes into [`PeopleIndex::consuming`](license_sync_core::incremental::PeopleIndex::consuming),
//! in its order (GitHub's page order), so search results paginate like the unsearched list.

use std::fmt::Write as _;

use crate::view::MergedView;

/// Separates a person's fields: a query cannot contain it (control characters are removed from queries), so a match
/// never spans two fields.
const FIELD_SEPARATOR: char = '\n';

/// The haystack of one view generation.
pub struct PeopleSearch {
    pub generation: i64,
    text: String,
    /// `ends[i]`: the byte offset where consuming person `i`'s text ends.
    ends: Vec<usize>,
}

/// Lower-cases `field` onto `text`: ASCII in place, anything else through Unicode's lower case.
fn push_lowercase(text: &mut String, field: &str) {
    if field.is_empty() {
        return;
    }
    if field.is_ascii() {
        text.extend(
            field
                .bytes()
                .map(|byte| char::from(byte.to_ascii_lowercase())),
        );
    } else {
        text.push_str(&field.to_lowercase());
    }
    text.push(FIELD_SEPARATOR);
}

/// The form a query is matched in: lower case, without control characters, trimmed.
pub fn normalise_query(query: &str) -> String {
    query
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .collect::<String>()
        .to_lowercase()
}

impl PeopleSearch {
    pub fn build(view: &MergedView) -> Self {
        let people = &view.people;
        let consuming = people.consuming();
        let instances = people.instance_slots();
        let cloud = people.cloud_members();
        // About 64 bytes per account in practice (login, email, host:id).
        let mut text = String::with_capacity(consuming.len() * 64);
        let mut ends = Vec::with_capacity(consuming.len());
        for &slot in consuming {
            if let Some(person) = people.person(slot) {
                if let Some(member) = person
                    .cloud_member
                    .and_then(|index| cloud.get(index as usize))
                {
                    push_lowercase(&mut text, member.login);
                    push_lowercase(&mut text, member.name.unwrap_or_default());
                    push_lowercase(&mut text, member.saml_name_id.unwrap_or_default());
                    for email in member.verified_emails.iter() {
                        push_lowercase(&mut text, email);
                    }
                }
                for link in &person.server_accounts {
                    let Some(instance) = instances.get(link.account.instance as usize) else {
                        continue;
                    };
                    let user = link.account.user as usize;
                    push_lowercase(&mut text, instance.users.login(user));
                    push_lowercase(&mut text, instance.users.email(user));
                    // `host:id` as one field: a query of the whole reference, or of the hostname, matches it.
                    let start = text.len();
                    let _ = write!(text, "{}:{}", instance.hostname, instance.users.id(user));
                    text[start..].make_ascii_lowercase();
                    text.push(FIELD_SEPARATOR);
                }
            }
            ends.push(text.len());
        }
        text.shrink_to_fit();
        PeopleSearch {
            generation: view.generation,
            text,
            ends,
        }
    }

    /// The positions (in the consuming order) of the people any of whose fields contains `query`, which must be
    /// normalised ([`normalise_query`]) and not empty. One scan: after a match the search goes on at the next
    /// person.
    pub fn matching(&self, query: &str) -> Vec<u32> {
        let mut found = Vec::new();
        if query.is_empty() {
            return found;
        }
        let mut from = 0;
        while let Some(offset) = self.text.get(from..).and_then(|rest| rest.find(query)) {
            let at = from + offset;
            let person = self.ends.partition_point(|&end| end <= at);
            let Some(&end) = self.ends.get(person) else {
                break;
            };
            found.push(person as u32);
            from = end;
        }
        found
    }

    /// Bytes held, for the bench's figure.
    pub fn heap_bytes(&self) -> usize {
        self.text.capacity() + self.ends.capacity() * std::mem::size_of::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use license_sync_core::accounts::Accounts;
    use license_sync_core::cloud::CloudDirectory;
    use license_sync_core::incremental::PeopleIndex;
    use license_sync_core::merge::InstanceUsers;

    use super::*;

    fn view(instances: usize, users: usize) -> MergedView {
        let built = (0..instances).map(|instance| {
            let mut accounts = Accounts::new();
            for id in 0..users {
                accounts
                    .push(
                        id as i64,
                        &format!("User{id}"),
                        &format!("user{id}.i{instance}@Example.com"),
                        false,
                        false,
                    )
                    .expect("fits");
            }
            (
                instance as i64,
                InstanceUsers {
                    hostname: format!("ghes{instance}.example.com"),
                    users: accounts,
                },
            )
        });
        MergedView {
            generation: 1,
            seats_purchased: 10,
            people: PeopleIndex::build(CloudDirectory::default(), built),
        }
    }

    #[test]
    fn a_query_matches_login_email_and_host_id_case_insensitively_once_per_person() {
        let view = view(2, 30);
        let search = PeopleSearch::build(&view);
        let login_of = |position: u32| {
            let slot = view.people.consuming()[position as usize];
            let person = view.people.person(slot).expect("person");
            let link = person.server_accounts[0];
            let instance = &view.people.instance_slots()[link.account.instance as usize];
            instance.users.login(link.account.user as usize).to_owned()
        };
        // `user2` is in user2, user20..user29 (on both instances; one person per instance and email).
        let found = search.matching(&normalise_query("USER2"));
        assert_eq!(found.len(), 22, "{found:?}");
        let found = search.matching(&normalise_query("ghes1.example.com:7"));
        assert_eq!(found.len(), 1);
        assert_eq!(login_of(found[0]), "User7");
        let found = search.matching(&normalise_query("user5.i0@example"));
        assert_eq!(found.len(), 1);
        assert!(search.matching("nobody").is_empty());
        assert!(search.matching("").is_empty());
        // Results come in the consuming order, each person once.
        let all = search.matching("example.com");
        assert_eq!(all, (0..60).collect::<Vec<u32>>());
    }

    /// `cargo nextest run -p license-sync-aggregator --run-ignored only people_search_bench` (release for real
    /// figures): the build and one search over 1M accounts, next to a naive scan that lower-cases each field per
    /// query, measured in the same run.
    #[test]
    #[ignore = "bench: prints figures, asserts nothing about time"]
    fn people_search_bench() {
        let view = view(10, 100_000);
        let started = Instant::now();
        let search = PeopleSearch::build(&view);
        let built = started.elapsed();
        let query = normalise_query("user4242.i7@");
        let started = Instant::now();
        let found = search.matching(&query);
        let searched = started.elapsed();
        let started = Instant::now();
        let naive = view
            .people
            .consuming()
            .iter()
            .filter(|&&slot| {
                view.people.person(slot).is_some_and(|person| {
                    person.server_accounts.iter().any(|link| {
                        let instance =
                            &view.people.instance_slots()[link.account.instance as usize];
                        let user = link.account.user as usize;
                        instance.users.login(user).to_lowercase().contains(&query)
                            || instance.users.email(user).to_lowercase().contains(&query)
                    })
                })
            })
            .count();
        let naive_time = started.elapsed();
        assert_eq!(found.len(), naive);
        println!(
            "people search over {} consuming people: build {built:?} ({} MiB), search {searched:?} ({} found); \
             baseline naive scan {naive_time:?}",
            view.people.consuming().len(),
            search.heap_bytes() / (1024 * 1024),
            found.len()
        );
    }
}

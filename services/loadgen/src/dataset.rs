//! A deterministic synthetic enterprise: GHES instances whose users overlap, and cloud members that match some of
//! them. The same seed and sizes always give the same data.

use license_sync_core::model::{CloudMember, ExternalIdentity};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub instances: usize,
    pub users_per_instance: usize,
    /// Share of each instance's accounts that belong to people present on every instance.
    pub overlap: f64,
    pub cloud_members: usize,
    pub seed: u64,
}

pub struct Dataset {
    /// `all_users.csv` text per instance, in GHES's column order.
    pub reports: Vec<String>,
    pub cloud_members: Vec<CloudMember>,
    /// Distinct people behind the server accounts (before cloud matching).
    pub distinct_server_people: usize,
}

const HEADER: &str = "created_at,id,login,email,role,suspended?,last_logged_ip,repos,ssh_keys,org_memberships,dormant?,last_active,raw_login,2fa_enabled?\n";

/// The person behind the `index`-th account of `instance`.
fn person_of(shape: &Shape, shared: usize, instance: usize, index: usize) -> usize {
    if index < shared {
        index
    } else {
        let unique = shape.users_per_instance - shared;
        shared + instance * unique + (index - shared)
    }
}

/// Emails vary in case between instances, as they do in real reports; normalisation must merge them.
fn email(person: usize, instance: usize) -> String {
    if (person + instance).is_multiple_of(3) {
        format!("Person{person}@Corp.Example")
    } else {
        format!("person{person}@corp.example")
    }
}

pub fn generate(shape: &Shape) -> Dataset {
    let mut rng = ChaCha8Rng::seed_from_u64(shape.seed);
    let shared =
        ((shape.users_per_instance as f64) * shape.overlap.clamp(0.0, 1.0)).round() as usize;
    let mut reports = Vec::with_capacity(shape.instances);
    for instance in 0..shape.instances {
        let mut csv = String::with_capacity(shape.users_per_instance * 140 + HEADER.len());
        csv.push_str(HEADER);
        for index in 0..shape.users_per_instance {
            let person = person_of(shape, shared, instance, index);
            let suspended = rng.random_bool(0.03);
            let dormant = rng.random_bool(0.10);
            csv.push_str(&format!(
                "2021-03-04 10:22:33 UTC,{id},user{person},{email},User,{suspended},10.0.0.1,3,1,2,{dormant},2024-05-06 07:08:09 UTC,user{person},true\n",
                id = index + 1,
                email = email(person, instance),
            ));
        }
        reports.push(csv);
    }
    let distinct_server_people = shared + shape.instances * (shape.users_per_instance - shared);

    // Cloud members: people spread over the whole range, so some are shared, some unique, some server-less.
    let people_range = distinct_server_people.max(1) + shape.cloud_members / 4;
    let mut cloud_members = Vec::with_capacity(shape.cloud_members);
    let mut used = std::collections::HashSet::with_capacity(shape.cloud_members);
    while cloud_members.len() < shape.cloud_members {
        let person = rng.random_range(0..people_range);
        if !used.insert(person) {
            continue;
        }
        let by_identity = rng.random_bool(0.1);
        let address = format!("person{person}@corp.example");
        cloud_members.push(CloudMember {
            id: 1_000_000 + person as i64,
            login: format!("cloud-{person}"),
            name: Some(format!("Person {person}")),
            verified_emails: if by_identity {
                Vec::new()
            } else {
                vec![address.clone()]
            },
            identity: by_identity.then(|| ExternalIdentity {
                name_id: Some(format!("person{person}")),
                emails: vec![address],
                ..ExternalIdentity::default()
            }),
            consumes_license: !rng.random_bool(0.05),
            member_roles: vec!["org1:Member".to_owned()],
            enterprise_roles: Vec::new(),
            orgs_with_pending_invites: Vec::new(),
            two_factor_auth: Some(true),
            visual_studio_subscription_user: false,
        });
    }
    Dataset {
        reports,
        cloud_members,
        distinct_server_people,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_data_and_overlap_is_shared() {
        let shape = Shape {
            instances: 3,
            users_per_instance: 100,
            overlap: 0.3,
            cloud_members: 40,
            seed: 7,
        };
        let a = generate(&shape);
        let b = generate(&shape);
        assert_eq!(a.reports, b.reports);
        assert_eq!(a.cloud_members, b.cloud_members);
        assert_eq!(a.distinct_server_people, 30 + 3 * 70);
        // Person 0 is on every instance (shared), person 30 only on the first.
        assert!(
            a.reports
                .iter()
                .all(|r| r.to_lowercase().contains(",person0@corp.example,"))
        );
        assert!(!a.reports[1].contains(",user30,"));
    }
}

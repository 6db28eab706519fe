//! `--memory-breakdown`: what the aggregator's merged view costs, part by part, on the run's data. Builds the same
//! [`PeopleIndex`] the aggregator keeps, in this process, and reads the bytes live on the heap after each step from
//! a counting allocator (the `cap` crate's, around the system allocator). RSS says how much a process holds; this says which part of the view holds it.

use anyhow::Result;
use license_sync_core::accounts::Accounts;
use license_sync_core::all_users_csv::read_all_users_csv;
use license_sync_core::cloud::CloudDirectory;
use license_sync_core::incremental::{InstanceChange, PeopleIndex};

use crate::{ALLOCATOR, Enterprise};

/// Bytes live on the heap of this process.
fn live() -> usize {
    ALLOCATOR.allocated()
}

fn mib(bytes: usize) -> String {
    format!("{:7.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Prints the heap bytes of each part of the merged view of `enterprise`.
pub fn breakdown(enterprise: &Enterprise) -> Result<()> {
    let before = live();
    let mut instances = Vec::with_capacity(enterprise.data.reports.len());
    for (key, (csv, hostname)) in enterprise
        .data
        .reports
        .iter()
        .zip(&enterprise.hostnames)
        .enumerate()
    {
        let mut users = Accounts::from_users(&read_all_users_csv(csv.as_bytes())?.users)?;
        users.shrink_to_fit();
        instances.push((key as i64, hostname.clone(), users));
    }
    let accounts = live() - before;

    let before = live();
    let mut index = PeopleIndex::new(CloudDirectory::from_members(&enterprise.data.cloud_members));
    let cloud = live() - before;

    let before = live();
    index.apply(
        instances
            .into_iter()
            .map(|(key, hostname, users)| InstanceChange::Upsert {
                key,
                hostname,
                users,
            }),
    );
    let people = live() - before;
    let total = accounts + cloud + people;
    let count = enterprise.total_accounts;
    println!("merged view heap, built in this process (a counting allocator, not RSS)");
    println!(
        "  accounts ({count}, compact columns)           {}  ({:.0} bytes/account)",
        mib(accounts),
        accounts as f64 / count as f64
    );
    println!(
        "  cloud members ({}) and their match index  {}",
        enterprise.data.cloud_members.len(),
        mib(cloud)
    );
    println!(
        "  people ({}), links, email groups, order    {}",
        index.stats().people,
        mib(people)
    );
    println!(
        "  total                                         {}  ({:.0} bytes/account)",
        mib(total),
        total as f64 / count as f64
    );
    Ok(())
}

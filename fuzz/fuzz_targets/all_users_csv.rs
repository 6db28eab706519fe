//! The GHES report reader takes whatever the instance (or a file an owner picked) gives it: it must never panic, and
//! what it reports must add up — every data row is either kept or skipped (the invariant `ParsedReport` documents),
//! so that a row is never silently dropped.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_sync_core::all_users_csv::read_all_users_csv;

fuzz_target!(|data: &[u8]| {
    let Ok(report) = read_all_users_csv(data) else {
        return;
    };
    assert_eq!(
        report.rows_read,
        report.users.len() as u64 + report.rows_skipped(),
        "rows read must be rows kept plus rows skipped"
    );
    for skipped in &report.skipped {
        // Every reason renders (it reaches logs and the agent's JSON output).
        let _ = skipped.to_string();
    }
});

//! An uploaded usage file is the one snapshot path that does not come over our own gRPC client: parsing it, checking
//! its count and digest, and validating it must never panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use license_sync_core::snapshot::{SnapshotLimits, UsageFile};
use time::OffsetDateTime;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = serde_json::from_slice::<UsageFile>(data) else {
        return;
    };
    let Ok(snapshot) = file.into_snapshot() else {
        return;
    };
    let _ = snapshot.validate(&SnapshotLimits::default(), OffsetDateTime::now_utc());
});

//! An encrypted usage file is decrypted and parsed from untrusted bytes on upload: whatever the bytes, reading must
//! never panic, and a file that decrypts must read exactly as its plaintext would as a plain upload.
//!
//! The first byte picks the mode. Odd: the rest is an age file, read with a fixed key (`FUZZ_KEY`) and a key it is
//! not for, as the upload does with an enterprise's keys (the seed `ghes-1.json.age` is encrypted to it). Even: the
//! rest is a plaintext, encrypted to `FUZZ_KEY` here, so that the fuzzer explores the JSON behind the decryption.
#![no_main]

use std::sync::LazyLock;

use age::x25519::Identity;
use libfuzzer_sys::fuzz_target;
use license_sync_core::encrypted_usage_file::{self, EncryptedUsageFileError};
use license_sync_core::snapshot::{SnapshotLimits, UsageFile};
use time::OffsetDateTime;

/// A key made for this target only (it protects nothing): the seeds are encrypted to it.
const FUZZ_KEY: &str = "AGE-SECRET-KEY-1SLMHXF37K2DEU7U9V7YKMSAZEQH2JYXREXAYJ4Q6AX6KPQ0AMJGQZCLWSD";

static KEYS: LazyLock<[Identity; 2]> = LazyLock::new(|| {
    [
        Identity::generate(),
        FUZZ_KEY.parse().expect("the fuzz key is a valid age secret key"),
    ]
});

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let read = if mode & 1 == 1 {
        let _ = encrypted_usage_file::is_encrypted(body);
        encrypted_usage_file::read_encrypted(body, &KEYS[..])
    } else {
        let Ok(plain) = UsageFile::from_json(body) else {
            // The same refusal behind the encryption (raw bytes cannot be re-encrypted as a UsageFile, so the
            // plaintext is encrypted as is).
            let encrypted = encrypt_raw(body);
            let decrypted = encrypted_usage_file::read_encrypted(&encrypted, &KEYS[1..]);
            assert!(
                matches!(decrypted, Err(EncryptedUsageFileError::Content(_))),
                "a plaintext that is not a usage file is refused as such: {decrypted:?}"
            );
            return;
        };
        let encrypted = encrypted_usage_file::write_encrypted(&plain, &KEYS[1].to_public(), Vec::new())
            .expect("encrypting into memory");
        let decrypted = encrypted_usage_file::read_encrypted(&encrypted, &KEYS[1..])
            .expect("a usage file encrypted to the key decrypts");
        assert_eq!(decrypted, plain);
        Ok(decrypted)
    };
    let Ok(file) = read else {
        return;
    };
    let Ok(snapshot) = file.into_snapshot() else {
        return;
    };
    let _ = snapshot.validate(&SnapshotLimits::default(), OffsetDateTime::now_utc());
});

fn encrypt_raw(plaintext: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    let recipient = KEYS[1].to_public();
    let encryptor = age::Encryptor::with_recipients(std::iter::once(&recipient as &dyn age::Recipient))
        .expect("one recipient");
    let mut writer = encryptor.wrap_output(Vec::new()).expect("writing into memory");
    writer.write_all(plaintext).expect("writing into memory");
    writer.finish().expect("writing into memory")
}

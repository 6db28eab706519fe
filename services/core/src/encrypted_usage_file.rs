//! The encrypted usage file: a [`UsageFile`] encrypted with [age](https://age-encryption.org/v1) to an enterprise's
//! X25519 public key (`age1…`), as GitHub's server-usage export is encrypted to the enterprise. Only the aggregator,
//! which holds the enterprise's secret keys, can read the users' emails and logins in it.
//!
//! The file is age's binary format (it starts with [`AGE_BINARY_MAGIC`], so an upload is told apart from the JSON of
//! a plain usage file by its first bytes); age's ASCII armor is read too. Inside is exactly the JSON of a plain usage
//! file. Reading streams the decryption into the one-pass JSON parser, so the plaintext is never held whole next to
//! the ciphertext: the parse holds what a plain file's does (≤ 2× the body), plus age's 64 KiB chunk buffers.
//!
//! Encrypting draws a random file key from the operating system (age's), so unlike the rest of this crate
//! [`write_encrypted`] is not deterministic; reading is.

use std::io::{BufReader, Read, Write};

use age::x25519::{Identity, Recipient};

use crate::snapshot::{UsageFile, UsageFileParseError};

/// The first bytes of an age file in the binary format (the version line of its header).
pub const AGE_BINARY_MAGIC: &[u8] = b"age-encryption.org/v1\n";
/// The first line of an age file in ASCII armor.
pub const AGE_ARMOR_BEGIN: &[u8] = b"-----BEGIN AGE ENCRYPTED FILE-----";
/// The file name suffix `license-sync-agent export` suggests for an encrypted usage file.
pub const ENCRYPTED_EXTENSION: &str = "age";

/// Whether `body` is an age file (binary or armored) rather than a plain usage file's JSON.
pub fn is_encrypted(body: &[u8]) -> bool {
    if body.starts_with(AGE_BINARY_MAGIC) {
        return true;
    }
    // age's armor reader, like the format, allows leading whitespace before the armor's first line.
    let start = body
        .iter()
        .position(|byte| !byte.is_ascii_whitespace())
        .unwrap_or(body.len());
    body[start..].starts_with(AGE_ARMOR_BEGIN)
}

/// Parses a recipient (`age1…`), with a message that says what was expected. Never echoes more than a prefix.
pub fn parse_recipient(text: &str) -> Result<Recipient, String> {
    text.trim().parse::<Recipient>().map_err(|reason| {
        let shown: String = text.trim().chars().take(12).collect();
        format!(
            "{shown:?}… is not an age X25519 public key ({reason}): expected the `age1…` key printed by \
             `license-sync-aggregator enterprise keygen`"
        )
    })
}

/// Why an encrypted upload cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EncryptedUsageFileError {
    /// The file is encrypted to none of the keys given: another enterprise's key, an unknown key, or a passphrase.
    #[error("the file is not encrypted to any of the keys it was checked with")]
    NotForTheseKeys,
    /// The age header or the encrypted payload is damaged or truncated (age authenticates every chunk).
    #[error("the encrypted file is damaged or truncated ({0})")]
    Damaged(String),
    /// The decrypted content is not a usage file.
    #[error(transparent)]
    Content(UsageFileParseError),
}

/// Encrypts `file` to `recipient`, writing the age binary format to `output` (the JSON is streamed through the
/// encryption, so it is never held whole). Returns `output`.
pub fn write_encrypted<W: Write>(
    file: &UsageFile,
    recipient: &Recipient,
    output: W,
) -> std::io::Result<W> {
    let encryptor =
        age::Encryptor::with_recipients(std::iter::once(recipient as &dyn age::Recipient))
            .map_err(std::io::Error::other)?;
    let mut plaintext = encryptor.wrap_output(output)?;
    serde_json::to_writer_pretty(&mut plaintext, file).map_err(std::io::Error::other)?;
    plaintext.write_all(b"\n")?;
    plaintext.finish()
}

/// Decrypts `body` with whichever of `identities` it is encrypted to and parses the usage file inside, in one
/// pass. Like [`UsageFile::from_json`], a body whose JSON is not a usage file is read a second time (decrypted
/// again, building nothing) for its `format`, so that the error says what it is.
pub fn read_encrypted(
    body: &[u8],
    identities: &[Identity],
) -> Result<UsageFile, EncryptedUsageFileError> {
    let plaintext = decrypting_reader(body, identities)?;
    UsageFile::from_reader(plaintext, || decrypting_reader(body, identities).ok()).map_err(
        |error| match error {
            // Reading the plaintext failed: age refused a chunk (its tag), or the payload ended early.
            UsageFileParseError::Json(error) if error.is_io() => {
                EncryptedUsageFileError::Damaged(error.to_string())
            }
            other => EncryptedUsageFileError::Content(other),
        },
    )
}

/// The plaintext of `body` as a reader: the header is checked and the file key unwrapped here; the payload is
/// decrypted (and each 64 KiB chunk authenticated) as it is read.
fn decrypting_reader<'a>(
    body: &'a [u8],
    identities: &[Identity],
) -> Result<impl Read + 'a, EncryptedUsageFileError> {
    let decryptor =
        age::Decryptor::new_buffered(age::armor::ArmoredReader::new(body)).map_err(header_error)?;
    let reader = decryptor
        .decrypt(
            identities
                .iter()
                .map(|identity| identity as &dyn age::Identity),
        )
        .map_err(header_error)?;
    Ok(BufReader::with_capacity(64 * 1024, reader))
}

fn header_error(error: age::DecryptError) -> EncryptedUsageFileError {
    match error {
        age::DecryptError::NoMatchingKeys => EncryptedUsageFileError::NotForTheseKeys,
        other => EncryptedUsageFileError::Damaged(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ServerUser, UserRole};
    use crate::snapshot::{Snapshot, SnapshotMeta};

    fn usage_file(users: usize) -> UsageFile {
        let users = (0..users)
            .map(|index| ServerUser {
                id: index as i64 + 1,
                login: format!("login-{index}"),
                email: format!("person{index}@corp.example"),
                role: UserRole::User,
                suspended: false,
                dormant: false,
                created_at: None,
                last_active: None,
                two_factor_enabled: None,
            })
            .collect();
        UsageFile::from_snapshot(Snapshot {
            meta: SnapshotMeta {
                sync_id: uuid::Uuid::from_u128(1),
                instance: crate::model::InstanceIdentity {
                    server_id: uuid::Uuid::from_u128(2),
                    hostname: "ghes-1.corp.example".into(),
                    ghes_version: "3.14.0".into(),
                },
                generated_at: time::OffsetDateTime::UNIX_EPOCH,
                license: None,
                source_report: Default::default(),
            },
            users,
        })
    }

    fn encrypted(file: &UsageFile, recipient: &Recipient) -> Vec<u8> {
        write_encrypted(file, recipient, Vec::new()).expect("encrypt")
    }

    #[test]
    fn a_file_round_trips_and_holds_no_login_or_email_in_clear() {
        let key = Identity::generate();
        // More than one 64 KiB chunk, so that chunk boundaries are crossed.
        let file = usage_file(2_000);
        let body = encrypted(&file, &key.to_public());
        assert!(is_encrypted(&body));
        assert!(!is_encrypted(&serde_json::to_vec(&file).expect("JSON")));
        for needle in ["person1@corp.example", "login-1", "corp.example"] {
            assert!(
                !body.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} is in the encrypted file"
            );
        }
        let read = read_encrypted(&body, &[Identity::generate(), key]).expect("decrypt");
        assert_eq!(read, file);
    }

    #[test]
    fn armored_files_are_read_too() {
        let key = Identity::generate();
        let file = usage_file(3);
        let mut armor =
            age::armor::ArmoredWriter::wrap_output(Vec::new(), age::armor::Format::AsciiArmor)
                .expect("armor");
        armor = write_encrypted(&file, &key.to_public(), armor).expect("encrypt");
        let body = armor.finish().expect("finish");
        assert!(is_encrypted(&body));
        assert_eq!(read_encrypted(&body, &[key]).expect("decrypt"), file);
    }

    #[test]
    fn another_key_a_damaged_file_and_other_content_are_told_apart() {
        let key = Identity::generate();
        let file = usage_file(10);
        let body = encrypted(&file, &key.to_public());

        let other = Identity::generate();
        assert!(matches!(
            read_encrypted(&body, &[other]),
            Err(EncryptedUsageFileError::NotForTheseKeys)
        ));
        assert!(matches!(
            read_encrypted(&body, &[]),
            Err(EncryptedUsageFileError::NotForTheseKeys)
        ));

        let mut flipped = body.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            read_encrypted(&flipped, std::slice::from_ref(&key)),
            Err(EncryptedUsageFileError::Damaged(_))
        ));
        let truncated = &body[..body.len() - 20];
        assert!(matches!(
            read_encrypted(truncated, std::slice::from_ref(&key)),
            Err(EncryptedUsageFileError::Damaged(_))
        ));
        assert!(matches!(
            read_encrypted(&body[..40], std::slice::from_ref(&key)),
            Err(EncryptedUsageFileError::Damaged(_))
        ));

        let not_usage = {
            let encryptor = age::Encryptor::with_recipients(std::iter::once(
                &key.to_public() as &dyn age::Recipient
            ))
            .expect("encryptor");
            let mut writer = encryptor.wrap_output(Vec::new()).expect("wrap");
            writer
                .write_all(br#"{"format": "other/v2", "x": 1}"#)
                .expect("write");
            writer.finish().expect("finish")
        };
        assert!(matches!(
            read_encrypted(&not_usage, &[key]),
            Err(EncryptedUsageFileError::Content(UsageFileParseError::UnsupportedFormat(f))) if f == "other/v2"
        ));
    }

    #[test]
    fn recipients_are_parsed_with_a_message_that_names_the_expected_key() {
        let key = Identity::generate().to_public();
        assert_eq!(
            parse_recipient(&format!(" {key}\n"))
                .expect("key")
                .to_string(),
            key.to_string()
        );
        let error = parse_recipient("AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQ").expect_err("secret");
        assert!(error.contains("age1"), "{error}");
        assert!(!error.contains("QQQQQQQQQQQQ"), "{error}");
    }
}

//! Email normalisation (SPEC §4.1): trim, Unicode NFC, lower-case the whole address.

use std::fmt;

use unicode_normalization::UnicodeNormalization;

/// A normalised, syntactically usable email address (exactly one `@`, non-empty local part and domain).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NormalizedEmail(String);

impl NormalizedEmail {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NormalizedEmail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an address cannot be matched. The account it belongs to counts as its own person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEmail {
    #[error("the email address is empty")]
    Empty,
    #[error("the email address has no '@'")]
    MissingAt,
    #[error("the email address has more than one '@'")]
    SeveralAt,
    #[error("the email address has nothing before the '@'")]
    EmptyLocalPart,
    #[error("the email address has nothing after the '@'")]
    EmptyDomain,
}

/// Normalises any text the same way an email is normalised, without checking that it is an address.
/// Used for SAML/SCIM attributes (NameID, `name`, `username`, ...), which are compared as text.
pub fn normalize_text(raw: &str) -> String {
    let trimmed = raw.trim();
    if trimmed.is_ascii() {
        // NFC leaves ASCII unchanged; this path avoids the per-character decomposition work.
        return trimmed.to_ascii_lowercase();
    }
    trimmed.nfc().flat_map(char::to_lowercase).collect()
}

/// Normalises an email address: trim whitespace, Unicode NFC, lower-case the whole address.
pub fn normalize_email(raw: &str) -> Result<NormalizedEmail, InvalidEmail> {
    let text = normalize_text(raw);
    if text.is_empty() {
        return Err(InvalidEmail::Empty);
    }
    let mut parts = text.split('@');
    let local = parts.next().unwrap_or_default();
    let Some(domain) = parts.next() else {
        return Err(InvalidEmail::MissingAt);
    };
    if parts.next().is_some() {
        return Err(InvalidEmail::SeveralAt);
    }
    if local.is_empty() {
        return Err(InvalidEmail::EmptyLocalPart);
    }
    if domain.is_empty() {
        return Err(InvalidEmail::EmptyDomain);
    }
    Ok(NormalizedEmail(text))
}

/// A normalised email (or identity attribute) as a map key: the first 128 bits of its SHA-256. Collisions are out of
/// reach (about 2^64 addresses for an even chance, and SHA-256 resists crafted ones), and 16 bytes cost far less
/// than a string per address in the indexes the merge keeps.
pub(crate) type EmailKey = [u8; 16];

pub(crate) fn email_key(normalized: &str) -> EmailKey {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(normalized.as_bytes());
    let mut key = [0; 16];
    key.copy_from_slice(&digest[..16]);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_lowercases_the_whole_address() {
        let email = normalize_email("  Mona.Lisa@GitHub.COM \t").expect("valid");
        assert_eq!(email.as_str(), "mona.lisa@github.com");
    }

    #[test]
    fn composes_to_nfc_so_equal_looking_addresses_match() {
        // "é" as e + combining acute accent vs the precomposed character.
        let decomposed = normalize_email("Rene\u{0301}@example.com").expect("valid");
        let composed = normalize_email("REN\u{00C9}@example.com").expect("valid");
        assert_eq!(decomposed, composed);
        assert_eq!(composed.as_str(), "ren\u{00e9}@example.com");
    }

    #[test]
    fn rejects_addresses_without_exactly_one_at_and_both_parts() {
        assert_eq!(normalize_email("   "), Err(InvalidEmail::Empty));
        assert_eq!(normalize_email("mona"), Err(InvalidEmail::MissingAt));
        assert_eq!(normalize_email("a@b@c"), Err(InvalidEmail::SeveralAt));
        assert_eq!(
            normalize_email("@example.com"),
            Err(InvalidEmail::EmptyLocalPart)
        );
        assert_eq!(normalize_email("mona@"), Err(InvalidEmail::EmptyDomain));
    }

    #[test]
    fn normalize_text_applies_the_same_rules_without_validation() {
        assert_eq!(normalize_text("  Mona LISA "), "mona lisa");
    }
}

//! Credentials: random, high-entropy tokens with a readable prefix. Only their SHA-256 is stored, so a leaked
//! database does not leak working credentials. (A fast hash is right here: the tokens are random, not passwords.)

use rand::Rng;
use rand::distr::Alphanumeric;
use sha2::{Digest, Sha256};

/// Prefix of REST tokens of enterprise owners.
pub const API_TOKEN_PREFIX: &str = "lst_";
/// Prefix of instance credentials used by agents.
pub const INSTANCE_CREDENTIAL_PREFIX: &str = "lsi_";
/// Prefix of one-time enrollment tokens an agent exchanges for its instance credential.
pub const ENROLLMENT_TOKEN_PREFIX: &str = "lse_";

pub fn generate(prefix: &str) -> String {
    let random: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("{prefix}{random}")
}

pub fn sha256_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_unique_and_hashed_stably() {
        let a = generate(API_TOKEN_PREFIX);
        let b = generate(API_TOKEN_PREFIX);
        assert!(a.starts_with("lst_") && a.len() == 44);
        assert_ne!(a, b);
        assert_eq!(sha256_hex(&a), sha256_hex(&a));
        assert_ne!(sha256_hex(&a), sha256_hex(&b));
        assert_eq!(sha256_hex(&a).len(), 64);
    }
}

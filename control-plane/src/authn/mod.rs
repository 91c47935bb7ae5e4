//! Who is asking: the proofs a workload presents for its first certificate.
//!
//! A join token is 256 bits from the OS RNG, shown once to the operator; the
//! store keeps only its SHA-256 hash, so a copy of the database proves
//! nothing. In Kubernetes a pod presents its projected ServiceAccount token
//! instead, checked with the API server's TokenReview ([`tokenreview`]).
//! This module never logs a token and never stores one in clear.

pub mod jwks;
pub mod tokenreview;

use std::time::Duration;

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Lifetime of a join token when the caller asks for none.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);
/// The longest a join token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

const TOKEN_PREFIX: &str = "trellis-join-";

/// A fresh join token and the hash under which it is stored.
pub struct NewJoinToken {
    pub token: String,
    pub hash: [u8; 32],
}

pub fn new_join_token() -> NewJoinToken {
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut secret);
    let token = format!("{TOKEN_PREFIX}{}", hex::encode(secret));
    let hash = hash_token(&token);
    NewJoinToken { token, hash }
}

/// The key a token is stored under.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_random_and_hash_stably() {
        let a = new_join_token();
        let b = new_join_token();
        assert_ne!(a.token, b.token);
        assert_eq!(a.hash, hash_token(&a.token));
        assert!(a.token.len() >= TOKEN_PREFIX.len() + 64);
    }
}

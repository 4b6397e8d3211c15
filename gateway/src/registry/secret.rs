//! Device secrets: generation, salted hashing, verification.
//!
//! Secrets the gateway generates carry 192 random bits; no amount of guessing finds one, so a
//! fast salted SHA-256 protects them as well as a slow hash would, and provisioning a million
//! devices stays a matter of seconds. Secrets an operator chooses may be guessable, so those are
//! hashed with Argon2id (see docs/decisions/0002-credential-hashing.md). Both are stored in one
//! self-describing string: `sha256$<salt>$<digest>` or an Argon2 PHC string.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};

const SHA_PREFIX: &str = "sha256$";

/// A new random secret, URL- and CSV-safe.
pub fn generate() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Hash for storage. `generated` says whether the gateway made the secret (high entropy).
pub fn hash(secret: &str, generated: bool) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    if generated {
        let digest = sha256_salted(&salt, secret);
        format!("{SHA_PREFIX}{}${}", hex::encode(salt), hex::encode(digest))
    } else {
        let salt = SaltString::encode_b64(&salt).expect("16-byte salt encodes");
        Argon2::default()
            .hash_password(secret.as_bytes(), &salt)
            .expect("argon2 with default parameters hashes")
            .to_string()
    }
}

/// Whether the stored hash is the slow kind, worth running off the async threads.
pub fn is_slow(stored: &str) -> bool {
    !stored.starts_with(SHA_PREFIX)
}

/// Constant-time check of `secret` against a stored hash.
pub fn verify(stored: &str, secret: &str) -> bool {
    if let Some(rest) = stored.strip_prefix(SHA_PREFIX) {
        let Some((salt, digest)) = rest.split_once('$') else {
            return false;
        };
        let (Ok(salt), Ok(digest)) = (hex::decode(salt), hex::decode(digest)) else {
            return false;
        };
        return constant_time_eq(&sha256_salted(&salt, secret), &digest);
    }
    match PasswordHash::new(stored) {
        Ok(parsed) => Argon2::default()
            .verify_password(secret.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// Salt (16 bytes) and digest (32 bytes) of a generated secret's hash.
pub type Compact = [u8; 48];

/// The binary form of a `sha256$` hash as [`hash`] writes it, so the registry keeps 48 bytes
/// instead of a 104-character string; `None` for any other form (Argon2, or a spelling
/// [`expand`] would not give back exactly), which stays text.
pub fn compact(stored: &str) -> Option<Compact> {
    let (salt, digest) = stored.strip_prefix(SHA_PREFIX)?.split_once('$')?;
    let mut out = [0u8; 48];
    hex::decode_to_slice(salt, &mut out[..16]).ok()?;
    hex::decode_to_slice(digest, &mut out[16..]).ok()?;
    (expand(&out) == stored).then_some(out)
}

/// The stored text of a [`compact`] hash.
pub fn expand(c: &Compact) -> String {
    format!(
        "{SHA_PREFIX}{}${}",
        hex::encode(&c[..16]),
        hex::encode(&c[16..])
    )
}

/// Constant-time check of `secret` against a [`compact`] hash; no allocation.
pub fn verify_compact(c: &Compact, secret: &str) -> bool {
    constant_time_eq(&sha256_salted(&c[..16], secret), &c[16..])
}

/// A cheap fingerprint of a secret already verified against `stored`, so reconnect storms do not
/// pay Argon2 again. Bound to the stored hash, so it dies with a credential change.
pub fn fingerprint(stored: &str, secret: &str) -> [u8; 32] {
    sha256_salted(stored.as_bytes(), secret)
}

fn sha256_salted(salt: &[u8], secret: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(secret.as_bytes());
    h.finalize().into()
}

pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_verify_fast_and_differ() {
        let s = generate();
        assert_eq!(s.len(), 32);
        assert_ne!(s, generate());
        let h = hash(&s, true);
        assert!(!is_slow(&h));
        assert!(verify(&h, &s));
        assert!(!verify(&h, "wrong"));
        assert_ne!(h, hash(&s, true), "salted");
    }

    #[test]
    fn chosen_secrets_use_argon2() {
        let h = hash("hunter2", false);
        assert!(h.starts_with("$argon2id$"));
        assert!(is_slow(&h));
        assert!(verify(&h, "hunter2"));
        assert!(!verify(&h, "hunter3"));
    }

    #[test]
    fn generated_hashes_compact_and_expand_exactly() {
        let s = generate();
        let h = hash(&s, true);
        let c = compact(&h).unwrap();
        assert_eq!(expand(&c), h);
        assert!(verify_compact(&c, &s));
        assert!(!verify_compact(&c, "wrong"));
        // Anything else stays text: Argon2, upper-case hex, wrong lengths.
        assert!(compact(&hash("hunter2", false)).is_none());
        assert!(compact(&h.to_uppercase().replace("SHA256", "sha256")).is_none());
        assert!(compact("sha256$00$00").is_none());
    }

    #[test]
    fn garbage_hash_never_verifies() {
        assert!(!verify("sha256$zz$zz", ""));
        assert!(!verify("", ""));
    }
}

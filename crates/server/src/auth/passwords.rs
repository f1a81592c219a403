//! Password hashing (argon2id) and verification.

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use corral_model::ApiError;

/// A hash to verify unknown users' passwords against, so that a name that
/// does not exist costs as much time as one that does.
pub fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| hash_password(&uuid::Uuid::new_v4().to_string()).unwrap_or_default())
}

/// Hashes a password with argon2id and a random salt (PHC string).
pub fn hash_password(pwd: &str) -> Result<String, ApiError> {
    // 16 random bytes from the OS (uuid v4 draws them from getrandom).
    let salt = SaltString::encode_b64(uuid::Uuid::new_v4().as_bytes())
        .map_err(|e| ApiError::internal(format!("password salt: {e}")))?;
    Argon2::default()
        .hash_password(pwd.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ApiError::internal(format!("password hashing failed: {e}")))
}

pub fn verify_password(pwd: &str, phc: &str) -> bool {
    verify_in(pwd, phc, &mut Vec::new())
}

/// [`verify_password`] with argon2's working memory (19 MiB with the
/// default parameters) supplied by the caller, so that logins reuse a few
/// buffers instead of mapping fresh memory each time.
pub(crate) fn verify_in(pwd: &str, phc: &str, memory: &mut Vec<argon2::Block>) -> bool {
    let mut check = || -> Option<bool> {
        let h = PasswordHash::new(phc).ok()?;
        let params = argon2::Params::try_from(&h).ok()?;
        let algorithm = argon2::Algorithm::try_from(h.algorithm).ok()?;
        let version = argon2::Version::try_from(h.version.unwrap_or(0x13)).ok()?;
        let expected = h.hash?;
        let mut salt = [0u8; 64];
        let salt = h.salt?.decode_b64(&mut salt).ok()?;
        let mut out = vec![0u8; expected.len()];
        memory.resize(params.block_count(), argon2::Block::default());
        Argon2::new(algorithm, version, params)
            .hash_password_into_with_memory(pwd.as_bytes(), salt, &mut out, &mut memory[..])
            .ok()?;
        // Output's comparison takes constant time.
        Some(argon2::password_hash::Output::new(&out).ok()? == expected)
    };
    check().unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::password_hash::PasswordVerifier;
    use argon2::{Argon2, PasswordHash};

    #[test]
    fn pooled_verification_agrees_with_the_reference() {
        let phc = hash_password("right horse").expect("hashes");
        let reference = |p: &str| {
            Argon2::default()
                .verify_password(p.as_bytes(), &PasswordHash::new(&phc).expect("parses"))
                .is_ok()
        };
        let mut mem = Vec::new();
        for p in ["right horse", "wrong horse", "", "right horse "] {
            assert_eq!(verify_in(p, &phc, &mut mem), reference(p), "{p:?}");
        }
        assert!(!verify_in("x", "not a hash", &mut mem));
    }
}

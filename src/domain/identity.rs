//! Stable, non-reversible names for secrets: what logs, metrics, Redis and the
//! admin API show instead of a key or a token.

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The first 12 hex digits of the SHA-256 of the secret. Stable across
/// replicas and restarts; an operator can compute it with
/// `printf %s "$KEY" | sha256sum | cut -c1-12`.
pub fn short_id(secret: &SecretString) -> String {
    let digest = Sha256::digest(secret.expose_secret().as_bytes());
    hex::encode(&digest[..6])
}

/// `AIza…wxyz`: enough for a human to tell keys apart, too little to use.
pub fn mask(secret: &SecretString) -> String {
    let s = secret.expose_secret();
    let chars: Vec<char> = s.chars().collect();
    if chars.len() < 12 {
        return "…".to_string();
    }
    let head: String = chars[..4].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}…{tail}")
}

/// A client token the gateway accepts, known by its id everywhere but the
/// comparison itself.
#[derive(Debug, Clone)]
pub struct ClientToken {
    pub id: String,
    pub secret: SecretString,
}

impl ClientToken {
    pub fn new(secret: SecretString) -> Self {
        Self {
            id: short_id(&secret),
            secret,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_is_twelve_hex_of_sha256() {
        let id = short_id(&SecretString::from("abc"));
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(id, "ba7816bf8f01");
    }

    #[test]
    fn mask_keeps_four_each_side_and_hides_short_values() {
        let m = mask(&SecretString::from("AIzaSyExampleExampleExamplewxyz"));
        assert_eq!(m, "AIza…wxyz");
        assert_eq!(mask(&SecretString::from("short")), "…");
    }
}

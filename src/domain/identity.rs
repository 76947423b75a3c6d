//! Stable, non-reversible names for secrets: what logs, metrics, Redis and the
//! admin API show instead of a key or a token.

use secrecy::{ExposeSecret, SecretString};

/// Defined with the parsers of secrets, which label tokens by it.
pub use crate::secrets::short_id;

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
    fn mask_keeps_four_each_side_and_hides_short_values() {
        let m = mask(&SecretString::from("AIzaSyExampleExampleExamplewxyz"));
        assert_eq!(m, "AIza…wxyz");
        assert_eq!(mask(&SecretString::from("short")), "…");
    }
}

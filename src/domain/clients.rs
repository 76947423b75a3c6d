//! The client tokens and the admin token in force, and the check of a
//! presented token against them. Where a request carries its token is the
//! HTTP layer's to read (its `auth` module).

use std::sync::{Arc, RwLock};

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::domain::identity::ClientToken;

/// Why a presented client token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("no client token was presented")]
    Missing,
    #[error("the client token is not one in force")]
    Unknown,
}

/// The client tokens and the admin token in force. Both can change while
/// the gateway runs (reloaded token files): a revoked token is refused from
/// the next request on.
pub struct Auth {
    tokens: RwLock<Arc<TokenSet>>,
    admin: RwLock<Option<Admin>>,
}

struct TokenSet {
    tokens: Vec<(Arc<ClientToken>, [u8; 32])>,
    digest: String,
    /// Token id → label (`label=token` entries), for operators' pages.
    labels: Vec<(String, String)>,
}

impl TokenSet {
    fn new(tokens: &[SecretString], labels: Vec<(String, String)>) -> Self {
        let tokens: Vec<(Arc<ClientToken>, [u8; 32])> = tokens
            .iter()
            .map(|t| {
                (
                    Arc::new(ClientToken::new(t.clone())),
                    digest(t.expose_secret()),
                )
            })
            .collect();
        let ids: Vec<String> = tokens.iter().map(|(t, _)| t.id.clone()).collect();
        Self {
            digest: crate::domain::keys::set_digest(&ids),
            tokens,
            labels,
        }
    }
}

#[derive(Clone)]
struct Admin {
    digest: [u8; 32],
    /// Which admin token is in force, as admin page sessions record it.
    generation: String,
}

impl Admin {
    fn new(token: &SecretString) -> Self {
        Self {
            digest: digest(token.expose_secret()),
            generation: generation(token.expose_secret()),
        }
    }
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Which admin token is in force, as admin page sessions record it (a
/// digest, never the token).
pub fn generation(admin_token: &str) -> String {
    let d = Sha256::digest(format!("gb-admin-generation:{admin_token}").as_bytes());
    hex::encode(d)[..24].to_string()
}

fn read<T: Clone>(lock: &RwLock<T>) -> T {
    match lock.read() {
        Ok(v) => v.clone(),
        Err(poisoned) => poisoned.into_inner().clone(),
    }
}

fn write<T>(lock: &RwLock<T>, value: T) {
    match lock.write() {
        Ok(mut v) => *v = value,
        Err(poisoned) => *poisoned.into_inner() = value,
    }
}

impl Auth {
    pub fn new(
        tokens: &[SecretString],
        labels: Vec<(String, String)>,
        admin: Option<&SecretString>,
    ) -> Self {
        Self {
            tokens: RwLock::new(Arc::new(TokenSet::new(tokens, labels))),
            admin: RwLock::new(admin.map(Admin::new)),
        }
    }

    /// Puts a new set of client tokens in place; returns (before, after)
    /// counts.
    pub fn replace_tokens(
        &self,
        tokens: &[SecretString],
        labels: Vec<(String, String)>,
    ) -> (usize, usize) {
        let next = Arc::new(TokenSet::new(tokens, labels));
        let before = read(&self.tokens).tokens.len();
        let after = next.tokens.len();
        write(&self.tokens, next);
        (before, after)
    }

    /// Puts a new admin token in place (page sessions of the old one end).
    pub fn replace_admin(&self, admin: Option<&SecretString>) {
        write(&self.admin, admin.map(Admin::new));
    }

    /// The label a client token was given, if any.
    /// The ids of the client tokens in force.
    pub fn token_ids(&self) -> Vec<String> {
        read(&self.tokens)
            .tokens
            .iter()
            .map(|(t, _)| t.id.clone())
            .collect()
    }

    pub fn label_of(&self, token_id: &str) -> Option<String> {
        read(&self.tokens)
            .labels
            .iter()
            .find(|(id, _)| id == token_id)
            .map(|(_, label)| label.clone())
    }

    /// A digest of the client token ids in force.
    pub fn tokens_digest(&self) -> String {
        read(&self.tokens).digest.clone()
    }

    /// Which admin token is in force (a digest), while one is.
    pub fn admin_generation(&self) -> Option<String> {
        read(&self.admin).map(|a| a.generation)
    }

    /// Checks a presented token in constant time against every client token
    /// (digests have one length, so not even the length leaks).
    pub fn verify(&self, presented: Option<&str>) -> Result<Arc<ClientToken>, TokenError> {
        let presented = presented
            .filter(|p| !p.is_empty())
            .ok_or(TokenError::Missing)?;
        let d = digest(presented);
        let set = read(&self.tokens);
        let mut found = None;
        for (token, td) in &set.tokens {
            if bool::from(td.ct_eq(&d)) {
                found = Some(token.clone());
            }
        }
        found.ok_or(TokenError::Unknown)
    }

    /// Whether the presented token is the admin token (never a client token).
    pub fn is_admin(&self, presented: Option<&str>) -> bool {
        match (read(&self.admin), presented) {
            (Some(admin), Some(p)) => bool::from(admin.digest.ct_eq(&digest(p))),
            _ => false,
        }
    }

    pub fn admin_enabled(&self) -> bool {
        read(&self.admin).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::SecretString;

    fn auth() -> Auth {
        Auth::new(
            &[SecretString::from("tok-a"), SecretString::from("tok-b")],
            Vec::new(),
            Some(&SecretString::from("adm")),
        )
    }

    #[test]
    fn a_token_in_force_is_accepted() {
        let a = auth();
        assert!(a.verify(Some("tok-b")).is_ok());
        assert!(a.verify(Some("tok-a")).is_ok());
    }

    #[test]
    fn missing_and_unknown_tokens_are_told_apart() {
        let a = auth();
        assert_eq!(a.verify(None).unwrap_err(), TokenError::Missing);
        assert_eq!(a.verify(Some("")).unwrap_err(), TokenError::Missing);
        assert_eq!(a.verify(Some("nope")).unwrap_err(), TokenError::Unknown);
        assert_eq!(a.verify(Some("adm")).unwrap_err(), TokenError::Unknown);
        assert!(a.is_admin(Some("adm")));
        assert!(!a.is_admin(Some("tok-a")));
    }

    #[test]
    fn the_admin_generation_is_the_one_page_sessions_record() {
        assert_eq!(generation("adm").len(), 24);
        assert_ne!(generation("adm"), generation("adm2"));
        assert!(!generation("adm").contains("adm"));
    }
}

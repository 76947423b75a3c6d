//! `clients`: the tokens clients present to the gateway.

use secrecy::SecretString;

use super::raw::Raw;
use super::{err, SecretFile, SettingsError};
use crate::secrets::{dedup as dedup_secrets, parse_tokens, split_labels};

/// The tokens clients present to the gateway.
#[derive(Debug, Clone)]
pub struct Clients {
    /// `GB_AUTH_TOKENS` or the lines of `GB_AUTH_TOKENS_FILE`, labels
    /// removed, deduplicated.
    pub tokens: Vec<SecretString>,
    /// `GB_AUTH_TOKENS_FILE`, re-read while running.
    pub file: Option<SecretFile>,
    /// Client token id → the label written before it (`label=token`): what
    /// the status page shows for the token.
    pub labels: Vec<(String, String)>,
}

impl Clients {
    pub const VARS: &'static [&'static str] = &["GB_AUTH_TOKENS", "GB_AUTH_TOKENS_FILE"];

    pub(super) fn load(raw: &Raw) -> Result<Self, SettingsError> {
        let (file, (mut tokens, labels)) =
            match raw.file_of("GB_AUTH_TOKENS", "GB_AUTH_TOKENS_FILE")? {
                Some(path) => {
                    let (file, text) = SecretFile::read("GB_AUTH_TOKENS_FILE", &path)?;
                    let parsed = parse_tokens(&text).map_err(|p| err("GB_AUTH_TOKENS_FILE", p))?;
                    (Some(file), parsed)
                }
                None => {
                    let mut tokens = raw.list("GB_AUTH_TOKENS");
                    let labels = split_labels(&mut tokens);
                    (None, (tokens, labels))
                }
            };
        dedup_secrets(&mut tokens);
        if tokens.is_empty() {
            return Err(err(
                "GB_AUTH_TOKENS",
                "at least one client token is required (or GB_AUTH_TOKENS_FILE)",
            ));
        }
        Ok(Clients {
            tokens,
            file,
            labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::load_from;
    use crate::settings::testing::env;

    #[test]
    fn token_labels_are_split_off_and_never_kept_with_the_token() {
        use secrecy::ExposeSecret;
        let s = load_from(env(&[
            ("GB_API_KEYS", "k1"),
            (
                "GB_AUTH_TOKENS",
                "alice=tok-a,tok-b,padded==,bad label=tok-c",
            ),
        ]))
        .unwrap();
        let tokens: Vec<&str> = s
            .clients
            .tokens
            .iter()
            .map(ExposeSecret::expose_secret)
            .collect();
        assert_eq!(tokens, ["tok-a", "tok-b", "padded==", "bad label=tok-c"]);
        assert_eq!(
            s.clients.labels,
            vec![(
                crate::secrets::short_id(&SecretString::from("tok-a")),
                "alice".to_string()
            )]
        );
    }

    #[test]
    fn missing_tokens_name_the_variable() {
        let e = load_from(env(&[("GB_API_KEYS", "k1")])).unwrap_err();
        assert_eq!(e.var, "GB_AUTH_TOKENS");
    }
}

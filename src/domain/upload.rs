//! Resumable upload sessions handed out by the gateway: the record that lets
//! any replica forward a chunk to the right upstream session.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::state::{StateStore, StoreError};

const NS: &str = crate::state::keyspace::ns::UPLOAD;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UploadRecord {
    /// Key id the upload was started with (and the file will belong to).
    pub key: String,
    /// Google's upload URL (carries Google's own upload id, never a key).
    pub url: String,
    pub session: Option<String>,
    /// Token id of the client that started it.
    pub owner: String,
}

/// A new unguessable upload id: 256 random bits, hex.
pub fn new_upload_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(hex::encode(bytes))
}

/// Upload ids the gateway hands out: 64 lower-case hex digits.
pub fn valid_upload_id(id: &str) -> bool {
    id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `X-Goog-Upload-Command`, parsed as a token list: `upload,finalize` and
/// `upload, finalize` are the same.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "one flag per command the header may combine"
)]
pub struct Commands {
    pub start: bool,
    pub upload: bool,
    pub finalize: bool,
    pub query: bool,
    pub cancel: bool,
}

impl Commands {
    pub fn parse(raw: &str) -> Result<Self, String> {
        let mut c = Commands::default();
        for token in raw.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match token.to_ascii_lowercase().as_str() {
                "start" => c.start = true,
                "upload" => c.upload = true,
                "finalize" => c.finalize = true,
                "query" => c.query = true,
                "cancel" => c.cancel = true,
                _ => {
                    return Err(format!(
                        "unknown X-Goog-Upload-Command {:?}",
                        token.chars().take(32).collect::<String>()
                    ))
                }
            }
        }
        Ok(c)
    }
}

/// Removes any `key=` parameter from an upstream URL before it is stored.
pub fn strip_key_param(url: &str) -> String {
    match url.split_once('?') {
        None => url.to_string(),
        Some((base, query)) => {
            let kept: Vec<&str> = query
                .split('&')
                .filter(|p| !p.is_empty() && p.split('=').next() != Some("key"))
                .collect();
            if kept.is_empty() {
                base.to_string()
            } else {
                format!("{base}?{}", kept.join("&"))
            }
        }
    }
}

pub async fn save(
    store: &dyn StateStore,
    id: &str,
    record: &UploadRecord,
    ttl: Duration,
) -> Result<(), StoreError> {
    let value = serde_json::to_string(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.put(NS, id, &value, ttl).await
}

pub async fn load(store: &dyn StateStore, id: &str) -> Result<Option<UploadRecord>, StoreError> {
    Ok(store
        .get_many(NS, &[id.to_string()])
        .await?
        .into_iter()
        .next()
        .flatten()
        .and_then(|s| serde_json::from_str(&s).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_a_token_list() {
        let a = Commands::parse("upload,finalize").unwrap();
        let b = Commands::parse(" upload,  Finalize ").unwrap();
        assert_eq!(a, b);
        assert!(a.upload && a.finalize && !a.start);
        assert!(Commands::parse("upload, explode").is_err());
    }

    #[test]
    fn ids_are_long_and_random() {
        let a = new_upload_id().unwrap();
        let b = new_upload_id().unwrap();
        assert_ne!(a, b);
        assert!(valid_upload_id(&a));
        assert!(!valid_upload_id("abc"));
    }

    #[test]
    fn key_params_never_get_stored() {
        assert_eq!(
            strip_key_param("https://g/upload?upload_id=x&key=SECRET&upload_protocol=resumable"),
            "https://g/upload?upload_id=x&upload_protocol=resumable"
        );
        assert_eq!(
            strip_key_param("https://g/upload?key=S"),
            "https://g/upload"
        );
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn command_parsing_is_total(raw in ".{0,100}") {
                let _ = Commands::parse(&raw);
            }

            #[test]
            fn spacing_and_case_do_not_matter(tokens in proptest::sample::subsequence(vec!["start", "upload", "finalize", "query", "cancel"], 1..5), sep in "[ ]{0,2},[ ]{0,2}", upper in any::<bool>()) {
                let joined = tokens.join(&sep);
                let raw = if upper { joined.to_uppercase() } else { joined };
                let c = Commands::parse(&raw).expect("valid tokens");
                prop_assert_eq!(c.start, tokens.contains(&"start"));
                prop_assert_eq!(c.upload, tokens.contains(&"upload"));
                prop_assert_eq!(c.finalize, tokens.contains(&"finalize"));
                prop_assert_eq!(c.query, tokens.contains(&"query"));
            }

            #[test]
            fn stored_urls_never_keep_a_key(base in "https://[a-z.]{1,20}/upload", params in proptest::collection::vec(("[a-z_]{1,8}", "[A-Za-z0-9%]{0,12}"), 0..5), key in "[A-Za-z0-9]{1,20}") {
                let mut pairs: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
                pairs.push(format!("key={key}"));
                let url = format!("{base}?{}", pairs.join("&"));
                let stripped = strip_key_param(&url);
                let query = stripped.split_once('?').map_or("", |(_, q)| q);
                prop_assert!(query.split('&').all(|p| !p.starts_with("key=") && p != "key"));
            }
        }
    }
}

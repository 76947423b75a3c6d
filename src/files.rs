//! File ownership: which key owns each Gemini file, and which client token
//! uploaded it. A file is usable only with the key that uploaded it.

use std::collections::BTreeSet;
use std::time::Duration;

use memchr::memmem;
use serde::{Deserialize, Serialize};

use crate::store::{now_ms, StateStore, StoreError};

const NS: &str = "file";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRecord {
    /// Key id of the owner key.
    pub key: String,
    /// Token id of the client that uploaded it.
    pub owner: String,
}

/// `[a-z0-9-]{1,40}`: the id part of a Gemini file name.
pub fn valid_file_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 40
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `files/abc`, `https://…/v1beta/files/abc`, `…/files/abc?x` → `files/abc`.
pub fn file_name_from_uri(uri: &str) -> Option<String> {
    let at = uri.rfind("files/")?;
    let before = &uri[..at];
    if !(before.is_empty() || before.ends_with('/')) {
        return None;
    }
    let rest = &uri[at + "files/".len()..];
    let id = rest.split(['?', '#', '/', ':']).next().unwrap_or("");
    valid_file_id(id).then(|| format!("files/{id}"))
}

/// JSON field names whose string value names a file: `fileData.fileUri` in
/// both spellings, and `src` of batch requests.
const FIELDS: [&[u8]; 3] = [b"\"fileUri\"", b"\"file_uri\"", b"\"src\""];

/// Every file a request body references, deduplicated, in name order.
///
/// A linear scan for the field names, not a JSON parse: it costs one pass
/// over the bytes whatever the body is. An occurrence inside a JSON string
/// (`\"fileUri\"`) is skipped, since its quote is escaped.
pub fn scan_refs(body: &[u8]) -> Vec<String> {
    let mut found = BTreeSet::new();
    for field in FIELDS {
        for at in memmem::find_iter(body, field) {
            if escaped(body, at) {
                continue;
            }
            if let Some(value) = string_value_after(body, at + field.len()) {
                if let Some(name) = file_name_from_uri(&value) {
                    found.insert(name);
                }
            }
        }
    }
    found.into_iter().collect()
}

fn escaped(body: &[u8], quote_at: usize) -> bool {
    let backslashes = body[..quote_at]
        .iter()
        .rev()
        .take_while(|b| **b == b'\\')
        .count();
    backslashes % 2 == 1
}

/// The JSON string that follows `: ` at `pos`, with `\/` unescaped. Values
/// longer than a URI could reasonably be are ignored.
fn string_value_after(body: &[u8], mut pos: usize) -> Option<String> {
    let skip_ws = |pos: &mut usize| {
        while body.get(*pos).is_some_and(|b| b.is_ascii_whitespace()) {
            *pos += 1;
        }
    };
    skip_ws(&mut pos);
    if body.get(pos) != Some(&b':') {
        return None;
    }
    pos += 1;
    skip_ws(&mut pos);
    if body.get(pos) != Some(&b'"') {
        return None;
    }
    pos += 1;
    let mut out = Vec::new();
    while let Some(&b) = body.get(pos) {
        match b {
            b'"' => return String::from_utf8(out).ok(),
            b'\\' => {
                let next = *body.get(pos + 1)?;
                out.push(if next == b'/' { b'/' } else { next });
                pos += 2;
            }
            _ => {
                out.push(b);
                pos += 1;
            }
        }
        if out.len() > 2048 {
            return None;
        }
    }
    None
}

/// The owner records of several files, in order; `None` for files the
/// gateway does not know.
pub async fn owners(
    store: &dyn StateStore,
    names: &[String],
) -> Result<Vec<Option<FileRecord>>, StoreError> {
    let raw = store.get_many(NS, names).await?;
    Ok(raw
        .into_iter()
        .map(|v| v.and_then(|s| serde_json::from_str(&s).ok()))
        .collect())
}

pub async fn owner(store: &dyn StateStore, name: &str) -> Result<Option<FileRecord>, StoreError> {
    Ok(owners(store, &[name.to_string()])
        .await?
        .into_iter()
        .next()
        .flatten())
}

fn token_index(token_id: &str) -> String {
    format!("token-files:{token_id}")
}

/// Records that `name` is owned by `record.key` and was uploaded by
/// `record.owner`.
pub async fn remember(
    store: &dyn StateStore,
    name: &str,
    record: &FileRecord,
    ttl: Duration,
) -> Result<(), StoreError> {
    let value = serde_json::to_string(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    store.put(NS, name, &value, ttl).await?;
    store
        .index_add(&token_index(&record.owner), name, ttl, now_ms())
        .await
}

pub async fn forget(store: &dyn StateStore, name: &str, owner: &str) -> Result<(), StoreError> {
    store.delete(NS, name).await?;
    store.index_remove(&token_index(owner), name).await
}

/// The files a client token uploaded that are still alive, newest first.
pub async fn of_token(store: &dyn StateStore, token_id: &str) -> Result<Vec<String>, StoreError> {
    store.index_members(&token_index(token_id), now_ms()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_both_spellings_full_uris_and_bare_names() {
        let body = br#"{"contents":[{"parts":[
            {"fileData":{"fileUri":"https://generativelanguage.googleapis.com/v1beta/files/abc-123","mimeType":"text/plain"}},
            {"file_data":{"file_uri" : "files/def456"}},
            {"fileData":{"fileUri":"https:\/\/x\/v1\/files\/ghi"}},
            {"text":"see \"fileUri\":\"files/nope\" in text"}]}]}"#;
        assert_eq!(
            scan_refs(body),
            vec!["files/abc-123", "files/def456", "files/ghi"]
        );
    }

    #[test]
    fn batch_src_counts_and_garbage_is_ignored() {
        assert_eq!(
            scan_refs(br#"{"src":"files/batch-in"}"#),
            vec!["files/batch-in"]
        );
        assert!(scan_refs(br#"{"fileUri": 12}"#).is_empty());
        assert!(scan_refs(br#"{"fileUri":"files/UPPER"}"#).is_empty());
        assert!(scan_refs(br#"{"fileUri":"notfiles/abc"}"#).is_empty());
        assert!(scan_refs(b"\xff\xfe\"fileUri\":\"files/a").is_empty());
    }

    #[test]
    fn file_ids_are_checked() {
        assert!(valid_file_id("abc-123"));
        assert!(!valid_file_id(""));
        assert!(!valid_file_id("../x"));
        assert!(!valid_file_id(&"a".repeat(41)));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn scanning_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
                for name in scan_refs(&body) {
                    prop_assert!(name.starts_with("files/") && valid_file_id(&name[6..]));
                }
            }

            #[test]
            fn every_referenced_file_is_found(
                ids in proptest::collection::vec("[a-z0-9-]{1,40}", 1..6),
                full in any::<bool>(),
                snake in any::<bool>(),
                space in "[ \t\n]{0,3}",
            ) {
                let field = if snake { "file_uri" } else { "fileUri" };
                let parts: Vec<String> = ids.iter().map(|id| {
                    let uri = if full { format!("https://generativelanguage.googleapis.com/v1beta/files/{id}") } else { format!("files/{id}") };
                    format!(r#"{{"fileData":{{"{field}"{space}:{space}"{uri}","mimeType":"text/plain"}}}}"#)
                }).collect();
                let body = format!(r#"{{"contents":[{{"parts":[{}]}}]}}"#, parts.join(","));
                let mut want: Vec<String> = ids.iter().map(|id| format!("files/{id}")).collect();
                want.sort();
                want.dedup();
                prop_assert_eq!(scan_refs(body.as_bytes()), want);
            }

            #[test]
            fn file_names_from_uris_are_always_valid(uri in ".{0,200}") {
                if let Some(name) = file_name_from_uri(&uri) {
                    prop_assert!(valid_file_id(name.trim_start_matches("files/")));
                }
            }
        }
    }
}

//! File ownership: which key owns each Gemini file, and which client token
//! uploaded it. A file is usable only with the key that uploaded it; files
//! are one case of the per-project resources in [`crate::domain::resources`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::domain::resources::{self, Kind, OwnerRecord};
use crate::state::{StateStore, StoreError};

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
    resources::file_name_from_uri(uri)
}

/// Every file a request body references, deduplicated, in name order (the
/// files among [`resources::scan_refs`]).
pub fn scan_refs(body: &[u8]) -> Vec<String> {
    resources::scan_refs(body)
        .into_iter()
        .filter(|n| n.starts_with("files/"))
        .collect()
}

impl From<OwnerRecord> for FileRecord {
    fn from(r: OwnerRecord) -> Self {
        FileRecord {
            key: r.key,
            owner: r.owner,
        }
    }
}

/// The owner records of several files, in order; `None` for files the
/// gateway does not know.
pub async fn owners(
    store: &dyn StateStore,
    names: &[String],
) -> Result<Vec<Option<FileRecord>>, StoreError> {
    Ok(resources::owners(store, names)
        .await?
        .into_iter()
        .map(|r| r.map(FileRecord::from))
        .collect())
}

pub async fn owner(store: &dyn StateStore, name: &str) -> Result<Option<FileRecord>, StoreError> {
    Ok(resources::owner(store, name).await?.map(FileRecord::from))
}

/// Records that `name` is owned by `record.key` and was uploaded by
/// `record.owner`.
pub async fn remember(
    store: &dyn StateStore,
    name: &str,
    record: &FileRecord,
    ttl: Duration,
) -> Result<(), StoreError> {
    resources::remember(
        store,
        name,
        &OwnerRecord::new(&record.key, &record.owner),
        ttl,
    )
    .await
}

pub async fn forget(store: &dyn StateStore, name: &str, owner: &str) -> Result<(), StoreError> {
    resources::forget(store, name, owner).await
}

/// The files a client token uploaded that are still alive, newest first.
pub async fn of_token(store: &dyn StateStore, token_id: &str) -> Result<Vec<String>, StoreError> {
    resources::of_token(store, Kind::File, token_id).await
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
    fn owner_records_read_both_ways_across_layouts_1_and_2() {
        // Layout 1 wrote `{key, owner}`; layout 2 adds `created`.
        let old: OwnerRecord = serde_json::from_str(r#"{"key":"k1","owner":"t1"}"#).unwrap();
        assert_eq!(
            (old.key.as_str(), old.owner.as_str(), old.created),
            ("k1", "t1", 0)
        );
        let new = serde_json::to_string(&OwnerRecord::new("k2", "t2")).unwrap();
        assert!(new.contains("created"));
        let read_by_layout_1: FileRecord = serde_json::from_str(&new).unwrap();
        assert_eq!(
            read_by_layout_1,
            FileRecord {
                key: "k2".into(),
                owner: "t2".into()
            }
        );
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

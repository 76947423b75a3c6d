//! The resource names a JSON body names, found in one pass over its quote
//! characters instead of a parse: a request that names nothing costs the
//! same whatever its size, and no store round trip.

use std::collections::BTreeSet;

use memchr::{memchr_iter, memmem};

use crate::domain::resources::valid_id;

/// What a JSON field's value names.
#[derive(Clone, Copy)]
enum Names {
    /// A file, as a bare name or a URI.
    File,
    /// A `cachedContents/…` name.
    Cache,
    /// An array of `fileSearchStores/…` names.
    Stores,
}

/// The field names (without quotes) whose values name resources in
/// requests: both spellings that occur on the wire.
const REQUEST_FIELDS: [(&[u8], Names); 9] = [
    (b"fileUri", Names::File),
    (b"file_uri", Names::File),
    (b"src", Names::File),
    (b"fileName", Names::File),
    (b"file_name", Names::File),
    (b"cachedContent", Names::Cache),
    (b"cached_content", Names::Cache),
    (b"fileSearchStoreNames", Names::Stores),
    (b"file_search_store_names", Names::Stores),
];

/// Fields of batch and operation answers that name the files they produced.
const PRODUCED_FIELDS: [(&[u8], Names); 3] = [
    (b"responsesFile", Names::File),
    (b"uri", Names::File),
    (b"fileUri", Names::File),
];

/// Every resource a request body names, deduplicated, in name order.
///
/// One pass over the body's quote characters, not a JSON parse: it costs
/// the same whatever the body is. An occurrence inside a JSON string
/// (`\"fileUri\"`) is skipped, since its quote is escaped.
pub fn scan_refs(body: &[u8]) -> Vec<String> {
    scan(body, &REQUEST_FIELDS)
}

/// The files a batch or operation answer names as its output.
pub fn produced_files(body: &[u8]) -> Vec<String> {
    scan(body, &PRODUCED_FIELDS)
}

fn scan(body: &[u8], fields: &[(&[u8], Names)]) -> Vec<String> {
    let mut found = BTreeSet::new();
    for at in memchr_iter(b'"', body) {
        let rest = &body[at + 1..];
        let Some(&(field, names)) = fields
            .iter()
            .find(|(f, _)| rest.starts_with(f) && rest.get(f.len()) == Some(&b'"'))
        else {
            continue;
        };
        if escaped(body, at) {
            continue;
        }
        let value_at = at + 1 + field.len() + 1;
        match names {
            Names::File => {
                if let Some(name) =
                    string_value_after(body, value_at).and_then(|v| file_name_from_uri(&v))
                {
                    found.insert(name);
                }
            }
            Names::Cache => {
                if let Some(name) =
                    string_value_after(body, value_at).and_then(|v| name_in("cachedContents", &v))
                {
                    found.insert(name);
                }
            }
            Names::Stores => {
                for v in string_array_after(body, value_at) {
                    if let Some(name) = name_in("fileSearchStores", &v) {
                        found.insert(name);
                    }
                }
            }
        }
    }
    found.into_iter().collect()
}

/// `files/abc`, `https://…/v1beta/files/abc`, `…/files/abc:download?x` →
/// `files/abc`.
pub fn file_name_from_uri(uri: &str) -> Option<String> {
    let at = uri.rfind("files/")?;
    let before = &uri[..at];
    if !(before.is_empty() || before.ends_with('/')) {
        return None;
    }
    let rest = &uri[at + "files/".len()..];
    let id = rest.split(['?', '#', '/', ':']).next().unwrap_or("");
    crate::domain::files::valid_file_id(id).then(|| format!("files/{id}"))
}

/// `cachedContents/abc` (or a URL ending in it) → `cachedContents/abc`.
fn name_in(collection: &str, value: &str) -> Option<String> {
    let marker = format!("{collection}/");
    let at = memmem::rfind(value.as_bytes(), marker.as_bytes())?;
    let before = &value[..at];
    if !(before.is_empty() || before.ends_with('/')) {
        return None;
    }
    let id = &value[at + marker.len()..];
    valid_id(id).then(|| format!("{collection}/{id}"))
}

fn escaped(body: &[u8], quote_at: usize) -> bool {
    let backslashes = body[..quote_at]
        .iter()
        .rev()
        .take_while(|b| **b == b'\\')
        .count();
    backslashes % 2 == 1
}

fn skip_ws(body: &[u8], pos: &mut usize) {
    while body.get(*pos).is_some_and(u8::is_ascii_whitespace) {
        *pos += 1;
    }
}

/// The JSON string that follows `: ` at `pos`.
fn string_value_after(body: &[u8], mut pos: usize) -> Option<String> {
    skip_ws(body, &mut pos);
    if body.get(pos) != Some(&b':') {
        return None;
    }
    pos += 1;
    string_at(body, &mut pos)
}

/// The strings of the JSON array that follows `: ` at `pos` (at most 64;
/// anything but strings ends it).
fn string_array_after(body: &[u8], mut pos: usize) -> Vec<String> {
    let mut out = Vec::new();
    skip_ws(body, &mut pos);
    if body.get(pos) != Some(&b':') {
        return out;
    }
    pos += 1;
    skip_ws(body, &mut pos);
    if body.get(pos) != Some(&b'[') {
        return out;
    }
    pos += 1;
    while out.len() < 64 {
        let Some(s) = string_at(body, &mut pos) else {
            break;
        };
        out.push(s);
        skip_ws(body, &mut pos);
        if body.get(pos) != Some(&b',') {
            break;
        }
        pos += 1;
    }
    out
}

/// The JSON string at `pos` (after whitespace), with `\/` unescaped; `pos`
/// moves past it. Values longer than a name could be are ignored.
fn string_at(body: &[u8], pos: &mut usize) -> Option<String> {
    skip_ws(body, pos);
    if body.get(*pos) != Some(&b'"') {
        return None;
    }
    *pos += 1;
    let mut out = Vec::new();
    while let Some(&b) = body.get(*pos) {
        match b {
            b'"' => {
                *pos += 1;
                return String::from_utf8(out).ok();
            }
            b'\\' => {
                let next = *body.get(*pos + 1)?;
                out.push(if next == b'/' { b'/' } else { next });
                *pos += 2;
            }
            _ => {
                out.push(b);
                *pos += 1;
            }
        }
        if out.len() > 2048 {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_files_caches_and_stores_in_one_body() {
        let body = br#"{"contents":[{"parts":[
            {"fileData":{"fileUri":"https://generativelanguage.googleapis.com/v1beta/files/abc-123","mimeType":"text/plain"}},
            {"file_data":{"file_uri" : "files/def456"}},
            {"text":"see \"cachedContent\":\"cachedContents/nope\" in text"}]}],
            "cachedContent": "cachedContents/cache1",
            "tools":[{"fileSearch":{"fileSearchStoreNames":["fileSearchStores/s-1", "fileSearchStores/s-2"]}}]}"#;
        assert_eq!(
            scan_refs(body),
            vec![
                "cachedContents/cache1",
                "fileSearchStores/s-1",
                "fileSearchStores/s-2",
                "files/abc-123",
                "files/def456"
            ]
        );
    }

    #[test]
    fn openai_extra_body_and_batch_inputs_count() {
        let body =
            br#"{"model":"m","extra_body":{"google":{"cached_content":"cachedContents/xy"}}}"#;
        assert_eq!(scan_refs(body), vec!["cachedContents/xy"]);
        let batch = br#"{"batch":{"inputConfig":{"fileName":"files/in-1"}}}"#;
        assert_eq!(scan_refs(batch), vec!["files/in-1"]);
        let snake = br#"{"file_search_store_names": ["fileSearchStores/a"]}"#;
        assert_eq!(scan_refs(snake), vec!["fileSearchStores/a"]);
    }

    #[test]
    fn garbage_names_are_ignored() {
        assert!(scan_refs(br#"{"cachedContent":"cachedContents/a b"}"#).is_empty());
        assert!(scan_refs(br#"{"cachedContent":"cachedContents/../x"}"#).is_empty());
        assert!(scan_refs(br#"{"cachedContent":"xcachedContents/a"}"#).is_empty());
        assert!(scan_refs(br#"{"fileSearchStoreNames":"fileSearchStores/a"}"#).is_empty());
        assert!(scan_refs(br#"{"fileSearchStoreNames":[1,"fileSearchStores/a"]}"#).is_empty());
        assert!(scan_refs(b"\"cachedContent\":\"cachedContents/a").is_empty());
    }

    #[test]
    fn produced_files_of_batches_and_operations() {
        let batch = br#"{"metadata":{"output":{"responsesFile":"files/batch-out"}}}"#;
        assert_eq!(produced_files(batch), vec!["files/batch-out"]);
        let video = br#"{"response":{"generateVideoResponse":{"generatedSamples":[{"video":{"uri":"https://x/v1beta/files/vid-1:download?alt=media"}}]}}}"#;
        assert_eq!(produced_files(video), vec!["files/vid-1"]);
    }

    mod props {
        use super::super::*;
        use crate::domain::resources::Kind;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn scanning_arbitrary_bytes_never_panics(body in proptest::collection::vec(any::<u8>(), 0..2048)) {
                for name in scan_refs(&body) {
                    prop_assert!(Kind::of(&name).is_some());
                }
            }

            #[test]
            fn every_named_cache_and_store_is_found(
                cache in "[a-z0-9]{1,20}",
                stores in proptest::collection::vec("[a-z0-9-]{1,40}", 1..4),
                space in "[ \t\n]{0,3}",
            ) {
                let list: Vec<String> = stores.iter().map(|s| format!("\"fileSearchStores/{s}\"")).collect();
                let body = format!(
                    r#"{{"contents":[],"cachedContent"{space}:{space}"cachedContents/{cache}","tools":[{{"fileSearch":{{"fileSearchStoreNames"{space}:{space}[{}]}}}}]}}"#,
                    list.join(&format!(",{space}"))
                );
                let mut want: Vec<String> = stores.iter().map(|s| format!("fileSearchStores/{s}")).collect();
                want.push(format!("cachedContents/{cache}"));
                want.sort();
                want.dedup();
                prop_assert_eq!(scan_refs(body.as_bytes()), want);
            }
        }
    }
}

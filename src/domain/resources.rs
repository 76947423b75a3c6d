//! Per-project resources and the key that owns each one.
//!
//! A Gemini resource — a file, a context cache, a batch, a long-running
//! operation, a file search store — exists only in the project of the key
//! that created it; any other key gets 403/404 for it. So the gateway keeps
//! one owner record per resource name: the owner key id, the client token id
//! that created it, and when; with a TTL that fits the type. A resource is
//! visible only to the token that created it.
//!
//! Request bodies name resources in a few fields (`fileData.fileUri`,
//! `cachedContent`, `tools[].fileSearch.fileSearchStoreNames`, a batch's
//! `src`/`fileName`): [`scan_refs`] finds them in one pass over the bytes,
//! without parsing the JSON, so a request that names nothing costs no store
//! round trip.

use std::collections::BTreeSet;
use std::time::Duration;

use memchr::{memchr_iter, memmem};
use serde::{Deserialize, Serialize};

use crate::domain::keys::ApiKey;
use crate::gateway::Gateway;
use crate::settings::Settings;
use crate::state::keyspace::{index, ns};
use crate::state::{now_ms, IndexEntry, StateStore, StoreError};
use crate::upstream::client::Upstream;

/// The resource types that belong to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    CachedContent,
    Batch,
    /// A long-running operation (`operations/…` or `models/{m}/operations/…`).
    Operation,
    FileSearchStore,
    /// An ephemeral Live API token, recorded under a hash of itself.
    LiveToken,
}

/// An ephemeral token lives 30 minutes unless its creator says otherwise.
const LIVE_TOKEN_TTL: Duration = Duration::from_secs(30 * 60);

/// How long a batch's owner is remembered: Google keeps batch jobs and their
/// results for days after they finish.
const BATCH_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Generated media of long-running operations is kept two days.
const OPERATION_TTL: Duration = Duration::from_secs(2 * 24 * 3600);
/// File search stores live until they are deleted.
const STORE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// A cache whose expiry cannot be read is remembered this long (Google's
/// default cache TTL).
const CACHE_DEFAULT_TTL: Duration = Duration::from_secs(3600);

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::File,
        Kind::CachedContent,
        Kind::Batch,
        Kind::Operation,
        Kind::FileSearchStore,
        Kind::LiveToken,
    ];

    /// The collection segment of the type's names (`cachedContents/…`), and
    /// the field of its list answers.
    pub fn collection(self) -> &'static str {
        match self {
            Kind::File => "files",
            Kind::CachedContent => "cachedContents",
            Kind::Batch => "batches",
            Kind::Operation => "operations",
            Kind::FileSearchStore => "fileSearchStores",
            Kind::LiveToken => "auth_tokens",
        }
    }

    /// The type of a resource name, by its first segment.
    pub fn of(name: &str) -> Option<Kind> {
        if name.starts_with("models/") && name.contains("/operations/") {
            return Some(Kind::Operation);
        }
        let first = name.split('/').next()?;
        Kind::ALL.into_iter().find(|k| k.collection() == first)
    }

    /// The store namespace of its owner records. Files keep the namespace
    /// they always had, so replicas of earlier versions read them unchanged.
    fn ns(self) -> &'static str {
        match self {
            Kind::File => ns::FILE,
            _ => ns::RESOURCE,
        }
    }

    fn token_index(self, token_id: &str) -> String {
        match self {
            Kind::File => index::token_files(token_id),
            k => index::token_resources(k.collection(), token_id),
        }
    }

    /// How long an owner record lives when the resource itself does not say.
    pub fn ttl(self, settings: &Settings) -> Duration {
        match self {
            Kind::File => settings.sessions.file_ttl,
            Kind::CachedContent => CACHE_DEFAULT_TTL,
            Kind::Batch => BATCH_TTL,
            Kind::Operation => OPERATION_TTL,
            Kind::FileSearchStore => STORE_TTL,
            Kind::LiveToken => LIVE_TOKEN_TTL,
        }
    }
}

/// Who owns one resource.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OwnerRecord {
    /// Key id of the owner key.
    pub key: String,
    /// Token id of the client that created it.
    pub owner: String,
    /// When it was recorded (ms since the epoch); 0 in records written by
    /// earlier versions.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub created: u64,
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl OwnerRecord {
    pub fn new(key: &str, owner: &str) -> Self {
        Self {
            key: key.to_string(),
            owner: owner.to_string(),
            created: now_ms(),
        }
    }
}

/// The name an ephemeral Live token's owner is recorded under: a hash, since
/// the token itself is a credential.
pub fn live_token_name(token: &str) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "auth_tokens/{}",
        hex::encode(&Sha256::digest(token.as_bytes())[..12])
    )
}

/// `[A-Za-z0-9_-]{1,128}`: the id part of a resource name (Google's ids are
/// lower-case letters, digits and dashes; a little leeway costs nothing).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The owner records of several resources, in order; `None` for unknown
/// ones. One store read per type named.
pub async fn owners(
    store: &dyn StateStore,
    names: &[String],
) -> Result<Vec<Option<OwnerRecord>>, StoreError> {
    let mut out = vec![None; names.len()];
    for namespace in [ns::FILE, ns::RESOURCE] {
        let (at, group): (Vec<usize>, Vec<String>) = names
            .iter()
            .enumerate()
            .filter(|(_, n)| Kind::of(n).unwrap_or(Kind::File).ns() == namespace)
            .map(|(i, n)| (i, n.clone()))
            .unzip();
        if group.is_empty() {
            continue;
        }
        let raw = store.get_many(namespace, &group).await?;
        for (i, value) in at.into_iter().zip(raw) {
            out[i] = value.and_then(|s| serde_json::from_str(&s).ok());
        }
    }
    Ok(out)
}

pub async fn owner(store: &dyn StateStore, name: &str) -> Result<Option<OwnerRecord>, StoreError> {
    Ok(owners(store, &[name.to_string()])
        .await?
        .into_iter()
        .next()
        .flatten())
}

/// Records that `name` belongs to `record.key` and to the token
/// `record.owner`, for `ttl`.
pub async fn remember(
    store: &dyn StateStore,
    name: &str,
    record: &OwnerRecord,
    ttl: Duration,
) -> Result<(), StoreError> {
    let kind = Kind::of(name).unwrap_or(Kind::File);
    let value = serde_json::to_string(record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    let ttl = ttl.max(Duration::from_secs(1));
    store.put(kind.ns(), name, &value, ttl).await?;
    store
        .index_add(&kind.token_index(&record.owner), name, ttl, now_ms())
        .await
}

pub async fn forget(store: &dyn StateStore, name: &str, owner: &str) -> Result<(), StoreError> {
    let kind = Kind::of(name).unwrap_or(Kind::File);
    store.delete(kind.ns(), name).await?;
    store.index_remove(&kind.token_index(owner), name).await
}

/// The resources of one type a client token created that are still alive,
/// newest first.
pub async fn of_token(
    store: &dyn StateStore,
    kind: Kind,
    token_id: &str,
) -> Result<Vec<String>, StoreError> {
    store
        .index_members(&kind.token_index(token_id), now_ms())
        .await
}

/// One page of the resources of one type a client token created, newest
/// first, and the place the next page starts after (when there is one).
pub async fn page_of_token(
    store: &dyn StateStore,
    kind: Kind,
    token_id: &str,
    after: Option<&IndexEntry>,
    size: usize,
) -> Result<(Vec<String>, Option<IndexEntry>), StoreError> {
    let mut entries = store
        .index_page(&kind.token_index(token_id), now_ms(), after, size + 1)
        .await?;
    let next = if entries.len() > size {
        entries.truncate(size);
        entries.last().cloned()
    } else {
        None
    };
    Ok((entries.into_iter().map(|e| e.member).collect(), next))
}

/// The page token of a place in a token's list: the entry's expiry and its
/// name, opaque to clients. Files that arrive later sort before it, so the
/// pages after it neither repeat nor skip one.
pub fn page_token(place: &IndexEntry) -> String {
    format!(
        "{}.{}",
        place.expires_ms,
        hex::encode(place.member.as_bytes())
    )
}

/// The place a page token names, if it is one this gateway wrote for a list
/// of `kind`.
pub fn parse_page_token(token: &str, kind: Kind) -> Option<IndexEntry> {
    let (expires, member) = token.split_once('.')?;
    if expires.is_empty() || !expires.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let member = String::from_utf8(hex::decode(member).ok()?).ok()?;
    let id = member.rsplit('/').next()?;
    (Kind::of(&member) == Some(kind) && valid_id(id)).then_some(IndexEntry {
        member,
        expires_ms: expires.parse().ok()?,
    })
}

/// Why the resources a body names cannot decide its key.
#[derive(Debug)]
pub enum RefError {
    Store(StoreError),
    /// Discovery of unknown owners was refused (over budget, or the token's
    /// lookup rate).
    Refused(crate::http::error::ApiError),
    /// The named resources belong to different keys (their names).
    Mixed(Vec<String>),
}

impl From<crate::domain::discovery::DiscoveryError> for RefError {
    fn from(e: crate::domain::discovery::DiscoveryError) -> Self {
        match e.refusal() {
            Some(refusal) => RefError::Refused(refusal),
            None => match e {
                crate::domain::discovery::DiscoveryError::Store(s) => RefError::Store(s),
                _ => RefError::Store(StoreError::Unavailable("discovery failed".into())),
            },
        }
    }
}

/// The key owning every resource `body` names, if it names any the gateway
/// knows (or can discover); an error when they belong to different keys.
pub async fn body_owner(
    gw: &Gateway,
    up: &Upstream,
    body: &[u8],
    token_id: &str,
) -> Result<Option<std::sync::Arc<ApiKey>>, RefError> {
    let refs = scan_refs(body);
    if refs.is_empty() {
        return Ok(None);
    }
    let mut records = owners(gw.store(), &refs).await.map_err(RefError::Store)?;
    let unknown: Vec<usize> = (0..refs.len()).filter(|i| records[*i].is_none()).collect();
    if !unknown.is_empty() {
        let names: Vec<String> = unknown.iter().map(|i| refs[*i].clone()).collect();
        let found = crate::domain::discovery::discover_many(gw, up, &names, token_id)
            .await
            .map_err(RefError::from)?;
        for (i, record) in unknown.into_iter().zip(found) {
            records[i] = record;
        }
    }
    let mut owned: Vec<(&str, &str)> = refs
        .iter()
        .zip(&records)
        .filter_map(|(name, rec)| rec.as_ref().map(|r| (name.as_str(), r.key.as_str())))
        .collect();
    owned.sort_by_key(|(_, key)| *key);
    let mut keys: Vec<&str> = owned.iter().map(|(_, k)| *k).collect();
    keys.dedup();
    match keys.as_slice() {
        [] => Ok(None),
        [one] => match gw.keys.by_id(one) {
            Some(key) => Ok(Some(key)),
            None => Err(RefError::Refused(gone_key(
                &owned.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            ))),
        },
        _ => Err(RefError::Mixed(
            owned.iter().map(|(n, _)| n.to_string()).collect(),
        )),
    }
}

/// The answer for resources whose owner key was removed from the gateway's
/// configuration: they exist only in that key's project, so no other key
/// can serve them, and the request is never sent.
pub fn gone_key(names: &[&str]) -> crate::http::error::ApiError {
    crate::http::error::ApiError::new(
        actix_web::http::StatusCode::GONE,
        format!(
            "{} belong to an API key that is no longer configured on the gateway: they \
             exist only in that key's project. Upload or create them again.",
            names.join(", ")
        ),
    )
}

/// The 409 message for resources on different keys.
/// `file_advice` says how files come to be split in the upload affinity
/// mode in force, and how to avoid it.
pub fn mixed_message(names: &[String], file_advice: &str) -> String {
    let all_files = names.iter().all(|n| n.starts_with("files/"));
    if all_files {
        format!(
            "The files {} were uploaded under different API keys and cannot be used in one \
             request. {file_advice}",
            names.join(", ")
        )
    } else {
        format!(
            "The resources {} were created under different API keys and cannot be used in one \
             request: each exists only in the project of the key that created it. Create \
             resources that are used together with one session id (X-Session-Id header or the \
             /session/{{id}} base URL), or from each other (a cache from the files it holds).",
            names.join(", ")
        )
    }
}

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

/// The time left until an RFC 3339 timestamp (`2026-01-02T03:04:05.123Z`,
/// any offset, fractions cut to the millisecond), or `None` when it cannot
/// be read.
pub fn ttl_until(expire_time: &str, now_ms: u64) -> Option<Duration> {
    let at = parse_rfc3339_ms(expire_time)?;
    Some(Duration::from_millis(at.saturating_sub(now_ms)))
}

/// Unix ms of an RFC 3339 timestamp; `None` for one that is malformed or
/// before 1970.
fn parse_rfc3339_ms(s: &str) -> Option<u64> {
    let at: jiff::Timestamp = s.parse().ok()?;
    u64::try_from(at.as_millisecond()).ok()
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

    #[test]
    fn page_tokens_round_trip_and_garbage_is_refused() {
        let place = IndexEntry {
            member: "files/abc-1".into(),
            expires_ms: 1_764_400_000_000,
        };
        let token = page_token(&place);
        assert_eq!(parse_page_token(&token, Kind::File), Some(place));
        assert_eq!(parse_page_token(&token, Kind::CachedContent), None);
        for bad in [
            "",
            "10",
            "zz",
            "1.zz",
            ".6669",
            "x.66696c65732f61",
            "-1.66696c65732f61",
        ] {
            assert_eq!(parse_page_token(bad, Kind::File), None, "{bad}");
        }
    }

    #[test]
    fn kinds_of_names() {
        assert_eq!(Kind::of("files/a"), Some(Kind::File));
        assert_eq!(Kind::of("cachedContents/a"), Some(Kind::CachedContent));
        assert_eq!(Kind::of("batches/a"), Some(Kind::Batch));
        assert_eq!(Kind::of("models/veo/operations/a"), Some(Kind::Operation));
        assert_eq!(Kind::of("fileSearchStores/a"), Some(Kind::FileSearchStore));
        assert_eq!(Kind::of("models/a"), None);
    }

    #[test]
    fn expiry_times_become_ttls() {
        let now = parse_rfc3339_ms("2026-03-01T00:00:00Z").unwrap();
        assert_eq!(now, 1_772_323_200_000);
        assert_eq!(
            ttl_until("2026-03-01T01:00:00.500Z", now),
            Some(Duration::from_millis(3_600_500))
        );
        assert_eq!(
            ttl_until("2026-03-01T00:10:00.123456789Z", now),
            Some(Duration::from_millis(600_123))
        );
        assert_eq!(ttl_until("2026-02-28T00:00:00Z", now), Some(Duration::ZERO));
        assert_eq!(ttl_until("yesterday", now), None);
        assert_eq!(ttl_until("2026-13-01T00:00:00Z", now), None);
    }

    #[test]
    fn expiry_times_with_offsets_and_fractions() {
        let now = parse_rfc3339_ms("2026-03-01T00:00:00Z").unwrap();
        for same in [
            "2026-03-01T01:00:00+01:00",
            "2026-02-28T16:00:00-08:00",
            "2026-03-01T05:30:00+05:30",
            "2026-03-01T00:00:00.000+00:00",
            "2026-03-01T00:00:00.0009Z",
        ] {
            assert_eq!(parse_rfc3339_ms(same), Some(now), "{same}");
        }
        assert_eq!(
            parse_rfc3339_ms("2026-03-01T00:00:00.999999999Z"),
            Some(now + 999)
        );
        assert_eq!(parse_rfc3339_ms("1969-12-31T23:59:59Z"), None);
    }

    #[test]
    fn malformed_expiry_times_are_refused() {
        for bad in [
            "",
            "Z",
            "2026-03-01",
            "2026-03-01T00:00:00",
            "2026-02-30T00:00:00Z",
            "2026-03-01T24:00:01Z",
            "2026-03-01T00:60:00Z",
            "2026-03-01T00:00:00+99:00",
            "2026-03-01T00:00:00.Z",
            "2026-03-01T00:00:00Zjunk",
            "\u{e9}2026-03-01T00:00:00Z",
            "2026-03-01T00:00:00\u{e9}",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad:?}");
        }
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn reading_arbitrary_expiry_times_never_panics(s in "\\PC{0,40}", now in any::<u64>()) {
                let _ = ttl_until(&s, now);
            }

            #[test]
            fn expiry_times_round_trip(ms in 0i64..253_402_300_799_999) {
                let text = jiff::Timestamp::from_millisecond(ms).unwrap().to_string();
                prop_assert_eq!(parse_rfc3339_ms(&text), Some(ms as u64));
            }

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

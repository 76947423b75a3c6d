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
//! `src`/`fileName`): [`scan_refs`] (`domain::scan::refs`) finds them in
//! one pass over the bytes, without parsing the JSON, so a request that
//! names nothing costs no store round trip.
//!
//! - [`kinds`]: the resource types and the TTL of each.
//! - [`owners`]: owner records, the per-token index, page tokens.
//! - [`pin`]: the key a body's resources decide.

mod kinds;
mod owners;
mod pin;

pub use crate::domain::scan::refs::{file_name_from_uri, produced_files, scan_refs};
pub use kinds::{ttl_until, Kind};
pub use owners::{
    forget, live_token_name, of_token, owner, owners, page_of_token, page_token, parse_page_token,
    remember, valid_id, OwnerRecord,
};
pub use pin::{body_owner, RefError};

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

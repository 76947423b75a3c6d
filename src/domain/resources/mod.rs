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

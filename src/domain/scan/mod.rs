//! Byte scanners: what the gateway needs from a JSON body, read from its
//! bytes without deserializing it, so the cost does not grow with what the
//! body holds.
//!
//! - [`depth`]: how deep a body nests (checked at the edge).
//! - [`refs`]: the resources a request names, and the files an answer
//!   produced (which key a request must go to).
//! - [`usage`]: the token counts at the end of an answer or stream.

pub mod depth;
pub mod refs;
pub mod usage;

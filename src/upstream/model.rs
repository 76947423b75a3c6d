//! A model's name as Google writes it in paths, bodies and quota errors,
//! brought to one form so that limits and cooldowns per model match
//! whichever way a client or Google spelled it.

/// A model name as Google's quota and the rotation know it: `models/x` and
/// `x` are the same model. Names that are not plain model ids (too long, or
/// with characters a model id never has) give `None`.
pub fn normalize_model(raw: &str) -> Option<String> {
    let name = raw.trim();
    let name = name.strip_prefix("models/").unwrap_or(name);
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    ok.then(|| name.to_ascii_lowercase())
}

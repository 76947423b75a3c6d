//! Secrets as text: how Gemini keys and client tokens are written (in a
//! variable, or a mounted file of one a line, `label=token`) and the stable
//! id each is known by. A leaf: `settings` reads them at start,
//! `background::reload` reads the files again while running, and
//! `domain::identity` names secrets by [`short_id`].

use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The first 12 hex digits of the SHA-256 of the secret. Stable across
/// replicas and restarts; an operator can compute it with
/// `printf %s "$KEY" | sha256sum | cut -c1-12`.
pub fn short_id(secret: &SecretString) -> String {
    let digest = Sha256::digest(secret.expose_secret().as_bytes());
    hex::encode(&digest[..6])
}

/// Entries of a secrets file: one a line, `#` starts a comment.
fn entries(text: &str) -> Vec<(usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .collect()
}

/// A keys file: Gemini keys are letters, digits, `-` and `_`.
pub fn parse_keys(text: &str) -> Result<Vec<SecretString>, String> {
    let mut keys = Vec::new();
    for (n, entry) in entries(text) {
        if !entry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(format!("line {n} is not a key"));
        }
        keys.push(SecretString::from(entry.to_string()));
    }
    dedup(&mut keys);
    if keys.is_empty() {
        return Err("it holds no key".into());
    }
    Ok(keys)
}

/// (token id, label) pairs of labelled client tokens.
pub type Labels = Vec<(String, String)>;

/// A tokens file: one token a line, optionally written `label=token`.
/// Returns the tokens and (token id, label) pairs.
pub fn parse_tokens(text: &str) -> Result<(Vec<SecretString>, Labels), String> {
    let mut tokens = Vec::new();
    for (n, entry) in entries(text) {
        if entry
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(format!("line {n} is not a token"));
        }
        tokens.push(SecretString::from(entry.to_string()));
    }
    let labels = split_labels(&mut tokens);
    dedup(&mut tokens);
    if tokens.is_empty() {
        return Err("it holds no token".into());
    }
    Ok((tokens, labels))
}

/// An admin token file: exactly one token.
pub fn parse_admin(text: &str) -> Result<SecretString, String> {
    match entries(text).as_slice() {
        [(_, token)] if !token.bytes().any(|b| b.is_ascii_whitespace()) => {
            Ok(SecretString::from(token.to_string()))
        }
        [] => Err("it holds no token".into()),
        _ => Err("it must hold exactly one token".into()),
    }
}

/// Splits `label=token` entries: a label is 1–40 of `[A-Za-z0-9_.@-]`, and a
/// token whose part after the first `=` starts with `=` (base64 padding)
/// stays whole. Returns (token id, label) for the labelled ones.
pub fn split_labels(list: &mut [SecretString]) -> Vec<(String, String)> {
    let mut labels = Vec::new();
    for entry in list.iter_mut() {
        let parsed = entry
            .expose_secret()
            .split_once('=')
            .and_then(|(label, token)| {
                let ok = (1..=40).contains(&label.len())
                    && label
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.@-".contains(c))
                    && !token.is_empty()
                    && !token.starts_with('=');
                ok.then(|| (label.to_string(), SecretString::from(token.to_string())))
            });
        if let Some((label, token)) = parsed {
            labels.push((short_id(&token), label));
            *entry = token;
        }
    }
    labels
}

pub fn dedup(list: &mut Vec<SecretString>) {
    let mut seen = std::collections::HashSet::new();
    list.retain(|s| seen.insert(s.expose_secret().to_string()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_parse_with_comments_and_refuse_bad_lines() {
        let keys = parse_keys("# team\nAIza-one_1  # first\n\nAIza-two\nAIza-two\n").unwrap();
        assert_eq!(keys.len(), 2);
        assert!(parse_keys("AIza-one\nnot a key\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(parse_keys("# only comments\n\n").is_err());
        let (tokens, labels) = parse_tokens("alice=tok-a\ntok-b\n").unwrap();
        assert_eq!(tokens.len(), 2);
        assert_eq!(labels.len(), 1);
        assert!(parse_tokens("tok a\n").is_err());
        assert!(parse_admin("adm\n").is_ok());
        assert!(parse_admin("a\nb\n").is_err());
        assert!(parse_admin("").is_err());
    }

    #[test]
    fn id_is_twelve_hex_of_sha256() {
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(short_id(&SecretString::from("abc")), "ba7816bf8f01");
    }
}

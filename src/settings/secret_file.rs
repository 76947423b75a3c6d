//! A mounted secrets file, as the settings read it.

use super::{err, SettingsError};

/// A secrets file and a digest of the content the settings were read from,
/// so a reload sees any change made after that.
#[derive(Debug, Clone)]
pub struct SecretFile {
    pub path: String,
    pub digest: [u8; 32],
}

impl SecretFile {
    pub(super) fn read(var: &str, path: &str) -> Result<(Self, String), SettingsError> {
        use sha2::{Digest, Sha256};
        let text = std::fs::read_to_string(path)
            .map_err(|e| err(var, format!("cannot read the file: {}", e.kind())))?;
        let file = SecretFile {
            path: path.to_string(),
            digest: Sha256::digest(text.as_bytes()).into(),
        };
        Ok((file, text))
    }
}

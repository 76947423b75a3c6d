//! Every Redis key name, built in one place. The layout, with each key's
//! Redis Cluster slot tag, is written down in `migrations/0001_initial.md`.
//!
//! A Redis Cluster hashes a key by the text between its first `{` and the
//! next `}` when there is one (its hash tag), else by the whole key. Keys one
//! command, pipeline or script touches together share a tag; keys of
//! unrelated entities (sessions, uploads, files) carry none, so they spread
//! over every master.

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
}

impl Keyspace {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_string(),
        }
    }

    /// `{prefix}:part:part…`, untagged: hashed whole.
    pub fn key(&self, parts: &[&str]) -> String {
        let mut s = self.prefix.clone();
        for p in parts {
            s.push(':');
            s.push_str(p);
        }
        s
    }

    /// The hash tag every key of one rotation ring carries, so the rotation
    /// step (counter and states, and whatever else a ring keeps) stays in one
    /// slot: `{ring:NAME}`.
    pub fn ring_tag(ring: &str) -> String {
        format!("{{ring:{ring}}}")
    }

    /// A key of ring `ring`: `{prefix}:{ring:NAME}:part`.
    pub fn ring_key(&self, ring: &str, part: &str) -> String {
        self.key(&[&Self::ring_tag(ring), part])
    }

    /// The ring's rotation counter (`INCR`).
    pub fn ring_counter(&self, ring: &str) -> String {
        self.ring_key(ring, "n")
    }

    /// The ring's member states (hash).
    pub fn ring_states(&self, ring: &str) -> String {
        self.ring_key(ring, "s")
    }

    /// The layout version.
    pub fn layout(&self) -> String {
        self.key(&["layout"])
    }

    /// One binding: `{prefix}:NS:ID`.
    pub fn binding(&self, ns: &str, id: &str) -> String {
        self.key(&[ns, id])
    }

    pub fn index(&self, name: &str) -> String {
        self.key(&["idx", name])
    }

    pub fn lock(&self, name: &str) -> String {
        self.key(&["lock", name])
    }

    pub fn stats(&self, bucket: &str) -> String {
        self.key(&["stats", bucket])
    }
}

/// The Redis Cluster slot of a key (CRC16/XMODEM of its hash tag or whole
/// name, mod 16384), for tests and diagnostics.
pub fn slot(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        rest.iter()
            .position(|&b| b == b'}')
            .filter(|&close| close > 0)
            .map(|close| &rest[..close])
    });
    crc16(tagged.unwrap_or(bytes)) % 16384
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis() {
        // Values from `CLUSTER KEYSLOT` on a real Redis.
        assert_eq!(slot("foo"), 12182);
        assert_eq!(slot("123456789"), 12739);
        assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
        assert_eq!(slot("{user1000}.following"), slot("user1000"));
        // An empty tag does not count: the whole key is hashed.
        assert_ne!(slot("a{}b"), slot(""));
    }

    #[test]
    fn a_rings_keys_share_a_slot_and_bindings_spread() {
        let l = Keyspace::new("gb");
        assert_eq!(l.ring_counter("keys"), "gb:{ring:keys}:n");
        assert_eq!(l.ring_states("keys"), "gb:{ring:keys}:s");
        assert_eq!(slot(&l.ring_counter("keys")), slot(&l.ring_states("keys")));
        assert_eq!(
            slot(&l.ring_key("keys", "m")),
            slot(&l.ring_states("keys")),
            "any other key of the ring joins them"
        );
        let slots: std::collections::HashSet<u16> = (0..200)
            .map(|i| slot(&l.binding("session", &format!("s-{i}"))))
            .collect();
        assert!(slots.len() > 150, "sessions spread: {}", slots.len());
    }
}

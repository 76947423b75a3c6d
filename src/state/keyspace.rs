//! Every Redis key name, built in one place: the namespaces, index, lock,
//! counter and ring names callers hand the store, and how the Redis store
//! turns them into keys. The written layout (`ARCHITECTURE.md`, section
//! "State") lists every key family [`families`] builds, each with its Redis
//! Cluster slot tag; a unit test keeps the two equal.
//!
//! A Redis Cluster hashes a key by the text between its first `{` and the
//! next `}` when there is one (its hash tag), else by the whole key. Keys one
//! command, pipeline or script touches together share a tag; keys of
//! unrelated entities (sessions, uploads, files) carry none, so they spread
//! over every master.

use std::borrow::Cow;
use std::fmt::Display;

/// Binding namespaces: one value per id, `{prefix}:NS:ID`.
pub mod ns {
    /// Session id → the key id the session is bound to.
    pub const SESSION: &str = "session";
    /// Upload id → the upstream upload session a chunk goes to.
    pub const UPLOAD: &str = "upload";
    /// File name → its owner record. Files kept this namespace when other
    /// resources got theirs, so replicas of layout 1 read them unchanged.
    pub const FILE: &str = "file";
    /// Resource name (caches, batches, operations, file search stores) →
    /// its owner record.
    pub const RESOURCE: &str = "res";
    /// Resource name → a recent discovery miss (no pool key could see it).
    pub const DISCOVERY_MISS: &str = "file-miss";
    /// Replica id → its last heartbeat.
    pub const REPLICA: &str = "replica";
    /// Digest of an admin page session id → the admin token it was opened
    /// with (a digest).
    pub const ADMIN_SESSION: &str = "admin-session";
}

/// Index names: members with an expiry, `{prefix}:idx:NAME`.
pub mod index {
    use super::Display;

    /// The replicas that sent a heartbeat recently.
    pub const REPLICAS: &str = "replicas";
    /// The last upstream errors, for the usage API.
    pub const USAGE_ERRORS: &str = "usage-errors";
    /// The request log: one record per finished request.
    pub const REQUESTS: &str = "requests";

    /// The files a client token uploaded.
    pub fn token_files(token_id: impl Display) -> String {
        format!("token-files:{token_id}")
    }

    /// The resources of one collection (`cachedContents`, …) a client token
    /// created.
    pub fn token_resources(collection: impl Display, token_id: impl Display) -> String {
        format!("token-res:{collection}:{token_id}")
    }

    /// The open Live sessions on a key, across replicas.
    pub fn live_sessions(key_id: impl Display) -> String {
        format!("live:{key_id}")
    }

    /// The keys behind one outbound proxy that answered 429 lately.
    pub fn proxy_429s(proxy_id: impl Display) -> String {
        format!("proxy-429:{proxy_id}")
    }
}

/// Lock names: one holder at a time, `{prefix}:lock:NAME`.
pub mod lock {
    /// Held while a replica checks or upgrades the key layout.
    pub const MIGRATE: &str = "migrate";
    /// Held by the replica that re-checks disabled keys this interval.
    pub const RECHECK: &str = "recheck";
}

/// Counter buckets: named counts that lapse together,
/// `{prefix}:stats:BUCKET`.
pub mod bucket {
    use super::Display;

    /// Per-key request counts by outcome, one bucket a minute.
    pub fn key_stats(minute: impl Display) -> String {
        format!("keys:{minute}")
    }

    /// Usage series (requests, errors, tokens), one bucket an hour.
    pub fn usage(hour: impl Display) -> String {
        format!("usage:{hour}")
    }

    /// The discovery lookups one client token made in one minute.
    pub fn discovery(token_id: impl Display, minute: impl Display) -> String {
        format!("discovery:{token_id}:{minute}")
    }
}

/// Rotation rings: members with a shared health state, `{prefix}:{ring:NAME}:…`.
pub mod ring {
    /// The pool's API keys.
    pub const KEYS: &str = "keys";
    /// The outbound proxies (their health only; a key's proxy is chosen by
    /// hashing, not rotation).
    pub const PROXIES: &str = "proxies";
}

/// Key names under one prefix.
#[derive(Debug, Clone)]
pub struct Keyspace {
    prefix: String,
    /// The key ring's counter and states, named once: every request's
    /// rotation uses them.
    keys_ring: [String; 2],
}

impl Keyspace {
    pub fn new(prefix: &str) -> Self {
        let mut k = Self {
            prefix: prefix.to_string(),
            keys_ring: [String::new(), String::new()],
        };
        k.keys_ring = [k.ring_key(ring::KEYS, "n"), k.ring_key(ring::KEYS, "s")];
        k
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
    pub fn ring_counter(&self, ring: &str) -> Cow<'_, str> {
        if ring == ring::KEYS {
            Cow::Borrowed(&self.keys_ring[0])
        } else {
            Cow::Owned(self.ring_key(ring, "n"))
        }
    }

    /// The ring's member states (hash).
    pub fn ring_states(&self, ring: &str) -> Cow<'_, str> {
        if ring == ring::KEYS {
            Cow::Borrowed(&self.keys_ring[1])
        } else {
            Cow::Owned(self.ring_key(ring, "s"))
        }
    }

    /// The hash tag every key of one client's limits carries, so one
    /// admission (a script over all of them) stays in one slot:
    /// `{client:TOKEN_ID}`.
    pub fn client_tag(client: &str) -> String {
        format!("{{client:{client}}}")
    }

    /// A key of one client's limits: `{prefix}:{client:TOKEN_ID}:part`.
    pub fn client_key(&self, client: &str, part: &str) -> String {
        self.key(&[&Self::client_tag(client), part])
    }

    /// The client's requests of the last minute (sorted set by time).
    pub fn client_requests(&self, client: &str) -> String {
        self.client_key(client, "rpm")
    }

    /// The client's tokens of the last minute, by second (hash).
    pub fn client_tokens(&self, client: &str) -> String {
        self.client_key(client, "tpm")
    }

    /// The client's tokens of one calendar day (UTC).
    pub fn client_day(&self, client: &str, day: &str) -> String {
        self.client_key(client, &format!("day:{day}"))
    }

    /// The client's leases of one kind (sorted set by expiry).
    pub fn client_leases(&self, client: &str, set: &str) -> String {
        self.client_key(client, &format!("lease:{set}"))
    }

    /// A member's requests for one model in its window (sorted set by
    /// time), in the ring's slot.
    pub fn window_requests(&self, ring: &str, model: &str, member: &str) -> String {
        self.ring_key(ring, &format!("w:{model}:{member}"))
    }

    /// A member's tokens for one model by second (hash), in the ring's slot.
    pub fn window_tokens(&self, ring: &str, model: &str, member: &str) -> String {
        self.ring_key(ring, &format!("t:{model}:{member}"))
    }

    /// A member's requests for one model in one day, in the ring's slot.
    pub fn window_day(&self, ring: &str, model: &str, member: &str, day: &str) -> String {
        self.ring_key(ring, &format!("d:{model}:{member}:{day}"))
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
    crc16(hash_tag(key).unwrap_or(key).as_bytes()) % 16384
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

/// Every key family the gateway writes, built by the functions the code
/// uses, with `<…>` for the variable parts: what the written layout lists.
pub fn families(prefix: &str) -> Vec<String> {
    let k = Keyspace::new(prefix);
    vec![
        k.layout(),
        k.ring_counter(ring::KEYS).into_owned(),
        k.ring_states(ring::KEYS).into_owned(),
        k.ring_states(ring::PROXIES).into_owned(),
        k.binding(ns::SESSION, "<session id>"),
        k.binding(ns::UPLOAD, "<upload id>"),
        k.binding(ns::FILE, "files/<id>"),
        k.binding(ns::RESOURCE, "<resource name>"),
        k.binding(ns::DISCOVERY_MISS, "<resource name>"),
        k.binding(ns::REPLICA, "<replica id>"),
        k.binding(ns::ADMIN_SESSION, "<session digest>"),
        k.index(index::REPLICAS),
        k.index(index::USAGE_ERRORS),
        k.index(index::REQUESTS),
        k.index(&index::token_files("<token id>")),
        k.index(&index::token_resources("<collection>", "<token id>")),
        k.index(&index::live_sessions("<key id>")),
        k.index(&index::proxy_429s("<proxy id>")),
        k.lock(lock::MIGRATE),
        k.lock(lock::RECHECK),
        k.stats(&bucket::key_stats("<minute>")),
        k.stats(&bucket::usage("<hour>")),
        k.stats(&bucket::discovery("<token id>", "<minute>")),
        k.window_requests(ring::KEYS, "<model>", "<key id>"),
        k.window_tokens(ring::KEYS, "<model>", "<key id>"),
        k.window_day(ring::KEYS, "<model>", "<key id>", "<date>"),
        k.client_requests("<token id>"),
        k.client_tokens("<token id>"),
        k.client_day("<token id>", "<date>"),
        k.client_leases("<token id>", "concurrent"),
        k.client_leases("<token id>", "live"),
    ]
}

/// The hash tag Redis Cluster places a key by, if it has one.
pub fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let rest = &key[open + 1..];
    rest.find('}')
        .filter(|&close| close > 0)
        .map(|close| &rest[..close])
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

    /// The rows of the key table in `ARCHITECTURE.md`: key and slot tag.
    fn written_layout() -> Vec<(String, String)> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/ARCHITECTURE.md");
        let doc = std::fs::read_to_string(path).unwrap();
        assert!(
            doc.contains("| key | type | TTL | slot tag | written by | holds |"),
            "the key table's header changed; this test reads its columns by position"
        );
        doc.lines()
            .filter(|l| l.starts_with("| `<prefix>:"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                (
                    cells[1].trim_matches('`').to_string(),
                    cells[4].trim_matches('`').to_string(),
                )
            })
            .collect()
    }

    #[test]
    fn the_written_layout_is_the_registrys() {
        let written = written_layout();
        let built: Vec<(String, String)> = families("<prefix>")
            .into_iter()
            .map(|k| {
                let tag = hash_tag(&k).unwrap_or("none").to_string();
                (k, tag)
            })
            .collect();
        for family in &built {
            assert!(
                written.contains(family),
                "ARCHITECTURE.md lacks the key {} with slot tag {}",
                family.0,
                family.1
            );
        }
        for row in &written {
            assert!(
                built.contains(row),
                "ARCHITECTURE.md names {} (slot tag {}), which state::keyspace does not build",
                row.0,
                row.1
            );
        }
        assert_eq!(written.len(), built.len(), "a key is written twice");
    }

    #[test]
    fn every_family_is_distinct_and_placed_as_intended() {
        let built = families("gb");
        let unique: std::collections::HashSet<&String> = built.iter().collect();
        assert_eq!(unique.len(), built.len());
        for k in &built {
            match hash_tag(k) {
                Some(tag) => assert!(
                    tag.starts_with("ring:") || tag.starts_with("client:"),
                    "{k}: only rings and client limits carry a tag"
                ),
                None => assert!(!k.contains(['{', '}']), "{k}"),
            }
        }
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

//! Each ring's member states as this replica last read them, kept while the
//! ring's state version says they are still current.
//!
//! The version rides in the ring's counter: the one `INCR` a rotation sends
//! returns the counter, and every change of the ring's states adds
//! [`VERSION_STEP`] to that counter in the same script that makes the change
//! (`lua/transition.lua`). So `counter / VERSION_STEP` changes whenever the
//! states do (and, harmlessly, each time the requests counted in the low
//! bits carry into it: one more read every 2^16 rotations), and a rotation
//! whose `INCR` answers with the version of the kept copy needs no second
//! command: rotation stays exact (the states used are never older than the
//! counter's answer) at one command a request. A copy whose version differs
//! is read again with `HGETALL`, a second round trip only after a change.
//!
//! A copy is also read again when it is older than [`MAX_AGE`], whatever its
//! version: a replica of an earlier build changes states without adding the
//! step, so during a rolling upgrade its changes reach this build's replicas
//! within that time.
//!
//! Rotation takes `counter - 1` modulo the usable members, so a change
//! shifts the next pick by `VERSION_STEP` places (modulo the ring), once per
//! change: the order stays round-robin between changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::MemberState;

/// What one change of a ring's states adds to its counter. The counter
/// must stay below 2^53, where the rotation script's Lua numbers are exact:
/// 2^37 changes (years at hundreds a second) leave room for 2^52 requests.
pub const VERSION_STEP: u64 = 1 << 16;

/// The longest a copy is used without being read again.
pub const MAX_AGE: Duration = Duration::from_secs(1);

/// One ring's states at one version.
pub struct Snapshot {
    version: u64,
    taken: Instant,
    pub states: HashMap<String, MemberState>,
}

/// The copies of every ring this replica rotated over, shared by its
/// workers.
#[derive(Default)]
pub struct Snapshots {
    rings: Mutex<HashMap<String, Arc<Snapshot>>>,
}

/// The state version a counter value carries.
pub fn version_of(counter: u64) -> u64 {
    counter / VERSION_STEP
}

impl Snapshots {
    /// The kept copy of `ring`, when it is at the version `counter` carries
    /// and young enough.
    pub fn current(&self, ring: &str, counter: u64) -> Option<Arc<Snapshot>> {
        let rings = self
            .rings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        rings
            .get(ring)
            .filter(|s| s.version == version_of(counter) && s.taken.elapsed() < MAX_AGE)
            .cloned()
    }

    /// Keeps `states`, read after the `INCR` that answered `counter`, as the
    /// ring's copy at that counter's version. States read after the `INCR`
    /// are at that version or newer, so a copy is never older than its
    /// label; a newer one only costs a read once the counter catches up. A
    /// read that finishes after one of a later version does not replace it.
    pub fn keep(
        &self,
        ring: &str,
        counter: u64,
        states: HashMap<String, MemberState>,
    ) -> Arc<Snapshot> {
        let snapshot = Arc::new(Snapshot {
            version: version_of(counter),
            taken: Instant::now(),
            states,
        });
        let mut rings = self
            .rings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match rings.get_mut(ring) {
            // (Unless it is old: after the counter went back — a flushed
            // or restored Redis — the lower versions are the current ones.)
            Some(kept) if kept.version > snapshot.version && kept.taken.elapsed() < MAX_AGE => {
                return Arc::clone(kept);
            }
            Some(kept) => *kept = Arc::clone(&snapshot),
            None => {
                rings.insert(ring.to_string(), Arc::clone(&snapshot));
            }
        }
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_is_used_only_at_its_own_version() {
        let kept = Snapshots::default();
        assert!(kept.current("r", 5).is_none());
        let mut states = HashMap::new();
        states.insert("k1".to_string(), MemberState::cooling(10, "per_minute"));
        kept.keep("r", 5, states);
        assert!(kept.current("r", 6).is_some(), "same version, next request");
        assert!(kept.current("r", VERSION_STEP - 1).is_some());
        assert!(
            kept.current("r", VERSION_STEP + 6).is_none(),
            "a change happened"
        );
        assert!(kept.current("other", 6).is_none(), "rings are apart");
        kept.keep("r", VERSION_STEP + 6, HashMap::new());
        let now = kept.current("r", VERSION_STEP + 7).unwrap();
        assert!(now.states.is_empty());
        // A read of an earlier version that finishes last keeps the later copy.
        let mut late = HashMap::new();
        late.insert("k2".to_string(), MemberState::cooling(10, "per_minute"));
        assert!(kept.keep("r", 7, late).states.is_empty());
        assert!(kept.current("r", VERSION_STEP + 8).is_some());
    }
}

//! The state every worker shares: settings, key pool, client tokens, store.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::auth::Auth;
use crate::keys::KeyPool;
use crate::settings::Settings;
use crate::store::StateStore;

pub struct Gateway {
    pub settings: Settings,
    pub keys: KeyPool,
    pub auth: Auth,
    pub store: Arc<dyn StateStore>,
    draining: AtomicBool,
}

impl Gateway {
    pub fn new(settings: Settings, store: Arc<dyn StateStore>) -> Self {
        Self {
            keys: KeyPool::new(&settings.api_keys),
            auth: Auth::new(&settings.auth_tokens, settings.admin_token.as_ref()),
            settings,
            store,
            draining: AtomicBool::new(false),
        }
    }

    pub fn store(&self) -> &dyn StateStore {
        self.store.as_ref()
    }

    /// Marks the replica as shutting down: `/readyz` turns 503 so load
    /// balancers stop sending new work while in-flight requests finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

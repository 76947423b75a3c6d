//! Keys, tokens and limits that change while the gateway runs.
//! `GB_API_KEYS_FILE`, `GB_AUTH_TOKENS_FILE`, `GB_ADMIN_TOKEN_FILE` (mounted
//! secrets) and `GB_LIMITS_FILE` are read
//! again on SIGHUP and every `GB_RELOAD_INTERVAL` seconds. A file is compared
//! by content (Kubernetes swaps a symlink; editors rewrite in place), and a
//! reload is all or nothing: an unreadable, empty or malformed file keeps the
//! last good set, with one error line per distinct problem (naming the file,
//! never its contents). Lists given in environment variables never change.

use std::sync::Arc;

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use crate::domain::gateway::Gateway;
use crate::secrets::{parse_admin, parse_keys, parse_tokens};
use crate::settings::parse_limits;

/// One watched file: what was last applied, and the last problem reported.
struct Watched {
    var: &'static str,
    path: String,
    applied: Option<[u8; 32]>,
    reported: Option<String>,
}

impl Watched {
    fn new(var: &'static str, file: Option<&crate::settings::SecretFile>) -> Option<Self> {
        let file = file?;
        Some(Self {
            var,
            path: file.path.clone(),
            applied: Some(file.digest),
            reported: None,
        })
    }

    /// The file's text when it changed since the last good reload.
    fn changed(&mut self, gw: &Gateway) -> Option<String> {
        match std::fs::read(&self.path) {
            Ok(bytes) => {
                let digest: [u8; 32] = Sha256::digest(&bytes).into();
                if self.applied == Some(digest) {
                    self.reported = None;
                    return None;
                }
                match String::from_utf8(bytes) {
                    Ok(text) => Some(text),
                    Err(_) => {
                        self.fail(gw, "it is not UTF-8 text".into());
                        None
                    }
                }
            }
            Err(e) => {
                self.fail(gw, format!("cannot be read: {}", e.kind()));
                None
            }
        }
    }

    fn applied(&mut self, text: &str) {
        self.applied = Some(Sha256::digest(text.as_bytes()).into());
        self.reported = None;
    }

    /// Logs a problem once (not once per poll) and counts it; the last
    /// good set stays.
    fn fail(&mut self, gw: &Gateway, problem: String) {
        if self.reported.as_deref() != Some(problem.as_str()) {
            tracing::error!(variable = self.var, file = %self.path, problem = %problem, "reload refused; the last good set stays in force");
            gw.metrics.config_reload_errors.inc();
            self.reported = Some(problem);
        }
    }
}

/// The files of one gateway, watched.
pub struct Reloader {
    keys: Option<Watched>,
    tokens: Option<Watched>,
    admin: Option<Watched>,
    limits: Option<Watched>,
}

impl Reloader {
    pub fn new(gw: &Gateway) -> Self {
        let s = &gw.settings;
        Self {
            keys: Watched::new("GB_API_KEYS_FILE", s.keys.file.as_ref()),
            tokens: Watched::new("GB_AUTH_TOKENS_FILE", s.clients.file.as_ref()),
            admin: Watched::new("GB_ADMIN_TOKEN_FILE", s.admin.token_file.as_ref()),
            limits: Watched::new("GB_LIMITS_FILE", s.limits.file.as_ref()),
        }
    }

    pub fn watches_anything(&self) -> bool {
        self.keys.is_some()
            || self.tokens.is_some()
            || self.admin.is_some()
            || self.limits.is_some()
    }

    /// Applies every file that changed.
    pub fn check(&mut self, gw: &Gateway) {
        if let Some(w) = &mut self.keys {
            if let Some(text) = w.changed(gw) {
                match parse_keys(&text) {
                    Ok(keys) => {
                        let changes = gw.keys.replace(&keys);
                        w.applied(&text);
                        gw.mark_loaded();
                        gw.metrics.config_reloads.inc();
                        tracing::info!(keys = keys.len(), added = ?changes.added, removed = ?changes.removed, "keys reloaded");
                    }
                    Err(problem) => w.fail(gw, problem),
                }
            }
        }
        if let Some(w) = &mut self.tokens {
            if let Some(text) = w.changed(gw) {
                match parse_tokens(&text) {
                    Ok((tokens, labels)) => {
                        let (before, after) = gw.auth.replace_tokens(&tokens, labels);
                        w.applied(&text);
                        gw.mark_loaded();
                        gw.metrics.config_reloads.inc();
                        tracing::info!(before, after, "client tokens reloaded");
                    }
                    Err(problem) => w.fail(gw, problem),
                }
            }
        }
        if let Some(w) = &mut self.limits {
            if let Some(text) = w.changed(gw) {
                match parse_limits(&text) {
                    Ok(set) => {
                        let clients = set.clients.len() + usize::from(set.default.is_some());
                        gw.keys.set_limits(set.keys.clone());
                        gw.limits.replace(set);
                        w.applied(&text);
                        gw.metrics.config_reloads.inc();
                        tracing::info!(clients, "client limits reloaded");
                    }
                    Err(problem) => w.fail(gw, problem),
                }
            }
        }
        if let Some(w) = &mut self.admin {
            if let Some(text) = w.changed(gw) {
                match parse_admin(&text) {
                    Ok(token) if gw.auth.verify(Some(token.expose_secret())).is_ok() => {
                        w.fail(gw, "the admin token is also a client token".into());
                    }
                    Ok(token) => {
                        gw.auth.replace_admin(Some(&token));
                        w.applied(&text);
                        gw.mark_loaded();
                        gw.metrics.config_reloads.inc();
                        tracing::info!(
                            "admin token reloaded; admin page sessions of the old one end"
                        );
                    }
                    Err(problem) => w.fail(gw, problem),
                }
            }
        }
    }
}

/// Re-reads the files every `GB_RELOAD_INTERVAL` and on SIGHUP, until the
/// gateway drains.
pub async fn run(gw: Arc<Gateway>) {
    let mut reloader = Reloader::new(&gw);
    if !reloader.watches_anything() {
        return;
    }
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "SIGHUP cannot be watched; files are polled only");
            None
        }
    };
    let interval = gw.settings.keys.reload_interval;
    loop {
        let hup = async {
            match &mut hangup {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = hup => tracing::info!("SIGHUP: reloading keys and tokens"),
        }
        if gw.draining() {
            return;
        }
        reloader.check(&gw);
    }
}

//! How a section reads one variable: the merged sources, and typed reads
//! whose errors name the variable.

use std::cell::RefCell;
use std::net::SocketAddr;
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use secrecy::SecretString;

use super::{err, find, SettingsError, CONFIG_VAR, DEFAULTS};

/// The merged sources, read one variable at a time.
pub(super) struct Raw {
    cfg: Config,
    /// Every variable read, so a test can hold the loader to [`VARIABLES`].
    pub(super) read: RefCell<Vec<&'static str>>,
}

impl Raw {
    pub(super) fn layered(env: Vec<(String, String)>) -> Result<Self, SettingsError> {
        let config_file = env
            .iter()
            .find(|(k, _)| k == CONFIG_VAR)
            .map(|(_, v)| v.clone());
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml).required(true));
        if let Some(path) = config_file.filter(|p| !p.is_empty()) {
            if !is_file(&path) {
                return Err(err(CONFIG_VAR, "the file it names does not exist"));
            }
            builder = builder.add_source(File::with_name(&path).required(true));
        }
        // Only the names a section reads; the rest are reported by
        // `unknown_in_environment`.
        let env_map = env
            .into_iter()
            .filter(|(k, _)| {
                k.starts_with("GB_")
                    && k != CONFIG_VAR
                    && find(k).is_some_and(|g| g.read_by_gateway)
            })
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("GB")
                .prefix_separator("_")
                .source(Some(env_map)),
        );
        let cfg = builder
            .build()
            .map_err(|e| err(CONFIG_VAR, format!("cannot be read: {e}")))?;
        Ok(Raw {
            cfg,
            read: RefCell::new(Vec::new()),
        })
    }

    pub(super) fn opt(&self, var: &'static str) -> Option<String> {
        self.read.borrow_mut().push(var);
        let key = var.strip_prefix("GB_").unwrap_or(var).to_ascii_lowercase();
        match self.cfg.get_string(&key) {
            Ok(v) if !v.trim().is_empty() => Some(v.trim().to_string()),
            _ => match self.cfg.get_array(&key) {
                Ok(items) => {
                    let joined: Vec<String> = items
                        .into_iter()
                        .filter_map(|v| v.into_string().ok())
                        .collect();
                    (!joined.is_empty()).then(|| joined.join(","))
                }
                Err(_) => None,
            },
        }
    }

    pub(super) fn req(&self, var: &'static str) -> Result<String, SettingsError> {
        self.opt(var).ok_or_else(|| err(var, "is required"))
    }

    pub(super) fn num<T: std::str::FromStr>(&self, var: &'static str) -> Result<T, SettingsError> {
        let v = self.req(var)?;
        v.parse()
            .map_err(|_| err(var, format!("expected a whole number, got {v:?}")))
    }

    /// A whole number of at least 1.
    pub(super) fn positive<T>(&self, var: &'static str) -> Result<T, SettingsError>
    where
        T: std::str::FromStr + Default + PartialEq,
    {
        let n: T = self.num(var)?;
        if n == T::default() {
            return Err(err(var, "must be at least 1"));
        }
        Ok(n)
    }

    pub(super) fn secs(&self, var: &'static str) -> Result<Duration, SettingsError> {
        let n: u64 = self.num(var)?;
        if n == 0 {
            return Err(err(var, "must be at least 1 second"));
        }
        Ok(Duration::from_secs(n))
    }

    pub(super) fn boolean(&self, var: &'static str) -> Result<bool, SettingsError> {
        match self.req(var)?.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Ok(true),
            "0" | "false" | "no" | "off" => Ok(false),
            other => Err(err(var, format!("expected true or false, got {other:?}"))),
        }
    }

    /// One of `choices`, any case; the error lists them ("a, b or c").
    pub(super) fn choice<T: Copy>(
        &self,
        var: &'static str,
        choices: &[(&str, T)],
    ) -> Result<T, SettingsError> {
        let given = self.req(var)?.to_ascii_lowercase();
        if let Some((_, value)) = choices.iter().find(|(name, _)| *name == given) {
            return Ok(*value);
        }
        let names: Vec<&str> = choices.iter().map(|(name, _)| *name).collect();
        let expected = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.concat(),
        };
        Err(err(var, format!("expected {expected}, got {given:?}")))
    }

    /// `host:port`; `example` shows the form in the error.
    pub(super) fn addr(
        &self,
        var: &'static str,
        example: &str,
    ) -> Result<SocketAddr, SettingsError> {
        let given = self.req(var)?;
        given.parse().map_err(|_| {
            err(
                var,
                format!("expected host:port such as {example}, got {given:?}"),
            )
        })
    }

    pub(super) fn list(&self, var: &'static str) -> Vec<SecretString> {
        self.opt(var)
            .map(|v| split_list(&v, ','))
            .unwrap_or_default()
    }

    /// The path in `file_var` (`{var}_FILE`); giving both is an error.
    pub(super) fn file_of(
        &self,
        var: &'static str,
        file_var: &'static str,
    ) -> Result<Option<String>, SettingsError> {
        let file = self.opt(file_var);
        if file.is_some() && self.opt(var).is_some() {
            return Err(SettingsError {
                var: format!("{var} and {file_var}"),
                problem: "give one of them, not both".into(),
            });
        }
        Ok(file)
    }
}

pub(super) fn is_http(url: &str) -> bool {
    url.starts_with("http://") || url.starts_with("https://")
}

pub(super) fn is_file(path: &str) -> bool {
    std::path::Path::new(path).is_file()
}

/// Entries separated by `sep`; `#` starts a comment (a whole line, or the
/// rest of one: keys and tokens never contain `#`).
fn split_list(text: &str, sep: char) -> Vec<SecretString> {
    text.split(sep)
        .map(|s| s.split('#').next().unwrap_or("").trim())
        .filter(|s| !s.is_empty())
        .map(|s| SecretString::from(s.to_string()))
        .collect()
}

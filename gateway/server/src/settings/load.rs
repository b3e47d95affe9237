//! The layers: defaults < TOML file < `MQGATE__SECTION__KEY` environment variables,
//! deserialized once into [`Settings`]; errors as one line with the key, the value and
//! why. (Command-line flags are the last layer, applied by `main` to the typed values.)

use std::path::Path;

use super::types::Invalid;
use super::{bad, ConfigError, Settings};

impl Settings {
    /// Read defaults, then `file` (if any), then `MQGATE__SECTION__KEY` variables;
    /// check what types cannot say (TLS files for TLS listeners, user names, ...).
    pub(crate) fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        Self::load_with(file, None)
    }

    /// [`Settings::load`] with these variables instead of the process's (`None`: the
    /// process's).
    pub(super) fn load_with(
        file: Option<&Path>,
        env: Option<config::Map<String, String>>,
    ) -> Result<Self, ConfigError> {
        let mut b = config::Config::builder();
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError(format!(
                    "config: file {} does not exist",
                    f.display()
                )));
            }
            b = b.add_source(config::File::from(f).format(config::FileFormat::Toml));
        }
        b = b.add_source(
            config::Environment::with_prefix("MQGATE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(env),
        );
        let c = b.build().map_err(describe)?;
        let mut s: Settings = c.try_deserialize().map_err(describe)?;
        s.check()?;
        let w = s.limits.memory_high_watermark;
        s.memory_high_watermark_bytes = w.bytes(total_memory).ok_or_else(|| {
            bad(
                "limits.memory_high_watermark",
                w,
                super::types::WATERMARK_WHY,
            )
        })?;
        Ok(s)
    }
}

/// A `config` error as one line: a value that did not parse as `key = "value": why`,
/// anything else (TOML syntax, a wrong type, an unknown key) as `config` says it.
fn describe(e: config::ConfigError) -> ConfigError {
    if let config::ConfigError::At {
        error,
        key: Some(key),
        ..
    } = &e
    {
        if let config::ConfigError::Message(m) = error.as_ref() {
            if let Some(inv) = Invalid::decode(m) {
                let mut key = dotted(key);
                if !inv.field.is_empty() {
                    key = format!("{key}.{}", inv.field);
                }
                return bad(&key, &inv.value, &one_line(&inv.why));
            }
        }
    }
    if let config::ConfigError::Message(m) = &e {
        if let Some(inv) = Invalid::decode(m) {
            return ConfigError(format!("config: \"{}\": {}", inv.value, one_line(&inv.why)));
        }
    }
    ConfigError(format!("config: {}", one_line(&e.to_string())))
}

/// `config` writes the key of a field of a list's element without its dot
/// (`users[0]password_hash`): put it back (`users[0].password_hash`).
fn dotted(key: &str) -> String {
    let mut out = String::with_capacity(key.len() + 4);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '[' && c != '.' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

/// A parser's multi-line message (a TOML error quotes the line with a caret under it)
/// as one line.
fn one_line(msg: &str) -> String {
    msg.lines()
        .map(|l| l.trim().trim_start_matches('|').trim())
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '^' || c == ' '))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The machine's memory in bytes (Linux).
fn total_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn dotted_keys() {
        for (raw, want) in [
            ("store.backend", "store.backend"),
            ("delay.levels[3]", "delay.levels[3]"),
            ("users[0]password_hash", "users[0].password_hash"),
            (
                "vhosts[1]permissions[0]read",
                "vhosts[1].permissions[0].read",
            ),
            ("a[0][1]b", "a[0][1].b"),
        ] {
            assert_eq!(super::dotted(raw), want);
        }
    }
}

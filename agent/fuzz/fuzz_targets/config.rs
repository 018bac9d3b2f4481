//! The config file and its environment overrides: the input is TOML text,
//! then NUL-separated `NAME=value` environment entries (a name without the
//! `NODESCOPE_` prefix gets it). `Config::from_toml_with_env` and, on what
//! parses, `settings::check` must never panic, and every error they give
//! names a key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodescope::config::{Config, ConfigError};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\0');
    let toml = parts.next().unwrap_or_default();
    let env: Vec<(String, String)> = parts
        .map(|entry| {
            let (name, value) = entry.split_once('=').unwrap_or((entry, ""));
            let name = if name.starts_with("NODESCOPE_") { name.to_string() } else { format!("NODESCOPE_{name}") };
            (name, value.to_string())
        })
        .collect();
    let result = Config::from_toml_with_env(toml, env).and_then(|c| nodescope::settings::check(&c).map(|()| c));
    match result {
        Ok(_) => {}
        Err(ConfigError::Invalid { key, reason }) => {
            assert!(!key.is_empty(), "an error without a key: {reason}");
        }
        Err(e) => panic!("parsing text gave a file error: {e}"),
    }
});

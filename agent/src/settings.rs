//! The config as the agent runs it: `config::Config` (plain data, parsed and
//! checked for shape there) plus the checks only a signal can make: rule
//! ids, thresholds and windows (health rules) and file-class patterns (the
//! disk classifier). Kept here, above both, so that config.rs imports no
//! signal and every signal may read the config.

use std::path::Path;

use crate::config::{Config, ConfigError};

/// Reads, parses and checks the config (`None`: the environment alone).
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let config = Config::load(path)?;
    check(&config)?;
    Ok(config)
}

/// The signals' own checks of a parsed config; errors name the key.
pub fn check(config: &Config) -> Result<(), ConfigError> {
    crate::health::rules::check_config(config)?;
    crate::disk::classes::check_config(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_key(text: &str) -> String {
        match Config::from_toml_with_env(text, Vec::new()).and_then(|c| check(&c).map(|()| c)) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid-key error, got {other:?}"),
        }
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        let c = Config::from_toml_with_env(text, Vec::new())?;
        check(&c)?;
        Ok(c)
    }

    #[test]
    fn class_patterns_name_the_key() {
        assert_eq!(err_key("[[disk.classes]]\nclass = \"b\"\npaths = [\"ok\", \"/abs\"]"), "disk.classes[0].paths[1]");
        assert_eq!(err_key("[[disk.classes]]\nclass = \"b\"\npaths = [\"a/**b\"]"), "disk.classes[0].paths[0]");
        assert!(load("[[disk.classes]]\nclass = \"b\"\npaths = [\"blocks/*.dat\"]").is_ok());
    }

    #[test]
    fn bad_rule_settings_name_the_key() {
        let target = "[[targets]]\nname = \"a\"\nprocess = \"x\"\n";
        let cases = [
            ("[rules.no_such_rule]\nenabled = true", "rules.no_such_rule"),
            ("[rules.no_peers]\nfor = \"-5s\"", "rules.no_peers.for"),
            ("[rules.no_peers]\nclear_after = -3", "rules.no_peers.clear_after"),
            ("[rules.no_peers]\nfor = \"soon\"", "rules.no_peers.for"),
            ("[rules.disk_low]\nthreshold = 120", "rules.disk_low.threshold"),
            ("[rules.disk_critical]\nthreshold = -1", "rules.disk_critical.threshold"),
            ("[rules.low_peers]\nthreshold = -2", "rules.low_peers.threshold"),
            ("[rules.chain_stalled]\nthreshold = 0", "rules.chain_stalled.threshold"),
            ("[rules.fsync_slow]\nthreshold = nan", "rules.fsync_slow.threshold"),
            ("[rules.node_down]\nthreshold = 3", "rules.node_down.threshold"),
            ("[rules.no_peers]\nwindow = \"5s\"", "rules.no_peers.window"),
            ("[rules.partition_suspected]\nwindow = \"0s\"", "rules.partition_suspected.window"),
            ("[rules.no_peers]\nseverity = \"fatal\"", "rules.no_peers.severity"),
            ("[rules.no_peers]\nthreshhold = 1", "rules.no_peers.threshhold"),
            ("[rules.no_peers]\nfor = \"400days\"", "rules.no_peers.for"),
        ];
        for (text, key) in cases {
            assert_eq!(err_key(text), key, "{text}");
        }
        let per_target = [
            ("[targets.rules.bogus]\nenabled = false", "targets[0].rules.bogus"),
            ("[targets.rules.memory_high]\nthreshold = 101", "targets[0].rules.memory_high.threshold"),
            ("[targets.rules.no_outbound]\nfor = \"-1m\"", "targets[0].rules.no_outbound.for"),
        ];
        for (text, key) in per_target {
            assert_eq!(err_key(&format!("{target}{text}")), key, "{text}");
        }
        match load("[rules.no_peers]\nfor = \"-5s\"") {
            Err(e) => assert!(e.to_string().contains("negative"), "{e}"),
            Ok(_) => panic!("negative duration accepted"),
        }
    }
}

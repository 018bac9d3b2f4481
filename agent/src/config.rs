//! The agent's configuration: TOML, then `NODESCOPE_<SECTION>_<KEY>`
//! environment overrides, then validation. Every error names the key.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::chain::Chain;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// `key` is the dotted path of the offending key, e.g. `targets[0].p2p_ports`.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), reason: reason.into() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub agent: AgentConfig,
    pub limits: Limits,
    pub log: LogConfig,
    pub targets: Vec<TargetConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            http: HttpConfig::default(),
            agent: AgentConfig::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            targets: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig { listen: SocketAddr::from(([127, 0, 0, 1], 9464)) }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// How often kernel maps and procfs are read.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// With no `[[targets]]`, look for known nodes on the host.
    pub discover: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig { interval: Duration::from_secs(5), discover: true }
    }
}

/// The bounds of every table the agent keeps; docs/metrics.md says what
/// happens at each and which counter counts it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connection records the kernel keeps (all targets together).
    pub max_connections: u32,
    /// Peers per target with their own `network.peer.address` series.
    pub top_peers: usize,
    /// Peers per target the agent remembers; beyond, bytes go to "other".
    pub max_peers: usize,
    /// How long a peer's series stays after its last connection closed.
    #[serde(with = "humantime_serde")]
    pub peer_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 16384,
            top_peers: 128,
            max_peers: 4096,
            peer_ttl: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing-subscriber filter: "info", "nodescope=debug", ...
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".into(), format: LogFormat::Text }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Label on every signal of this node.
    pub name: String,
    pub pid_file: Option<PathBuf>,
    /// Process name as /proc/PID/comm shows it.
    pub process: Option<String>,
    /// A cgroup2 directory the node runs in.
    pub cgroup: Option<PathBuf>,
    #[serde(default = "default_chain")]
    pub chain: Chain,
    pub datadir: Option<PathBuf>,
    #[serde(default)]
    pub p2p_ports: Vec<u16>,
    #[serde(default)]
    pub rpc_ports: Vec<u16>,
}

fn default_chain() -> Chain {
    Chain::Generic
}

/// Sections whose scalar keys the environment may override.
const ENV_SECTIONS: &[&str] = &["http", "agent", "limits", "log"];
const ENV_PREFIX: &str = "NODESCOPE_";

impl Config {
    /// Reads `path` (or starts from defaults when None), applies the
    /// environment and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|source| ConfigError::Read { path: p.to_path_buf(), source })?,
            None => String::new(),
        };
        Self::from_toml_with_env(&text, std::env::vars())
    }

    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, e))?;
        apply_env(&mut doc, env)?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
            let key = e.path().to_string();
            let reason = e.into_inner().to_string();
            // one line: the deserializer's messages may end in or contain newlines
            let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
            ConfigError::invalid(if key == "." { "config".into() } else { key }, reason)
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.agent.interval < Duration::from_millis(100) {
            return Err(ConfigError::invalid("agent.interval", "must be at least 100ms"));
        }
        if self.agent.interval > Duration::from_secs(3600) {
            return Err(ConfigError::invalid("agent.interval", "must be at most 1h"));
        }
        if !(64..=1 << 20).contains(&self.limits.max_connections) {
            return Err(ConfigError::invalid("limits.max_connections", "must be between 64 and 1048576"));
        }
        if self.limits.top_peers == 0 || self.limits.top_peers > 10_000 {
            return Err(ConfigError::invalid("limits.top_peers", "must be between 1 and 10000"));
        }
        if self.limits.max_peers < self.limits.top_peers || self.limits.max_peers > 1_000_000 {
            return Err(ConfigError::invalid(
                "limits.max_peers",
                "must be at least limits.top_peers and at most 1000000",
            ));
        }
        if self.limits.peer_ttl.is_zero() {
            return Err(ConfigError::invalid("limits.peer_ttl", "must be greater than zero"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::invalid("log.level", e.to_string()));
        }
        let mut names = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let key = |k: &str| format!("targets[{i}].{k}");
            if t.name.is_empty()
                || !t.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(ConfigError::invalid(key("name"), "must be non-empty and use only letters, digits, '-', '_', '.'"));
            }
            if !names.insert(&t.name) {
                return Err(ConfigError::invalid(key("name"), format!("duplicate target name {:?}", t.name)));
            }
            let selectors = [t.pid_file.is_some(), t.process.is_some(), t.cgroup.is_some()];
            match selectors.iter().filter(|s| **s).count() {
                0 => return Err(ConfigError::invalid(format!("targets[{i}]"), "needs one of pid_file, process, cgroup")),
                1 => {}
                _ => return Err(ConfigError::invalid(format!("targets[{i}]"), "takes only one of pid_file, process, cgroup")),
            }
            if let Some(p) = &t.process {
                if p.is_empty() || p.len() > 15 {
                    return Err(ConfigError::invalid(key("process"), "must be a process name of 1 to 15 characters, as /proc/PID/comm shows it"));
                }
            }
            if let Some(c) = &t.cgroup {
                if !c.is_absolute() {
                    return Err(ConfigError::invalid(key("cgroup"), "must be an absolute path"));
                }
            }
            for (k, ports) in [("p2p_ports", &t.p2p_ports), ("rpc_ports", &t.rpc_ports)] {
                if ports.contains(&0) {
                    return Err(ConfigError::invalid(key(k), "port 0 is not a port"));
                }
            }
        }
        if self.targets.len() > crate::bpf::abi::MAX_TARGETS {
            return Err(ConfigError::invalid(
                "targets",
                format!("at most {} targets per agent", crate::bpf::abi::MAX_TARGETS),
            ));
        }
        Ok(())
    }
}

/// One line: where the TOML is broken and why.
fn toml_error(text: &str, e: toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| text[..s.start.min(text.len())].lines().count().max(1));
    let reason = e.message().to_string();
    ConfigError::invalid(
        match line {
            Some(l) => format!("config (line {l})"),
            None => "config".into(),
        },
        reason,
    )
}

/// `NODESCOPE_HTTP_LISTEN=0.0.0.0:9464` sets `http.listen`. Values are read
/// as TOML when they parse as such (numbers, booleans), else as strings.
fn apply_env(
    doc: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<(), ConfigError> {
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else { continue };
        let Some((section, key)) = rest.split_once('_') else {
            return Err(ConfigError::invalid(name, "expected NODESCOPE_<SECTION>_<KEY>"));
        };
        let section = section.to_ascii_lowercase();
        if !ENV_SECTIONS.contains(&section.as_str()) {
            return Err(ConfigError::invalid(
                name,
                format!("no such section; the environment can set keys of {}", ENV_SECTIONS.join(", ")),
            ));
        }
        let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or(toml::Value::String(value));
        let table = doc
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        match table {
            toml::Value::Table(t) => {
                t.insert(key.to_ascii_lowercase(), parsed);
            }
            _ => return Err(ConfigError::invalid(section, "must be a table")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, Vec::new())
    }

    fn err_key(text: &str) -> String {
        match load(text) {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid-key error, got {other:?}"),
        }
    }

    #[test]
    fn empty_config_gives_defaults() {
        let c = load("").unwrap();
        assert_eq!(c.http.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(c.limits.top_peers, 128);
        assert_eq!(c.limits.peer_ttl, Duration::from_secs(300));
        assert!(c.targets.is_empty());
    }

    #[test]
    fn full_target() {
        let c = load(
            r#"
            [http]
            listen = "0.0.0.0:9000"
            [[targets]]
            name = "ltc"
            pid_file = "/data/ltc/regtest/litecoind.pid"
            chain = "litecoin"
            datadir = "/data/ltc"
            p2p_ports = [19444]
            "#,
        )
        .unwrap();
        assert_eq!(c.targets[0].chain, Chain::Litecoin);
        assert_eq!(c.targets[0].p2p_ports, vec![19444]);
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(err_key("[http]\nlisten = \"nonsense\""), "http.listen");
        assert_eq!(err_key("[http]\nlisten = \"1.2.3.4:5\"\nbogus = 1"), "http.bogus");
        assert_eq!(err_key("[[targets]]\nname = \"a\""), "targets[0]");
        assert_eq!(err_key("[[targets]]\nname = \"a\"\nprocess = \"x\"\ncgroup = \"/c\""), "targets[0]");
        assert_eq!(err_key("[[targets]]\nname = \"a\"\nprocess = \"x\"\nchain = \"dogecoin\""), "targets[0].chain");
        assert_eq!(err_key("[agent]\ninterval = \"1ms\""), "agent.interval");
        assert_eq!(err_key("[[targets]]\nname = \"a\"\nprocess = \"x\"\n[[targets]]\nname = \"a\"\nprocess = \"y\""), "targets[1].name");
        assert!(err_key("[http\n").starts_with("config (line 1)"));
    }

    #[test]
    fn environment_overrides() {
        let env = vec![
            ("NODESCOPE_HTTP_LISTEN".to_string(), "127.0.0.1:1234".to_string()),
            ("NODESCOPE_LIMITS_TOP_PEERS".to_string(), "7".to_string()),
            ("NODESCOPE_AGENT_INTERVAL".to_string(), "2s".to_string()),
            ("UNRELATED".to_string(), "x".to_string()),
        ];
        let c = Config::from_toml_with_env("[http]\nlisten = \"127.0.0.1:1\"", env).unwrap();
        assert_eq!(c.http.listen.port(), 1234);
        assert_eq!(c.limits.top_peers, 7);
        assert_eq!(c.agent.interval, Duration::from_secs(2));
        let bad = Config::from_toml_with_env("", vec![("NODESCOPE_NOPE_X".into(), "1".into())]);
        assert!(matches!(bad, Err(ConfigError::Invalid { key, .. }) if key == "NODESCOPE_NOPE_X"));
        let bad = Config::from_toml_with_env("", vec![("NODESCOPE_HTTP_PORT".into(), "1".into())]);
        assert!(matches!(bad, Err(ConfigError::Invalid { key, .. }) if key == "http.port"));
    }
}

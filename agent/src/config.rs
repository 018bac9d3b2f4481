//! The agent's configuration: TOML, then `NODESCOPE_<SECTION>_<KEY>`
//! environment overrides, then validation. Every error names the key.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::chain::Chain;

/// How loud a rule is when it fires. Plain data here; the health rules
/// give each rule its default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Warning,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::Warning => "warning",
        }
    }
}

/// The longest container name or id prefix a target's `container` takes
/// (and the longest name discovery gives a container's node).
pub const MAX_CONTAINER_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The config path names something other than a small regular file.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// `key` is the dotted path of the offending key, e.g. `targets[0].p2p_ports`.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    pub fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid { key: key.into(), reason: reason.into() }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub http: HttpConfig,
    pub agent: AgentConfig,
    pub limits: Limits,
    pub log: LogConfig,
    pub otlp: OtlpConfig,
    pub resources: ResourcesConfig,
    pub disk: DiskConfig,
    pub targets: Vec<TargetConfig>,
    /// `[rules.<id>]`: health rule settings for every target.
    pub rules: BTreeMap<String, RuleConfig>,
    /// The file it was read from, read again on SIGHUP.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub listen: SocketAddr,
    /// Connections served at once. Past it a connection is taken into the
    /// probe room, where only /health, /health/live, /health/ready and
    /// /health/agent are answered (others get 503), one request per
    /// connection.
    pub max_connections: usize,
    /// Room kept for probes past `max_connections`; when it is full, the
    /// oldest of its connections that has sent nothing yet makes way.
    pub probe_connections: usize,
    /// Requests per second per client IP address (IPv6: per /64; token
    /// bucket); past it, 429 with Retry-After. Probes are never limited.
    /// 0 turns the limit off.
    pub requests_per_second: u32,
    /// Requests a burst may take above the steady rate.
    pub burst: u32,
    /// A connection with nothing read or written for this long is closed
    /// (keep-alive, or one that never sends a request).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A connection whose client reads none of a response for this long
    /// is closed.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
            max_connections: 128,
            probe_connections: 16,
            requests_per_second: 100,
            burst: 200,
            idle_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(10),
        }
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
    /// How long a discovered node that went away stays listed as down
    /// (node_down firing) before it is forgotten.
    #[serde(with = "humantime_serde")]
    pub forget_absent_after: Duration,
    /// Where the agent keeps its totals across restarts (a small state
    /// file, written after each collection). Set, the kernel side is kept
    /// too, pinned under `pin_dir`, and counters go on across restarts and
    /// upgrades; unset, each start counts from zero and leaves nothing
    /// behind (docs/operations.md, "Across restarts").
    pub state_dir: Option<PathBuf>,
    /// Where the kernel side is pinned when `state_dir` is set (bpffs).
    pub pin_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            interval: Duration::from_secs(5),
            discover: true,
            forget_absent_after: Duration::from_secs(86400),
            state_dir: None,
            pin_dir: PathBuf::from("/sys/fs/bpf/nodescope"),
        }
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
        Limits { max_connections: 16384, top_peers: 128, max_peers: 4096, peer_ttl: Duration::from_secs(300) }
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

/// OTLP export (HTTP/protobuf or gRPC) of the same instruments /metrics
/// serves. Off while no endpoint is set (here or by OTEL_EXPORTER_OTLP_*,
/// which take precedence: see otlp::resolve).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// For http/protobuf the full URL of the collector's metrics endpoint,
    /// e.g. http://127.0.0.1:4318/v1/metrics; for grpc its address,
    /// e.g. http://127.0.0.1:4317
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// Sent with every export (an API key, a tenant)
    pub headers: BTreeMap<String, String>,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum OtlpProtocol {
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: None,
            protocol: OtlpProtocol::default(),
            headers: BTreeMap::new(),
            interval: Duration::from_secs(15),
            timeout: Duration::from_secs(10),
        }
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
    /// A cgroup2 directory the node runs in: absolute, or relative to the
    /// cgroup2 mount (a Kubernetes pod's group, whatever the host mounts
    /// cgroup2 at).
    pub cgroup: Option<PathBuf>,
    /// The node's container (or pod), by name or id prefix.
    pub container: Option<String>,
    #[serde(default = "default_chain")]
    pub chain: Chain,
    pub datadir: Option<PathBuf>,
    #[serde(default)]
    pub p2p_ports: Vec<u16>,
    #[serde(default)]
    pub rpc_ports: Vec<u16>,
    /// SOCKS proxies the node reaches peers through, beyond those its own
    /// config names (`-proxy`, `-onion`, `-i2psam`, monerod's `--proxy`,
    /// `--tx-proxy`): connections to them are service "proxy".
    #[serde(default)]
    pub proxies: Vec<SocketAddr>,
    /// `[targets.rules.<id>]`: this target's health rule settings, over `[rules.<id>]`.
    #[serde(default)]
    pub rules: BTreeMap<String, RuleConfig>,
}

/// One health rule's settings; every key is optional and falls back to
/// `[rules.<id>]`, then to the rule's default (docs/health.md).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub enabled: Option<bool>,
    pub severity: Option<Severity>,
    /// A count, percentage, seconds or days, by rule.
    pub threshold: Option<f64>,
    /// How long the condition must hold before the rule fires.
    #[serde(rename = "for", default, deserialize_with = "rule_duration")]
    pub for_: Option<Duration>,
    /// How long the condition must be false before a firing rule clears.
    #[serde(default, deserialize_with = "rule_duration")]
    pub clear_after: Option<Duration>,
    /// The look-back of rules that compare now with the past.
    #[serde(default, deserialize_with = "rule_duration")]
    pub window: Option<Duration>,
    /// rpc_exposed: client addresses or networks ("10.0.0.0/8", "192.0.2.7")
    /// allowed to use the RPC port besides loopback; a target's list replaces
    /// the global one.
    pub allow: Option<Vec<String>>,
}

/// Durations in rule tables: "90s", "5m", "1h 30m" or whole seconds. A
/// negative one is refused by name rather than as a parse error.
fn rule_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Duration;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a duration such as \"90s\" or \"5m\"")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Duration, E> {
            let v = v.trim();
            if v.starts_with('-') {
                return Err(E::custom(format!("negative duration {v:?}: must be 0s or more")));
            }
            humantime_serde::re::humantime::parse_duration(v).map_err(|e| E::custom(format!("{v:?}: {e}")))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
            u64::try_from(v)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("negative duration {v}: must be 0 or more seconds")))
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(v))
        }
    }
    d.deserialize_any(V).map(Some)
}

/// `[disk]`: the file-write signal (docs/disk.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DiskConfig {
    /// Off: no disk hooks are attached.
    pub enabled: bool,
    /// Which hooks count: the filesystem tracepoints (ext4, xfs; no cost to
    /// processes that write no file), or the syscall tracepoints (any
    /// filesystem; every syscall on the host pays). Never switched silently.
    pub method: DiskMethod,
    /// Files (device, inode, target) the kernel keeps counts for between
    /// two reads (all targets together); writes to files beyond it are not
    /// counted. Their count slots are preallocated: 2 x 272 bytes each.
    pub max_files: u32,
    /// Sync latency histograms, one per file and sync call, between two reads.
    pub max_syncs: u32,
    /// Gone: records are per file identity and read whole every interval.
    /// Kept only to say so.
    pub max_closed: Option<u32>,
    /// `[[disk.classes]]`: file class rules, tried before the chain's built-in ones.
    pub classes: Vec<ClassRule>,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            enabled: true,
            method: DiskMethod::Filesystem,
            max_files: 8192,
            max_syncs: 4096,
            max_closed: None,
            classes: Vec::new(),
        }
    }
}

/// `disk.method`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskMethod {
    /// ext4 and xfs tracepoints, writeback and iomap (ebpf/disk.bpf.c).
    #[default]
    Filesystem,
    /// Syscall tracepoints (ebpf/disk_syscalls.bpf.c): every filesystem, at
    /// a cost to every syscall of every process on the host.
    Syscalls,
}

impl DiskMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskMethod::Filesystem => "filesystem",
            DiskMethod::Syscalls => "syscalls",
        }
    }
}

/// Files whose path ends like one of `paths` are of class `class`, for
/// targets of `chain` (all when unset) or the target named `target`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassRule {
    pub class: String,
    pub paths: Vec<String>,
    #[serde(default)]
    pub chain: Option<Chain>,
    #[serde(default)]
    pub target: Option<String>,
}

/// Class names become label values on every file metric: keep them few.
const MAX_DISK_CLASS_RULES: usize = 64;
const MAX_DISK_CLASSES: usize = 24;

impl DiskConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, v, min, max) in [
            // each file slot is preallocated twice (272 bytes each): 35 MB at the top
            ("disk.max_files", self.max_files, 64, 1 << 16),
            ("disk.max_syncs", self.max_syncs, 64, 1 << 20),
        ] {
            if !(min..=max).contains(&v) {
                return Err(ConfigError::invalid(key, format!("must be between {min} and {max}")));
            }
        }
        if self.max_closed.is_some() {
            return Err(ConfigError::invalid(
                "disk.max_closed",
                "no longer used: records are kept per file (device, inode) and read whole every interval; remove it (disk.max_files bounds them)",
            ));
        }
        if self.classes.len() > MAX_DISK_CLASS_RULES {
            return Err(ConfigError::invalid("disk.classes", format!("at most {MAX_DISK_CLASS_RULES} rules")));
        }
        let mut names = HashSet::new();
        for (i, rule) in self.classes.iter().enumerate() {
            let key = |k: &str| format!("disk.classes[{i}].{k}");
            let c = &rule.class;
            if c.is_empty()
                || c.len() > 32
                || !c.chars().all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
            {
                return Err(ConfigError::invalid(key("class"), "must be 1 to 32 characters of a-z, 0-9 and '_'"));
            }
            names.insert(c.as_str());
            if rule.paths.is_empty() {
                return Err(ConfigError::invalid(key("paths"), "needs at least one pattern"));
            }
            if rule.target.as_deref() == Some("") {
                return Err(ConfigError::invalid(key("target"), "must name a target"));
            }
        }
        if names.len() > MAX_DISK_CLASSES {
            return Err(ConfigError::invalid("disk.classes", format!("at most {MAX_DISK_CLASSES} distinct classes")));
        }
        Ok(())
    }
}

fn default_chain() -> Chain {
    Chain::Generic
}

/// Sections whose scalar keys the environment may override.
const ENV_SECTIONS: &[&str] = &["http", "agent", "limits", "log", "otlp", "resources", "disk"];
const ENV_PREFIX: &str = "NODESCOPE_";

/// A config file is a few KiB; past this it is refused unread.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// The `NODESCOPE_*` variables of the process environment. Others are not
/// looked at (they may be anything, valid UTF-8 or not); one of ours that is
/// not UTF-8 is an error naming it.
pub fn nodescope_env() -> Result<Vec<(String, String)>, ConfigError> {
    use std::os::unix::ffi::OsStrExt;
    let mut vars = Vec::new();
    for (name, value) in std::env::vars_os() {
        if !name.as_bytes().starts_with(ENV_PREFIX.as_bytes()) {
            continue;
        }
        let Some(name) = name.to_str() else {
            return Err(ConfigError::invalid(name.to_string_lossy(), "environment variable name is not valid UTF-8"));
        };
        let Ok(value) = value.into_string() else {
            return Err(ConfigError::invalid(name, "value is not valid UTF-8"));
        };
        vars.push((name.to_string(), value));
    }
    Ok(vars)
}

/// The config file's text: a regular file of at most MAX_CONFIG_BYTES in
/// UTF-8. Opened without blocking, so a FIFO (or a device) is refused at
/// once rather than waited on or read forever.
pub fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let refuse = |reason: String| ConfigError::File { path: path.to_path_buf(), reason };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let meta = file.metadata().map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a file"
        };
        return Err(refuse(format!("is {what}, not a regular file")));
    }
    let too_big = || refuse(format!("larger than {} KiB; a config file is a few KiB", MAX_CONFIG_BYTES >> 10));
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // a file that grows while it is read is still cut at the bound
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_big());
    }
    String::from_utf8(bytes).map_err(|e| refuse(format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to())))
}

impl Config {
    /// Reads `path` (or starts from defaults when None), applies the
    /// environment and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let text = match path {
            Some(p) => read_config_file(p)?,
            None => String::new(),
        };
        let mut config = Self::from_toml_with_env(&text, nodescope_env()?)?;
        config.source = path.map(Path::to_path_buf);
        Ok(config)
    }

    pub fn from_toml_with_env(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| toml_error(text, e))?;
        apply_env(&mut doc, env)?;
        refuse_nul(&toml::Value::Table(doc.clone()), "")?;
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(doc)).map_err(|e| {
            let key = e.path().to_string();
            let reason = e.into_inner().to_string();
            // one line: the deserializer's messages may end in or contain newlines
            let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
            // "." is the document itself, "" a key spelled `""` at its top
            ConfigError::invalid(if key == "." || key.is_empty() { "config".into() } else { key }, reason)
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
        if let Some(dir) = &self.agent.state_dir {
            if !dir.is_absolute() {
                return Err(ConfigError::invalid("agent.state_dir", "must be an absolute path"));
            }
        }
        if !self.agent.pin_dir.is_absolute() || !self.agent.pin_dir.starts_with("/sys/fs/bpf") {
            return Err(ConfigError::invalid("agent.pin_dir", "must be a directory under /sys/fs/bpf"));
        }
        if self.agent.forget_absent_after > Duration::from_secs(30 * 86400) {
            return Err(ConfigError::invalid("agent.forget_absent_after", "must be at most 30 days"));
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
        if self.http.max_connections == 0 || self.http.max_connections > 65_536 {
            return Err(ConfigError::invalid("http.max_connections", "must be between 1 and 65536"));
        }
        if self.http.probe_connections == 0 || self.http.probe_connections > 1024 {
            return Err(ConfigError::invalid("http.probe_connections", "must be between 1 and 1024"));
        }
        for (key, d) in [("http.idle_timeout", self.http.idle_timeout), ("http.write_timeout", self.http.write_timeout)]
        {
            if d < Duration::from_secs(1) || d > Duration::from_secs(3600) {
                return Err(ConfigError::invalid(key, "must be between 1s and 1h"));
            }
        }
        if self.http.requests_per_second > 0 && self.http.burst == 0 {
            return Err(ConfigError::invalid("http.burst", "must be at least 1 while http.requests_per_second is set"));
        }
        if let Some(endpoint) = &self.otlp.endpoint {
            if !(endpoint.starts_with("http://") && endpoint.len() > "http://".len()) {
                return Err(ConfigError::invalid(
                    "otlp.endpoint",
                    "must be an http:// URL (TLS is left to a local collector)",
                ));
            }
        }
        if self.otlp.interval < Duration::from_secs(1) {
            return Err(ConfigError::invalid("otlp.interval", "must be at least 1s"));
        }
        if self.otlp.timeout.is_zero() || self.otlp.timeout > self.otlp.interval {
            return Err(ConfigError::invalid("otlp.timeout", "must be greater than zero and at most otlp.interval"));
        }
        // tracing-subscriber 0.3 slices a directive at positions in its
        // trimmed text: past a leading space, a multi-byte character panics it
        if !self.log.level.is_ascii() {
            return Err(ConfigError::invalid("log.level", "ASCII only (directives such as info,nodescope=debug)"));
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(ConfigError::invalid("log.level", e.to_string()));
        }
        let mut names = HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let key = |k: &str| format!("targets[{i}].{k}");
            if t.name.is_empty() || !t.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(ConfigError::invalid(
                    key("name"),
                    "must be non-empty and use only letters, digits, '-', '_', '.'",
                ));
            }
            if !names.insert(&t.name) {
                return Err(ConfigError::invalid(key("name"), format!("duplicate target name {:?}", t.name)));
            }
            let selectors = [t.pid_file.is_some(), t.process.is_some(), t.cgroup.is_some(), t.container.is_some()];
            match selectors.iter().filter(|s| **s).count() {
                0 => {
                    return Err(ConfigError::invalid(
                        format!("targets[{i}]"),
                        "needs one of pid_file, process, cgroup, container",
                    ))
                }
                1 => {}
                _ => {
                    return Err(ConfigError::invalid(
                        format!("targets[{i}]"),
                        "takes only one of pid_file, process, cgroup, container",
                    ))
                }
            }
            for (k, path) in [("pid_file", &t.pid_file), ("datadir", &t.datadir)] {
                if path.as_ref().is_some_and(|p| !p.is_absolute()) {
                    return Err(ConfigError::invalid(
                        key(k),
                        "must be an absolute path (the agent's working directory is not the config file's)",
                    ));
                }
            }
            if let Some(p) = &t.process {
                if p.is_empty() || p.len() > 15 {
                    return Err(ConfigError::invalid(
                        key("process"),
                        "must be a process name of 1 to 15 characters, as /proc/PID/comm shows it",
                    ));
                }
            }
            if let Some(c) = &t.cgroup {
                let escapes = c.components().any(|part| part == std::path::Component::ParentDir);
                if c.as_os_str().is_empty() || escapes {
                    return Err(ConfigError::invalid(
                        key("cgroup"),
                        "must be a cgroup2 directory: absolute, or relative to the cgroup2 mount, without '..'",
                    ));
                }
            }
            if let Some(c) = &t.container {
                let valid = c.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
                if c.is_empty() || c.len() > MAX_CONTAINER_NAME_LEN || !valid {
                    return Err(ConfigError::invalid(
                        key("container"),
                        format!(
                            "must be a container name or id prefix: 1 to {} letters, digits, '-', '_', '.'",
                            MAX_CONTAINER_NAME_LEN
                        ),
                    ));
                }
            }
            for (k, ports) in [("p2p_ports", &t.p2p_ports), ("rpc_ports", &t.rpc_ports)] {
                if ports.contains(&0) {
                    return Err(ConfigError::invalid(key(k), "port 0 is not a port"));
                }
            }
        }
        self.disk.validate()?;
        if self.targets.len() > crate::bpf::abi::MAX_TARGETS {
            return Err(ConfigError::invalid(
                "targets",
                format!("at most {} targets per agent", crate::bpf::abi::MAX_TARGETS),
            ));
        }
        self.resources.validate()?;
        Ok(())
    }
}

/// Which cgroup hierarchy the resources signal reads; hybrid hosts have both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// cgroup2 when it carries the cpu, memory, io or pids controller, else
    /// v1 when the node is in v1 groups, else cgroup2 with what it has.
    #[default]
    Auto,
    V2,
    V1,
}

/// `[resources]`: the data dir size tracking, the forecast and which cgroup
/// hierarchy to read (docs/metrics.md, Resources).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ResourcesConfig {
    /// "auto", "v2" or "v1": hybrid hosts have both hierarchies.
    pub cgroup_version: CgroupVersion,
    /// Filesystem operations (stat, opendir, 64 entries read) the data dir
    /// size tracking may spend per interval and data dir.
    pub datadir_ops_per_interval: u64,
    /// Files and directories remembered per data dir; past it the size is
    /// reported unknown.
    pub datadir_max_entries: u64,
    /// How often every entry of the data dir is stat'ed again, correcting
    /// what change tracking misses.
    #[serde(with = "humantime_serde")]
    pub datadir_rescan: Duration,
    /// How often a file is created and written in the data dir as the node's user.
    #[serde(with = "humantime_serde")]
    pub datadir_write_test: Duration,
    /// false: no write test at all (the agent then never writes in the data
    /// dir; readiness judges free space alone, nodescope_datadir_writable is absent).
    pub write_test: bool,
    /// Look-back of the growth rates and the days-until-full forecast.
    #[serde(with = "humantime_serde")]
    pub forecast_window: Duration,
}

impl Default for ResourcesConfig {
    fn default() -> Self {
        ResourcesConfig {
            cgroup_version: Default::default(),
            datadir_ops_per_interval: 2000,
            datadir_max_entries: 1_000_000,
            datadir_rescan: Duration::from_secs(3600),
            datadir_write_test: Duration::from_secs(60),
            write_test: true,
            forecast_window: Duration::from_secs(6 * 3600),
        }
    }
}

impl ResourcesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let week = Duration::from_secs(7 * 86400);
        if !(16..=1_000_000).contains(&self.datadir_ops_per_interval) {
            return Err(ConfigError::invalid("resources.datadir_ops_per_interval", "must be between 16 and 1000000"));
        }
        if !(1..=100_000_000).contains(&self.datadir_max_entries) {
            return Err(ConfigError::invalid("resources.datadir_max_entries", "must be between 1 and 100000000"));
        }
        for (key, d) in [
            ("resources.datadir_rescan", self.datadir_rescan),
            ("resources.datadir_write_test", self.datadir_write_test),
            ("resources.forecast_window", self.forecast_window),
        ] {
            if d < Duration::from_secs(1) || d > week {
                return Err(ConfigError::invalid(key, "must be between 1s and 7 days"));
            }
        }
        Ok(())
    }
}

/// A NUL byte in any string (TOML allows "\u0000") is refused by key: no
/// path, name or URL the agent would use can hold one.
fn refuse_nul(v: &toml::Value, key: &str) -> Result<(), ConfigError> {
    let name = |k: &str| if key.is_empty() { k.to_string() } else { format!("{key}.{k}") };
    match v {
        toml::Value::String(s) if s.contains('\0') => {
            Err(ConfigError::invalid(if key.is_empty() { "config" } else { key }, "contains a NUL byte"))
        }
        toml::Value::Table(t) => t.iter().try_for_each(|(k, v)| {
            if k.contains('\0') {
                return Err(ConfigError::invalid(name(&k.replace('\0', "\\0")), "key contains a NUL byte"));
            }
            refuse_nul(v, &name(k))
        }),
        toml::Value::Array(a) => a.iter().enumerate().try_for_each(|(i, v)| refuse_nul(v, &format!("{key}[{i}]"))),
        _ => Ok(()),
    }
}

/// One line: where the TOML is broken and why.
fn toml_error(text: &str, e: toml::de::Error) -> ConfigError {
    let line = e.span().map(|s| text.as_bytes()[..s.start.min(text.len())].iter().filter(|b| **b == b'\n').count() + 1);
    // one line: the parser's messages run over several
    let reason = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
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
fn apply_env(doc: &mut toml::Table, env: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
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
        let table = doc.entry(section.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
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
        assert_eq!(err_key("[[targets]]\nname = \"a\"\ncontainer = \"c\"\ncgroup = \"/c\""), "targets[0]");
        assert_eq!(err_key("[[targets]]\nname = \"a\"\nprocess = \"x\"\nchain = \"dogecoin\""), "targets[0].chain");
        assert_eq!(err_key("[agent]\ninterval = \"1ms\""), "agent.interval");
        assert_eq!(err_key("[otlp]\nendpoint = \"grpc://x:4317\""), "otlp.endpoint");
        assert_eq!(
            err_key("[[targets]]\nname = \"a\"\nprocess = \"x\"\n[[targets]]\nname = \"a\"\nprocess = \"y\""),
            "targets[1].name"
        );
        assert!(err_key("[http\n").starts_with("config (line 1)"));
    }

    #[test]
    fn nul_bytes_and_relative_paths_are_refused_by_key() {
        let target = "[[targets]]\nname = \"a\"\n";
        assert_eq!(err_key(&format!("{target}pid_file = \"/x\\u0000y\"")), "targets[0].pid_file");
        assert_eq!(err_key(&format!("{target}process = \"ab\\u0000\"")), "targets[0].process");
        assert_eq!(err_key("[log]\nlevel = \"info\\u0000\""), "log.level");
        // tracing-subscriber 0.3's directive parser sliced a multi-byte
        // character apart (a panic, found by the config fuzz target)
        assert_eq!(err_key("[log]\nlevel = \" é=info\""), "log.level");
        // an empty top-level key gave an error naming no key (found by the config fuzz target)
        assert_eq!(err_key("\"\" = 1"), "config");
        assert_eq!(err_key(&format!("{target}process = \"x\"\np2p_ports = [1]\ndatadir = \"/d\"\n[targets.rules.\"a\\u0000\"]\nenabled = true")), "targets[0].rules.a\\0");
        let env = vec![("NODESCOPE_HTTP_LISTEN".to_string(), "127.0.0.1:1\0".to_string())];
        assert!(
            matches!(Config::from_toml_with_env("", env), Err(ConfigError::Invalid { key, .. }) if key == "http.listen")
        );
        assert_eq!(err_key(&format!("{target}pid_file = \"rel.pid\"")), "targets[0].pid_file");
        assert_eq!(err_key(&format!("{target}process = \"x\"\ndatadir = \"data\"")), "targets[0].datadir");
        assert!(load(&format!("{target}pid_file = \"/run/a.pid\"\ndatadir = \"/data\"")).is_ok());
    }

    #[test]
    fn target_proxies() {
        let target = "[[targets]]\nname = \"t\"\nprocess = \"bitcoind\"\n";
        let c = load(&format!("{target}proxies = [\"127.0.0.1:9050\", \"[::1]:9150\"]")).unwrap();
        assert_eq!(c.targets[0].proxies, vec!["127.0.0.1:9050".parse().unwrap(), "[::1]:9150".parse().unwrap()]);
        assert!(err_key(&format!("{target}proxies = [\"tor:9050\"]")).starts_with("targets[0].proxies"));
    }

    #[test]
    fn container_and_relative_cgroup_selectors() {
        let c = load(
            r#"
            [[targets]]
            name = "ltc"
            container = "ltc-node"
            chain = "litecoin"
            [[targets]]
            name = "btc"
            cgroup = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b.slice"
            chain = "bitcoin"
            "#,
        )
        .unwrap();
        assert_eq!(c.targets[0].container.as_deref(), Some("ltc-node"));
        assert_eq!(
            c.targets[1].cgroup.as_deref(),
            Some(Path::new("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b.slice"))
        );
        let target = "[[targets]]\nname = \"a\"\n";
        for bad in [
            "container = \"\"",
            "container = \"a b\"",
            "container = \"a/b\"",
            "cgroup = \"\"",
            "cgroup = \"../x\"",
            "cgroup = \"/a/../b\"",
        ] {
            let key = bad.split(' ').next().unwrap();
            assert_eq!(err_key(&format!("{target}{bad}")), format!("targets[0].{key}"), "{bad}");
        }
        assert_eq!(err_key(&format!("{target}container = \"{}\"", "a".repeat(65))), "targets[0].container");
        match load(&format!("{target}container = \"a:b\"")) {
            Err(e) => assert!(e.to_string().starts_with("targets[0].container: must be a container name"), "{e}"),
            Ok(_) => panic!("bad container accepted"),
        }
    }

    #[test]
    fn resources_section() {
        let c = load("[resources]\ncgroup_version = \"v1\"\ndatadir_ops_per_interval = 50\nforecast_window = \"10m\"")
            .unwrap();
        assert_eq!(c.resources.cgroup_version, CgroupVersion::V1);
        assert_eq!(c.resources.datadir_ops_per_interval, 50);
        assert_eq!(c.resources.forecast_window, Duration::from_secs(600));
        assert_eq!(load("").unwrap().resources.datadir_rescan, Duration::from_secs(3600));
        assert_eq!(err_key("[resources]\ncgroup_version = \"v3\""), "resources.cgroup_version");
        assert_eq!(err_key("[resources]\ndatadir_ops = 5"), "resources.datadir_ops");
        assert_eq!(err_key("[resources]\ndatadir_ops_per_interval = 1"), "resources.datadir_ops_per_interval");
        assert_eq!(err_key("[resources]\nforecast_window = \"0s\""), "resources.forecast_window");
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

    #[test]
    fn rule_settings() {
        let c = load(
            r#"
            [rules.no_peers]
            for = "90s"
            clear_after = 30
            [rules.disk_low]
            threshold = 25
            severity = "critical"
            [rules.partition_suspected]
            window = "10s"
            [[targets]]
            name = "ltc"
            process = "litecoind"
            [targets.rules.chain_stalled]
            threshold = 4.5
            enabled = false
            "#,
        )
        .unwrap();
        assert_eq!(c.rules["no_peers"].for_, Some(Duration::from_secs(90)));
        assert_eq!(c.rules["no_peers"].clear_after, Some(Duration::from_secs(30)));
        assert_eq!(c.rules["disk_low"].threshold, Some(25.0));
        assert_eq!(c.rules["disk_low"].severity, Some(Severity::Critical));
        assert_eq!(c.rules["partition_suspected"].window, Some(Duration::from_secs(10)));
        assert_eq!(c.targets[0].rules["chain_stalled"].threshold, Some(4.5));
        assert_eq!(c.targets[0].rules["chain_stalled"].enabled, Some(false));
    }

    #[test]
    fn disk_section() {
        let c = load("").unwrap();
        assert!(c.disk.enabled);
        assert_eq!(c.disk.max_files, 8192);
        let c = load(
            r#"
            [disk]
            max_files = 1024
            [[disk.classes]]
            class = "snapshots"
            paths = ["snapshots/**", "utxo-*.dat"]
            chain = "bitcoin"
            [[disk.classes]]
            class = "blocks"
            paths = ["blk/*.dat"]
            target = "ltc"
            "#,
        )
        .unwrap();
        assert_eq!(c.disk.max_files, 1024);
        assert_eq!(c.disk.classes.len(), 2);
        assert_eq!(c.disk.classes[0].chain, Some(Chain::Bitcoin));
        assert_eq!(c.disk.classes[1].target.as_deref(), Some("ltc"));
        let env = vec![("NODESCOPE_DISK_ENABLED".to_string(), "false".to_string())];
        assert!(!Config::from_toml_with_env("", env).unwrap().disk.enabled);
        assert_eq!(c.disk.method, DiskMethod::Filesystem);
        assert_eq!(load("[disk]\nmethod = \"syscalls\"").unwrap().disk.method, DiskMethod::Syscalls);
        let env = vec![("NODESCOPE_DISK_METHOD".to_string(), "syscalls".to_string())];
        assert_eq!(Config::from_toml_with_env("", env).unwrap().disk.method, DiskMethod::Syscalls);
    }

    #[test]
    fn disk_errors_name_the_key() {
        assert_eq!(
            err_key(
                "[disk]
max_files = 1"
            ),
            "disk.max_files"
        );
        assert_eq!(
            err_key(
                "[disk]
bogus = 1"
            ),
            "disk.bogus"
        );
        assert_eq!(
            err_key(
                "[disk]
method = \"kprobes\""
            ),
            "disk.method"
        );
        assert_eq!(
            err_key(
                "[disk]
max_closed = 8192"
            ),
            "disk.max_closed"
        );
        assert_eq!(
            err_key(
                "[[disk.classes]]
class = \"Blocks\"
paths = [\"x\"]"
            ),
            "disk.classes[0].class"
        );
        assert_eq!(
            err_key(
                "[[disk.classes]]
class = \"b\"
paths = []"
            ),
            "disk.classes[0].paths"
        );
        assert_eq!(
            err_key(
                "[[disk.classes]]
class = \"b\"
paths = [\"x\"]
chain = \"doge\""
            ),
            "disk.classes[0].chain"
        );
        assert_eq!(
            err_key(
                "[[disk.classes]]
class = \"b\"
paths = [\"x\"]
glob = 1"
            ),
            "disk.classes[0].glob"
        );
        assert_eq!(
            err_key(
                "[[disk.classes]]
paths = [\"x\"]"
            ),
            "disk.classes[0]"
        );
    }
}

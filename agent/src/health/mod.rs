//! Health decisions: rules over the signals' snapshots (rules.rs, the
//! catalog and the state machine; conditions.rs, what each rule checks),
//! evaluated once per interval (engine.rs) into a `HealthSnapshot` that the
//! /health endpoints (endpoints.rs) and the `nodescope.health.status` and
//! `nodescope.rule.state` gauges (metrics.rs) read. docs/health.md is the
//! operator's guide.

pub mod conditions;
pub mod endpoints;
pub mod engine;
pub mod metrics;
pub mod rules;

use std::time::{Duration, Instant};

use serde_json::Value;

pub use engine::{HealthEngine, Inputs};
use rules::{Severity, State};

/// A target's (or the agent's) verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Status {
    #[default]
    Healthy,
    /// A warning rule is firing.
    Degraded,
    /// A critical rule is firing.
    Unhealthy,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }

    /// The `nodescope.health.status` gauge value.
    pub fn gauge(self) -> i64 {
        self as i64
    }

    pub fn of(rules: &[RuleStatus]) -> Status {
        rules
            .iter()
            .filter(|r| r.state == State::Firing)
            .map(|r| match r.severity {
                Severity::Critical => Status::Unhealthy,
                Severity::Warning => Status::Degraded,
            })
            .max()
            .unwrap_or(Status::Healthy)
    }
}

#[derive(Debug, Clone)]
pub struct RuleStatus {
    pub id: &'static str,
    pub severity: Severity,
    pub state: State,
    /// Unix seconds the rule entered `state`.
    pub since: u64,
    pub evidence: Value,
}

#[derive(Debug, Clone, Default)]
pub struct TargetHealth {
    pub name: String,
    pub status: Status,
    pub running: bool,
    /// Chain state on disk and listening on a P2P port.
    pub chain_initialized: bool,
    /// Data dir writable and its filesystem above disk_critical's threshold.
    pub storage_available: bool,
    pub storage_size_bytes: Option<u64>,
    pub peers_connected: Option<u64>,
    /// Listening on an RPC port.
    pub rpc_enabled: bool,
    /// RPC connections accepted since the agent started.
    pub rpc_requests: Option<u64>,
    /// The disk signal's method and whether it sees the data dir's
    /// filesystem; None when the disk signal is off.
    pub disk: Option<(&'static str, crate::disk::coverage::Coverage)>,
    /// What the node's own log says of its chain; None before the first read.
    pub chain: Option<crate::chainlog::TargetChain>,
    /// Enabled rules only.
    pub rules: Vec<RuleStatus>,
}

impl TargetHealth {
    /// Ready to serve: running, chain state made, storage usable.
    pub fn ready(&self) -> bool {
        self.running && self.chain_initialized && self.storage_available
    }
}

/// Published once per interval after every signal's snapshot.
#[derive(Debug, Clone, Default)]
pub struct HealthSnapshot {
    /// At least one evaluation ran (the first collection is done).
    pub evaluated: bool,
    pub probes_attached: bool,
    /// When the agent started, for /health/live before the loop's first run.
    pub started: Option<Instant>,
    pub interval: Duration,
    /// History samples dropped at conditions::MAX_SAMPLES.
    pub history_dropped: u64,
    pub targets: Vec<TargetHealth>,
}

impl HealthSnapshot {
    pub fn status(&self) -> Status {
        self.targets.iter().map(|t| t.status).max().unwrap_or(Status::Healthy)
    }

    pub fn target(&self, name: &str) -> Option<&TargetHealth> {
        self.targets.iter().find(|t| t.name == name)
    }
}

//! The /health endpoints: paths, status codes and JSON bodies. The shapes
//! of /health, /health/live, /health/ready and /health/detailed follow the
//! blvm-node reference field for field; the per-target endpoints reuse them.
//! /health/agent is the agent's own readiness (its collections), where
//! /health/ready is the node's. Handlers read only the published snapshots.

use std::time::Instant;

use hyper::StatusCode;
use serde_json::{json, Value};

use super::{HealthSnapshot, RuleStatus, Status, TargetHealth};
use crate::snapshot::LoopStatus;

/// The loop counts as alive while it ran within this many intervals.
pub const LIVE_INTERVALS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint<'a> {
    Health,
    Live,
    Ready,
    /// The agent's own readiness: it collects and serves.
    Agent,
    Detailed,
    Target(&'a str),
    TargetReady(&'a str),
    TargetDetailed(&'a str),
}

pub fn is_health_path(path: &str) -> bool {
    path == "/health" || path.starts_with("/health/")
}

/// Which endpoint `path` names; Err: the status and message to answer.
pub fn parse(path: &str) -> Result<Endpoint<'_>, (StatusCode, String)> {
    let not_found = || {
        (StatusCode::NOT_FOUND, format!("no such endpoint {path:?}; see /health, /health/live, /health/ready, /health/agent, /health/detailed, /health/targets/NAME[/ready|/detailed]"))
    };
    match path {
        "/health" => return Ok(Endpoint::Health),
        "/health/live" => return Ok(Endpoint::Live),
        "/health/ready" => return Ok(Endpoint::Ready),
        "/health/agent" => return Ok(Endpoint::Agent),
        "/health/detailed" => return Ok(Endpoint::Detailed),
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/health/targets/") else { return Err(not_found()) };
    let (name, tail) = match rest.split_once('/') {
        Some((n, t)) => (n, Some(t)),
        None => (rest, None),
    };
    if name.is_empty() {
        return Err(not_found());
    }
    // the same alphabet config allows for target names
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("malformed target name {name:?}: letters, digits, '-', '_', '.' only"),
        ));
    }
    match tail {
        None => Ok(Endpoint::Target(name)),
        Some("ready") => Ok(Endpoint::TargetReady(name)),
        Some("detailed") => Ok(Endpoint::TargetDetailed(name)),
        Some(_) => Err(not_found()),
    }
}

/// The status code and body for `endpoint`.
pub fn respond(
    endpoint: Endpoint,
    health: &HealthSnapshot,
    loop_status: &LoopStatus,
    now: Instant,
    now_unix: u64,
) -> (StatusCode, Value) {
    let verdict = |s: Status| if s == Status::Unhealthy { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    let ready_code = |r: bool| if r { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let target = |name: &str| {
        health
            .target(name)
            .ok_or_else(|| (StatusCode::NOT_FOUND, json!({ "error": format!("no target named {name:?}") })))
    };
    // Before the first evaluation nothing is known of any node: the
    // node-level verdicts say so with 503 rather than a "healthy" that no
    // figure backs (and a target's name is not yet known to be wrong).
    let starting = (StatusCode::SERVICE_UNAVAILABLE, json!({ "status": "starting", "timestamp": now_unix }));
    if !health.evaluated
        && matches!(endpoint, Endpoint::Health | Endpoint::Detailed | Endpoint::Target(_) | Endpoint::TargetDetailed(_))
    {
        return starting;
    }
    // With no node found there is no node to call healthy.
    let overall = |h: &HealthSnapshot| if h.targets.is_empty() { Status::Unhealthy } else { h.status() };
    let answer = match endpoint {
        Endpoint::Health => {
            let s = overall(health);
            Ok((verdict(s), json!({ "status": s.as_str(), "timestamp": now_unix })))
        }
        Endpoint::Live => {
            let alive = live(health, loop_status, now);
            Ok((ready_code(alive), json!({ "status": if alive { "alive" } else { "dead" } })))
        }
        Endpoint::Ready => {
            let ts = &health.targets;
            let all = |f: fn(&TargetHealth) -> bool| !ts.is_empty() && ts.iter().all(f);
            let ready = health.evaluated && health.probes_attached && all(TargetHealth::ready);
            Ok((ready_code(ready), ready_body(ready, all(|t| t.chain_initialized), all(|t| t.storage_available))))
        }
        Endpoint::Agent => {
            let ready = agent_ready(loop_status, now);
            let age = loop_status.last_run.map(|at| now.saturating_duration_since(at).as_secs_f64());
            Ok((
                ready_code(ready),
                json!({
                    "status": if ready { "ready" } else { "not_ready" },
                    "collections": loop_status.runs,
                    "last_collection_seconds_ago": age.map(|a| (a * 1000.0).round() / 1000.0),
                    "interval_seconds": loop_status.interval.as_secs_f64(),
                    "network_probes_attached": health.probes_attached,
                }),
            ))
        }
        Endpoint::Detailed => Ok((verdict(overall(health)), detailed(health))),
        Endpoint::Target(name) => {
            target(name).map(|t| (verdict(t.status), json!({ "status": t.status.as_str(), "timestamp": now_unix })))
        }
        Endpoint::TargetReady(name) => target(name).map(|t| {
            let ready = health.evaluated && health.probes_attached && t.ready();
            (ready_code(ready), ready_body(ready, t.chain_initialized, t.storage_available))
        }),
        Endpoint::TargetDetailed(name) => target(name).map(|t| (verdict(t.status), target_section(t))),
    };
    answer.unwrap_or_else(|e| e)
}

/// The collection loop ran within LIVE_INTERVALS intervals (before its
/// first run: the agent started within them). It judges the agent, not the
/// node.
pub fn live(health: &HealthSnapshot, loop_status: &LoopStatus, now: Instant) -> bool {
    let interval = if loop_status.interval.is_zero() { health.interval } else { loop_status.interval };
    match loop_status.last_run.or(health.started) {
        Some(at) => now.saturating_duration_since(at) <= interval * LIVE_INTERVALS,
        None => false,
    }
}

/// The agent is ready when it has completed a collection within the last
/// LIVE_INTERVALS intervals: what it serves is that recent. It judges the
/// agent, not its nodes (a node that is down is /health/ready's business),
/// and unlike `live` it waits for the first collection.
pub fn agent_ready(loop_status: &LoopStatus, now: Instant) -> bool {
    match loop_status.last_run {
        Some(at) => now.saturating_duration_since(at) <= loop_status.interval * LIVE_INTERVALS,
        None => false,
    }
}

fn ready_body(ready: bool, chain_initialized: bool, storage_available: bool) -> Value {
    json!({
        "status": if ready { "ready" } else { "not_ready" },
        "chain_initialized": chain_initialized,
        "storage_available": storage_available,
    })
}

fn rule_json(target: Option<&str>, r: &RuleStatus) -> Value {
    let mut v = json!({
        "id": r.id,
        "severity": r.severity.as_str(),
        "state": r.state.as_str(),
        "since": r.since,
        "evidence": r.evidence,
    });
    if let Some(t) = target {
        v["target"] = json!(t);
    }
    v
}

/// The reference's sections for one target, plus its rules.
fn sections(status: Status, ts: &[&TargetHealth]) -> serde_json::Map<String, Value> {
    let some = !ts.is_empty();
    // null when any target has no figure (or there is no target)
    let sum = |f: fn(&TargetHealth) -> Option<u64>| -> Option<u64> {
        if some {
            ts.iter().map(|t| f(t)).sum()
        } else {
            None
        }
    };
    let mut m = serde_json::Map::new();
    m.insert("status".into(), json!(status.as_str()));
    m.insert("chain".into(), chain_section(ts));
    m.insert("storage".into(), json!({ "available": some && ts.iter().all(|t| t.storage_available), "size_bytes": sum(|t| t.storage_size_bytes) }));
    // the node's connection limit is its own setting, unseen from outside
    m.insert("network".into(), json!({ "peers_connected": sum(|t| t.peers_connected), "peers_max": null }));
    m.insert(
        "rpc".into(),
        json!({ "enabled": ts.iter().any(|t| t.rpc_enabled), "requests_processed": sum(|t| t.rpc_requests) }),
    );
    m
}

/// The chain's state as the node's log tells it (chainlog.rs), for one
/// target; over several, only whether all are initialized. The tip hash is
/// not read: the node is never asked.
fn chain_section(ts: &[&TargetHealth]) -> Value {
    let initialized = !ts.is_empty() && ts.iter().all(|t| t.chain_initialized);
    let mut v = json!({ "initialized": initialized, "height": null, "tip_hash": null });
    if let [t] = ts {
        if let Some(c) = &t.chain {
            v["height"] = json!(c.height);
            v["tip_age_seconds"] = json!(c.tip_age_seconds.map(|a| a.round()));
            v["sync_progress"] = json!(c.sync_progress);
            v["initial_block_download"] = json!(c.initial_block_download);
            v["source"] = json!(c.source);
            v["log_file"] = json!(c.log_file);
            v["detail"] = json!(c.detail);
        }
    }
    v
}

fn target_section(t: &TargetHealth) -> Value {
    let mut m = serde_json::Map::new();
    m.insert("name".into(), json!(t.name));
    m.extend(sections(t.status, &[t]));
    // whether the disk signal sees the data dir's filesystem (docs/disk.md)
    m.insert(
        "disk".into(),
        match &t.disk {
            Some((method, c)) => json!({
                "method": method,
                "filesystem": c.filesystem,
                "covered": c.covered,
                "sync_latency": c.sync_latency,
                "detail": c.detail,
            }),
            None => Value::Null,
        },
    );
    m.insert("rules".into(), Value::Array(t.rules.iter().map(|r| rule_json(None, r)).collect()));
    Value::Object(m)
}

pub fn detailed(health: &HealthSnapshot) -> Value {
    let all: Vec<&TargetHealth> = health.targets.iter().collect();
    let status = if all.is_empty() { Status::Unhealthy } else { health.status() };
    let mut m = sections(status, &all);
    let rules = health.targets.iter().flat_map(|t| t.rules.iter().map(|r| rule_json(Some(&t.name), r))).collect();
    m.insert("rules".into(), Value::Array(rules));
    m.insert("targets".into(), Value::Array(health.targets.iter().map(target_section).collect()));
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::rules::{Severity, State};
    use std::time::Duration;

    fn snapshot(state: State, severity: Severity) -> HealthSnapshot {
        HealthSnapshot {
            evaluated: true,
            probes_attached: true,
            started: Some(Instant::now()),
            interval: Duration::from_secs(1),
            history_dropped: 0,
            targets: vec![TargetHealth {
                name: "ltc".into(),
                status: Status::of(&[RuleStatus { id: "x", severity, state, since: 1, evidence: json!({}) }]),
                running: true,
                chain_initialized: true,
                storage_available: true,
                storage_size_bytes: Some(1234),
                peers_connected: Some(3),
                rpc_enabled: true,
                rpc_requests: Some(17),
                disk: None,
                chain: Some(crate::chainlog::TargetChain {
                    name: "ltc".into(),
                    source: "log",
                    log_file: Some("/d/regtest/debug.log".into()),
                    height: Some(42),
                    tip_age_seconds: Some(12.4),
                    sync_progress: Some(1.0),
                    initial_block_download: Some(false),
                    ..Default::default()
                }),
                rules: vec![RuleStatus {
                    id: "no_peers",
                    severity,
                    state,
                    since: 1,
                    evidence: json!({"p2p_peers": 0}),
                }],
            }],
        }
    }

    fn get(h: &HealthSnapshot, path: &str) -> (u16, Value) {
        let ls = LoopStatus { last_run: Some(Instant::now()), runs: 1, interval: Duration::from_secs(1) };
        match parse(path) {
            Ok(e) => {
                let (c, v) = respond(e, h, &ls, Instant::now(), 1_700_000_000);
                (c.as_u16(), v)
            }
            Err((c, m)) => (c.as_u16(), json!(m)),
        }
    }

    #[test]
    fn codes_follow_the_verdict() {
        let ok = snapshot(State::Ok, Severity::Critical);
        assert_eq!(get(&ok, "/health"), (200, json!({"status": "healthy", "timestamp": 1_700_000_000})));
        let warn = snapshot(State::Firing, Severity::Warning);
        assert_eq!(get(&warn, "/health").0, 200);
        assert_eq!(get(&warn, "/health").1["status"], "degraded");
        let crit = snapshot(State::Firing, Severity::Critical);
        assert_eq!(get(&crit, "/health"), (503, json!({"status": "unhealthy", "timestamp": 1_700_000_000})));
        assert_eq!(get(&crit, "/health/targets/ltc").0, 503);
        assert_eq!(get(&crit, "/health/live"), (200, json!({"status": "alive"})));
        assert_eq!(
            get(&ok, "/health/ready"),
            (200, json!({"status": "ready", "chain_initialized": true, "storage_available": true}))
        );
        let mut not_yet = ok.clone();
        not_yet.targets[0].storage_available = false;
        assert_eq!(
            get(&not_yet, "/health/ready"),
            (503, json!({"status": "not_ready", "chain_initialized": true, "storage_available": false}))
        );
        assert_eq!(get(&not_yet, "/health/targets/ltc/ready").0, 503);
        let empty = HealthSnapshot { evaluated: true, probes_attached: true, ..Default::default() };
        assert_eq!(get(&empty, "/health/ready").1["status"], "not_ready");
    }

    /// No verdict is claimed before the first evaluation, and no node is
    /// not a healthy node.
    #[test]
    fn before_the_first_evaluation_and_without_targets() {
        let mut first = snapshot(State::Ok, Severity::Critical);
        first.evaluated = false;
        for path in ["/health", "/health/detailed", "/health/targets/ltc", "/health/targets/ltc/detailed"] {
            let (code, v) = get(&first, path);
            assert_eq!((code, v["status"].as_str()), (503, Some("starting")), "{path}");
        }
        assert_eq!(get(&first, "/health/ready").0, 503);
        assert_eq!(get(&first, "/health/live").0, 200, "liveness is the agent's, not the node's");
        let empty = HealthSnapshot { evaluated: true, probes_attached: true, ..Default::default() };
        for path in ["/health", "/health/detailed"] {
            let (code, v) = get(&empty, path);
            assert_eq!((code, v["status"].as_str()), (503, Some("unhealthy")), "{path}");
        }
        assert_eq!(get(&empty, "/health/detailed").1["targets"], json!([]));
    }

    #[test]
    fn detailed_shape() {
        let (code, v) = get(&snapshot(State::Ok, Severity::Critical), "/health/detailed");
        assert_eq!(code, 200);
        let chain = json!({
            "initialized": true, "height": 42, "tip_hash": null, "tip_age_seconds": 12.0, "sync_progress": 1.0,
            "initial_block_download": false, "source": "log", "log_file": "/d/regtest/debug.log", "detail": null,
        });
        assert_eq!(v["chain"], chain);
        assert_eq!(v["targets"][0]["chain"], chain);
        assert_eq!(v["storage"], json!({"available": true, "size_bytes": 1234}));
        assert_eq!(v["network"], json!({"peers_connected": 3, "peers_max": null}));
        assert_eq!(v["rpc"], json!({"enabled": true, "requests_processed": 17}));
        assert_eq!(v["rules"][0]["target"], "ltc");
        assert_eq!(v["targets"][0]["name"], "ltc");
        assert_eq!(v["targets"][0]["rules"][0]["evidence"]["p2p_peers"], 0);
        assert_eq!(
            get(&snapshot(State::Ok, Severity::Critical), "/health/targets/ltc/detailed").1["network"]
                ["peers_connected"],
            3
        );
    }

    #[test]
    fn paths() {
        let h = snapshot(State::Ok, Severity::Critical);
        assert_eq!(get(&h, "/health/targets/nope").0, 404);
        assert_eq!(get(&h, "/health/targets/").0, 404);
        assert_eq!(get(&h, "/health/targets/ltc/bogus").0, 404);
        assert_eq!(get(&h, "/health/").0, 404);
        assert_eq!(get(&h, "/health/livez").0, 404);
        assert_eq!(get(&h, "/health/targets/a%20b").0, 400);
        assert!(is_health_path("/health") && is_health_path("/health/x") && !is_health_path("/healthz"));
    }

    #[test]
    fn live_judges_the_loop() {
        let h = snapshot(State::Ok, Severity::Critical);
        let now = Instant::now();
        let ran = |ago: u64| LoopStatus {
            last_run: Some(now - Duration::from_secs(ago)),
            runs: 5,
            interval: Duration::from_secs(1),
        };
        assert!(live(&h, &ran(2), now));
        assert!(live(&h, &ran(3), now));
        assert!(!live(&h, &ran(4), now));
        assert!(live(&h, &LoopStatus::default(), now), "not run yet but just started");
        assert!(!live(&HealthSnapshot::default(), &LoopStatus::default(), now));
    }

    #[test]
    fn agent_readiness_judges_its_collections_not_the_node() {
        let now = Instant::now();
        let ran = |ago: u64| LoopStatus {
            last_run: Some(now - Duration::from_secs(ago)),
            runs: 5,
            interval: Duration::from_secs(1),
        };
        assert!(agent_ready(&ran(3), now));
        assert!(!agent_ready(&ran(4), now), "no collection for 3 intervals");
        assert!(!agent_ready(&LoopStatus::default(), now), "before the first collection");
        // its node is down and /health/ready says so; the agent is ready
        let mut h = snapshot(State::Firing, Severity::Critical);
        h.targets[0].running = false;
        let (code, v) = respond(Endpoint::Agent, &h, &ran(1), now, 0);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(v["status"], "ready");
        assert_eq!(v["collections"], 5);
        assert_eq!(v["last_collection_seconds_ago"], 1.0);
        assert_eq!(respond(Endpoint::Ready, &h, &ran(1), now, 0).0, StatusCode::SERVICE_UNAVAILABLE);
        let (code, v) = respond(Endpoint::Agent, &h, &ran(10), now, 0);
        assert_eq!((code, &v["status"]), (StatusCode::SERVICE_UNAVAILABLE, &json!("not_ready")));
        let (code, v) = respond(Endpoint::Agent, &HealthSnapshot::default(), &LoopStatus::default(), now, 0);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["last_collection_seconds_ago"], Value::Null);
        assert_eq!(parse("/health/agent"), Ok(Endpoint::Agent));
    }
}

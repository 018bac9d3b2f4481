//! Runs every rule on every target once per interval, from the snapshots
//! the signals just published, and publishes the verdicts as a
//! `HealthSnapshot` for the endpoints and metrics.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use super::conditions::{check, History, Lookbacks, View};
use super::rules::{RuleMachine, RuleParams, Severity, State, Transition, PARTITION_CONNECT_WINDOWS, RULES};
use super::{HealthSnapshot, RuleStatus, Status, TargetHealth};
use crate::chain::Chain;
use crate::config::{Config, RuleConfig};
use crate::disk::DiskSnapshot;
use crate::net::NetSnapshot;
use crate::resources::ResourceSnapshot;
use crate::target::{Direction, Service, Target};

/// This interval's published snapshots.
pub struct Inputs<'a> {
    pub targets: &'a [Target],
    pub net: &'a NetSnapshot,
    pub disk: &'a DiskSnapshot,
    pub resources: &'a ResourceSnapshot,
    /// What each node's own log says of its chain.
    pub chain: &'a crate::chainlog::ChainSnapshot,
    /// The network probes are loaded and attached.
    pub probes_attached: bool,
}

struct TargetState {
    /// The rules' parameters for the target's chain (config does not change
    /// while the agent runs).
    chain: Chain,
    params: Vec<RuleParams>,
    machines: Vec<RuleMachine>,
    history: History,
    /// The node's current process and when it was first seen.
    alive: Option<(u32, f64)>,
    /// The process whose chain state was found on disk: it is not looked
    /// for again until the process changes.
    chain_state_seen: Option<u32>,
}

pub struct HealthEngine {
    started: Instant,
    interval: Duration,
    rules: BTreeMap<String, RuleConfig>,
    target_rules: BTreeMap<String, BTreeMap<String, RuleConfig>>,
    targets: BTreeMap<String, TargetState>,
    /// History samples dropped by targets that have gone, so the exported
    /// counter never goes down.
    history_dropped_gone: u64,
}

impl HealthEngine {
    pub fn new(config: &Config) -> HealthEngine {
        HealthEngine {
            started: Instant::now(),
            interval: config.agent.interval,
            rules: config.rules.clone(),
            target_rules: config.targets.iter().map(|t| (t.name.clone(), t.rules.clone())).collect(),
            targets: BTreeMap::new(),
            history_dropped_gone: 0,
        }
    }

    /// A reloaded config's rules and thresholds: every target's rule
    /// parameters are resolved again at the next evaluation, while each
    /// rule's state (pending since, firing since) is kept.
    pub fn reconfigure(&mut self, config: &Config) {
        self.interval = config.agent.interval;
        self.rules = config.rules.clone();
        self.target_rules = config.targets.iter().map(|t| (t.name.clone(), t.rules.clone())).collect();
        for state in self.targets.values_mut() {
            state.params.clear();
        }
    }

    /// What the endpoints serve before the first evaluation.
    pub fn initial(&self) -> HealthSnapshot {
        HealthSnapshot { started: Some(self.started), interval: self.interval, ..Default::default() }
    }

    pub fn evaluate(&mut self, inputs: &Inputs) -> HealthSnapshot {
        let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
        self.evaluate_at(inputs, self.started.elapsed(), now_unix)
    }

    /// One evaluation at engine time `now` (since start), `now_unix` wall clock.
    pub fn evaluate_at(&mut self, inputs: &Inputs, now: Duration, now_unix: f64) -> HealthSnapshot {
        let unix_of = |t: Duration| (now_unix - now.saturating_sub(t).as_secs_f64()).max(0.0) as u64;
        let gone = &mut self.history_dropped_gone;
        self.targets.retain(|name, state| {
            let keep = inputs.targets.iter().any(|t| &t.name == name);
            if !keep {
                *gone += state.history.dropped;
            }
            keep
        });
        let mut out = Vec::with_capacity(inputs.targets.len());
        for target in inputs.targets {
            let state = self.targets.entry(target.name.clone()).or_insert_with(|| TargetState {
                chain: target.chain,
                params: Vec::new(),
                machines: RULES.iter().map(|_| RuleMachine::new(now)).collect(),
                history: History::default(),
                alive: None,
                chain_state_seen: None,
            });
            if state.params.is_empty() || state.chain != target.chain {
                let target_rules = self.target_rules.get(&target.name);
                state.chain = target.chain;
                state.params = RULES
                    .iter()
                    .map(|def| {
                        RuleParams::resolve(
                            def,
                            target.chain,
                            &[self.rules.get(def.id), target_rules.and_then(|r| r.get(def.id))],
                        )
                    })
                    .collect();
            }
            state.alive = match (target.pid, state.alive) {
                (Some(pid), Some((seen, since))) if seen == pid => Some((pid, since)),
                (Some(pid), _) => Some((pid, now_unix)),
                (None, _) => None,
            };
            let view = View {
                target,
                net: inputs.net.targets.iter().find(|t| t.name == target.name),
                disk: inputs.disk.targets.iter().find(|t| t.name == target.name).filter(|_| inputs.disk.available),
                resources: inputs.resources.targets.iter().find(|t| t.name == target.name),
                now_unix,
                alive_since_unix: state.alive.map(|(_, since)| since),
                chain: inputs.chain.target(&target.name),
            };
            let params = &state.params;
            let window_of =
                |id: &str| RULES.iter().position(|d| d.id == id).map_or(Duration::ZERO, |i| params[i].window);
            let partition_window = window_of("partition_suspected");
            let longest =
                params.iter().map(|p| p.window).fold(partition_window * PARTITION_CONNECT_WINDOWS, Duration::max);
            let lookbacks = Lookbacks {
                peers: partition_window,
                syncs: window_of("fsync_slow"),
                failed_reasons: window_of("connect_failures_high"),
                netgroups: window_of("inbound_flood"),
                longest,
            };
            state.history.record(now, &view, &lookbacks);

            let mut rules = Vec::with_capacity(RULES.len());
            for (i, def) in RULES.iter().enumerate() {
                let p = &params[i];
                if !p.enabled {
                    continue;
                }
                let outcome = check(def.id, p, &view, &state.history, now);
                let m = &mut state.machines[i];
                let transition = m.step(now, p.for_, p.clear_after, outcome);
                if let (Some(since), Value::Object(ev)) = (m.holds_since, &mut m.evidence) {
                    ev.insert("since".into(), json!(unix_of(since)));
                }
                if let Some(t) = transition {
                    log_transition(&target.name, def.id, p.severity, t, &m.evidence);
                }
                rules.push(RuleStatus {
                    id: def.id,
                    severity: p.severity,
                    state: m.state,
                    since: unix_of(m.since),
                    evidence: m.evidence.clone(),
                });
            }

            if state.chain_state_seen != target.pid {
                state.chain_state_seen = target.pid.filter(|_| chain_state_on_disk(target));
            }
            let storage_available = view.resources.is_some_and(|r| {
                let threshold =
                    RULES.iter().position(|d| d.id == "disk_critical").and_then(|i| params[i].threshold).unwrap_or(0.0);
                (r.datadir_writable == Some(true) || r.write_test_off)
                    && r.filesystem.and_then(|fs| fs.available_percent()).is_some_and(|pct| pct >= threshold)
            });
            let listening_p2p = target.p2p_ports.iter().any(|p| target.listening.contains(p));
            let status = Status::of(&rules);
            out.push(TargetHealth {
                name: target.name.clone(),
                status,
                running: target.pid.is_some(),
                chain_initialized: target.pid.is_some() && state.chain_state_seen == target.pid && listening_p2p,
                storage_available,
                storage_size_bytes: view.resources.and_then(|r| r.datadir_size_bytes),
                peers_connected: view.net.map(|n| n.p2p_peers().count() as u64),
                rpc_enabled: target.rpc_ports.iter().any(|p| target.listening.contains(p)),
                rpc_requests: view
                    .net
                    .map(|n| n.churn.get(&(Direction::Inbound, Service::Rpc)).map_or(0, |c| c.opened)),
                disk: view.disk.map(|d| (inputs.disk.method, d.coverage.clone())),
                chain: inputs.chain.target(&target.name).cloned(),
                rules,
            });
        }
        HealthSnapshot {
            evaluated: true,
            probes_attached: inputs.probes_attached,
            started: Some(self.started),
            interval: self.interval,
            history_dropped: self.history_dropped_gone + self.targets.values().map(|s| s.history.dropped).sum::<u64>(),
            targets: out,
        }
    }
}

/// The node has made its chain state: bitcoin and litecoin keep it in
/// chainstate/ and blocks/, monerod in lmdb/. A node of no known chain
/// counts once its data dir exists.
fn chain_state_on_disk(t: &Target) -> bool {
    let Some(dir) = t.host_datadir() else { return false };
    let subdirs: &[&str] = match t.chain {
        Chain::Bitcoin | Chain::Litecoin => &["chainstate", "blocks"],
        Chain::Monero => &["lmdb"],
        Chain::Generic => &[""],
    };
    subdirs.iter().any(|s| dir.join(s).is_dir())
}

fn log_transition(target: &str, rule: &str, severity: Severity, t: Transition, evidence: &Value) {
    let (from, to) = (t.from.as_str(), t.to.as_str());
    let severity = severity.as_str();
    crate::events::rule(target, rule, severity, from, to, evidence);
    // a span per transition (OTLP traces), the log line below inside it
    let _span = tracing::info_span!("rule_transition", target_name = target, rule, severity, from, to).entered();
    match (t.from, t.to) {
        (_, State::Firing) => {
            tracing::warn!(target_name = target, rule, severity, from, evidence = %evidence, "health rule {rule} firing on {target}")
        }
        (State::Firing, State::Ok) => {
            tracing::info!(target_name = target, rule, severity, evidence = %evidence, "health rule {rule} cleared on {target}")
        }
        (State::Unknown, State::Unknown) => {
            tracing::debug!(target_name = target, rule, evidence = %evidence, "health rule {rule} on {target}: unknown")
        }
        _ => {
            tracing::info!(target_name = target, rule, severity, from, to, evidence = %evidence, "health rule {rule} on {target}: {from} -> {to}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::{Connection, TargetNet};

    fn config(text: &str) -> Config {
        Config::from_toml_with_env(text, Vec::new()).unwrap()
    }

    fn target(pid: Option<u32>) -> Target {
        Target::litecoin_for_tests("ltc", pid, &[19444], &[19443], &[19444, 19443])
    }

    fn net(peers: usize) -> NetSnapshot {
        let connections = (0..peers)
            .map(|i| Connection {
                cookie: i as u64,
                address: "127.0.0.1".into(),
                port: 40000 + i as u16,
                local_port: 19444,
                direction: Direction::Inbound,
                service: Service::P2p,
                network: crate::chain::PeerNetwork::Ipv4,
                bytes_sent: 0,
                bytes_received: 0,
                connected_since: None,
                netgroup: "127.0.0.0/16".into(),
            })
            .collect();
        NetSnapshot {
            targets: vec![TargetNet { name: "ltc".into(), connections, ..Default::default() }],
            ..Default::default()
        }
    }

    fn rule<'a>(snap: &'a HealthSnapshot, id: &str) -> &'a RuleStatus {
        snap.targets[0].rules.iter().find(|r| r.id == id).unwrap()
    }

    #[test]
    fn signals_not_wired_are_unknown_never_ok() {
        let mut e = HealthEngine::new(&config(""));
        let targets = [target(Some(1))];
        let inputs = Inputs {
            targets: &targets,
            net: &net(3),
            disk: &DiskSnapshot::default(),
            resources: &ResourceSnapshot::default(),
            chain: &Default::default(),
            probes_attached: true,
        };
        let snap = e.evaluate_at(&inputs, Duration::ZERO, 1000.0);
        for id in
            ["disk_critical", "disk_low", "disk_full_soon", "memory_high", "fds_high", "fsync_slow", "chain_stalled"]
        {
            assert_eq!(rule(&snap, id).state, State::Unknown, "{id}");
        }
        assert_eq!(rule(&snap, "no_peers").state, State::Ok);
        assert_eq!(rule(&snap, "node_down").state, State::Ok);
        assert!(!snap.targets[0].storage_available);
        let no_net = NetSnapshot::default();
        let inputs = Inputs { net: &no_net, ..inputs };
        let snap = e.evaluate_at(&inputs, Duration::from_secs(1), 1001.0);
        assert_eq!(rule(&snap, "no_peers").state, State::Unknown);
        assert_eq!(snap.targets[0].status, Status::Healthy);
    }

    /// A fake clock through the whole engine: no_peers with for=10s,
    /// clear_after=5s, peers toggling every 3s never fires; gone for good,
    /// it fires at 10s with its evidence and /health's status follows.
    #[test]
    fn no_peers_through_the_engine_with_a_fake_clock() {
        let mut e = HealthEngine::new(&config(
            "[rules.no_peers]\nfor = \"10s\"\nclear_after = \"5s\"\n[rules.partition_suspected]\nenabled = false\n",
        ));
        let targets = [target(Some(1))];
        let (disk, res) = (DiskSnapshot::default(), ResourceSnapshot::default());
        let at = |e: &mut HealthEngine, s: u64, peers: usize| {
            let n = net(peers);
            let inputs = Inputs {
                targets: &targets,
                net: &n,
                disk: &disk,
                resources: &res,
                chain: &Default::default(),
                probes_attached: true,
            };
            e.evaluate_at(&inputs, Duration::from_secs(s), 1000.0 + s as f64)
        };
        for s in 0..=60 {
            let snap = at(&mut e, s, if (s / 3) % 2 == 0 { 2 } else { 0 });
            assert_ne!(rule(&snap, "no_peers").state, State::Firing, "flapped at {s}");
            assert_eq!(snap.targets[0].status, Status::Healthy, "at {s}");
        }
        // from 61 (60 had peers): none at all
        let mut fired_at = None;
        for s in 61..81 {
            let snap = at(&mut e, s, 0);
            let r = rule(&snap, "no_peers");
            if r.state == State::Firing && fired_at.is_none() {
                fired_at = Some(s);
                assert_eq!(r.evidence["p2p_peers"], 0);
                assert_eq!(r.evidence["since"], 1061);
                assert_eq!(r.since, 1071);
                assert_eq!(snap.targets[0].status, Status::Unhealthy);
            }
        }
        assert_eq!(fired_at, Some(71));
        // back at 81: clears 5s later
        let cleared: Vec<u64> = (81..91).filter(|s| rule(&at(&mut e, *s, 2), "no_peers").state == State::Ok).collect();
        assert_eq!(cleared.first(), Some(&86));
    }

    #[test]
    fn history_drops_stay_counted_after_their_target_leaves() {
        use super::super::conditions::MAX_SAMPLES;
        let mut e = HealthEngine::new(&config(""));
        let targets = [target(Some(1))];
        let (n, disk, res) = (net(1), DiskSnapshot::default(), ResourceSnapshot::default());
        let inputs = Inputs {
            targets: &targets,
            net: &n,
            disk: &disk,
            resources: &res,
            chain: &Default::default(),
            probes_attached: true,
        };
        // 1ms apart, all inside the default 5-minute look-back: past the bound
        let extra = 10;
        let mut snap = HealthSnapshot::default();
        for i in 0..(MAX_SAMPLES + extra) as u64 {
            snap = e.evaluate_at(&inputs, Duration::from_millis(i), 1000.0);
        }
        assert_eq!(snap.history_dropped, extra as u64);
        let gone = Inputs { targets: &[], ..inputs };
        assert_eq!(
            e.evaluate_at(&gone, Duration::from_secs(10), 1010.0).history_dropped,
            extra as u64,
            "a counter never goes down"
        );
    }

    #[test]
    fn disabled_rules_are_left_out_and_targets_that_leave_are_forgotten() {
        let mut e = HealthEngine::new(&config(
            "[[targets]]\nname = \"ltc\"\nprocess = \"litecoind\"\n[targets.rules.low_peers]\nenabled = false\n",
        ));
        let targets = [target(None)];
        let (n, disk, res) = (net(0), DiskSnapshot::default(), ResourceSnapshot::default());
        let inputs = Inputs {
            targets: &targets,
            net: &n,
            disk: &disk,
            resources: &res,
            chain: &Default::default(),
            probes_attached: true,
        };
        let snap = e.evaluate_at(&inputs, Duration::ZERO, 0.0);
        assert!(snap.targets[0].rules.iter().all(|r| r.id != "low_peers"));
        assert_eq!(snap.targets[0].rules.len(), RULES.len() - 1);
        assert_eq!(rule(&snap, "node_down").state, State::Pending);
        let inputs = Inputs { targets: &[], ..inputs };
        let snap = e.evaluate_at(&inputs, Duration::from_secs(1), 1.0);
        assert!(snap.targets.is_empty());
        assert!(e.targets.is_empty());
    }
}

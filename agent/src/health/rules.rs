//! The rule catalog (ids, severities, defaults), how config overrides a
//! rule's parameters, and the state machine that turns a condition sampled
//! once per interval into a verdict that does not flap.
//!
//! Time here is a monotonic `Duration` (since the engine started) so the
//! machine can be driven by a fake clock in tests and is immune to wall-clock
//! jumps; the engine turns it into unix seconds for output.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::chain::Chain;
pub use crate::config::Severity;
use crate::config::{Config, ConfigError, RuleConfig};

/// What a rule's `threshold` counts; config validation checks its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThresholdKind {
    /// The rule takes no threshold (its condition is a plain fact).
    None,
    /// A number of peers, at least 0.
    Count,
    /// 0 to 100.
    Percent,
    /// More than 0.
    Seconds,
    /// More than 0.
    Days,
    /// Connections per minute or per hour: 0 or more.
    Rate,
}

impl ThresholdKind {
    /// Why `value` is out of range for this kind, or None when it is fine.
    pub fn check(self, value: f64) -> Option<&'static str> {
        if !value.is_finite() {
            return Some("must be a finite number");
        }
        match self {
            ThresholdKind::None => Some("this rule takes no threshold"),
            ThresholdKind::Count if value < 0.0 => Some("a count of peers: must be 0 or more"),
            ThresholdKind::Percent if !(0.0..=100.0).contains(&value) => {
                Some("a percentage: must be between 0 and 100")
            }
            ThresholdKind::Seconds if value <= 0.0 => Some("seconds: must be greater than 0"),
            ThresholdKind::Days if value <= 0.0 => Some("days: must be greater than 0"),
            ThresholdKind::Rate if value < 0.0 => Some("a rate of connections: must be 0 or more"),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultThreshold {
    None,
    Value(f64),
    /// The gap between blocks a healthy chain exceeds about once a month:
    /// blocks come as a Poisson process, a gap is longer than t with
    /// chance e^(-t/T), so t = T x ln(blocks per 30 days), in whole seconds.
    MonthlyGap,
}

#[derive(Debug, Clone, Copy)]
pub struct RuleDef {
    pub id: &'static str,
    pub severity: Severity,
    pub threshold_kind: ThresholdKind,
    pub threshold: DefaultThreshold,
    pub for_: Duration,
    pub clear_after: Duration,
    /// The look-back of rules that compare now with the past; None: the
    /// rule takes no `window`.
    pub window: Option<Duration>,
}

const fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

const fn rule(
    id: &'static str,
    severity: Severity,
    threshold_kind: ThresholdKind,
    threshold: DefaultThreshold,
    for_: Duration,
    clear_after: Duration,
    window: Option<Duration>,
) -> RuleDef {
    RuleDef { id, severity, threshold_kind, threshold, for_, clear_after, window }
}

use DefaultThreshold as T;
use Severity::{Critical, Warning};
use ThresholdKind as K;

/// Every rule, in the order endpoints and metrics list them. docs/health.md
/// explains each; keep the two in step.
pub const RULES: &[RuleDef] = &[
    rule("node_down", Critical, K::None, T::None, secs(60), secs(60), None),
    rule("no_peers", Critical, K::None, T::None, secs(300), secs(120), None),
    rule("disk_critical", Critical, K::Percent, T::Value(5.0), secs(0), secs(300), None),
    // window: the mass-disconnect look-back; the all-connects-failed arm
    // looks back PARTITION_CONNECT_WINDOWS windows. A short `for`: a loss
    // that lasts one interval (a node closing its peers before its log says
    // it stops) does not fire it.
    rule("partition_suspected", Critical, K::Percent, T::Value(80.0), secs(30), secs(300), Some(secs(60))),
    rule("low_peers", Warning, K::Count, T::Value(5.0), secs(300), secs(300), None),
    rule("no_outbound", Warning, K::None, T::None, secs(600), secs(300), None),
    rule("low_netgroup_diversity", Warning, K::Percent, T::Value(50.0), secs(600), secs(600), None),
    // The stall time is the threshold itself, so no extra `for`.
    rule("chain_stalled", Warning, K::Seconds, T::MonthlyGap, secs(0), secs(0), None),
    rule("disk_low", Warning, K::Percent, T::Value(20.0), secs(0), secs(300), None),
    rule("disk_full_soon", Warning, K::Days, T::Value(7.0), secs(3600), secs(600), None),
    rule("memory_high", Warning, K::Percent, T::Value(80.0), secs(300), secs(300), None),
    rule("fds_high", Warning, K::Percent, T::Value(80.0), secs(300), secs(300), None),
    // for: a single slow burst (a backup, a compaction) inside the window
    // is not a slow disk; 2 minutes of it is
    rule("fsync_slow", Warning, K::Seconds, T::Value(1.0), secs(120), secs(300), Some(secs(300))),
    rule("rpc_exposed", Critical, K::None, T::None, secs(0), secs(60), None),
    // threshold: inbound peer connections per minute, averaged over the window
    rule("inbound_flood", Warning, K::Rate, T::Value(60.0), secs(0), secs(300), Some(secs(60))),
    // threshold: % of outbound connects that failed over the window
    rule("connect_failures_high", Warning, K::Percent, T::Value(80.0), secs(0), secs(300), Some(secs(600))),
    // threshold: peers replaced per hour, averaged over the window
    rule("peer_churn_high", Warning, K::Rate, T::Value(300.0), secs(0), secs(600), Some(secs(3600))),
];

/// connect_failures_high judges a window only with at least this many
/// outbound connects in it: one failed connect of one is not a rate.
pub const CONNECT_FAILURES_MIN_ATTEMPTS: u64 = 5;

/// The rules that take an `allow` list.
const TAKES_ALLOW: &[&str] = &["rpc_exposed"];

/// An `allow` entry: a network ("10.0.0.0/8") or one address ("192.0.2.7").
pub fn parse_allow(entry: &str) -> Option<ipnet::IpNet> {
    let entry = entry.trim();
    entry.parse::<ipnet::IpNet>().ok().or_else(|| entry.parse::<std::net::IpAddr>().ok().map(ipnet::IpNet::from))
}

/// partition_suspected's second arm (every outbound connect failed) looks
/// back this many of the rule's windows: 5 minutes by default.
pub const PARTITION_CONNECT_WINDOWS: u32 = 5;

/// Mass disconnects are judged only among at least this many peers: losing
/// the one peer a node had is no_peers' business, not a partition.
pub const PARTITION_MIN_PEERS: usize = 2;

pub fn definition(id: &str) -> Option<&'static RuleDef> {
    RULES.iter().find(|r| r.id == id)
}

pub fn rule_ids() -> Vec<&'static str> {
    RULES.iter().map(|r| r.id).collect()
}

/// Longer than this is a typo, and would overflow time arithmetic later.
const MAX_RULE_DURATION: Duration = Duration::from_secs(365 * 86400);

/// The config's `[rules]` and each target's against these definitions (the
/// part of config checking only the rules can do).
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    validate_rules("rules", &config.rules)?;
    for (i, t) in config.targets.iter().enumerate() {
        validate_rules(&format!("targets[{i}].rules"), &t.rules)?;
    }
    Ok(())
}

/// Rule ids must exist, thresholds must fit what the rule counts, and
/// durations must be sane; errors name e.g. `targets[0].rules.disk_low.threshold`.
fn validate_rules(prefix: &str, rules: &BTreeMap<String, RuleConfig>) -> Result<(), ConfigError> {
    for (id, rc) in rules {
        let key = |k: &str| format!("{prefix}.{id}.{k}");
        let Some(def) = definition(id) else {
            return Err(ConfigError::invalid(
                format!("{prefix}.{id}"),
                format!("unknown rule; rules are {}", rule_ids().join(", ")),
            ));
        };
        if let Some(v) = rc.threshold {
            if let Some(why) = def.threshold_kind.check(v) {
                return Err(ConfigError::invalid(key("threshold"), format!("{why} (rule {id})")));
            }
        }
        for (k, d) in [("for", rc.for_), ("clear_after", rc.clear_after), ("window", rc.window)] {
            if d.is_some_and(|d| d > MAX_RULE_DURATION) {
                return Err(ConfigError::invalid(key(k), "must be at most 365 days"));
            }
        }
        if let Some(allow) = &rc.allow {
            if !TAKES_ALLOW.contains(&id.as_str()) {
                return Err(ConfigError::invalid(
                    key("allow"),
                    format!("rule {id} takes no allow list (only {})", TAKES_ALLOW.join(", ")),
                ));
            }
            if let Some(bad) = allow.iter().find(|a| parse_allow(a).is_none()) {
                return Err(ConfigError::invalid(
                    key("allow"),
                    format!("{bad:?} is not an IP address or network such as \"10.0.0.0/8\""),
                ));
            }
        }
        if let Some(w) = rc.window {
            if def.window.is_none() {
                return Err(ConfigError::invalid(key("window"), format!("rule {id} takes no window")));
            }
            if w.is_zero() {
                return Err(ConfigError::invalid(key("window"), "must be greater than zero"));
            }
        }
    }
    Ok(())
}

/// One rule's parameters for one target: the defaults, then `[rules.<id>]`,
/// then the target's `[targets.rules.<id>]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleParams {
    pub enabled: bool,
    pub severity: Severity,
    /// None for rules that take no threshold.
    pub threshold: Option<f64>,
    pub for_: Duration,
    pub clear_after: Duration,
    pub window: Duration,
    /// rpc_exposed: clients allowed besides loopback.
    pub allow: Vec<ipnet::IpNet>,
}

impl RuleParams {
    pub fn resolve(def: &RuleDef, chain: Chain, layers: &[Option<&RuleConfig>]) -> RuleParams {
        let mut p = RuleParams {
            enabled: true,
            severity: def.severity,
            threshold: match def.threshold {
                T::None => None,
                T::Value(v) => Some(v),
                T::MonthlyGap => {
                    let interval = chain.block_interval().as_secs_f64();
                    Some((interval * (30.0 * 86400.0 / interval).ln()).round())
                }
            },
            for_: def.for_,
            clear_after: def.clear_after,
            window: def.window.unwrap_or_default(),
            allow: Vec::new(),
        };
        for layer in layers.iter().flatten() {
            if let Some(v) = layer.enabled {
                p.enabled = v;
            }
            if let Some(v) = layer.severity {
                p.severity = v;
            }
            if let Some(v) = layer.threshold {
                p.threshold = Some(v);
            }
            if let Some(v) = layer.for_ {
                p.for_ = v;
            }
            if let Some(v) = layer.clear_after {
                p.clear_after = v;
            }
            if let Some(v) = layer.window {
                p.window = v;
            }
            if let Some(v) = &layer.allow {
                p.allow = v.iter().filter_map(|a| parse_allow(a)).collect();
            }
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Ok,
    Pending,
    Firing,
    Unknown,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Pending => "pending",
            State::Firing => "firing",
            State::Unknown => "unknown",
        }
    }

    /// The `nodescope.rule.state` gauge value.
    pub fn gauge(self) -> i64 {
        match self {
            State::Ok => 0,
            State::Pending => 1,
            State::Firing => 2,
            State::Unknown => -1,
        }
    }
}

/// What a rule's condition says this interval, with the values behind it.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The condition holds.
    Holds(Value),
    /// The condition does not hold.
    Clear(Value),
    /// The signal the rule needs is not available.
    Unknown(Value),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: State,
    pub to: State,
}

/// One rule on one target across intervals.
#[derive(Debug, Clone)]
pub struct RuleMachine {
    pub state: State,
    /// When `state` was entered.
    pub since: Duration,
    /// When the condition last started to hold (continuously since).
    pub holds_since: Option<Duration>,
    /// While firing: when the condition stopped holding (continuously since).
    pub clear_since: Option<Duration>,
    /// The values behind the current state: while firing, those that made
    /// it fire (the last interval the condition held).
    pub evidence: Value,
    /// Before the first step: the first verdict is not a transition to log.
    pub fresh: bool,
}

impl RuleMachine {
    pub fn new(now: Duration) -> RuleMachine {
        RuleMachine {
            state: State::Unknown,
            since: now,
            holds_since: None,
            clear_since: None,
            evidence: Value::Null,
            fresh: true,
        }
    }

    /// Feeds one interval's outcome; returns the transition it caused.
    ///
    /// ok -> pending when the condition holds, pending -> firing once it held
    /// for `for_` without a break (a break sends pending back to ok, so a
    /// condition toggling faster than `for_` never fires), firing -> ok once
    /// it has been false for `clear_after` without a break (a condition
    /// toggling faster than that keeps it firing).
    pub fn step(
        &mut self,
        now: Duration,
        for_: Duration,
        clear_after: Duration,
        outcome: Outcome,
    ) -> Option<Transition> {
        let from = self.state;
        let fresh = std::mem::replace(&mut self.fresh, false);
        let to = match outcome {
            Outcome::Unknown(why) => {
                self.holds_since = None;
                self.clear_since = None;
                self.evidence = why;
                State::Unknown
            }
            Outcome::Holds(evidence) => {
                self.clear_since = None;
                let start = *self.holds_since.get_or_insert(now);
                self.evidence = evidence;
                if from == State::Firing || now.saturating_sub(start) >= for_ {
                    State::Firing
                } else {
                    State::Pending
                }
            }
            Outcome::Clear(evidence) => {
                self.holds_since = None;
                if from == State::Firing {
                    let start = *self.clear_since.get_or_insert(now);
                    if now.saturating_sub(start) >= clear_after {
                        self.clear_since = None;
                        self.evidence = evidence;
                        State::Ok
                    } else {
                        // keep what made it fire; the current values say why it may clear
                        if let Value::Object(m) = &mut self.evidence {
                            m.insert("now".into(), evidence);
                        }
                        State::Firing
                    }
                } else {
                    self.evidence = evidence;
                    State::Ok
                }
            }
        };
        self.state = to;
        if to != from || fresh {
            self.since = now;
            if fresh && matches!(to, State::Ok) {
                return None;
            }
            return Some(Transition { from, to });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn holds() -> Outcome {
        Outcome::Holds(json!({"p2p_peers": 0}))
    }

    fn clear() -> Outcome {
        Outcome::Clear(json!({"p2p_peers": 3}))
    }

    /// Drives a machine with one outcome per second from `start`.
    fn drive(m: &mut RuleMachine, start: u64, for_: u64, clear_after: u64, outcomes: &[Outcome]) -> Vec<State> {
        outcomes
            .iter()
            .enumerate()
            .map(|(i, o)| {
                m.step(t(start + i as u64), t(for_), t(clear_after), o.clone());
                m.state
            })
            .collect()
    }

    #[test]
    fn ok_pending_firing_then_clears_after_clear_after() {
        let mut m = RuleMachine::new(t(0));
        assert_eq!(m.step(t(0), t(3), t(2), clear()), None, "a first ok is not a transition");
        assert_eq!(m.state, State::Ok);
        assert_eq!(m.step(t(1), t(3), t(2), holds()), Some(Transition { from: State::Ok, to: State::Pending }));
        assert_eq!(m.step(t(2), t(3), t(2), holds()), None);
        assert_eq!(m.step(t(3), t(3), t(2), holds()), None, "held 2s of 3");
        assert_eq!(m.step(t(4), t(3), t(2), holds()), Some(Transition { from: State::Pending, to: State::Firing }));
        assert_eq!(m.since, t(4));
        assert_eq!(m.holds_since, Some(t(1)));
        // false for less than clear_after: still firing, evidence kept
        assert_eq!(m.step(t(5), t(3), t(2), clear()), None);
        assert_eq!(m.state, State::Firing);
        assert_eq!(m.evidence["p2p_peers"], 0);
        assert_eq!(m.step(t(6), t(3), t(2), clear()), None);
        assert_eq!(m.step(t(7), t(3), t(2), clear()), Some(Transition { from: State::Firing, to: State::Ok }));
        assert_eq!(m.evidence["p2p_peers"], 3);
    }

    #[test]
    fn zero_for_fires_at_once() {
        let mut m = RuleMachine::new(t(0));
        assert_eq!(m.step(t(10), t(0), t(0), holds()), Some(Transition { from: State::Unknown, to: State::Firing }));
        assert_eq!(m.step(t(11), t(0), t(0), clear()), Some(Transition { from: State::Firing, to: State::Ok }));
    }

    #[test]
    fn condition_toggling_faster_than_for_never_fires() {
        let mut m = RuleMachine::new(t(0));
        let flapping: Vec<Outcome> = (0..600).map(|i| if (i / 4) % 2 == 0 { holds() } else { clear() }).collect();
        let states = drive(&mut m, 0, 5, 5, &flapping);
        assert!(!states.contains(&State::Firing), "{states:?}");
        assert!(states.contains(&State::Pending));
    }

    #[test]
    fn condition_toggling_faster_than_clear_after_keeps_firing() {
        let mut m = RuleMachine::new(t(0));
        drive(&mut m, 0, 2, 5, &[holds(), holds(), holds()]);
        assert_eq!(m.state, State::Firing);
        let fired_at = m.since;
        // false 4s, true 1s, over and over: never false for 5s in a row
        let flapping: Vec<Outcome> = (0..300).map(|i| if i % 5 == 4 { holds() } else { clear() }).collect();
        let states = drive(&mut m, 3, 2, 5, &flapping);
        assert!(states.iter().all(|s| *s == State::Firing), "{states:?}");
        assert_eq!(m.since, fired_at, "no transitions while flapping");
        // then false for good: clears exactly clear_after later
        let states = drive(&mut m, 303, 2, 5, &vec![clear(); 7]);
        assert_eq!(
            states,
            vec![State::Firing, State::Firing, State::Firing, State::Firing, State::Firing, State::Ok, State::Ok]
        );
    }

    #[test]
    fn unknown_is_never_ok_and_resets_timers() {
        let mut m = RuleMachine::new(t(0));
        assert_eq!(
            m.step(t(0), t(3), t(3), Outcome::Unknown(json!({"reason": "disk signal off"}))),
            Some(Transition { from: State::Unknown, to: State::Unknown }),
            "the first verdict is reported even when unknown"
        );
        assert_eq!(m.step(t(1), t(3), t(3), Outcome::Unknown(json!({}))), None);
        m.step(t(2), t(3), t(3), holds());
        assert_eq!(m.state, State::Pending);
        m.step(t(3), t(3), t(3), Outcome::Unknown(json!({})));
        assert_eq!(m.state, State::Unknown);
        m.step(t(4), t(3), t(3), holds());
        assert_eq!(m.state, State::Pending, "the hold starts again after a gap");
        assert_eq!(m.holds_since, Some(t(4)));
    }

    #[test]
    fn params_layer_over_defaults() {
        let def = definition("chain_stalled").unwrap();
        let p = RuleParams::resolve(def, Chain::Litecoin, &[]);
        // T x ln(blocks a month): 150 s x ln 17280, 600 s x ln 4320, 120 s x ln 21600
        assert_eq!(p.threshold, Some(1464.0));
        assert_eq!(RuleParams::resolve(def, Chain::Bitcoin, &[]).threshold, Some(5023.0));
        assert_eq!(RuleParams::resolve(def, Chain::Monero, &[]).threshold, Some(1198.0));
        let global = RuleConfig { threshold: Some(10.0), clear_after: Some(t(7)), ..Default::default() };
        let target = RuleConfig { threshold: Some(4.0), severity: Some(Severity::Critical), ..Default::default() };
        let p = RuleParams::resolve(def, Chain::Litecoin, &[Some(&global), Some(&target)]);
        assert_eq!((p.threshold, p.clear_after, p.severity), (Some(4.0), t(7), Severity::Critical));
        assert!(p.enabled);
    }

    #[test]
    fn allow_lists_parse_and_the_target_replaces_the_global() {
        assert_eq!(parse_allow("10.0.0.0/8"), Some("10.0.0.0/8".parse().unwrap()));
        assert_eq!(parse_allow(" 192.0.2.7 "), Some("192.0.2.7/32".parse().unwrap()));
        assert_eq!(parse_allow("2001:db8::/32"), Some("2001:db8::/32".parse().unwrap()));
        assert_eq!(parse_allow("example.org"), None);
        let def = definition("rpc_exposed").unwrap();
        let global = RuleConfig { allow: Some(vec!["10.0.0.0/8".into()]), ..Default::default() };
        let target = RuleConfig { allow: Some(vec!["192.0.2.7".into()]), ..Default::default() };
        let p = RuleParams::resolve(def, Chain::Litecoin, &[Some(&global)]);
        assert_eq!(p.allow, vec!["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]);
        let p = RuleParams::resolve(def, Chain::Litecoin, &[Some(&global), Some(&target)]);
        assert_eq!(p.allow, vec!["192.0.2.7/32".parse::<ipnet::IpNet>().unwrap()]);
    }

    #[test]
    fn allow_lists_are_checked() {
        let check = |id: &str, allow: &[&str]| {
            let rc = RuleConfig { allow: Some(allow.iter().map(|a| a.to_string()).collect()), ..Default::default() };
            match validate_rules("rules", &BTreeMap::from([(id.to_string(), rc)])) {
                Ok(()) => None,
                Err(ConfigError::Invalid { key, .. }) => Some(key),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(check("rpc_exposed", &["10.0.0.0/8", "::1", "192.0.2.7"]), None);
        assert_eq!(check("rpc_exposed", &["10.0.0.0/8", "ten"]).as_deref(), Some("rules.rpc_exposed.allow"));
        assert_eq!(check("no_peers", &["10.0.0.0/8"]).as_deref(), Some("rules.no_peers.allow"));
    }

    #[test]
    fn catalog_is_consistent() {
        let mut ids = rule_ids();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), RULES.len(), "duplicate rule ids");
        for r in RULES {
            assert_eq!(r.threshold_kind == ThresholdKind::None, r.threshold == DefaultThreshold::None, "{}", r.id);
            if let DefaultThreshold::Value(v) = r.threshold {
                assert_eq!(r.threshold_kind.check(v), None, "{}", r.id);
            }
        }
    }
}

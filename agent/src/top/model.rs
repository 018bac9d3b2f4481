//! What `nodescope top` shows, computed from readings of the agent's
//! endpoints: each reading is /health/detailed, /peers and /metrics taken
//! together; rates come from the difference between readings of two
//! different collections of the agent.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fetch::{self, AgentUrl, FetchError};
use super::prom::{self, Sample};

/// Counts the agent's collections: a reading with a new count is new data.
const COLLECTIONS: &str = "nodescope_collection_duration_seconds_count";

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub id: String,
    pub severity: String,
    pub state: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TargetHealth {
    pub name: String,
    pub status: String,
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    pub target: String,
    pub address: String,
    pub port: u64,
    pub local_port: u64,
    pub direction: String,
    pub service: String,
    pub sent: u64,
    pub received: u64,
    pub connected_since: Option<u64>,
    pub netgroup: String,
}

impl Peer {
    fn key(&self) -> (&str, &str, u64, u64, &str) {
        (&self.target, &self.address, self.port, self.local_port, &self.direction)
    }
    /// `address:port`, IPv6 in brackets.
    pub fn endpoint(&self) -> String {
        if self.address.contains(':') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }
}

/// One reading of the agent's three endpoints.
#[derive(Debug, Clone)]
pub struct Reading {
    pub at: Instant,
    /// Unix seconds when it was taken.
    pub unix: u64,
    pub collections: Option<f64>,
    pub health: Vec<TargetHealth>,
    pub peers: Vec<Peer>,
    pub metrics: Vec<Sample>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Reads /health/detailed, /peers and /metrics.
pub fn read(url: &AgentUrl, timeout: Duration) -> Result<Reading, FetchError> {
    let get = |path: &str, ok: &[u16]| -> Result<String, FetchError> {
        let (status, body) = fetch::get(url, path, timeout)?;
        if !ok.contains(&status) {
            let body: String = body.chars().take(200).collect();
            return Err(FetchError(format!(
                "{}: GET {path} answered {status} ({}); is this a nodescope agent?",
                url.text,
                body.trim()
            )));
        }
        Ok(body)
    };
    let json = |path: &str, body: &str| -> Result<Value, FetchError> {
        serde_json::from_str(body).map_err(|e| FetchError(format!("{}: GET {path}: not JSON: {e}", url.text)))
    };
    // an unhealthy verdict is a 503 with the same body
    let health = get("/health/detailed", &[200, 503])?;
    let health = parse_health(&json("/health/detailed", &health)?);
    let peers = get("/peers", &[200])?;
    let peers = parse_peers(&json("/peers", &peers)?);
    let metrics = prom::parse(&get("/metrics", &[200])?);
    let collections = prom::sum(&metrics, COLLECTIONS, &[]);
    Ok(Reading { at: Instant::now(), unix: unix_now(), collections, health, peers, metrics })
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        v => v.to_string(),
    }
}

pub fn parse_health(v: &Value) -> Vec<TargetHealth> {
    let empty = Vec::new();
    v["targets"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .map(|t| TargetHealth {
            name: text(&t["name"]),
            status: text(&t["status"]),
            rules: t["rules"]
                .as_array()
                .unwrap_or(&empty)
                .iter()
                .map(|r| Rule { id: text(&r["id"]), severity: text(&r["severity"]), state: text(&r["state"]) })
                .collect(),
        })
        .collect()
}

pub fn parse_peers(v: &Value) -> Vec<Peer> {
    let empty = Vec::new();
    let mut out = Vec::new();
    for t in v["targets"].as_array().unwrap_or(&empty) {
        let target = text(&t["name"]);
        for p in t["peers"].as_array().unwrap_or(&empty) {
            out.push(Peer {
                target: target.clone(),
                address: text(&p["address"]),
                port: p["port"].as_u64().unwrap_or(0),
                local_port: p["local_port"].as_u64().unwrap_or(0),
                direction: text(&p["direction"]),
                // /peers lists P2P connections; a `service` field, where the agent gives one, says which kind
                service: p["service"].as_str().unwrap_or("p2p").to_string(),
                sent: p["bytes_sent"].as_u64().unwrap_or(0),
                received: p["bytes_received"].as_u64().unwrap_or(0),
                connected_since: p["connected_since"].as_u64(),
                netgroup: text(&p["netgroup"]),
            });
        }
    }
    out
}

/// The readings of distinct collections over the last `window` (at least two kept).
pub struct History {
    readings: VecDeque<Reading>,
    window: Duration,
}

impl History {
    pub fn new(window: Duration) -> History {
        History { readings: VecDeque::new(), window }
    }

    /// Adds a reading; false when it holds the same collection as the last one (kept out).
    pub fn push(&mut self, r: Reading) -> bool {
        if let (Some(last), Some(c)) = (self.readings.back(), r.collections) {
            match last.collections {
                Some(lc) if lc == c => return false,
                // the agent restarted: its counters began again
                Some(lc) if c < lc => self.readings.clear(),
                _ => {}
            }
        }
        self.readings.push_back(r);
        let newest = self.readings.back().map(|r| r.at).expect("just pushed");
        while self.readings.len() > 2 && newest.duration_since(self.readings[0].at) > self.window {
            self.readings.pop_front();
        }
        true
    }

    pub fn latest(&self) -> Option<&Reading> {
        self.readings.back()
    }

    pub fn len(&self) -> usize {
        self.readings.len()
    }

    /// What to show now, for every target (or only `filter`).
    pub fn view(&self, filter: Option<&str>) -> Vec<TargetView> {
        let Some(latest) = self.readings.back() else { return Vec::new() };
        let prev = (self.readings.len() >= 2).then(|| &self.readings[self.readings.len() - 2]);
        let oldest = (self.readings.len() >= 2).then(|| &self.readings[0]);
        target_names(latest)
            .into_iter()
            .filter(|n| filter.is_none_or(|f| f == n))
            .map(|name| target_view(&name, latest, prev, oldest))
            .collect()
    }
}

/// Every target the agent names, in its health order, then any only /peers or /metrics has.
pub fn target_names(r: &Reading) -> Vec<String> {
    let mut names: Vec<String> = r.health.iter().map(|t| t.name.clone()).collect();
    let more =
        r.peers.iter().map(|p| p.target.as_str()).chain(r.metrics.iter().filter_map(|s| s.label("nodescope_target")));
    for n in more {
        if !names.iter().any(|m| m == n) {
            names.push(n.to_string());
        }
    }
    names
}

#[derive(Debug, Clone, PartialEq)]
pub struct PeerView {
    pub peer: Peer,
    /// Seconds since it connected (None: open before the agent started).
    pub age: Option<u64>,
    /// Bytes per second sent and received since the previous collection
    /// (None: no earlier reading of this connection).
    pub sent_rate: Option<f64>,
    pub received_rate: Option<f64>,
}

impl PeerView {
    pub fn rate(&self) -> f64 {
        self.sent_rate.unwrap_or(0.0) + self.received_rate.unwrap_or(0.0)
    }
}

/// Totals since the agent started, and per minute over the readings' window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Counter {
    pub total: f64,
    pub per_minute: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Churn {
    /// Seconds the per-minute figures span (None: one reading so far).
    pub window: Option<f64>,
    pub opened: Counter,
    pub closed: Counter,
    pub failed: Counter,
    /// The P2P share of opened and closed.
    pub p2p_opened: Counter,
    pub p2p_closed: Counter,
    /// Failed connects by error_type.
    pub failed_by: Vec<(String, Counter)>,
    /// Connections open now, every service.
    pub open: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FileClass {
    pub class: String,
    pub written: Counter,
    /// Bytes per second over the window.
    pub bytes_per_second: Option<f64>,
    pub writes: Counter,
    pub syncs: Counter,
    /// Sync latency p50, p90, p99 in seconds.
    pub sync_quantiles: Option<[f64; 3]>,
    /// The quantiles are over the window (else since the agent started).
    pub quantiles_recent: bool,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Disk {
    pub datadir_bytes: Option<f64>,
    pub fs_size: Option<f64>,
    pub fs_available: Option<f64>,
    pub growth_bytes_per_second: Option<f64>,
    pub days_until_full: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TargetView {
    pub name: String,
    /// healthy, degraded, unhealthy; "unknown" when /health/detailed does not name it.
    pub status: String,
    pub firing: Vec<Rule>,
    pub pending: Vec<Rule>,
    pub peers: Vec<PeerView>,
    pub churn: Churn,
    pub files: Vec<FileClass>,
    pub disk: Disk,
}

fn counter(latest: &Reading, oldest: Option<&Reading>, name: &str, with: &[(&str, &str)]) -> Counter {
    let total = prom::sum(&latest.metrics, name, with).unwrap_or(0.0);
    let per_minute = oldest.and_then(|o| {
        let dt = latest.at.duration_since(o.at).as_secs_f64();
        let before = prom::sum(&o.metrics, name, with).unwrap_or(0.0);
        (dt > 0.0 && total >= before).then(|| (total - before) / dt * 60.0)
    });
    Counter { total, per_minute }
}

fn label_values(r: &Reading, name: &str, target: &str, label: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in prom::select(&r.metrics, name, &[]) {
        if s.label("nodescope_target") != Some(target) {
            continue;
        }
        if let Some(v) = s.label(label) {
            if !out.iter().any(|o| o == v) {
                out.push(v.to_string());
            }
        }
    }
    out
}

fn target_view(name: &str, latest: &Reading, prev: Option<&Reading>, oldest: Option<&Reading>) -> TargetView {
    let t = [("nodescope_target", name)];
    let health = latest.health.iter().find(|h| h.name == name);
    let rules_in = |state: &str| -> Vec<Rule> {
        health.map(|h| h.rules.iter().filter(|r| r.state == state).cloned().collect()).unwrap_or_default()
    };
    let dt_prev = prev.map(|p| latest.at.duration_since(p.at).as_secs_f64()).filter(|d| *d > 0.0);
    let peers = latest
        .peers
        .iter()
        .filter(|p| p.target == name)
        .map(|p| {
            let before = prev.and_then(|r| r.peers.iter().find(|q| q.key() == p.key()));
            let rate = |now: u64, then: Option<u64>| match (then, dt_prev) {
                (Some(b), Some(dt)) if now >= b => Some((now - b) as f64 / dt),
                _ => None,
            };
            PeerView {
                peer: p.clone(),
                age: p.connected_since.map(|s| latest.unix.saturating_sub(s)),
                sent_rate: rate(p.sent, before.map(|b| b.sent)),
                received_rate: rate(p.received, before.map(|b| b.received)),
            }
        })
        .collect();

    let window = oldest.map(|o| latest.at.duration_since(o.at).as_secs_f64()).filter(|d| *d > 0.0);
    let mut failed_by: Vec<(String, Counter)> =
        label_values(latest, "nodescope_connection_failed_total", name, "error_type")
            .into_iter()
            .map(|e| {
                let c = counter(latest, oldest, "nodescope_connection_failed_total", &[t[0], ("error_type", &e)]);
                (e, c)
            })
            .collect();
    failed_by.sort_by(|a, b| b.1.total.total_cmp(&a.1.total));
    let churn = Churn {
        window,
        opened: counter(latest, oldest, "nodescope_connection_opened_total", &t),
        closed: counter(latest, oldest, "nodescope_connection_closed_total", &t),
        failed: counter(latest, oldest, "nodescope_connection_failed_total", &t),
        p2p_opened: counter(latest, oldest, "nodescope_connection_opened_total", &[t[0], ("nodescope_service", "p2p")]),
        p2p_closed: counter(latest, oldest, "nodescope_connection_closed_total", &[t[0], ("nodescope_service", "p2p")]),
        failed_by,
        open: prom::sum(&latest.metrics, "nodescope_connection_open", &t),
    };

    let bucket = "nodescope_file_sync_duration_seconds_bucket";
    let mut files: Vec<FileClass> =
        label_values(latest, "nodescope_file_written_bytes_total", name, "nodescope_file_class")
            .into_iter()
            .chain(label_values(latest, "nodescope_file_syncs_total", name, "nodescope_file_class"))
            .fold(Vec::<String>::new(), |mut acc, c| {
                if !acc.contains(&c) {
                    acc.push(c);
                }
                acc
            })
            .into_iter()
            .map(|class| {
                let with = [t[0], ("nodescope_file_class", class.as_str())];
                let written = counter(latest, oldest, "nodescope_file_written_bytes_total", &with);
                let now = prom::buckets(&latest.metrics, bucket, &with);
                let recent = oldest.map(|o| prom::bucket_delta(&now, &prom::buckets(&o.metrics, bucket, &with)));
                let recent = recent.filter(|b| b.last().is_some_and(|(_, c)| *c > 0.0));
                let (buckets, quantiles_recent) = match recent {
                    Some(b) => (b, true),
                    None => (now, false),
                };
                let q = |q| prom::quantile(&buckets, q);
                FileClass {
                    bytes_per_second: written.per_minute.map(|m| m / 60.0),
                    written,
                    writes: counter(latest, oldest, "nodescope_file_writes_total", &with),
                    syncs: counter(latest, oldest, "nodescope_file_syncs_total", &with),
                    sync_quantiles: match (q(0.5), q(0.9), q(0.99)) {
                        (Some(a), Some(b), Some(c)) => Some([a, b, c]),
                        _ => None,
                    },
                    quantiles_recent,
                    class,
                }
            })
            .collect();
    files.sort_by(|a, b| b.written.total.total_cmp(&a.written.total).then(b.syncs.total.total_cmp(&a.syncs.total)));

    let gauge = |n: &str| prom::sum(&latest.metrics, n, &t);
    let disk = Disk {
        datadir_bytes: gauge("nodescope_datadir_size_bytes"),
        fs_size: gauge("nodescope_filesystem_size_bytes"),
        fs_available: gauge("nodescope_filesystem_available_bytes"),
        growth_bytes_per_second: gauge("nodescope_filesystem_growth_bytes_per_second"),
        days_until_full: gauge("nodescope_datadir_days_until_full"),
    };
    TargetView {
        name: name.to_string(),
        status: health.map_or_else(|| "unknown".to_string(), |h| h.status.clone()),
        firing: rules_in("firing"),
        pending: rules_in("pending"),
        peers,
        churn,
        files,
        disk,
    }
}

/// How the peer table is ordered; `s` steps through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sort {
    Rate,
    Bytes,
    Age,
    Address,
}

impl Sort {
    pub fn next(self) -> Sort {
        match self {
            Sort::Rate => Sort::Bytes,
            Sort::Bytes => Sort::Age,
            Sort::Age => Sort::Address,
            Sort::Address => Sort::Rate,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Sort::Rate => "bytes/s",
            Sort::Bytes => "bytes",
            Sort::Age => "age",
            Sort::Address => "address",
        }
    }
    pub fn apply(self, peers: &mut [PeerView]) {
        let by_address = |a: &PeerView, b: &PeerView| {
            (&a.peer.target, &a.peer.address, a.peer.port).cmp(&(&b.peer.target, &b.peer.address, b.peer.port))
        };
        match self {
            Sort::Rate => peers.sort_by(|a, b| b.rate().total_cmp(&a.rate()).then_with(|| by_address(a, b))),
            Sort::Bytes => peers.sort_by(|a, b| {
                (b.peer.sent + b.peer.received).cmp(&(a.peer.sent + a.peer.received)).then_with(|| by_address(a, b))
            }),
            // oldest first; connections from before the agent started are the oldest
            Sort::Age => peers.sort_by(|a, b| {
                b.age.unwrap_or(u64::MAX).cmp(&a.age.unwrap_or(u64::MAX)).then_with(|| by_address(a, b))
            }),
            Sort::Address => peers.sort_by(by_address),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reading(at: Instant, collections: f64, sent: u64, opened: f64, metrics_extra: &str) -> Reading {
        let peers = json!({ "targets": [{ "name": "ltc", "peers": [
            { "address": "127.0.0.1", "port": 5000, "local_port": 19444, "direction": "inbound",
              "bytes_sent": sent, "bytes_received": 10, "connected_since": 1_000, "netgroup": "127.0.0.0/16" },
            { "address": "10.1.2.3", "port": 19444, "local_port": 40000, "direction": "outbound",
              "bytes_sent": 5, "bytes_received": 7, "connected_since": null, "netgroup": "10.1.0.0/16" }
        ]}]});
        let health = json!({ "status": "degraded", "targets": [{ "name": "ltc", "status": "degraded", "rules": [
            { "id": "low_peer_count", "severity": "warning", "state": "firing" },
            { "id": "fsync_slow", "severity": "warning", "state": "ok" }
        ]}]});
        let metrics = format!(
            "nodescope_collection_duration_seconds_count {collections}\n\
             nodescope_connection_opened_total{{nodescope_target=\"ltc\",nodescope_service=\"p2p\"}} {opened}\n\
             nodescope_connection_failed_total{{nodescope_target=\"ltc\",error_type=\"refused\"}} 2\n\
             nodescope_datadir_days_until_full{{nodescope_target=\"ltc\"}} 40\n{metrics_extra}"
        );
        Reading {
            at,
            unix: 1_100,
            collections: Some(collections),
            health: parse_health(&health),
            peers: parse_peers(&peers),
            metrics: prom::parse(&metrics),
        }
    }

    #[test]
    fn top_rates_come_from_two_collections() {
        let t0 = Instant::now();
        let mut h = History::new(Duration::from_secs(60));
        assert!(h.push(reading(t0, 1.0, 100, 3.0, "")));
        let v = h.view(None);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].peers[0].sent_rate, None);
        assert_eq!(v[0].churn.opened.per_minute, None);
        // the same collection again is no new data
        assert!(!h.push(reading(t0 + Duration::from_secs(1), 1.0, 100, 3.0, "")));
        assert!(h.push(reading(t0 + Duration::from_secs(2), 2.0, 300, 5.0, "")));
        let v = h.view(Some("ltc"));
        let p = &v[0].peers[0];
        assert_eq!((p.sent_rate, p.received_rate, p.age), (Some(100.0), Some(0.0), Some(100)));
        assert_eq!(v[0].peers[1].age, None);
        assert_eq!(v[0].churn.opened, Counter { total: 5.0, per_minute: Some(60.0) });
        assert_eq!(v[0].churn.p2p_opened, v[0].churn.opened);
        assert_eq!(v[0].churn.p2p_closed, Counter { total: 0.0, per_minute: Some(0.0) });
        assert_eq!(v[0].churn.failed_by, vec![("refused".to_string(), Counter { total: 2.0, per_minute: Some(0.0) })]);
        assert_eq!(v[0].status, "degraded");
        assert_eq!(v[0].firing.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), ["low_peer_count"]);
        assert_eq!(v[0].disk.days_until_full, Some(40.0));
        assert!(h.view(Some("other")).is_empty());
        // an agent restart starts the history again
        assert!(h.push(reading(t0 + Duration::from_secs(3), 1.0, 0, 0.0, "")));
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn top_file_classes_and_sync_quantiles() {
        let b = |n: u32| {
            format!(
                "nodescope_file_written_bytes_total{{nodescope_target=\"ltc\",nodescope_file_class=\"blocks\",nodescope_write_call=\"write\"}} {}\n\
                 nodescope_file_syncs_total{{nodescope_target=\"ltc\",nodescope_file_class=\"blocks\",nodescope_sync_call=\"fsync\"}} {n}\n\
                 nodescope_file_sync_duration_seconds_bucket{{nodescope_target=\"ltc\",nodescope_file_class=\"blocks\",le=\"0.001\"}} {n}\n\
                 nodescope_file_sync_duration_seconds_bucket{{nodescope_target=\"ltc\",nodescope_file_class=\"blocks\",le=\"+Inf\"}} {n}\n",
                n * 1000
            )
        };
        let t0 = Instant::now();
        let mut h = History::new(Duration::from_secs(60));
        h.push(reading(t0, 1.0, 0, 0.0, &b(4)));
        let v = h.view(None);
        assert!(!v[0].files[0].quantiles_recent);
        assert_eq!(v[0].files[0].sync_quantiles.map(|q| q[0]), Some(0.0005));
        h.push(reading(t0 + Duration::from_secs(4), 2.0, 0, 0.0, &b(8)));
        let f = &h.view(None)[0].files[0];
        assert_eq!(f.class, "blocks");
        assert_eq!(f.bytes_per_second, Some(1000.0));
        assert_eq!(f.syncs, Counter { total: 8.0, per_minute: Some(60.0) });
        assert!(f.quantiles_recent);
    }

    #[test]
    fn top_sorts_peers() {
        let t0 = Instant::now();
        let mut h = History::new(Duration::from_secs(60));
        h.push(reading(t0, 1.0, 100, 0.0, ""));
        h.push(reading(t0 + Duration::from_secs(1), 2.0, 200, 0.0, ""));
        let mut peers = h.view(None).remove(0).peers;
        let order = |p: &[PeerView]| p.iter().map(|p| p.peer.address.clone()).collect::<Vec<_>>();
        Sort::Rate.apply(&mut peers);
        assert_eq!(order(&peers), ["127.0.0.1", "10.1.2.3"]);
        Sort::Address.apply(&mut peers);
        assert_eq!(order(&peers), ["10.1.2.3", "127.0.0.1"]);
        Sort::Age.apply(&mut peers);
        assert_eq!(order(&peers), ["10.1.2.3", "127.0.0.1"]);
        Sort::Bytes.apply(&mut peers);
        assert_eq!(order(&peers), ["127.0.0.1", "10.1.2.3"]);
        assert_eq!(Sort::Address.next(), Sort::Rate);
    }
}

//! What each rule checks, from one interval's snapshots plus a short history
//! of the few figures that rules compare over a window (peer identities,
//! outbound connect counters, the sync latency histogram).

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::time::Duration;

use serde_json::{json, Value};

use super::rules::{
    Outcome, RuleParams, CONNECT_FAILURES_MIN_ATTEMPTS, PARTITION_CONNECT_WINDOWS, PARTITION_MIN_PEERS,
};
use crate::disk::TargetDisk;
use crate::net::TargetNet;
use crate::resources::TargetResources;
use crate::target::{Direction, Service, Target};

/// Samples kept per target at most. Windows are bounded by config, but an
/// interval of 100ms with a 1h window would need 36000; past the bound the
/// oldest go, windows become shorter than asked, and the drop is counted.
pub const MAX_SAMPLES: usize = 4096;

/// Everything a rule may read about one target this interval.
pub struct View<'a> {
    pub target: &'a Target,
    /// None: the network signal is off or has not seen this target.
    pub net: Option<&'a TargetNet>,
    /// None: the disk signal is off or has not seen this target.
    pub disk: Option<&'a TargetDisk>,
    /// None: the resources signal has not measured this target.
    pub resources: Option<&'a TargetResources>,
    pub now_unix: f64,
    /// When the current process of the node was first seen (unix seconds).
    pub alive_since_unix: Option<f64>,
    /// What the node's own log says of its chain (chainlog.rs).
    pub chain: Option<&'a crate::chainlog::TargetChain>,
}

/// A P2P connection's identity: address, the peer's port, the node's port,
/// direction. The node's port tells apart the peers a node reaches through
/// one proxy (Tor, I2P, SOCKS), whose address and port are all the proxy's.
type PeerId = (String, u16, u16, Direction);

struct Sample {
    at: Duration,
    pid: Option<u32>,
    /// None when the network signal had nothing, or once the sample is too
    /// old for the partition look-back (identities are the bulky part).
    peers: Option<HashSet<PeerId>>,
    /// Outbound P2P connections established and failed, cumulative.
    outbound: Option<(u64, u64)>,
    /// Every sync call of the target merged into one histogram.
    syncs: Option<SyncTotals>,
    /// Failed outbound peer connects by reason, cumulative.
    failed_reasons: BTreeMap<&'static str, u64>,
    /// Inbound peer connections opened, cumulative.
    inbound_opened: Option<u64>,
    /// Inbound peer connections opened this interval by netgroup, the
    /// largest SAMPLE_NETGROUPS (the rest under "other").
    inbound_netgroups: BTreeMap<String, u64>,
    /// Peer connections (both directions) opened and closed, cumulative.
    peer_churn: Option<(u64, u64)>,
}

/// Netgroups kept per sample for inbound_flood's evidence.
const SAMPLE_NETGROUPS: usize = 16;

/// Netgroups inbound_flood's evidence names.
const TOP_NETGROUPS: usize = 5;

/// RPC clients rpc_exposed's evidence names.
const RPC_CLIENTS_SHOWN: usize = 10;

/// Per-bucket counts keyed by the bucket's upper bound (f64 bits: positive
/// floats order like their bit patterns, +Inf last).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SyncTotals {
    pub buckets: BTreeMap<u64, u64>,
    pub count: u64,
}

impl SyncTotals {
    pub fn from_disk(d: &TargetDisk) -> SyncTotals {
        let mut t = SyncTotals::default();
        for h in d.syncs.values() {
            for (i, n) in h.bucket_counts.iter().enumerate() {
                let bound = h.bounds_seconds.get(i).copied().unwrap_or(f64::INFINITY);
                *t.buckets.entry(bound.to_bits()).or_default() += n;
            }
            t.count += h.count;
        }
        t
    }

    /// What happened between `earlier` and `self`; a counter that went
    /// down was reset (agent or node restart) and counts from zero.
    pub fn since(&self, earlier: &SyncTotals) -> SyncTotals {
        let reset = self.count < earlier.count;
        let mut d =
            SyncTotals { buckets: BTreeMap::new(), count: if reset { self.count } else { self.count - earlier.count } };
        for (b, n) in &self.buckets {
            let before = if reset { 0 } else { earlier.buckets.get(b).copied().unwrap_or(0) };
            d.buckets.insert(*b, n.saturating_sub(before));
        }
        d
    }

    /// The q-quantile as Prometheus' histogram_quantile estimates it: linear
    /// within the bucket that holds it; the +Inf bucket answers its lower bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.values().sum();
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let mut below = 0u64;
        let mut lower = 0.0;
        for (bits, n) in &self.buckets {
            let upper = f64::from_bits(*bits);
            if *n > 0 && (below + n) as f64 >= rank {
                if upper.is_infinite() {
                    return Some(lower);
                }
                let into = (rank - below as f64) / *n as f64;
                return Some(lower + (upper - lower) * into);
            }
            below += n;
            lower = upper;
        }
        Some(lower)
    }
}

/// The samples of one target, oldest first.
/// How far back the rules read each part of a sample (engine.rs derives
/// them from the rules' windows).
#[derive(Debug, Clone, Copy)]
pub struct Lookbacks {
    /// Peer identities: partition_suspected's window.
    pub peers: Duration,
    /// The sync latency histogram: fsync_slow's.
    pub syncs: Duration,
    /// Failed connects by reason: connect_failures_high's.
    pub failed_reasons: Duration,
    /// Inbound connections by netgroup: inbound_flood's.
    pub netgroups: Duration,
    /// The longest any rule reads: samples older than its baseline go.
    pub longest: Duration,
}

impl Lookbacks {
    /// Every part kept as long as the longest window.
    #[cfg(test)]
    pub fn keep_all(peers: Duration, longest: Duration) -> Lookbacks {
        Lookbacks { peers, syncs: longest, failed_reasons: longest, netgroups: longest, longest }
    }
}

#[derive(Default)]
pub struct History {
    samples: VecDeque<Sample>,
    /// Samples dropped at MAX_SAMPLES.
    pub dropped: u64,
}

impl History {
    /// Records this interval. `lookbacks` are the windows rules will ask
    /// about: older samples go, except the newest one at or before each
    /// window's start (the baseline it compares with), and a sample older
    /// than a part's lookback sheds that part.
    pub fn record(&mut self, now: Duration, v: &View, lookbacks: &Lookbacks) {
        let peers =
            v.net.map(|n| n.p2p_peers().map(|c| (c.address.clone(), c.port, c.local_port, c.direction)).collect());
        let outbound = v.net.map(|n| {
            let opened = [Service::P2p, Service::Proxy]
                .iter()
                .filter_map(|s| n.churn.get(&(Direction::Outbound, *s)))
                .map(|c| c.opened)
                .sum();
            let failed = n.failed.iter().filter(|((s, _), _)| s.is_peer()).map(|(_, n)| n).sum();
            (opened, failed)
        });
        let mut failed_reasons = BTreeMap::new();
        let mut inbound_netgroups = BTreeMap::new();
        if let Some(n) = v.net {
            for ((s, reason), count) in &n.failed {
                if s.is_peer() {
                    *failed_reasons.entry(*reason).or_default() += count;
                }
            }
            let mut groups: Vec<(&String, &u64)> = n.inbound_opened_netgroups.iter().collect();
            groups.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            for (i, (g, count)) in groups.into_iter().enumerate() {
                let key = if i < SAMPLE_NETGROUPS { g.clone() } else { "other".to_string() };
                *inbound_netgroups.entry(key).or_default() += count;
            }
        }
        let peer_churn = |dirs: &[Direction]| {
            v.net.map(|n| {
                n.churn
                    .iter()
                    .filter(|((d, s), _)| s.is_peer() && dirs.contains(d))
                    .fold((0, 0), |(o, c), (_, ch)| (o + ch.opened, c + ch.closed))
            })
        };
        self.samples.push_back(Sample {
            at: now,
            pid: v.target.pid,
            peers,
            outbound,
            syncs: v.disk.map(SyncTotals::from_disk),
            failed_reasons,
            inbound_opened: peer_churn(&[Direction::Inbound]).map(|(o, _)| o),
            inbound_netgroups,
            peer_churn: peer_churn(&[Direction::Inbound, Direction::Outbound]),
        });

        let keep_from = now.saturating_sub(lookbacks.longest);
        while self.samples.len() > 1 && self.samples[1].at <= keep_from {
            self.samples.pop_front();
        }
        while self.samples.len() > MAX_SAMPLES {
            self.samples.pop_front();
            self.dropped += 1;
        }
        // The parts only shorter windows read are most of a sample's size
        // (peer identities, netgroup names, histograms): the longest
        // window's hour of samples keeps only the cumulative counts.
        self.shed(now, lookbacks.peers, |s| s.peers = None);
        self.shed(now, lookbacks.syncs, |s| s.syncs = None);
        self.shed(now, lookbacks.failed_reasons, |s| s.failed_reasons.clear());
        self.shed(now, lookbacks.netgroups, |s| s.inbound_netgroups.clear());
    }

    /// Clears a part of the samples before the baseline of `lookback` (the
    /// newest at or before its start, which keeps it).
    fn shed(&mut self, now: Duration, lookback: Duration, clear: impl Fn(&mut Sample)) {
        let from = now.saturating_sub(lookback);
        let baseline = self.samples.iter().rposition(|s| s.at <= from).unwrap_or(0);
        self.samples.iter_mut().take(baseline).for_each(clear);
    }

    fn latest(&self) -> Option<&Sample> {
        self.samples.back()
    }

    /// The newest sample at or before `now - window` from the same process
    /// of the node as now, or (`partial`) the oldest such sample when the
    /// history does not reach that far back yet.
    fn baseline(
        &self,
        now: Duration,
        window: Duration,
        partial: bool,
        has: impl Fn(&Sample) -> bool,
    ) -> Option<&Sample> {
        let pid = self.latest()?.pid;
        let start = now.checked_sub(window);
        let same = |s: &&Sample| s.pid == pid && has(s);
        let covered = start.and_then(|start| self.samples.iter().filter(same).filter(|s| s.at <= start).last());
        covered.or_else(|| if partial { self.samples.iter().find(same) } else { None })
    }
}

fn unknown(reason: &str) -> Outcome {
    Outcome::Unknown(json!({ "reason": reason }))
}

const NO_NET: &str = "network signal unavailable";
const NO_DISK: &str = "disk signal unavailable";
const NO_FS: &str = "data dir filesystem not measured (no data dir known, or the resources signal is off)";

/// Evaluates rule `id` on one target. `now` is the engine's clock, the
/// same one `History::record` was given this interval.
pub fn check(id: &str, p: &RuleParams, v: &View, h: &History, now: Duration) -> Outcome {
    let threshold = p.threshold.unwrap_or(0.0);
    match id {
        "node_down" => {
            let ev = json!({ "pid": v.target.pid });
            if v.target.pid.is_none() {
                Outcome::Holds(ev)
            } else {
                Outcome::Clear(ev)
            }
        }
        "no_peers" => peers(v, |n, _| n == 0, |n, _| json!({ "p2p_peers": n })),
        "low_peers" => {
            peers(v, |n, _| (n as f64) < threshold, |n, _| json!({ "p2p_peers": n, "threshold": threshold }))
        }
        "no_outbound" => {
            peers(v, |_, out| out == 0, |n, out| json!({ "outbound_peers": out, "inbound_peers": n - out }))
        }
        "low_netgroup_diversity" => {
            let Some(net) = v.net else { return unknown(NO_NET) };
            // Judged among direct peers: the addresses of peers behind a proxy
            // (Tor, I2P) are the proxy's, so their groups cannot be told apart.
            let outbound: Vec<_> = net.p2p_peers().filter(|c| c.direction == Direction::Outbound).collect();
            let proxied = outbound.iter().filter(|c| c.service == Service::Proxy).count();
            let direct: Vec<_> = outbound.iter().filter(|c| c.service == Service::P2p).collect();
            let groups = direct.iter().map(|c| c.netgroup.as_str()).collect::<HashSet<_>>().len();
            let outbound = direct.len();
            let ev = json!({
                "outbound_peers": outbound,
                "outbound_netgroups": groups,
                "proxied_outbound_peers": proxied,
                "threshold_percent": threshold,
            });
            if outbound > 0 && (groups as f64) < outbound as f64 * threshold / 100.0 {
                Outcome::Holds(ev)
            } else {
                Outcome::Clear(ev)
            }
        }
        "partition_suspected" => partition(v, h, now, p.window, threshold),
        "chain_stalled" => chain_stalled(v, threshold),
        "disk_critical" | "disk_low" => {
            let Some(fs) = v.resources.and_then(|r| r.filesystem) else { return unknown(NO_FS) };
            let Some(pct) = fs.available_percent() else { return unknown("data dir filesystem reports size 0") };
            let ev = json!({
                "available_bytes": fs.available_bytes,
                "size_bytes": fs.size_bytes,
                "available_percent": round2(pct),
                "threshold_percent": threshold,
                "datadir": v.target.datadir,
            });
            if pct < threshold {
                Outcome::Holds(ev)
            } else {
                Outcome::Clear(ev)
            }
        }
        "disk_full_soon" => {
            let Some(r) = v.resources else { return unknown(NO_FS) };
            let Some(fs) = r.filesystem else { return unknown(NO_FS) };
            // days_until_full divides by the filesystem's fill rate, so that
            // rate, not the data dir's, says whether the forecast is measured
            let Some(fill) = r.filesystem_growth_bytes_per_second else {
                return unknown("filesystem growth not measured yet");
            };
            let ev = json!({
                "days_until_full": r.days_until_full.map(round2),
                "filesystem_growth_bytes_per_second": round2(fill),
                "datadir_growth_bytes_per_second": r.growth_bytes_per_second.map(round2),
                "available_bytes": fs.available_bytes,
                "threshold_days": threshold,
            });
            match r.days_until_full {
                Some(d) if d < threshold => Outcome::Holds(ev),
                _ => Outcome::Clear(ev),
            }
        }
        "memory_high" => {
            let Some(cg) = v.resources.and_then(|r| r.cgroup.as_ref()) else { return unknown("cgroup not measured") };
            // the working set, not usage: page cache the node's reads fill is reclaimed, not a risk
            let Some(usage) = cg.memory_working_set_bytes else { return unknown("cgroup working set not available") };
            if cg.memory_unlimited {
                return Outcome::Clear(json!({ "memory_working_set_bytes": usage, "memory_limit_bytes": null }));
            }
            let Some(limit) = cg.memory_limit_bytes else { return unknown("cgroup memory limit not available") };
            ratio(usage, limit, threshold, "memory_working_set_bytes", "memory_limit_bytes")
        }
        "fds_high" => {
            let Some(proc_) = v.resources.and_then(|r| r.process.as_ref()) else {
                return unknown("process not measured");
            };
            let Some(limit) = proc_.fd_limit.filter(|l| *l > 0) else { return unknown("open file limit not known") };
            ratio(proc_.open_fds, limit, threshold, "open_fds", "fd_limit")
        }
        "fsync_slow" => {
            let Some(disk) = v.disk else { return unknown(NO_DISK) };
            if disk.coverage.covered.is_some() && !disk.coverage.sync_latency {
                // xfs: syncs are counted, not timed
                return unknown(&disk.coverage.detail);
            }
            let Some(latest) = h.latest().and_then(|s| s.syncs.as_ref()) else { return unknown(NO_DISK) };
            let Some(base) = h.baseline(now, p.window, true, |s| s.syncs.is_some()).and_then(|s| s.syncs.as_ref())
            else {
                return unknown(NO_DISK);
            };
            let d = latest.since(base);
            let p99 = d.quantile(0.99);
            let ev = json!({ "p99_seconds": p99.map(round6), "syncs": d.count, "window_seconds": p.window.as_secs_f64(), "threshold_seconds": threshold });
            if p99.is_some_and(|q| q > threshold) {
                Outcome::Holds(ev)
            } else {
                Outcome::Clear(ev)
            }
        }
        "rpc_exposed" => rpc_exposed(v, p),
        "inbound_flood" => inbound_flood(v, h, now, p.window, threshold),
        "connect_failures_high" => connect_failures(v, h, now, p.window, threshold),
        "peer_churn_high" => peer_churn(v, h, now, p.window, threshold),
        other => unknown(&format!("no condition for rule {other}")),
    }
}

fn peers(v: &View, holds: impl Fn(usize, usize) -> bool, evidence: impl Fn(usize, usize) -> Value) -> Outcome {
    let Some(net) = v.net else { return unknown(NO_NET) };
    let all = net.p2p_peers().count();
    let outbound = net.p2p_peers().filter(|c| c.direction == Direction::Outbound).count();
    let ev = evidence(all, outbound);
    if holds(all, outbound) {
        Outcome::Holds(ev)
    } else {
        Outcome::Clear(ev)
    }
}

fn ratio(used: u64, limit: u64, threshold: f64, used_key: &str, limit_key: &str) -> Outcome {
    let pct = used as f64 * 100.0 / limit as f64;
    let mut ev = serde_json::Map::new();
    ev.insert(used_key.into(), json!(used));
    ev.insert(limit_key.into(), json!(limit));
    ev.insert("used_percent".into(), json!(round2(pct)));
    ev.insert("threshold_percent".into(), json!(threshold));
    if pct > threshold {
        Outcome::Holds(Value::Object(ev))
    } else {
        Outcome::Clear(Value::Object(ev))
    }
}

/// What a partition looks like from the node, while its process runs and
/// is not stopping. Either arm suspects one: most of the peers connected
/// one window ago have closed since (a slow rotation replaces a few per
/// window and stays below the threshold), or the node has no established
/// outbound peer while every outbound connect failed over
/// PARTITION_CONNECT_WINDOWS windows. Failing connects beside established
/// outbound peers are no partition: a node with its outbound slots full
/// still tries feelers and extra addresses, and many of those fail
/// (connect_failures_high judges them).
fn partition(v: &View, h: &History, now: Duration, window: Duration, threshold: f64) -> Outcome {
    let Some(net) = v.net else { return unknown(NO_NET) };
    if v.target.pid.is_none() {
        // its peers closed because it stopped: node_down says so
        return unknown("node not running");
    }
    if v.chain.is_some_and(|c| c.shutting_down) {
        // a node that is stopping closes every peer itself
        return unknown("node shutting down (its log says so): its peers close because it stops");
    }
    let Some(latest) = h.latest() else { return unknown(NO_NET) };
    let mut ev = serde_json::Map::new();
    let mut holds = false;

    if let (Some(now_peers), Some(base)) = (latest.peers.as_ref(), h.baseline(now, window, true, |s| s.peers.is_some()))
    {
        let then = base.peers.as_ref().expect("filtered on peers");
        let closed = then.difference(now_peers).count();
        let pct = if then.is_empty() { 0.0 } else { closed as f64 * 100.0 / then.len() as f64 };
        let mass = then.len() >= PARTITION_MIN_PEERS && pct >= threshold;
        holds |= mass;
        ev.insert("peers_before".into(), json!(then.len()));
        ev.insert("peers_closed".into(), json!(closed));
        ev.insert("closed_percent".into(), json!(round2(pct)));
        ev.insert("peers_now".into(), json!(now_peers.len()));
        ev.insert("window_seconds".into(), json!(now.saturating_sub(base.at).as_secs_f64()));
        ev.insert("threshold_percent".into(), json!(threshold));
    }

    let connect_window = window * PARTITION_CONNECT_WINDOWS;
    if let (Some((opened, failed)), Some(base)) =
        (latest.outbound, h.baseline(now, connect_window, false, |s| s.outbound.is_some()))
    {
        let (opened0, failed0) = base.outbound.expect("filtered on outbound");
        let opened = opened.saturating_sub(opened0);
        let failed = failed.saturating_sub(failed0);
        let outbound_now = net.p2p_peers().filter(|c| c.direction == Direction::Outbound).count();
        let cut_off = outbound_now == 0 && opened == 0 && failed > 0;
        holds |= cut_off;
        ev.insert("outbound_peers".into(), json!(outbound_now));
        ev.insert("outbound_opened".into(), json!(opened));
        ev.insert("outbound_failed".into(), json!(failed));
        ev.insert("connect_window_seconds".into(), json!(connect_window.as_secs_f64()));
    }
    if holds {
        Outcome::Holds(Value::Object(ev))
    } else {
        Outcome::Clear(Value::Object(ev))
    }
}

/// Established inbound connections to an RPC port from outside loopback
/// and the allow list.
fn rpc_exposed(v: &View, p: &RuleParams) -> Outcome {
    let Some(net) = v.net else { return unknown(NO_NET) };
    if v.target.rpc_ports.is_empty() {
        return unknown("no RPC port known for this target");
    }
    let rpc: Vec<_> =
        net.connections.iter().filter(|c| c.service == Service::Rpc && c.direction == Direction::Inbound).collect();
    let exposed: Vec<_> = rpc
        .iter()
        .filter(|c| match c.address.parse::<std::net::IpAddr>() {
            Ok(ip) => !ip.is_loopback() && !p.allow.iter().any(|n| n.contains(&ip)),
            Err(_) => true,
        })
        .collect();
    let clients: Vec<String> = exposed
        .iter()
        .take(RPC_CLIENTS_SHOWN)
        .map(|c| std::net::SocketAddr::new(c.address.parse().expect("parsed above"), c.port).to_string())
        .collect();
    let ev = json!({
        "exposed_connections": exposed.len(),
        "clients": clients,
        "rpc_connections": rpc.len(),
        "rpc_ports": v.target.rpc_ports,
        "allow": p.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
    });
    if exposed.is_empty() {
        Outcome::Clear(ev)
    } else {
        Outcome::Holds(ev)
    }
}

/// The newest sample and the window's baseline (or the oldest sample of the
/// same process while the history is shorter), both with `get`'s figure.
fn window_pair<T>(
    h: &History,
    now: Duration,
    window: Duration,
    get: impl Fn(&Sample) -> Option<T>,
) -> Option<(&Sample, T, &Sample, T)> {
    let latest = h.latest()?;
    let now_value = get(latest)?;
    let base = h.baseline(now, window, true, |s| get(s).is_some())?;
    Some((latest, now_value, base, get(base)?))
}

/// Inbound peer connections opened over the window, per minute of the
/// window, with the netgroups they came from.
fn inbound_flood(v: &View, h: &History, now: Duration, window: Duration, threshold: f64) -> Outcome {
    if v.net.is_none() {
        return unknown(NO_NET);
    }
    let Some((_, opened, base, opened0)) = window_pair(h, now, window, |s| s.inbound_opened) else {
        return unknown(NO_NET);
    };
    let opened = opened.saturating_sub(opened0);
    let per_minute = opened as f64 * 60.0 / window.as_secs_f64().max(1e-3);
    let mut groups: BTreeMap<&str, u64> = BTreeMap::new();
    for s in h.samples.iter().filter(|s| s.at > base.at && s.pid == base.pid) {
        for (g, n) in &s.inbound_netgroups {
            *groups.entry(g.as_str()).or_default() += n;
        }
    }
    let mut groups: Vec<(&str, u64)> = groups.into_iter().collect();
    groups.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let top: Vec<Value> =
        groups.iter().take(TOP_NETGROUPS).map(|(g, n)| json!({ "netgroup": g, "connections": n })).collect();
    let ev = json!({
        "inbound_connections": opened,
        "per_minute": round2(per_minute),
        "top_netgroups": top,
        "window_seconds": window.as_secs_f64(),
        "threshold_per_minute": threshold,
    });
    if per_minute > threshold {
        Outcome::Holds(ev)
    } else {
        Outcome::Clear(ev)
    }
}

/// The share of outbound peer connects that failed over the window, among
/// at least CONNECT_FAILURES_MIN_ATTEMPTS.
fn connect_failures(v: &View, h: &History, now: Duration, window: Duration, threshold: f64) -> Outcome {
    if v.net.is_none() {
        return unknown(NO_NET);
    }
    let Some((latest, (opened, failed), base, (opened0, failed0))) = window_pair(h, now, window, |s| s.outbound) else {
        return unknown(NO_NET);
    };
    let opened = opened.saturating_sub(opened0);
    let failed = failed.saturating_sub(failed0);
    let attempts = opened + failed;
    let pct = if attempts == 0 { 0.0 } else { failed as f64 * 100.0 / attempts as f64 };
    let by_reason: BTreeMap<&str, u64> = latest
        .failed_reasons
        .iter()
        .map(|(r, n)| (*r, n.saturating_sub(base.failed_reasons.get(r).copied().unwrap_or(0))))
        .filter(|(_, n)| *n > 0)
        .collect();
    let ev = json!({
        "attempts": attempts,
        "failed": failed,
        "failed_percent": round2(pct),
        "failed_by_reason": by_reason,
        "min_attempts": CONNECT_FAILURES_MIN_ATTEMPTS,
        "window_seconds": window.as_secs_f64(),
        "threshold_percent": threshold,
    });
    if attempts >= CONNECT_FAILURES_MIN_ATTEMPTS && pct > threshold {
        Outcome::Holds(ev)
    } else {
        Outcome::Clear(ev)
    }
}

/// Peers replaced over the window (a peer connection closed and another
/// opened: the smaller of the two counts), per hour of the window.
fn peer_churn(v: &View, h: &History, now: Duration, window: Duration, threshold: f64) -> Outcome {
    if v.net.is_none() {
        return unknown(NO_NET);
    }
    let Some((_, (opened, closed), _, (opened0, closed0))) = window_pair(h, now, window, |s| s.peer_churn) else {
        return unknown(NO_NET);
    };
    let opened = opened.saturating_sub(opened0);
    let closed = closed.saturating_sub(closed0);
    let replaced = opened.min(closed);
    let per_hour = replaced as f64 * 3600.0 / window.as_secs_f64().max(1e-3);
    let ev = json!({
        "peers_replaced": replaced,
        "opened": opened,
        "closed": closed,
        "per_hour": round2(per_hour),
        "window_seconds": window.as_secs_f64(),
        "threshold_per_hour": threshold,
    });
    if per_hour > threshold {
        Outcome::Holds(ev)
    } else {
        Outcome::Clear(ev)
    }
}

/// No writes to the blocks class for longer than the threshold while peers
/// are connected: the node is online but its chain does not move. Before
/// the first write seen, the stall counts from when this process was first
/// seen.
fn chain_stalled(v: &View, threshold: f64) -> Outcome {
    let Some(net) = v.net else { return unknown(NO_NET) };
    if v.target.pid.is_none() {
        return unknown("node not running");
    }
    let peers = net.p2p_peers().count();
    // the chain's own block files: monerod keeps its chain in lmdb
    let class = match v.target.chain {
        crate::chain::Chain::Monero => "lmdb",
        _ => "blocks",
    };
    let last_write = v.disk.and_then(|d| d.last_write_unix.get(class).copied());
    let mut ev = serde_json::Map::new();
    ev.insert(format!("last_{class}_write"), json!(last_write));
    ev.insert("p2p_peers".into(), json!(peers));
    ev.insert("threshold_seconds".into(), json!(threshold));
    // When the chain last moved: the node's log says when it took its tip;
    // else the last write to its block files. Either names a second, and
    // counting from that second's end never makes a stall look longer than it is.
    // Only a log that tells the tip's age follows new blocks: a monerod at
    // --log-level 0 that has synchronized logs none, and its last sync line
    // is no tip (its lmdb writes are).
    let from_log = v.chain.filter(|c| c.source == "log" && c.tip_age_seconds.is_some());
    let moved = match from_log.and_then(|c| Some((c, c.tip_logged_unix?))) {
        Some((c, logged)) => {
            if c.initial_block_download == Some(true) {
                // a node in initial sync is judged by its progress, not by block gaps
                ev.insert("initial_block_download".into(), json!(true));
                return Outcome::Clear(Value::Object(ev));
            }
            ev.insert("source".into(), json!("log"));
            ev.insert("height".into(), json!(c.height));
            ev.insert("tip_age_seconds".into(), json!(c.tip_age_seconds.map(f64::round)));
            Some(logged.floor() + 1.0)
        }
        None => {
            if v.disk.is_none() {
                return unknown(NO_DISK);
            }
            ev.insert("source".into(), json!("files"));
            last_write.map(|t| t as f64 + 1.0)
        }
    };
    let Some(from) = moved.into_iter().chain(v.alive_since_unix).reduce(f64::max) else {
        return unknown("node start time not known");
    };
    let stalled = (v.now_unix - from).max(0.0);
    ev.insert("stalled_seconds".into(), json!(stalled.round()));
    if peers > 0 && stalled > threshold {
        Outcome::Holds(Value::Object(ev))
    } else {
        Outcome::Clear(Value::Object(ev))
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round6(x: f64) -> f64 {
    (x * 1e6).round() / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Chain;
    use crate::disk::SyncLatency;
    use crate::health::rules::{definition, RuleParams};
    use crate::net::{Churn, Connection};

    fn target(pid: Option<u32>) -> Target {
        Target::litecoin_for_tests("t", pid, &[19444], &[], &[])
    }

    fn conn(addr: &str, port: u16, direction: Direction) -> Connection {
        Connection {
            cookie: 0,
            address: addr.into(),
            port,
            local_port: 19444,
            direction,
            service: Service::P2p,
            network: crate::chain::PeerNetwork::Ipv4,
            bytes_sent: 0,
            bytes_received: 0,
            connected_since: None,
            netgroup: "127.0.0.0/16".into(),
        }
    }

    fn net(peers: &[(u16, Direction)]) -> TargetNet {
        TargetNet {
            name: "t".into(),
            connections: peers.iter().map(|(p, d)| conn("127.0.0.1", *p, *d)).collect(),
            ..Default::default()
        }
    }

    /// A view with the network signal's figures only.
    fn net_view<'a>(target: &'a Target, net: &'a TargetNet) -> View<'a> {
        View { target, net: Some(net), disk: None, resources: None, now_unix: 0.0, alive_since_unix: None, chain: None }
    }

    fn params(id: &str, window: u64) -> RuleParams {
        let mut p = RuleParams::resolve(definition(id).unwrap(), Chain::Litecoin, &[]);
        p.window = Duration::from_secs(window);
        p
    }

    fn s(x: u64) -> Duration {
        Duration::from_secs(x)
    }

    /// Feeds one peer set per second and checks partition_suspected each time.
    fn run_partition(sets: &[Vec<u16>], window: u64) -> Vec<bool> {
        let t = target(Some(42));
        let mut h = History::default();
        let p = params("partition_suspected", window);
        sets.iter()
            .enumerate()
            .map(|(i, ports)| {
                let n = net(&ports.iter().map(|p| (*p, Direction::Inbound)).collect::<Vec<_>>());
                let v = net_view(&t, &n);
                h.record(s(i as u64), &v, &Lookbacks::keep_all(p.window, p.window * PARTITION_CONNECT_WINDOWS));
                matches!(check("partition_suspected", &p, &v, &h, s(i as u64)), Outcome::Holds(_))
            })
            .collect()
    }

    #[test]
    fn mass_disconnect_is_a_partition() {
        let five: Vec<u16> = vec![1, 2, 3, 4, 5];
        let mut sets = vec![five.clone(); 12];
        // 4 of 5 replaced within two seconds (they reconnect on new ports)
        sets.push(vec![1, 2, 13, 14, 5]);
        sets.push(vec![1, 12, 13, 14, 15]);
        let fired = run_partition(&sets, 10);
        assert!(!fired[..12].iter().any(|f| *f));
        assert!(fired[13], "{fired:?}");
    }

    #[test]
    fn proxied_peers_lost_en_masse_are_a_partition() {
        // a Tor-only node: 5 outbound peers, every one to the proxy's address
        // and port, told apart by the node's own ports; 4 of them drop
        let t = target(Some(42));
        let p = params("partition_suspected", 10);
        let mut h = History::default();
        let tor = |locals: &[u16]| {
            let mut n = net(&locals.iter().map(|_| (9050, Direction::Outbound)).collect::<Vec<_>>());
            for (c, local) in n.connections.iter_mut().zip(locals) {
                c.local_port = *local;
                c.service = Service::Proxy;
                c.network = crate::chain::PeerNetwork::Onion;
            }
            n
        };
        let all = tor(&[40001, 40002, 40003, 40004, 40005]);
        for i in 0..12 {
            let v = net_view(&t, &all);
            h.record(s(i), &v, &Lookbacks::keep_all(p.window, p.window * PARTITION_CONNECT_WINDOWS));
            assert!(matches!(check("partition_suspected", &p, &v, &h, s(i)), Outcome::Clear(_)));
        }
        let one = tor(&[40001]);
        let v = net_view(&t, &one);
        h.record(s(12), &v, &Lookbacks::keep_all(p.window, p.window * PARTITION_CONNECT_WINDOWS));
        match check("partition_suspected", &p, &v, &h, s(12)) {
            Outcome::Holds(ev) => {
                assert_eq!((ev["peers_before"].as_u64(), ev["peers_closed"].as_u64()), (Some(5), Some(4)))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn slow_rotation_is_not_a_partition() {
        // one peer replaced every 4s, a 10s window: at most 3 of 5 in any window
        let mut ports: Vec<u16> = vec![1, 2, 3, 4, 5];
        let mut sets = Vec::new();
        for i in 0..60u16 {
            if i % 4 == 0 {
                let slot = usize::from(i / 4) % 5;
                ports[slot] = 100 + i;
            }
            sets.push(ports.clone());
        }
        let fired = run_partition(&sets, 10);
        assert!(!fired.iter().any(|f| *f), "{fired:?}");
    }

    #[test]
    fn a_restart_is_not_a_partition() {
        let t1 = target(Some(1));
        let t2 = target(Some(2));
        let p = params("partition_suspected", 10);
        let mut h = History::default();
        let before = net(&[(1, Direction::Inbound), (2, Direction::Inbound), (3, Direction::Outbound)]);
        for i in 0..20 {
            let v = net_view(&t1, &before);
            h.record(s(i), &v, &Lookbacks::keep_all(p.window, p.window * 5));
        }
        let after = net(&[(7, Direction::Inbound), (8, Direction::Inbound), (3, Direction::Outbound)]);
        let v = net_view(&t2, &after);
        h.record(s(20), &v, &Lookbacks::keep_all(p.window, p.window * 5));
        assert!(matches!(check("partition_suspected", &p, &v, &h, s(20)), Outcome::Clear(_)));
    }

    #[test]
    fn every_outbound_connect_failing_is_a_partition() {
        let t = target(Some(1));
        let p = params("partition_suspected", 10); // connect window: 50s
        let mut h = History::default();
        let mut fired = Vec::new();
        for i in 0..120u64 {
            let mut n = net(&[(1, Direction::Inbound), (2, Direction::Inbound)]);
            // connects succeed until t=30, then only fail
            n.churn
                .insert((Direction::Outbound, Service::P2p), Churn { opened: i.min(30), closed: i.min(30), open: 0 });
            n.failed.insert((Service::P2p, "refused"), i.saturating_sub(30));
            let v = net_view(&t, &n);
            h.record(s(i), &v, &Lookbacks::keep_all(p.window, p.window * PARTITION_CONNECT_WINDOWS));
            fired.push(matches!(check("partition_suspected", &p, &v, &h, s(i)), Outcome::Holds(_)));
        }
        assert!(!fired[..80].iter().any(|f| *f), "the window must lie wholly after the last success");
        assert!(fired[81..].iter().all(|f| *f));
    }

    #[test]
    fn failing_connects_beside_full_outbound_slots_are_not_a_partition() {
        let t = target(Some(1));
        let p = params("partition_suspected", 10); // connect window: 50s
        let mut h = History::default();
        let mut out = Vec::new();
        for i in 0..120u64 {
            // 8 outbound peers established all along; from t=5 on, every
            // extra connect (feelers, addnode onetry) is refused
            let outbound: Vec<(u16, Direction)> = (1..=8).map(|port| (port, Direction::Outbound)).collect();
            let mut n = net(&outbound);
            n.churn.insert((Direction::Outbound, Service::P2p), Churn { opened: 8, closed: 0, open: 8 });
            n.failed.insert((Service::P2p, "refused"), i.saturating_sub(5));
            let v = net_view(&t, &n);
            h.record(s(i), &v, &Lookbacks::keep_all(p.window, p.window * PARTITION_CONNECT_WINDOWS));
            out.push(check("partition_suspected", &p, &v, &h, s(i)));
        }
        assert!(!holds(&out).iter().any(|f| *f), "{out:?}");
        let Outcome::Clear(ev) = &out[119] else { panic!("{:?}", out[119]) };
        assert_eq!((ev["outbound_peers"].as_u64(), ev["outbound_opened"].as_u64()), (Some(8), Some(0)), "{ev}");
        assert!(ev["outbound_failed"].as_u64() > Some(40), "{ev}");
    }

    #[test]
    fn a_node_shutting_down_is_no_partition() {
        let t = target(Some(42));
        let p = params("partition_suspected", 10);
        let mut h = History::default();
        let stopping = crate::chainlog::TargetChain { source: "log", shutting_down: true, ..Default::default() };
        let running = crate::chainlog::TargetChain { source: "log", ..Default::default() };
        let mut eval = |i: u64, ports: &[u16], chain: &crate::chainlog::TargetChain| {
            let n = net(&ports.iter().map(|p| (*p, Direction::Inbound)).collect::<Vec<_>>());
            let v = View {
                target: &t,
                net: Some(&n),
                disk: None,
                resources: None,
                now_unix: 0.0,
                alive_since_unix: None,
                chain: Some(chain),
            };
            h.record(s(i), &v, &Lookbacks::keep_all(p.window, p.window * PARTITION_CONNECT_WINDOWS));
            check("partition_suspected", &p, &v, &h, s(i))
        };
        for i in 0..12 {
            assert!(matches!(eval(i, &[1, 2, 3, 4, 5], &running), Outcome::Clear(_)));
        }
        // the node logged its shutdown and closed every peer, its process still there
        match eval(12, &[], &stopping) {
            Outcome::Unknown(ev) => assert!(ev["reason"].as_str().unwrap().contains("shutting down"), "{ev}"),
            other => panic!("{other:?}"),
        }
        // the same loss from a node that is not stopping is one
        assert!(matches!(eval(13, &[], &running), Outcome::Holds(_)));
    }

    #[test]
    fn peer_rules() {
        let t = target(Some(1));
        let none = net(&[]);
        let few = net(&[(1, Direction::Inbound), (2, Direction::Inbound), (3, Direction::Outbound)]);
        let h = History::default();
        let eval = |id: &str, n: Option<&TargetNet>| {
            let v = View {
                target: &t,
                net: n,
                disk: None,
                resources: None,
                now_unix: 0.0,
                alive_since_unix: None,
                chain: None,
            };
            check(id, &params(id, 0), &v, &h, s(0))
        };
        assert_eq!(eval("no_peers", Some(&none)), Outcome::Holds(json!({"p2p_peers": 0})));
        assert!(matches!(eval("no_peers", Some(&few)), Outcome::Clear(_)));
        assert!(matches!(eval("no_peers", None), Outcome::Unknown(_)));
        assert!(matches!(eval("low_peers", Some(&few)), Outcome::Holds(_)));
        assert!(matches!(eval("no_outbound", Some(&few)), Outcome::Clear(_)));
        assert!(matches!(eval("no_outbound", Some(&none)), Outcome::Holds(_)));
        // 1 outbound peer in 1 netgroup: fine; 3 outbound in 1 netgroup: not
        assert!(matches!(eval("low_netgroup_diversity", Some(&few)), Outcome::Clear(_)));
        let mut three = net(&[(1, Direction::Outbound), (2, Direction::Outbound), (3, Direction::Outbound)]);
        assert!(matches!(eval("low_netgroup_diversity", Some(&three)), Outcome::Holds(_)));
        three.connections[1].netgroup = "10.1.0.0/16".into();
        assert!(
            matches!(eval("low_netgroup_diversity", Some(&three)), Outcome::Clear(_)),
            "2 groups for 3 peers is enough"
        );
        // a Tor-only node: 3 outbound peers behind one proxy are not judged
        // by the proxy's address, and still count as peers
        let mut tor = net(&[(1, Direction::Outbound), (2, Direction::Outbound), (3, Direction::Outbound)]);
        for c in &mut tor.connections {
            c.service = Service::Proxy;
            c.network = crate::chain::PeerNetwork::Onion;
            c.netgroup = "onion".into();
        }
        match eval("low_netgroup_diversity", Some(&tor)) {
            Outcome::Clear(ev) => assert_eq!(ev["proxied_outbound_peers"], 3, "{ev}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(eval("no_outbound", Some(&tor)), Outcome::Clear(_)));
        assert!(matches!(eval("low_peers", Some(&tor)), Outcome::Holds(_)), "3 peers are still under 8");
    }

    #[test]
    fn resource_rules_are_unknown_without_the_signal() {
        let t = target(Some(1));
        let h = History::default();
        let v = View {
            target: &t,
            net: None,
            disk: None,
            resources: None,
            now_unix: 0.0,
            alive_since_unix: None,
            chain: None,
        };
        for id in
            ["disk_critical", "disk_low", "disk_full_soon", "memory_high", "fds_high", "fsync_slow", "chain_stalled"]
        {
            assert!(matches!(check(id, &params(id, 300), &v, &h, s(0)), Outcome::Unknown(_)), "{id}");
        }
        let empty = TargetResources { name: "t".into(), ..Default::default() };
        let v = View { resources: Some(&empty), ..v };
        for id in ["disk_critical", "disk_low", "disk_full_soon", "memory_high", "fds_high"] {
            assert!(matches!(check(id, &params(id, 300), &v, &h, s(0)), Outcome::Unknown(_)), "{id}");
        }
    }

    #[test]
    fn disk_thresholds() {
        use crate::resources::FsStats;
        let t = target(Some(1));
        let h = History::default();
        let r = |avail: u64| TargetResources {
            name: "t".into(),
            filesystem: Some(FsStats { size_bytes: 1000, available_bytes: avail, ..Default::default() }),
            ..Default::default()
        };
        let eval = |id: &str, avail: u64| {
            let res = r(avail);
            let v = View {
                target: &t,
                net: None,
                disk: None,
                resources: Some(&res),
                now_unix: 0.0,
                alive_since_unix: None,
                chain: None,
            };
            matches!(check(id, &params(id, 0), &v, &h, s(0)), Outcome::Holds(_))
        };
        assert!(eval("disk_critical", 49));
        assert!(!eval("disk_critical", 50));
        assert!(eval("disk_low", 199));
        assert!(!eval("disk_low", 200));
    }

    #[test]
    fn memory_limit_unread_is_unknown_and_no_limit_is_ok() {
        use crate::resources::CgroupStats;
        let t = target(Some(1));
        let h = History::default();
        let eval = |limit: Option<u64>, unlimited: bool| {
            let cgroup = CgroupStats {
                memory_usage_bytes: Some(900),
                memory_working_set_bytes: Some(900),
                memory_limit_bytes: limit,
                memory_unlimited: unlimited,
                ..Default::default()
            };
            let res = TargetResources { name: "t".into(), cgroup: Some(cgroup), ..Default::default() };
            let v = View {
                target: &t,
                net: None,
                disk: None,
                resources: Some(&res),
                now_unix: 0.0,
                alive_since_unix: None,
                chain: None,
            };
            check("memory_high", &params("memory_high", 0), &v, &h, s(0))
        };
        assert!(matches!(eval(None, false), Outcome::Unknown(_)));
        assert!(matches!(eval(None, true), Outcome::Clear(_)));
        assert!(matches!(eval(Some(1000), false), Outcome::Holds(_)));
        assert!(matches!(eval(Some(2000), false), Outcome::Clear(_)));
    }

    #[test]
    fn disk_full_soon_is_known_once_the_filesystem_rate_is() {
        use crate::resources::FsStats;
        let t = target(Some(1));
        let h = History::default();
        let eval = |fill: Option<f64>, days: Option<f64>| {
            let res = TargetResources {
                name: "t".into(),
                filesystem: Some(FsStats { size_bytes: 1000, available_bytes: 500, ..Default::default() }),
                // the data dir's size is not tracked (over its entry bound, say)
                growth_bytes_per_second: None,
                filesystem_growth_bytes_per_second: fill,
                days_until_full: days,
                ..Default::default()
            };
            let v = View {
                target: &t,
                net: None,
                disk: None,
                resources: Some(&res),
                now_unix: 0.0,
                alive_since_unix: None,
                chain: None,
            };
            check("disk_full_soon", &params("disk_full_soon", 0), &v, &h, s(0))
        };
        assert!(matches!(eval(None, None), Outcome::Unknown(_)));
        assert!(matches!(eval(Some(-3.0), None), Outcome::Clear(_)), "not filling");
        assert!(matches!(eval(Some(1e-3), Some(5.8)), Outcome::Holds(_)));
        assert!(matches!(eval(Some(1e-4), Some(58.0)), Outcome::Clear(_)));
    }

    #[test]
    fn chain_stall_needs_peers_and_time() {
        let t = target(Some(1));
        let h = History::default();
        let mut disk = TargetDisk { name: "t".into(), ..Default::default() };
        disk.last_write_unix.insert("blocks".into(), 1000);
        let peers = net(&[(1, Direction::Inbound)]);
        let lonely = net(&[]);
        let eval = |n: &TargetNet, now: f64| {
            let v = View {
                target: &t,
                net: Some(n),
                disk: Some(&disk),
                resources: None,
                now_unix: now,
                alive_since_unix: Some(900.0),
                chain: None,
            };
            let mut p = params("chain_stalled", 0);
            p.threshold = Some(10.0);
            matches!(check("chain_stalled", &p, &v, &h, s(0)), Outcome::Holds(_))
        };
        // written during second 1000: stalled from 1001 on
        assert!(!eval(&peers, 1011.0));
        assert!(eval(&peers, 1011.5));
        assert!(!eval(&lonely, 1011.5), "no peers: no_peers' business, not a stall");

        // the log's tip age wins over the block files; initial sync is not judged
        let log = |age: f64, ibd: bool| crate::chainlog::TargetChain {
            source: "log",
            height: Some(7),
            tip_age_seconds: Some(age),
            tip_logged_unix: Some(1011.5 - age),
            initial_block_download: Some(ibd),
            ..Default::default()
        };
        let eval_log = |c: &crate::chainlog::TargetChain, disk: Option<&TargetDisk>| {
            let v = View {
                target: &t,
                net: Some(&peers),
                disk,
                resources: None,
                now_unix: 1011.5,
                alive_since_unix: Some(900.0),
                chain: Some(c),
            };
            let mut p = params("chain_stalled", 0);
            p.threshold = Some(10.0);
            check("chain_stalled", &p, &v, &h, s(0))
        };
        assert!(matches!(eval_log(&log(5.0, false), Some(&disk)), Outcome::Clear(_)), "a fresh tip, old block files");
        assert!(matches!(eval_log(&log(12.0, false), None), Outcome::Holds(_)), "no disk signal needed");
        // logged during second 1001: counted from its end, 9.5 s
        assert!(matches!(eval_log(&log(10.5, false), None), Outcome::Clear(_)), "counted from the second's end");
        assert!(matches!(eval_log(&log(1e6, true), None), Outcome::Clear(_)), "initial sync");
        let silent = crate::chainlog::TargetChain { source: "silent", ..Default::default() };
        assert!(matches!(eval_log(&silent, Some(&disk)), Outcome::Holds(_)), "back to the block files");

        // monerod's chain lives in lmdb: its writes there count, not a blocks class it has not
        let xmr = Target { chain: crate::chain::Chain::Monero, ..target(Some(1)) };
        let mut lmdb = TargetDisk { name: "t".into(), ..Default::default() };
        lmdb.last_write_unix.insert("lmdb".into(), 1010);
        let v = View {
            target: &xmr,
            net: Some(&peers),
            disk: Some(&lmdb),
            resources: None,
            now_unix: 1011.5,
            alive_since_unix: Some(900.0),
            chain: None,
        };
        let mut p = params("chain_stalled", 0);
        p.threshold = Some(10.0);
        assert!(matches!(check("chain_stalled", &p, &v, &h, s(0)), Outcome::Clear(_)));

        // a monerod at --log-level 0 that has synchronized: its log's height is
        // the one it synchronized at, long ago, and tells no tip age; its lmdb
        // writes judge the chain (fresh here: no stall), and stop doing so when old
        let synced_long_ago = crate::chainlog::TargetChain {
            source: "log",
            height: Some(7),
            tip_age_seconds: None,
            tip_logged_unix: Some(100.0),
            initial_block_download: Some(false),
            ..Default::default()
        };
        let v = View { chain: Some(&synced_long_ago), ..v };
        assert!(matches!(check("chain_stalled", &p, &v, &h, s(0)), Outcome::Clear(_)), "lmdb written 1.5 s ago");
        let v = View { now_unix: 1030.0, ..v };
        assert!(matches!(check("chain_stalled", &p, &v, &h, s(0)), Outcome::Holds(_)), "lmdb quiet for 19 s");
    }

    fn hist(counts: &[u64]) -> TargetDisk {
        let mut d = TargetDisk { name: "t".into(), ..Default::default() };
        let bounds = vec![0.001, 0.01, 0.1, 1.0, 2.0];
        d.syncs.insert(
            ("blocks".into(), "fsync"),
            SyncLatency {
                bounds_seconds: bounds,
                bucket_counts: counts.to_vec(),
                bucket_sum_ns: vec![0; counts.len()],
                sum_seconds: 0.0,
                count: counts.iter().sum(),
            },
        );
        d
    }

    #[test]
    fn fsync_p99_over_the_window() {
        let t = target(Some(1));
        let p = params("fsync_slow", 10);
        let mut h = History::default();
        let mut fired = Vec::new();
        for i in 0..40u64 {
            // 10 fast syncs a second; from t=20 to t=25, 3 slow ones (1-2 s) a second
            let slow = i.clamp(20, 25) - 20;
            let d = hist(&[10 * i, 0, 0, 0, 3 * slow, 0]);
            let v = View {
                target: &t,
                net: None,
                disk: Some(&d),
                resources: None,
                now_unix: 0.0,
                alive_since_unix: None,
                chain: None,
            };
            h.record(s(i), &v, &Lookbacks::keep_all(Duration::ZERO, p.window));
            fired.push(matches!(check("fsync_slow", &p, &v, &h, s(i)), Outcome::Holds(_)));
        }
        assert!(!fired[..21].iter().any(|f| *f), "{fired:?}");
        assert!(fired[21..=34].iter().all(|f| *f), "{fired:?}");
        assert!(!fired[35..].iter().any(|f| *f), "slow syncs left the window: {fired:?}");
    }

    #[test]
    fn quantiles() {
        let mut t = SyncTotals::default();
        for (b, n) in [(1.0f64, 90u64), (2.0, 10), (f64::INFINITY, 0)] {
            t.buckets.insert(b.to_bits(), n);
        }
        t.count = 100;
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1e-9);
        assert!(close(t.quantile(0.5), 50.0 / 90.0), "{:?}", t.quantile(0.5));
        assert!(close(t.quantile(0.99), 1.9), "{:?}", t.quantile(0.99));
        t.buckets.insert(f64::INFINITY.to_bits(), 50);
        assert_eq!(t.quantile(0.99), Some(2.0), "in +Inf: the lower bound");
        assert_eq!(SyncTotals::default().quantile(0.99), None);
    }

    /// Feeds one net snapshot per second from `make` and checks `id` each time.
    fn run_net(id: &str, p: &RuleParams, secs: u64, make: impl Fn(u64) -> TargetNet) -> Vec<Outcome> {
        let t = target(Some(7));
        let mut h = History::default();
        (0..secs)
            .map(|i| {
                let n = make(i);
                let v = net_view(&t, &n);
                h.record(s(i), &v, &Lookbacks::keep_all(Duration::from_secs(60), p.window));
                check(id, p, &v, &h, s(i))
            })
            .collect()
    }

    fn holds(o: &[Outcome]) -> Vec<bool> {
        o.iter().map(|o| matches!(o, Outcome::Holds(_))).collect()
    }

    #[test]
    fn rpc_exposed_ignores_loopback_and_the_allow_list() {
        let t = Target::litecoin_for_tests("t", Some(1), &[19444], &[19443], &[19443]);
        let h = History::default();
        let rpc = |addr: &str| Connection {
            service: Service::Rpc,
            local_port: 19443,
            ..conn(addr, 50000, Direction::Inbound)
        };
        let eval = |conns: Vec<Connection>, allow: &[&str]| {
            let n = TargetNet { name: "t".into(), connections: conns, ..Default::default() };
            let mut p = params("rpc_exposed", 0);
            p.allow = allow.iter().map(|a| crate::health::rules::parse_allow(a).unwrap()).collect();
            let v = net_view(&t, &n);
            check("rpc_exposed", &p, &v, &h, s(0))
        };
        assert!(matches!(eval(vec![rpc("127.0.0.1"), rpc("::1")], &[]), Outcome::Clear(_)));
        // a P2P peer from outside is no RPC client; an RPC client from outside is
        let outside = conn("10.9.0.2", 40000, Direction::Inbound);
        assert!(matches!(eval(vec![outside.clone()], &[]), Outcome::Clear(_)));
        match eval(vec![rpc("127.0.0.1"), rpc("10.9.0.2"), outside], &[]) {
            Outcome::Holds(ev) => {
                assert_eq!(ev["exposed_connections"], 1, "{ev}");
                assert_eq!(ev["clients"], json!(["10.9.0.2:50000"]), "{ev}");
                assert_eq!(ev["rpc_connections"], 2, "{ev}");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(eval(vec![rpc("10.9.0.2")], &["10.9.0.0/16"]), Outcome::Clear(_)));
        assert!(matches!(eval(vec![rpc("10.9.0.2")], &["10.9.0.3"]), Outcome::Holds(_)));
        // an outbound connection to someone's RPC-numbered port is not exposure
        let out = Connection { service: Service::Rpc, ..conn("10.9.0.2", 19443, Direction::Outbound) };
        assert!(matches!(eval(vec![out], &[]), Outcome::Clear(_)));
        let no_rpc = target(Some(1));
        let n = net(&[]);
        let v = net_view(&no_rpc, &n);
        assert!(matches!(check("rpc_exposed", &params("rpc_exposed", 0), &v, &h, s(0)), Outcome::Unknown(_)));
    }

    fn churned(inbound: u64, groups: &[(&str, u64)]) -> TargetNet {
        let mut n = net(&[(1, Direction::Outbound)]);
        n.churn.insert((Direction::Inbound, Service::P2p), Churn { opened: inbound, closed: inbound, open: 0 });
        n.inbound_opened_netgroups = groups.iter().map(|(g, c)| (g.to_string(), *c)).collect();
        n
    }

    #[test]
    fn inbound_flood_over_the_window_with_its_netgroups() {
        let mut p = params("inbound_flood", 10);
        p.threshold = Some(60.0); // more than 10 in 10 s
                                  // 1 a second throughout; 50 from 10.7/16 and 20 from 10.8/16 at t=30
        let out = run_net("inbound_flood", &p, 60, |i| {
            let burst = if i >= 30 { 70 } else { 0 };
            let groups: &[(&str, u64)] = if i == 30 {
                &[("10.7.0.0/16", 50), ("10.8.0.0/16", 20), ("127.0.0.0/16", 1)]
            } else {
                &[("127.0.0.0/16", 1)]
            };
            churned(i + burst, groups)
        });
        let fired = holds(&out);
        assert!(!fired[..30].iter().any(|f| *f), "10 a window is not more than 10: {fired:?}");
        assert!(fired[30..40].iter().all(|f| *f), "{fired:?}");
        assert!(!fired[40..].iter().any(|f| *f), "the burst left the window: {fired:?}");
        let Outcome::Holds(ev) = &out[30] else { unreachable!() };
        assert_eq!(ev["inbound_connections"], 80, "{ev}");
        assert_eq!(ev["per_minute"], 480.0, "{ev}");
        assert_eq!(ev["top_netgroups"][0], json!({"netgroup": "10.7.0.0/16", "connections": 50}), "{ev}");
        assert_eq!(ev["top_netgroups"][1], json!({"netgroup": "10.8.0.0/16", "connections": 20}), "{ev}");
        assert_eq!(ev["top_netgroups"][2]["netgroup"], "127.0.0.0/16", "{ev}");
    }

    #[test]
    fn connect_failures_need_a_share_and_enough_attempts() {
        let p = params("connect_failures_high", 10); // above 80%
        let run = |opened: fn(u64) -> u64, failed: fn(u64) -> u64| {
            holds(&run_net("connect_failures_high", &p, 40, |i| {
                let mut n = net(&[(1, Direction::Outbound)]);
                n.churn.insert((Direction::Outbound, Service::P2p), Churn { opened: opened(i), closed: 0, open: 1 });
                n.failed.insert((Service::P2p, "refused"), failed(i));
                n.failed.insert((Service::Rpc, "refused"), 1000 * i);
                n
            }))
        };
        // 1 success and 3 failures a second: 75%
        assert!(!run(|i| i, |i| 3 * i).iter().any(|f| *f));
        // from t=20 only failures, 1 a second: 18 of 22 (81.8%) in the 10 s before t=26
        let f = run(|i| i.min(20), |i| 3 * i.min(20) + i.saturating_sub(20));
        assert!(!f[..26].iter().any(|f| *f), "{f:?}");
        assert!(f[26..].iter().all(|f| *f), "{f:?}");
        // 4 refused connects, nothing else: below the minimum of 5 attempts
        assert!(!run(|_| 0, |i| i.min(4)).iter().any(|f| *f));
        let f = run(|_| 0, |i| i.min(5));
        assert!(f[5..=10].iter().all(|f| *f) && !f[11..].iter().any(|f| *f), "{f:?}");
        // evidence by reason, outbound peer connects only
        let out = run_net("connect_failures_high", &p, 3, |i| {
            let mut n = net(&[]);
            n.failed.insert((Service::P2p, "refused"), 4 * i);
            n.failed.insert((Service::P2p, "timeout"), i);
            n.failed.insert((Service::Rpc, "refused"), 100 * i);
            n
        });
        let Outcome::Holds(ev) = &out[2] else { panic!("{out:?}") };
        assert_eq!(ev["attempts"], 10, "{ev}");
        assert_eq!(ev["failed_by_reason"], json!({"refused": 8, "timeout": 2}), "{ev}");
    }

    #[test]
    fn peer_churn_counts_replacements_per_hour() {
        let mut p = params("peer_churn_high", 60);
        p.threshold = Some(600.0); // more than 10 a minute
        let run = |opened: fn(u64) -> u64, closed: fn(u64) -> u64| {
            let out = run_net("peer_churn_high", &p, 120, |i| {
                let mut n = net(&[(1, Direction::Outbound)]);
                n.churn.insert(
                    (Direction::Outbound, Service::P2p),
                    Churn { opened: opened(i), closed: closed(i), open: 1 },
                );
                n.churn.insert((Direction::Inbound, Service::Rpc), Churn { opened: 100 * i, closed: 100 * i, open: 0 });
                n
            });
            holds(&out)
        };
        // one replaced every 2 s: 30 a minute
        assert!(run(|i| i / 2, |i| i / 2)[100]);
        // one every 10 s: 6 a minute
        assert!(!run(|i| i / 10, |i| i / 10).iter().any(|f| *f));
        // many opened, none closed (a node filling its slots): nothing replaced
        assert!(!run(|i| i, |_| 0).iter().any(|f| *f));
    }

    #[test]
    fn history_is_bounded() {
        let t = target(Some(1));
        let n = net(&[(1, Direction::Inbound)]);
        let mut h = History::default();
        for i in 0..(MAX_SAMPLES as u64 + 100) {
            let v = net_view(&t, &n);
            h.record(
                Duration::from_millis(i),
                &v,
                &Lookbacks::keep_all(Duration::from_secs(1), Duration::from_secs(3600)),
            );
        }
        assert_eq!(h.samples.len(), MAX_SAMPLES);
        assert_eq!(h.dropped, 100);
        // identities kept only from the partition baseline on
        let with_peers = h.samples.iter().filter(|s| s.peers.is_some()).count();
        assert!((1000..=1002).contains(&with_peers), "{with_peers}");
    }

    #[test]
    fn old_samples_shed_what_only_shorter_windows_read() {
        let t = target(Some(1));
        let mut n = net(&[(1, Direction::Inbound)]);
        n.inbound_opened_netgroups = [("10.1.0.0/16".to_string(), 1)].into();
        let d = hist(&[1, 0, 0, 0, 0, 0]);
        let lookbacks =
            Lookbacks { peers: s(5), syncs: s(10), failed_reasons: s(10), netgroups: s(20), longest: s(3600) };
        let mut h = History::default();
        for i in 0..100 {
            let v = View { disk: Some(&d), ..net_view(&t, &n) };
            h.record(s(i), &v, &lookbacks);
        }
        assert_eq!(h.samples.len(), 100, "the hour's samples stay");
        let since = |f: fn(&Sample) -> bool| h.samples.iter().position(f).map(|i| h.samples[i].at);
        // each part from its window's baseline on (99 s now)
        assert_eq!(since(|x| x.peers.is_some()), Some(s(94)));
        assert_eq!(since(|x| x.syncs.is_some()), Some(s(89)));
        assert_eq!(since(|x| !x.inbound_netgroups.is_empty()), Some(s(79)));
        assert!(h.samples.iter().all(|x| x.peer_churn.is_some() && x.inbound_opened.is_some()), "counts kept");
        // inbound_flood over its window still sums every interval's netgroups
        let out = inbound_flood(&net_view(&t, &n), &h, s(99), s(20), 1e9);
        let Outcome::Clear(ev) = out else { panic!("{out:?}") };
        assert_eq!(ev["top_netgroups"][0]["connections"], 20, "{ev}");
    }
}

//! The network signal: every TCP connection of each watched node, bytes per
//! peer, churn and lifetimes.
//!
//! `probe` owns the kernel side (net.bpf.c); this module turns its records
//! into a `NetSnapshot` once per interval; `metrics` exports snapshots.

pub mod book;
pub mod metrics;
pub mod probe;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::bpf::{abi, boot_ns_to_unix, BpfError};
use crate::chain::PeerNetwork;
use crate::config::Limits;
use crate::events;
use crate::scope::ScopePlan;
use crate::signal::Signal;
use crate::snapshot::Shared;
use crate::target::{Direction, Service, Target};
use book::{ByteBook, Bytes, SavedBook};
use metrics::NetMetrics;
use probe::{KernelStats, NetProbe};

/// Starts the signal for the collection loop, its instruments registered on
/// `meter` over `snapshot`: None when the kernel refuses its programs
/// (logged here, once; the other signals go on).
pub fn start(
    limits: &Limits,
    meter: &opentelemetry::metrics::Meter,
    snapshot: Shared<NetSnapshot>,
    kept: Option<&crate::bpf::pins::Kept>,
) -> Option<Box<dyn Signal>> {
    let loaded = NetSignal::load(limits, kept);
    // after the load: the per-peer instruments' tables (several MB, sized
    // for every target's top peers) take memory the load's BTF parse freed,
    // instead of adding to it at the agent's peak
    let metrics = NetMetrics::register(meter, snapshot.clone());
    match loaded {
        Ok(signal) => Some(Box::new(Running { signal, metrics, snapshot, failures: Default::default() })),
        Err(e) => {
            tracing::error!("network signal off: {e}");
            None
        }
    }
}

/// The signal as the loop drives it.
struct Running {
    signal: NetSignal,
    metrics: NetMetrics,
    snapshot: Shared<NetSnapshot>,
    failures: crate::signal::FailureLog,
}

impl Signal for Running {
    fn name(&self) -> &'static str {
        "net"
    }

    fn save(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.signal.save()).ok()
    }

    fn restore(&mut self, saved: serde_json::Value) {
        match serde_json::from_value(saved) {
            Ok(saved) => self.signal.restore(saved),
            Err(e) => {
                tracing::warn!("network signal: the saved state is unreadable ({e}); its counters start from zero")
            }
        }
    }

    fn set_scope(&mut self, plan: &ScopePlan, targets: &[Target]) {
        if let Err(e) = self.signal.set_scope(plan, targets) {
            tracing::error!("network signal: writing the watched set to the kernel: {e}");
        }
    }

    fn take_scope_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.signal.take_scope_events()
    }

    fn collect(&mut self, targets: &[Target], plan: &ScopePlan) {
        match self.signal.collect(targets, plan) {
            Ok(snap) => {
                self.metrics.record(&snap);
                self.snapshot.publish(snap);
                self.failures.worked("network");
            }
            Err(e) => {
                self.failures.failed("network", &e);
                // no stale figures: rules over peers turn unknown until it recovers
                self.snapshot.publish(NetSnapshot::default());
            }
        }
    }
}

/// One open connection as /peers shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Connection {
    #[serde(skip)]
    pub cookie: u64,
    pub address: String,
    /// The peer's port.
    pub port: u16,
    pub local_port: u16,
    pub direction: Direction,
    /// "p2p", or "proxy" for a peer behind one of the node's proxies or
    /// arriving through Tor or I2P (address and port are then the proxy's).
    #[serde(serialize_with = "service_str")]
    pub service: Service,
    /// ipv4, ipv6, onion, i2p or proxy.
    pub network: PeerNetwork,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Unix seconds; None for connections open before nodescope started.
    pub connected_since: Option<u64>,
    pub netgroup: String,
}

fn service_str<S: serde::Serializer>(service: &Service, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(service.as_str())
}

/// Counts since the agent started, per direction and service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Churn {
    pub opened: u64,
    pub closed: u64,
    pub open: u64,
}

#[derive(Debug, Clone, Default)]
pub struct TargetNet {
    pub name: String,
    /// Open connections of every service.
    pub connections: Vec<Connection>,
    pub churn: BTreeMap<(Direction, Service), Churn>,
    /// Failed outbound connects by service and reason ("refused", "timeout", "reset", ...).
    pub failed: BTreeMap<(Service, &'static str), u64>,
    /// Bytes per peer address and direction: the top N, then None for "other".
    pub peer_io: Vec<(Option<PeerKey>, Bytes)>,
    /// Every P2P byte since the agent started, per connection direction: what
    /// `peer_io` holds too, but as one total whatever peers move in and out
    /// of the top N or expire (their series leave /metrics, these stay).
    pub p2p_io: BTreeMap<Direction, Bytes>,
    pub netgroup_io: Vec<(Option<String>, Bytes)>,
    /// Distinct netgroups among connected P2P peers, per direction.
    pub netgroups: BTreeMap<Direction, u64>,
    /// Peers whose bytes were folded into "other" because the book was full.
    pub peers_overflowed: u64,
    /// Lifetimes (seconds) of the connections that closed this interval,
    /// each with how many closed with it (more than one only for what an
    /// earlier agent counted, handed over in the first snapshot).
    pub closed_lifetimes: Vec<(Direction, Service, f64, u64)>,
    /// Inbound peer connections opened this interval, by netgroup.
    pub inbound_opened_netgroups: BTreeMap<String, u64>,
}

impl TargetNet {
    /// Connected peers, direct or through a proxy.
    pub fn p2p_peers(&self) -> impl Iterator<Item = &Connection> {
        self.connections.iter().filter(|c| c.service.is_peer())
    }
}

#[derive(Debug, Clone, Default)]
pub struct NetSnapshot {
    pub targets: Vec<TargetNet>,
    pub kernel: KernelStats,
    /// The kernel's table held `limits.max_connections` records at this read,
    /// or could not track some connection since the previous one: open
    /// connections may be missing from `connections`.
    pub truncated: bool,
}

/// Bytes per peer are kept by address, direction and network: peers behind
/// one proxy share its address, and are never mixed with a direct peer there.
pub type PeerKey = (IpAddr, Direction, PeerNetwork);

/// What the agent remembers of one kernel record between reads: under its
/// target's index, or in the state file under its name.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Tracked<T = u32> {
    target: T,
    key: PeerKey,
    netgroup: String,
    service: Service,
    network: PeerNetwork,
    counted_open: bool,
    /// CLOCK_BOOTTIME at establishment, from whichever of its record or
    /// events had it; 0 for connections open before the agent.
    start_ns: u64,
    last: Bytes,
}

struct PerTarget {
    name: String,
    churn: BTreeMap<(Direction, Service), Churn>,
    failed: BTreeMap<(Service, &'static str), u64>,
    peers: ByteBook<PeerKey>,
    netgroups: ByteBook<String>,
    p2p_io: BTreeMap<Direction, Bytes>,
    /// Every lifetime at close so far, by histogram bucket, to save.
    lifetimes: BTreeMap<(Direction, Service), LifetimeTotals>,
    /// Lifetimes an earlier agent counted, for the first snapshot.
    replay: Vec<(Direction, Service, f64, u64)>,
}

/// Bucket bounds (seconds) of the connection lifetime histogram: seconds to a week.
pub const LIFETIME_BUCKETS: &[f64] = &[1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0, 604800.0];

/// Lifetimes at close per histogram bucket (`LIFETIME_BUCKETS`, then +Inf):
/// how many, and their sum in seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct LifetimeTotals {
    counts: Vec<u64>,
    sums: Vec<f64>,
}

impl LifetimeTotals {
    fn add(&mut self, secs: f64, n: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; LIFETIME_BUCKETS.len() + 1];
            self.sums = vec![0.0; LIFETIME_BUCKETS.len() + 1];
        }
        // the histogram's buckets hold (lower, upper]
        let i = LIFETIME_BUCKETS.iter().position(|b| secs <= *b).unwrap_or(LIFETIME_BUCKETS.len());
        self.counts[i] += n;
        self.sums[i] += secs * n as f64;
    }

    /// Each bucket's mean, as often as it was seen: what the histogram is
    /// fed to go on from these figures.
    fn replay(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.counts.iter().zip(&self.sums).filter(|(n, _)| **n > 0).map(|(n, s)| (s / *n as f64, *n))
    }
}

pub struct NetSignal {
    probe: NetProbe,
    limits: Limits,
    tracked: HashMap<u64, Tracked>,
    targets: BTreeMap<u32, PerTarget>,
    /// The kernel's dropped-connection count at the previous read.
    last_dropped: u64,
    /// What an earlier agent saved, by target name, taken when the target
    /// is first collected.
    restored: HashMap<String, SavedTarget>,
    /// Its open connections, taken at the first collection.
    restored_conns: Vec<SavedConn>,
}

/// What the network signal keeps across agent restarts (crate::state).
#[derive(Debug, Serialize, Deserialize)]
pub struct SavedNet {
    /// The boot the socket cookies below belong to: cookies start over at
    /// each boot, so after a reboot the connections are not looked for.
    boot_id: String,
    targets: Vec<SavedTarget>,
    /// The open connections and what was counted of each, by socket
    /// cookie (the kernel's, fixed for a socket's life): a connection still
    /// open after the restart goes on from there, one that closed meanwhile
    /// is finished from its close event.
    connections: Vec<SavedConn>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SavedTarget {
    name: String,
    /// (direction, service, opened, closed)
    churn: Vec<(Direction, Service, u64, u64)>,
    failed: Vec<(Service, String, u64)>,
    peers: SavedBook<PeerKey>,
    netgroups: SavedBook<String>,
    /// (direction, P2P bytes); absent from the files of earlier builds
    #[serde(default)]
    p2p_io: Vec<(Direction, Bytes)>,
    /// (direction, service, lifetimes per bucket)
    #[serde(default)]
    lifetimes: Vec<(Direction, Service, LifetimeTotals)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedConn {
    cookie: u64,
    #[serde(flatten)]
    conn: Tracked<String>,
}

impl<T> Tracked<T> {
    fn with_target<U>(self, target: U) -> Tracked<U> {
        let Tracked { target: _, key, netgroup, service, network, counted_open, start_ns, last } = self;
        Tracked { target, key, netgroup, service, network, counted_open, start_ns, last }
    }
}

/// Values of failure_reason(), to take a saved one back as `&'static str`.
const FAILURE_REASONS: [&str; 5] = ["refused", "timeout", "reset", "unreachable", "other"];

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

impl NetSignal {
    pub fn load(limits: &Limits, kept: Option<&crate::bpf::pins::Kept>) -> Result<NetSignal, BpfError> {
        Ok(NetSignal {
            probe: NetProbe::load(limits.max_connections, kept)?,
            limits: limits.clone(),
            tracked: HashMap::new(),
            targets: BTreeMap::new(),
            last_dropped: 0,
            restored: HashMap::new(),
            restored_conns: Vec::new(),
        })
    }

    /// Totals per target and the open connections, for the state file.
    pub fn save(&self) -> SavedNet {
        let now = Instant::now();
        let targets = self
            .targets
            .values()
            .map(|per| SavedTarget {
                name: per.name.clone(),
                churn: per.churn.iter().map(|((d, s), c)| (*d, *s, c.opened, c.closed)).collect(),
                failed: per.failed.iter().map(|((s, r), n)| (*s, r.to_string(), *n)).collect(),
                peers: per.peers.save(now),
                netgroups: per.netgroups.save(now),
                p2p_io: per.p2p_io.iter().map(|(d, b)| (*d, *b)).collect(),
                lifetimes: per.lifetimes.iter().map(|((d, s), l)| (*d, *s, l.clone())).collect(),
            })
            // targets not seen again yet keep what was restored for them
            .chain(self.restored.values().cloned())
            .collect();
        let connections = self
            .tracked
            .iter()
            .filter_map(|(cookie, t)| {
                let name = self.targets.get(&t.target)?.name.clone();
                Some(SavedConn { cookie: *cookie, conn: t.clone().with_target(name) })
            })
            .collect();
        SavedNet { boot_id: boot_id(), targets, connections }
    }

    /// Takes over what an earlier agent saved; applied as targets are
    /// collected.
    pub fn restore(&mut self, saved: SavedNet) {
        let same_boot = saved.boot_id == boot_id();
        let mut conns = saved.connections;
        let mut targets: HashMap<String, SavedTarget> =
            saved.targets.into_iter().map(|t| (t.name.clone(), t)).collect();
        if !same_boot {
            // every connection ended with the boot: closed, with what was counted
            for c in conns.drain(..) {
                let c = c.conn;
                if let Some(t) = targets.get_mut(&c.target) {
                    match t.churn.iter_mut().find(|(d, s, _, _)| (*d, *s) == (c.key.1, c.service)) {
                        Some(entry) => entry.3 += 1,
                        None => t.churn.push((c.key.1, c.service, 0, 1)),
                    }
                }
            }
        }
        tracing::info!(
            "network signal: counters of {} target(s) and {} open connection(s) taken over from the state file{}",
            targets.len(),
            conns.len(),
            if same_boot { "" } else { " (after a reboot: its connections counted closed)" }
        );
        self.restored = targets;
        self.restored_conns = conns;
    }

    /// Writes the scope plan to the kernel, with the socket inodes of nodes
    /// that share their cgroup (to adopt their older connections).
    pub fn set_scope(&mut self, plan: &ScopePlan, targets: &[Target]) -> Result<(), BpfError> {
        self.probe.set_scope(plan)?;
        self.probe.set_adoptable(targets.iter().map(|t| (t.index, &t.scope)))
    }

    /// The exec events ring buffer of the scope programs.
    pub fn take_scope_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.probe.take_scope_events()
    }

    /// One interval: read the kernel (in every watched network namespace)
    /// and fold its records and close events into totals.
    pub fn collect(&mut self, targets: &[Target], plan: &ScopePlan) -> Result<NetSnapshot, BpfError> {
        let own_netns = crate::discovery::namespace_inode(std::path::Path::new("/proc"), std::process::id(), "net");
        let mut netns_pids: BTreeMap<u64, u32> = BTreeMap::new();
        for t in targets {
            if let (Some(ns), Some(pid)) = (t.netns, t.pid) {
                if Some(ns) != own_netns {
                    netns_pids.entry(ns).or_insert(pid);
                }
            }
        }
        let read = self.probe.read(&netns_pids.into_values().collect::<Vec<_>>())?;
        let records = read.records.len();
        let now = Instant::now();
        let by_index: HashMap<u32, &Target> = targets.iter().map(|t| (t.index, t)).collect();
        for t in targets {
            // a slot freed by a forgotten target and taken by a new one starts afresh
            if self.targets.get(&t.index).is_none_or(|p| p.name != t.name) {
                let per = match self.restored.remove(&t.name) {
                    Some(saved) => PerTarget::restore(saved, self.limits.max_peers, now),
                    None => PerTarget {
                        name: t.name.clone(),
                        churn: BTreeMap::new(),
                        failed: BTreeMap::new(),
                        peers: ByteBook::new(self.limits.max_peers),
                        netgroups: ByteBook::new(self.limits.max_peers),
                        p2p_io: BTreeMap::new(),
                        lifetimes: BTreeMap::new(),
                        replay: Vec::new(),
                    },
                };
                self.targets.insert(t.index, per);
            }
        }
        // the connections an earlier agent had open, under this agent's indexes
        for c in std::mem::take(&mut self.restored_conns) {
            if let Some(t) = targets.iter().find(|t| t.name == c.conn.target) {
                self.tracked.insert(c.cookie, c.conn.with_target(t.index));
            }
        }

        let mut fold = Fold {
            open: HashMap::new(),
            lifetimes: HashMap::new(),
            inbound: HashMap::new(),
            seen: HashSet::new(),
            now,
        };
        // "Opened" events first: they carry the direction and start of
        // accepted connections whose record (made by the iterator) or close
        // event may be in this same read.
        let (opened, ended): (Vec<_>, Vec<_>) =
            read.events.into_iter().partition(|e| e.conn.state == abi::CONN_ESTABLISHED);
        for event in opened {
            self.fold(event.cookie, event.conn, Source::Opened, &by_index, plan, &mut fold);
        }
        for (cookie, rec) in read.records {
            self.fold(cookie, rec, Source::Record, &by_index, plan, &mut fold);
        }
        for event in ended {
            self.fold(event.cookie, event.conn, Source::Ended, &by_index, plan, &mut fold);
        }
        let Fold { mut open, mut lifetimes, mut inbound, seen, .. } = fold;
        // Records that vanished with no close event: their target was
        // forgotten, or the agent lost track of them. Closed without bytes.
        let vanished: Vec<u64> = self.tracked.keys().filter(|c| !seen.contains(c)).copied().collect();
        for cookie in vanished {
            if let Some(t) = self.tracked.remove(&cookie) {
                if let Some(per) = self.targets.get_mut(&t.target) {
                    per.churn.entry((t.key.1, t.service)).or_default().closed += 1;
                    if t.service.is_peer() {
                        per.peers.close(&t.key, now);
                        per.netgroups.close(&t.netgroup, now);
                    }
                }
            }
        }

        let kernel = self.probe.kernel_stats()?;
        let truncated = truncated(records, self.limits.max_connections, kernel.conn_dropped, self.last_dropped);
        self.last_dropped = kernel.conn_dropped;
        let mut snapshot = NetSnapshot { targets: Vec::new(), kernel, truncated };
        for t in targets {
            let per = self.targets.get_mut(&t.index).expect("inserted above");
            per.peers.expire(self.limits.peer_ttl, now);
            per.netgroups.expire(self.limits.peer_ttl, now);
            let mut connections = open.remove(&t.index).unwrap_or_default();
            connections.sort_by(|a, b| (a.direction, &a.address, a.port).cmp(&(b.direction, &b.address, b.port)));
            let mut churn = per.churn.clone();
            for c in &connections {
                churn.entry((c.direction, c.service)).or_default().open += 1;
            }
            let mut netgroups: BTreeMap<Direction, std::collections::BTreeSet<&str>> = BTreeMap::new();
            for c in connections.iter().filter(|c| c.service.is_peer()) {
                netgroups.entry(c.direction).or_default().insert(&c.netgroup);
            }
            let netgroups = [Direction::Inbound, Direction::Outbound]
                .into_iter()
                .map(|d| (d, netgroups.get(&d).map_or(0, |s| s.len() as u64)))
                .collect();
            let closed = lifetimes.remove(&t.index).unwrap_or_default();
            for (d, s, secs, n) in &closed {
                per.lifetimes.entry((*d, *s)).or_default().add(*secs, *n);
            }
            snapshot.targets.push(TargetNet {
                name: t.name.clone(),
                churn,
                failed: per.failed.clone(),
                peer_io: per.peers.export(self.limits.top_peers),
                p2p_io: per.p2p_io.clone(),
                netgroup_io: per.netgroups.export(self.limits.top_peers),
                netgroups,
                peers_overflowed: per.peers.overflowed,
                closed_lifetimes: std::mem::take(&mut per.replay).into_iter().chain(closed).collect(),
                inbound_opened_netgroups: inbound.remove(&t.index).unwrap_or_default(),
                connections,
            });
        }
        events::flush();
        Ok(snapshot)
    }

    /// Folds one kernel record (from the map, or an event) into the totals
    /// of its target.
    fn fold(
        &mut self,
        cookie: u64,
        rec: abi::Conn,
        source: Source,
        by_index: &HashMap<u32, &Target>,
        plan: &ScopePlan,
        fold: &mut Fold,
    ) {
        let now = fold.now;
        // A process the kernel saw exec under a node's name, before the agent
        // knew which node: its target is the one that process turned out to be.
        let index = match rec.target {
            abi::TARGET_PENDING => match plan.target_of_pid(rec.tgid) {
                Some(i) => i,
                None => {
                    // not (yet) a node: keep an open record for a later pass
                    if rec.state == abi::CONN_CLOSED || rec.state == abi::CONN_FAILED || rec.tgid == 0 {
                        let _ = self.probe.forget(cookie);
                    }
                    return;
                }
            },
            i => i,
        };
        // its target went away with the record still open: nothing to report it under
        let Some(target) = by_index.get(&index) else {
            self.tracked.remove(&cookie);
            let _ = self.probe.forget(cookie);
            return;
        };
        let per = self.targets.get_mut(&index).expect("inserted for every target");
        if rec.state == abi::CONN_FAILED {
            let remote = SocketAddr::new(ip(rec.family, &rec.raddr), rec.rport);
            let (service, _) = target.service(Direction::Outbound, rec.lport, remote);
            *per.failed.entry((service, failure_reason(rec.error))).or_default() += 1;
            let (t, reason) = (rec.end_ns.max(rec.start_ns), json!({ "reason": failure_reason(rec.error) }));
            events::conn(
                t,
                "failed",
                &target.name,
                "outbound",
                service.as_str(),
                remote.ip(),
                rec.rport,
                rec.lport,
                reason,
            );
            self.tracked.remove(&cookie);
            return;
        }
        if rec.state == abi::CONN_CONNECTING {
            return;
        }
        fold.seen.insert(cookie);
        let remote = ip(rec.family, &rec.raddr);
        // Direction and service are decided once, at first sight, while the
        // node runs and its ports are known: a close read after the node
        // died keeps what the connection was.
        let (direction, service, network) = match self.tracked.get(&cookie) {
            // an accepted connection's record and close carry no direction of
            // their own: its "opened" event had it
            Some(t) => (t.key.1, t.service, t.network),
            None => {
                let direction = match rec.direction {
                    abi::DIR_INBOUND => Direction::Inbound,
                    abi::DIR_OUTBOUND => Direction::Outbound,
                    _ => target.infer_direction(rec.lport),
                };
                let (service, network) = target.service(direction, rec.lport, SocketAddr::new(remote, rec.rport));
                (direction, service, network)
            }
        };
        let tracked = self.tracked.entry(cookie).or_insert_with(|| {
            let key = (remote, direction, network);
            // peers behind a proxy share its address: their group is their network
            let netgroup = if network.is_proxied() { network.as_str().to_string() } else { netgroup(remote) };
            if service.is_peer() {
                per.peers.open(&key, now);
                per.netgroups.open(&netgroup, now);
            }
            Tracked {
                target: index,
                key,
                netgroup,
                service,
                network,
                counted_open: false,
                start_ns: 0,
                last: Bytes::default(),
            }
        });
        if tracked.start_ns == 0 {
            tracked.start_ns = rec.start_ns;
        }
        let start_ns = tracked.start_ns;
        // A record the iterator made (start 0) can be read before the
        // "opened" event of the same connection when that event waits in its
        // CPU's log behind an entry still being written: the open is
        // counted when the event arrives, so it is only marked counted here.
        if !tracked.counted_open && start_ns != 0 {
            tracked.counted_open = true;
            per.churn.entry((direction, service)).or_default().opened += 1;
            let (d, s) = (direction.as_str(), service.as_str());
            events::conn(start_ns, "open", &target.name, d, s, remote, rec.rport, rec.lport, json!({}));
            if direction == Direction::Inbound && service.is_peer() {
                *fold.inbound.entry(index).or_default().entry(tracked.netgroup.clone()).or_default() += 1;
            }
        }

        let bytes = payload(&rec, direction);
        let delta = Bytes {
            sent: bytes.sent.saturating_sub(tracked.last.sent),
            received: bytes.received.saturating_sub(tracked.last.received),
        };
        tracked.last =
            Bytes { sent: tracked.last.sent.max(bytes.sent), received: tracked.last.received.max(bytes.received) };
        if service.is_peer() {
            per.peers.add(&tracked.key, delta, now);
            per.netgroups.add(&tracked.netgroup, delta, now);
            let total = per.p2p_io.entry(direction).or_default();
            total.sent += delta.sent;
            total.received += delta.received;
        }

        if rec.state == abi::CONN_CLOSED {
            per.churn.entry((direction, service)).or_default().closed += 1;
            let ev = json!({ "bytes_sent": bytes.sent, "bytes_received": bytes.received });
            let (d, s) = (direction.as_str(), service.as_str());
            events::conn(rec.end_ns, "close", &target.name, d, s, remote, rec.rport, rec.lport, ev);
            if service.is_peer() {
                per.peers.close(&tracked.key, now);
                per.netgroups.close(&tracked.netgroup, now);
            }
            if start_ns != 0 && rec.end_ns >= start_ns {
                let secs = Duration::from_nanos(rec.end_ns - start_ns).as_secs_f64();
                fold.lifetimes.entry(index).or_default().push((direction, service, secs, 1));
            }
            self.tracked.remove(&cookie);
            fold.open.entry(index).or_default().retain(|c: &Connection| c.cookie != cookie);
        } else if source == Source::Record {
            // an open connection is listed from its record (an "opened" event
            // whose record the iterator has not made yet shows next read)
            fold.open.entry(index).or_default().push(Connection {
                cookie,
                address: remote.to_string(),
                port: rec.rport,
                local_port: rec.lport,
                direction,
                service,
                network,
                bytes_sent: bytes.sent,
                bytes_received: bytes.received,
                connected_since: boot_ns_to_unix(start_ns),
                netgroup: tracked.netgroup.clone(),
            });
        }
    }
}

/// Whether open connections may be missing from a read: the kernel's table
/// was full (`records` of `max` at the read, so a connection left out stays
/// out while it lasts), or it refused some connection since the last read.
fn truncated(records: usize, max: u32, dropped: u64, dropped_before: u64) -> bool {
    records >= max as usize || dropped > dropped_before
}

impl PerTarget {
    fn restore(saved: SavedTarget, max_peers: usize, now: Instant) -> PerTarget {
        let mut churn: BTreeMap<(Direction, Service), Churn> = BTreeMap::new();
        for (d, s, opened, closed) in saved.churn {
            let c = churn.entry((d, s)).or_default();
            c.opened += opened;
            c.closed += closed;
        }
        let mut failed = BTreeMap::new();
        for (s, reason, n) in saved.failed {
            let reason = FAILURE_REASONS.iter().find(|r| **r == reason).copied().unwrap_or("other");
            *failed.entry((s, reason)).or_default() += n;
        }
        let mut lifetimes = BTreeMap::new();
        let mut replay = Vec::new();
        for (d, s, l) in saved.lifetimes {
            // a build with other buckets cannot go on from these
            if l.counts.len() != LIFETIME_BUCKETS.len() + 1 || l.sums.len() != l.counts.len() {
                continue;
            }
            replay.extend(l.replay().map(|(secs, n)| (d, s, secs, n)));
            lifetimes.insert((d, s), l);
        }
        if !crate::state::replay_histogram("network", &saved.name, replay.iter().map(|r| r.3).sum()) {
            replay.clear();
            lifetimes.clear();
        }
        PerTarget {
            name: saved.name,
            churn,
            failed,
            peers: ByteBook::restore(saved.peers, max_peers, now),
            netgroups: ByteBook::restore(saved.netgroups, max_peers, now),
            p2p_io: saved.p2p_io.into_iter().collect(),
            lifetimes,
            replay,
        }
    }
}

/// Where a folded record came from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The event log's entry for an accepted connection.
    Opened,
    /// The record map (open connections, and tombstones).
    Record,
    /// The event log's entry for a close or a failure.
    Ended,
}

/// What one collection gathers while folding records.
struct Fold {
    open: HashMap<u32, Vec<Connection>>,
    lifetimes: HashMap<u32, Vec<(Direction, Service, f64, u64)>>,
    /// Inbound peer connections opened, by target and netgroup.
    inbound: HashMap<u32, BTreeMap<String, u64>>,
    seen: HashSet<u64>,
    now: Instant,
}

/// The kernel's counters count sequence space: the SYN of a connection the
/// node opened, its FIN once queued and the peer's FIN once received each
/// take one byte that no one wrote or read.
fn payload(rec: &abi::Conn, direction: Direction) -> Bytes {
    let syn = u64::from(direction == Direction::Outbound && rec.bytes_sent > 0);
    let fin_sent = u64::from(rec.flags & abi::CONN_F_FIN_SENT != 0);
    let fin_received = u64::from(rec.flags & abi::CONN_F_FIN_RECEIVED != 0);
    Bytes {
        sent: rec.bytes_sent.saturating_sub(syn + fin_sent),
        received: rec.bytes_received.saturating_sub(fin_received),
    }
}

/// Why a connect failed. No error at all means the node closed the socket
/// while the connect was still pending: it gave up waiting (Bitcoin Core's
/// `-timeout`), which is a timeout from where the node stands.
fn failure_reason(errno: i32) -> &'static str {
    match errno {
        libc::ECONNREFUSED => "refused",
        0 | libc::ETIMEDOUT => "timeout",
        libc::ECONNRESET => "reset",
        libc::EHOSTUNREACH | libc::ENETUNREACH => "unreachable",
        _ => "other",
    }
}

pub fn ip(family: u16, raw: &[u8; 16]) -> IpAddr {
    if family == libc::AF_INET as u16 {
        IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
    } else {
        let v6 = Ipv6Addr::from(*raw);
        // dual-stack listeners see IPv4 peers as ::ffff:a.b.c.d
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    }
}

/// The peer's network group as Bitcoin Core buckets peers: IPv4 /16, IPv6 /32.
pub fn netgroup(addr: IpAddr) -> String {
    let net = match addr {
        IpAddr::V4(a) => ipnet::IpNet::V4(ipnet::Ipv4Net::new(a, 16).expect("valid prefix").trunc()),
        IpAddr::V6(a) => ipnet::IpNet::V6(ipnet::Ipv6Net::new(a, 32).expect("valid prefix").trunc()),
    };
    net.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_go_on_across_a_restore() {
        let now = Instant::now();
        let mut l = LifetimeTotals::default();
        for secs in [0.5, 1.0, 1.5, 9.0, 1e7] {
            l.add(secs, 1);
        }
        assert_eq!(l.counts, vec![2, 2, 0, 0, 0, 0, 0, 0, 0, 1], "(lower, upper] buckets");
        let (d, s) = (Direction::Inbound, Service::P2p);
        let saved = SavedTarget {
            name: "t".into(),
            churn: vec![],
            failed: vec![],
            peers: ByteBook::<PeerKey>::new(4).save(now),
            netgroups: ByteBook::<String>::new(4).save(now),
            p2p_io: vec![(d, Bytes { sent: 5, received: 7 })],
            lifetimes: vec![(d, s, l.clone())],
        };
        let json = serde_json::to_string(&saved).unwrap();
        let per = PerTarget::restore(serde_json::from_str(&json).unwrap(), 4, now);
        assert_eq!(per.lifetimes[&(d, s)], l);
        assert_eq!(per.p2p_io, [(d, Bytes { sent: 5, received: 7 })].into());
        // a state file of a build without the P2P totals: they start at zero
        let mut older: serde_json::Value = serde_json::from_str(&json).unwrap();
        older.as_object_mut().unwrap().remove("p2p_io");
        let per_older = PerTarget::restore(serde_json::from_value(older).unwrap(), 4, now);
        assert!(per_older.p2p_io.is_empty());
        // each bucket's mean, in its own bucket, as often as it was seen
        assert_eq!(per.replay, vec![(d, s, 0.75, 2), (d, s, 5.25, 2), (d, s, 1e7, 1)]);

        // past the replay bound the histogram starts from zero, counted
        let mut big = LifetimeTotals::default();
        big.add(2.0, crate::state::MAX_HISTOGRAM_REPLAY + 1);
        let before = crate::state::histograms_restarted();
        let saved =
            SavedTarget { name: "u".into(), lifetimes: vec![(d, s, big)], ..serde_json::from_str(&json).unwrap() };
        let per = PerTarget::restore(saved, 4, now);
        assert!(per.replay.is_empty() && per.lifetimes.is_empty());
        assert_eq!(crate::state::histograms_restarted(), before + 1);
    }

    #[test]
    fn netgroups() {
        assert_eq!(netgroup("127.0.0.1".parse().unwrap()), "127.0.0.0/16");
        assert_eq!(netgroup("203.0.113.9".parse().unwrap()), "203.0.0.0/16");
        assert_eq!(netgroup("2001:db8:1:2::5".parse().unwrap()), "2001:db8::/32");
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let mut raw = [0u8; 16];
        raw[10] = 0xff;
        raw[11] = 0xff;
        raw[12..].copy_from_slice(&[10, 1, 2, 3]);
        assert_eq!(ip(libc::AF_INET6 as u16, &raw), "10.1.2.3".parse::<IpAddr>().unwrap());
        assert_eq!(
            ip(libc::AF_INET as u16, &[192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]).to_string(),
            "192.0.2.1"
        );
    }

    #[test]
    fn truncated_while_the_table_is_full_or_refused_one() {
        assert!(!truncated(10, 64, 5, 5));
        assert!(truncated(10, 64, 6, 5), "a connection refused since the last read");
        assert!(truncated(64, 64, 5, 5), "full: the connections it refused are still out");
        assert!(!truncated(63, 64, 5, 5));
    }

    #[test]
    fn payload_removes_sequence_bytes() {
        let mut c = abi::Conn { bytes_sent: 1001, bytes_received: 301, ..Default::default() };
        c.flags = abi::CONN_F_FIN_RECEIVED;
        assert_eq!(payload(&c, Direction::Outbound), Bytes { sent: 1000, received: 300 });
        c.flags |= abi::CONN_F_FIN_SENT;
        assert_eq!(payload(&c, Direction::Inbound), Bytes { sent: 1000, received: 300 });
        let fresh = abi::Conn::default();
        assert_eq!(payload(&fresh, Direction::Outbound), Bytes::default());
    }
}

//! Watched nodes: from config or discovery to a running process, its cgroup,
//! its ports, and the scope the kernel programs use to pick its sockets.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::bpf::abi::{MAX_TARGETS, TARGET_PENDING};
use crate::cgroup::{self, Mounts, ProcessCgroups};
use crate::chain::{Chain, Network, PeerNetwork};
use crate::config::{Config, TargetConfig};
use crate::container::{self, Container};
use crate::discovery::{self, foreign_root, namespace_inode};

/// How a target is named in config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    PidFile(PathBuf),
    Process(String),
    /// Absolute, or relative to the cgroup2 mount.
    Cgroup(PathBuf),
    /// A container's (or pod's) name or id prefix.
    Container(String),
    /// Found by discovery.
    Pid(u32),
}

#[derive(Debug, Clone)]
pub struct TargetSpec {
    pub name: String,
    pub selector: Selector,
    pub chain: Chain,
    pub datadir: Option<PathBuf>,
    pub p2p_ports: Vec<u16>,
    pub rpc_ports: Vec<u16>,
    /// Proxies named in config, beside those the node's own config names.
    pub proxies: Vec<SocketAddr>,
}

impl From<&TargetConfig> for TargetSpec {
    fn from(t: &TargetConfig) -> Self {
        let selector = match (&t.pid_file, &t.process, &t.cgroup, &t.container) {
            (Some(p), _, _, _) => Selector::PidFile(p.clone()),
            (_, Some(p), _, _) => Selector::Process(p.clone()),
            (_, _, Some(c), _) => Selector::Cgroup(c.clone()),
            (_, _, _, Some(c)) => Selector::Container(c.clone()),
            // Config::validate guarantees one of the four
            _ => unreachable!("validated target without selector"),
        };
        TargetSpec {
            name: t.name.clone(),
            selector,
            chain: t.chain,
            datadir: t.datadir.clone(),
            p2p_ports: t.p2p_ports.clone(),
            rpc_ports: t.rpc_ports.clone(),
            proxies: t.proxies.clone(),
        }
    }
}

/// Which sockets belong to a target, as the kernel programs test it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The node has a cgroup2 group to itself: every socket created in it.
    Cgroup { id: u64, path: PathBuf },
    /// The node shares its group: connects made by these processes and
    /// connections accepted on these listening ports; connections older than
    /// the agent are adopted by the socket inodes the process holds.
    Process { pids: Vec<u32>, listen_ports: Vec<u16>, socket_inodes: Vec<u64> },
    /// Not running.
    Absent,
}

#[derive(Debug, Clone)]
pub struct Target {
    /// Stable slot in the kernel maps, `< MAX_TARGETS`.
    pub index: u32,
    pub name: String,
    pub chain: Chain,
    pub network: Option<Network>,
    pub pid: Option<u32>,
    pub scope: Scope,
    /// The node's cgroup2 directory, when there is one.
    pub cgroup_v2: Option<PathBuf>,
    /// The network's own data dir (blocks, chain state).
    pub datadir: Option<PathBuf>,
    pub p2p_ports: Vec<u16>,
    pub rpc_ports: Vec<u16>,
    /// Every TCP port the node listens on.
    pub listening: Vec<u16>,
    /// `/proc/PID/root` when the node lives in another mount namespace than
    /// the agent (a container): its paths (data dir, config, pid file) are
    /// read through it, so no volume has to be mounted into the agent.
    pub root: Option<PathBuf>,
    /// Inode of the node's network namespace (`/proc/PID/ns/net`): its
    /// sockets and listening ports are only ever matched in that namespace.
    pub netns: Option<u64>,
    /// The proxies the node reaches peers through, by what they carry.
    pub proxies: Vec<(SocketAddr, PeerNetwork)>,
    /// Local ports where Tor or I2P deliver inbound peers.
    pub onion_ports: Vec<(u16, PeerNetwork)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

const TOR_CONTROL_PORT: u16 = 9051;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    P2p,
    /// P2P peers reached through a proxy, or arriving through Tor or I2P:
    /// the kernel sees the local proxy's address, not the peer's.
    Proxy,
    Rpc,
    Other,
}

impl Service {
    pub fn as_str(self) -> &'static str {
        match self {
            Service::P2p => "p2p",
            Service::Proxy => "proxy",
            Service::Rpc => "rpc",
            Service::Other => "other",
        }
    }

    /// A P2P peer, reached directly or through a proxy.
    pub fn is_peer(self) -> bool {
        matches!(self, Service::P2p | Service::Proxy)
    }
}

impl Target {
    /// A litecoin target with no cgroup or data dir, for unit tests.
    #[cfg(test)]
    pub fn litecoin_for_tests(name: &str, pid: Option<u32>, p2p: &[u16], rpc: &[u16], listening: &[u16]) -> Target {
        Target {
            index: 0,
            name: name.into(),
            chain: Chain::Litecoin,
            network: None,
            pid,
            scope: Scope::Absent,
            cgroup_v2: None,
            datadir: None,
            p2p_ports: p2p.to_vec(),
            rpc_ports: rpc.to_vec(),
            listening: listening.to_vec(),
            root: None,
            netns: None,
            proxies: Vec::new(),
            onion_ports: Vec::new(),
        }
    }

    /// A path as the node sees it, as the agent can open it.
    pub fn host_path(&self, node_path: &Path) -> PathBuf {
        match &self.root {
            Some(root) => resolve_in_root(root, node_path),
            None => node_path.to_path_buf(),
        }
    }

    /// The data dir, as the agent can open it.
    pub fn host_datadir(&self) -> Option<PathBuf> {
        self.datadir.as_deref().map(|d| self.host_path(d))
    }

    /// Direction of a connection that was open before nodescope started:
    /// accepted when its local port is one the node listens on.
    pub fn infer_direction(&self, local_port: u16) -> Direction {
        let listens = self.listening.contains(&local_port)
            || self.p2p_ports.contains(&local_port)
            || self.rpc_ports.contains(&local_port);
        if listens {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }

    /// Inbound connections are told apart by the port they arrived on. A node
    /// opens outbound TCP to peers, directly or through one of its proxies,
    /// and to little else: Tor's control port, which Bitcoin and Litecoin
    /// Core dial at start to publish an onion service. Also says which
    /// network the peer is reached over.
    pub fn service(&self, direction: Direction, local_port: u16, remote: SocketAddr) -> (Service, PeerNetwork) {
        let clearnet = if remote.is_ipv4() { PeerNetwork::Ipv4 } else { PeerNetwork::Ipv6 };
        match direction {
            Direction::Outbound => match self.proxies.iter().find(|(a, _)| *a == remote) {
                Some((_, network)) => (Service::Proxy, *network),
                None if remote.port() == TOR_CONTROL_PORT => (Service::Other, clearnet),
                None => (Service::P2p, clearnet),
            },
            Direction::Inbound => match self.onion_ports.iter().find(|(p, _)| *p == local_port) {
                // Core's default onion port counts only when the node listens there
                Some((_, network)) if self.listening.contains(&local_port) => (Service::Proxy, *network),
                _ if self.p2p_ports.contains(&local_port) => (Service::P2p, clearnet),
                _ if self.rpc_ports.contains(&local_port) => (Service::Rpc, clearnet),
                _ => (Service::Other, clearnet),
            },
        }
    }
}

/// A node's (p2p, rpc, listening) ports.
type KnownPorts = (Vec<u16>, Vec<u16>, Vec<u16>);

/// The set of targets, re-resolved every interval.
pub struct Targets {
    specs: Vec<TargetSpec>,
    discover: bool,
    proc_root: PathBuf,
    mounts: Mounts,
    slots: BTreeMap<String, u32>,
    current: Vec<Target>,
    /// What was last logged per target, so each change is logged once.
    last_state: BTreeMap<String, String>,
    /// Discovered nodes that went away, and since when.
    absent_since: BTreeMap<String, Instant>,
    /// How long a discovered node that went away stays listed (absent, so
    /// node_down fires and stays firing) before it is forgotten:
    /// `agent.forget_absent_after`, a day by default, so an alert on it
    /// does not clear while the node is still down.
    absent_ttl: Duration,
    /// Each target's ports (p2p, rpc, listening) when it last ran: a node
    /// that is down keeps them, so the closes of its last connections, read
    /// after it died, are still told apart (p2p, rpc) as they were.
    last_ports: BTreeMap<String, KnownPorts>,
}

impl Targets {
    pub fn new(config: &Config, mounts: Mounts) -> Targets {
        Targets {
            specs: config.targets.iter().map(TargetSpec::from).collect(),
            discover: config.targets.is_empty() && config.agent.discover,
            proc_root: PathBuf::from("/proc"),
            mounts,
            slots: BTreeMap::new(),
            current: Vec::new(),
            last_state: BTreeMap::new(),
            absent_since: BTreeMap::new(),
            absent_ttl: config.agent.forget_absent_after,
            last_ports: BTreeMap::new(),
        }
    }

    /// A reloaded config's targets: resolved from the next refresh on. A
    /// target that keeps its name keeps its slot, so its kernel counters go
    /// on; slots of removed targets stay reserved for the name.
    pub fn reconfigure(&mut self, config: &Config) {
        self.specs = config.targets.iter().map(TargetSpec::from).collect();
        self.discover = config.targets.is_empty() && config.agent.discover;
        self.absent_ttl = config.agent.forget_absent_after;
    }

    /// Target name -> index, as the kernel's records carry it.
    pub fn slots(&self) -> &BTreeMap<String, u32> {
        &self.slots
    }

    /// The indexes an earlier agent gave its targets (crate::state), so the
    /// records its kernel side kept name the same nodes; before the first
    /// refresh.
    pub fn restore_slots(&mut self, slots: &BTreeMap<String, u32>) {
        let mut used = std::collections::BTreeSet::new();
        for (name, index) in slots {
            if (*index as usize) < MAX_TARGETS && used.insert(*index) {
                self.slots.insert(name.clone(), *index);
            }
        }
    }

    pub fn is_discovering(&self) -> bool {
        self.discover
    }

    /// The targets as the last refresh resolved them.
    pub fn current(&self) -> &[Target] {
        &self.current
    }

    pub fn refresh(&mut self) -> &[Target] {
        let specs = if self.discover { self.discovered_specs() } else { self.specs.clone() };
        let mut out = Vec::with_capacity(specs.len());
        for spec in &specs {
            let Some(index) = self.slot(&spec.name) else {
                self.log_once(&spec.name, "no slot".into(), || {
                    tracing::warn!(target_name = %spec.name, "more than {MAX_TARGETS} targets; this one is not watched")
                });
                continue;
            };
            let mut t = self.resolve(index, spec);
            if t.pid.is_some() {
                self.last_ports.insert(t.name.clone(), (t.p2p_ports.clone(), t.rpc_ports.clone(), t.listening.clone()));
            } else if let Some((p2p, rpc, listening)) = self.last_ports.get(&t.name) {
                for (now, last) in [(&mut t.p2p_ports, p2p), (&mut t.rpc_ports, rpc), (&mut t.listening, listening)] {
                    if now.is_empty() {
                        now.clone_from(last);
                    }
                }
            }
            let state = match (&t.pid, &t.scope) {
                (None, _) => "absent".to_string(),
                (Some(pid), Scope::Cgroup { path, .. }) => format!("pid {pid}, cgroup {}", path.display()),
                (Some(pid), _) => format!("pid {pid}, shared cgroup: scoped to the process and its listening ports"),
            };
            let name = t.name.clone();
            // a span when the kernel scope takes a node (attach) or lets it go
            // (detach: not running), the log line inside it
            self.log_once(&name, state.clone(), || match t.pid {
                Some(_) => {
                    let _span = tracing::info_span!("attach", target_name = %name, state = %state).entered();
                    tracing::info!(target_name = %name, chain = t.chain.as_str(), p2p_ports = ?t.p2p_ports, rpc_ports = ?t.rpc_ports, proxies = ?t.proxies, onion_ports = ?t.onion_ports, "watching node: {state}")
                }
                None => {
                    let _span = tracing::info_span!("detach", target_name = %name).entered();
                    tracing::warn!(target_name = %name, "node not running; waiting for it to appear")
                }
            });
            out.push(t);
        }
        self.last_ports.retain(|name, _| out.iter().any(|t| &t.name == name));
        self.current = out;
        &self.current
    }

    fn log_once(&mut self, name: &str, state: String, log: impl FnOnce()) {
        if self.last_state.get(name) != Some(&state) {
            log();
            self.last_state.insert(name.to_string(), state);
        }
    }

    /// A name keeps its slot while it is listed, so a node that restarts
    /// keeps its index; a forgotten name's slot is reused.
    fn slot(&mut self, name: &str) -> Option<u32> {
        if let Some(i) = self.slots.get(name) {
            return Some(*i);
        }
        let used: std::collections::BTreeSet<u32> = self.slots.values().copied().collect();
        let free = (0..MAX_TARGETS as u32).find(|i| !used.contains(i))?;
        self.slots.insert(name.to_string(), free);
        Some(free)
    }

    /// Nodes found on the host, named `<chain>-<network>`, or
    /// `<chain>-<network>-<container>` for a node in a container (by the
    /// name the runtime or the pod gives it, see `container`), and with
    /// `-<p2p port>` added when several share a name, so a node keeps its
    /// name across restarts, its container's included. A node that went
    /// away stays listed (absent, so its verdicts say so) for
    /// `agent.forget_absent_after`, then is forgotten and its slot freed.
    fn discovered_specs(&mut self) -> Vec<TargetSpec> {
        let mut specs: Vec<TargetSpec> = Vec::new();
        for (pid, chain) in discovery::find_nodes(&self.proc_root) {
            let info = discovery::inspect(&self.proc_root, pid, chain).ok();
            let network = info.as_ref().map(|i| i.network).unwrap_or(Network::Main);
            let mut name = format!("{}-{}", chain.as_str(), network.as_str());
            if let Some(c) = Container::of_process(&self.proc_root, pid) {
                name = format!("{name}-{}", c.name);
            }
            if specs.iter().any(|s| s.name == name) {
                let port = info.as_ref().and_then(|i| i.p2p_ports.first().copied());
                name = match port {
                    Some(p) => format!("{name}-{p}"),
                    None => format!("{name}-pid{pid}"),
                };
            }
            specs.push(TargetSpec {
                name,
                selector: Selector::Pid(pid),
                chain,
                datadir: None,
                p2p_ports: Vec::new(),
                rpc_ports: Vec::new(),
                proxies: Vec::new(),
            });
        }
        let now = Instant::now();
        let gone: Vec<String> = self.slots.keys().filter(|n| !specs.iter().any(|s| &s.name == *n)).cloned().collect();
        let ttl = self.absent_ttl;
        for name in gone {
            let Some(prev) = self.current.iter().find(|t| t.name == name) else {
                // a slot the state file kept for a node that is not running
                // now: its counters wait, by name, for it to come back
                tracing::info!(target_name = %name, "discovered node of the last agent not running: not listed");
                self.slots.remove(&name);
                continue;
            };
            let since = *self.absent_since.entry(name.clone()).or_insert_with(|| {
                tracing::warn!(target_name = %name, "discovered node gone: listed as down (node_down) for {}, then forgotten", humantime_serde::re::humantime::format_duration(ttl));
                now
            });
            if now.duration_since(since) < ttl {
                specs.push(TargetSpec {
                    name: name.clone(),
                    selector: Selector::Pid(0),
                    chain: prev.chain,
                    datadir: prev.datadir.clone(),
                    p2p_ports: prev.p2p_ports.clone(),
                    rpc_ports: prev.rpc_ports.clone(),
                    proxies: Vec::new(),
                });
            } else {
                tracing::info!(target_name = %name, "forgetting node that has been gone for {} (agent.forget_absent_after)", humantime_serde::re::humantime::format_duration(ttl));
                self.slots.remove(&name);
                self.absent_since.remove(&name);
                self.last_state.remove(&name);
            }
        }
        for s in &specs {
            if !matches!(s.selector, Selector::Pid(0)) {
                self.absent_since.remove(&s.name);
            }
        }
        specs
    }

    fn find_pid(&self, spec: &TargetSpec) -> (Option<u32>, Option<PathBuf>) {
        let proc_root = &self.proc_root;
        match &spec.selector {
            Selector::PidFile(path) => (discovery::read_pid_file(proc_root, path).ok(), None),
            Selector::Process(name) => (discovery::find_by_name(proc_root, name).first().copied(), None),
            Selector::Pid(0) => (None, None),
            Selector::Pid(pid) => (Some(*pid), None),
            Selector::Cgroup(dir) => {
                let dir = match (dir.is_absolute(), &self.mounts.v2) {
                    (true, _) => dir.clone(),
                    (false, Some(mount)) => mount.join(dir),
                    // no cgroup2 hierarchy to be relative to
                    (false, None) => return (None, None),
                };
                // A pod's group holds no process itself: its containers' groups below it do.
                let procs = container::procs_below(&dir);
                let names = spec.chain.process_names();
                let node = procs.iter().copied().find(|pid| {
                    std::fs::read_to_string(proc_root.join(pid.to_string()).join("comm"))
                        .map(|c| names.contains(&c.trim()))
                        .unwrap_or(false)
                });
                (node.or(procs.first().copied()), Some(dir))
            }
            Selector::Container(wanted) => {
                // The chain's node processes; a generic node has no known
                // name, so any process of the container, the lowest pid.
                let names = spec.chain.process_names();
                let mut candidates: Vec<u32> = if names.is_empty() {
                    discovery::pids(proc_root)
                } else {
                    names.iter().flat_map(|n| discovery::find_by_name(proc_root, n)).collect()
                };
                candidates.sort_unstable();
                (container::find_in(proc_root, candidates, wanted), None)
            }
        }
    }

    fn process_scope(&self, pid: u32, listening: &[u16]) -> Scope {
        let mut socket_inodes: Vec<u64> =
            discovery::socket_inodes(&self.proc_root, pid).map(|s| s.into_iter().collect()).unwrap_or_default();
        socket_inodes.sort_unstable();
        Scope::Process { pids: vec![pid], listen_ports: listening.to_vec(), socket_inodes }
    }

    /// Process names whose exec makes a process watched at once, and the
    /// target it then is: a configured `process` name is its target's; a
    /// chain's names belong to the one target of that chain, or are left to
    /// the agent (TARGET_PENDING) when discovering or when several targets
    /// could claim them.
    pub fn exec_names(&self) -> Vec<(String, u32)> {
        let mut names: BTreeMap<String, Option<u32>> = BTreeMap::new();
        if self.discover {
            for chain in Chain::ALL {
                for n in chain.process_names() {
                    names.insert(n.to_string(), None);
                }
            }
        }
        for spec in &self.specs {
            let Some(index) = self.slots.get(&spec.name).copied() else { continue };
            let claimed: Vec<String> = match &spec.selector {
                Selector::Process(name) => vec![name.clone()],
                _ => spec.chain.process_names().iter().map(|n| n.to_string()).collect(),
            };
            for n in claimed {
                names
                    .entry(n)
                    .and_modify(|t| {
                        if *t != Some(index) {
                            *t = None;
                        }
                    })
                    .or_insert(Some(index));
            }
        }
        names.into_iter().map(|(n, t)| (n, t.unwrap_or(TARGET_PENDING))).collect()
    }

    fn resolve(&self, index: u32, spec: &TargetSpec) -> Target {
        let (pid, cgroup_dir) = self.find_pid(spec);
        let pid = pid.filter(|p| discovery::is_alive(&self.proc_root, *p));
        let mut t = Target {
            index,
            name: spec.name.clone(),
            chain: spec.chain,
            network: None,
            pid,
            scope: Scope::Absent,
            cgroup_v2: None,
            datadir: spec.datadir.clone(),
            p2p_ports: spec.p2p_ports.clone(),
            rpc_ports: spec.rpc_ports.clone(),
            listening: Vec::new(),
            root: None,
            netns: None,
            proxies: spec.proxies.iter().map(|a| (*a, PeerNetwork::Proxy)).collect(),
            onion_ports: Vec::new(),
        };
        let Some(pid) = pid else {
            // a configured group is watched before any process enters it
            if let Some(dir) = cgroup_dir {
                if let Ok(id) = cgroup::cgroup2_id(&dir) {
                    t.scope = Scope::Cgroup { id, path: dir };
                }
            }
            return t;
        };
        t.root = foreign_root(&self.proc_root, pid);
        t.netns = namespace_inode(&self.proc_root, pid, "net");

        if let Ok(info) = discovery::inspect(&self.proc_root, pid, spec.chain) {
            t.network = Some(info.network);
            if t.datadir.is_none() {
                t.datadir = info.network_datadir.or(info.datadir);
            } else if let Some(d) = &spec.datadir {
                // a configured base dir: the network's data lives under it
                t.datadir = Some(d.join(spec.chain.network_subdir(info.network)));
            }
            if t.p2p_ports.is_empty() {
                t.p2p_ports = info.p2p_ports;
            }
            if t.rpc_ports.is_empty() {
                t.rpc_ports = info.rpc_ports;
            }
            for proxy in info.proxies {
                if !t.proxies.iter().any(|(a, _)| *a == proxy.0) {
                    t.proxies.push(proxy);
                }
            }
            t.onion_ports = info.onion_ports;
        }
        t.listening = discovery::listening_ports(&self.proc_root, pid).unwrap_or_default();

        let own_dir = ProcessCgroups::read(&self.proc_root, pid)
            .ok()
            .and_then(|pc| pc.v2)
            .zip(self.mounts.v2.as_ref())
            .map(|(path, mount)| (path.clone(), cgroup::join(mount, &path)));
        t.cgroup_v2 = own_dir.as_ref().map(|(_, dir)| dir.clone());
        t.scope = match (cgroup_dir, own_dir) {
            (Some(dir), _) => match cgroup::cgroup2_id(&dir) {
                Ok(id) => Scope::Cgroup { id, path: dir },
                Err(_) => Scope::Absent,
            },
            (None, Some((path, dir))) if path != "/" && dedicated(&self.proc_root, &dir, pid) => {
                match cgroup::cgroup2_id(&dir) {
                    Ok(id) => Scope::Cgroup { id, path: dir },
                    Err(_) => self.process_scope(pid, &t.listening),
                }
            }
            _ => self.process_scope(pid, &t.listening),
        };
        t
    }
}

/// `node_path` as the agent can open it under `root` (`/proc/PID/root`),
/// with the symlinks along it resolved the way the node sees them: an
/// absolute link (a data dir `/data -> /mnt/vol` in an image) leads back
/// under `root`, never to the agent's own file of that name, and `..` never
/// climbs above `root`. A component that does not exist (yet) is kept as is.
fn resolve_in_root(root: &Path, node_path: &Path) -> PathBuf {
    use std::path::Component;
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut pending: Vec<std::ffi::OsString> = node_path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut links = 0;
    while let Some(name) = pending.pop() {
        if name == ".." {
            resolved.pop();
            continue;
        }
        let mut here = root.to_path_buf();
        here.extend(&resolved);
        here.push(&name);
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() && links < 40 => {
                links += 1;
                let Ok(target) = std::fs::read_link(&here) else {
                    resolved.push(name);
                    continue;
                };
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(name),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(resolved);
    out
}

/// A group is the node's own when every other process in it is one the node
/// runs under or started: an init or wrapper in a container (tini, a shell
/// that runs it), or its helpers (`-blocknotify` children).
fn dedicated(proc_root: &Path, dir: &Path, pid: u32) -> bool {
    let Ok(procs) = cgroup::procs(dir) else { return false };
    procs.iter().all(|&p| p == pid || is_ancestor(proc_root, p, pid) || is_ancestor(proc_root, pid, p))
}

/// Whether `ancestor` is in the parent chain of `pid`.
fn is_ancestor(proc_root: &Path, ancestor: u32, pid: u32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        match discovery::parent_pid(proc_root, p) {
            Some(parent) if parent == ancestor => return true,
            Some(parent) if parent > 1 => p = parent,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(p2p: &[u16], rpc: &[u16], listening: &[u16]) -> Target {
        Target::litecoin_for_tests("t", Some(1), p2p, rpc, listening)
    }

    #[test]
    fn paths_resolve_inside_the_root() {
        let dir = std::env::temp_dir().join(format!("nodescope-root-{}", std::process::id()));
        let root = dir.join("root");
        std::fs::create_dir_all(root.join("mnt/vol/regtest")).unwrap();
        std::fs::create_dir_all(root.join("home/u")).unwrap();
        // absolute and relative links, as an image would have them
        std::os::unix::fs::symlink("/mnt/vol", root.join("data")).unwrap();
        std::os::unix::fs::symlink("../../data", root.join("home/u/.litecoin")).unwrap();
        assert_eq!(resolve_in_root(&root, Path::new("/data/regtest")), root.join("mnt/vol/regtest"));
        assert_eq!(resolve_in_root(&root, Path::new("/home/u/.litecoin/regtest")), root.join("mnt/vol/regtest"));
        assert_eq!(resolve_in_root(&root, Path::new("/../../etc")), root.join("etc"));
        assert_eq!(resolve_in_root(&root, Path::new("/not/yet")), root.join("not/yet"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn services_and_directions() {
        let mut t = target(&[19444], &[19443], &[19444, 19443, 28332, 19445]);
        let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let p2p = (Service::P2p, PeerNetwork::Ipv4);
        assert_eq!(t.service(Direction::Inbound, 19444, at(50000)), p2p);
        assert_eq!(t.service(Direction::Inbound, 19443, at(50000)).0, Service::Rpc);
        assert_eq!(t.service(Direction::Inbound, 28332, at(50000)).0, Service::Other);
        assert_eq!(t.service(Direction::Outbound, 41000, at(19444)), p2p);
        assert_eq!(t.service(Direction::Outbound, 41000, at(9051)).0, Service::Other);
        assert_eq!(t.service(Direction::Outbound, 41000, "[::1]:19444".parse().unwrap()).1, PeerNetwork::Ipv6);
        // through the node's proxies, and in through its onion listener
        t.proxies = vec![(at(9050), PeerNetwork::Proxy), (at(7656), PeerNetwork::I2p)];
        t.onion_ports = vec![(19445, PeerNetwork::Onion), (19446, PeerNetwork::Onion)];
        assert_eq!(t.service(Direction::Outbound, 41000, at(9050)), (Service::Proxy, PeerNetwork::Proxy));
        assert_eq!(t.service(Direction::Outbound, 41000, at(7656)), (Service::Proxy, PeerNetwork::I2p));
        assert_eq!(t.service(Direction::Outbound, 41000, "10.0.0.1:9050".parse().unwrap()), p2p);
        assert_eq!(t.service(Direction::Inbound, 19445, at(50000)), (Service::Proxy, PeerNetwork::Onion));
        // a default onion port the node does not listen on is nothing special
        assert_eq!(t.service(Direction::Inbound, 19446, at(50000)).0, Service::Other);
        assert_eq!(t.infer_direction(19444), Direction::Inbound);
        assert_eq!(t.infer_direction(28332), Direction::Inbound);
        assert_eq!(t.infer_direction(50123), Direction::Outbound);
    }
}

/// `find_pid` and `discovered_specs` on a fake /proc of host and container nodes.
#[cfg(test)]
mod selector_tests {
    use super::*;
    use std::fs;

    const PODMAN_ID: &str = "5e301f86b9bec8667c3cdf4bce66d307e55c2d593192449ccae5443a1994d4ba";

    struct FakeHost {
        root: PathBuf,
    }

    impl FakeHost {
        fn new(tag: &str) -> FakeHost {
            let root = std::env::temp_dir().join(format!("nodescope-target-{}-{tag}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(root.join("proc")).unwrap();
            FakeHost { root }
        }

        fn write(&self, rel: &str, contents: &str) {
            let path = self.root.join(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, contents).unwrap();
        }

        /// A process named `comm` running `argv` in the cgroup2 group `cgroup`.
        fn process(&self, pid: u32, comm: &str, argv: &[&str], cgroup: &str) {
            self.write(&format!("proc/{pid}/comm"), &format!("{comm}\n"));
            self.write(&format!("proc/{pid}/cmdline"), &argv.iter().map(|a| format!("{a}\0")).collect::<String>());
            self.write(&format!("proc/{pid}/environ"), "HOME=/nonexistent\0");
            self.write(&format!("proc/{pid}/cgroup"), &format!("0::{cgroup}\n"));
        }

        fn targets(&self, config: &str, mounts: Mounts) -> Targets {
            let mut targets = Targets::new(&Config::from_toml_with_env(config, Vec::new()).unwrap(), mounts);
            targets.proc_root = self.root.join("proc");
            targets
        }

        /// A podman container `name`, one of the fake host's, with one node in it.
        fn podman_node(&self) {
            self.write(
                "proc/1/root/var/lib/containers/storage/overlay-containers/containers.json",
                &format!(r#"[{{"id":"{PODMAN_ID}","names":["ltc-node"]}}]"#),
            );
            self.process(200, "litecoind", &["litecoind", "-regtest"], &format!("/libpod_parent/libpod-{PODMAN_ID}"));
        }

        /// A Kubernetes pod `litecoin-0`: a pause container and a node's.
        fn pod(&self) {
            let pod = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b.slice";
            let node_id = "c".repeat(64);
            self.process(
                300,
                "litecoind",
                &["litecoind", "-regtest"],
                &format!("/{pod}/cri-containerd-{node_id}.scope"),
            );
            self.write("proc/300/root/etc/hostname", "litecoin-0\n");
            self.process(7, "pause", &["/pause"], &format!("/{pod}/cri-containerd-{}.scope", "a".repeat(64)));
            self.write(&format!("cgroup/{pod}/cgroup.procs"), "");
            self.write(&format!("cgroup/{pod}/cri-containerd-{node_id}.scope/cgroup.procs"), "300\n");
            self.write(&format!("cgroup/{pod}/cri-containerd-{}.scope/cgroup.procs", "a".repeat(64)), "7\n");
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    fn spec(selector: Selector, chain: Chain) -> TargetSpec {
        TargetSpec {
            name: "t".into(),
            selector,
            chain,
            datadir: None,
            p2p_ports: Vec::new(),
            rpc_ports: Vec::new(),
            proxies: Vec::new(),
        }
    }

    #[test]
    fn discovered_nodes_in_containers_carry_the_container_name() {
        let host = FakeHost::new("discover");
        host.process(100, "litecoind", &["litecoind", "-regtest"], "/user.slice/session-1.scope");
        host.podman_node();
        host.pod();
        let mut targets = host.targets("", Mounts::default());
        let names: Vec<String> = targets.discovered_specs().into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["litecoin-regtest", "litecoin-regtest-ltc-node", "litecoin-regtest-litecoin-0"]);
    }

    #[test]
    fn a_discovered_node_that_went_away_stays_down_until_forget_absent_after() {
        let host = FakeHost::new("absent");
        host.process(100, "litecoind", &["litecoind", "-regtest"], "/user.slice/session-1.scope");
        let mut targets = host.targets("[agent]\nforget_absent_after = \"1h\"\n", Mounts::default());
        assert_eq!(targets.absent_ttl, Duration::from_secs(3600));
        let listed = |t: &mut Targets| -> Vec<(String, Option<u32>)> {
            t.refresh().iter().map(|t| (t.name.clone(), t.pid)).collect()
        };
        assert_eq!(listed(&mut targets), [("litecoin-regtest".to_string(), Some(100))]);
        fs::remove_dir_all(host.root.join("proc/100")).unwrap();
        // gone: still listed, not running, so node_down fires and stays firing
        assert_eq!(listed(&mut targets), [("litecoin-regtest".to_string(), None)]);
        assert_eq!(listed(&mut targets), [("litecoin-regtest".to_string(), None)]);
        // past forget_absent_after (here: a reload that shortens it to nothing)
        let config = Config::from_toml_with_env("[agent]\nforget_absent_after = \"0s\"\n", Vec::new()).unwrap();
        targets.reconfigure(&config);
        assert_eq!(listed(&mut targets), []);
        // the default: a day
        assert_eq!(host.targets("", Mounts::default()).absent_ttl, Duration::from_secs(86400));
    }

    #[test]
    fn container_selector_by_name_or_id_prefix() {
        let host = FakeHost::new("container");
        host.process(100, "litecoind", &["litecoind"], "/user.slice/session-1.scope");
        host.podman_node();
        host.pod();
        host.process(301, "sh", &["sh"], &format!("/kubepods.slice/x.slice/cri-containerd-{}.scope", "c".repeat(64)));
        let targets = host.targets("", Mounts::default());
        let find = |wanted: &str, chain| targets.find_pid(&spec(Selector::Container(wanted.into()), chain));
        assert_eq!(find("ltc-node", Chain::Litecoin), (Some(200), None));
        assert_eq!(find(&PODMAN_ID[..8], Chain::Litecoin), (Some(200), None));
        assert_eq!(find("litecoin-0", Chain::Litecoin), (Some(300), None));
        // the container's node must be of the target's chain
        assert_eq!(find("ltc-node", Chain::Bitcoin), (None, None));
        assert_eq!(find("no-such", Chain::Litecoin), (None, None));
        // a generic node: the container's lowest pid, whatever its name
        assert_eq!(find("cccc", Chain::Generic), (Some(300), None));
    }

    #[test]
    fn cgroup_selector_relative_to_the_cgroup2_mount_finds_the_node_below() {
        let host = FakeHost::new("cgroup");
        host.pod();
        let pod = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b.slice";
        let mounts = Mounts { v2: Some(host.root.join("cgroup")), ..Mounts::default() };
        let targets = host.targets("", mounts);
        let selector = Selector::Cgroup(PathBuf::from(pod));
        assert_eq!(
            targets.find_pid(&spec(selector.clone(), Chain::Litecoin)),
            (Some(300), Some(host.root.join("cgroup").join(pod)))
        );
        let absolute = Selector::Cgroup(host.root.join("cgroup").join(pod));
        assert_eq!(targets.find_pid(&spec(absolute, Chain::Litecoin)).0, Some(300));
        // no cgroup2 hierarchy to be relative to
        let targets = host.targets("", Mounts::default());
        assert_eq!(targets.find_pid(&spec(selector, Chain::Litecoin)), (None, None));
    }

    #[test]
    fn container_key_selects_a_container() {
        let config = "[[targets]]\nname = \"ltc\"\ncontainer = \"ltc-node\"\nchain = \"litecoin\"\n";
        let config = Config::from_toml_with_env(config, Vec::new()).unwrap();
        assert_eq!(TargetSpec::from(&config.targets[0]).selector, Selector::Container("ltc-node".into()));
    }
}

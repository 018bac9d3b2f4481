//! The kernel's view of which processes, cgroups and listening ports belong
//! to which target (`ebpf/include/scope.bpf.h`, compiled into each signal's
//! object).
//!
//! Each pass the agent plans that view from the resolved targets and writes
//! it to every object that carries the scope maps. Between passes the kernel
//! keeps it current on its own as processes fork, exec and exit and as
//! cgroups are made, so what the kernel added is only removed here when it
//! is wrong: its target is gone, its process is dead, or its target is
//! running and the entry is not part of it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use std::os::fd::AsRawFd;

use aya::maps::{MapData, RingBuf};
use aya::Ebpf;

use crate::bpf::abi::{self, CgroupPath, Comm, PortKey, TARGET_PENDING};
use crate::bpf::{self, BpfError};
use crate::target::{Scope, Target};

/// Map names in scope.bpf.h.
const CGROUPS: &str = "ns_scope_cgroups";
const CGROUP_PATHS: &str = "ns_scope_cgroup_paths";
const PIDS: &str = "ns_scope_pids";
const NAMES: &str = "ns_scope_names";
const PORTS: &str = "ns_scope_ports";
pub const EVENTS: &str = "ns_scope_events";
const STATS: &str = "ns_scope_stats";

/// Programs in scope.bpf.h: (program, tracepoint).
pub const HOOKS: &[(&str, &str)] = &[
    ("scope_fork", "sched_process_fork"),
    ("scope_exec", "sched_process_exec"),
    ("scope_exit", "sched_process_exit"),
    ("scope_cgroup_mkdir", "cgroup_mkdir"),
    ("scope_cgroup_rmdir", "cgroup_rmdir"),
];

/// Bounds of the scope maps (max_entries in scope.bpf.h): a plan past them is
/// cut, the cut counted.
const MAX_CGROUPS: usize = 4096;
const MAX_PIDS: usize = 4096;
const MAX_PORTS: usize = 1024;

/// Loads and attaches the scope programs of an object.
pub fn attach(ebpf: &mut Ebpf, btf: &aya::Btf) -> Result<Vec<(&'static str, aya::programs::links::FdLink)>, BpfError> {
    HOOKS.iter().map(|&(program, hook)| bpf::attach_btf(ebpf, btf, program, hook)).collect()
}

/// The kernel's counters for the scope maps of one object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScopeStats {
    pub pids_full: u64,
    pub cgroups_full: u64,
    pub ports_full: u64,
    pub events_lost: u64,
}

pub fn stats(ebpf: &Ebpf) -> Result<ScopeStats, BpfError> {
    let sum = bpf::percpu_counters(ebpf, STATS)?;
    Ok(ScopeStats {
        pids_full: sum(abi::SCOPE_STAT_PIDS_FULL),
        cgroups_full: sum(abi::SCOPE_STAT_CGROUPS_FULL),
        ports_full: sum(abi::SCOPE_STAT_PORTS_FULL),
        events_lost: sum(abi::SCOPE_STAT_EVENTS_LOST),
    })
}

/// What the scope maps should hold for the current targets.
#[derive(Debug, Clone, Default)]
pub struct ScopePlan {
    cgroups: Vec<(u64, u32)>,
    cgroup_paths: Vec<(CgroupPath, u32)>,
    pids: Vec<(u32, u32)>,
    names: Vec<(Comm, u32)>,
    ports: Vec<(PortKey, u32)>,
    /// Indices of every listed target, running or not.
    listed: HashSet<u32>,
    /// Indices of the targets that are running now.
    running: HashSet<u32>,
    /// Process -> target, for the records the kernel made for a process it
    /// saw exec before the agent knew which target it is.
    pid_targets: HashMap<u32, u32>,
    /// Entries planned past a map's bound.
    pub cut: u64,
}

/// What the plan remembers of a target between passes, so a node that is
/// down keeps its ports watched for the moment it comes back.
#[derive(Debug, Clone, Default)]
pub struct ScopeMemory {
    ports: BTreeMap<(u32, String), (Option<u64>, Vec<u16>)>,
}

impl ScopePlan {
    /// Plans the maps for `targets`. `exec_names`: process names whose exec
    /// makes a process watched, with the target it then belongs to
    /// (TARGET_PENDING when the agent decides). `cgroup2`: the cgroup2 mount.
    pub fn build(
        proc_root: &Path,
        targets: &[Target],
        exec_names: &[(String, u32)],
        cgroup2: Option<&Path>,
        memory: &mut ScopeMemory,
    ) -> ScopePlan {
        let mut plan = ScopePlan::default();
        for t in targets {
            plan.listed.insert(t.index);
            let running = t.pid.is_some();
            if running {
                plan.running.insert(t.index);
            }
            if let Scope::Cgroup { id, path } = &t.scope {
                plan.cgroups.push((*id, t.index));
                for child in descendant_cgroups(path) {
                    plan.cgroups.push((child, t.index));
                }
                if let Some(rel) = cgroup2.and_then(|m| path.strip_prefix(m).ok()) {
                    if let Some(key) = cgroup_path_key(rel) {
                        plan.cgroup_paths.push((key, t.index));
                    }
                }
            }
            if let Some(pid) = t.pid {
                for p in std::iter::once(pid).chain(descendant_pids(proc_root, pid)) {
                    plan.pids.push((p, t.index));
                    plan.pid_targets.insert(p, t.index);
                }
            }
            // Ports: the ones the node is known to use, in its namespace; the
            // last known ones while it is down.
            let mut ports: Vec<u16> = t.p2p_ports.iter().chain(&t.rpc_ports).chain(&t.listening).copied().collect();
            ports.sort_unstable();
            ports.dedup();
            let key = (t.index, t.name.clone());
            let (netns, ports) = if running {
                memory.ports.insert(key, (t.netns, ports.clone()));
                (t.netns, ports)
            } else {
                memory.ports.get(&key).cloned().unwrap_or((None, ports))
            };
            if let Some(netns) = netns {
                for port in ports {
                    plan.ports.push((PortKey { netns: netns as u32, port, _pad: 0 }, t.index));
                }
            }
        }
        memory.ports.retain(|(index, name), _| targets.iter().any(|t| t.index == *index && &t.name == name));
        for (name, target) in exec_names {
            if let Some(comm) = comm_key(name) {
                plan.names.push((comm, *target));
            }
        }
        plan.cut += truncate(&mut plan.cgroups, MAX_CGROUPS);
        plan.cut += truncate(&mut plan.pids, MAX_PIDS);
        plan.cut += truncate(&mut plan.ports, MAX_PORTS);
        plan
    }

    /// The target a process belongs to, if it is a running target's node or
    /// one of its children.
    pub fn target_of_pid(&self, tgid: u32) -> Option<u32> {
        self.pid_targets.get(&tgid).copied()
    }

    /// Writes the plan to one object's scope maps.
    pub fn apply(&self, ebpf: &mut Ebpf, proc_root: &Path) -> Result<(), BpfError> {
        bpf::sync_map(ebpf, NAMES, &self.names)?;
        bpf::sync_map(ebpf, CGROUP_PATHS, &self.cgroup_paths)?;
        let planned = |entries: &[(u64, u32)]| entries.iter().copied().collect::<HashSet<_>>();
        let cgroups = planned(&self.cgroups);
        reconcile(ebpf, CGROUPS, &self.cgroups, |k: &u64, v| self.keeps(v, || cgroups.contains(&(*k, v))))?;
        let pids: HashSet<(u32, u32)> = self.pids.iter().copied().collect();
        reconcile(ebpf, PIDS, &self.pids, |k: &u32, v| {
            proc_root.join(k.to_string()).exists() && (v == TARGET_PENDING || self.keeps(v, || pids.contains(&(*k, v))))
        })?;
        let ports: HashSet<(PortKey, u32)> = self.ports.iter().copied().collect();
        reconcile(ebpf, PORTS, &self.ports, |k: &PortKey, v| self.keeps(v, || ports.contains(&(*k, v))))?;
        Ok(())
    }

    /// An entry the kernel holds for target `v` stays when the target is
    /// listed and, if it is running, the plan has the entry too.
    fn keeps(&self, v: u32, planned: impl FnOnce() -> bool) -> bool {
        self.listed.contains(&v) && (!self.running.contains(&v) || planned())
    }
}

/// Writes `want` into a map and removes the entries `keep` rejects.
fn reconcile<K>(
    ebpf: &mut Ebpf,
    name: &'static str,
    want: &[(K, u32)],
    keep: impl Fn(&K, u32) -> bool,
) -> Result<(), BpfError>
where
    K: aya::Pod + Eq + std::hash::Hash,
{
    let mut map = bpf::hash_map::<K, u32>(ebpf, name)?;
    let wanted: HashMap<K, u32> = want.iter().copied().collect();
    let present: HashMap<K, u32> = map.iter().filter_map(Result::ok).collect();
    for (k, v) in &present {
        if wanted.get(k) != Some(v) && !keep(k, *v) {
            let _ = map.remove(k);
        }
    }
    for (k, v) in want {
        if present.get(k) != Some(v) {
            map.insert(k, v, 0).map_err(|source| BpfError::Map { map: name, source })?;
        }
    }
    Ok(())
}

fn truncate<T>(v: &mut Vec<T>, max: usize) -> u64 {
    let cut = v.len().saturating_sub(max);
    v.truncate(max);
    cut as u64
}

/// A process name as the kernel's comm holds it (15 bytes and a NUL).
fn comm_key(name: &str) -> Option<Comm> {
    let bytes = name.as_bytes();
    if bytes.is_empty() {
        return None;
    }
    let mut comm = Comm::default();
    let n = bytes.len().min(abi::COMM_LEN - 1);
    comm.name[..n].copy_from_slice(&bytes[..n]);
    Some(comm)
}

/// A path relative to the cgroup2 mount as cgroup_mkdir gives it ("/a/b");
/// None when it does not fit the key.
fn cgroup_path_key(rel: &Path) -> Option<CgroupPath> {
    let text = format!("/{}", rel.to_str()?);
    let bytes = text.as_bytes();
    if bytes.len() >= abi::CGROUP_PATH_LEN {
        return None;
    }
    let mut key = CgroupPath { path: [0; abi::CGROUP_PATH_LEN] };
    key.path[..bytes.len()].copy_from_slice(bytes);
    Some(key)
}

/// Every group below `dir` (a pod's containers), bounded.
fn descendant_cgroups(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            if out.len() >= MAX_CGROUPS {
                return out;
            }
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                if let Ok(id) = crate::cgroup::cgroup2_id(&e.path()) {
                    out.push(id);
                }
                stack.push(e.path());
            }
        }
    }
    out
}

/// The processes a process started, and theirs (from each thread's
/// `children` file), bounded.
pub fn descendant_pids(proc_root: &Path, pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        let Ok(tasks) = std::fs::read_dir(proc_root.join(p.to_string()).join("task")) else { continue };
        for task in tasks.flatten() {
            let Ok(children) = std::fs::read_to_string(task.path().join("children")) else { continue };
            for c in children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()) {
                if out.len() >= MAX_PIDS {
                    return out;
                }
                if c != pid && !out.contains(&c) {
                    out.push(c);
                    stack.push(c);
                }
            }
        }
    }
    out
}

/// Waits on the scope programs' exec events (a node process just started)
/// on a thread of its own, and sends `message` to the collection loop for
/// each burst (the loop's own message type: this module knows nothing of it).
pub fn watch_events<W: Clone + Send + 'static>(
    mut rings: Vec<RingBuf<MapData>>,
    wake: std::sync::mpsc::Sender<W>,
    message: W,
) {
    if rings.is_empty() {
        return;
    }
    let spawned = std::thread::Builder::new().name("nodescope-exec".into()).spawn(move || loop {
        let mut fds: Vec<libc::pollfd> =
            rings.iter().map(|r| libc::pollfd { fd: r.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: fds is a valid array of pollfd for its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 1000) };
        if n < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            tracing::error!(
                "waiting for exec events: {}; new nodes are found at the next interval",
                std::io::Error::last_os_error()
            );
            return;
        }
        let mut any = false;
        for ring in rings.iter_mut() {
            while let Some(item) = ring.next() {
                any |= item.len() >= std::mem::size_of::<abi::ScopeEvent>();
            }
        }
        if any && wake.send(message.clone()).is_err() {
            return; // the loop ended
        }
    });
    if let Err(e) = spawned {
        tracing::error!("starting the exec event thread: {e}; new nodes are found at the next interval");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let c = comm_key("litecoind").unwrap();
        assert_eq!(&c.name[..10], b"litecoind\0");
        // the kernel keeps 15 bytes of a longer name
        let long = comm_key("a-very-long-process-name").unwrap();
        assert_eq!(&long.name[..16], b"a-very-long-pro\0");
        assert!(comm_key("").is_none());
        let p = cgroup_path_key(Path::new("libpod_parent/libpod-ab")).unwrap();
        assert_eq!(&p.path[..24], b"/libpod_parent/libpod-ab");
        assert_eq!(p.path[24], 0);
        assert!(cgroup_path_key(Path::new(&"x".repeat(200))).is_none());
    }

    #[test]
    fn this_process_children() {
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let found = descendant_pids(Path::new("/proc"), std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&child.id()), "{found:?} lacks {}", child.id());
    }

    #[test]
    fn down_target_keeps_its_ports() {
        let mut memory = ScopeMemory::default();
        let mut t = Target::litecoin_for_tests("ltc", Some(std::process::id()), &[19444], &[19443], &[]);
        t.netns = Some(4026531840);
        let plan = ScopePlan::build(Path::new("/proc"), &[t.clone()], &[], None, &mut memory);
        assert!(plan.ports.iter().any(|(k, v)| k.netns == 4026531840 && k.port == 19444 && *v == 0));
        // down: no pid, no netns, ports from config only; the last ones stay
        t.pid = None;
        t.netns = None;
        t.listening.clear();
        let plan = ScopePlan::build(Path::new("/proc"), &[t], &[], None, &mut memory);
        assert!(plan.ports.iter().any(|(k, _)| k.netns == 4026531840 && k.port == 19444));
        assert!(!plan.running.contains(&0) && plan.listed.contains(&0));
    }
}

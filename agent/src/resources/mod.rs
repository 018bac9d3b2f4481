//! Resource signals from procfs, statvfs and cgroups: data dir and its
//! filesystem, the node's cgroup (v2 or v1), its process.
//!
//! `collect` reads them once per interval into a `ResourceSnapshot`;
//! `metrics` exports the published snapshot. A source that is missing or
//! unreadable (no cgroup hierarchy, a file the kernel does not have, a data
//! dir that is gone) turns off that one figure for that target, is logged
//! once (and again when it comes back), and never stops the others.
//!
//! Health rules and metrics read the snapshot types below by field name.

pub mod cgroup_stats;
pub mod datadir;
pub mod filesystem;
pub mod forecast;
pub mod metrics;
pub mod probe;
pub mod process;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::cgroup::{Mounts, ProcessCgroups};
use crate::config::CgroupVersion;
use crate::config::ResourcesConfig;
use crate::scope::ScopePlan;
use crate::signal::Signal;
use crate::snapshot::Shared;
use crate::target::{Scope, Target};
use datadir::{DatadirWatcher, WalkLimits, WatchKey, WatchRequest};
use forecast::Trend;
use process::ProcessReader;

#[derive(Debug, Clone, Default)]
pub struct ResourceSnapshot {
    pub targets: Vec<TargetResources>,
    /// data dir passes not run because the previous one was still running
    /// (a slow or hung filesystem)
    pub datadir_passes_skipped: u64,
}

#[derive(Debug, Clone, Default)]
pub struct TargetResources {
    pub name: String,
    /// None: no data dir known or statvfs failed (rules: unknown)
    pub filesystem: Option<FsStats>,
    pub datadir_size_bytes: Option<u64>,
    /// bytes per second the data dir grew, over the forecast window
    pub growth_bytes_per_second: Option<f64>,
    /// None when not growing or unknown
    pub days_until_full: Option<f64>,
    /// data dir exists and a test file can be created in it
    pub datadir_writable: Option<bool>,
    /// `[resources] write_test = false`: datadir_writable is never measured
    pub write_test_off: bool,
    pub cgroup: Option<CgroupStats>,
    pub process: Option<ProcessStats>,
    /// bytes per second the filesystem's used space grew over the forecast
    /// window (what days_until_full divides by): the data dir's growth plus
    /// anything else writing to the same filesystem
    pub filesystem_growth_bytes_per_second: Option<f64>,
    /// files and directories of the data dir remembered by the size tracker
    pub datadir_entries: Option<u64>,
    /// filesystem operations (stat, opendir, 64 entries read) the size
    /// tracker spent since the agent started
    pub datadir_scan_operations: u64,
    /// the data dir has more than resources.datadir_max_entries entries:
    /// its size is not tracked (datadir_size_bytes is None)
    pub datadir_over_limit: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FsStats {
    pub size_bytes: u64,
    pub free_bytes: u64,
    pub available_bytes: u64,
    pub inodes_total: u64,
    pub inodes_free: u64,
    pub inodes_available: u64,
}

impl FsStats {
    /// Available bytes (what the unprivileged node can still use) as a
    /// percentage of the size; None for a filesystem that reports size 0.
    pub fn available_percent(&self) -> Option<f64> {
        (self.size_bytes > 0).then(|| self.available_bytes as f64 * 100.0 / self.size_bytes as f64)
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupStats {
    /// "v2" or "v1"
    pub version: &'static str,
    pub cpu_usage_seconds: Option<f64>,
    pub cpu_throttled_seconds: Option<f64>,
    pub cpu_throttled_periods: Option<u64>,
    pub memory_usage_bytes: Option<u64>,
    /// Usage less inactive file pages (v2 memory.stat inactive_file, v1
    /// total_inactive_file): what kubelet's eviction and memory_high judge.
    pub memory_working_set_bytes: Option<u64>,
    /// None = unlimited, or the limit could not be read (memory_unlimited
    /// tells the two apart).
    pub memory_limit_bytes: Option<u64>,
    /// The kernel said the group has no memory limit of its own.
    pub memory_unlimited: bool,
    pub memory_peak_bytes: Option<u64>,
    pub io: Vec<IoDevice>,
    pub pids: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct IoDevice {
    /// "major:minor"
    pub device: String,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub read_ops: u64,
    pub write_ops: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    pub pid: u32,
    pub rss_bytes: u64,
    pub threads: u64,
    pub open_fds: u64,
    pub fd_limit: Option<u64>,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub start_time_unix: u64,
    pub restarts: u64,
    /// seconds since the process started (from /proc/uptime and its start time)
    pub uptime_seconds: f64,
}

/// Collects the resource figures of every target, once per interval.
pub struct ResourceSignal {
    write_test: bool,
    cgroup_version: CgroupVersion,
    forecast_window: std::time::Duration,
    mounts: Mounts,
    proc_root: PathBuf,
    watcher: Option<DatadirWatcher>,
    processes: ProcessReader,
    trends: HashMap<String, Trends>,
    /// Whether each target's data dir, as last seen with its node running,
    /// is the same directory at its own path on the agent's side: then it
    /// is read there while the node is down. Not so for a node in a
    /// container, whose data dir is only reachable through its root.
    readable_when_down: HashMap<String, bool>,
    off: OffLog,
}

/// The series the growth rates come from, for one target's data dir.
struct Trends {
    /// The data dir as the node names it: the path it is read at changes
    /// when a node in a container restarts, and the history stays.
    dir: PathBuf,
    available: Trend,
    datadir: Trend,
}

/// Starts the signal for the collection loop, its instruments registered on
/// `meter` over `snapshot`. Always on: each reader that fails is reported
/// per target (`OffLog`) and the others go on.
pub fn start(
    config: &ResourcesConfig,
    meter: &opentelemetry::metrics::Meter,
    snapshot: Shared<ResourceSnapshot>,
) -> Box<dyn Signal> {
    metrics::register(meter, snapshot.clone());
    Box::new(Running { signal: ResourceSignal::new(config), snapshot })
}

/// The signal as the loop drives it.
struct Running {
    signal: ResourceSignal,
    snapshot: Shared<ResourceSnapshot>,
}

impl Signal for Running {
    fn name(&self) -> &'static str {
        "resources"
    }

    fn collect(&mut self, targets: &[Target], _plan: &ScopePlan) {
        self.snapshot.publish(self.signal.collect(targets));
    }
}

impl ResourceSignal {
    pub fn new(config: &ResourcesConfig) -> ResourceSignal {
        let mounts = Mounts::read().unwrap_or_else(|e| {
            tracing::warn!("reading /proc/self/mountinfo: {e}; cgroup figures off");
            Mounts::default()
        });
        let limits = WalkLimits {
            ops_per_pass: config.datadir_ops_per_interval,
            max_entries: config.datadir_max_entries,
            rescan: config.datadir_rescan,
        };
        let write_test = config.write_test.then_some(config.datadir_write_test);
        let watcher = match DatadirWatcher::start(limits, write_test) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!("data dir size and write test off: starting their thread: {e}");
                None
            }
        };
        ResourceSignal {
            write_test: config.write_test,
            cgroup_version: config.cgroup_version,
            forecast_window: config.forecast_window,
            mounts,
            proc_root: PathBuf::from("/proc"),
            watcher,
            processes: ProcessReader::new(Path::new("/proc")),
            trends: HashMap::new(),
            readable_when_down: HashMap::new(),
            off: OffLog::default(),
        }
    }

    pub fn collect(&mut self, targets: &[Target]) -> ResourceSnapshot {
        let now = Instant::now();
        let v2_controllers = cgroup_stats::v2_controllers(&self.mounts);
        let mut requests = Vec::new();
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            let mut r =
                TargetResources { name: t.name.clone(), write_test_off: !self.write_test, ..Default::default() };
            let mut owner = None;
            if let Some(pid) = t.pid {
                match self.processes.read(&t.name, pid) {
                    Ok((stats, fs_owner)) => {
                        self.off.report(&t.name, "process", Vec::new());
                        owner = Some((fs_owner.uid, fs_owner.gid));
                        r.process = Some(stats);
                    }
                    Err(e) => self.off.report(&t.name, "process", vec![("procfs".into(), e.to_string())]),
                }
                r.cgroup = self.cgroup(t, pid, &v2_controllers);
            }
            match &t.datadir {
                Some(dir) => {
                    let key = WatchKey { target: t.name.clone(), dir: dir.clone() };
                    let at = self.reachable_datadir(t);
                    self.datadir(&mut r, &key, at.as_deref(), now);
                    requests.push(WatchRequest { key, dir: at, owner });
                }
                None => self.off.report(
                    &t.name,
                    "data dir",
                    vec![("datadir".into(), "not known: set targets.datadir".into())],
                ),
            }
            out.push(r);
        }
        if let Some(w) = self.watcher.as_mut() {
            w.request(requests);
        }
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        self.trends.retain(|n, _| names.contains(&n.as_str()));
        self.readable_when_down.retain(|n, _| names.contains(&n.as_str()));
        self.processes.forget(&|n| names.contains(&n));
        self.off.forget(&|n| names.contains(&n));
        ResourceSnapshot { targets: out, datadir_passes_skipped: self.watcher.as_ref().map_or(0, |w| w.skipped()) }
    }

    fn cgroup(&mut self, t: &Target, pid: u32, v2_controllers: &[String]) -> Option<CgroupStats> {
        // A configured cgroup is the node's group even when the node itself
        // sits in a child of it.
        let v2_dir = match &t.scope {
            Scope::Cgroup { path, .. } => Some(path.as_path()),
            _ => t.cgroup_v2.as_deref(),
        };
        let groups = ProcessCgroups::read(&self.proc_root, pid).unwrap_or_default();
        let Some(source) = cgroup_stats::locate(self.cgroup_version, &self.mounts, v2_controllers, v2_dir, &groups)
        else {
            let reason = format!(
                "no cgroup {} hierarchy holds process {pid}",
                match self.cgroup_version {
                    CgroupVersion::Auto => "v1 or v2",
                    CgroupVersion::V2 => "v2",
                    CgroupVersion::V1 => "v1",
                }
            );
            self.off.report(&t.name, "cgroup", vec![("cgroup".into(), reason)]);
            return None;
        };
        let (stats, failures) = cgroup_stats::read(&source);
        self.off.report(&t.name, "cgroup", failures);
        Some(stats)
    }

    /// Where the agent reads a target's data dir now: through the node's
    /// root when its mount namespace is not the agent's. While the node is
    /// down there is no root: its data dir is read at its own path when that
    /// was the same directory (a node on the host, seen from an agent with a
    /// private mount namespace of its own, as under systemd's
    /// ProtectSystem), and not at all when it was not (a node in a
    /// container: the same path on the host is another directory, or none).
    fn reachable_datadir(&mut self, t: &Target) -> Option<PathBuf> {
        let at = t.host_datadir();
        if t.pid.is_none() {
            return at.filter(|_| self.readable_when_down.get(&t.name) != Some(&false));
        }
        let same = match (&at, &t.datadir, &t.root) {
            (_, _, None) => Some(true),
            (Some(at), Some(own), Some(_)) => same_directory(at, own),
            _ => None,
        };
        if let Some(same) = same {
            self.readable_when_down.insert(t.name.clone(), same);
        }
        at
    }

    /// `key.dir` is the data dir as the node names it (what failures name),
    /// `at` where the agent reads it.
    fn datadir(&mut self, r: &mut TargetResources, key: &WatchKey, at: Option<&Path>, now: Instant) {
        let mut failures = Vec::new();
        match at.map(filesystem::statvfs) {
            Some(Ok(fs)) => r.filesystem = Some(fs),
            Some(Err(e)) => failures.push((format!("statvfs {}", key.dir.display()), e.to_string())),
            None => failures.push(("data dir".into(), "node not running: its data dir is in its container".into())),
        }
        let report = self.watcher.as_ref().and_then(|w| w.report(key));
        if let Some(rep) = &report {
            r.datadir_size_bytes = rep.size_bytes;
            r.datadir_entries = Some(rep.entries);
            r.datadir_scan_operations = rep.operations;
            r.datadir_over_limit = rep.over_limit;
            r.datadir_writable = rep.writable;
            if let Some(e) = &rep.error {
                failures.push(("data dir size".into(), e.clone()));
            }
            if rep.over_limit {
                failures.push(("data dir size".into(), "more entries than resources.datadir_max_entries".into()));
            }
            if let Some(e) = &rep.writable_error {
                failures.push(("write test".into(), e.clone()));
            }
        }
        self.off.report(&r.name, "data dir", failures);

        let window = self.forecast_window;
        let fresh = || Trends { dir: key.dir.clone(), available: Trend::new(window), datadir: Trend::new(window) };
        let trends = self.trends.entry(r.name.clone()).or_insert_with(fresh);
        if trends.dir != key.dir {
            *trends = fresh();
        }
        if let Some(fs) = r.filesystem {
            trends.available.push(now, fs.available_bytes as f64);
            let fill = trends.available.slope().map(|s| -s);
            r.filesystem_growth_bytes_per_second = fill;
            r.days_until_full = forecast::days_until_full(fs.available_bytes, fill);
        }
        if let Some(size) = r.datadir_size_bytes {
            trends.datadir.push(now, size as f64);
            r.growth_bytes_per_second = trends.datadir.slope();
        }
    }
}

/// Whether `own` (a path on the agent's side) is the directory `at` (the
/// same path through the node's root). None when `at` cannot be read (not
/// made yet): nothing to learn from.
fn same_directory(at: &Path, own: &Path) -> Option<bool> {
    use std::os::unix::fs::MetadataExt;
    let at = std::fs::metadata(at).ok()?;
    Some(std::fs::metadata(own).is_ok_and(|own| (own.dev(), own.ino()) == (at.dev(), at.ino())))
}

/// What is off, per target and kind of source, so each change is logged
/// once: a warning when a source turns off, a note when it is back.
#[derive(Default)]
struct OffLog {
    off: HashMap<(String, &'static str), BTreeMap<String, String>>,
}

impl OffLog {
    fn report(&mut self, target: &str, kind: &'static str, failures: Vec<(String, String)>) {
        let now: BTreeMap<String, String> = failures.into_iter().collect();
        let before = self.off.entry((target.to_string(), kind)).or_default();
        for (source, reason) in &now {
            if !before.contains_key(source) {
                tracing::warn!(target_name = %target, "{kind} figure off: {source}: {reason}");
            }
        }
        for source in before.keys() {
            if !now.contains_key(source) {
                tracing::info!(target_name = %target, "{kind} figure back: {source}");
            }
        }
        *before = now;
    }

    fn forget(&mut self, keep: &dyn Fn(&str) -> bool) {
        self.off.retain(|(target, _), _| keep(target));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_container_nodes_data_dir_is_read_through_its_root_and_not_while_down() {
        let tmp = std::env::temp_dir().join(format!("nodescope-resources-{}", std::process::id()));
        // a path that exists only in the "container", a directory under tmp
        let node_dir = PathBuf::from(format!("/nodescope-test-{}/regtest", std::process::id()));
        let root = tmp.join("root");
        std::fs::create_dir_all(root.join(node_dir.strip_prefix("/").unwrap())).unwrap();
        let host_dir = tmp.join("host");
        std::fs::create_dir_all(&host_dir).unwrap();

        let mut signal = ResourceSignal::new(&ResourcesConfig::default());
        let node = |name: &str, dir: &Path, pid: Option<u32>, root: Option<&Path>| Target {
            datadir: Some(dir.to_path_buf()),
            root: root.map(Path::to_path_buf),
            ..Target::litecoin_for_tests(name, pid, &[], &[], &[])
        };
        let in_root = root.join(node_dir.strip_prefix("/").unwrap());
        assert_eq!(signal.reachable_datadir(&node("ltc", &node_dir, Some(42), Some(&root))), Some(in_root.clone()));
        // stopped: the host's path of that name is not its data dir
        assert_eq!(signal.reachable_datadir(&node("ltc", &node_dir, None, None)), None);
        assert_eq!(signal.reachable_datadir(&node("ltc", &node_dir, Some(43), Some(&root))), Some(in_root));

        // a node on the host, or seen from an agent with a mount namespace
        // of its own (its root shows the same directory): read running or not
        for root in [None, Some(Path::new("/"))] {
            assert_eq!(signal.reachable_datadir(&node("host", &host_dir, Some(44), root)), Some(host_dir.clone()));
            assert_eq!(signal.reachable_datadir(&node("host", &host_dir, None, None)), Some(host_dir.clone()));
        }
        // never seen running: taken as a path on the agent's side
        assert_eq!(signal.reachable_datadir(&node("new", &node_dir, None, None)), Some(node_dir.clone()));
        signal.collect(&[]);
        assert!(signal.readable_when_down.is_empty(), "targets that left are forgotten");
        let _ = std::fs::remove_dir_all(&tmp);
    }

    #[test]
    fn off_log_forgets_targets_that_left() {
        let mut log = OffLog::default();
        log.report("a", "cgroup", vec![("cgroup".into(), "none".into())]);
        log.report("b", "process", Vec::new());
        log.forget(&|n| n == "b");
        assert_eq!(log.off.keys().map(|(t, _)| t.as_str()).collect::<Vec<_>>(), ["b"]);
    }
}

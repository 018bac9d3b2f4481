//! CPU, memory, block I/O and task figures of the node's cgroup, from the
//! cgroup's own files: cgroup2 (`cpu.stat`, `memory.current`, `io.stat`,
//! ...) or the v1 controllers (`cpuacct.usage`, `memory.usage_in_bytes`,
//! `blkio.throttle.*`, ...).
//!
//! Every figure is read on its own: a file that is missing or unreadable
//! turns that figure off (None) and is reported to the caller, and the
//! others are still read.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{CgroupStats, IoDevice};
use crate::cgroup::{self, Mounts, ProcessCgroups};

/// v1 limits at or above this are the kernel's "no limit" (it prints
/// PAGE_COUNTER_MAX pages, 9223372036854771712 on 4 KiB pages).
const V1_UNLIMITED: u64 = 1 << 62;

/// The v1 controllers read, and the cgroup2 controller each corresponds to.
pub const CONTROLLERS: &[(&str, &str)] =
    &[("cpu", "cpu"), ("cpuacct", "cpu"), ("memory", "memory"), ("blkio", "io"), ("pids", "pids")];

/// The key, among a V1 source's controllers, of the node's cgroup2 group:
/// its CPU time when the node's v1 cpuacct group is the root.
pub const UNIFIED: &str = "unified";

use crate::config::CgroupVersion;

/// Where a node's cgroup figures are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSource {
    V2(PathBuf),
    /// controller -> the node's group directory in that controller's hierarchy
    V1(BTreeMap<String, PathBuf>),
}

/// Controllers enabled on the cgroup2 hierarchy (its root's `cgroup.controllers`).
pub fn v2_controllers(mounts: &Mounts) -> Vec<String> {
    mounts
        .v2
        .as_ref()
        .and_then(|m| std::fs::read_to_string(m.join("cgroup.controllers")).ok())
        .map(|s| s.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default()
}

/// Picks the hierarchy and directories for a node. `v2_dir` is the node's
/// cgroup2 directory; `groups` its line of /proc/PID/cgroup.
pub fn locate(
    preference: CgroupVersion,
    mounts: &Mounts,
    v2_controllers: &[String],
    v2_dir: Option<&Path>,
    groups: &ProcessCgroups,
) -> Option<CgroupSource> {
    let v1: BTreeMap<String, PathBuf> = CONTROLLERS
        .iter()
        .filter_map(|(ctrl, _)| {
            let mount = mounts.v1.get(*ctrl)?;
            let path = groups.v1.get(*ctrl)?;
            // A node in a hierarchy's root group (a v1 controller that
            // nothing on the host delegates) would be given the whole host's
            // figures, which also go backwards when a device leaves the
            // blkio sums: that controller's figures are off instead.
            if path.trim_end_matches('/').is_empty() {
                return None;
            }
            Some((ctrl.to_string(), cgroup::join(mount, path)))
        })
        .collect();
    let v2 = v2_dir.map(|d| CgroupSource::V2(d.to_path_buf()));
    let mut v1 = v1;
    // Every cgroup2 group has a cpu.stat with the group's CPU time, with or
    // without the cpu controller: when the node's cpuacct group is the
    // root, its CPU time is read there (see read_v1).
    if !v1.is_empty() && !v1.contains_key("cpuacct") {
        if let Some(d) = v2_dir {
            v1.insert(UNIFIED.to_string(), d.to_path_buf());
        }
    }
    let v1 = (!v1.is_empty()).then_some(CgroupSource::V1(v1));
    match preference {
        CgroupVersion::V2 => v2,
        CgroupVersion::V1 => v1,
        CgroupVersion::Auto => {
            let v2_has_controllers = CONTROLLERS.iter().any(|(_, c2)| v2_controllers.iter().any(|c| c == c2));
            if v2_has_controllers {
                v2.or(v1)
            } else {
                v1.or(v2)
            }
        }
    }
}

/// A figure that could not be read: (file, reason).
pub type Failure = (String, String);

struct Reader {
    failures: Vec<Failure>,
}

impl Reader {
    fn read(&mut self, path: &Path) -> Option<String> {
        match std::fs::read_to_string(path) {
            Ok(s) => Some(s),
            Err(e) => {
                self.failures.push((path.display().to_string(), e.to_string()));
                None
            }
        }
    }

    fn number(&mut self, path: &Path) -> Option<u64> {
        let text = self.read(path)?;
        match text.trim().parse() {
            Ok(v) => Some(v),
            Err(_) => {
                self.failures.push((path.display().to_string(), format!("not a number: {:?}", text.trim())));
                None
            }
        }
    }

    /// A `key value` line of a flat-keyed file such as cpu.stat.
    fn key(&mut self, path: &Path, text: Option<&str>, key: &str) -> Option<u64> {
        let v = flat_key(text?, key);
        if v.is_none() {
            self.failures.push((format!("{}: {key}", path.display()), "no such key".into()));
        }
        v
    }

    fn v1_dir<'a>(&mut self, dirs: &'a BTreeMap<String, PathBuf>, ctrl: &str) -> Option<&'a Path> {
        let d = dirs.get(ctrl).map(PathBuf::as_path);
        if d.is_none() {
            self.failures
                .push((format!("cgroup v1 {ctrl}"), "controller not mounted, or the node is in no group of it".into()));
        }
        d
    }
}

/// Reads every figure; returns them with the ones that failed.
pub fn read(source: &CgroupSource) -> (CgroupStats, Vec<Failure>) {
    let mut r = Reader { failures: Vec::new() };
    let stats = match source {
        CgroupSource::V2(dir) => read_v2(&mut r, dir),
        CgroupSource::V1(dirs) => read_v1(&mut r, dirs),
    };
    (stats, r.failures)
}

fn read_v2(r: &mut Reader, dir: &Path) -> CgroupStats {
    let cpu_path = dir.join("cpu.stat");
    let cpu = r.read(&cpu_path);
    let usage = r.key(&cpu_path, cpu.as_deref(), "usage_usec");
    // The throttling keys appear only with the cpu controller enabled.
    let throttled = r.key(&cpu_path, cpu.as_deref(), "throttled_usec");
    let periods = r.key(&cpu_path, cpu.as_deref(), "nr_throttled");
    let limit_path = dir.join("memory.max");
    let limit_text = r.read(&limit_path);
    let unlimited = limit_text.as_deref().is_some_and(|s| s.trim() == "max");
    let limit = limit_text.filter(|_| !unlimited).and_then(|s| {
        let v = s.trim();
        v.parse().ok().or_else(|| {
            r.failures.push((limit_path.display().to_string(), format!("not a limit: {v:?}")));
            None
        })
    });
    let memory_usage = r.number(&dir.join("memory.current"));
    let stat_path = dir.join("memory.stat");
    let stat = memory_usage.and_then(|_| r.read(&stat_path));
    let inactive_file = r.key(&stat_path, stat.as_deref(), "inactive_file");
    CgroupStats {
        version: "v2",
        cpu_usage_seconds: usage.map(|us| us as f64 / 1e6),
        cpu_throttled_seconds: throttled.map(|us| us as f64 / 1e6),
        cpu_throttled_periods: periods,
        memory_usage_bytes: memory_usage,
        memory_working_set_bytes: working_set(memory_usage, inactive_file),
        memory_limit_bytes: limit,
        memory_unlimited: unlimited,
        memory_peak_bytes: r.number(&dir.join("memory.peak")),
        io: r.read(&dir.join("io.stat")).map(|s| parse_io_stat(&s)).unwrap_or_default(),
        pids: r.number(&dir.join("pids.current")),
    }
}

fn read_v1(r: &mut Reader, dirs: &BTreeMap<String, PathBuf>) -> CgroupStats {
    let mut s = CgroupStats { version: "v1", ..Default::default() };
    if let Some(d) = dirs.get(UNIFIED).filter(|_| !dirs.contains_key("cpuacct")) {
        let path = d.join("cpu.stat");
        let text = r.read(&path);
        s.cpu_usage_seconds = r.key(&path, text.as_deref(), "usage_usec").map(|us| us as f64 / 1e6);
    } else if let Some(d) = r.v1_dir(dirs, "cpuacct") {
        s.cpu_usage_seconds = r.number(&d.join("cpuacct.usage")).map(|ns| ns as f64 / 1e9);
    }
    if let Some(d) = r.v1_dir(dirs, "cpu") {
        let path = d.join("cpu.stat");
        let text = r.read(&path);
        s.cpu_throttled_seconds = r.key(&path, text.as_deref(), "throttled_time").map(|ns| ns as f64 / 1e9);
        s.cpu_throttled_periods = r.key(&path, text.as_deref(), "nr_throttled");
    }
    if let Some(d) = r.v1_dir(dirs, "memory") {
        s.memory_usage_bytes = r.number(&d.join("memory.usage_in_bytes"));
        let stat_path = d.join("memory.stat");
        let stat = s.memory_usage_bytes.and_then(|_| r.read(&stat_path));
        // total_: the group and its children, as usage_in_bytes counts them
        s.memory_working_set_bytes =
            working_set(s.memory_usage_bytes, r.key(&stat_path, stat.as_deref(), "total_inactive_file"));
        let limit = r.number(&d.join("memory.limit_in_bytes"));
        s.memory_unlimited = limit.is_some_and(|v| v >= V1_UNLIMITED);
        s.memory_limit_bytes = limit.filter(|v| *v < V1_UNLIMITED);
        s.memory_peak_bytes = r.number(&d.join("memory.max_usage_in_bytes"));
    }
    if let Some(d) = r.v1_dir(dirs, "blkio") {
        // The recursive files include child groups, as cgroup2's io.stat does.
        let pick = |name: &str| {
            let recursive = d.join(format!("{name}_recursive"));
            if recursive.exists() {
                recursive
            } else {
                d.join(name)
            }
        };
        let bytes = r.read(&pick("blkio.throttle.io_service_bytes"));
        let ops = r.read(&pick("blkio.throttle.io_serviced"));
        if let (Some(bytes), Some(ops)) = (bytes, ops) {
            s.io = parse_blkio(&bytes, &ops);
        }
    }
    if let Some(d) = r.v1_dir(dirs, "pids") {
        s.pids = r.number(&d.join("pids.current"));
    }
    s
}

/// The working set as kubelet judges eviction: usage less the page cache
/// the kernel would reclaim first (inactive file pages).
fn working_set(usage: Option<u64>, inactive_file: Option<u64>) -> Option<u64> {
    Some(usage?.saturating_sub(inactive_file?))
}

/// The value of `key` in a flat-keyed file (`key value` lines: cpu.stat, memory.stat).
pub fn flat_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

/// cgroup2 io.stat: `MAJ:MIN rbytes=.. wbytes=.. rios=.. wios=.. dbytes=.. dios=..`
pub fn parse_io_stat(text: &str) -> Vec<IoDevice> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.split_whitespace();
        let Some(device) = parts.next() else { continue };
        let mut d = IoDevice { device: device.to_string(), ..Default::default() };
        for kv in parts {
            let Some((k, v)) = kv.split_once('=') else { continue };
            let Ok(v) = v.parse() else { continue };
            match k {
                "rbytes" => d.read_bytes = v,
                "wbytes" => d.write_bytes = v,
                "rios" => d.read_ops = v,
                "wios" => d.write_ops = v,
                _ => {}
            }
        }
        out.push(d);
    }
    out.sort_by(|a, b| a.device.cmp(&b.device));
    out
}

/// v1 blkio.throttle.io_service_bytes and io_serviced: `MAJ:MIN Read N`,
/// `MAJ:MIN Write N`, ... and a closing `Total N`.
pub fn parse_blkio(bytes: &str, ops: &str) -> Vec<IoDevice> {
    let mut devices: BTreeMap<String, IoDevice> = BTreeMap::new();
    for (text, is_bytes) in [(bytes, true), (ops, false)] {
        for line in text.lines() {
            let parts: Vec<&str> = line.split_whitespace().collect();
            let [device, op, value] = parts[..] else { continue };
            let Ok(value) = value.parse::<u64>() else { continue };
            let d = devices
                .entry(device.to_string())
                .or_insert_with(|| IoDevice { device: device.to_string(), ..Default::default() });
            match (op, is_bytes) {
                ("Read", true) => d.read_bytes = value,
                ("Write", true) => d.write_bytes = value,
                ("Read", false) => d.read_ops = value,
                ("Write", false) => d.write_ops = value,
                _ => {}
            }
        }
    }
    devices.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A FAKE cgroup2 directory: plain files holding what kernel 6.x writes
    /// in a group with the cpu, memory, io and pids controllers enabled
    /// (cgroup-v2.rst formats, values from a real group). The build hosts
    /// bind those controllers to v1 hierarchies, so no real cgroup2 group
    /// with them can be made here; the real cgroup2 directory, where only
    /// cpu.stat's usage keys exist, is covered by tests/resources.rs.
    struct FakeV2(PathBuf);

    impl FakeV2 {
        fn new() -> FakeV2 {
            let dir = std::env::temp_dir().join(format!("nodescope-fake-cgroup2-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let files = [
                (
                    "cpu.stat",
                    "usage_usec 8423211\nuser_usec 6120534\nsystem_usec 2302677\ncore_sched.force_idle_usec 0\n\
                     nr_periods 412\nnr_throttled 37\nthrottled_usec 1830012\nnr_bursts 0\nburst_usec 0\n",
                ),
                ("memory.current", "218103808\n"),
                ("memory.max", "1073741824\n"),
                ("memory.peak", "230686720\n"),
                ("memory.stat", "anon 104857600\nfile 109051904\nactive_file 25165824\ninactive_file 83886080\n"),
                ("io.stat", "254:0 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n8:16 rbytes=4096 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n"),
                ("pids.current", "17\n"),
            ];
            for (name, text) in files {
                std::fs::write(dir.join(name), text).unwrap();
            }
            FakeV2(dir)
        }
    }

    impl Drop for FakeV2 {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn v2_with_controllers_from_fake_files() {
        let fake = FakeV2::new();
        let (s, failures) = read(&CgroupSource::V2(fake.0.clone()));
        assert!(failures.is_empty(), "{failures:?}");
        assert_eq!(s.version, "v2");
        assert_eq!(s.cpu_usage_seconds, Some(8.423211));
        assert_eq!(s.cpu_throttled_seconds, Some(1.830012));
        assert_eq!(s.cpu_throttled_periods, Some(37));
        assert_eq!(s.memory_usage_bytes, Some(218103808));
        assert_eq!(s.memory_working_set_bytes, Some(218103808 - 83886080));
        assert_eq!(s.memory_limit_bytes, Some(1073741824));
        assert_eq!(s.memory_peak_bytes, Some(230686720));
        assert_eq!(s.pids, Some(17));
        assert_eq!(s.io.len(), 2);
        assert_eq!(
            s.io[0],
            IoDevice {
                device: "254:0".into(),
                read_bytes: 1459200,
                write_bytes: 314773504,
                read_ops: 192,
                write_ops: 353
            }
        );

        assert!(!s.memory_unlimited);

        // "max" is no limit; a file taken away turns off that figure only
        std::fs::write(fake.0.join("memory.max"), "max\n").unwrap();
        std::fs::remove_file(fake.0.join("memory.peak")).unwrap();
        let (s, failures) = read(&CgroupSource::V2(fake.0.clone()));
        assert_eq!(s.memory_limit_bytes, None);
        assert!(s.memory_unlimited);
        assert_eq!(s.memory_peak_bytes, None);
        assert_eq!(s.memory_usage_bytes, Some(218103808));
        assert_eq!(failures.len(), 1);
        assert!(failures[0].0.ends_with("memory.peak"), "{failures:?}");

        // an unreadable limit is not "no limit"
        std::fs::remove_file(fake.0.join("memory.max")).unwrap();
        let (s, failures) = read(&CgroupSource::V2(fake.0.clone()));
        assert_eq!((s.memory_limit_bytes, s.memory_unlimited), (None, false));
        assert!(failures.iter().any(|f| f.0.ends_with("memory.max")), "{failures:?}");
    }

    #[test]
    fn v1_blkio_format() {
        let bytes = "254:0 Read 10485760\n254:0 Write 20971520\n254:0 Sync 31457280\n254:0 Async 0\n254:0 Discard 0\n254:0 Total 31457280\nTotal 31457280\n";
        let ops =
            "254:0 Read 20\n254:0 Write 40\n254:0 Sync 60\n254:0 Async 0\n254:0 Discard 0\n254:0 Total 60\nTotal 60\n";
        assert_eq!(
            parse_blkio(bytes, ops),
            vec![IoDevice {
                device: "254:0".into(),
                read_bytes: 10485760,
                write_bytes: 20971520,
                read_ops: 20,
                write_ops: 40
            }]
        );
        assert!(parse_blkio("Total 0\n", "Total 0\n").is_empty());
    }

    #[test]
    fn choosing_the_hierarchy() {
        let hybrid = Mounts::parse(
            "31 30 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n",
        );
        let groups = ProcessCgroups::parse("4:memory:/n\n2:cpu,cpuacct:/n\n0::/n\n");
        let v2_dir = Path::new("/sys/fs/cgroup/unified/n");
        let auto = locate(CgroupVersion::Auto, &hybrid, &["hugetlb".into()], Some(v2_dir), &groups).unwrap();
        let CgroupSource::V1(dirs) = auto else { panic!("hybrid host without cgroup2 controllers should read v1") };
        assert_eq!(dirs["memory"], PathBuf::from("/sys/fs/cgroup/memory/n"));
        assert_eq!(dirs["cpuacct"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/n"));
        assert!(!dirs.contains_key("blkio"));
        let with = locate(CgroupVersion::Auto, &hybrid, &["cpu".into(), "memory".into()], Some(v2_dir), &groups);
        assert_eq!(with, Some(CgroupSource::V2(v2_dir.to_path_buf())));
        let forced = locate(CgroupVersion::V2, &hybrid, &[], Some(v2_dir), &groups);
        assert_eq!(forced, Some(CgroupSource::V2(v2_dir.to_path_buf())));
        assert_eq!(locate(CgroupVersion::V1, &Mounts::default(), &[], Some(v2_dir), &groups), None);
    }

    /// A controller whose group is the root (nothing delegates it) would
    /// give the host's figures as the node's: it is left out, the others kept.
    #[test]
    fn a_root_v1_group_is_not_the_nodes() {
        let hybrid = Mounts::parse(
            "33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n35 30 0:31 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio\n",
        );
        let groups = ProcessCgroups::parse("5:blkio:/\n4:memory:/n\n0::/n\n");
        let CgroupSource::V1(dirs) = locate(CgroupVersion::V1, &hybrid, &[], None, &groups).unwrap() else {
            panic!("v1 asked for")
        };
        assert_eq!(dirs.keys().collect::<Vec<_>>(), ["memory"]);
        let only_root = ProcessCgroups::parse("5:blkio:/\n0::/n\n");
        assert_eq!(locate(CgroupVersion::V1, &hybrid, &[], None, &only_root), None);
        // a root cpuacct group: the CPU time comes from the node's cgroup2 group
        let v2_dir = Path::new("/sys/fs/cgroup/unified/n");
        let CgroupSource::V1(dirs) = locate(CgroupVersion::V1, &hybrid, &[], Some(v2_dir), &groups).unwrap() else {
            panic!("v1 asked for")
        };
        assert_eq!(dirs.keys().collect::<Vec<_>>(), ["memory", UNIFIED]);
        assert_eq!(dirs[UNIFIED], v2_dir);
    }
}

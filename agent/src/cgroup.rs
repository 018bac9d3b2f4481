//! Where the cgroup hierarchies are mounted and which group a process is in.
//! Read from /proc/self/mountinfo, never assumed: hosts mount cgroup2 at
//! /sys/fs/cgroup (pure v2) or /sys/fs/cgroup/unified (hybrid).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use procfs::{FromRead, ProcessCGroups};

/// v1 superoptions mix controllers with flags (xattr, name=systemd, ...).
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "blkio",
    "pids",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "perf_event",
    "hugetlb",
    "rdma",
    "misc",
];

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mounts {
    /// The cgroup2 (unified) hierarchy, if mounted.
    pub v2: Option<PathBuf>,
    /// cgroup v1 hierarchies by controller ("memory", "cpu", "cpuacct", "blkio", "pids", ...).
    pub v1: BTreeMap<String, PathBuf>,
}

impl Mounts {
    pub fn read() -> std::io::Result<Mounts> {
        Ok(Mounts::parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
    }

    /// Finds the cgroup mounts in a mountinfo text (proc(5)).
    pub fn parse(mountinfo: &str) -> Mounts {
        let mut m = Mounts::default();
        for mount in crate::mountinfo::parse(mountinfo) {
            match mount.fs_type.as_str() {
                "cgroup2" => {
                    m.v2.get_or_insert(mount.mount_point);
                }
                "cgroup" => {
                    for opt in mount.super_options.keys().filter(|o| V1_CONTROLLERS.contains(&o.as_str())) {
                        m.v1.entry(opt.clone()).or_insert_with(|| mount.mount_point.clone());
                    }
                }
                _ => {}
            }
        }
        m
    }
}

/// A process's group in each hierarchy, from /proc/PID/cgroup:
/// `0::/path` for v2, `N:controllers:/path` for v1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcessCgroups {
    pub v2: Option<String>,
    pub v1: BTreeMap<String, String>,
}

impl ProcessCgroups {
    pub fn read(proc_root: &Path, pid: u32) -> std::io::Result<ProcessCgroups> {
        Ok(Self::parse(&std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))?))
    }

    /// From a /proc/PID/cgroup text, parsed by the procfs crate.
    pub fn parse(text: &str) -> ProcessCgroups {
        let mut pc = ProcessCgroups::default();
        let Ok(groups) = ProcessCGroups::from_read(text.as_bytes()) else { return pc };
        for g in groups {
            if g.hierarchy == 0 && g.controllers.is_empty() {
                pc.v2 = Some(g.pathname);
            } else {
                for c in &g.controllers {
                    pc.v1.insert(c.trim_start_matches("name=").to_string(), g.pathname.clone());
                }
            }
        }
        pc
    }
}

/// Joins a mount point with a cgroup path as /proc/PID/cgroup prints it.
pub fn join(mount: &Path, cgroup_path: &str) -> PathBuf {
    mount.join(cgroup_path.trim_start_matches('/'))
}

/// The cgroup2 id the kernel puts on sockets (the kernfs node id, which is
/// the directory's inode number).
pub fn cgroup2_id(dir: &Path) -> std::io::Result<u64> {
    Ok(std::fs::metadata(dir)?.ino())
}

/// The processes in a group (not its descendants).
pub fn procs(dir: &Path) -> std::io::Result<Vec<u32>> {
    Ok(std::fs::read_to_string(dir.join("cgroup.procs"))?.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
33 30 0:29 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
34 30 0:30 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
35 30 0:31 / /sys/fs/cgroup/blkio rw - cgroup cgroup rw,blkio
36 30 0:32 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn hybrid_mounts() {
        let m = Mounts::parse(HYBRID);
        assert_eq!(m.v2.as_deref(), Some(Path::new("/sys/fs/cgroup/unified")));
        assert_eq!(m.v1["memory"], PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(m.v1["cpuacct"], PathBuf::from("/sys/fs/cgroup/cpu,cpuacct"));
        assert!(!m.v1.contains_key("xattr"));
    }

    #[test]
    fn pure_v2_and_escapes() {
        let m = Mounts::parse(
            "40 1 0:33 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n41 1 0:34 / /mnt/a\\040b rw - cgroup2 none rw\n",
        );
        assert_eq!(m.v2.as_deref(), Some(Path::new("/sys/fs/cgroup")));
        assert!(m.v1.is_empty());
    }

    #[test]
    fn process_cgroup_lines() {
        let pc = ProcessCgroups::parse("12:memory:/ns\n5:cpu,cpuacct:/\n1:name=systemd:/x\n0::/nodescope-test\n");
        assert_eq!(pc.v2.as_deref(), Some("/nodescope-test"));
        assert_eq!(pc.v1["memory"], "/ns");
        assert_eq!(pc.v1["cpuacct"], "/");
        assert_eq!(join(Path::new("/sys/fs/cgroup/unified"), "/a/b"), PathBuf::from("/sys/fs/cgroup/unified/a/b"));
    }

    #[test]
    fn this_machine() {
        let m = Mounts::read().unwrap();
        let own = ProcessCgroups::read(Path::new("/proc"), std::process::id()).unwrap();
        if let (Some(v2), Some(path)) = (&m.v2, &own.v2) {
            assert!(cgroup2_id(&join(v2, path)).unwrap() > 0);
        }
    }
}

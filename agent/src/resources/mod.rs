//! Resource signals from procfs, statvfs and cgroups: data dir and its
//! filesystem, the node's cgroup (v2 or v1), its process.
//!
//! CONTRACT (read by health rules and metrics; keep these names):

#[derive(Debug, Clone, Default)]
pub struct ResourceSnapshot {
    pub targets: Vec<TargetResources>,
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
    pub cgroup: Option<CgroupStats>,
    pub process: Option<ProcessStats>,
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

#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupStats {
    /// "v2" or "v1"
    pub version: &'static str,
    pub cpu_usage_seconds: Option<f64>,
    pub cpu_throttled_seconds: Option<f64>,
    pub cpu_throttled_periods: Option<u64>,
    pub memory_usage_bytes: Option<u64>,
    /// None = unlimited
    pub memory_limit_bytes: Option<u64>,
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
}

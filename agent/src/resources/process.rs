//! The node process's own figures from procfs: memory, threads, file
//! descriptors against their limit, storage I/O, age, and restarts seen.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use procfs::process::{LimitValue, Process};
use procfs::{FromRead, FromReadSI, KernelStats, Uptime};

use super::ProcessStats;
use crate::discovery;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: procfs::ProcError },
    #[error("process {0} is gone")]
    Gone(u32),
}

/// The node's filesystem user and group, for acting as the node would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsOwner {
    pub uid: u32,
    pub gid: u32,
}

/// Reads processes and remembers, per target, which process it last was,
/// to count restarts.
pub struct ProcessReader {
    proc_root: PathBuf,
    /// target -> (pid, start time in seconds since boot)
    last_seen: HashMap<String, (u32, u64)>,
    restarts: HashMap<String, u64>,
    /// Boot time (unix seconds), read once: /proc/stat is large on big hosts.
    boot_time: Option<u64>,
}

impl ProcessReader {
    pub fn new(proc_root: &Path) -> ProcessReader {
        ProcessReader {
            proc_root: proc_root.to_path_buf(),
            last_seen: HashMap::new(),
            restarts: HashMap::new(),
            boot_time: None,
        }
    }

    /// Notes which process the target is now: a different pid, or the same
    /// pid with another start time, is a restart. A target that goes away
    /// and comes back as a new process counts once.
    pub fn observe(&mut self, target: &str, pid: u32) -> Option<u64> {
        let started = discovery::start_time_ticks(&self.proc_root, pid)?;
        let now = (pid, started);
        if let Some(prev) = self.last_seen.insert(target.to_string(), now) {
            if prev != now {
                *self.restarts.entry(target.to_string()).or_default() += 1;
            }
        }
        Some(started)
    }

    pub fn restarts(&self, target: &str) -> u64 {
        self.restarts.get(target).copied().unwrap_or(0)
    }

    pub fn forget(&mut self, keep: &dyn Fn(&str) -> bool) {
        self.last_seen.retain(|t, _| keep(t));
        self.restarts.retain(|t, _| keep(t));
    }

    /// All of the process's figures, or the first file that failed.
    pub fn read(&mut self, target: &str, pid: u32) -> Result<(ProcessStats, FsOwner), ProcessError> {
        let started = self.observe(target, pid).ok_or(ProcessError::Gone(pid))?;
        let dir = self.proc_root.join(pid.to_string());
        let at = |file: &str| {
            let path = dir.join(file);
            move |source| ProcessError::Read { path, source }
        };
        let process =
            Process::new_with_root(dir.clone()).map_err(|source| ProcessError::Read { path: dir.clone(), source })?;
        let status = process.status().map_err(at("status"))?;
        // "Uid: real effective saved filesystem": the node opens files as the last
        let owner = FsOwner { uid: status.fuid, gid: status.fgid };
        // Counted from the links rather than fd_count(), whose fast path (the
        // directory's size) only /proc has: the same code reads test trees.
        let open_fds = process.fd().map_err(at("fd"))?.count() as u64;
        let fd_limit = match process.limits().map_err(at("limits"))?.max_open_files.soft_limit {
            LimitValue::Unlimited => None,
            LimitValue::Value(v) => Some(v),
        };
        let io = process.io().map_err(at("io"))?;
        let uptime_path = self.proc_root.join("uptime");
        let uptime: Uptime =
            FromRead::from_file(&uptime_path).map_err(|source| ProcessError::Read { path: uptime_path, source })?;
        let boot_time = match self.boot_time {
            Some(t) => t,
            None => {
                let stat_path = self.proc_root.join("stat");
                let stat: KernelStats = FromReadSI::from_file(&stat_path, procfs::current_system_info())
                    .map_err(|source| ProcessError::Read { path: stat_path, source })?;
                *self.boot_time.insert(stat.btime)
            }
        };

        let stats = ProcessStats {
            pid,
            // kernel threads have no VmRSS
            rss_bytes: status.vmrss.unwrap_or(0) * 1024,
            threads: status.threads,
            open_fds,
            fd_limit,
            read_bytes: io.read_bytes,
            write_bytes: io.write_bytes,
            start_time_unix: boot_time + started,
            restarts: self.restarts(target),
            uptime_seconds: (uptime.uptime - started as f64).max(0.0),
        };
        Ok((stats, owner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_and_restarts() {
        let mut r = ProcessReader::new(Path::new("/proc"));
        let me = std::process::id();
        let (s, owner) = r.read("self", me).unwrap();
        assert_eq!(s.pid, me);
        assert!(s.rss_bytes > 0 && s.threads >= 1 && s.open_fds >= 3);
        // SAFETY: no preconditions.
        assert_eq!(owner.uid, unsafe { libc::getuid() });
        assert_eq!(s.restarts, 0);
        // the same target now names another process: one restart
        let parent = std::os::unix::process::parent_id();
        r.observe("self", parent).unwrap();
        r.observe("self", parent).unwrap();
        assert_eq!(r.restarts("self"), 1);
        assert!(r.read("self", u32::MAX - 1).is_err());
    }
}

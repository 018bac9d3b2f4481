//! The node process's own figures from procfs: memory, threads, file
//! descriptors against their limit, storage I/O, age, and restarts seen.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::ProcessStats;
use crate::discovery;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: no {field} line")]
    Field { path: PathBuf, field: &'static str },
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
        let status = read(&dir.join("status"))?;
        let field = |name: &'static str| -> Result<&str, ProcessError> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .ok_or(ProcessError::Field { path: dir.join("status"), field: name })
        };
        // "VmRSS:	  123456 kB"; kernel threads have none
        let rss_kib: u64 = field("VmRSS")?.trim_end_matches("kB").trim().parse().unwrap_or(0);
        let threads: u64 = field("Threads")?.parse().unwrap_or(0);
        // "Uid: real effective saved filesystem"
        let fs_id = |name| -> Result<u32, ProcessError> {
            Ok(field(name)?.split_whitespace().nth(3).and_then(|v| v.parse().ok()).unwrap_or(0))
        };
        let owner = FsOwner { uid: fs_id("Uid")?, gid: fs_id("Gid")? };

        let fd_dir = dir.join("fd");
        let open_fds =
            fs::read_dir(&fd_dir).map_err(|source| ProcessError::Read { path: fd_dir, source })?.count() as u64;
        let limits_path = dir.join("limits");
        let fd_limit = nofile_soft_limit(&read(&limits_path)?)
            .ok_or(ProcessError::Field { path: limits_path, field: "Max open files" })?;
        let io_path = dir.join("io");
        let io = read(&io_path)?;
        let io_field = |name: &'static str| {
            io.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
                .ok_or(ProcessError::Field { path: io_path.clone(), field: name })
        };
        let (read_bytes, write_bytes) = (io_field("read_bytes")?, io_field("write_bytes")?);

        let uptime_path = self.proc_root.join("uptime");
        let since_boot = read(&uptime_path)?
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or(ProcessError::Field { path: uptime_path, field: "uptime" })?;
        let boot_time = match self.boot_time {
            Some(t) => t,
            None => {
                let stat_path = self.proc_root.join("stat");
                let t = read(&stat_path)?
                    .lines()
                    .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
                    .ok_or(ProcessError::Field { path: stat_path, field: "btime" })?;
                *self.boot_time.insert(t)
            }
        };

        let stats = ProcessStats {
            pid,
            rss_bytes: rss_kib * 1024,
            threads,
            open_fds,
            fd_limit,
            read_bytes,
            write_bytes,
            start_time_unix: boot_time + started,
            restarts: self.restarts(target),
            uptime_seconds: (since_boot - started as f64).max(0.0),
        };
        Ok((stats, owner))
    }
}

fn read(path: &Path) -> Result<String, ProcessError> {
    fs::read_to_string(path).map_err(|source| ProcessError::Read { path: path.to_path_buf(), source })
}

/// The soft RLIMIT_NOFILE from /proc/PID/limits; Some(None) when unlimited.
fn nofile_soft_limit(limits: &str) -> Option<Option<u64>> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.trim_start_matches("Max open files").split_whitespace().next()?;
    Some(if soft == "unlimited" { None } else { Some(soft.parse().ok()?) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_line() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max processes             95837                95837                processes \n\
                    Max open files            1024                 524288               files     \n";
        assert_eq!(nofile_soft_limit(text), Some(Some(1024)));
        assert_eq!(
            nofile_soft_limit("Max open files            unlimited            unlimited            files\n"),
            Some(None)
        );
        assert_eq!(nofile_soft_limit("nothing"), None);
    }

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

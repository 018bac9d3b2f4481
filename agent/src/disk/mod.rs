//! The disk signal: bytes and calls the node writes, by file class, and its
//! sync calls with their latency (disk.bpf.c on syscall tracepoints).
//!
//! CONTRACT (read by health rules and metrics; keep these names):

use std::collections::BTreeMap;

/// Cumulative since the agent started, per target.
#[derive(Debug, Clone, Default)]
pub struct DiskSnapshot {
    pub targets: Vec<TargetDisk>,
    /// False when the signal is off (kernel feature missing): rules read it as unknown.
    pub available: bool,
}

#[derive(Debug, Clone, Default)]
pub struct TargetDisk {
    pub name: String,
    /// class ("blocks", "chainstate", "lmdb", "log", "other", ...) -> totals
    pub classes: BTreeMap<String, ClassWrites>,
    /// (class, call: "fsync" | "fdatasync" | "msync" | "sync_file_range") -> latency histogram
    pub syncs: BTreeMap<(String, &'static str), SyncLatency>,
    /// class -> unix seconds of the last interval in which its written bytes grew
    pub last_write_unix: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassWrites {
    pub bytes: u64,
    pub calls: u64,
}

/// Cumulative histogram: counts[i] = calls with latency <= bounds_seconds[i]
/// (non-cumulative per bucket is fine too, say which), plus sum and count.
#[derive(Debug, Clone, Default)]
pub struct SyncLatency {
    pub bounds_seconds: Vec<f64>,
    /// per bucket (not cumulative); last entry is +Inf
    pub bucket_counts: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

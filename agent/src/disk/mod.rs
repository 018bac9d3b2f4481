//! The disk signal: bytes and calls the node writes, by file class, and its
//! sync calls with their latency.
//!
//! `probe` owns the kernel side (the filesystem hooks of disk.bpf.c, or the
//! syscall tracepoints of disk_syscalls.bpf.c); this module folds the
//! records it takes each interval, one per (file, target), into per-class
//! totals (`DiskSignal::collect`); `classes` says which class a path is;
//! `coverage` whether the hooks see the filesystem a data dir is on;
//! `metrics` exports snapshots. docs/disk.md has the design and its limits.

pub mod classes;
pub mod coverage;
pub mod metrics;
pub mod probe;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::bpf::abi;
use crate::config::{DiskConfig, DiskMethod};
use crate::scope::ScopePlan;
use crate::signal::Signal;
use crate::snapshot::Shared;
use crate::target::Target;
use classes::{Classifier, OTHER};
use coverage::{Coverage, CoverageTracker};
use probe::{DiskError, DiskProbe, KernelStats};

/// Cumulative per target, since the agent started or, with
/// `[agent] state_dir`, since the first agent that kept them.
#[derive(Debug, Clone, Default)]
pub struct DiskSnapshot {
    pub targets: Vec<TargetDisk>,
    /// False when the signal is off (kernel feature missing): rules read it as unknown.
    pub available: bool,
    /// "filesystem" or "syscalls" (`disk.method`).
    pub method: &'static str,
    /// What the signal could not count, and why.
    pub dropped: Dropped,
}

#[derive(Debug, Clone, Default)]
pub struct TargetDisk {
    pub name: String,
    /// (class, sync call) -> latency histogram of the timed sync calls
    /// (ext4, or the syscall method; xfs's syncs are counted, not timed)
    pub syncs: BTreeMap<(String, &'static str), SyncLatency>,
    /// (class, sync call) -> sync calls seen, timed or not
    pub sync_counts: BTreeMap<(String, &'static str), u64>,
    /// class -> unix seconds of the last interval in which its written bytes grew
    pub last_write_unix: BTreeMap<String, u64>,
    /// (class ("blocks", "chainstate", "lmdb", "log", "other", ...), way of
    /// writing ("write", "pwrite64", ..., "mmap")) -> totals
    pub writes_by_call: BTreeMap<(String, &'static str), ClassWrites>,
    /// (class, sync call) -> sync calls that returned an error
    pub sync_errors: BTreeMap<(String, &'static str), u64>,
    /// Sync calls that completed in this interval only, per histogram slot:
    /// what the latency histogram instrument records.
    pub new_syncs: Vec<SyncSlotDelta>,
    /// Whether the hooks see the filesystem the data dir is on.
    pub coverage: Coverage,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClassWrites {
    pub bytes: u64,
    pub calls: u64,
}

/// Latency histogram of successful sync calls, cumulative since the agent
/// started: `bucket_counts[i]` counts calls in (bounds_seconds[i-1], bounds_seconds[i]].
#[derive(Debug, Clone, Default)]
pub struct SyncLatency {
    pub bounds_seconds: Vec<f64>,
    /// per bucket (not cumulative); last entry is +Inf
    pub bucket_counts: Vec<u64>,
    /// per bucket, nanoseconds: what a restarted agent feeds its histogram
    /// with to go on from these figures
    pub bucket_sum_ns: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl SyncLatency {
    pub fn empty() -> SyncLatency {
        SyncLatency {
            bounds_seconds: bucket_bounds_seconds(),
            bucket_counts: vec![0; abi::DISK_SYNC_SLOTS],
            bucket_sum_ns: vec![0; abi::DISK_SYNC_SLOTS],
            sum_seconds: 0.0,
            count: 0,
        }
    }
}

/// `count` calls of `call` on files of `class` that fell in histogram slot
/// `slot` this interval, taking `sum_ns` together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSlotDelta {
    pub class: String,
    pub call: &'static str,
    pub slot: usize,
    pub count: u64,
    pub sum_ns: u64,
}

/// Calls and records lost at a bound, since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub kernel: KernelStats,
    /// Records whose target was no longer watched when they were read.
    pub target_gone: u64,
    /// Calls on files that could not be named (no dentry, an msync whose
    /// mapping was gone, a histogram whose record was refused), counted as
    /// class "other".
    pub unattributed: u64,
}

/// Label values of `nodescope.write.call`, by NS_DISK_* index.
pub const WRITE_CALLS: [&str; abi::DISK_WRITE_CALLS] = [
    "write",
    "pwrite64",
    "writev",
    "pwritev",
    "pwritev2",
    "copy_file_range",
    "sendfile",
    "splice",
    "io_uring",
    "mmap",
    "other",
];
/// Label values of `nodescope.sync.call`, by NS_DISK_* index.
pub const SYNC_CALLS: [&str; abi::DISK_SYNC_CALLS] =
    ["fsync", "fdatasync", "msync", "sync_file_range", "io_uring", "other"];

/// Upper bounds of the latency buckets: kernel slot i holds calls of
/// [2^i, 2^(i+1)) microseconds, so its bound is 2^(i+1) us; the last slot is
/// open-ended (+Inf).
pub fn bucket_bounds_seconds() -> Vec<f64> {
    (0..abi::DISK_SYNC_SLOTS - 1).map(|i| (1u64 << (i + 1)) as f64 * 1e-6).collect()
}

#[derive(Default)]
struct PerTarget {
    name: String,
    writes_by_call: BTreeMap<(String, &'static str), ClassWrites>,
    syncs: BTreeMap<(String, &'static str), SyncLatency>,
    sync_counts: BTreeMap<(String, &'static str), u64>,
    sync_errors: BTreeMap<(String, &'static str), u64>,
    last_write_unix: BTreeMap<String, u64>,
    grew: HashSet<String>,
    new_syncs: Vec<SyncSlotDelta>,
}

pub struct DiskSignal {
    probe: DiskProbe,
    method: DiskMethod,
    classifier: Classifier,
    coverage: CoverageTracker,
    targets: BTreeMap<u32, PerTarget>,
    target_gone: u64,
    unattributed: u64,
    /// The kernel's loss counters of earlier agents (this one's maps start at 0).
    kernel_base: KernelStats,
    /// Totals an earlier agent saved for targets not collected yet, by name.
    restored: HashMap<String, SavedTarget>,
}

/// What the disk signal keeps across agent restarts (crate::state): the
/// totals it exports. Its kernel maps are not pinned, so writes made while
/// no agent runs are not counted (docs/architecture.md, "Across restarts").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SavedDisk {
    targets: Vec<SavedTarget>,
    target_gone: u64,
    unattributed: u64,
    kernel: KernelStats,
}

/// One target's totals, by class and call name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SavedTarget {
    name: String,
    /// (class, write call, bytes, calls)
    writes: Vec<(String, String, u64, u64)>,
    /// (class, sync call, calls)
    syncs: Vec<(String, String, u64)>,
    /// (class, sync call, calls that failed)
    sync_errors: Vec<(String, String, u64)>,
    /// (class, sync call, calls per kernel slot, nanoseconds per kernel slot)
    latency: Vec<(String, String, Vec<u64>, Vec<u64>)>,
    /// (class, unix seconds of its last growth)
    last_write: Vec<(String, u64)>,
}

/// A call name of the state file as this build names it; None: a call this
/// build does not count (its figure is dropped).
fn known(calls: &'static [&'static str], name: &str) -> Option<&'static str> {
    calls.iter().find(|c| **c == name).copied()
}

impl PerTarget {
    fn save(&self) -> SavedTarget {
        SavedTarget {
            name: self.name.clone(),
            writes: self
                .writes_by_call
                .iter()
                .map(|((c, k), w)| (c.clone(), k.to_string(), w.bytes, w.calls))
                .collect(),
            syncs: self.sync_counts.iter().map(|((c, k), n)| (c.clone(), k.to_string(), *n)).collect(),
            sync_errors: self.sync_errors.iter().map(|((c, k), n)| (c.clone(), k.to_string(), *n)).collect(),
            latency: self
                .syncs
                .iter()
                .map(|((c, k), l)| (c.clone(), k.to_string(), l.bucket_counts.clone(), l.bucket_sum_ns.clone()))
                .collect(),
            last_write: self.last_write_unix.iter().map(|(c, t)| (c.clone(), *t)).collect(),
        }
    }

    /// Goes on from `saved`; its latency histograms are handed to this
    /// agent's histogram instrument with the first snapshot, as if the
    /// calls were new, so the exported histogram goes on too.
    fn restore(saved: SavedTarget) -> PerTarget {
        let mut per = PerTarget { name: saved.name, ..PerTarget::default() };
        for (class, call, bytes, calls) in saved.writes {
            if let Some(call) = known(&WRITE_CALLS, &call) {
                per.writes_by_call.insert((class, call), ClassWrites { bytes, calls });
            }
        }
        for (class, call, n) in saved.syncs {
            if let Some(call) = known(&SYNC_CALLS, &call) {
                per.sync_counts.insert((class, call), n);
            }
        }
        for (class, call, n) in saved.sync_errors {
            if let Some(call) = known(&SYNC_CALLS, &call) {
                per.sync_errors.insert((class, call), n);
            }
        }
        for (class, call, counts, sums) in saved.latency {
            let Some(call) = known(&SYNC_CALLS, &call) else { continue };
            // a build with other slots cannot go on from these
            if counts.len() != abi::DISK_SYNC_SLOTS || sums.len() != abi::DISK_SYNC_SLOTS {
                continue;
            }
            let mut lat = SyncLatency::empty();
            for (slot, (&count, &sum_ns)) in counts.iter().zip(&sums).enumerate() {
                lat.bucket_counts[slot] = count;
                lat.bucket_sum_ns[slot] = sum_ns;
                lat.count += count;
                lat.sum_seconds += sum_ns as f64 * 1e-9;
                if count > 0 {
                    per.new_syncs.push(SyncSlotDelta { class: class.clone(), call, slot, count, sum_ns });
                }
            }
            per.syncs.insert((class, call), lat);
        }
        if !crate::state::replay_histogram("disk", &per.name, per.new_syncs.iter().map(|d| d.count).sum()) {
            per.new_syncs.clear();
            per.syncs.clear();
        }
        per.last_write_unix = saved.last_write.into_iter().collect();
        per
    }
}

/// Starts the signal for the collection loop, its instruments registered on
/// `meter` over `snapshot`: None when it is disabled or the kernel refuses a
/// hook (logged here, once).
pub fn start(
    config: &DiskConfig,
    meter: &opentelemetry::metrics::Meter,
    snapshot: Shared<DiskSnapshot>,
) -> Option<Box<dyn Signal>> {
    let metrics = metrics::DiskMetrics::register(meter, snapshot.clone());
    if !config.enabled {
        tracing::info!("disk signal off: disabled by disk.enabled");
        return None;
    }
    match DiskSignal::load(config) {
        Ok(signal) => Some(Box::new(Running { signal, metrics, snapshot, failures: Default::default() })),
        Err(e) => {
            tracing::error!("disk signal off: {e}; see `nodescope probes`");
            None
        }
    }
}

/// The signal as the loop drives it.
struct Running {
    signal: DiskSignal,
    metrics: metrics::DiskMetrics,
    snapshot: Shared<DiskSnapshot>,
    failures: crate::signal::FailureLog,
}

impl Signal for Running {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn save(&self) -> Option<serde_json::Value> {
        serde_json::to_value(self.signal.save()).ok()
    }

    fn restore(&mut self, saved: serde_json::Value) {
        match serde_json::from_value(saved) {
            Ok(saved) => self.signal.restore(saved),
            Err(e) => tracing::warn!("disk signal: the saved state is unreadable ({e}); its counters start from zero"),
        }
    }

    fn set_scope(&mut self, plan: &ScopePlan, _targets: &[Target]) {
        if let Err(e) = self.signal.set_scope(plan) {
            tracing::error!("disk signal: writing the watched set to the kernel: {e}");
        }
    }

    fn take_scope_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.signal.take_scope_events()
    }

    /// One interval: read, feed the histogram, publish.
    fn collect(&mut self, targets: &[Target], plan: &ScopePlan) {
        match self.signal.collect(targets, plan) {
            Ok(snap) => {
                self.metrics.record(&snap);
                self.snapshot.publish(snap);
                self.failures.worked("disk");
            }
            Err(e) => self.failures.failed("disk", &e),
        }
    }
}

/// (target, device, inode, pending tgid): a file of a target, whichever half it was read from.
type FileId = (u32, u32, u64, u32);

fn file_id(k: &abi::DiskKey) -> FileId {
    (k.target, k.dev, k.ino, k.tgid)
}

impl DiskSignal {
    pub fn load(config: &DiskConfig) -> Result<DiskSignal, DiskError> {
        let probe = DiskProbe::load(config)?;
        for (hook, reason) in probe.refused() {
            tracing::warn!(
                "disk signal: {hook} refused ({reason}): data dirs on that filesystem are reported not covered"
            );
        }
        tracing::info!("disk signal on: method {}", config.method.as_str());
        Ok(DiskSignal {
            coverage: CoverageTracker::new(config.method, probe.hooked()),
            probe,
            method: config.method,
            classifier: Classifier::new(&config.classes),
            targets: BTreeMap::new(),
            target_gone: 0,
            unattributed: 0,
            kernel_base: KernelStats::default(),
            restored: HashMap::new(),
        })
    }

    /// Every total, for the state file.
    pub fn save(&self) -> SavedDisk {
        let mut targets: BTreeMap<&str, SavedTarget> =
            self.restored.iter().map(|(name, t)| (name.as_str(), t.clone())).collect();
        for per in self.targets.values() {
            targets.insert(&per.name, per.save());
        }
        SavedDisk {
            targets: targets.into_values().collect(),
            target_gone: self.target_gone,
            unattributed: self.unattributed,
            kernel: self.kernel_base + self.probe.kernel_stats().unwrap_or_default(),
        }
    }

    /// Takes over what an earlier agent saved; a target's totals are
    /// applied when it is first collected.
    pub fn restore(&mut self, saved: SavedDisk) {
        tracing::info!(
            "disk signal: counters of {} target(s) taken over from the state file (writes made while no agent ran are not counted)",
            saved.targets.len()
        );
        self.target_gone += saved.target_gone;
        self.unattributed += saved.unattributed;
        self.kernel_base = saved.kernel;
        self.restored = saved.targets.into_iter().map(|t| (t.name.clone(), t)).collect();
    }

    /// Writes the scope plan to the kernel.
    pub fn set_scope(&mut self, plan: &ScopePlan) -> Result<(), crate::bpf::BpfError> {
        self.probe.set_scope(plan)
    }

    /// The exec events ring buffer of the scope programs.
    pub fn take_scope_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.probe.take_scope_events()
    }

    /// One interval: fold what the kernel counted since the last read into
    /// the totals.
    pub fn collect(&mut self, targets: &[Target], plan: &ScopePlan) -> Result<DiskSnapshot, DiskError> {
        for t in targets {
            // a slot freed by a forgotten target and taken by a new one starts afresh
            if self.targets.get(&t.index).is_none_or(|p| p.name != t.name) {
                let per = match self.restored.remove(&t.name) {
                    Some(saved) => PerTarget::restore(saved),
                    None => PerTarget { name: t.name.clone(), ..PerTarget::default() },
                };
                self.targets.insert(t.index, per);
            }
        }
        let drained = self.probe.drain()?;
        self.fold(drained, targets, plan);

        let now = unix_now();
        let mut snapshot = DiskSnapshot {
            targets: Vec::new(),
            available: true,
            method: self.method.as_str(),
            dropped: Dropped {
                kernel: self.kernel_base + self.probe.kernel_stats()?,
                target_gone: self.target_gone,
                unattributed: self.unattributed,
            },
        };
        for t in targets {
            let coverage = self.coverage.check(t);
            let per = self.targets.get_mut(&t.index).expect("inserted above");
            for class in per.grew.drain() {
                per.last_write_unix.insert(class, now);
            }
            snapshot.targets.push(TargetDisk {
                name: t.name.clone(),
                syncs: per.syncs.clone(),
                sync_counts: per.sync_counts.clone(),
                last_write_unix: per.last_write_unix.clone(),
                writes_by_call: per.writes_by_call.clone(),
                sync_errors: per.sync_errors.clone(),
                new_syncs: std::mem::take(&mut per.new_syncs),
                coverage,
            });
        }
        Ok(snapshot)
    }

    /// Adds one read's records and histograms to the totals.
    fn fold(&mut self, drained: probe::Drained, targets: &[Target], plan: &ScopePlan) {
        let by_index: HashMap<u32, &Target> = targets.iter().map(|t| (t.index, t)).collect();
        // A process the kernel saw exec under a node's name before the agent
        // knew which node (scope.bpf.h): its records are that node's.
        let assign = |key: &abi::DiskKey| match key.target {
            abi::TARGET_PENDING => plan.target_of_pid(key.tgid).unwrap_or(key.target),
            t => t,
        };
        // the class of each file read now, for its histograms below
        let mut class_of: HashMap<FileId, (String, bool)> = HashMap::new();
        for (key, file, rec) in &drained.records {
            let index = assign(key);
            let (Some(target), Some(per)) = (by_index.get(&index), self.targets.get_mut(&index)) else {
                self.target_gone += 1;
                continue;
            };
            let named = key.ino != 0 && file.flags & abi::DISK_F_NO_NAME == 0;
            let class = if named {
                self.classifier.classify(&target.name, target.chain, &file.components()).to_string()
            } else {
                OTHER.to_string()
            };
            for (call, name) in WRITE_CALLS.iter().enumerate() {
                let (bytes, calls) = (rec.bytes[call], rec.calls[call]);
                if bytes == 0 && calls == 0 {
                    continue;
                }
                let w = per.writes_by_call.entry((class.clone(), *name)).or_default();
                w.bytes += bytes;
                w.calls += calls;
                if bytes > 0 {
                    per.grew.insert(class.clone());
                }
                if !named {
                    self.unattributed += calls;
                }
            }
            for (call, name) in SYNC_CALLS.iter().enumerate() {
                let (n, errors) = (rec.syncs[call], rec.sync_errors[call]);
                if n > 0 {
                    *per.sync_counts.entry((class.clone(), *name)).or_default() += n;
                    if !named {
                        self.unattributed += n;
                    }
                }
                if errors > 0 {
                    *per.sync_errors.entry((class.clone(), *name)).or_default() += errors;
                }
            }
            class_of.insert(file_id(key), (class, named));
        }
        for (key, hist) in &drained.syncs {
            let index = assign(&key.file);
            let Some(per) = self.targets.get_mut(&index).filter(|_| by_index.contains_key(&index)) else {
                self.target_gone += 1;
                continue;
            };
            let Some(call) = SYNC_CALLS.get(key.call as usize).copied() else { continue };
            // the record is taken in the same read; missing only when the
            // records map refused it (counted by the kernel as files_full)
            let (class, named) =
                class_of.get(&file_id(&key.file)).cloned().unwrap_or_else(|| (OTHER.to_string(), false));
            let lat = per.syncs.entry((class.clone(), call)).or_insert_with(SyncLatency::empty);
            for slot in 0..abi::DISK_SYNC_SLOTS {
                let (count, sum_ns) = (hist.count[slot], hist.sum_ns[slot]);
                if count == 0 {
                    continue;
                }
                lat.bucket_counts[slot] += count;
                lat.bucket_sum_ns[slot] += sum_ns;
                lat.count += count;
                lat.sum_seconds += sum_ns as f64 * 1e-9;
                per.new_syncs.push(SyncSlotDelta { class: class.clone(), call, slot, count, sum_ns });
            }
            if !named && !class_of.contains_key(&file_id(&key.file)) {
                self.unattributed += hist.count.iter().sum::<u64>() + hist.errors;
            }
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_follow_the_kernel_slots() {
        let b = bucket_bounds_seconds();
        assert_eq!(b.len(), abi::DISK_SYNC_SLOTS - 1);
        assert!((b[0] - 2e-6).abs() < 1e-15);
        assert!((b[9] - 1024e-6).abs() < 1e-12);
        assert!(b.windows(2).all(|w| w[1] == 2.0 * w[0]));
    }

    #[test]
    fn components_come_root_first() {
        let mut f = abi::DiskFile::default();
        for (i, n) in ["blk00000.dat", "blocks", "regtest", "/"].iter().enumerate() {
            f.names[i][..n.len()].copy_from_slice(n.as_bytes());
        }
        f.depth = 4;
        assert_eq!(f.components(), vec!["regtest", "blocks", "blk00000.dat"]);
    }

    #[test]
    fn saved_totals_come_back_and_the_histogram_is_replayed() {
        let mut per = PerTarget { name: "ltc".into(), ..PerTarget::default() };
        per.writes_by_call.insert(("blocks".into(), "pwrite64"), ClassWrites { bytes: 4096, calls: 2 });
        per.sync_counts.insert(("blocks".into(), "fdatasync"), 7);
        per.sync_errors.insert(("log".into(), "fsync"), 1);
        let mut lat = SyncLatency::empty();
        lat.bucket_counts[3] = 5;
        lat.bucket_sum_ns[3] = 5 * 12_000;
        lat.count = 5;
        per.syncs.insert(("blocks".into(), "fdatasync"), lat);
        per.last_write_unix.insert("blocks".into(), 1_700_000_000);
        let json = serde_json::to_string(&per.save()).unwrap();
        let back = PerTarget::restore(serde_json::from_str(&json).unwrap());
        assert_eq!(back.writes_by_call, per.writes_by_call);
        assert_eq!(back.sync_counts, per.sync_counts);
        assert_eq!(back.sync_errors, per.sync_errors);
        assert_eq!(back.last_write_unix, per.last_write_unix);
        let l = &back.syncs[&("blocks".to_string(), "fdatasync")];
        assert_eq!((l.count, l.bucket_counts[3], l.bucket_sum_ns[3]), (5, 5, 60_000));
        assert!((l.sum_seconds - 60e-6).abs() < 1e-12);
        // what the histogram instrument is fed with the first snapshot
        assert_eq!(
            back.new_syncs,
            vec![SyncSlotDelta { class: "blocks".into(), call: "fdatasync", slot: 3, count: 5, sum_ns: 60_000 }]
        );
    }

    #[test]
    fn calls_this_build_does_not_know_are_dropped() {
        let saved = SavedTarget {
            name: "t".into(),
            writes: vec![("blocks".into(), "write".into(), 10, 1), ("blocks".into(), "teleport".into(), 99, 9)],
            latency: vec![("blocks".into(), "fsync".into(), vec![1, 2], vec![3, 4])],
            ..SavedTarget::default()
        };
        let back = PerTarget::restore(saved);
        assert_eq!(back.writes_by_call.len(), 1);
        assert!(back.syncs.is_empty(), "a histogram of other slots is not taken");
    }
}

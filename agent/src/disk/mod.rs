//! The disk signal: bytes and calls the node writes, by file class, and its
//! sync calls with their latency (disk.bpf.c on syscall tracepoints).
//!
//! `probe` owns the kernel side; this module folds its per-file records into
//! per-class totals once per interval (`DiskSignal::collect`); `classes` says
//! which class a path is; `metrics` exports snapshots. docs/disk.md has the
//! design and its limits.

pub mod classes;
pub mod metrics;
pub mod probe;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use crate::bpf::abi;
use crate::config::DiskConfig;
use crate::scope::ScopePlan;
use crate::target::Target;
use classes::{Classifier, OTHER};
use probe::{DiskError, DiskProbe, KernelStats};

/// Cumulative since the agent started, per target.
#[derive(Debug, Clone, Default)]
pub struct DiskSnapshot {
    pub targets: Vec<TargetDisk>,
    /// False when the signal is off (kernel feature missing): rules read it as unknown.
    pub available: bool,
    /// What the signal could not count, and why.
    pub dropped: Dropped,
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
    /// (class, write call: "write" | "pwrite64" | "writev" | "pwritev" | "pwritev2") -> totals;
    /// `classes` is its sum over calls.
    pub writes_by_call: BTreeMap<(String, &'static str), ClassWrites>,
    /// (class, sync call) -> sync calls that returned an error (not in `syncs`)
    pub sync_errors: BTreeMap<(String, &'static str), u64>,
    /// Sync calls that completed in this interval only, per histogram slot:
    /// what the latency histogram instrument records.
    pub new_syncs: Vec<SyncSlotDelta>,
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
    pub sum_seconds: f64,
    pub count: u64,
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
    /// Sync calls whose file could not be identified, counted as class "other".
    pub unattributed: u64,
}

pub const WRITE_CALLS: [&str; abi::DISK_WRITE_CALLS] = ["write", "pwrite64", "writev", "pwritev", "pwritev2"];
pub const SYNC_CALLS: [&str; abi::DISK_SYNC_CALLS] = ["fsync", "fdatasync", "msync", "sync_file_range"];

/// Upper bounds of the latency buckets: kernel slot i holds calls of
/// [2^i, 2^(i+1)) microseconds, so its bound is 2^(i+1) us; the last slot is
/// open-ended (+Inf).
pub fn bucket_bounds_seconds() -> Vec<f64> {
    (0..abi::DISK_SYNC_SLOTS - 1).map(|i| (1u64 << (i + 1)) as f64 * 1e-6).collect()
}

/// What the agent knows of one kernel file record between reads.
struct FileState {
    class: String,
    bytes: [u64; abi::DISK_WRITE_CALLS],
    calls: [u64; abi::DISK_WRITE_CALLS],
}

/// A closed file's class, kept while late sync counts may still arrive.
struct ClosedFile {
    class: String,
    round: u64,
}

struct SyncState {
    class: String,
    /// False when the file could not be identified: its calls, counted as
    /// class "other", also count as unattributed.
    attributed: bool,
    last: abi::DiskSyncHist,
}

#[derive(Default)]
struct PerTarget {
    name: String,
    writes_by_call: BTreeMap<(String, &'static str), ClassWrites>,
    syncs: BTreeMap<(String, &'static str), SyncLatency>,
    sync_errors: BTreeMap<(String, &'static str), u64>,
    last_write_unix: BTreeMap<String, u64>,
    grew: HashSet<String>,
    new_syncs: Vec<SyncSlotDelta>,
}

pub struct DiskSignal {
    probe: DiskProbe,
    classifier: Classifier,
    files: HashMap<u64, FileState>,
    closed: HashMap<u64, ClosedFile>,
    syncs: HashMap<abi::DiskSyncKey, SyncState>,
    targets: BTreeMap<u32, PerTarget>,
    round: u64,
    target_gone: u64,
    unattributed: u64,
    last_error: Option<String>,
}

/// Starts the signal for `agent::run`: None when it is disabled or the
/// kernel refuses a hook (logged here, once).
pub fn start(config: &DiskConfig) -> Option<DiskSignal> {
    if !config.enabled {
        tracing::info!("disk signal off: disabled by disk.enabled");
        return None;
    }
    match DiskSignal::load(config) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!("disk signal off: {e}; see `nodescope probes`");
            None
        }
    }
}

/// One interval of the collection loop: read, feed the histogram, publish.
pub fn collect_into(
    signal: &mut Option<DiskSignal>,
    targets: &[Target],
    plan: &ScopePlan,
    metrics: &metrics::DiskMetrics,
    shared: &crate::snapshot::Shared<DiskSnapshot>,
) {
    let Some(signal) = signal.as_mut() else { return };
    match signal.collect(targets, plan) {
        Ok(snap) => {
            metrics.record(&snap);
            shared.publish(snap);
            signal.last_error = None;
        }
        Err(e) => {
            // once per distinct failure, not every interval
            let msg = e.to_string();
            if signal.last_error.as_deref() != Some(msg.as_str()) {
                tracing::error!("disk collection failed: {msg}");
                signal.last_error = Some(msg);
            }
        }
    }
}

impl DiskSignal {
    pub fn load(config: &DiskConfig) -> Result<DiskSignal, DiskError> {
        Ok(DiskSignal {
            probe: DiskProbe::load(config)?,
            classifier: Classifier::new(&config.classes),
            files: HashMap::new(),
            closed: HashMap::new(),
            syncs: HashMap::new(),
            targets: BTreeMap::new(),
            round: 0,
            target_gone: 0,
            unattributed: 0,
            last_error: None,
        })
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
        self.round += 1;
        // A process the kernel saw exec under a node's name before the agent
        // knew which node (scope.bpf.h): its records are that node's.
        let assign = |target: u32, tgid: u32| match target {
            abi::TARGET_PENDING => plan.target_of_pid(tgid).unwrap_or(target),
            t => t,
        };
        let by_index: HashMap<u32, &Target> = targets.iter().map(|t| (t.index, t)).collect();
        for t in targets {
            // a slot freed by a forgotten target and taken by a new one starts afresh
            if self.targets.get(&t.index).is_none_or(|p| p.name != t.name) {
                self.targets.insert(t.index, PerTarget { name: t.name.clone(), ..PerTarget::default() });
            }
        }

        // Sync histograms first: the record of every file they name was
        // made before them, so the reads below find it. Then open files,
        // then closed ones: a file closed in between is found among the
        // closed, with its final counts.
        // (sync histograms are keyed by target: the few syncs of a process in
        // the moment before the agent resolved it are not reassigned)
        let syncs = self.probe.syncs()?;
        let open: Vec<(abi::DiskFdKey, abi::DiskFile)> = self
            .probe
            .open_files()?
            .into_iter()
            .map(|(k, mut f)| {
                f.target = assign(f.target, f.tgid);
                (k, f)
            })
            .collect();
        let mut seen: HashSet<u64> = HashSet::with_capacity(open.len());
        let mut alive: HashMap<u32, bool> = HashMap::new();
        for (key, rec) in &open {
            // The process exited: its fds closed without close(2), and
            // nothing else frees their keys, sockets' and pipes' included.
            let exited = !*alive.entry(rec.tgid).or_insert_with(|| process_alive(rec.tgid));
            if rec.flags & abi::DISK_F_NOT_FILE != 0 {
                // nothing was counted through it: only its key to free
                if exited || !by_index.contains_key(&rec.target) {
                    self.probe.forget_open(key)?;
                }
                continue;
            }
            seen.insert(rec.id);
            let counted = self.fold(rec, &by_index);
            if exited || !counted {
                self.probe.forget_open(key)?;
                self.retire(rec.id);
            }
        }
        for mut rec in self.probe.take_closed()? {
            rec.target = assign(rec.target, rec.tgid);
            self.fold(&rec, &by_index);
            self.retire(rec.id);
        }
        // Records neither open nor closed: retired while the closed map was
        // full (counted by the kernel); their last counts are lost.
        self.files.retain(|id, _| seen.contains(id));

        self.fold_syncs(syncs, &by_index, &mut alive)?;
        // A closed file's class is needed until its late syncs are read.
        let round = self.round;
        self.closed.retain(|_, c| c.round + 1 >= round);

        let now = unix_now();
        let mut snapshot = DiskSnapshot {
            targets: Vec::new(),
            available: true,
            dropped: Dropped { kernel: self.probe.kernel_stats()?, target_gone: self.target_gone, unattributed: self.unattributed },
        };
        for t in targets {
            let per = self.targets.get_mut(&t.index).expect("inserted above");
            for class in per.grew.drain() {
                per.last_write_unix.insert(class, now);
            }
            let mut classes: BTreeMap<String, ClassWrites> = BTreeMap::new();
            for ((class, _), w) in &per.writes_by_call {
                let c = classes.entry(class.clone()).or_default();
                c.bytes += w.bytes;
                c.calls += w.calls;
            }
            snapshot.targets.push(TargetDisk {
                name: t.name.clone(),
                classes,
                syncs: per.syncs.clone(),
                last_write_unix: per.last_write_unix.clone(),
                writes_by_call: per.writes_by_call.clone(),
                sync_errors: per.sync_errors.clone(),
                new_syncs: std::mem::take(&mut per.new_syncs),
            });
        }
        Ok(snapshot)
    }

    /// Adds what a record counted since it was last read. False when its
    /// target went away: nothing to report it under, and the caller drops it.
    fn fold(&mut self, rec: &abi::DiskFile, by_index: &HashMap<u32, &Target>) -> bool {
        let (Some(target), Some(per)) = (by_index.get(&rec.target), self.targets.get_mut(&rec.target)) else {
            self.target_gone += 1;
            return false;
        };
        let state = self.files.entry(rec.id).or_insert_with(|| FileState {
            class: self.classifier.classify(&target.name, target.chain, &rec.components()).to_string(),
            bytes: [0; abi::DISK_WRITE_CALLS],
            calls: [0; abi::DISK_WRITE_CALLS],
        });
        for (call, name) in WRITE_CALLS.iter().enumerate() {
            let bytes = rec.bytes[call].saturating_sub(state.bytes[call]);
            let calls = rec.calls[call].saturating_sub(state.calls[call]);
            state.bytes[call] = state.bytes[call].max(rec.bytes[call]);
            state.calls[call] = state.calls[call].max(rec.calls[call]);
            if calls == 0 && bytes == 0 {
                continue;
            }
            let w = per.writes_by_call.entry((state.class.clone(), *name)).or_default();
            w.bytes += bytes;
            w.calls += calls;
            if bytes > 0 {
                per.grew.insert(state.class.clone());
            }
        }
        true
    }

    fn retire(&mut self, id: u64) {
        let class = self.files.remove(&id).map(|s| s.class);
        if let Some(class) = class {
            self.closed.insert(id, ClosedFile { class, round: self.round });
        }
    }

    fn fold_syncs(
        &mut self,
        syncs: Vec<(abi::DiskSyncKey, abi::DiskSyncHist)>,
        by_index: &HashMap<u32, &Target>,
        alive: &mut HashMap<u32, bool>,
    ) -> Result<(), DiskError> {
        let mut maps_cache: HashMap<u32, Vec<Mapping>> = HashMap::new();
        let mut finished = Vec::new();
        for (key, hist) in syncs {
            let call = SYNC_CALLS.get(usize::from(key.call)).copied().unwrap_or("fsync");
            let Some(target) = by_index.get(&u32::from(key.target)) else {
                if !self.syncs.contains_key(&key) {
                    self.target_gone += 1;
                }
                self.syncs.remove(&key);
                finished.push(key);
                continue;
            };
            let state = match self.syncs.get_mut(&key) {
                Some(s) => s,
                None => {
                    let class = if key.call == abi::DISK_MSYNC {
                        let maps = maps_cache.entry(key.tgid).or_insert_with(|| read_maps(key.tgid));
                        mapped_class(&self.classifier, target, maps, key.file)
                    } else {
                        self.files.get(&key.file).map(|f| f.class.clone()).or_else(|| self.closed.get(&key.file).map(|c| c.class.clone()))
                    };
                    self.syncs.entry(key).or_insert(SyncState {
                        attributed: class.is_some(),
                        class: class.unwrap_or_else(|| OTHER.to_string()),
                        last: abi::DiskSyncHist::default(),
                    })
                }
            };
            let per = self.targets.get_mut(&u32::from(key.target)).expect("every current target has an entry");
            let lat = per.syncs.entry((state.class.clone(), call)).or_insert_with(|| SyncLatency {
                bounds_seconds: bucket_bounds_seconds(),
                bucket_counts: vec![0; abi::DISK_SYNC_SLOTS],
                sum_seconds: 0.0,
                count: 0,
            });
            for slot in 0..abi::DISK_SYNC_SLOTS {
                let count = hist.count[slot].saturating_sub(state.last.count[slot]);
                let sum_ns = hist.sum_ns[slot].saturating_sub(state.last.sum_ns[slot]);
                if count == 0 {
                    continue;
                }
                lat.bucket_counts[slot] += count;
                lat.count += count;
                lat.sum_seconds += sum_ns as f64 * 1e-9;
                per.new_syncs.push(SyncSlotDelta { class: state.class.clone(), call, slot, count, sum_ns });
            }
            let errors = hist.errors.saturating_sub(state.last.errors);
            if errors > 0 {
                *per.sync_errors.entry((state.class.clone(), call)).or_default() += errors;
            }
            if !state.attributed {
                let calls: u64 = (0..abi::DISK_SYNC_SLOTS).map(|s| hist.count[s].saturating_sub(state.last.count[s])).sum();
                self.unattributed += calls + errors;
            }
            state.last = hist;

            // Done with it: its file was closed in an earlier round (so no
            // late call can still land), or its process is gone.
            let done = if key.call == abi::DISK_MSYNC {
                !*alive.entry(key.tgid).or_insert_with(|| process_alive(key.tgid))
            } else {
                !self.files.contains_key(&key.file) && self.closed.get(&key.file).is_none_or(|c| c.round < self.round)
            };
            if done {
                self.syncs.remove(&key);
                finished.push(key);
            }
        }
        for key in finished {
            self.probe.forget_sync(&key)?;
        }
        Ok(())
    }
}

fn process_alive(tgid: u32) -> bool {
    Path::new("/proc").join(tgid.to_string()).exists()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// One line of /proc/PID/maps that maps a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    path: String,
}

fn read_maps(tgid: u32) -> Vec<Mapping> {
    std::fs::read_to_string(format!("/proc/{tgid}/maps")).map(|t| parse_maps(&t)).unwrap_or_default()
}

fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            // start-end perms offset dev inode   path (which may hold spaces)
            let mut fields = line.splitn(6, ' ');
            let (start, end) = fields.next()?.split_once('-')?;
            let path = fields.nth(4)?.trim_start();
            let path = path.strip_suffix(" (deleted)").unwrap_or(path);
            if !path.starts_with('/') {
                return None;
            }
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                path: path.to_string(),
            })
        })
        .collect()
}

/// The class of the file mapped at `addr` (msync's address), if any.
fn mapped_class(classifier: &Classifier, target: &Target, maps: &[Mapping], addr: u64) -> Option<String> {
    let m = maps.iter().find(|m| m.start <= addr && addr < m.end)?;
    let parts: Vec<&str> = m.path.split('/').filter(|c| !c.is_empty()).collect();
    Some(classifier.classify(&target.name, target.chain, &parts).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines() {
        let text = "\
55d0c0a00000-55d0c0a21000 r--p 00000000 08:01 1234                       /usr/bin/monerod
7fac59a00000-7fac9a000000 rw-s 00000000 00:2a 98765                      /srv/x/fake/lmdb/data.mdb
7fac9a000000-7fac9a021000 rw-p 00000000 00:00 0 
7ffd1c7e0000-7ffd1c801000 rw-p 00000000 00:00 0                          [stack]
7fac9b000000-7fac9b001000 rw-s 00000000 00:2a 5555                       /tmp/with space/a.mdb (deleted)
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 3);
        assert_eq!(maps[1], Mapping { start: 0x7fac59a00000, end: 0x7fac9a000000, path: "/srv/x/fake/lmdb/data.mdb".into() });
        assert_eq!(maps[2].path, "/tmp/with space/a.mdb");
    }

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
}

//! Loads the disk signal's object for the configured method, attaches its
//! hooks, tells it which processes to watch, and takes its records.
//!
//! `filesystem` (the default, `disk.bpf.c`): tp_btf hooks on the ext4, xfs,
//! iomap and writeback tracepoints. They are grouped by filesystem: a kernel
//! without xfs's tracepoints still counts ext4, and the data dirs on xfs are
//! reported as not covered. `syscalls` (`disk_syscalls.bpf.c`): syscall
//! tracepoints, every filesystem, at a cost to every syscall on the host.

use std::time::Duration;

use aya::programs::{BtfTracePoint, TracePoint};
use aya::Ebpf;

use crate::bpf::{self, abi, BpfError, HookStatus};
use crate::config::{DiskConfig, DiskMethod};
use crate::scope::ScopePlan;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// The kernel refused a hook the method cannot do without: the signal is off.
    #[error("hook {hook}: {reason}")]
    Hook { hook: String, reason: String },
    #[error("reading {map}: {source}")]
    Read { map: &'static str, source: std::io::Error },
}

/// Which filesystems a group of filesystem hooks serves; `None`: every
/// filesystem (the group is needed by all).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group {
    All,
    Ext4,
    Xfs,
}

/// (program, tp_btf tracepoint, group) of the filesystem method. Exits before
/// enters: a sync whose enter is seen has its exit seen too.
pub const FS_HOOKS: &[(&str, &str, Group)] = &[
    ("on_iomap_dio_rw_begin", "iomap_dio_rw_begin", Group::All),
    ("on_dirty_folio", "writeback_dirty_folio", Group::All),
    ("on_ext4_da_write_end", "ext4_da_write_end", Group::Ext4),
    ("on_ext4_write_end", "ext4_write_end", Group::Ext4),
    ("on_ext4_journalled_write_end", "ext4_journalled_write_end", Group::Ext4),
    ("on_ext4_sync_exit", "ext4_sync_file_exit", Group::Ext4),
    ("on_ext4_sync_enter", "ext4_sync_file_enter", Group::Ext4),
    ("on_xfs_buffered_write", "xfs_file_buffered_write", Group::Xfs),
    ("on_xfs_file_fsync", "xfs_file_fsync", Group::Xfs),
    ("on_xfs_dir_fsync", "xfs_dir_fsync", Group::Xfs),
];

/// (program, tracepoint category, tracepoint) of the syscall method. The two
/// exit programs are shared by the calls of their kind: the enter side noted
/// which call it was. Exits before enters.
pub const SYSCALL_HOOKS: &[(&str, &str, &str)] = &[
    ("on_write_exit", "syscalls", "sys_exit_write"),
    ("on_write_exit", "syscalls", "sys_exit_pwrite64"),
    ("on_write_exit", "syscalls", "sys_exit_writev"),
    ("on_write_exit", "syscalls", "sys_exit_pwritev"),
    ("on_write_exit", "syscalls", "sys_exit_pwritev2"),
    ("on_sync_exit", "syscalls", "sys_exit_fsync"),
    ("on_sync_exit", "syscalls", "sys_exit_fdatasync"),
    ("on_sync_exit", "syscalls", "sys_exit_msync"),
    ("on_sync_exit", "syscalls", "sys_exit_sync_file_range"),
    ("on_write_enter", "syscalls", "sys_enter_write"),
    ("on_pwrite64_enter", "syscalls", "sys_enter_pwrite64"),
    ("on_writev_enter", "syscalls", "sys_enter_writev"),
    ("on_pwritev_enter", "syscalls", "sys_enter_pwritev"),
    ("on_pwritev2_enter", "syscalls", "sys_enter_pwritev2"),
    ("on_fsync_enter", "syscalls", "sys_enter_fsync"),
    ("on_fdatasync_enter", "syscalls", "sys_enter_fdatasync"),
    ("on_msync_enter", "syscalls", "sys_enter_msync"),
    ("on_sync_file_range_enter", "syscalls", "sys_enter_sync_file_range"),
];

const FILES: &str = "ns_disk_files";
const COUNTS: &str = "ns_disk_counts";
const ALLOC: &str = "ns_disk_alloc";
const PENDING: &str = "ns_disk_pending";
const SYNCS: &str = "ns_disk_syncs";
const EPOCH: &str = "ns_disk_epoch";
const STATS: &str = "ns_disk_stats";
const SCOPE_GEN: &str = "ns_disk_scope_gen";
/// Make a task's remembered scope verdict stale (disk_records.bpf.h): at
/// exec, and when any task moves to another cgroup. Attached after the
/// scope programs, so they run after the scope's own exec hook.
const SCOPE_HOOKS: &[(&str, &str)] =
    &[("disk_scope_exec", "sched_process_exec"), ("disk_scope_attach", "cgroup_attach_task")];

/// Without an RCU barrier (a kernel that refuses the array of maps), how
/// long the agent waits after advancing the round before it reads the half
/// it left: programs that read the old round run for microseconds and
/// never sleep.
const QUIESCE: Duration = Duration::from_millis(10);

/// Which filesystems the attached hooks count, for the coverage report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooked {
    pub ext4: bool,
    pub xfs: bool,
    /// The syscall method: every filesystem.
    pub any: bool,
}

pub struct DiskProbe {
    ebpf: Ebpf,
    /// The round the programs write (its low bit is the half); starts at 1,
    /// so a task's remembered slot of round 0 means none.
    round: u32,
    /// Waits out the programs still in the old half (None: sleep QUIESCE).
    barrier: Option<bpf::RcuBarrier>,
    /// Count slots per half (disk.max_files).
    per_half: u32,
    hooked: Hooked,
    /// Hooks of a filesystem group the kernel refused (hook, reason).
    refused: Vec<(String, String)>,
    /// What ns_disk_scope_gen holds.
    scope_gen: u64,
    /// The scope programs' attachments.
    _links: Vec<bpf::pins::HeldLink>,
}

/// The kernel side's loss counters (summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KernelStats {
    pub files_full: u64,
    pub syncs_full: u64,
    pub inflight_full: u64,
}

impl std::ops::Add for KernelStats {
    type Output = KernelStats;
    fn add(self, o: KernelStats) -> KernelStats {
        KernelStats {
            files_full: self.files_full + o.files_full,
            syncs_full: self.syncs_full + o.syncs_full,
            inflight_full: self.inflight_full + o.inflight_full,
        }
    }
}

/// What one read took from the kernel: every file and histogram of the
/// half the programs no longer write.
#[derive(Debug, Default)]
pub struct Drained {
    pub records: Vec<(abi::DiskKey, abi::DiskFile, abi::DiskCounts)>,
    pub syncs: Vec<(abi::DiskSyncKey, abi::DiskSyncHist)>,
}

fn object(method: DiskMethod) -> (&'static str, &'static [u8]) {
    match method {
        DiskMethod::Filesystem => ("disk.bpf.o", bpf::DISK_OBJ),
        DiskMethod::Syscalls => ("disk_syscalls.bpf.o", bpf::DISK_SYSCALLS_OBJ),
    }
}

/// Loads the method's object with maps sized from the config. Its task
/// storage map (the per-task scope verdicts) is one aya 0.14 creates but
/// has no user-space type for, which the agent never reads anyway.
/// The disk signal's maps are not kept across restarts (its counts since the
/// last read are lost with the agent): one generation, always active.
const DISK_GENERATION: u32 = 1;

/// The loader parses the kernel's BTF itself and frees it on return (a
/// kernel without BTF still loads the syscall method's tracepoints): the
/// caller parses its own for attaching after this, never both at once.
fn load_object(method: DiskMethod, config: &DiskConfig) -> Result<Ebpf, BpfError> {
    let (object, bytes) = object(method);
    aya::EbpfLoader::new()
        .map_max_entries(FILES, 2 * config.max_files)
        .map_max_entries(COUNTS, 2 * config.max_files)
        .map_max_entries(SYNCS, config.max_syncs)
        .override_global("ns_generation", &DISK_GENERATION, true)
        .allow_unsupported_maps()
        .load(bytes)
        .map_err(|source| BpfError::Load { object, source })
}

fn attach_btf(ebpf: &mut Ebpf, btf: &aya::Btf, program: &'static str, hook: &str) -> Result<(), String> {
    let p: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or(BpfError::MissingProgram(program))
        .and_then(|p| p.try_into().map_err(|source| BpfError::Program { program, source }))
        .map_err(|e| e.to_string())?;
    p.load(hook, btf).map_err(|source| BpfError::Program { program, source }.to_string())?;
    p.attach().map(drop).map_err(|source| BpfError::Program { program, source }.to_string())
}

/// Attaches every filesystem hook; `report` hears each outcome. A group
/// with a refused hook is detached as a whole (unloading its programs), so
/// no filesystem is half counted.
fn attach_fs(
    ebpf: &mut Ebpf,
    btf: &aya::Btf,
    mut report: impl FnMut(&'static str, &'static str, Group, Result<(), String>),
) -> Hooked {
    let mut failed: Vec<Group> = Vec::new();
    for &(program, hook, group) in FS_HOOKS {
        let r = attach_btf(ebpf, btf, program, hook);
        if r.is_err() && !failed.contains(&group) {
            failed.push(group);
        }
        report(program, hook, group, r);
    }
    for &(program, _, group) in FS_HOOKS {
        if failed.contains(&group) {
            if let Some(p) = ebpf.program_mut(program).and_then(|p| <&mut BtfTracePoint>::try_from(p).ok()) {
                let _ = p.unload();
            }
        }
    }
    Hooked { ext4: !failed.contains(&Group::Ext4), xfs: !failed.contains(&Group::Xfs), any: false }
}

fn tracepoint<'a>(ebpf: &'a mut Ebpf, program: &'static str) -> Result<&'a mut TracePoint, BpfError> {
    ebpf.program_mut(program)
        .ok_or(BpfError::MissingProgram(program))?
        .try_into()
        .map_err(|source| BpfError::Program { program, source })
}

/// Loads each syscall program once, then attaches every hook; stops at the
/// first failure unless `keep_going`.
fn attach_syscalls(
    ebpf: &mut Ebpf,
    keep_going: bool,
    mut report: impl FnMut(&'static str, &'static str, &'static str, Result<(), String>),
) -> Result<(), DiskError> {
    let mut loaded: Vec<(&str, Result<(), String>)> = Vec::new();
    for &(program, category, name) in SYSCALL_HOOKS {
        let load_result = match loaded.iter().find(|(p, _)| *p == program) {
            Some((_, r)) => r.clone(),
            None => {
                let r = tracepoint(ebpf, program)
                    .and_then(|p| p.load().map_err(|source| BpfError::Program { program, source }))
                    .map_err(|e| e.to_string());
                loaded.push((program, r.clone()));
                r
            }
        };
        let result = load_result.and_then(|()| {
            tracepoint(ebpf, program)
                .and_then(|p| {
                    p.attach(category, name).map(drop).map_err(|source| BpfError::Program { program, source })
                })
                .map_err(|e| e.to_string())
        });
        report(program, category, name, result.clone());
        if let (Err(reason), false) = (result, keep_going) {
            return Err(DiskError::Hook { hook: format!("tracepoint/{category}/{name}"), reason });
        }
    }
    Ok(())
}

impl DiskProbe {
    /// Loads the method's programs and attaches its hooks. The filesystem
    /// method needs its common hooks (direct I/O, dirtied folios) and at
    /// least one filesystem's; the syscall method needs every hook (a
    /// partial set would count some calls and not others).
    pub fn load(config: &DiskConfig) -> Result<DiskProbe, DiskError> {
        let mut ebpf = load_object(config.method, config)?;
        let btf = bpf::kernel_btf()?;
        let mut refused = Vec::new();
        let hooked = match config.method {
            DiskMethod::Filesystem => {
                let mut common_failed = None;
                let hooked = attach_fs(&mut ebpf, &btf, |_, hook, group, r| {
                    if let Err(reason) = r {
                        if group == Group::All && common_failed.is_none() {
                            common_failed = Some((hook, reason.clone()));
                        }
                        refused.push((format!("tp_btf/{hook}"), reason));
                    }
                });
                if let Some((hook, reason)) = common_failed {
                    return Err(DiskError::Hook { hook: format!("tp_btf/{hook}"), reason });
                }
                if !hooked.ext4 && !hooked.xfs {
                    let (hook, reason) = refused.first().cloned().unwrap_or_default();
                    return Err(DiskError::Hook {
                        hook,
                        reason: format!("{reason} (neither ext4's nor xfs's hooks attach)"),
                    });
                }
                hooked
            }
            DiskMethod::Syscalls => {
                bpf::ensure_tracefs()?;
                attach_syscalls(&mut ebpf, false, |_, _, _, _| {})?;
                Hooked { ext4: true, xfs: true, any: true }
            }
        };
        let links = crate::scope::attach(&mut ebpf, &btf)?;
        for &(program, hook) in SCOPE_HOOKS {
            attach_btf(&mut ebpf, &btf, program, hook)
                .map_err(|reason| DiskError::Hook { hook: format!("tp_btf/{hook}"), reason })?;
        }
        // every hook attached: the programs count from here
        let links = bpf::pins::activate(&mut ebpf, DISK_GENERATION, None, links)?;
        let barrier = bpf::RcuBarrier::new()
            .inspect_err(|e| tracing::warn!("disk signal: no RCU barrier ({e}); waiting {QUIESCE:?} per read instead"))
            .ok();
        let mut probe = DiskProbe {
            ebpf,
            round: 0,
            barrier,
            per_half: config.max_files,
            hooked,
            refused,
            scope_gen: 0,
            _links: links,
        };
        probe.set_alloc(abi::DISK_ALLOC_PER_HALF, u64::from(config.max_files))?;
        probe.set_round(1)?;
        Ok(probe)
    }

    pub fn hooked(&self) -> Hooked {
        self.hooked
    }

    /// Hooks of a filesystem group the kernel refused: that filesystem is
    /// not covered (the others are).
    pub fn refused(&self) -> &[(String, String)] {
        &self.refused
    }

    /// Writes the scope plan to this object's maps, then tells the programs
    /// that the verdicts they remember per task are stale.
    pub fn set_scope(&mut self, plan: &ScopePlan) -> Result<(), BpfError> {
        let applied = plan.apply(&mut self.ebpf, std::path::Path::new("/proc"));
        self.scope_gen += 1;
        let map = self.ebpf.map_mut(SCOPE_GEN).ok_or(BpfError::MissingMap(SCOPE_GEN))?;
        let mut gen: aya::maps::Array<&mut aya::maps::MapData, u64> =
            aya::maps::Array::try_from(map).map_err(|source| BpfError::Map { map: SCOPE_GEN, source })?;
        gen.set(0, self.scope_gen, 0).map_err(|source| BpfError::Map { map: SCOPE_GEN, source })?;
        applied
    }

    /// The exec events ring buffer of the scope programs.
    pub fn take_scope_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        aya::maps::RingBuf::try_from(self.ebpf.take_map(crate::scope::EVENTS)?).ok()
    }

    fn set_round(&mut self, round: u32) -> Result<(), BpfError> {
        let map = self.ebpf.map_mut(EPOCH).ok_or(BpfError::MissingMap(EPOCH))?;
        let mut array: aya::maps::Array<&mut aya::maps::MapData, u32> =
            aya::maps::Array::try_from(map).map_err(|source| BpfError::Map { map: EPOCH, source })?;
        array.set(0, round, 0).map_err(|source| BpfError::Map { map: EPOCH, source })?;
        self.round = round;
        Ok(())
    }

    fn set_alloc(&mut self, index: u32, value: u64) -> Result<(), BpfError> {
        let map = self.ebpf.map_mut(ALLOC).ok_or(BpfError::MissingMap(ALLOC))?;
        let mut array: aya::maps::Array<&mut aya::maps::MapData, u64> =
            aya::maps::Array::try_from(map).map_err(|source| BpfError::Map { map: ALLOC, source })?;
        array.set(index, value, 0).map_err(|source| BpfError::Map { map: ALLOC, source })
    }

    /// Points the programs at the other half, waits out those still in the
    /// old one, takes every file and histogram of it with their counts, and
    /// frees its count slots for its next turn.
    pub fn drain(&mut self) -> Result<Drained, DiskError> {
        let old = self.round & 1;
        // the half flips every time (u32::MAX is odd, 2 even); 0 stays unused
        self.set_round(if self.round == u32::MAX { 2 } else { self.round + 1 })?;
        match self.barrier.as_ref().map(bpf::RcuBarrier::wait) {
            Some(Ok(())) => {}
            Some(Err(e)) => {
                tracing::warn!("disk signal: RCU barrier failed ({e}); waiting {QUIESCE:?} per read instead");
                self.barrier = None;
                std::thread::sleep(QUIESCE);
            }
            None => std::thread::sleep(QUIESCE),
        }
        let files: Vec<(abi::DiskKey, abi::DiskFile)> =
            take_half(&self.ebpf, FILES, |k: &abi::DiskKey| k.epoch == old)?;
        let counts_map = self.ebpf.map(COUNTS).ok_or(BpfError::MissingMap(COUNTS))?;
        let counts: aya::maps::Array<&aya::maps::MapData, abi::DiskCounts> =
            aya::maps::Array::try_from(counts_map).map_err(|source| BpfError::Map { map: COUNTS, source })?;
        let mut records = Vec::with_capacity(files.len());
        for (key, file) in files {
            // a slot outside the half would be a kernel-side bug: skip it rather than misread
            if file.slot / self.per_half.max(1) != old {
                continue;
            }
            let c = counts.get(&file.slot, 0).map_err(|source| BpfError::Map { map: COUNTS, source })?;
            records.push((key, file, c));
        }
        self.take_pending(old, &mut records)?;
        let syncs = take_half(&self.ebpf, SYNCS, |k: &abi::DiskSyncKey| k.file.epoch == old)?;
        self.set_alloc(old, 0)?;
        Ok(Drained { records, syncs })
    }

    /// Adds what each CPU's pending counts of half `old` hold to the records
    /// of their slots, then empties them for the half's next turn (no
    /// program writes them until the round comes back to this half).
    fn take_pending(
        &mut self,
        old: u32,
        records: &mut [(abi::DiskKey, abi::DiskFile, abi::DiskCounts)],
    ) -> Result<(), DiskError> {
        let map = self.ebpf.map_mut(PENDING).ok_or(BpfError::MissingMap(PENDING))?;
        let mut pending: aya::maps::PerCpuArray<&mut aya::maps::MapData, abi::DiskPending> =
            aya::maps::PerCpuArray::try_from(map).map_err(|source| BpfError::Map { map: PENDING, source })?;
        let per_cpu = pending.get(&old, 0).map_err(|source| BpfError::Map { map: PENDING, source })?;
        if per_cpu.iter().all(|p| p.slot == 0) {
            return Ok(());
        }
        let cpus = per_cpu.len();
        for p in per_cpu.iter().filter(|p| p.slot != 0) {
            let (slot, call) = (p.slot - 1, p.call as usize);
            if call >= abi::DISK_WRITE_CALLS {
                continue;
            }
            // a slot is made with its file, so its record is here (a kernel-side bug otherwise: left out)
            if let Some((_, _, c)) = records.iter_mut().find(|(_, f, _)| f.slot == slot) {
                c.bytes[call] += p.bytes;
                c.calls[call] += p.calls;
            }
        }
        let empty = aya::maps::PerCpuValues::try_from(vec![abi::DiskPending::default(); cpus])
            .map_err(|source| DiskError::Read { map: PENDING, source })?;
        pending.set(old, empty, 0).map_err(|source| BpfError::Map { map: PENDING, source })?;
        Ok(())
    }

    pub fn kernel_stats(&self) -> Result<KernelStats, BpfError> {
        let sum = bpf::percpu_counters(&self.ebpf, STATS)?;
        Ok(KernelStats {
            files_full: sum(abi::DISK_STAT_FILES_FULL),
            syncs_full: sum(abi::DISK_STAT_SYNCS_FULL),
            inflight_full: sum(abi::DISK_STAT_INFLIGHT_FULL),
        })
    }
}

/// Takes every entry of hash map `name` whose key is in the half the
/// programs left, each with one atomic lookup-and-delete.
fn take_half<K: aya::Pod, V: aya::Pod>(
    ebpf: &Ebpf,
    name: &'static str,
    in_half: impl Fn(&K) -> bool,
) -> Result<Vec<(K, V)>, DiskError> {
    let data = match ebpf.map(name).ok_or(BpfError::MissingMap(name))? {
        aya::maps::Map::HashMap(d) => d,
        _ => return Err(BpfError::MissingMap(name).into()),
    };
    let map: aya::maps::HashMap<&aya::maps::MapData, K, V> =
        aya::maps::HashMap::try_from(ebpf.map(name).ok_or(BpfError::MissingMap(name))?)
            .map_err(|source| BpfError::Map { map: name, source })?;
    let keys: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| in_half(k)).collect();
    let mut out = Vec::with_capacity(keys.len());
    for key in keys {
        if let Some(value) =
            bpf::take_elem::<K, V>(data, &key).map_err(|source| DiskError::Read { map: name, source })?
        {
            out.push((key, value));
        }
    }
    Ok(out)
}

/// What `nodescope probes` reports for this signal: every hook of both
/// methods, attached for real in a fresh object, then released. The
/// syscall method's hooks are listed as signal `disk-syscalls` (an opt-in).
pub fn probe_hooks() -> Vec<HookStatus> {
    let mut out = Vec::new();
    let config = DiskConfig::default();

    let fs = load_object(DiskMethod::Filesystem, &config).and_then(|ebpf| Ok((bpf::kernel_btf()?, ebpf)));
    match fs {
        Err(e) => {
            for &(program, hook, _) in FS_HOOKS {
                out.push(HookStatus {
                    signal: "disk",
                    hook: format!("tp_btf/{hook}"),
                    program,
                    supported: false,
                    detail: e.to_string(),
                });
            }
        }
        Ok((btf, mut ebpf)) => {
            attach_fs(&mut ebpf, &btf, |program, hook, group, r| {
                let what = match group {
                    Group::All => "every filesystem",
                    Group::Ext4 => "ext4",
                    Group::Xfs => "xfs",
                };
                out.push(HookStatus {
                    signal: "disk",
                    hook: format!("tp_btf/{hook}"),
                    program,
                    supported: r.is_ok(),
                    detail: match r {
                        Ok(()) => format!("loaded and attached ({what})"),
                        Err(e) => format!("{e} ({what} not covered)"),
                    },
                });
            });
        }
    }

    let status = |program: &'static str, category: &str, name: &str, r: Result<(), String>| HookStatus {
        signal: "disk-syscalls",
        hook: format!("tracepoint/{category}/{name}"),
        program,
        supported: r.is_ok(),
        detail: r.err().unwrap_or_else(|| "loaded and attached (disk.method = \"syscalls\")".into()),
    };
    let syscalls = bpf::ensure_tracefs().and_then(|()| load_object(DiskMethod::Syscalls, &config));
    match syscalls {
        Err(e) => {
            for &(program, category, name) in SYSCALL_HOOKS {
                out.push(status(program, category, name, Err(e.to_string())));
            }
        }
        Ok(mut ebpf) => {
            let _ = attach_syscalls(&mut ebpf, true, |program, category, name, r| {
                out.push(status(program, category, name, r));
            });
        }
    }
    out
}

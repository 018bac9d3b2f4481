//! Loads `disk.bpf.c`, attaches its syscall tracepoints, tells it which
//! processes to watch and reads its maps.

use aya::programs::TracePoint;
use aya::Ebpf;

use crate::bpf::{self, abi, BpfError, HookStatus};
use crate::config::DiskConfig;
use crate::scope::ScopePlan;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error(transparent)]
    Bpf(#[from] BpfError),
    /// The kernel refused one of the hooks: the signal is off.
    #[error("hook {hook}: {reason}")]
    Hook { hook: String, reason: String },
}

/// Every (program, tracepoint category, tracepoint) the signal needs. The
/// two exit programs are shared by the calls of their kind: the enter side
/// already noted which call it was.
pub const HOOKS: &[(&str, &str, &str)] = &[
    // exits before enters: a call whose enter is seen has its exit seen too
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
    ("on_close", "syscalls", "sys_enter_close"),
    ("on_dup2", "syscalls", "sys_enter_dup2"),
    ("on_dup3", "syscalls", "sys_enter_dup3"),
    ("on_close_range", "syscalls", "sys_enter_close_range"),
    ("on_exec", "sched", "sched_process_exec"),
];

const FILES: &str = "ns_disk_files";
const CLOSED: &str = "ns_disk_closed";
const SYNCS: &str = "ns_disk_syncs";
const STATS: &str = "ns_disk_stats";

pub struct DiskProbe {
    ebpf: Ebpf,
}

/// The kernel side's loss counters (summed over CPUs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub files_full: u64,
    pub closed_full: u64,
    pub syncs_full: u64,
    pub inflight_full: u64,
}

fn tracepoint<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut TracePoint, BpfError> {
    ebpf.program_mut(name)
        .ok_or(BpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| BpfError::Program { program: name, source })
}

/// Loads the object with maps sized from the config (probes: defaults).
fn load_object(config: &DiskConfig) -> Result<Ebpf, BpfError> {
    bpf::load(
        "disk.bpf.o",
        bpf::DISK_OBJ,
        &[(FILES, config.max_files), (CLOSED, config.max_closed), (SYNCS, config.max_syncs)],
    )
}

/// Loads each program once, then attaches every hook; `report` hears how
/// each hook went (Err: why it failed). Stops at the first failure unless
/// `keep_going`.
fn attach_all(
    ebpf: &mut Ebpf,
    keep_going: bool,
    mut report: impl FnMut(&'static str, &'static str, &'static str, Result<(), String>),
) -> Result<(), DiskError> {
    let mut loaded: Vec<(&str, Result<(), String>)> = Vec::new();
    for &(program, category, name) in HOOKS {
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
                .and_then(|p| p.attach(category, name).map(drop).map_err(|source| BpfError::Program { program, source }))
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
    /// Loads the programs and attaches every hook; any missing hook fails
    /// the whole signal (a partial set would count some calls and not others).
    pub fn load(config: &DiskConfig) -> Result<DiskProbe, DiskError> {
        bpf::ensure_tracefs()?;
        let mut ebpf = load_object(config)?;
        attach_all(&mut ebpf, false, |_, _, _, _| {})?;
        let btf = bpf::kernel_btf()?;
        crate::scope::attach(&mut ebpf, &btf)?;
        Ok(DiskProbe { ebpf })
    }

    /// Writes the scope plan to this object's maps.
    pub fn set_scope(&mut self, plan: &ScopePlan) -> Result<(), BpfError> {
        plan.apply(&mut self.ebpf, std::path::Path::new("/proc"))
    }

    /// The exec events ring buffer of the scope programs.
    pub fn take_scope_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        aya::maps::RingBuf::try_from(self.ebpf.take_map(crate::scope::EVENTS)?).ok()
    }

    /// Records of files open now.
    pub fn open_files(&mut self) -> Result<Vec<(abi::DiskFdKey, abi::DiskFile)>, BpfError> {
        let files = bpf::hash_map::<abi::DiskFdKey, abi::DiskFile>(&mut self.ebpf, FILES)?;
        Ok(files.iter().filter_map(Result::ok).collect())
    }

    /// Forgets the record of an fd whose process is gone.
    pub fn forget_open(&mut self, key: &abi::DiskFdKey) -> Result<(), BpfError> {
        let mut files = bpf::hash_map::<abi::DiskFdKey, abi::DiskFile>(&mut self.ebpf, FILES)?;
        let _ = files.remove(key);
        Ok(())
    }

    /// Final records of files closed since the last call; each is returned
    /// once (deleted from the kernel map as it is read).
    pub fn take_closed(&mut self) -> Result<Vec<abi::DiskFile>, BpfError> {
        let mut closed = bpf::hash_map::<u64, abi::DiskFile>(&mut self.ebpf, CLOSED)?;
        let records: Vec<(u64, abi::DiskFile)> = closed.iter().filter_map(Result::ok).collect();
        for (id, _) in &records {
            let _ = closed.remove(id);
        }
        Ok(records.into_iter().map(|(_, f)| f).collect())
    }

    pub fn syncs(&mut self) -> Result<Vec<(abi::DiskSyncKey, abi::DiskSyncHist)>, BpfError> {
        let syncs = bpf::hash_map::<abi::DiskSyncKey, abi::DiskSyncHist>(&mut self.ebpf, SYNCS)?;
        Ok(syncs.iter().filter_map(Result::ok).collect())
    }

    pub fn forget_sync(&mut self, key: &abi::DiskSyncKey) -> Result<(), BpfError> {
        let mut syncs = bpf::hash_map::<abi::DiskSyncKey, abi::DiskSyncHist>(&mut self.ebpf, SYNCS)?;
        let _ = syncs.remove(key);
        Ok(())
    }

    pub fn kernel_stats(&self) -> Result<KernelStats, BpfError> {
        let sum = bpf::percpu_counters(&self.ebpf, STATS)?;
        Ok(KernelStats {
            files_full: sum(abi::DISK_STAT_FILES_FULL),
            closed_full: sum(abi::DISK_STAT_CLOSED_FULL),
            syncs_full: sum(abi::DISK_STAT_SYNCS_FULL),
            inflight_full: sum(abi::DISK_STAT_INFLIGHT_FULL),
        })
    }
}

/// What `nodescope probes` reports for this signal: each hook attached for
/// real in a fresh object, then released.
pub fn probe_hooks() -> Vec<HookStatus> {
    let status = |program: &'static str, category: &str, name: &str, r: Result<(), String>| HookStatus {
        signal: "disk",
        hook: format!("tracepoint/{category}/{name}"),
        program,
        supported: r.is_ok(),
        detail: r.err().unwrap_or_else(|| "loaded and attached".into()),
    };
    let mut out = Vec::new();
    let prepared = bpf::ensure_tracefs().and_then(|()| load_object(&DiskConfig::default()));
    match prepared {
        Err(e) => {
            for &(program, category, name) in HOOKS {
                out.push(status(program, category, name, Err(e.to_string())));
            }
        }
        Ok(mut ebpf) => {
            let _ = attach_all(&mut ebpf, true, |program, category, name, r| {
                out.push(status(program, category, name, r));
            });
        }
    }
    out
}

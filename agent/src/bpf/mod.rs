//! What every eBPF signal shares: the embedded objects, kernel BTF, the
//! mounts the hooks need, and the report `nodescope probes` prints.
//! Each signal loads and reads its own object in its own module.

pub mod abi;

use std::path::Path;

use aya::{Btf, Ebpf, EbpfLoader};

/// The compiled `ebpf/net.bpf.c`.
pub static NET_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/net.bpf.o"));

/// The compiled `ebpf/disk.bpf.c` (the disk signal's filesystem hooks).
pub static DISK_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/disk.bpf.o"));

/// The compiled `ebpf/disk_syscalls.bpf.c` (`[disk] method = "syscalls"`).
pub static DISK_SYSCALLS_OBJ: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/disk_syscalls.bpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum BpfError {
    #[error("kernel BTF (/sys/kernel/btf/vmlinux) unavailable: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("loading {object}: {source}")]
    Load { object: &'static str, source: aya::EbpfError },
    #[error("program {0} missing from its object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from its object")]
    MissingMap(&'static str),
    #[error("program {program}: {source}")]
    Program { program: &'static str, source: aya::programs::ProgramError },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error("{0}")]
    Mount(String),
    #[error("running the iterator: {0}")]
    Iter(String),
}

pub fn kernel_btf() -> Result<Btf, BpfError> {
    Ok(Btf::from_sys_fs()?)
}

/// Loads an object, sizing maps as the caller asks.
pub fn load(object: &'static str, bytes: &[u8], max_entries: &[(&'static str, u32)]) -> Result<Ebpf, BpfError> {
    let mut loader = EbpfLoader::new();
    for (map, n) in max_entries {
        loader.map_max_entries(map, *n);
    }
    loader.load(bytes).map_err(|source| BpfError::Load { object, source })
}

/// A hash map of a loaded object, with its key and value types.
pub fn hash_map<'a, K: aya::Pod, V: aya::Pod>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<aya::maps::HashMap<&'a mut aya::maps::MapData, K, V>, BpfError> {
    let map = ebpf.map_mut(name).ok_or(BpfError::MissingMap(name))?;
    aya::maps::HashMap::try_from(map).map_err(|source| BpfError::Map { map: name, source })
}

/// Takes the value of `key` out of a hash map in one step
/// (BPF_MAP_LOOKUP_AND_DELETE_ELEM, hash maps since Linux 5.14): a program
/// that adds to the entry meanwhile either lands before the take or makes a
/// new entry, never between a read and a delete. Ok(None): no such key.
/// aya 0.14 offers it only for queues and stacks.
pub fn take_elem<K: aya::Pod, V: aya::Pod>(map: &aya::maps::MapData, key: &K) -> std::io::Result<Option<V>> {
    use std::os::fd::{AsFd, AsRawFd};
    /// The map-element member of `union bpf_attr`.
    #[repr(C)]
    struct MapElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let attr = MapElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix for this command; key and value
    // point to buffers of the map's key and value sizes (checked by the
    // caller's types against the object's map definition by aya).
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr as *const MapElemAttr, size_of::<MapElemAttr>())
    };
    if rc == 0 {
        // SAFETY: the kernel wrote a whole value; V is Pod, every bit pattern valid.
        return Ok(Some(unsafe { value.assume_init() }));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENOENT) { Ok(None) } else { Err(e) }
}

/// Makes a hash map hold exactly `want`: removes the keys that went away,
/// writes the entries that are new or changed. For the small target maps the
/// agent rewrites every interval.
pub fn sync_map<K, V>(ebpf: &mut Ebpf, name: &'static str, want: &[(K, V)]) -> Result<(), BpfError>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod + PartialEq,
{
    let mut map = hash_map::<K, V>(ebpf, name)?;
    let wanted: std::collections::HashSet<K> = want.iter().map(|(k, _)| *k).collect();
    let stale: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| !wanted.contains(k)).collect();
    for k in stale {
        let _ = map.remove(&k);
    }
    for (k, v) in want {
        if map.get(k, 0).ok().as_ref() != Some(v) {
            map.insert(k, v, 0).map_err(|source| BpfError::Map { map: name, source })?;
        }
    }
    Ok(())
}

/// The reader of a per-CPU array of u64 counters: slot -> sum over CPUs.
pub fn percpu_counters<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<impl Fn(u32) -> u64 + 'a, BpfError> {
    let map = ebpf.map(name).ok_or(BpfError::MissingMap(name))?;
    let stats: aya::maps::PerCpuArray<&aya::maps::MapData, u64> =
        aya::maps::PerCpuArray::try_from(map).map_err(|source| BpfError::Map { map: name, source })?;
    Ok(move |slot: u32| stats.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0))
}

/// Classic tracepoints attach through tracefs, which these hosts do not
/// always mount. Mount it when missing; say which mount is missing when that
/// fails (an unprivileged container, say).
pub fn ensure_tracefs() -> Result<(), BpfError> {
    for dir in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(());
        }
    }
    let target = c"/sys/kernel/tracing";
    // SAFETY: plain mount(2) with NUL-terminated literals.
    let rc = unsafe {
        libc::mount(c"tracefs".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null())
    };
    if rc != 0 {
        return Err(BpfError::Mount(format!(
            "tracefs is not mounted at /sys/kernel/tracing and mounting it failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// One hook nodescope uses, and whether this kernel takes it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HookStatus {
    pub signal: &'static str,
    pub hook: String,
    pub program: &'static str,
    pub supported: bool,
    pub detail: String,
}

/// Boot time (CLOCK_BOOTTIME, what bpf_ktime_get_boot_ns reads) to unix
/// seconds.
pub fn boot_ns_to_unix(boot_ns: u64) -> Option<u64> {
    if boot_ns == 0 {
        return None;
    }
    let now_boot = clock_ns(libc::CLOCK_BOOTTIME)?;
    let now_real = clock_ns(libc::CLOCK_REALTIME)?;
    let age = now_boot.saturating_sub(boot_ns);
    Some(now_real.saturating_sub(age) / 1_000_000_000)
}

pub fn clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out pointer.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

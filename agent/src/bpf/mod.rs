//! What every eBPF signal shares: the embedded objects, kernel BTF, the
//! mounts the hooks need, and the report `nodescope probes` prints.
//! Each signal loads and reads its own object in its own module.

pub mod abi;
pub mod mapped;
pub mod pins;

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
    #[error("loading {object}: {}", with_causes(source))]
    Load { object: &'static str, source: aya::EbpfError },
    #[error("program {0} missing from its object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from its object")]
    MissingMap(&'static str),
    #[error("program {program}: {}", with_causes(source))]
    Program { program: &'static str, source: aya::programs::ProgramError },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error("map {map}: mapping it into memory: {reason}")]
    Mapped { map: &'static str, reason: String },
    #[error("{0}")]
    Mount(String),
    #[error("running the iterator: {0}")]
    Iter(String),
    #[error("pinning under bpffs: {0}")]
    Pin(String),
}

/// An error and the errors under it, as one line: aya's "failed to create
/// map" says why (the errno: EPERM without CAP_BPF, or a seccomp profile
/// that refuses bpf(2)) only in its source.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        cause = c.source();
    }
    line
}

pub fn kernel_btf() -> Result<Btf, BpfError> {
    Ok(Btf::from_sys_fs()?)
}

/// Loads an object, sizing maps and setting `const volatile` globals as the
/// caller asks. Its programs count nothing until `pins::activate` makes
/// their generation (returned here) the active one. With `kept`, its maps
/// are the pinned ones of an earlier agent when there are (made and pinned
/// otherwise), and a map pinned with another size than asked drops all of
/// them, logged.
///
/// The loader parses the kernel's BTF itself (`EbpfLoader::new`), and it is
/// freed on return: a caller parses its own for attaching only after this,
/// so two parses (about 13 MB each) are never held at once.
pub fn load(
    object: &'static str,
    bytes: &[u8],
    max_entries: &[(&'static str, u32)],
    globals: &[(&'static str, u32)],
    kept: Option<&pins::Kept>,
) -> Result<(Ebpf, u32), BpfError> {
    let mut loader = EbpfLoader::new();
    for (map, n) in max_entries {
        loader.map_max_entries(map, *n);
    }
    let mut generation = 1;
    let names = kept.map(|_| pins::map_names(bytes)).unwrap_or_default();
    let paths: Vec<(&str, std::path::PathBuf)> = match kept {
        Some(kept) => {
            let resized = kept.resized(max_entries);
            if !resized.is_empty() {
                let what: Vec<String> =
                    resized.iter().map(|(m, old, new)| format!("{m} {old} -> {new} entries")).collect();
                tracing::warn!(
                    "{object}: pinned maps resized by [limits] ({}): their records are dropped and counting starts afresh",
                    what.join(", ")
                );
                kept.clear()?;
            }
            if let Some(g) = kept.active_generation() {
                generation = g.wrapping_add(1).max(1);
            }
            kept.prepare_maps()?;
            names.iter().map(|n| (n.as_str(), kept.map_path(n))).collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &paths {
        loader.map_pin_path(name, path.as_path());
    }
    loader.override_global("ns_generation", &generation, true);
    for (name, value) in globals {
        loader.override_global(name, value, true);
    }
    let ebpf = loader.load(bytes).map_err(|source| BpfError::Load { object, source })?;
    Ok((ebpf, generation))
}

/// Loads a tp_btf program of `ebpf` on `hook` and attaches it; the link is
/// the caller's (see `pins::activate`).
pub fn attach_btf(
    ebpf: &mut Ebpf,
    btf: &Btf,
    program: &'static str,
    hook: &str,
) -> Result<(&'static str, aya::programs::links::FdLink), BpfError> {
    let err = |source| BpfError::Program { program, source };
    let p: &mut aya::programs::BtfTracePoint =
        ebpf.program_mut(program).ok_or(BpfError::MissingProgram(program))?.try_into().map_err(err)?;
    p.load(hook, btf).map_err(err)?;
    let id = p.attach().map_err(err)?;
    let link = p.take_link(id).map_err(err)?;
    Ok((program, aya::programs::links::FdLink::from(link)))
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
    let mut value = std::mem::MaybeUninit::<V>::zeroed();
    let attr = MapElemAttr {
        map_fd: map.fd().as_fd().as_raw_fd() as u32,
        _pad: 0,
        key: key as *const K as u64,
        value: value.as_mut_ptr() as u64,
        flags: 0,
    };
    // key and value point to buffers of the map's key and value sizes (the
    // caller's types were checked against the object's map by aya)
    match sys_bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &attr) {
        // SAFETY: the kernel wrote a whole value; V is Pod, every bit pattern valid.
        Ok(_) => Ok(Some(unsafe { value.assume_init() })),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Waits until every BPF program that was running has finished: an RCU
/// grace period, which the kernel takes when user space updates a map of
/// maps (`maybe_wait_bpf_programs`; tracing programs run under
/// rcu_read_lock). A 1-entry array of maps made for this alone, holding a
/// 1-entry array. After `wait`, no program still uses a value it read
/// before the call (the disk signal's epoch).
pub struct RcuBarrier {
    outer: std::os::fd::OwnedFd,
    inner: std::os::fd::OwnedFd,
}

/// The map-creation member of `union bpf_attr`, as far as used here.
#[repr(C)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
}

/// The map-element member of `union bpf_attr`.
#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;

fn sys_bpf<A>(cmd: libc::c_long, attr: &A) -> std::io::Result<libc::c_long> {
    // SAFETY: attr is a prefix of union bpf_attr valid for cmd, and lives
    // across the call; the kernel reads only size_of::<A>() bytes.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *const A, size_of::<A>()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

impl RcuBarrier {
    pub fn new() -> std::io::Result<RcuBarrier> {
        use std::os::fd::FromRawFd;
        let array = |map_type, inner_map_fd| MapCreateAttr {
            map_type,
            key_size: 4,
            value_size: 4,
            max_entries: 1,
            map_flags: 0,
            inner_map_fd,
        };
        let inner = sys_bpf(BPF_MAP_CREATE, &array(BPF_MAP_TYPE_ARRAY, 0))?;
        // SAFETY: a fresh fd the kernel just returned, owned here alone.
        let inner = unsafe { std::os::fd::OwnedFd::from_raw_fd(inner as i32) };
        use std::os::fd::AsRawFd;
        let outer = sys_bpf(BPF_MAP_CREATE, &array(BPF_MAP_TYPE_ARRAY_OF_MAPS, inner.as_raw_fd() as u32))?;
        // SAFETY: as above.
        let outer = unsafe { std::os::fd::OwnedFd::from_raw_fd(outer as i32) };
        Ok(RcuBarrier { outer, inner })
    }

    /// Returns once an RCU grace period has passed.
    pub fn wait(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let key = 0u32;
        let value = self.inner.as_raw_fd() as u32;
        let attr = MapElemAttr {
            map_fd: self.outer.as_raw_fd() as u32,
            _pad: 0,
            key: &key as *const u32 as u64,
            value: &value as *const u32 as u64,
            flags: 0,
        };
        sys_bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
    }
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
    let rc = unsafe { libc::mount(c"tracefs".as_ptr(), target.as_ptr(), c"tracefs".as_ptr(), 0, std::ptr::null()) };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to create map `m`")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn errors_carry_their_causes_in_one_line() {
        let e = Outer(std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(with_causes(&e), "failed to create map `m`: Operation not permitted (os error 1)");
        // a cause already in the message is not repeated
        let plain = std::io::Error::from_raw_os_error(libc::ENOENT);
        assert_eq!(with_causes(&plain), "No such file or directory (os error 2)");
    }
}

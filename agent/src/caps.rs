//! The Linux capabilities the agent uses, checked once at start. An agent
//! run with fewer (a DaemonSet or unit that drops one) still starts and
//! serves what it can; one log line names each capability it lacks and the
//! hook or reader that needs it, so the gap is not a silent empty figure.

use std::path::Path;

/// One capability, what needs it, and the capability that also grants the
/// same on this kernel (CAP_SYS_ADMIN still passes the BPF checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub name: &'static str,
    pub bit: u32,
    pub covered_by: Option<u32>,
    pub needed_by: &'static str,
}

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Every capability the agent uses (docs/operations.md, "Capabilities").
pub const NEEDS: &[Need] = &[
    Need {
        name: "CAP_BPF",
        bit: CAP_BPF,
        covered_by: Some(CAP_SYS_ADMIN),
        needed_by: "BPF maps and programs (network and disk signals)",
    },
    Need {
        name: "CAP_PERFMON",
        bit: CAP_PERFMON,
        covered_by: Some(CAP_SYS_ADMIN),
        needed_by: "tp_btf tracepoints and the TCP iterator (network and disk signals)",
    },
    Need {
        name: "CAP_SYS_ADMIN",
        bit: CAP_SYS_ADMIN,
        covered_by: None,
        needed_by: "the TCP iterator in other network namespaces (peers of nodes in containers and pods, \
                    and of host-network nodes when the agent has a network namespace of its own), \
                    --cgroupns, and mounting tracefs for disk.method = \"syscalls\"",
    },
    Need {
        name: "CAP_SYS_PTRACE",
        bit: CAP_SYS_PTRACE,
        covered_by: None,
        needed_by: "/proc/PID/fd, io, root and ns/net of nodes that hold capabilities the agent lacks or run as \
                    another user (open files, I/O, data dirs inside containers, their network namespaces)",
    },
    Need {
        name: "CAP_DAC_READ_SEARCH",
        bit: CAP_DAC_READ_SEARCH,
        covered_by: None,
        needed_by: "data dirs, config files and /proc/PID/fd readable only by the node's user \
                    (data dir size, ports, open files)",
    },
    Need {
        name: "CAP_SETUID",
        bit: CAP_SETUID,
        covered_by: None,
        needed_by: "the data dir write test as the node's user",
    },
    Need {
        name: "CAP_SETGID",
        bit: CAP_SETGID,
        covered_by: None,
        needed_by: "the data dir write test as the node's group",
    },
];

/// This process's effective capabilities (CapEff of /proc/self/status).
pub fn effective() -> Result<u64, procfs::ProcError> {
    Ok(procfs::process::Process::myself()?.status()?.capeff)
}

fn has(eff: u64, bit: u32) -> bool {
    eff & (1u64 << bit) != 0
}

/// The needs that `eff` does not meet, in the order of NEEDS.
pub fn missing(eff: u64) -> Vec<&'static Need> {
    NEEDS.iter().filter(|n| !has(eff, n.bit) && !n.covered_by.is_some_and(|c| has(eff, c))).collect()
}

/// The one line the agent logs about its capabilities: None when it has all it uses.
pub fn summary(eff: u64) -> Option<String> {
    let gaps = missing(eff);
    if gaps.is_empty() {
        return None;
    }
    let parts: Vec<String> = gaps.iter().map(|n| format!("without {}: {}", n.name, n.needed_by)).collect();
    Some(format!("capabilities: {}; everything else is served", parts.join("; ")))
}

/// Moves the calling thread (the main thread, before any other starts, so
/// every later thread inherits it) into the cgroup namespace at `ns`:
/// `/proc/1/ns/cgroup`, the host's under `hostPID`, where a node's
/// /proc/PID/cgroup path names its directory under the host's
/// /sys/fs/cgroup. Container runtimes give a container a cgroup namespace of
/// its own on cgroup2 hosts.
pub fn enter_cgroup_namespace(ns: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(ns).map_err(|e| format!("opening {}: {e}", ns.display()))?;
    // SAFETY: setns on a namespace fd we hold open; it changes only this thread.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWCGROUP) } != 0 {
        return Err(format!(
            "entering the cgroup namespace {}: {} (needs CAP_SYS_ADMIN); nodes' cgroup paths are resolved in this one",
            ns.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// At start: enters `cgroupns` when given, then says in one line what the
/// agent cannot do with the capabilities it has (nothing when it has them all).
pub fn check_at_start(cgroupns: Option<&Path>) {
    let entered = cgroupns.map(enter_cgroup_namespace);
    let eff = match effective() {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!("capabilities: reading /proc/self/status: {e}; not checked");
            return;
        }
    };
    let mut line = summary(eff);
    if let Some(Err(e)) = entered {
        line = Some(match line {
            Some(l) => format!("{l}; {e}"),
            None => format!("capabilities: {e}"),
        });
    }
    match line {
        Some(l) => tracing::warn!("{l}"),
        None => tracing::info!(
            "capabilities: all that nodescope uses ({})",
            NEEDS.iter().filter(|n| has(eff, n.bit)).map(|n| n.name).collect::<Vec<_>>().join(", ")
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: u64 = (1 << CAP_BPF)
        | (1 << CAP_PERFMON)
        | (1 << CAP_SYS_ADMIN)
        | (1 << CAP_SYS_PTRACE)
        | (1 << CAP_DAC_READ_SEARCH)
        | (1 << CAP_SETUID)
        | (1 << CAP_SETGID);

    #[test]
    fn reads_its_own_effective_set() {
        // the test runs as root with the full set, or as a user with none
        let eff = effective().unwrap();
        // SAFETY: no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            assert_eq!(eff & FULL, FULL, "{eff:#x}");
        }
        assert_eq!(
            eff,
            u64::from_str_radix(
                std::fs::read_to_string("/proc/self/status")
                    .unwrap()
                    .lines()
                    .find_map(|l| l.strip_prefix("CapEff:"))
                    .unwrap()
                    .trim(),
                16
            )
            .unwrap()
        );
    }

    #[test]
    fn names_each_missing_capability_once_in_one_line() {
        assert_eq!(summary(FULL), None);
        assert_eq!(summary(u64::MAX), None);
        let line = summary(FULL & !(1 << CAP_SYS_ADMIN)).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.contains("without CAP_SYS_ADMIN: the TCP iterator in other network namespaces"), "{line}");
        assert_eq!(line.matches("without ").count(), 1, "{line}");
        // CAP_SYS_ADMIN passes the kernel's BPF checks too
        assert_eq!(summary(FULL & !(1 << CAP_BPF) & !(1 << CAP_PERFMON)), None);
        let line = summary(FULL & !(1 << CAP_SYS_ADMIN) & !(1 << CAP_PERFMON)).unwrap();
        assert!(line.contains("without CAP_PERFMON: tp_btf") && line.contains("without CAP_SYS_ADMIN"), "{line}");
        assert_eq!(missing(0).len(), NEEDS.len());
    }

    #[test]
    fn reads_the_effective_set_capget_reports() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        // _LINUX_CAPABILITY_VERSION_3: two 32-bit halves
        let mut header = Header { version: 0x2008_0522, pid: 0 };
        let mut data = [Data::default(); 2];
        // SAFETY: header and a two-element data array, as capget(2) v3 expects.
        let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header as *mut Header, data.as_mut_ptr()) };
        assert_eq!(rc, 0, "capget: {}", std::io::Error::last_os_error());
        let from_capget = u64::from(data[0].effective) | (u64::from(data[1].effective) << 32);
        assert_eq!(effective().unwrap(), from_capget);
    }
}

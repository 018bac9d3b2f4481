//! Loads `net.bpf.c`, tells it which sockets to watch and reads its records.

use std::io::Read;

use aya::programs::{BtfTracePoint, Iter};
use aya::Ebpf;

use crate::bpf::{self, abi, BpfError, HookStatus};
use crate::target::Scope;

const STATE_PROG: &str = "on_tcp_state";
const STATE_HOOK: &str = "inet_sock_set_state";
const ITER_PROG: &str = "tcp_iter";
/// max_entries of ns_target_inodes in net.bpf.c
const INODE_MAP_SIZE: usize = 8192;

pub struct NetProbe {
    ebpf: Ebpf,
}

/// The kernel side's own counters (summed over CPUs).
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelStats {
    pub conn_dropped: u64,
}

fn prog<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, BpfError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(BpfError::MissingProgram(name))?
        .try_into()
        .map_err(|source| BpfError::Program { program: name, source })
}

impl NetProbe {
    /// Loads both programs and attaches the state tracepoint. The iterator
    /// is attached for each read.
    pub fn load(max_connections: u32) -> Result<NetProbe, BpfError> {
        let btf = bpf::kernel_btf()?;
        let mut ebpf = bpf::load("net.bpf.o", bpf::NET_OBJ, &[("ns_conns", max_connections)])?;
        let state: &mut BtfTracePoint = prog(&mut ebpf, STATE_PROG)?;
        let err = |source| BpfError::Program { program: STATE_PROG, source };
        state.load(STATE_HOOK, &btf).map_err(err)?;
        state.attach().map_err(err)?;
        let iter: &mut Iter = prog(&mut ebpf, ITER_PROG)?;
        iter.load("tcp", &btf).map_err(|source| BpfError::Program { program: ITER_PROG, source })?;
        Ok(NetProbe { ebpf })
    }

    /// Makes the kernel's target maps say exactly `scopes` (target index,
    /// scope): adds what is new, removes what went away.
    pub fn set_targets<'s>(&mut self, scopes: impl IntoIterator<Item = (u32, &'s Scope)>) -> Result<(), BpfError> {
        let mut cgroups = Vec::new();
        let mut pids = Vec::new();
        let mut ports = Vec::new();
        let mut inodes = Vec::new();
        for (index, scope) in scopes {
            match scope {
                Scope::Cgroup { id, .. } => cgroups.push((*id, index)),
                Scope::Process { pids: p, listen_ports, socket_inodes } => {
                    pids.extend(p.iter().map(|pid| (*pid, index)));
                    ports.extend(listen_ports.iter().map(|port| (*port, index)));
                    inodes.extend(socket_inodes.iter().map(|ino| (*ino, index)));
                }
                Scope::Absent => {}
            }
        }
        bpf::sync_map(&mut self.ebpf, "ns_target_cgroups", &cgroups)?;
        bpf::sync_map(&mut self.ebpf, "ns_target_pids", &pids)?;
        bpf::sync_map(&mut self.ebpf, "ns_target_ports", &ports)?;
        // Only for adopting connections older than the agent: past the map's
        // size the rest are left out (the node's newer sockets need no inode).
        inodes.truncate(INODE_MAP_SIZE);
        bpf::sync_map(&mut self.ebpf, "ns_target_inodes", &inodes)?;
        Ok(())
    }

    /// Runs the iterator (live byte counts, adoption of older connections),
    /// then returns every record and deletes the tombstones it returned.
    pub fn read(&mut self) -> Result<Vec<(u64, abi::Conn)>, BpfError> {
        let iter: &mut Iter = prog(&mut self.ebpf, ITER_PROG)?;
        let err = |source| BpfError::Program { program: ITER_PROG, source };
        let link_id = iter.attach().map_err(err)?;
        let link = iter.take_link(link_id).map_err(err)?;
        let mut file = link.into_file().map_err(|e| BpfError::Iter(e.to_string()))?;
        // The program prints nothing; reading to the end is what runs it.
        let mut sink = Vec::new();
        file.read_to_end(&mut sink).map_err(|e| BpfError::Iter(e.to_string()))?;

        let mut conns = bpf::hash_map::<u64, abi::Conn>(&mut self.ebpf, "ns_conns")?;
        let records: Vec<(u64, abi::Conn)> = conns.iter().filter_map(Result::ok).collect();
        for (cookie, c) in &records {
            if c.state == abi::CONN_CLOSED || c.state == abi::CONN_FAILED {
                // gone already only if another reader raced us; nothing lost
                let _ = conns.remove(cookie);
            }
        }
        Ok(records)
    }

    /// Forgets a record the agent no longer wants (its target went away).
    pub fn forget(&mut self, cookie: u64) -> Result<(), BpfError> {
        let mut conns = bpf::hash_map::<u64, abi::Conn>(&mut self.ebpf, "ns_conns")?;
        let _ = conns.remove(&cookie);
        Ok(())
    }

    pub fn kernel_stats(&self) -> Result<KernelStats, BpfError> {
        let sum = bpf::percpu_counters(&self.ebpf, "ns_net_stats")?;
        Ok(KernelStats {
            conn_dropped: sum(abi::NET_STAT_CONN_DROPPED),
        })
    }
}

/// What `nodescope probes` reports for this signal: each hook loaded (and
/// attached) for real in a fresh object, then released.
pub fn probe_hooks() -> Vec<HookStatus> {
    let attempt = |program: &'static str, load: &dyn Fn(&mut Ebpf, &aya::Btf) -> Result<(), aya::programs::ProgramError>| {
        let btf = bpf::kernel_btf()?;
        let mut ebpf = bpf::load("net.bpf.o", bpf::NET_OBJ, &[])?;
        load(&mut ebpf, &btf).map_err(|source| BpfError::Program { program, source })
    };
    let state = attempt(STATE_PROG, &|ebpf, btf| {
        let p: &mut BtfTracePoint = ebpf.program_mut(STATE_PROG).unwrap().try_into()?;
        p.load(STATE_HOOK, btf)?;
        p.attach().map(drop)
    });
    let iter = attempt(ITER_PROG, &|ebpf, btf| {
        let p: &mut Iter = ebpf.program_mut(ITER_PROG).unwrap().try_into()?;
        p.load("tcp", btf)?;
        p.attach().map(drop)
    });
    [(format!("tp_btf/{STATE_HOOK}"), STATE_PROG, state), ("iter/tcp".to_string(), ITER_PROG, iter)]
        .into_iter()
        .map(|(hook, program, r)| HookStatus {
            signal: "net",
            hook,
            program,
            supported: r.is_ok(),
            detail: r.err().map(|e| e.to_string()).unwrap_or_else(|| "loaded and attached".into()),
        })
        .collect()
}

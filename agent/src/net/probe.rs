//! Loads `net.bpf.c`, tells it which sockets to watch and reads its records.

use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{Map, MapData, RingBuf};
use aya::programs::{BtfTracePoint, Iter};
use aya::Ebpf;

use crate::bpf::mapped::MappedArray;
use crate::bpf::{self, abi, pins, BpfError, HookStatus};
use crate::scope::{self, ScopePlan, ScopeStats};
use crate::target::Scope;

const STATE_PROG: &str = "on_tcp_state";
const STATE_HOOK: &str = "inet_sock_set_state";
const ITER_PROG: &str = "tcp_iter";
/// max_entries of ns_target_inodes in net.bpf.c
const INODE_MAP_SIZE: usize = 8192;

const LOG_POS: &str = "ns_log_pos";
const LOG: &str = "ns_conn_log";
const LOG_SLOTS: &str = "ns_log_slots";
/// The ring buffer agents before the per-CPU logs sent events through.
const LEGACY_EVENTS: &str = "ns_conn_events";

pub struct NetProbe {
    ebpf: Ebpf,
    log: EventLog,
    /// Events read at load from an earlier agent's ring buffer, for the
    /// first read.
    pending: Vec<abi::ConnEvent>,
    _links: Vec<pins::HeldLink>,
}

/// The kernel side's own counters (summed over CPUs).
#[derive(Debug, Clone, Copy, Default)]
pub struct KernelStats {
    pub conn_dropped: u64,
    /// Events kept as map records because their CPU's event log was full.
    pub events_full: u64,
    pub scope: ScopeStats,
}

/// What one read returns: the records in the map (open connections, and
/// tombstones of events the event logs had no room for), then the
/// connections accepted, closed and failed since the last read, in the order
/// they happened.
pub struct NetRead {
    pub records: Vec<(u64, abi::Conn)>,
    pub events: Vec<abi::ConnEvent>,
}

/// All CPUs' event logs together take at most this much kernel memory
/// (the cap the shared ring buffer had); the agent maps all of it.
const LOG_MAX_BYTES: usize = 64 << 20;

/// Entries in each CPU's event log: room for every tracked connection to be
/// accepted and to close within one interval, spread over the CPUs (the
/// room the shared ring buffer had, about 1.8 MiB a CPU on two CPUs with the
/// default limits), within LOG_MAX_BYTES; at least 64, and a power of two,
/// as the program masks positions with it. A CPU that takes more in one
/// interval keeps the rest as map records (counted,
/// `nodescope_net_close_events_deferred_total`).
fn log_slots(max_connections: u32, cpus: usize) -> u32 {
    let cpus = cpus.max(1);
    let want = (max_connections as usize).saturating_mul(2).div_ceil(cpus).next_power_of_two();
    let cap = (LOG_MAX_BYTES / std::mem::size_of::<abi::ConnEvent>() / cpus + 1).next_power_of_two() / 2;
    want.min(cap).max(64) as u32
}

/// net.bpf.c's per-CPU event logs, read in place. Each CPU's program runs
/// append to its own log; the agent alone moves its read position.
struct EventLog {
    pos: MappedArray<abi::LogPos>,
    entries: MappedArray<abi::ConnEvent>,
    slots: usize,
}

impl EventLog {
    fn take(ebpf: &mut Ebpf, slots: u32) -> Result<EventLog, BpfError> {
        let pos = MappedArray::take(ebpf, LOG_POS)?;
        let entries = MappedArray::take(ebpf, LOG)?;
        let slots = slots as usize;
        if entries.entries() != pos.entries() * slots {
            return Err(BpfError::Mapped {
                map: LOG,
                reason: format!("{} entries for {} CPUs of {slots}", entries.entries(), pos.entries()),
            });
        }
        Ok(EventLog { pos, entries, slots })
    }

    /// Appends every whole entry written since the last drain, per CPU in
    /// the order written. An entry still being filled (its seq not yet
    /// set) and those after it on its CPU wait for the next drain.
    fn drain(&mut self, out: &mut Vec<abi::ConnEvent>) {
        for cpu in 0..self.pos.entries() {
            let pos = self.pos.entry(cpu);
            // SAFETY: both fields are 8-byte aligned u64s of the live
            // mapping; the kernel side updates them with atomics.
            let (written, read) =
                unsafe { (AtomicU64::from_ptr(&raw mut (*pos).written), AtomicU64::from_ptr(&raw mut (*pos).read)) };
            let end = written.load(Ordering::Acquire);
            let start = read.load(Ordering::Relaxed);
            let mut n = start;
            while n < end {
                let entry = self.entries.entry(cpu * self.slots + (n as usize % self.slots));
                // SAFETY: as above. seq is written last, ordered after the
                // entry (net.bpf.c), and the entry is not written again
                // until `read` passes it.
                let seq = unsafe { AtomicU64::from_ptr(&raw mut (*entry).seq) };
                if seq.load(Ordering::Acquire) != n + 1 {
                    break;
                }
                // SAFETY: a whole entry (seq says so) of a plain-data type.
                out.push(unsafe { std::ptr::read_volatile(entry) });
                n += 1;
            }
            // Release: the entries are read before the program may reuse
            // them. Only when it moved: the line is the CPU's own hot one.
            if n != start {
                read.store(n, Ordering::Release);
            }
        }
    }
}

/// The events an agent before the per-CPU logs left in its pinned ring
/// buffer (closes while no agent ran): read once, then its pin is removed.
fn legacy_events(kept: &pins::Kept) -> Vec<abi::ConnEvent> {
    let path = kept.map_path(LEGACY_EVENTS);
    let Ok(data) = MapData::from_pin(&path) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(mut ring) = RingBuf::try_from(Map::RingBuf(data)) {
        while let Some(item) = ring.next() {
            // that layout: the cookie, then struct ns_conn
            let conn = std::mem::size_of::<abi::Conn>();
            if item.len() >= 8 + conn {
                let cookie = u64::from_ne_bytes(item[..8].try_into().expect("8 bytes"));
                // SAFETY: a whole struct ns_conn (size checked above), plain
                // data; read_unaligned as ring records are only 8-byte aligned.
                let conn = unsafe { std::ptr::read_unaligned(item[8..].as_ptr().cast::<abi::Conn>()) };
                out.push(abi::ConnEvent { seq: 0, cookie, conn });
            }
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(
            "{}: the previous agent's event ring buffer, {} events read, removed (events now go through per-CPU logs)",
            path.display(),
            out.len()
        ),
        Err(e) => tracing::warn!("{}: {e}", path.display()),
    }
    out
}

/// When what an event reports happened: ordering them across CPUs.
fn event_time(e: &abi::ConnEvent) -> u64 {
    if e.conn.state == abi::CONN_ESTABLISHED {
        e.conn.start_ns
    } else {
        e.conn.end_ns
    }
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
    /// Loads both programs and attaches the state tracepoint (the
    /// iterator is attached for each read). With `kept`, the maps and links
    /// of an earlier agent are taken over (bpf::pins).
    pub fn load(max_connections: u32, kept: Option<&pins::Kept>) -> Result<NetProbe, BpfError> {
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| BpfError::Mapped {
            map: LOG_POS,
            reason: format!("counting the possible CPUs ({what}): {e}"),
        })?;
        let slots = log_slots(max_connections, cpus);
        let sizes = [("ns_conns", max_connections), (LOG_POS, cpus as u32), (LOG, cpus as u32 * slots)];
        let globals = [(LOG_SLOTS, slots)];
        let (mut ebpf, generation) = bpf::load("net.bpf.o", bpf::NET_OBJ, &sizes, &globals, kept)?;
        // after the load, whose own parse is freed by now (bpf::load)
        let btf = bpf::kernel_btf()?;
        let mut links = scope::attach(&mut ebpf, &btf)?;
        links.push(bpf::attach_btf(&mut ebpf, &btf, STATE_PROG, STATE_HOOK)?);
        let iter: &mut Iter = prog(&mut ebpf, ITER_PROG)?;
        iter.load("tcp", &btf).map_err(|source| BpfError::Program { program: ITER_PROG, source })?;
        let links = pins::activate(&mut ebpf, generation, kept, links)?;
        let log = EventLog::take(&mut ebpf, slots)?;
        // after the handover: the earlier agent's programs write no more
        let pending = kept.map(legacy_events).unwrap_or_default();
        Ok(NetProbe { ebpf, log, pending, _links: links })
    }

    /// The ring buffer of the scope programs' exec events, for a watcher
    /// thread to wait on.
    pub fn take_scope_events(&mut self) -> Option<RingBuf<MapData>> {
        RingBuf::try_from(self.ebpf.take_map(scope::EVENTS)?).ok()
    }

    /// Writes the scope plan to this object's maps.
    pub fn set_scope(&mut self, plan: &ScopePlan) -> Result<(), BpfError> {
        plan.apply(&mut self.ebpf, std::path::Path::new("/proc"))
    }

    /// The socket inodes of targets that share their cgroup, to adopt their
    /// connections older than the agent.
    pub fn set_adoptable<'s>(&mut self, scopes: impl IntoIterator<Item = (u32, &'s Scope)>) -> Result<(), BpfError> {
        let mut inodes = Vec::new();
        for (index, scope) in scopes {
            if let Scope::Process { socket_inodes, .. } = scope {
                inodes.extend(socket_inodes.iter().map(|ino| (*ino, index)));
            }
        }
        // Only for adopting connections older than the agent: past the map's
        // size the rest are left out (the node's newer sockets need no inode).
        inodes.truncate(INODE_MAP_SIZE);
        bpf::sync_map(&mut self.ebpf, "ns_target_inodes", &inodes)?;
        Ok(())
    }

    /// Runs the iterator in the agent's own network namespace and in each
    /// of `netns_pids` (a process in each other namespace to watch), then
    /// returns every record, deletes the tombstones it returned, and drains
    /// the events. Events are drained after the map is read: a record
    /// missing from the map was deleted after its event was written, so its
    /// event is in this drain.
    pub fn read(&mut self, netns_pids: &[u32]) -> Result<NetRead, BpfError> {
        self.run_iter(None)?;
        for &pid in netns_pids {
            // a namespace whose process just exited: nothing left to list
            if let Err(e) = self.run_iter(Some(pid)) {
                tracing::debug!("tcp iterator in the network namespace of pid {pid}: {e}");
            }
        }

        let mut conns = bpf::hash_map::<u64, abi::Conn>(&mut self.ebpf, "ns_conns")?;
        let records: Vec<(u64, abi::Conn)> = conns.iter().filter_map(Result::ok).collect();
        for (cookie, c) in &records {
            if c.state == abi::CONN_CLOSED || c.state == abi::CONN_FAILED {
                // gone already only if another reader raced us; nothing lost
                let _ = conns.remove(cookie);
            }
        }
        let mut events = std::mem::take(&mut self.pending);
        self.log.drain(&mut events);
        // each CPU's log is in order; across CPUs, order by when it happened
        events.sort_by_key(event_time);
        Ok(NetRead { records, events })
    }

    /// One pass of the TCP iterator. An iterator lists the sockets of the
    /// network namespace it is created in, so for another namespace it is
    /// created on a short-lived thread that joined that namespace.
    fn run_iter(&mut self, netns_of: Option<u32>) -> Result<(), BpfError> {
        let iter: &mut Iter = prog(&mut self.ebpf, ITER_PROG)?;
        let err = |source| BpfError::Program { program: ITER_PROG, source };
        let link_id = iter.attach().map_err(err)?;
        let link = iter.take_link(link_id).map_err(err)?;
        let mut file = match netns_of {
            None => link.into_file().map_err(|e| BpfError::Iter(e.to_string()))?,
            Some(pid) => crate::netns::run_in(pid, move || link.into_file())
                .map_err(|e| BpfError::Iter(e.to_string()))?
                .map_err(|e| BpfError::Iter(e.to_string()))?,
        };
        // The program prints nothing; reading to the end is what runs it.
        let mut sink = Vec::new();
        file.read_to_end(&mut sink).map_err(|e| BpfError::Iter(e.to_string()))?;
        Ok(())
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
            events_full: sum(abi::NET_STAT_EVENTS_FULL),
            scope: scope::stats(&self.ebpf)?,
        })
    }
}

/// What `nodescope probes` reports for this signal: each hook loaded (and
/// attached) for real in a fresh object, then released.
pub fn probe_hooks() -> Vec<HookStatus> {
    let attempt = |program: &'static str,
                   load: &dyn Fn(&mut Ebpf, &aya::Btf) -> Result<(), aya::programs::ProgramError>| {
        let (mut ebpf, _) = bpf::load("net.bpf.o", bpf::NET_OBJ, &[], &[], None)?;
        let btf = bpf::kernel_btf()?;
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
    let mut hooks =
        vec![(format!("tp_btf/{STATE_HOOK}"), STATE_PROG, state), ("iter/tcp".to_string(), ITER_PROG, iter)];
    for &(program, hook) in scope::HOOKS {
        let r = attempt(program, &|ebpf, btf| {
            let p: &mut BtfTracePoint = ebpf.program_mut(program).unwrap().try_into()?;
            p.load(hook, btf)?;
            p.attach().map(drop)
        });
        hooks.push((format!("tp_btf/{hook}"), program, r));
    }
    hooks
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_slots_hold_an_interval_of_opens_and_closes_over_the_cpus() {
        // the default limits on 2, 64 and 1,024 CPUs; a tiny limit; the cap
        for (max, cpus, want) in [
            (16_384, 2, 16_384),
            (16_384, 64, 512),
            (16_384, 1024, 64),
            (64, 2, 64),
            (10_000, 3, 8_192),
            // the largest limit: within 64 MiB in all, on 1 and 3 CPUs
            (1 << 20, 1, 1 << 19),
            (1 << 20, 3, 1 << 17),
        ] {
            let slots = log_slots(max, cpus);
            assert_eq!(slots, want, "max_connections {max}, {cpus} CPUs");
            assert!(slots.is_power_of_two());
            let bytes = slots as usize * cpus * std::mem::size_of::<abi::ConnEvent>();
            assert!(bytes <= LOG_MAX_BYTES || slots == 64, "{bytes} bytes");
        }
        // every CPU's share of two events per connection fits, under the cap
        for cpus in 1..=16 {
            let slots = log_slots(16_384, cpus) as usize;
            assert!(slots * cpus >= 2 * 16_384, "{cpus} CPUs: {slots} slots each");
        }
    }

    #[test]
    fn events_are_ordered_by_when_they_happened() {
        let ev = |state, start_ns, end_ns| abi::ConnEvent {
            conn: abi::Conn { state, start_ns, end_ns, ..Default::default() },
            ..Default::default()
        };
        // an open at 5, a close at 3 (opened before the agent), a failure at 9
        let mut events = [ev(abi::CONN_FAILED, 0, 9), ev(abi::CONN_ESTABLISHED, 5, 0), ev(abi::CONN_CLOSED, 1, 3)];
        events.sort_by_key(event_time);
        let times: Vec<u64> = events.iter().map(event_time).collect();
        assert_eq!(times, [3, 5, 9]);
        assert_eq!(events[1].conn.state, abi::CONN_ESTABLISHED);
    }
}

//! Rust mirrors of the structs in `ebpf/include/nodescope.h`.
//!
//! The C header is the definition. `layout` holds sizes and offsets measured
//! from that header at build time; the asserts below fail the build when a
//! mirror drifts from it.

use std::mem::{offset_of, size_of};

#[allow(non_upper_case_globals, dead_code)]
mod layout {
    include!(concat!(env!("OUT_DIR"), "/layout.rs"));
}

/// NS_MAX_TARGETS: targets one agent watches.
pub const MAX_TARGETS: usize = 64;

/// NS_LAYOUT_VERSION: the layout of the maps kept pinned across restarts.
pub const LAYOUT_VERSION: u32 = 1;

pub const DIR_INBOUND: u8 = 1;
pub const DIR_OUTBOUND: u8 = 2;

pub const CONN_CONNECTING: u8 = 0;
pub const CONN_ESTABLISHED: u8 = 1;
pub const CONN_CLOSED: u8 = 2;
pub const CONN_FAILED: u8 = 3;

pub const CONN_F_FIN_SENT: u8 = 1;
pub const CONN_F_FIN_RECEIVED: u8 = 2;

pub const NET_STAT_CONN_DROPPED: u32 = 0;
pub const NET_STAT_EVENTS_FULL: u32 = 1;

/// `struct ns_conn`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Conn {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    pub target: u32,
    pub tgid: u32,
    pub netns: u32,
    pub family: u16,
    pub lport: u16,
    pub rport: u16,
    pub direction: u8,
    pub state: u8,
    pub flags: u8,
    pub _pad: [u8; 3],
    pub error: i32,
}

// SAFETY: plain old data, every bit pattern is valid, no padding left implicit
// (checked against the C layout below).
unsafe impl aya::Pod for Conn {}

const _: () = {
    assert!(size_of::<Conn>() == layout::ns_conn_SIZE);
    assert!(offset_of!(Conn, bytes_sent) == layout::ns_conn_bytes_sent);
    assert!(offset_of!(Conn, bytes_received) == layout::ns_conn_bytes_received);
    assert!(offset_of!(Conn, start_ns) == layout::ns_conn_start_ns);
    assert!(offset_of!(Conn, end_ns) == layout::ns_conn_end_ns);
    assert!(offset_of!(Conn, laddr) == layout::ns_conn_laddr);
    assert!(offset_of!(Conn, raddr) == layout::ns_conn_raddr);
    assert!(offset_of!(Conn, target) == layout::ns_conn_target);
    assert!(offset_of!(Conn, tgid) == layout::ns_conn_tgid);
    assert!(offset_of!(Conn, netns) == layout::ns_conn_netns);
    assert!(offset_of!(Conn, family) == layout::ns_conn_family);
    assert!(offset_of!(Conn, lport) == layout::ns_conn_lport);
    assert!(offset_of!(Conn, rport) == layout::ns_conn_rport);
    assert!(offset_of!(Conn, direction) == layout::ns_conn_direction);
    assert!(offset_of!(Conn, state) == layout::ns_conn_state);
    assert!(offset_of!(Conn, flags) == layout::ns_conn_flags);
    assert!(offset_of!(Conn, error) == layout::ns_conn_error);
    assert!(MAX_TARGETS == layout::NS_MAX_TARGETS as usize);
    assert!(LAYOUT_VERSION == layout::NS_LAYOUT_VERSION);
    assert!(DIR_INBOUND as u32 == layout::NS_DIR_INBOUND && DIR_OUTBOUND as u32 == layout::NS_DIR_OUTBOUND);
    assert!(CONN_ESTABLISHED as u32 == layout::NS_CONN_ESTABLISHED);
    assert!(CONN_CLOSED as u32 == layout::NS_CONN_CLOSED && CONN_FAILED as u32 == layout::NS_CONN_FAILED);
    assert!(CONN_F_FIN_SENT as u32 == layout::NS_CONN_F_FIN_SENT);
    assert!(CONN_F_FIN_RECEIVED as u32 == layout::NS_CONN_F_FIN_RECEIVED);
    assert!(NET_STAT_CONN_DROPPED == layout::NS_NET_STAT_CONN_DROPPED);
    assert!(NET_STAT_EVENTS_FULL == layout::NS_NET_STAT_EVENTS_FULL);
    assert!(size_of::<ConnEvent>() == layout::ns_conn_event_SIZE);
    assert!(offset_of!(ConnEvent, seq) == layout::ns_conn_event_seq);
    assert!(offset_of!(ConnEvent, cookie) == layout::ns_conn_event_cookie);
    assert!(offset_of!(ConnEvent, conn) == layout::ns_conn_event_conn);
    assert!(size_of::<LogPos>() == layout::ns_log_pos_SIZE);
    assert!(offset_of!(LogPos, written) == layout::ns_log_pos_written);
    assert!(offset_of!(LogPos, read) == layout::ns_log_pos_read);
};

/// `struct ns_conn_event`: an accepted, closed or failed connection, from
/// a CPU's event log.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnEvent {
    pub seq: u64,
    pub cookie: u64,
    pub conn: Conn,
}

/// `struct ns_log_pos`: where one CPU's event log stands.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct LogPos {
    pub written: u64,
    pub read: u64,
    pub _pad: [u64; 6],
}

// SAFETY: plain old data (checked against the C layout above).
unsafe impl aya::Pod for LogPos {}

// ---- scope (scope.bpf.h) ----

/// NS_TARGET_PENDING: a process exec'd under a node's name, not yet assigned.
pub const TARGET_PENDING: u32 = u32::MAX;
pub const COMM_LEN: usize = 16;
pub const CGROUP_PATH_LEN: usize = 128;

pub const SCOPE_STAT_PIDS_FULL: u32 = 0;
pub const SCOPE_STAT_CGROUPS_FULL: u32 = 1;
pub const SCOPE_STAT_PORTS_FULL: u32 = 2;
pub const SCOPE_STAT_EVENTS_LOST: u32 = 3;

/// `struct ns_port_key`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

/// `struct ns_comm`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Comm {
    pub name: [u8; COMM_LEN],
}

/// `struct ns_cgroup_path`
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CgroupPath {
    pub path: [u8; CGROUP_PATH_LEN],
}

/// `struct ns_scope_event`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ScopeEvent {
    pub tgid: u32,
    pub target: u32,
    pub comm: [u8; COMM_LEN],
}

// SAFETY: plain old data, every bit pattern valid, no implicit padding
// (checked against the C layout below).
unsafe impl aya::Pod for ConnEvent {}
unsafe impl aya::Pod for PortKey {}
unsafe impl aya::Pod for Comm {}
unsafe impl aya::Pod for CgroupPath {}
unsafe impl aya::Pod for ScopeEvent {}

const _: () = {
    assert!(TARGET_PENDING == layout::NS_TARGET_PENDING);
    assert!(COMM_LEN == layout::NS_COMM_LEN as usize);
    assert!(CGROUP_PATH_LEN == layout::NS_CGROUP_PATH_LEN as usize);
    assert!(size_of::<PortKey>() == layout::ns_port_key_SIZE);
    assert!(offset_of!(PortKey, netns) == layout::ns_port_key_netns);
    assert!(offset_of!(PortKey, port) == layout::ns_port_key_port);
    assert!(size_of::<Comm>() == layout::ns_comm_SIZE);
    assert!(size_of::<CgroupPath>() == layout::ns_cgroup_path_SIZE);
    assert!(size_of::<ScopeEvent>() == layout::ns_scope_event_SIZE);
    assert!(offset_of!(ScopeEvent, tgid) == layout::ns_scope_event_tgid);
    assert!(offset_of!(ScopeEvent, target) == layout::ns_scope_event_target);
    assert!(offset_of!(ScopeEvent, comm) == layout::ns_scope_event_comm);
    assert!(SCOPE_STAT_PIDS_FULL == layout::NS_SCOPE_STAT_PIDS_FULL);
    assert!(SCOPE_STAT_CGROUPS_FULL == layout::NS_SCOPE_STAT_CGROUPS_FULL);
    assert!(SCOPE_STAT_PORTS_FULL == layout::NS_SCOPE_STAT_PORTS_FULL);
    assert!(SCOPE_STAT_EVENTS_LOST == layout::NS_SCOPE_STAT_EVENTS_LOST);
};

// ---- disk signal (disk.bpf.c, disk_syscalls.bpf.c) ----

/// Index of a way of writing in `DiskCounts::bytes` / `calls` (NS_DISK_WRITE...).
pub const DISK_WRITE: usize = 0;
pub const DISK_PWRITE64: usize = 1;
pub const DISK_WRITEV: usize = 2;
pub const DISK_PWRITEV: usize = 3;
pub const DISK_PWRITEV2: usize = 4;
pub const DISK_COPY_FILE_RANGE: usize = 5;
pub const DISK_SENDFILE: usize = 6;
pub const DISK_SPLICE: usize = 7;
pub const DISK_IO_URING: usize = 8;
pub const DISK_MMAP: usize = 9;
pub const DISK_WRITE_OTHER: usize = 10;
pub const DISK_WRITE_CALLS: usize = 11;

/// Index of a sync call in `DiskCounts::syncs` and `DiskSyncKey::call` (NS_DISK_FSYNC...).
pub const DISK_FSYNC: usize = 0;
pub const DISK_FDATASYNC: usize = 1;
pub const DISK_MSYNC: usize = 2;
pub const DISK_SYNC_FILE_RANGE: usize = 3;
pub const DISK_SYNC_IO_URING: usize = 4;
pub const DISK_SYNC_OTHER: usize = 5;
pub const DISK_SYNC_CALLS: usize = 6;

pub const DISK_PATH_DEPTH: usize = 8;
pub const DISK_NAME_LEN: usize = 32;
pub const DISK_F_DEEP: u16 = 2;
pub const DISK_F_NO_NAME: u16 = 4;
pub const DISK_SYNC_SLOTS: usize = 27;

pub const DISK_STAT_FILES_FULL: u32 = 0;
pub const DISK_STAT_SYNCS_FULL: u32 = 1;
pub const DISK_STAT_INFLIGHT_FULL: u32 = 2;
pub const DISK_STAT_MAX: u32 = 3;

/// `struct ns_disk_key`: one file (device, inode) of one target, in one
/// half of the read cycle.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DiskKey {
    pub ino: u64,
    pub dev: u32,
    pub target: u32,
    pub tgid: u32,
    pub epoch: u32,
}

/// `struct ns_disk_file`: a file's count slot and the names of its path.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DiskFile {
    pub slot: u32,
    pub fs_magic: u32,
    pub flags: u16,
    pub depth: u16,
    pub _pad: u32,
    pub names: [[u8; DISK_NAME_LEN]; DISK_PATH_DEPTH],
}

impl Default for DiskFile {
    fn default() -> Self {
        DiskFile { slot: 0, fs_magic: 0, flags: 0, depth: 0, _pad: 0, names: [[0; DISK_NAME_LEN]; DISK_PATH_DEPTH] }
    }
}

impl DiskFile {
    /// The kept path components, root side first (the kernel stores them
    /// leaf first). The filesystem root's own name "/" is left out.
    pub fn components(&self) -> Vec<String> {
        let depth = usize::from(self.depth).min(DISK_PATH_DEPTH);
        self.names[..depth]
            .iter()
            .rev()
            .map(|raw| {
                let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
                String::from_utf8_lossy(&raw[..end]).into_owned()
            })
            .filter(|c| c != "/" && !c.is_empty())
            .collect()
    }
}

/// `struct ns_disk_counts`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskCounts {
    pub bytes: [u64; DISK_WRITE_CALLS],
    pub calls: [u64; DISK_WRITE_CALLS],
    pub syncs: [u64; DISK_SYNC_CALLS],
    pub sync_errors: [u64; DISK_SYNC_CALLS],
}

/// `struct ns_disk_pending`: one CPU's writes of a half not yet moved into
/// their count slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskPending {
    /// The count slot + 1; 0: empty.
    pub slot: u32,
    pub call: u32,
    pub bytes: u64,
    pub calls: u64,
}

/// NS_DISK_ALLOC_PER_HALF: the ns_disk_alloc entry holding the slots per half.
pub const DISK_ALLOC_PER_HALF: u32 = 2;

/// `struct ns_disk_sync_key`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DiskSyncKey {
    pub file: DiskKey,
    pub call: u32,
    pub _pad: u32,
}

/// `struct ns_disk_sync_hist`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DiskSyncHist {
    pub count: [u64; DISK_SYNC_SLOTS],
    pub sum_ns: [u64; DISK_SYNC_SLOTS],
    pub errors: u64,
}

// SAFETY: plain old data, every bit pattern is valid, no implicit padding
// (sizes and offsets checked against the C layout below).
unsafe impl aya::Pod for DiskKey {}
unsafe impl aya::Pod for DiskFile {}
unsafe impl aya::Pod for DiskCounts {}
unsafe impl aya::Pod for DiskPending {}
unsafe impl aya::Pod for DiskSyncKey {}
unsafe impl aya::Pod for DiskSyncHist {}

const _: () = {
    assert!(size_of::<DiskKey>() == layout::ns_disk_key_SIZE);
    assert!(offset_of!(DiskKey, ino) == layout::ns_disk_key_ino);
    assert!(offset_of!(DiskKey, dev) == layout::ns_disk_key_dev);
    assert!(offset_of!(DiskKey, target) == layout::ns_disk_key_target);
    assert!(offset_of!(DiskKey, tgid) == layout::ns_disk_key_tgid);
    assert!(offset_of!(DiskKey, epoch) == layout::ns_disk_key_epoch);
    assert!(size_of::<DiskFile>() == layout::ns_disk_file_SIZE);
    assert!(offset_of!(DiskFile, slot) == layout::ns_disk_file_slot);
    assert!(offset_of!(DiskFile, fs_magic) == layout::ns_disk_file_fs_magic);
    assert!(offset_of!(DiskFile, flags) == layout::ns_disk_file_flags);
    assert!(offset_of!(DiskFile, depth) == layout::ns_disk_file_depth);
    assert!(offset_of!(DiskFile, names) == layout::ns_disk_file_names);
    assert!(size_of::<DiskCounts>() == layout::ns_disk_counts_SIZE);
    assert!(offset_of!(DiskCounts, bytes) == layout::ns_disk_counts_bytes);
    assert!(offset_of!(DiskCounts, calls) == layout::ns_disk_counts_calls);
    assert!(offset_of!(DiskCounts, syncs) == layout::ns_disk_counts_syncs);
    assert!(offset_of!(DiskCounts, sync_errors) == layout::ns_disk_counts_sync_errors);
    assert!(size_of::<DiskPending>() == layout::ns_disk_pending_SIZE);
    assert!(offset_of!(DiskPending, slot) == layout::ns_disk_pending_slot);
    assert!(offset_of!(DiskPending, call) == layout::ns_disk_pending_call);
    assert!(offset_of!(DiskPending, bytes) == layout::ns_disk_pending_bytes);
    assert!(offset_of!(DiskPending, calls) == layout::ns_disk_pending_calls);
    assert!(DISK_ALLOC_PER_HALF == layout::NS_DISK_ALLOC_PER_HALF);
    assert!(size_of::<DiskSyncKey>() == layout::ns_disk_sync_key_SIZE);
    assert!(offset_of!(DiskSyncKey, file) == layout::ns_disk_sync_key_file);
    assert!(offset_of!(DiskSyncKey, call) == layout::ns_disk_sync_key_call);
    assert!(size_of::<DiskSyncHist>() == layout::ns_disk_sync_hist_SIZE);
    assert!(offset_of!(DiskSyncHist, count) == layout::ns_disk_sync_hist_count);
    assert!(offset_of!(DiskSyncHist, sum_ns) == layout::ns_disk_sync_hist_sum_ns);
    assert!(offset_of!(DiskSyncHist, errors) == layout::ns_disk_sync_hist_errors);
    assert!(DISK_WRITE as u32 == layout::NS_DISK_WRITE && DISK_PWRITE64 as u32 == layout::NS_DISK_PWRITE64);
    assert!(DISK_WRITEV as u32 == layout::NS_DISK_WRITEV && DISK_PWRITEV as u32 == layout::NS_DISK_PWRITEV);
    assert!(DISK_PWRITEV2 as u32 == layout::NS_DISK_PWRITEV2);
    assert!(
        DISK_COPY_FILE_RANGE as u32 == layout::NS_DISK_COPY_FILE_RANGE
            && DISK_SENDFILE as u32 == layout::NS_DISK_SENDFILE
    );
    assert!(DISK_SPLICE as u32 == layout::NS_DISK_SPLICE && DISK_IO_URING as u32 == layout::NS_DISK_IO_URING);
    assert!(DISK_MMAP as u32 == layout::NS_DISK_MMAP && DISK_WRITE_OTHER as u32 == layout::NS_DISK_WRITE_OTHER);
    assert!(DISK_WRITE_CALLS as u32 == layout::NS_DISK_WRITE_CALLS);
    assert!(DISK_FSYNC as u32 == layout::NS_DISK_FSYNC && DISK_FDATASYNC as u32 == layout::NS_DISK_FDATASYNC);
    assert!(
        DISK_MSYNC as u32 == layout::NS_DISK_MSYNC && DISK_SYNC_FILE_RANGE as u32 == layout::NS_DISK_SYNC_FILE_RANGE
    );
    assert!(
        DISK_SYNC_IO_URING as u32 == layout::NS_DISK_SYNC_IO_URING
            && DISK_SYNC_OTHER as u32 == layout::NS_DISK_SYNC_OTHER
    );
    assert!(DISK_SYNC_CALLS as u32 == layout::NS_DISK_SYNC_CALLS);
    assert!(DISK_PATH_DEPTH as u32 == layout::NS_DISK_PATH_DEPTH && DISK_NAME_LEN as u32 == layout::NS_DISK_NAME_LEN);
    assert!(DISK_F_DEEP as u32 == layout::NS_DISK_F_DEEP && DISK_F_NO_NAME as u32 == layout::NS_DISK_F_NO_NAME);
    assert!(DISK_SYNC_SLOTS as u32 == layout::NS_DISK_SYNC_SLOTS);
    assert!(DISK_STAT_FILES_FULL == layout::NS_DISK_STAT_FILES_FULL);
    assert!(DISK_STAT_SYNCS_FULL == layout::NS_DISK_STAT_SYNCS_FULL);
    assert!(DISK_STAT_INFLIGHT_FULL == layout::NS_DISK_STAT_INFLIGHT_FULL);
    assert!(DISK_STAT_MAX == layout::NS_DISK_STAT_MAX);
};

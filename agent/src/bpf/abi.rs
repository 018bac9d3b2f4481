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

pub const DIR_UNKNOWN: u8 = 0;
pub const DIR_INBOUND: u8 = 1;
pub const DIR_OUTBOUND: u8 = 2;

pub const CONN_CONNECTING: u8 = 0;
pub const CONN_ESTABLISHED: u8 = 1;
pub const CONN_CLOSED: u8 = 2;
pub const CONN_FAILED: u8 = 3;

pub const CONN_F_FIN_ACKED: u8 = 1;
pub const CONN_F_FIN_RECEIVED: u8 = 2;

pub const NET_STAT_CONN_DROPPED: u32 = 0;
pub const NET_STAT_STATE_EVENTS: u32 = 1;
pub const NET_STAT_ITER_SOCKETS: u32 = 2;

/// `struct ns_conn`
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Conn {
    pub bytes_acked: u64,
    pub bytes_received: u64,
    pub start_ns: u64,
    pub end_ns: u64,
    pub laddr: [u8; 16],
    pub raddr: [u8; 16],
    pub target: u32,
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
    assert!(offset_of!(Conn, bytes_acked) == layout::ns_conn_bytes_acked);
    assert!(offset_of!(Conn, bytes_received) == layout::ns_conn_bytes_received);
    assert!(offset_of!(Conn, start_ns) == layout::ns_conn_start_ns);
    assert!(offset_of!(Conn, end_ns) == layout::ns_conn_end_ns);
    assert!(offset_of!(Conn, laddr) == layout::ns_conn_laddr);
    assert!(offset_of!(Conn, raddr) == layout::ns_conn_raddr);
    assert!(offset_of!(Conn, target) == layout::ns_conn_target);
    assert!(offset_of!(Conn, family) == layout::ns_conn_family);
    assert!(offset_of!(Conn, lport) == layout::ns_conn_lport);
    assert!(offset_of!(Conn, rport) == layout::ns_conn_rport);
    assert!(offset_of!(Conn, direction) == layout::ns_conn_direction);
    assert!(offset_of!(Conn, state) == layout::ns_conn_state);
    assert!(offset_of!(Conn, flags) == layout::ns_conn_flags);
    assert!(offset_of!(Conn, error) == layout::ns_conn_error);
    assert!(MAX_TARGETS == layout::NS_MAX_TARGETS as usize);
    assert!(DIR_INBOUND as u32 == layout::NS_DIR_INBOUND && DIR_OUTBOUND as u32 == layout::NS_DIR_OUTBOUND);
    assert!(CONN_ESTABLISHED as u32 == layout::NS_CONN_ESTABLISHED);
    assert!(CONN_CLOSED as u32 == layout::NS_CONN_CLOSED && CONN_FAILED as u32 == layout::NS_CONN_FAILED);
    assert!(CONN_F_FIN_ACKED as u32 == layout::NS_CONN_F_FIN_ACKED);
    assert!(CONN_F_FIN_RECEIVED as u32 == layout::NS_CONN_F_FIN_RECEIVED);
    assert!(NET_STAT_CONN_DROPPED == layout::NS_NET_STAT_CONN_DROPPED);
    assert!(NET_STAT_ITER_SOCKETS == layout::NS_NET_STAT_ITER_SOCKETS);
};

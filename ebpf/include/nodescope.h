/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The structs and constants that nodescope's eBPF programs share with the
 * agent. This header is the single definition: the agent's Rust mirrors
 * (agent/src/bpf/abi.rs) are checked at compile time against sizes and
 * offsets that `cargo xtask build-ebpf` measures from this very file, so a
 * change here that is not made there breaks the build.
 *
 * Plain C types only: the file is compiled both for the BPF target and for
 * the host (the layout probe).
 */
#ifndef NODESCOPE_H
#define NODESCOPE_H

#include <linux/types.h>

/* ---- network signal (net.bpf.c) ---------------------------------------- */

/* Who opened the connection. UNKNOWN: it existed before nodescope started
 * and the agent decides from the target's listening ports. */
#define NS_DIR_UNKNOWN 0
#define NS_DIR_INBOUND 1
#define NS_DIR_OUTBOUND 2

/* Life of a connection record. CLOSED and FAILED records are tombstones:
 * the agent reads their final figures and deletes them. */
#define NS_CONN_CONNECTING 0
#define NS_CONN_ESTABLISHED 1
#define NS_CONN_CLOSED 2
#define NS_CONN_FAILED 3

/* One TCP connection of a watched node, keyed by socket cookie. */
struct ns_conn {
	__u64 bytes_acked;    /* tcp_sock.bytes_acked: counts the SYN of an outbound
	                       * connection and an acknowledged FIN; see flags */
	__u64 bytes_received; /* tcp_sock.bytes_received: counts a received FIN */
	__u64 start_ns;       /* CLOCK_BOOTTIME at establishment; 0 = before nodescope */
	__u64 end_ns;         /* CLOCK_BOOTTIME at close or failure; 0 = open */
	__u8 laddr[16];       /* IPv4 in the first 4 bytes, network order */
	__u8 raddr[16];
	__u32 target;         /* index of the watched node, see ns_target_* maps */
	__u16 family;         /* AF_INET or AF_INET6 */
	__u16 lport;          /* host order */
	__u16 rport;          /* host order */
	__u8 direction;       /* NS_DIR_* */
	__u8 state;           /* NS_CONN_* */
	__u8 flags;           /* NS_CONN_F_* */
	__u8 _pad[3];
	__s32 error;          /* sk_err when a connect failed (ECONNREFUSED, ETIMEDOUT, ...) */
};

/* Sequence-number bytes the raw counters hold beyond the payload, so the
 * agent can report exactly what the node wrote and read. */
#define NS_CONN_F_FIN_ACKED 1    /* our FIN was acknowledged: bytes_acked + 1 */
#define NS_CONN_F_FIN_RECEIVED 2 /* the peer's FIN arrived: bytes_received + 1 */

/* Indices of the per-CPU stats array of net.bpf.c. */
#define NS_NET_STAT_CONN_DROPPED 0  /* connection not tracked: conns map full */
#define NS_NET_STAT_STATE_EVENTS 1  /* state changes of watched sockets seen */
#define NS_NET_STAT_ITER_SOCKETS 2  /* watched sockets visited by the iterator */
#define NS_NET_STAT_MAX 3

/* ---- disk signal (disk.bpf.c) ------------------------------------------ */

#define NS_MAX_TARGETS 64

#endif

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

/* Targets (watched nodes) one agent serves; their index is the value of
 * every signal's target maps. */
#define NS_MAX_TARGETS 64

/* The layout of every map the agent keeps pinned across its restarts
 * (/sys/fs/bpf/nodescope/v<N>/): raise it whenever a pinned map's key,
 * value, size or meaning changes, so that a new agent replaces the pins of
 * an old one instead of misreading them. */
#define NS_LAYOUT_VERSION 1

/* ---- scope (scope.bpf.h, compiled into each signal's object) ----------- */

/* Target value of a process the kernel saw exec under a node's process name
 * before user space knew which node it is (discovery): user space assigns it
 * by tgid, and reassigns the records made meanwhile. */
#define NS_TARGET_PENDING 0xffffffffu

/* A listening port in one network namespace: two containers that both
 * listen on 19444 are two keys. */
struct ns_port_key {
	__u32 netns; /* inode of the network namespace */
	__u16 port;  /* host order */
	__u16 _pad;
};

#define NS_COMM_LEN 16
struct ns_comm {
	char name[NS_COMM_LEN];
};

/* A cgroup2 path relative to the hierarchy's root, as the cgroup_mkdir
 * tracepoint gives it ("/libpod_parent/libpod-ab12..."), NUL-padded. */
#define NS_CGROUP_PATH_LEN 128
struct ns_cgroup_path {
	char path[NS_CGROUP_PATH_LEN];
};

/* A process exec'd under a watched process name: user space resolves it now
 * rather than at its next pass. */
struct ns_scope_event {
	__u32 tgid;
	__u32 target; /* NS_TARGET_PENDING when not known yet */
	char comm[NS_COMM_LEN];
};

/* Indices of the per-CPU scope stats array (one per signal object). */
#define NS_SCOPE_STAT_PIDS_FULL 0    /* a process not watched: pids map full */
#define NS_SCOPE_STAT_CGROUPS_FULL 1 /* a new cgroup not watched: cgroups map full */
#define NS_SCOPE_STAT_PORTS_FULL 2   /* a listening port not watched: ports map full */
#define NS_SCOPE_STAT_EVENTS_LOST 3  /* an exec event not delivered: ring buffer full */
#define NS_SCOPE_STAT_MAX 4

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
	__u64 bytes_sent;     /* sequence space the node queued: bytes_acked plus
	                       * what is queued but not yet acknowledged; counts the
	                       * SYN of an outbound connection and a sent FIN */
	__u64 bytes_received; /* tcp_sock.bytes_received: counts a received FIN */
	__u64 start_ns;       /* CLOCK_BOOTTIME at establishment; 0 = before nodescope */
	__u64 end_ns;         /* CLOCK_BOOTTIME at close or failure; 0 = open */
	__u8 laddr[16];       /* IPv4 in the first 4 bytes, network order */
	__u8 raddr[16];
	__u32 target;         /* index of the watched node, or NS_TARGET_PENDING */
	__u32 tgid;           /* the process that connected (outbound); 0 otherwise */
	__u32 netns;          /* inode of the socket's network namespace */
	__u16 family;         /* AF_INET or AF_INET6 */
	__u16 lport;          /* host order */
	__u16 rport;          /* host order */
	__u8 direction;       /* NS_DIR_* */
	__u8 state;           /* NS_CONN_* */
	__u8 flags;           /* NS_CONN_F_* */
	__u8 _pad[3];
	__s32 error;          /* sk_err when a connect failed (ECONNREFUSED, ETIMEDOUT,
	                       * ...); 0 when the node itself gave up on the connect */
};

/* Sequence-number bytes the counters hold beyond the payload, so the agent
 * can report exactly what the node wrote and read, whichever side closed. */
#define NS_CONN_F_FIN_SENT 1     /* the node queued its FIN: bytes_sent + 1 */
#define NS_CONN_F_FIN_RECEIVED 2 /* the peer's FIN arrived: bytes_received + 1 */

/* A connection sent to user space as it happens, through the event log of
 * the CPU it happened on: accepted (state ESTABLISHED: the "opened" event,
 * with its direction and start), or closed or failed (with its final
 * figures, so no later state change can overwrite them; direction UNKNOWN
 * and start 0 when it closed before it had a record: the agent has both
 * from its "opened" event). */
struct ns_conn_event {
	__u64 seq;    /* its position in its CPU's log plus one, written last:
	               * the entry is whole once seq says so */
	__u64 cookie;
	struct ns_conn conn;
};

/* Where one CPU's event log stands (ns_log_pos[cpu]); one cache line each,
 * so CPUs never share one. Positions only grow; entry n of CPU c is
 * ns_conn_log[c * slots + n % slots]. */
struct ns_log_pos {
	__u64 written; /* entries taken by this CPU's program runs */
	__u64 read;    /* entries the agent has read; written by the agent only */
	__u64 _pad[6];
};

/* Indices of the per-CPU stats array of net.bpf.c. */
#define NS_NET_STAT_CONN_DROPPED 0  /* connection not tracked: conns map full */
#define NS_NET_STAT_EVENTS_FULL 1   /* event kept as a map record instead: its CPU's log full */
#define NS_NET_STAT_MAX 2

/* ---- disk signal (disk.bpf.c, disk_syscalls.bpf.c) ---------------------- */

/* How bytes reached a file: index into ns_disk_counts.bytes/calls. The
 * filesystem hooks (disk.bpf.c) name the call by the syscall the writing
 * thread is in; the syscall method (disk_syscalls.bpf.c) only sees the first
 * five. */
#define NS_DISK_WRITE 0
#define NS_DISK_PWRITE64 1
#define NS_DISK_WRITEV 2
#define NS_DISK_PWRITEV 3
#define NS_DISK_PWRITEV2 4
#define NS_DISK_COPY_FILE_RANGE 5
#define NS_DISK_SENDFILE 6
#define NS_DISK_SPLICE 7
#define NS_DISK_IO_URING 8     /* io_uring_enter, or an io_uring worker thread */
#define NS_DISK_MMAP 9         /* folios dirtied by stores through a shared writable mapping */
#define NS_DISK_WRITE_OTHER 10 /* any other path into the filesystem's write */
#define NS_DISK_WRITE_CALLS 11

/* Sync calls: index into ns_disk_counts.syncs and ns_disk_sync_key.call. */
#define NS_DISK_FSYNC 0
#define NS_DISK_FDATASYNC 1
#define NS_DISK_MSYNC 2
#define NS_DISK_SYNC_FILE_RANGE 3 /* the syscall method only: it is no fsync */
#define NS_DISK_SYNC_IO_URING 4
#define NS_DISK_SYNC_OTHER 5
#define NS_DISK_SYNC_CALLS 6

/* A file's path is kept as its last NS_DISK_PATH_DEPTH components, leaf
 * first, each cut to NS_DISK_NAME_LEN - 1 bytes: enough to tell
 * blocks/index/000012.ldb from blocks/blk00042.dat, which is all the file
 * classes need. */
#define NS_DISK_PATH_DEPTH 8
#define NS_DISK_NAME_LEN 32

#define NS_DISK_F_DEEP 2     /* the path has more components than were kept */
#define NS_DISK_F_NO_NAME 4  /* the inode had no dentry to name it */

/* One file (device, inode) of one watched node in one half of the agent's
 * read cycle. The agent advances ns_disk_epoch (a round number; its low bit
 * names the half the programs write) every interval, waits for an RCU grace
 * period (no program still in the old half), then takes every file of the
 * old half with an atomic lookup-and-delete, reads its counts and frees the
 * half's count slots: no count is read twice or lost, and the maps hold only
 * the files written in the last two intervals. */
struct ns_disk_key {
	__u64 ino;
	__u32 dev;    /* the file's superblock s_dev, kernel encoding */
	__u32 target; /* index of the watched node, or NS_TARGET_PENDING */
	__u32 tgid;   /* the writer, for NS_TARGET_PENDING records only; else 0 */
	__u32 epoch;  /* the half: 0 or 1 */
};

/* What is known of the file, made once per half: where its counts are and
 * the names of its path. */
struct ns_disk_file {
	__u32 slot;     /* index of its ns_disk_counts */
	__u32 fs_magic; /* the file's superblock s_magic */
	__u16 flags;    /* NS_DISK_F_* */
	__u16 depth;    /* components filled in names */
	__u32 _pad;
	char names[NS_DISK_PATH_DEPTH][NS_DISK_NAME_LEN]; /* leaf first, NUL-terminated */
};

/* Its counts, in a preallocated array the hot path reaches by index: half
 * h owns slots [h * per_half, (h + 1) * per_half). */
struct ns_disk_counts {
	__u64 bytes[NS_DISK_WRITE_CALLS];       /* NS_DISK_MMAP: whole folios */
	__u64 calls[NS_DISK_WRITE_CALLS];       /* write syscalls (see disk.md); MMAP: folios */
	__u64 syncs[NS_DISK_SYNC_CALLS];        /* sync calls that reached the filesystem */
	__u64 sync_errors[NS_DISK_SYNC_CALLS];  /* of those, the ones known to have failed */
};

/* Per CPU and half (ns_disk_pending): what the CPU's writes added to one
 * count slot's bytes[call] and calls[call] since it last moved them there.
 * Writes add to it with plain adds (no atomic, no shared cache line); a
 * write to another (slot, call) on the CPU moves it into its slot first
 * (atomic adds), and the agent adds what is left to the slots when it reads
 * the half, then zeroes it. */
struct ns_disk_pending {
	__u32 slot; /* the count slot + 1; 0: empty */
	__u32 call; /* NS_DISK_WRITE... */
	__u64 bytes;
	__u64 calls;
};

/* ns_disk_alloc: the next free count slot of each half, and the slots per half. */
#define NS_DISK_ALLOC_PER_HALF 2

/* Latency histogram of one sync call on one file, for the syncs that are
 * timed (ext4's enter and exit tracepoints; every sync of the syscall
 * method). Same epoch as the file's record. */
struct ns_disk_sync_key {
	struct ns_disk_key file;
	__u32 call; /* NS_DISK_FSYNC... */
	__u32 _pad;
};

/* Slot i counts calls that took [2^i, 2^(i+1)) microseconds (slot 0: under
 * 2us); the last slot also takes everything slower. */
#define NS_DISK_SYNC_SLOTS 27

struct ns_disk_sync_hist {
	__u64 count[NS_DISK_SYNC_SLOTS];
	__u64 sum_ns[NS_DISK_SYNC_SLOTS];   /* per slot, so the agent can export exact sums */
	__u64 errors;                       /* calls that returned an error (not in the slots) */
};

/* Indices of the per-CPU stats array of the disk objects. */
#define NS_DISK_STAT_FILES_FULL 0    /* counts not kept: records map full */
#define NS_DISK_STAT_SYNCS_FULL 1    /* a sync call not timed: syncs map full */
#define NS_DISK_STAT_INFLIGHT_FULL 2 /* a watched task got no state slot (task storage) */
#define NS_DISK_STAT_MAX 3

#endif

// SPDX-License-Identifier: GPL-2.0
/*
 * net: the TCP connections of watched nodes, one record per connection.
 *
 * Two programs share the record map:
 *  - on_tcp_state (tp_btf/inet_sock_set_state) sees every state change of
 *    every TCP socket and keeps the watched ones. A connect makes a record
 *    (it needs the connecting task, gone by the time of any later state
 *    change); an accepted connection only sends an "opened" event through
 *    its CPU's event log, its record is made by the next iterator pass (writing
 *    a new map record costs about a microsecond of cold memory per
 *    connection, most of the program's time on a busy node, and most inbound
 *    connections of a busy node are short). A close or failure goes to user
 *    space at once through the event log with the final byte counts read
 *    from the socket, and the record, if any, is deleted.
 *  - tcp_iter (iter/tcp) is run by the agent once per interval in each
 *    watched network namespace (an iterator lists the namespace it was made
 *    in): it copies the live byte counters of open connections into their
 *    records, and makes the records of watched connections that have none:
 *    accepted since the last pass, or open before the agent started.
 * Bytes come from the kernel's own per-socket counters, so no per-packet hook
 * is needed and the agent only reads one map per interval.
 *
 * A socket is watched when the cgroup2 group it was created in is a watched
 * group (scope.bpf.h keeps that set, subtrees included), or, for nodes that
 * share their cgroup, when the connect() came from a watched process or the
 * connection was accepted on one of its listening ports in its network
 * namespace (and, for connections older than the agent, when a watched
 * process holds the socket).
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_endian.h>
#include "kernel_types.h"
#include "nodescope.h"
#include "scope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* socket inode -> target index: the sockets a watched process that shares its
 * cgroup held when the agent last looked, to adopt its older connections */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, __u32);
} ns_target_inodes SEC(".maps");

/* socket cookie -> connection record; max_entries is set by the agent. A plain
 * hash, not LRU: a full map refuses new connections (counted) rather than
 * silently evicting the records of open ones. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct ns_conn);
} ns_conns SEC(".maps");

/* Accepted, closed and failed connections, as they happen: one log per CPU,
 * each a ring of ns_log_slots entries that the agent reads in place (both
 * maps are mapped into its memory) once per interval. A shared ring buffer
 * did the same job at about 280 ns a record (its lock and its cold header);
 * a CPU's own log costs a compare-and-swap and the entry's copy.
 * max_entries of both are set by the agent (possible CPUs, and CPUs times
 * slots). */
const volatile __u32 ns_log_slots = 0; /* a power of two */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ns_log_pos);
} ns_log_pos SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ns_conn_event);
} ns_conn_log SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NS_NET_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ns_net_stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ns_net_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline __u32 sock_netns(struct sock *sk)
{
	return sk->__sk_common.skc_net.net->ns.inum;
}

/* The socket's local port. By the time a socket turns TCP_CLOSE the kernel
 * has released its port (skc_num is 0); inet_sport still holds it. */
static __always_inline __u16 local_port(struct sock *sk, struct tcp_sock *tp)
{
	__u16 port = sk->__sk_common.skc_num;
	return port ? port : bpf_ntohs(tp->inet_conn.icsk_inet.inet_sport);
}

/* Which target, if any, owns this socket. in_task: the caller runs in the
 * context of the process that acts on the socket (connect()); lport: its
 * local port (see local_port()).
 * Reads go straight through the BTF-typed socket pointer: the verifier turns
 * them into guarded loads, cheaper than a probe-read helper call each. */
static __always_inline int match_target(struct sock *sk, int in_task, __u16 lport, __u32 *target)
{
	__u64 cgid = sk->sk_cgrp_data.cgroup->kn->id;
	__u32 *t = bpf_map_lookup_elem(&ns_scope_cgroups, &cgid);
	if (t) {
		*target = *t;
		return 1;
	}
	if (in_task) {
		__u32 tgid = bpf_get_current_pid_tgid() >> 32;
		t = bpf_map_lookup_elem(&ns_scope_pids, &tgid);
	} else {
		struct ns_port_key pk = { .netns = sock_netns(sk), .port = lport };
		t = bpf_map_lookup_elem(&ns_scope_ports, &pk);
	}
	if (t) {
		*target = *t;
		return 1;
	}
	return 0;
}

static __always_inline void fill_endpoints(struct ns_conn *c, struct sock *sk)
{
	c->family = sk->__sk_common.skc_family;
	c->lport = sk->__sk_common.skc_num;
	c->rport = bpf_ntohs(sk->__sk_common.skc_dport);
	if (c->family == AF_INET) {
		__be32 l = sk->__sk_common.skc_rcv_saddr;
		__be32 r = sk->__sk_common.skc_daddr;
		__builtin_memcpy(c->laddr, &l, 4);
		__builtin_memcpy(c->raddr, &r, 4);
	} else {
		BPF_CORE_READ_INTO(&c->laddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&c->raddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
}

/* The states a socket can only be in once the node closed its side: its FIN
 * was queued on the way into FIN_WAIT1 or LAST_ACK (tcp_close_state, then
 * tcp_send_fin), and every later state comes from those two. */
#define FIN_QUEUED_STATES                                                                  \
	(1u << TCP_FIN_WAIT1 | 1u << TCP_FIN_WAIT2 | 1u << TCP_CLOSING | 1u << TCP_LAST_ACK | \
	 1u << TCP_TIME_WAIT)

/* What the node wrote is what the peer acknowledged plus what is still
 * queued (unacknowledged or unsent): the node's own "bytes sent" counts a
 * write when the kernel takes it, not when it is acknowledged.
 * tcp_state: the socket's state when it was read (before a state change,
 * the state it leaves). The FIN is read from the state rather than caught
 * on its own transition, which would cost a run of the program per close. */
static __always_inline void read_counters(struct ns_conn *c, struct tcp_sock *tp, struct sock *sk, int tcp_state)
{
	__u32 queued = tp->write_seq - tp->snd_una;
	c->bytes_sent = tp->bytes_acked + queued;
	c->bytes_received = tp->bytes_received;
	if (sk->__sk_common.skc_flags & (1UL << SOCK_DONE))
		c->flags |= NS_CONN_F_FIN_RECEIVED;
	if (tcp_state <= TCP_CLOSING && ((1u << tcp_state) & FIN_QUEUED_STATES))
		c->flags |= NS_CONN_F_FIN_SENT;
}

static __always_inline void track(struct sock *sk, __u64 cookie, __u32 target,
				  __u8 direction, __u8 state, __u64 now, __u32 tgid)
{
	struct ns_conn c = {};
	c.target = target;
	c.tgid = tgid;
	c.netns = sock_netns(sk);
	c.direction = direction;
	c.state = state;
	c.start_ns = state == NS_CONN_ESTABLISHED ? now : 0;
	fill_endpoints(&c, sk);
	if (bpf_map_update_elem(&ns_conns, &cookie, &c, BPF_ANY))
		stat_inc(NS_NET_STAT_CONN_DROPPED);
}

/* Sends a connection to user space now, whole, through this CPU's log; 0
 * when the log is full (counted: the caller keeps it as a map record for the
 * next read). The entry is taken with a compare-and-swap: a softirq run can
 * interrupt a task run on the same CPU (during an agent's handover, when two
 * generations of the program are attached, and on kernels that do not keep
 * a program from nesting), and must not take the entry being filled. */
static __always_inline int send_event(__u64 cookie, struct ns_conn *c)
{
	__u32 cpu = bpf_get_smp_processor_id();
	struct ns_log_pos *pos = bpf_map_lookup_elem(&ns_log_pos, &cpu);
	if (!pos)
		goto full;
	__u64 n = pos->written;
	if (n - pos->read >= ns_log_slots)
		goto full;
	__u32 idx = cpu * ns_log_slots + (__u32)(n & (ns_log_slots - 1));
	struct ns_conn_event *e = bpf_map_lookup_elem(&ns_conn_log, &idx);
	/* the entry first (the agent sizes the log for every CPU, so it is
	 * there): a position taken is always filled, or the agent's read of
	 * this CPU would wait on it for good */
	if (!e || !__sync_bool_compare_and_swap(&pos->written, n, n + 1))
		goto full;
	e->cookie = cookie;
	__builtin_memcpy(&e->conn, c, sizeof(*c));
	/* Last, and ordered after the entry: the agent reads an entry only once
	 * its seq is n + 1. On x86 a store is never reordered with older stores,
	 * so a plain one after a compiler barrier publishes the entry; an atomic
	 * there (a locked instruction) would wait for the entry's cold cache
	 * lines, about a fifth of the program's time. Elsewhere the atomic's
	 * barrier is what orders it. */
#if defined(__TARGET_ARCH_x86)
	asm volatile("" ::: "memory");
	*(volatile __u64 *)&e->seq = n + 1;
#else
	__sync_lock_test_and_set(&e->seq, n + 1);
#endif
	return 1;
full:
	stat_inc(NS_NET_STAT_EVENTS_FULL);
	return 0;
}

/* A closed or failed connection goes to user space now; when its CPU's log
 * is full the record stays in the map as a tombstone that the next
 * read collects instead. */
static __always_inline void finish(__u64 cookie, struct ns_conn *c)
{
	if (send_event(cookie, c))
		bpf_map_delete_elem(&ns_conns, &cookie);
}

/* An accepted connection: an "opened" event, no record (the next iterator
 * pass makes it). The record is made now only when the event finds no room. */
static __always_inline void accepted(struct sock *sk, __u32 target)
{
	struct ns_conn c = {};
	__u64 cookie = bpf_get_socket_cookie(sk);
	c.target = target;
	c.netns = sock_netns(sk);
	c.direction = NS_DIR_INBOUND;
	c.state = NS_CONN_ESTABLISHED;
	c.start_ns = bpf_ktime_get_boot_ns();
	fill_endpoints(&c, sk);
	if (!send_event(cookie, &c) && bpf_map_update_elem(&ns_conns, &cookie, &c, BPF_NOEXIST))
		stat_inc(NS_NET_STAT_CONN_DROPPED);
}

/* A watched connection closed before any iterator pass made its record: its
 * final figures, read from the socket. Direction and start time were in its
 * "opened" event; a full log leaves a tombstone record instead. */
static __always_inline void closed_untracked(struct sock *sk, struct tcp_sock *tp, __u64 cookie, __u32 target,
					     int oldstate)
{
	struct ns_conn c = {};
	c.target = target;
	c.netns = sock_netns(sk);
	c.direction = NS_DIR_UNKNOWN;
	c.state = NS_CONN_CLOSED;
	fill_endpoints(&c, sk);
	c.lport = local_port(sk, tp);
	read_counters(&c, tp, sk, oldstate);
	c.end_ns = bpf_ktime_get_boot_ns();
	if (!send_event(cookie, &c) && bpf_map_update_elem(&ns_conns, &cookie, &c, BPF_NOEXIST))
		stat_inc(NS_NET_STAT_CONN_DROPPED);
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(on_tcp_state, struct sock *sk, int oldstate, int newstate)
{
	NS_ONLY_ACTIVE();
	/* Runs for every TCP socket on the host: leave early and cheaply for the
	 * transitions and sockets that are not ours. */
	const __u32 wanted = 1u << TCP_SYN_SENT | 1u << TCP_ESTABLISHED | 1u << TCP_CLOSE;
	if (newstate > TCP_CLOSING || !((1u << newstate) & wanted))
		return 0;
	__u32 target;

	if (newstate == TCP_SYN_SENT) {
		/* connect(), in the connecting task: a new attempt. A socket may
		 * connect again after a failed attempt; that one's event is out. */
		if (match_target(sk, 1, sk->__sk_common.skc_num, &target))
			track(sk, bpf_get_socket_cookie(sk), target, NS_DIR_OUTBOUND, NS_CONN_CONNECTING,
			      bpf_ktime_get_boot_ns(), bpf_get_current_pid_tgid() >> 32);
		return 0;
	}

	/* Every watched socket got its cookie when it was first seen; a socket
	 * without one is not ours, and asking for it would make one (a global
	 * atomic) for every socket on the host. */
	__u64 cookie = sk->__sk_common.skc_cookie.counter;
	if (!cookie) {
		/* accepted: the child socket, in softirq */
		if (newstate == TCP_ESTABLISHED && oldstate == TCP_SYN_RECV &&
		    match_target(sk, 0, sk->__sk_common.skc_num, &target))
			accepted(sk, target);
		return 0;
	}
	struct ns_conn *c = bpf_map_lookup_elem(&ns_conns, &cookie);
	if (!c) {
		/* an accepted connection closing before its first iterator pass
		 * (or a socket of someone else's that has a cookie). Cookies are
		 * also given by anyone who asks (sock_diag dumps such as `ss` or
		 * the agent's own listener lookup, SO_COOKIE): a listener, a
		 * connect that never got through, or a handshake that never
		 * completed was never a connection, and is not one at its close. */
		if (newstate != TCP_CLOSE || oldstate == TCP_LISTEN || oldstate == TCP_SYN_SENT ||
		    oldstate == TCP_SYN_RECV)
			return 0;
		struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
		if (tp && match_target(sk, 0, local_port(sk, tp), &target))
			closed_untracked(sk, tp, cookie, target, oldstate);
		return 0;
	}

	if (newstate == TCP_ESTABLISHED && c->state == NS_CONN_CONNECTING) {
		c->state = NS_CONN_ESTABLISHED;
		c->start_ns = bpf_ktime_get_boot_ns();
		/* the local address is only final once the route is chosen */
		fill_endpoints(c, sk);
	} else if (newstate == TCP_CLOSE) {
		/* only a full socket has byte counters (the cast is a helper
		 * call, so it is made here, once per connection) */
		struct tcp_sock *tp = bpf_skc_to_tcp_sock(sk);
		if (!tp)
			return 0;
		read_counters(c, tp, sk, oldstate);
		c->end_ns = bpf_ktime_get_boot_ns();
		if (c->state == NS_CONN_CONNECTING) {
			c->state = NS_CONN_FAILED;
			c->error = sk->sk_err;
		} else {
			c->state = NS_CONN_CLOSED;
		}
		finish(cookie, c);
	}
	return 0;
}

SEC("iter/tcp")
int tcp_iter(struct bpf_iter__tcp *ctx)
{
	struct sock_common *skc = ctx->sk_common;
	if (!skc)
		return 0;
	struct tcp_sock *tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0; /* listeners are full sockets too, filtered below */
	struct sock *sk = (struct sock *)tp;
	__u8 st = sk->__sk_common.skc_state;
	if (st == TCP_LISTEN || st == TCP_CLOSE || st == TCP_SYN_SENT || st == TCP_SYN_RECV)
		return 0;

	/* a socket without a cookie has no record; asking for one would give
	 * every socket in the namespace a cookie */
	__u64 cookie = sk->__sk_common.skc_cookie.counter;
	struct ns_conn *c = cookie ? bpf_map_lookup_elem(&ns_conns, &cookie) : NULL;
	if (c) {
		if (c->state == NS_CONN_ESTABLISHED)
			read_counters(c, tp, sk, st);
		return 0;
	}
	/* Accepted since the last pass, or open before nodescope attached: make
	 * its record, with its totals so far (its "opened" event, if any, told
	 * the agent its direction and start). Half-closed ones too: an accepted
	 * connection whose peer already sent its FIN is still the node's. */
	__u32 target;
	if (!match_target(sk, 0, sk->__sk_common.skc_num, &target)) {
		struct socket *sock = sk->sk_socket;
		__u64 ino = sock ? sock->file->f_inode->i_ino : 0;
		__u32 *t = ino ? bpf_map_lookup_elem(&ns_target_inodes, &ino) : NULL;
		if (!t)
			return 0;
		target = *t;
	}
	cookie = bpf_get_socket_cookie(skc);
	struct ns_conn n = {};
	n.target = target;
	n.direction = NS_DIR_UNKNOWN;
	n.state = NS_CONN_ESTABLISHED;
	n.netns = sock_netns(sk);
	fill_endpoints(&n, sk);
	read_counters(&n, tp, sk, st);
	/* NOEXIST: the state tracepoint may have just made the record */
	if (bpf_map_update_elem(&ns_conns, &cookie, &n, BPF_NOEXIST) == -E2BIG)
		stat_inc(NS_NET_STAT_CONN_DROPPED);
	return 0;
}

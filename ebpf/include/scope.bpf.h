/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Scope: which processes, cgroups and listening ports belong to which
 * watched node. Included by each signal's .bpf.c, so each object carries its
 * own copy of these maps and programs (the agent keeps them alike).
 *
 * User space seeds the maps from config and /proc each pass. Between passes
 * the kernel keeps them current as processes fork, exec and exit and as
 * cgroups are made and removed, so a node is watched from its first
 * instruction: a restarted node's first connect, a writer that joins a
 * watched cgroup and leaves within one interval. These hooks are process and
 * cgroup tracepoints: they fire on fork, exec, exit and mkdir only, and cost
 * nothing to the syscalls of other processes.
 *
 * User space never removes what the kernel added while the target it points
 * to is listed; the kernel removes processes on exit and cgroups on rmdir.
 */
#ifndef NODESCOPE_SCOPE_BPF_H
#define NODESCOPE_SCOPE_BPF_H

#include "nodescope.h"

/* cgroup2 id -> target: a watched group and every group made below it */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} ns_scope_cgroups SEC(".maps");

/* cgroup2 path -> target: a configured group that may be removed and made
 * again (a container restarted under the same name) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NS_MAX_TARGETS);
	__type(key, struct ns_cgroup_path);
	__type(value, __u32);
} ns_scope_cgroup_paths SEC(".maps");

/* tgid -> target, for nodes that share their cgroup and for nodes the
 * kernel saw exec */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, __u32);
} ns_scope_pids SEC(".maps");

/* process name -> target (NS_TARGET_PENDING when discovery decides) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, struct ns_comm);
	__type(value, __u32);
} ns_scope_names SEC(".maps");

/* (network namespace, listening port) -> target */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct ns_port_key);
	__type(value, __u32);
} ns_scope_ports SEC(".maps");

/* exec of a watched process name: wakes user space to resolve it */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} ns_scope_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NS_SCOPE_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ns_scope_stats SEC(".maps");

/* Handover between two agents (docs/architecture.md, "Across restarts"):
 * the programs of the agent that owns the pinned maps run; those of an
 * older agent, still attached for the instant a new one takes over, leave
 * at once. Each object is loaded with its own generation; the agent writes
 * it to ns_active once its programs are attached, then lets the old ones
 * go: no change is counted twice and none is missed. */
const volatile __u32 ns_generation = 0;

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} ns_active SEC(".maps");

/* An array lookup the verifier inlines: a load and a compare. */
static __always_inline int ns_is_active(void)
{
	__u32 zero = 0;
	__u32 *g = bpf_map_lookup_elem(&ns_active, &zero);
	return g && *g == ns_generation;
}

#define NS_ONLY_ACTIVE()           \
	do {                       \
		if (!ns_is_active()) \
			return 0;  \
	} while (0)

static __always_inline void scope_stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ns_scope_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline void scope_put(void *map, const void *key, __u32 target, __u32 full_stat)
{
	if (bpf_map_update_elem(map, key, &target, BPF_ANY))
		scope_stat_inc(full_stat);
}

/* The target of the current task: by its cgroup2 group, else by process. */
static __always_inline int scope_match_task(__u32 tgid, __u32 *target)
{
	__u64 cgid = bpf_get_current_cgroup_id();
	__u32 *t = bpf_map_lookup_elem(&ns_scope_cgroups, &cgid);
	if (!t)
		t = bpf_map_lookup_elem(&ns_scope_pids, &tgid);
	if (!t)
		return 0;
	*target = *t;
	return 1;
}

/* fork: a new process of a watched process is watched too (Bitcoin Core's
 * -daemon continues in a child); threads share the tgid already. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(scope_fork, struct task_struct *parent, struct task_struct *child)
{
	NS_ONLY_ACTIVE();
	__u32 ptgid = parent->tgid;
	__u32 ctgid = child->tgid;
	if (ptgid == ctgid)
		return 0;
	__u32 *t = bpf_map_lookup_elem(&ns_scope_pids, &ptgid);
	if (t)
		scope_put(&ns_scope_pids, &ctgid, *t, NS_SCOPE_STAT_PIDS_FULL);
	return 0;
}

/* exec: a process that becomes a watched node is watched from here on; a
 * watched process that becomes something else (a -blocknotify shell) no
 * longer is. Its listening ports need nothing here: a node that restarts on
 * the host finds its ports still watched in the host's namespace, and one
 * that restarts in a new container is in a new group, which cgroup_mkdir
 * below (or the agent, woken by this event) watches. */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(scope_exec, struct task_struct *p, int old_pid, struct linux_binprm *bprm)
{
	NS_ONLY_ACTIVE();
	__u32 tgid = p->tgid;
	struct ns_comm comm = {};
	bpf_get_current_comm(comm.name, sizeof(comm.name));
	__u32 *t = bpf_map_lookup_elem(&ns_scope_names, &comm);
	if (!t) {
		bpf_map_delete_elem(&ns_scope_pids, &tgid);
		return 0;
	}
	__u32 target = *t;
	scope_put(&ns_scope_pids, &tgid, target, NS_SCOPE_STAT_PIDS_FULL);

	struct ns_scope_event *e = bpf_ringbuf_reserve(&ns_scope_events, sizeof(*e), 0);
	if (!e) {
		scope_stat_inc(NS_SCOPE_STAT_EVENTS_LOST);
		return 0;
	}
	e->tgid = tgid;
	e->target = target;
	__builtin_memcpy(e->comm, comm.name, sizeof(e->comm));
	bpf_ringbuf_submit(e, 0);
	return 0;
}

/* exit of a process (its last thread): its pid may be reused */
SEC("tp_btf/sched_process_exit")
int BPF_PROG(scope_exit, struct task_struct *p)
{
	NS_ONLY_ACTIVE();
	if (p->pid != p->tgid)
		return 0;
	__u32 tgid = p->tgid;
	bpf_map_delete_elem(&ns_scope_pids, &tgid);
	return 0;
}

/* mkdir in the cgroup2 hierarchy (hierarchy id 0): a group made below a
 * watched one (a pod's new container) or at a watched path (a container
 * made again) is watched before any process enters it. */
SEC("tp_btf/cgroup_mkdir")
int BPF_PROG(scope_cgroup_mkdir, struct cgroup *cgrp, const char *path)
{
	NS_ONLY_ACTIVE();
	if (cgrp->root->hierarchy_id != 0)
		return 0;
	int level = cgrp->level;
	__u32 *t = NULL;
	if (level > 0 && level < 256) {
		struct cgroup *parent = NULL;
		bpf_probe_read_kernel(&parent, sizeof(parent), &cgrp->ancestors[level - 1]);
		if (parent) {
			__u64 pid = BPF_CORE_READ(parent, kn, id);
			t = bpf_map_lookup_elem(&ns_scope_cgroups, &pid);
		}
	}
	if (!t) {
		struct ns_cgroup_path key = {};
		bpf_probe_read_kernel_str(key.path, sizeof(key.path), path);
		t = bpf_map_lookup_elem(&ns_scope_cgroup_paths, &key);
	}
	if (t) {
		__u64 id = cgrp->kn->id;
		scope_put(&ns_scope_cgroups, &id, *t, NS_SCOPE_STAT_CGROUPS_FULL);
	}
	return 0;
}

SEC("tp_btf/cgroup_rmdir")
int BPF_PROG(scope_cgroup_rmdir, struct cgroup *cgrp, const char *path)
{
	NS_ONLY_ACTIVE();
	if (cgrp->root->hierarchy_id != 0)
		return 0;
	__u64 id = cgrp->kn->id;
	bpf_map_delete_elem(&ns_scope_cgroups, &id);
	return 0;
}

#endif

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The disk signal's records, shared by its two methods: disk.bpf.c (the
 * filesystem and writeback tracepoints, the default) and disk_syscalls.bpf.c
 * (syscall tracepoints, opt-in). Both count into the same maps, keyed by
 * file identity, so the agent reads them one way. docs/disk.md has the
 * design.
 *
 * A record is (device, inode, target, epoch) -> bytes and calls per way of
 * writing, sync calls per sync call, and the names of the file's last path
 * components, read once when the record is made. The agent flips
 * ns_disk_epoch every interval, waits a moment, and takes every record of
 * the half it left with BPF_MAP_LOOKUP_AND_DELETE_ELEM: the programs write
 * into the other half meanwhile, so nothing is read twice and nothing is
 * lost between a read and a delete, and the map holds only the files
 * written in the last two intervals (no close, dup or exec bookkeeping).
 */
#ifndef NODESCOPE_DISK_RECORDS_BPF_H
#define NODESCOPE_DISK_RECORDS_BPF_H

#include "nodescope.h"
#include "scope.bpf.h"

#define NO_CALL 0xffffffffu

/* Which half the programs write: element 0, set by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} ns_disk_epoch SEC(".maps");

/* max_entries set by the agent (disk.max_files). Not preallocated: a
 * deleted element is freed after an RCU grace period, so a program that
 * still holds it never writes into another file's record. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ns_disk_key);
	__type(value, struct ns_disk_rec);
} ns_disk_recs SEC(".maps");

/* max_entries set by the agent (disk.max_syncs) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ns_disk_sync_key);
	__type(value, struct ns_disk_sync_hist);
} ns_disk_syncs SEC(".maps");

/* Never written: the zeroed value new histograms start from. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ns_disk_sync_hist);
} ns_disk_zero_hist SEC(".maps");

/* Where a new record is assembled (too big for the BPF stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ns_disk_rec);
} ns_disk_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NS_DISK_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ns_disk_stats SEC(".maps");

/*
 * Per task, in the task's own storage (BPF_MAP_TYPE_TASK_STORAGE: made on a
 * task's first hook, freed with the task, so it is bounded by the tasks
 * there are, no thread id is ever reused into it, and each task writes only
 * its own, so nothing is torn by preemption):
 *
 * - which target the task writes for. The scope lookup (scope_match_task:
 *   the task's cgroup2 group, then its process, in two hash maps) is most of
 *   what a hook costs a process nobody watches, and such a process passes it
 *   on every folio chunk it writes; so its verdict is kept, valid while the
 *   scope generation is the one it was made in:
 *     - the agent bumps its half of ns_disk_scope_gen after every change it
 *       writes to the scope maps;
 *     - the kernel bumps the other half whenever a task moves to another
 *       cgroup (cgroup_attach_task: the tracepoint fires once per move, after
 *       it);
 *     - a new task (fork, clone) starts with no storage, and the scope hooks
 *       have run for it before it runs;
 *     - exec, which may make a process a node (a watched process name) or
 *       stop it being one, drops the task's storage (disk_scope_exec,
 *       attached after scope.bpf.h's exec hook).
 * - which write syscall the thread last counted (task->ioac.syscw at the
 *   time, and where that write ended), so a syscall the filesystem sees as
 *   many folio chunks counts as one call;
 * - the call in flight (a timed sync; in the syscall method any call)
 *   between its enter and exit hooks.
 *
 * A new slot is all zeros: no verdict (gen 0), no call in flight (call 0),
 * and a last write on inode 0, which no file has.
 */
struct ns_disk_task {
	__u64 gen;      /* the scope generation + 1 the verdict was made in; 0: none */
	__u64 syscw;    /* task->ioac.syscw at the last counted write */
	__u64 last_ino; /* the file and end offset of the last counted write */
	__u64 last_end;
	__u64 start_ns; /* when the call in flight began */
	__u64 arg;      /* disk_syscalls.bpf.c: the fd, or msync's address */
	__u32 target;   /* the verdict: a target, or NO_CALL (not watched) */
	__u32 last_dev;
	__u32 call;     /* the call in flight + 1; 0: none */
	__u32 call_target;
	__u32 call_tgid;
	__u32 _pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ns_disk_task);
} ns_disk_tasks SEC(".maps");

/* [0]: bumped by the agent; [1]: bumped by the kernel on cgroup moves.
 * Each only grows, so their sum changes with either. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} ns_disk_scope_gen SEC(".maps");

static __always_inline __u64 disk_scope_gen(void)
{
	__u32 agent = 0, kernel = 1;
	__u64 *a = bpf_map_lookup_elem(&ns_disk_scope_gen, &agent);
	__u64 *k = bpf_map_lookup_elem(&ns_disk_scope_gen, &kernel);
	return (a ? *a : 0) + (k ? *k : 0) + 1;
}

static __always_inline void disk_stat_inc(__u32 idx);

/* Whether the current task writes for a target (its index in *target),
 * with the task's slot in *slot (NULL when none could be made: counted as
 * inflight_full, the verdict then asked afresh). */
static __always_inline int disk_match_task(struct task_struct *task, __u32 tgid, __u32 *target, struct ns_disk_task **slot)
{
	/* read before the lookup: a bump meanwhile makes the slot stale, never wrong */
	__u64 gen = disk_scope_gen();
	struct ns_disk_task *s = bpf_task_storage_get(&ns_disk_tasks, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	*slot = s;
	if (s && s->gen == gen) {
		if (s->target == NO_CALL)
			return 0;
		*target = s->target;
		return 1;
	}
	int watched = scope_match_task(tgid, target);
	if (s) {
		s->target = watched ? *target : NO_CALL;
		s->gen = gen;
	} else if (watched) {
		disk_stat_inc(NS_DISK_STAT_INFLIGHT_FULL);
	}
	return watched;
}

/* The current task's slot if it has one (an exit hook: its enter made it). */
static __always_inline struct ns_disk_task *disk_task(void)
{
	return bpf_task_storage_get(&ns_disk_tasks, bpf_get_current_task_btf(), 0, 0);
}

/* After scope.bpf.h's exec hook (the agent attaches this one later): the
 * process may have just become a node, or stopped being one. */
SEC("tp_btf/sched_process_exec")
int BPF_PROG(disk_scope_exec, struct task_struct *p, int old_pid, struct linux_binprm *bprm)
{
	bpf_task_storage_delete(&ns_disk_tasks, bpf_get_current_task_btf());
	return 0;
}

/* A task moved to another cgroup (with its threads, for cgroup.procs):
 * every remembered verdict is stale. Moves are rare (a service or a
 * container starting). */
SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(disk_scope_attach, struct cgroup *dst, const char *path, struct task_struct *task, _Bool threadgroup)
{
	__u32 kernel = 1;
	__u64 *k = bpf_map_lookup_elem(&ns_disk_scope_gen, &kernel);
	if (k)
		__sync_fetch_and_add(k, 1);
	return 0;
}

static __always_inline void disk_stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ns_disk_stats, &idx);
	if (v)
		*v += 1;
}

static __always_inline __u32 disk_epoch(void)
{
	__u32 zero = 0;
	__u32 *e = bpf_map_lookup_elem(&ns_disk_epoch, &zero);
	return e ? (*e & 1) : 0;
}

/* The dentry that names an inode with no file at hand: the first of its
 * aliases (a file with several hard links is named by one of them). */
static __always_inline struct dentry *inode_dentry(struct inode *inode)
{
	struct hlist_node *first = BPF_CORE_READ(inode, i_dentry.first);
	if (!first)
		return NULL;
	return (struct dentry *)((char *)first - bpf_core_field_offset(struct dentry, d_u.d_alias));
}

/* The last NS_DISK_PATH_DEPTH names of d's path, leaf first, up to the root
 * of its filesystem. */
static __always_inline void disk_names(struct ns_disk_rec *n, struct dentry *d)
{
	if (!d) {
		n->flags |= NS_DISK_F_NO_NAME;
		return;
	}
#pragma unroll
	for (int i = 0; i < NS_DISK_PATH_DEPTH; i++) {
		const unsigned char *name = BPF_CORE_READ(d, d_name.name);
		bpf_probe_read_kernel_str(n->names[i], NS_DISK_NAME_LEN, name);
		n->depth = i + 1;
		struct dentry *parent = BPF_CORE_READ(d, d_parent);
		if (!parent || parent == d)
			return; /* the root of the file's filesystem */
		d = parent;
	}
	n->flags |= NS_DISK_F_DEEP;
}

/* The key of file (ino, dev) for `target` in the half the programs write
 * now. The caller reads ino and dev: directly from a BTF pointer in
 * tp_btf programs, through bpf_probe_read in classic tracepoints. */
static __always_inline void disk_key(struct ns_disk_key *key, __u64 ino, __u32 dev, __u32 target, __u32 tgid)
{
	key->ino = ino;
	key->dev = dev;
	key->target = target;
	key->tgid = target == NS_TARGET_PENDING ? tgid : 0;
	key->epoch = disk_epoch();
}

/* The record of `key`, made on first use with the file's names (from `d`
 * when the hook has the file's own dentry, else from the inode's alias).
 * NULL when the map is full (counted). An inode of NULL makes the record of
 * an unknown file (ino 0, dev 0), which the agent counts as class other. */
static __always_inline struct ns_disk_rec *disk_record(struct ns_disk_key *key, struct inode *inode, struct dentry *d)
{
	struct ns_disk_rec *r = bpf_map_lookup_elem(&ns_disk_recs, key);
	if (r)
		return r;

	__u32 zero = 0;
	struct ns_disk_rec *n = bpf_map_lookup_elem(&ns_disk_scratch, &zero);
	if (!n)
		return NULL;
	__builtin_memset(n, 0, sizeof(*n));
	if (inode) {
		n->fs_magic = BPF_CORE_READ(inode, i_sb, s_magic);
		disk_names(n, d ? d : inode_dentry(inode));
	} else {
		n->flags |= NS_DISK_F_NO_NAME;
	}
	if (bpf_map_update_elem(&ns_disk_recs, key, n, BPF_NOEXIST)) {
		/* another CPU made it first, or the map is full */
		r = bpf_map_lookup_elem(&ns_disk_recs, key);
		if (!r)
			disk_stat_inc(NS_DISK_STAT_FILES_FULL);
		return r;
	}
	return bpf_map_lookup_elem(&ns_disk_recs, key);
}

/* From libbpf-tools bits.bpf.h */
static __always_inline __u64 log2_u32(__u32 v)
{
	__u32 shift, r;
	r = (v > 0xFFFF) << 4; v >>= r;
	shift = (v > 0xFF) << 3; v >>= shift; r |= shift;
	shift = (v > 0xF) << 2; v >>= shift; r |= shift;
	shift = (v > 0x3) << 1; v >>= shift; r |= shift;
	r |= (v >> 1);
	return r;
}

static __always_inline __u64 log2_u64(__u64 v)
{
	__u32 hi = v >> 32;
	return hi ? log2_u32(hi) + 32 : log2_u32(v);
}

/* One sync call on the file of `key`: counted in its record, and, when
 * `timed`, its latency (or its failure) in the file's histogram. */
static __always_inline void disk_count_sync(struct ns_disk_key *key, struct inode *inode, struct dentry *d,
					    __u64 call, int timed, __u64 elapsed_ns, long ret)
{
	/* 64 bits and a barrier: the bound is checked on the register the index uses */
	barrier_var(call);
	if (call >= NS_DISK_SYNC_CALLS)
		return;
	struct ns_disk_rec *r = disk_record(key, inode, d);
	if (r) {
		__sync_fetch_and_add(&r->syncs[call], 1);
		if (ret < 0)
			__sync_fetch_and_add(&r->sync_errors[call], 1);
	}
	if (!timed)
		return;

	struct ns_disk_sync_key sk = { .file = *key, .call = (__u32)call };
	struct ns_disk_sync_hist *h = bpf_map_lookup_elem(&ns_disk_syncs, &sk);
	if (!h) {
		__u32 zero = 0;
		struct ns_disk_sync_hist *z = bpf_map_lookup_elem(&ns_disk_zero_hist, &zero);
		if (!z)
			return;
		bpf_map_update_elem(&ns_disk_syncs, &sk, z, BPF_NOEXIST);
		h = bpf_map_lookup_elem(&ns_disk_syncs, &sk);
		if (!h) {
			disk_stat_inc(NS_DISK_STAT_SYNCS_FULL);
			return;
		}
	}
	if (ret < 0) {
		__sync_fetch_and_add(&h->errors, 1);
		return;
	}
	__u64 slot = log2_u64(elapsed_ns / 1000);
	if (slot >= NS_DISK_SYNC_SLOTS)
		slot = NS_DISK_SYNC_SLOTS - 1;
	__sync_fetch_and_add(&h->count[slot], 1);
	__sync_fetch_and_add(&h->sum_ns[slot], elapsed_ns);
}

#endif

/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The disk signal's records, shared by its two methods: disk.bpf.c (the
 * filesystem and writeback tracepoints, the default) and disk_syscalls.bpf.c
 * (syscall tracepoints, opt-in). Both count into the same maps, keyed by
 * file identity, so the agent reads them one way. docs/disk.md has the
 * design.
 *
 * A file is (device, inode, target, half): its names, read once per half
 * when it is first written, in ns_disk_files, and its counts (bytes and
 * calls per way of writing, sync calls per sync call) in a slot of the
 * preallocated ns_disk_counts, which the hot path reaches by index: each
 * task remembers the slot of the file it last wrote. A write of disk.bpf.c
 * adds to its CPU's pending counts of the half (ns_disk_pending, plain adds),
 * which move into their slot when the CPU writes another slot or call. The
 * agent advances the round in ns_disk_epoch every interval (the programs
 * write the half of its low bit), waits for an RCU grace period, so no
 * program is still in the old half, takes every file of the old half with
 * BPF_MAP_LOOKUP_AND_DELETE_ELEM, reads its counts, adds the half's pending
 * counts to them, and frees the half's slots and pending counts. Nothing is read twice or lost between a read and a delete, and the
 * maps hold only the files written in the last two intervals (no close, dup
 * or exec bookkeeping).
 */
#ifndef NODESCOPE_DISK_RECORDS_BPF_H
#define NODESCOPE_DISK_RECORDS_BPF_H

#include "nodescope.h"
#include "scope.bpf.h"

#define NO_CALL 0xffffffffu

/* The round, set by the agent each interval: its low bit is the half the
 * programs write. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} ns_disk_epoch SEC(".maps");

/* [half], per CPU: the writes not yet moved into their slot (nodescope.h) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, struct ns_disk_pending);
} ns_disk_pending SEC(".maps");

/* (file, half) -> its slot and names. max_entries set by the agent
 * (2 x disk.max_files). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ns_disk_key);
	__type(value, struct ns_disk_file);
} ns_disk_files SEC(".maps");

/* slot -> counts; max_entries set by the agent (2 x disk.max_files). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct ns_disk_counts);
} ns_disk_counts SEC(".maps");

/* [half]: the next free slot of each half (the agent zeroes it when it has
 * read the half); [NS_DISK_ALLOC_PER_HALF]: slots per half, set by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} ns_disk_alloc SEC(".maps");

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

/* Where a new file is assembled (too big for the BPF stack). */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ns_disk_file);
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
	struct ns_disk_key c_key; /* the file the task last counted into, ... */
	__u32 c_round;  /* ... in this round (0: none; the agent starts at 1) ... */
	__u32 c_slot;   /* ... and its slot */
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

/* The round: its low bit is the half the programs write. */
static __always_inline __u32 disk_round(void)
{
	__u32 zero = 0;
	__u32 *e = bpf_map_lookup_elem(&ns_disk_epoch, &zero);
	return e ? *e : 0;
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
static __always_inline void disk_names(struct ns_disk_file *n, struct dentry *d)
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
 * now; returns the round. The caller reads ino and dev: directly from a BTF
 * pointer in tp_btf programs, through bpf_probe_read in classic
 * tracepoints. */
static __always_inline __u32 disk_key(struct ns_disk_key *key, __u64 ino, __u32 dev, __u32 target, __u32 tgid)
{
	__u32 round = disk_round();
	key->ino = ino;
	key->dev = dev;
	key->target = target;
	key->tgid = target == NS_TARGET_PENDING ? tgid : 0;
	key->epoch = round & 1;
	return round;
}

#define NO_SLOT 0xffffffffu

/* The slot of `key`'s counts, the file made on first use with its names
 * (from `d` when the hook has the file's own dentry, else from the inode's
 * alias) and a fresh slot of its half. NO_SLOT when the half is full
 * (counted). An inode of NULL makes an unknown file (ino 0, dev 0), which
 * the agent counts as class other. */
static __always_inline __u32 disk_slot(struct ns_disk_key *key, struct inode *inode, struct dentry *d)
{
	struct ns_disk_file *f = bpf_map_lookup_elem(&ns_disk_files, key);
	if (f)
		return f->slot;

	__u32 half = key->epoch & 1, per_key = NS_DISK_ALLOC_PER_HALF, zero = 0;
	/* 64-bit counters: the only fetch-and-add the default BPF target emits */
	__u64 *next = bpf_map_lookup_elem(&ns_disk_alloc, &half);
	__u64 *per = bpf_map_lookup_elem(&ns_disk_alloc, &per_key);
	struct ns_disk_file *n = bpf_map_lookup_elem(&ns_disk_scratch, &zero);
	if (!next || !per || !n)
		return NO_SLOT;
	__u64 i = __sync_fetch_and_add(next, 1);
	if (i >= *per) {
		disk_stat_inc(NS_DISK_STAT_FILES_FULL);
		return NO_SLOT;
	}
	__u32 slot = half * (__u32)*per + (__u32)i;
	struct ns_disk_counts *c = bpf_map_lookup_elem(&ns_disk_counts, &slot);
	if (!c)
		return NO_SLOT;
	__builtin_memset(c, 0, sizeof(*c));
	__builtin_memset(n, 0, sizeof(*n));
	n->slot = slot;
	if (inode) {
		n->fs_magic = BPF_CORE_READ(inode, i_sb, s_magic);
		disk_names(n, d ? d : inode_dentry(inode));
	} else {
		n->flags |= NS_DISK_F_NO_NAME;
	}
	if (bpf_map_update_elem(&ns_disk_files, key, n, BPF_NOEXIST)) {
		/* another CPU made it first (the slot taken here stays unused),
		 * or the map is full */
		f = bpf_map_lookup_elem(&ns_disk_files, key);
		if (!f) {
			disk_stat_inc(NS_DISK_STAT_FILES_FULL);
			return NO_SLOT;
		}
		return f->slot;
	}
	return slot;
}

/* The count slot of `key` (made in round `round`): the one the task
 * remembers when it wrote this very file in this round last, else found or
 * made, and remembered. NO_SLOT when there is none. */
static __always_inline __u32 disk_count_slot(struct ns_disk_key *key, __u32 round, struct inode *inode,
					     struct dentry *d, struct ns_disk_task *t)
{
	if (t && t->c_round == round && t->c_key.ino == key->ino && t->c_key.dev == key->dev &&
	    t->c_key.target == key->target && t->c_key.tgid == key->tgid)
		return t->c_slot;
	__u32 slot = disk_slot(key, inode, d);
	if (slot != NO_SLOT && t) {
		t->c_key = *key;
		t->c_round = round;
		t->c_slot = slot;
	}
	return slot;
}

/* The counts of `key`, as disk_count_slot finds them. */
static __always_inline struct ns_disk_counts *disk_counts(struct ns_disk_key *key, __u32 round, struct inode *inode,
							 struct dentry *d, struct ns_disk_task *t)
{
	__u32 slot = disk_count_slot(key, round, inode, d, t);
	if (slot == NO_SLOT)
		return NULL;
	return bpf_map_lookup_elem(&ns_disk_counts, &slot);
}

/* `bytes` written to slot `slot` of half `half` as call `call` (a new call
 * when `fresh`): added to this CPU's pending counts of the half, which are
 * first moved into their own slot when they are another slot's or call's.
 * Preemption is off in a tracepoint's programs and none of the write hooks
 * runs in an interrupt, so nothing else on the CPU touches them meanwhile. */
static __always_inline void disk_add_write(__u32 half, __u32 slot, __u32 call, __u64 bytes, int fresh)
{
	struct ns_disk_pending *p = bpf_map_lookup_elem(&ns_disk_pending, &half);
	if (!p)
		return;
	if (p->slot != slot + 1 || p->call != call) {
		__u32 old = p->slot - 1, old_call = p->call;
		if (p->slot && old_call < NS_DISK_WRITE_CALLS) {
			struct ns_disk_counts *c = bpf_map_lookup_elem(&ns_disk_counts, &old);
			if (c) {
				__sync_fetch_and_add(&c->bytes[old_call], p->bytes);
				__sync_fetch_and_add(&c->calls[old_call], p->calls);
			}
		}
		p->slot = slot + 1;
		p->call = call;
		p->bytes = 0;
		p->calls = 0;
	}
	p->bytes += bytes;
	p->calls += fresh;
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

/* One sync call on the file of `key` (in round `round`, by the task of slot
 * `t`, which usually wrote it just before): counted with the file, and, when
 * `timed`, its latency (or its failure) in the file's histogram. */
static __always_inline void disk_count_sync(struct ns_disk_key *key, __u32 round, struct inode *inode, struct dentry *d,
					    struct ns_disk_task *t, __u64 call, int timed, __u64 elapsed_ns, long ret)
{
	/* 64 bits and a barrier: the bound is checked on the register the index uses */
	barrier_var(call);
	if (call >= NS_DISK_SYNC_CALLS)
		return;
	struct ns_disk_counts *r = disk_counts(key, round, inode, d, t);
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
	__u64 bucket = log2_u64(elapsed_ns / 1000);
	if (bucket >= NS_DISK_SYNC_SLOTS)
		bucket = NS_DISK_SYNC_SLOTS - 1;
	__sync_fetch_and_add(&h->count[bucket], 1);
	__sync_fetch_and_add(&h->sum_ns[bucket], elapsed_ns);
}

#endif

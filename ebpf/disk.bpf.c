// SPDX-License-Identifier: GPL-2.0
/*
 * disk: what watched nodes write to their files, and how long their syncs
 * take, from syscall tracepoints. docs/disk.md has the full story.
 *
 * Counting. The enter tracepoint of each write syscall (write, pwrite64,
 * writev, pwritev, pwritev2) and sync syscall (fsync, fdatasync,
 * sync_file_range, msync) keeps the fd (or msync's address), the call and,
 * for syncs, the start time, for the calling thread in ns_disk_inflight, when
 * the caller belongs to a watched node: its cgroup2 group is a watched group,
 * or its tgid is a watched process (scope.bpf.h keeps both sets current as
 * processes start and cgroups are made, so a short-lived writer counts). The exit tracepoint adds the return
 * value (the bytes really written) and one call to the record of the file,
 * or the latency to a log2 histogram. So a write of a watched process costs
 * a lookup of the thread's slot at enter and at exit and one lookup-and-add
 * on the file's record; other processes' writes cost the cgroup (and pid)
 * lookup at enter and the slot lookup at exit. Nothing goes to user space
 * per call.
 *
 * Attribution. A record is keyed by (tgid, fd) and made at the first write or
 * sync through that fd. Making it reads the file's type and the last
 * NS_DISK_PATH_DEPTH names of its path from the fd table (current->files),
 * once; the agent maps those names to a file class (blocks, chainstate, ...)
 * once per record. Sockets, pipes and devices get a record flagged NOT_FILE,
 * so later writes to them are dropped after one lookup.
 *
 * Reuse of fd numbers. A record describes one file only while its fd stays
 * open, so every way an fd is closed retires the record: close(), dup2() and
 * dup3() over an open fd, close_range(), and exec (which closes O_CLOEXEC
 * fds: all records of the process are retired, an fd still open just gets a
 * new record at its next write). Retiring moves the record, with its final
 * counts, into ns_disk_closed under its unique id, where the agent reads it
 * once and deletes it. Sync histograms are keyed by the record id, not the fd,
 * so they stay correct across reuse too. Records of processes that exit are
 * swept by the agent.
 *
 * msync has no fd. Its histogram is keyed by (tgid, address); the agent
 * finds the file mapped at that address in /proc/PID/maps (LMDB msyncs the
 * base of its map of data.mdb).
 *
 * Bounds: every map is bounded; a call that finds its map full is not
 * counted, and ns_disk_stats says how many were lost and why.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "kernel_types.h"
#include "nodescope.h"
#include "scope.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* What the enter tracepoint hands to the exit tracepoint of the same call. */
struct inflight {
	__u64 start_ns; /* syncs only */
	__u64 arg;      /* the fd, or msync's address */
	__u32 target;
	__u32 call;     /* NS_DISK_WRITE... or NS_DISK_FSYNC..., or NO_CALL */
};

#define NO_CALL 0xffffffff

/* thread id -> the call it is in. A thread is in one syscall at a time: the
 * exit marks the entry NO_CALL rather than deleting it, and the thread's next
 * call reuses it in place, which is cheaper than an insert and a delete per
 * call. LRU: entries of threads that are gone make room for new ones. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct inflight);
} ns_disk_inflight SEC(".maps");

/* (tgid, fd) -> the open file's record; max_entries set by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ns_disk_fd_key);
	__type(value, struct ns_disk_file);
} ns_disk_files SEC(".maps");

/* record id -> final record of a closed file, until the agent reads it */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct ns_disk_file);
} ns_disk_closed SEC(".maps");

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
	__type(value, struct ns_disk_file);
} ns_disk_scratch SEC(".maps");

/* Per-CPU sequence for record ids. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ns_disk_seq SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NS_DISK_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ns_disk_stats SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&ns_disk_stats, &idx);
	if (v)
		*v += 1;
}

/* Watched: the caller's cgroup2 group (or one below it) or its process is
 * in scope.bpf.h's sets, at the moment of the call. */
static __always_inline int match_target(__u32 tgid, __u32 *target)
{
	return scope_match_task(tgid, target);
}

/* Unique without atomics: a per-CPU counter, tagged with the CPU. Programs
 * on one CPU do not interleave here (tracepoint programs do not nest). */
static __always_inline __u64 next_id(void)
{
	__u32 zero = 0;
	__u64 *seq = bpf_map_lookup_elem(&ns_disk_seq, &zero);
	if (!seq)
		return 0;
	*seq += 1;
	return ((__u64)bpf_get_smp_processor_id() << 48) | (*seq & ((1ULL << 48) - 1));
}

/* Fills in what the record's file is: its type and the tail of its path.
 * False when the fd is no longer open (another thread closed it during the
 * call): a record then would outlive the fd and misdescribe the next file
 * that gets its number. */
static __always_inline int describe(struct ns_disk_file *n, __u32 fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;

	if (fd >= BPF_CORE_READ(fdt, max_fds) ||
	    bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return 0;
	__u16 mode = BPF_CORE_READ(file, f_inode, i_mode);
	/* directories: fsync of a directory after creating files in it */
	if ((mode & S_IFMT) != S_IFREG && (mode & S_IFMT) != S_IFDIR) {
		n->flags |= NS_DISK_F_NOT_FILE;
		return 1;
	}
	struct dentry *d = BPF_CORE_READ(file, f_path.dentry);
#pragma unroll
	for (int i = 0; i < NS_DISK_PATH_DEPTH; i++) {
		const unsigned char *name = BPF_CORE_READ(d, d_name.name);
		bpf_probe_read_kernel_str(n->names[i], NS_DISK_NAME_LEN, name);
		n->depth = i + 1;
		struct dentry *parent = BPF_CORE_READ(d, d_parent);
		if (!parent || parent == d)
			return 1; /* the root of the file's filesystem */
		d = parent;
	}
	n->flags |= NS_DISK_F_DEEP;
	return 1;
}

/* The record of (tgid, fd), made on first use. */
static __always_inline struct ns_disk_file *file_record(__u32 tgid, __u32 fd, __u32 target)
{
	struct ns_disk_fd_key key = { .tgid = tgid, .fd = fd };
	struct ns_disk_file *f = bpf_map_lookup_elem(&ns_disk_files, &key);
	if (f)
		return f;

	__u32 zero = 0;
	struct ns_disk_file *n = bpf_map_lookup_elem(&ns_disk_scratch, &zero);
	if (!n)
		return NULL;
	__builtin_memset(n, 0, sizeof(*n));
	n->id = next_id();
	n->target = target;
	n->tgid = tgid;
	n->fd = fd;
	if (!describe(n, fd))
		return NULL;
	if (bpf_map_update_elem(&ns_disk_files, &key, n, BPF_NOEXIST)) {
		/* another thread made it first, or the map is full */
		f = bpf_map_lookup_elem(&ns_disk_files, &key);
		if (!f)
			stat_inc(NS_DISK_STAT_FILES_FULL);
		return f;
	}
	return bpf_map_lookup_elem(&ns_disk_files, &key);
}

/* The fd is closing: keep the final counts for the agent under the record's
 * id, and free the (tgid, fd) key for the next file. */
static __always_inline void retire(struct ns_disk_fd_key *key, struct ns_disk_file *f)
{
	if (!(f->flags & NS_DISK_F_NOT_FILE) &&
	    bpf_map_update_elem(&ns_disk_closed, &f->id, f, BPF_NOEXIST))
		stat_inc(NS_DISK_STAT_CLOSED_FULL);
	bpf_map_delete_elem(&ns_disk_files, key);
}

static __always_inline void retire_fd(__u32 fd)
{
	struct ns_disk_fd_key key = { .tgid = bpf_get_current_pid_tgid() >> 32, .fd = fd };
	struct ns_disk_file *f = bpf_map_lookup_elem(&ns_disk_files, &key);
	if (f)
		retire(&key, f);
}

struct fd_range {
	__u32 tgid;
	__u32 first;
	__u32 last;
};

static long retire_in_range(void *map, struct ns_disk_fd_key *key, struct ns_disk_file *f, struct fd_range *r)
{
	if (key->tgid == r->tgid && key->fd >= r->first && key->fd <= r->last)
		retire(key, f);
	return 0;
}

/* Walks the whole files map: only for watched processes, and only on
 * close_range() and exec, which they rarely do. */
static __always_inline void retire_range(__u32 first, __u32 last)
{
	__u32 tgid = bpf_get_current_pid_tgid() >> 32;
	__u32 target;
	if (!match_target(tgid, &target))
		return;
	struct fd_range r = { .tgid = tgid, .first = first, .last = last };
	bpf_for_each_map_elem(&ns_disk_files, retire_in_range, &r, 0);
}

static __always_inline int enter(struct ns_sys_enter_ctx *ctx, __u32 call, int timed)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	__u32 target;
	if (!match_target(pid_tgid >> 32, &target))
		return 0;
	struct inflight in = { .arg = ctx->args[0], .target = target, .call = call };
	if (timed)
		in.start_ns = bpf_ktime_get_ns();
	struct inflight *slot = bpf_map_lookup_elem(&ns_disk_inflight, &tid);
	if (slot)
		*slot = in;
	else if (bpf_map_update_elem(&ns_disk_inflight, &tid, &in, BPF_ANY))
		stat_inc(NS_DISK_STAT_INFLIGHT_FULL);
	return 0;
}

/* Takes this thread's in-flight call; false when there is none (not a
 * watched process, or the call began before nodescope attached). */
static __always_inline int take_inflight(__u32 tid, struct inflight *out)
{
	struct inflight *in = bpf_map_lookup_elem(&ns_disk_inflight, &tid);
	if (!in || in->call == NO_CALL)
		return 0;
	*out = *in;
	in->call = NO_CALL;
	return 1;
}

SEC("tracepoint/syscalls/sys_enter_write")
int on_write_enter(struct ns_sys_enter_ctx *ctx) { return enter(ctx, NS_DISK_WRITE, 0); }

SEC("tracepoint/syscalls/sys_enter_pwrite64")
int on_pwrite64_enter(struct ns_sys_enter_ctx *ctx) { return enter(ctx, NS_DISK_PWRITE64, 0); }

SEC("tracepoint/syscalls/sys_enter_writev")
int on_writev_enter(struct ns_sys_enter_ctx *ctx) { return enter(ctx, NS_DISK_WRITEV, 0); }

SEC("tracepoint/syscalls/sys_enter_pwritev")
int on_pwritev_enter(struct ns_sys_enter_ctx *ctx) { return enter(ctx, NS_DISK_PWRITEV, 0); }

SEC("tracepoint/syscalls/sys_enter_pwritev2")
int on_pwritev2_enter(struct ns_sys_enter_ctx *ctx) { return enter(ctx, NS_DISK_PWRITEV2, 0); }

/* Attached to the exit of every write syscall above. */
SEC("tracepoint/syscalls/sys_exit_write")
int on_write_exit(struct ns_sys_exit_ctx *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	struct inflight in;
	if (!take_inflight((__u32)pid_tgid, &in))
		return 0;
	long ret = ctx->ret;
	if (ret < 0 || in.call >= NS_DISK_WRITE_CALLS || in.arg > 0x7fffffff)
		return 0;
	struct ns_disk_file *f = file_record(pid_tgid >> 32, in.arg, in.target);
	if (!f || (f->flags & NS_DISK_F_NOT_FILE))
		return 0;
	__sync_fetch_and_add(&f->bytes[in.call], ret);
	__sync_fetch_and_add(&f->calls[in.call], 1);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_fsync")
int on_fsync_enter(struct ns_sys_enter_ctx *ctx) { return enter(ctx, NS_DISK_FSYNC, 1); }

SEC("tracepoint/syscalls/sys_enter_fdatasync")
int on_fdatasync_enter(struct ns_sys_enter_ctx *ctx) { return enter(ctx, NS_DISK_FDATASYNC, 1); }

SEC("tracepoint/syscalls/sys_enter_msync")
int on_msync_enter(struct ns_sys_enter_ctx *ctx) { return enter(ctx, NS_DISK_MSYNC, 1); }

SEC("tracepoint/syscalls/sys_enter_sync_file_range")
int on_sync_file_range_enter(struct ns_sys_enter_ctx *ctx) { return enter(ctx, NS_DISK_SYNC_FILE_RANGE, 1); }

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

/* Attached to the exit of every sync syscall above. */
SEC("tracepoint/syscalls/sys_exit_fsync")
int on_sync_exit(struct ns_sys_exit_ctx *ctx)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32;
	struct inflight in;
	if (!take_inflight((__u32)pid_tgid, &in))
		return 0;
	__u64 elapsed = bpf_ktime_get_ns() - in.start_ns;

	struct ns_disk_sync_key key = { .tgid = tgid, .call = in.call, .target = in.target };
	if (in.call == NS_DISK_MSYNC) {
		key.file = in.arg;
	} else {
		if (in.arg > 0x7fffffff)
			return 0;
		struct ns_disk_file *f = file_record(tgid, in.arg, in.target);
		if (!f || (f->flags & NS_DISK_F_NOT_FILE))
			return 0;
		key.file = f->id;
	}

	struct ns_disk_sync_hist *h = bpf_map_lookup_elem(&ns_disk_syncs, &key);
	if (!h) {
		__u32 zero = 0;
		struct ns_disk_sync_hist *z = bpf_map_lookup_elem(&ns_disk_zero_hist, &zero);
		if (!z)
			return 0;
		bpf_map_update_elem(&ns_disk_syncs, &key, z, BPF_NOEXIST);
		h = bpf_map_lookup_elem(&ns_disk_syncs, &key);
		if (!h) {
			stat_inc(NS_DISK_STAT_SYNCS_FULL);
			return 0;
		}
	}
	if (ctx->ret < 0) {
		__sync_fetch_and_add(&h->errors, 1);
		return 0;
	}
	__u64 slot = log2_u64(elapsed / 1000);
	if (slot >= NS_DISK_SYNC_SLOTS)
		slot = NS_DISK_SYNC_SLOTS - 1;
	__sync_fetch_and_add(&h->count[slot], 1);
	__sync_fetch_and_add(&h->sum_ns[slot], elapsed);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_close")
int on_close(struct ns_sys_enter_ctx *ctx)
{
	retire_fd(ctx->args[0]);
	return 0;
}

/* dup2(old, new) and dup3(old, new, flags) close `new` first when it is open. */
SEC("tracepoint/syscalls/sys_enter_dup2")
int on_dup2(struct ns_sys_enter_ctx *ctx)
{
	retire_fd(ctx->args[1]);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_dup3")
int on_dup3(struct ns_sys_enter_ctx *ctx)
{
	retire_fd(ctx->args[1]);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_close_range")
int on_close_range(struct ns_sys_enter_ctx *ctx)
{
	if (ctx->args[2] & CLOSE_RANGE_CLOEXEC)
		return 0; /* only marks them: exec will close them */
	retire_range(ctx->args[0], ctx->args[1]);
	return 0;
}

SEC("tracepoint/sched/sched_process_exec")
int on_exec(void *ctx)
{
	retire_range(0, ~0U);
	return 0;
}

// SPDX-License-Identifier: GPL-2.0
/*
 * disk, syscall method (`[disk] method = "syscalls"`): the node's write and
 * sync syscalls from syscall tracepoints, for a data dir on a filesystem the
 * filesystem hooks of disk.bpf.c do not cover (btrfs, zfs, nfs...).
 *
 * Cost, and why it is opt-in: attaching any syscall tracepoint puts every
 * syscall of every task on the host on the syscall-tracing slow path, and
 * every write and sync syscall of every task runs the enter program's scope
 * filter (docs/benchmarks.md: an unwatched dd to /dev/null runs twice as
 * long).
 *
 * Counting is the syscall layer's: bytes are the write calls' return values
 * (a short write counts its short length, a failed one nothing), calls are
 * the calls that returned >= 0 (a write of 0 bytes included); every sync
 * call (fsync, fdatasync, msync, sync_file_range) is timed from entry to
 * exit. The enter tracepoint keeps the fd (msync: the address), the call
 * and the time in the thread's slot, for a watched caller; the exit finds
 * the file (the fd table, or for msync the mapping at the address) and
 * counts into the same (device, inode) records as disk.bpf.c. Regular files
 * only (and directories for syncs: LevelDB fsyncs its directory); writes to
 * sockets, pipes and devices find no file and are not counted.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "kernel_types.h"
#include "nodescope.h"
#include "scope.bpf.h"
#include "disk_records.bpf.h"

char LICENSE[] SEC("license") = "GPL";

/* NS_DISK_* write calls, or a sync call with this bit */
#define SYNC_BIT 0x100

static __always_inline int enter(struct ns_sys_enter_ctx *ctx, __u32 call)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tgid = pid_tgid >> 32, target;
	struct task_struct *task = bpf_get_current_task_btf();
	struct ns_disk_task *t;
	if (!disk_match_task(task, tgid, &target, &t) || !t)
		return 0;
	t->call = call + 1;
	t->arg = ctx->args[0];
	t->call_target = target;
	t->call_tgid = tgid;
	t->start_ns = (call & SYNC_BIT) ? bpf_ktime_get_ns() : 0;
	return 0;
}

/* What the enter hook kept of this thread's call in flight. */
struct inflight {
	__u64 arg;
	__u64 start_ns;
	__u32 call;
	__u32 target;
	__u32 tgid;
};

/* Takes this thread's call in flight; false when there is none (not a
 * watched thread, or the call began before nodescope attached). */
static __always_inline int take(struct inflight *out)
{
	struct ns_disk_task *t = disk_task();
	if (!t || !t->call)
		return 0;
	out->arg = t->arg;
	out->start_ns = t->start_ns;
	out->call = t->call - 1;
	out->target = t->call_target;
	out->tgid = t->call_tgid;
	t->call = 0;
	return 1;
}

/* The open file behind `fd` of the current task. */
static __always_inline struct file *fd_file(__u64 fd)
{
	if (fd > 0x7fffffff)
		return NULL;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds = BPF_CORE_READ(fdt, fd);
	struct file *file = NULL;
	if (fd >= BPF_CORE_READ(fdt, max_fds) || bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]))
		return NULL;
	return file;
}

static __always_inline int file_kind(struct file *file)
{
	return BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT;
}

SEC("tracepoint/syscalls/sys_enter_write")
int on_write_enter(struct ns_sys_enter_ctx *ctx) { NS_ONLY_ACTIVE(); return enter(ctx, NS_DISK_WRITE); }

SEC("tracepoint/syscalls/sys_enter_pwrite64")
int on_pwrite64_enter(struct ns_sys_enter_ctx *ctx) { NS_ONLY_ACTIVE(); return enter(ctx, NS_DISK_PWRITE64); }

SEC("tracepoint/syscalls/sys_enter_writev")
int on_writev_enter(struct ns_sys_enter_ctx *ctx) { NS_ONLY_ACTIVE(); return enter(ctx, NS_DISK_WRITEV); }

SEC("tracepoint/syscalls/sys_enter_pwritev")
int on_pwritev_enter(struct ns_sys_enter_ctx *ctx) { NS_ONLY_ACTIVE(); return enter(ctx, NS_DISK_PWRITEV); }

SEC("tracepoint/syscalls/sys_enter_pwritev2")
int on_pwritev2_enter(struct ns_sys_enter_ctx *ctx) { NS_ONLY_ACTIVE(); return enter(ctx, NS_DISK_PWRITEV2); }

/* Attached to the exit of every write syscall above. */
SEC("tracepoint/syscalls/sys_exit_write")
int on_write_exit(struct ns_sys_exit_ctx *ctx)
{
	NS_ONLY_ACTIVE();
	struct inflight in;
	if (!take(&in))
		return 0;
	long ret = ctx->ret;
	__u64 call = in.call;
	barrier_var(call);
	if (ret < 0 || call >= NS_DISK_WRITE_CALLS)
		return 0;
	struct file *file = fd_file(in.arg);
	if (!file || file_kind(file) != S_IFREG)
		return 0;
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	struct ns_disk_key key;
	__u32 round = disk_key(&key, BPF_CORE_READ(inode, i_ino), BPF_CORE_READ(inode, i_sb, s_dev), in.target, in.tgid);
	struct ns_disk_counts *r = disk_counts(&key, round, inode, BPF_CORE_READ(file, f_path.dentry), disk_task());
	if (!r)
		return 0;
	__sync_fetch_and_add(&r->bytes[call], ret);
	__sync_fetch_and_add(&r->calls[call], 1);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_fsync")
int on_fsync_enter(struct ns_sys_enter_ctx *ctx) { NS_ONLY_ACTIVE(); return enter(ctx, SYNC_BIT | NS_DISK_FSYNC); }

SEC("tracepoint/syscalls/sys_enter_fdatasync")
int on_fdatasync_enter(struct ns_sys_enter_ctx *ctx) { NS_ONLY_ACTIVE(); return enter(ctx, SYNC_BIT | NS_DISK_FDATASYNC); }

SEC("tracepoint/syscalls/sys_enter_msync")
int on_msync_enter(struct ns_sys_enter_ctx *ctx) { NS_ONLY_ACTIVE(); return enter(ctx, SYNC_BIT | NS_DISK_MSYNC); }

SEC("tracepoint/syscalls/sys_enter_sync_file_range")
int on_sync_file_range_enter(struct ns_sys_enter_ctx *ctx) { NS_ONLY_ACTIVE(); return enter(ctx, SYNC_BIT | NS_DISK_SYNC_FILE_RANGE); }

struct vma_file {
	__u64 addr;
	struct file *file;
};

static long vma_file_cb(struct task_struct *task, struct vm_area_struct *vma, struct vma_file *out)
{
	out->file = BPF_CORE_READ(vma, vm_file);
	return 0;
}

/* Attached to the exit of every sync syscall above. */
SEC("tracepoint/syscalls/sys_exit_fsync")
int on_sync_exit(struct ns_sys_exit_ctx *ctx)
{
	NS_ONLY_ACTIVE();
	struct inflight in;
	if (!take(&in) || !(in.call & SYNC_BIT))
		return 0;
	__u64 elapsed = bpf_ktime_get_ns() - in.start_ns;
	__u64 call = in.call & ~SYNC_BIT;
	struct file *file = NULL;
	if (call == NS_DISK_MSYNC) {
		/* no fd: the file mapped at the address (LMDB msyncs its map) */
		struct vma_file vf = { .addr = in.arg };
		bpf_find_vma(bpf_get_current_task_btf(), in.arg, vma_file_cb, &vf, 0);
		file = vf.file;
	} else {
		file = fd_file(in.arg);
		if (!file)
			return 0;
	}
	struct inode *inode = NULL;
	struct dentry *d = NULL;
	if (file) {
		int kind = file_kind(file);
		if (kind != S_IFREG && kind != S_IFDIR)
			return 0;
		inode = BPF_CORE_READ(file, f_inode);
		d = BPF_CORE_READ(file, f_path.dentry);
	}
	/* an msync whose mapping is gone counts for an unknown file */
	struct ns_disk_key key;
	__u32 round = disk_key(&key, inode ? BPF_CORE_READ(inode, i_ino) : 0, inode ? BPF_CORE_READ(inode, i_sb, s_dev) : 0, in.target, in.tgid);
	disk_count_sync(&key, round, inode, d, disk_task(), call, 1, elapsed, ctx->ret);
	return 0;
}

// SPDX-License-Identifier: GPL-2.0
/*
 * disk: what watched nodes write to their files, and their syncs, from the
 * filesystem and writeback tracepoints (tp_btf). docs/disk.md has the full
 * story; disk_records.bpf.h the records.
 *
 * These hooks fire only where a file is written or synced, never on a
 * syscall as such, so a process that writes no file (a dd to /dev/null, a
 * server on its sockets) pays nothing, and one that writes files pays the
 * scope filter per hook (its verdict remembered in the task's storage). The syscall tracepoints
 * of disk_syscalls.bpf.c put every syscall of every task on the tracing slow
 * path; that method is an explicit opt-in.
 *
 * Writes:
 *   ext4 buffered: ext4_da_write_end (delalloc, the default),
 *     ext4_write_end (nodelalloc, and delalloc's fallback when the
 *     filesystem is nearly full), ext4_journalled_write_end (data=journal):
 *     `copied`, the bytes really copied into one folio, per folio chunk.
 *   xfs buffered: xfs_file_buffered_write, once per write at its start,
 *     after the size checks: the iov_iter's count (a write that comes up
 *     short later, on ENOSPC or a fault, is counted whole).
 *   direct I/O (ext4, xfs, any iomap filesystem): iomap_dio_rw_begin, the
 *     count handed to the block layer.
 *   stores through a shared writable mapping: writeback_dirty_folio, a
 *     folio going from clean to dirty in a user page fault, counted as the
 *     folio's size (page granularity). Dirtied folios inside a syscall are
 *     the buffered writes above (or metadata), so they are left out.
 * Calls: the syscall the thread is in names the call (pt_regs->orig_ax),
 * and a syscall spanning many folio chunks is one call: a chunk starts a
 * new call when the thread's write syscall counter (task->ioac.syscw, which
 * the kernel raises after each write syscall) moved since its last counted
 * chunk, or when the chunk does not continue the last one (another file,
 * another offset: io_uring and splice raise no counter).
 * Syncs: ext4_sync_file_enter/_exit (timed, with their result), and
 * xfs_file_fsync and xfs_dir_fsync (counted; xfs has no exit tracepoint).
 * The call (fsync, fdatasync, msync, io_uring) is again the syscall's.
 *
 * Attribution: the task doing the write at that moment, by scope.bpf.h's
 * sets (its cgroup2 group, or its process), so a `cp` into the node's data
 * dir by another process is not the node's.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "kernel_types.h"
#include "nodescope.h"
#include "scope.bpf.h"
#include "disk_records.bpf.h"

#if !defined(__TARGET_ARCH_x86)
#error "disk.bpf.c reads x86_64 syscall numbers (pt_regs->orig_ax)"
#endif
#include <asm/unistd_64.h>

char LICENSE[] SEC("license") = "GPL";

/* The syscall the task is in: -1 (all ones) after a user-mode exception
 * such as a page fault. */
static __always_inline unsigned long syscall_nr(struct task_struct *task)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(task);
	return regs->orig_ax;
}

static __always_inline __u32 write_call(struct task_struct *task)
{
	if (task->flags & PF_IO_WORKER)
		return NS_DISK_IO_URING;
	switch (syscall_nr(task)) {
	case __NR_write: return NS_DISK_WRITE;
	case __NR_pwrite64: return NS_DISK_PWRITE64;
	case __NR_writev: return NS_DISK_WRITEV;
	case __NR_pwritev: return NS_DISK_PWRITEV;
	case __NR_pwritev2: return NS_DISK_PWRITEV2;
	case __NR_copy_file_range: return NS_DISK_COPY_FILE_RANGE;
	case __NR_sendfile: return NS_DISK_SENDFILE;
	case __NR_splice: return NS_DISK_SPLICE;
	case __NR_io_uring_enter: return NS_DISK_IO_URING;
	default: return NS_DISK_WRITE_OTHER;
	}
}

static __always_inline __u32 sync_call(struct task_struct *task)
{
	if (task->flags & PF_IO_WORKER)
		return NS_DISK_SYNC_IO_URING;
	switch (syscall_nr(task)) {
	case __NR_fsync: return NS_DISK_FSYNC;
	case __NR_fdatasync: return NS_DISK_FDATASYNC;
	case __NR_msync: return NS_DISK_MSYNC;
	case __NR_io_uring_enter: return NS_DISK_SYNC_IO_URING;
	default: return NS_DISK_SYNC_OTHER;
	}
}

/* Whether this chunk starts a new write call of the thread (see above);
 * without a slot, every chunk is one. */
static __always_inline int new_write_call(struct task_struct *task, struct ns_disk_task *t, struct ns_disk_key *key, __u64 pos, __u64 bytes)
{
	if (!t)
		return 1;
	__u64 syscw = task->ioac.syscw;
	int fresh = t->syscw != syscw || t->last_ino != key->ino || t->last_dev != key->dev || t->last_end != pos;
	t->syscw = syscw;
	t->last_ino = key->ino;
	t->last_dev = key->dev;
	t->last_end = pos + bytes;
	return fresh;
}

/* `bytes` at `pos` of `inode` (named by `d` when the hook has the file),
 * written by the current task. The hot path (a watched thread writing the
 * file it wrote last): its task storage (scope verdict, last write, count
 * slot), the syscall it is in, and plain adds to this CPU's pending counts. */
static __always_inline int fs_write(struct inode *inode, struct dentry *d, __u64 pos, __u64 bytes)
{
	if (!bytes)
		return 0;
	struct task_struct *task = bpf_get_current_task_btf();
	__u32 tgid = task->tgid, target;
	struct ns_disk_task *t;
	if (!disk_match_task(task, tgid, &target, &t))
		return 0;
	__u32 call = write_call(task);
	if (call >= NS_DISK_WRITE_CALLS)
		return 0;
	struct ns_disk_key key;
	__u32 round = disk_key(&key, inode->i_ino, inode->i_sb->s_dev, target, tgid);
	int fresh = new_write_call(task, t, &key, pos, bytes);
	__u32 slot = disk_count_slot(&key, round, inode, d, t);
	if (slot == NO_SLOT)
		return 0;
	disk_add_write(key.epoch, slot, call, bytes, fresh);
	return 0;
}

SEC("tp_btf/ext4_da_write_end")
int BPF_PROG(on_ext4_da_write_end, struct inode *inode, long long pos, unsigned int len, unsigned int copied)
{
	NS_ONLY_ACTIVE();
	return fs_write(inode, NULL, pos, copied);
}

SEC("tp_btf/ext4_write_end")
int BPF_PROG(on_ext4_write_end, struct inode *inode, long long pos, unsigned int len, unsigned int copied)
{
	NS_ONLY_ACTIVE();
	return fs_write(inode, NULL, pos, copied);
}

SEC("tp_btf/ext4_journalled_write_end")
int BPF_PROG(on_ext4_journalled_write_end, struct inode *inode, long long pos, unsigned int len, unsigned int copied)
{
	NS_ONLY_ACTIVE();
	return fs_write(inode, NULL, pos, copied);
}

static __always_inline int iocb_write(struct kiocb *iocb, struct iov_iter *from)
{
	struct file *file = iocb->ki_filp;
	return fs_write(file->f_inode, file->f_path.dentry, iocb->ki_pos, from->count);
}

SEC("tp_btf/xfs_file_buffered_write")
int BPF_PROG(on_xfs_buffered_write, struct kiocb *iocb, struct iov_iter *from)
{
	NS_ONLY_ACTIVE();
	return iocb_write(iocb, from);
}

/* Direct I/O of every iomap filesystem (ext4, xfs): reads too, left out. */
SEC("tp_btf/iomap_dio_rw_begin")
int BPF_PROG(on_iomap_dio_rw_begin, struct kiocb *iocb, struct iov_iter *iter, unsigned int dio_flags, unsigned long done_before)
{
	NS_ONLY_ACTIVE();
	if (!iter->data_source)
		return 0;
	return iocb_write(iocb, iter);
}

/* A folio of a file went from clean to dirty. Counted only in a user page
 * fault (a store through a shared writable mapping): inside a syscall it is
 * a buffered write the hooks above count, or metadata, or a truncate's
 * zeroing; an io_uring worker's are its buffered writes. */
SEC("tp_btf/writeback_dirty_folio")
int BPF_PROG(on_dirty_folio, struct folio *folio, struct address_space *mapping)
{
	NS_ONLY_ACTIVE();
	/* first the cheaper test: most folios are dirtied by buffered writes */
	struct task_struct *task = bpf_get_current_task_btf();
	if ((task->flags & PF_IO_WORKER) || syscall_nr(task) != ~0UL)
		return 0;
	__u32 tgid = task->tgid, target;
	struct ns_disk_task *slot;
	if (!disk_match_task(task, tgid, &target, &slot))
		return 0;
	if (!mapping)
		return 0;
	struct inode *inode = mapping->host;
	if (!inode || (inode->i_mode & S_IFMT) != S_IFREG)
		return 0;
	unsigned long flags = 0;
	bpf_probe_read_kernel(&flags, sizeof(flags), folio);
	__u64 pages = 1;
	if (flags & (1UL << bpf_core_enum_value(enum pageflags, PG_head)))
		pages = folio->_nr_pages;
	struct ns_disk_key key;
	__u32 round = disk_key(&key, inode->i_ino, inode->i_sb->s_dev, target, tgid);
	__u32 s = disk_count_slot(&key, round, inode, NULL, slot);
	if (s == NO_SLOT)
		return 0;
	disk_add_write(key.epoch, s, NS_DISK_MMAP, pages * NS_PAGE_SIZE, 1);
	return 0;
}

SEC("tp_btf/ext4_sync_file_enter")
int BPF_PROG(on_ext4_sync_enter, struct file *file, int datasync)
{
	NS_ONLY_ACTIVE();
	struct task_struct *task = bpf_get_current_task_btf();
	__u32 tgid = task->tgid, target;
	struct ns_disk_task *t;
	if (!disk_match_task(task, tgid, &target, &t) || !t)
		return 0;
	t->call = sync_call(task) + 1;
	t->call_target = target;
	t->call_tgid = tgid;
	t->start_ns = bpf_ktime_get_ns();
	return 0;
}

SEC("tp_btf/ext4_sync_file_exit")
int BPF_PROG(on_ext4_sync_exit, struct inode *inode, int ret)
{
	NS_ONLY_ACTIVE();
	struct ns_disk_task *t = disk_task();
	if (!t || !t->call)
		return 0;
	__u64 call = t->call - 1;
	t->call = 0;
	__u64 elapsed = bpf_ktime_get_ns() - t->start_ns;
	struct ns_disk_key key;
	__u32 round = disk_key(&key, inode->i_ino, inode->i_sb->s_dev, t->call_target, t->call_tgid);
	disk_count_sync(&key, round, inode, NULL, t, call, 1, elapsed, ret);
	return 0;
}

static __always_inline int xfs_sync(struct xfs_inode *ip)
{
	struct task_struct *task = bpf_get_current_task_btf();
	__u32 tgid = task->tgid, target;
	struct ns_disk_task *slot;
	if (!disk_match_task(task, tgid, &target, &slot))
		return 0;
	struct inode *inode = &ip->i_vnode;
	struct ns_disk_key key;
	__u32 round = disk_key(&key, inode->i_ino, inode->i_sb->s_dev, target, tgid);
	disk_count_sync(&key, round, inode, NULL, slot, sync_call(task), 0, 0, 0);
	return 0;
}

SEC("tp_btf/xfs_file_fsync")
int BPF_PROG(on_xfs_file_fsync, struct xfs_inode *ip)
{
	NS_ONLY_ACTIVE();
	return xfs_sync(ip);
}

SEC("tp_btf/xfs_dir_fsync")
int BPF_PROG(on_xfs_dir_fsync, struct xfs_inode *ip)
{
	NS_ONLY_ACTIVE();
	return xfs_sync(ip);
}

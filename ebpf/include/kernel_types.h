/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The few kernel-internal types nodescope's programs read, declared by hand
 * instead of a multi-megabyte generated vmlinux.h.
 *
 * Every struct carries preserve_access_index, so each field access becomes a
 * CO-RE relocation that the loader resolves by name against the running
 * kernel's BTF (/sys/kernel/btf/vmlinux). Field order and offsets here do not
 * matter and members the kernel nests in anonymous unions may be declared
 * flat; only names and types do. Add a field here before reading it.
 */
#ifndef NODESCOPE_KERNEL_TYPES_H
#define NODESCOPE_KERNEL_TYPES_H

#include <linux/types.h>

#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)

struct in6_addr {
	union {
		__u8 u6_addr8[16];
	} in6_u;
};

struct kernfs_node {
	__u64 id;
};

struct cgroup_root {
	int hierarchy_id; /* 0: the cgroup2 (default) hierarchy */
};

struct cgroup {
	struct kernfs_node *kn;
	struct cgroup_root *root;
	int level;
	struct cgroup *ancestors[];
};

struct ns_common {
	unsigned int inum;
};

struct net {
	struct ns_common ns;
};

struct sock_cgroup_data {
	struct cgroup *cgroup;
};

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
	struct {
		struct net *net;
	} skc_net; /* possible_net_t */
	unsigned long skc_flags; /* sk_flags: SOCK_DONE... */
	struct {
		__s64 counter;
	} skc_cookie; /* atomic64_t; 0 until someone asks for the cookie */
};

struct file;

struct socket {
	struct file *file;
};

struct sock {
	struct sock_common __sk_common;
	struct socket *sk_socket;
	struct sock_cgroup_data sk_cgrp_data;
	int sk_err;
	__u8 sk_shutdown;
};

struct inet_sock {
	__be16 inet_sport; /* the local port, network order */
};

struct inet_connection_sock {
	struct inet_sock icsk_inet;
};

struct tcp_sock {
	struct inet_connection_sock inet_conn;
	__u64 bytes_received;
	__u64 bytes_acked;
	__u32 write_seq; /* one past the last byte the process queued */
	__u32 snd_una;   /* first byte not yet acknowledged */
};

struct bpf_iter_meta {
	void *seq;
	__u64 session_id;
	__u64 seq_num;
};

struct bpf_iter__tcp {
	struct bpf_iter_meta *meta;
	struct sock_common *sk_common;
	__u32 uid;
};

/* disk.bpf.c and disk_syscalls.bpf.c: from a hook's file, inode, kiocb or
 * folio to the file's identity (device, inode) and the names of its path */
struct qstr {
	const unsigned char *name;
};

struct hlist_node {
	struct hlist_node *next;
};

struct hlist_head {
	struct hlist_node *first;
};

struct dentry {
	struct qstr d_name;
	struct dentry *d_parent;
	union {
		struct hlist_node d_alias; /* in inode->i_dentry */
	} d_u;
};

struct super_block {
	__u32 s_dev; /* dev_t */
	unsigned long s_magic;
};

struct inode {
	unsigned long i_ino;
	unsigned short i_mode;
	struct super_block *i_sb;
	struct hlist_head i_dentry; /* the dentries naming it (d_u.d_alias) */
};

struct path {
	struct dentry *dentry;
};

struct file {
	struct path f_path;
	struct inode *f_inode;
};

struct fdtable {
	unsigned int max_fds;
	struct file **fd;
};

struct files_struct {
	struct fdtable *fdt;
};

struct kiocb {
	struct file *ki_filp;
	long long ki_pos;
};

struct iov_iter {
	_Bool data_source; /* ITER_SOURCE: the data is written to the file */
	unsigned long count;
};

struct address_space {
	struct inode *host;
};

/* folio->flags is the first word of every folio (page flags); the number
 * of pages is in _nr_pages when the folio is large (PG_head set). */
struct folio {
	struct address_space *mapping;
	unsigned int _nr_pages;
};

struct xfs_inode {
	struct inode i_vnode;
};

struct vm_area_struct {
	unsigned long vm_start;
	struct file *vm_file;
};

/* x86_64: the syscall number the task entered with; -1 after a user-mode
 * exception (a page fault), whose pt_regs are what the task sees */
struct pt_regs {
	unsigned long orig_ax;
};

struct task_io_accounting {
	__u64 syscw; /* write syscalls completed (CONFIG_TASK_XACCT) */
};

struct nsproxy {
	struct net *net_ns;
};

struct task_struct {
	struct files_struct *files;
	int pid;
	int tgid;
	struct nsproxy *nsproxy;
	unsigned int flags;             /* PF_*: disk.bpf.c */
	struct task_io_accounting ioac; /* disk.bpf.c */
};

struct linux_binprm;

#pragma clang attribute pop

/*
 * Syscall tracepoint contexts, laid out as the tracepoint format files say
 * (/sys/kernel/tracing/events/syscalls/<name>/format). Classic tracepoint
 * contexts are read by offset, not through BTF, so these stay outside the
 * CO-RE region above.
 */
struct ns_sys_enter_ctx {
	__u64 __unused_common;
	long id;
	unsigned long args[6];
};

struct ns_sys_exit_ctx {
	__u64 __unused_common;
	long id;
	long ret;
};


/* TCP states, include/net/tcp_states.h */
enum {
	TCP_ESTABLISHED = 1,
	TCP_SYN_SENT = 2,
	TCP_SYN_RECV = 3,
	TCP_FIN_WAIT1 = 4,
	TCP_FIN_WAIT2 = 5,
	TCP_TIME_WAIT = 6,
	TCP_CLOSE = 7,
	TCP_CLOSE_WAIT = 8,
	TCP_LAST_ACK = 9,
	TCP_LISTEN = 10,
	TCP_CLOSING = 11,
};

/* enum sock_flags: set when the peer's FIN arrived (tcp_fin), never by a
 * reset or by the node's own close */
#define SOCK_DONE 1

/* what a full hash map answers to an insert */
#define E2BIG 7

#define AF_INET 2
#define AF_INET6 10

/* include/uapi/linux/stat.h */
#define S_IFMT 00170000
#define S_IFREG 0100000
#define S_IFDIR 0040000

/* include/linux/sched.h: an io_uring worker (io-wq, SQPOLL) thread */
#define PF_IO_WORKER 0x00000010

/* include/linux/page-flags.h: the first page of a large folio (the value
 * is relocated from the running kernel's BTF) */
enum pageflags {
	PG_head = 6,
};

#define NS_PAGE_SIZE 4096

#endif

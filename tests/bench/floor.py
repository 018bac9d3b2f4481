#!/usr/bin/env python3
"""An empty BPF program on a raw tracepoint, held attached until SIGTERM.

usage: floor.py TRACEPOINT   (e.g. inet_sock_set_state)

Prints the program's id on stdout once it is attached. The bench reads its
run count and run time (kernel.bpf_stats_enabled) beside the agent's program
on the same tracepoint: what the kernel spends to run any program there, in
this machine's state at this moment (a VM's idle states and frequency move
it by a factor of two between runs), so that the agent's own part of a
per-run figure can be told apart from the VM's.

The program is two instructions (r0 = 0; exit), loaded and attached with
the bpf(2) syscall directly (BPF_PROG_TYPE_RAW_TRACEPOINT, run by the same
bpf_trace_run path as the agent's tp_btf program); no library needed.
"""
import ctypes
import os
import signal
import sys

SYS_BPF = 321  # x86_64
BPF_PROG_LOAD = 5
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_RAW_TRACEPOINT_OPEN = 17
BPF_PROG_TYPE_RAW_TRACEPOINT = 17

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def bpf(cmd, attr):
    fd = libc.syscall(SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bpf({cmd}): {os.strerror(err)}")
    return fd


class ProgLoad(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("pad", ctypes.c_uint8 * 64)]


class RawTpOpen(ctypes.Structure):
    _fields_ = [("name", ctypes.c_uint64), ("prog_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("cookie", ctypes.c_uint64)]


class InfoByFd(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class ProgInfo(ctypes.Structure):
    # struct bpf_prog_info: type, id, then the rest (only the id is read)
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("rest", ctypes.c_uint8 * 248)]


def main():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    tracepoint = sys.argv[1].encode()
    # r0 = 0 (BPF_ALU64 | BPF_MOV | BPF_K); exit (BPF_JMP | BPF_EXIT)
    insns = (ctypes.c_uint64 * 2)(0x00000000000000B7, 0x0000000000000095)
    license = ctypes.create_string_buffer(b"GPL")
    load = ProgLoad(prog_type=BPF_PROG_TYPE_RAW_TRACEPOINT, insn_cnt=2,
                    insns=ctypes.addressof(insns), license=ctypes.addressof(license), prog_name=b"bench_floor")
    prog = bpf(BPF_PROG_LOAD, load)
    name = ctypes.create_string_buffer(tracepoint)
    link = bpf(BPF_RAW_TRACEPOINT_OPEN, RawTpOpen(name=ctypes.addressof(name), prog_fd=prog))
    info = ProgInfo()
    bpf(BPF_OBJ_GET_INFO_BY_FD, InfoByFd(bpf_fd=prog, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)))
    print(info.id, flush=True)
    # attached until the bench stops us by pid
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    os.close(link)
    os.close(prog)


if __name__ == "__main__":
    main()

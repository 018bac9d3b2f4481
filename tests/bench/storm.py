#!/usr/bin/env python3
"""Connection storm for tests/bench/compare.sh: short real P2P connections to a
Bitcoin-family node (regtest magic) on loopback, at rising rates.

Each connection binds its own source address from 127.SUBNET.y.z (a pool of
POOL addresses, reused in turn), connects, sends a version message, reads
the node's answer up to its verack, and closes. Every step is bounded: at
most RATE x SECS connections (RATE 0: as fast as CONCURRENCY open ones
allow, for SECS seconds).

usage: storm.py PORT SECS CONCURRENCY POOL RATE [RATE ...]
prints one JSON object: per step the rate asked, the rate made (established
connections a second), established, failed (never established), short
(established, but the node's verack never came: closed by the node or
timed out after 5 s) and the client's bytes.
"""
import errno
import hashlib
import json
import random
import selectors
import socket
import struct
import sys
import time

IP_BIND_ADDRESS_NO_PORT = 24
MAGIC = bytes.fromhex("fabfb5da")  # regtest


def message(cmd, payload):
    check = hashlib.sha256(hashlib.sha256(payload).digest()).digest()[:4]
    return MAGIC + cmd.encode().ljust(12, b"\0") + struct.pack("<I", len(payload)) + check + payload


def version():
    addr = struct.pack("<Q", 0) + b"\0" * 10 + b"\xff\xff" + bytes([127, 0, 0, 1]) + b"\0\0"
    ua = b"/nodescope-bench/"
    payload = (struct.pack("<iQq", 70015, 0, int(time.time())) + addr + addr
               + struct.pack("<Q", random.getrandbits(64)) + bytes([len(ua)]) + ua
               + struct.pack("<i", 0) + b"\0")
    return message("version", payload)


def has_verack(buf):
    i = 0
    while i + 24 <= len(buf):
        if buf[i + 4:i + 16].rstrip(b"\0") == b"verack":
            return True
        i += 24 + struct.unpack("<I", buf[i + 16:i + 20])[0]
    return False


def step(port, secs, concurrency, pool, rate):
    sel = selectors.DefaultSelector()
    open_ = {}  # fd -> [sock, phase, buf, deadline]
    st = {"rate": rate, "established": 0, "failed": 0, "sent": 0, "received": 0, "short": 0}
    start = time.monotonic()
    end = start + secs
    limit = int(rate * secs) if rate else None
    started = 0
    nxt = start

    def finish(fd):
        s = open_.pop(fd)[0]
        sel.unregister(s)
        s.close()

    while True:
        now = time.monotonic()
        more = now < end and (limit is None or started < limit)
        if not more and not open_:
            break
        while more and len(open_) < concurrency and (rate == 0 or now >= nxt):
            n = step.counter
            step.counter += 1
            src = f"127.{step.subnet}.{(n % pool) // 250}.{(n % pool) % 250 + 1}"
            s = socket.socket()
            s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            s.setblocking(False)
            s.bind((src, 0))
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            open_[s.fileno()] = [s, "connect", b"", now + 5]
            sel.register(s, selectors.EVENT_WRITE)
            started += 1
            nxt += 1 / rate if rate else 0
            more = now < end and (limit is None or started < limit)
        timeout = 0.05
        if rate and more:
            timeout = max(0.0, min(timeout, nxt - time.monotonic()))
        for key, _ in sel.select(timeout):
            s = key.fileobj
            rec = open_[s.fileno()]
            if rec[1] == "connect":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    st["failed"] += 1
                    finish(s.fileno())
                    continue
                st["established"] += 1
                msg = version()
                s.send(msg)  # 117 bytes: fits any fresh send buffer
                st["sent"] += len(msg)
                rec[1] = "read"
                sel.modify(s, selectors.EVENT_READ)
            else:
                try:
                    data = s.recv(65536)
                except OSError as e:
                    if e.errno in (errno.EAGAIN,):
                        continue
                    data = b""
                rec[2] += data
                st["received"] += len(data)
                if not data or has_verack(rec[2]):
                    if not data:
                        st["short"] += 1
                    finish(s.fileno())
        now = time.monotonic()
        for fd in [fd for fd, r in open_.items() if r[3] < now]:
            s = open_[fd][0]
            if open_[fd][1] == "connect":
                try:  # the handshake may have completed unseen
                    s.getpeername()
                    st["established"] += 1
                    st["short"] += 1
                except OSError:
                    st["failed"] += 1
            else:
                st["short"] += 1
            finish(fd)
    st["secs"] = time.monotonic() - start
    st["made_per_sec"] = st["established"] / st["secs"]
    return st


step.counter = 0
step.subnet = 77


def main():
    port, secs, concurrency, pool = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rates = [float(r) for r in sys.argv[5:]]
    steps = [step(port, secs, concurrency, pool, r) for r in rates]
    tot = {k: sum(s[k] for s in steps) for k in ("established", "failed", "sent", "received", "short")}
    print(json.dumps({"steps": steps, **tot}))


if __name__ == "__main__":
    main()

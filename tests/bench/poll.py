#!/usr/bin/env python3
"""The polling observers of tests/bench/compare.sh, as exporters built on
them work: once a second, ask for the connections open now and remember
every connection seen and the last byte counts it had.

  poll.py ss OUT PORT [PORT ...]    `ss -tin` (netlink sock_diag) for sockets
                                    whose local port is one of PORTs (L:PORT,
                                    or a bare PORT) or whose remote port is
                                    (R:PORT): the node's own sockets
  poll.py rpc OUT CLI [ARG ...]     `CLI ARG... getpeerinfo` (the node's RPC)

After every poll OUT holds, per local port (ss) or per direction (rpc), the
distinct connections seen and the sum over them of the last bytes sent and
received each showed. Stops on SIGTERM or SIGINT.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)

BYTES = {k: re.compile(k + r":(\d+)") for k in ("bytes_acked", "bytes_received")}


def poll_ss(ports):
    local_ports = {p.removeprefix("L:") for p in ports if not p.startswith("R:")}
    expr = " or ".join(f"dport = :{p[2:]}" if p.startswith("R:") else f"sport = :{p.removeprefix('L:')}"
                       for p in ports)
    out = subprocess.run(["ss", "-tinH", "state", "connected", f"( {expr} )"],
                         capture_output=True, text=True).stdout
    seen = {}
    key = None
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            f = line.split()
            # state recv-q send-q local peer (with a state filter, no state column)
            local, peer = f[-2], f[-1]
            key = (local.rsplit(":", 1)[1] if local.rsplit(":", 1)[1] in local_ports else "outbound", local, peer)
            seen[key] = (0, 0)
        elif key:
            got = {k: int(m.group(1)) if (m := r.search(line)) else 0 for k, r in BYTES.items()}
            seen[key] = (got["bytes_acked"], got["bytes_received"])
    return {(k[0], k[1] + "-" + k[2]): v for k, v in seen.items()}


def poll_rpc(cli):
    out = subprocess.run(cli + ["getpeerinfo"], capture_output=True, text=True)
    if out.returncode:
        return {}
    return {("inbound" if p["inbound"] else "outbound", p["id"]): (p["bytessent"], p["bytesrecv"])
            for p in json.loads(out.stdout)}


def main():
    mode, path = sys.argv[1], sys.argv[2]
    poll = (lambda: poll_ss(sys.argv[3:])) if mode == "ss" else (lambda: poll_rpc(sys.argv[3:]))
    last = {}  # (group, connection) -> (sent, received)
    polls = 0
    nxt = time.monotonic()
    while not stop:
        for k, v in poll().items():
            last[k] = v
        polls += 1
        summary = {}
        for (group, _), (sent, recv) in last.items():
            s = summary.setdefault(str(group), {"connections": 0, "sent": 0, "received": 0})
            s["connections"] += 1
            s["sent"] += sent
            s["received"] += recv
        with open(path + ".tmp", "w") as f:
            json.dump({"polls": polls, "groups": summary}, f)
        os.replace(path + ".tmp", path)
        nxt += 1
        while not stop and time.monotonic() < nxt:
            time.sleep(min(0.1, max(0.0, nxt - time.monotonic())))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""What an observer of tests/bench/compare.sh has seen so far, as one JSON
object: connections and bytes (summed over every connection it tracks) and
file bytes and fdatasyncs; null for what the observer does not count.

  compare_obs.py nodescope URL TARGET   /metrics, after two more collections
  compare_obs.py bpftrace FILE          compare.bt's last complete print
  compare_obs.py poll FILE              poll.py's state, after two more polls

Each waits first until the observer has read the kernel (or the node) again
since the call, so what happened before the call is in the answer. Exits 1
with one line when the observer does not answer within 30 s.
"""
import json
import re
import sys
import time
import urllib.request

DEADLINE = time.monotonic() + 30


def fail(msg):
    print(f"compare_obs: {msg}", file=sys.stderr)
    sys.exit(1)


def wait_for(get, grown):
    first = get() or 0  # (poll.py's first poll may not be written yet)
    while time.monotonic() < DEADLINE:
        now = get()
        if now is not None and first is not None and now >= first + grown:
            return
        time.sleep(0.2)
    fail("the observer did not move on in 30 s")


SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} (\S+)$")


def scrape(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except OSError as e:
        fail(f"{url}: {e}")
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            labels = dict(re.findall(r'([a-z_]+)="([^"]*)"', m.group(2)))
            yield m.group(1), labels, float(m.group(3))
        elif line.startswith("nodescope_collection_duration_seconds_count "):
            yield "nodescope_collection_duration_seconds_count", {}, float(line.split()[1])


def nodescope(url, target):
    def collections():
        return sum(v for n, _, v in scrape(url) if n == "nodescope_collection_duration_seconds_count")
    wait_for(collections, 2)
    out = {"conns": 0, "bytes": 0, "file_bytes": 0, "file_syncs": 0}
    for name, lab, v in scrape(url):
        if lab.get("nodescope_target") != target:
            continue
        if name == "nodescope_connection_opened_total" and lab.get("nodescope_service") == "p2p":
            out["conns"] += v
        elif name == "nodescope_p2p_io_bytes_total":
            # the per-target total: a sum of the per-peer series loses the
            # bytes of peers that left the top N (the storm's 2,000 peers)
            out["bytes"] += v
        elif name == "nodescope_file_written_bytes_total":
            out["file_bytes"] += v
        elif name == "nodescope_file_syncs_total" and lab.get("nodescope_sync_call") == "fdatasync":
            out["file_syncs"] += v
    return {k: int(v) for k, v in out.items()}


def bpftrace(path):
    def prints():
        return open(path).read().count("\n--- ")
    wait_for(prints, 2)
    blocks = open(path).read().split("\n--- ")
    block = blocks[-2]  # the last one is still being written
    tot = {}
    for line in block.splitlines():
        m = re.match(r"^@([a-z_]+)(?:\[[^\]]*\])?: (\d+)$", line)
        if m:
            tot[m.group(1)] = tot.get(m.group(1), 0) + int(m.group(2))
    return {"conns": tot.get("opened", 0), "bytes": tot.get("sent", 0) + tot.get("recv", 0),
            "file_bytes": tot.get("file_written", 0), "file_syncs": tot.get("file_syncs", 0)}


def poll(path):
    def polls():
        try:
            return json.load(open(path))["polls"]
        except (OSError, ValueError):
            return None
    wait_for(polls, 2)
    groups = json.load(open(path))["groups"].values()
    return {"conns": sum(g["connections"] for g in groups),
            "bytes": sum(g["sent"] + g["received"] for g in groups),
            "file_bytes": None, "file_syncs": None}


def main():
    kind = sys.argv[1]
    if kind == "nodescope":
        print(json.dumps(nodescope(sys.argv[2], sys.argv[3])))
    elif kind == "bpftrace":
        print(json.dumps(bpftrace(sys.argv[2])))
    else:
        print(json.dumps(poll(sys.argv[2])))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The table and the target checks of tests/bench/compare.sh, from its
results.jsonl and the stats passes' program snapshots.

usage: compare_report.py RESULTS WORKDIR MACHINE-LINE ROUNDS BLOCKS STORM-RATES
Exits 1 with one line naming every target missed.
"""
import json
import os
import statistics
import sys

results, work, machine, rounds, blocks, storm_rates = sys.argv[1:7]
rows = [json.loads(line) for line in open(results)]
TICK = os.sysconf("SC_CLK_TCK")
OBS = ["none", "nodescope", "bpftrace", "ss", "rpc"]
SCEN = [  # name, label, unit, higher is better
    ("bulk", "iperf3 bulk", "Gbit/s", True),
    ("small", "iperf3 1 KiB writes", "Gbit/s", True),
    ("storm", "connection storm, unpaced", "conn/s", True),
    ("fio", "fio 4 KiB write+fdatasync", "IOPS", True),
    ("hosttax", "host tax: dd 64 B, unwatched", "CPU s", False),
    ("relay", f"block relay, {blocks} blocks", "s", False),
]
# how much of the workload nodescope may cost
TARGET_LOSS = {"bulk": 0.01, "small": 0.03, "fio": 0.01, "hosttax": 0.02, "relay": 0.01}
GROUP = {"bulk": "iperf", "small": "iperf", "storm": "storm", "fio": "disk", "hosttax": "disk", "relay": "relay"}
PREV = {"iperf": "start", "storm": "iperf", "disk": "storm", "relay": "disk"}

ratio_rounds = sorted({r["round"] for r in rows if r["round"] != "stats"})
rec = {(r["round"], r["obs"], r["scenario"]): r for r in rows if "scenario" in r}
seen = {(r["round"], r["obs"], r["seen"]): r["counts"] for r in rows if "seen" in r}
truth = {(r["round"], r["obs"], r["truth"]): r["bytes"] for r in rows if "truth" in r and "bytes" in r}
hwm = {(r["round"], r["obs"]): r for r in rows if "pass_wall" in r}
hwm_at = {(r["round"], r["obs"], r["seen"]): r["hwm_kib"] for r in rows if "seen" in r}
failed = []


def delta(rnd, obs, group, key):
    a, b = seen.get((rnd, obs, PREV[group]), {}), seen.get((rnd, obs, group), {})
    if a.get(key) is None or b.get(key) is None:
        return None
    return b[key] - a[key]


# what a poller can see at all: getpeerinfo knows the node's peers only
BLIND = {("rpc", "bulk"), ("rpc", "small")}


def accuracy(rnd, obs, scen):
    """(connections seen / made, bytes seen / the workload's own count), or None each"""
    g = GROUP[scen]
    if (obs, scen) in BLIND:
        return None, None
    if scen in ("bulk", "small"):
        b = delta(rnd, obs, g, "bytes")
        return None, (b / truth[(rnd, obs, "iperf")] if b is not None else None)
    if scen == "storm":
        made = rec[(rnd, obs, "storm")]["truth"]["established"]
        c, b = delta(rnd, obs, g, "conns"), delta(rnd, obs, g, "bytes")
        t = truth[(rnd, obs, "storm")]
        return (c / made if c is not None else None), (b / t if b is not None else None)
    if scen == "fio":
        t = rec[(rnd, obs, "fio")]["truth"]
        s, b = delta(rnd, obs, g, "file_syncs"), delta(rnd, obs, g, "file_bytes")
        return (s / t["file_syncs"] if s is not None else None), (b / t["file_bytes"] if b is not None else None)
    if scen == "relay":
        b = delta(rnd, obs, g, "bytes")
        return None, (b / truth[(rnd, obs, "relay")] if b is not None else None)
    return None, None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pct(x, d=1):
    return "-" if x is None else f"{100 * x:.{d}f}%"


figure = {(o, s): med([rec[(r, o, s)]["figure"] for r in ratio_rounds if (r, o, s) in rec])
          for o in OBS for s, *_ in SCEN}
cpu = {(o, s): med([rec[(r, o, s)]["cpu_ticks"] / TICK / rec[(r, o, s)]["wall"]
                    for r in ratio_rounds if (r, o, s) in rec]) for o in OBS for s, *_ in SCEN}
loss = {}
for o in OBS:
    for s, _, _, up in SCEN:
        f, base = figure[(o, s)], figure[("none", s)]
        if f is None or not base:
            continue
        ratio = f / base
        loss[(o, s)] = (ratio, (1 - ratio) if up else (ratio - 1))

print(machine)
print(f"rounds {len(ratio_rounds)} (medians), {blocks} blocks relayed, storm rates {storm_rates} (0: unpaced)")
print()
hdr = f"{'scenario':<31}{'observer':<10}{'figure':>14}{'ratio':>8}{'CPU':>8}{'RSS':>9}  {'conns seen':>10}  {'bytes seen':>10}"
print(hdr)
print("-" * len(hdr))
for s, label, unit, up in SCEN:
    for o in OBS:
        f = figure[(o, s)]
        if f is None:
            continue
        ratio = loss.get((o, s), (None,))[0]
        accs = [accuracy(r, o, s) for r in ratio_rounds if (r, o, s) in rec] if o != "none" else []
        c_acc = min([a[0] for a in accs if a[0] is not None], default=None)
        b_acc = min([a[1] for a in accs if a[1] is not None], default=None)
        rss = max([hwm_at[(r, o, GROUP[s])] for r in ratio_rounds if (r, o, GROUP[s]) in hwm_at], default=0) / 1024
        print(f"{label if o == 'none' else '':<31}{o:<10}{f:>10.{1 if f > 100 else 3}f} {unit:<3}"
              f"{'' if ratio is None or o == 'none' else f'{ratio:.3f}':>8}"
              f"{'' if o == 'none' else pct(cpu[(o, s)], 2):>8}"
              f"{'' if o == 'none' else f'{rss:.1f} MiB':>9}  {pct(c_acc, 2):>10}  {pct(b_acc, 2):>10}")
print("ratio: the figure over the baseline's (time figures: above 1 is slower); CPU: the observer's own,")
print("share of one core over the scenario; RSS: its peak (VmHWM) from its start to the end of the scenario")
print("(bulk and 1 KiB together, fio and host tax together); seen: the least of the")
print("rounds, connections (fio: fdatasyncs) and bytes, against the workload's own counts.")

# the storm step by step
print()
print("storm, connections a second made at each step (median over rounds):")
for o in OBS:
    steps = [rec[(r, o, "storm")]["truth"]["steps"] for r in ratio_rounds if (r, o, "storm") in rec]
    if steps:
        cells = [f"{s['rate'] or 'max':>6}: {med([st[i]['made_per_sec'] for st in steps]):7.0f}"
                 for i, s in enumerate(steps[0])]
        storms = [rec[(r, o, "storm")]["truth"] for r in ratio_rounds if (r, o, "storm") in rec]
        print(f"  {o:<10}" + "  ".join(cells) + f"   (established {med([t['established'] for t in storms]):.0f}, "
              f"never established {med([t['failed'] for t in storms]):.0f}, no verack {med([t['short'] for t in storms]):.0f})")

# total cost: the workload lost (summed over the scenarios) + the observer's CPU over its pass
print()
cost = {}
for o in OBS[1:]:
    lost = sum(max(0.0, loss[(o, s)][1]) for s, *_ in SCEN if (o, s) in loss)
    # its CPU while the workloads ran (not while the bench waited for it to report)
    own = med([sum(rec[(r, o, s)]["cpu_ticks"] for s, *_ in SCEN) / TICK / sum(rec[(r, o, s)]["wall"] for s, *_ in SCEN)
               for r in ratio_rounds if all((r, o, s) in rec for s, *_ in SCEN)]) or 0
    cost[o] = lost + own
    wall = med([hwm[(r, o)]["pass_wall"] for r in ratio_rounds if (r, o) in hwm])
    print(f"total cost {o:<10} {100 * cost[o]:6.2f} (workload lost {100 * lost:.2f} % summed over the scenarios, "
          f"own CPU {100 * own:.2f} % of a core while they ran; a pass took {wall:.0f} s)")

# memory: the peak (VmHWM, what the target judges) and what it holds at the end
print()
for o in OBS[1:]:
    peaks = [hwm[(r, o)]["hwm_kib"] / 1024 for r in ratio_rounds if (r, o) in hwm]
    starts = [hwm_at[(r, o, "start")] / 1024 for r in ratio_rounds if (r, o, "start") in hwm_at]
    ends = [hwm[(r, o)].get("rss_kib", 0) / 1024 for r in ratio_rounds if (r, o) in hwm]
    if peaks:
        print(f"memory {o:<10} peak {max(peaks):6.1f} MiB (reached {max(starts):.1f} MiB by the end of its start-up), "
              f"resident at the end of its passes {max(ends):6.1f} MiB")

# kernel time per program, from the stats passes
for o in ("nodescope", "bpftrace"):
    snaps = {}
    for tag in ("start", "iperf", "storm", "disk", "relay"):
        try:
            snaps[tag] = {p["id"]: p for p in json.load(open(f"{work}/bpf.{o}.{tag}.json"))}
        except OSError:
            pass
    if len(snaps) < 5:
        continue
    print()
    print(f"{o}: kernel time of each program (stats pass), ms (runs), and ns a run over the pass")
    groups = ["iperf", "storm", "disk", "relay"]
    print(f"  {'program (id)':<26}" + "".join(f"{g:>20}" for g in groups) + f"{'ns/run':>9}")
    tot = {g: 0 for g in groups}
    for pid, p in sorted(snaps["relay"].items(), key=lambda kv: kv[1].get("name", "")):
        cells, all_ns, all_n = [], 0, 0
        for g in groups:
            a, b = snaps[PREV[g]].get(pid, {}), snaps[g].get(pid, {})
            ns = b.get("run_time_ns", 0) - a.get("run_time_ns", 0)
            n = b.get("run_cnt", 0) - a.get("run_cnt", 0)
            tot[g] += ns
            all_ns, all_n = all_ns + ns, all_n + n
            cells.append(f"{ns / 1e6:>10.2f} ({n:>7})")
        if all_n:
            print(f"  {p.get('name', '?') + f' ({pid})':<26}" + "".join(cells) + f"{all_ns / all_n:>9.0f}")
    print(f"  {'all':<26}" + "".join(f"{tot[g] / 1e6:>10.2f}{'':>10}" for g in groups))

# targets
ns = "nodescope"
for s, *_ in SCEN:
    if s in TARGET_LOSS and (ns, s) in loss and loss[(ns, s)][1] > TARGET_LOSS[s]:
        failed.append(f"{s} costs {100 * loss[(ns, s)][1]:.1f} % > {100 * TARGET_LOSS[s]:.0f} %")
for r in ratio_rounds + ["stats"]:
    if (r, ns, "storm") not in rec:
        continue
    # every connection the load generator made, no more; every byte the node
    # read and wrote (the kernel may hold more: bytes that reached a socket the
    # node closed without reading them)
    c, b = accuracy(r, ns, "storm")
    if c != 1 or b is None or b < 1:
        failed.append(f"storm round {r}: saw {pct(c, 2)} of connections, {pct(b, 2)} of bytes")
    _, b = accuracy(r, ns, "bulk")
    if b is None or b < 1:
        failed.append(f"round {r}: counted {pct(b, 2)} of iperf3's bytes")
    c, b = accuracy(r, ns, "fio")
    if c is None or c < 1 or b is None or b < 1:
        failed.append(f"round {r}: counted {pct(c, 2)} of fio's fdatasyncs, {pct(b, 2)} of its bytes")
    _, b = accuracy(r, ns, "relay")
    if not b:
        failed.append(f"round {r}: counted no bytes of the block relay")
if ns in cost and "bpftrace" in cost and cost[ns] > cost["bpftrace"] / 2:
    failed.append(f"total cost {100 * cost[ns]:.2f} > half of bpftrace's {100 * cost['bpftrace']:.2f}")
peak = max([hwm[(r, ns)]["hwm_kib"] for r in ratio_rounds + ["stats"] if (r, ns) in hwm], default=0) / 1024
if peak >= 40:
    failed.append(f"peak RSS {peak:.1f} MiB >= 40 MiB")
print()
if failed:
    print("bench compare: FAILED: nodescope: " + "; ".join(failed))
    sys.exit(1)
print("bench compare: every target met")

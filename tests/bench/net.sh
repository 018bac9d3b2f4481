#!/usr/bin/env bash
# cargo xtask bench net: what the network probes cost.
#
# iperf3 on loopback with its server inside a watched cgroup, measured with
# and without nodescope attached, alternating rounds so drift hits both
# sides alike; bulk and 1 KiB writes. Then a connection-churn phase (short
# connections to a server in the cgroup) for the per-run cost of the state
# tracepoint, and the iterator's cost per run, both from the kernel's own
# accounting (kernel.bpf_stats_enabled). Prints every figure with its ratio.
#
# usage: net.sh NODESCOPE_BINARY
set -euo pipefail
bin=$1
rounds=${ROUNDS:-5}
secs=${SECS:-4}
source "$(dirname "$0")/common.sh"
bench_setup net /tmp

port=$(free_port)
churn_port=$(free_port)

# the watched workload: an iperf3 server and an accept-and-close server, born in the cgroup
sh -c 'echo $$ > "$0/cgroup.procs"; exec iperf3 -s -B 127.0.0.1 -p "$1"' "$cg" "$port" >"$work/iperf-server.log" 2>&1 &
pids+=($!)
start_churn_server "$churn_port"
sleep 1

net_only_config "$work/nodescope.toml"

gbps() { # iperf3 client run -> Gbit/s received
    iperf3 -c 127.0.0.1 -p "$port" -t "$secs" "$@" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'
}

declare -A res
for mode in bulk small; do res[$mode-off]=""; res[$mode-on]=""; done
for r in $(seq "$rounds"); do
    for side in off on; do
        [ "$side" = on ] && start_agent 1
        res[bulk-$side]+="$(gbps) "
        res[small-$side]+="$(gbps -l 1K) "
        [ "$side" = on ] && stop_agent
    done
    echo "round $r done" >&2
done

# per-run kernel cost, from the kernel's accounting. The churn runs in
# blocks and each block's cost is its own (the counters' deltas over it), so
# a burst of other load on the host shows as one slow block instead of
# skewing the whole figure; the target is judged on the median block.
sysctl -qw kernel.bpf_stats_enabled=1
start_agent 1
blocks=${BLOCKS:-6}
per_block=${PER_BLOCK:-500}
# beside it, an empty program on the same tracepoint (tests/bench/floor.py):
# what running any program there costs in this VM state at this moment
start_floor inet_sock_set_state
bpftool prog show --json >"$work/progs.0.json"
for b in $(seq "$blocks"); do
    churn "$churn_port" "$per_block"
    bpftool prog show --json >"$work/progs.$b.json"
done
# process and cgroup churn for the scope hooks: 1000 fork+exec+exit, 200
# groups made and removed below the watched one
for _ in $(seq 1000); do /bin/true; done
for i in $(seq 200); do mkdir "$cg/churn-$i"; rmdir "$cg/churn-$i"; done
sleep 3
bpftool prog show --json >"$work/progs.end.json"
prog_ids=$(agent_prog_ids)
metrics=$(curl -sf "http://127.0.0.1:$http_port/metrics")
stop_agent
sysctl -qw kernel.bpf_stats_enabled="$stats_before"

counted=$(echo "$metrics" | awk '/^nodescope_connection_opened_total/ && /nodescope_target="bench"/ {s+=$NF} END {print s+0}')
python3 - "$work" "$blocks" "$prog_ids" "$counted" "$((blocks * per_block))" "$floor_id" <<PY
import json, statistics, sys
work, blocks = sys.argv[1], int(sys.argv[2])
counted, made = int(float(sys.argv[4])), int(sys.argv[5])
ids = {int(i) for i in sys.argv[3].split(",") if i} | {int(sys.argv[6])}
def load(tag):
    return [p for p in json.load(open(f"{work}/progs.{tag}.json")) if p["id"] in ids]
def stat(progs, name):
    # kernel program names are cut to 15 characters
    rows = [p for p in progs if p.get("name", "").startswith(name)]
    if not rows: return (0, 0)
    p = max(rows, key=lambda p: p["id"])
    return p.get("run_time_ns", 0), p.get("run_cnt", 0)
snaps = [load(i) for i in range(blocks + 1)]
end = load("end")
bulk_off = float("$(echo "${res[bulk-off]}" | median)"); bulk_on = float("$(echo "${res[bulk-on]}" | median)")
small_off = float("$(echo "${res[small-off]}" | median)"); small_on = float("$(echo "${res[small-on]}" | median)")
failed = []
print(f"{'case':<34}{'without':>12}{'with':>12}{'ratio':>9}   target")
for label, off, on, target in [("iperf3 bulk (Gbit/s, median)", bulk_off, bulk_on, 0.99),
                               ("iperf3 1 KiB writes (Gbit/s)", small_off, small_on, 0.97)]:
    print(f"{label:<34}{off:>12.2f}{on:>12.2f}{on/off:>9.3f}   >= {target:.3f}")
    if on / off < target: failed.append(f"{label} ratio {on/off:.3f} < {target}")
print("raw rounds: bulk off [$(echo ${res[bulk-off]})] on [$(echo ${res[bulk-on]})]")
print("            1KiB off [$(echo ${res[small-off]})] on [$(echo ${res[small-on]})]")
def per_run(name):
    out = []
    for a, b in zip(snaps, snaps[1:]):
        (t0, c0), (t1, c1) = stat(a, name), stat(b, name)
        if c1 > c0: out.append((t1 - t0) / (c1 - c0))
    return out
per_block, floor = per_run("on_tcp_state"), per_run("bench_floor")
if len(per_block) < blocks:
    failed.append("on_tcp_state did not run in every churn block: the probes were not attached")
elif len(floor) < blocks:
    failed.append("the empty program did not run in every churn block")
else:
    med, fmed = statistics.median(per_block), statistics.median(floor)
    print(f"on_tcp_state    state tracepoint, per TCP state change   {med:8.0f} ns/run, median of {blocks} blocks "
          f"(min {min(per_block):.0f}, max {max(per_block):.0f})   target <= 150 ns")
    print(f"bench_floor     an empty program, same tracepoint        {fmed:8.0f} ns/run, median of {blocks} blocks "
          f"(min {min(floor):.0f}, max {max(floor):.0f}): the kernel's cost of any program there now")
    print(f"                on_tcp_state's own work over that floor  {med - fmed:8.0f} ns/run")
    if med > 150: failed.append(f"on_tcp_state {med:.0f} ns/run > 150")
for name, what in [("tcp_iter", "tcp iterator, per socket visited"),
                   ("scope_fork", "fork of any process (scope)"),
                   ("scope_exec", "exec of any process (scope)"),
                   ("scope_exit", "exit of any process (scope)"),
                   ("scope_cgroup_m", "cgroup mkdir (scope)"),
                   ("scope_cgroup_r", "cgroup rmdir (scope)")]:
    ns, cnt = stat(end, name)
    if not cnt:
        failed.append(f"{name} never ran: the probes were not attached"); continue
    print(f"{name:<15} {what:<40} {ns/cnt:8.0f} ns/run over {cnt} runs")
print(f"connections the agent counted during churn: {counted} ({made} made)")
if counted != made:
    failed.append(f"the agent counted {counted} of the {made} connections made")
if failed:
    print("bench net: FAILED: " + "; ".join(failed))
    sys.exit(1)
PY

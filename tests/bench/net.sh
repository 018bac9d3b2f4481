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
sh -c 'echo $$ > "$0/cgroup.procs"; exec python3 -c "
import socket,sys
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((\"127.0.0.1\", int(sys.argv[1]))); s.listen(512)
while True:
    c,_=s.accept(); c.recv(16); c.close()
" "$1"' "$cg" "$churn_port" >"$work/churn-server.log" 2>&1 &
pids+=($!)
sleep 1

cat >"$work/nodescope.toml" <<TOML
[http]
listen = "127.0.0.1:$http_port"
[agent]
interval = "1s"
# the network signal alone: the disk probes are measured by bench disk
[disk]
enabled = false
[[targets]]
name = "bench"
cgroup = "$cg"
TOML

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

# per-run kernel cost, from the kernel's accounting
sysctl -qw kernel.bpf_stats_enabled=1
start_agent 1
python3 - "$churn_port" <<'PY'
import socket, sys, time
port = int(sys.argv[1])
for _ in range(3000):  # bounded: 3000 short connections to loopback
    c = socket.create_connection(("127.0.0.1", port)); c.send(b"x"); c.close()
PY
# process and cgroup churn for the scope hooks: 1000 fork+exec+exit, 200
# groups made and removed below the watched one
for _ in $(seq 1000); do /bin/true; done
for i in $(seq 200); do mkdir "$cg/churn-$i"; rmdir "$cg/churn-$i"; done
sleep 3
prog_stats=$(bpftool prog show --json)
prog_ids=$(agent_prog_ids)
metrics=$(curl -sf "http://127.0.0.1:$http_port/metrics")
stop_agent
sysctl -qw kernel.bpf_stats_enabled="$stats_before"

python3 - "$prog_stats" "$prog_ids" <<PY
import json, sys
ids = {int(i) for i in sys.argv[2].split(",") if i}
progs = [p for p in json.loads(sys.argv[1]) if p["id"] in ids]
def stat(name):
    rows = [p for p in progs if p.get("name", "").startswith(name) and p.get("run_cnt")]
    if not rows: return None
    p = max(rows, key=lambda p: p["id"])
    return p["run_time_ns"], p["run_cnt"]
bulk_off = float("$(echo "${res[bulk-off]}" | median)"); bulk_on = float("$(echo "${res[bulk-on]}" | median)")
small_off = float("$(echo "${res[small-off]}" | median)"); small_on = float("$(echo "${res[small-on]}" | median)")
print(f"{'case':<34}{'without':>12}{'with':>12}{'ratio':>9}   target")
print(f"{'iperf3 bulk (Gbit/s, median)':<34}{bulk_off:>12.2f}{bulk_on:>12.2f}{bulk_on/bulk_off:>9.3f}   >= 0.990")
print(f"{'iperf3 1 KiB writes (Gbit/s)':<34}{small_off:>12.2f}{small_on:>12.2f}{small_on/small_off:>9.3f}   >= 0.970")
print("raw rounds: bulk off [$(echo ${res[bulk-off]})] on [$(echo ${res[bulk-on]})]")
print("            1KiB off [$(echo ${res[small-off]})] on [$(echo ${res[small-on]})]")
missing = []
for name, what, target in [("on_tcp_state", "state tracepoint, per TCP state change", "target <= 150 ns"),
                           ("tcp_iter", "tcp iterator, per socket visited", ""),
                           # kernel program names are cut to 15 characters
                           ("scope_fork", "fork of any process (scope)", ""),
                           ("scope_exec", "exec of any process (scope)", ""),
                           ("scope_exit", "exit of any process (scope)", ""),
                           ("scope_cgroup_m", "cgroup mkdir (scope)", ""),
                           ("scope_cgroup_r", "cgroup rmdir (scope)", "")]:
    s = stat(name)
    if s is None:
        missing.append(name); print(f"{name}: no runs recorded"); continue
    ns, cnt = s
    print(f"{name:<15} {what:<40} {ns/cnt:8.0f} ns/run over {cnt} runs   {target}")
if missing:
    print("bench net: FAILED: no runs recorded for " + ", ".join(missing) + ": the probes were not attached")
    sys.exit(1)
PY
echo "connections the agent counted during churn: $(echo "$metrics" | awk '/^nodescope_connection_opened_total/ && /nodescope_target="bench"/ {s+=$NF} END {print s+0}') (3000 made)"

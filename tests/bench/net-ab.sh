#!/usr/bin/env bash
# cargo xtask bench net-ab: two builds of the agent against the same
# connection churn, alternately, for the per-run cost of the state
# tracepoint (`on_tcp_state`) of each: how a change to net.bpf.c is judged
# on a VM whose per-run figures drift by tens of nanoseconds within minutes.
#
# A is the binary the bench is given (target/release/nodescope), B the one
# named by B=; EXTRA_B= appends config lines to B's config only (the same
# binary under two configs, e.g. EXTRA_B='[limits]\nmax_connections = 1024').
# Each repetition starts A, runs BLOCKS blocks of PER_BLOCK short
# connections to an accept-and-close server in the watched group, stops it,
# then the same for B. PIN= prefixes the client and the server (PIN="taskset
# -c 0": both on one CPU). Every block prints, for the agent of the moment,
# `on_tcp_state`'s ns a run and, after the slash, an empty program's on the
# same tracepoint (tests/bench/floor.py): what running any program there
# costs at that moment. Exits 1 when a block ran no `on_tcp_state`.
#
# usage: net-ab.sh NODESCOPE_BINARY   (env: B=OTHER_BINARY REPS=3 BLOCKS=4 PER_BLOCK=500 EXTRA_B= PIN=)
set -euo pipefail
bin_a=$1
bin_b=${B:?"B=path/to/the/other/nodescope is required"}
[ -x "$bin_b" ] || { echo "bench net-ab: B=$bin_b is not an executable" >&2; exit 2; }
reps=${REPS:-3}
blocks=${BLOCKS:-4}
per_block=${PER_BLOCK:-500}
bin=$bin_a
source "$(dirname "$0")/common.sh"
bench_setup net-ab /tmp

churn_port=$(free_port)
# shellcheck disable=SC2086 # PIN is a command prefix, split on purpose
start_churn_server "$churn_port" ${PIN:-}
sleep 1
net_only_config "$work/base.toml"

sysctl -qw kernel.bpf_stats_enabled=1
start_floor inet_sock_set_state

for r in $(seq "$reps"); do
    for side in A B; do
        cp "$work/base.toml" "$work/nodescope.toml"
        if [ "$side" = A ]; then
            bin=$bin_a
        else
            bin=$bin_b
            [ -n "${EXTRA_B:-}" ] && printf '%b\n' "$EXTRA_B" >>"$work/nodescope.toml"
        fi
        start_agent 1
        ids=$(agent_prog_ids)
        line=""
        for _ in $(seq "$blocks"); do
            bpftool prog show --json >"$work/before.json"
            # shellcheck disable=SC2086
            churn "$churn_port" "$per_block" ${PIN:-}
            bpftool prog show --json >"$work/after.json"
            line+=$(python3 - "$work/before.json" "$work/after.json" "$ids" "$floor_id" <<'PY'
import json, sys
before = {p["id"]: p for p in json.load(open(sys.argv[1]))}
after = {p["id"]: p for p in json.load(open(sys.argv[2]))}
ids = {int(i) for i in sys.argv[3].split(",") if i}
floor = int(sys.argv[4])
def per_run(pick):
    for i, p in after.items():
        if pick(i, p):
            q = before.get(i, {})
            runs = p.get("run_cnt", 0) - q.get("run_cnt", 0)
            return (p.get("run_time_ns", 0) - q.get("run_time_ns", 0)) / runs if runs else None
    return None
prog = per_run(lambda i, p: i in ids and p.get("name", "").startswith("on_tcp_state"))
empty = per_run(lambda i, p: i == floor)
if prog is None:
    print("bench net-ab: FAILED: on_tcp_state did not run in a block: the probes were not attached", file=sys.stderr)
    sys.exit(1)
print(f"{prog:.0f}/{empty or 0:.0f} ", end="")
PY
)
        done
        stop_agent
        echo "$side: $line"
    done
done

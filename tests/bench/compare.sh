#!/usr/bin/env bash
# cargo xtask bench compare: nodescope side by side with the other ways of
# watching a node's peers, on the same workloads.
#
# Observers (one at a time, the order rotated every round):
#   none       the baseline
#   nodescope  default config plus a target for the watched cgroup
#   bpftrace   tests/bench/compare.bt: the same per-connection byte and churn
#              accounting (and file bytes and syncs) on the same tracepoints
#   ss         `ss -tin` once a second (what netlink exporters do): poll.py
#   rpc        `litecoin-cli getpeerinfo` once a second (what RPC exporters
#              do): poll.py
# Scenarios, each pass in this order, with a fresh litecoind regtest node A
# in the watched cgroup2 group:
#   bulk, small  iperf3 over loopback to a server in the group, bulk and
#                1 KiB writes (Gbit/s); bytes against iperf3's own count
#   storm        short real P2P connections to node A (version, verack,
#                close; distinct source addresses 127.77.y.z) at rising
#                rates (tests/bench/storm.py): conn/s at the last, unpaced
#                step; connections against the load generator's count,
#                bytes against the node's own getnettotals
#   fio          fio 4 KiB writes + fdatasync in the group (IOPS); bytes and
#                fdatasyncs against fio's
#   hosttax      dd of 64-byte blocks to /dev/null by a process outside every
#                watched group (its CPU seconds)
#   relay        node A syncs BLOCKS blocks from node B (unwatched), mined
#                once at the start (seconds until A has them all)
# For every pass: the workload's figure, the observer's own CPU over each
# scenario (user + system of its process, reaped children included, from
# /proc/PID/stat) and its peak RSS (VmHWM). Ratios are of the medians over
# the rounds. Then one more pass each of nodescope and bpftrace under
# kernel.bpf_stats_enabled=1 (never during the ratio rounds) for the kernel
# time of each of their programs (their own program ids only).
#
# Targets (exit 1 with one line naming every miss): nodescope costs the
# workload at most 1 % (bulk, fio, relay), 3 % (1 KiB writes), 2 % (host
# tax); it sees every connection and byte of the storm, at every rate; its
# total cost (workload lost, summed over the scenarios, plus its CPU as a
# share of a core) is at most half of bpftrace's; its peak RSS is under
# 40 MiB. A nodescope pass that holds no programs, or whose counts fall
# short of the workload, is a miss too.
#
# usage: compare.sh NODESCOPE_BINARY
#   env: ROUNDS=3 SECS=3 BLOCKS=2000 STORM_RATES="100 300 1000 3000 0"
#        STORM_SECS=2 NULL_COUNT=2000000 (ROUNDS=1: a quick run with fewer
#        blocks, rates and dd writes)
set -euo pipefail
bin=$1
here=$(cd "$(dirname "$0")" && pwd)
rounds=${ROUNDS:-3}
secs=${SECS:-3}
if [ "$rounds" -le 1 ]; then
    blocks=${BLOCKS:-500}
    storm_rates=${STORM_RATES:-"100 1000 0"}
    null_count=${NULL_COUNT:-1000000}
else
    blocks=${BLOCKS:-2000}
    storm_rates=${STORM_RATES:-"100 300 1000 3000 0"}
    null_count=${NULL_COUNT:-2000000}
fi
storm_secs=${STORM_SECS:-2}
source "$here/common.sh"
# on ext4, so fio's fdatasync reaches the device
bench_setup compare /var/tmp

node_a="" obs_pid=""
compare_cleanup() {
    [ -n "$obs_pid" ] && kill -INT "$obs_pid" 2>/dev/null && wait "$obs_pid" 2>/dev/null || true
    [ -n "$node_a" ] && kill "$node_a" 2>/dev/null && wait "$node_a" 2>/dev/null || true
    bench_cleanup
}
trap compare_cleanup EXIT

fail() { echo "bench compare: FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" -v d="${3:-3}" 'BEGIN {printf "%.*f", d, a - b}'; } # A - B, D decimals

# bpftrace attaches tracepoints through tracefs (not mounted at boot here;
# left mounted: other tools on the host may use it by then)
mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing

# listeners below the ephemeral range: bpftrace and ss tell the workload's
# sockets by port, and other work on the host churns through that range
port_a=$(free_listen_port) rpc_a=$(free_listen_port) port_b=$(free_listen_port) rpc_b=$(free_listen_port)
port_i=$(free_listen_port) http_port=$(free_listen_port)
cgid=$(stat -c %i "$cg")
rpc_auth=(-regtest -rpcuser=bench -rpcpassword=bench)
cli_a() { litecoin-cli "${rpc_auth[@]}" -rpcport="$rpc_a" "$@"; }
cli_b() { litecoin-cli "${rpc_auth[@]}" -rpcport="$rpc_b" "$@"; }
# (run in the foreground only: in the background, $! would be a subshell's)
in_cg() { sh -c 'echo $$ > "$0/cgroup.procs"; shift; exec "$@"' "$cg" _ "$@"; }
litecoind_args() { # DATADIR PORT RPCPORT
    echo -regtest -datadir="$1" -port="$2" -rpcport="$3" -rpcuser=bench -rpcpassword=bench \
        -listen=1 -bind=127.0.0.1 -connect=0 -maxconnections=500 -printtoconsole=0
}

echo "$(machine_line)"

# the watched iperf3 server, born in the group
sh -c 'echo $$ > "$0/cgroup.procs"; shift; exec "$@"' "$cg" _ iperf3 -s -B 127.0.0.1 -p "$port_i" >"$work/iperf-server.log" 2>&1 &
pids+=($!)

# node B, unwatched, holds the chain node A syncs in the relay scenario.
# Litecoin's MWEB activates at height 432 on regtest: the first block after
# it needs a peg-in.
mkdir "$work/b"
# shellcheck disable=SC2046
litecoind $(litecoind_args "$work/b" "$port_b" "$rpc_b") >/dev/null 2>&1 &
pids+=($!)
timeout 60 litecoin-cli "${rpc_auth[@]}" -rpcport="$rpc_b" -rpcwait createwallet w >/dev/null
addr=$(cli_b getnewaddress)
mined=$(date +%s.%N)
if [ "$blocks" -gt 431 ]; then
    cli_b generatetoaddress 431 "$addr" >/dev/null
    cli_b sendtoaddress "$(cli_b getnewaddress "" mweb)" 1 >/dev/null
    cli_b generatetoaddress $((blocks - 431)) "$addr" >/dev/null
else
    cli_b generatetoaddress "$blocks" "$addr" >/dev/null
fi
[ "$(cli_b getblockcount)" = "$blocks" ] || fail "node B mined $(cli_b getblockcount) blocks, not $blocks"
echo "node B mined $blocks blocks in $(sub "$(date +%s.%N)" "$mined") s" >&2

cat >"$work/nodescope.toml" <<TOML
[http]
listen = "127.0.0.1:$http_port"
[[targets]]
name = "bench"
cgroup = "$cg"
chain = "litecoin"
datadir = "$work/a"
p2p_ports = [$port_a, $port_i]
rpc_ports = [$rpc_a]
TOML

start_a() { # a fresh node A (empty data dir) in the watched group
    rm -rf "$work/a"
    mkdir "$work/a"
    # shellcheck disable=SC2046
    sh -c 'echo $$ > "$0/cgroup.procs"; shift; exec "$@"' "$cg" _ litecoind $(litecoind_args "$work/a" "$port_a" "$rpc_a") -disablewallet >/dev/null 2>&1 &
    node_a=$!
    timeout 60 litecoin-cli "${rpc_auth[@]}" -rpcport="$rpc_a" -rpcwait getblockcount >/dev/null ||
        fail "node A did not start"
}
stop_a() {
    kill "$node_a" 2>/dev/null || { tail -20 "$work/a/regtest/debug.log" >&2; fail "node A ($obs pass) had stopped"; }
    wait "$node_a" 2>/dev/null || true
    node_a=""
}

start_observer() {
    case $1 in
        none) obs_pid="" ;;
        nodescope)
            start_agent 1
            obs_pid=$agent
            [ -n "$(agent_prog_ids)" ] || fail "nodescope holds no BPF programs" ;;
        bpftrace)
            rm -f "$work/bt.out"
            bpftrace -B line "$here/compare.bt" "$port_a" "$port_i" "$port_b" "$cgid" >"$work/bt.out" 2>"$work/bt.err" &
            obs_pid=$!
            for _ in $(seq 300); do grep -q '^--- ' "$work/bt.out" && break; sleep 0.1; done
            grep -q '^--- ' "$work/bt.out" || { cat "$work/bt.err" >&2; fail "bpftrace did not start"; } ;;
        ss | rpc)
            rm -f "$work/$1.json"
            if [ "$1" = ss ]; then
                python3 "$here/poll.py" ss "$work/ss.json" "$port_a" "$port_i" "R:$port_b" &
            else
                python3 "$here/poll.py" rpc "$work/rpc.json" litecoin-cli "${rpc_auth[@]}" -rpcport="$rpc_a" &
            fi
            obs_pid=$!
            for _ in $(seq 100); do [ -s "$work/$1.json" ] && break; sleep 0.1; done ;;
    esac
}
stop_observer() {
    case $1 in
        none) ;;
        nodescope) stop_agent ;;
        *) kill -INT "$obs_pid"; wait "$obs_pid" 2>/dev/null || true ;;
    esac
    obs_pid=""
}
snapshot() { # OBSERVER: what it has counted so far (compare_obs.py)
    case $1 in
        none) echo '{}' ;;
        nodescope) python3 "$here/compare_obs.py" nodescope "http://127.0.0.1:$http_port/metrics" bench ;;
        bpftrace) python3 "$here/compare_obs.py" bpftrace "$work/bt.out" ;;
        ss | rpc) python3 "$here/compare_obs.py" poll "$work/$1.json" ;;
    esac || fail "$1 did not answer"
}
cpu() { if [ -n "$obs_pid" ]; then proc_cpu_ticks "$obs_pid"; else echo 0; fi; }
nettotal() { cli_a getnettotals | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["totalbytesrecv"] + j["totalbytessent"])'; }

iperf() { # -> "Gbit/s bytes"
    iperf3 -c 127.0.0.1 -p "$port_i" -t "$secs" "$@" --json |
        python3 -c 'import json,sys; s=json.load(sys.stdin)["end"]["sum_received"]; print(s["bits_per_second"]/1e9, s["bytes"])'
}
fio_sync() { # -> "iops bytes fdatasyncs"  (the report goes through a pipe, not a file of the group)
    in_cg fio --name=w --directory="$work" --filename=fio.dat --rw=write --bs=4k --size=64M \
        --ioengine=sync --fdatasync=1 --time_based --runtime="$secs" --output-format=json |
        python3 -c 'import json,sys; j=json.load(sys.stdin)["jobs"][0]; print(j["write"]["iops"], j["write"]["io_bytes"], j["sync"]["lat_ns"]["N"])'
}
cpu_secs() { # CPU seconds (user + system) a command took
    python3 -c '
import resource, subprocess, sys
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{r.ru_utime + r.ru_stime:.4f}")' "$@"
}
bpf_snap() { # PASS-TAG: the observer's programs' counters now (stats passes)
    [ -n "$stats" ] || return 0
    bpftool prog show --json | python3 -c '
import json, sys
ids = {int(i) for i in sys.argv[1].split(",") if i}
print(json.dumps([p for p in json.load(sys.stdin) if p["id"] in ids]))' "$(prog_ids_of "$obs_pid")" >"$work/bpf.$1.json"
}

results=$work/results.jsonl
# record SCENARIO FIGURE T0 T1 CPU0 CPU1 [TRUTH-JSON]: one line of results
record() {
    printf '{"round": "%s", "obs": "%s", "scenario": "%s", "figure": %s, "wall": %s, "cpu_ticks": %s, "truth": %s}\n' \
        "$round" "$obs" "$1" "$2" "$(sub "$4" "$3")" "$(($6 - $5))" "${7:-null}" >>"$results"
}
# seen GROUP: the observer's counts now, for the group of scenarios just run
# (and its peak RSS so far, KiB)
seen() { # GROUP
    local counts
    counts=$(snapshot "$obs")
    printf '{"round": "%s", "obs": "%s", "seen": "%s", "counts": %s, "hwm_kib": %s}\n' \
        "$round" "$obs" "$1" "$counts" "$([ -n "$obs_pid" ] && proc_hwm_kib "$obs_pid" || echo 0)" >>"$results"
}

run_pass() { # OBSERVER
    obs=$1
    start_a
    start_observer "$obs"
    local pass0 t0 c0 c1 g b g2 b2 r0 storm n0 n1 iops fbytes fsyncs
    pass0=$(now)
    # (the first read also waits out the observer's start-up: two reports)
    seen start
    bpf_snap "$obs.start"

    t0=$(now) c0=$(cpu); read -r g b < <(iperf)
    record bulk "$g" "$t0" "$(now)" "$c0" "$(cpu)"
    t0=$(now) c0=$(cpu); read -r g2 b2 < <(iperf -l 1K)
    record small "$g2" "$t0" "$(now)" "$c0" "$(cpu)"
    seen iperf
    echo "{\"round\": \"$round\", \"obs\": \"$obs\", \"truth\": \"iperf\", \"bytes\": $((b + b2))}" >>"$results"
    bpf_snap "$obs.iperf"

    n0=$(nettotal)
    t0=$(now) c0=$(cpu)
    # shellcheck disable=SC2086
    storm=$(python3 "$here/storm.py" "$port_a" "$storm_secs" 64 2000 $storm_rates)
    r0=$(now) c1=$(cpu)
    record storm "$(echo "$storm" | python3 -c 'import json,sys; print(json.load(sys.stdin)["steps"][-1]["made_per_sec"])')" "$t0" "$r0" "$c0" "$c1" "$storm"
    sleep 1 # the node's last closes
    n1=$(nettotal)
    seen storm
    echo "{\"round\": \"$round\", \"obs\": \"$obs\", \"truth\": \"storm\", \"bytes\": $((n1 - n0))}" >>"$results"
    bpf_snap "$obs.storm"

    t0=$(now) c0=$(cpu); read -r iops fbytes fsyncs < <(fio_sync)
    record fio "$iops" "$t0" "$(now)" "$c0" "$(cpu)" "{\"file_bytes\": $fbytes, \"file_syncs\": $fsyncs}"
    t0=$(now) c0=$(cpu)
    record hosttax "$(cpu_secs dd if=/dev/zero of=/dev/null bs=64 count="$null_count")" "$t0" "$(now)" "$c0" "$(cpu)"
    seen disk
    bpf_snap "$obs.disk"

    n0=$(nettotal)
    t0=$(now) c0=$(cpu)
    cli_a addnode "127.0.0.1:$port_b" onetry
    cli_a waitforblockheight "$blocks" 600000 >/dev/null
    r0=$(now)
    record relay "$(sub "$r0" "$t0")" "$t0" "$r0" "$c0" "$(cpu)"
    [ "$(cli_a getblockcount)" = "$blocks" ] || fail "node A did not sync $blocks blocks"
    seen relay
    n1=$(nettotal)
    echo "{\"round\": \"$round\", \"obs\": \"$obs\", \"truth\": \"relay\", \"bytes\": $((n1 - n0))}" >>"$results"
    bpf_snap "$obs.relay"

    local hwm=0
    [ -n "$obs_pid" ] && hwm=$(proc_hwm_kib "$obs_pid")
    local rss=0
    [ -n "$obs_pid" ] && rss=$(awk '/^VmRSS:/ {print $2}' /proc/"$obs_pid"/status)
    echo "{\"round\": \"$round\", \"obs\": \"$obs\", \"hwm_kib\": $hwm, \"rss_kib\": $rss, \"pass_wall\": $(sub "$(now)" "$pass0"), \"pass_cpu_ticks\": $(cpu)}" >>"$results"
    stop_observer "$obs"
    stop_a
}

observers=(none nodescope bpftrace ss rpc)
stats=""
started=$(now)
for round in $(seq "$rounds"); do
    for i in "${!observers[@]}"; do
        run_pass "${observers[$(((i + round - 1) % ${#observers[@]}))]}"
    done
    echo "round $round of $rounds done ($(sub "$(now)" "$started" 0) s)" >&2
done

# the kernel's time per program: one pass each with the accounting on
sysctl -qw kernel.bpf_stats_enabled=1
stats=1 round=stats
run_pass nodescope
run_pass bpftrace
sysctl -qw kernel.bpf_stats_enabled="$stats_before"
stats=""
echo "whole run: $(sub "$(now)" "$started" 0) s (blocks $blocks, rounds $rounds)" >&2

python3 "$here/compare_report.py" "$results" "$work" "$(machine_line)" "$rounds" "$blocks" "$storm_rates" || exit 1

#!/usr/bin/env bash
# cargo xtask bench disk: what the file-write probes cost.
#
# fio writing 4 KiB blocks from inside a watched cgroup, measured with and
# without nodescope attached, alternating rounds so drift hits both sides
# alike. Three cases:
#   sync      4 KiB write + fdatasync each (how a node commits: the target)
#   buffered  4 KiB writes to the page cache, no sync (worst case: nothing
#             but syscalls, so the probes' share is largest)
#   unwatched the buffered case from a process outside the watched cgroup
#             (every write in the system passes the probes' filter)
# Then the kernel's own accounting (kernel.bpf_stats_enabled) of each
# program's time per run during a sync run.
#
# usage: disk.sh NODESCOPE_BINARY   (env: ROUNDS=5 SECS=3 CASES="sync buffered unwatched")
set -euo pipefail
bin=$1
rounds=${ROUNDS:-5}
secs=${SECS:-3}
source "$(dirname "$0")/common.sh"
# on the disk, not tmpfs, so fdatasync reaches the device
bench_setup disk /var/tmp

# A resident process keeps the cgroup target resolved between fio runs.
sh -c 'echo $$ > "$0/cgroup.procs"; exec sleep 1000000' "$cg" &
pids+=($!)

cat >"$work/nodescope.toml" <<TOML
[http]
listen = "127.0.0.1:$http_port"
[agent]
interval = "1s"
[[targets]]
name = "bench"
cgroup = "$cg"
chain = "bitcoin"
TOML


# fio in the watched cgroup (or outside it) -> write IOPS
fio_iops() { # where(in|out) extra-fio-args...
    local where=$1; shift
    local cmd=(fio --name=w --directory="$work" --filename=blocks.dat --rw=write --bs=4k --size=64M
        --ioengine=sync --time_based --runtime="$secs" --output-format=json "$@")
    if [ "$where" = in ]; then
        sh -c 'echo $$ > "$0/cgroup.procs"; shift; exec "$@"' "$cg" _ "${cmd[@]}" >"$work/fio.json"
    else
        "${cmd[@]}" >"$work/fio.json"
    fi
    python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"])' "$work/fio.json"
}

# Other agents' probes would slow the "without" side too: say so.
others=$(bpftool prog show --json | python3 -c 'import json,sys; print(sum(1 for p in json.load(sys.stdin) if p.get("name") == "on_write_enter"))')
[ "$others" = 0 ] || echo "bench: WARNING: $others other nodescope disk probe(s) loaded on this host; the 'without' figures include their cost" >&2

# lay the file out once, so no run pays for allocating it
fio_iops in >/dev/null

declare -A res
cases=${CASES:-sync buffered unwatched}
for c in sync buffered unwatched; do res[$c-off]=""; res[$c-on]=""; done
runs() { [[ " $cases " == *" $1 "* ]]; }
for r in $(seq "$rounds"); do
    # swap the order every round, so a drift or an after-effect of one side
    # (journal commits, writeback) does not always land on the same side
    sides="off on"
    [ $((r % 2)) = 0 ] && sides="on off"
    for side in $sides; do
        [ "$side" = on ] && start_agent 2
        runs sync && res[sync-$side]+="$(fio_iops in --fdatasync=1) "
        runs buffered && res[buffered-$side]+="$(fio_iops in) "
        runs unwatched && res[unwatched-$side]+="$(fio_iops out) "
        [ "$side" = on ] && stop_agent
    done
    echo "round $r done" >&2
done

# per-run kernel cost of each program, from the kernel's accounting, over
# one sync run and one buffered run of the watched workload
sysctl -qw kernel.bpf_stats_enabled=1
start_agent 2
fio_iops in --fdatasync=1 >/dev/null
fio_iops in >/dev/null
sleep 2
prog_stats=$(bpftool prog show --json)
# this agent's programs: the ids of the bpf fds it holds
mine=$(grep -h '^prog_id:' /proc/"$agent"/fdinfo/* 2>/dev/null | awk '{print $2}' | sort -u | tr '\n' ' ')
metrics=$(curl -sf "http://127.0.0.1:$http_port/metrics")
stop_agent
sysctl -qw kernel.bpf_stats_enabled="$stats_before"

python3 - "$prog_stats" "$mine" <<PY
import json, sys
progs = json.loads(sys.argv[1])
mine = {int(i) for i in sys.argv[2].split()}
def stat(name):
    # bpftool prints the BTF name; the kernel's own keeps 15 characters
    rows = [p for p in progs if p.get("name") in (name, name[:15]) and p["id"] in mine and p.get("run_cnt")]
    if not rows: return None
    return rows[0]["run_time_ns"], rows[0]["run_cnt"]
print(f"{'case (fio 4 KiB writes, IOPS median)':<40}{'without':>12}{'with':>12}{'ratio':>9}")
for c, note in [("sync", "target >= 0.98"), ("buffered", "worst case"), ("unwatched", "filter only")]:
    vals = {"sync": ("$(echo "${res[sync-off]}" | median)", "$(echo "${res[sync-on]}" | median)"),
            "buffered": ("$(echo "${res[buffered-off]}" | median)", "$(echo "${res[buffered-on]}" | median)"),
            "unwatched": ("$(echo "${res[unwatched-off]}" | median)", "$(echo "${res[unwatched-on]}" | median)")}[c]
    if not vals[0] or float(vals[0]) == 0: continue
    off, on = float(vals[0]), float(vals[1])
    print(f"{c + ' (' + note + ')':<40}{off:>12.0f}{on:>12.0f}{on/off:>9.3f}")
    if c == "sync": sync_op_ns = 1e9 / off
    if c == "buffered": buffered_op_ns = 1e9 / off
print("raw rounds: sync off [$(echo ${res[sync-off]})] on [$(echo ${res[sync-on]})]")
print("            buffered off [$(echo ${res[buffered-off]})] on [$(echo ${res[buffered-on]})]")
print("            unwatched off [$(echo ${res[unwatched-off]})] on [$(echo ${res[unwatched-on]})]")
sync_op_ns = globals().get("sync_op_ns"); buffered_op_ns = globals().get("buffered_op_ns")
print("kernel time per program run (all processes' calls pass the enter filters):")
for name in ["on_write_enter", "on_write_exit", "on_fdatasync_enter", "on_sync_exit", "on_close", "on_exec"]:
    s = stat(name)
    if s is None:
        print(f"  {name:<20} no runs recorded"); continue
    ns, cnt = s
    print(f"  {name:<20} {ns/cnt:8.0f} ns/run over {cnt} runs")
# what the probes add to one operation of the watched workload, by the
# kernel's accounting: steadier than throughput on a busy machine
per = {n: (lambda s: s[0] / s[1] if s else 0.0)(stat(n)) for n in ["on_write_enter", "on_write_exit", "on_fdatasync_enter", "on_sync_exit"]}
w = per["on_write_enter"] + per["on_write_exit"]
if sync_op_ns:
    add = w + per["on_fdatasync_enter"] + per["on_sync_exit"]
    print(f"probe time per sync op (write + fdatasync): {add:.0f} ns of {sync_op_ns:.0f} ns = {100 * add / sync_op_ns:.2f}%   target <= 2%")
if buffered_op_ns:
    print(f"probe time per buffered 4 KiB write: {w:.0f} ns of {buffered_op_ns:.0f} ns = {100 * w / buffered_op_ns:.2f}%")
PY
echo "write calls nodescope counted for the bench target: $(echo "$metrics" | awk '/^nodescope_file_writes_total/ && /nodescope_target="bench"/ {s+=$NF} END {print s+0}')"
echo "disk drops: $(echo "$metrics" | awk '/^nodescope_disk_dropped_total/ {s+=$NF} END {print s+0}')"

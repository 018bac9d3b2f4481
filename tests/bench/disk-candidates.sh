#!/usr/bin/env bash
# The hook candidates for the disk signal, measured side by side (the
# figures in docs/disk.md, "Why these hooks"). What each costs a process
# nobody watches, which is what every other process on a node's host pays:
#
#   none        nothing attached
#   tracepoint  a classic (perf) tracepoint on ext4:ext4_da_write_end and
#               ext4:ext4_sync_file_exit with an early cgroup filter
#               (bpftrace): the filesystem route through the slower path
#   filesystem  nodescope, [disk] method = "filesystem" (tp_btf on the ext4,
#               xfs, iomap and writeback tracepoints; the default)
#   syscalls    nodescope, [disk] method = "syscalls" (syscall tracepoints)
#
# Workloads, outside every watched group: dd of 64-byte blocks from
# /dev/zero to /dev/null, to a tmpfs file and to an ext4 file (a read and a
# write each). Configurations rotate every round; medians of ROUNDS.
#
# usage: disk-candidates.sh NODESCOPE_BINARY   (env: ROUNDS=5 NULL_COUNT=2000000 COUNT=1000000)
set -euo pipefail
bin=$1
rounds=${ROUNDS:-5}
null_count=${NULL_COUNT:-2000000}
count=${COUNT:-1000000}
source "$(dirname "$0")/common.sh"
bench_setup disk-candidates /var/tmp
shm=$(mktemp -d /dev/shm/nodescope-candidates.XXXXXX)
tracer=""
trap '[ -n "$tracer" ] && kill "$tracer" 2>/dev/null; bench_cleanup; rm -rf "$shm"' EXIT
sh -c 'echo $$ > "$0/cgroup.procs"; exec sleep 1000000' "$cg" &
pids+=($!)
cgid=$(stat -c %i "$cg")

config() { # method
    cat >"$work/nodescope.toml" <<TOML
[http]
listen = "127.0.0.1:$http_port"
[agent]
interval = "1s"
[disk]
method = "$1"
[[targets]]
name = "bench"
cgroup = "$cg"
chain = "generic"
datadir = "$work"
TOML
}

timed() { # CPU seconds (user + system) the command took: unlike wall time,
          # not stretched by other work on the host waiting for a CPU; the
          # probes run in the writer's own context, so their cost is in it
    python3 -c '
import resource, subprocess, sys
subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"{r.ru_utime + r.ru_stime:.4f}")' "$@"
}

start() {
    case $1 in
        none) ;;
        tracepoint)
            command -v bpftrace >/dev/null || { echo "bench: bpftrace is needed (Debian package bpftrace)" >&2; exit 1; }
            bpftrace -e "tracepoint:ext4:ext4_da_write_end /cgroup == $cgid/ { @b = sum(args->copied); }
                         tracepoint:ext4:ext4_sync_file_exit /cgroup == $cgid/ { @s = count(); }" >"$work/bpftrace.log" 2>&1 &
            tracer=$!
            # its probes are attached once it says so; measuring without them would lie
            for _ in $(seq 300); do grep -q "Attaching" "$work/bpftrace.log" 2>/dev/null && break; sleep 0.1; done
            grep -q "Attaching" "$work/bpftrace.log" || { echo "bench: FAILED: bpftrace did not attach in 30 s:" >&2; cat "$work/bpftrace.log" >&2; exit 1; }
            sleep 1 ;;
        filesystem | syscalls) config "$1"; start_agent 2 ;;
    esac
}

stop() {
    case $1 in
        tracepoint)
            kill -INT "$tracer"
            for _ in $(seq 100); do kill -0 "$tracer" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$tracer" 2>/dev/null || true
            wait "$tracer" 2>/dev/null || true
            tracer="" ;;
        filesystem | syscalls) stop_agent ;;
    esac
}

confs=(none tracepoint filesystem syscalls)
for r in $(seq "$rounds"); do
    # rotate the order every round, so no configuration always runs first
    order=()
    for i in 0 1 2 3; do order+=("${confs[$(( (i + r - 1) % 4 ))]}"); done
    for c in "${order[@]}"; do
        start "$c"
        timed dd if=/dev/zero of=/dev/null bs=64 count="$null_count" >>"$work/$c-null"
        rm -f "$shm/f"; timed dd if=/dev/zero of="$shm/f" bs=64 count="$count" >>"$work/$c-tmpfs"
        rm -f "$work/f"; timed dd if=/dev/zero of="$work/f" bs=64 count="$count" >>"$work/$c-ext4"
        stop "$c"
    done
    echo "round $r done (${order[*]})" >&2
done

python3 - "$work" "$null_count" "$count" <<'PY'
import statistics, sys
work, null_count, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def med(c, w):
    return statistics.median(float(x) for x in open(f"{work}/{c}-{w}").read().split())
print(f"{'unwatched dd, 64 B blocks (CPU s, median)':<40}{'/dev/null':>12}{'tmpfs':>12}{'ext4':>12}")
base = {w: med("none", w) for w in ["null", "tmpfs", "ext4"]}
for c in ["none", "tracepoint", "filesystem", "syscalls"]:
    cells = []
    for w, n in [("null", null_count), ("tmpfs", count), ("ext4", count)]:
        v = med(c, w)
        cells.append(f"{v:6.3f} {100 * (v / base[w] - 1):+4.0f}%")
    print(f"{c:<40}" + "".join(f"{x:>12}" for x in cells))
print(f"per 64-byte write to ext4, over none: " + ", ".join(
    f"{c} {1e9 * (med(c, 'ext4') - base['ext4']) / count:.0f} ns" for c in ["tracepoint", "filesystem", "syscalls"]))
PY

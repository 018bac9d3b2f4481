# Shared by the bench scripts (sourced): a cgroup2 group for the watched
# workload, a work dir, free loopback ports, starting and stopping the agent,
# and a cleanup that stops by pid whatever the bench started, removes the
# group and restores kernel.bpf_stats_enabled.
#
# bench_setup NAME WORKDIR_PARENT   sets: bin (from $1 of the script), cg, work,
#                                   http_port, pids (append to it), agent
# start_agent SETTLE_SECONDS       runs "$bin" with "$work/nodescope.toml"

bench_setup() {
    local name=$1 parent=$2
    cg2=$(awk '$0 ~ / - cgroup2 / {print $5; exit}' /proc/self/mountinfo)
    [ -n "$cg2" ] || { echo "bench: no cgroup2 hierarchy mounted" >&2; exit 1; }
    work=$(mktemp -d "$parent/nodescope-bench-$name.XXXXXX")
    cg="$cg2/nodescope-bench-$name-$$"
    mkdir "$cg"
    pids=()
    agent=""
    stats_before=$(sysctl -n kernel.bpf_stats_enabled)
    trap bench_cleanup EXIT
    http_port=$(free_port)
}

bench_cleanup() {
    [ -n "$agent" ] && kill "$agent" 2>/dev/null && wait "$agent" 2>/dev/null || true
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    sysctl -qw kernel.bpf_stats_enabled="$stats_before" || true
    rmdir "$cg" 2>/dev/null || true
    rm -rf "$work"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits for /metrics, then SETTLE seconds more: past the agent's start-up and
# at least one collection, so the watched group is in the kernel maps.
start_agent() {
    local settle=$1
    "$bin" run --config "$work/nodescope.toml" >"$work/agent.log" 2>&1 &
    agent=$!
    for _ in $(seq 100); do
        if curl -sf "http://127.0.0.1:$http_port/metrics" >/dev/null 2>&1; then
            sleep "$settle"
            return 0
        fi
        sleep 0.1
    done
    echo "bench: nodescope did not start" >&2
    cat "$work/agent.log" >&2
    exit 1
}

stop_agent() { kill "$agent"; wait "$agent" 2>/dev/null || true; agent=""; }

# The median of whitespace-separated numbers on stdin.
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

# The ids of the BPF programs the running agent holds (from its fds' fdinfo),
# comma-separated: per-program figures are this agent's only, never those of
# another agent or tool on the host.
agent_prog_ids() { prog_ids_of "$agent"; }

# The ids of the BPF programs any process PID holds (its fds' fdinfo),
# comma-separated: agent_prog_ids for another observer (bpftrace). An fd
# that closes between the glob and the read (the agent's iterator or
# netlink sockets come and go) makes grep exit 2 with the others read:
# that is not a failure.
prog_ids_of() {
    { grep -h '^prog_id:' /proc/"$1"/fdinfo/* 2>/dev/null || [ $? -eq 2 ]; } | awk '{print $2}' | sort -un | paste -sd, -
}

# CPU clock ticks a process spent, user + system, its reaped children's
# included (a poller's ss or RPC client): fields 14 to 17 of /proc/PID/stat.
proc_cpu_ticks() {
    sed 's/.*) //' /proc/"$1"/stat 2>/dev/null | awk '{print $12 + $13 + $14 + $15}'
}

# Peak resident set size of a process, KiB (VmHWM).
proc_hwm_kib() { awk '/^VmHWM:/ {print $2}' /proc/"$1"/status 2>/dev/null; }

# One line naming the machine: CPUs, kernel, CPU model, load.
machine_line() {
    echo "machine: $(nproc) CPUs, kernel $(uname -r), $(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

# A free loopback port below the kernel's ephemeral range, for a listener
# that observers filter by port: no client socket on the host (another
# test's churn) gets it as its own local port.
free_listen_port() {
    python3 -c '
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for _ in range(1000):
    p = random.randrange(10000, low)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); print(p); break
    except OSError:
        pass
    finally:
        s.close()'
}

# The connection churn of bench net and net-ab: an accept-and-close server
# born in the watched group, and a bounded client. PREFIX (optional words,
# e.g. taskset -c 0) runs before either.
CHURN_SERVER='
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(512)
while True:
    c, _ = s.accept(); c.recv(16); c.close()
'
CHURN_CLIENT='
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):  # bounded: short connections to loopback
    c = socket.create_connection(("127.0.0.1", port)); c.send(b"x"); c.close()
'
start_churn_server() { # PORT [PREFIX...]
    local port=$1
    shift
    sh -c 'echo $$ > "$0/cgroup.procs"; exec "$@"' "$cg" "$@" python3 -c "$CHURN_SERVER" "$port" \
        >"$work/churn-server.log" 2>&1 &
    pids+=($!)
}
churn() { # PORT COUNT [PREFIX...]
    local port=$1 n=$2
    shift 2
    "$@" python3 -c "$CHURN_CLIENT" "$port" "$n"
}

# The config of the network benches: the network signal alone (the disk
# probes are measured by bench disk), one target for the watched group.
net_only_config() { # FILE
    cat >"$1" <<TOML
[http]
listen = "127.0.0.1:$http_port"
[agent]
interval = "1s"
[disk]
enabled = false
[[targets]]
name = "bench"
cgroup = "$cg"
TOML
}

# An empty program on TRACEPOINT (tests/bench/floor.py), stopped with the
# bench: what running any program there costs in this VM state. Sets floor_id.
start_floor() { # TRACEPOINT
    python3 "$(dirname "${BASH_SOURCE[0]}")/floor.py" "$1" </dev/null >"$work/floor.id" &
    pids+=($!)
    for _ in $(seq 50); do [ -s "$work/floor.id" ] && break; sleep 0.1; done
    floor_id=$(cat "$work/floor.id")
    [ -n "$floor_id" ] || { echo "bench: the empty program did not attach to $1" >&2; exit 1; }
}

#!/usr/bin/env bash
# Runs nodescope in the foreground. With no config and no node on this host,
# it first starts a small litecoin regtest network on loopback (two nodes,
# the watched one in its own cgroup, a block mined every 10 s and a payment
# relayed with each) so a newcomer sees real data at
# http://127.0.0.1:9464/metrics and /peers. Everything it started is stopped by
# pid when nodescope exits, and its cgroup and data are removed. Only then,
# when it has to start that network, does it install litecoind (Debian's
# package, with apt-get) if it is missing; with a config or a node on the
# host it installs nothing.
#
# usage: quickstart.sh NODESCOPE_BINARY [CONFIG]
set -euo pipefail
bin=$1
config=${2:-}

if [ -n "$config" ]; then
    exec "$bin" run --config "$config"
fi

node_running() {
    local comm
    for f in /proc/[0-9]*/comm; do
        comm=$(cat "$f" 2>/dev/null) || continue
        case "$comm" in bitcoind|bitcoin-qt|litecoind|litecoin-qt|monerod) return 0 ;; esac
    done
    return 1
}

if node_running; then
    echo "quickstart: found a node on this host; nodescope will watch it"
    exec "$bin" run
fi

echo "quickstart: no node on this host; starting a litecoin regtest network on 127.0.0.1"
if ! command -v litecoind >/dev/null || ! command -v litecoin-cli >/dev/null; then
    echo "quickstart: installing litecoind (Debian package) for the demo network; a host with a node never needs it"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends litecoind
fi
cg2=$(awk '$0 ~ / - cgroup2 / {print $5; exit}' /proc/self/mountinfo)
work=$(mktemp -d /tmp/nodescope-demo.XXXXXX)
pids=()
cgroup=""
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    done
    [ -n "$cgroup" ] && rmdir "$cgroup" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# free loopback ports: a fixed port may still be held (TIME_WAIT) by an earlier run
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
a_p2p=$(free_port); a_rpc=$(free_port); b_p2p=$(free_port); b_rpc=$(free_port)
common=(-regtest -rpcuser=demo -rpcpassword=demo -listen=1 -bind=127.0.0.1 -rpcbind=127.0.0.1
        -rpcallowip=127.0.0.1 -dnsseed=0 -discover=0 -listenonion=0 -fallbackfee=0.0002 -printtoconsole=0 -daemon=0)
mkdir -p "$work/a" "$work/b"
# the watched node gets a cgroup of its own, as a systemd service would
if [ -n "$cg2" ]; then
    cgroup="$cg2/nodescope-demo-$$"
    mkdir "$cgroup"
    sh -c 'echo $$ > "$0/cgroup.procs" && shift && exec "$@"' "$cgroup" _ \
        litecoind "${common[@]}" -datadir="$work/a" -port="$a_p2p" -rpcport="$a_rpc" -connect=0 &
else
    litecoind "${common[@]}" -datadir="$work/a" -port="$a_p2p" -rpcport="$a_rpc" -connect=0 &
fi
pids+=($!)
litecoind "${common[@]}" -datadir="$work/b" -port="$b_p2p" -rpcport="$b_rpc" -connect=127.0.0.1:"$a_p2p" &
pids+=($!)

cli() { local port=$1; shift; litecoin-cli -regtest -rpcuser=demo -rpcpassword=demo -rpcport="$port" "$@"; }
for _ in $(seq 120); do cli "$a_rpc" getblockcount >/dev/null 2>&1 && cli "$b_rpc" getblockcount >/dev/null 2>&1 && break; sleep 0.5; done
cli "$a_rpc" createwallet demo >/dev/null
cli "$b_rpc" createwallet demo >/dev/null
cli "$a_rpc" generatetoaddress 101 "$(cli "$a_rpc" getnewaddress)" >/dev/null

# a block every 10 s with a payment from A to B in it, for at most a day
(
    for _ in $(seq 8640); do
        cli "$a_rpc" sendtoaddress "$(cli "$b_rpc" getnewaddress)" 0.1 >/dev/null 2>&1 || true
        cli "$a_rpc" generatetoaddress 1 "$(cli "$a_rpc" getnewaddress)" >/dev/null 2>&1 || true
        sleep 10
    done
) &
pids+=($!)

echo "quickstart: nodes up (pids ${pids[*]:0:2}); nodescope on http://127.0.0.1:9464 (Ctrl-C stops everything)"
"$bin" run &
agent=$!
pids=("$agent" "${pids[@]}")
wait "$agent"

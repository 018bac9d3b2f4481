#!/usr/bin/env bash
# cargo xtask bench http: what /metrics costs at 5,000 series.
#
# A server inside a watched cgroup holds real connections from distinct
# loopback addresses (127.1.x.y, one peer each, so two per-peer series each),
# with limits.top_peers raised so every peer keeps its own series. Then, with
# the series counted from /metrics itself:
#   - latency: serial scrapes on one keep-alive connection, as Prometheus
#     asks (OpenMetrics, gzip) and in the plain text format; p50, p99, max;
#   - CPU: the agent's utime+stime over a window with no scrapes (the
#     baseline, same agent, same series) and over a window at one scrape per
#     second, Prometheus' headers; the difference is what scraping costs.
#
# Exits 1 with one line saying which when a target is missed (serial p99 at
# most 2 ms in either format; scraping at most 1 % of a core).
#
# usage: http.sh NODESCOPE_BINARY   (PEERS, SCRAPES, WINDOW tune it)
set -euo pipefail
bin=$1
peers=${PEERS:-2500}
scrapes=${SCRAPES:-1000}
window=${WINDOW:-60}
source "$(dirname "$0")/common.sh"
bench_setup http /tmp
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

port=$(free_port)
# the watched node: holds every connection, answers each one's first bytes
sh -c 'echo $$ > "$0/cgroup.procs"; exec python3 -c "
import selectors,socket,sys
sel=selectors.DefaultSelector()
s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((\"127.0.0.1\", int(sys.argv[1]))); s.listen(4096); sel.register(s, selectors.EVENT_READ)
while True:
    for key,_ in sel.select():
        if key.fileobj is s:
            c,_=s.accept(); sel.register(c, selectors.EVENT_READ)
        else:
            d=key.fileobj.recv(4096)
            if d: key.fileobj.sendall(d*2)
            else: sel.unregister(key.fileobj); key.fileobj.close()
" "$1"' "$cg" "$port" >"$work/server.log" 2>&1 &
pids+=($!)
sleep 1

cat >"$work/nodescope.toml" <<TOML
[http]
listen = "127.0.0.1:$http_port"
# serial scrapes back to back are this bench's load, not an abuse
requests_per_second = 0
[agent]
interval = "5s"
discover = false
[limits]
top_peers = $((peers + 100))
[disk]
enabled = false
[[targets]]
name = "bench"
cgroup = "$cg"
p2p_ports = [$port]
TOML
start_agent 1

# the peers: one connection from each of $peers loopback addresses, held open
python3 - "$port" "$peers" "$work/peers.ready" >"$work/peers.log" 2>&1 <<'PY' &
import socket, sys, time
port, n, ready = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
held = []
for i in range(n):
    c = socket.socket()
    c.bind((f"127.1.{i // 250}.{i % 250 + 1}", 0))
    c.connect(("127.0.0.1", port))
    c.sendall(b"x" * (100 + i % 50))
    c.recv(4096)
    held.append(c)
open(ready, "w").write(str(len(held)))
time.sleep(3600)
PY
pids+=($!)
for _ in $(seq 600); do [ -e "$work/peers.ready" ] && break; sleep 0.1; done
[ -e "$work/peers.ready" ] || { echo "bench: peers did not connect" >&2; cat "$work/peers.log" >&2; exit 1; }
sleep 12 # two collections: every peer in the kernel's maps and on /metrics

series=$(curl -s "http://127.0.0.1:$http_port/metrics" | grep -vc '^#')
peer_series=$(curl -s "http://127.0.0.1:$http_port/metrics" | grep -c '^nodescope_peer_io_bytes_total{')
echo "peers connected: $(cat "$work/peers.ready"); /metrics samples: $series (per-peer: $peer_series)"
if [ "$series" -lt 5000 ]; then
    echo "bench: only $series samples, want at least 5000" >&2
    exit 1
fi

cpu_ticks() { awk '{print $14 + $15}' "/proc/$agent/stat"; }
hz=$(getconf CLK_TCK)

python3 - "$http_port" "$scrapes" "$window" "$agent" "$hz" <<'PY'
import http.client, sys, time
port, n, window, pid, hz = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
PROM = {"Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
                  "text/plain;version=0.0.4;q=0.5,*/*;q=0.1", "Accept-Encoding": "gzip"}
def ticks():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])
def pct(v, p):
    v = sorted(v); return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]
def serial(headers, label):
    c = http.client.HTTPConnection("127.0.0.1", port)
    times, size = [], 0
    for _ in range(n):
        t = time.perf_counter()
        c.request("GET", "/metrics", headers=headers)
        r = c.getresponse(); body = r.read()
        times.append((time.perf_counter() - t) * 1e3)
        assert r.status == 200, r.status
        size = len(body)
    print(f"serial scrapes, {label}: {n} scrapes, body {size} bytes: "
          f"p50 {pct(times,50):.2f} ms, p99 {pct(times,99):.2f} ms, max {max(times):.2f} ms")
    return pct(times, 99)
p99_prom = serial(PROM, "OpenMetrics gzip (Prometheus' headers)")
p99_text = serial({}, "text, uncompressed")
# CPU: a window without scrapes, then a window at one scrape a second
time.sleep(2)
t0, c0 = time.time(), ticks()
time.sleep(window)
base = (ticks() - c0) / hz / (time.time() - t0)
c = http.client.HTTPConnection("127.0.0.1", port)
t0, c0 = time.time(), ticks()
k = 0
while time.time() - t0 < window:
    c.request("GET", "/metrics", headers=PROM); r = c.getresponse(); r.read()
    k += 1
    time.sleep(max(0.0, t0 + k - time.time()))
scraped = (ticks() - c0) / hz / (time.time() - t0)
print(f"agent CPU over {window} s: {base*100:.2f} % of a core without scrapes (baseline), "
      f"{scraped*100:.2f} % at one scrape per second ({k} scrapes): scraping costs {(scraped-base)*100:.2f} % of a core")
missed = [what for what, bad in [(f"OpenMetrics gzip p99 {p99_prom:.2f} ms > 2 ms", p99_prom > 2.0),
                                 (f"text p99 {p99_text:.2f} ms > 2 ms", p99_text > 2.0),
                                 (f"scraping {(scraped-base)*100:.2f} % of a core > 1 %", scraped - base > 0.01)] if bad]
print("targets: serial p99 <= 2 ms, scraping <= 1 % of a core:", "met" if not missed else "NOT met")
if missed:
    print("bench http: target missed: " + "; ".join(missed), file=sys.stderr)
    sys.exit(1)
PY

#!/usr/bin/env python3
"""Soak run of the nodescope agent (`cargo xtask soak --minutes N`).

Starts, in temp dirs and a cgroup it makes (all removed at the end, and each
process stopped by its pid, pass or fail):
  - two litecoind regtest nodes on loopback, A (in the cgroup, watched) dialing
    B (on 127.0.0.2);
  - a rotel-agent OTLP receiver that logs every data point it receives;
  - the agent, with a config file: the target A, interval 1 s, state_dir and
    pin_dir (/sys/fs/bpf/nodescope-soak-<pid>) of its own, OTLP export to rotel.
Then, all bounded and on loopback: A mines a block (and sends a transaction)
every few seconds and B takes them; short P2P connections into A's port from
distinct 127.78.x.y addresses at a fixed rate (tests/bench/storm.py's
handshake); a writer in A's cgroup appending to a file in A's data dir with
fsync; scrapes of /metrics, /health/detailed and /peers every second; a
SIGHUP reload of the agent every 2 minutes (alternating otlp.timeout, so that
each reload rebuilds the exporters).

At the start, after the warm-up, every --every minutes and at the end it
pauses the miner and the churn for a quiet moment and prints one row: RSS,
peak RSS, CPU seconds, open fds, BPF map fill, OTLP data points received, and
the lost-data checks:
  a) the per-peer bytes of A's connection to B (/metrics and /peers) equal
     litecoin-cli getpeerinfo's bytessent/bytesrecv, to the byte;
  b) inbound P2P connections opened and closed, as the agent counts them,
     equal the connections the churn loop made;
  c) no *_total series of /metrics went backwards (between rows, and between
     the scrapes of every second);
  d) the drop/eviction/overflow counters, reported;
  e) OTLP data points keep arriving, and no export failed.
Exits 1 with one line naming the failed check when RSS or fds grew by more
than 5 % from the first row after warm-up to the last, a check failed, or the
agent died.

With the default rule windows the health history grows by one sample an
interval for an hour (peer_churn_high's window) before it holds steady:
--short-rule-windows sets 2 s windows, so that what RSS shows after the
warm-up is the rest of the agent.

usage: soak.py --agent BIN --rotel ROTEL_AGENT [--minutes N] [--every M]
               [--warmup MIN] [--churn-rate N] [--short-rule-windows]
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ left in tests/bench
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import storm  # noqa: E402  (tests/bench/storm.py: the P2P handshake and its bounded steps)

TARGET = "soak-a"
B_IP = "127.0.0.2"
CHURN_SUBNET = 78
CHURN_POOL = 500
RELOAD_SECS = 120
MINE_SECS = 5
WRITE_SECS = 0.5
GROWTH_LIMIT = 0.05
# The rules that take a window (agent/src/health/rules.rs).
WINDOWED_RULES = ["partition_suspected", "fsync_slow", "inbound_flood", "connect_failures_high", "peer_churn_high"]


def log(msg):
    print(msg, flush=True)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def cgroup2_mount():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if post.split(" ")[0] == "cgroup2":
                return pre.split(" ")[4]
    raise SystemExit("soak: no cgroup2 hierarchy mounted")


def ensure_bpffs():
    with open("/proc/self/mountinfo") as f:
        for line in f:
            pre, _, post = line.partition(" - ")
            if pre.split(" ")[4] == "/sys/fs/bpf" and post.split(" ")[0] == "bpf":
                return
    subprocess.run(["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"], check=True)


def regtest_args(datadir, port, rpcport, bind):
    return ["-regtest", f"-datadir={datadir}", f"-port={port}", f"-rpcport={rpcport}", "-rpcuser=u",
            "-rpcpassword=p", "-listen=1", f"-bind={bind}", "-rpcbind=127.0.0.1", "-rpcallowip=127.0.0.1",
            "-discover=0", "-listenonion=0", "-dnsseed=0", "-fallbackfee=0.0002", "-printtoconsole=0",
            "-daemon=0", "-connect=0",
            # MWEB never activates: on regtest it does at height 432, after
            # which generatetoaddress fails (bad-txns-vin-empty) and the
            # miner stops relaying. A start time far in the future keeps the
            # deployment "defined" (checked to height 450); a timeout in the
            # past does not (litecoind locks it in at 288 all the same).
            "-vbparams=mweb:999999999999:999999999999"]


def cli(rpcport, *args, timeout=60):
    out = subprocess.run(["litecoin-cli", "-regtest", "-rpcconnect=127.0.0.1", f"-rpcport={rpcport}", "-rpcuser=u",
                          "-rpcpassword=p", "-rpcclienttimeout=30", *args],
                         capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"litecoin-cli {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def wait_for(what, secs, f):
    deadline = time.monotonic() + secs
    while True:
        try:
            v = f()
        except Exception:  # not up yet
            v = None
        if v:
            return v
        if time.monotonic() > deadline:
            raise SystemExit(f"soak: timed out after {secs} s waiting for {what}")
        time.sleep(0.2)


def http_get(port, path, timeout=5):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def parse_samples(text):
    """Every sample of a Prometheus text scrape: {series: value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        try:
            out[series] = float(value)
        except ValueError:
            pass
    return out


def counters(samples):
    return {s: v for s, v in samples.items() if s.split("{", 1)[0].endswith("_total")}


def labels_of(series):
    if "{" not in series:
        return {}
    body = series.split("{", 1)[1].rstrip("}")
    return dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', body))


def metric_sum(samples, name, **labels):
    total = 0.0
    for s, v in samples.items():
        if s.split("{", 1)[0] != name:
            continue
        ls = labels_of(s)
        if all(ls.get(k) == val for k, val in labels.items()):
            total += v
    return total


def backwards(before, after):
    """Counter series present in both scrapes whose value fell."""
    return [(s, v, after[s]) for s, v in before.items() if s in after and after[s] < v]


class Soak:
    def __init__(self, args):
        self.args = args
        self.procs = {}  # name -> Popen, stopped by pid at the end
        self.work = None
        self.cgroup = None
        self.pin_dir = f"/sys/fs/bpf/nodescope-soak-{os.getpid()}"
        self.stop = threading.Event()
        self.paused = threading.Event()
        self.idle = {"churn": threading.Event(), "miner": threading.Event()}
        self.lock = threading.Lock()
        self.churn_made = 0
        self.churn_failed = 0
        self.churn_short = 0
        self.blocks = 0
        self.txs = 0
        self.load_errors = []
        self.scrapes = {"/metrics": 0, "/health/detailed": 0, "/peers": 0}
        self.scrape_errors = []
        self.scrape_backwards = []
        self.reloads_sent = 0
        self.rotel_offset = 0
        self.rotel_points = 0
        self.rows = []
        self.failures = []
        self.t0 = None

    # ---- set-up -------------------------------------------------------
    def spawn(self, name, argv, cgroup=None, env=None, stdout_path=None):
        path = stdout_path or os.path.join(self.work, f"{name}.log")
        out = open(path, "wb")
        if cgroup:
            # the shell joins the group and execs: the program's sockets and
            # writes are in the group from the start, and its pid is ours
            argv = ["sh", "-c", f"echo $$ > '{cgroup}/cgroup.procs' && exec \"$0\" \"$@\"", *argv]
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        out.close()
        self.procs[name] = p
        return p

    def config_text(self, otlp_timeout):
        return f"""[http]
listen = "127.0.0.1:{self.http_port}"

[agent]
interval = "1s"
state_dir = "{self.state_dir}"
pin_dir = "{self.pin_dir}"

[otlp]
endpoint = "http://127.0.0.1:{self.otlp_http}/v1/metrics"
interval = "5s"
timeout = "{otlp_timeout}"

[[targets]]
name = "{TARGET}"
cgroup = "{self.cgroup}"
chain = "litecoin"
datadir = "{self.a_dir}"
p2p_ports = [{self.a_port}]
rpc_ports = [{self.a_rpc}]
""" + self.rule_windows()

    def rule_windows(self):
        """With --short-rule-windows: every rule that takes a window gets one
        of 2 s, so the health history (one sample per interval, kept for the
        longest window: peer_churn_high's hour by default) stays a few
        samples long and RSS shows what the rest of the agent holds."""
        if not self.args.short_rule_windows:
            return ""
        return "".join(f'\n[rules.{r}]\nwindow = "2s"\n' for r in WINDOWED_RULES)

    def setup(self):
        a = self.args
        self.work = tempfile.mkdtemp(prefix="nodescope-soak-")
        self.cgroup = os.path.join(cgroup2_mount(), f"nodescope-soak-{os.getpid()}")
        os.mkdir(self.cgroup)
        ensure_bpffs()
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        self.state_dir = os.path.join(self.work, "state")
        os.mkdir(self.state_dir)
        self.a_dir, self.b_dir = os.path.join(self.work, "a"), os.path.join(self.work, "b")
        os.mkdir(self.a_dir)
        os.mkdir(self.b_dir)
        self.a_port, self.a_rpc, self.b_port, self.b_rpc = (free_port() for _ in range(4))
        self.http_port, self.otlp_http, self.otlp_grpc = (free_port() for _ in range(3))

        self.spawn("litecoind-b", ["litecoind", *regtest_args(self.b_dir, self.b_port, self.b_rpc, B_IP)])
        self.spawn("litecoind-a", ["litecoind", *regtest_args(self.a_dir, self.a_port, self.a_rpc, "127.0.0.1")],
                   cgroup=self.cgroup)
        for name, rpc in (("A", self.a_rpc), ("B", self.b_rpc)):
            wait_for(f"litecoind {name} RPC", 60, lambda rpc=rpc: cli(rpc, "getblockcount", timeout=10))
        cli(self.a_rpc, "createwallet", "w")
        self.address = cli(self.a_rpc, "getnewaddress")
        cli(self.a_rpc, "addnode", f"{B_IP}:{self.b_port}", "add")
        wait_for("A connected to B", 60, lambda: self.b_peer())
        # coinbase maturity, so that the miner can send transactions too
        cli(self.a_rpc, "generatetoaddress", "101", self.address)

        self.rotel_log = os.path.join(self.work, "rotel.log")
        self.spawn("rotel", [a.rotel, "start", "--otlp-http-endpoint", f"127.0.0.1:{self.otlp_http}",
                             "--otlp-grpc-endpoint", f"127.0.0.1:{self.otlp_grpc}", "--exporter", "blackhole",
                             "--debug-log", "metrics", "--debug-log-verbosity", "detailed",
                             "--pid-file", os.path.join(self.work, "rotel.pid")],
                   stdout_path=self.rotel_log)
        wait_for("rotel listening", 30, lambda: socket.create_connection(("127.0.0.1", self.otlp_http), 1).close()
                 or True)

        self.config = os.path.join(self.work, "nodescope.toml")
        with open(self.config, "w") as f:
            f.write(self.config_text("2s"))
        chk = subprocess.run([a.agent, "check-config", self.config], capture_output=True, text=True)
        if chk.returncode != 0:
            raise SystemExit(f"soak: check-config: {chk.stdout}{chk.stderr}")
        env = dict(os.environ, RUST_LOG="info")
        self.spawn("agent", [a.agent, "run", "--config", self.config], env=env)
        wait_for("the agent's /metrics", 60, lambda: self.agent_alive() and http_get(self.http_port, "/metrics")[0] == 200)
        wait_for("the target in /peers", 30, lambda: self.peers_of_target() is not None)

        # the writer: in A's group, so the agent's disk signal sees its writes
        self.writes = os.path.join(self.a_dir, "soak-writes", "append.dat")
        os.makedirs(os.path.dirname(self.writes))
        writer = ("import os, sys, time\n"
                  "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n"
                  "block = b'x' * 4096\n"
                  "while True:\n"
                  "    os.write(fd, block)\n"
                  "    os.fsync(fd)\n"
                  f"    time.sleep({WRITE_SECS})\n")
        self.spawn("writer", ["python3", "-c", writer, self.writes], cgroup=self.cgroup)

    # ---- observers ----------------------------------------------------
    def agent_alive(self):
        p = self.procs.get("agent")
        return p is not None and p.poll() is None

    def b_peer(self):
        """A's getpeerinfo entry for its connection to B (None before the handshake)."""
        for p in json.loads(cli(self.a_rpc, "getpeerinfo")):
            if p.get("addr", "").startswith(f"{B_IP}:") and p.get("version", 0) > 0:
                return p
        return None

    def peers_of_target(self):
        st, body = http_get(self.http_port, "/peers")
        if st != 200:
            return None
        for t in json.loads(body).get("targets", []):
            if t.get("name") == TARGET:
                return t.get("peers", [])
        return None

    def agent_pid(self):
        return self.procs["agent"].pid

    def proc_status(self, key):
        with open(f"/proc/{self.agent_pid()}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        return 0

    def cpu_secs(self):
        with open(f"/proc/{self.agent_pid()}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fds(self):
        return len(os.listdir(f"/proc/{self.agent_pid()}/fd"))

    def map_fill(self, samples):
        """[(name, type, entries or None, max_entries, agent's own figure)] of the agent's BPF maps,
        from the kernel (bpftool); entries only for hash-type maps (arrays are always full)."""
        ids = set()
        fd_dir = f"/proc/{self.agent_pid()}/fdinfo"
        for fd in os.listdir(fd_dir):
            try:
                with open(os.path.join(fd_dir, fd)) as f:
                    for line in f:
                        if line.startswith("map_id:"):
                            ids.add(int(line.split()[1]))
            except OSError:
                pass
        out = []
        for i in sorted(ids):
            try:
                info = json.loads(subprocess.run(["bpftool", "-j", "map", "show", "id", str(i)],
                                                 capture_output=True, text=True, timeout=30).stdout)
            except (ValueError, OSError, subprocess.SubprocessError):
                continue
            name, kind, cap = info.get("name", "?"), info.get("type", "?"), info.get("max_entries", 0)
            entries = None
            if "hash" in kind:
                r = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(i)], capture_output=True,
                                   text=True, timeout=60)
                try:
                    entries = len(json.loads(r.stdout))
                except ValueError:
                    entries = None
            own = None
            for s, v in samples.items():
                if s.startswith("nodescope_bpf_map_entries{") and labels_of(s).get("map", "")[:15] == name[:15]:
                    own = int(v)
            out.append((name, kind, entries, cap, own))
        return out

    def otlp_points(self):
        """Data points rotel logged so far (read on from where the last call stopped)."""
        with open(self.rotel_log, "rb") as f:
            f.seek(self.rotel_offset)
            data = f.read()
        cut = data.rfind(b"\n") + 1
        self.rotel_offset += cut
        self.rotel_points += len(re.findall(rb"DataPoints #\d+", data[:cut]))
        return self.rotel_points

    # ---- load ---------------------------------------------------------
    def pausable(self, name):
        """True to go on; blocks (marked idle) while paused; False at the end."""
        while self.paused.is_set() and not self.stop.is_set():
            self.idle[name].set()
            time.sleep(0.05)
        self.idle[name].clear()
        return not self.stop.is_set()

    def churn_loop(self):
        storm.step.subnet = CHURN_SUBNET
        while self.pausable("churn"):
            try:
                st = storm.step(self.a_port, 1.0, 64, CHURN_POOL, self.args.churn_rate)
            except OSError as e:
                self.load_errors.append(f"churn: {e}")
                time.sleep(1)
                continue
            with self.lock:
                self.churn_made += st["established"]
                self.churn_failed += st["failed"]
                self.churn_short += st["short"]
        self.idle["churn"].set()

    def miner_loop(self):
        while self.pausable("miner"):
            try:
                cli(self.a_rpc, "sendtoaddress", self.address, "0.01")
                self.txs += 1
                cli(self.a_rpc, "generatetoaddress", "1", self.address)
                self.blocks += 1
            except (RuntimeError, subprocess.SubprocessError) as e:
                self.load_errors.append(f"miner: {e}")
            end = time.monotonic() + MINE_SECS
            while time.monotonic() < end and not self.paused.is_set() and not self.stop.is_set():
                time.sleep(0.1)
        self.idle["miner"].set()

    def scrape_loop(self):
        last = None
        while not self.stop.is_set():
            t = time.monotonic()
            for path in self.scrapes:
                try:
                    st, body = http_get(self.http_port, path)
                except OSError as e:
                    st, body = 0, str(e)
                self.scrapes[path] += 1
                if st != 200 and not (path == "/health/detailed" and st == 503):
                    self.scrape_errors.append(f"{path}: {st} {body[:80]}")
                elif path == "/metrics":
                    now = counters(parse_samples(body))
                    if last is not None:
                        self.scrape_backwards.extend(backwards(last, now))
                    last = now
            self.stop.wait(max(0.0, 1.0 - (time.monotonic() - t)))

    def reload_loop(self):
        while not self.stop.wait(RELOAD_SECS):
            # otlp.timeout alternates, so each reload builds the exporters anew
            with open(self.config + ".new", "w") as f:
                f.write(self.config_text("3s" if self.reloads_sent % 2 == 0 else "2s"))
            os.replace(self.config + ".new", self.config)
            os.kill(self.agent_pid(), signal.SIGHUP)
            self.reloads_sent += 1

    # ---- rows ---------------------------------------------------------
    def elapsed(self):
        return time.monotonic() - self.t0

    def quiet(self):
        """Pauses the miner and the churn; returns once both are idle and the
        agent has had two collections since."""
        self.paused.set()
        for name, ev in self.idle.items():
            if not ev.wait(30):
                self.failures.append(f"the {name} loop did not pause")
        time.sleep(2.5)

    def row(self, label):
        self.quiet()
        try:
            return self._row(label)
        finally:
            self.paused.clear()

    def _row(self, label):
        if not self.agent_alive():
            return None
        r = {"label": label, "t": self.elapsed()}
        rss = []
        for _ in range(8):
            rss.append(self.proc_status("VmRSS"))
            time.sleep(0.25)
        r["rss"] = min(rss)
        r["hwm"] = self.proc_status("VmHWM")
        r["cpu"] = self.cpu_secs()
        r["fds"] = self.fds()
        problems = []

        # a) A's connection to B: the agent's bytes against getpeerinfo, to the byte
        deadline = time.monotonic() + 20
        while True:
            node = self.b_peer()
            samples = parse_samples(http_get(self.http_port, "/metrics")[1])
            m = (metric_sum(samples, "nodescope_peer_io_bytes_total", nodescope_target=TARGET,
                            network_peer_address=B_IP, network_io_direction="transmit"),
                 metric_sum(samples, "nodescope_peer_io_bytes_total", nodescope_target=TARGET,
                            network_peer_address=B_IP, network_io_direction="receive"))
            conn = [p for p in (self.peers_of_target() or [])
                    if p.get("address") == B_IP and p.get("port") == self.b_port]
            pj = (sum(p.get("bytes_sent", 0) for p in conn), sum(p.get("bytes_received", 0) for p in conn))
            n = (node["bytessent"], node["bytesrecv"]) if node else (None, None)
            if node and n == (int(m[0]), int(m[1])) and n == pj:
                break
            if time.monotonic() > deadline:
                problems.append(f"a) bytes to B: getpeerinfo {n}, /metrics {tuple(int(x) for x in m)}, /peers {pj}")
                break
            time.sleep(0.5)
        r["b_bytes"] = n

        # b) churn connections counted by the agent = the churn loop's count
        made = self.churn_made
        deadline = time.monotonic() + 15
        while True:
            samples = parse_samples(http_get(self.http_port, "/metrics")[1])
            inbound = {"nodescope_target": TARGET, "nodescope_service": "p2p",
                       "nodescope_connection_direction": "inbound"}
            opened = int(metric_sum(samples, "nodescope_connection_opened_total", **inbound))
            closed = int(metric_sum(samples, "nodescope_connection_closed_total", **inbound))
            if opened == made and closed == made:
                break
            if time.monotonic() > deadline:
                problems.append(f"b) churn: made {made}, agent opened {opened} closed {closed}")
                break
            time.sleep(0.5)
        r["churn"] = (made, opened, closed)

        # c) no counter went backwards since the last row, nor between scrapes
        now = counters(samples)
        if self.rows:
            back = backwards(self.rows[-1]["counters"], now)
            if back:
                problems.append(f"c) {len(back)} series went backwards since the last row, e.g. {back[:3]}")
        if self.scrape_backwards:
            problems.append(f"c) {len(self.scrape_backwards)} series went backwards between scrapes, "
                            f"e.g. {self.scrape_backwards[:3]}")
            self.scrape_backwards = []
        r["counters"] = now

        # d) drops, evictions, overflows: reported
        r["drops"] = {s: v for s, v in samples.items()
                      if re.search(r"(dropped|evicted|overflow|deferred|lost|skipped)", s.split("{", 1)[0])
                      and s.split("{", 1)[0].endswith("_total") and v}

        # e) OTLP
        r["otlp"] = self.otlp_points()
        r["otlp_failed"] = metric_sum(samples, "nodescope_otlp_exports_total", result="failed")
        if self.rows and r["otlp"] <= self.rows[-1]["otlp"]:
            problems.append(f"e) no OTLP data point arrived since the last row ({r['otlp']})")
        if r["otlp_failed"]:
            problems.append(f"e) {int(r['otlp_failed'])} OTLP exports failed")
        r["reloads"] = (self.reloads_sent, int(metric_sum(samples, "nodescope_config_reloads_total",
                                                          result="applied")))
        r["written"] = (os.path.getsize(self.writes) if os.path.exists(self.writes) else 0,
                        int(metric_sum(samples, "nodescope_file_written_bytes_total", nodescope_target=TARGET,
                                       nodescope_file_class="other")))
        r["maps"] = self.map_fill(samples)
        r["problems"] = problems
        self.rows.append(r)
        self.print_row(r)
        return r

    @staticmethod
    def header():
        return (f"{'row':<8} {'elapsed':>8} {'RSS KiB':>9} {'HWM KiB':>9} {'CPU s':>8} {'fds':>5} "
                f"{'OTLP pts':>9} {'churn made/opened/closed':>26} {'B bytes (sent, recv)':>22} checks")

    @staticmethod
    def fmt(r):
        mins, secs = divmod(int(r["t"]), 60)
        churn = "/".join(str(x) for x in r["churn"])
        b = f"{r['b_bytes'][0]}, {r['b_bytes'][1]}"
        return (f"{r['label']:<8} {mins:>5}:{secs:02d} {r['rss']:>9} {r['hwm']:>9} {r['cpu']:>8.1f} {r['fds']:>5} "
                f"{r['otlp']:>9} {churn:>26} {b:>22} {'ok' if not r['problems'] else 'FAIL'}")

    def print_row(self, r):
        log(self.header())
        log(self.fmt(r))
        fill = ", ".join(f"{n} {'-' if e is None else e}/{c}" + (f" (agent {o})" if o is not None else "")
                         for n, _, e, c, o in r["maps"])
        log(f"  maps (entries/max, hash maps counted by bpftool): {fill}")
        drops = ", ".join(f"{s} {int(v)}" for s, v in sorted(r["drops"].items())) or "none above 0"
        log(f"  drops/evictions/overflows: {drops}")
        log(f"  reloads sent/applied {r['reloads'][0]}/{r['reloads'][1]}; writer appended {r['written'][0]} B, "
            f"agent counted {r['written'][1]} B of class other; blocks {self.blocks}, txs {self.txs}; "
            f"churn failed {self.churn_failed}, short {self.churn_short}; scrapes {sum(self.scrapes.values())}, "
            f"errors {len(self.scrape_errors)}")
        for p in r["problems"]:
            log(f"  CHECK FAILED: {p}")

    # ---- the run ------------------------------------------------------
    def run(self):
        a = self.args
        self.setup()
        self.t0 = time.monotonic()
        log(f"soak: {a.minutes} min, a row every {a.every} min after a {a.warmup} min warm-up; agent pid "
            f"{self.agent_pid()}, target {TARGET} (litecoind pid {self.procs['litecoind-a'].pid}), churn "
            f"{a.churn_rate}/s from {CHURN_POOL} addresses, a block every {MINE_SECS} s, a reload every "
            f"{RELOAD_SECS} s, {'2 s rule windows' if a.short_rule_windows else 'default rule windows'}, "
            f"work dir {self.work}")
        threads = [threading.Thread(target=f, daemon=True)
                   for f in (self.churn_loop, self.miner_loop, self.scrape_loop, self.reload_loop)]
        for t in threads:
            t.start()
        self.row("start")
        total = a.minutes * 60
        due = [a.warmup * 60] + [k * a.every * 60 for k in range(1, int(a.minutes / a.every) + 1)
                                 if a.warmup * 60 < k * a.every * 60 < total] + [total]
        due = sorted(set(due))
        base = None
        for i, at in enumerate(due):
            while self.elapsed() < at:
                if not self.agent_alive():
                    return self.finish(f"agent died (exit {self.procs['agent'].poll()}) at "
                                       f"{self.elapsed() / 60:.1f} min")
                time.sleep(1)
            r = self.row("warm" if i == 0 else ("end" if at == total else "row"))
            if r is None:
                return self.finish(f"agent died (exit {self.procs['agent'].poll()}) at {self.elapsed() / 60:.1f} min")
            base = base or r
        return self.finish(None, base)

    def finish(self, died, base=None):
        self.stop.set()
        self.paused.clear()
        verdict = []
        if died:
            verdict.append(died)
        rows = self.rows
        if base is not None and rows and rows[-1] is not base:
            last = rows[-1]
            for key, what in (("rss", "RSS"), ("fds", "fds")):
                g = (last[key] - base[key]) / base[key]
                if g > GROWTH_LIMIT:
                    verdict.append(f"{what} grew {g * 100:.1f} % after warm-up ({base[key]} -> {last[key]})")
        for r in rows:
            for p in r["problems"]:
                verdict.append(f"lost-data check {p} (row at {r['t'] / 60:.1f} min)")
        if self.scrape_errors:
            log(f"soak: {len(self.scrape_errors)} scrapes failed, e.g. {self.scrape_errors[:3]}")
        if self.load_errors:
            log(f"soak: {len(self.load_errors)} load errors, e.g. {self.load_errors[:3]}")
        log("\nsummary")
        log(self.header())
        for r in rows:
            log(self.fmt(r))
        if base is not None and rows:
            last = rows[-1]
            log(f"after warm-up: RSS {base['rss']} -> {last['rss']} KiB "
                f"({(last['rss'] - base['rss']) / base['rss'] * 100:+.1f} %), fds {base['fds']} -> {last['fds']} "
                f"({(last['fds'] - base['fds']) / base['fds'] * 100:+.1f} %), CPU "
                f"{last['cpu'] - base['cpu']:.1f} s over {(last['t'] - base['t']) / 60:.1f} min "
                f"({(last['cpu'] - base['cpu']) / max(1.0, last['t'] - base['t']) * 100:.1f} % of one CPU)")
        if verdict:
            log(f"soak: FAIL: {verdict[0]}" + (f" (and {len(verdict) - 1} more)" if len(verdict) > 1 else ""))
            for v in verdict[1:]:
                log(f"  also: {v}")
            return 1
        log("soak: PASS: RSS and fds within 5 % after warm-up, every lost-data check held")
        return 0

    def cleanup(self):
        self.stop.set()
        order = ["agent", "writer", "rotel", "litecoind-a", "litecoind-b"]
        for name in order + [n for n in self.procs if n not in order]:
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()  # SIGTERM to this pid only
            try:
                p.wait(30 if name.startswith("litecoind") else 10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        agent = self.procs.get("agent")
        if agent is not None and agent.returncode not in (None, 0, -signal.SIGTERM):
            try:
                with open(os.path.join(self.work, "agent.log"), errors="replace") as f:
                    log("--- agent log (last 30 lines) ---\n" + "".join(f.readlines()[-30:]))
            except OSError:
                pass
        if self.cgroup and os.path.isdir(self.cgroup):
            for _ in range(50):
                try:
                    os.rmdir(self.cgroup)
                    break
                except OSError:
                    time.sleep(0.1)
            else:
                log(f"soak: could not remove {self.cgroup}")
        shutil.rmtree(self.pin_dir, ignore_errors=True)
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description="nodescope soak run")
    ap.add_argument("--agent", required=True, help="the nodescope binary")
    ap.add_argument("--rotel", required=True, help="the rotel-agent binary (OTLP receiver)")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--every", type=float, default=5, help="minutes between rows")
    ap.add_argument("--warmup", type=float, default=2, help="minutes before the baseline row")
    ap.add_argument("--churn-rate", type=float, default=50, help="connections a second into A's P2P port")
    ap.add_argument("--short-rule-windows", action="store_true",
                    help="2 s windows for the windowed health rules: the health history stays short")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("soak: loads eBPF programs and makes cgroups: run it as root")
    if args.minutes <= args.warmup:
        raise SystemExit("soak: --minutes must be longer than the warm-up (--warmup, 2 min)")

    def on_signal(signum, _frame):
        raise SystemExit(f"soak: stopped by signal {signum}")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    soak = Soak(args)
    try:
        code = soak.run()
    finally:
        soak.cleanup()
    sys.exit(code)


if __name__ == "__main__":
    main()

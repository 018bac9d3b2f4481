//! A node's life seen from the kernel: a node that starts after the agent,
//! one that is killed and restarted, connections closed from either side,
//! and connects the node abandons. The watched node N is a copy of
//! litecoind under a process name of its own (so no other litecoind on the
//! host is taken for it), named in the config by `process = "<name>"`, and
//! shares the test's cgroup: it is in scope from its exec, through the
//! kernel's exec hook, not from the agent's next interval.
//!
//! Every figure is compared exactly, with the node's own getpeerinfo, its
//! debug.log, or the events the test made; failures show both sides.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The watched node's target name in every test's config.
const TARGET: &str = "watched";

/// A copy of the real litecoind binary (not the /usr/bin shell wrapper)
/// under a process name of at most 15 bytes, the kernel's comm.
struct RenamedLitecoind {
    _dir: TempDir,
    path: PathBuf,
    name: String,
}

impl RenamedLitecoind {
    fn new(tag: char) -> RenamedLitecoind {
        require_tool("litecoind", "litecoind");
        let real = Path::new("/usr/lib/litecoin/litecoind");
        assert!(real.is_file(), "{} missing (Debian package litecoind)", real.display());
        let name = format!("ltc{tag}-{}", std::process::id() % 1_000_000);
        assert!(name.len() <= 15, "{name} does not fit the kernel's comm");
        let dir = TempDir::new("ltc-bin");
        let path = dir.path().join(&name);
        std::fs::copy(real, &path).unwrap();
        RenamedLitecoind { _dir: dir, path, name }
    }

    fn program(&self) -> &str {
        self.path.to_str().unwrap()
    }

    /// Starts the copy as a regtest node on the given ports, in the test's
    /// own cgroup, and waits for its RPC.
    fn start(&self, port: u16, rpcport: u16, extra: &[String]) -> Litecoind {
        let dir = TempDir::new("ltc-n");
        let mut args = regtest_args(dir.path(), port, rpcport);
        args.extend_from_slice(extra);
        let child = spawn_in(None, self.program(), &args, &dir.path().join("stdout.log"));
        let node = Litecoind { child, dir, port, rpcport, args };
        wait_for(&format!("{} RPC", self.name), Duration::from_secs(60), || node.try_cli(&["getblockcount"]).ok());
        node
    }

    /// Starts the copy again after `kill`: same data dir, ports, arguments.
    fn restart(&self, node: &mut Litecoind) {
        node.kill();
        node.child = spawn_in(None, self.program(), &node.args, &node.dir.path().join("stdout.log"));
        wait_for(&format!("{} RPC after restart", self.name), Duration::from_secs(60), || {
            node.try_cli(&["getblockcount"]).ok()
        });
    }
}

/// One target for the renamed node, by process name; `extra`: more TOML
/// before the target (rule tables).
fn config(bin: &RenamedLitecoind, port: u16, rpcport: u16, interval: &str, extra: &str) -> String {
    format!(
        "[agent]\ninterval = \"{interval}\"\n\n{extra}\n[[targets]]\nname = \"{TARGET}\"\nprocess = \"{}\"\nchain = \"litecoin\"\np2p_ports = [{port}]\nrpc_ports = [{rpcport}]\n",
        bin.name
    )
}

/// Waits for the agent's first evaluation of the target (a health verdict
/// exists only after a whole collection), so its scope maps are written.
fn wait_first_collection(agent: &Agent) {
    wait_for("the agent's first collection", Duration::from_secs(30), || node_down_state(agent));
}

/// node_down's state for the target in /health/detailed.
fn node_down_state(agent: &Agent) -> Option<String> {
    let v = agent.json("/health/detailed");
    v["rules"]
        .as_array()?
        .iter()
        .find(|r| r["target"] == TARGET && r["id"] == "node_down")
        .and_then(|r| r["state"].as_str().map(str::to_string))
}

fn peers_of(agent: &Agent) -> Vec<Value> {
    peers_of_target(agent, TARGET)
}

/// The target's lines of the scrape that a failure message needs.
fn relevant(m: &str) -> String {
    m.lines()
        .filter(|l| l.contains(&format!("nodescope_target=\"{TARGET}\"")))
        .filter(|l| {
            [
                "nodescope_connection_opened",
                "nodescope_connection_closed",
                "nodescope_connection_failed",
                "nodescope_connection_open{",
                "nodescope_peer_io",
                "nodescope_process_restarts",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn churn(m: &str, metric: &str, direction: &str) -> f64 {
    metric_sum(
        m,
        metric,
        &[("nodescope_target", TARGET), ("nodescope_connection_direction", direction), ("nodescope_service", "p2p")],
    )
}

fn opened(m: &str) -> f64 {
    churn(m, "nodescope_connection_opened_total", "outbound")
}

fn closed(m: &str) -> f64 {
    churn(m, "nodescope_connection_closed_total", "outbound")
}

fn restarts(m: &str) -> f64 {
    metric_sum(m, "nodescope_process_restarts_total", &[("nodescope_target", TARGET)])
}

/// Polls the scrape until `f` gives `want` (failing at once if a counter
/// went past it), then holds `hold` and checks it stayed there.
fn expect_exact(agent: &Agent, what: &str, want: &[f64], hold: Duration, f: impl Fn(&str) -> Vec<f64>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut m = agent.metrics();
    loop {
        let got = f(&m);
        if got == want {
            break;
        }
        if got.iter().zip(want).any(|(g, w)| g > w) {
            panic!("{what}: nodescope {got:?}, expected {want:?} (went past it)\n{}\n{}", relevant(&m), agent.log());
        }
        if Instant::now() > deadline {
            panic!("{what}: nodescope {got:?}, expected {want:?} (timed out)\n{}\n{}", relevant(&m), agent.log());
        }
        std::thread::sleep(Duration::from_millis(300));
        m = agent.metrics();
    }
    if !hold.is_zero() {
        std::thread::sleep(hold);
        let m = agent.metrics();
        let got = f(&m);
        assert_eq!(got, want, "{what}: nodescope moved to {got:?} after reaching {want:?}\n{}", relevant(&m));
    }
    eprintln!("{what}: {want:?} (nodescope and expected)");
}

/// The node's peers as (addr, inbound, bytessent, bytesrecv), sorted.
fn peer_sig(peers: &[Value]) -> Vec<(String, bool, u64, u64)> {
    let mut v: Vec<_> = peers
        .iter()
        .map(|p| {
            (
                p["addr"].as_str().unwrap().to_string(),
                p["inbound"].as_bool().unwrap(),
                p["bytessent"].as_u64().unwrap(),
                p["bytesrecv"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// /peers as the same tuples.
fn our_sig(ours: &[Value]) -> Vec<(String, bool, u64, u64)> {
    let mut v: Vec<_> = ours
        .iter()
        .map(|o| {
            (
                format!("{}:{}", o["address"].as_str().unwrap(), o["port"]),
                o["direction"] == "inbound",
                o["bytes_sent"].as_u64().unwrap(),
                o["bytes_received"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Two equal readings of getpeerinfo, 1.5 s apart, with every peer past
/// its version handshake.
fn stable_peers(node: &Litecoind) -> Vec<Value> {
    let mut last = node.peers();
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(1500));
        let now = node.peers();
        let handshaken = now.iter().all(|p| p["version"].as_u64().unwrap_or(0) > 0);
        if handshaken && peer_sig(&now) == peer_sig(&last) {
            return now;
        }
        last = now;
    }
    panic!("getpeerinfo did not settle: {last:?}");
}

/// /peers for the target equals the node's getpeerinfo to the byte: the node
/// read twice with the same figures, and nodescope's listing between them.
fn assert_peers_exact(node: &Litecoind, agent: &Agent, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    let (mut theirs, mut ours);
    loop {
        let before = peer_sig(&node.peers());
        std::thread::sleep(Duration::from_millis(1000));
        ours = our_sig(&peers_of(agent));
        theirs = peer_sig(&node.peers());
        if before == theirs && ours == theirs && !theirs.is_empty() {
            for (addr, inbound, sent, recv) in &theirs {
                eprintln!("peer {addr} (inbound {inbound}): sent {sent}, received {recv} (nodescope and getpeerinfo)");
            }
            return;
        }
        if Instant::now() > deadline {
            break;
        }
    }
    panic!(
        "/peers does not match getpeerinfo (addr, inbound, sent, received):\n  getpeerinfo {theirs:?}\n  nodescope   {ours:?}\n{}\n{}",
        relevant(&agent.metrics()),
        agent.log()
    );
}

/// A node is started after the agent, under a process name the agent only
/// knows from its config: its very first connection (made within a second
/// of its exec, long before the agent's 5 s interval comes round) is
/// counted and its bytes are exact; a disconnect and the node's own
/// reconnect are counted once each.
#[test]
fn first_connection_of_a_node_started_later_is_counted() {
    require_root();
    let started = Instant::now();
    let bin = RenamedLitecoind::new('f');
    let p = Litecoind::start(None, &["-connect=0".to_string()]);
    let (port, rpcport) = (free_port(), free_port());
    let agent = Agent::start(&config(&bin, port, rpcport, "5s", ""));
    wait_first_collection(&agent);
    assert_eq!(opened(&agent.metrics()), 0.0);

    // N dials P at start (-connect), and again by itself after a disconnect.
    let n = bin.start(port, rpcport, &[format!("-connect={}", p.addr())]);
    n.wait_peers(1);
    expect_exact(&agent, "connections opened by the node", &[1.0, 0.0], Duration::ZERO, |m| vec![opened(m), closed(m)]);
    assert_peers_exact(&n, &agent, Duration::from_secs(30));

    let first = n.peers()[0]["id"].as_u64().unwrap();
    n.cli(&["disconnectnode", &p.addr()]);
    wait_for("N to reconnect to P", Duration::from_secs(30), || {
        let peers = n.peers();
        (peers.len() == 1 && peers[0]["id"].as_u64() != Some(first) && peers[0]["version"].as_u64().unwrap_or(0) > 0)
            .then_some(())
    });
    expect_exact(&agent, "opened, closed after disconnect and reconnect", &[2.0, 1.0], Duration::from_secs(6), |m| {
        vec![opened(m), closed(m)]
    });
    assert_peers_exact(&n, &agent, Duration::from_secs(30));
    drop((agent, n, p));
    eprintln!("runtime {:?}", started.elapsed());
}

/// N is SIGKILLed and started again 5 times (same data dir and ports).
/// Counts are deterministic because N dials P with -connect: N opens exactly
/// one outbound P2P connection per start (it redials only when that one
/// drops, which it does not while both run), each SIGKILL closes exactly
/// that one, P makes no connection of its own (-connect=0), and N gets no
/// inbound P2P peer. node_down has `for` and `clear_after` of 0s, so it
/// fires as soon as an interval finds N gone and clears as soon as one
/// finds it back.
#[test]
fn restarted_node_is_reattached_each_time() {
    require_root();
    let started = Instant::now();
    let bin = RenamedLitecoind::new('r');
    let p = Litecoind::start(None, &["-connect=0".to_string()]);
    let (port, rpcport) = (free_port(), free_port());
    let rules = "[rules.node_down]\nfor = \"0s\"\nclear_after = \"0s\"\n";
    let agent = Agent::start(&config(&bin, port, rpcport, "5s", rules));
    wait_first_collection(&agent);

    let mut n = bin.start(port, rpcport, &[format!("-connect={}", p.addr())]);
    n.wait_peers(1);
    expect_exact(&agent, "first start: opened, closed", &[1.0, 0.0], Duration::ZERO, |m| vec![opened(m), closed(m)]);
    assert_peers_exact(&n, &agent, Duration::from_secs(30));
    let up = wait_for("node_down ok while N runs", Duration::from_secs(20), || {
        node_down_state(&agent).filter(|s| s == "ok")
    });
    assert_eq!(up, "ok");

    const RESTARTS: u32 = 5;
    for i in 1..=RESTARTS {
        let cycle = Instant::now();
        n.kill();
        let down = wait_for("node_down to see N gone", Duration::from_secs(20), || {
            node_down_state(&agent).filter(|s| s != "ok")
        });
        assert!(down == "firing" || down == "pending", "restart {i}: node_down is {down} while N is down");
        // the kill closed N's one connection
        expect_exact(
            &agent,
            &format!("restart {i}: while down, opened, closed"),
            &[i as f64, i as f64],
            Duration::ZERO,
            |m| vec![opened(m), closed(m)],
        );

        bin.restart(&mut n);
        n.wait_peers(1);
        assert_peers_exact(&n, &agent, Duration::from_secs(30));
        expect_exact(
            &agent,
            &format!("restart {i}: opened, closed"),
            &[(i + 1) as f64, i as f64],
            Duration::ZERO,
            |m| vec![opened(m), closed(m)],
        );
        let after = wait_for("node_down to clear after the restart", Duration::from_secs(20), || {
            node_down_state(&agent).filter(|s| s != "firing" && s != "pending")
        });
        assert_eq!(after, "ok", "restart {i}: node_down after N is back");
        eprintln!("restart {i}: node_down {down} while down, {after} after; cycle {:?}", cycle.elapsed());
    }
    expect_exact(
        &agent,
        "restarts, opened, closed at the end",
        &[RESTARTS as f64, (RESTARTS + 1) as f64, RESTARTS as f64],
        Duration::from_secs(6),
        |m| vec![restarts(m), opened(m), closed(m)],
    );
    drop((agent, n, p));
    eprintln!("runtime {:?}", started.elapsed());
}

/// Bytes of one peer address, as the counter shows them: (transmit, receive).
fn peer_io(m: &str) -> (f64, f64) {
    let f = |dir| {
        metric_sum(
            m,
            "nodescope_peer_io_bytes_total",
            &[
                ("nodescope_target", TARGET),
                ("network_peer_address", "127.0.0.1"),
                ("nodescope_connection_direction", "outbound"),
                ("network_io_direction", dir),
            ],
        )
    };
    (f("transmit"), f("receive"))
}

/// Two scrapes 2.5 intervals apart that agree on the peer's bytes.
fn settled_peer_io(agent: &Agent) -> (f64, f64) {
    let mut last = peer_io(&agent.metrics());
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(2500));
        let now = peer_io(&agent.metrics());
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("peer bytes did not settle: {last:?}");
}

fn wait_same_height(a: &Litecoind, b: &Litecoind) -> u64 {
    wait_for("both nodes at the same height", Duration::from_secs(60), || {
        let ha: u64 = a.cli(&["getblockcount"]).parse().unwrap();
        let hb: u64 = b.cli(&["getblockcount"]).parse().unwrap();
        (ha == hb).then_some(ha)
    })
}

/// One connection N -> P, from before it opened to after it closed: the
/// peer's counters grew by exactly what N's getpeerinfo said last.
fn one_connection(case: &str, agent: &Agent, n: &Litecoind, p: &Litecoind, miner: &Litecoind, close: impl FnOnce()) {
    let before = settled_peer_io(agent);
    n.cli(&["addnode", &p.addr(), "onetry"]);
    n.wait_peers(1);
    miner.mine(20);
    let height = wait_same_height(n, p);
    let last = stable_peers(n);
    assert_eq!(last.len(), 1, "{case}: {last:?}");
    let (sent, recv) = (last[0]["bytessent"].as_u64().unwrap() as f64, last[0]["bytesrecv"].as_u64().unwrap() as f64);
    eprintln!("{case}: height {height}, N's getpeerinfo just before the close: sent {sent}, received {recv}");
    close();
    n.wait_peers(0);
    expect_exact(
        agent,
        &format!("{case}: peer bytes (transmit, receive) over the connection"),
        &[sent, recv],
        Duration::from_secs(3),
        |m| {
            let (tx, rx) = peer_io(m);
            vec![tx - before.0, rx - before.1]
        },
    );
}

/// N closes (disconnectnode on N: N's FIN goes first), then P closes
/// (disconnectnode on P: N sees the FIN, then closes its side): the bytes of
/// each connection are N's own counts, to the byte, whichever side closed.
#[test]
fn closes_from_either_side_keep_exact_bytes() {
    require_root();
    let started = Instant::now();
    let bin = RenamedLitecoind::new('c');
    let p = Litecoind::start(None, &["-connect=0".to_string()]);
    let (port, rpcport) = (free_port(), free_port());
    let agent = Agent::start(&config(&bin, port, rpcport, "1s", ""));
    wait_first_collection(&agent);
    // no dialing by itself: each connection is one the test asks for
    let n = bin.start(port, rpcport, &["-connect=0".to_string()]);

    one_connection("A: N closes", &agent, &n, &p, &p, || {
        n.cli(&["disconnectnode", &p.addr()]);
    });
    one_connection("B: P closes", &agent, &n, &p, &n, || {
        let theirs = p.peers();
        assert_eq!(theirs.len(), 1, "P's peers: {theirs:?}");
        p.cli(&["disconnectnode", theirs[0]["addr"].as_str().unwrap()]);
    });
    let m = agent.metrics();
    assert_eq!((opened(&m), closed(&m)), (2.0, 2.0), "{}", relevant(&m));
    drop((agent, n, p));
    eprintln!("runtime {:?}", started.elapsed());
}

/// A network namespace joined to the host by a veth pair, with TCP SYNs to
/// one port dropped inside it; removed (namespace, veth, rule) when dropped.
struct DropNamespace {
    name: String,
    host_if: String,
    ns_addr: String,
}

fn run(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl DropNamespace {
    fn new(port: u16) -> DropNamespace {
        require_tool("ip", "iproute2");
        require_tool("iptables", "iptables");
        let pid = std::process::id();
        let name = format!("nstest-{pid}");
        // a /30 of 10.250.0.0/16 picked from the pid: .1 on the host, .2 inside
        let (a, b) = ((pid >> 6) & 0xff, (pid & 0x3f) * 4);
        let (host_addr, ns_addr) = (format!("10.250.{a}.{}", b + 1), format!("10.250.{a}.{}", b + 2));
        let addrs = Command::new("ip").args(["-4", "addr"]).output().unwrap();
        assert!(
            !String::from_utf8_lossy(&addrs.stdout).contains(&format!("10.250.{a}.")),
            "10.250.{a}.0/24 is already in use on this host"
        );
        run(&["ip", "netns", "add", &name]);
        let ns = DropNamespace { name, host_if: format!("nsh{pid}"), ns_addr };
        let ns_if = format!("nsn{pid}");
        run(&["ip", "link", "add", &ns.host_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns.name]);
        run(&["ip", "addr", "add", &format!("{host_addr}/30"), "dev", &ns.host_if]);
        run(&["ip", "link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["ip", "netns", "exec", &ns.name];
            all.extend_from_slice(args);
            run(&all);
        };
        inside(&["ip", "addr", "add", &format!("{}/30", ns.ns_addr), "dev", &ns_if]);
        inside(&["ip", "link", "set", &ns_if, "up"]);
        inside(&["ip", "link", "set", "lo", "up"]);
        inside(&["iptables", "-A", "INPUT", "-p", "tcp", "--syn", "--dport", &port.to_string(), "-j", "DROP"]);
        ns
    }
}

impl Drop for DropNamespace {
    fn drop(&mut self) {
        // the rule goes with the namespace; deleting one veth end deletes both
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// N gives up on connects that get no answer (-timeout=1000 ms, SYNs
/// dropped in a namespace the test made): each is a failed connect with
/// error_type "timeout", as many as N's debug.log says it tried, and no
/// failure of any other kind.
#[test]
fn abandoned_connect_is_a_timeout() {
    require_root();
    let started = Instant::now();
    let dead_port = 18_555;
    let ns = DropNamespace::new(dead_port);
    let dest = format!("{}:{dead_port}", ns.ns_addr);
    // the test's own check that SYNs vanish (not refused) before N tries
    let probe = std::net::TcpStream::connect_timeout(&dest.parse().unwrap(), Duration::from_millis(700));
    match probe {
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
        other => panic!("a connect to {dest} should time out in the namespace, got {other:?}"),
    }

    let bin = RenamedLitecoind::new('t');
    let (port, rpcport) = (free_port(), free_port());
    let agent = Agent::start(&config(&bin, port, rpcport, "1s", ""));
    wait_first_collection(&agent);
    let n =
        bin.start(port, rpcport, &["-connect=0".to_string(), "-timeout=1000".to_string(), "-debug=net".to_string()]);
    wait_for("the agent to see N running", Duration::from_secs(20), || node_down_state(&agent).filter(|s| s == "ok"));
    let m0 = agent.metrics();
    let failed = |m: &str, e: &str| {
        metric_sum(m, "nodescope_connection_failed_total", &[("nodescope_target", TARGET), ("error_type", e)])
    };
    let all_failed = |m: &str| metric_sum(m, "nodescope_connection_failed_total", &[("nodescope_target", TARGET)]);

    const TRIES: usize = 3;
    for _ in 0..TRIES {
        // returns once N gave up (the RPC call waits for the connect)
        n.cli(&["addnode", &dest, "onetry"]);
    }
    let log = std::fs::read_to_string(n.dir.path().join("regtest").join("debug.log")).unwrap();
    let attempts = log.lines().filter(|l| l.contains(&format!("trying connection {dest}"))).count();
    let timeouts = log.lines().filter(|l| l.contains(&format!("connection to {dest} timeout"))).count();
    eprintln!("N's debug.log: {attempts} attempts to {dest}, {timeouts} timeouts");
    assert_eq!(attempts, TRIES, "N's debug.log shows {attempts} attempts for {TRIES} addnode onetry");
    assert_eq!(timeouts, attempts, "N's debug.log: every attempt timed out");

    expect_exact(
        &agent,
        "failed connects: timeout, other, all kinds",
        &[attempts as f64, 0.0, attempts as f64],
        Duration::from_secs(3),
        |m| {
            vec![
                failed(m, "timeout") - failed(&m0, "timeout"),
                failed(m, "other") - failed(&m0, "other"),
                all_failed(m) - all_failed(&m0),
            ]
        },
    );
    let m = agent.metrics();
    let p2p = |m: &str| {
        let labels = [
            ("nodescope_target", TARGET),
            ("error_type", "timeout"),
            ("nodescope_connection_direction", "outbound"),
            ("nodescope_service", "p2p"),
        ];
        metric_sum(m, "nodescope_connection_failed_total", &labels)
    };
    assert_eq!(p2p(&m) - p2p(&m0), attempts as f64, "timeouts as outbound p2p: {}", relevant(&m));
    assert_eq!(opened(&m), 0.0, "no connect succeeded: {}", relevant(&m));
    drop((agent, n));
    drop(ns);
    eprintln!("runtime {:?}", started.elapsed());
}

//! The peer-watch rules (rpc_exposed, inbound_flood, connect_failures_high,
//! peer_churn_high) against a real litecoind regtest node and the real
//! agent. Clients outside loopback come from a network namespace the test
//! makes (a veth pair with 10.x addresses on this machine only), removed
//! when the test ends, pass or fail. Rule windows are shortened through
//! config. Every figure the rules report is checked against what the test
//! did: the client's own address and port, the connects it made.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A network namespace joined to this one by a veth pair: the host end is
/// `host_ip`, the namespace end `ns_ip` (a /30 in 10.231.0.0/16). Deleted
/// on drop (the veth goes with it).
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
    ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Netns {
    fn new() -> Netns {
        require_root();
        require_tool("ip", "iproute2");
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // one /30 per namespace, from the pid and a counter, so concurrent runs do not collide
        let slot = (pid.wrapping_mul(7) + n) % 16384;
        let (third, fourth) = (slot / 64, (slot % 64) * 4);
        let ns = Netns {
            name: format!("nsrules-{pid}-{n}"),
            host_if: format!("nsr{}h{n}", pid % 100000),
            host_ip: format!("10.231.{third}.{}", fourth + 1),
            ns_ip: format!("10.231.{third}.{}", fourth + 2),
        };
        let peer_if = format!("nsr{}p{n}", pid % 100000);
        ip(&["netns", "add", &ns.name]);
        ip(&["link", "add", &ns.host_if, "type", "veth", "peer", "name", &peer_if]);
        ip(&["link", "set", &peer_if, "netns", &ns.name]);
        ip(&["addr", "add", &format!("{}/30", ns.host_ip), "dev", &ns.host_if]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &ns.name, "ip"];
            a.extend_from_slice(args);
            ip(&a);
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &peer_if]);
        inside(&["link", "set", &peer_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread that has joined the namespace: sockets it makes
    /// live there, and stay there when handed back.
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on a namespace file we hold open; it changes this thread only.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }

    /// The namespace's /16 as the agent names netgroups.
    fn netgroup(&self) -> &'static str {
        "10.231.0.0/16"
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", &self.host_if]).output();
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// The node in its own cgroup with its RPC and P2P ports also on the host
/// end of `ns` (RPC allowed from the namespace end).
fn node_reachable_from(ns: &Netns, cgroup: &Cgroup) -> Litecoind {
    Litecoind::start(
        Some(cgroup),
        &[
            format!("-rpcbind={}", ns.host_ip),
            format!("-rpcallowip={}/32", ns.ns_ip),
            format!("-bind={}", ns.host_ip),
            "-connect=0".to_string(),
        ],
    )
}

/// One target "ltc" for `node`; `rules` are TOML tables such as
/// `[targets.rules.rpc_exposed]`.
fn agent_for(node: &Litecoind, cgroup: &Cgroup, rules: &str) -> Agent {
    Agent::start(&format!(
        "[agent]\ninterval = \"500ms\"\n\n[[targets]]\nname = \"ltc\"\ncgroup = \"{}\"\nchain = \"litecoin\"\ndatadir = \"{}\"\np2p_ports = [{}]\nrpc_ports = [{}]\n\n{rules}",
        cgroup.path.display(),
        node.dir.path().display(),
        node.port,
        node.rpcport
    ))
}

/// The rule's entry for target ltc in /health/detailed, once evaluated.
fn try_rule(agent: &Agent, id: &str) -> Option<Value> {
    let d = agent.json("/health/detailed");
    d["targets"][0]["rules"].as_array()?.iter().find(|r| r["id"] == id).cloned()
}

fn rule(agent: &Agent, id: &str) -> Value {
    try_rule(agent, id).unwrap_or_else(|| panic!("rule {id} not evaluated"))
}

/// Waits for `id` in `state` with `ok` true of it.
fn wait_rule(agent: &Agent, id: &str, state: &str, timeout: Duration, ok: impl Fn(&Value) -> bool) -> Value {
    wait_for(&format!("{id} {state}"), timeout, || try_rule(agent, id).filter(|r| r["state"] == state && ok(r)))
}

/// Polls `id` every 200ms for `d`; panics if it is ever pending or firing.
/// Returns the last entry.
fn stays_ok(agent: &Agent, id: &str, d: Duration) -> Value {
    let end = Instant::now() + d;
    loop {
        let r = rule(agent, id);
        assert_eq!(r["state"], "ok", "{id} left ok: {r}");
        if Instant::now() >= end {
            return r;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rule_state_metric(agent: &Agent, id: &str) -> f64 {
    metric_sum(&agent.metrics(), "nodescope_rule_state", &[("nodescope_target", "ltc"), ("nodescope_rule", id)])
}

fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
}

/// A client holding a connection to the RPC port from the namespace fires
/// rpc_exposed with that client's address and port in the evidence, and
/// it clears once the client is gone; loopback clients (held, and
/// litecoin-cli calls) never fire it, nor does a namespace client the allow
/// list names.
#[test]
fn rpc_client_from_outside_loopback_is_exposure() {
    let ns = Netns::new();
    let cgroup = Cgroup::new();
    let node = node_reachable_from(&ns, &cgroup);
    let rpc_outside: SocketAddr = format!("{}:{}", ns.host_ip, node.rpcport).parse().unwrap();
    {
        let agent = agent_for(&node, &cgroup, "[targets.rules.rpc_exposed]\nclear_after = \"2s\"\n");
        wait_rule(&agent, "rpc_exposed", "ok", Duration::from_secs(20), |_| true);

        // loopback: a held connection the agent sees, and one-shot calls
        let held = connect(format!("127.0.0.1:{}", node.rpcport).parse().unwrap());
        let r = wait_rule(&agent, "rpc_exposed", "ok", Duration::from_secs(10), |r| {
            r["evidence"]["rpc_connections"].as_u64() >= Some(1)
        });
        assert_eq!(r["evidence"]["exposed_connections"], 0, "{r}");
        for _ in 0..5 {
            node.cli(&["getblockcount"]);
        }
        stays_ok(&agent, "rpc_exposed", Duration::from_secs(3));
        drop(held);

        // from the namespace: exposure, naming the client
        let client = ns.run(move || connect(rpc_outside));
        let from = client.local_addr().unwrap();
        assert_eq!(from.ip().to_string(), ns.ns_ip);
        let start = Instant::now();
        let r = wait_rule(&agent, "rpc_exposed", "firing", Duration::from_secs(10), |_| true);
        eprintln!("rpc_exposed fired {:?} after the connect: {}", start.elapsed(), r["evidence"]);
        assert_eq!(r["severity"], "critical", "{r}");
        assert_eq!(r["evidence"]["exposed_connections"], 1, "{r}");
        assert_eq!(r["evidence"]["clients"], serde_json::json!([from.to_string()]), "{r}");
        // /metrics is encoded at the end of the collection whose verdict /health/detailed already shows
        wait_for("rpc_exposed firing in /metrics", Duration::from_secs(5), || {
            (rule_state_metric(&agent, "rpc_exposed") == 2.0).then_some(())
        });
        assert_eq!(agent.get("/health").0, 503, "a critical rule firing");
        // the node sees the same client
        let ss = Command::new("ss").args(["-tn", "state", "established"]).output().unwrap();
        assert!(String::from_utf8_lossy(&ss.stdout).contains(&from.to_string()), "ss does not show {from}");

        drop(client);
        let gone = Instant::now();
        let r = wait_rule(&agent, "rpc_exposed", "ok", Duration::from_secs(10), |_| true);
        assert!(gone.elapsed() >= Duration::from_secs(2), "cleared before clear_after: {r}");
        assert_eq!(r["evidence"]["exposed_connections"], 0, "{r}");
        assert!(agent.log().contains("health rule rpc_exposed firing on ltc"), "{}", agent.log());
    }

    // the same client from an allowed network: seen, not exposure
    let agent = agent_for(&node, &cgroup, &format!("[targets.rules.rpc_exposed]\nallow = [\"{}/30\"]\n", ns.ns_ip));
    wait_rule(&agent, "rpc_exposed", "ok", Duration::from_secs(20), |_| true);
    let client = ns.run(move || connect(rpc_outside));
    let r = wait_rule(&agent, "rpc_exposed", "ok", Duration::from_secs(10), |r| {
        r["evidence"]["rpc_connections"].as_u64() >= Some(1)
    });
    assert_eq!(r["evidence"]["exposed_connections"], 0, "{r}");
    stays_ok(&agent, "rpc_exposed", Duration::from_secs(3));
    drop(client);
}

/// `count` connects to `addr`, each closed at once; returns how many were
/// established. Bounded: at most `count` connects and 60 s.
fn burst(addr: SocketAddr, count: usize) -> usize {
    let end = Instant::now() + Duration::from_secs(60);
    let mut ok = 0;
    for _ in 0..count {
        if Instant::now() > end {
            break;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok() {
            ok += 1;
        }
    }
    ok
}

/// A small burst from loopback stays under inbound_flood's threshold; a
/// burst of 300 connects from the namespace fires it with the namespace's
/// netgroup on top, fires peer_churn_high too (each connect is a peer
/// opened and closed), and both clear once the window has passed.
#[test]
fn inbound_burst_is_a_flood_and_clears_after() {
    let ns = Netns::new();
    let cgroup = Cgroup::new();
    let node = node_reachable_from(&ns, &cgroup);
    // more than 100 inbound connections in 10 s; more than 100 peers replaced in 10 s
    let agent = agent_for(
        &node,
        &cgroup,
        "[targets.rules.inbound_flood]\nwindow = \"10s\"\nthreshold = 600\nclear_after = \"3s\"\n\n\
         [targets.rules.peer_churn_high]\nwindow = \"10s\"\nthreshold = 36000\nclear_after = \"3s\"\n",
    );
    wait_rule(&agent, "inbound_flood", "ok", Duration::from_secs(20), |_| true);
    wait_rule(&agent, "peer_churn_high", "ok", Duration::from_secs(5), |_| true);
    // The verdict before the burst (the host's disk may already degrade it).
    let status_before = agent.json("/health")["status"].clone();

    // 30 from loopback: seen, under the threshold
    let p2p_loopback: SocketAddr = node.addr().parse().unwrap();
    let small = burst(p2p_loopback, 30);
    assert_eq!(small, 30);
    let r = wait_rule(&agent, "inbound_flood", "ok", Duration::from_secs(10), |r| {
        r["evidence"]["inbound_connections"].as_u64() >= Some(30)
    });
    assert_eq!(r["evidence"]["top_netgroups"][0]["netgroup"], "127.0.0.0/16", "{r}");
    stays_ok(&agent, "inbound_flood", Duration::from_secs(2));
    assert_eq!(rule(&agent, "peer_churn_high")["state"], "ok");

    // 300 from the namespace
    let p2p_outside: SocketAddr = format!("{}:{}", ns.host_ip, node.port).parse().unwrap();
    let start = Instant::now();
    let made = ns.run(move || burst(p2p_outside, 300));
    eprintln!("{made} connects from {} in {:?}", ns.ns_ip, start.elapsed());
    assert!(made >= 290, "only {made} of 300 connects established");
    let r = wait_rule(&agent, "inbound_flood", "firing", Duration::from_secs(10), |_| true);
    eprintln!("inbound_flood fired {:?} after the burst began: {}", start.elapsed(), r["evidence"]);
    let ev = &r["evidence"];
    assert_eq!(ev["top_netgroups"][0]["netgroup"], ns.netgroup(), "{r}");
    let from_ns = ev["top_netgroups"][0]["connections"].as_u64().unwrap();
    // every established connect is an inbound connection the node accepted
    assert!(from_ns as f64 >= made as f64 * 0.95 && from_ns <= made as u64, "{from_ns} counted for {made} made: {r}");
    assert!(ev["per_minute"].as_f64().unwrap() > 600.0, "{r}");
    // /metrics is encoded at the end of the collection whose verdict /health/detailed already shows
    wait_for("inbound_flood firing in /metrics", Duration::from_secs(5), || {
        (rule_state_metric(&agent, "inbound_flood") == 2.0).then_some(())
    });
    let churn = wait_rule(&agent, "peer_churn_high", "firing", Duration::from_secs(10), |_| true);
    assert!(churn["evidence"]["peers_replaced"].as_u64() > Some(100), "{churn}");
    assert_eq!(agent.get("/health").0, 200, "warnings only: degraded, still 200");
    assert_eq!(agent.json("/health")["status"], "degraded");

    // the burst leaves the window, then clear_after passes
    let r = wait_rule(&agent, "inbound_flood", "ok", Duration::from_secs(30), |_| true);
    eprintln!("inbound_flood cleared {:?} after the burst began", start.elapsed());
    assert!(start.elapsed() >= Duration::from_secs(10), "cleared before the burst left the window: {r}");
    wait_rule(&agent, "peer_churn_high", "ok", Duration::from_secs(15), |_| true);
    assert_eq!(agent.json("/health")["status"], status_before, "the verdict returns to what it was before the burst");
}

/// Outbound connects to refused ports (`addnode ... onetry`): four are
/// below the rule's minimum of five attempts; eight, all failed, fire it,
/// counted by reason; once they leave the window it clears.
#[test]
fn refused_outbound_connects_are_connect_failures() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let agent = agent_for(
        &node,
        &cgroup,
        "[targets.rules.connect_failures_high]\nwindow = \"15s\"\nclear_after = \"2s\"\n\n\
         [targets.rules.partition_suspected]\nenabled = false\n",
    );
    wait_rule(&agent, "connect_failures_high", "ok", Duration::from_secs(20), |_| true);
    let refuse = || {
        let port = free_port();
        node.cli(&["addnode", &format!("127.0.0.1:{port}"), "onetry"]);
    };
    let start = Instant::now();
    for _ in 0..4 {
        refuse();
    }
    let r = wait_rule(&agent, "connect_failures_high", "ok", Duration::from_secs(10), |r| {
        r["evidence"]["failed"].as_u64() == Some(4)
    });
    assert_eq!(r["evidence"]["attempts"], 4, "{r}");
    assert_eq!(r["evidence"]["failed_by_reason"]["refused"], 4, "{r}");
    stays_ok(&agent, "connect_failures_high", Duration::from_secs(2));

    for _ in 0..4 {
        refuse();
    }
    let r = wait_rule(&agent, "connect_failures_high", "firing", Duration::from_secs(10), |_| true);
    eprintln!("connect_failures_high fired {:?} after the first connect: {}", start.elapsed(), r["evidence"]);
    assert!(start.elapsed() < Duration::from_secs(15), "the first four left the window already");
    assert_eq!(r["evidence"]["attempts"], 8, "{r}");
    assert_eq!(r["evidence"]["failed"], 8, "{r}");
    assert_eq!(r["evidence"]["failed_percent"], 100.0, "{r}");
    assert_eq!(r["evidence"]["failed_by_reason"]["refused"], 8, "{r}");
    // /metrics is encoded at the end of the collection whose verdict /health/detailed already shows
    wait_for("connect_failures_high firing in /metrics", Duration::from_secs(5), || {
        (rule_state_metric(&agent, "connect_failures_high") == 2.0).then_some(())
    });
    let failed = metric_sum(
        &agent.metrics(),
        "nodescope_connection_failed_total",
        &[("nodescope_target", "ltc"), ("error_type", "refused")],
    );
    assert_eq!(failed, 8.0, "the failure counter agrees");

    let r = wait_rule(&agent, "connect_failures_high", "ok", Duration::from_secs(40), |_| true);
    eprintln!("connect_failures_high cleared {:?} after the first connect", start.elapsed());
    assert!(start.elapsed() >= Duration::from_secs(15), "cleared while failures were in the window: {r}");
}

/// One /events reader on its own thread: (event, data) as they arrive. The
/// request is HTTP/1.0, so the stream comes close-delimited, unchunked.
fn events_reader(agent: &Agent) -> (TcpStream, std::sync::mpsc::Receiver<(u64, String, Value)>) {
    use std::io::{BufRead, BufReader, Write};
    let mut s = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    s.write_all(b"GET /events HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
    let status = lines.next().unwrap().unwrap();
    assert!(status.starts_with("HTTP/1.0 200") || status.starts_with("HTTP/1.1 200"), "{status}");
    let mut headers = Vec::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        if l.is_empty() {
            break;
        }
        headers.push(l.to_ascii_lowercase());
    }
    assert!(headers.iter().any(|h| h == "content-type: text/event-stream"), "{headers:?}");
    std::thread::spawn(move || {
        let (mut id, mut kind) = (0, String::new());
        for l in lines {
            let Ok(l) = l else { return };
            if let Some(v) = l.strip_prefix("id: ") {
                id = v.parse().unwrap();
            } else if let Some(v) = l.strip_prefix("event: ") {
                kind = v.to_string();
            } else if let Some(v) = l.strip_prefix("data: ") {
                if tx.send((id, kind.clone(), serde_json::from_str(v).unwrap())).is_err() {
                    return;
                }
            }
        }
    });
    (s, rx)
}

/// The connection events of inbound connections from these local ports, in
/// arrival order, once `n` have come (at most `timeout`).
fn conn_events(
    rx: &std::sync::mpsc::Receiver<(u64, String, Value)>,
    ports: &[u16],
    n: usize,
    timeout: Duration,
    others: &mut Vec<(String, Value)>,
) -> Vec<(String, u16)> {
    let end = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut last_id = 0;
    while got.len() < n {
        let left = end.saturating_duration_since(Instant::now());
        let Ok((id, kind, data)) = rx.recv_timeout(left) else {
            panic!("{} of {n} events after {timeout:?}: {got:?}", got.len());
        };
        assert!(id > last_id, "event ids out of order: {id} after {last_id}");
        last_id = id;
        let port = data["port"].as_u64().unwrap_or(0) as u16;
        if (kind == "open" || kind == "close") && data["direction"] == "inbound" && ports.contains(&port) {
            assert_eq!(data["target"], "ltc", "{data}");
            assert_eq!(data["service"], "p2p", "{data}");
            assert_eq!(data["address"], "127.0.0.1", "{data}");
            if kind == "close" {
                assert_eq!(data["bytes_received"], 0, "the test sent nothing: {data}");
            }
            got.push((kind, port));
        } else {
            others.push((kind, data));
        }
    }
    got
}

/// /events delivers the open and close of each connection of a scripted
/// sequence, in the order they happened (also two within one collection
/// interval), a rule's transition and a refused connect of the node's; a
/// reader that stops reading is dropped and counted while the agent and a
/// reader that keeps up go on undisturbed.
#[test]
fn events_stream_connections_in_order_and_drop_a_stalled_reader() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let agent = agent_for(&node, &cgroup, "");
    wait_rule(&agent, "no_peers", "pending", Duration::from_secs(20), |_| true);
    let (_fast, rx) = events_reader(&agent);
    let p2p: SocketAddr = node.addr().parse().unwrap();
    let port = |s: &TcpStream| s.local_addr().unwrap().port();

    // a and b overlap; c opens and closes inside one interval (500ms)
    let a = connect(p2p);
    std::thread::sleep(Duration::from_millis(1200));
    let b = connect(p2p);
    std::thread::sleep(Duration::from_millis(1200));
    let (pa, pb) = (port(&a), port(&b));
    drop(a);
    std::thread::sleep(Duration::from_millis(1200));
    drop(b);
    std::thread::sleep(Duration::from_millis(1200));
    let c = connect(p2p);
    let pc = port(&c);
    drop(c);
    let mut others = Vec::new();
    let got = conn_events(&rx, &[pa, pb, pc], 6, Duration::from_secs(10), &mut others);
    let want: Vec<(String, u16)> =
        [("open", pa), ("open", pb), ("close", pa), ("close", pb), ("open", pc), ("close", pc)]
            .into_iter()
            .map(|(k, p)| (k.to_string(), p))
            .collect();
    assert_eq!(got, want);
    // no_peers left pending when a came: its transition is an event too
    let cleared = others.iter().any(|(kind, d)| {
        kind == "rule" && d["rule"] == "no_peers" && d["target"] == "ltc" && d["from"] == "pending" && d["to"] == "ok"
    });
    assert!(cleared, "no rule event for no_peers pending -> ok: {others:?}");

    // a connect the node makes that is refused: a failed event, outbound, to that port
    let refused = free_port();
    node.cli(&["addnode", &format!("127.0.0.1:{refused}"), "onetry"]);
    let failed = wait_for("the failed connect's event", Duration::from_secs(10), || {
        while let Ok((_, kind, d)) = rx.try_recv() {
            if kind == "failed" && d["port"] == refused {
                return Some(d);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        None
    });
    assert!(
        failed["target"] == "ltc"
            && failed["direction"] == "outbound"
            && failed["service"] == "p2p"
            && failed["reason"] == "refused",
        "{failed}"
    );

    // a reader that never reads past the response head
    let (stalled, stalled_rx) = events_reader(&agent);
    drop(stalled_rx);
    let dropped = || metric_sum(&agent.metrics(), "nodescope_events_readers_dropped_total", &[]);
    assert_eq!(dropped(), 0.0);
    // bursts of loopback connects (an open and a close each) until it is
    // dropped: its queue (2048 events) and socket buffers fill; bounded at 8000
    let mut made = 0;
    while dropped() == 0.0 && made < 8000 {
        made += burst(p2p, 500);
        // meanwhile the reader that keeps up hears of a new connection within 3 s
        let d = connect(p2p);
        let pd = port(&d);
        drop(d);
        let seen = Instant::now();
        let events = conn_events(&rx, &[pd], 2, Duration::from_secs(3), &mut Vec::new());
        assert_eq!(events, [("open".to_string(), pd), ("close".to_string(), pd)]);
        eprintln!("after {made} connects: the keeping-up reader had its events in {:?}", seen.elapsed());
        assert_eq!(agent.get("/health/live").0, 200);
    }
    eprintln!("the stalled reader dropped after {made} connects");
    assert_eq!(dropped(), 1.0, "no reader dropped after {made} connects");
    assert_eq!(metric_sum(&agent.metrics(), "nodescope_events_readers", &[]), 1.0);
    // its stream ends once what was queued is read
    stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut rest = Vec::new();
    use std::io::Read;
    let r = (&stalled).read_to_end(&mut rest);
    assert!(r.is_ok(), "the stalled reader's stream did not end: {r:?} after {} bytes", rest.len());
    assert!(agent.log().contains("an /events reader fell 2048 events behind: dropped"), "{}", agent.log());
}

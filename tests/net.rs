//! The network signal against a real litecoind regtest network on loopback:
//! nodescope's per-peer bytes against the node's own getpeerinfo counters,
//! churn counted against the events the test makes, isolation from other
//! processes' traffic, and the /metrics text checked by promtool.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

fn agent_config(node: &Litecoind, cgroup: &Cgroup) -> String {
    format!(
        "[agent]\ninterval = \"500ms\"\n\n[[targets]]\nname = \"ltc\"\ncgroup = \"{}\"\nchain = \"litecoin\"\np2p_ports = [{}]\nrpc_ports = [{}]\n",
        cgroup.path.display(),
        node.port,
        node.rpcport
    )
}

fn peers_of(agent: &Agent) -> Vec<Value> {
    peers_of_target(agent, "ltc")
}

/// Waits until the node's counters stop moving, then compares every peer.
fn assert_peers_match(node: &Litecoind, agent: &Agent) {
    let mut last = String::new();
    let mut stable = 0;
    let mut mismatch = String::new();
    for _ in 0..60 {
        std::thread::sleep(Duration::from_millis(1500));
        let theirs = node.peers();
        let ours = peers_of(agent);
        let sig: String =
            theirs.iter().map(|p| format!("{}:{}:{};", p["addr"], p["bytessent"], p["bytesrecv"])).collect();
        stable = if sig == last { stable + 1 } else { 0 };
        last = sig;
        mismatch = compare(&theirs, &ours);
        if stable >= 1 && mismatch.is_empty() {
            for p in &theirs {
                let (ip, port) = p["addr"].as_str().unwrap().rsplit_once(':').unwrap();
                let o = ours.iter().find(|o| o["address"] == ip && o["port"].as_u64() == port.parse().ok()).unwrap();
                eprintln!(
                    "peer {}: sent {} (node {}), received {} (node {})",
                    p["addr"], o["bytes_sent"], p["bytessent"], o["bytes_received"], p["bytesrecv"]
                );
            }
            return;
        }
    }
    panic!("nodescope /peers does not match getpeerinfo:\n{mismatch}\n{}", agent.log());
}

/// Empty when every peer of the node is listed with bytes within 1% or 512 bytes.
fn compare(theirs: &[Value], ours: &[Value]) -> String {
    let mut problems = String::new();
    if theirs.len() != ours.len() {
        problems += &format!("node has {} peers, nodescope lists {}: {:?}\n", theirs.len(), ours.len(), ours);
    }
    for p in theirs {
        let addr = p["addr"].as_str().unwrap();
        let (ip, port) = addr.rsplit_once(':').unwrap();
        let port: u64 = port.parse().unwrap();
        let Some(o) = ours.iter().find(|o| o["address"] == ip && o["port"] == port) else {
            problems += &format!("peer {addr} missing from /peers\n");
            continue;
        };
        let inbound = p["inbound"].as_bool().unwrap();
        let dir = if inbound { "inbound" } else { "outbound" };
        if o["direction"] != dir {
            problems += &format!("peer {addr}: direction {} but node says {dir}\n", o["direction"]);
        }
        for (ours_key, theirs_key) in [("bytes_sent", "bytessent"), ("bytes_received", "bytesrecv")] {
            let a = o[ours_key].as_u64().unwrap() as f64;
            let b = p[theirs_key].as_u64().unwrap() as f64;
            let tolerance = (b * 0.01).max(512.0);
            if (a - b).abs() > tolerance {
                problems += &format!("peer {addr}: {ours_key} {a} vs node's {theirs_key} {b}\n");
            }
        }
    }
    problems
}

#[test]
fn peers_match_the_nodes_own_counters() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    // An inbound peer from before nodescope started, with traffic.
    let early = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);
    node.mine(110);

    let agent = Agent::start(&agent_config(&node, &cgroup));
    // The connection that predates the agent is listed with its totals.
    wait_for("the early peer in /peers", Duration::from_secs(20), || (peers_of(&agent).len() == 1).then_some(()));
    assert_peers_match(&node, &agent);

    // One more inbound and one outbound, then blocks and transactions.
    let inbound = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    let outbound = Litecoind::start(None, &["-connect=0".to_string()]);
    node.cli(&["addnode", &outbound.addr(), "onetry"]);
    node.wait_peers(3);
    for _ in 0..5 {
        let to = inbound.address();
        node.cli(&["sendtoaddress", &to, "1.5"]);
        node.mine(3);
    }
    assert_peers_match(&node, &agent);

    // RPC connections (litecoin-cli above) are not peers, but are counted.
    let m = agent.metrics();
    assert!(
        metric_sum(
            &m,
            "nodescope_connection_opened_total",
            &[("nodescope_target", "ltc"), ("nodescope_service", "rpc")]
        ) >= 10.0,
        "{m}"
    );

    // Isolation: bulk traffic from processes outside the node's cgroup.
    require_tool("iperf3", "iperf3");
    let before: u64 = peers_of(&agent)
        .iter()
        .map(|p| p["bytes_sent"].as_u64().unwrap() + p["bytes_received"].as_u64().unwrap())
        .sum();
    let port = free_port();
    let dir = TempDir::new("iperf");
    let mut server = Stopped(spawn_in(
        None,
        "iperf3",
        &["-s".into(), "-1".into(), "-B".into(), "127.0.0.1".into(), "-p".into(), port.to_string()],
        &dir.path().join("s.log"),
    ));
    std::thread::sleep(Duration::from_millis(500));
    let client =
        Command::new("iperf3").args(["-c", "127.0.0.1", "-p", &port.to_string(), "-n", "512M"]).output().unwrap();
    assert!(client.status.success(), "iperf3: {}", String::from_utf8_lossy(&client.stderr));
    stop_child(&mut server, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(2));
    let ours = peers_of(&agent);
    assert!(
        ours.iter().all(|p| p["port"] != port && p["local_port"] != port),
        "iperf3 connection attributed to the node: {ours:?}"
    );
    let after: u64 =
        ours.iter().map(|p| p["bytes_sent"].as_u64().unwrap() + p["bytes_received"].as_u64().unwrap()).sum();
    assert!(after - before < 1 << 20, "512 MiB of someone else's traffic moved the node's bytes by {}", after - before);
    assert_peers_match(&node, &agent);
    let m = agent.metrics();
    assert!(!m.contains(&format!(":{port}")));

    // The exposition is valid Prometheus text.
    assert_promtool_ok(&m, dir.path());
    // stop order: agent and peers first, then the node, then its cgroup
    drop((agent, early, inbound, outbound, node));
    drop(cgroup);
}

fn churn(m: &str, metric: &str, dir: &str) -> f64 {
    metric_sum(
        m,
        metric,
        &[("nodescope_target", "ltc"), ("nodescope_connection_direction", dir), ("nodescope_service", "p2p")],
    )
}

/// Waits for two scrapes in a row to agree, so every event made is counted.
fn settled_metrics(agent: &Agent) -> String {
    let mut last = agent.metrics();
    loop {
        std::thread::sleep(Duration::from_millis(1200));
        let m = agent.metrics();
        let keep = |t: &str| {
            t.lines()
                .filter(|l| l.starts_with("nodescope_connection_") && l.contains("p2p"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        if keep(&m) == keep(&last) {
            return m;
        }
        last = m;
    }
}

#[test]
fn churn_counts_are_exact() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let other = Litecoind::start(None, &["-connect=0".to_string()]);
    let agent = Agent::start(&agent_config(&node, &cgroup));
    let m0 = settled_metrics(&agent);

    const CYCLES: usize = 3;
    for _ in 0..CYCLES {
        node.cli(&["addnode", &other.addr(), "onetry"]);
        node.wait_peers(1);
        node.cli(&["disconnectnode", &other.addr()]);
        node.wait_peers(0);
    }
    const FAILURES: usize = 2;
    let closed_port = free_port();
    for _ in 0..FAILURES {
        node.cli(&["addnode", &format!("127.0.0.1:{closed_port}"), "onetry"]);
    }
    // one inbound peer that comes and goes
    let visitor = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);
    drop(visitor);
    node.wait_peers(0);

    let m1 = settled_metrics(&agent);
    let delta = |metric: &str, dir: &str| churn(&m1, metric, dir) - churn(&m0, metric, dir);
    let failed = |m: &str| {
        metric_sum(
            m,
            "nodescope_connection_failed_total",
            &[("nodescope_target", "ltc"), ("nodescope_service", "p2p"), ("error_type", "refused")],
        )
    };
    let report = format!("before:\n{m0}\nafter:\n{m1}");
    assert_eq!(delta("nodescope_connection_opened_total", "outbound"), CYCLES as f64, "{report}");
    assert_eq!(delta("nodescope_connection_closed_total", "outbound"), CYCLES as f64, "{report}");
    assert_eq!(delta("nodescope_connection_duration_seconds_count", "outbound"), CYCLES as f64, "{report}");
    assert_eq!(failed(&m1) - failed(&m0), FAILURES as f64, "{report}");
    assert_eq!(delta("nodescope_connection_opened_total", "inbound"), 1.0, "{report}");
    assert_eq!(delta("nodescope_connection_closed_total", "inbound"), 1.0, "{report}");
    assert_eq!(
        churn(&m1, "nodescope_connection_open", "outbound") + churn(&m1, "nodescope_connection_open", "inbound"),
        0.0,
        "{report}"
    );
    drop((agent, other, node));
    drop(cgroup);
}

/// A listening socket is not a connection, whoever gave it a socket cookie:
/// after `ss` (a sock_diag dump, as an operator runs; the agent's own
/// listener lookup is one too) lists the node's listeners, the node stops
/// and its P2P and RPC listeners close, and no close is counted for them.
/// The truth: the one inbound peer the test made, opened and closed once.
#[test]
fn listeners_closing_are_not_connections() {
    require_root();
    require_tool("ss", "iproute2");
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let agent = Agent::start(&agent_config(&node, &cgroup));
    let visitor = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);
    drop(visitor);
    node.wait_peers(0);
    let out = Command::new("ss").args(["-tlnH", &format!("sport = :{}", node.port)]).output().unwrap();
    let listed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(listed.contains(&format!(":{}", node.port)), "ss did not list the node's P2P listener: {listed:?}");
    let before = settled_metrics(&agent);
    drop(node);
    std::thread::sleep(Duration::from_secs(2));
    let after = settled_metrics(&agent);
    let count = |m: &str, metric: &str, service: &str| {
        let labels = [
            ("nodescope_target", "ltc"),
            ("nodescope_connection_direction", "inbound"),
            ("nodescope_service", service),
        ];
        series(m, metric, &labels).unwrap_or_else(|| panic!("no {metric} series for inbound {service}:\n{m}"))
    };
    let report = format!("before:\n{before}\nafter:\n{after}");
    for metric in ["nodescope_connection_opened_total", "nodescope_connection_closed_total"] {
        assert_eq!(count(&before, metric, "p2p"), 1.0, "{metric}, the one visitor: {report}");
        assert_eq!(count(&after, metric, "p2p"), 1.0, "{metric} after the node's listeners closed: {report}");
    }
    let rpc_closed = |m: &str| {
        metric_sum(m, "nodescope_connection_closed_total", &[("nodescope_target", "ltc"), ("nodescope_service", "rpc")])
    };
    assert_eq!(rpc_closed(&after), rpc_closed(&before), "the RPC listener's close: {report}");
    drop(agent);
    drop(cgroup);
}

/// With no [[targets]], nodescope finds litecoind by itself and reads its P2P
/// port from its command line: the watched node's inbound peer shows up as a
/// P2P peer of a discovered target named after chain and network.
#[test]
fn discovers_nodes_without_config() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let peer = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);
    let agent = Agent::start("[agent]\ninterval = \"500ms\"\n");
    let found = wait_for("discovered targets with the peer", Duration::from_secs(30), || {
        let v = agent.json("/peers");
        let targets = v["targets"].as_array().cloned().unwrap_or_default();
        let inbound = targets.iter().any(|t| {
            t["name"].as_str().unwrap_or("").starts_with("litecoin-regtest")
                && t["peers"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["local_port"] == node.port && p["direction"] == "inbound")
        });
        let outbound = targets.iter().any(|t| {
            t["peers"].as_array().unwrap().iter().any(|p| p["port"] == node.port && p["direction"] == "outbound")
        });
        (inbound && outbound).then_some(targets)
    });
    assert!(found.len() >= 2, "both litecoind processes are targets: {found:?}");
    drop((agent, peer, node));
    drop(cgroup);
}

/// A target that is not running yet: the agent keeps running, and attaches
/// when the node appears (its pid file shows up).
#[test]
fn attaches_when_the_node_appears() {
    require_root();
    let cgroup = Cgroup::new();
    let dir = TempDir::new("ltc-later");
    let pid_file = dir.path().join("node.pid");
    let config = format!(
        "[agent]\ninterval = \"500ms\"\n\n[[targets]]\nname = \"ltc\"\npid_file = \"{}\"\nchain = \"litecoin\"\n",
        pid_file.display()
    );
    let agent = Agent::start(&config);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.get("/metrics").0, 200, "agent keeps serving while the node is absent");
    assert!(agent.log().contains("not running"), "the agent says the node is absent: {}", agent.log());

    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string(), format!("-pid={}", pid_file.display())]);
    let peer = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);
    wait_for("the node's peer in /peers", Duration::from_secs(30), || (peers_of(&agent).len() == 1).then_some(()));
    assert_peers_match(&node, &agent);
    drop((agent, peer, node));
    drop(cgroup);
}

/// Cardinality: with limits.top_peers = 1, only the peer with the most bytes
/// keeps its own series and the rest are summed into "other"; /peers still
/// lists every connection; a peer's series leaves /metrics once peer_ttl has
/// passed since its last connection closed. The node here is a plain TCP
/// server in the watched cgroup, its peers clients from distinct loopback
/// addresses sending byte counts the test chose.
#[test]
fn top_peers_cut_and_ttl() {
    use std::io::{Read, Write};
    require_root();
    let cgroup = Cgroup::new();
    let dir = TempDir::new("topn");
    let port = free_port();
    let server_py = format!(
        "import socket, threading\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('0.0.0.0',{port})); s.listen(16)\n\
def serve(c):\n    while c.recv(65536): pass\n    c.close()\n\
while True:\n    c,_=s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()\n"
    );
    let mut server =
        Stopped(spawn_in(Some(&cgroup), "python3", &["-c".into(), server_py], &dir.path().join("server.log")));
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"300ms\"\n[limits]\ntop_peers = 1\npeer_ttl = \"3s\"\n\n[[targets]]\nname = \"topn\"\ncgroup = \"{}\"\np2p_ports = [{port}]\n",
        cgroup.path.display()
    ));
    wait_for("server listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
    });

    let sent: [(&str, usize); 3] = [("127.0.0.2", 30_000), ("127.0.0.3", 20_000), ("127.0.0.4", 10_000)];
    let mut clients = Vec::new();
    for (ip, n) in sent {
        let mut c = client_from(ip, port);
        c.write_all(&vec![b'x'; n]).unwrap();
        clients.push(c);
    }
    let series = |m: &str, addr: &str| {
        metric_sum(
            m,
            "nodescope_peer_io_bytes_total",
            &[("nodescope_target", "topn"), ("network_peer_address", addr), ("network_io_direction", "receive")],
        )
    };
    let m = wait_for("the top peer and other", Duration::from_secs(20), || {
        let m = agent.metrics();
        (series(&m, "127.0.0.2") == 30_000.0 && series(&m, "other") == 30_000.0).then_some(m)
    });
    assert!(
        !m.contains("network_peer_address=\"127.0.0.3\"") && !m.contains("network_peer_address=\"127.0.0.4\""),
        "{m}"
    );
    let listed: Vec<Value> = peers_of_target(&agent, "topn");
    for (ip, n) in sent {
        assert!(
            listed.iter().any(|p| p["address"] == ip && p["bytes_received"] == n as u64),
            "{ip} with {n} bytes in /peers: {listed:?}"
        );
    }

    // closed: the peer's series stays for peer_ttl, then goes; "other" stays
    for mut c in clients {
        c.shutdown(std::net::Shutdown::Both).unwrap();
        let _ = c.read(&mut [0u8; 1]);
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(series(&agent.metrics(), "127.0.0.2"), 30_000.0, "gone before its TTL");
    wait_for("the top peer's series to expire", Duration::from_secs(15), || {
        let m = agent.metrics();
        (!m.contains("network_peer_address=\"127.0.0.2\"") && series(&m, "other") == 30_000.0).then_some(())
    });
    drop(agent);
    stop_child(&mut server, Duration::from_secs(5));
    drop(cgroup);
}

/// A TCP client whose source address is `ip` (any 127/8 address works on loopback).
fn client_from(ip: &str, port: u16) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket/bind/connect on a fresh fd we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0);
        let mut local: libc::sockaddr_in = std::mem::zeroed();
        local.sin_family = libc::AF_INET as u16;
        local.sin_addr.s_addr = u32::from_ne_bytes(ip.parse::<std::net::Ipv4Addr>().unwrap().octets());
        assert_eq!(
            libc::bind(
                fd,
                &local as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32
            ),
            0
        );
        let mut remote: libc::sockaddr_in = std::mem::zeroed();
        remote.sin_family = libc::AF_INET as u16;
        remote.sin_port = port.to_be();
        remote.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        assert_eq!(
            libc::connect(
                fd,
                &remote as *const _ as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_in>() as u32
            ),
            0
        );
        std::net::TcpStream::from_raw_fd(fd)
    }
}

//! Several nodes of different chains on one host, watched by one agent: a
//! litecoind regtest node with one litecoind peer and a monerod regtest node
//! with one monerod peer, each node in a cgroup of its own, one config with
//! two [[targets]]. Each target has its own series (`nodescope_target`), its
//! own /peers section, its own rules and verdict; its per-peer bytes equal
//! its node's own counters to the byte; and neither target ever shows the
//! other node's peers or bytes.
//!
//! The node's own counters: litecoind's getpeerinfo `bytessent`/`bytesrecv`
//! (every P2P message, header included: the TCP payload; equal at rest).
//! monerod's JSON-RPC `get_connections` `send_count`/`recv_count`: epee's
//! connection adds every byte it writes to or reads from the socket (levin
//! header and body), so they too are the TCP payload, and at rest they equal
//! the kernel's own `bytes_acked` (less the SYN of an outbound connection)
//! and `bytes_received` of the socket (`ss -tin`), which this test also
//! checks for the watched monerod's sockets.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// One P2P connection as a node sees it: (peer address, peer port,
/// direction, bytes sent, bytes received).
type Conn = (String, u16, &'static str, u64, u64);

fn ltc_view(node: &Litecoind) -> Vec<Conn> {
    getpeerinfo_view(&node.peers())
}

fn getpeerinfo_view(peers: &[Value]) -> Vec<Conn> {
    let mut out: Vec<Conn> = peers
        .iter()
        .map(|p| {
            let (ip, port) = p["addr"].as_str().unwrap().rsplit_once(':').unwrap();
            let dir = if p["inbound"].as_bool().unwrap() { "inbound" } else { "outbound" };
            (
                ip.to_string(),
                port.parse().unwrap(),
                dir,
                p["bytessent"].as_u64().unwrap(),
                p["bytesrecv"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

fn xmr_view(node: &MonerodNode) -> Vec<Conn> {
    let mut out: Vec<Conn> = node
        .connections()
        .iter()
        .map(|c| {
            let dir = if c["incoming"].as_bool().unwrap() { "inbound" } else { "outbound" };
            let port: u16 = c["port"].as_str().and_then(|p| p.parse().ok()).unwrap_or_else(|| panic!("port in {c}"));
            (
                c["host"].as_str().unwrap().to_string(),
                port,
                dir,
                c["send_count"].as_u64().unwrap(),
                c["recv_count"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// The same, from the agent's /peers section of `target`.
fn agent_view(agent: &Agent, target: &str) -> Vec<Conn> {
    let mut out: Vec<Conn> = peers_of_target(agent, target)
        .iter()
        .map(|p| {
            let dir = if p["direction"] == "inbound" { "inbound" } else { "outbound" };
            (
                p["address"].as_str().unwrap().to_string(),
                p["port"].as_u64().unwrap() as u16,
                dir,
                p["bytes_sent"].as_u64().unwrap(),
                p["bytes_received"].as_u64().unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Waits for the node's counters to rest (the same in two reads 1.5 s
/// apart) and the agent's section to equal them to the byte; returns them.
fn assert_matches_at_rest(agent: &Agent, target: &str, node: &dyn Fn() -> Vec<Conn>) -> Vec<Conn> {
    let mut last = node();
    let mut ours = Vec::new();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(1500));
        let now = node();
        ours = agent_view(agent, target);
        if now == last && !now.is_empty() && ours == now {
            for (ip, port, dir, sent, received) in &now {
                eprintln!("{target}: peer {ip}:{port} {dir}: sent {sent}, received {received}, equal in /peers");
            }
            return now;
        }
        last = now;
    }
    panic!("{target}: /peers {ours:?} never equalled the node's own counters {last:?}\n{}", agent.log());
}

/// The kernel's byte counts of every established TCP socket on the host
/// (`ss -tin`): (local port, peer port, bytes_acked, bytes_received).
fn ss_bytes() -> Vec<(u16, u16, u64, u64)> {
    let out = Command::new("ss").args(["-tinH", "state", "established"]).output();
    let text = String::from_utf8_lossy(&out.expect("ss").stdout).to_string();
    let port = |a: Option<&str>| a.and_then(|a| a.rsplit_once(':')).and_then(|(_, p)| p.parse::<u16>().ok());
    let mut rows = Vec::new();
    let mut ends = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            // Recv-Q Send-Q Local:Port Peer:Port (with `state`, no State column)
            let mut f = line.split_whitespace().skip(2);
            ends = port(f.next()).zip(port(f.next()));
        } else if let Some((local, peer)) = ends.take() {
            let field = |name: &str| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(name)?.strip_prefix(':')?.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            rows.push((local, peer, field("bytes_acked"), field("bytes_received")));
        }
    }
    rows
}

fn target_config(name: &str, chain: &str, cg: &Cgroup, datadir: &std::path::Path, p2p: u16, rpc: u16) -> String {
    format!(
        "[[targets]]\nname = \"{name}\"\ncgroup = \"{}\"\nchain = \"{chain}\"\ndatadir = \"{}\"\np2p_ports = [{p2p}]\n\
         rpc_ports = [{rpc}]\n\n[targets.rules.no_peers]\nfor = \"1s\"\n\n",
        cg.path.display(),
        datadir.display()
    )
}

fn rule(detailed: &Value, target: &str, id: &str) -> Value {
    let t = detailed["targets"].as_array().unwrap().iter().find(|t| t["name"] == target).unwrap();
    t["rules"].as_array().unwrap().iter().find(|r| r["id"] == id).cloned().unwrap_or(Value::Null)
}

#[test]
fn litecoind_and_monerod_watched_at_once_each_on_its_own() {
    require_root();
    require_tool("ss", "iproute2");
    let (ltc_cg, xmr_cg) = (Cgroup::new(), Cgroup::new());
    let ltc = Litecoind::start(Some(&ltc_cg), &["-connect=0".to_string()]);
    let ltc_peer = Litecoind::start(None, &[format!("-connect={}", ltc.addr())]);
    let (xmr_port, xmr_peer_port) = (free_port(), free_port());
    let xmr = MonerodNode::start(Some(&xmr_cg), xmr_port, Some(xmr_peer_port));
    let mut xmr_peer = MonerodNode::start(None, xmr_peer_port, Some(xmr_port));
    ltc.wait_peers(1);
    wait_for("a monerod connection", Duration::from_secs(90), || (!xmr.connections().is_empty()).then_some(()));

    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"500ms\"\n\n{}{}",
        target_config("ltc", "litecoin", &ltc_cg, ltc.dir.path(), ltc.port, ltc.rpcport),
        target_config("xmr", "monero", &xmr_cg, xmr.dir.path(), xmr_port, xmr.rpc_port)
    ));

    // Traffic on both: blocks mined on each node reach its peer.
    ltc.mine(20);
    xmr.mine(10);
    wait_for("the monerod peer at the tip", Duration::from_secs(60), || {
        (xmr_peer.height() == xmr.height()).then_some(())
    });
    wait_for("the litecoind peer at the tip", Duration::from_secs(60), || {
        (ltc_peer.cli(&["getblockcount"]) == ltc.cli(&["getblockcount"])).then_some(())
    });

    // Per-peer bytes equal to each node's own counters, to the byte.
    let ltc_conns = assert_matches_at_rest(&agent, "ltc", &|| ltc_view(&ltc));
    let xmr_conns = assert_matches_at_rest(&agent, "xmr", &|| xmr_view(&xmr));
    // monerod's counts are the kernel's: bytes_acked and bytes_received of its sockets
    // (an inbound connection is on its P2P port; an outbound one goes to its
    // peer's, and its bytes_acked counts the SYN it sent, one byte of
    // sequence space that carries no payload)
    let ss = ss_bytes();
    for (_, port, dir, sent, received) in &xmr_conns {
        let found = ss.iter().any(|&(local, peer, acked, got)| {
            let (ours, syn) = if *dir == "inbound" { (local == xmr_port, 0) } else { (xmr_peer_port == *port, 1) };
            ours && peer == *port && (acked - syn, got) == (*sent, *received)
        });
        assert!(found, "monerod {dir} peer port {port}: {sent}/{received} not as ss counts it: {ss:?}");
        eprintln!("xmr: peer port {port} {dir}: ss agrees with get_connections ({sent}/{received})");
    }

    // Nothing leaks: each section holds only its node's connections, which
    // are on its node's P2P port (inbound) or to its peer's (outbound).
    let ltc_ports: BTreeSet<u16> = [ltc.port, ltc_peer.port].into();
    let xmr_ports: BTreeSet<u16> = [xmr_port, xmr_peer_port].into();
    for p in peers_of_target(&agent, "ltc") {
        let port = p["port"].as_u64().unwrap() as u16;
        let local = p["local_port"].as_u64().unwrap() as u16;
        assert!(ltc_ports.contains(&port) || ltc_ports.contains(&local), "ltc lists a connection not its node's: {p}");
        assert!(!xmr_ports.contains(&port) && !xmr_ports.contains(&local), "ltc lists a monerod connection: {p}");
    }
    for p in peers_of_target(&agent, "xmr") {
        let port = p["port"].as_u64().unwrap() as u16;
        let local = p["local_port"].as_u64().unwrap() as u16;
        assert!(xmr_ports.contains(&port) || xmr_ports.contains(&local), "xmr lists a connection not its node's: {p}");
        assert!(!ltc_ports.contains(&port) && !ltc_ports.contains(&local), "xmr lists a litecoind connection: {p}");
    }

    // Own series: each target's peer bytes in /metrics are its own node's.
    // litecoind has had this one connection all along, so its series equal
    // it; monerod may have had a short duplicate connection to its peer
    // (both dial each other), so its series hold at least its open one.
    let m = agent.metrics();
    let io = |target: &str, dir: &str| {
        metric_sum(&m, "nodescope_peer_io_bytes_total", &[("nodescope_target", target), ("network_io_direction", dir)])
            as u64
    };
    let sum = |c: &[Conn], pick: fn(&Conn) -> u64| c.iter().map(pick).sum::<u64>();
    assert_eq!(io("ltc", "transmit"), sum(&ltc_conns, |c| c.3), "ltc bytes sent in /metrics");
    assert_eq!(io("ltc", "receive"), sum(&ltc_conns, |c| c.4), "ltc bytes received in /metrics");
    // the per-target total: the same bytes, one series per direction
    let total = |target: &str, dir: &str| {
        metric_sum(&m, "nodescope_p2p_io_bytes_total", &[("nodescope_target", target), ("network_io_direction", dir)])
            as u64
    };
    assert_eq!(total("ltc", "transmit"), sum(&ltc_conns, |c| c.3), "ltc nodescope_p2p_io_bytes_total sent");
    assert_eq!(total("ltc", "receive"), sum(&ltc_conns, |c| c.4), "ltc nodescope_p2p_io_bytes_total received");
    assert!(total("xmr", "transmit") >= sum(&xmr_conns, |c| c.3), "xmr nodescope_p2p_io_bytes_total sent");
    assert!(total("xmr", "receive") >= sum(&xmr_conns, |c| c.4), "xmr nodescope_p2p_io_bytes_total received");
    assert!(io("xmr", "transmit") >= sum(&xmr_conns, |c| c.3), "xmr bytes sent in /metrics");
    assert!(io("xmr", "receive") >= sum(&xmr_conns, |c| c.4), "xmr bytes received in /metrics");
    for target in ["ltc", "xmr"] {
        let opened =
            metric_sum(&m, "nodescope_connection_open", &[("nodescope_target", target), ("nodescope_service", "p2p")]);
        let expected = if target == "ltc" { ltc_conns.len() } else { xmr_conns.len() };
        assert_eq!(opened as usize, expected, "{target}: open P2P connections in /metrics");
        assert_eq!(
            metric_sum(&m, "nodescope_chain_height", &[("nodescope_target", target)]) as u64,
            if target == "ltc" { ltc.cli(&["getblockcount"]).parse().unwrap() } else { xmr.height() - 1 },
            "{target}: its own chain height"
        );
    }
    let targets: BTreeSet<&str> = m
        .lines()
        .filter(|l| l.starts_with("nodescope_peer_io_bytes_total{"))
        .filter_map(|l| l.split("nodescope_target=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(targets, ["ltc", "xmr"].into(), "peer series of exactly the two targets");
    assert_promtool_ok(&m, agent.dir.path());

    // Own verdicts: both have peers; the monerod peer stops, and only the
    // monerod target's no_peers fires and its verdict turns unhealthy.
    let d = agent.json("/health/detailed");
    let names: Vec<&str> = d["targets"].as_array().unwrap().iter().filter_map(|t| t["name"].as_str()).collect();
    assert_eq!(names.len(), 2, "{d}");
    for target in ["ltc", "xmr"] {
        assert_eq!(rule(&d, target, "no_peers")["state"], "ok", "{target}: {d}");
        let t = d["targets"].as_array().unwrap().iter().find(|t| t["name"] == target).unwrap();
        let expected = if target == "ltc" { ltc_conns.len() } else { xmr_conns.len() };
        assert_eq!(t["network"]["peers_connected"], expected, "{target}: {t}");
    }
    let (ltc_code, ltc_before) = agent.get("/health/targets/ltc");
    stop_child(&mut xmr_peer.child, Duration::from_secs(30));
    let d = wait_for("xmr no_peers firing", Duration::from_secs(30), || {
        let d = agent.json("/health/detailed");
        (rule(&d, "xmr", "no_peers")["state"] == "firing").then_some(d)
    });
    eprintln!("xmr no_peers: {}", rule(&d, "xmr", "no_peers"));
    assert_eq!(rule(&d, "ltc", "no_peers")["state"], "ok", "ltc's rule moved with xmr's peer: {d}");
    let (xmr_code, xmr_health) = agent.get("/health/targets/xmr");
    assert_eq!(xmr_code, 503, "{xmr_health}");
    let xmr_health: Value = serde_json::from_str(&xmr_health).unwrap();
    assert_eq!(xmr_health["status"], "unhealthy", "{xmr_health}");
    let (code, ltc_after) = agent.get("/health/targets/ltc");
    let status = |s: &str| serde_json::from_str::<Value>(s).unwrap()["status"].clone();
    assert_eq!((code, status(&ltc_after)), (ltc_code, status(&ltc_before)), "ltc's verdict moved with xmr's peer");
    eprintln!("verdicts: ltc {code} {}, xmr {xmr_code} {}", status(&ltc_after), xmr_health["status"]);
    assert!(peers_of_target(&agent, "xmr").is_empty());
    assert_eq!(agent_view(&agent, "ltc").len(), 1, "ltc keeps its peer");
    let m = agent.metrics();
    assert_eq!(
        metric_sum(&m, "nodescope_rule_state", &[("nodescope_target", "xmr"), ("nodescope_rule", "no_peers")]),
        2.0
    );
    assert_eq!(
        metric_sum(&m, "nodescope_rule_state", &[("nodescope_target", "ltc"), ("nodescope_rule", "no_peers")]),
        0.0
    );

    // stop order: agent and peers first, then the nodes, then their cgroups
    drop((agent, xmr_peer, ltc_peer, xmr, ltc));
    drop((ltc_cg, xmr_cg));
}

/// The same with the litecoind in a podman container (its own network
/// namespace, its peers arriving from the bridge's gateway), found by its
/// container's name, beside the monerod on the host in its cgroup.
#[test]
fn a_litecoind_in_a_container_and_a_monerod_on_the_host() {
    use common::container::{require_podman, ContainerNode, Storage, P2P_PORT};
    require_root();
    require_podman();
    let xmr_cg = Cgroup::new();
    let ltc = ContainerNode::start("multi", Storage::Overlay, &[]);
    let ltc_peer = Litecoind::start(None, &[format!("-connect={}", ltc.addr())]);
    let (xmr_port, xmr_peer_port) = (free_port(), free_port());
    let xmr = MonerodNode::start(Some(&xmr_cg), xmr_port, Some(xmr_peer_port));
    let xmr_peer = MonerodNode::start(None, xmr_peer_port, Some(xmr_port));
    ltc.wait_peers(1);
    wait_for("a monerod connection", Duration::from_secs(90), || (!xmr.connections().is_empty()).then_some(()));

    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"500ms\"\n\n[[targets]]\nname = \"ltc\"\ncontainer = \"{}\"\nchain = \"litecoin\"\n\n{}",
        ltc.c.name,
        target_config("xmr", "monero", &xmr_cg, xmr.dir.path(), xmr_port, xmr.rpc_port)
    ));
    ltc.mine(20);
    xmr.mine(10);
    wait_for("the monerod peer at the tip", Duration::from_secs(60), || {
        (xmr_peer.height() == xmr.height()).then_some(())
    });
    wait_for("the host litecoind at the container's tip", Duration::from_secs(60), || {
        (ltc_peer.cli(&["getblockcount"]) == ltc.cli(&["getblockcount"])).then_some(())
    });

    let ltc_conns = assert_matches_at_rest(&agent, "ltc", &|| getpeerinfo_view(&ltc.peers()));
    let xmr_conns = assert_matches_at_rest(&agent, "xmr", &|| xmr_view(&xmr));
    let xmr_ports: BTreeSet<u16> = [xmr_port, xmr_peer_port].into();
    for p in peers_of_target(&agent, "ltc") {
        assert_eq!(p["local_port"], P2P_PORT, "ltc lists a connection not on its node's P2P port: {p}");
        assert_eq!(p["address"], ltc.c.gateway(), "ltc's peers arrive from the bridge's gateway: {p}");
    }
    for p in peers_of_target(&agent, "xmr") {
        let port = p["port"].as_u64().unwrap() as u16;
        let local = p["local_port"].as_u64().unwrap() as u16;
        assert!(xmr_ports.contains(&port) || xmr_ports.contains(&local), "xmr lists a connection not its node's: {p}");
        assert_ne!(p["address"], ltc.c.gateway(), "xmr lists a connection of the container: {p}");
    }
    let m = agent.metrics();
    let io = |target: &str, dir: &str| {
        metric_sum(&m, "nodescope_peer_io_bytes_total", &[("nodescope_target", target), ("network_io_direction", dir)])
            as u64
    };
    assert_eq!(io("ltc", "transmit"), ltc_conns.iter().map(|c| c.3).sum::<u64>(), "ltc bytes sent in /metrics");
    assert_eq!(io("ltc", "receive"), ltc_conns.iter().map(|c| c.4).sum::<u64>(), "ltc bytes received in /metrics");
    assert!(io("xmr", "transmit") >= xmr_conns.iter().map(|c| c.3).sum::<u64>(), "xmr bytes sent in /metrics");
    let d = agent.json("/health/detailed");
    for (target, conns) in [("ltc", &ltc_conns), ("xmr", &xmr_conns)] {
        assert_eq!(rule(&d, target, "no_peers")["state"], "ok", "{target}: {d}");
        let t = d["targets"].as_array().unwrap().iter().find(|t| t["name"] == target).unwrap();
        assert_eq!(t["network"]["peers_connected"], conns.len(), "{target}: {t}");
        let (code, body) = agent.get(&format!("/health/targets/{target}"));
        assert!(code == 200 || code == 503, "{target}: {code} {body}");
    }
    drop((agent, xmr_peer, ltc_peer, xmr, ltc));
    drop(xmr_cg);
}

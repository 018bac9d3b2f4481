//! Nodes in containers: a litecoind in a real podman container (its own
//! network, mount and cgroup namespaces, its data dir only in its own mount
//! namespace) watched by nodescope from the host. Per-peer bytes against the
//! containerized node's own getpeerinfo, to the byte; data dir size and
//! filesystem figures against du and df run inside the container; a second
//! container on the same port kept out; and SIGKILL plus `podman start` five
//! times, each followed by the same exact checks.
//!
//! Host peers are plain litecoind processes on the host that dial the
//! container over the podman bridge, so the container sees them come from the
//! bridge's gateway address. All traffic stays on the bridge to containers
//! the test made.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::container::*;
use common::*;
use serde_json::Value;

const INTERVAL: &str = "1s";
/// Longer than one agent interval and its collection: a reading of the agent
/// taken this long after a reading of the node reflects a snapshot taken after it.
const SETTLE: Duration = Duration::from_millis(2300);

/// How a config names the container's node: `container = "<name>"` when this
/// agent accepts that selector (asked with `nodescope check-config`), else
/// the container's cgroup2 directory.
fn selector(c: &Container) -> String {
    let dir = TempDir::new("selector");
    let file = dir.path().join("probe.toml");
    std::fs::write(&file, format!("[[targets]]\nname = \"probe\"\ncontainer = \"{}\"\nchain = \"litecoin\"\n", c.name))
        .unwrap();
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_nodescope"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap()
        .status
        .success();
    if ok {
        eprintln!("selector: container = {:?}", c.name);
        format!("container = \"{}\"", c.name)
    } else {
        let cg = c.cgroup2_dir();
        eprintln!("selector: no `container` key in this agent's config; cgroup = {}", cg.display());
        format!("cgroup = \"{}\"", cg.display())
    }
}

fn supports_container_selector() -> bool {
    let dir = TempDir::new("selector");
    let file = dir.path().join("probe.toml");
    std::fs::write(&file, "[[targets]]\nname = \"probe\"\ncontainer = \"probe\"\nchain = \"litecoin\"\n").unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_nodescope"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap()
        .status
        .success()
}

fn targets(agent: &Agent) -> Vec<Value> {
    agent.json("/peers")["targets"].as_array().cloned().unwrap_or_default()
}

fn peers_of(agent: &Agent, name: &str) -> Option<Vec<Value>> {
    targets(agent).into_iter().find(|t| t["name"] == name).map(|t| t["peers"].as_array().cloned().unwrap_or_default())
}

fn split_addr(addr: &str) -> (&str, u64) {
    let (ip, port) = addr.rsplit_once(':').unwrap_or_else(|| panic!("no port in {addr:?}"));
    (ip, port.parse().unwrap())
}

/// The agent's target for the container's node, among discovered ones: the
/// one named after the container, else the one listing the node's inbound
/// peers as the node sees them (gateway address, the peer's port, local port
/// 19444). The host peers' own targets list the other ends (outbound, to 19444).
fn container_target(agent: &Agent, node: &ContainerNode) -> Option<String> {
    let ts = targets(agent);
    if let Some(t) = ts.iter().find(|t| t["name"].as_str().is_some_and(|n| n.contains(&node.c.name))) {
        return t["name"].as_str().map(String::from);
    }
    let theirs = node.peers();
    let ports: Vec<u64> =
        theirs.iter().filter(|p| p["inbound"] == true).map(|p| split_addr(p["addr"].as_str().unwrap()).1).collect();
    let gw = node.c.gateway();
    ts.iter()
        .find(|t| {
            t["peers"].as_array().is_some_and(|ps| {
                ps.iter().any(|p| {
                    p["address"] == gw.as_str()
                        && p["local_port"] == P2P_PORT
                        && p["direction"] == "inbound"
                        && p["port"].as_u64().is_some_and(|x| ports.contains(&x))
                })
            })
        })
        .and_then(|t| t["name"].as_str().map(String::from))
}

fn wait_container_target(agent: &Agent, node: &ContainerNode) -> String {
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        if let Some(name) = container_target(agent, node) {
            return name;
        }
        if Instant::now() > deadline {
            panic!(
                "no target of the agent lists the container node's peers within 45s\n\
                 container {} (pid {}, ip {}) getpeerinfo: {}\nagent /peers: {}",
                node.c.name,
                node.pid(),
                node.ip(),
                serde_json::to_string(&node.peers()).unwrap(),
                serde_json::to_string(&agent.json("/peers")).unwrap(),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Everything of the node's peers that must hold still between two readings.
fn signature(peers: &[Value]) -> String {
    peers
        .iter()
        .map(|p| format!("{} {} {} {} {};", p["id"], p["addr"], p["inbound"], p["bytessent"], p["bytesrecv"]))
        .collect()
}

/// Empty when the agent lists exactly the node's peers with exactly its bytes.
fn compare_exact(theirs: &[Value], ours: &[Value]) -> String {
    let mut problems = String::new();
    if theirs.len() != ours.len() {
        problems += &format!("the node has {} peers, the agent lists {}\n", theirs.len(), ours.len());
    }
    for p in theirs {
        let addr = p["addr"].as_str().unwrap();
        let (ip, port) = split_addr(addr);
        let Some(o) = ours.iter().find(|o| o["address"] == ip && o["port"] == port) else {
            problems += &format!(
                "peer {addr} (node: sent {}, received {}) missing from /peers\n",
                p["bytessent"], p["bytesrecv"]
            );
            continue;
        };
        let dir = if p["inbound"] == true { "inbound" } else { "outbound" };
        if o["direction"] != dir {
            problems += &format!("peer {addr}: direction {} but the node says {dir}\n", o["direction"]);
        }
        for (ours_key, theirs_key) in [("bytes_sent", "bytessent"), ("bytes_received", "bytesrecv")] {
            if o[ours_key].as_u64() != p[theirs_key].as_u64() {
                problems +=
                    &format!("peer {addr}: agent {ours_key} {} vs node {theirs_key} {}\n", o[ours_key], p[theirs_key]);
            }
        }
    }
    for o in ours {
        if !theirs.iter().any(|p| {
            split_addr(p["addr"].as_str().unwrap())
                == (o["address"].as_str().unwrap_or(""), o["port"].as_u64().unwrap_or(0))
        }) {
            problems += &format!("agent lists {}:{} which is not a peer of the node: {o}\n", o["address"], o["port"]);
        }
    }
    problems
}

/// Per-address byte counters of `target` on /metrics against the node's
/// peers from `gw` (every host peer comes from the bridge gateway): empty
/// when equal to the byte.
fn compare_metric(m: &str, target: &str, gw: &str, theirs: &[Value]) -> String {
    let from_gw = theirs.iter().filter(|p| split_addr(p["addr"].as_str().unwrap()).0 == gw);
    let (sent, recv) = from_gw
        .fold((0u64, 0u64), |(s, r), p| (s + p["bytessent"].as_u64().unwrap(), r + p["bytesrecv"].as_u64().unwrap()));
    let series = |dir: &str| {
        metric_sum(
            m,
            "nodescope_peer_io_bytes_total",
            &[("nodescope_target", target), ("network_peer_address", gw), ("network_io_direction", dir)],
        )
    };
    let (tx, rx) = (series("transmit"), series("receive"));
    let listed = m.lines().any(|l| {
        l.starts_with("nodescope_peer_io_bytes_total{")
            && l.contains(&format!("nodescope_target=\"{target}\""))
            && l.contains(&format!("network_peer_address=\"{gw}\""))
    });
    let mut problems = String::new();
    if !listed {
        problems += &format!("no nodescope_peer_io_bytes_total series for nodescope_target={target:?}, network_peer_address={gw:?} on /metrics\n");
    } else if tx != sent as f64 || rx != recv as f64 {
        let lines: Vec<&str> = m.lines().filter(|l| l.starts_with("nodescope_peer_io_bytes_total")).collect();
        problems += &format!(
            "nodescope_peer_io_bytes_total{{nodescope_target={target:?}, network_peer_address={gw:?}}}: transmit {tx} receive {rx}, \
             but the node's peers from {gw} have bytessent {sent} bytesrecv {recv}\n{}\n",
            lines.join("\n")
        );
    }
    problems
}

/// The state of one rule of one target on /health/detailed (None when absent).
fn rule_state(agent: &Agent, target: &str, rule: &str) -> Option<String> {
    let v = agent.json("/health/detailed");
    v["rules"]
        .as_array()?
        .iter()
        .find(|r| r["target"] == target && r["id"] == rule)
        .and_then(|r| r["state"].as_str().map(String::from))
}

/// no_peers is evaluated for the target and neither pending nor firing.
fn assert_no_peers_quiet(agent: &Agent, target: &str, node: &ContainerNode) {
    let state = rule_state(agent, target, "no_peers");
    assert!(
        matches!(state.as_deref(), Some("ok")),
        "no_peers on {target} is {state:?} while the container node has {} peers\n/health/detailed: {}",
        node.peers().len(),
        agent.json("/health/detailed")
    );
}

/// Waits until the node's counters hold still across a reading of the
/// agent, then requires /peers (and, with `metric`, nodescope_peer_io_bytes_total
/// for the gateway) to equal them to the byte.
fn assert_exact(node: &ContainerNode, agent: &Agent, target: &str, metric: bool) -> Vec<Value> {
    let gw = node.c.gateway();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last;
    loop {
        let before = node.peers();
        std::thread::sleep(SETTLE);
        let ours = peers_of(agent, target);
        let m = agent.metrics();
        let after = node.peers();
        if signature(&before) != signature(&after) {
            last = format!(
                "the node's counters kept moving:\nbefore {}\nafter  {}",
                signature(&before),
                signature(&after)
            );
        } else {
            let mut problems = match &ours {
                Some(ours) => compare_exact(&after, ours),
                None => format!("no target {target:?} on /peers: {}\n", agent.json("/peers")),
            };
            if metric {
                problems += &compare_metric(&m, target, &gw, &after);
            }
            if problems.is_empty() {
                for p in &after {
                    eprintln!(
                        "{target}: peer {} sent {} received {} (agent and node agree)",
                        p["addr"], p["bytessent"], p["bytesrecv"]
                    );
                }
                return after;
            }
            last = format!(
                "{problems}\nnode getpeerinfo (container {}, ip {}): {}\nagent /peers for {target}: {}",
                node.c.name,
                node.ip(),
                serde_json::to_string(
                    &after
                        .iter()
                        .map(|p| (
                            p["addr"].clone(),
                            p["inbound"].clone(),
                            p["bytessent"].clone(),
                            p["bytesrecv"].clone()
                        ))
                        .collect::<Vec<_>>()
                )
                .unwrap(),
                serde_json::to_string(&ours).unwrap()
            );
        }
        if Instant::now() > deadline {
            panic!(
                "the agent's figures for {target} do not match the container node's getpeerinfo within 60s:\n{last}"
            );
        }
    }
}

/// A host litecoind that dials the container node.
fn host_peer_of(node: &ContainerNode) -> Litecoind {
    Litecoind::start(None, &[format!("-connect={}", node.addr())])
}

#[test]
fn container_node_peers_match_getpeerinfo() {
    require_root();
    require_podman();
    let started = Instant::now();
    let node = ContainerNode::start("peers", Storage::Overlay, &[]);
    // A connection from before the agent started.
    let peer_a = host_peer_of(&node);
    node.wait_peers(1);

    // No [[targets]]: discovery must find the node inside the container.
    let agent = Agent::start(&format!("[agent]\ninterval = \"{INTERVAL}\"\n"));
    let target = wait_container_target(&agent, &node);
    eprintln!("container {} is target {target:?}", node.c.name);
    assert_exact(&node, &agent, &target, true);
    assert_no_peers_quiet(&agent, &target, &node);

    // A connection made while the agent runs, then blocks and transactions.
    let peer_b = host_peer_of(&node);
    node.wait_peers(2);
    assert_no_peers_quiet(&agent, &target, &node);
    node.mine(110); // past coinbase maturity, so it can spend
    for _ in 0..3 {
        let to = peer_b.address();
        node.cli(&["sendtoaddress", &to, "1.5"]);
        node.mine(1);
        assert_no_peers_quiet(&agent, &target, &node);
    }
    let height: u64 = node.cli(&["getblockcount"]).parse().unwrap();
    wait_for("host peers at the container's tip", Duration::from_secs(60), || {
        (peer_a.cli(&["getblockcount"]).parse::<u64>().ok() == Some(height)
            && peer_b.cli(&["getblockcount"]).parse::<u64>().ok() == Some(height))
        .then_some(())
    });
    let peers = assert_exact(&node, &agent, &target, true);
    assert_eq!(peers.len(), 2, "{peers:?}");
    let m = agent.metrics();
    assert!(
        metric_sum(
            &m,
            "nodescope_peer_io_bytes_total",
            &[("nodescope_target", &target), ("nodescope_connection_direction", "inbound")]
        ) > 0.0,
        "no inbound nodescope_peer_io_bytes_total for {target}"
    );
    assert_no_peers_quiet(&agent, &target, &node);
    assert_promtool_ok(&m, agent.dir.path());
    eprintln!("container_node_peers_match_getpeerinfo: {:?}", started.elapsed());
    drop((agent, peer_a, peer_b));
}

/// (size, used, available) from `df -B1` inside the container.
fn df(c: &Container, path: &str) -> (u64, u64, u64) {
    let out = c.exec_ok(&["df", "-B1", path]);
    let line = out.lines().nth(1).unwrap_or_else(|| panic!("df output: {out}"));
    let f: Vec<u64> = line.split_whitespace().skip(1).take(3).map(|x| x.parse().unwrap()).collect();
    (f[0], f[1], f[2])
}

fn du(c: &Container, path: &str) -> u64 {
    let out = c.exec_ok(&["du", "-sb", path]);
    out.split_whitespace().next().and_then(|x| x.parse().ok()).unwrap_or_else(|| panic!("du output: {out}"))
}

fn gauge(m: &str, name: &str, target: &str) -> Option<f64> {
    let prefix = format!("{name}{{");
    let label = format!("nodescope_target=\"{target}\"");
    m.lines().filter(|l| l.starts_with(&prefix) && l.contains(&label)).find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

#[test]
fn container_datadir_and_filesystem() {
    require_root();
    require_podman();
    let started = Instant::now();
    // A tmpfs only the container's mount namespace has: nothing else on the
    // host writes to it, so df holds still while the node is quiet.
    let node = ContainerNode::start("disk", Storage::Tmpfs(256), &[]);
    node.mine(120);
    let to = node.address();
    node.cli(&["sendtoaddress", &to, "2"]);
    node.mine(1);
    let sel = selector(&node.c);
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"{INTERVAL}\"\n[resources]\nforecast_window = \"20s\"\n\n[[targets]]\nname = \"ltc-c\"\n{sel}\nchain = \"litecoin\"\n"
    ));
    let dir = "/data/regtest";
    // The agent can only reach it through the node's /proc/PID/root.
    assert!(
        !std::path::Path::new(dir).exists(),
        "{dir} exists on the host: this test needs it to exist only in the container"
    );

    // Size: du inside the container, read on both sides of the agent's reading.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last;
    loop {
        let du1 = du(&node.c, dir);
        std::thread::sleep(SETTLE);
        let m = agent.metrics();
        let du2 = du(&node.c, dir);
        let ours = gauge(&m, "nodescope_datadir_size_bytes", "ltc-c");
        if du1 == du2 && ours == Some(du2 as f64) {
            eprintln!("data dir {dir}: {du2} bytes (agent and du agree)");
            break;
        }
        last = format!(
            "nodescope_datadir_size_bytes{{ltc-c}} = {ours:?}, du -sb {dir} in the container: {du1} then {du2}"
        );
        if Instant::now() > deadline {
            let ours: Vec<&str> = m
                .lines()
                .filter(|l| l.contains("\"ltc-c\"") && (l.contains("datadir") || l.contains("filesystem")))
                .collect();
            panic!(
                "data dir size does not match du within 90s: {last}\nthe agent's data dir and filesystem series:\n{}",
                ours.join("\n")
            );
        }
    }

    // Filesystem: df inside the container (the tmpfs), on both sides.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d1 = df(&node.c, dir);
        std::thread::sleep(SETTLE);
        let m = agent.metrics();
        let d2 = df(&node.c, dir);
        let (size, used, avail) = d2;
        let ours = (
            gauge(&m, "nodescope_filesystem_size_bytes", "ltc-c"),
            gauge(&m, "nodescope_filesystem_free_bytes", "ltc-c"),
            gauge(&m, "nodescope_filesystem_available_bytes", "ltc-c"),
        );
        let want = (Some(size as f64), Some((size - used) as f64), Some(avail as f64));
        if d1 == d2 && ours == want {
            eprintln!("filesystem of {dir}: size {size}, free {}, available {avail} (agent and df agree)", size - used);
            break;
        }
        last = format!(
            "agent (size, free, available) = {ours:?}; df -B1 {dir} in the container: (size, used, avail) {d1:?} then {d2:?}, i.e. free {}",
            size - used
        );
        if Instant::now() > deadline {
            panic!("filesystem figures do not match df within 30s: {last}");
        }
    }

    // Disk rules are evaluated on it (tmpfs of 256 MiB, ~90% available).
    let states = wait_for("disk rules evaluated for ltc-c", Duration::from_secs(60), || {
        let s: BTreeMap<&str, Option<String>> = ["disk_low", "disk_critical", "disk_full_soon"]
            .into_iter()
            .map(|r| (r, rule_state(&agent, "ltc-c", r)))
            .collect();
        s.values().all(|v| v.as_deref().is_some_and(|v| v != "unknown")).then_some(s)
    });
    eprintln!("disk rules on ltc-c: {states:?}");
    assert_eq!(states["disk_low"].as_deref(), Some("ok"), "{states:?}");
    assert_eq!(states["disk_critical"].as_deref(), Some("ok"), "{states:?}");
    eprintln!("container_datadir_and_filesystem: {:?}", started.elapsed());
    drop(agent);
}

#[test]
fn unwatched_container_on_same_port_not_counted() {
    require_root();
    require_podman();
    let started = Instant::now();
    let a = ContainerNode::start("iso-a", Storage::Overlay, &[]);
    let b = ContainerNode::start("iso-b", Storage::Overlay, &[]);
    let sel = selector(&a.c);
    // p2p_ports names the port B listens on too, in its own namespace.
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"{INTERVAL}\"\n\n[[targets]]\nname = \"ltc-a\"\n{sel}\nchain = \"litecoin\"\np2p_ports = [{P2P_PORT}]\nrpc_ports = [{RPC_PORT}]\n"
    ));
    // Connections made while the agent runs (the adoption of older ones is
    // container_node_peers_match_getpeerinfo's business).
    let peer_a = host_peer_of(&a);
    let peer_b = host_peer_of(&b);
    a.wait_peers(1);
    b.wait_peers(1);
    a.mine(5);
    let gw = a.c.gateway();
    assert_exact(&a, &agent, "ltc-a", true);

    // B relays blocks to its host peer; A is quiet. Every reading of the
    // agent for A stays within A's own counters, read after it.
    let b_ports = |b: &ContainerNode| -> Vec<u64> {
        b.peers().iter().map(|p| split_addr(p["addr"].as_str().unwrap()).1).collect()
    };
    for round in 0..4 {
        b.mine(30);
        std::thread::sleep(SETTLE);
        let ours = peers_of(&agent, "ltc-a").unwrap_or_default();
        let m = agent.metrics();
        let theirs = a.peers();
        let bp = b_ports(&b);
        let leaked: Vec<&Value> = ours.iter().filter(|o| o["port"].as_u64().is_some_and(|p| bp.contains(&p))).collect();
        assert!(leaked.is_empty(), "round {round}: B's peers (ports {bp:?}) listed under ltc-a: {leaked:?}");
        let (sent, recv) = theirs.iter().fold((0u64, 0u64), |(s, r), p| {
            (s + p["bytessent"].as_u64().unwrap(), r + p["bytesrecv"].as_u64().unwrap())
        });
        for (dir, node_total) in [("transmit", sent), ("receive", recv)] {
            let v = metric_sum(
                &m,
                "nodescope_peer_io_bytes_total",
                &[("nodescope_target", "ltc-a"), ("network_peer_address", &gw), ("network_io_direction", dir)],
            );
            assert!(
                v <= node_total as f64,
                "round {round}: ltc-a {dir} {v} exceeds A's own getpeerinfo total {node_total}: B's traffic counted\nA: {theirs:?}\nB: {:?}",
                b.peers()
            );
        }
        for o in &ours {
            for key in ["bytes_sent", "bytes_received"] {
                let theirs_key = if key == "bytes_sent" { "bytessent" } else { "bytesrecv" };
                let p = theirs.iter().find(|p| {
                    split_addr(p["addr"].as_str().unwrap())
                        == (o["address"].as_str().unwrap_or(""), o["port"].as_u64().unwrap_or(0))
                });
                if let Some(p) = p {
                    assert!(
                        o[key].as_u64() <= p[theirs_key].as_u64(),
                        "round {round}: ltc-a peer {o} {key} beyond the node's {}",
                        p[theirs_key]
                    );
                }
            }
        }
    }
    let b_bytes: u64 =
        b.peers().iter().map(|p| p["bytessent"].as_u64().unwrap() + p["bytesrecv"].as_u64().unwrap()).sum();
    assert!(b_bytes > 20_000, "B moved only {b_bytes} bytes: the test proves nothing");
    // A's own peer is still exact, and only it is listed.
    let peers = assert_exact(&a, &agent, "ltc-a", true);
    assert_eq!(peers.len(), 1);
    eprintln!("unwatched_container_on_same_port_not_counted: B moved {b_bytes} bytes, {:?}", started.elapsed());
    drop((agent, peer_a, peer_b));
}

/// node_down with no delay either way, so its state says at once whether
/// the agent sees the node running.
const NODE_DOWN_NOW: &str = "[rules.node_down]\nfor = \"0s\"\nclear_after = \"0s\"\n";

/// node_down's state for `target` in /health/detailed.
fn node_down_state(agent: &Agent, target: &str) -> Option<String> {
    let v = agent.json("/health/detailed");
    v["rules"]
        .as_array()?
        .iter()
        .find(|r| r["target"] == target && r["id"] == "node_down")
        .and_then(|r| r["state"].as_str().map(str::to_string))
}

/// The p2p inbound churn counters, the outbound ones and the restart counter of `target`.
fn counters(m: &str, target: &str) -> (f64, f64, f64, f64, f64) {
    // + 0.0: a sum of no samples is -0.0, which reads oddly in a failure message
    let churn = |name: &str, dir: &str| {
        metric_sum(
            m,
            name,
            &[("nodescope_target", target), ("nodescope_connection_direction", dir), ("nodescope_service", "p2p")],
        ) + 0.0
    };
    (
        churn("nodescope_connection_opened_total", "inbound"),
        churn("nodescope_connection_closed_total", "inbound"),
        churn("nodescope_connection_opened_total", "outbound") + churn("nodescope_connection_closed_total", "outbound"),
        metric_sum(m, "nodescope_process_restarts_total", &[("nodescope_target", target)]) + 0.0,
        metric_sum(m, "nodescope_connection_open", &[("nodescope_target", target), ("nodescope_service", "p2p")]) + 0.0,
    )
}

/// Two scrapes in a row agree on the target's counters.
fn settled_counters(agent: &Agent, target: &str) -> (f64, f64, f64, f64, f64) {
    let mut last = counters(&agent.metrics(), target);
    wait_for(&format!("{target}'s counters to settle"), Duration::from_secs(30), || {
        std::thread::sleep(Duration::from_millis(1500));
        let now = counters(&agent.metrics(), target);
        let same = now == last;
        last = now;
        same.then_some(now)
    })
}

#[test]
fn container_restart_reattaches() {
    require_root();
    require_podman();
    let started = Instant::now();
    let node = ContainerNode::start("restart", Storage::Overlay, &[]);
    let mut ip = node.ip();
    let (config, fixed_name) = if supports_container_selector() {
        eprintln!("selector: container = {:?}", node.c.name);
        (format!("[agent]\ninterval = \"{INTERVAL}\"\n\n{NODE_DOWN_NOW}\n[[targets]]\nname = \"ltc-c\"\ncontainer = \"{}\"\nchain = \"litecoin\"\n", node.c.name), true)
    } else {
        eprintln!("selector: no `container` key in this agent's config; discovery");
        (format!("[agent]\ninterval = \"{INTERVAL}\"\n\n{NODE_DOWN_NOW}\n"), false)
    };
    let agent = Agent::start(&config);
    // The host peer keeps the container as an added node, so it reconnects by itself.
    let peer = Litecoind::start(None, &[format!("-addnode={ip}:{P2P_PORT}")]);
    node.wait_peers(1);
    node.mine(5);
    let find = |agent: &Agent| if fixed_name { "ltc-c".to_string() } else { wait_container_target(agent, &node) };
    let mut target = find(&agent);
    assert_exact(&node, &agent, &target, false);
    let first = settled_counters(&agent, &target);

    const RESTARTS: usize = 5;
    for cycle in 1..=RESTARTS {
        let cycle_start = Instant::now();
        let before = settled_counters(&agent, &target);
        let open_at_kill = node.peers().len();
        assert_eq!(node_down_state(&agent, &target).as_deref(), Some("ok"), "cycle {cycle}: node_down before the kill");
        // down: node_down fires (its `for` is 0s) while the container is stopped
        node.c.kill9();
        let down = wait_for("node_down to see the node gone", Duration::from_secs(20), || {
            node_down_state(&agent, &target).filter(|s| s != "ok")
        });
        assert_eq!(down, "firing", "cycle {cycle}: node_down while the node is down");
        node.c.start();
        node.wait_rpc();
        let new_ip = node.ip();
        if new_ip != ip {
            // a new network namespace, maybe a new address: move the added node
            peer.cli(&["addnode", &format!("{ip}:{P2P_PORT}"), "remove"]);
            peer.cli(&["addnode", &format!("{new_ip}:{P2P_PORT}"), "add"]);
            ip = new_ip;
        }
        // The added-node thread retries once a minute; ask for it now.
        peer.cli(&["addnode", &format!("{ip}:{P2P_PORT}"), "onetry"]);
        node.wait_peers(1);
        node.mine(2);
        if !fixed_name {
            target = find(&agent);
        }
        let peers = assert_exact(&node, &agent, &target, false);
        // Connections this node instance accepted: its peer ids count from 0.
        let made = peers.iter().filter_map(|p| p["id"].as_u64()).max().map_or(0, |m| m + 1) as f64;
        let closed_since = made - peers.len() as f64;
        let after = settled_counters(&agent, &target);
        let report = format!(
            "cycle {cycle} on {target}: (inbound opened, inbound closed, outbound opened+closed, restarts, open) before {before:?}, after {after:?}; \
             {open_at_kill} peers at the kill, {made} connections made since, {} open\n{}",
            peers.len(),
            agent.metrics().lines().filter(|l| l.contains(&format!("\"{target}\"")) && (l.starts_with("nodescope_connection_") || l.starts_with("nodescope_process_restarts"))).collect::<Vec<_>>().join("\n")
        );
        assert_eq!(after.0 - before.0, made, "inbound P2P opened: {report}");
        assert_eq!(after.1 - before.1, open_at_kill as f64 + closed_since, "inbound P2P closed: {report}");
        assert_eq!(after.2 - before.2, 0.0, "outbound P2P churn: {report}");
        assert_eq!(after.3 - before.3, 1.0, "restarts: {report}");
        assert_eq!(after.4, peers.len() as f64, "open P2P connections: {report}");
        assert_eq!(
            node_down_state(&agent, &target).as_deref(),
            Some("ok"),
            "cycle {cycle}: node_down once the node is back"
        );
        eprintln!("cycle {cycle}: pid {}, ip {ip}, {:?}", node.pid(), cycle_start.elapsed());
    }
    let last = settled_counters(&agent, &target);
    assert_eq!(
        last.3 - first.3,
        RESTARTS as f64,
        "nodescope_process_restarts_total over {RESTARTS} restarts: {first:?} -> {last:?}"
    );
    eprintln!("container_restart_reattaches: {:?}", started.elapsed());
    drop((agent, peer));
}

//! Health rules and the /health endpoints against a real litecoind regtest
//! network on loopback. Rule durations are shortened through config (never
//! code). What the agent decides is checked against what the test did and
//! what outside sources say: getpeerinfo, the process table, df, file
//! mtimes, getblockcount, and the number of RPC calls the test made.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use serde_json::{json, Value};

const ALL_RULES: &[&str] = &[
    "node_down",
    "no_peers",
    "disk_critical",
    "partition_suspected",
    "low_peers",
    "no_outbound",
    "low_netgroup_diversity",
    "chain_stalled",
    "disk_low",
    "disk_full_soon",
    "memory_high",
    "fds_high",
    "fsync_slow",
    "rpc_exposed",
    "inbound_flood",
    "connect_failures_high",
    "peer_churn_high",
];

/// One target "ltc" for `node` in `cgroup`; `target_rules` are TOML tables
/// such as `[targets.rules.no_peers]` that belong to it.
fn agent_config(node: &Litecoind, cgroup: &Cgroup, target_rules: &str) -> String {
    format!(
        "[agent]\ninterval = \"500ms\"\n\n[[targets]]\nname = \"ltc\"\ncgroup = \"{}\"\nchain = \"litecoin\"\ndatadir = \"{}\"\np2p_ports = [{}]\nrpc_ports = [{}]\n\n{target_rules}",
        cgroup.path.display(),
        node.dir.path().display(),
        node.port,
        node.rpcport
    )
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> = v.as_object().unwrap_or_else(|| panic!("not an object: {v}")).keys().cloned().collect();
    k.sort();
    k
}

fn sorted(k: &[&str]) -> Vec<String> {
    let mut k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
    k.sort();
    k
}

/// /health/detailed's status code and body.
fn detailed(agent: &Agent) -> (u16, Value) {
    let (code, body) = agent.get("/health/detailed");
    (code, serde_json::from_str(&body).unwrap_or_else(|e| panic!("/health/detailed: {e}: {body}")))
}

fn rule_in(detailed: &Value, id: &str) -> Value {
    detailed["targets"][0]["rules"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["id"] == id))
        .cloned()
        .unwrap_or_else(|| panic!("rule {id} missing from {detailed}"))
}

fn rule(agent: &Agent, id: &str) -> Value {
    rule_in(&detailed(agent).1, id)
}

fn wait_rule(agent: &Agent, id: &str, state: &str, timeout: Duration) -> Value {
    wait_for(&format!("{id} {state}"), timeout, || {
        // before the agent's first evaluation the target is not listed yet
        let d = detailed(agent).1;
        let r = d["targets"][0]["rules"].as_array()?.iter().find(|r| r["id"] == id)?.clone();
        (r["state"] == state).then_some(r)
    })
}

/// Polls /health/detailed every 200ms for `d`; panics if `bad` says so.
fn watch(agent: &Agent, d: Duration, mut bad: impl FnMut(u16, &Value) -> Option<String>) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        let (code, v) = detailed(agent);
        if let Some(why) = bad(code, &v) {
            panic!("{why}\n{v}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn log_count(agent: &Agent, needle: &str) -> usize {
    agent.log().matches(needle).count()
}

fn labels<'a>(rule: &'a str, severity: &'a str) -> [(&'a str, &'a str); 3] {
    [("nodescope_target", "ltc"), ("nodescope_rule", rule), ("nodescope_rule_severity", severity)]
}

/// Field names and types of every endpoint, against the reference, with
/// figures checked against the node: peers (getpeerinfo), RPC requests
/// (calls the test makes), data dir size (du).
fn assert_shapes(agent: &Agent, node: &Litecoind, disabled: &[&str]) {
    let (code, body) = agent.get("/health");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(keys(&v), sorted(&["status", "timestamp"]));
    assert!(["healthy", "degraded"].contains(&v["status"].as_str().unwrap()), "{v}");
    let ts = v["timestamp"].as_u64().unwrap_or_else(|| panic!("timestamp is not an integer: {v}"));
    assert!((ts as f64 - unix_now()).abs() < 5.0, "timestamp {ts}");

    assert_eq!(agent.get("/health/live"), (200, json!({"status": "alive"}).to_string()));
    let (code, body) = agent.get("/health/agent");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        keys(&v),
        sorted(&[
            "status",
            "collections",
            "last_collection_seconds_ago",
            "interval_seconds",
            "network_probes_attached"
        ])
    );
    assert_eq!(
        (&v["status"], &v["interval_seconds"], &v["network_probes_attached"]),
        (&json!("ready"), &json!(0.5), &json!(true))
    );

    let ready = wait_for("/health/ready 200", Duration::from_secs(20), || {
        let (code, body) = agent.get("/health/ready");
        (code == 200).then(|| serde_json::from_str::<Value>(&body).unwrap())
    });
    assert_eq!(ready, json!({"status": "ready", "chain_initialized": true, "storage_available": true}));
    let regtest = node.dir.path().join("regtest");
    assert!(regtest.join("chainstate").is_dir() && regtest.join("blocks").is_dir());
    let (code, body) = agent.get("/health/targets/ltc/ready");
    assert_eq!((code, serde_json::from_str::<Value>(&body).unwrap()), (200, ready));

    // RPC requests: exactly the connections the test opens (litecoin-cli
    // opens one per call), counted while nothing else calls the node.
    let before = detailed(agent).1["rpc"]["requests_processed"].as_u64().unwrap();
    for _ in 0..5 {
        node.cli(&["getblockcount"]);
    }
    wait_for("5 more RPC requests", Duration::from_secs(10), || {
        (detailed(agent).1["rpc"]["requests_processed"].as_u64().unwrap() == before + 5).then_some(())
    });

    let peers = node.peers().len() as u64;
    let (code, d) = wait_for("peers_connected to match getpeerinfo", Duration::from_secs(10), || {
        let (code, d) = detailed(agent);
        (d["network"]["peers_connected"].as_u64() == Some(peers)).then_some((code, d))
    });
    assert_eq!(code, 200);
    assert_eq!(keys(&d), sorted(&["status", "chain", "storage", "network", "rpc", "rules", "targets"]));
    assert!(d["status"].is_string());
    // the chain as the node's own log tells it; the tip hash is never read
    let chain = &d["chain"];
    let chain_keys = [
        "initialized",
        "height",
        "tip_hash",
        "tip_age_seconds",
        "sync_progress",
        "initial_block_download",
        "source",
        "log_file",
        "detail",
    ];
    assert_eq!(keys(chain), sorted(&chain_keys), "{chain}");
    assert_eq!(
        (&chain["initialized"], &chain["tip_hash"], &chain["source"]),
        (&json!(true), &Value::Null, &json!("log"))
    );
    assert_eq!(chain["height"].as_u64(), Some(node.cli(&["getblockcount"]).parse().unwrap()), "{chain}");
    assert_eq!(keys(&d["storage"]), sorted(&["available", "size_bytes"]));
    assert_eq!(d["storage"]["available"], true);
    let size = d["storage"]["size_bytes"].as_u64().unwrap_or_else(|| panic!("size_bytes: {d}"));
    let du = Command::new("du").args(["-sb"]).arg(&regtest).output().unwrap();
    let du: f64 = String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap().parse().unwrap();
    assert!((size as f64) > du * 0.5 && (size as f64) < du * 2.0, "size_bytes {size} vs du -sb {du}");
    assert_eq!(keys(&d["network"]), sorted(&["peers_connected", "peers_max"]));
    assert!(d["network"]["peers_max"].is_null());
    assert_eq!(keys(&d["rpc"]), sorted(&["enabled", "requests_processed"]));
    assert_eq!(d["rpc"]["enabled"], true);

    let want: Vec<&str> = ALL_RULES.iter().copied().filter(|r| !disabled.contains(r)).collect();
    let rules = d["rules"].as_array().unwrap();
    assert_eq!(rules.iter().map(|r| r["id"].as_str().unwrap()).collect::<Vec<_>>(), want);
    for r in rules {
        assert_eq!(keys(r), sorted(&["target", "id", "severity", "state", "since", "evidence"]), "{r}");
        assert_eq!(r["target"], "ltc");
        assert!(["critical", "warning"].contains(&r["severity"].as_str().unwrap()), "{r}");
        assert!(["ok", "pending", "firing", "unknown"].contains(&r["state"].as_str().unwrap()), "{r}");
        assert!(r["since"].is_u64() && r["evidence"].is_object(), "{r}");
        assert_ne!(r["state"], "firing", "nothing should fire on a healthy node: {r}");
    }
    let t = &d["targets"][0];
    assert_eq!(keys(t), sorted(&["name", "status", "chain", "storage", "network", "rpc", "rules", "disk"]));
    assert_eq!(t["name"], "ltc");
    assert_eq!(t["network"]["peers_connected"], peers);
    assert_eq!(t["rules"].as_array().unwrap().len(), want.len());
    assert_eq!(keys(&t["rules"][0]), sorted(&["id", "severity", "state", "since", "evidence"]));

    let (code, body) = agent.get("/health/targets/ltc");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200);
    assert_eq!(keys(&v), sorted(&["status", "timestamp"]));
    let (code, body) = agent.get("/health/targets/ltc/detailed");
    assert_eq!(code, 200);
    assert_eq!(keys(&serde_json::from_str::<Value>(&body).unwrap()), keys(t));

    // errors: unknown target and path 404, malformed 400, wrong method 405
    assert_eq!(agent.get("/health/targets/nope").0, 404);
    assert_eq!(agent.get("/health/targets/nope/ready").0, 404);
    assert_eq!(agent.get("/health/targets/ltc/bogus").0, 404);
    assert_eq!(agent.get("/health/bogus").0, 404);
    assert_eq!(agent.get("/nope").0, 404);
    assert_eq!(agent.get("/health/targets/l%20c").0, 400);
    for path in ["/health", "/health/live", "/health/ready", "/health/agent", "/health/detailed", "/health/targets/ltc"]
    {
        let (code, _) = http_request(agent.port, "POST", path).unwrap();
        assert_eq!(code, 405, "POST {path}");
    }
    assert_eq!(agent.get("/peers").0, 200);

    let m = agent.metrics();
    let status = series(&m, "nodescope_health_status", &[("nodescope_target", "ltc")]);
    assert!(status == Some(0.0) || status == Some(1.0), "{m}");
    assert_eq!(series(&m, "nodescope_rule_state", &labels("no_peers", "critical")), Some(0.0), "{m}");
    for id in ALL_RULES.iter().filter(|r| !disabled.contains(r)) {
        assert!(m.contains(&format!("nodescope_rule=\"{id}\"")), "no nodescope_rule_state series for {id}");
    }
}

/// The peers leave (their networking switched off): no_peers pends for its
/// `for`, then fires with its evidence; they come back: it clears after its
/// `clear_after`. Then peers come and go faster than `for`: no verdict flaps.
#[test]
fn no_peers_fires_after_its_duration_and_clears_after_its_clear_duration() {
    require_root();
    // The node's data dir on a filesystem of its own: "nothing fires on a
    // healthy node" must not depend on how full the host's disk is.
    let fs = Tmpfs::mount("512M");
    let datadir = fs.dir.join("node");
    std::fs::create_dir_all(&datadir).unwrap();
    let cgroup = Cgroup::new();
    let node = Litecoind::start_in_dir(Some(&cgroup), TempDir(datadir), &["-connect=0".to_string()]);
    let peers: Vec<Litecoind> =
        (0..2).map(|_| Litecoind::start(None, &[format!("-connect={}", node.addr())])).collect();
    node.wait_peers(2);
    let agent = Agent::start(&agent_config(
        &node,
        &cgroup,
        "[targets.rules.no_peers]\nfor = \"4s\"\nclear_after = \"3s\"\n[targets.rules.partition_suspected]\nenabled = false\n",
    ));
    wait_rule(&agent, "no_peers", "ok", Duration::from_secs(20));
    assert_shapes(&agent, &node, &["partition_suspected"]);

    // -- all peers go
    let off = Instant::now();
    let off_unix = unix_now();
    for p in &peers {
        p.cli(&["setnetworkactive", "false"]);
    }
    wait_for("the node to have no peers (getpeerinfo)", Duration::from_secs(10), || {
        node.peers().is_empty().then_some(())
    });
    // just before `for` has passed: still 200, no_peers pending
    let pending = wait_rule(&agent, "no_peers", "pending", Duration::from_secs(3));
    assert_eq!(pending["evidence"]["p2p_peers"], 0);
    std::thread::sleep(Duration::from_millis(3200).saturating_sub(off.elapsed()));
    let (code, body) = agent.get("/health");
    assert_eq!(code, 200, "{:?} after the peers left (for = 4s): {body}", off.elapsed());
    assert_eq!(rule(&agent, "no_peers")["state"], "pending", "{:?} after", off.elapsed());

    let (fired_after, r) = wait_for("no_peers firing", Duration::from_secs(8), || {
        let r = rule(&agent, "no_peers");
        (r["state"] == "firing").then(|| (off.elapsed(), r))
    });
    assert!(fired_after >= Duration::from_secs(4), "fired {fired_after:?} after the peers left, before for = 4s");
    eprintln!("no_peers fired {fired_after:?} after the peers left (for = 4s)");
    let (code, body) = agent.get("/health");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 503, "{body}");
    assert_eq!(keys(&v), sorted(&["status", "timestamp"]));
    assert_eq!(v["status"], "unhealthy");
    assert_eq!(agent.get("/health/targets/ltc").0, 503);
    assert_eq!(agent.get("/health/live").0, 200, "liveness judges the agent, not the node");
    assert_eq!(r["severity"], "critical");
    assert_eq!(r["evidence"]["p2p_peers"], 0);
    let since = r["evidence"]["since"].as_u64().unwrap() as f64;
    assert!(since >= off_unix.floor() && since <= off_unix + 3.0, "condition since {since}, peers left at {off_unix}");
    assert!(r["since"].as_u64().unwrap() as f64 >= since + 4.0, "{r}");
    let m = agent.metrics();
    assert_eq!(series(&m, "nodescope_health_status", &[("nodescope_target", "ltc")]), Some(2.0));
    assert_eq!(series(&m, "nodescope_rule_state", &labels("no_peers", "critical")), Some(2.0));
    assert_eq!(log_count(&agent, "health rule no_peers firing"), 1, "{}", agent.log());

    // -- peers back: firing until clear_after has passed
    let on = Instant::now();
    for p in &peers {
        p.cli(&["setnetworkactive", "true"]);
    }
    wait_for("peers back (getpeerinfo)", Duration::from_secs(10), || (!node.peers().is_empty()).then_some(()));
    let (cleared_after, r) = wait_for("no_peers cleared", Duration::from_secs(10), || {
        let (code, d) = detailed(&agent);
        let r = rule_in(&d, "no_peers");
        if r["state"] == "firing" {
            assert_eq!(code, 503);
        }
        (r["state"] == "ok").then(|| (on.elapsed(), r))
    });
    assert!(
        cleared_after >= Duration::from_secs(3),
        "cleared {cleared_after:?} after the peers came back, before clear_after = 3s"
    );
    eprintln!("no_peers cleared {cleared_after:?} after the peers came back (clear_after = 3s)");
    assert!(r["evidence"]["p2p_peers"].as_u64().unwrap() >= 1);
    assert_eq!(agent.get("/health").0, 200);
    assert_eq!(log_count(&agent, "health rule no_peers cleared"), 1);

    // -- flapping: the peers go and come back faster than `for` (4s)
    node.wait_peers(2);
    wait_rule(&agent, "no_peers", "ok", Duration::from_secs(5));
    let mut saw_pending = 0;
    let mut no_flap = |code: u16, d: &Value| {
        let r = rule_in(d, "no_peers");
        saw_pending += usize::from(r["state"] == "pending");
        (code == 503 || r["state"] == "firing").then(|| format!("no_peers flapped to firing (HTTP {code})"))
    };
    for _ in 0..4 {
        for p in &peers {
            p.cli(&["setnetworkactive", "false"]);
        }
        wait_for("no peers", Duration::from_secs(5), || node.peers().is_empty().then_some(()));
        watch(&agent, Duration::from_millis(1500), &mut no_flap);
        for p in &peers {
            p.cli(&["setnetworkactive", "true"]);
        }
        wait_for("peers back", Duration::from_secs(5), || (!node.peers().is_empty()).then_some(()));
        watch(&agent, Duration::from_millis(1200), &mut no_flap);
    }
    assert!(saw_pending > 0, "the condition never held: the test did not test anything");
    assert_eq!(log_count(&agent, "health rule no_peers firing"), 1, "{}", agent.log());
}

/// Four of five peers dropped within a second: partition_suspected fires.
/// The same peers replaced one at a time, slower than the window allows for
/// 80%: it does not.
#[test]
fn mass_disconnect_is_a_partition_and_slow_rotation_is_not() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let _peers: Vec<Litecoind> =
        (0..5).map(|_| Litecoind::start(None, &[format!("-connect={}", node.addr())])).collect();
    node.wait_peers(5);
    let agent = Agent::start(&agent_config(
        &node,
        &cgroup,
        // for: the default 30s would outlast the 6s window the loss is seen in
        "[targets.rules.partition_suspected]\nwindow = \"6s\"\nfor = \"1s\"\nclear_after = \"2s\"\n",
    ));
    let addrs =
        |n: &Litecoind| -> Vec<String> { n.peers().iter().map(|p| p["addr"].as_str().unwrap().to_string()).collect() };
    wait_for("5 peers in /peers", Duration::from_secs(20), || {
        let v = agent.json("/peers");
        (v["targets"][0]["peers"].as_array().map(|a| a.len()) == Some(5)).then_some(())
    });
    // the first evaluation lands just after the first /peers
    wait_for("the first evaluation", Duration::from_secs(10), || {
        detailed(&agent).1["targets"][0]["rules"].as_array().map(|_| ())
    });
    let never_fires = |code: u16, d: &Value| {
        let r = rule_in(d, "partition_suspected");
        (code == 503 || r["state"] == "firing")
            .then(|| format!("partition_suspected fired on a slow rotation (HTTP {code})"))
    };
    watch(&agent, Duration::from_secs(7), never_fires);

    // -- slow rotation: one peer every 3s (at most 3 of 5 = 60% in any 6s window)
    let mut last = Instant::now() - Duration::from_secs(10);
    for i in 0..4 {
        wait_for("5 peers again", Duration::from_secs(10), || (node.peers().len() == 5).then_some(()));
        let wait = Duration::from_secs(3).saturating_sub(last.elapsed());
        watch(&agent, wait, never_fires);
        let victim = addrs(&node)[i % 5].clone();
        node.cli(&["disconnectnode", &victim]);
        eprintln!("rotation: disconnected {victim} {:?} after the previous one", last.elapsed());
        last = Instant::now();
        wait_for("the victim gone", Duration::from_secs(5), || (!addrs(&node).contains(&victim)).then_some(()));
    }
    watch(&agent, Duration::from_secs(7), never_fires);
    assert_eq!(rule(&agent, "partition_suspected")["state"], "ok");

    // -- mass disconnect: 4 of 5 at once, once the agent too has seen all 5
    // (the rule can only count peers it observed before they left)
    wait_for("5 peers again", Duration::from_secs(10), || (node.peers().len() == 5).then_some(()));
    wait_for("5 peers in /peers again", Duration::from_secs(10), || {
        let v = agent.json("/peers");
        (v["targets"][0]["peers"].as_array().map(|a| a.len()) == Some(5)).then_some(())
    });
    // a whole window with 5 peers, so the window's start (the rule's
    // baseline) holds the last reconnected one too
    std::thread::sleep(Duration::from_millis(7000));
    let before = addrs(&node);
    let start = Instant::now();
    for victim in &before[..4] {
        node.cli(&["disconnectnode", victim]);
    }
    eprintln!("mass disconnect of 4 peers took {:?}", start.elapsed());
    let r = wait_rule(&agent, "partition_suspected", "firing", Duration::from_secs(5));
    eprintln!("partition_suspected fired {:?} after the mass disconnect: {}", start.elapsed(), r["evidence"]);
    assert_eq!(agent.get("/health").0, 503);
    let after = addrs(&node);
    let kept = before.iter().filter(|a| after.contains(a)).count();
    assert_eq!(kept, 1, "getpeerinfo: before {before:?}, after {after:?}");
    assert_eq!(r["evidence"]["peers_before"], 5, "{r}");
    assert_eq!(r["evidence"]["peers_closed"], 4, "{r}");
    assert_eq!(r["evidence"]["closed_percent"], 80.0, "{r}");
    // the peers reconnected: once the window has moved past, it clears
    let r = wait_rule(&agent, "partition_suspected", "ok", Duration::from_secs(15));
    eprintln!("partition_suspected cleared {:?} after the mass disconnect", start.elapsed());
    assert!(start.elapsed() >= Duration::from_secs(2));
    assert_eq!(r["evidence"]["peers_closed"], 0, "{r}");
    assert_eq!(agent.get("/health").0, 200);
}

/// A graceful `stop` of a node with peers: it closes every peer itself
/// while its process is still there, and its log says it is shutting down
/// first. node_down fires; partition_suspected never does, even with `for`
/// 0s. The node is held (SIGSTOP) after it closed its peers, in its flush
/// of the chain state, for a few intervals: a mainnet node with a large
/// -dbcache spends minutes there, and the rule must hold off for all of them.
#[test]
fn graceful_stop_is_node_down_and_never_a_partition() {
    require_root();
    let cgroup = Cgroup::new();
    let mut node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let _peers: Vec<Litecoind> =
        (0..3).map(|_| Litecoind::start(None, &[format!("-connect={}", node.addr())])).collect();
    node.wait_peers(3);
    let agent = Agent::start(&agent_config(
        &node,
        &cgroup,
        "[targets.rules.node_down]\nfor = \"3s\"\n\
         [targets.rules.partition_suspected]\nwindow = \"6s\"\nfor = \"0s\"\n",
    ));
    wait_for("3 peers in /peers", Duration::from_secs(20), || {
        let v = agent.json("/peers");
        (v["targets"][0]["peers"].as_array().map(|a| a.len()) == Some(3)).then_some(())
    });
    wait_rule(&agent, "partition_suspected", "ok", Duration::from_secs(10));
    wait_rule(&agent, "node_down", "ok", Duration::from_secs(10));
    // a whole window with the 3 peers: the rule's baseline holds them
    std::thread::sleep(Duration::from_secs(7));

    // -- stop, and hold the node once it has closed its peers (its log goes
    // on to the mempool dump and the chain state flush after that)
    let log = node.dir.path().join("regtest/debug.log");
    let logged_before = std::fs::read_to_string(&log).unwrap().len();
    let pid = node.pid() as i32;
    let stopped = Instant::now();
    assert_eq!(node.cli(&["stop"]), "Litecoin Core stopping");
    let held = loop {
        let text = std::fs::read(&log).unwrap_or_default();
        let tail = String::from_utf8_lossy(&text[logged_before.min(text.len())..]).to_string();
        // past its peers' closing in the log, and the peers saw it (its
        // sockets are closed in the kernel, not only logged)
        if tail.contains("Dumped mempool") || tail.contains("FlushStateToDisk") {
            // SAFETY: signalling the node's pid, which the test spawned and has not reaped.
            if unsafe { libc::kill(pid, libc::SIGSTOP) } != 0 {
                break false;
            }
            // held only if it was still running (a process that already
            // exited takes the signal as a zombie)
            break wait_for("the node stopped or exited", Duration::from_secs(5), || {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                match stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next()) {
                    Some('T') => Some(true),
                    Some('Z') | Some('X') | None => Some(false),
                    _ => None,
                }
            });
        }
        if node.child.try_wait().unwrap().is_some() || stopped.elapsed() > Duration::from_secs(20) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let never_partition = |code: u16, d: &Value| {
        let r = rule_in(d, "partition_suspected");
        (r["state"] == "firing" || r["state"] == "pending")
            .then(|| format!("partition_suspected {} on a graceful stop (HTTP {code})", r["state"]))
    };
    if held {
        eprintln!("node held in its shutdown {:?} after stop", stopped.elapsed());
        // the agent sees the process with no peer, and the rule knows why
        let r = wait_for("partition_suspected unknown: shutting down", Duration::from_secs(5), || {
            let d = detailed(&agent).1;
            if let Some(why) = never_partition(0, &d) {
                panic!("{why}\n{d}");
            }
            let r = rule_in(&d, "partition_suspected");
            (r["state"] == "unknown").then_some(r)
        });
        eprintln!("partition_suspected while the node is held: {}", r["evidence"]);
        assert!(r["evidence"]["reason"].as_str().unwrap().contains("shutting down"), "{r}");
        // (its peers may still be open: Core closes them late in its shutdown)
        let d = detailed(&agent).1;
        assert_eq!(rule_in(&d, "node_down")["state"], "ok", "the process is there: {d}");
        watch(&agent, Duration::from_secs(3), never_partition);
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    } else {
        eprintln!("the node exited before it could be held: the stop is checked without the hold");
    }
    node.child.wait().unwrap();
    let exited = Instant::now();
    eprintln!("node exited {:?} after stop", stopped.elapsed());

    // -- node_down pends, fires; partition_suspected stays quiet throughout
    wait_for("node_down firing", Duration::from_secs(10), || {
        let (code, d) = detailed(&agent);
        if let Some(why) = never_partition(code, &d) {
            panic!("{why}\n{d}");
        }
        (rule_in(&d, "node_down")["state"] == "firing").then_some(())
    });
    eprintln!("node_down fired {:?} after the node exited (for = 3s)", exited.elapsed());
    // (the exit is seen when the test reaps it, which may be after the fact)
    assert!(stopped.elapsed() >= Duration::from_secs(3), "node_down fired {:?} after the stop", stopped.elapsed());
    assert_eq!(agent.get("/health").0, 503);
    watch(&agent, Duration::from_secs(2), never_partition);
    assert_eq!(rule(&agent, "partition_suspected")["evidence"]["reason"], "node not running");
    assert_eq!(log_count(&agent, "health rule partition_suspected firing"), 0, "{}", agent.log());
}

/// A node with its outbound slots full (outbound connections it made to
/// other regtest nodes, all established) also tries more addresses, and
/// those connects are refused: failed connects beside full outbound slots
/// are normal, no partition (connect_failures_high may fire: most connects
/// in its window failed).
#[test]
fn refused_connects_beside_full_outbound_slots_are_not_a_partition() {
    require_root();
    let others: Vec<Litecoind> = (0..3).map(|_| Litecoind::start(None, &["-connect=0".to_string()])).collect();
    let cgroup = Cgroup::new();
    let connect: Vec<String> = others.iter().map(|o| format!("-connect={}", o.addr())).collect();
    let node = Litecoind::start(Some(&cgroup), &connect);
    node.wait_peers(3);
    let outbound = node.peers().iter().filter(|p| p["inbound"] == false).count();
    assert_eq!(outbound, 3, "getpeerinfo: {:?}", node.peers());
    let agent = Agent::start(&agent_config(
        &node,
        &cgroup,
        // connect window 5 x 2s; for 0s: the rule fires at the first
        // evaluation its condition holds
        "[targets.rules.partition_suspected]\nwindow = \"2s\"\nfor = \"0s\"\n\
         [targets.rules.connect_failures_high]\nwindow = \"10s\"\n",
    ));
    wait_for("3 outbound peers in /peers", Duration::from_secs(20), || {
        let v = agent.json("/peers");
        let peers = v["targets"][0]["peers"].as_array()?.clone();
        (peers.iter().filter(|p| p["direction"] == "outbound").count() == 3).then_some(())
    });
    wait_rule(&agent, "partition_suspected", "ok", Duration::from_secs(10));
    let never_partition = |code: u16, d: &Value| {
        let r = rule_in(d, "partition_suspected");
        (code == 503 || r["state"] == "firing" || r["state"] == "pending")
            .then(|| format!("partition_suspected {} beside full outbound slots (HTTP {code})", r["state"]))
    };

    // a connect refused every 500 ms for 15 s: longer than the connect window
    let closed = free_port();
    let target = format!("127.0.0.1:{closed}");
    let start = Instant::now();
    let mut tries = 0;
    while start.elapsed() < Duration::from_secs(15) {
        node.cli(&["addnode", &target, "onetry"]);
        tries += 1;
        watch(&agent, Duration::from_millis(500), never_partition);
    }
    eprintln!("{tries} connects to {target} refused over {:?}", start.elapsed());
    let d = detailed(&agent).1;
    let r = rule_in(&d, "partition_suspected");
    eprintln!("partition_suspected: {}", r);
    assert_eq!(r["state"], "ok", "{r}");
    assert_eq!(r["evidence"]["outbound_peers"], 3, "{r}");
    assert_eq!(r["evidence"]["outbound_opened"], 0, "{r}");
    assert!(r["evidence"]["outbound_failed"].as_u64().unwrap() >= 10, "the refused connects were seen: {r}");
    let c = rule_in(&d, "connect_failures_high");
    eprintln!("connect_failures_high: {c}");
    assert_eq!(c["evidence"]["failed_by_reason"]["refused"].as_u64().map(|n| n >= 10), Some(true), "{c}");
    // outside truth: the 3 outbound peers held throughout
    let outbound = node.peers().iter().filter(|p| p["inbound"] == false).count();
    assert_eq!(outbound, 3);
    assert_eq!(log_count(&agent, "health rule partition_suspected firing"), 0, "{}", agent.log());
}

/// The node killed by pid: the agent stays alive (/health/live 200) and
/// ready (/health/agent 200, the DaemonSet's readiness) while /health goes
/// 503 with node_down and /health/ready (the node's readiness) 503;
/// restarted on the same data dir and ports, it recovers.
#[test]
fn node_killed_is_node_down_and_recovers_after_restart() {
    require_root();
    let cgroup = Cgroup::new();
    let mut node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let _peer = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);
    let agent =
        Agent::start(&agent_config(&node, &cgroup, "[targets.rules.node_down]\nfor = \"3s\"\nclear_after = \"2s\"\n"));
    wait_rule(&agent, "node_down", "ok", Duration::from_secs(20));
    wait_for("ready", Duration::from_secs(20), || (agent.get("/health/ready").0 == 200).then_some(()));

    let pid = node.pid() as i32;
    let killed = Instant::now();
    node.kill();
    // SAFETY: probing a pid with signal 0 sends nothing.
    assert_eq!(unsafe { libc::kill(pid, 0) }, -1, "the node is still running");
    let alive_and_up = |code: u16, d: &Value| {
        let live = agent.get("/health/live").0;
        if live != 200 {
            return Some(format!("/health/live {live} while the agent runs"));
        }
        let (ready, body) = agent.get("/health/agent");
        if ready != 200 {
            return Some(format!("/health/agent {ready} while the agent collects: {body}"));
        }
        (code == 503 || rule_in(d, "node_down")["state"] == "firing")
            .then(|| "node_down fired before for = 3s".to_string())
    };
    let r = wait_rule(&agent, "node_down", "pending", Duration::from_secs(3));
    assert_eq!(r["evidence"]["pid"], Value::Null);
    watch(&agent, Duration::from_millis(2800).saturating_sub(killed.elapsed()), alive_and_up);
    let r = wait_rule(&agent, "node_down", "firing", Duration::from_secs(5));
    let fired_after = killed.elapsed();
    eprintln!("node_down fired {fired_after:?} after the kill (for = 3s)");
    assert!(fired_after >= Duration::from_secs(3));
    assert_eq!(r["evidence"]["pid"], Value::Null);
    assert_eq!(agent.get("/health").0, 503);
    assert_eq!(agent.get("/health/live"), (200, json!({"status": "alive"}).to_string()));
    let (code, body) = agent.get("/health/ready");
    assert_eq!(code, 503);
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "not_ready");
    // the agent's own readiness: it collects, whatever its node does
    let (code, body) = agent.get("/health/agent");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(v["status"], "ready", "{v}");
    assert!(v["last_collection_seconds_ago"].as_f64().unwrap() <= 1.5, "interval 500ms: {v}");
    assert!(v["collections"].as_u64().unwrap() > 0, "{v}");

    let restarted = Instant::now();
    node.restart(Some(&cgroup));
    let r = wait_rule(&agent, "node_down", "ok", Duration::from_secs(15));
    eprintln!("node_down cleared {:?} after the restart began (clear_after = 2s)", restarted.elapsed());
    assert!(restarted.elapsed() >= Duration::from_secs(2));
    assert_eq!(r["evidence"]["pid"], node.pid());
    wait_for("/health 200 after the restart", Duration::from_secs(10), || {
        (agent.get("/health").0 == 200).then_some(())
    });
    wait_for("/health/ready 200 after the restart", Duration::from_secs(20), || {
        (agent.get("/health/ready").0 == 200).then_some(())
    });
    // its peer came back; the peers it lost by dying are no partition
    node.wait_peers(1);
    watch(&agent, Duration::from_secs(3), |code, d| {
        (code == 503).then(|| format!("unhealthy after recovery: {}", rule_in(d, "partition_suspected")))
    });
}

/// A tmpfs the test mounts, unmounted and removed when dropped.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = std::env::temp_dir().join(format!("nodescope-tmpfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount -t tmpfs on {}", dir.display());
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount").arg(&self.dir).status().is_ok_and(|s| s.success()) {
                let _ = std::fs::remove_dir(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not unmount {}", self.dir.display());
    }
}

/// (size, available) bytes of the filesystem holding `path`, as df says.
fn df(path: &Path) -> (u64, u64) {
    let out = Command::new("df").args(["-B1", "--output=size,avail"]).arg(path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let nums: Vec<u64> = text.lines().nth(1).unwrap().split_whitespace().map(|n| n.parse().unwrap()).collect();
    (nums[0], nums[1])
}

/// The node's data dir on a small filesystem, filled past 95%:
/// disk_critical fires and /health/ready says storage_available false;
/// emptied again, both recover.
#[test]
fn full_filesystem_is_disk_critical_and_not_ready() {
    require_root();
    require_tool("fallocate", "util-linux");
    let fs = Tmpfs::mount("2G");
    let cgroup = Cgroup::new();
    let datadir = fs.dir.join("node");
    std::fs::create_dir_all(&datadir).unwrap();
    let node = Litecoind::start_in_dir(Some(&cgroup), TempDir(datadir), &["-connect=0".to_string()]);
    let agent = Agent::start(&agent_config(
        &node,
        &cgroup,
        "[targets.rules.disk_critical]\nclear_after = \"2s\"\n[targets.rules.disk_low]\nclear_after = \"2s\"\n",
    ));
    wait_rule(&agent, "disk_critical", "ok", Duration::from_secs(20));
    wait_for("ready", Duration::from_secs(20), || (agent.get("/health/ready").0 == 200).then_some(()));

    // Leave 3.5% free: past 95% used, yet above the 50 MB litecoind needs to keep running.
    let (size, avail) = df(&fs.dir);
    let fill = fs.dir.join("fill");
    let leave = size * 35 / 1000;
    let st = Command::new("fallocate").args(["-l", &(avail - leave).to_string()]).arg(&fill).status().unwrap();
    assert!(st.success());
    let (size, avail) = df(&fs.dir);
    let pct = avail as f64 * 100.0 / size as f64;
    assert!(pct < 5.0, "df: {avail} of {size} available");

    let first = wait_rule(&agent, "disk_critical", "firing", Duration::from_secs(10));
    // It may fire on a collection made while fallocate was still filling:
    // the evidence is the latest collection's, so wait for one after df.
    let r = wait_for("disk_critical's evidence after the fill", Duration::from_secs(5), || {
        let r = rule(&agent, "disk_critical");
        let theirs = r["evidence"]["available_percent"].as_f64()?;
        (r["state"] == "firing" && (theirs - pct).abs() < 0.5).then_some(r)
    });
    eprintln!(
        "disk_critical evidence {} (df: {pct:.2}% available; it first fired with {})",
        r["evidence"], first["evidence"]
    );
    assert_eq!(r["evidence"]["size_bytes"], size);
    assert_eq!(agent.get("/health").0, 503);
    let (code, body) = agent.get("/health/ready");
    assert_eq!(code, 503);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"status": "not_ready", "chain_initialized": true, "storage_available": false})
    );
    assert_eq!(rule(&agent, "disk_low")["state"], "firing");
    assert_eq!(detailed(&agent).1["storage"]["available"], false);

    let emptied = Instant::now();
    std::fs::remove_file(&fill).unwrap();
    wait_rule(&agent, "disk_critical", "ok", Duration::from_secs(10));
    assert!(emptied.elapsed() >= Duration::from_secs(2), "cleared before clear_after");
    wait_for("/health/ready 200 again", Duration::from_secs(10), || {
        (agent.get("/health/ready").0 == 200).then_some(())
    });
    assert_eq!(agent.get("/health").0, 200);
}

/// The node stops writing blocks while its peer stays connected:
/// chain_stalled fires once the (shortened) stall window has passed since
/// the last block write, and clears when a block is mined.
#[test]
fn no_blocks_while_connected_is_chain_stalled() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let _peer = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);
    node.address(); // the wallet, made before the agent watches
    let agent = Agent::start(&agent_config(&node, &cgroup, "[targets.rules.chain_stalled]\nthreshold = 6\n"));
    wait_for("chain_stalled known", Duration::from_secs(20), || {
        let d = detailed(&agent).1;
        let r = d["targets"][0]["rules"].as_array()?.iter().find(|r| r["id"] == "chain_stalled")?.clone();
        (r["state"] != "unknown").then_some(())
    });

    let height = node.cli(&["getblockcount"]);
    // taken before the block is written: a lower bound on the write's time
    let mined = Instant::now();
    let mined_unix = unix_now();
    node.mine(1);
    let mine_returned_unix = unix_now();
    let blk = node.dir.path().join("regtest/blocks/blk00000.dat");
    let r = wait_for("the block write seen", Duration::from_secs(10), || {
        let r = rule(&agent, "chain_stalled");
        r["evidence"]["last_blocks_write"].as_f64().filter(|t| *t >= mined_unix.floor() - 1.0).map(|_| r)
    });
    assert_eq!(r["state"], "ok");
    watch(&agent, Duration::from_millis(5500).saturating_sub(mined.elapsed()), |_, d| {
        (rule_in(d, "chain_stalled")["state"] == "firing")
            .then(|| "chain_stalled fired before its threshold".to_string())
    });
    let r = wait_rule(&agent, "chain_stalled", "firing", Duration::from_secs(6));
    eprintln!("chain_stalled fired {:?} after the last block (threshold 6s): {}", mined.elapsed(), r["evidence"]);
    assert!(mined.elapsed() >= Duration::from_secs(6));
    // outside truth: no new block, the block file untouched since the mine
    assert_eq!(node.cli(&["getblockcount"]).parse::<u64>().unwrap(), height.parse::<u64>().unwrap() + 1);
    let mtime = std::fs::metadata(&blk).unwrap().modified().unwrap().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(mtime <= mine_returned_unix + 0.01, "blk00000.dat written after the mine ({mtime} > {mine_returned_unix})");
    let last = r["evidence"]["last_blocks_write"].as_f64().unwrap();
    assert!((last - mtime).abs() <= 2.0, "last_blocks_write {last}, blk00000.dat mtime {mtime}");
    assert!(r["evidence"]["p2p_peers"].as_u64().unwrap() >= 1);
    let (code, body) = agent.get("/health");
    assert_eq!(code, 200, "a warning degrades, it does not fail /health: {body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["status"], "degraded");
    let m = agent.metrics();
    assert_eq!(series(&m, "nodescope_rule_state", &labels("chain_stalled", "warning")), Some(2.0));
    assert_eq!(series(&m, "nodescope_health_status", &[("nodescope_target", "ltc")]), Some(1.0));

    node.mine(1);
    wait_rule(&agent, "chain_stalled", "ok", Duration::from_secs(5));
    assert_eq!(log_count(&agent, "health rule chain_stalled cleared"), 1);
}

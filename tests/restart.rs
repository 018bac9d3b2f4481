//! Counters across agent restarts (`agent.state_dir`): the agent is killed
//! while its node has peers, the node's traffic goes on and a connection
//! opens and closes while no agent runs, then a new agent starts. Every
//! per-peer byte counter afterwards is its value before plus what the node's
//! own getpeerinfo says moved meanwhile, to the byte, and no counter went
//! backwards. Then the pins of another map layout are replaced, logged.
//!
//! Peers listen on their own loopback addresses (127.0.0.2...) and the node
//! dials them, so each peer has its own `network_peer_address` series.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::*;

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// A bpffs directory for this test's pins, removed when dropped.
struct PinDir(PathBuf);

impl PinDir {
    fn new() -> PinDir {
        let dir = PathBuf::from(format!("/sys/fs/bpf/nodescope-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        PinDir(dir)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // the links pinned there go with it: the programs detach
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// (sent, received) payload bytes of the node's connection(s) to `ip`, by its getpeerinfo.
fn node_bytes(node: &Litecoind, ip: &str) -> (u64, u64) {
    node.peers()
        .iter()
        .filter(|p| p["addr"].as_str().is_some_and(|a| a.starts_with(&format!("{ip}:"))))
        .fold((0, 0), |(s, r), p| (s + p["bytessent"].as_u64().unwrap(), r + p["bytesrecv"].as_u64().unwrap()))
}

/// (sent, received) as the agent's per-peer counters say.
fn agent_bytes(m: &str, ip: &str) -> (u64, u64) {
    let get = |dir: &str| {
        metric_sum(
            m,
            "nodescope_peer_io_bytes_total",
            &[("nodescope_target", "ltc"), ("network_peer_address", ip), ("network_io_direction", dir)],
        ) as u64
    };
    (get("transmit"), get("receive"))
}

/// Every counter sample of a scrape, histograms' included: series -> value.
fn counters(m: &str) -> std::collections::BTreeMap<String, f64> {
    m.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            series
                .split('{')
                .next()
                .is_some_and(|n| ["_total", "_count", "_sum", "_bucket"].iter().any(|s| n.ends_with(s)))
        })
        .filter_map(|(series, v)| Some((series.to_string(), v.parse().ok()?)))
        .collect()
}

/// The network signal's counters, which the state file keeps.
const NET_COUNTERS: [&str; 5] = [
    "nodescope_peer_io",
    "nodescope_netgroup_io",
    "nodescope_p2p_io",
    "nodescope_connection_",
    "nodescope_peer_overflowed",
];

/// The node's P2P connections out (RPC clients are connections too).
const P2P_OUTBOUND: [(&str, &str); 3] =
    [("nodescope_target", "ltc"), ("nodescope_service", "p2p"), ("nodescope_connection_direction", "outbound")];

fn collections(agent: &Agent) -> f64 {
    metric_sum(&agent.metrics(), "nodescope_collection_duration_seconds_count", &[])
}

/// Kills the agent (SIGKILL) just after a collection, when its state file
/// has been written (docs/architecture.md: a kill during a collection loses
/// what that collection read).
fn kill_after_collection(mut agent: Agent) {
    let n = collections(&agent);
    wait_for("a collection", Duration::from_secs(5), || (collections(&agent) > n).then_some(()));
    let _ = agent.child.kill();
    let _ = agent.child.wait();
}

#[test]
fn counters_continue_across_a_kill_and_the_connections_of_the_gap_are_counted() {
    require_root();
    require_tool("bpftool", "bpftool");
    let pins = PinDir::new();
    let state = TempDir::new("nodescope-state");
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let peers: Vec<Litecoind> =
        ips.iter().map(|ip| Litecoind::start(None, &["-connect=0".to_string(), format!("-bind={ip}")])).collect();
    for (ip, p) in ips.iter().zip(&peers).take(2) {
        node.cli(&["addnode", &format!("{ip}:{}", p.port), "add"]);
    }
    node.wait_peers(2);
    let config = format!(
        "[agent]\ninterval = \"500ms\"\nstate_dir = \"{}\"\npin_dir = \"{}\"\n\n[[targets]]\nname = \"ltc\"\ncgroup = \"{}\"\nchain = \"litecoin\"\np2p_ports = [{}]\nrpc_ports = [{}]\n",
        state.path().display(),
        pins.0.display(),
        cgroup.path.display(),
        node.port,
        node.rpcport
    );
    // a real Prometheus scrapes the agents where they serve, across the kill
    let port = free_port();
    let agent = Agent::start_at(&config, &[], port);
    let prometheus = Prometheus::start(port, None);
    node.mine(5);
    // at rest, the agent agrees with the node for both peers
    let before = wait_for("the agent's per-peer bytes to equal getpeerinfo", Duration::from_secs(30), || {
        let m = agent.metrics();
        let ok = ips[..2].iter().all(|ip| agent_bytes(&m, ip) == node_bytes(&node, ip) && agent_bytes(&m, ip).0 > 0);
        ok.then_some(m)
    });
    let churn = |m: &str, what: &str| metric_sum(m, &format!("nodescope_connection_{what}_total"), &P2P_OUTBOUND);
    let (opened_before, closed_before) = (churn(&before, "opened"), churn(&before, "closed"));
    // at rest: Prometheus's sample at `t0` is `before`'s
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = unix_now();
    kill_after_collection(agent);
    assert!(pins.0.join("v1/net/links").is_dir(), "nothing pinned under {}", pins.0.display());

    // The gap: blocks relayed to both peers, and a third peer that connects,
    // takes a block and is disconnected.
    node.mine(3);
    let c = &peers[2];
    let c_addr = format!("{}:{}", ips[2], c.port);
    node.cli(&["addnode", &c_addr, "onetry"]);
    node.wait_peers(3);
    node.mine(1);
    let c_bytes = wait_for("the third peer at rest", Duration::from_secs(20), || {
        let a = node_bytes(&node, ips[2]);
        std::thread::sleep(Duration::from_millis(500));
        (a.0 > 0 && node_bytes(&node, ips[2]) == a).then_some(a)
    });
    node.cli(&["disconnectnode", &c_addr]);
    wait_for("the third peer gone", Duration::from_secs(10), || (node_bytes(&node, ips[2]) == (0, 0)).then_some(()));
    eprintln!("during the gap: the third peer exchanged {c_bytes:?} (sent, received) and was disconnected");

    let agent = Agent::start_at(&config, &[], port);
    let log = agent.log();
    assert!(log.contains("taken over from the state file"), "{log}");
    let after = wait_for("the agent's per-peer bytes to equal getpeerinfo again", Duration::from_secs(30), || {
        let m = agent.metrics();
        let ok = ips[..2].iter().all(|ip| agent_bytes(&m, ip) == node_bytes(&node, ip));
        (ok && agent_bytes(&m, ips[2]) == c_bytes).then_some(m)
    });
    for ip in &ips[..2] {
        let (was, now) = (agent_bytes(&before, ip), agent_bytes(&after, ip));
        eprintln!("{ip}: before the kill {was:?}, after the restart {now:?} (getpeerinfo {:?})", node_bytes(&node, ip));
        assert!(now.0 > was.0 && now.1 >= was.1, "{ip}: no traffic over the gap?");
    }
    // the third connection: opened and closed while no agent ran
    assert_eq!((churn(&after, "opened"), churn(&after, "closed")), (opened_before + 1.0, closed_before + 1.0));
    // and its lifetime, in the histogram that went on from the last agent's
    let lifetimes = |m: &str| metric_sum(m, "nodescope_connection_duration_seconds_count", &P2P_OUTBOUND);
    assert_eq!(lifetimes(&after), lifetimes(&before) + 1.0);
    let rpc = [("nodescope_target", "ltc"), ("nodescope_service", "rpc")];
    let rpc_lifetimes = |m: &str| metric_sum(m, "nodescope_connection_duration_seconds_count", &rpc);
    assert!(rpc_lifetimes(&before) > 0.0 && rpc_lifetimes(&after) > rpc_lifetimes(&before), "RPC calls' lifetimes");
    // no counter of the network signal went backwards
    let now = counters(&after);
    for (series, was) in counters(&before) {
        if NET_COUNTERS.iter().any(|p| series.starts_with(p)) {
            let v = now.get(&series).copied();
            assert!(v.is_some_and(|v| v >= was), "{series}: {was} before the kill, {v:?} after");
        }
    }

    // What Prometheus made of it: no reset of any of these counters over the
    // kill (so increase() adds nothing of its own), and each peer's counter
    // moved by exactly what getpeerinfo says moved.
    std::thread::sleep(Duration::from_millis(1500));
    let t1 = unix_now();
    let window = (t1 - t0).ceil() as u64 + 5;
    let names: std::collections::BTreeSet<String> = counters(&before)
        .keys()
        .map(|series| series.split('{').next().unwrap().to_string())
        .filter(|name| NET_COUNTERS.iter().any(|p| name.starts_with(p)))
        .collect();
    assert!(names.len() >= 5, "{names:?}");
    for name in &names {
        let resets = prometheus.value(&format!("sum(resets({name}[{window}s]))"), Some(t1));
        assert_eq!(resets, Some(0.0), "Prometheus saw {name} reset over the restart");
    }
    for ip in &ips[..2] {
        for (i, dir) in ["transmit", "receive"].iter().enumerate() {
            let series = format!(
                "nodescope_peer_io_bytes_total{{nodescope_target=\"ltc\",network_peer_address=\"{ip}\",network_io_direction=\"{dir}\"}}"
            );
            let (at0, at1) = (prometheus.value(&series, Some(t0)), prometheus.value(&series, Some(t1)));
            let node_now = node_bytes(&node, ip);
            let was = agent_bytes(&before, ip);
            let moved = [node_now.0 - was.0, node_now.1 - was.1][i];
            eprintln!("{ip} {dir}: Prometheus {at0:?} -> {at1:?}; getpeerinfo moved {moved}");
            assert_eq!(
                at1.zip(at0).map(|(b, a)| (b - a) as u64),
                Some(moved),
                "{ip} {dir}: Prometheus's increase over the restart"
            );
        }
    }

    // An upgrade to a build of another map layout: its pins replaced, logged.
    drop(agent);
    let old = pins.0.join("v0");
    std::fs::create_dir_all(&old).unwrap();
    let st = Command::new("bpftool")
        .args(["map", "create"])
        .arg(old.join("old_map"))
        .args(["type", "array", "key", "4", "value", "4", "entries", "1", "name", "old_map"])
        .status()
        .unwrap();
    assert!(st.success(), "bpftool map create");
    let agent = Agent::start(&config);
    wait_for("the old layout's pins removed", Duration::from_secs(10), || (!old.exists()).then_some(()));
    let log = agent.log();
    assert!(log.contains("pinned by a nodescope of another map layout (v0"), "{log}");
    drop(agent);
}

/// Writes `calls` appends of `size` bytes to `file` and fsyncs it `syncs`
/// times, from a process inside `cgroup`; the bytes its write calls
/// returned, as it counted them.
fn write_in(cgroup: &Cgroup, file: &std::path::Path, calls: u32, size: u32, syncs: u32) -> u64 {
    let script = "import os, sys\nfd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)\ncalls, size, syncs = map(int, sys.argv[2:5])\nn = sum(os.write(fd, b'x' * size) for _ in range(calls))\nfor _ in range(syncs):\n    os.fsync(fd)\nprint(n)\n";
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("echo $$ > '{}/cgroup.procs' && exec python3 -c \"$0\" \"$@\"", cgroup.path.display()))
        .arg(script)
        .arg(file)
        .args([calls.to_string(), size.to_string(), syncs.to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "writer: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The disk signal's totals go on across a kill: bytes and calls by class,
/// sync calls and the sync latency histogram's count (ext4 times its
/// syncs). Its kernel maps are not pinned, so nothing is written during the
/// gap here (what would be is not counted: docs/architecture.md).
#[test]
fn disk_totals_continue_across_a_kill() {
    require_root();
    let pins = PinDir::new();
    let state = TempDir::new("nodescope-state");
    let fs = LoopFs::new("ext4");
    let datadir = fs.subdir("node");
    let cgroup = Cgroup::new();
    let _sleeper = Stopped(spawn_in(Some(&cgroup), "sleep", &["600".to_string()], &state.path().join("sleep.log")));
    let config = format!(
        "[agent]\ninterval = \"500ms\"\ndiscover = false\nstate_dir = \"{}\"\npin_dir = \"{}\"\n\n[[targets]]\nname = \"w\"\ncgroup = \"{}\"\ndatadir = \"{}\"\n",
        state.path().join("state").display(),
        pins.0.display(),
        cgroup.path.display(),
        datadir.display()
    );
    let file = datadir.join("probe.dat");
    let labels = [("nodescope_target", "w"), ("nodescope_file_class", "other"), ("nodescope_write_call", "write")];
    let sync_labels = [("nodescope_target", "w"), ("nodescope_file_class", "other"), ("nodescope_sync_call", "fsync")];
    // (written bytes, write calls, fsync calls, timed fsync calls)
    let totals = |m: &str| {
        (
            metric_sum(m, "nodescope_file_written_bytes_total", &labels) as u64,
            metric_sum(m, "nodescope_file_writes_total", &labels) as u64,
            metric_sum(m, "nodescope_file_syncs_total", &sync_labels) as u64,
            metric_sum(m, "nodescope_file_sync_duration_seconds_count", &sync_labels) as u64,
        )
    };

    let agent = Agent::start(&config);
    wait_for("the target watched", Duration::from_secs(30), || {
        agent.metrics().contains("nodescope_disk_covered{").then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let first = write_in(&cgroup, &file, 10, 4096, 3);
    let want = (first, 10, 3, 3);
    wait_for("the first writes counted", Duration::from_secs(20), || (totals(&agent.metrics()) == want).then_some(()));
    kill_after_collection(agent);

    let agent = Agent::start(&config);
    let log = agent.log();
    assert!(log.contains("disk signal: counters of 1 target(s) taken over from the state file"), "{log}");
    // before anything new is written: the totals are back
    wait_for("the totals restored", Duration::from_secs(20), || (totals(&agent.metrics()) == want).then_some(()));
    let second = write_in(&cgroup, &file, 5, 1000, 2);
    let want = (first + second, 15, 5, 5);
    let got = wait_for("the totals going on", Duration::from_secs(20), || {
        let t = totals(&agent.metrics());
        (t == want).then_some(t)
    });
    eprintln!("written {first} + {second} bytes; nodescope after the restart: {got:?}");
    assert_eq!(std::fs::metadata(&file).unwrap().len(), first + second, "the file's own size");
}

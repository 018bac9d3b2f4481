//! Sync state from the node's own log (agent/src/chainlog.rs) against real
//! litecoind and monerod regtest nodes that the test mines block by block:
//! `nodescope_chain_height` is checked against the node's own RPC
//! (`getblockcount`; monerod's `get_info.height` minus one, its tip's
//! height), also across a log renamed and reopened and a log copied and
//! truncated in place, and /health/detailed's `chain` section says the same.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A figure of one target in a scrape; None when the series is absent.
fn figure(m: &str, name: &str, target: &str) -> Option<f64> {
    let label = format!("nodescope_target=\"{target}\"");
    m.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

fn agent_config(name: &str, chain: &str, cgroup: &Cgroup, datadir: &Path) -> String {
    format!(
        "[agent]\ninterval = \"500ms\"\n\n[[targets]]\nname = \"{name}\"\ncgroup = \"{}\"\nchain = \"{chain}\"\ndatadir = \"{}\"\n",
        cgroup.path.display(),
        datadir.display()
    )
}

/// Mines `blocks` one at a time, a second apart; after each, the agent's
/// height is at most one block behind the node's right away, and equal to
/// it within 5 s. Returns the node's height at the end.
fn mine_and_follow(agent: &Agent, target: &str, blocks: u32, mine: &dyn Fn(), node_height: &dyn Fn() -> u64) -> u64 {
    let mut worst_lag = 0;
    for _ in 0..blocks {
        mine();
        let node = node_height();
        let seen = figure(&agent.metrics(), "nodescope_chain_height", target).unwrap_or(-1.0);
        let lag = node as f64 - seen;
        assert!(
            (0.0..=1.0).contains(&lag),
            "{target}: nodescope_chain_height {seen} right after the node reached {node}"
        );
        worst_lag = worst_lag.max(lag as u64);
        let started = Instant::now();
        wait_for(&format!("{target}: nodescope_chain_height {node}"), Duration::from_secs(5), || {
            (figure(&agent.metrics(), "nodescope_chain_height", target) == Some(node as f64)).then_some(())
        });
        eprintln!("{target}: height {node}: lag {lag} right after mining, caught up in {:?}", started.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
    node_height()
}

fn chain_section(agent: &Agent) -> Value {
    agent.json("/health/detailed")["targets"][0]["chain"].clone()
}

#[test]
fn litecoind_height_from_its_log_across_rotation_and_truncation() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let agent = Agent::start(&agent_config("ltc", "litecoin", &cgroup, node.dir.path()));
    let log = node.dir.path().join("regtest/debug.log");

    // only the genesis block: its date is 2011, so the node is in initial block download
    wait_for("height 0 from the log", Duration::from_secs(20), || {
        let m = agent.metrics();
        (figure(&m, "nodescope_chain_height", "ltc") == Some(0.0)).then_some(m)
    });
    let m = agent.metrics();
    assert_eq!(figure(&m, "nodescope_chain_initial_block_download", "ltc"), Some(1.0));
    assert!(figure(&m, "nodescope_chain_tip_age_seconds", "ltc").unwrap() > 10.0 * 365.0 * 86400.0);
    assert_eq!(node.cli_json(&["getblockchaininfo"])["initialblockdownload"], true);

    let address = node.address();
    let mine = || drop(node.cli(&["generatetoaddress", "1", &address]));
    let count = || node.cli(&["getblockcount"]).parse::<u64>().unwrap();
    let height = mine_and_follow(&agent, "ltc", 5, &mine, &count);
    assert_eq!(height, 5);
    let m = agent.metrics();
    assert_eq!(node.cli_json(&["getblockchaininfo"])["initialblockdownload"], false);
    assert_eq!(figure(&m, "nodescope_chain_initial_block_download", "ltc"), Some(0.0));
    assert_eq!(figure(&m, "nodescope_chain_sync_progress", "ltc"), Some(1.0));
    let age = figure(&m, "nodescope_chain_tip_age_seconds", "ltc").unwrap();
    assert!((0.0..30.0).contains(&age), "tip age {age}");

    // rotation: renamed away; the node writes on to the old file until SIGHUP reopens its path
    let rotated = node.dir.path().join("regtest/debug.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    assert_eq!(mine_and_follow(&agent, "ltc", 2, &mine, &count), 7);
    assert!(!log.exists(), "the node made a new debug.log before SIGHUP");
    // SAFETY: signalling the node this test started, by its pid.
    assert_eq!(unsafe { libc::kill(node.pid() as i32, libc::SIGHUP) }, 0);
    let height = mine_and_follow(&agent, "ltc", 3, &mine, &count);
    let new_log = std::fs::read_to_string(&log).expect("debug.log reopened after SIGHUP");
    assert!(new_log.contains(&format!("height={height} ")), "the reopened log has the last block");
    assert!(!new_log.contains("height=7 "), "the reopened log starts after the rotation");

    // copy-truncate: the log copied aside and cut to nothing in place
    std::fs::copy(&log, node.dir.path().join("regtest/debug.log.2")).unwrap();
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
    let height = mine_and_follow(&agent, "ltc", 3, &mine, &count);
    assert_eq!(height, 13);
    let after = std::fs::read_to_string(&log).unwrap();
    assert!(!after.contains("height=10 "), "debug.log holds lines from before the truncation");

    let chain = chain_section(&agent);
    assert_eq!(chain["height"], height, "{chain}");
    assert_eq!(chain["source"], "log", "{chain}");
    assert_eq!(chain["initial_block_download"], false, "{chain}");
    assert_eq!(chain["sync_progress"], 1.0, "{chain}");
    assert_eq!(chain["log_file"], log.display().to_string(), "{chain}");
    assert!(chain["tip_age_seconds"].as_f64().unwrap() < 30.0, "{chain}");
    let top = agent.json("/health/detailed")["chain"].clone();
    assert_eq!(top["height"], height, "{top}");
}

#[test]
fn a_node_without_a_log_file_is_said_to_have_none() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string(), "-nodebuglogfile".to_string()]);
    let agent = Agent::start(&agent_config("ltc", "litecoin", &cgroup, node.dir.path()));
    let chain = wait_for("the chain section", Duration::from_secs(20), || {
        let c = chain_section(&agent);
        c.get("source").is_some().then_some(c)
    });
    assert!(!node.dir.path().join("regtest/debug.log").exists());
    assert_eq!(chain["source"], "no_log", "{chain}");
    assert_eq!(chain["height"], Value::Null, "{chain}");
    assert!(chain["detail"].as_str().unwrap().contains("-nodebuglogfile"), "{chain}");
    assert_eq!(figure(&agent.metrics(), "nodescope_chain_height", "ltc"), None);
}

/// monerod regtest on loopback, in `cgroup`, logging each block it adds
/// (--log-level 1) and rotating its own log past `max_log` bytes.
struct Monerod {
    child: std::process::Child,
    dir: TempDir,
    rpc_port: u16,
    args: Vec<String>,
}

/// A valid mainnet address (the Monero project's donation address);
/// monerod --regtest accepts it for generateblocks.
const MONERO_ADDRESS: &str =
    "44AFFq5kSiGBoZ4NMDwYtN18obc8AemS33DBLWs3H7otXft3XjrpDtQGv7SqSsaBYBb98uNbr2VBBEt7f2wfn3RVGQBEP3A";

impl Monerod {
    fn start(cgroup: &Cgroup, max_log: u64) -> Monerod {
        Self::start_with(Some(cgroup), max_log, free_port(), None, 1)
    }

    /// On P2P port `p2p_port`; with `peer`, connected to that port only
    /// (else offline: no P2P at all).
    fn start_with(cgroup: Option<&Cgroup>, max_log: u64, p2p_port: u16, peer: Option<u16>, level: u8) -> Monerod {
        require_tool("monerod", "monero");
        let dir = TempDir::new("xmr");
        let rpc_port = free_port();
        let mut args = monerod_regtest_args(dir.path(), p2p_port, rpc_port);
        args.extend(["--log-level".into(), level.to_string()]);
        args.extend(["--max-log-file-size".into(), max_log.to_string()]);
        match peer {
            Some(port) => args.extend(["--add-exclusive-node".into(), format!("127.0.0.1:{port}")]),
            None => args.push("--offline".into()),
        }
        let child = spawn_in(cgroup, "monerod", &args, &dir.path().join("stdout.log"));
        let mut node = Monerod { child, dir, rpc_port, args };
        node.wait_rpc();
        node
    }

    fn wait_rpc(&mut self) {
        wait_for("monerod RPC", Duration::from_secs(120), || {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("monerod exited with {st}");
            }
            self.rpc("get_info", "{}").ok().filter(|v| v["result"]["status"] == "OK")
        });
    }

    /// Stopped, then started again on the same data dir and ports.
    fn restart(&mut self, cgroup: Option<&Cgroup>) {
        stop_child(&mut self.child, Duration::from_secs(30));
        self.child = spawn_in(cgroup, "monerod", &self.args, &self.dir.path().join("stdout.log"));
        self.wait_rpc();
    }

    fn rpc(&self, method: &str, params: &str) -> Result<Value, String> {
        monerod_rpc(self.rpc_port, method, params)
    }

    /// get_info.height: the number of blocks, one more than the tip's height.
    fn height(&self) -> u64 {
        let v = self.rpc("get_info", "{}").unwrap();
        v["result"]["height"].as_u64().unwrap_or_else(|| panic!("get_info: {v}"))
    }

    fn mine(&self, blocks: u32) {
        let params = format!("{{\"amount_of_blocks\":{blocks},\"wallet_address\":\"{MONERO_ADDRESS}\"}}");
        let v = self.rpc("generateblocks", &params).unwrap_or_else(|e| panic!("generateblocks: {e}"));
        assert_eq!(v["result"]["status"], "OK", "generateblocks: {v}");
    }

    /// Logs monerod rotated away itself (bitmonero.log-DATE).
    fn rotated_logs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("bitmonero.log-"))
            .collect()
    }
}

impl Drop for Monerod {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(30));
    }
}

#[test]
fn monerod_height_from_its_log_across_its_own_rotation_and_truncation() {
    require_root();
    let cgroup = Cgroup::new();
    // a small log: monerod renames it and opens a new one every few blocks
    let node = Monerod::start(&cgroup, 8_000);
    let agent = Agent::start(&agent_config("xmr", "monero", &cgroup, node.dir.path()));
    let log = node.dir.path().join("bitmonero.log");

    let mine = || node.mine(1);
    // the tip's height is get_info.height minus one
    let tip = || node.height() - 1;
    // monerod logs no height at start: the first block added is the first
    mine();
    wait_for("xmr: height 1 from the log", Duration::from_secs(10), || {
        (figure(&agent.metrics(), "nodescope_chain_height", "xmr") == Some(1.0)).then_some(())
    });
    assert_eq!(tip(), 1);
    let height = mine_and_follow(&agent, "xmr", 8, &mine, &tip);
    assert_eq!(height, 9);
    let rotated = node.rotated_logs();
    assert!(!rotated.is_empty(), "monerod did not rotate its log");
    eprintln!("monerod rotated its log to {rotated:?}");
    let age = figure(&agent.metrics(), "nodescope_chain_tip_age_seconds", "xmr").unwrap();
    assert!((0.0..30.0).contains(&age), "tip age {age}");

    // copy-truncate
    std::fs::copy(&log, node.dir.path().join("copied.log")).unwrap();
    std::fs::OpenOptions::new().write(true).open(&log).unwrap().set_len(0).unwrap();
    let height = mine_and_follow(&agent, "xmr", 3, &mine, &tip);
    assert_eq!(height, 12);

    let chain = chain_section(&agent);
    assert_eq!(chain["height"], height, "{chain}");
    assert_eq!(chain["source"], "log", "{chain}");
    assert_eq!(chain["log_file"], log.display().to_string(), "{chain}");
}

/// The rule's state and evidence in /health/detailed.
fn stalled_rule(agent: &Agent) -> Option<(String, Value)> {
    let d = agent.json("/health/detailed");
    let r = d["targets"][0]["rules"].as_array()?.iter().find(|r| r["id"] == "chain_stalled")?.clone();
    Some((r["state"].as_str()?.to_string(), r["evidence"].clone()))
}

/// Blocks every 2 s for 12 s: chain_stalled stays ok, judged from the log.
/// Mining stops: it stays ok until `threshold` seconds after the last
/// block, then fires (within 3 s more). A block: it clears within 3 s.
fn stall_fires_and_clears(agent: &Agent, target: &str, threshold: u64, mine: &dyn Fn(), node_height: &dyn Fn() -> u64) {
    wait_for("chain_stalled evaluated", Duration::from_secs(30), || {
        stalled_rule(agent).filter(|(s, ev)| s != "unknown" && ev["source"] == "log")
    });
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        mine();
        let (state, ev) = stalled_rule(agent).unwrap();
        assert_eq!(state, "ok", "{target}: chain_stalled while blocks come: {ev}");
        std::thread::sleep(Duration::from_secs(2));
    }
    mine();
    let last = Instant::now();
    let height = node_height();
    wait_for(&format!("{target}: height {height}"), Duration::from_secs(5), || {
        (figure(&agent.metrics(), "nodescope_chain_height", target) == Some(height as f64)).then_some(())
    });
    let ev = loop {
        let (state, ev) = stalled_rule(agent).unwrap();
        if state == "firing" {
            break ev;
        }
        assert!(last.elapsed() < Duration::from_secs(threshold + 3), "{target}: chain_stalled not firing: {ev}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let fired = last.elapsed();
    eprintln!("{target}: chain_stalled fired {fired:?} after the last block (threshold {threshold} s): {ev}");
    assert!(fired >= Duration::from_secs(threshold), "{target}: fired early, {fired:?}");
    assert_eq!(ev["source"], "log", "{ev}");
    assert_eq!(ev["height"], height, "{ev}");
    // the node's own word: no block since
    assert_eq!(node_height(), height);
    mine();
    let resumed = Instant::now();
    wait_for(&format!("{target}: chain_stalled cleared"), Duration::from_secs(3), || {
        stalled_rule(agent).filter(|(s, _)| s == "ok")
    });
    eprintln!("{target}: chain_stalled cleared {:?} after the next block", resumed.elapsed());
}

#[test]
fn litecoind_chain_stalled_from_its_log() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
    let _peer = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
    node.wait_peers(1);
    let address = node.address();
    node.cli(&["generatetoaddress", "1", &address]);
    let agent = Agent::start(
        &(agent_config("ltc", "litecoin", &cgroup, node.dir.path()) + "[targets.rules.chain_stalled]\nthreshold = 8\n"),
    );
    let mine = || drop(node.cli(&["generatetoaddress", "1", &address]));
    let count = || node.cli(&["getblockcount"]).parse::<u64>().unwrap();
    stall_fires_and_clears(&agent, "ltc", 8, &mine, &count);
}

#[test]
fn monerod_chain_stalled_from_its_log() {
    require_root();
    let cgroup = Cgroup::new();
    let (port, peer_port) = (free_port(), free_port());
    let node = Monerod::start_with(Some(&cgroup), 10 << 20, port, Some(peer_port), 1);
    let _peer = Monerod::start_with(None, 10 << 20, peer_port, Some(port), 1);
    wait_for("monerod peers", Duration::from_secs(60), || {
        let v = node.rpc("get_info", "{}").ok()?;
        let n =
            v["result"]["incoming_connections_count"].as_u64()? + v["result"]["outgoing_connections_count"].as_u64()?;
        (n > 0).then_some(())
    });
    node.mine(1);
    let agent = Agent::start(
        &(agent_config("xmr", "monero", &cgroup, node.dir.path()) + "[targets.rules.chain_stalled]\nthreshold = 8\n"),
    );
    let mine = || node.mine(1);
    let tip = || node.height() - 1;
    stall_fires_and_clears(&agent, "xmr", 8, &mine, &tip);
}

/// monerod at its default log level 0 logs no block it adds: the chain
/// section says the log is silent and why, no height is exported, and
/// chain_stalled falls back to the writes to its lmdb files.
#[test]
fn monerod_at_log_level_0_is_said_to_be_silent() {
    require_root();
    let cgroup = Cgroup::new();
    let node = Monerod::start_with(Some(&cgroup), 10 << 20, free_port(), None, 0);
    let agent = Agent::start(&agent_config("xmr", "monero", &cgroup, node.dir.path()));
    node.mine(2);
    assert_eq!(node.height(), 3);
    wait_for("the chain section", Duration::from_secs(20), || {
        let c = chain_section(&agent);
        c.get("source").is_some().then_some(c)
    });
    // a few intervals after the blocks: still nothing in the log
    std::thread::sleep(Duration::from_secs(2));
    let chain = chain_section(&agent);
    assert_eq!(chain["source"], "silent", "{chain}");
    assert_eq!(chain["height"], Value::Null, "{chain}");
    assert!(chain["detail"].as_str().unwrap().contains("--log-level 1"), "{chain}");
    let log = std::fs::read_to_string(node.dir.path().join("bitmonero.log")).unwrap();
    assert!(!log.contains("HEIGHT "), "monerod logged a block at level 0");
    assert_eq!(figure(&agent.metrics(), "nodescope_chain_height", "xmr"), None);
    let (_, ev) = stalled_rule(&agent).unwrap();
    eprintln!("chain_stalled at level 0: {ev}");
    assert_eq!(ev["source"], "files", "chain_stalled from the lmdb files: {ev}");
    assert!(ev["last_lmdb_write"].as_f64().is_some(), "{ev}");
}

/// A monerod at its default log level 0 that synchronized from a peer: its
/// log has the sync lines ("Synced N/M", "You are now synchronized") and
/// then nothing as new blocks arrive. chain_stalled must not count from
/// that last sync line (a healthy node would page for good): it judges the
/// node's lmdb writes, stays ok while the peer's blocks come, fires once
/// they stop for longer than the threshold, and clears on the next block.
#[test]
fn synchronized_monerod_at_log_level_0_is_judged_by_its_lmdb_writes() {
    require_root();
    let cgroup = Cgroup::new();
    let (port, peer_port) = (free_port(), free_port());
    let mut node = Monerod::start_with(Some(&cgroup), 10 << 20, port, Some(peer_port), 0);
    let peer = Monerod::start_with(None, 10 << 20, peer_port, Some(port), 1);
    let connected = |node: &Monerod| {
        wait_for("monerod peers", Duration::from_secs(60), || {
            let v = node.rpc("get_info", "{}").ok()?;
            let n = v["result"]["incoming_connections_count"].as_u64()?
                + v["result"]["outgoing_connections_count"].as_u64()?;
            (n > 0).then_some(())
        })
    };
    connected(&node);
    peer.mine(1);
    // blocks mined while the node is down: it syncs them when it is back,
    // and logs that sync at level 0 ("Synced N/M"), nothing after
    stop_child(&mut node.child, Duration::from_secs(30));
    peer.mine(30);
    node.restart(Some(&cgroup));
    connected(&node);
    let log = wait_for("the node synchronized from its peer", Duration::from_secs(90), || {
        let log = std::fs::read_to_string(node.dir.path().join("bitmonero.log")).unwrap_or_default();
        (node.height() == peer.height() && log.contains("Synced ")).then_some(log)
    });
    eprintln!(
        "{}",
        log.lines().filter(|l| l.contains("ynced") || l.contains("ynchronized")).collect::<Vec<_>>().join("\n")
    );
    let agent = Agent::start(
        &(agent_config("xmr", "monero", &cgroup, node.dir.path()) + "[targets.rules.chain_stalled]\nthreshold = 8\n"),
    );
    // the log gave a height (the sync's), and no tip age: it follows no block
    let chain = wait_for("the chain section from the log", Duration::from_secs(20), || {
        let c = chain_section(&agent);
        (c["source"] == "log").then_some(c)
    });
    eprintln!("chain section: {chain}");
    assert_eq!(chain["tip_age_seconds"], Value::Null, "{chain}");
    wait_for("chain_stalled evaluated", Duration::from_secs(30), || {
        stalled_rule(&agent).filter(|(s, _)| s != "unknown")
    });
    // the peer's blocks every 2 s for 14 s, past the threshold since the sync line
    let until = Instant::now() + Duration::from_secs(14);
    while Instant::now() < until {
        peer.mine(1);
        let (state, ev) = stalled_rule(&agent).unwrap();
        assert_eq!(state, "ok", "chain_stalled while blocks come: {ev}");
        assert_eq!(ev["source"], "files", "{ev}");
        std::thread::sleep(Duration::from_secs(2));
    }
    peer.mine(1);
    let last = Instant::now();
    let height = peer.height();
    wait_for("the node took the last block", Duration::from_secs(10), || (node.height() == height).then_some(()));
    let ev = loop {
        let (state, ev) = stalled_rule(&agent).unwrap();
        if state == "firing" {
            break ev;
        }
        assert!(last.elapsed() < Duration::from_secs(8 + 5), "chain_stalled not firing: {ev}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let fired = last.elapsed();
    eprintln!("level 0: chain_stalled fired {fired:?} after the last block: {ev}");
    assert!(fired >= Duration::from_secs(7), "fired early, {fired:?}: {ev}");
    assert_eq!(ev["source"], "files", "{ev}");
    peer.mine(1);
    let resumed = Instant::now();
    wait_for("chain_stalled cleared", Duration::from_secs(5), || stalled_rule(&agent).filter(|(s, _)| s == "ok"));
    eprintln!("level 0: chain_stalled cleared {:?} after the next block", resumed.elapsed());
}

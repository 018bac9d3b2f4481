//! SIGHUP reloads the config of the running agent: a target added (a second
//! litecoind) is watched within an interval while the first target's
//! counters go on (checked against the node's own getpeerinfo); a broken
//! file is refused with check-config's reason and the old config keeps
//! running; SIGUSR1 does no harm.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn config_for(agent_port: u16, nodes: &[(&str, &Litecoind, &Cgroup)]) -> String {
    let mut s = format!("[http]\nlisten = \"127.0.0.1:{agent_port}\"\n[agent]\ninterval = \"1s\"\ndiscover = false\n");
    for (name, node, cgroup) in nodes {
        s += &format!(
            "\n[[targets]]\nname = \"{name}\"\ncgroup = \"{}\"\nchain = \"litecoin\"\np2p_ports = [{}]\nrpc_ports = [{}]\n",
            cgroup.path.display(),
            node.port,
            node.rpcport
        );
    }
    s
}

fn signal(agent: &Agent, sig: libc::c_int) {
    // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(agent.child.id() as libc::pid_t, sig) }, 0);
}

/// P2P payload bytes the agent counts for `target`, both directions.
fn agent_bytes(agent: &Agent, target: &str) -> f64 {
    metric_sum(&agent.metrics(), "nodescope_peer_io_bytes_total", &[("nodescope_target", target)])
}

/// The node's own count of P2P bytes, both directions, over its peers.
fn node_bytes(node: &Litecoind) -> f64 {
    node.peers().iter().map(|p| p["bytessent"].as_f64().unwrap_or(0.0) + p["bytesrecv"].as_f64().unwrap_or(0.0)).sum()
}

/// The agent's bytes for `target` within 1 % of the node's, once the node's
/// counters stand still.
fn assert_bytes_match(agent: &Agent, target: &str, node: &Litecoind) -> f64 {
    let mut last = (0.0, 0.0);
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(1500));
        let (theirs, ours) = (node_bytes(node), agent_bytes(agent, target));
        if theirs > 0.0 && (ours - theirs).abs() <= theirs * 0.01 + 512.0 {
            return ours;
        }
        last = (theirs, ours);
    }
    panic!("{target}: agent {} bytes, node {} bytes\n{}", last.1, last.0, agent.log());
}

#[test]
fn sighup_adds_a_target_keeps_counters_and_refuses_a_broken_file() {
    require_root();
    let (cg_a, cg_b) = (Cgroup::new(), Cgroup::new());
    let a = Litecoind::start(Some(&cg_a), &[]);
    let b = Litecoind::start(Some(&cg_b), &[format!("-connect={}", a.addr())]);
    a.wait_peers(1);
    let agent = Agent::start(&config_for(0, &[("a", &a, &cg_a)]).replace("[http]\nlisten = \"127.0.0.1:0\"\n", ""));
    let config_path = agent.dir.path().join("nodescope.toml");
    let port = agent.port;
    // a's bytes as the node counts them, before the reload
    a.mine(20);
    let before = assert_bytes_match(&agent, "a", &a);
    assert_eq!(metric_sum(&agent.metrics(), "nodescope_connection_open", &[("nodescope_target", "b")]), 0.0);
    assert!(!agent.metrics().contains("nodescope_target=\"b\""));

    // b added to the file; SIGHUP
    std::fs::write(&config_path, config_for(port, &[("a", &a, &cg_a), ("b", &b, &cg_b)])).unwrap();
    let hup = Instant::now();
    signal(&agent, libc::SIGHUP);
    let seen = wait_for("b's figures after SIGHUP", Duration::from_secs(10), || {
        let m = agent.metrics();
        (metric_sum(&m, "nodescope_connection_open", &[("nodescope_target", "b"), ("nodescope_service", "p2p")]) >= 1.0)
            .then(|| hup.elapsed())
    });
    eprintln!("b's open P2P connection on /metrics {seen:?} after SIGHUP (interval 1 s)");
    // within one interval (1 s) of the signal
    assert!(seen <= Duration::from_secs(1), "b appeared {seen:?} after SIGHUP");
    // a's counters went on from where they were (no reset), and keep
    // matching the node's own through more traffic
    assert!(agent_bytes(&agent, "a") >= before);
    a.mine(20);
    let after = assert_bytes_match(&agent, "a", &a);
    assert!(after > before, "a's bytes {before} -> {after}");
    assert_bytes_match(&agent, "b", &b);
    let m = agent.metrics();
    assert_eq!(metric_sum(&m, "nodescope_config_reloads_total", &[("result", "applied")]), 1.0);

    // [http] bounds apply on reload too: 10 requests at once from one client
    // all answered at the default rate, then 429s past a bucket of 2
    let statuses = || (0..10).map(|_| http_get(port, "/peers").unwrap().0).collect::<Vec<u16>>();
    assert!(statuses().iter().all(|s| *s == 200));
    let limited = config_for(port, &[("a", &a, &cg_a), ("b", &b, &cg_b)])
        .replace("[agent]", "requests_per_second = 1\nburst = 2\n[agent]");
    std::fs::write(&config_path, limited).unwrap();
    signal(&agent, libc::SIGHUP);
    wait_for("the second reload applied", Duration::from_secs(10), || {
        (metric_sum(&agent.metrics(), "nodescope_config_reloads_total", &[("result", "applied")]) == 2.0).then_some(())
    });
    std::thread::sleep(Duration::from_secs(3));
    let got = statuses();
    assert_eq!(got.iter().filter(|s| **s == 429).count(), 8, "after http.burst = 2: {got:?}");
    // probes are never limited
    assert_eq!(http_get(port, "/health/live").unwrap().0, 200);

    // a broken file: refused with check-config's reason, the running config kept
    let broken = config_for(port, &[("a", &a, &cg_a)]).replace("interval = \"1s\"", "interval = \"soon\"");
    std::fs::write(&config_path, broken).unwrap();
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_nodescope"))
        .args(["check-config"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert_eq!(check.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&check.stderr).to_string();
    let reason =
        stderr.trim().strip_prefix("nodescope: config error: ").unwrap_or_else(|| panic!("{stderr}")).to_string();
    assert!(reason.contains("agent.interval"), "{reason}");
    signal(&agent, libc::SIGHUP);
    wait_for("the refusal in the log", Duration::from_secs(10), || {
        agent.log().lines().find(|l| l.contains("SIGHUP: config error:") && l.contains(&reason)).map(str::to_string)
    });
    std::thread::sleep(Duration::from_millis(2500));
    let m = agent.metrics();
    assert_eq!(metric_sum(&m, "nodescope_config_reloads_total", &[("result", "rejected")]), 1.0);
    assert!(
        metric_sum(&m, "nodescope_connection_open", &[("nodescope_target", "b"), ("nodescope_service", "p2p")]) >= 1.0,
        "b no longer watched after a refused reload"
    );

    // SIGUSR1 and SIGUSR2: logged, nothing else; nor do the other signals
    // whose default is to end a process (timers, I/O, power, limits, the
    // real-time range)
    signal(&agent, libc::SIGUSR1);
    signal(&agent, libc::SIGUSR2);
    for sig in [libc::SIGALRM, libc::SIGVTALRM, libc::SIGPROF, libc::SIGIO, libc::SIGPWR, libc::SIGXCPU] {
        signal(&agent, sig);
    }
    signal(&agent, libc::SIGRTMIN() + 3);
    signal(&agent, libc::SIGRTMAX());
    std::thread::sleep(Duration::from_millis(1500));
    let mut agent = agent;
    assert!(agent.child.try_wait().unwrap().is_none(), "the agent exited on a stray signal:\n{}", agent.log());
    assert_eq!(http_get(port, "/health/live").unwrap().0, 200);
    assert!(agent.log().contains("SIGUSR1: nothing to do"));
    assert!(agent.log().contains("SIGALRM: ignored") && agent.log().contains("SIGPWR: ignored"));
    assert!(agent_bytes(&agent, "a") >= after);

    // b removed, and a rule setting of another rule changed: b is no longer
    // watched (its bytes stop while the nodes go on talking), a's counters go
    // on, and a's rules that did not change keep their timers
    // (still under http.burst = 2: a 429 is waited out)
    let get_ok = |path: &str| {
        wait_for(&format!("{path} past the rate limit"), Duration::from_secs(10), || {
            let (status, body) = agent.get(path);
            if status == 429 {
                std::thread::sleep(Duration::from_millis(300));
            }
            (status == 200).then_some(body)
        })
    };
    let since = |rule: &str| {
        let body = get_ok("/health/detailed");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let t = v["targets"].as_array().unwrap().iter().find(|t| t["name"] == "a").cloned().unwrap();
        t["rules"].as_array().unwrap().iter().find(|r| r["id"] == rule).unwrap()["since"].as_u64().unwrap()
    };
    let no_peers_since = since("no_peers");
    let b_bytes = metric_sum(&get_ok("/metrics"), "nodescope_peer_io_bytes_total", &[("nodescope_target", "b")]);
    let only_a = config_for(port, &[("a", &a, &cg_a)]) + "\n[rules.low_peers]\nthreshold = 2\n";
    std::fs::write(&config_path, only_a).unwrap();
    signal(&agent, libc::SIGHUP);
    wait_for("the third reload applied", Duration::from_secs(10), || {
        (metric_sum(&get_ok("/metrics"), "nodescope_config_reloads_total", &[("result", "applied")]) == 3.0)
            .then_some(())
    });
    wait_for("b gone from /health/detailed", Duration::from_secs(5), || {
        let (_, body) = agent.get("/health/detailed");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["targets"].as_array().unwrap().iter().all(|t| t["name"] != "b").then_some(())
    });
    a.mine(20);
    let last = assert_bytes_match(&agent, "a", &a);
    assert!(last > after, "a's bytes {after} -> {last}");
    let b_after = agent_bytes(&agent, "b");
    assert!(b_after <= b_bytes, "b's bytes still counted after it was removed: {b_bytes} -> {b_after}");
    assert_eq!(since("no_peers"), no_peers_since, "no_peers' timer restarted by a reload that did not change it");

    // http.listen moved: a port that cannot be bound refuses the reload
    // (the old one keeps serving); a free one serves from then on, and the
    // old one stops accepting
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    std::fs::write(&config_path, config_for(taken_port, &[("a", &a, &cg_a)])).unwrap();
    signal(&agent, libc::SIGHUP);
    wait_for("the refused listen address in the log", Duration::from_secs(10), || {
        agent.log().contains(&format!("SIGHUP: http.listen: binding 127.0.0.1:{taken_port}")).then_some(())
    });
    assert_eq!(http_get(port, "/health/live").unwrap().0, 200);
    // (/metrics is encoded once per collection)
    wait_for("the second refusal counted", Duration::from_secs(5), || {
        (metric_sum(&agent.metrics(), "nodescope_config_reloads_total", &[("result", "rejected")]) == 2.0).then_some(())
    });
    drop(taken);
    let moved = free_port();
    std::fs::write(&config_path, config_for(moved, &[("a", &a, &cg_a)])).unwrap();
    signal(&agent, libc::SIGHUP);
    wait_for("the new listen address serving", Duration::from_secs(10), || {
        http_get(moved, "/health/live").ok().filter(|r| r.0 == 200)
    });
    wait_for("the old listen address closed", Duration::from_secs(5), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err().then_some(())
    });
    let m = wait_for("the fourth reload counted", Duration::from_secs(5), || {
        let (status, m) = http_get(moved, "/metrics").unwrap();
        (status == 200 && metric_sum(&m, "nodescope_config_reloads_total", &[("result", "applied")]) == 4.0)
            .then_some(m)
    });
    assert!(metric_sum(&m, "nodescope_peer_io_bytes_total", &[("nodescope_target", "a")]) >= last);
    drop(agent);
    drop(b);
    drop(a);
}

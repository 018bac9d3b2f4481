//! Bounds under churn: 100,000 distinct short-lived connections, each from
//! its own loopback address, into the P2P port of a watched node, with the
//! agent's `[limits]` set low enough that every bound is hit. The node is a
//! small accept-and-close server (python3) in the watched cgroup, not
//! litecoind: litecoind takes at most -maxconnections peers and bans and
//! throttles, so it could not take 100,000 connections in minutes and the
//! test could not know which it saw.
//!
//! Shown: the kernel's connection table holds at its bound and what it
//! could not hold is counted; peers past `limits.max_peers` are counted as
//! overflowed, exactly as many as the agent saw beyond the bound; the
//! per-peer series stay within `limits.top_peers` + "other" and no metric
//! gains series as peers come and go; the agent's RSS (its floor at rest)
//! grows by less than 5 % after a warm-up of 40,000 connections; /peers lists
//! at most `limits.max_connections` connections and says when it is cut
//! short.

mod common;

use std::collections::BTreeMap;
use std::io::Read;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

const TARGET: &str = "churn";
const MAX_CONNECTIONS: u64 = 64;
const TOP_PEERS: usize = 4;
const MAX_PEERS: u64 = 32;
const TOTAL: u32 = 100_000;
const WARM_UP: u32 = 40_000;
/// The last connections of the warm-up and of the rest, made as fast as
/// they go: a burst past what the kernel's per-CPU event logs hold for one
/// interval.
const BURST: u32 = 5_000;
/// The pace of the others: most connections are seen (and folded) by the
/// agent, in an interval of 100 ms.
const PER_SECOND: f64 = 2_000.0;
const THREADS: u32 = 4;

/// The health rules keep one sample per interval for their longest look-back
/// (an hour by default, bounded by a sample count): memory that grows with
/// time up to its bound, whatever the peers. Short windows fill it within
/// the warm-up, so what the RSS check sees after it is the cost of churn.
const RULE_WINDOWS: &str = "[rules.partition_suspected]\nwindow = \"2s\"\n[rules.fsync_slow]\nwindow = \"2s\"\n\
    [rules.inbound_flood]\nwindow = \"2s\"\n[rules.connect_failures_high]\nwindow = \"2s\"\n\
    [rules.peer_churn_high]\nwindow = \"2s\"\n";

/// glibc's malloc raises its trim threshold to twice the largest block it
/// freed from an mmap (up to 64 MiB): after one 4 MiB buffer, up to 8 MiB of
/// free heap stays resident until it is trimmed at once, which is slack of
/// the allocator, not memory the agent holds. Set, the thresholds stay at
/// their defaults (128 KiB), so VmRSS follows what the agent holds.
const MALLOC_FIXED: &str = "glibc.malloc.trim_threshold=131072:glibc.malloc.mmap_threshold=131072";

/// The i-th client address: in 8 netgroups (127.1/16 to 127.8/16) from the
/// start, more than top_peers, so the warm-up reaches the netgroup bound too.
fn client_ip(i: u32) -> Ipv4Addr {
    let rest = i / 8;
    Ipv4Addr::new(127, 1 + (i % 8) as u8, (rest / 256) as u8, (rest % 256) as u8)
}

/// The agent's VmRSS floor over a few seconds at rest: the least of samples
/// 250 ms apart, so a transient buffer of one collection is not counted.
fn rss_floor(pid: u32) -> u64 {
    (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(250));
            vm_rss_kib(pid)
        })
        .min()
        .unwrap()
}

/// The server: on `churn_port` it accepts and closes at once; on
/// `hold_port` it keeps each connection until the client closes it.
fn server_script(churn_port: u16, hold_port: u16) -> String {
    format!(
        r#"import selectors, socket
sel = selectors.DefaultSelector()
def listener(port, what):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(4096)
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, what)
    return s
churn = listener({churn_port}, "churn")
hold = listener({hold_port}, "hold")
while True:
    for key, _ in sel.select():
        if key.data == "churn":
            while True:
                try:
                    c, _ = churn.accept()
                except BlockingIOError:
                    break
                c.close()
        elif key.data == "hold":
            while True:
                try:
                    c, _ = hold.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                sel.register(c, selectors.EVENT_READ, "conn")
        else:
            c = key.fileobj
            try:
                d = c.recv(4096)
            except OSError:
                d = b""
            if not d:
                sel.unregister(c)
                c.close()
"#
    )
}

/// One short-lived connection from client `i`: connect, read the server's
/// close, close.
fn one_connection(i: u32, port: u16) -> std::io::Result<()> {
    let mut s = connect_from(client_ip(i), port)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 16];
    while s.read(&mut buf)? > 0 {}
    Ok(())
}

/// Connections `from..to`, spread over THREADS threads, at most `per_second`
/// of them a second (None: as fast as they go); returns the failures.
fn connect_range(from: u32, to: u32, port: u16, per_second: Option<f64>) -> u64 {
    let failed = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(u64::from(from)));
    let start = Instant::now();
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let (failed, next) = (failed.clone(), next.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= u64::from(to) {
                    return;
                }
                if let Some(rate) = per_second {
                    let due = start + Duration::from_secs_f64((i - u64::from(from)) as f64 / rate);
                    std::thread::sleep(due.saturating_duration_since(Instant::now()));
                }
                if let Err(e) = one_connection(i as u32, port) {
                    if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("connection {i} from {}: {e}", client_ip(i as u32));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    failed.load(Ordering::Relaxed)
}

fn target_sum(m: &str, name: &str, extra: &[(&str, &str)]) -> u64 {
    let mut labels = vec![("nodescope_target", TARGET)];
    labels.extend_from_slice(extra);
    metric_sum(m, name, &labels) as u64
}

fn inbound(m: &str, name: &str) -> u64 {
    target_sum(m, name, &[("nodescope_connection_direction", "inbound"), ("nodescope_service", "p2p")])
}

/// P2P connections of the target closed, either direction.
fn p2p_closed(m: &str) -> u64 {
    target_sum(m, "nodescope_connection_closed_total", &[("nodescope_service", "p2p")])
}

/// Waits until no connection is open and two scrapes a second apart agree
/// on every connection and peer counter.
fn settled(agent: &Agent) -> String {
    let keep = |t: &str| {
        t.lines()
            .filter(|l| {
                l.starts_with("nodescope_connection_")
                    || l.starts_with("nodescope_peer_")
                    || l.starts_with("nodescope_net_")
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut last = agent.metrics();
    wait_for("the agent to settle", Duration::from_secs(60), || {
        std::thread::sleep(Duration::from_secs(1));
        let m = agent.metrics();
        let open = target_sum(&m, "nodescope_connection_open", &[("nodescope_service", "p2p")]);
        let same = keep(&m) == keep(&last) && open == 0;
        last = m.clone();
        same.then_some(m)
    })
}

/// What a sampler saw while connections came and went.
#[derive(Default, Debug)]
struct Seen {
    scrapes: u64,
    /// (seconds since the test started, agent VmRSS KiB)
    rss: Vec<(u64, u64)>,
    max_conns_entries: u64,
    conns_capacity: u64,
    max_peer_series: usize,
}

fn sample(m: &str, seen: &mut Seen) {
    seen.scrapes += 1;
    let entries = metric_sum(m, "nodescope_bpf_map_entries", &[("map", "ns_conns")]) as u64;
    seen.max_conns_entries = seen.max_conns_entries.max(entries);
    seen.conns_capacity = metric_sum(m, "nodescope_bpf_map_capacity", &[("map", "ns_conns")]) as u64;
    seen.max_peer_series = seen.max_peer_series.max(series_of(m, "nodescope_peer_io_bytes_total").len());
}

/// Per-peer series of the target by io direction: at most top_peers + "other" each.
fn assert_peer_series_bounded(m: &str) {
    for metric in ["nodescope_peer_io_bytes_total", "nodescope_netgroup_io_bytes_total"] {
        let mut per_direction: BTreeMap<&str, usize> = BTreeMap::new();
        for labels in series_of(m, metric) {
            let io = if labels.contains("network_io_direction=\"transmit\"") { "transmit" } else { "receive" };
            *per_direction.entry(io).or_default() += 1;
        }
        for (io, n) in &per_direction {
            assert!(*n <= TOP_PEERS + 1, "{metric}: {n} {io} series, more than top_peers + 1:\n{m}");
        }
        eprintln!("{metric}: series per io direction {per_direction:?}");
    }
}

#[test]
fn bounds_hold_under_100k_distinct_peers() {
    require_root();
    require_tool("python3", "python3");
    let cgroup = Cgroup::new();
    let dir = TempDir::new("churn");
    let (churn_port, hold_port) = (free_port(), free_port());
    let server = Stopped(spawn_in(
        Some(&cgroup),
        "python3",
        &["-c".into(), server_script(churn_port, hold_port)],
        &dir.path().join("server.log"),
    ));
    // before the agent starts: this connection from 127.0.0.1 is no peer of its
    wait_for("the server listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", hold_port)).ok().map(drop)
    });
    let agent = Agent::start_with_env(
        &format!(
            "[agent]\ninterval = \"100ms\"\n\n[limits]\nmax_connections = {MAX_CONNECTIONS}\ntop_peers = {TOP_PEERS}\n\
         max_peers = {MAX_PEERS}\npeer_ttl = \"1h\"\n\n[[targets]]\nname = \"{TARGET}\"\ncgroup = \"{}\"\n\
         p2p_ports = [{churn_port}, {hold_port}]\n\n{RULE_WINDOWS}",
            cgroup.path.display()
        ),
        &[("GLIBC_TUNABLES", MALLOC_FIXED)],
    );
    wait_for("the target in /peers", Duration::from_secs(20), || {
        agent.json("/peers")["targets"].as_array()?.iter().any(|t| t["name"] == TARGET).then_some(())
    });
    let agent_pid = agent.child.id();
    let started = Instant::now();

    // Sampler: /metrics once a second while connections come and go.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, port) = (stop.clone(), agent.port);
        std::thread::spawn(move || {
            let mut seen = Seen::default();
            while !stop.load(Ordering::Relaxed) {
                if let Ok((200, m)) = http_get(port, "/metrics") {
                    sample(&m, &mut seen);
                }
                seen.rss.push((started.elapsed().as_secs(), vm_rss_kib(agent_pid)));
                std::thread::sleep(Duration::from_secs(1));
            }
            seen
        })
    };

    // Warm-up: what the rest does, paced then a burst.
    let mut failed = connect_range(0, WARM_UP - BURST, churn_port, Some(PER_SECOND));
    failed += connect_range(WARM_UP - BURST, WARM_UP, churn_port, None);
    let m_warm = settled(&agent);
    let rss_warm = rss_floor(agent_pid);
    let series_warm = series_per_metric(&m_warm);
    eprintln!(
        "warm-up: {WARM_UP} connections in {:?}, agent VmRSS {rss_warm} KiB, overflowed {}, dropped {}",
        started.elapsed(),
        target_sum(&m_warm, "nodescope_peer_overflowed_total", &[]),
        metric_sum(&m_warm, "nodescope_net_connections_dropped_total", &[])
    );

    let paced = Instant::now();
    failed += connect_range(WARM_UP, TOTAL - BURST, churn_port, Some(PER_SECOND));
    let paced = f64::from(TOTAL - BURST - WARM_UP) / paced.elapsed().as_secs_f64();
    let burst = Instant::now();
    failed += connect_range(TOTAL - BURST, TOTAL, churn_port, None);
    let burst = f64::from(BURST) / burst.elapsed().as_secs_f64();
    let m = settled(&agent);
    let rss_end = rss_floor(agent_pid);
    stop.store(true, Ordering::Relaxed);
    let mut seen = sampler.join().unwrap();
    sample(&m, &mut seen);
    assert_eq!(failed, 0, "client connections failed");

    let opened = inbound(&m, "nodescope_connection_opened_total");
    let closed = inbound(&m, "nodescope_connection_closed_total");
    // A few accepted connections reach the agent with local port 0, so it
    // infers them outbound: closed with no open. Those whose "opened" event
    // found its CPU's event log full and whose close was read from the socket:
    // at TCP_CLOSE, tcp_set_state releases the port (inet_num = 0) before the
    // state store that fires inet_sock_set_state (seen on 6.18 with
    // bpftrace: skc_num is 0 at every TCP_CLOSE), so skc_num no longer holds
    // it (inet_sport still does). Said here, not judged; counted below so
    // that every peer the agent tracked is.
    let misread = p2p_closed(&m) - closed;
    let overflowed = target_sum(&m, "nodescope_peer_overflowed_total", &[]);
    let dropped = metric_sum(&m, "nodescope_net_connections_dropped_total", &[]) as u64;
    let deferred = metric_sum(&m, "nodescope_net_close_events_deferred_total", &[]) as u64;
    eprintln!(
        "{TOTAL} connections ({paced:.0}/s paced, {burst:.0}/s in the burst): agent counted {opened} opened, {closed} closed; \
         {overflowed} peers overflowed; kernel: {dropped} dropped, {deferred} close events deferred; {seen:?}"
    );

    for l in m.lines().filter(|l| l.starts_with("nodescope_connection_") && !l.contains("_bucket")) {
        eprintln!("  {l}");
    }
    // The kernel's table held at its bound, and what it could not hold was counted.
    assert_eq!(seen.conns_capacity, MAX_CONNECTIONS, "ns_conns capacity is limits.max_connections");
    assert!(seen.max_conns_entries <= MAX_CONNECTIONS, "{seen:?}");
    assert!(deferred > 0, "the event logs never filled: the test did not reach the bound");
    // Every connection the agent saw was closed once (it tracked each as
    // one peer, as every client address is new); those it never saw were
    // dropped by the kernel, counted at least once each.
    assert!(closed <= u64::from(TOTAL), "more closes than connections: {closed}");
    assert!(closed + dropped >= u64::from(TOTAL), "connections neither counted nor dropped: {closed} + {dropped}");
    if dropped == 0 && deferred == 0 {
        assert_eq!(closed, u64::from(TOTAL));
    }
    // Peers past max_peers (peer_ttl is longer than the test, so the first
    // max_peers stay): one overflow per peer the agent saw beyond the bound.
    eprintln!("{misread} accepted connections were closed as outbound ones, with no open: local port 0");
    assert_eq!(
        target_sum(&m, "nodescope_connection_opened_total", &[("nodescope_connection_direction", "outbound")]),
        0,
        "the server opened no connection"
    );
    assert_eq!(
        overflowed,
        p2p_closed(&m) - MAX_PEERS,
        "overflowed peers: distinct peers seen ({}) minus max_peers",
        p2p_closed(&m)
    );
    // (at the end of the warm-up, some peers may be tracked and neither
    // listed open nor closed yet: said, not judged)
    eprintln!(
        "at the end of the warm-up: {} overflowed, {} closed",
        target_sum(&m_warm, "nodescope_peer_overflowed_total", &[]),
        p2p_closed(&m_warm)
    );

    // Cardinality: within top_peers + "other", and nothing grew with 60,000 more peers.
    assert_peer_series_bounded(&m);
    assert!(seen.max_peer_series <= 2 * (TOP_PEERS + 1), "{seen:?}");
    let series_end = series_per_metric(&m);
    let grew: Vec<_> = series_end
        .iter()
        .filter(|(name, n)| series_warm.get(*name).is_none_or(|w| *n > w))
        .map(|(name, n)| format!("{name}: {} -> {n}", series_warm.get(name).copied().unwrap_or(0)))
        .collect();
    assert!(grew.is_empty(), "series that grew after warm-up: {grew:?}");

    // Memory: under 5 % growth after warm-up.
    let growth = (rss_end as f64 - rss_warm as f64) / rss_warm as f64;
    eprintln!("agent VmRSS: {rss_warm} KiB after warm-up, {rss_end} KiB at the end ({:+.2} %)", growth * 100.0);
    assert!(growth < 0.05, "agent RSS grew {:.1} % after warm-up", growth * 100.0);

    // /peers at the bound: more open connections than the kernel table
    // holds. It lists at most max_connections and says it is cut short.
    const HELD: u32 = 200;
    let held: Vec<_> = (0..HELD)
        .map(|i| connect_from(Ipv4Addr::new(127, 100, (i / 250) as u8, (i % 250 + 1) as u8), hold_port).unwrap())
        .collect();
    let (listed, truncated) = wait_for("/peers to say it is truncated", Duration::from_secs(20), || {
        let v = agent.json("/peers");
        let peers = peers_of_target(&agent, TARGET).len();
        (v["truncated"] == true).then_some((peers, v))
    });
    eprintln!("{HELD} connections held open: /peers lists {listed}, truncated {}", truncated["truncated"]);
    assert!(listed as u64 <= MAX_CONNECTIONS, "/peers lists {listed} connections, above max_connections");
    assert!(listed > 0, "/peers lists none of the held connections");
    let m_held = agent.metrics();
    let held_dropped = metric_sum(&m_held, "nodescope_net_connections_dropped_total", &[]) as u64 - dropped;
    assert!(held_dropped > 0);
    // still said while they stay out, after the drops were counted
    std::thread::sleep(Duration::from_secs(2));
    let later = metric_sum(&agent.metrics(), "nodescope_net_connections_dropped_total", &[]) as u64 - dropped;
    eprintln!(
        "dropped while {HELD} were held: {held_dropped}, 2 s later {later}, for {} connections left out",
        HELD - listed as u32
    );
    let v = agent.json("/peers");
    assert_eq!(v["truncated"], true, "{v}");
    // the kernel's table is full, and no fuller than its bound
    assert_eq!(metric_sum(&m_held, "nodescope_bpf_map_entries", &[("map", "ns_conns")]) as u64, MAX_CONNECTIONS);
    assert_peer_series_bounded(&m_held);
    drop(held);
    wait_for("/peers complete again", Duration::from_secs(20), || {
        let v = agent.json("/peers");
        (v["truncated"] == false && peers_of_target(&agent, TARGET).is_empty()).then_some(())
    });

    drop((agent, server));
    drop(cgroup);
    eprintln!("churn test took {:?}", started.elapsed());
}

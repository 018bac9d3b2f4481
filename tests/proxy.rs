//! Peers behind a proxy: litecoind with `-proxy` reaches its peers through a
//! SOCKS5 server the test runs on loopback (a real one, small: Debian's tor
//! would need the network). nodescope must show those connections as service
//! "proxy" (the kernel sees only the proxy's address), count them as peers,
//! and not judge netgroup diversity by the proxy's one address.
//!
//! Truth from outside: the SOCKS server records, per connection, the bytes of
//! the SOCKS handshake each way and where the node asked to go; the node's
//! getpeerinfo gives the P2P bytes. The kernel's payload counts, which
//! nodescope reports, are the sum of the two.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// What the SOCKS server saw of one connection from the node.
#[derive(Debug, Clone, Copy)]
struct Handshake {
    /// The port the node asked to reach.
    dest_port: u16,
    /// SOCKS bytes the node sent before the relay started, and got back.
    from_node: u64,
    to_node: u64,
}

/// A SOCKS5 server (RFC 1928, CONNECT, no authentication) on loopback that
/// relays to loopback only; stopped when dropped.
struct Socks {
    port: u16,
    /// by the node's source port
    seen: Arc<Mutex<HashMap<u16, Handshake>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Socks {
    fn start() -> Socks {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, from)) => {
                        conn.set_nonblocking(false).unwrap();
                        let s = s.clone();
                        std::thread::spawn(move || {
                            if let Err(e) = serve(conn, from.port(), &s) {
                                eprintln!("socks: connection from port {}: {e}", from.port());
                            }
                        });
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(e) => panic!("socks accept: {e}"),
                }
            }
        });
        Socks { port, seen, stop, thread: Some(thread) }
    }
}

impl Drop for Socks {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(mut node: TcpStream, node_port: u16, seen: &Mutex<HashMap<u16, Handshake>>) -> std::io::Result<()> {
    node.set_read_timeout(Some(Duration::from_secs(10)))?;
    let (mut from_node, mut to_node) = (0u64, 0u64);
    let read = |s: &mut TcpStream, n: usize, count: &mut u64| -> std::io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        s.read_exact(&mut b)?;
        *count += n as u64;
        Ok(b)
    };
    let head = read(&mut node, 2, &mut from_node)?;
    assert_eq!(head[0], 5, "SOCKS version");
    let methods = read(&mut node, head[1] as usize, &mut from_node)?;
    assert!(methods.contains(&0), "the node offers no-authentication: {methods:?}");
    node.write_all(&[5, 0])?;
    to_node += 2;
    let req = read(&mut node, 4, &mut from_node)?;
    assert_eq!(&req[..3], &[5, 1, 0], "a CONNECT request");
    let host = match req[3] {
        1 => {
            let a = read(&mut node, 4, &mut from_node)?;
            format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
        }
        3 => {
            let len = read(&mut node, 1, &mut from_node)?[0] as usize;
            String::from_utf8_lossy(&read(&mut node, len, &mut from_node)?).into_owned()
        }
        other => panic!("address type {other}"),
    };
    let p = read(&mut node, 2, &mut from_node)?;
    let dest_port = u16::from_be_bytes([p[0], p[1]]);
    // relays to this machine's loopback only
    assert!(host == "localhost" || host == "127.0.0.1", "the test's peers are on loopback, not {host}");
    let peer = TcpStream::connect(("127.0.0.1", dest_port))?;
    node.write_all(&[5, 0, 0, 1, 127, 0, 0, 1, 0, 0])?;
    to_node += 10;
    seen.lock().unwrap().insert(node_port, Handshake { dest_port, from_node, to_node });
    node.set_read_timeout(None)?;

    // relay both ways until either side closes
    let (mut n2, mut p2) = (node.try_clone()?, peer.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut n2, &mut p2);
        let _ = p2.shutdown(Shutdown::Write);
    });
    let (mut p3, mut n3) = (peer, node);
    let _ = std::io::copy(&mut p3, &mut n3);
    let _ = n3.shutdown(Shutdown::Write);
    let _ = up.join();
    Ok(())
}

fn peers_of(agent: &Agent) -> Vec<Value> {
    let v = agent.json("/peers");
    let t = v["targets"].as_array().unwrap().iter().find(|t| t["name"] == "ltc").cloned();
    t.map(|t| t["peers"].as_array().unwrap().clone()).unwrap_or_default()
}

fn rule(agent: &Agent, id: &str) -> Option<Value> {
    let d = agent.json("/health/detailed");
    d["targets"].as_array()?.iter().find(|t| t["name"] == "ltc")?["rules"]
        .as_array()?
        .iter()
        .find(|r| r["id"] == id)
        .cloned()
}

#[test]
fn peers_behind_a_socks_proxy() {
    require_root();
    let socks = Socks::start();
    let peers: Vec<Litecoind> = (0..3).map(|_| Litecoind::start(None, &[])).collect();
    let cgroup = Cgroup::new();
    // the agent first, so the node's connections are seen opening
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"500ms\"\n\
         [rules.low_netgroup_diversity]\nfor = \"1s\"\n\
         [[targets]]\nname = \"ltc\"\ncgroup = \"{}\"\nchain = \"litecoin\"\n",
        cgroup.path.display(),
    ));
    let mut extra = vec![format!("-proxy=127.0.0.1:{}", socks.port)];
    // by name: Core never proxies a loopback IP (not routable), but hands a
    // name it may not look up to the proxy
    extra.extend(peers.iter().map(|p| format!("-connect=localhost:{}", p.port)));
    let node = Litecoind::start(Some(&cgroup), &extra);
    node.wait_peers(3);
    node.mine(20);

    // every peer of the node is behind the proxy: service "proxy", the proxy's address
    let ours = wait_for("3 proxied peers in /peers", Duration::from_secs(30), || {
        let ours = peers_of(&agent);
        (ours.len() == 3).then_some(ours)
    });
    for o in &ours {
        assert_eq!(
            (o["service"].as_str(), o["network"].as_str()),
            (Some("proxy"), Some("proxy")),
            "{o} (proxy port {}, peers {:?})",
            socks.port,
            peers.iter().map(|p| p.port).collect::<Vec<_>>()
        );
        assert_eq!((o["address"].as_str(), o["port"].as_u64()), (Some("127.0.0.1"), Some(socks.port as u64)), "{o}");
        assert_eq!(o["direction"], "outbound", "{o}");
    }

    // bytes: the node's P2P bytes plus the SOCKS handshake, per connection,
    // once the node's counters hold still for two readings
    let mut last = String::new();
    let mut matched = false;
    let mut report = String::new();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(1500));
        let theirs = node.peers();
        let sig: String =
            theirs.iter().map(|p| format!("{}:{}:{};", p["addr"], p["bytessent"], p["bytesrecv"])).collect();
        let stable = sig == last;
        last = sig;
        if !stable {
            continue;
        }
        let seen = socks.seen.lock().unwrap().clone();
        let ours = peers_of(&agent);
        report.clear();
        let mut all = theirs.len() == 3;
        for p in &theirs {
            let dest: u16 = p["addr"].as_str().unwrap().rsplit_once(':').unwrap().1.parse().unwrap();
            let Some((node_port, hs)) = seen.iter().find(|(_, h)| h.dest_port == dest) else {
                all = false;
                continue;
            };
            let Some(o) = ours.iter().find(|o| o["local_port"].as_u64() == Some(*node_port as u64)) else {
                all = false;
                continue;
            };
            let want = (p["bytessent"].as_u64().unwrap() + hs.from_node, p["bytesrecv"].as_u64().unwrap() + hs.to_node);
            let got = (o["bytes_sent"].as_u64().unwrap(), o["bytes_received"].as_u64().unwrap());
            report += &format!("peer {dest} via port {node_port}: nodescope {got:?}, node + socks {want:?} ({hs:?})\n");
            all &= got == want;
        }
        if all {
            matched = true;
            break;
        }
    }
    eprint!("{report}");
    assert!(matched, "proxied peers' bytes differ from getpeerinfo + the SOCKS handshake:\n{report}{}", agent.log());

    // counted as outbound proxy connections
    let m = agent.metrics();
    let opened = metric_sum(
        &m,
        "nodescope_connection_opened_total",
        &[("nodescope_target", "ltc"), ("nodescope_service", "proxy"), ("nodescope_connection_direction", "outbound")],
    );
    assert_eq!(opened, 3.0, "{m}");
    assert!(
        m.lines().any(|l| l.starts_with("nodescope_peer_io_bytes_total{") && l.contains("nodescope_network=\"proxy\"")),
        "{m}"
    );

    // three outbound peers behind one address: not low diversity (a
    // direct-peer rule would see one netgroup for three peers), and peers
    let r = wait_for("low_netgroup_diversity evaluated", Duration::from_secs(20), || {
        rule(&agent, "low_netgroup_diversity").filter(|r| r["state"] != "unknown")
    });
    std::thread::sleep(Duration::from_secs(3));
    let r = rule(&agent, "low_netgroup_diversity").unwrap_or(r);
    assert_eq!(r["state"], "ok", "{r}");
    assert_eq!(r["evidence"]["proxied_outbound_peers"], 3, "{r}");
    let no_peers = rule(&agent, "no_peers").unwrap();
    assert_eq!(no_peers["state"], "ok", "{no_peers}");
    drop(agent);
    drop(node);
    drop(peers);
}

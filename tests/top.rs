//! `nodescope top` against a real agent watching a litecoind regtest pair:
//! `--once` prints the peers with the bytes /peers has at that moment, the
//! target and its verdict, also when run as nobody; the live view, driven
//! through a pseudo-terminal of 80x24, shows the target, a peer row and the
//! verdict, obeys its keys, says when the agent goes away and exits on `q`;
//! off a terminal it streams plain text and stops when its reader goes away;
//! and it names an agent that is not there.

mod common;

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

fn url(agent: &Agent) -> String {
    format!("http://127.0.0.1:{}", agent.port)
}

fn peers_of(agent: &Agent) -> Vec<Value> {
    let v = agent.json("/peers");
    let t = v["targets"].as_array().unwrap().iter().find(|t| t["name"] == "ltc").cloned();
    t.map(|t| t["peers"].as_array().unwrap().clone()).unwrap_or_default()
}

fn endpoint(p: &Value) -> String {
    format!("{}:{}", p["address"].as_str().unwrap(), p["port"])
}

fn verdict(agent: &Agent) -> String {
    let v = agent.json("/health/detailed");
    let t = v["targets"].as_array().unwrap().iter().find(|t| t["name"] == "ltc").cloned().unwrap();
    t["status"].as_str().unwrap().to_string()
}

/// A regtest node in its own cgroup with one inbound peer that has traffic,
/// and an agent watching the node.
struct Net {
    agent: Agent,
    peer: Litecoind,
    node: Litecoind,
    cgroup: Cgroup,
}

impl Net {
    fn start() -> Net {
        require_root();
        let cgroup = Cgroup::new();
        let node = Litecoind::start(Some(&cgroup), &["-connect=0".to_string()]);
        let peer = Litecoind::start(None, &[format!("-connect={}", node.addr())]);
        node.wait_peers(1);
        node.mine(20);
        let agent = Agent::start(&agent_config(&node, &cgroup));
        wait_for("the peer in /peers", Duration::from_secs(30), || (peers_of(&agent).len() == 1).then_some(()));
        Net { agent, peer, node, cgroup }
    }

    fn stop(self) {
        // stop order: agent and peer first, then the node, then its cgroup
        let Net { agent, peer, node, cgroup } = self;
        drop((agent, peer, node));
        drop(cgroup);
    }
}

/// Mines a block every 300 ms (at most 100) while it lives, so the peer's bytes move.
struct Miner {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Miner {
    fn start(node: &Litecoind) -> Miner {
        let stop = Arc::new(AtomicBool::new(false));
        let (rpcport, addr) = (node.rpcport, node.address());
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            for _ in 0..100 {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let _ = regtest_cli("127.0.0.1", rpcport, &["generatetoaddress", "1", &addr]);
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        Miner { stop, thread: Some(thread) }
    }
}

impl Drop for Miner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The row of peer `ep` in top's plain output, and its fields.
fn peer_row<'a>(stdout: &'a str, ep: &str) -> (&'a str, Vec<&'a str>) {
    let row = stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&format!("{ep} ")))
        .unwrap_or_else(|| panic!("no row for {ep}: {stdout}"));
    (row, row.split_whitespace().collect())
}

fn top(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nodescope")).arg("top").args(args).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn top_once_prints_the_bytes_of_peers() {
    let net = Net::start();
    let miner = Miner::start(&net.node);
    // the node's bytes move while top reads: its figures must lie between
    // a /peers reading taken just before it and one just after
    std::thread::sleep(Duration::from_secs(1));
    let verdict_before = verdict(&net.agent);
    let before = peers_of(&net.agent);
    let started = Instant::now();
    let out = top(&["--once", "--url", &url(&net.agent)]);
    let took = started.elapsed();
    let after = peers_of(&net.agent);
    let verdict_after = verdict(&net.agent);
    drop(miner);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(out.status.success(), "nodescope top --once: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(took < Duration::from_secs(15), "--once took {took:?}");

    let head =
        stdout.lines().find(|l| l.starts_with("target ltc: ")).unwrap_or_else(|| panic!("no target line: {stdout}"));
    let shown = head.trim_start_matches("target ltc: ");
    assert!(
        shown == verdict_before || shown == verdict_after,
        "verdict {shown:?}, agent said {verdict_before:?} then {verdict_after:?}"
    );
    assert!(stdout.contains("firing: "), "{stdout}");

    assert_eq!(before.len(), 1);
    let p = &before[0];
    let ep = endpoint(p);
    let a = after.iter().find(|q| endpoint(q) == ep).unwrap_or_else(|| panic!("{ep} gone from /peers: {after:?}"));
    // ADDRESS DIRECTION SERVICE NETGROUP AGE SENT/s RECEIVED/s SENT RECEIVED
    let (row, f) = peer_row(&stdout, &ep);
    assert_eq!(f.len(), 9, "{row}");
    assert_eq!(f[1], p["direction"].as_str().unwrap(), "{row}");
    assert_eq!(f[2], "p2p", "{row}");
    assert_eq!(f[3], p["netgroup"].as_str().unwrap(), "{row}");
    for (i, key) in [(7, "bytes_sent"), (8, "bytes_received")] {
        let shown: u64 = f[i].parse().unwrap_or_else(|_| panic!("{key} {:?} in {row}", f[i]));
        let (lo, hi) = (p[key].as_u64().unwrap(), a[key].as_u64().unwrap());
        assert!(lo <= shown && shown <= hi, "{key}: top printed {shown}, /peers had {lo} before and {hi} after");
        eprintln!("{key}: /peers {lo} before, top {shown}, /peers {hi} after");
    }
    // the rates span two collections of the agent: bytes moved, so some rate is known
    assert!(f[5] != "-" && f[6] != "-", "{row}");
    assert!(
        stdout.contains("connections/min over ") && stdout.contains("connections since start: opened "),
        "{stdout}"
    );
    assert!(stdout.contains("disk: data dir "), "{stdout}");

    // At rest (the miner stopped), the bytes top prints are /peers' own, to
    // the byte: a reading of /peers before top and one after that agree
    // bracket nothing. A ping between them moves the bytes: tried again.
    let bytes = |peers: &[Value]| -> Vec<(String, Value, Value)> {
        peers.iter().map(|q| (endpoint(q), q["bytes_sent"].clone(), q["bytes_received"].clone())).collect()
    };
    let at_rest = (0..5).find_map(|_| {
        let before = peers_of(&net.agent);
        let out = top(&["--once", "--url", &url(&net.agent)]);
        let after = peers_of(&net.agent);
        (bytes(&before) == bytes(&after) && out.status.success())
            .then(|| (before, String::from_utf8_lossy(&out.stdout).to_string()))
    });
    let (peers, stdout) = at_rest.expect("/peers never stood still over a top --once (5 tries)");
    let p = peers.iter().find(|q| endpoint(q) == ep).unwrap_or_else(|| panic!("{ep} gone from /peers: {peers:?}"));
    let (row, f) = peer_row(&stdout, &ep);
    for (i, key) in [(7, "bytes_sent"), (8, "bytes_received")] {
        assert_eq!(f[i].parse::<u64>().ok(), p[key].as_u64(), "{key} at rest: top {row:?}, /peers {p}");
    }

    // no privilege needed: the same as nobody, with no groups (from a copy
    // of the binary nobody can reach, wherever the build tree lies)
    let copy = TempDir::new("top-bin");
    let bin = copy.path().join("nodescope");
    std::fs::copy(env!("CARGO_BIN_EXE_nodescope"), &bin).unwrap();
    let out = Command::new(&bin)
        .args(["top", "--once", "--url", &url(&net.agent)])
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "as nobody: {}{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("target ltc: ") && stdout.contains(&format!("{ep} ")), "{stdout}");
    net.stop();
}

/// A child on the slave side of a pseudo-terminal of 80x24; the master's
/// output goes through a terminal emulator into a screen.
struct Pty {
    child: Child,
    master: std::fs::File,
    screen: Arc<Mutex<vt100::Parser>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pty {
    fn spawn(program: &str, args: &[&str]) -> Pty {
        let (mut master, mut slave) = (-1, -1);
        let size = libc::winsize { ws_row: 24, ws_col: 80, ws_xpixel: 0, ws_ypixel: 0 };
        // SAFETY: openpty writes the two descriptors; the termios pointer may be null.
        let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &size) };
        assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors were just opened and are owned here alone.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("TERM", "xterm-256color")
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe; the child gets the
        // terminal as its controlling one, as a login shell would.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(cmd); // closes the parent's copies of the slave
        let master = std::fs::File::from(master);
        let screen = Arc::new(Mutex::new(vt100::Parser::new(24, 80, 0)));
        let (mut from, into) = (master.try_clone().unwrap(), screen.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            // EIO once the child and every slave copy are gone
            while let Ok(n) = from.read(&mut buf) {
                if n == 0 {
                    break;
                }
                into.lock().unwrap().process(&buf[..n]);
            }
        });
        Pty { child, master, screen, reader: Some(reader) }
    }

    fn contents(&self) -> String {
        self.screen.lock().unwrap().screen().contents()
    }

    /// Waits until the screen satisfies `f`; fails with the screen.
    fn wait_screen(&self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.contents();
            if f(&s) {
                return s;
            }
            assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}; the screen:\n{s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn send(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
        self.master.flush().unwrap();
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(5));
        // the reader ends with EIO now that the child is gone
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

#[test]
fn top_live_view_in_a_pseudo_terminal() {
    let net = Net::start();
    let miner = Miner::start(&net.node);
    let ep = endpoint(&peers_of(&net.agent)[0]);
    let mut pty =
        Pty::spawn(env!("CARGO_BIN_EXE_nodescope"), &["top", "--url", &url(&net.agent), "--interval", "500ms"]);
    let screen = pty.wait_screen("the target, the verdict and the peer row", Duration::from_secs(20), |s| {
        s.contains("ltc ") && s.contains(&ep) && ["HEALTHY", "DEGRADED", "UNHEALTHY"].iter().any(|v| s.contains(v))
    });
    eprintln!("{screen}");
    let v = verdict(&net.agent).to_uppercase();
    pty.wait_screen(&format!("the agent's verdict {v}"), Duration::from_secs(10), |s| s.contains(&format!("ltc {v}")));
    // the agent's /events: a visitor's connection opens and closes on screen
    let visitor = std::net::TcpStream::connect(net.node.addr()).unwrap();
    let vport = visitor.local_addr().unwrap().port();
    let opened = format!("open   in p2p 127.0.0.1:{vport} (ltc)");
    pty.wait_screen("the visitor's open event", Duration::from_secs(10), |s| s.contains(&opened));
    drop(visitor);
    let closed = format!("close  in p2p 127.0.0.1:{vport} ");
    let s = pty.wait_screen("the visitor's close event", Duration::from_secs(10), |s| s.contains(&closed));
    eprintln!("{s}");
    assert!(s.lines().any(|l| l == "events"), "{s}");
    // the peer row: address, direction, service, netgroup
    let row = screen.lines().find(|l| l.starts_with(&ep)).unwrap_or_else(|| panic!("no row for {ep}:\n{screen}"));
    let f: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(&f[1..4], ["in", "p2p", "127.0.0.0/16"], "{row}");
    // it fits the terminal, and the key help is on the last line
    assert!(screen.lines().all(|l| l.chars().count() <= 80));
    assert!(pty.screen.lock().unwrap().screen().alternate_screen());
    let last = pty.screen.lock().unwrap().screen().rows(0, 80).nth(23).unwrap();
    assert!(last.contains("q quit"), "{last:?}");

    pty.send("s");
    pty.wait_screen("sort by bytes", Duration::from_secs(5), |s| s.contains("sort:bytes "));
    pty.send("t");
    pty.wait_screen("the target filter", Duration::from_secs(5), |s| s.contains("target ltc"));
    pty.send("\t");
    pty.wait_screen("all targets again", Duration::from_secs(5), |s| s.contains("all targets"));
    pty.send("p");
    let paused = pty.wait_screen("paused", Duration::from_secs(5), |s| s.starts_with("PAUSED"));
    // paused: the figures stay while the agent's move on (blocks are being mined)
    std::thread::sleep(Duration::from_secs(2));
    let still = pty.contents();
    assert_eq!(paused.lines().skip(1).collect::<Vec<_>>(), still.lines().skip(1).collect::<Vec<_>>());
    pty.send("p");
    pty.wait_screen("running again", Duration::from_secs(5), |s| !s.starts_with("PAUSED"));

    // the agent goes away: the last figures stay, with the reason on the second line
    let mut net = net;
    stop_child(&mut net.agent.child, Duration::from_secs(10));
    let gone = format!("! no nodescope agent at {}: connection refused", url(&net.agent));
    let s =
        pty.wait_screen("the agent's absence", Duration::from_secs(10), |s| s.lines().nth(1) == Some(gone.as_str()));
    assert!(s.contains(&ep), "{s}");

    pty.send("q");
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = pty.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "top did not exit on q:\n{}", pty.contents());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    // the terminal is given back: out of the alternate screen
    let screen = pty.screen.clone();
    drop(pty);
    assert!(!screen.lock().unwrap().screen().alternate_screen());
    drop(miner);
    net.stop();
}

#[test]
fn top_streams_plain_text_to_a_pipe() {
    let net = Net::start();
    let mut child = Command::new(env!("CARGO_BIN_EXE_nodescope"))
        .args(["top", "--url", &url(&net.agent), "--interval", "300ms"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(20);
    while text.matches("target ltc: ").count() < 2 {
        assert!(Instant::now() < deadline, "two reports expected: {text}");
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
            panic!("top ended early ({:?}): {text}{err}", child.wait());
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(!text.contains('\x1b'), "escape codes in plain text: {text:?}");
    assert!(text.contains(&endpoint(&peers_of(&net.agent)[0])), "{text}");
    // the reader goes away (`nodescope top | head`): top ends by itself, quietly
    drop(out);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            stop_child(&mut child, Duration::from_secs(1));
            panic!("top went on writing to a closed pipe");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(status.success() && err.is_empty(), "{status}: {err}");
    net.stop();
}

#[test]
fn top_names_an_agent_that_is_not_there() {
    let port = free_port();
    let out = top(&["--once", "--url", &format!("http://127.0.0.1:{port}")]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        format!("nodescope top: no nodescope agent at http://127.0.0.1:{port}: connection refused")
    );
    // something that is not an agent
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let mut b = [0u8; 1024];
            let _ = s.read(&mut b);
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\n\r\nnot here\n");
        }
    });
    let out = top(&["--once", "--url", &format!("http://127.0.0.1:{port}")]);
    server.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("answered 404") && err.contains("is this a nodescope agent?"), "{err}");
    let out = top(&["--once", "--url", "https://127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(2));
}

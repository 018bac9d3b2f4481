//! Test harness: real components started for one test and stopped by pid
//! when it ends (pass or fail), in cgroups and temp dirs it removes.
#![allow(dead_code)]

pub mod container;
pub mod prometheus;

#[allow(unused_imports)]
pub use prometheus::Prometheus;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst))
}

pub fn require_root() {
    // SAFETY: no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test loads eBPF programs and makes cgroups: run it as root (cargo xtask test)"
    );
}

/// Fails the test with the reason when a tool it needs is missing.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| d.join(tool).is_file());
    assert!(found, "{tool} is not installed (Debian package {package}); `cargo xtask test` installs it");
}

/// The workspace root (tests live in `<repo>/tests`, built by the agent crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The project's own Python virtual environment for PyPI tools (rotel,
/// kubernetes-validate): `cargo xtask test` creates it and installs into it,
/// never into the system Python (Debian's refuses, PEP 668).
pub fn pytools_dir() -> PathBuf {
    repo_root().join("target/pytools")
}

/// A program of that environment: `<repo>/target/pytools/bin/<name>`, e.g.
/// `pytool("kubernetes-validate")`, or `pytool("python3")` for `-m module` and
/// `-c "import ..."`. Fails the test with what to run when it is missing.
pub fn pytool(name: &str) -> PathBuf {
    let path = pytools_dir().join("bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: the PyPI tools live in the virtual environment {}, which `cargo xtask test` creates \
         and fills (run it once, e.g. `cargo xtask test -- --list`)",
        path.display(),
        pytools_dir().display()
    );
    path
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` until it returns Some or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(unique(prefix));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The cgroup2 mount, from mountinfo (never assumed).
pub fn cgroup2_mount() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines()
        .find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.split(' ').next()? == "cgroup2").then(|| PathBuf::from(pre.split(' ').nth(4).unwrap()))
        })
        .expect("no cgroup2 hierarchy mounted: the tests need one")
}

/// A cgroup2 directory made for one test, removed when dropped (its
/// processes must have been stopped by then).
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new() -> Cgroup {
        let path = cgroup2_mount().join(unique("nodescope-test"));
        std::fs::create_dir(&path).unwrap();
        Cgroup { path }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.path.display());
    }
}

/// Sends SIGTERM, waits, then SIGKILL: by pid, never by name.
pub fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    // SAFETY: signalling a pid we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `cmd` inside `cgroup` (or where the test runs when None): a shell
/// writes its own pid into cgroup.procs and execs the program, so the
/// program's sockets are created inside the group from the start.
pub fn spawn_in(cgroup: Option<&Cgroup>, program: &str, args: &[String], log: &Path) -> Child {
    let mut cmd = Command::new("sh");
    let script = match cgroup {
        Some(c) => format!("echo $$ > '{}/cgroup.procs' && exec \"$0\" \"$@\"", c.path.display()),
        None => "exec \"$0\" \"$@\"".to_string(),
    };
    cmd.arg("-c").arg(script).arg(program).args(args);
    let out = std::fs::File::create(log).unwrap();
    cmd.stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out);
    cmd.spawn().unwrap_or_else(|e| panic!("starting {program}: {e}"))
}

/// The arguments of a litecoind regtest node on loopback that dials and
/// looks up nothing by itself.
pub fn regtest_args(datadir: &Path, port: u16, rpcport: u16) -> Vec<String> {
    vec![
        "-regtest".to_string(),
        format!("-datadir={}", datadir.display()),
        format!("-port={port}"),
        format!("-rpcport={rpcport}"),
        "-rpcuser=u".into(),
        "-rpcpassword=p".into(),
        "-listen=1".into(),
        "-bind=127.0.0.1".into(),
        "-rpcbind=127.0.0.1".into(),
        "-rpcallowip=127.0.0.1".into(),
        "-discover=0".into(),
        // no dial to a Tor control port at start: the churn tests count every connect
        "-listenonion=0".into(),
        "-dnsseed=0".into(),
        "-fallbackfee=0.0002".into(),
        "-printtoconsole=0".into(),
        "-daemon=0".into(),
    ]
}

/// monerod regtest arguments shared by the tests: loopback only, fixed
/// difficulty, no UPnP, DNS checkpoints, update checks or ZMQ.
pub fn monerod_regtest_args(datadir: &Path, p2p_port: u16, rpc_port: u16) -> Vec<String> {
    let mut args: Vec<String> = [
        "--regtest",
        "--fixed-difficulty",
        "1",
        "--no-igd",
        "--disable-dns-checkpoints",
        "--check-updates",
        "disabled",
        "--non-interactive",
        "--no-zmq",
        "--p2p-bind-ip",
        "127.0.0.1",
        "--rpc-bind-ip",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(["--data-dir".into(), datadir.display().to_string()]);
    args.extend(["--p2p-bind-port".into(), p2p_port.to_string()]);
    args.extend(["--rpc-bind-port".into(), rpc_port.to_string()]);
    args
}

/// One call of monerod's JSON-RPC at 127.0.0.1:`port`: its reply, or why not.
pub fn monerod_rpc(port: u16, method: &str, params: &str) -> Result<Value, String> {
    use std::io::{Read, Write};
    let body = format!("{{\"jsonrpc\":\"2.0\",\"id\":\"0\",\"method\":\"{method}\",\"params\":{params}}}");
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
    write!(
        s,
        "POST /json_rpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| e.to_string())?;
    let json = resp.split_once("\r\n\r\n").map(|(_, b)| b).ok_or("no body")?;
    serde_json::from_str(json).map_err(|e| format!("{e}: {resp}"))
}

/// A litecoind regtest node on loopback.
/// litecoin-cli against a regtest node's RPC at `host:port` (the test
/// nodes' credentials): its trimmed output, or its error text.
pub fn regtest_cli(host: &str, port: u16, args: &[&str]) -> Result<String, String> {
    let out = Command::new("litecoin-cli")
        .args([
            "-regtest",
            &format!("-rpcconnect={host}"),
            &format!("-rpcport={port}"),
            "-rpcuser=u",
            "-rpcpassword=p",
            "-rpcclienttimeout=30",
        ])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

pub struct Litecoind {
    pub child: Child,
    pub dir: TempDir,
    pub port: u16,
    pub rpcport: u16,
    /// Every argument it was started with, for `restart`.
    pub args: Vec<String>,
}

impl Litecoind {
    /// `extra`: more litecoind arguments, such as `-connect=127.0.0.1:P`.
    pub fn start(cgroup: Option<&Cgroup>, extra: &[String]) -> Litecoind {
        Self::start_in_dir(cgroup, TempDir::new("ltc"), extra)
    }

    /// Like `start`, with its data dir at `dir` (which it removes when dropped).
    pub fn start_in_dir(cgroup: Option<&Cgroup>, dir: TempDir, extra: &[String]) -> Litecoind {
        require_tool("litecoind", "litecoind");
        let port = free_port();
        let rpcport = free_port();
        let mut args = regtest_args(dir.path(), port, rpcport);
        args.extend_from_slice(extra);
        let log = dir.path().join("stdout.log");
        let child = spawn_in(cgroup, "litecoind", &args, &log);
        let node = Litecoind { child, dir, port, rpcport, args };
        wait_for("litecoind RPC", Duration::from_secs(60), || node.try_cli(&["getblockcount"]).ok());
        node
    }

    /// SIGKILL by pid (no clean shutdown), and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same data dir, ports and arguments.
    pub fn restart(&mut self, cgroup: Option<&Cgroup>) {
        stop_child(&mut self.child, Duration::from_secs(20));
        self.child = spawn_in(cgroup, "litecoind", &self.args, &self.dir.path().join("stdout.log"));
        wait_for("litecoind RPC after restart", Duration::from_secs(60), || self.try_cli(&["getblockcount"]).ok());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        regtest_cli("127.0.0.1", self.rpcport, args)
    }

    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args).unwrap_or_else(|e| panic!("litecoin-cli {args:?}: {e}"))
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.cli(args)).unwrap()
    }

    pub fn peers(&self) -> Vec<Value> {
        self.cli_json(&["getpeerinfo"]).as_array().unwrap().clone()
    }

    pub fn mine(&self, blocks: u32) {
        let addr = self.address();
        self.cli(&["generatetoaddress", &blocks.to_string(), &addr]);
    }

    /// A receiving address of the node's wallet (made on first use).
    pub fn address(&self) -> String {
        if self.try_cli(&["getwalletinfo"]).is_err() {
            self.cli(&["createwallet", "w"]);
        }
        self.cli(&["getnewaddress"])
    }

    pub fn wait_peers(&self, n: usize) {
        wait_for(&format!("{n} peers on {}", self.addr()), Duration::from_secs(60), || {
            (self.peers().iter().filter(|p| p["version"].as_u64().unwrap_or(0) > 0).count() == n).then_some(())
        });
    }
}

impl Drop for Litecoind {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(20));
    }
}

/// Plain HTTP/1.0 GET on loopback: (status, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_request(port, "GET", path)
}

pub fn http_request(port: u16, method: &str, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "{method} {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let status = buf.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// The nodescope agent, run as the real binary with a config file.
pub struct Agent {
    pub child: Child,
    pub port: u16,
    pub dir: TempDir,
}

impl Agent {
    /// `body`: config TOML; this sets http.listen (a body may open with more
    /// [http] keys).
    pub fn start(body: &str) -> Agent {
        Self::start_with_env(body, &[])
    }

    /// Like `start`, with more environment variables for the agent.
    pub fn start_with_env(body: &str, env: &[(&str, &str)]) -> Agent {
        Self::start_at(body, env, free_port())
    }

    /// Like `start_with_env`, listening on `port` (an agent started again
    /// where the last one served, for the Prometheus that scraped it).
    pub fn start_at(body: &str, env: &[(&str, &str)], port: u16) -> Agent {
        let dir = TempDir::new("agent");
        let config = dir.path().join("nodescope.toml");
        let body = body.strip_prefix("[http]\n").unwrap_or(body);
        std::fs::write(&config, format!("[http]\nlisten = \"127.0.0.1:{port}\"\n{body}")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_nodescope"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "nodescope=debug,info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.path().join("agent.log")).unwrap())
            .stderr(std::fs::File::create(dir.path().join("agent.err")).unwrap())
            .spawn()
            .unwrap();
        let mut agent = Agent { child, port, dir };
        // Its first collection done (/health/agent 200), not only its
        // listener up: the listener is bound before the signals load, so
        // /metrics can answer before any figure is in.
        wait_for("nodescope's first collection", Duration::from_secs(30), || {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("nodescope exited with {st}: {}", agent.log());
            }
            http_get(port, "/health/agent").ok().filter(|(s, _)| *s == 200)
        });
        agent
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.err")).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.port, path).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }

    pub fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path} -> {status}: {e}: {body}"))
    }

    pub fn metrics(&self) -> String {
        let (status, body) = self.get("/metrics");
        assert_eq!(status, 200);
        body
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!("--- nodescope log ---\n{}", self.log());
        }
    }
}

/// The value of the one series of `name` whose labels include `labels`;
/// None when there is no such series.
pub fn series(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((head, value)) = line.rsplit_once(' ') else { continue };
        let (n, rest) = match head.split_once('{') {
            Some((n, r)) => (n, r.trim_end_matches('}')),
            None => (head, ""),
        };
        if n != name || !labels.iter().all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\""))) {
            continue;
        }
        assert!(found.is_none(), "more than one {name} series for {labels:?}:\n{text}");
        found = Some(value.parse::<f64>().unwrap());
    }
    found
}

/// Sum of a Prometheus metric's samples whose labels include all of `labels`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = match series.split_once('{') {
                Some((n, r)) => (n, r.trim_end_matches('}')),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let ok = labels.iter().all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// `promtool check metrics` finds nothing to say about a scrape.
pub fn assert_promtool_ok(m: &str, dir: &Path) {
    require_tool("promtool", "prometheus");
    let file = dir.join("metrics.txt");
    std::fs::write(&file, m).unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("promtool check metrics < {}", file.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A TCP connection to 127.0.0.1:`port` whose source address is `ip`
/// (bound before the connect; any 127/8 address is local on loopback).
pub fn connect_from(ip: std::net::Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let sockaddr = |addr: std::net::Ipv4Addr, port: u16| {
        // SAFETY: sockaddr_in is plain data; all zeroes is a valid value.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as u16;
        sa.sin_port = port.to_be();
        sa.sin_addr.s_addr = u32::from_ne_bytes(addr.octets());
        sa
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: a fresh socket, owned at once so it is closed on every path.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket() and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let local = sockaddr(ip, 0);
    // SAFETY: bind and connect with valid sockaddr_in pointers and lengths.
    if unsafe { libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let remote = sockaddr(std::net::Ipv4Addr::LOCALHOST, port);
    // SAFETY: as above.
    if unsafe { libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(TcpStream::from(owned))
}

/// VmRSS of /proc/PID/status, in KiB.
pub fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Series per metric name in a Prometheus text scrape.
pub fn series_per_metric(text: &str) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for l in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let name = l.split(['{', ' ']).next().unwrap_or("");
        *out.entry(name.to_string()).or_default() += 1;
    }
    out
}

/// The label sets of one metric's series (the text between the braces).
pub fn series_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{')?.split_once('}').map(|(labels, _)| labels))
        .collect()
}

/// The open P2P connections /peers lists for target `name`.
pub fn peers_of_target(agent: &Agent, name: &str) -> Vec<Value> {
    let v = agent.json("/peers");
    v["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .map(|t| t["peers"].as_array().unwrap().clone())
        .unwrap_or_default()
}

/// A process the test started, stopped by pid when dropped (pass or fail):
/// declare it after the Cgroup it runs in, so it is stopped first.
pub struct Stopped(pub Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        stop_child(&mut self.0, Duration::from_secs(10));
    }
}

impl std::ops::Deref for Stopped {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Stopped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// A valid mainnet address (the Monero project's donation address);
/// monerod --regtest accepts it for generateblocks.
pub const MONERO_ADDRESS: &str =
    "44AFFq5kSiGBoZ4NMDwYtN18obc8AemS33DBLWs3H7otXft3XjrpDtQGv7SqSsaBYBb98uNbr2VBBEt7f2wfn3RVGQBEP3A";

/// A monerod regtest node on loopback (common::monerod_regtest_args), in
/// `cgroup` or where the test runs, stopped by pid when dropped. At
/// `--log-level 1`, so that its log names every block it adds.
pub struct MonerodNode {
    pub child: Child,
    pub dir: TempDir,
    pub p2p_port: u16,
    pub rpc_port: u16,
}

impl MonerodNode {
    /// On `p2p_port`, dialing only `peer` (`--add-exclusive-node`), or no
    /// one and offline when None.
    pub fn start(cgroup: Option<&Cgroup>, p2p_port: u16, peer: Option<u16>) -> MonerodNode {
        require_tool("monerod", "monero");
        let dir = TempDir::new("xmr");
        let rpc_port = free_port();
        let mut args = monerod_regtest_args(dir.path(), p2p_port, rpc_port);
        args.extend(["--log-level".into(), "1".into()]);
        match peer {
            Some(port) => args.extend(["--add-exclusive-node".into(), format!("127.0.0.1:{port}")]),
            None => args.push("--offline".into()),
        }
        let child = spawn_in(cgroup, "monerod", &args, &dir.path().join("stdout.log"));
        let mut node = MonerodNode { child, dir, p2p_port, rpc_port };
        wait_for("monerod RPC", Duration::from_secs(120), || {
            if let Ok(Some(st)) = node.child.try_wait() {
                panic!("monerod exited with {st}");
            }
            node.rpc("get_info", "{}").ok().filter(|v| v["result"]["status"] == "OK")
        });
        node
    }

    /// A JSON-RPC call on its RPC port: the whole answer.
    pub fn rpc(&self, method: &str, params: &str) -> Result<Value, String> {
        monerod_rpc(self.rpc_port, method, params)
    }

    /// `get_connections`: its P2P connections, each with `recv_count` and
    /// `send_count`, the bytes it read from and wrote to the socket.
    pub fn connections(&self) -> Vec<Value> {
        let v = self.rpc("get_connections", "{}").unwrap_or_else(|e| panic!("get_connections: {e}"));
        v["result"]["connections"].as_array().cloned().unwrap_or_default()
    }

    pub fn mine(&self, blocks: u32) {
        let params = format!("{{\"amount_of_blocks\":{blocks},\"wallet_address\":\"{MONERO_ADDRESS}\"}}");
        let v = self.rpc("generateblocks", &params).unwrap_or_else(|e| panic!("generateblocks: {e}"));
        assert_eq!(v["result"]["status"], "OK", "generateblocks: {v}");
    }

    /// get_info.height: the number of blocks.
    pub fn height(&self) -> u64 {
        let v = self.rpc("get_info", "{}").unwrap();
        v["result"]["height"].as_u64().unwrap_or_else(|| panic!("get_info: {v}"))
    }
}

impl Drop for MonerodNode {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(30));
    }
}

/// A filesystem of `kind` in a sparse image file, loop-mounted for one
/// test; unmounted (freeing the loop device) and removed when dropped.
pub struct LoopFs {
    dir: TempDir,
    pub mnt: PathBuf,
}

impl LoopFs {
    pub fn new(kind: &str) -> LoopFs {
        let (mkfs, package, args): (&str, &str, &[&str]) = match kind {
            "ext4" => ("mkfs.ext4", "e2fsprogs", &["-q", "-F"]),
            "xfs" => ("mkfs.xfs", "xfsprogs", &["-q", "-f"]),
            "btrfs" => ("mkfs.btrfs", "btrfs-progs", &["-q", "-f"]),
            other => panic!("no mkfs for {other}"),
        };
        require_tool(mkfs, package);
        require_tool("mount", "mount");
        let dir = TempDir::new(&format!("disk-{kind}"));
        let image = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        // xfs wants 300 MB at least; sparse, so it costs what is written
        std::fs::File::create(&image).unwrap().set_len(512 << 20).unwrap();
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        run(Command::new(mkfs).args(args).arg(&image));
        run(Command::new("mount").args(["-o", "loop"]).arg(&image).arg(&mnt));
        LoopFs { dir, mnt }
    }

    /// A directory on it, removed with it.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let d = self.mnt.join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount").arg(&self.mnt).status().is_ok_and(|s| s.success()) {
                let _ = &self.dir; // removed by its own drop, after this
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

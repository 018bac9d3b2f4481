//! The HTTP listener under hostile clients, against the real agent on
//! loopback: idle connections that reconnect when closed, connections that
//! pipeline requests and never read, one client at 1,000 requests/s, and a
//! low open-file limit. During each, probes from another connection answer
//! within 100 ms and the agent's memory stays bounded; it serves after.
//! Every client loop is bounded by a stop flag and a deadline.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

/// The floods measure latency and CPU on a small machine: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The flooding clients' address; probes come from 127.0.0.1 (as does the
/// Prometheus server), the scraper from 127.0.0.2.
const FLOOD_FROM: [u8; 4] = [127, 0, 0, 3];

const PROBES: usize = 20;
const PROBE_DEADLINE: Duration = Duration::from_millis(100);
const RSS_BOUND_KIB: u64 = 64 * 1024;

/// The agent's resident memory, from /proc/PID/status.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// utime + stime of `pid` in seconds, from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // fields after the command name, which may hold spaces and parentheses
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    // SAFETY: no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// One probe on a new connection: the status and the time from connect to
/// the whole answer.
fn probe(port: u16, path: &str) -> (u16, Duration) {
    let started = Instant::now();
    let status = (|| -> std::io::Result<u16> {
        let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0))
    })()
    .unwrap_or(0);
    (status, started.elapsed())
}

/// PROBES probes of /health/live, 100 ms apart, while sampling RSS; asserts
/// every one answered 200 within the deadline. Returns (worst latency, max RSS).
fn probes_during(what: &str, agent_pid: u32, port: u16) -> (Duration, u64) {
    let mut results = Vec::new();
    let mut max_rss = 0;
    let (cpu0, t0) = (cpu_seconds(agent_pid), Instant::now());
    for _ in 0..PROBES {
        results.push(probe(port, "/health/live"));
        max_rss = max_rss.max(rss_kib(agent_pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu = (cpu_seconds(agent_pid) - cpu0) / t0.elapsed().as_secs_f64();
    let ok = results.iter().filter(|(s, t)| *s == 200 && *t <= PROBE_DEADLINE).count();
    let worst = results.iter().map(|r| r.1).max().unwrap();
    let ms: Vec<String> = results.iter().map(|(s, t)| format!("{s}/{:.1}ms", t.as_secs_f64() * 1e3)).collect();
    eprintln!("{what}: {ok}/{PROBES} probes 200 within {PROBE_DEADLINE:?}, worst {worst:?}, RSS max {max_rss} KiB, agent CPU {:.0} % of a core: {ms:?}", cpu * 100.0);
    assert_eq!(ok, PROBES, "{what}: probes {ms:?}");
    (worst, max_rss)
}

/// Clients run on threads until `stop`, each bounded by a deadline.
struct Flood {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// connections made, for the report
    connects: Arc<AtomicU64>,
}

impl Flood {
    fn new() -> Flood {
        Flood { stop: Arc::default(), threads: Vec::new(), connects: Arc::default() }
    }
    fn spawn(&mut self, f: impl FnOnce(Arc<AtomicBool>, Arc<AtomicU64>) + Send + 'static) {
        let (stop, connects) = (self.stop.clone(), self.connects.clone());
        self.threads.push(std::thread::spawn(move || f(stop, connects)));
    }
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for t in std::mem::take(&mut self.threads) {
            let _ = t.join();
        }
        self.connects.load(Ordering::SeqCst)
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The flood's clients give up after this whatever happens.
const FLOOD_LIMIT: Duration = Duration::from_secs(60);

fn start_agent(extra: &str) -> Agent {
    Agent::start(&format!("[agent]\ninterval = \"500ms\"\ndiscover = false\n{extra}"))
}

/// Asserts every scrape between `from` and `to` (unix seconds) came
/// back: one sample of `up` a second, all 1.
fn assert_no_missed_scrape(prometheus: &Prometheus, what: &str, from: f64, to: f64) {
    // what Prometheus has for the window, once it has scraped past its end
    std::thread::sleep(Duration::from_secs(2));
    let secs = (to - from).floor() as u64;
    let count =
        prometheus.value(&format!("count_over_time(up{{job=\"nodescope\"}}[{secs}s])"), Some(to)).unwrap_or(0.0);
    let min = prometheus.value(&format!("min_over_time(up{{job=\"nodescope\"}}[{secs}s])"), Some(to)).unwrap_or(0.0);
    let slowest = prometheus
        .value(&format!("max_over_time(scrape_duration_seconds{{job=\"nodescope\"}}[{secs}s])"), Some(to))
        .unwrap_or(f64::NAN);
    eprintln!(
        "{what}: Prometheus scraped {count} times in {secs} s, up min {min}, slowest scrape {:.1} ms",
        slowest * 1e3
    );
    assert!(count >= secs as f64 - 1.0, "{what}: {count} scrapes in {secs} s");
    assert_eq!(min, 1.0, "{what}: a scrape failed");
}

fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64()
}

/// After a flood: probes, /metrics and /peers all answer.
fn assert_responsive(agent: &Agent) {
    std::thread::sleep(Duration::from_millis(500));
    let (s, t) = probe(agent.port, "/health/live");
    assert!(s == 200 && t <= PROBE_DEADLINE, "after the flood: {s} in {t:?}");
    wait_for("/metrics after the flood", Duration::from_secs(10), || {
        http_get(agent.port, "/metrics").ok().filter(|r| r.0 == 200)
    });
    wait_for("/peers after the flood", Duration::from_secs(10), || {
        http_get(agent.port, "/peers").ok().filter(|r| r.0 == 200)
    });
}

/// 130 connections that send nothing, more than http.max_connections (128),
/// each reconnecting as soon as it is closed.
#[test]
fn idle_connection_flood() {
    require_root();
    let _serial = serial();
    let agent = start_agent("");
    let pid = agent.child.id();
    let port = agent.port;
    let prometheus = Prometheus::start(port, None);
    let before = rss_kib(pid);
    let mut flood = Flood::new();
    let flood_from = unix_now();
    for _ in 0..130 {
        flood.spawn(move |stop, connects| {
            let deadline = Instant::now() + FLOOD_LIMIT;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(mut s) = connect_from(FLOOD_FROM, port) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                connects.fetch_add(1, Ordering::Relaxed);
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut b = [0u8; 64];
                loop {
                    if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                        return;
                    }
                    match s.read(&mut b) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        }
                        Err(_) => break,
                    }
                }
            }
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    let scrapes = scraper(port);
    let (_, max_rss) = probes_during("idle flood", pid, port);
    let scrapes = scrapes.join().unwrap();
    let flood_to = unix_now();
    let connects = flood.finish();
    assert_no_missed_scrape(&prometheus, "idle flood", flood_from, flood_to);
    eprintln!("idle flood: {connects} connections made; RSS before {before} KiB; scrapes on new connections from 127.0.0.2 {scrapes:?}");
    assert!(scrapes.iter().all(|s| *s == 200), "scrapes past 130 idle connections: {scrapes:?}");
    assert!(max_rss < RSS_BOUND_KIB, "RSS {max_rss} KiB");
    assert_responsive(&agent);
}

/// 128 connections that pipeline requests and never read a reply,
/// reconnecting when the agent closes them (http.write_timeout).
#[test]
fn pipelining_client_that_never_reads() {
    require_root();
    let _serial = serial();
    let agent = start_agent("");
    let pid = agent.child.id();
    let port = agent.port;
    let prometheus = Prometheus::start(port, None);
    let before = rss_kib(pid);
    let mut flood = Flood::new();
    let flood_from = unix_now();
    for i in 0..128 {
        flood.spawn(move |stop, connects| {
            let deadline = Instant::now() + FLOOD_LIMIT;
            let path = if i % 2 == 0 { "/metrics" } else { "/health/live" };
            let reqs = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").repeat(64);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(mut s) = connect_from(FLOOD_FROM, port) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                connects.fetch_add(1, Ordering::Relaxed);
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    match s.write(reqs.as_bytes()) {
                        Ok(0) => break,
                        Ok(_) => {}
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                        }
                        Err(_) => break,
                    }
                }
            }
        });
    }
    // long enough for buffers to fill and http.write_timeout (10 s) to close some
    std::thread::sleep(Duration::from_secs(3));
    let scrapes = scraper(port);
    let (_, max_rss) = probes_during("pipelining flood", pid, port);
    let scrapes = scrapes.join().unwrap();
    // until http.write_timeout (10 s) has closed connections whose client
    // reads nothing, read from /metrics at another address
    let mut max_rss = max_rss;
    let started = Instant::now();
    let mut closed = 0.0;
    while closed < 100.0 && started.elapsed() < Duration::from_secs(40) {
        max_rss = max_rss.max(rss_kib(pid));
        std::thread::sleep(Duration::from_millis(500));
        if let Some(m) = scrape_from([127, 0, 0, 2], port) {
            closed = metric_sum(&m, "nodescope_http_closed_total", &[("reason", "write")]);
        }
    }
    let (_, rss2) = probes_during("pipelining flood, after the write timeout", pid, port);
    let flood_to = unix_now();
    let connects = flood.finish();
    assert_no_missed_scrape(&prometheus, "pipelining flood", flood_from, flood_to);
    eprintln!("pipelining flood: {connects} connections made, {closed} closed at the write timeout; RSS before {before} KiB, max {} KiB; scrapes on new connections from 127.0.0.2 {scrapes:?}", max_rss.max(rss2));
    assert!(scrapes.iter().all(|s| *s == 200), "another client's scrapes past 128 pipelining connections: {scrapes:?}");
    assert!(max_rss.max(rss2) < RSS_BOUND_KIB, "RSS {} KiB", max_rss.max(rss2));
    assert!(closed >= 100.0, "connections closed at http.write_timeout: {closed} in {:?}", started.elapsed());
    assert_responsive(&agent);
}

/// A connection from 127.0.0.2 (another client for the per-client buckets).
fn connect_from(src: [u8; 4], port: u16) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor we own; it is handed to
    // TcpStream (which closes it) or closed here on failure.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let addr = |ip: [u8; 4], port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip) },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = addr(src, 0);
        let remote = addr([127, 0, 0, 1], port);
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0
            || libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0
        {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        Ok(TcpStream::from_raw_fd(fd))
    }
}

/// /metrics on a new connection from `src`, when it answers 200.
fn scrape_from(src: [u8; 4], port: u16) -> Option<String> {
    let mut s = connect_from(src, port).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").ok()?;
    let mut b = String::new();
    s.read_to_string(&mut b).ok()?;
    let (head, body) = b.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.0 200").then(|| body.to_string())
}

/// A scraper at 127.0.0.2 asking /metrics on a new connection about once a
/// second, three times (while the probes run): the statuses it got.
fn scraper(port: u16) -> JoinHandle<Vec<u16>> {
    std::thread::spawn(move || {
        (0..3)
            .map(|_| {
                let r = connect_from([127, 0, 0, 2], port).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(2)))?;
                    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")?;
                    let mut b = String::new();
                    s.read_to_string(&mut b)?;
                    Ok(b.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0u16))
                });
                std::thread::sleep(Duration::from_millis(700));
                r.unwrap_or(0)
            })
            .collect()
    })
}

/// One keep-alive client asking /metrics 1,000 times a second: past its
/// bucket it gets 429 with Retry-After, while probes from another connection
/// and a scraper at another address (127.0.0.2) are served.
#[test]
fn one_client_at_1000_requests_per_second() {
    require_root();
    let _serial = serial();
    let agent = start_agent("");
    let pid = agent.child.id();
    let port = agent.port;
    let prometheus = Prometheus::start(port, None);
    let statuses: Arc<std::sync::Mutex<std::collections::BTreeMap<u16, u64>>> = Arc::default();
    let retry_after = Arc::new(AtomicU64::new(0));
    let mut flood = Flood::new();
    let flood_from = unix_now();
    {
        let (statuses, retry_after) = (statuses.clone(), retry_after.clone());
        flood.spawn(move |stop, connects| {
            let deadline = Instant::now() + FLOOD_LIMIT;
            let started = Instant::now();
            let mut sent: u64 = 0;
            'conn: while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(s) = connect_from(FLOOD_FROM, port) else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                connects.fetch_add(1, Ordering::Relaxed);
                let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    // paced at 1 ms per request
                    let due = started + Duration::from_millis(sent);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    sent += 1;
                    if w.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").is_err() {
                        continue 'conn;
                    }
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        continue 'conn;
                    }
                    let status: u16 = line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
                    let mut len = 0usize;
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).unwrap_or(0) == 0 {
                            continue 'conn;
                        }
                        let h = h.trim_end().to_ascii_lowercase();
                        if h.is_empty() {
                            break;
                        }
                        if let Some(v) = h.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                        if status == 429 && h.starts_with("retry-after:") {
                            retry_after.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        continue 'conn;
                    }
                    *statuses.lock().unwrap().entry(status).or_default() += 1;
                }
            }
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    // a scraper at another address, once a second, while the probes run
    let scraper = scraper(port);
    let flood_started = Instant::now();
    let (_, max_rss) = probes_during("1000 requests/s", pid, port);
    let scrapes = scraper.join().unwrap();
    let elapsed = flood_started.elapsed();
    let flood_to = unix_now();
    let connects = flood.finish();
    assert_no_missed_scrape(&prometheus, "1000 requests/s", flood_from, flood_to);
    let statuses = statuses.lock().unwrap().clone();
    let answered: u64 = statuses.values().sum();
    let limited = statuses.get(&429).copied().unwrap_or(0);
    eprintln!("1000 requests/s: {answered} answered in about {elapsed:?} plus 1 s ({statuses:?}), {connects} connections, scrapes from 127.0.0.2 {scrapes:?}");
    assert!(
        answered as f64 >= 700.0 * (elapsed.as_secs_f64() + 1.0),
        "the client was not served at 1,000/s: {answered}"
    );
    assert!(
        limited > 0 && retry_after.load(Ordering::Relaxed) == limited,
        "429s {limited}, with Retry-After {}",
        retry_after.load(Ordering::Relaxed)
    );
    assert!(scrapes.iter().all(|s| *s == 200), "another client's scrapes: {scrapes:?}");
    assert!(max_rss < RSS_BOUND_KIB, "RSS {max_rss} KiB");
    assert_responsive(&agent);
}

/// `ulimit -n 64` (prlimit) and 100 connections: no busy loop on accept
/// errors (under 10 % of a core over 5 s), a few log lines a second at most,
/// and probes still answered after.
#[test]
fn low_open_file_limit_with_100_connections() {
    require_root();
    let _serial = serial();
    require_tool("prlimit", "util-linux");
    let dir = TempDir::new("http-nofile");
    let port = free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!("[http]\nlisten = \"127.0.0.1:{port}\"\n[agent]\ninterval = \"500ms\"\ndiscover = false\n"),
    )
    .unwrap();
    let err_path = dir.path().join("err");
    // prlimit execs the agent: the child's pid is the agent's
    let mut child = std::process::Command::new("prlimit")
        .args(["--nofile=64:64", env!("CARGO_BIN_EXE_nodescope"), "run", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the agent under prlimit", Duration::from_secs(30), || {
            http_get(port, "/health/live").ok().filter(|r| r.0 == 200)
        });
        let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
        assert!(
            limits.lines().any(|l| l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")),
            "{limits}"
        );
        // The agent fits its connection rooms to the limit it started with;
        // a soft limit lowered under it afterwards to what it holds now makes
        // every accept fail with EMFILE, the case that used to spin
        let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
        let prlimit = |soft: usize| {
            let st = std::process::Command::new("prlimit")
                .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:64")])
                .status()
                .unwrap();
            assert!(st.success(), "prlimit --pid {pid} --nofile={soft}:64");
        };
        prlimit(open_fds);
        let mut held = Vec::new();
        for _ in 0..100 {
            if let Ok(s) = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)) {
                held.push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let log_before = std::fs::read_to_string(&err_path).unwrap().lines().count();
        let cpu_before = cpu_seconds(pid);
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(5));
        let cpu = (cpu_seconds(pid) - cpu_before) / t0.elapsed().as_secs_f64();
        let log = std::fs::read_to_string(&err_path).unwrap();
        let lines = log.lines().count() - log_before;
        for l in log.lines().skip(log_before) {
            eprintln!("  log: {l}");
        }
        eprintln!(
            "nofile 64, {} connections held: agent CPU {:.1} % of a core over 5 s, {lines} log lines",
            held.len(),
            cpu * 100.0
        );
        assert!(cpu < 0.10, "agent CPU {:.1} % of a core", cpu * 100.0);
        // the accept back-off's line at most once a second, and each other
        // failure (a collection that cannot open a file) once, not every interval
        assert!(lines <= 8, "{lines} log lines in 5 s: {log}");
        prlimit(64);
        drop(held);
        std::thread::sleep(Duration::from_secs(2));
        let (s, t) = probe(port, "/health/live");
        assert!(s == 200 && t <= PROBE_DEADLINE, "after: {s} in {t:?}");
        // the accepts did fail meanwhile (the back-off ran), and were counted
        let (status, m) = http_get(port, "/metrics").unwrap();
        assert_eq!(status, 200);
        let errors = metric_sum(&m, "nodescope_http_accept_errors_total", &[]);
        eprintln!("accept errors counted: {errors}");
        assert!(errors >= 1.0, "no accept error under EMFILE: the back-off was not exercised");
    }));
    stop_child(&mut child, Duration::from_secs(10));
    if let Err(e) = result {
        eprintln!("--- agent log ---\n{}", std::fs::read_to_string(&err_path).unwrap_or_default());
        std::panic::resume_unwind(e);
    }
}

/// GET `path` on a new connection with `headers`: (status, headers in lower
/// case, body bytes as sent).
fn fetch(port: u16, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{extra}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let hs = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, hs, raw[split + 4..].to_vec())
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// `gzip -dc` of `data` (the system's gzip, not the agent's library).
fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::process::{Command, Stdio};
    let mut child = Command::new("gzip").arg("-dc").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("gzip");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "gzip -dc failed");
    out.stdout
}

/// The samples of an exposition (either format): series -> value, with a
/// bucket bound written as one float form (`le="1"` and `le="1.0"` alike).
fn samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("sample line {l:?}"));
            let series = match series.split_once("le=\"") {
                Some((head, rest)) => {
                    let (le, tail) = rest.split_once('"').unwrap();
                    let le = le.parse::<f64>().map(|v| format!("{v:?}")).unwrap_or(le.to_string());
                    format!("{head}le=\"{le}\"{tail}")
                }
                None => series.to_string(),
            };
            (series, value.parse::<f64>().unwrap_or_else(|_| panic!("value in {l:?}")))
        })
        .collect()
}

/// What Prometheus 2.42 sends by default when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// /metrics in the four variants within one collection: the same samples in
/// the text format and OpenMetrics, gzip bodies that the system's gzip turns
/// back into the plain ones, and the same bytes for every scrape until the
/// next collection (the scrapes themselves are counted in it, so a body
/// encoded per scrape would differ).
#[test]
fn metrics_in_both_formats_gzip_and_one_encoding_per_collection() {
    require_root();
    let _serial = serial();
    require_tool("gzip", "gzip");
    let agent = Agent::start("[agent]\ninterval = \"3s\"\ndiscover = false\n");
    let port = agent.port;
    let om_gzip = [("Accept", PROMETHEUS_ACCEPT), ("Accept-Encoding", "gzip")];
    let mut checked = false;
    for _ in 0..5 {
        let t = fetch(port, "/metrics", &[]);
        let tg = fetch(port, "/metrics", &[("Accept-Encoding", "gzip, deflate")]);
        let o = fetch(port, "/metrics", &[("Accept", PROMETHEUS_ACCEPT)]);
        let og = fetch(port, "/metrics", &om_gzip);
        let t2 = fetch(port, "/metrics", &[("Accept", "*/*")]);
        if t.2 != t2.2 {
            // a collection came in between: again
            continue;
        }
        for r in [&t, &tg, &o, &og] {
            assert_eq!(r.0, 200);
        }
        assert_eq!(header(&t.1, "content-type"), Some("text/plain; version=0.0.4"));
        assert_eq!(header(&t.1, "content-encoding"), None);
        assert_eq!(header(&tg.1, "content-type"), Some("text/plain; version=0.0.4"));
        assert_eq!(header(&tg.1, "content-encoding"), Some("gzip"));
        assert_eq!(header(&o.1, "content-type"), Some("application/openmetrics-text; version=1.0.0; charset=utf-8"));
        assert_eq!(header(&og.1, "content-encoding"), Some("gzip"));
        assert!(tg.2.len() * 3 < t.2.len(), "gzip {} bytes of {}", tg.2.len(), t.2.len());
        assert_eq!(gunzip(&tg.2), t.2, "gzip text body");
        assert_eq!(gunzip(&og.2), o.2, "gzip OpenMetrics body");
        let text = String::from_utf8(t.2.clone()).unwrap();
        let om = String::from_utf8(o.2.clone()).unwrap();
        assert!(om.ends_with("\n# EOF\n"));
        assert!(!text.contains("# EOF"));
        // the same samples, series by series
        let (ts, os) = (samples(&text), samples(&om));
        assert_eq!(ts.len(), os.len(), "samples: text {} OpenMetrics {}", ts.len(), os.len());
        for (series, v) in &ts {
            assert_eq!(os.get(series), Some(v), "{series} in OpenMetrics");
        }
        for family in
            ["nodescope_build_info", "nodescope_collection_duration_seconds_count", "nodescope_bpf_map_capacity"]
        {
            assert!(ts.keys().any(|s| s.starts_with(family)), "no {family} in /metrics");
        }
        // a counter's family is named without _total in OpenMetrics
        assert!(om.contains("# TYPE nodescope_http_rejected counter\n"), "{om}");
        assert!(text.contains("# TYPE nodescope_http_rejected_total counter\n"));
        assert_promtool_ok(&text, agent.dir.path());
        checked = true;
        break;
    }
    assert!(checked, "no five scrapes within one 3 s collection");
    // the scrapes above are counted in the next collection's figures
    let before = samples(&String::from_utf8(fetch(port, "/metrics", &[]).2).unwrap());
    let count = |s: &std::collections::BTreeMap<String, f64>, format: &str, compression: &str| {
        s.get(&format!("nodescope_scrape_duration_seconds_count{{compression=\"{compression}\",format=\"{format}\"}}"))
            .copied()
            .unwrap_or(0.0)
    };
    let after = wait_for("the next collection", Duration::from_secs(10), || {
        let s = samples(&String::from_utf8(fetch(port, "/metrics", &[]).2).unwrap());
        (s != before).then_some(s)
    });
    assert!(count(&after, "text", "none") > count(&before, "text", "none"));
    assert!(count(&after, "openmetrics", "gzip") >= 1.0, "{after:?}");
    // and a bad Accept is no error: the text format
    let (s, hs, _) = fetch(port, "/metrics", &[("Accept", "application/json;q=x, ,;")]);
    assert_eq!((s, header(&hs, "content-type")), (200, Some("text/plain; version=0.0.4")));
}

/// Debian's Prometheus server, scraping with its own Accept and
/// Accept-Encoding, gets OpenMetrics gzip'd, parses it (its OpenMetrics
/// parser rejects a body without `# EOF` or with a counter misnamed), and
/// holds every series /metrics shows with the same value.
#[test]
fn prometheus_scrapes_openmetrics_gzip_and_holds_every_series() {
    require_root();
    let _serial = serial();
    let agent = Agent::start("[agent]\ninterval = \"500ms\"\ndiscover = false\n");
    let prometheus = Prometheus::start(agent.port, None);
    wait_for("Prometheus' OpenMetrics gzip scrapes counted", Duration::from_secs(20), || {
        prometheus
            .value(
                "max(nodescope_scrape_duration_seconds_count{job=\"nodescope\",format=\"openmetrics\",compression=\"gzip\"})",
                None,
            )
            .filter(|v| *v >= 3.0)
    });
    assert_eq!(prometheus.value("min_over_time(up{job=\"nodescope\"}[1m])", None), Some(1.0));
    // every series of a text scrape, except those that change with every
    // collection or scrape, with its value
    let text = agent.metrics();
    let changing = ["_duration_seconds", "_size_bytes", "bpf_program", "bpf_map_entries", "target_info"];
    let mut checked = 0;
    for (series, value) in samples(&text) {
        if changing.iter().any(|c| series.contains(c)) {
            continue;
        }
        let selector = match series.split_once('{') {
            Some((name, labels)) => format!("{name}{{job=\"nodescope\",{labels}"),
            None => format!("{series}{{job=\"nodescope\"}}"),
        };
        let got = wait_for(&format!("{series} in Prometheus"), Duration::from_secs(5), || {
            prometheus.value(&format!("last_over_time({selector}[5s])"), None)
        });
        assert_eq!(got, value, "{series}");
        checked += 1;
    }
    eprintln!("Prometheus holds all {checked} stable series of /metrics with their values");
    assert!(checked >= 20, "{checked} series checked");
    // the histograms arrive whole: buckets, sum and count
    let buckets = prometheus
        .value("count(nodescope_scrape_duration_seconds_bucket{job=\"nodescope\",format=\"openmetrics\",compression=\"gzip\"})", None)
        .unwrap_or(0.0);
    assert_eq!(buckets, 17.0, "16 bounds and +Inf");
}

/// `bpftool prog show id N` for the ids the agent holds (its
/// /proc/PID/fdinfo): name -> summed run_cnt.
fn bpftool_run_counts(pid: u32) -> std::collections::BTreeMap<String, u64> {
    let mut ids = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        ids.extend(info.lines().filter_map(|l| l.strip_prefix("prog_id:")?.trim().parse::<u32>().ok()));
    }
    let mut counts = std::collections::BTreeMap::new();
    for id in ids {
        let out =
            std::process::Command::new("bpftool").args(["prog", "show", "id", &id.to_string(), "-j"]).output().unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        *counts.entry(v["name"].as_str().unwrap().to_string()).or_default() += v["run_cnt"].as_u64().unwrap_or(0);
    }
    counts
}

/// The agent's own eBPF programs and maps against bpftool's reading of the
/// same kernel objects: run counts between two bpftool reads taken around a
/// collection, a hash map's entries as bpftool dumps them, capacities.
#[test]
fn bpf_self_telemetry_matches_bpftool() {
    require_root();
    let _serial = serial();
    require_tool("bpftool", "bpftool");
    let dir = TempDir::new("http-selfbpf");
    let cgroup = Cgroup::new();
    let port = free_port();
    let server_py = format!(
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1',{port})); s.listen(64)\nwhile True:\n    c,_=s.accept(); c.recv(8); c.close()\n"
    );
    let mut server =
        Stopped(spawn_in(Some(&cgroup), "python3", &["-c".into(), server_py], &dir.path().join("server.log")));
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"500ms\"\ndiscover = false\n\n[[targets]]\nname = \"selfbpf\"\ncgroup = \"{}\"\n",
        cgroup.path.display()
    ));
    let pid = agent.child.id();
    wait_for("server listening", Duration::from_secs(10), || TcpStream::connect(("127.0.0.1", port)).ok().map(drop));
    let enabled = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap().trim() == "1";
    let m = agent.metrics();
    assert_eq!(metric_sum(&m, "nodescope_bpf_stats_enabled", &[]), if enabled { 1.0 } else { 0.0 });
    assert_eq!(metric_sum(&m, "nodescope_build_info", &[("version", env!("CARGO_PKG_VERSION"))]), 1.0);
    // the commit the binary was built from: this checkout's (git's own word)
    let head = std::process::Command::new("git")
        .arg("-C")
        .arg(repo_root())
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(head.len(), 12, "git rev-parse HEAD in {}", repo_root().display());
    assert_eq!(metric_sum(&m, "nodescope_build_info", &[("commit", &head)]), 1.0, "build_info's commit");
    let runs = |m: &str| metric_sum(m, "nodescope_bpf_program_runs_total", &[("program", "on_tcp_state")]);
    if enabled {
        // connections make the state tracepoint run
        for _ in 0..20 {
            let _ = TcpStream::connect(("127.0.0.1", port)).map(|mut c| c.write_all(b"x"));
        }
        let b1 = bpftool_run_counts(pid)["on_tcp_state"];
        std::thread::sleep(Duration::from_millis(1200));
        let v = runs(&agent.metrics());
        for _ in 0..20 {
            let _ = TcpStream::connect(("127.0.0.1", port)).map(|mut c| c.write_all(b"x"));
        }
        let b2 = bpftool_run_counts(pid)["on_tcp_state"];
        eprintln!("on_tcp_state runs: bpftool {b1}, agent {v}, bpftool {b2}");
        assert!(b1 as f64 <= v && v <= b2 as f64 && b1 < b2, "bpftool {b1} <= agent {v} <= bpftool {b2}");
        assert!(metric_sum(&m, "nodescope_bpf_program_run_time_seconds_total", &[("program", "on_tcp_state")]) > 0.0);
    } else {
        assert!(!m.contains("nodescope_bpf_program_runs_total{"), "program series with bpf_stats off");
    }
    // the cgroup map holds the target's cgroup: entries as bpftool dumps them
    let maps: serde_json::Value = serde_json::from_slice(
        &std::process::Command::new("bpftool").args(["map", "show", "-j"]).output().unwrap().stdout,
    )
    .unwrap();
    let mut own = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap().flatten() {
        let info = std::fs::read_to_string(e.path()).unwrap_or_default();
        own.extend(info.lines().filter_map(|l| l.strip_prefix("map_id:")?.trim().parse::<u64>().ok()));
    }
    let map = maps
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "ns_scope_cgroup" && own.contains(&m["id"].as_u64().unwrap()))
        .expect("the agent's ns_scope_cgroup map");
    let id = map["id"].as_u64().unwrap().to_string();
    let dumped: serde_json::Value = serde_json::from_slice(
        &std::process::Command::new("bpftool").args(["map", "dump", "id", &id, "-j"]).output().unwrap().stdout,
    )
    .unwrap();
    let entries = dumped.as_array().unwrap().len() as f64;
    let attrs = [("map", "ns_scope_cgroup"), ("type", "hash"), ("id", id.as_str())];
    let m = agent.metrics();
    eprintln!(
        "ns_scope_cgroup: agent {} entries, bpftool {entries}",
        metric_sum(&m, "nodescope_bpf_map_entries", &attrs)
    );
    assert!(entries >= 1.0);
    assert_eq!(metric_sum(&m, "nodescope_bpf_map_entries", &attrs), entries);
    assert_eq!(metric_sum(&m, "nodescope_bpf_map_capacity", &attrs), map["max_entries"].as_f64().unwrap());
    drop(agent);
    stop_child(&mut server, Duration::from_secs(5));
    drop(cgroup);
}

/// A keep-alive connection that asks nothing more after its answer is
/// closed by the agent once http.idle_timeout has passed, and counted.
#[test]
fn idle_keep_alive_connection_is_closed() {
    require_root();
    let agent = Agent::start("idle_timeout = \"1s\"\n[agent]\ninterval = \"500ms\"\ndiscover = false\n");
    let mut s = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let mut got = Vec::new();
    // the answer, then the end of the stream when the agent closes it
    let r = s.read_to_end(&mut got);
    let took = t.elapsed();
    let head = String::from_utf8_lossy(&got[..got.len().min(64)]).to_string();
    assert!(r.is_ok(), "not closed within 10 s: {r:?}");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    eprintln!("idle keep-alive connection closed {took:?} after its request");
    assert!(took >= Duration::from_millis(900) && took <= Duration::from_secs(3), "closed after {took:?}");
    let closed = wait_for("the idle close counted", Duration::from_secs(5), || {
        let n = metric_sum(&agent.metrics(), "nodescope_http_closed_total", &[("reason", "idle")]);
        (n >= 1.0).then_some(n)
    });
    assert_eq!(closed, 1.0);
}

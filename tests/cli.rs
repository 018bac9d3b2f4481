//! The command line: bad configs are refused with exit 2 and a one-line
//! message naming the key, by both `check-config` and `run`.

use std::process::Command;

mod common;

fn nodescope(args: &[&str], config: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("nodescope-cli-{}-{}", std::process::id(), config.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nodescope")).args(args).arg(&file).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

const BAD: &[(&str, &str)] = &[
    ("[http]\nlisten = \"127.0.0.1:9464\"\nlistne = 1\n", "listne"),
    ("[http]\nlisten = \"not-an-address\"\n", "http.listen"),
    ("[[targets]]\nname = \"ltc\"\nchain = \"litecoin\"\n", "targets[0]"),
    ("[[targets]]\nname = \"ltc\"\nprocess = \"litecoind\"\np2p_ports = [0]\n", "targets[0].p2p_ports"),
    ("[limits]\ntop_peers = 0\n", "limits.top_peers"),
    ("[http]\nlisten = \"127.0.0.1:1\"\n[http]\n", "config (line 3)"),
    ("[rules.no_such_rule]\nenabled = true\n", "rules.no_such_rule"),
    ("[rules.no_peers]\nfor = \"-5s\"\n", "rules.no_peers.for"),
    ("[rules.disk_low]\nthreshold = 120\n", "rules.disk_low.threshold"),
    (
        "[[targets]]\nname = \"ltc\"\nprocess = \"litecoind\"\n[targets.rules.memory_high]\nthreshold = 100.5\n",
        "targets[0].rules.memory_high.threshold",
    ),
    (
        "[[targets]]\nname = \"ltc\"\nprocess = \"litecoind\"\n[targets.rules.no_outbound]\nclear_after = \"-1m\"\n",
        "targets[0].rules.no_outbound.clear_after",
    ),
    // what run could not use is refused by check-config too
    ("[[targets]]\nname = \"ltc\"\npid_file = \"ltc.pid\"\n", "targets[0].pid_file"),
    ("[[targets]]\nname = \"ltc\"\nprocess = \"litecoind\"\ndatadir = \"/data/\\u0000\"\n", "targets[0].datadir"),
];

#[test]
fn bad_configs_exit_2_naming_the_key() {
    for (config, key) in BAD {
        for args in [&["check-config"][..], &["run", "--config"][..]] {
            let (code, err) = nodescope(args, config);
            assert_eq!(code, 2, "{args:?} on {config:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
            assert!(err.contains(key), "{args:?} on {config:?}: message does not name {key}: {err}");
        }
    }
}

#[test]
fn good_config_passes_check() {
    let (code, err) = nodescope(
        &["check-config"],
        "[http]\nlisten = \"127.0.0.1:9464\"\n[[targets]]\nname = \"ltc\"\npid_file = \"/data/ltc/regtest/litecoind.pid\"\nchain = \"litecoin\"\ndatadir = \"/data/ltc\"\np2p_ports = [19444]\n",
    );
    assert_eq!(code, 0, "{err}");
}

/// Under systemd the agent says READY=1 once its first collection is done and
/// pings the watchdog at half its period, also while a long interval (30 s
/// here) is waited out: checked with our own NOTIFY_SOCKET listener (systemd
/// is not PID 1 on the test machines).
#[test]
fn systemd_notify_ready_and_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("nodescope-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("c.toml");
    std::fs::write(
        &config,
        format!("[http]\nlisten = \"127.0.0.1:{port}\"\n[agent]\ninterval = \"30s\"\ndiscover = false\n"),
    )
    .unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: exec keeps the shell's
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_nodescope"))
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !(seen.iter().any(|m: &String| m.contains("READY=1"))
        && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2)
    {
        match sock.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).to_string()),
            Err(e) => {
                seen.push(format!("recv failed: {e}"));
                break;
            }
        }
    }
    // SAFETY: our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(seen.first().is_some_and(|m| m.contains("READY=1")), "first message should be READY=1: {seen:?}");
    assert!(seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2, "{seen:?}");
    assert!(status.success(), "agent exit on SIGTERM: {status}");
}

/// The HTTP listener's bounds: past http.requests_per_second a client's
/// requests get 429 with Retry-After, probes never; past
/// http.max_connections only probes are answered (others 503); both
/// counted, and the counts equal what the client saw.
#[test]
fn http_bounds_are_enforced_and_counted() {
    use std::io::{Read, Write};
    common::require_root();
    let agent = common::Agent::start(
        "[http]\nmax_connections = 3\nrequests_per_second = 2\nburst = 4\n[agent]\ninterval = \"200ms\"\ndiscover = false\n",
    );
    // Agent::start spent some of the burst; let the bucket refill
    std::thread::sleep(std::time::Duration::from_secs(3));
    let raw = |req: &str| {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut buf = String::new();
        let _ = s.read_to_string(&mut buf);
        buf
    };
    let replies: Vec<String> = (0..20).map(|_| raw("GET /peers HTTP/1.0\r\n\r\n")).collect();
    let limited: Vec<&String> = replies.iter().filter(|r| r.starts_with("HTTP/1.0 429")).collect();
    assert!(limited.len() >= 10, "a burst of 20 against 2/s with burst 4 should mostly be refused: {replies:?}");
    assert!(limited.iter().all(|r| r.to_ascii_lowercase().contains("\r\nretry-after: ")), "{limited:?}");
    // the same client's probes are never limited
    let probes: Vec<u16> = (0..20).map(|_| common::http_get(agent.port, "/health/live").unwrap().0).collect();
    assert!(probes.iter().all(|s| *s == 200), "{probes:?}");

    // hold 3 connections open, each with a request answered (a connection
    // that never asks for anything is made way for after a second, which a
    // slow run would reach); on a 4th only probes are answered
    let held: Vec<std::net::TcpStream> = (0..3)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
            s
        })
        .collect();
    let refused = raw("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.to_ascii_lowercase().contains("connection: close"), "{refused}");
    let probe = raw("GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(probe.starts_with("HTTP/1.1 200"), "{probe}");
    drop(held);

    std::thread::sleep(std::time::Duration::from_secs(3));
    let m = common::wait_for("a scrape within the rate", std::time::Duration::from_secs(20), || {
        common::http_get(agent.port, "/metrics").ok().filter(|(s, _)| *s == 200).map(|(_, b)| b)
    });
    let rate = common::metric_sum(&m, "nodescope_http_rejected_total", &[("reason", "rate")]);
    let room = common::metric_sum(&m, "nodescope_http_rejected_total", &[("reason", "probe_room")]);
    assert!(rate >= limited.len() as f64, "429s seen by the client {}, counted {rate}", limited.len());
    assert_eq!(room, 1.0, "{m}");
}

/// A missing kernel feature turns off one signal and never the agent: the
/// agent runs in a private mount namespace where kernel BTF is hidden (an
/// empty file bound over /sys/kernel/btf/vmlinux), which the network
/// programs need. `probes` says so; `run` keeps serving, with the network
/// signal off and logged, and the other signals working.
#[test]
fn missing_kernel_btf_turns_off_the_network_signal_only() {
    common::require_root();
    common::require_tool("unshare", "util-linux");
    let hide_btf = "mount --bind /dev/null /sys/kernel/btf/vmlinux && exec \"$0\" \"$@\"";
    let out = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", hide_btf, env!("CARGO_BIN_EXE_nodescope"), "probes"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "probes exits 1 when a hook is unsupported:\n{table}");
    for hook in ["tp_btf/inet_sock_set_state", "iter/tcp"] {
        let line = table.lines().find(|l| l.contains(hook)).unwrap_or_else(|| panic!("{hook} not listed:\n{table}"));
        assert!(line.contains(" NO ") && line.contains("kernel BTF"), "{line}");
    }
    assert!(
        table.lines().any(|l| l.starts_with("disk") && l.contains(" yes ")),
        "other signals still probe fine:\n{table}"
    );

    let dir = common::TempDir::new("nobtf");
    let port = common::free_port();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("[http]\nlisten = \"127.0.0.1:{port}\"\n[agent]\ninterval = \"300ms\"\ndiscover = false\n[[targets]]\nname = \"self\"\npid_file = \"{}\"\n", dir.path().join("pid").display())).unwrap();
    let mut child = Command::new("unshare")
        .args([
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            hide_btf,
            env!("CARGO_BIN_EXE_nodescope"),
            "run",
            "--config",
        ])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("err")).unwrap())
        .spawn()
        .unwrap();
    // the target is this test process: procfs figures must still flow
    std::fs::write(dir.path().join("pid"), std::process::id().to_string()).unwrap();
    let metrics = common::wait_for("metrics with process figures", std::time::Duration::from_secs(20), || {
        common::http_get(port, "/metrics")
            .ok()
            .filter(|(s, b)| *s == 200 && b.contains("nodescope_process_open_fds{"))
            .map(|(_, b)| b)
    });
    assert_eq!(common::http_get(port, "/health/live").unwrap().0, 200);
    assert_eq!(common::http_get(port, "/health/ready").unwrap().0, 503, "not ready without the network probes");
    assert!(!metrics.contains("nodescope_connection_open{"), "no network figures without the network signal");
    common::stop_child(&mut child, std::time::Duration::from_secs(10));
    let log = std::fs::read_to_string(dir.path().join("err")).unwrap();
    assert_eq!(log.matches("network signal off").count(), 1, "logged once: {log}");
    assert!(log.contains("kernel BTF"), "{log}");
}

/// The environment may hold anything: a variable that is not UTF-8 is
/// ignored unless it is one of ours, which is refused by name (exit 2).
#[test]
fn non_utf8_environment() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let dir = common::TempDir::new("cli-env");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[agent]\ndiscover = false\n").unwrap();
    let run = |name: &[u8], value: &[u8]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nodescope"))
            .arg("check-config")
            .arg(&good)
            .env(OsStr::from_bytes(name), OsStr::from_bytes(value))
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let (code, err) = run(b"FOO", b"\xff");
    assert_eq!(code, 0, "an unrelated non-UTF-8 variable: {err}");
    let (code, err) = run(b"FOO\xfe", b"\xff");
    assert_eq!(code, 0, "an unrelated non-UTF-8 name: {err}");
    let (code, err) = run(b"NODESCOPE_HTTP_LISTEN", b"\xff");
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("NODESCOPE_HTTP_LISTEN") && err.contains("UTF-8"), "{err}");
    let (code, err) = run(b"NODESCOPE_\xffX", b"1");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("NODESCOPE_"), "{err}");
}

/// A RUST_LOG that tracing-subscriber's parser would panic on (a
/// multi-byte character after a leading space, found by fuzzing log.level):
/// the agent says it ignores it and runs with log.level.
#[test]
fn non_ascii_rust_log_is_ignored_not_a_crash() {
    common::require_root();
    let agent = common::Agent::start_with_env("[agent]\ndiscover = false\n", &[("RUST_LOG", " \u{e9}=info")]);
    assert_eq!(agent.get("/health/live").0, 200);
    assert!(agent.log().contains("RUST_LOG ignored: ASCII only"), "{}", agent.log());
}

/// The config path must name a regular file of at most 1 MiB: a FIFO, a
/// device, a directory or a huge file are refused at once with one line.
#[test]
fn config_path_that_is_not_a_small_file() {
    let dir = common::TempDir::new("cli-file");
    let fifo = dir.path().join("fifo.toml");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let big = dir.path().join("big.toml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(1 << 20))).unwrap();
    let cases = [
        (fifo.clone(), "FIFO"),
        ("/dev/zero".into(), "character device"),
        (dir.path().to_path_buf(), "directory"),
        (big, "larger than"),
    ];
    for (path, why) in cases {
        for args in [&["check-config"][..], &["run", "--config"][..]] {
            let started = std::time::Instant::now();
            let mut child = Command::new(env!("CARGO_BIN_EXE_nodescope"))
                .args(args)
                .arg(&path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let status = loop {
                if let Some(st) = child.try_wait().unwrap() {
                    break st;
                }
                if started.elapsed() > std::time::Duration::from_secs(5) {
                    common::stop_child(&mut child, std::time::Duration::from_secs(1));
                    panic!("{args:?} {} still running after 5 s", path.display());
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            };
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            assert_eq!(status.code(), Some(2), "{args:?} {}: {err}", path.display());
            assert_eq!(err.trim().lines().count(), 1, "{err}");
            assert!(err.contains(why) && err.contains(path.to_str().unwrap()), "{args:?}: {err}");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(2),
                "{args:?} {} took {:?}",
                path.display(),
                started.elapsed()
            );
        }
    }
}

/// `nodescope run` on port 0 with no targets and `extra` config lines, its
/// stderr (with RUST_LOG unset) in a file of `dir`.
fn run_on_port_zero(dir: &common::TempDir, extra: &str) -> (std::process::Child, std::path::PathBuf) {
    let config = dir.path().join("c.toml");
    let text = format!("[http]\nlisten = \"127.0.0.1:0\"\n[agent]\ninterval = \"500ms\"\ndiscover = false\n{extra}");
    std::fs::write(&config, text).unwrap();
    let err_path = dir.path().join("err");
    let child = Command::new(env!("CARGO_BIN_EXE_nodescope"))
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    (child, err_path)
}

/// `listen = "127.0.0.1:0"`: the log names the port the kernel gave, which
/// answers; the log has no colour codes when stderr is a file.
#[test]
fn port_zero_logs_the_bound_port_without_colour() {
    common::require_root();
    let dir = common::TempDir::new("cli-port0");
    let (mut child, err_path) = run_on_port_zero(&dir, "");
    let port: u16 = common::wait_for("the serving line", std::time::Duration::from_secs(20), || {
        let log = std::fs::read_to_string(&err_path).unwrap_or_default();
        let line = log.lines().find(|l| l.contains("serving /metrics"))?.to_string();
        line.rsplit(':').next()?.trim().parse().ok()
    });
    let status = common::http_get(port, "/health/live").map(|r| r.0);
    common::stop_child(&mut child, std::time::Duration::from_secs(10));
    let log = std::fs::read_to_string(&err_path).unwrap();
    assert_ne!(port, 0, "{log}");
    assert_eq!(status.ok(), Some(200), "{log}");
    assert!(!log.contains('\x1b'), "ANSI codes in a log that is not a terminal: {log:?}");
}

/// `[log] format = "json"`: every line on stderr is one JSON object with a
/// timestamp, a level and the message, for log shippers.
#[test]
fn json_log_format_writes_one_object_per_line() {
    common::require_root();
    let dir = common::TempDir::new("cli-json-log");
    let (mut child, err_path) = run_on_port_zero(&dir, "[log]\nformat = \"json\"\n");
    let serving = common::wait_for("the serving line", std::time::Duration::from_secs(20), || {
        let log = std::fs::read_to_string(&err_path).unwrap_or_default();
        log.lines().find(|l| l.contains("serving /metrics")).map(str::to_string)
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    common::stop_child(&mut child, std::time::Duration::from_secs(10));
    let log = std::fs::read_to_string(&err_path).unwrap();
    let line: serde_json::Value = serde_json::from_str(&serving).unwrap_or_else(|e| panic!("{e}: {serving}"));
    assert_eq!(line["level"], "INFO", "{serving}");
    assert!(line["fields"]["message"].as_str().is_some_and(|m| m.starts_with("serving /metrics")), "{serving}");
    assert!(line["timestamp"].as_str().is_some_and(|t| t.len() >= 20), "{serving}");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines.len() >= 2, "{log}");
    for l in lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}"));
        assert!(v.is_object() && v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
}

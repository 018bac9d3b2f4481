//! OTLP export: the same pipeline that serves /metrics pushes to a real
//! collector (rotel-agent, from PyPI `rotel`), which prints what it received.
//! The figure checked is a count of connections this test made itself.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// Values of `metric` data points whose attributes include every `attrs`
/// pair, in rotel's detailed debug log.
fn rotel_values(log: &str, metric: &str, attrs: &[(&str, &str)]) -> Vec<f64> {
    let mut values = Vec::new();
    for block in log.split("Metric #").skip(1) {
        if !block.contains(&format!("-> Name: {metric}\n")) {
            continue;
        }
        for point in block.split("NumberDataPoints #").skip(1) {
            let ok = attrs.iter().all(|(k, v)| point.contains(&format!("-> {k}: Str({v})")));
            if let (true, Some(v)) = (ok, point.lines().find_map(|l| l.strip_prefix("Value: "))) {
                values.push(v.trim().parse().unwrap());
            }
        }
    }
    values
}

#[test]
fn metrics_reach_an_otlp_collector() {
    require_root();
    // rotel-agent, linked into the project's PyPI venv by `cargo xtask test`
    let rotel = pytool("rotel-agent");
    let dir = TempDir::new("otlp");
    let (http_port, grpc_port) = (free_port(), free_port());
    let log_path = dir.path().join("rotel.log");
    // stopped by pid when dropped, also when the test fails
    let collector = Stopped(
        Command::new(&rotel)
            .args(["start", "--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
            .args(["--exporter", "blackhole", "--debug-log", "metrics", "--debug-log-verbosity", "detailed"])
            .args(["--pid-file", dir.path().join("rotel.pid").to_str().unwrap()])
            .stdout(std::fs::File::create(&log_path).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // a server in a watched cgroup, and connections to it that the test counts
    let cgroup = Cgroup::new();
    let port = free_port();
    let server_py = format!(
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1',{port})); s.listen(64)\nwhile True:\n    c,_=s.accept(); c.recv(8); c.close()\n"
    );
    let server = Stopped(spawn_in(Some(&cgroup), "python3", &["-c".into(), server_py], &dir.path().join("server.log")));
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"500ms\"\n[otlp]\nendpoint = \"http://127.0.0.1:{http_port}/v1/metrics\"\ninterval = \"1s\"\ntimeout = \"1s\"\n\n[[targets]]\nname = \"otlp-test\"\ncgroup = \"{}\"\n",
        cgroup.path.display()
    ));
    wait_for("server listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
    });
    // the readiness connect above was the first of these
    const MADE: usize = 7;
    for _ in 0..MADE - 1 {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.write_all(b"x").unwrap();
        let _ = std::io::Read::read(&mut c, &mut [0u8; 1]);
    }
    let attrs = [("nodescope.target", "otlp-test"), ("nodescope.connection.direction", "inbound")];
    let got = wait_for("7 connections in the collector's log", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let v = rotel_values(&log, "nodescope.connection.closed", &attrs);
        v.last().copied().filter(|n| *n == MADE as f64)
    });
    assert_eq!(got, MADE as f64);
    // and /metrics, the other reader of the same pipeline, says the same
    let m = agent.metrics();
    assert_eq!(
        metric_sum(
            &m,
            "nodescope_connection_closed_total",
            &[("nodescope_target", "otlp-test"), ("nodescope_connection_direction", "inbound")]
        ),
        MADE as f64
    );

    drop((agent, server, collector));
    drop(cgroup);
}

/// rotel-agent listening on both OTLP ports, printing what it receives to `log`.
fn start_rotel(dir: &std::path::Path, http_port: u16, grpc_port: u16, log: &std::path::Path) -> std::process::Child {
    start_rotel_logging(dir, http_port, grpc_port, log, &["metrics"])
}

/// rotel-agent printing the `signals` (metrics, traces, logs) it receives.
fn start_rotel_logging(
    dir: &std::path::Path,
    http_port: u16,
    grpc_port: u16,
    log: &std::path::Path,
    signals: &[&str],
) -> std::process::Child {
    let mut cmd = Command::new(pytool("rotel-agent"));
    cmd.args(["start", "--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
        .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
        .args(["--exporter", "blackhole", "--debug-log-verbosity", "detailed"]);
    for s in signals {
        cmd.args(["--debug-log", s]);
    }
    cmd.args(["--pid-file", dir.join(format!("rotel-{grpc_port}.pid")).to_str().unwrap()])
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The agent with `env` set (and the config's [http] listen), like
/// `Agent::start`.
fn start_agent_with_env(body: &str, env: &[(&str, String)]) -> Agent {
    // info, not debug: the agent's log records go to the collector too
    let mut all = vec![("RUST_LOG", "info")];
    all.extend(env.iter().map(|(k, v)| (*k, v.as_str())));
    Agent::start_with_env(body, &all)
}

/// The resource attributes of the last batch in rotel's log: key -> value.
fn rotel_resource(log: &str) -> std::collections::BTreeMap<String, String> {
    let Some(block) = log.rsplit("Resource attributes:\n").next().filter(|_| log.contains("Resource attributes:"))
    else {
        return Default::default();
    };
    block
        .lines()
        .map_while(|l| l.trim().strip_prefix("-> "))
        .filter_map(|l| {
            let (k, v) = l.split_once(": ")?;
            Some((k.to_string(), v.strip_prefix("Str(")?.strip_suffix(')')?.to_string()))
        })
        .collect()
}

/// A server in a watched cgroup that accepts, reads a byte and closes; the
/// connections the test makes to it are the figure both readers must agree on.
struct Counted {
    cgroup: Cgroup,
    server: std::process::Child,
    port: u16,
}

impl Counted {
    fn start(dir: &std::path::Path) -> Counted {
        let cgroup = Cgroup::new();
        let port = free_port();
        let server_py = format!(
            "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1',{port})); s.listen(64)\nwhile True:\n    c,_=s.accept(); c.recv(8); c.close()\n"
        );
        let server = spawn_in(Some(&cgroup), "python3", &["-c".into(), server_py], &dir.join("server.log"));
        Counted { cgroup, server, port }
    }
    fn connect(&self, n: usize) {
        use std::io::Write;
        for _ in 0..n {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
            c.write_all(b"x").unwrap();
            let _ = std::io::Read::read(&mut c, &mut [0u8; 1]);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        stop_child(&mut self.server, Duration::from_secs(5));
    }
}

/// Over gRPC and over HTTP/protobuf, set only by the standard OTEL_*
/// variables (the TOML has no endpoint): rotel receives the connection count
/// /metrics shows, the build info and a map's capacity, with the resource
/// attributes from OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and the
/// downward API's variables.
#[test]
fn grpc_and_http_exports_from_the_standard_environment() {
    require_root();
    for protocol in ["grpc", "http/protobuf"] {
        let dir = TempDir::new("otlp-env");
        let (http_port, grpc_port) = (free_port(), free_port());
        let log_path = dir.path().join("rotel.log");
        let mut collector = start_rotel(dir.path(), http_port, grpc_port, &log_path);
        let counted = Counted::start(dir.path());
        // the general endpoint: a base URL for http/protobuf, the agent adds /v1/metrics
        let endpoint = match protocol {
            "grpc" => format!("http://127.0.0.1:{grpc_port}"),
            _ => format!("http://127.0.0.1:{http_port}"),
        };
        // listening (so inside its cgroup) before the agent resolves the target
        wait_for("server listening", Duration::from_secs(10), || {
            std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], counted.port).into(), Duration::from_secs(1))
                .ok()
                .map(drop)
        });
        let service = format!("nodescope-{}", protocol.replace('/', "-"));
        let agent = start_agent_with_env(
            &format!(
                "[agent]\ninterval = \"500ms\"\ndiscover = false\n[otlp]\ninterval = \"1s\"\ntimeout = \"1s\"\n\n[[targets]]\nname = \"otlp-env\"\ncgroup = \"{}\"\n",
                counted.cgroup.path.display()
            ),
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_string()),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=t1".to_string()),
                ("OTEL_SERVICE_NAME", service.clone()),
                ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci,k8s.cluster.name=c%201".to_string()),
                ("NODE_NAME", "node-a".to_string()),
                ("POD_NAME", "pod-a".to_string()),
                ("POD_NAMESPACE", "ns-a".to_string()),
            ],
        );
        let prom_attrs = [("nodescope_target", "otlp-env"), ("nodescope_connection_direction", "inbound")];
        // once the agent counts the target's connections, MADE more
        let first = wait_for("the target's connections counted", Duration::from_secs(20), || {
            counted.connect(1);
            std::thread::sleep(Duration::from_millis(600));
            let n = metric_sum(&agent.metrics(), "nodescope_connection_closed_total", &prom_attrs);
            (n > 0.0).then_some(n)
        });
        counted.connect(9);
        let made = first + 9.0;
        let attrs = [("nodescope.target", "otlp-env"), ("nodescope.connection.direction", "inbound")];
        let started = std::time::Instant::now();
        let mut seen = None;
        while seen != Some(made) && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(200));
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            seen = rotel_values(&log, "nodescope.connection.closed", &attrs).last().copied();
        }
        assert_eq!(
            seen,
            Some(made),
            "{protocol}: connections at the collector; /metrics: {}",
            agent.metrics().lines().filter(|l| l.contains("connection_closed")).collect::<Vec<_>>().join("\n")
        );
        let m = agent.metrics();
        assert_eq!(metric_sum(&m, "nodescope_connection_closed_total", &prom_attrs), made);
        let log = std::fs::read_to_string(&log_path).unwrap();
        // the build info and a kernel map's capacity, as /metrics has them
        let build = rotel_values(&log, "nodescope.build_info", &[("version", env!("CARGO_PKG_VERSION"))]);
        assert_eq!(build.last(), Some(&1.0), "{protocol}: build_info");
        let cap = rotel_values(&log, "nodescope.bpf.map.capacity", &[("map", "ns_conns")]);
        assert_eq!(
            cap.last().copied(),
            Some(metric_sum(&m, "nodescope_bpf_map_capacity", &[("map", "ns_conns")])),
            "{protocol}: ns_conns capacity"
        );
        let resource = rotel_resource(&log);
        eprintln!("{protocol}: resource {resource:?}");
        for (k, v) in [
            ("service.name", service.as_str()),
            ("service.version", env!("CARGO_PKG_VERSION")),
            ("deployment.environment", "ci"),
            ("k8s.cluster.name", "c 1"),
            ("k8s.node.name", "node-a"),
            ("k8s.pod.name", "pod-a"),
            ("k8s.namespace.name", "ns-a"),
        ] {
            assert_eq!(resource.get(k).map(String::as_str), Some(v), "{protocol}: resource {k}");
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
        assert_eq!(resource.get("host.name").map(String::as_str), Some(host.trim()));
        assert!(metric_sum(&m, "nodescope_otlp_exports_total", &[("result", "ok")]) >= 1.0);
        drop(agent);
        stop_child(&mut collector, Duration::from_secs(5));
    }
}

/// Milliseconds of `n` serial /metrics scrapes on new connections.
fn scrape_times(port: u16, n: usize) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let t = std::time::Instant::now();
            let (status, _) = http_get(port, "/metrics").unwrap();
            assert_eq!(status, 200);
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The collector (gRPC) stopped for a minute: collection goes on at its
/// interval, scrapes stay within twice their latency before, failures are
/// counted and logged a few times, not per export; then 12 s of a collector
/// that accepts connections and never answers, with the same bounds;
/// started again on the same port, it receives exports again by itself.
#[test]
fn collector_down_for_a_minute_then_back() {
    require_root();
    let dir = TempDir::new("otlp-down");
    let (http_port, grpc_port) = (free_port(), free_port());
    let log1 = dir.path().join("rotel-1.log");
    let mut collector = start_rotel(dir.path(), http_port, grpc_port, &log1);
    let agent = start_agent_with_env(
        &format!("[agent]\ninterval = \"500ms\"\ndiscover = false\n[otlp]\nendpoint = \"http://127.0.0.1:{grpc_port}\"\nprotocol = \"grpc\"\ninterval = \"1s\"\ntimeout = \"1s\"\n"),
        &[],
    );
    wait_for("exports at the collector", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&log1).unwrap_or_default();
        rotel_values(&log, "nodescope.build_info", &[]).last().copied()
    });
    let before = scrape_times(agent.port, 30);
    stop_child(&mut collector, Duration::from_secs(5));
    // over `secs` of scrapes (5 a second): the collections run, those due
    // at the 0.5 s interval, the scrape times, and /metrics at the end
    let observe = |secs: u64| {
        let collections = |m: &str| metric_sum(m, "nodescope_collection_duration_seconds_count", &[]);
        let c0 = collections(&agent.metrics());
        let t0 = std::time::Instant::now();
        let mut times = Vec::new();
        while t0.elapsed() < Duration::from_secs(secs) {
            times.extend(scrape_times(agent.port, 5));
            std::thread::sleep(Duration::from_millis(1000));
        }
        let m = agent.metrics();
        (collections(&m) - c0, t0.elapsed().as_secs_f64() / 0.5, times, m)
    };
    let (ran, expected, during, m) = observe(60);
    let failed = metric_sum(&m, "nodescope_otlp_exports_total", &[("result", "failed")]);
    let warned = agent.log().lines().filter(|l| l.contains("OTLP export") && l.contains("failed")).count();
    let (b, d) = (median(before.clone()), median(during.clone()));
    eprintln!(
        "collector down 60 s: {ran} collections of {expected:.0} due, {failed} failed exports, {warned} log lines; /metrics median {b:.2} ms before, {d:.2} ms during (max {:.2} ms)",
        during.iter().cloned().fold(0.0, f64::max)
    );
    assert!(ran >= expected * 0.9, "collection stalled: {ran} of {expected:.0}");
    assert!(d <= 2.0 * b.max(1.0), "scrape median {d:.2} ms during, {b:.2} ms before");
    assert!(failed >= 30.0, "{failed} failed exports counted in a minute at 1 s");
    assert!((1..=4).contains(&warned), "{warned} failure lines in a minute:\n{}", agent.log());
    // a collector that takes connections and never answers (a listener no
    // one accepts on: the kernel completes the handshakes, nothing more):
    // exports time out, and neither collection nor /metrics waits for them
    let silent = std::net::TcpListener::bind(("127.0.0.1", grpc_port)).unwrap();
    let failed1 = metric_sum(&agent.metrics(), "nodescope_otlp_exports_total", &[("result", "failed")]);
    let (ran, expected, stuck, m) = observe(12);
    let timed_out = metric_sum(&m, "nodescope_otlp_exports_total", &[("result", "failed")]) - failed1;
    let s = median(stuck.clone());
    eprintln!(
        "collector silent 12 s: {ran} collections of {expected:.0} due, {timed_out} failed exports; /metrics median {s:.2} ms (max {:.2} ms)",
        stuck.iter().cloned().fold(0.0, f64::max)
    );
    assert!(ran >= expected * 0.9, "collection stalled behind a silent collector: {ran} of {expected:.0}");
    assert!(s <= 2.0 * b.max(1.0), "scrape median {s:.2} ms with a silent collector, {b:.2} ms before");
    assert!(timed_out >= 3.0, "{timed_out} failed exports in 12 s against a silent collector");
    drop(silent);

    // back on the same port: exports arrive again with nothing done to the agent
    let ok_before = metric_sum(&m, "nodescope_otlp_exports_total", &[("result", "ok")]);
    let log2 = dir.path().join("rotel-2.log");
    let mut collector = start_rotel(dir.path(), http_port, grpc_port, &log2);
    wait_for("exports at the restarted collector", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(&log2).unwrap_or_default();
        rotel_values(&log, "nodescope.build_info", &[]).last().copied()
    });
    wait_for("ok exports counted again", Duration::from_secs(10), || {
        let m = agent.metrics();
        (metric_sum(&m, "nodescope_otlp_exports_total", &[("result", "ok")]) > ok_before).then_some(())
    });
    drop(agent);
    stop_child(&mut collector, Duration::from_secs(5));
}

/// The agent's own spans (a span per collection cycle, with the scope and
/// health spans inside it; a detach span for a target whose node is not
/// running and a span per rule transition) and its log records reach the collector over
/// gRPC and over HTTP/protobuf, carrying the same resource as the metrics.
#[test]
fn spans_and_logs_reach_the_collector() {
    require_root();
    for protocol in ["grpc", "http/protobuf"] {
        let dir = TempDir::new("otlp-spans");
        let (http_port, grpc_port) = (free_port(), free_port());
        let log_path = dir.path().join("rotel.log");
        let mut collector = Command::new(pytool("rotel-agent"))
            .args(["start", "--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
            .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
            .args(["--exporter", "blackhole", "--debug-log", "traces", "--debug-log", "logs"])
            .args(["--debug-log-verbosity", "detailed"])
            .args(["--pid-file", dir.path().join("rotel.pid").to_str().unwrap()])
            .stdout(std::fs::File::create(&log_path).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let endpoint = match protocol {
            "grpc" => format!("http://127.0.0.1:{grpc_port}"),
            _ => format!("http://127.0.0.1:{http_port}/v1/metrics"),
        };
        let agent = start_agent_with_env(
            &format!(
                "[agent]\ninterval = \"500ms\"\ndiscover = false\n[otlp]\nendpoint = \"{endpoint}\"\nprotocol = \"{protocol}\"\ninterval = \"1s\"\ntimeout = \"1s\"\n\
                 [[targets]]\nname = \"ghost\"\nprocess = \"no-such-node\"\nchain = \"litecoin\"\n"
            ),
            &[("OTEL_SERVICE_NAME", format!("spans-{}", protocol.replace('/', "-")))],
        );
        // the batch processors export every few seconds
        let log = wait_for(&format!("spans and logs over {protocol}"), Duration::from_secs(30), || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            (log.contains("Name           : collection")
                && log.contains("Name           : scope")
                && log.contains("Name           : health")
                && log.contains("Name           : detach")
                && log.contains("Name           : rule_transition")
                && log.contains("-> rule: Str(node_down)")
                && log.contains("-> target_name: Str(ghost)")
                && log.contains("Body: Str(serving /metrics and /peers on"))
            .then_some(log)
        });
        // a scope span is a child: it has a parent, and some collection span's id is one
        let span_field = |block: &str, field: &str| {
            block.lines().find_map(|l| l.trim().strip_prefix(field)?.trim().strip_prefix(": ").map(str::to_string))
        };
        let spans: Vec<&str> = log.split("Span #").skip(1).collect();
        let collection_ids: Vec<String> = spans
            .iter()
            .filter(|b| span_field(b, "Name").as_deref() == Some("collection"))
            .filter_map(|b| span_field(b, "ID"))
            .collect();
        let nested = spans
            .iter()
            .filter(|b| span_field(b, "Name").as_deref() == Some("scope"))
            .filter_map(|b| span_field(b, "Parent ID"))
            .any(|p| collection_ids.contains(&p));
        assert!(nested, "{protocol}: no scope span inside a collection span; collection ids {collection_ids:?}");
        let service = format!("-> service.name: Str(spans-{})", protocol.replace('/', "-"));
        assert!(log.contains(&service), "{protocol}: resource of spans and logs");
        // the export machinery's own events stay out of the exported logs
        assert!(!log.contains("Body: Str(OTLP export"), "{protocol}: export logs exported");
        drop(agent);
        stop_child(&mut collector, Duration::from_secs(5));
    }
}

/// SIGHUP moves the export: from collector A over HTTP to collector B over
/// gRPC (another header), then off. B gets the metrics /metrics shows,
/// counted from the agent's start (nothing reset), and the agent's spans and
/// logs; A gets nothing after the switch, B nothing after the export is
/// removed; set again (to A), A gets the count from the start. A reload
/// with the same [otlp] rebuilds nothing, and an [otlp] whose exporter
/// cannot be built is refused with the export going on.
#[test]
fn sighup_moves_the_export_to_another_collector() {
    require_root();
    let t0 = std::time::Instant::now();
    let dir = TempDir::new("otlp-reload");
    let signals = ["metrics", "traces", "logs"];
    let (a_http, a_grpc, b_http, b_grpc) = (free_port(), free_port(), free_port(), free_port());
    let (a_log, b_log) = (dir.path().join("rotel-a.log"), dir.path().join("rotel-b.log"));
    // stopped when dropped, after the agent, whether the test passes or not
    let _a = Stopped(start_rotel_logging(dir.path(), a_http, a_grpc, &a_log, &signals));
    let _b = Stopped(start_rotel_logging(dir.path(), b_http, b_grpc, &b_log, &signals));
    let counted = Counted::start(dir.path());
    wait_for("server listening", Duration::from_secs(10), || {
        std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], counted.port).into(), Duration::from_secs(1))
            .ok()
            .map(drop)
    });
    let body = |otlp: &str| {
        format!(
            "[agent]\ninterval = \"500ms\"\ndiscover = false\n{otlp}\n[[targets]]\nname = \"otlp-reload\"\ncgroup = \"{}\"\n",
            counted.cgroup.path.display()
        )
    };
    let to_a = format!(
        "[otlp]\nendpoint = \"http://127.0.0.1:{a_http}/v1/metrics\"\ninterval = \"1s\"\ntimeout = \"1s\"\n[otlp.headers]\nx-tenant = \"t1\"\n"
    );
    let to_b = format!(
        "[otlp]\nendpoint = \"http://127.0.0.1:{b_grpc}\"\nprotocol = \"grpc\"\ninterval = \"1s\"\ntimeout = \"1s\"\n[otlp.headers]\nx-tenant = \"t2\"\n"
    );
    let agent = start_agent_with_env(&body(&to_a), &[("OTEL_SERVICE_NAME", "reloaded".to_string())]);
    let config = agent.dir.path().join("nodescope.toml");
    let write_config = |otlp: &str| {
        std::fs::write(&config, format!("[http]\nlisten = \"127.0.0.1:{}\"\n{}", agent.port, body(otlp))).unwrap()
    };
    let hup = || {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(agent.child.id() as libc::pid_t, libc::SIGHUP) }, 0);
    };
    let reloads = |result: &str| metric_sum(&agent.metrics(), "nodescope_config_reloads_total", &[("result", result)]);
    let prom_attrs = [("nodescope_target", "otlp-reload"), ("nodescope_connection_direction", "inbound")];
    let attrs = [("nodescope.target", "otlp-reload"), ("nodescope.connection.direction", "inbound")];
    let closed = || metric_sum(&agent.metrics(), "nodescope_connection_closed_total", &prom_attrs);
    let at = |log: &std::path::Path| {
        rotel_values(&std::fs::read_to_string(log).unwrap_or_default(), "nodescope.connection.closed", &attrs)
            .last()
            .copied()
    };
    let len = |log: &std::path::Path| std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
    // the collector's last value equal to /metrics' once the count stands still
    let until_equal = |what: &str, log: &std::path::Path, made: f64| {
        wait_for(what, Duration::from_secs(20), || (at(log) == Some(made) && closed() == made).then_some(()))
    };

    // A receives the target's connection count over HTTP
    let first = wait_for("the target's connections counted", Duration::from_secs(20), || {
        counted.connect(1);
        std::thread::sleep(Duration::from_millis(600));
        let n = closed();
        (n > 0.0).then_some(n)
    });
    counted.connect(4);
    let mut made = first + 4.0;
    until_equal("A's count equal to /metrics", &a_log, made);

    // SIGHUP: to B over gRPC (listening by then)
    wait_for("B listening", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", b_grpc)).ok());
    write_config(&to_b);
    let switched = std::time::Instant::now();
    hup();
    wait_for("the reload applied", Duration::from_secs(10), || (reloads("applied") == 1.0).then_some(()));
    counted.connect(5);
    made += 5.0;
    let first_at_b = wait_for("exports at B", Duration::from_secs(10), || {
        rotel_values(&std::fs::read_to_string(&b_log).unwrap_or_default(), "nodescope.build_info", &[])
            .first()
            .map(|_| switched.elapsed())
    });
    // counted from the start: the connections made before the switch included
    until_equal("B's count equal to /metrics", &b_log, made);
    eprintln!("first export at B {first_at_b:?} after SIGHUP (otlp.interval 1 s); B has {made} connections");
    assert!(
        first_at_b <= Duration::from_secs(6),
        "first export at B {first_at_b:?} after SIGHUP:\n{}",
        agent.log().lines().filter(|l| l.contains("OTLP") || l.contains("SIGHUP")).collect::<Vec<_>>().join("\n")
    );
    // A: nothing more, over two export intervals (the spans and logs A's
    // batch processors held went out at the switch, before B's first export)
    let a_len = len(&a_log);
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(len(&a_log), a_len, "A received more after the switch:\n{}", {
        let log = std::fs::read_to_string(&a_log).unwrap();
        log[a_len as usize..].chars().take(2000).collect::<String>()
    });
    assert_eq!(at(&a_log), Some(first + 4.0), "A's last count");
    // the agent's spans and logs follow: B has collection spans and the reload's own log line
    let b_text = wait_for("spans and logs at B", Duration::from_secs(15), || {
        let log = std::fs::read_to_string(&b_log).unwrap_or_default();
        (log.contains("Name           : collection") && log.contains("Body: Str(SIGHUP: config reloaded from"))
            .then_some(log)
    });
    assert!(b_text.contains("-> service.name: Str(reloaded)"), "the resource at B");
    let agent_log = agent.log();
    assert!(
        agent_log
            .contains(&format!("OTLP export (grpc) to http://127.0.0.1:{b_grpc} every 1s with headers [\"x-tenant\"]")),
        "{agent_log}"
    );

    // the same file again: nothing rebuilt
    hup();
    wait_for("the second reload applied", Duration::from_secs(10), || (reloads("applied") == 2.0).then_some(()));
    assert_eq!(agent.log().matches("SIGHUP: [otlp] changed").count(), 1, "{}", agent.log());
    assert_eq!(agent.log().matches("exporting metrics over OTLP").count(), 2, "{}", agent.log());

    // a header gRPC cannot carry: refused, B goes on receiving
    write_config(&to_b.replace("x-tenant = \"t2\"", "\"bad key\" = \"t3\""));
    hup();
    wait_for("the refusal", Duration::from_secs(10), || {
        agent.log().lines().find(|l| l.contains("SIGHUP: config error: otlp:") && l.contains("bad key")).map(drop)
    });
    wait_for("the refusal counted", Duration::from_secs(5), || (reloads("rejected") == 1.0).then_some(()));
    counted.connect(3);
    made += 3.0;
    until_equal("B's count after the refused reload", &b_log, made);

    // SIGHUP without [otlp]: no more exports anywhere
    write_config("");
    hup();
    wait_for("the third reload applied", Duration::from_secs(10), || (reloads("applied") == 3.0).then_some(()));
    // what B's span and log processors held goes out as they stop
    std::thread::sleep(Duration::from_millis(1500));
    let (b_len, ok) = (len(&b_log), metric_sum(&agent.metrics(), "nodescope_otlp_exports_total", &[("result", "ok")]));
    counted.connect(2);
    made += 2.0;
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(len(&b_log), b_len, "B received more after the export was removed");
    assert_eq!(len(&a_log), a_len, "A received more after the export was removed");
    let m = agent.metrics();
    assert_eq!(metric_sum(&m, "nodescope_otlp_exports_total", &[("result", "ok")]), ok);
    // and /metrics counted on through all three reloads
    wait_for("/metrics' count", Duration::from_secs(10), || (closed() == made).then_some(()));

    // back to A over HTTP: the count from the start, the time without export included
    write_config(&to_a);
    hup();
    wait_for("the fourth reload applied", Duration::from_secs(10), || (reloads("applied") == 4.0).then_some(()));
    until_equal("A's count after the export is back", &a_log, made);
    assert_eq!(len(&b_log), b_len, "B received more after the export went back to A");
    eprintln!("sighup_moves_the_export_to_another_collector: {:?}", t0.elapsed());
}

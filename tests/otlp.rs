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
    let mut collector = Command::new(&rotel)
        .args(["start", "--otlp-http-endpoint", &format!("127.0.0.1:{http_port}")])
        .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc_port}")])
        .args(["--exporter", "blackhole", "--debug-log", "metrics", "--debug-log-verbosity", "detailed"])
        .args(["--pid-file", dir.path().join("rotel.pid").to_str().unwrap()])
        .stdout(std::fs::File::create(&log_path).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // a server in a watched cgroup, and connections to it that the test counts
    let cgroup = Cgroup::new();
    let port = free_port();
    let server_py = format!(
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\ns.bind(('127.0.0.1',{port})); s.listen(64)\nwhile True:\n    c,_=s.accept(); c.recv(8); c.close()\n"
    );
    let mut server = spawn_in(Some(&cgroup), "python3", &["-c".into(), server_py], &dir.path().join("server.log"));
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

    drop(agent);
    stop_child(&mut server, Duration::from_secs(5));
    stop_child(&mut collector, Duration::from_secs(5));
    drop(cgroup);
}

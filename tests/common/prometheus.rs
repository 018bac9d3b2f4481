//! Debian's Prometheus server scraping one agent every second, with its data
//! in a temp dir (and a rule file when asked); stopped by pid when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use super::{free_port, http_get, require_tool, stop_child, wait_for, TempDir};

pub struct Prometheus {
    child: Child,
    pub port: u16,
    dir: TempDir,
}

/// Percent-encodes a PromQL expression for a query string.
pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Prometheus {
    /// Scrapes 127.0.0.1:`agent_port` as job "nodescope"; returns once it
    /// has scraped twice (whether the agent answered or not).
    pub fn start(agent_port: u16, rule_file: Option<&Path>) -> Prometheus {
        require_tool("prometheus", "prometheus");
        let dir = TempDir::new("prometheus");
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        let rules = rule_file.map(|f| format!("rule_files:\n  - {}\n", f.display())).unwrap_or_default();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n{rules}scrape_configs:\n  - job_name: nodescope\n    static_configs:\n      - targets: [\"127.0.0.1:{agent_port}\"]\n"
            ),
        )
        .unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .unwrap();
        let mut p = Prometheus { child, port, dir };
        wait_for("prometheus ready", Duration::from_secs(30), || {
            if let Ok(Some(st)) = p.child.try_wait() {
                panic!("prometheus exited with {st}");
            }
            http_get(port, "/-/ready").ok().filter(|r| r.0 == 200)
        });
        wait_for("prometheus scraping", Duration::from_secs(30), || {
            p.value("count_over_time(up[1m])", None).filter(|v| *v >= 2.0)
        });
        p
    }

    /// A successful API answer's JSON.
    pub fn api(&self, path: &str) -> Value {
        let (status, body) = http_get(self.port, path).unwrap();
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {status} {e}: {body}"));
        assert_eq!(v["status"], "success", "{path}: {body}");
        v
    }

    /// The instant vector of `expr` now.
    pub fn query(&self, expr: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", urlencode(expr)))["data"]["result"].as_array().unwrap().clone()
    }

    /// The first value of `query` at `at` (unix seconds; now when None);
    /// None when it has none or the query fails.
    pub fn value(&self, query: &str, at: Option<f64>) -> Option<f64> {
        let time = at.map(|t| format!("&time={t:.3}")).unwrap_or_default();
        let (status, body) = http_get(self.port, &format!("/api/v1/query?query={}{time}", urlencode(query))).ok()?;
        let v: Value = serde_json::from_str(&body).ok()?;
        (status == 200).then_some(())?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Every pending and firing alert: labels, state, activeAt, value.
    pub fn alerts(&self) -> Vec<Value> {
        self.api("/api/v1/alerts")["data"]["alerts"].as_array().unwrap().clone()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
        if std::thread::panicking() {
            eprintln!(
                "--- prometheus log ---\n{}",
                std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
            );
        }
    }
}
